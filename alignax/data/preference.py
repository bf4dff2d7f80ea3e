"""Preference data: records -> token groups -> packed preference batches.

Record formats (JSONL lines or Parquet rows; ``data.preference.format``):

* ``pairs``:  ``{"prompt", "chosen", "rejected"}``, TRL's preference format;
* ``lists``:  ``{"prompt", "responses": [...], "scores": [...]}``, graded
  responses (higher is better); lists longer than ``list_size`` keep their
  first ``list_size`` responses, shorter ones are padded with invalid slots;
* ``binary``: ``{"prompt", "completion", "label"}``, KTO's unpaired format
  (``label`` true = desirable). The completion of the next record (cyclic)
  rides along as the mismatched completion of KTO's KL baseline.

Text fields hold plain strings or chat messages, lists of
``{"role": str, "content": str}``, rendered by :mod:`alignax.data.chat`:
alignax's built-in template (``<|user|>\n{content}\n ... <|assistant|>\n``)
or, with ``data.preference.chat_template`` (set automatically from a
Hugging Face ``checkpoint.init_from`` that has one), the model's own Jinja
template as ``apply_chat_template`` renders it. A prompt of messages ends
with the generation header; a completion of messages is the text the
template adds after the prompt (TRL's split). MODPO's scores of the
other objectives are numeric fields named by ``data.preference.reward_fields``:
``chosen_<f>`` / ``rejected_<f>`` for pairs, ``<f>`` (a list) for lists.

A malformed record raises ``ValueError`` naming the file, the line (JSONL) or
row (Parquet) and the field; ``data.skip_malformed`` drops such records
instead (checked once, at construction).

Tokens: prompt = ``[BOS] + ids``, response = ``ids + [EOS]``. Truncation,
in this order: the prompt keeps its *end* (``[BOS]`` + the last
``max_prompt_len - 1`` ids: the text next to the response matters most), each
response keeps its *start* (``max_response_len`` ids, EOS then dropped); if
the example still does not fit one row, responses are cut further to a
common length, and if one token each does not fit, the prompt is cut more
(keep end). Every example then fits one row: packing never splits a group.

Batches are built by :mod:`alignax.data.preference_packing`.
"""

import bisect
import copy
import logging

import grain
import numpy as np

from alignax.data import chat
from alignax.data import pipeline
from alignax.data import preference_packing as packing
from alignax.data import preference_task
from alignax.data import sources

FORMATS = ("pairs", "lists", "binary")
_BUILTIN = chat.BuiltinChat()


def list_size(pref_cfg):
  """K, the responses per example: 2 for pairs and binary, else list_size."""
  return int(pref_cfg.list_size) if pref_cfg.format == "lists" else 2


def _check_messages(value, field):
  for i, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or (
        not isinstance(m.get("content"), str)):
      raise ValueError(f"field {field!r}[{i}] must be a message "
                       "{'role': str, 'content': str}.")


def _text(record, field, chat, *, prompt=False):
  """A text field as a string (chat messages rendered by ``chat``)."""
  if field not in record:
    raise ValueError(f"missing field {field!r} (record has fields "
                     f"{sorted(record)}).")
  value = record[field]
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value:
    _check_messages(value, field)
    if prompt:
      return chat.prompt(value)
    prompt_messages = record.get("prompt")
    if not isinstance(prompt_messages, list):
      prompt_messages = []
    return chat.completion(prompt_messages, value)
  raise ValueError(f"field {field!r} must be a string or a non-empty list of "
                   f"chat messages, got {type(value).__name__}.")


def _number(value, field):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"field {field!r} must be a number, got {value!r}.")
  return float(value)


def _numbers(record, field, n=None):
  if field not in record:
    raise ValueError(f"missing field {field!r} (record has fields "
                     f"{sorted(record)}).")
  value = record[field]
  if not isinstance(value, list) or (n is not None and len(value) != n):
    want = f"a list of {n} numbers" if n is not None else "a list of numbers"
    raise ValueError(f"field {field!r} must be {want}, got {value!r}.")
  return [_number(v, f"{field}[{i}]") for i, v in enumerate(value)]


