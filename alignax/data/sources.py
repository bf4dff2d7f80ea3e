"""Random-access text sources for grain: embedded corpus, JSONL, Parquet, ...

Every source implements grain's ``RandomAccessDataSource`` protocol
(``__len__`` and ``__getitem__``) and returns ``{'text': str}`` records, so the
pipeline does not care where text comes from. File sources take a path, a
glob pattern or a list of either; a pattern that matches nothing, or a missing
file, raises ``FileNotFoundError`` naming it. Bad records raise ``ValueError``
naming the file and the line (JSONL) or row (Parquet, ArrayRecord, TFDS).

``text_field=None`` (JSONL, Parquet) returns the whole record instead, for
tasks with several fields (pairs, preferences); it is only checked to be a
JSON object.
"""

import bisect
import glob
import json
import logging
import os

import numpy as np

from alignax.data import embedded

SOURCES = ("embedded", "jsonl", "parquet", "array_record", "tfds")
_INDEX_CHUNK_BYTES = 1 << 24


def _expand_paths(paths):
  """Expands a path, glob or list of them to a sorted list of existing files."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise ValueError("No data paths given.")
  expanded = []
  for path in map(os.fspath, paths):
    if "://" in path:
      expanded.append(path)  # Remote (gs://...): the reader checks it.
    elif glob.has_magic(path):
      matches = sorted(glob.glob(path))
      if not matches:
        raise FileNotFoundError(f"No files match the pattern {path!r}.")
      expanded.extend(matches)
    elif not os.path.isfile(path):
      raise FileNotFoundError(f"No such data file: {path!r}.")
    else:
      expanded.append(path)
  return expanded


def _text_of(record, text_field):
  """Checks ``record`` and returns ``{'text': record[text_field]}``.

  Raises ``ValueError`` without a location; callers prefix it.
  """
  if not isinstance(record, dict):
    raise ValueError(
        f"record is a {type(record).__name__}, not a JSON object.")
  if text_field is None:
    return record
  if text_field not in record:
    raise ValueError(f"missing text field {text_field!r} "
                     f"(record has fields {sorted(record)}).")
  text = record[text_field]
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  if not isinstance(text, str):
    raise ValueError(f"text field {text_field!r} is a "
                     f"{type(text).__name__}, not a string.")
  return {"text": text}


def _located(where, fn, *args):
  """Calls ``fn(*args)``, prefixing any ``ValueError`` with ``where``."""
  try:
    return fn(*args)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


class EmbeddedSource:
  """The stdlib + pydoc corpus of :mod:`alignax.data.embedded`."""

  def __init__(self, split, heldout_fraction=0.02):
    self._docs = embedded.embedded_documents(split, heldout_fraction)

  def __len__(self):
    return len(self._docs)

  def __getitem__(self, index):
    return {"text": self._docs[index]["text"]}

  def __repr__(self):
    return f"EmbeddedSource(len={len(self)})"


def _line_spans(path):
  """Returns ``(starts, ends)`` byte offsets of the non-empty lines of a file.

  ``ends`` excludes the line terminator. Scans fixed-size chunks with NumPy so
  that indexing a large file stays fast and memory-bounded.
  """
  newlines = []
  offset = 0
  with open(path, "rb") as f:
    while chunk := f.read(_INDEX_CHUNK_BYTES):
      positions = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
      newlines.append(positions + offset)
      offset += len(chunk)
  ends = np.concatenate(newlines + [np.array([offset])]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  keep = ends > starts  # Empty lines (and the one after a final '\n') skip.
  return starts[keep], ends[keep]


class JsonlSource:
  """JSON-lines files, one JSON object per line, read by byte offset.

  Line offsets are indexed once at construction; ``__getitem__`` reads and
  parses a single line (``os.pread``, safe across grain's reader threads).
  Empty lines are ignored. A malformed line raises ``ValueError`` with
  ``"{path}:{lineno}: ..."`` when it is read; with ``skip_malformed=True``
  every line is parsed once at construction instead, and bad lines are
  dropped and counted in ``num_skipped``. Files must be on a local or mounted
  file system (not ``gs://``).
  """

  def __init__(self, paths, text_field="text", *, skip_malformed=False):
    self._paths = _expand_paths(paths)
    self._text_field = text_field
    self._fds = None
    file_ids, starts, ends = [], [], []
    for i, path in enumerate(self._paths):
      s, e = _line_spans(path)
      file_ids.append(np.full(len(s), i, np.int32))
      starts.append(s)
      ends.append(e)
    self._file_ids = np.concatenate(file_ids)
    self._starts = np.concatenate(starts)
    self._ends = np.concatenate(ends)
    self.num_skipped = 0
    if skip_malformed:
      self._drop_malformed()

  def _drop_malformed(self):
    keep = np.ones(len(self._starts), bool)
    first_error = None
    for i in range(len(keep)):
      try:
        self._parse(i)
      except ValueError as e:
        keep[i] = False
        if first_error is None:
          first_error = f"{self._where(i)}: {e}"
    self.num_skipped = int(np.sum(~keep))
    if self.num_skipped:
      logging.warning("Skipped %d malformed JSONL records; first: %s",
                      self.num_skipped, first_error)
    self._file_ids = self._file_ids[keep]
    self._starts = self._starts[keep]
    self._ends = self._ends[keep]

  def __len__(self):
    return len(self._starts)

  def _where(self, index):
    """``path:lineno`` of record ``index``; counted only on errors."""
    path = self._paths[self._file_ids[index]]
    with open(path, "rb") as f:
      lineno = f.read(int(self._starts[index])).count(b"\n") + 1
    return f"{path}:{lineno}"

  def _parse(self, index):
    """Reads and checks record ``index``; errors carry no location yet."""
    if self._fds is None:
      self._fds = [os.open(p, os.O_RDONLY) for p in self._paths]
    start, end = int(self._starts[index]), int(self._ends[index])
    line = os.pread(self._fds[self._file_ids[index]], end - start, start)
    try:
      record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
      raise ValueError(f"malformed JSON: {e}") from None
    return _text_of(record, self._text_field)

  def __getitem__(self, index):
    try:
      return self._parse(index)
    except ValueError as e:
      raise ValueError(f"{self._where(index)}: {e}") from None

  def __getstate__(self):
    # File descriptors do not survive pickling (grain worker processes).
    state = dict(self.__dict__)
    state["_fds"] = None
    return state

  def __del__(self):
    for fd in getattr(self, "_fds", None) or ():
      os.close(fd)

  def __repr__(self):
    return f"JsonlSource(files={len(self._paths)}, len={len(self)})"


class ParquetSource:
  """Parquet files; the text column is memory-mapped with pyarrow."""

  def __init__(self, paths, text_field="text"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self._paths = _expand_paths(paths)
    self._text_field = text_field
    columns = None if text_field is None else [text_field]
    self._tables = []
    for path in self._paths:
      names = pq.read_schema(path).names
      if text_field is not None and text_field not in names:
        raise ValueError(f"{path}: missing text field {text_field!r} "
                         f"(columns: {names}).")
      self._tables.append(pq.read_table(path, columns=columns,
                                        memory_map=True))
    self._offsets = np.cumsum([0] + [t.num_rows for t in self._tables])

  def __len__(self):
    return int(self._offsets[-1])

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    file_index = bisect.bisect_right(self._offsets, index) - 1
    row = int(index - self._offsets[file_index])
    record = self._tables[file_index].slice(row, 1).to_pylist()[0]
    where = f"{self._paths[file_index]}:row {row}"
    return _located(where, _text_of, record, self._text_field)

  def __repr__(self):
    return f"ParquetSource(files={len(self._paths)}, len={len(self)})"


class ArrayRecordSource:
  """ArrayRecord files of UTF-8 records.

  A record is either a JSON object holding ``text_field`` or raw UTF-8 text:
  records that parse as a JSON object are read as records (so raw text that
  is itself a JSON object must be wrapped as ``{"text": ...}``), everything
  else is the text itself.
  """

  def __init__(self, paths, text_field="text"):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._paths = _expand_paths(paths)
    self._text_field = text_field
    # One reader per file so errors can name the file and the position.
    self._sources = [array_record_data_source.ArrayRecordDataSource(p)
                     for p in self._paths]
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self):
    return int(self._offsets[-1])

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    file_index = bisect.bisect_right(self._offsets, index) - 1
    position = int(index - self._offsets[file_index])
    raw = self._sources[file_index][position]
    where = f"{self._paths[file_index]}:record {position}"
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: record is not UTF-8: {e}") from None
    if text.lstrip().startswith("{"):
      try:
        record = json.loads(text)
      except ValueError:
        record = None
      if isinstance(record, dict):
        return _located(where, _text_of, record, self._text_field)
    return {"text": text}

  def __repr__(self):
    return f"ArrayRecordSource(files={len(self._paths)}, len={len(self)})"


class TfdsSource:
  """A prepared TFDS dataset (ArrayRecord format) via ``tfds.data_source``.

  Works without TensorFlow for datasets prepared with
  ``file_format='array_record'``. Nothing is downloaded: prepare the dataset
  first (``tfds build --file_format=array_record``).
  """

  def __init__(self, name, split, data_dir=None, text_field="text"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._name = f"{name}[{split}]"
    self._text_field = text_field
    self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                    download=False)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    where = f"tfds {self._name}:row {index}"
    return _located(where, _text_of, self._source[index], self._text_field)

  def __repr__(self):
    return f"TfdsSource({self._name}, len={len(self)})"


def build_source(data_cfg, split):
  """Builds the source named by ``data_cfg.source`` for ``split``.

  Args:
    data_cfg: ml_collections config with ``source`` (one of ``SOURCES``),
      ``paths`` and ``eval_paths`` (file sources), ``text_field``,
      ``tfds_name``, ``tfds_data_dir``, ``skip_malformed`` (JSONL), and
      optionally ``heldout_fraction`` (embedded, default 0.02),
      ``tfds_train_split`` / ``tfds_eval_split`` (default ``'train'`` /
      ``'validation'``).
    split: ``'train'`` or ``'eval'``.

  Returns:
    a random-access source of ``{'text': str}`` records.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  name = data_cfg.source
  if name not in SOURCES:
    raise ValueError(f"Unknown data source {name!r}; valid: {SOURCES}.")
  train = split == "train"
  text_field = data_cfg.get("text_field", "text")
  if name == "embedded":
    return EmbeddedSource("train" if train else "heldout",
                          data_cfg.get("heldout_fraction", 0.02))
  if name == "tfds":
    tfds_split = (data_cfg.get("tfds_train_split", "train") if train
                  else data_cfg.get("tfds_eval_split", "validation"))
    return TfdsSource(data_cfg.tfds_name, tfds_split,
                      data_cfg.get("tfds_data_dir") or None, text_field)
  paths = list(data_cfg.paths if train else data_cfg.eval_paths)
  if not paths:
    field = "paths" if train else "eval_paths"
    raise ValueError(f"data.source={name!r} needs data.{field}.")
  if name == "jsonl":
    return JsonlSource(paths, text_field,
                       skip_malformed=data_cfg.get("skip_malformed", False))
  if name == "parquet":
    return ParquetSource(paths, text_field)
  return ArrayRecordSource(paths, text_field)
