"""Attention paths: forward + backward time and compiled temporary memory.

  python benchmarks/attention.py                      # DPO shape + T=2048
  python benchmarks/attention.py --long_t=4096 --iters=5 --blocks=128,256

Times ``jax.grad`` of ``sum(attention(q, k, v) * w)`` w.r.t. q, k and v
(median of ``--iters`` runs after a warm-up) and reads XLA's
``compiled.memory_analysis().temp_size_in_bytes`` for the blockwise path
(per block size, skipping tiles per row or per batch), ``'fused'`` (``jax.nn.dot_product_attention`` on
the dense ``[B, 1, T, T]`` mask) and ``'reference'`` (float32 einsum). Rows
are packed with about 4 segments each and a little padding, as a DPO batch;
the last shape is one causal sequence per row (only the causal skip helps).
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

from alignax.models import attention, layers  # noqa: E402

MIB = 2**20


def packed_rows(b, t, segments, seed=0):
  """``[B, T]`` segment ids: ``segments`` random lengths, the last 1/16 pad."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, t), np.int32)
  end = t - t // 16
  for n in range(b):
    cuts = np.r_[np.sort(rng.choice(np.arange(1, end), segments - 1,
                                    replace=False)), end]
    for s, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
      seg[n, lo:hi] = s + 1
  return seg


def paths(blocks):
  """``name -> fn(q, k, v, info)`` of every path that runs on this host."""
  out = {}
  for block in blocks:
    for per_row in (True, False):
      name = f'blockwise/{block}' + ('/per-row' if per_row else '/batched')
      out[name] = (lambda q, k, v, info, block=block, per_row=per_row:
                   attention.blockwise_attention(
                       q, k, v, info, block_q=block, block_k=block,
                       per_row=per_row))
  out['fused'] = lambda q, k, v, info: layers.fused_attention(
      q, k, v, attention.dense_mask(info))
  out['reference'] = lambda q, k, v, info: layers.einsum_attention(
      q, k, v, attention.dense_mask(info))
  return out


def measure(fn, b, t, h, kv, dh, segments, iters):
  """(median seconds, temp MiB) of one forward + backward."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv, dh)), jnp.float32)
          for _ in range(2))
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  seg = jnp.asarray(packed_rows(b, t, segments))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))

  def loss(q, k, v, seg):
    return jnp.sum(fn(q, k, v, attention.MaskInfo(seg, positions)) * w)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      q, k, v, seg).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / MIB
  jax.block_until_ready(compiled(q, k, v, seg))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, seg))
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--long_t', type=int, default=2048)
  parser.add_argument('--long_b', type=int, default=1)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--blocks', default='128,256')
  args = parser.parse_args()
  blocks = [int(x) for x in args.blocks.split(',')]
  print(f'backend {jax.default_backend()}, load average '
        f'{os.getloadavg()[0]:.2f}', flush=True)
  print('| shape | segments/row | path | fwd+bwd ms | temp MiB |\n'
        '|---|---|---|---|---|')
  h, kv, dh = 8, 4, 32
  for b, t, segments in ((8, 512, 4), (args.long_b, args.long_t, 4),
                         (args.long_b, args.long_t, 1)):
    for name, fn in paths(blocks).items():
      seconds, temp = measure(fn, b, t, h, kv, dh, segments, args.iters)
      print(f'| B={b} T={t} H={h} K={kv} Dh={dh} | {segments} | {name} | '
            f'{1e3 * seconds:.1f} | {temp:.1f} |', flush=True)
  print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
