"""Reward model: Bradley–Terry loss, packed slot rewards, training, scoring."""

import dataclasses
import functools
import importlib.util
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from alignax import losses
from alignax import onpolicy
from alignax import state as state_lib
from alignax import train
from alignax.data import preference_packing as packing
from alignax.models import ModelConfig
from alignax.models import heads
from alignax.objectives import reward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
T = 64
GRAPHDEF = state_lib.abstract_model(CFG, heads.RewardModel)[0]


def _bt_numpy(c, r, margin=0.0, center=0.0):
  z = np.asarray(c, np.float64) - np.asarray(r, np.float64) - margin
  return np.log1p(np.exp(-z)) + center * (np.asarray(c) + np.asarray(r)) ** 2


def test_bradley_terry_numpy_and_hand_values():
  c, r = jnp.array([1.0, -2.0, 0.3]), jnp.array([-0.5, 1.0, 0.3])
  np.testing.assert_allclose(losses.bradley_terry_loss(c, r), _bt_numpy(c, r),
                             rtol=1e-6)
  # -log sigmoid(1.5) = log(1 + e^-1.5); with margin 0.5: log(1 + e^-1);
  # TRL's centring adds 0.01 * (1 - 0.5)^2 = 0.0025.
  np.testing.assert_allclose(
      losses.bradley_terry_loss(c[:1], r[:1]), [0.2014132779827524], rtol=1e-6)
  np.testing.assert_allclose(
      losses.bradley_terry_loss(c[:1], r[:1], margin=0.5),
      [0.31326168751822286], rtol=1e-6)
  np.testing.assert_allclose(
      losses.bradley_terry_loss(c[:1], r[:1], center_coef=0.01),
      [0.2039132779827524], rtol=1e-6)
  # Equal rewards: log 2, whatever their value.
  np.testing.assert_allclose(losses.bradley_terry_loss(c[2:], r[2:]),
                             [np.log(2.0)], rtol=1e-6)
  with pytest.raises(ValueError, match="rejected_rewards"):
    losses.bradley_terry_loss(c, r[:2])


