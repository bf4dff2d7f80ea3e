"""Random-access text sources for grain: embedded corpus, JSONL, Parquet, ...

Every source implements grain's ``RandomAccessDataSource`` protocol
(``__len__`` and ``__getitem__``) and returns ``{'text': str}`` records, so the
pipeline does not care where text comes from. File sources take a path, a
glob pattern or a list of either; a pattern that matches nothing, or a missing
file, raises ``FileNotFoundError`` naming it. Bad records follow the policy of
:mod:`alignax.data.records`: a one-line ``ValueError`` naming the file and the
line (JSONL: ``file:line``), row (Parquet, TFDS: ``file:row N``) or record
(ArrayRecord: ``file:record N``) when read, or with ``skip_malformed=True``
dropped when the source is built and counted by reason in ``skipped``.

``text_field=None`` (JSONL, Parquet) returns the whole record instead, for
tasks with several fields (pairs, preferences); it is only checked to be a
JSON object.

Compressed JSONL (gzip, e.g. ``.jsonl.gz``, with the standard library;
zstandard, ``.jsonl.zst``, when the ``zstandard`` package is installed) is
recognised by its magic bytes, whatever its name, and decompressed once into
a local cache file that is then read by offset like any JSONL file; errors
still name the compressed file and its line.
"""

import bisect
import glob
import gzip
import hashlib
import os
import tempfile

import numpy as np

from alignax.data import embedded
from alignax.data import records

SOURCES = ("embedded", "jsonl", "parquet", "array_record", "tfds", "hf")
_INDEX_CHUNK_BYTES = 1 << 22
# Bytes of a blank line: a line of only these holds no record.
_BLANK = np.zeros(256, bool)
_BLANK[list(b" \t\r\n\f\v")] = True


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

  ``text_field=None`` returns the whole record, only checked to be an
  object. Raises :class:`~alignax.data.records.MalformedRecord` without a
  location; the source adds it.
  """
  if not isinstance(record, dict):
    raise records.MalformedRecord(
        "not_object", f"record is a {type(record).__name__}, not a JSON "
        "object")
  if text_field is None:
    return record
  if text_field not in record:
    raise records.MalformedRecord(
        "missing_field", f"missing text field {text_field!r} (record has "
        f"fields {sorted(record)})")
  return {"text": records.check_text(record[text_field], text_field,
                                     kind="text field")}


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


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Decompressed copies of compressed JSONL files, keyed by path, size, mtime.
DECOMPRESSED_CACHE = os.path.join(tempfile.gettempdir(),
                                  "alignax-decompressed")


def _compression(path):
  """``'gzip'``, ``'zstd'`` or None, from the file's first bytes."""
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(_GZIP_MAGIC):
    return "gzip"
  if head == _ZSTD_MAGIC:
    return "zstd"
  return None


def _open_compressed(path, kind):
  if kind == "gzip":
    return gzip.open(path, "rb")
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path} is zstandard-compressed: pip install zstandard "
                     "to read it, or decompress it (zstd -d).") from None
  return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                    closefd=True)


def _readable_path(path):
  """``path`` itself, or for a compressed file its decompressed cache copy
  (written once, then reused while the file is unchanged)."""
  kind = _compression(path)
  if kind is None:
    return path
  stat = os.stat(path)
  key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
  os.makedirs(DECOMPRESSED_CACHE, exist_ok=True)
  cached = os.path.join(DECOMPRESSED_CACHE,
                        hashlib.sha1(key.encode()).hexdigest() + ".jsonl")
  if os.path.exists(cached):
    return cached
  fd, tmp = tempfile.mkstemp(dir=DECOMPRESSED_CACHE, suffix=".tmp")
  try:
    with _open_compressed(path, kind) as src, os.fdopen(fd, "wb") as dst:
      while chunk := src.read(_INDEX_CHUNK_BYTES):
        dst.write(chunk)
    os.replace(tmp, cached)
  except ValueError:
    raise
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable {kind} file ({e}).") from None
  except Exception as e:  # zstandard.ZstdError # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable {kind} file ({e}).") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return cached


