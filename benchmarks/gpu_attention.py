"""Attention on a GPU: cuDNN and blockwise against the reference, then timed.

  python benchmarks/gpu_attention.py                  # needs a CUDA device
  python benchmarks/gpu_attention.py --t=4096 --b=8 --iters=10

1. Equality. bf16 q, k, v (GQA), the float32 einsum reference on the dense
   mask as the oracle: output and the q/k/v gradients of ``<out, w>`` for
   plain causal rows, packed rows (segments and padding), rows with a UL2
   prefix (cuDNN falls back to blockwise on the device) and rows with more
   runs than the packed layout takes (fallback again). Padding outputs are
   excluded (the loss masks them). Prints the largest error relative to the
   reference's largest magnitude; a row fails above ``--tol``.
2. Time. Forward + backward (median of ``--iters``) of each path on packed
   and on plain rows, with the causal FLOPs per second it reaches.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attention as attention_bench  # noqa: E402  (benchmarks/attention.py)
from alignax.models import attention, layers  # noqa: E402


def packed_rows(b, t, segments, seed=0):
  """``attention.py``'s packed ``[B, T]`` segment ids (the last 1/16 pad),
  with positions restarting at each segment (0 on padding)."""
  seg = attention_bench.packed_rows(b, t, segments, seed)
  idx = np.broadcast_to(np.arange(t), (b, t))
  start = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  pos = idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)
  return seg, np.where(seg > 0, pos, 0).astype(np.int32)


def qkvw(b, t, h, kv, dh, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, h, dh))
  k, v = rng.normal(size=(2, b, t, kv, dh))
  w = rng.normal(size=(b, t, h, dh))
  return [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, w)]


def grads(fn, q, k, v, w, keep):
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v) * keep, q, k, v)
    return (out, *vjp(w.astype(out.dtype)))
  return [np.asarray(x, np.float32) for x in run(q, k, v)]


def check(args):
  b, t, h, kv, dh = 2, 512, 8, 2, 128
  q, k, v, w = qkvw(b, t, h, kv, dh)
  seg, pos = packed_rows(b, t, 4)
  prefix = np.zeros((b, t), bool)
  prefix[0, :40] = True
  cases = {
      'plain causal': attention.MaskInfo(None, jnp.asarray(pos)),
      'packed': attention.MaskInfo(jnp.asarray(seg), jnp.asarray(pos)),
      'packed + UL2 prefix (fallback)': attention.MaskInfo(
          jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(prefix)),
  }
  many, _ = packed_rows(b, t, 80, seed=1)
  cases['80 runs > 64 (fallback)'] = attention.MaskInfo(
      jnp.asarray(many), jnp.asarray(pos))
  f32 = lambda x: x.astype(jnp.float32)
  failed = 0
  print('| mask | path | max rel. error (out, dq, dk, dv) | ok |\n'
        '|---|---|---|---|')
  with jax.default_matmul_precision('highest'):
    for name, info in cases.items():
      keep = (jnp.ones((b, t)) if info.segment_ids is None
              else (info.segment_ids > 0))[:, :, None, None]
      mask = attention.dense_mask(info)
      want = grads(lambda q, k, v: layers.einsum_attention(
          f32(q), f32(k), f32(v), mask), q, k, v, w, keep)
      for path, fn in (('cudnn', attention.cudnn_attention),
                       ('blockwise', attention.blockwise_attention)):
        got = grads(lambda q, k, v: fn(q, k, v, info), q, k, v, w, keep)
        errs = [float(np.abs(g - r).max() / np.abs(r).max())
                for g, r in zip(got, want)]
        ok = all(np.isfinite(e) and e < args.tol for e in errs)
        failed += not ok
        print(f'| {name} | {path} | '
              f'{", ".join(f"{e:.2e}" for e in errs)} | {ok} |', flush=True)
  return failed


def time_paths(args):
  b, t, h, kv, dh = args.b, args.t, args.h, args.kv, 128
  q, k, v, w = qkvw(b, t, h, kv, dh)
  print(f'\nforward + backward, B={b} T={t} H={h} K={kv} Dh={dh}, bf16, '
        f'median of {args.iters}')
  print('| rows | path | ms | causal TFLOP/s |\n|---|---|---|---|')
  for rows, segments in (('plain', 1), ('packed, 4 per row', 4)):
    seg, pos = packed_rows(b, t, segments)
    if segments == 1:
      info = attention.MaskInfo(None, jnp.asarray(pos))
      seg = np.ones_like(seg)
    else:
      info = attention.MaskInfo(jnp.asarray(seg), jnp.asarray(pos))
    # Useful FLOPs: 4 matmuls' worth (fwd 2, bwd 5 -> 3.5x fwd) over the
    # causal pairs inside each segment.
    pairs = sum(float(((seg[n] == s).sum()) * ((seg[n] == s).sum() + 1) / 2)
                for n in range(b) for s in np.unique(seg[n]) if s)
    flops = 3.5 * 4 * pairs * h * dh
    paths = {'cudnn': attention.cudnn_attention,
             'blockwise': attention.blockwise_attention,
             'fused (xla, dense mask)': lambda q, k, v, info:
             layers.fused_attention(q, k, v, attention.dense_mask(info))}
    for name, fn in paths.items():
      f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
          fn(q, k, v, info).astype(jnp.float32) * w), argnums=(0, 1, 2)))
      try:
        jax.block_until_ready(f(q, k, v))
      except Exception as e:  # pylint: disable=broad-except
        print(f'| {rows} | {name} | failed: {str(e)[:120]} | |', flush=True)
        continue
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times.append(time.perf_counter() - t0)
      s = statistics.median(times)
      print(f'| {rows} | {name} | {1e3 * s:.2f} | {flops / s / 1e12:.0f} |',
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--b', type=int, default=8)
  parser.add_argument('--t', type=int, default=4096)
  parser.add_argument('--h', type=int, default=16)
  parser.add_argument('--kv', type=int, default=8)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--tol', type=float, default=2e-2)
  args = parser.parse_args()
  dev = jax.devices()[0]
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  t0 = time.perf_counter()
  for _ in range(10):
    out = mm(a)
  jax.block_until_ready(out)
  peak = 10 * 2 * 8192**3 / (time.perf_counter() - t0)
  print(f'jax {jax.__version__}, {dev.device_kind} ({dev.platform}); '
        f'bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s (random, 10 in a row)')
  failed = check(args)
  time_paths(args)
  print(f'\n{failed} equality check(s) failed')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