def parse_pair(record, reward_fields=(), chat=_BUILTIN):
  """``{prompt, chosen, rejected}`` -> a normalised example (see parse)."""
  rewards = [[_number(record.get(f"{side}_{f}"), f"{side}_{f}")
              for f in reward_fields] for side in ("chosen", "rejected")]
  return {"prompt": _text(record, "prompt", chat, prompt=True),
          "responses": [_text(record, "chosen", chat),
                        _text(record, "rejected", chat)],
          "labels": [1.0, 0.0], "rewards": rewards}


def parse_list(record, reward_fields=(), chat=_BUILTIN):
  """``{prompt, responses, scores}`` -> a normalised example."""
  responses = record.get("responses")
  if not isinstance(responses, list) or not responses:
    raise ValueError("field 'responses' must be a non-empty list, got "
                     f"{responses!r}.")
  texts = [_text({"prompt": record.get("prompt"), "responses": r},
                 "responses", chat) for r in responses]
  scores = _numbers(record, "scores", len(texts))
  per_field = [_numbers(record, f, len(texts)) for f in reward_fields]
  rewards = [list(v) for v in zip(*per_field)] if per_field else [
      [] for _ in texts]
  return {"prompt": _text(record, "prompt", chat, prompt=True),
          "responses": texts, "labels": scores, "rewards": rewards}


def parse_binary(record, reward_fields=(), chat=_BUILTIN):
  """``{prompt, completion, label}`` -> an example of one response."""
  if reward_fields:
    raise ValueError("reward_fields apply to pairs and lists, not binary.")
  label = record.get("label")
  if not isinstance(label, (bool, int, float)) or label not in (0, 1):
    raise ValueError(f"field 'label' must be true/false or 0/1, got {label!r}.")
  return {"prompt": _text(record, "prompt", chat, prompt=True),
          "responses": [_text(record, "completion", chat)],
          "labels": [float(label)], "rewards": [[]]}


PARSERS = {"pairs": parse_pair, "lists": parse_list, "binary": parse_binary}


def _location(source, index):
  """``file:line`` / ``file:row`` of a record of a file source."""
  if hasattr(source, "_where"):  # JsonlSource counts lines on demand.
    return source._where(index)  # pylint: disable=protected-access
  offsets, paths = getattr(source, "_offsets", None), getattr(
      source, "_paths", None)
  if offsets is not None and paths:
    i = bisect.bisect_right(offsets, index) - 1
    return f"{paths[i]}:row {int(index - offsets[i])}"
  return f"{source!r}[{index}]"


class RecordSource:
  """Random access to parsed records ``{index, prompt, responses, labels,
  rewards}`` of a source of raw records (``text_field=None``).

  ``index`` is the record's position here: the key of the reference cache.
  For ``binary`` the next record's completion is appended as a second
  response (KTO's mismatched KL completion).
  """

  def __init__(self, source, fmt, *, reward_fields=(), skip_malformed=False,
               chat=None):
    if fmt not in FORMATS:
      raise ValueError(f"data.preference.format={fmt!r} not in {FORMATS}.")
    self._source, self._fmt = source, fmt
    self._chat = chat or _BUILTIN
    self._reward_fields = tuple(reward_fields)
    self._keep = None
    self.num_skipped = 0
    if skip_malformed:
      self._drop_malformed()

  def _drop_malformed(self):
    keep, first = [], None
    for i in range(len(self._source)):
      try:
        self._parse(i)
        keep.append(i)
      except ValueError as e:
        first = first or f"{_location(self._source, i)}: {e}"
    self.num_skipped = len(self._source) - len(keep)
    if self.num_skipped:
      logging.warning("skipped %d malformed preference records; first: %s",
                      self.num_skipped, first)
    self._keep = np.asarray(keep, np.int64)

  def __len__(self):
    return len(self._source) if self._keep is None else len(self._keep)

  def _parse(self, raw_index):
    record = self._source[raw_index]  # sources locate their own errors
    try:
      return PARSERS[self._fmt](record, self._reward_fields, self._chat)
    except ValueError as e:
      raise ValueError(f"{_location(self._source, raw_index)}: {e}") from None

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    raw = index if self._keep is None else int(self._keep[index])
    example = self._parse(raw)
    if self._fmt == "binary":
      nxt = (index + 1) % len(self)
      raw_next = nxt if self._keep is None else int(self._keep[nxt])
      example["responses"].append(self._parse(raw_next)["responses"][0])
      example["labels"].append(0.0)
      example["rewards"].append([])
    return dict(example, index=index)

  def __repr__(self):
    return f"RecordSource({self._fmt}, {self._source!r}, len={len(self)})"


