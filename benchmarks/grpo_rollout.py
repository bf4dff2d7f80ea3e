"""Online GRPO rollouts: sampled and trained tokens/s and the time split.

  python benchmarks/grpo_rollout.py                        # demo size, code task
  python benchmarks/grpo_rollout.py --prompt_mode='[S2S]'  # prefix-LM sampling
  python benchmarks/grpo_rollout.py --task=docstring --max_completion_length=12

Runs the rollout steps of :mod:`alignax.rl` (the same ``RLTrainer`` and
``Rollouts``) on the default devices: sample ``G`` completions of
``--prompts`` prompts with ``alignax.generate`` from the train state's own
parameters, score them (the code task: one sandboxed subprocess per
completion, run concurrently), build the rollout batch (old log-probs by
the fused path when ``--num_iterations > 1``), then ``--num_iterations``
jitted GRPO train steps. Reported per rollout step, medians over
``--rollouts`` steps after ``--warmup`` compile steps:

* sampled tokens/s: completion tokens kept (through the stop) / generate s;
* train tokens/s: real tokens of the batch x iterations / train s;
* generate / score / logps (batch building, log-probs) / train seconds.

The model is randomly initialised (``--init_from`` a run for a trained
one), the demo size of ``configs/demo.py`` by default.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from alignax import defaults  # noqa: E402
from alignax import rl  # noqa: E402
from alignax import rollout  # noqa: E402


def config(args):
  c = defaults.base_config()
  c.objective = "grpo"
  c.model.update(d_model=args.d_model, n_layers=args.n_layers)
  c.tokenizer.cache_dir = os.path.join(tempfile.gettempdir(),
                                       "alignax_bench_tokenizer")
  c.checkpoint.init_from = args.init_from
  c.train.update(seq_len=args.seq_len, steps=10**6, eval_every=0,
                 progress_bar=False)
  c.grpo.update(task=args.task, prompt_mode=args.prompt_mode,
                num_generations=args.num_generations,
                prompts_per_step=args.prompts,
                max_completion_length=args.max_completion_length,
                num_iterations=args.num_iterations, eval_prompts=0)
  c.mesh.update(fsdp=-1)
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="code", choices=rl.TASK_NAMES)
  p.add_argument("--prompt_mode", default="", help="'' causal | '[S2S]'")
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--num_generations", type=int, default=4)
  p.add_argument("--max_completion_length", type=int, default=40)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--num_iterations", type=int, default=1)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--n_layers", type=int, default=4)
  p.add_argument("--init_from", default="")
  p.add_argument("--rollouts", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  args = p.parse_args()

  c = rl.prepare_config(config(args), "")
  with tempfile.TemporaryDirectory() as workdir:
    trainer = rl.RLTrainer(c, workdir)
    trainer.restore_or_init()
    rollouts = rl.Rollouts(trainer, rl.build_task(c))
    rows = []
    for r in range(args.warmup + args.rollouts):
      out = rollouts(r)
      t0 = time.perf_counter()
      placed = rollout.place(out.batch, trainer.mesh)
      jax.block_until_ready([trainer.step(placed)
                             for _ in range(args.num_iterations)])
      train_s = time.perf_counter() - t0
      sampled = float(out.batch["completion_lengths"].sum())
      real = float((out.batch["segment_ids"] > 0).sum()) * args.num_iterations
      rows.append(dict(out.seconds, train=train_s,
                       sampled_tps=sampled / out.seconds["generate"],
                       train_tps=real / train_s, sampled=sampled))
    trainer.checkpointer.close()
  timed = rows[args.warmup:]
  med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
  total = sum(med[k] for k in ("generate", "score", "logps", "train"))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"model d_model={args.d_model} x {args.n_layers} layers; task "
        f"{args.task}, prompt mode {args.prompt_mode or 'causal'}; "
        f"{args.prompts} prompts x G={args.num_generations}, "
        f"{args.max_completion_length} new tokens, seq_len {args.seq_len}, "
        f"{args.num_iterations} iteration(s); medians of {len(timed)} steps")
  print(f"sampled tokens/s {med['sampled_tps']:,.0f} "
        f"({med['sampled']:.0f} tokens/step), train tokens/s "
        f"{med['train_tps']:,.0f}")
  print("time split (s, share): " + ", ".join(
      f"{k} {med[k]:.3f} ({med[k] / total:.0%})"
      for k in ("generate", "score", "logps", "train")))


if __name__ == "__main__":
  main()
