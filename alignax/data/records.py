"""The malformed-record policy shared by every source and task.

A bad record, in any source (JSONL, Parquet, ArrayRecord, TFDS) and any
task (text, contrastive pairs, preference pairs / lists / binary), raises a
one-line :class:`MalformedRecord`, a ``ValueError``, when it is read::

  data/train.jsonl:17: field 'scores[1]' is inf, not a finite number
  data/part-0.parquet:row 4: text field 'text' is a int, not a string
  data/shard.array_record:record 9: JSON nested deeper than the parser allows

With ``config.data.skip_malformed=True`` every record is checked once when
the source is built instead; bad ones are dropped and counted by reason in
the source's ``skipped`` dict (``reason -> count``), read with
:func:`skip_counts` / :func:`skip_metrics`. Each reason is a short name,
the key of ``data/skipped/<reason>`` in the metrics:

=============== ============================================================
bad_utf8        bytes that are not UTF-8
bad_json        not valid JSON
too_deep        JSON nested deeper than the parser's recursion limit
not_object      the record is not a JSON object (a list, a number, ...)
missing_field   a field the task reads is absent
wrong_type      a field of the wrong type (a number for a text, ...)
surrogate       a text holding a lone UTF-16 surrogate (``"\\ud800"``):
                valid JSON, but not text a tokenizer can encode
non_finite      a NaN or infinite score, label or reward
bad_value       a value out of its domain (a label not 0/1, lists of
                different lengths)
too_few         fewer texts than the task needs (``data.num_views``)
empty           an empty query or positive of a contrastive pair
identical       a preference pair whose chosen and rejected texts are equal,
                or a list whose responses are all one text
bad_chat        chat messages the chat template refuses to render
=============== ============================================================

What is *not* malformed: blank lines (only whitespace) of a JSONL file are
no records at all and are skipped silently; an empty text is an empty
document; an empty prompt or an empty completion of a preference record is
kept, as TRL's DPO and KTO trainers keep them (they reject only non-string
fields): the prompt is then ``[BOS]`` and the response ``[EOS]``, both
well-defined. Identical chosen and rejected texts are rejected because the
pair carries no preference: the preference term of every DPO-family loss has
zero gradient on it (the two log-ratios cancel for any parameters).
"""

import json
import logging
import math

import numpy as np

REASONS = ("bad_utf8", "bad_json", "too_deep", "not_object", "missing_field",
           "wrong_type", "surrogate", "non_finite", "bad_value", "too_few",
           "empty", "identical", "bad_chat")


class MalformedRecord(ValueError):
  """A bad record: ``reason`` (one of ``REASONS``), what is wrong, and where.

  ``str(e)`` is ``'{where}: {what}'`` once located, else ``what``.
  """

  def __init__(self, reason, what, where=None):
    if reason not in REASONS:
      raise ValueError(f"unknown malformed-record reason {reason!r}")
    what = " ".join(what.splitlines())  # one line, whatever a parser said
    self.reason, self.what, self.where = reason, what, where
    super().__init__(f"{where}: {what}" if where else what)

  def at(self, where):
    """This error located at ``where``; an already located one is kept."""
    return self if self.where else MalformedRecord(self.reason, self.what,
                                                   where)

  def __reduce__(self):  # Pickles across grain worker processes.
    return MalformedRecord, (self.reason, self.what, self.where)


def decode_utf8(raw, what="record"):
  """``raw`` bytes as text, or :class:`MalformedRecord` ``bad_utf8``."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise MalformedRecord(
        "bad_utf8", f"{what} is not UTF-8 (byte {e.start}: "
        f"{raw[e.start:e.start + 1]!r})") from None


def parse_json_object(text):
  """A JSON object from ``text`` (``bad_json``, ``too_deep``, ``not_object``).

  JSON's ``NaN`` / ``Infinity`` are accepted here; numbers are checked by
  the task that reads them (:func:`finite`).
  """
  try:
    record = json.loads(text)
  except RecursionError:
    raise MalformedRecord(
        "too_deep", "JSON nested deeper than the parser allows") from None
  except ValueError as e:
    raise MalformedRecord("bad_json", f"malformed JSON: {e}") from None
  if not isinstance(record, dict):
    raise MalformedRecord(
        "not_object", f"record is a {type(record).__name__}, not a JSON "
        "object")
  return record


def require(record, field):
  """``record[field]``, or ``missing_field`` naming the record's fields."""
  if field not in record:
    raise MalformedRecord("missing_field", f"missing field {field!r} (record "
                          f"has fields {sorted(record)})")
  return record[field]