def _line_spans(path):
  """``(starts, ends, linenos)`` of the non-blank lines of a file.

  ``starts`` / ``ends`` are byte offsets (``ends`` excludes the ``\n``),
  ``linenos`` 1-based line numbers. Lines of only whitespace (empty, spaces,
  ``\r``, ...) and the one after a final ``\n`` hold no record and are left
  out. Scans fixed-size chunks with NumPy so that indexing a large file stays
  fast and memory-bounded.
  """
  newlines, filled = [], []  # '\n' offsets; non-blank bytes before each
  offset = total = 0
  with open(path, "rb") as f:
    while chunk := f.read(_INDEX_CHUNK_BYTES):
      data = np.frombuffer(chunk, np.uint8)
      positions = np.flatnonzero(data == ord("\n"))
      seen = np.cumsum(~_BLANK[data], dtype=np.int64)
      newlines.append(positions + offset)
      filled.append(seen[positions] + total)
      offset += len(chunk)
      total += int(seen[-1])
  ends = np.concatenate(newlines + [np.array([offset])]).astype(np.int64)
  filled = np.concatenate(filled + [np.array([total])]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  keep = np.diff(filled, prepend=0) > 0  # a non-blank byte on the line
  return starts[keep], ends[keep], np.flatnonzero(keep) + 1


class JsonlSource(records.CheckedSource):
  """JSON-lines files, one JSON object per line, read by byte offset.

  Line offsets are indexed once at construction; ``__getitem__`` reads and
  parses a single line (``os.pread``, safe across grain's reader threads).
  Blank lines are ignored. A malformed line raises ``ValueError`` with
  ``"{path}:{lineno}: ..."`` when it is read; with ``skip_malformed=True``
  every line is parsed once at construction instead, and bad lines are
  dropped and counted by reason in ``skipped``. Files must be on a local or
  mounted file system (not ``gs://``). gzip and zstandard files are read
  through a decompressed copy (see the module docstring).
  """

  def __init__(self, paths, text_field="text", *, skip_malformed=False):
    self._paths = _expand_paths(paths)
    self._text_field = text_field
    self._fds = None
    self._readable = [_readable_path(p) for p in self._paths]
    file_ids, starts, ends, linenos = [], [], [], []
    for i, path in enumerate(self._readable):
      s, e, n = _line_spans(path)
      file_ids.append(np.full(len(s), i, np.int32))
      starts.append(s)
      ends.append(e)
      linenos.append(n)
    self._file_ids = np.concatenate(file_ids)
    self._starts = np.concatenate(starts)
    self._ends = np.concatenate(ends)
    self._linenos = np.concatenate(linenos)
    self._apply_policy(skip_malformed)

  def _num_raw(self):
    return len(self._starts)

  def where(self, raw_index):
    """``path:lineno`` of record ``raw_index``."""
    path = self._paths[self._file_ids[raw_index]]
    return f"{path}:{int(self._linenos[raw_index])}"

  def _read(self, raw_index):
    """Reads and checks one line; errors carry no location yet."""
    if self._fds is None:
      self._fds = [os.open(p, os.O_RDONLY) for p in self._readable]
    start, end = int(self._starts[raw_index]), int(self._ends[raw_index])
    line = os.pread(self._fds[self._file_ids[raw_index]], end - start, start)
    record = records.parse_json_object(records.decode_utf8(line, "line"))
    return _text_of(record, self._text_field)

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


class ParquetSource(records.CheckedSource):
  """Parquet files; the text column is memory-mapped with pyarrow.

  ``skip_malformed`` as in :class:`JsonlSource`; a missing text column is an
  error of the whole file, raised at construction.
  """

  def __init__(self, paths, text_field="text", *, skip_malformed=False):
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
    self._apply_policy(skip_malformed)

  def _num_raw(self):
    return int(self._offsets[-1])

  def _file_and_row(self, raw_index):
    file_index = bisect.bisect_right(self._offsets, raw_index) - 1
    return file_index, int(raw_index - self._offsets[file_index])

  def where(self, raw_index):
    file_index, row = self._file_and_row(raw_index)
    return f"{self._paths[file_index]}:row {row}"

  def _read(self, raw_index):
    file_index, row = self._file_and_row(raw_index)
    try:
      record = self._tables[file_index].slice(row, 1).to_pylist()[0]
    except UnicodeDecodeError as e:  # A string column of invalid UTF-8.
      raise records.MalformedRecord("bad_utf8", f"row is not UTF-8: {e}"
                                    ) from None
    return _text_of(record, self._text_field)

  def __repr__(self):
    return f"ParquetSource(files={len(self._paths)}, len={len(self)})"


class ArrayRecordSource(records.CheckedSource):
  """ArrayRecord files of UTF-8 records.

  A record is either a JSON object holding ``text_field`` or raw UTF-8 text:
  records that parse as a JSON object are read as records (so raw text that
  is itself a JSON object must be wrapped as ``{"text": ...}``), everything
  else is the text itself. ``skip_malformed`` as in :class:`JsonlSource`.
  """

  def __init__(self, paths, text_field="text", *, skip_malformed=False):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._paths = _expand_paths(paths)
    self._text_field = text_field
    # One reader per file so errors can name the file and the position.
    self._sources = [array_record_data_source.ArrayRecordDataSource(p)
                     for p in self._paths]
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])
    self._apply_policy(skip_malformed)

  def _num_raw(self):
    return int(self._offsets[-1])

  def _file_and_position(self, raw_index):
    file_index = bisect.bisect_right(self._offsets, raw_index) - 1
    return file_index, int(raw_index - self._offsets[file_index])

  def where(self, raw_index):
    file_index, position = self._file_and_position(raw_index)
    return f"{self._paths[file_index]}:record {position}"

  def _read(self, raw_index):
    file_index, position = self._file_and_position(raw_index)
    text = records.decode_utf8(self._sources[file_index][position])
    if text.lstrip().startswith("{"):
      try:
        record = records.parse_json_object(text)
      except records.MalformedRecord as e:
        if e.reason == "too_deep":  # A JSON object, but unreadable.
          raise
        record = None  # Raw text that starts with '{'.
      if record is not None:
        return _text_of(record, self._text_field)
    return {"text": text}

  def __repr__(self):
    return f"ArrayRecordSource(files={len(self._paths)}, len={len(self)})"