def raw_source(data_cfg, split):
  """The raw record source of ``split`` (``'train'`` or ``'eval'``)."""
  pref = data_cfg.preference
  if data_cfg.source == "embedded":
    return preference_task.DocstringNames(
        split, pref.format, list_size=int(pref.list_size),
        repeats=pref.task_repeats,
        heldout_fraction=data_cfg.get("heldout_fraction", 0.02))
  cfg = copy.deepcopy(data_cfg)
  with cfg.unlocked():
    cfg.text_field = None  # whole records
  return sources.build_source(cfg, split)


def record_source(data_cfg, split):
  """The parsed :class:`RecordSource` of ``split``."""
  pref = data_cfg.preference
  return RecordSource(raw_source(data_cfg, split), pref.format,
                      reward_fields=pref.reward_fields,
                      skip_malformed=data_cfg.get("skip_malformed", False),
                      chat=chat.build_chat(pref.get("chat_template", "")))


def fit_group(prompt, responses, *, seq_len, shared_prompt):
  """Cuts responses (keep start), then the prompt (keep end), to fit a row."""
  k = len(responses)

  def cost(n, cap):
    ms = [min(len(r), cap) for r in responses]
    return (n - 1 + sum(ms)) if shared_prompt else sum(n + m - 1 for m in ms)

  n, cap = len(prompt), max(len(r) for r in responses)
  if cost(n, cap) > seq_len:
    lo, hi = 1, cap  # largest cap that fits, by bisection
    while lo < hi:
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if cost(n, mid) <= seq_len else (lo, mid - 1)
    cap = lo
  if cost(n, cap) > seq_len:
    n = (seq_len - k + 1) if shared_prompt else seq_len // k
    if n < 1:
      raise ValueError(f"seq_len={seq_len} cannot hold {k} responses.")
  prompt = prompt[:1] + prompt[len(prompt) - n + 1:] if n < len(prompt) else (
      prompt)
  return prompt, [r[:cap] for r in responses]


class TokenizeExample(grain.transforms.Map):
  """Parsed record -> ``{index, prompt, responses, labels, valid, rewards,
  ref_logps}``, token lists truncated (see the module docstring)."""

  def __init__(self, tokenizer, pref_cfg, *, seq_len, reference=None):
    self._tok = tokenizer
    self._k = list_size(pref_cfg)
    self._max_prompt = int(pref_cfg.max_prompt_len)
    self._max_response = int(pref_cfg.max_response_len)
    self._num_rewards = len(pref_cfg.reward_fields)
    self._shared = bool(pref_cfg.shared_prompt)
    self._seq_len = seq_len
    self._reference = reference  # [N, K] cached reference log-probs

  def map(self, element):
    k = self._k
    prompt = [self._tok.bos_id] + self._tok.encode(element["prompt"])
    if len(prompt) > self._max_prompt:
      prompt = prompt[:1] + prompt[len(prompt) - self._max_prompt + 1:]
    responses = [(self._tok.encode(r) + [self._tok.eos_id])[:self._max_response]
                 for r in element["responses"][:k]]
    prompt, responses = fit_group(prompt, responses, seq_len=self._seq_len,
                                  shared_prompt=self._shared)
    n = len(responses)
    labels = np.zeros(k, np.float32)
    labels[:n] = element["labels"][:k]
    rewards = np.zeros((k, self._num_rewards), np.float32)
    if self._num_rewards:
      rewards[:n] = element["rewards"][:k]
    ref = np.zeros(k, np.float32)
    if self._reference is not None:
      ref[:n] = self._reference[element["index"]][:n]
    return {"index": int(element["index"]), "prompt": prompt,
            "responses": responses, "labels": labels,
            "valid": np.arange(k) < n, "rewards": rewards, "ref_logps": ref}


