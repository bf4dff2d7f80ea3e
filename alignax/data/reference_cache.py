"""Reference log-probs precomputed once: the cache's files, written and read.

The data pipeline attaches ``ref_logps`` to each preference example by its
record index from a finished cache (:func:`load`). Filling the cache
(choosing the reference parameters, keying, running the model, writing the
chunks with :func:`save_atomic`) lives above the data layer, in
:mod:`alignax.reference`, which ``train.run`` calls when
``config.preference.cache_reference`` is set.

Layout: ``<dir>/spec.json`` (what the key covers) and
``<dir>/<split>/chunk-NNNNNN.npy`` (``[chunk_records, K]`` float32, NaN where
an example has fewer than K responses). Chunk ``c`` is computed by process
``c % process_count`` and written atomically; a rerun after preemption skips
finished chunks.
"""

import os

import numpy as np

CHUNK_RECORDS = 1024


def chunk_path(directory, split, chunk):
  return os.path.join(directory, split, f"chunk-{chunk:06d}.npy")


def save_atomic(path, array=None, *, text=None):
  """Writes a ``.npy`` array (or text) under a temporary name, then renames."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    if text is None:
      np.save(f, array)
    else:
      f.write(text.encode())
  os.replace(tmp, path)


def load(directory, split, num_records, list_size):
  """The ``[num_records, K]`` reference log-probs of a finished cache."""
  num_chunks = -(-num_records // CHUNK_RECORDS)
  paths = [chunk_path(directory, split, c) for c in range(num_chunks)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"reference cache {directory!r} lacks {len(missing)} of {num_chunks} "
        f"{split} chunks (first: {missing[0]}); fill it with "
        "alignax.reference.prepare (train.run does when "
        "config.preference.cache_reference=True).")
  table = np.concatenate([np.load(p) for p in paths])
  if table.shape != (num_records, list_size):
    raise ValueError(f"reference cache {directory!r} holds {split} log-probs "
                     f"of shape {table.shape}; the data has "
                     f"{(num_records, list_size)}.")
  return table
