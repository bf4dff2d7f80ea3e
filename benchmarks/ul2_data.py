"""UL2 data pipeline tokens/s against the tokens/s the training step consumes.

  python benchmarks/ul2_data.py                      # configs/ul2_demo.py
  python benchmarks/ul2_data.py --batches=400 --steps=20 --threads=0,8

Pipeline: ``ul2_pipeline.build_ul2_dataset`` on the config's training split,
the whole path from records to batches (read, tokenize, choose a denoiser,
cut a window, corrupt, format, pack, batch), timed over ``--batches``
batches after a few warm-up batches, once per reader-thread count in
``--threads`` (0 = inline in the calling thread). The source is built (for
the embedded corpus: the files read) before timing starts.

Training: the jitted train step ``train.py`` runs (UL2 objective, AdamW),
timed over ``--steps`` steps after two warm-up steps, with
``block_until_ready``, on one real UL2 batch.

Tokens are non-padding tokens (``segment_ids > 0``), the count the training
loop reports as ``train/tokens_per_s``. ``--pipeline_seq_lens`` times the
pipeline alone at other row lengths (sentinels sized to fit).
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alignax import sharding as shd  # noqa: E402
from alignax import objectives  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax import step as step_lib  # noqa: E402
from alignax import train  # noqa: E402
from alignax.data import tokenizer as tok_lib  # noqa: E402
from alignax.data import ul2  # noqa: E402
from alignax.data import ul2_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path):
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tokens_in(batch):
  return int(np.sum(batch["segment_ids"] > 0))


def pipeline_tokens_per_s(c, tokenizer, *, num_threads, batches, warmup=5):
  """Non-padding tokens/s and padding share of the full UL2 pipeline."""
  data_cfg = c.data.copy_and_resolve_references()
  data_cfg.num_threads = num_threads
  ds = ul2_pipeline.build_ul2_dataset(
      data_cfg, tokenizer, split="train", seed=c.seed, seq_len=c.train.seq_len,
      batch_size=c.train.batch_size)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  tokens, t0 = 0, time.perf_counter()
  for _ in range(batches):
    tokens += tokens_in(next(it))
  seconds = time.perf_counter() - t0
  fill = tokens / (batches * c.train.batch_size * c.train.seq_len)
  return tokens / seconds, fill


def train_tokens_per_s(c, tokenizer, *, steps):
  """Non-padding tokens/s of the jitted UL2 train step on a real batch."""
  mesh = shd.make_mesh(c.mesh)
  model_cfg = state_lib.build_model_config(c.model, tokenizer)
  optimizer, schedule = state_lib.build_optimizer(c.optimizer, c.train.steps)
  graphdef, state, shardings = state_lib.create_train_state(
      model_cfg, optimizer, mesh, c.sharding_rules, seed=c.seed)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(objectives.build_objective(c), graphdef, optimizer,
                               schedule, microbatches=c.train.microbatches,
                               mesh=mesh),
      shardings, mesh)
  host_batch = next(iter(ul2_pipeline.build_ul2_dataset(
      c.data, tokenizer, split="train", seed=c.seed, seq_len=c.train.seq_len,
      batch_size=c.train.batch_size)))
  batch = shd.host_to_global(host_batch, mesh)
  for _ in range(2):  # compile, then one more to settle
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - t0) / steps
  return tokens_in(host_batch) / seconds, seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default=os.path.join(ROOT, "configs",
                                                       "ul2_demo.py"))
  parser.add_argument("--workdir", default=os.path.join(
      tempfile.gettempdir(), "ul2_data_bench"), help="tokenizer cache")
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--threads", default="0,8",
                      help="reader-thread counts to time the pipeline with")
  parser.add_argument("--pipeline_seq_lens", default="",
                      help="extra row lengths to time the pipeline alone at")
  args = parser.parse_args()
  c = load_config(args.config)
  tokenizer = tok_lib.build_tokenizer(c.tokenizer, args.workdir)
  dev = jax.devices()[0]
  print(f"config: {os.path.relpath(args.config, ROOT)}; batch "
        f"{c.train.batch_size} x {c.train.seq_len}; devices: "
        f"{jax.device_count()} x {dev.device_kind}; {os.cpu_count()} CPU cores")
  print("| stage | setting | tokens/s | note |")
  print("|---|---|---|---|")
  for threads in map(int, args.threads.split(",")):
    tps, fill = pipeline_tokens_per_s(c, tokenizer, num_threads=threads,
                                      batches=args.batches)
    print(f"| data pipeline | seq_len {c.train.seq_len}, {threads} reader "
          f"threads | {tps:,.0f} | rows {fill:.1%} full |", flush=True)
  for seq_len in filter(None, args.pipeline_seq_lens.split(",")):
    long = c.copy_and_resolve_references()
    long.train.seq_len = int(seq_len)
    long.tokenizer.num_sentinels = ul2.num_sentinels_needed(
        ul2_pipeline.denoisers_from_config(long.data.ul2), int(seq_len) + 1)
    long_tok = tok_lib.build_tokenizer(long.tokenizer, args.workdir)
    batches = max(1, args.batches * c.train.seq_len // int(seq_len))
    tps, fill = pipeline_tokens_per_s(long, long_tok, num_threads=0,
                                      batches=batches)
    print(f"| data pipeline | seq_len {seq_len}, 0 reader threads | "
          f"{tps:,.0f} | rows {fill:.1%} full |", flush=True)
  tps, seconds = train_tokens_per_s(c, tokenizer, steps=args.steps)
  print(f"| train step | {c.model.n_layers} layers x {c.model.d_model}, "
        f"{c.model.dtype} | {tps:,.0f} | {seconds * 1e3:.0f} ms per step |")


if __name__ == "__main__":
  main()
