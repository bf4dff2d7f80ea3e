"""Preference data: records -> token groups -> packed preference batches.

Record formats (JSONL lines or Parquet rows; ``data.preference.format``):

* ``pairs``:  ``{"prompt", "chosen", "rejected"}``, TRL's preference format,
  or TRL's implicit-prompt form ``{"chosen", "rejected"}`` (strings or
  message lists that both start with the prompt): the longest common prefix
  is split off as the prompt, as TRL's ``maybe_extract_prompt`` does
  (:func:`extract_prompt`);
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
instead (checked once, at construction) and counts them by reason (the
policy of :mod:`alignax.data.records`: wrong types, missing fields,
non-finite scores or rewards, labels not 0/1, chosen == rejected; empty
prompts and completions are kept, as in TRL).

Tokens: prompt = ``[BOS] + ids``, response = ``ids + [EOS]``. Truncation,
in this order: the prompt keeps its *end* (``[BOS]`` + the last
``max_prompt_len - 1`` ids: the text next to the response matters most), each
response keeps its *start* (``max_response_len`` ids, EOS then dropped); if
the example still does not fit one row, responses are cut further to a
common length, and if one token each does not fit, the prompt is cut more
(keep end). Every example then fits one row: packing never splits a group.

``max_length`` (TRL's ``DPOConfig.max_length``, ``truncation_mode=
'keep_start'``) replaces both caps: each prompt + response sequence keeps its
first ``max_length`` tokens, exactly the sequences TRL trains on. A prompt
that alone fills ``max_length`` keeps its end (``max_length - 1`` tokens)
where TRL drops the example. The config check asks for ``train.seq_len >=
K (max_length - 1)``, so such a group always fits one row uncut: TRL's
``max_length=256`` is ``seq_len=510`` here, a row that holds what TRL's two
256-token sequences hold (the prompt once with ``shared_prompt``).

Batches are built by :mod:`alignax.data.preference_packing`.
"""

import copy

import grain
import numpy as np

from alignax.data import attribute_task
from alignax.data import chat
from alignax.data import pipeline
from alignax.data import preference_packing as packing
from alignax.data import preference_task
from alignax.data import records as records_lib
from alignax.data import shards
from alignax.data import sources

MalformedRecord = records_lib.MalformedRecord

FORMATS = ("pairs", "lists", "binary")
_BUILTIN = chat.BuiltinChat()


def list_size(pref_cfg):
  """K, the responses per example: 2 for pairs and binary, else list_size."""
  return int(pref_cfg.list_size) if pref_cfg.format == "lists" else 2


def _check_messages(value, field):
  for i, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or (
        not isinstance(m.get("content"), str)):
      raise MalformedRecord("wrong_type", f"field {field!r}[{i}] must be a "
                            "message {'role': str, 'content': str}")
    records_lib.check_text(m["content"], f"{field}[{i}].content")


def _render(render, field, *args):
  """``render(*args)``: a template's refusal is the record's fault."""
  try:
    return render(*args)
  except ValueError as e:
    raise MalformedRecord("bad_chat", f"field {field!r}: {e}") from None


def _text(record, field, chat, *, prompt=False):
  """A text field as a string (chat messages rendered by ``chat``)."""
  value = records_lib.require(record, field)
  if isinstance(value, list) and value:
    _check_messages(value, field)
    if prompt:
      return _render(chat.prompt, field, value)
    prompt_messages = record.get("prompt")
    if not isinstance(prompt_messages, list):
      prompt_messages = []
    return _render(chat.completion, field, prompt_messages, value)
  if not isinstance(value, (str, bytes)):
    raise MalformedRecord(
        "wrong_type", f"field {field!r} must be a string or a non-empty list "
        f"of chat messages, got {type(value).__name__}")
  return records_lib.check_text(value, field)