def test_bradley_terry_gradients_and_jit():
  c, r = jnp.array([1.0, -2.0, 0.3]), jnp.array([-0.5, 1.0, 0.1])
  fn = lambda a, b: losses.bradley_terry_loss(a, b, margin=0.2,
                                              center_coef=0.1)
  check_grads(fn, (c, r), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  # d/dc of -log sigmoid(c - r) is -sigmoid(r - c).
  grad = jax.grad(lambda a: losses.bradley_terry_loss(a, r).sum())(c)
  np.testing.assert_allclose(grad, -1 / (1 + np.exp(np.asarray(c - r))),
                             rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fn)(c, r), fn(c, r), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _params(seed):
  p = state_lib.init_params(CFG, seed, heads.RewardModel)
  key = jax.random.key(seed + 100)
  p["reward_head"] = jax.random.normal(key, p["reward_head"].shape)
  p["reward_bias"] = jnp.float32(0.3)
  return p


def _pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    m = 2 if i % 3 else 1  # some pairs lack the rejected response
    out.append({
        "index": i, "prompt": list(rng.integers(1, 64, rng.integers(1, 10))),
        "responses": [list(rng.integers(1, 64, rng.integers(1, 7)))
                      for _ in range(m)],
        "labels": np.array([1, 0], np.float32), "valid": np.arange(2) < m,
        "rewards": np.zeros((2, 0), np.float32),
        "ref_logps": np.zeros(2, np.float32)})
  return out


def _packed(exs, shared):
  layout = packing.Layout(2, 3, 0, shared)
  ds = grain.MapDataset.source(exs).to_iter_dataset()
  (batch,) = packing.pack_and_batch(ds, layout, seq_len=T, batch_size=8,
                                    shuffle_bins=False, drop_remainder=False)
  return batch


@jax.jit
def _score(p, tokens, segment_ids):
  return nnx.merge(GRAPHDEF, p).score(tokens, segment_ids)


def _alone(exs, seed):
  """Reference: each response scored alone, as the row prompt + response
  without its last token (the position whose target is that token)."""
  out = np.zeros((len(exs), 2))
  for i, ex in enumerate(exs):
    for j, resp in enumerate(ex["responses"]):
      seq = ex["prompt"] + resp[:-1]
      tokens = np.zeros((1, T), np.int32)
      tokens[0, :len(seq)] = seq
      out[i, j] = float(_score(_params(seed), tokens,
                               (tokens > 0).astype(np.int32))[0])
  return out


@pytest.mark.parametrize("shared", [True, False])
def test_packed_slot_rewards_equal_each_response_alone(shared):
  exs = _pairs(9)
  batch = _packed(exs, shared)
  model = nnx.merge(GRAPHDEF, _params(0))
  got = np.asarray(jax.jit(reward.slot_rewards)(model, batch))  # [B, S]
  want = _alone(exs, 0)
  index, valid = np.asarray(batch["index"]), np.asarray(batch["valid"])
  seen = 0
  for b, s in zip(*np.nonzero(valid)):
    np.testing.assert_allclose(got[b, s], want[index[b, s], s % 2],
                               rtol=1e-5, atol=1e-5)
    seen += 1
  assert seen == sum(len(ex["responses"]) for ex in exs)
  assert np.all(got[~valid] == 0)

  # The objective: BT over the complete pairs only, TRL's accuracy.
  loss_sum, (count, metrics) = reward.reward_objective(model, batch, None)
  full = [i for i, ex in enumerate(exs) if len(ex["responses"]) == 2]
  np.testing.assert_allclose(
      loss_sum, _bt_numpy(want[full, 0], want[full, 1]).sum(), rtol=1e-5)
  assert float(count) == len(full)
  acc = metrics["reward/accuracy"]
  np.testing.assert_allclose(acc[0] / acc[1],
                             np.mean(want[full, 0] > want[full, 1]))


def _recipe(tok_dir, workdir_lm=""):
  spec = importlib.util.spec_from_file_location(
      "dpo_demo", os.path.join(ROOT, "configs", "dpo_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.objective, c.reference = "reward_model", "none"
  c.checkpoint.update(init_from=workdir_lm, save_every=4, keep=1)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=4, batch_size=8, seq_len=64, log_every=2, eval_every=4,
                 eval_batches=1, progress_bar=False)
  c.data.preference.update(max_prompt_len=32, groups_per_row=2)
  c.optimizer.update(warmup_steps=1, schedule_steps=4)
  return c


def test_train_reward_model_then_score_samples(tmp_path):
  tok_dir, workdir = str(tmp_path / "tok"), str(tmp_path / "rm")
  config = _recipe(tok_dir)
  trainer, last = train.run(config, workdir)
  assert "reward_head" in trainer.state.params
  assert last["step"] == 4 and np.isfinite(last["train/loss"])
  assert 0.0 <= last["eval/reward/accuracy"] <= 1.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  # Zero-initialised head: every reward 0, the loss exactly log 2.
  np.testing.assert_allclose(first["eval/loss"], np.log(2.0), rtol=1e-6)

  # The scorer reads the trained checkpoint and scores as training reads.
  scorer = onpolicy.RewardModelScorer(config, workdir, trainer.tokenizer,
                                      trainer.mesh)
  records = [{"prompt": "# Return the tag.\ndef ",
              "responses": ["get_tag(", "x(", "get_tab("]},
             {"prompt": "# Close it.\ndef ", "responses": ["close("]}]
  out = scorer.rescore(records, batch_size=8)
  tok = trainer.tokenizer
  params = jax.device_get(trainer.state.params)
  graphdef = state_lib.abstract_model(trainer.model_cfg, heads.RewardModel)[0]
  for rec, new in zip(records, out):
    assert new["responses"] == rec["responses"]
    for text, score in zip(rec["responses"], new["scores"]):
      row = [tok.bos_id] + tok.encode(rec["prompt"]) + tok.encode(text)
      tokens = jnp.asarray([row], jnp.int32)
      want = nnx.merge(graphdef, params).score(tokens, jnp.ones_like(tokens))
      np.testing.assert_allclose(score, float(want[0]), rtol=1e-4, atol=1e-5)


def test_lora_reward_model_trains_adapters_and_head_and_scores_with_them(
    tmp_path):
  """A reward model with LoRA: at B = 0 it scores as its base; gradients
  reach only the adapters and the head (one device); the on-policy scorer
  reads the adapters from the checkpoint whatever the policy's config.lora."""
  from flax import traverse_util
  from alignax import step as step_lib
  from alignax.models import lora
  cfg = dataclasses.replace(CFG, lora_rank=2, lora_targets=("q", "down"))
  graphdef = state_lib.abstract_model(cfg, heads.RewardModel)[0]
  batch = _packed(_pairs(9), True)
  fresh = jax.jit(lambda: state_lib.init_params(cfg, 0, heads.RewardModel))()
  base_flat = {k: v for k, v in traverse_util.flatten_dict(fresh).items()
               if not lora.is_adapter_path(k)}
  slot = jax.jit(lambda g, p: reward.slot_rewards(nnx.merge(g, p), batch),
                 static_argnums=0)
  np.testing.assert_array_equal(
      slot(graphdef, fresh),
      slot(GRAPHDEF, traverse_util.unflatten_dict(base_flat)))

  params = _params(0) | {k: v for k, v in fresh.items()
                         if k not in ("reward_head", "reward_bias")}
  flat = traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(jax.random.key(3), len(flat)))
  params = traverse_util.unflatten_dict({
      k: 0.1 * jax.random.normal(next(keys), v.shape) if (
          lora.is_adapter_path(k) and k[-1] == "b") else v
      for k, v in flat.items()})
  grad_fn = jax.jit(step_lib.make_grad_fn(reward.reward_objective, graphdef))
  grads = traverse_util.flatten_dict(
      grad_fn(params, batch, jax.random.key(0), None, jnp.float32(1))[0])
  adapters = {k for k in flat if lora.is_adapter_path(k)}
  assert set(grads) == adapters | {("reward_head",), ("reward_bias",)}
  assert all(np.abs(grads[k]).max() > 0 for k in adapters)

  # A LoRA reward model's checkpoint, scored by a policy run without LoRA.
  tok_dir, workdir = str(tmp_path / "tok"), str(tmp_path / "rm")
  config = _recipe(tok_dir)
  config.lora.update(enabled=True, rank=2, targets=("q", "down"))
  trainer = train.Trainer(config, workdir)
  flat_state = traverse_util.flatten_dict(jax.device_get(trainer.state.params))
  keys = iter(jax.random.split(jax.random.key(4), len(flat_state)))
  adapted = traverse_util.unflatten_dict({
      k: 0.1 * jax.random.normal(next(keys), v.shape, v.dtype) if (
          lora.is_adapter_path(k) and k[-1] == "b") or k[0] == "reward_head"
      else v for k, v in flat_state.items()})
  state = trainer.state.replace(params=jax.device_put(
      adapted, trainer.shardings.params))
  trainer.checkpointer.save(0, state, force=True)
  trainer.checkpointer.wait()
  from alignax import checkpoint as ckpt_lib
  ckpt_lib.write_model_config(workdir, trainer.model_cfg)
  policy_config = _recipe(tok_dir)  # config.lora off: the policy's own
  scorer = onpolicy.RewardModelScorer(policy_config, workdir,
                                      trainer.tokenizer, trainer.mesh)
  records = [{"prompt": "# Return the tag.\ndef ",
              "responses": ["get_tag(", "x("]}]
  got = scorer.rescore(records, batch_size=8)[0]["scores"]
  tok = trainer.tokenizer
  merged_cfg = dataclasses.replace(trainer.model_cfg, lora_rank=0,
                                   lora_targets=())
  merged = lora.merge_into_base(adapted, lora.spec_of(trainer.model_cfg))
  merged_def = state_lib.abstract_model(merged_cfg, heads.RewardModel)[0]
  rows = [[tok.bos_id] + tok.encode(records[0]["prompt"]) + tok.encode(text)
          for text in records[0]["responses"]]
  tokens = np.zeros((2, max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  want = jax.jit(lambda p, t: nnx.merge(merged_def, p).score(
      t, (t > 0).astype(jnp.int32)))(merged, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got[0] != got[1]
