"""DPA ranked by an ArmoRM run's attribute heads (``dpa.reward_model``).

A tiny stage-1 ArmoRM (``multi_reward`` on the embedded ratings, 1 step)
with the DPA config's model and tokenizer; :class:`dpa.MultiRewardScorer`'s
rewards against the model scored one unpadded row at a time, the verbosity
decorrelation of a copy of the run with set lambdas, and one DPA round
ranked by the heads.
"""

import copy
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from alignax import dpa
from alignax import train
from alignax.data import tokenizer as tok_lib
from alignax.interop import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRIBUTES = ("correctness", "brevity", "style", "length")
# Stage 1 leaves verbosity_lambda at 0; the copy of the run carries these.
LAMBDAS = (0.5, -0.25, 0.75, 0.4)
PAIRS = (  # (prompt, response)
    ("# Return the tag of the element.\ndef ", "get_tag("),
    ("# Return the tag of the element.\ndef ", "get_tag_value_helper("),
    ("# Parse the header line.\ndef ", "parse_header("),
    ("# Parse the header line.\ndef ", "("),
    ("def ", "x("),
)


def _config(tok_dir):
  """tests/test_dpa.py's tiny DPA config, on two of the ArmoRM's heads."""
  spec = importlib.util.spec_from_file_location(
      "multi_objective_demo",
      os.path.join(ROOT, "configs", "multi_objective_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("dpa")
  c.checkpoint.update(init_from="", save_every=2, keep=2, async_save=False)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=2, batch_size=8, seq_len=64, log_every=2, eval_every=0,
                 progress_bar=False)
  c.data.preference.update(max_prompt_len=32, groups_per_row=2)
  c.optimizer.update(warmup_steps=1, schedule_steps=2)
  c.onpolicy.update(rounds=1, prompts_per_round=6, eval_prompts=4,
                    max_new_tokens=4, sample_batch=32)
  c.dpa.eval_angles = (0.0, 90.0)
  c.dpa.objectives = ("correctness", "length")  # heads the ArmoRM run has
  return c


@pytest.fixture(scope="module")
def armo(tmp_path_factory):
  """``(DPA config, stage-1 run, decorrelated copy, trainer)``."""
  root = tmp_path_factory.mktemp("dpa_rm")
  config = _config(str(root / "tok"))
  c = train.defaults.base_config()
  c.model.update(config.model.to_dict())  # the scorer builds config.model
  c.tokenizer.update(config.tokenizer.to_dict())  # one cache directory
  c.train.update(steps=1, batch_size=8, seq_len=64, log_every=1,
                 eval_every=0, progress_bar=False)
  c.optimizer.update(warmup_steps=0, schedule_steps=1, lr=1e-2)
  c.checkpoint.update(save_every=1, keep=1, async_save=False)
  c.objective, c.data.task = "multi_reward", "ratings"
  c.data.preference.update(max_prompt_len=32, groups_per_row=2,
                           attributes=ATTRIBUTES, embedded_task="attributes")
  # A gate width other than the DPA config's: the scorer takes the run's.
  c.reward.update(gate_hidden=8, verbosity_attribute="length")
  run_dir = str(root / "armo")
  trainer, last = train.run(c, run_dir)
  assert np.isfinite(last["train/loss"])
  # The run as stage 2 would start it: verbosity_lambda set, same config.
  params = dict(trainer.state.params)
  old = params["verbosity_lambda"]
  params["verbosity_lambda"] = jax.device_put(
      np.asarray(LAMBDAS, old.dtype), old.sharding)
  decorrelated = str(root / "decorrelated")
  hf.save_checkpoint(decorrelated, trainer.model_cfg, params)
  shutil.copy(os.path.join(run_dir, train.CONFIG_FILE), decorrelated)
  return config, run_dir, decorrelated, trainer


def _tokenizer(config):
  return tok_lib.build_tokenizer(config.tokenizer, "/nonexistent")


def _reference(trainer, tokenizer, pairs, lambdas=None, keep=None):
  """``[N, K]`` adjusted rewards, one unpadded row at a time; ``keep``: the
  prompt keeps ``[BOS]`` and its last ``keep - 1`` ids, as in training."""
  params = jax.device_get(trainer.state.params)
  if lambdas is not None:
    params = dict(params, verbosity_lambda=np.asarray(lambdas, np.float32))
  score = jax.jit(lambda p, t, s, m: nnx.merge(trainer.graphdef, p).score(
      t, s, m)[1])
  out = []
  for prompt, response in pairs:
    head = [tokenizer.bos_id] + tokenizer.encode(prompt)
    if keep is not None:
      head = head[:1] + head[-(keep - 1):]
    row = np.asarray([head + tokenizer.encode(response)], np.int32)
    mask = np.zeros(row.shape, bool)
    mask[0, :len(head)] = True
    out.append(np.asarray(score(params, row, np.ones_like(row), mask))[0])
  return np.stack(out)


def test_scorer_reads_the_requested_heads_after_decorrelation(armo):
  config, run_dir, decorrelated, trainer = armo
  tok = _tokenizer(config)
  for prompt, response in PAIRS:  # nothing is truncated
    assert 1 + len(tok.encode(prompt)) <= config.data.preference.max_prompt_len
    assert len(tok.encode(response)) < config.data.preference.max_response_len
  prompts, responses = zip(*PAIRS)
  objectives = ("length", "correctness")
  raw = _reference(trainer, tok, PAIRS)
  assert np.all(np.abs(raw[:, [3, 0]]) > 1e-4)  # heads moved off zero
  assert np.ptp(raw[:, 3]) > 1e-4  # rows differ
  got = dpa.MultiRewardScorer(config, run_dir, tok, objectives)
  rewards = got.attribute_rewards(prompts, responses)
  assert rewards.shape == (len(PAIRS), 2)
  np.testing.assert_allclose(rewards, raw[:, [3, 0]], rtol=1e-5, atol=1e-7)

  # The decorrelated copy: r_k - lambda_k r_length, the verbosity head read
  # from the run's config.
  adjusted = _reference(trainer, tok, PAIRS, LAMBDAS)
  np.testing.assert_allclose(
      adjusted, raw - np.outer(raw[:, 3], LAMBDAS), rtol=1e-5, atol=1e-7)
  scorer = dpa.MultiRewardScorer(config, decorrelated, tok, objectives)
  rewards = scorer.attribute_rewards(prompts, responses)
  np.testing.assert_allclose(rewards, adjusted[:, [3, 0]], rtol=1e-5,
                             atol=1e-7)
  assert np.all(np.abs(rewards - raw[:, [3, 0]]) > 1e-6)

  # rescore: v.r with v read from the prompt by name (written in the DPA
  # order, correctness first), rounded to the template's 2 decimals. The
  # prompts are longer than max_prompt_len: the reward model reads their end.
  keep = config.data.preference.max_prompt_len
  angles = (10.0, 60.0)
  records, want = [], []
  for angle, (prompt, _) in zip(angles, PAIRS[1:4:2]):
    text = dpa.conditioned(prompt, dpa.direction(angle),
                           ("correctness", "length"))
    assert 1 + len(tok.encode(text)) > keep
    rows = [(text, r) for _, r in PAIRS]
    records.append({"prompt": text, "responses": [r for _, r in PAIRS]})
    a = np.deg2rad(angle)
    v = np.round([np.sin(a), np.cos(a)], 2)  # (length, correctness)
    want.append(_reference(trainer, tok, rows, LAMBDAS, keep)[:, [3, 0]] @ v)
  out = scorer.rescore(records, batch_size=8)
  for rec, got_rec, w in zip(records, out, want):
    assert got_rec["prompt"] == rec["prompt"]
    assert got_rec["responses"] == rec["responses"]
    np.testing.assert_allclose(got_rec["scores"], w, rtol=1e-5, atol=1e-7)
  assert "scores" not in records[0]  # a new dict per record

  # A fixed direction for prompts without the template.
  scorer.fix_direction([0.3, 0.7])
  out = scorer.rescore([{"prompt": p, "responses": [r]} for p, r in PAIRS])
  np.testing.assert_allclose([o["scores"][0] for o in out],
                             adjusted[:, [3, 0]] @ [0.3, 0.7], rtol=1e-5,
                             atol=1e-7)

  with pytest.raises(ValueError, match="helpfulness"):
    dpa.MultiRewardScorer(config, run_dir, tok, ("length", "helpfulness"))


def test_a_dpa_round_is_ranked_by_the_reward_model(armo, tmp_path):
  config, run_dir, _, _ = armo
  config = copy.deepcopy(config)
  config.dpa.reward_model = run_dir
  config.dpa.normalize = False  # raw v . r: checkable pair by pair
  workdir = str(tmp_path / "dpa")
  points = dpa.run(config, workdir)
  objectives = tuple(config.dpa.objectives)
  task = dpa.DirectionalTask(dpa.AttributeNames(objectives),
                             tuple(config.dpa.angles),
                             grid=tuple(config.dpa.train_angles))
  prompts = {p.text for p in task.prompts("train", 6, seed=config.seed)}
  with open(os.path.join(workdir, "round_0", "samples.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  assert pairs and all(p["prompt"] in prompts for p in pairs)
  scorer = dpa.MultiRewardScorer(config, run_dir, _tokenizer(config),
                                 objectives)
  out = scorer.rescore([{"prompt": p["prompt"],
                         "responses": [p["chosen"], p["rejected"]]}
                        for p in pairs])
  for rec in out:  # RSF's chosen is the best under the heads' v . r
    chosen, rejected = rec["scores"]
    assert chosen > rejected  # (margins ~0.1; ties were dropped)
  assert [p["angle"] for p in points] == list(config.dpa.eval_angles)
  for p in points:
    assert set(p["rewards"]) == set(objectives)
    assert all(np.isfinite(x) for x in p["rewards"].values())
  with open(os.path.join(workdir, dpa.DIRECTIONS_FILE)) as f:
    assert [json.loads(line) for line in f] == points
