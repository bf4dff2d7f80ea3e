"""alignax's DPO step against TRL's ``DPOTrainer`` on one CPU, side by side.

Both stacks train the same tiny Llama (4 layers, d_model 256, 4 heads of 64,
SwiGLU 768, vocabulary 8192, untied embeddings, float32) on the same 8
pairs of a 64-token prompt and two 192-token responses (TRL's
``max_length=256`` per sequence, one pair = 448 distinct tokens), with
AdamW and global-norm clipping at 1.0, one optimizer step per batch:

* TRL (its own virtualenv: ``torch==2.13.0``, ``trl``, ``transformers``):
  ``DPOTrainer.training_step`` (forward, loss, backward) + clipping +
  ``optimizer.step()``, on one collated batch, with the frozen reference
  model (``precompute_ref_log_probs=False``) and with precomputed reference
  log-probs (``True``). The data goes through TRL's own pipeline (a
  word-level tokenizer built here, ``w<id>`` -> id, so the ids are exact).
* alignax (this virtualenv): the jitted train step of ``train.py`` with the
  frozen reference and with cached reference log-probs, on shared-prompt
  rows of 448 tokens (one pair per row: prompt once, then both responses).

Each stack runs in its own worker process, compiled/warmed once; the driver
then alternates the four cases round by round (``--rounds`` x ``--steps``
steps each) so that load hits them alike, prints the load average with every
round, and reports each case's median and best seconds per step, tokens/s
and the model FLOP rate against a matmul peak measured before and after the
rounds. Usage::

  python3.11 -m venv /tmp/trlv && /tmp/trlv/bin/pip install torch==2.13.0 \\
      trl transformers datasets accelerate
  python benchmarks/trl_dpo.py --trl_python=/tmp/trlv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
             head_dim=64, d_ff=768)
PAIRS, PROMPT, RESPONSE = 8, 64, 192  # TRL max_length = PROMPT + RESPONSE


def pairs(seed=0):
  """The shared data: ``PAIRS`` x (prompt, chosen, rejected) token ids; the
  responses end with the EOS id 2."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = lambda n: [int(x) for x in rng.integers(4, MODEL["vocab_size"], n)]
  return [(ids(PROMPT), ids(RESPONSE - 1) + [2], ids(RESPONSE - 1) + [2])
          for _ in range(PAIRS)]


def model_flops_per_step(tokens_trained: int, forwards: float) -> float:
  """``ModelConfig.flops_per_token`` (6 N + attention over the sequence,
  PaLM appendix B) per trained token, times ``forwards`` / 3 more for a
  reference forward."""
  sys.path.insert(0, ROOT)
  from alignax.models import ModelConfig  # pylint: disable=import-outside-toplevel
  seq = PROMPT + RESPONSE
  return (ModelConfig(**MODEL, max_seq_len=seq).flops_per_token(seq)
          * tokens_trained * forwards)


# ------------------------------------------------------------------ workers

