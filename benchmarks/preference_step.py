"""Preference train step versus the pretraining step, at equal tokens.

  python benchmarks/preference_step.py                 # demo-sized model
  python benchmarks/preference_step.py --steps=10 --size=small

Both steps see ``[batch, seq_len]`` rows of the same shape: packed LM text
for the pretraining step; packed (prompt, chosen, rejected) groups for DPO.
DPO runs with the frozen reference (one more forward pass per step), with
cached reference log-probs (no reference pass), and with the prompt repeated
per response (``shared_prompt=False``) to show what prompt sharing saves.
Rows are synthetic (random ids; the time does not depend on them) with
demo-like lengths: prompts of 8 to 40 tokens, responses of 3 to 10.
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from alignax import defaults  # noqa: E402
from alignax import sharding as shd  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax import step as step_lib  # noqa: E402
from alignax.data import preference_packing as packing  # noqa: E402
from alignax.models import ModelConfig  # noqa: E402
from alignax.objectives import lm  # noqa: E402
from alignax.objectives import preference as pref  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SIZES, synthetic_batch  # noqa: E402


def pair_batch(rows, seq_len, vocab, shared, seed=0):
  """One packed batch of synthetic pairs filling ``rows`` rows."""
  rng = np.random.default_rng(seed)
  exs = [{"index": i,
          "prompt": list(rng.integers(1, vocab, rng.integers(8, 41))),
          "responses": [list(rng.integers(1, vocab, rng.integers(3, 11)))
                        for _ in range(2)],
          "labels": np.array([1.0, 0.0], np.float32),
          "valid": np.ones(2, bool), "rewards": np.zeros((2, 0), np.float32),
          "ref_logps": rng.normal(-30, 5, 2).astype(np.float32)}
         for i in range(rows * 8)]
  layout = packing.Layout(2, 8, 0, shared)
  ds = grain.MapDataset.source(exs).to_iter_dataset()
  return next(iter(packing.pack_and_batch(ds, layout, seq_len=seq_len,
                                          batch_size=rows,
                                          shuffle_bins=False)))


def make_timer(objective, graphdef, state, shardings, optimizer, mesh, batch,
               frozen):
  """Compiles the step; returns ``time(steps) -> seconds per step``."""
  step = step_lib.jit_train_step(
      step_lib.make_train_step(objective, graphdef, optimizer), shardings,
      mesh, shardings.params if frozen is not None else None)
  box = [jax.tree.map(lambda x: x.copy(), state)]  # the step donates it
  data = shd.host_to_global(batch, mesh)
  box[0], m = step(box[0], data, frozen)  # compile
  jax.block_until_ready(m)

  def time_steps(steps):
    t0 = time.perf_counter()
    for _ in range(steps):
      box[0], out = step(box[0], data, frozen)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps

  return time_steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()
  d, layers, heads, kv, ff, vocab, seq_len, rows = SIZES[args.size]
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers,
                    n_heads=heads, n_kv_heads=kv, head_dim=d // heads,
                    d_ff=ff, max_seq_len=seq_len)
  mesh = shd.make_mesh({"fsdp": -1})
  optimizer, _ = state_lib.build_optimizer(defaults.base_config().optimizer,
                                           1000)
  graphdef, state, shardings = state_lib.create_train_state(
      cfg, optimizer, mesh, shd.DEFAULT_RULES, seed=0)
  frozen = jax.tree.map(lambda x: x.copy(), state.params)
  timer = functools.partial(make_timer, graphdef=graphdef, state=state,
                            shardings=shardings, optimizer=optimizer,
                            mesh=mesh)
  dpo = functools.partial(pref.pairwise_objective,
                          pair_loss=pref.build_pair_loss(
                              defaults.base_config().preference), beta=0.1)
  shared, separate = (pair_batch(rows, seq_len, vocab, s) for s in (True,
                                                                   False))
  cases = [
      ("pretraining (LM)", lm.lm_objective,
       synthetic_batch(rows, seq_len, vocab), None),
      ("DPO, frozen reference", functools.partial(dpo, reference="frozen"),
       shared, frozen),
      ("DPO, cached reference", functools.partial(dpo, reference="cached"),
       shared, None),
      ("DPO, frozen, prompt per response",
       functools.partial(dpo, reference="frozen"), separate, frozen),
  ]
  dev = jax.devices()[0]
  print(f"device: {jax.device_count()} x {dev.device_kind}; model "
        f"{args.size} ({cfg.num_params() / 1e6:.2f}M params), batch "
        f"{rows}x{seq_len}")
  print("| step | ms/step | tokens/step | tokens/s | pairs/step | pairs/s |")
  print("|---|---|---|---|---|---|")
  timers = [timer(objective, batch=batch, frozen=ref)
            for _, objective, batch, ref in cases]
  # Rounds alternate the cases and keep each one's best round, so load from
  # other processes hits every case alike.
  best = [float("inf")] * len(timers)
  for _ in range(args.rounds):
    for i, t in enumerate(timers):
      best[i] = min(best[i], t(args.steps))
  base = None
  for (name, _, batch, _), seconds in zip(cases, best):
    tokens = int(np.sum(batch["segment_ids"] > 0))
    pairs = int(batch["valid"].sum()) // 2 if "valid" in batch else 0
    base = base or seconds
    pair_cols = (f"{pairs} | {pairs / seconds:,.0f}" if pairs else "- | -")
    print(f"| {name} | {seconds * 1e3:.0f} ({seconds / base:.2f}x) | "
          f"{tokens} | {tokens / seconds:,.0f} | {pair_cols} |", flush=True)


if __name__ == "__main__":
  main()