class TfdsSource(records.CheckedSource):
  """A prepared TFDS dataset (ArrayRecord format) via ``tfds.data_source``.

  Works without TensorFlow for datasets prepared with
  ``file_format='array_record'``. Nothing is downloaded: prepare the dataset
  first (``tfds build --file_format=array_record``). ``skip_malformed`` as
  in :class:`JsonlSource`; records are located as ``tfds name[split]:row N``.
  """

  def __init__(self, name, split, data_dir=None, text_field="text", *,
               skip_malformed=False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._name = f"{name}[{split}]"
    self._text_field = text_field
    self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                    download=False)
    self._apply_policy(skip_malformed)

  def _num_raw(self):
    return len(self._source)

  def where(self, raw_index):
    return f"tfds {self._name}:row {raw_index}"

  def _read(self, raw_index):
    return _text_of(self._source[raw_index], self._text_field)

  def __repr__(self):
    return f"TfdsSource({self._name}, len={len(self)})"


# In-memory ``datasets`` objects named for ``data.hf_path='memory:NAME'``.
_HF_DATASETS = {}


def register_hf_dataset(name, dataset):
  """Makes an in-memory ``datasets.Dataset``/``DatasetDict`` a data source.

  Returns the ``data.hf_path`` that names it (``'memory:NAME'``), for runs
  in the same Python process (a notebook); a launcher run reads an on-disk
  dataset instead.
  """
  _HF_DATASETS[name] = dataset
  return f"memory:{name}"


