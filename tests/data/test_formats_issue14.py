"""Data formats a TRL / Hugging Face user brings (issue 14).

Compressed JSONL read transparently with ``file:line`` errors; TRL's
implicit-prompt preference records split as TRL's ``extract_prompt``
splits them; chat templates with ``{% generation %}`` and ``strftime_now``
rendered as ``transformers``' ``apply_chat_template`` renders them.
"""

import gzip
import importlib.util
import json

import pytest

from alignax import defaults
from alignax.data import chat
from alignax.data import preference
from alignax.data import sources

RECORDS = [{"text": f"record {i} " + "é" * i} for i in range(5)]


def _jsonl_bytes(records, bad_line=None):
  lines = [json.dumps(r, ensure_ascii=False) for r in records]
  if bad_line is not None:
    lines.insert(bad_line - 1, '{"text": "unterminated')
  return ("\n".join(lines) + "\n").encode()


def test_gzip_jsonl_reads_like_plain_and_locates_errors(tmp_path):
  path = tmp_path / "data.jsonl.gz"
  path.write_bytes(gzip.compress(_jsonl_bytes(RECORDS, bad_line=3)))
  source = sources.JsonlSource(str(path))
  assert len(source) == 6
  assert [source[i]["text"] for i in (0, 1, 3)] == [
      RECORDS[0]["text"], RECORDS[1]["text"], RECORDS[2]["text"]]
  with pytest.raises(ValueError, match=r"data\.jsonl\.gz:3: malformed JSON"):
    source[2]  # pylint: disable=pointless-statement
  # Found by its magic bytes whatever the name; a second read reuses the copy.
  renamed = tmp_path / "data.jsonl"
  renamed.write_bytes(gzip.compress(_jsonl_bytes(RECORDS)))
  assert sources.JsonlSource(str(renamed))[4] == RECORDS[4]
  assert sources.JsonlSource(str(renamed))[4] == RECORDS[4]


def test_corrupt_gzip_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "broken.jsonl.gz"
  path.write_bytes(gzip.compress(_jsonl_bytes(RECORDS))[:-12])
  with pytest.raises(ValueError, match=r"broken\.jsonl\.gz: not a readable "
                     "gzip file"):
    sources.JsonlSource(str(path))


def test_zstd_jsonl(tmp_path):
  path = tmp_path / "data.jsonl.zst"
  if importlib.util.find_spec("zstandard") is None:
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)
    with pytest.raises(ValueError, match="pip install zstandard"):
      sources.JsonlSource(str(path))
    return
  import zstandard  # pylint: disable=g-import-not-at-top
  path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(RECORDS)))
  source = sources.JsonlSource(str(path))
  assert [source[i] for i in range(len(source))] == RECORDS


def test_eval_fraction_holds_out_part_of_the_training_files(tmp_path):
  path = tmp_path / "all.jsonl.gz"
  texts = [f"doc {i}" for i in range(200)]
  path.write_bytes(gzip.compress(
      "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
  c = defaults.base_config().data
  c.update(source="jsonl", paths=(str(path),), eval_paths=())
  with pytest.raises(ValueError, match="eval_fraction"):
    sources.build_source(c, "eval")
  with c.unlocked():
    c.eval_fraction = 0.1
  train, heldout = (sources.build_source(c, s) for s in ("train", "eval"))
  seen = [train[i]["text"] for i in range(len(train))]
  held = [heldout[i]["text"] for i in range(len(heldout))]
  assert sorted(seen + held) == sorted(texts) and not set(seen) & set(held)
  assert 5 <= len(held) <= 40
  assert held == [t for i, t in enumerate(texts)
                  if sources.is_heldout(i, 0.1)]
  assert heldout.where(0) == f"{path}:{texts.index(held[0]) + 1}"
  # Preference records split the same way (TRL implicit-prompt lines here).
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps(
      {"chosen": f"Q{i}: yes", "rejected": f"Q{i}: no"}) + "\n"
                           for i in range(50)))
  c.update(paths=(str(pairs),), task="preference")
  c.preference.update(format="pairs")
  train = preference.record_source(c, "train")
  heldout = preference.record_source(c, "eval")
  assert len(train) + len(heldout) == 50 and len(heldout) > 0


