"""The embedded multi-attribute task and the ratings data path."""

import json

import numpy as np
import pytest

from alignax import defaults
from alignax.data import attribute_task as at
from alignax.data import preference
from alignax.data import ratings
from alignax.data import records as records_lib


def test_attributes_by_hand():
  assert at.words("getOptionalRelease") == ["get", "optional", "release"]
  assert at.words("_get_tag") == ["get", "tag"]
  assert at.correctness("get_tag", "getTag") == 1.0  # words, not spelling
  assert at.correctness("get_tag", "get") == pytest.approx(2 / 3)
  assert at.correctness("get_tag", "set_value") == 0.0
  assert at.brevity("get_tag", "get_tag_value_helper") == 0.5
  assert at.brevity("get_tag", "get") == 1.0
  assert [at.style(n) for n in ("get_tag", "_get_tag", "__init__", "getTag",
                                "Get", "get__tag")] == [1, 1, 1, 0, 0, 0]
  assert at.length("get_tag") == 7 / 32
  attrs = at.attributes("get_tag", "get_tag")
  assert at.utility(attrs) == pytest.approx(1.0)
  assert at.utility(at.attributes("get_tag", "getTag")) == pytest.approx(0.8)


# A large held-out fraction keeps the "train" split small (fast to parse).
SMALL = 0.97


def test_records_are_deterministic_and_well_formed():
  a = at.AttributeNames("train", "ratings", heldout_fraction=SMALL)
  b = at.AttributeNames("train", "ratings", heldout_fraction=SMALL)
  idx = [0, 7, 123, len(a) - 1]
  assert [a[i] for i in idx] == [b[i] for i in idx]
  assert [a[i] for i in idx] != [a[i + 1 if i + 1 < len(a) else 0]
                                 for i in idx]
  missing = 0
  for i in range(200):
    r = a[i]
    assert set(r) == {"prompt", "response", "attributes"}
    assert r["prompt"].startswith("# ") and r["prompt"].endswith("\ndef ")
    assert r["response"].endswith("(") and r["attributes"]
    assert set(r["attributes"]) <= set(at.ATTRIBUTES)
    missing += len(at.ATTRIBUTES) - len(r["attributes"])
  assert 0.1 < missing / 800 < 0.3  # missing=0.2 (at least one kept)
  with pytest.raises(IndexError):
    a[len(a)]


def test_pairs_prefer_utility_with_a_length_bias_only_in_train():
  train = at.AttributeNames("train", "pairs", heldout_fraction=SMALL)
  held = at.AttributeNames("eval", "pairs")
  assert at.AttributeNames("eval", "pairs")[3] == held[3]
  share = {}
  for name, ds, n in (("train", train, 400), ("heldout", held, len(held))):
    longer = 0
    for i in range(n):
      r = ds[i]
      assert r["chosen_utility"] > r["rejected_utility"]
      for side in ("chosen", "rejected"):
        attrs = {a: r[f"{side}_{a}"] for a in at.ATTRIBUTES}
        assert at.utility(attrs) == pytest.approx(r[f"{side}_utility"])
      longer += len(r["chosen"]) > len(r["rejected"])
    share[name] = longer / n
  assert 0.75 < share["train"] < 0.92, share
  assert 0.4 < share["heldout"] < 0.6, share
  # The held-out prompts are those of the held-out functions (whose
  # documents the train split never holds, see preference_task).
  summaries = {s for _, s in at.preference_task.documented_functions(
      "heldout")}
  assert {held[i]["prompt"][2:-5] for i in range(len(held))} <= summaries


def test_parse_rating_masks_missing_and_rejects_bad_records():
  ex = ratings.parse_rating({"prompt": "p", "response": "r", "attributes": {
      "a": 1, "b": None, "zzz": 5}}, ("a", "b", "c"))
  assert ex["responses"] == ["r"] and ex["labels"] == [1.0]
  np.testing.assert_array_equal(np.isnan(ex["rewards"][0]),
                                [False, True, True])
  assert ex["rewards"][0][0] == 1.0
  bad = [({"prompt": "p", "response": "r", "attributes": {"zzz": 1}},
          "missing_field"),
         ({"prompt": "p", "response": "r", "attributes": {"a": "x"}},
          "wrong_type"),
         ({"prompt": "p", "response": "r", "attributes": {"a": float("inf")}},
          "non_finite"),
         ({"prompt": "p", "response": "r", "attributes": [1]}, "wrong_type"),
         ({"prompt": "p", "attributes": {"a": 1}}, "missing_field")]
  for record, reason in bad:
    with pytest.raises(records_lib.MalformedRecord) as e:
      ratings.parse_rating(record, ("a", "b"))
    assert e.value.reason == reason, (record, e.value)
  source = ratings.RatingSource([r for r, _ in bad] + [
      {"prompt": "p", "response": "r", "attributes": {"b": 2}}], ("a", "b"),
                                skip_malformed=True)
  assert len(source) == 1 and source.skipped == {"missing_field": 2,
                                                 "wrong_type": 2,
                                                 "non_finite": 1}


class _Tokenizer:
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [3 + ord(ch) % 60 for ch in text]


def test_rating_batches_carry_ratings_per_slot(tmp_path):
  path = tmp_path / "ratings.jsonl"
  rows = [{"prompt": f"prompt {i}", "response": "x" * (i + 1),
           "attributes": {"a": float(i), **({"b": -i} if i % 2 else {})}}
          for i in range(5)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  c = defaults.base_config()
  c.data.update(task="ratings", source="jsonl", eval_paths=(str(path),))
  c.data.preference.update(attributes=("a", "b"), groups_per_row=3)
  (batch,) = ratings.build_ratings_eval_batches(c.data, _Tokenizer(),
                                                seq_len=64, batch_size=4,
                                                num_batches=1)
  assert batch["rewards"].shape == (4, 3, 2)
  valid = batch["valid"]
  assert valid.sum() == 5
  got = {int(batch["index"][b, s]): batch["rewards"][b, s]
         for b, s in zip(*np.nonzero(valid))}
  for i in range(5):
    assert got[i][0] == i
    assert (np.isnan(got[i][1]) if i % 2 == 0 else got[i][1] == -i)
  # One response per group: its tokens are its slot's.
  for b, s in zip(*np.nonzero(valid)):
    n = int(np.sum((batch["slot"][b] == s) & (batch["weights"][b] > 0)))
    assert n == len(rows[int(batch["index"][b, s])]["response"]) + 1  # EOS


def test_embedded_attribute_pairs_through_the_preference_pipeline():
  c = defaults.base_config()
  c.data.update(task="preference", source="embedded")
  c.data.preference.update(embedded_task="attributes",
                           reward_fields=("length",))
  records = preference.record_source(c.data, "eval")
  ex = records[0]
  raw = at.AttributeNames("eval", "pairs")[0]
  assert ex["responses"] == [raw["chosen"], raw["rejected"]]
  assert ex["rewards"] == [[raw["chosen_length"]], [raw["rejected_length"]]]
  c.data.preference.format = "lists"
  with pytest.raises(ValueError, match="makes pairs"):
    preference.record_source(c.data, "eval")