def _numbers(record, field, n):
  value = records_lib.require(record, field)
  if not isinstance(value, list):
    raise MalformedRecord("wrong_type", f"field {field!r} must be a list of "
                          f"{n} numbers, got {value!r:.60}")
  if len(value) != n:
    raise MalformedRecord("bad_value", f"field {field!r} must be a list of "
                          f"{n} numbers, got {len(value)}: {value!r:.60}")
  return [records_lib.finite(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _is_messages(value):
  return isinstance(value, list) and bool(value) and isinstance(value[0],
                                                                dict)


def extract_prompt(record):
  """TRL's ``extract_prompt``: the common prefix of chosen and rejected.

  Strings split by character, message lists by message; a split just after
  a space moves before it (the space stays with the responses). As in TRL,
  when one response is a prefix of the other the split is one element
  before the shorter one's end. (TRL's wrap-around when the first element
  differs, ``chosen[-1] == " "``, is not copied: the prompt is then empty.)
  """
  chosen, rejected = record["chosen"], record["rejected"]
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      if idx and chosen[idx - 1] == " ":
        idx -= 1
      break
  prompt = chosen[:idx]
  return dict(record, prompt=prompt if prompt else "", chosen=chosen[idx:],
              rejected=rejected[idx:])


def maybe_extract_prompt(record):
  """``record`` with its prompt made explicit (TRL's ``maybe_extract_prompt``).

  The prompt is extracted when there is none, or when it is a string while
  the responses are message lists that repeat it (TRL's example,
  ``{"prompt": "The sky is", "chosen": [user, assistant messages]}``);
  any other record is returned as is.
  """
  if not isinstance(record, dict) or "chosen" not in record or (
      "rejected" not in record):
    return record
  for field in ("chosen", "rejected"):
    if not isinstance(record[field], (str, list)):
      return record  # parse_pair names the wrong type
  if "prompt" in record and not (isinstance(record["prompt"], str) and
                                 _is_messages(record["chosen"])):
    return record
  return extract_prompt(record)


def parse_pair(record, reward_fields=(), chat=_BUILTIN):
  """``{prompt, chosen, rejected}`` -> a normalised example (see parse).

  Implicit-prompt records (no ``prompt``) go through
  :func:`maybe_extract_prompt` first.
  """
  record = maybe_extract_prompt(record)
  rewards = [[records_lib.finite(records_lib.require(record, f"{side}_{f}"),
                                 f"{side}_{f}")
              for f in reward_fields] for side in ("chosen", "rejected")]
  example = {"prompt": _text(record, "prompt", chat, prompt=True),
             "responses": [_text(record, "chosen", chat),
                           _text(record, "rejected", chat)],
             "labels": [1.0, 0.0], "rewards": rewards}
  if example["responses"][0] == example["responses"][1]:
    raise MalformedRecord("identical", "fields 'chosen' and 'rejected' are "
                          "the same text: the pair prefers nothing")
  return example


def parse_list(record, reward_fields=(), chat=_BUILTIN):
  """``{prompt, responses, scores}`` -> a normalised example."""
  responses = records_lib.require(record, "responses")
  if not isinstance(responses, list) or not responses:
    raise MalformedRecord("wrong_type", "field 'responses' must be a "
                          f"non-empty list, got {responses!r:.60}")
  texts = [_text({"prompt": record.get("prompt"), "responses": r},
                 "responses", chat) for r in responses]
  if len(texts) > 1 and len(set(texts)) == 1:
    raise MalformedRecord("identical", "field 'responses' holds one text "
                          f"{len(texts)} times: nothing to rank")
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
  label = records_lib.require(record, "label")
  if not isinstance(label, bool):
    label = records_lib.finite(label, "label")
  if label not in (0, 1):
    raise MalformedRecord("bad_value", "field 'label' must be true/false or "
                          f"0/1, got {label!r}")
  return {"prompt": _text(record, "prompt", chat, prompt=True),
          "responses": [_text(record, "completion", chat)],
          "labels": [float(label)], "rewards": [[]]}


PARSERS = {"pairs": parse_pair, "lists": parse_list, "binary": parse_binary}


class RecordSource(records_lib.ParsedSource):
  """Random access to parsed records ``{index, prompt, responses, labels,
  rewards}`` of a source of raw records (``text_field=None``).

  ``index`` is the record's position here: the key of the reference cache.
  For ``binary`` the next record's completion is appended as a second
  response (KTO's mismatched KL completion). With ``skip_malformed`` every
  record is parsed once here and the bad ones (of the raw source too) are
  dropped and counted by reason in ``skipped``.
  """

  def __init__(self, source, fmt, *, reward_fields=(), skip_malformed=False,
               chat=None):
    if fmt not in FORMATS:
      raise ValueError(f"data.preference.format={fmt!r} not in {FORMATS}.")
    if fmt == "binary" and reward_fields:
      raise ValueError("reward_fields apply to pairs and lists, not binary.")
    self._source, self._fmt = source, fmt
    self._chat = chat or _BUILTIN
    self._reward_fields = tuple(reward_fields)
    self._apply_policy(skip_malformed, "preference records")

  def _read(self, raw_index):
    record = self._source[raw_index]  # sources locate their own errors
    return PARSERS[self._fmt](record, self._reward_fields, self._chat)

  def __getitem__(self, index):
    example = self._checked(self.raw_index(index))
    if self._fmt == "binary":
      nxt = self._checked(self.raw_index((index + 1) % len(self)))
      example["responses"].append(nxt["responses"][0])
      example["labels"].append(0.0)
      example["rewards"].append([])
    return dict(example, index=index)

  def __repr__(self):
    return f"RecordSource({self._fmt}, {self._source!r}, len={len(self)})"


def raw_source(data_cfg, split):
  """The raw record source of ``split`` (``'train'`` or ``'eval'``).

  ``data.source='embedded'`` is the docstring -> name task
  (:mod:`alignax.data.preference_task`), or with
  ``data.preference.embedded_task='attributes'`` the pairs of the
  multi-attribute task (:mod:`alignax.data.attribute_task`).
  """
  pref = data_cfg.preference
  if data_cfg.source == "embedded" and pref.get("embedded_task",
                                                "names") == "attributes":
    if pref.format != "pairs":
      raise ValueError("data.preference.embedded_task='attributes' makes "
                       f"pairs, not {pref.format!r}")
    return attribute_task.AttributeNames(
        split, "pairs", repeats=pref.task_repeats,
        heldout_fraction=data_cfg.get("heldout_fraction", 0.02),
        length_bias=(pref.get("task_length_bias", 0.85) if split == "train"
                     else 0.5))
  if data_cfg.source == "embedded":
    return preference_task.DocstringNames(
        split, pref.format, list_size=int(pref.list_size),
        repeats=pref.task_repeats,
        heldout_fraction=data_cfg.get("heldout_fraction", 0.02))
  cfg = copy.deepcopy(data_cfg)
  with cfg.unlocked():
    cfg.text_field = None  # whole records
    cfg.skip_malformed = False  # RecordSource checks and counts them all
  return sources.build_source(cfg, split)


def record_source(data_cfg, split):
  """The parsed :class:`RecordSource` of ``split``."""
  pref = data_cfg.preference
  return RecordSource(raw_source(data_cfg, split), pref.format,
                      reward_fields=pref.reward_fields,
                      skip_malformed=data_cfg.get("skip_malformed", False),
                      chat=chat.build_chat(pref.get("chat_template", "")))


def truncate_prompt(prompt, pref_cfg) -> tuple[list[int], int]:
  """``([BOS] + prompt ids, response cap)`` cut as the module docstring says:
  the prompt keeps its end, each response (EOS included) keeps its first
  ``cap`` tokens; with ``max_length`` (TRL's), prompt + response <= it."""
  max_length = int(pref_cfg.get("max_length", 0))
  keep = max_length - 1 if max_length else int(pref_cfg.max_prompt_len)
  if len(prompt) > keep:
    prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]
  cap = max_length - len(prompt) if max_length else int(pref_cfg.max_response_len)
  return prompt, cap


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
    self._pref = pref_cfg
    self._num_rewards = len(pref_cfg.reward_fields)
    self._shared = bool(pref_cfg.shared_prompt)
    self._seq_len = seq_len
    self._reference = reference  # [N, K] cached reference log-probs

  def map(self, element):
    k = self._k
    prompt, cap = truncate_prompt(
        [self._tok.bos_id] + self._tok.encode(element["prompt"]), self._pref)
    responses = [(self._tok.encode(r) + [self._tok.eos_id])[:cap]
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
    :mod:`alignax.data.preference_packing`); its ``skipped`` holds the
    malformed-record counts (:func:`alignax.data.records.skip_counts`).
  """
  records = record_source(data_cfg, split)

  def make(shard, num_shards, rows):
    ds = examples(records, data_cfg, tokenizer, split=split, seed=seed,
                  seq_len=seq_len, process_index=shard,
                  process_count=num_shards, num_epochs=num_epochs)
    return packing.pack_and_batch(ds, _layout(data_cfg), seq_len=seq_len,
                                  batch_size=rows, seed=seed)

  ds = shards.batches(make, data_cfg, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  return records_lib.with_counts(ds, records)


def build_preference_eval_batches(data_cfg, tokenizer, *, seq_len, batch_size,
                                  process_index=0, process_count=1,
                                  num_batches=None):
  """Deterministic held-out batches, padded as ``pipeline.build_eval_batches``."""
  layout = _layout(data_cfg)
  batches = ()
  records = record_source(data_cfg, "eval")
  if process_index < len(records):  # Else this process's shard is empty.
    ds = examples(records, data_cfg, tokenizer, split="eval", seed=0,
                  seq_len=seq_len,
                  process_index=process_index, process_count=process_count,
                  shuffle=False, num_epochs=1)
    batches = packing.pack_and_batch(ds, layout, seq_len=seq_len,
                                     batch_size=batch_size, shuffle_bins=False,
                                     drop_remainder=False)
  return pipeline.pad_eval_batches(
      batches, num_batches,
      lambda: packing.empty_rows(layout, batch_size, seq_len))