def _reference_table(data_cfg, split, num_records, k):
  directory = data_cfg.preference.reference_cache
  if not directory:
    return None
  from alignax.data import reference_cache  # pylint: disable=g-import-not-at-top
  return reference_cache.load(directory, split, num_records, k)


def examples(records, data_cfg, tokenizer, *, split, seed, seq_len,
             process_index=0, process_count=1, shuffle=True, num_epochs=None):
  """``IterDataset`` of tokenized examples of this process's shard of
  ``records`` (a :class:`RecordSource` of ``split``)."""
  reference = _reference_table(data_cfg, split, len(records),
                               list_size(data_cfg.preference))
  ds = pipeline.shard_and_shuffle(records, seed=seed,
                                  process_index=process_index,
                                  process_count=process_count,
                                  shuffle=shuffle, num_epochs=num_epochs)
  ds = ds.map(TokenizeExample(tokenizer, data_cfg.preference, seq_len=seq_len,
                              reference=reference))
  return ds.to_iter_dataset(pipeline.read_options(data_cfg))


def _layout(data_cfg):
  pref = data_cfg.preference
  return packing.Layout(list_size=list_size(pref),
                        groups_per_row=int(pref.groups_per_row),
                        num_rewards=len(pref.reward_fields),
                        shared_prompt=bool(pref.shared_prompt))


def build_preference_dataset(data_cfg, tokenizer, *, split, seed, seq_len,
                             batch_size, process_index=0, process_count=1,
                             num_epochs=None):
  """Packed preference batches for training (``DATA_TASKS['preference']``).

  Arguments as ``pipeline.build_lm_dataset``; ``data_cfg.preference`` holds
  the format, list size, packing and truncation settings, and the
  reference cache directory (if any).

  Returns:
    a ``grain.IterDataset`` of batch dicts (see
    :mod:`alignax.data.preference_packing`).
  """
  ds = examples(record_source(data_cfg, split), data_cfg, tokenizer,
                split=split, seed=seed, seq_len=seq_len,
                process_index=process_index, process_count=process_count,
                num_epochs=num_epochs)
  return packing.pack_and_batch(ds, _layout(data_cfg), seq_len=seq_len,
                                batch_size=batch_size, seed=seed)


def build_preference_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                                  process_index=0, process_count=1,
                                  num_batches=None):
  """Deterministic held-out batches, padded as ``pipeline.build_eval_batches``."""
  layout = _layout(data_cfg)
  batches = []
  records = record_source(data_cfg, "eval")
  if process_index < len(records):  # Else this process's shard is empty.
    ds = examples(records, data_cfg, tokenizer, split="eval", seed=0,
                  seq_len=seq_len,
                  process_index=process_index, process_count=process_count,
                  shuffle=False, num_epochs=1)
    batches = packing.pack_and_batch(ds, layout, seq_len=seq_len,
                                     batch_size=batch_size, shuffle_bins=False,
                                     drop_remainder=False)
    batches = list(batches) if num_batches is None else [
        b for _, b in zip(range(num_batches), batches)]
  if num_batches is not None:
    batches += [packing.empty_rows(layout, batch_size, seq_len)
                for _ in range(num_batches - len(batches))]
  return batches
