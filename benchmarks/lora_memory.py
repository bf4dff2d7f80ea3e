"""State and step memory: full fine-tuning vs LoRA vs QLoRA int8 / nf4 (DPO).

The same model and batch, four ways (issue 15):

* ``full``: every parameter trained, reference = a frozen copy (a second
  argument of the step);
* ``lora``: rank-16 adapters on q/k/v/o/gate/up/down, reference = the base
  with adapters off (``reference='base'``: no copy);
* ``qlora_int8`` / ``qlora_nf4``: the same with the frozen block kernels
  stored int8 / NF4.

Per device: the train state's bytes (params + optimizer; from the shard
shapes, what ``train.describe`` prints as "state per device") plus the
frozen reference, and the compiled train step's ``memory_analysis()``.
Run on this host's 8 forced CPU devices (a small model)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python benchmarks/lora_memory.py

or compiled for a TPU slice (``--compile_for``'s path; needs libtpu)::

  python benchmarks/lora_memory.py --topology=v5p-128 \\
      --config=configs/llama3_8b_pod.py:dpo --variants=lora
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys

import jax
import numpy as np

from alignax import aot
from alignax import defaults
from alignax import sharding as shd

VARIANTS = ("full", "lora", "qlora_int8", "qlora_nf4")
MiB = 2**20


def small_config():
  """A DPO config small enough to compile in seconds on CPU."""
  c = defaults.base_config()
  c.objective, c.data.task = "dpo", "preference"
  c.model.update(vocab_size=8192, d_model=512, n_layers=4, n_heads=8,
                 n_kv_heads=4, head_dim=64, d_ff=1536, max_seq_len=512,
                 dtype="bfloat16", remat="full")
  c.train.update(batch_size=16, seq_len=512)
  return c


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def variant(config, name: str):
  c = config.copy_and_resolve_references()
  if name == "full":
    c.reference, c.lora.enabled = "frozen", False
  else:
    c.reference = "base"
    c.lora.update(enabled=True, rank=16, alpha=32.0,
                  quant=name.removeprefix("qlora_") if "qlora" in name
                  else "none")
  return c


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of an abstract tree carrying shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def measure_cpu(config) -> dict:
  mesh = shd.make_mesh(config.mesh)
  model_cfg = aot.model_config(config)
  steps = aot.build_steps(config, model_cfg, mesh)
  state, _, frozen = steps.train_args
  compiled, seconds = aot.compile_step(steps.train, steps.train_args)
  return {
      "state_bytes": _bytes_per_device(state),
      "params_bytes": _bytes_per_device(state.params),
      "opt_bytes": _bytes_per_device(state.opt_state),
      "reference_bytes": _bytes_per_device(frozen) if frozen else 0,
      "step": aot._memory(compiled),  # pylint: disable=protected-access
      "compile_seconds": round(seconds, 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="", help="FILE[:ARG]; default small")
  parser.add_argument("--topology", default="", help="e.g. v5p-128")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args(argv)
  base = load_config(args.config) if args.config else small_config()
  for name in args.variants.split(","):
    config = variant(base, name)
    if args.topology:
      report = aot.compile_for(config, args.topology,
                               layer_cost_estimate=False, eval_step=False)
      out = {"variant": name, "per_chip_bytes": report.get("per_chip_bytes"),
             "fits": report.get("fits"), "params": report["params"],
             "compile_seconds": report.get("compile_seconds")}
    else:
      out = dict(variant=name, **measure_cpu(config))
    print(json.dumps(out), flush=True)
    if not args.topology:
      m = out["step"]
      print(f"{name:11s} state {out['state_bytes'] / MiB:8.2f} MiB "
            f"(params {out['params_bytes'] / MiB:.2f}, opt "
            f"{out['opt_bytes'] / MiB:.2f}) + reference "
            f"{out['reference_bytes'] / MiB:.2f} MiB; step total "
            f"{m['total'] / MiB:.1f} MiB (args {m['argument'] / MiB:.1f}, "
            f"temp {m['temp'] / MiB:.1f})", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