def _load_hf(path):
  """A ``Dataset``/``DatasetDict`` from ``memory:NAME`` or a directory.

  A directory written by ``save_to_disk`` is opened with ``load_from_disk``;
  any other directory (the Hub's layout: Parquet/JSON files, ``data/``
  folders, split names in file names) with ``load_dataset(path)``, which
  reads it locally without reaching for the Hub.
  """
  if path.startswith("memory:"):
    if path[7:] not in _HF_DATASETS:
      raise ValueError(f"data.hf_path={path!r}: no dataset registered under "
                       f"{path[7:]!r} (sources.register_hf_dataset); "
                       f"registered: {sorted(_HF_DATASETS)}.")
    return _HF_DATASETS[path[7:]]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"data.hf_path={path!r}: no such directory.")
  import datasets  # pylint: disable=g-import-not-at-top
  saved = ("dataset_info.json", "state.json", "dataset_dict.json")
  if any(os.path.isfile(os.path.join(path, f)) for f in saved):
    return datasets.load_from_disk(path)
  return datasets.load_dataset(path)


class HfSource(records.CheckedSource):
  """One split of a Hugging Face ``datasets`` dataset (Arrow, memory-mapped).

  ``dataset`` is a ``datasets.Dataset`` (``split`` only names it), or a
  ``DatasetDict`` with ``split`` in it. ``skip_malformed`` as in :class:`JsonlSource`; records are located
  as ``hf NAME[split]:row N``. A missing text column is an error of the
  whole dataset, raised at construction.
  """

  def __init__(self, dataset, split="train", text_field="text", *, name="",
               skip_malformed=False):
    if isinstance(dataset.column_names, dict):  # a DatasetDict
      if split not in dataset:
        raise ValueError(f"hf dataset {name!r} has no split {split!r} "
                         f"(splits: {sorted(dataset)}).")
      dataset = dataset[split]
    self._name = f"{name}[{split}]"
    self._text_field = text_field
    if text_field is not None and text_field not in dataset.column_names:
      raise ValueError(f"hf dataset {self._name}: missing text field "
                       f"{text_field!r} (columns: {dataset.column_names}).")
    self._dataset = dataset
    self._apply_policy(skip_malformed)

  def _num_raw(self):
    return len(self._dataset)

  def where(self, raw_index):
    return f"hf {self._name}:row {raw_index}"

  def _read(self, raw_index):
    return _text_of(self._dataset[int(raw_index)], self._text_field)

  def __repr__(self):
    return f"HfSource({self._name}, len={len(self)})"


def is_heldout(index, fraction):
  """Whether record ``index`` of a file source is held out for evaluation.

  A hash of the index, not its position's share: records keep their side
  when more are appended, and the held-out ones are spread over the files.
  """
  digest = hashlib.sha1(f"alignax-eval:{index}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


class HeldoutSplit:
  """The train or eval side of a source split by :func:`is_heldout`.

  Errors of a record still name its file and line (``where``); the split
  happens after ``skip_malformed`` dropped records, so each side is clean.
  """

  def __init__(self, source, fraction, split):
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"data.eval_fraction={fraction} must lie in (0, 1).")
    self._source, self._split = source, split
    keep = np.asarray([is_heldout(i, fraction) for i in range(len(source))],
                      bool)
    self._indices = np.flatnonzero(keep if split == "eval" else ~keep)
    if not len(self._indices):
      raise ValueError(
          f"data.eval_fraction={fraction} leaves the {split} split of "
          f"{source!r} empty; change the fraction or give data.eval_paths.")

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._source[int(self._indices[index])]

  def where(self, index):
    raw = int(self._indices[index])
    if hasattr(self._source, "raw_index"):
      raw = self._source.raw_index(raw)
    return self._source.where(raw)

  def __getattr__(self, name):  # num_skipped, skipped, ... of the source
    if name.startswith("_"):  # also while unpickling, before __dict__ is set
      raise AttributeError(name)
    return getattr(self._source, name)

  def __repr__(self):
    return f"HeldoutSplit({self._split}, {self._source!r}, len={len(self)})"


