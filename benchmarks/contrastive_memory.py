"""Largest contrastive batch that fits a memory budget, with/without GradCache.

  python benchmarks/contrastive_memory.py                 # demo model, 24 GiB
  python benchmarks/contrastive_memory.py --budget_gib=16 --chunk_size=128

Compiles the dual-encoder train step of ``configs/dual_encoder_demo.py``
(the same ``step.make_train_step`` train.py jits, CLIP loss, one device) for
growing batch sizes from abstract shapes only, and reads XLA's
``compiled.memory_analysis()``: peak = arguments + outputs + temporaries -
aliased (the donated state). Nothing of that size is allocated, so a 2-core
CPU can answer for 24 GiB. Doubling finds a bracket, bisection the largest
batch (in multiples of ``--granule`` pairs) whose peak fits.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from alignax import state as state_lib  # noqa: E402
from alignax import step as step_lib  # noqa: E402
from alignax.models import ModelConfig  # noqa: E402
from alignax.objectives import contrastive  # noqa: E402
from configs import dual_encoder_demo  # noqa: E402

GIB = 2**30
VOCAB = 2176  # the demo tokenizer's 2048 pieces + reserved ids, padded to 128


def peak_bytes(config, model_cfg, batch):
  """Peak memory of the compiled train step for ``batch`` pairs."""
  build = contrastive.embedding_model_builder(config)
  graphdef, abstract = state_lib.abstract_model(model_cfg, build)
  optimizer, schedule = state_lib.build_optimizer(config.optimizer, 1000)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(abstract))
  state = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(optimizer.init, params),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
      loss_scale=jax.ShapeDtypeStruct((), jnp.float32),
      good_steps=jax.ShapeDtypeStruct((), jnp.int32))
  shape = (batch, 2, config.train.seq_len)
  batch_shapes = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
                  "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32)}
  objective = contrastive.from_config(config)
  step = step_lib.make_train_step(objective, graphdef, optimizer, schedule)
  compiled = jax.jit(step, donate_argnums=(0,)).lower(
      state, batch_shapes, None).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def largest_batch(fits, granule, start):
  """Largest multiple of ``granule`` with ``fits(b)``; doubling + bisection."""
  lo, hi = 0, start
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > granule:
    mid = (lo + hi) // 2 // granule * granule
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget_gib", type=float, default=24.0)
  parser.add_argument("--chunk_size", type=int, default=256,
                      help="GradCache sub-batch, in texts")
  parser.add_argument("--granule", type=int, default=128,
                      help="batch sizes are multiples of this many pairs")
  args = parser.parse_args()
  config = dual_encoder_demo.get_config()
  model_cfg = ModelConfig(**dict(config.model, vocab_size=VOCAB))
  budget = args.budget_gib * GIB
  print(f"model: demo ({model_cfg.num_params():,} params), seq_len "
        f"{config.train.seq_len}, 2 texts per pair, CLIP loss, 1 device, "
        f"budget {args.budget_gib} GiB")
  results = {}
  for name, chunk in (("no caching", 0), ("GradCache", args.chunk_size)):
    config.contrastive.chunk_size = chunk
    cache = {}

    def fits(b, config=config, cache=cache):
      if b not in cache:
        cache[b] = peak_bytes(config, model_cfg, b)
        print(f"  {name:>10}: batch {b:>7,} pairs -> peak "
              f"{cache[b] / GIB:8.2f} GiB", flush=True)
      return cache[b] <= budget

    best = largest_batch(fits, args.granule, start=args.granule * 4)
    results[name] = (best, cache[best])
  print("\n| mode | largest batch (pairs) | peak at that batch |")
  print("|---|---|---|")
  for name, (best, peak) in results.items():
    print(f"| {name} | {best:,} | {peak / GIB:.2f} GiB |")


if __name__ == "__main__":
  main()