def check_text(value, field, *, kind="field"):
  """``value`` as a ``str`` fit for a tokenizer.

  Bytes are decoded (``bad_utf8``); anything else but a string is
  ``wrong_type``; a lone surrogate is ``surrogate``. Messages name the
  value ``f"{kind} {field!r}"``.
  """
  name = f"{kind} {field!r}"
  if isinstance(value, bytes):
    value = decode_utf8(value, name)
  if not isinstance(value, str):
    raise MalformedRecord("wrong_type", f"{name} is a "
                          f"{type(value).__name__}, not a string")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise MalformedRecord(
        "surrogate", f"{name} holds a lone surrogate {value[e.start]!r} at "
        f"character {e.start}") from None
  return value


def finite(value, field):
  """``value`` as a finite float (``wrong_type`` / ``non_finite``)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise MalformedRecord("wrong_type", f"field {field!r} must be a number, "
                          f"got {value!r:.40}")
  value = float(value)
  if not math.isfinite(value):
    raise MalformedRecord("non_finite", f"field {field!r} is {value}, not a "
                          "finite number")
  return value


class CheckedSource:
  """Random access to the good records of a source, under the policy.

  Subclasses implement ``_num_raw()`` (records before skipping),
  ``_read(raw_index)`` (the checked record; raises :class:`MalformedRecord`,
  located or not) and ``where(raw_index)`` (``'file:line'``), then call
  ``self._apply_policy(skip_malformed)`` at the end of ``__init__``.
  Indices are those of the kept records.

  Attributes:
    skipped: ``{reason: count}`` of the records dropped under
      ``skip_malformed`` (empty otherwise).
  """

  skipped = {}
  _keep = None

  def _apply_policy(self, skip_malformed, kind="records"):
    self.skipped, self._keep = {}, None
    if not skip_malformed:
      return
    keep, first = [], None
    for i in range(self._num_raw()):
      try:
        self._checked(i)
        keep.append(i)
      except MalformedRecord as e:
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        first = first or e
    self._keep = np.asarray(keep, np.int64)
    if first is not None:
      counts = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
      logging.warning("skipped %d malformed %s of %r (%s); first: %s",
                      self.num_skipped, kind, self, counts, first)

  @property
  def num_skipped(self):
    """Records dropped under ``skip_malformed``, all reasons together."""
    return sum(self.skipped.values())

  def __len__(self):
    return self._num_raw() if self._keep is None else len(self._keep)

  def raw_index(self, index):
    """The position of kept record ``index`` among all records."""
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    return index if self._keep is None else int(self._keep[index])

  def _checked(self, raw_index):
    """``_read(raw_index)`` with its error located."""
    try:
      return self._read(raw_index)
    except MalformedRecord as e:
      raise e.at(self.where(raw_index)) from None
    except RecursionError:  # Anything deep that the parser let through.
      raise MalformedRecord("too_deep", "record nested too deeply",
                            self.where(raw_index)) from None

  def __getitem__(self, index):
    return self._checked(self.raw_index(index))

  def where(self, raw_index):
    return f"{self!r}[{raw_index}]"


class ParsedSource(CheckedSource):
  """A :class:`CheckedSource` whose records come from another source
  (``self._source``, itself located): its records, its locations."""

  _source = ()

  def _num_raw(self):
    return len(self._source)

  def where(self, raw_index):
    """``file:line`` / ``file:row N`` of a record of the raw source."""
    if hasattr(self._source, "where"):
      return self._source.where(raw_index)
    return f"{self._source!r}[{raw_index}]"


def skip_counts(obj):
  """``{reason: count}`` of the malformed records ``obj`` skipped.

  ``obj`` is a source, a record source, or a dataset returned by a
  ``build_*_dataset`` function of :mod:`alignax.data` (they carry their
  sources' counts). The counts cover the whole split, not one process's
  shard: every process indexes all records, so they agree everywhere.
  """
  return dict(getattr(obj, "skipped", None) or {})


def merge_counts(*counts):
  """The sum of several ``{reason: count}`` dicts."""
  out = {}
  for c in counts:
    for reason, n in c.items():
      out[reason] = out.get(reason, 0) + n
  return out


def skip_metrics(obj, prefix="data/skipped"):
  """:func:`skip_counts` as metrics, ``{'data/skipped/<reason>': count}``."""
  return {f"{prefix}/{r}": n for r, n in sorted(skip_counts(obj).items())}


def with_counts(dataset, *sources):
  """Attaches the sources' merged ``skipped`` counts to ``dataset``."""
  dataset.skipped = merge_counts(*(skip_counts(s) for s in sources))
  return dataset
