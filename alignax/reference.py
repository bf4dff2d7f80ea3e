"""Preparing the reference-log-prob cache: ``config.preference.cache_reference``.

``prepare(config, workdir)`` (a no-op unless ``cache_reference``) runs the
reference model, i.e. the policy's starting parameters
(``config.checkpoint.init_from``: an alignax checkpoint or a Hugging Face
directory, else the seed's fresh init), over every example of the
preference data, train and eval splits, and returns the config with
``data.preference.reference_cache`` pointing at the result; the data
pipeline then attaches ``ref_logps`` to each example by its record index
(:mod:`alignax.data.reference_cache`). ``train.run`` calls it before it
builds the trainer, so the launcher needs no extra step.

The cache lives in ``<root>/<key>`` with ``root =
config.preference.reference_cache_dir`` or ``<workdir>/reference_cache``. The
key hashes what the values depend on: the data (source, file paths with
sizes and mtimes, format, truncation, ``seq_len``), the tokenizer, the model
config and a fingerprint of the reference parameters, so a second run with
the same inputs reuses the cache and any change writes a new one. Each
process computes its own chunks on its local devices, and processes meet at
a barrier before reading. To fill a cache without training::

  python -m alignax.reference --config=configs/dpo_demo.py \\
      --workdir=/tmp/alignax_dpo --config.reference=none \\
      --config.preference.cache_reference=True
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax import cli
from alignax import init_from
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.data import preference
from alignax.data import preference_packing as packing
from alignax.data import reference_cache
from alignax.data import tokenizer as tok_lib
from alignax.interop import hf
from alignax.objectives import common

_FILE_SOURCES = ("jsonl", "parquet", "array_record")


def _files(paths):
  out = []
  for path in paths:
    for f in sorted(glob.glob(path, recursive=True)) or [path]:
      st = os.stat(f) if os.path.exists(f) else None
      out.append([os.path.abspath(f), st and st.st_size, st and st.st_mtime_ns])
  return out


def _splits(data_cfg):
  """Splits with data: file sources may have no eval files."""
  if (data_cfg.source in _FILE_SOURCES and not data_cfg.eval_paths
      and not data_cfg.eval_fraction):
    return ("train",)
  return ("train", "eval")


def params_fingerprint(params):
  """Rounded per-leaf sums: equal for equal parameters on any mesh.

  Besides the sum and the sum of magnitudes, a sum weighted by a fixed
  position-dependent vector tells apart leaves whose entries were permuted.
  """
  def stats(x):
    flat = jnp.ravel(x).astype(jnp.float32)
    weights = jnp.cos(jnp.arange(flat.size, dtype=jnp.float32) * 0.618034)
    return jnp.stack([jnp.sum(flat), jnp.sum(jnp.abs(flat)),
                      jnp.sum(flat * weights)])

  stats = jax.tree.map(stats, params)
  return [f"{v:.6e}" for v in np.concatenate(
      [np.ravel(s) for s in jax.tree.leaves(jax.device_get(stats))])]


def cache_key(config, tokenizer, params):
  """``(hex key, material)``: the hash of everything the values depend on."""
  d, p = config.data, config.data.preference
  material = {
      "data": {"source": d.source, "train": _files(d.paths),
               "eval": _files(d.eval_paths),
               "heldout_fraction": d.heldout_fraction,
               "skip_malformed": d.skip_malformed, "tfds": d.tfds_name,
               "eval_fraction": d.eval_fraction,
               "hf": [d.hf_path, d.hf_train_split, d.hf_eval_split,
                      _files([os.path.join(d.hf_path, "**")])
                      if d.source == "hf" and os.path.isdir(d.hf_path)
                      else None],
               "python": sys.version if d.source == "embedded" else None},
      # shared_prompt changes how a long example is cut to fit a row.
      "preference": {k: p[k] for k in (
          "format", "list_size", "max_prompt_len", "max_response_len",
          "task_repeats", "shared_prompt")} | {
              "max_length": p.get("max_length", 0)},
      "ld_alpha": _ld_alpha(config),
      "seq_len": config.train.seq_len,
      "tokenizer": [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                    tokenizer.encode("def reference_cache(x):\n  return x")],
      "model": config.model.to_dict(),
      "params": hashlib.sha1(
          json.dumps(params_fingerprint(params)).encode()).hexdigest(),
      "chunk_records": reference_cache.CHUNK_RECORDS,
  }
  text = json.dumps(material, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:20], material


def chunk_logps(records, start, stop, data_cfg, tokenizer, logps_fn, *,
                seq_len, batch_size):
  """``[stop - start, K]`` reference log-probs of records ``[start, stop)``."""
  pref = data_cfg.preference
  k = preference.list_size(pref)
  layout = packing.Layout(k, int(pref.groups_per_row),
                          len(pref.reward_fields), bool(pref.shared_prompt))
  ds = grain.MapDataset.source(records)[start:stop].map(
      preference.TokenizeExample(tokenizer, pref, seq_len=seq_len))
  batches = packing.pack_and_batch(
      ds.to_iter_dataset(), layout, seq_len=seq_len, batch_size=batch_size,
      shuffle_bins=False, drop_remainder=False)
  out = np.full((stop - start, k), np.nan, np.float32)
  for batch in batches:
    logps = np.asarray(logps_fn(batch))  # [B, S]
    valid = batch["valid"]
    rows, slots = np.nonzero(valid)
    out[batch["index"][rows, slots] - start, slots % k] = logps[rows, slots]
  return out


def compute_split(records, split, directory, data_cfg, tokenizer, logps_fn, *,
                  seq_len, batch_size, process_index=0, process_count=1):
  """Writes this process's missing chunks of ``split``; returns their count."""
  os.makedirs(os.path.join(directory, split), exist_ok=True)
  num_chunks = -(-len(records) // reference_cache.CHUNK_RECORDS)
  written = 0
  for chunk in range(process_index, num_chunks, process_count):
    path = reference_cache.chunk_path(directory, split, chunk)
    if os.path.exists(path):
      continue  # done before a preemption, or by an earlier run
    start = chunk * reference_cache.CHUNK_RECORDS
    stop = min(len(records), start + reference_cache.CHUNK_RECORDS)
    reference_cache.save_atomic(path, chunk_logps(
        records, start, stop, data_cfg, tokenizer, logps_fn, seq_len=seq_len,
        batch_size=batch_size))
    written += 1
  return written


def _ld_alpha(config):
  """LD-DPO's alpha for pairs (1 = plain sums; lists never use it)."""
  if config.data.preference.format != "pairs":
    return 1.0
  return float(config.preference.get("ld_alpha", 1.0))


def _logps_fn(graphdef, params, mesh, chunk_size, ld_alpha=1.0):
  def logps(p, b):
    with shd.activation_sharding(mesh):  # rows stay local, weights gathered
      sum_weights = (None if ld_alpha == 1.0 else  # LD-DPO's sums
                     common.ld_weights(b, list_size=2, alpha=ld_alpha))
      return common.slot_logps(nnx.merge(graphdef, p), b,
                               chunk_size=chunk_size,
                               sum_weights=sum_weights)[0]

  fn = jax.jit(logps)
  return lambda batch: fn(params, jax.device_put(batch,
                                                 shd.batch_sharding(mesh)))


def prepare(config, workdir):
  """Fills the reference cache if needed; returns the config that uses it."""
  if not config.preference.cache_reference:
    return config
  config = hf.run_config(config)  # an HF init_from brings model + tokenizer
  tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
  model_cfg = state_lib.build_model_config(config.model, tokenizer)
  # Local devices only: processes work on their own chunks, no collectives.
  mesh = shd.make_mesh({"fsdp": -1}, jax.local_devices())
  graphdef, params = init_from.model_params(
      config.checkpoint.init_from, model_cfg, mesh, config.sharding_rules,
      seed=config.seed)
  key, material = cache_key(config, tokenizer, params)
  root = config.preference.reference_cache_dir or os.path.join(
      workdir, "reference_cache")
  directory = os.path.join(root, key)
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    reference_cache.save_atomic(
        os.path.join(directory, "spec.json"),
        text=json.dumps(material, indent=1, default=str))
  logps_fn = _logps_fn(graphdef, params, mesh, config.preference.logps_chunk
                       or None, _ld_alpha(config))
  ways = mesh.size
  rows = max(config.train.batch_size // jax.process_count(), ways)
  for split in _splits(config.data):
    records = preference.record_source(config.data, split)
    compute_split(
        records, split, directory, config.data, tokenizer, logps_fn,
        seq_len=config.train.seq_len, batch_size=-(-rows // ways) * ways,
        process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"reference_cache/{key}")
  config = copy.deepcopy(config)
  config.data.preference.reference_cache = directory
  return config


def _print_cache(config, workdir):
  print(prepare(config, workdir).data.preference.reference_cache)


if __name__ == "__main__":
  cli.config_command(_print_cache, "Run directory (the cache goes under it).")
