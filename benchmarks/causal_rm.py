"""Plain vs causal Bradley–Terry reward models on the embedded attribute task.

Issue 16: a reward model trained on preference pairs whose chosen response
is usually the longer one (the training split of
:mod:`alignax.data.attribute_task`, ``data.preference.task_length_bias``)
can learn length instead of the attributes that define the preference. The
causal reward model (``objective='causal_reward'``, Wang et al., 2025) adds
an MMD penalty between the representations of length bins. Both are trained
here with the same data, model, seed and steps, then scored on the held-out
pairs (functions of documents never trained on; chosen longer in half the
pairs):

* pairwise accuracy (chosen reward > rejected), overall and split by
  whether the chosen response is the longer or the shorter one (in tokens);
* the correlation (Pearson and Spearman) of the reward with the response's
  token length over all held-out responses.

Run (CPU minutes; tiny model from scratch, or the UL2 demo LM)::

  python benchmarks/causal_rm.py --steps=300 --mmd_weights=0.1,1.0
  python benchmarks/causal_rm.py --init_from=/tmp/alignax_demo   # demo size
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx
from scipy import stats

from alignax import defaults
from alignax import policy
from alignax import train
from alignax.data import preference
from alignax.objectives import common
from alignax.objectives import multi_reward


def config(args, objective, mmd_weight=0.0):
  c = defaults.base_config()
  c.seed = args.seed
  c.objective = objective
  if args.init_from:  # the UL2 demo LM (configs/demo.py's size)
    c.checkpoint.init_from = args.init_from
  else:
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, d_ff=192, max_seq_len=128)
  c.data.task = "preference"
  c.data.source = "embedded"
  c.data.preference.update(format="pairs", embedded_task="attributes",
                           groups_per_row=4, max_prompt_len=48,
                           max_response_len=24,
                           task_length_bias=args.length_bias)
  c.optimizer.update(lr=args.lr, warmup_steps=min(20, args.steps // 10),
                     weight_decay=0.0)
  c.train.update(steps=args.steps, batch_size=16, seq_len=128,
                 log_every=max(args.steps // 5, 1), eval_every=0,
                 progress_bar=False)
  c.checkpoint.update(save_every=args.steps, keep=1, async_save=False)
  c.tokenizer.cache_dir = args.tokenizer_dir
  if objective == "causal_reward":
    c.reward.update(mmd_weight=mmd_weight, num_bins=args.num_bins,
                    mmd_features=args.features)
  return c


def heldout_scores(trainer):
  """Host ``(rewards [P, 2], token lengths [P, 2])`` of the held-out pairs."""
  c = trainer.config
  batches = preference.build_preference_eval_batches(
      c.data, trainer.tokenizer, seq_len=c.train.seq_len,
      batch_size=c.train.batch_size, num_batches=None)

  @jax.jit
  def score(params, batch):
    model = nnx.merge(trainer.graphdef, params)
    states, _, present = multi_reward.slot_states(
        common.hidden_states(model, batch), batch)
    lengths = policy.completion_lengths(common.slot_weights(batch))
    return (model.rewards_from_hidden(states), lengths,
            batch["valid"].astype(bool) & present)

  rewards, lengths = [], []
  for batch in batches:
    r, n, ok = (np.asarray(x) for x in score(trainer.state.params, batch))
    ok = ok.reshape(-1, 2).all(-1)
    rewards.append(r.reshape(-1, 2)[ok])
    lengths.append(n.reshape(-1, 2)[ok])
  return np.concatenate(rewards), np.concatenate(lengths)


def summary(rewards, lengths):
  correct = rewards[:, 0] > rewards[:, 1]
  longer = lengths[:, 0] > lengths[:, 1]
  shorter = lengths[:, 0] < lengths[:, 1]
  flat_r, flat_n = rewards.ravel(), lengths.ravel()
  return {"pairs": len(rewards), "accuracy": correct.mean(),
          "acc_chosen_longer": correct[longer].mean(),
          "acc_chosen_shorter": correct[shorter].mean(),
          "pearson_len": np.corrcoef(flat_r, flat_n)[0, 1],
          "spearman_len": stats.spearmanr(flat_r, flat_n).statistic}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--mmd_weights", default="1.0",
                 help="comma-separated MMD weights, one causal RM each")
  p.add_argument("--num_bins", type=int, default=4)
  p.add_argument("--features", default="hidden", choices=("hidden", "reward"))
  p.add_argument("--length_bias", type=float, default=0.85)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--init_from", default="")
  p.add_argument("--workdir", default="/tmp/alignax_causal_rm")
  p.add_argument("--tokenizer_dir", default="/tmp/alignax_tokenizer")
  args = p.parse_args()
  rows = []
  runs = [("plain BT", "reward_model", 0.0)] + [
      (f"causal (mmd {w}, {args.features})", "causal_reward", float(w))
      for w in args.mmd_weights.split(",")]
  for name, objective, weight in runs:
    workdir = os.path.join(args.workdir, f"{objective}_{weight}")
    start = time.perf_counter()
    trainer, last = train.run(config(args, objective, weight), workdir)
    seconds = time.perf_counter() - start
    result = summary(*heldout_scores(trainer))
    rows.append((name, result, last.get("train/loss"), seconds))
  print(f"\nload average: {os.getloadavg()}")
  print(f"{args.steps} steps, length bias {args.length_bias}, "
        f"init_from={args.init_from or 'scratch'}, seed {args.seed}")
  print("| model | held-out pairs | accuracy | acc. (chosen longer) | "
        "acc. (chosen shorter) | Pearson(reward, length) | "
        "Spearman(reward, length) | last train loss | wall s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r, loss, seconds in rows:
    print(f"| {name} | {r['pairs']} | {r['accuracy']:.3f} | "
          f"{r['acc_chosen_longer']:.3f} | {r['acc_chosen_shorter']:.3f} | "
          f"{r['pearson_len']:+.3f} | {r['spearman_len']:+.3f} | "
          f"{loss:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
  main()