def _trl_extract_prompt(example):
  """TRL's ``extract_prompt`` (trl/data_utils.py), verbatim logic."""
  for idx in range(min(len(example["chosen"]), len(example["rejected"]))):
    if example["chosen"][idx] != example["rejected"][idx]:
      if example["chosen"][idx - 1] == " ":
        idx -= 1
      break
  return {"prompt": example["chosen"][:idx],
          "chosen": example["chosen"][idx:],
          "rejected": example["rejected"][idx:]}


USER = {"role": "user", "content": "What color is the sky?"}
IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five"},
    {"chosen": "abc", "rejected": "abcd"},  # one is a prefix of the other
    {"chosen": [USER, {"role": "assistant", "content": "It is blue."}],
     "rejected": [USER, {"role": "assistant", "content": "It is green."}]},
]


@pytest.mark.parametrize("record", IMPLICIT)
def test_implicit_prompt_splits_as_trl(record):
  ours = preference.maybe_extract_prompt(record)
  theirs = _trl_extract_prompt(record)
  assert {k: ours[k] for k in theirs} == theirs
  example = preference.parse_pair(record)
  if isinstance(record["chosen"], str):
    assert example["prompt"] == theirs["prompt"]
    assert example["responses"] == [theirs["chosen"], theirs["rejected"]]
  else:  # rendered with the built-in template, completions after the prompt
    assert example["prompt"] == chat.BuiltinChat().prompt([USER])
    assert example["responses"] == ["It is blue.\n", "It is green.\n"]


def test_explicit_prompts_are_kept_and_string_prompt_over_messages_split():
  record = {"prompt": "The sky is", "chosen": " blue.", "rejected": " red."}
  assert preference.maybe_extract_prompt(record) is record
  # TRL's case: a string prompt column next to conversational responses.
  record = {"prompt": "What color is the sky?", "chosen": IMPLICIT[3]["chosen"],
            "rejected": IMPLICIT[3]["rejected"]}
  assert preference.maybe_extract_prompt(record)["prompt"] == [USER]


def test_implicit_prompt_jsonl_trains_the_pipeline_records(tmp_path):
  path = tmp_path / "implicit.jsonl.gz"
  path.write_bytes(gzip.compress(
      "".join(json.dumps(r) + "\n" for r in IMPLICIT).encode()))
  c = defaults.base_config().data
  c.update(source="jsonl", paths=(str(path),), eval_paths=(str(path),),
           task="preference")
  c.preference.update(format="pairs")
  records = preference.record_source(c, "train")
  assert len(records) == len(IMPLICIT)
  assert records[0]["prompt"] == "The sky is"
  assert records[0]["responses"] == [" blue.", " green."]


# transformers' own features: generation blocks, strftime_now, tojson options.
FEATURES = (
    "{{ bos_token }}Today: {{ strftime_now('%Y-%m-%d') }}\n"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if tools is defined and tools %}{{ tools | tojson(indent=1, "
    "sort_keys=True) }}{% endif %}"
    "{{ {'z': 1, 'a': 'é'} | tojson(separators=(',', ':'), sort_keys=True) }}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"}]


def test_generation_blocks_and_strftime_now_match_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2},
                                       unk_token="[UNK]"))
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
      unk_token="[UNK]")
  tok.chat_template = FEATURES
  tok.save_pretrained(tmp_path / "hf")
  ours = chat.TemplateChat.from_path(str(tmp_path / "hf"))
  for gen in (True, False):
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False,
                                     add_generation_prompt=gen)
    assert ours.render(MESSAGES, add_generation_prompt=gen) == theirs
  assert "{% generation %}" not in theirs and "<|assistant|>hi<|end|>" in theirs
  # A conversation ending in a generation block renders alike too.
  full = tok.apply_chat_template(MESSAGES[:3], tokenize=False)
  assert ours.render(MESSAGES[:3], add_generation_prompt=False) == full