def build_source(data_cfg, split):
  """Builds the source named by ``data_cfg.source`` for ``split``.

  Args:
    data_cfg: ml_collections config with ``source`` (one of ``SOURCES``),
      ``paths`` and ``eval_paths`` (file sources), ``text_field``,
      ``tfds_name``, ``tfds_data_dir``, ``skip_malformed``, and
      optionally ``heldout_fraction`` (embedded, default 0.02),
      ``tfds_train_split`` / ``tfds_eval_split`` (default ``'train'`` /
      ``'validation'``), ``eval_fraction`` (file sources without
      ``eval_paths``: this share of ``paths``' records, chosen by
      :func:`is_heldout`, is the eval split and left out of train).
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
  skip = bool(data_cfg.get("skip_malformed", False))
  if name == "embedded":
    return EmbeddedSource("train" if train else "heldout",
                          data_cfg.get("heldout_fraction", 0.02))
  if name == "tfds":
    tfds_split = (data_cfg.get("tfds_train_split", "train") if train
                  else data_cfg.get("tfds_eval_split", "validation"))
    return TfdsSource(data_cfg.tfds_name, tfds_split,
                      data_cfg.get("tfds_data_dir") or None, text_field,
                      skip_malformed=skip)
  fraction = float(data_cfg.get("eval_fraction", 0.0) or 0.0)
  if name == "hf":
    return _hf_source(data_cfg, split, text_field, skip, fraction)
  kind = {"jsonl": JsonlSource, "parquet": ParquetSource,
          "array_record": ArrayRecordSource}[name]
  if fraction and not list(data_cfg.get("eval_paths", ()) or ()):
    if not list(data_cfg.paths):
      raise ValueError(f"data.source={name!r} needs data.paths.")
    whole = kind(list(data_cfg.paths), text_field, skip_malformed=skip)
    return HeldoutSplit(whole, fraction, split)
  paths = list(data_cfg.paths if train else data_cfg.eval_paths)
  if not paths:
    if train:
      raise ValueError(f"data.source={name!r} needs data.paths.")
    raise ValueError(f"data.source={name!r} needs data.eval_paths, or "
                     "data.eval_fraction to hold out part of data.paths.")
  return kind(paths, text_field, skip_malformed=skip)


def _hf_source(data_cfg, split, text_field, skip, fraction):
  """``source='hf'``: the train/eval split of ``data.hf_path``.

  The eval split is ``data.hf_eval_split``; with ``data.eval_fraction`` set
  (or a dataset of one split) it is carved from the train split instead, as
  for file sources.
  """
  path = data_cfg.get("hf_path", "")
  if not path:
    raise ValueError("data.source='hf' needs data.hf_path (a save_to_disk "
                     "or Hub-layout directory, or 'memory:NAME').")
  dataset = _load_hf(path)
  train_split = data_cfg.get("hf_train_split", "train")
  eval_split = data_cfg.get("hf_eval_split", "test")
  if split == "eval" and not fraction and not isinstance(
      dataset.column_names, dict):
    raise ValueError(f"data.hf_path={path!r} is one split with no "
                     f"{eval_split!r}: set data.eval_fraction to hold out "
                     "part of it.")
  if fraction:
    whole = HfSource(dataset, train_split, text_field, name=path,
                     skip_malformed=skip)
    return HeldoutSplit(whole, fraction, split)
  return HfSource(dataset, train_split if split == "train" else eval_split,
                  text_field, name=path, skip_malformed=skip)