_TRL_WORKER = r'''
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
import datasets
from datasets import Dataset
datasets.disable_progress_bars()
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
spec = json.loads(sys.argv[1])
m, data = spec["model"], spec["pairs"]
vocab = {f"w{i}": i for i in range(m["vocab_size"])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1",
                                    pad_token="w0", eos_token="w2", bos_token="w3")
text = lambda ids: " ".join(f"w{i}" for i in ids)
# The responses end with EOS (" w2"), so TRL appends none.
ds = Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c),
                         "rejected": " " + text(r)} for p, c, r in data])
def trainer(precompute):
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["d_model"],
                    intermediate_size=m["d_ff"], num_hidden_layers=m["n_layers"],
                    num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
                    head_dim=m["head_dim"], max_position_embeddings=1024,
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=3)
  model = LlamaForCausalLM(cfg)
  ref = None if precompute else LlamaForCausalLM(cfg)
  args = DPOConfig(output_dir="/tmp/trl_dpo_bench", per_device_train_batch_size=len(data),
                   max_length=spec["max_length"], precompute_ref_log_probs=precompute,
                   learning_rate=1e-5, max_grad_norm=1.0, report_to=[], logging_steps=10**6,
                   save_strategy="no", use_cpu=True, beta=0.1, dataloader_num_workers=0,
                   seed=0, bf16=False, disable_tqdm=True)
  t = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                 processing_class=tokenizer)
  batch = next(iter(t.get_train_dataloader()))
  t.create_optimizer_and_scheduler(num_training_steps=10**6)
  t.current_gradient_accumulation_steps = 1  # set by Trainer's own loop
  model.train()
  assert tuple(batch["input_ids"].shape) == (2 * len(data), spec["max_length"]), batch["input_ids"].shape
  def step():
    t.training_step(model, batch)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    t.optimizer.step(); t.lr_scheduler.step(); model.zero_grad()
  return step, int(batch["attention_mask"].sum())
cases = {"trl_frozen": trainer(False), "trl_precomputed": trainer(True)}
for name, (step, _) in cases.items():
  step(); step()  # warm-up
print("READY " + json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
      "tokens": {k: v[1] for k, v in cases.items()},
      "versions": {p: __import__(p).__version__ for p in ("trl", "transformers")}}), flush=True)
for line in sys.stdin:
  name, steps = line.split()
  step = cases[name][0]
  t0 = time.perf_counter()
  for _ in range(int(steps)):
    step()
  print("TIME %.6f" % ((time.perf_counter() - t0) / int(steps)), flush=True)
'''

_ALIGNAX_WORKER = r'''
import json, os, sys, time, functools
sys.path.insert(0, os.getcwd())
import grain, jax, numpy as np
from alignax import defaults, metrics as metrics_lib, sharding as shd, state as state_lib, step as step_lib
from alignax.data import preference_packing as packing
from alignax.models import ModelConfig
from alignax.objectives import preference as pref
spec = json.loads(sys.argv[1])
m, data = spec["model"], spec["pairs"]
seq_len = len(data[0][0]) + len(data[0][1]) + len(data[0][2])  # one pair per row
cfg = ModelConfig(**m, max_seq_len=seq_len)
mesh = shd.make_mesh({"fsdp": -1})
c = defaults.base_config()
c.optimizer.lr, c.optimizer.grad_clip_norm = 1e-5, 1.0
optimizer, _ = state_lib.build_optimizer(c.optimizer, 10**6)
graphdef, state, shardings = state_lib.create_train_state(cfg, optimizer, mesh,
                                                          shd.DEFAULT_RULES, seed=0)
frozen = jax.tree.map(lambda x: x.copy(), state.params)
exs = [{"index": i, "prompt": p, "responses": [ch, rj],
        "labels": np.array([1.0, 0.0], np.float32), "valid": np.ones(2, bool),
        "rewards": np.zeros((2, 0), np.float32),
        "ref_logps": np.array([-400.0, -400.0], np.float32)}
       for i, (p, ch, rj) in enumerate(data)]
ds = grain.MapDataset.source(exs).to_iter_dataset()
batch = next(iter(packing.pack_and_batch(ds, packing.Layout(2, 1, 0, True), seq_len=seq_len,
                                         batch_size=len(data), shuffle_bins=False)))
assert int(batch["valid"].sum()) == 2 * len(data), batch["valid"]
dpo = functools.partial(pref.pairwise_objective,
                        pair_loss=pref.build_pair_loss(c.preference), beta=0.1)
data_global = shd.host_to_global(batch, mesh)
def timer(reference):
  ref = frozen if reference == "frozen" else None
  step = step_lib.jit_train_step(
      step_lib.make_train_step(functools.partial(dpo, reference=reference), graphdef, optimizer),
      shardings, mesh, shardings.params if ref is not None else None)
  box = [jax.tree.map(lambda x: x.copy(), state)]
  def run(steps):
    for _ in range(steps):
      box[0], out = step(box[0], data_global, ref)
    jax.block_until_ready(out)
  return run
cases = {"alignax_frozen": timer("frozen"), "alignax_cached": timer("cached")}
for run in cases.values():
  run(2)  # compile + warm-up
peak = metrics_lib.measured_matmul_flops()
print("READY " + json.dumps({"jax": jax.__version__, "tokens": int(np.sum(batch["segment_ids"] > 0)),
      "row": [len(data), seq_len], "peak_flops": peak}), flush=True)
for line in sys.stdin:
  name, steps = line.split()
  if name == "peak":
    print("TIME %.6f" % metrics_lib.measured_matmul_flops(), flush=True)
    continue
  t0 = time.perf_counter()
  cases[name](int(steps))
  print("TIME %.6f" % ((time.perf_counter() - t0) / int(steps)), flush=True)
'''


