"""Process-count-independent batches (``data.num_shards``) and resharding."""

import json

import ml_collections
import numpy as np
import pytest

from alignax import defaults
from alignax.data import pairs
from alignax.data import pipeline
from alignax.data import preference
from alignax.data import shards
from alignax.data import tokenizer as tokenizer_lib
from alignax.data import ul2_pipeline

BUILD = {"lm": pipeline.build_lm_dataset, "ul2": ul2_pipeline.build_ul2_dataset,
         "pairs": pairs.build_pairs_dataset, "cafe": pairs.build_cafe_dataset,
         "preference": preference.build_preference_dataset}
BATCH = 4  # global rows per step
SEQ_LEN = 32


class _IntBackend:
  """Text ``"1000 1001"`` is ``[1000, 1001]`` (other words 4); BOS 2, EOS 3."""

  size, bos_id, eos_id = 100_000, 2, 3

  def encode(self, text):
    return [int(w) if w.isdigit() else 4 for w in text.split()]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return " ".join(map(str, ids))


def _ints(i, n):
  return " ".join(str(1000 * (i + 1) + j) for j in range(n))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(_IntBackend(), num_sentinels=16)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("shards")
  files = {
      "text": [{"text": _ints(i, 5 + (37 * i) % 60)} for i in range(30)],
      "pairs": [{"query": _ints(i, 3 + i % 5), "positive": _ints(100 + i, 4)}
                for i in range(40)],
      "preference": [{"prompt": _ints(i, 2 + i % 4),
                      "chosen": _ints(200 + i, 3), "rejected": _ints(300 + i,
                                                                    1 + i % 3)}
                     for i in range(40)],
  }
  paths = {}
  for name, rows in files.items():
    paths[name] = str(tmp / f"{name}.jsonl")
    with open(paths[name], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  base = ml_collections.ConfigDict(defaults.base_config().data.to_dict())
  base.update(source="jsonl", num_threads=1, prefetch_buffer_size=2)
  base.num_shards = 2
  out = {}
  for task, name in (("lm", "text"), ("ul2", "text"), ("pairs", "pairs"),
                     ("cafe", "pairs"), ("preference", "preference")):
    c = ml_collections.ConfigDict(base.to_dict())
    c.update(task=task, paths=(paths[name],), eval_paths=(paths[name],))
    if task == "cafe":
      c.update(lm_source="jsonl", lm_paths=(paths["text"],))
    out[task] = c
  return out


def _iterators(task, cfg, tok, process_count):
  return [iter(BUILD[task](cfg, tok, split="train", seed=3, seq_len=SEQ_LEN,
                           batch_size=BATCH // process_count,
                           process_index=p, process_count=process_count))
          for p in range(process_count)]


def _assert_same(want, got):
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def _global(iterators):
  return shards.stack_rows([next(it) for it in iterators])


@pytest.mark.parametrize("task", sorted(BUILD))
def test_two_processes_hold_the_one_process_batch(task, configs, tok):
  cfg = configs[task]
  [one] = _iterators(task, cfg, tok, 1)
  two = _iterators(task, cfg, tok, 2)
  for _ in range(5):
    _assert_same(next(one), _global(two))
  # 2 -> 1: the merged states of both processes resume one process.
  [resumed] = _iterators(task, cfg, tok, 1)
  resumed.set_state(shards.merge_states([it.get_state() for it in two]))
  _assert_same(next(one), next(resumed))
  # 1 -> 2: one process's state holds every shard.
  halves = _iterators(task, cfg, tok, 2)
  for it in halves:
    it.set_state(one.get_state())
  _assert_same(next(one), _global(halves))


def test_without_num_shards_the_batch_depends_on_the_process_count(configs,
                                                                   tok):
  cfg = ml_collections.ConfigDict(configs["lm"].to_dict())
  cfg.num_shards = 0
  [one] = _iterators("lm", cfg, tok, 1)
  two = _iterators("lm", cfg, tok, 2)
  assert not np.array_equal(next(one)["inputs"], _global(two)["inputs"])
  # The default state is grain's own (no shard keys): old checkpoints load.
  assert "shards" not in one.get_state()


def test_num_shards_errors_name_the_field(configs, tok):
  cfg = ml_collections.ConfigDict(configs["lm"].to_dict())
  cfg.num_shards = 3
  with pytest.raises(ValueError, match="num_shards=3 is not a multiple of "
                     "the process count 2"):
    _iterators("lm", cfg, tok, 2)
  cfg.num_shards = 8
  with pytest.raises(ValueError, match="does not divide the global batch 4"):
    _iterators("lm", cfg, tok, 1)
  [it] = _iterators("lm", configs["lm"], tok, 1)
  state = it.get_state()
  with pytest.raises(ValueError, match="keep num_shards fixed"):
    it.set_state(dict(state, num_shards=4))
  with pytest.raises(ValueError, match=r"lacks shards \[1\]"):
    it.set_state(dict(state, shards={"0": state["shards"]["0"]}))
