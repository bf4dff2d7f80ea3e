"""alignax and MaxText compiled side by side for TPU slices, on this host.

Both stacks compile their train step ahead of time for an abstract TPU
topology (libtpu's compiler on a CPU host, nothing runs) on identical model
shapes, and report the compiler's per-chip memory and its cost analysis:

* alignax: ``launch/tpu_train.py --config=configs/ul2_pod.py --compile_for``
  (the UL2 step: token cross-entropy over prefix-LM rows), here through
  :func:`alignax.aot.compile_for` in alignax's own virtualenv;
* MaxText: ``maxtext.trainers.pre_train.train_compile`` (its pretraining
  step on synthetic data) in MaxText's virtualenv (PyPI ``maxtext``, Python
  >= 3.12, its own newer jax and libtpu: the two compilers differ, and the
  versions are printed beside the numbers).

Both use bf16 compute over fp32 weights and Adam state, full remat, scanned
layers and a fully sharded (fsdp = all chips) mesh. The cost analysis of a
scanned layer loop counts the body once on both sides, so the FLOPs and the
compiler's step seconds of the real (scanned) compile are "scan once"
numbers. ``--estimate`` adds comparable step estimates: each stack also
compiles the same step with 1 and 2 layers *unrolled* and extrapolates
``c(L) = c(1) + (L - 1) (c(2) - c(1))`` for XLA's FLOPs and its
``optimal_seconds`` (alignax: :func:`alignax.aot.layer_cost`; MaxText:
``scan_layers=false base_num_decoder_layers=1|2``). Those are the compilers'
idealised estimates, not timings, and each stack's comes from its own libtpu.

The stacks alternate shape by shape; the load average is printed with each.
Usage (MaxText's venv: ``python3.12 -m venv V && V/bin/pip install
'maxtext[tpu]==0.2.5'``)::

  python benchmarks/aot_pods.py --maxtext_python=/tmp/mt/bin/python \\
      --shapes=7b_4x2048,7b_1x8192,1b_16x2048 [--estimate]

``--alignax_python=/tmp/mt/bin/python`` runs alignax's compiles under
MaxText's jax and libtpu too (alignax imports from this checkout), so that
both stacks go through one compiler.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3

# name -> (topology, rows per chip, seq_len, MaxText model_name, alignax model)
LLAMA2_7B = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                 n_kv_heads=32, head_dim=128, d_ff=11008)
# MaxText's "default" model (base.yml): 16 layers of 2048, 1.1B parameters.
MAXTEXT_DEFAULT_1B = dict(vocab_size=32000, d_model=2048, n_layers=16,
                          n_heads=16, n_kv_heads=16, head_dim=128, d_ff=7168)
# Llama-3-8B: GQA (8 KV heads), SwiGLU 14336, vocabulary 128,256.
LLAMA3_8B = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                 n_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=500000.0)
SHAPES = {
    "7b_4x2048": ("v5p-128", 4, 2048, "llama2-7b", LLAMA2_7B),
    "7b_1x8192": ("v5p-128", 1, 8192, "llama2-7b", LLAMA2_7B),
    "1b_16x2048": ("v5p-8", 16, 2048, "default", MAXTEXT_DEFAULT_1B),
    "l3_8b_1x8192": ("v5p-128", 1, 8192, "llama3-8b", LLAMA3_8B),
}
CHIPS = {"v5p-8": 4, "v5p-128": 64}
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v5p-8",
           TPU_WORKER_HOSTNAMES="localhost", TF_CPP_MIN_LOG_LEVEL="3",
           ALLOW_MULTIPLE_LIBTPU_LOAD="1")

_ALIGNAX = """
import json, os, sys
sys.path.insert(0, os.getcwd())  # this checkout, also from another virtualenv
from alignax import aot
from configs import ul2_pod
topology, rows, seq, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
c = ul2_pod.get_config()
c.model.update(model, max_seq_len=seq)
c.tokenizer.num_sentinels = 0
c.train.update(seq_len=seq, batch_size=rows * aot.parse_topology(topology)[2])
estimate = sys.argv[5] == "1"
report = aot.compile_for(c, topology, layer_cost_estimate=estimate, eval_step=False)
import jax, jaxlib, importlib.metadata as md
report["versions"] = {"jax": jax.__version__, "libtpu": md.version("libtpu")}
print("REPORT " + json.dumps(report))
"""


def _run(cmd, cwd=ROOT):
  t0 = time.perf_counter()
  done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True,
                        check=False)
  return done, time.perf_counter() - t0


def alignax_side(shape, estimate=False, python=sys.executable):
  topology, rows, seq, _, model = SHAPES[shape]
  done, seconds = _run([python, "-c", _ALIGNAX, topology, str(rows),
                        str(seq), json.dumps(model), "1" if estimate else "0"])
  line = [l for l in done.stdout.splitlines() if l.startswith("REPORT ")]
  if done.returncode or not line:
    return {"error": done.stderr.strip().splitlines()[-1:] or ["?"],
            "wall_seconds": seconds}
  report = json.loads(line[0][len("REPORT "):])
  if "per_chip_bytes" not in report:
    return {"error": report.get("error"), "wall_seconds": seconds}
  m = report["per_chip_bytes"]
  return {"temp_gib": m["temp"] / GiB, "argument_gib": m["argument"] / GiB,
          "total_gib": m["total"] / GiB, "fits": report["fits"],
          "flops_scan_once": report["hlo_flops_per_chip_scan_once"],
          "step_seconds_scan_once": report["step_seconds_scan_once"],
          "compile_seconds": report["compile_seconds"]["train"],
          "flops_unrolled": report.get("hlo_flops_per_chip"),
          "step_seconds_estimate": report.get("estimated_step_seconds"),
          "model_flops_per_step": report.get("model_flops_per_step"),
          "chips": report["chips"],
          "wall_seconds": seconds, "versions": report["versions"]}


def _maxtext_base_yml(python):
  done = subprocess.run(
      [python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname("
       "maxtext.__file__), 'configs', 'base.yml'))"], env=ENV,
      capture_output=True, text=True, check=True)
  return done.stdout.strip()


def _stat(text, name):
  match = re.search(rf"{name}=(\d+)", text)
  return int(match.group(1)) if match else None


def _maxtext_compile(shape, python, workdir, *extra):
  topology, rows, seq, model_name, _ = SHAPES[shape]
  cmd = [python, "-m", "maxtext.trainers.pre_train.train_compile",
         _maxtext_base_yml(python), f"compile_topology={topology}",
         "compile_topology_num_slices=1", f"model_name={model_name}",
         f"per_device_batch_size={rows}", f"max_target_length={seq}",
         "dataset_type=synthetic", "enable_checkpointing=false",
         "remat_policy=full", f"base_output_directory={workdir}",
         "run_name=aot_pods", *extra]
  return _run(cmd, cwd=workdir)


def _maxtext_cost(out):
  cost = re.search(r"Cost analysis: (\{.*\})", out)
  return ast.literal_eval(cost.group(1)) if cost else {}


def maxtext_estimate(shape, python, workdir):
  """MaxText's step cost with every layer counted: its step compiled with 1
  and 2 unrolled layers, extrapolated linearly to the model's layers."""
  costs = []
  for layers in (1, 2):
    # A named model's fields change only with override_model_config.
    done, _ = _maxtext_compile(shape, python, workdir, "scan_layers=false",
                               f"base_num_decoder_layers={layers}",
                               "override_model_config=true")
    out = done.stdout + done.stderr
    cost = _maxtext_cost(out)
    if done.returncode or not cost:
      tail = [l for l in out.splitlines() if l.strip()][-3:]
      return {"estimate_error": tail}
    costs.append(cost)
  n = SHAPES[shape][4]["n_layers"]
  grow = lambda key: costs[0][key] + (n - 1) * (costs[1][key] - costs[0][key])
  return {"flops_unrolled": grow("flops"),
          "step_seconds_estimate": grow("optimal_seconds")}


