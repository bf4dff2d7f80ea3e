"""Train-step throughput and MFU for a few model sizes.

  python benchmarks/train_throughput.py            # all sizes
  python benchmarks/train_throughput.py --sizes=tiny,small --steps=5

Times the jitted, sharded train step of alignax (the same step train.py
runs) on synthetic packed batches, after a warm-up step that compiles it.
MFU = tokens/s x model FLOPs per token / (devices x peak FLOP/s); the peak is
the datasheet bf16 number on TPU/GPU and a measured fp32 matmul on CPU
(the higher of a reading before and one after the timed steps: a reading
on a busy machine is low and would inflate MFU). The step time is the
median of ``--steps`` timed steps.

  python benchmarks/train_throughput.py --sizes=medium --steps=3 \
      [--scan_layers=false]
  python benchmarks/train_throughput.py --sizes=gpu_500m --dtype=bfloat16 \
      --attention=cudnn,blockwise --segments=4      # on a GPU
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alignax import defaults  # noqa: E402
from alignax import metrics as metrics_lib  # noqa: E402
from alignax import sharding as shd  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax import step as step_lib  # noqa: E402
from alignax.models import ModelConfig  # noqa: E402
from alignax.objectives import lm  # noqa: E402

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, seq_len, batch)
SIZES = {
    "tiny": (128, 4, 4, 2, 384, 2176, 128, 16),  # configs/demo.py
    "small": (256, 6, 8, 4, 768, 8192, 256, 16),
    "medium": (512, 8, 8, 8, 1536, 32000, 512, 8),
    # GPU sizes (bf16): ~0.5B and ~1.4B parameters, 16k tokens per step.
    "gpu_500m": (1536, 16, 12, 4, 4096, 32000, 2048, 8),
    "gpu_1b": (2048, 24, 16, 8, 5632, 32000, 2048, 8),
}


def synthetic_batch(batch, seq_len, vocab, seed=0, segments=1):
  """Random tokens; ``segments`` > 1 packs that many documents per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(batch, seq_len + 1)).astype(np.int32)
  seg = np.ones((batch, seq_len), np.int32)
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
  for n in range(batch if segments > 1 else 0):
    cuts = np.r_[0, np.sort(rng.choice(np.arange(1, seq_len), segments - 1,
                                       replace=False)), seq_len]
    for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
      seg[n, lo:hi], pos[n, lo:hi] = s + 1, np.arange(hi - lo)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((batch, seq_len), np.float32),
          "positions": pos, "segment_ids": seg,
          "prefix": np.zeros((batch, seq_len), bool)}


def bench(name, steps, dtype, mesh_cfg, scan_layers=True, attention="auto",
          segments=1):
  """Median seconds per step (and the fastest) of size ``name``."""
  d, layers, heads, kv, ff, vocab, seq_len, batch = SIZES[name]
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                    n_kv_heads=kv, head_dim=d // heads, d_ff=ff,
                    max_seq_len=seq_len, dtype=dtype, scan_layers=scan_layers,
                    attention=attention)
  mesh = shd.make_mesh(mesh_cfg)
  opt_cfg = defaults.base_config().optimizer
  optimizer, schedule = state_lib.build_optimizer(opt_cfg, 1000)
  graphdef, state, shardings = state_lib.create_train_state(
      cfg, optimizer, mesh, shd.DEFAULT_RULES, seed=0)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(lm.lm_objective, graphdef, optimizer, schedule),
      shardings, mesh)
  data = shd.host_to_global(
      synthetic_batch(batch, seq_len, vocab, segments=segments), mesh)
  state, m = step(state, data)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return cfg, batch, seq_len, float(np.median(times)), min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default=",".join(SIZES))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--scan_layers", default="true",
                      choices=("true", "false"),
                      help="ModelConfig.scan_layers (false: unrolled layers)")
  parser.add_argument("--attention", default="auto",
                      help="ModelConfig.attention; a comma list runs each")
  parser.add_argument("--segments", type=int, default=1,
                      help="documents packed per row (segment ids)")
  args = parser.parse_args()
  dev = jax.devices()[0]
  peak = metrics_lib.device_peak_flops(dev)
  load = [os.getloadavg()[0]]
  results = [(f"{name} ({att})" if "," in args.attention else name,
              *bench(name, args.steps, args.dtype, {"fsdp": -1},
                     args.scan_layers == "true", att, args.segments))
             for name in args.sizes.split(",")
             for att in args.attention.split(",")]
  load.append(os.getloadavg()[0])
  if dev.platform == "cpu":
    # A matmul peak read on a busy machine reads low and inflates MFU, so it
    # is measured before and after the steps and the higher one is used.
    peak = max(peak, metrics_lib.device_peak_flops(dev))
  print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
        f"peak {peak / 1e9:.1f} GFLOP/s per device; load {load[0]:.2f} -> "
        f"{load[1]:.2f}; scan_layers={args.scan_layers}; dtype {args.dtype}; "
        f"{args.segments} segment(s) per row")
  print("| size | params | batch | step (median, min) | tokens/s | "
        "FLOPs/token | MFU |")
  print("|---|---|---|---|---|---|---|")
  for name, cfg, batch, seq_len, seconds, fastest in results:
    flops = cfg.flops_per_token(seq_len)
    out = metrics_lib.throughput(batch * seq_len, seconds, flops,
                                 jax.device_count(), peak)
    print(f"| {name} | {cfg.num_params() / 1e6:.2f}M | {batch}x{seq_len} | "
          f"{seconds * 1e3:.0f} ms, {fastest * 1e3:.0f} ms | "
          f"{out['tokens_per_s']:,.0f} | {flops / 1e6:.1f} MFLOP | "
          f"{out['mfu'] * 100:.1f}% |", flush=True)


if __name__ == "__main__":
  main()
