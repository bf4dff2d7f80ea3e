"""``data.source='hf'``: Hugging Face ``datasets`` objects and directories.

A ``save_to_disk`` directory, a folder in the Hub's layout (Parquet files
under ``data/`` named by split) and an in-memory ``Dataset`` all read as the
same records, split as configured, with bad rows located or counted.
"""

import os

import ml_collections
import numpy as np
import pytest

from alignax import defaults
from alignax.data import preference
from alignax.data import sources

datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN = [f"train record {i}: " + "é" * i for i in range(12)]
TEST = [f"test record {i}" for i in range(3)]


def _dict():
  return datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"text": TRAIN}),
      "test": datasets.Dataset.from_dict({"text": TEST})})


def _data_cfg(path, **kw):
  c = defaults.base_config().data
  c.source, c.hf_path = "hf", path
  c.update(kw)
  return c


def _texts(source):
  return [source[i]["text"] for i in range(len(source))]


@pytest.mark.parametrize("layout", ["save_to_disk", "hub_parquet", "memory"])
def test_splits_read_the_records_in_order(tmp_path, layout):
  if layout == "save_to_disk":
    path = str(tmp_path / "saved")
    _dict().save_to_disk(path)
  elif layout == "hub_parquet":
    path = str(tmp_path / "hub")
    os.makedirs(os.path.join(path, "data"))
    for split, ds in _dict().items():
      ds.to_parquet(os.path.join(path, "data",
                                 f"{split}-00000-of-00001.parquet"))
  else:
    path = sources.register_hf_dataset("splits", _dict())
    assert path == "memory:splits"
  train = sources.build_source(_data_cfg(path), "train")
  held = sources.build_source(_data_cfg(path), "eval")
  assert _texts(train) == TRAIN and _texts(held) == TEST
  assert train.where(3).endswith("[train]:row 3")


def test_eval_fraction_carves_the_eval_split_from_one_dataset():
  path = sources.register_hf_dataset(
      "one", datasets.Dataset.from_dict({"text": TRAIN}))
  with pytest.raises(ValueError, match="set data.eval_fraction"):
    sources.build_source(_data_cfg(path), "eval")
  cfg = _data_cfg(path, eval_fraction=0.25)
  train, held = (sources.build_source(cfg, s) for s in ("train", "eval"))
  # The same split as every file source: record i is held out iff
  # is_heldout(i); together the sides are the whole dataset, once.
  want = [sources.is_heldout(i, 0.25) for i in range(len(TRAIN))]
  assert _texts(held) == [t for t, h in zip(TRAIN, want) if h]
  assert _texts(train) == [t for t, h in zip(TRAIN, want) if not h]
  assert 0 < len(held) < len(TRAIN)


def test_bad_rows_are_located_or_counted():
  # A binary column: bytes are decoded, invalid UTF-8 is a bad record.
  bad = datasets.Dataset.from_dict(
      {"text": [b"fine", None, b"also fine", b"bad \xff byte"]})
  path = sources.register_hf_dataset("bad", bad)
  source = sources.build_source(_data_cfg(path), "train")
  assert source[0] == {"text": "fine"}
  with pytest.raises(ValueError, match=r"hf memory:bad\[train\]:row 3: "):
    source[3]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match=r"hf memory:bad\[train\]:row 1: "):
    source[1]  # pylint: disable=pointless-statement
  skipping = sources.build_source(_data_cfg(path, skip_malformed=True),
                                  "train")
  assert _texts(skipping) == ["fine", "also fine"]
  assert skipping.num_skipped == 2


def test_errors_of_the_whole_dataset_are_one_line(tmp_path):
  with pytest.raises(ValueError, match="needs data.hf_path"):
    sources.build_source(_data_cfg(""), "train")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    sources.build_source(_data_cfg(str(tmp_path / "absent")), "train")
  with pytest.raises(ValueError, match="no dataset registered under 'nope'"):
    sources.build_source(_data_cfg("memory:nope"), "train")
  path = sources.register_hf_dataset("cols", _dict())
  with pytest.raises(ValueError, match="missing text field 'body'"):
    sources.build_source(_data_cfg(path, text_field="body"), "train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    sources.build_source(_data_cfg(path, hf_eval_split="validation"), "eval")


def test_trl_preference_dataset_feeds_the_preference_source(tmp_path):
  """TRL's conversational preference rows, as the Hub stores them."""
  rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
           "chosen": [{"role": "assistant", "content": f"good {i}"}],
           "rejected": [{"role": "assistant", "content": f"bad {i}"}]}
          for i in range(4)]
  path = str(tmp_path / "prefs")
  datasets.Dataset.from_list(rows).save_to_disk(path)
  config = defaults.base_config()
  config.data.source, config.data.hf_path = "hf", path
  config.data.preference.format = "pairs"
  raw = preference.raw_source(config.data, "train")
  assert [raw[i] for i in range(4)] == rows
  parsed = preference.record_source(config.data, "train")
  assert len(parsed) == 4
  first = parsed[0]
  assert "question 0" in str(first) and "good 0" in str(first)