def maxtext_side(shape, python, workdir, estimate=False):
  start = time.perf_counter()
  done, seconds = _maxtext_compile(shape, python, workdir, "scan_layers=true")
  out = done.stdout + done.stderr
  temp = _stat(out, "temp_size_in_bytes")
  if done.returncode or temp is None:
    tail = [l for l in out.splitlines() if l.strip()][-3:]
    return {"error": tail, "wall_seconds": seconds}
  cost = _maxtext_cost(out)
  argument = _stat(out, "argument_size_in_bytes")
  output = _stat(out, "output_size_in_bytes")
  alias = _stat(out, "alias_size_in_bytes")
  versions = subprocess.run(
      [python, "-c", "import jax, importlib.metadata as md; print(jax.__version__,"
       " md.version('libtpu'), md.version('maxtext'))"], env=ENV,
      capture_output=True, text=True, check=False).stdout.split()
  result = {"temp_gib": temp / GiB, "argument_gib": argument / GiB,
            "total_gib": (argument + output - alias + temp) / GiB,
            "flops_scan_once": cost.get("flops"),
            "step_seconds_scan_once": cost.get("optimal_seconds"),
            "wall_seconds": seconds,
            "versions": dict(zip(("jax", "libtpu", "maxtext"), versions))}
  if estimate:
    result.update(maxtext_estimate(shape, python, workdir))
    result["wall_seconds"] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--maxtext_python", required=True,
                      help="python of a virtualenv with maxtext[tpu]")
  parser.add_argument("--shapes", default="7b_4x2048,7b_1x8192,1b_16x2048")
  parser.add_argument("--out", default="", help="also write the JSON here")
  parser.add_argument("--alignax_python", default=sys.executable,
                      help="python that runs alignax's compiles (default: "
                      "this one; MaxText's gives both stacks one compiler)")
  parser.add_argument("--estimate", action="store_true",
                      help="add step estimates with every layer counted "
                      "(1- and 2-layer unrolled compiles on both sides)")
  args = parser.parse_args()
  results = []
  workdir = tempfile.mkdtemp(prefix="aot_pods_")
  for shape in args.shapes.split(","):
    for stack in ("alignax", "maxtext"):
      load = os.getloadavg()[0]
      if stack == "alignax":
        r = alignax_side(shape, args.estimate, args.alignax_python)
      else:
        r = maxtext_side(shape, args.maxtext_python, workdir, args.estimate)
      r.update(stack=stack, shape=shape, topology=SHAPES[shape][0],
               load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
      results.append(r)
      print(json.dumps(r), flush=True)
  print("\n| shape | stack | per-chip temp GiB | total GiB | HLO TFLOP/chip "
        "(scan once) | compiler s (scan once) | HLO TFLOP/chip (all layers) "
        "| compiler step s (all layers) | load |")
  print("|---|---|---|---|---|---|---|---|---|")
  nan = float("nan")
  for r in results:
    if "error" in r:
      print(f"| {r['shape']} | {r['stack']} | error: {r['error']} | | | | | | |")
      continue
    tflops = (r["flops_scan_once"] or 0) / 1e12
    unrolled = (r.get("flops_unrolled") or nan) / 1e12
    print(f"| {r['shape']} {r['topology']} | {r['stack']} | "
          f"{r['temp_gib']:.2f} | {r['total_gib']:.2f} | {tflops:.1f} | "
          f"{r['step_seconds_scan_once'] or nan:.3f} | {unrolled:.1f} | "
          f"{r.get('step_seconds_estimate') or nan:.3f} | "
          f"{r['load_before']}-{r['load_after']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