class Worker:
  """A worker process: ``READY <json>`` once, then ``TIME <s>`` per command."""

  def __init__(self, python, code, spec):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    self.proc = subprocess.Popen([python, "-c", code, json.dumps(spec)], cwd=ROOT,
                                 env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
    self.info = json.loads(self._expect("READY "))

  def _expect(self, prefix):
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):].strip()
    raise RuntimeError(f"worker exited (status {self.proc.wait()}) before {prefix!r}")

  def time(self, name, steps):
    self.proc.stdin.write(f"{name} {steps}\n")
    return float(self._expect("TIME "))

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--trl_python", required=True,
                      help="python of a virtualenv with torch, trl, transformers")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  spec = {"model": MODEL, "pairs": pairs(), "max_length": PROMPT + RESPONSE}
  print(f"load before start-up {os.getloadavg()[0]:.2f}", flush=True)
  trl = Worker(args.trl_python, _TRL_WORKER, spec)
  ax = Worker(sys.executable, _ALIGNAX_WORKER, spec)
  print("trl:", json.dumps(trl.info), "\nalignax:", json.dumps(ax.info), flush=True)
  cases = [("trl_frozen", trl), ("alignax_frozen", ax),
           ("trl_precomputed", trl), ("alignax_cached", ax)]
  times = {name: [] for name, _ in cases}
  loads = []
  for r in range(args.rounds):
    order = cases if r % 2 == 0 else cases[::-1]
    for name, worker in order:
      times[name].append(worker.time(name, args.steps))
    loads.append(os.getloadavg()[0])
    print(f"round {r}: load {loads[-1]:.2f} " + " ".join(
        f"{n}={times[n][-1] * 1e3:.0f}ms" for n, _ in cases), flush=True)
  peak_after = ax.time("peak", 1)
  trl.close()
  ax.close()
  peak = max(ax.info["peak_flops"], peak_after)
  # Tokens the step trains on: TRL pads nothing here (every sequence is
  # max_length long); alignax's rows hold each prompt once.
  tokens = {"trl_frozen": trl.info["tokens"]["trl_frozen"],
            "trl_precomputed": trl.info["tokens"]["trl_precomputed"],
            "alignax_frozen": ax.info["tokens"], "alignax_cached": ax.info["tokens"]}
  forwards = {"trl_frozen": 4 / 3, "alignax_frozen": 4 / 3,
              "trl_precomputed": 1.0, "alignax_cached": 1.0}
  base = statistics.median(times["trl_precomputed"])
  results = []
  print(f"\nmatmul peak (fp32, best of before/after) {peak / 1e9:.1f} GFLOP/s; "
        f"load {min(loads):.2f}-{max(loads):.2f} over the rounds")
  print("| case | median ms/step | best ms/step | vs TRL precomputed (median) | "
        "tokens/step | tokens/s | model GFLOP/s | of peak |")
  print("|---|---|---|---|---|---|---|---|")
  for name, _ in cases:
    med, best = statistics.median(times[name]), min(times[name])
    flops = model_flops_per_step(tokens[name], forwards[name])
    results.append(dict(case=name, median_s=med, best_s=best, times=times[name],
                        tokens=tokens[name], model_flops=flops))
    print(f"| {name} | {med * 1e3:.0f} | {best * 1e3:.0f} | {base / med:.2f}x | "
          f"{tokens[name]} | {tokens[name] / med:,.0f} | {flops / med / 1e9:.1f} | "
          f"{flops / med / peak:.0%} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(results=results, loads=loads, peak_flops=peak,
                     trl=trl.info, alignax=ax.info), f, indent=1)


if __name__ == "__main__":
  main()
