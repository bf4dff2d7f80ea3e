"""Memory and time of per-token log-probs: plain logits vs the fused LM head.

  python benchmarks/fused_logps.py                  # the default shapes
  python benchmarks/fused_logps.py --time_runs=0    # compiled memory only

For each shape ``B x T`` tokens, width ``D`` and vocabulary ``V``, compiles
``value_and_grad`` (wrt hidden and kernel) of the summed token log-probs for

* ``plain``: ``[B, T, V]`` logits, ``log_softmax``, gather (XLA autodiff);
* ``remat``: ``policy.token_logps_from_hidden``, ``--chunk_size`` positions
  per chunk, remat;
* ``fused/T``: ``policy.fused_token_logps`` (custom_vjp), ``--chunk_size``
  positions per chunk, whole vocabulary;
* ``fused/V``: the whole sequence, ``--vocab_chunk`` columns per chunk (the
  default tiling; see its docstring for why);
* ``fused/TV``: ``--chunk_size`` positions by ``4 * --vocab_chunk`` columns;

and reads ``compiled.memory_analysis().temp_size_in_bytes`` (XLA's scratch
for the step, arguments and outputs excluded). Shapes marked ``time`` are
also run: the median wall time of ``--time_runs`` forward+backward passes
after one warm-up. Everything is float32.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignax import policy  # noqa: E402

MIB = 2**20
# (B, T, D, V, run the timing?)
SHAPES = ((8, 512, 256, 8192, True), (8, 2048, 512, 32768, False))


def _plain(h, w, y):
  logits = jnp.einsum("btd,dv->btv", h, w)  # [B, T, V]
  return jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None],
                             -1)[..., 0]


def paths(chunk_size, vocab_chunk):
  """Name -> ``f(hidden, kernel, targets) -> [B, T]`` log-probs."""
  fused = policy.fused_token_logps
  return {
      "plain": _plain,
      "remat": lambda h, w, y: policy.token_logps_from_hidden(
          h, w, y, chunk_size=chunk_size),
      "fused/T": lambda h, w, y: fused(h, w, y, chunk_size=chunk_size,
                                       vocab_chunk=0),
      "fused/V": lambda h, w, y: fused(h, w, y, chunk_size=0,
                                       vocab_chunk=vocab_chunk),
      "fused/TV": lambda h, w, y: fused(h, w, y, chunk_size=chunk_size,
                                        vocab_chunk=4 * vocab_chunk),
  }


def measure(fn, shape, time_runs):
  """``(temp bytes, compile s, median fwd+bwd s or None)``."""
  b, t, d, v = shape
  grad = jax.jit(jax.value_and_grad(lambda h, w, y: fn(h, w, y).sum(),
                                    argnums=(0, 1)))
  specs = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
           jax.ShapeDtypeStruct((d, v), jnp.float32),
           jax.ShapeDtypeStruct((b, t), jnp.int32))
  start = time.perf_counter()
  compiled = grad.lower(*specs).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  if not time_runs:
    return temp, compile_s, None
  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32),
          jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(time_runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return temp, compile_s, statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--chunk_size", type=int, default=128)
  parser.add_argument("--vocab_chunk", type=int, default=2048)
  parser.add_argument("--time_runs", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; load "
        f"{os.getloadavg()[0]:.2f}; chunk_size={args.chunk_size} "
        f"vocab_chunk={args.vocab_chunk}")
  print(f"{'B x T, D, V':>22} {'path':>9} {'temp MiB':>9} {'compile s':>9} "
        f"{'fwd+bwd s':>9}")
  for b, t, d, v, timed in SHAPES:
    label = f"{b}x{t}, {d}, {v}"
    print(f"{label:>22} {'B*T*V*4':>9} {b * t * v * 4 / MIB:9.0f}")
    for name, fn in paths(args.chunk_size, args.vocab_chunk).items():
      temp, compile_s, run_s = measure(
          fn, (b, t, d, v), args.time_runs if timed else 0)
      run = f"{run_s:9.3f}" if run_s is not None else f"{'-':>9}"
      print(f"{label:>22} {name:>9} {temp / MIB:9.1f} {compile_s:9.2f} {run}",
            flush=True)


if __name__ == "__main__":
  main()
