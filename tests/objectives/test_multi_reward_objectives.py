"""ArmoRM (multi_reward, reward_gate) and the causal reward model on packed
batches, one device: slot states, losses against NumPy, the gate's
mixture, what each stage trains, the decorrelation."""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util
from scipy import stats

from alignax import decorrelation
from alignax import losses
from alignax import state as state_lib
from alignax.data import preference_packing as packing
from alignax.models import ModelConfig
from alignax.models import heads
from alignax.models import multi_reward as mr
from alignax.objectives import causal_reward
from alignax.objectives import multi_reward
from alignax.objectives import reward

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
T, K = 64, 3
BUILD = functools.partial(mr.MultiRewardModel, num_attributes=K,
                          gate_hidden=16, verbose_index=2)
GRAPHDEF = state_lib.abstract_model(CFG, BUILD)[0]
RM_GRAPHDEF = state_lib.abstract_model(CFG, heads.RewardModel)[0]


def _random_params(graphdef_and_abstract, seed):
  """Random parameters of every leaf (cheaper than building the model)."""
  rng = np.random.default_rng(seed)
  abstract = nnx.to_pure_dict(graphdef_and_abstract[1])
  return jax.tree.map(lambda a: jnp.asarray(
      0.3 * rng.normal(size=a.shape), a.dtype), abstract)


@functools.lru_cache(maxsize=None)
def _params(seed=0, lambdas=(0.0, 0.0, 0.0)):
  p = _random_params(state_lib.abstract_model(CFG, BUILD), seed)
  p["verbosity_lambda"] = jnp.asarray(lambdas, jnp.float32)
  return p


@functools.lru_cache(maxsize=None)
def _rm_params():
  """The reward model on the same backbone as ``_params()``."""
  p = {k: v for k, v in _params().items()
       if k not in ("attribute_head", "attribute_bias", "gate",
                    "verbosity_lambda")}
  p["reward_head"] = _params()["attribute_head"][:, 0]
  p["reward_bias"] = jnp.float32(0.1)
  return p


def _rm():
  return nnx.merge(RM_GRAPHDEF, _rm_params())


def _model(params=None):
  return nnx.merge(GRAPHDEF, params if params is not None else _params())


_KEYS = ("inputs", "positions", "segment_ids", "prefix", "attend_to")


@jax.jit
def _jit_hidden(params, batch):
  return reward.common.hidden_states(nnx.merge(RM_GRAPHDEF, params), batch)


def _hidden(params, batch):
  """Backbone hidden states of a packed batch (the reward model's graph)."""
  return _jit_hidden(params, {k: batch[k] for k in _KEYS})


def _states(batch):
  return multi_reward.slot_states(_hidden(_rm_params(), batch), batch)


def _examples(n, k, seed=0, num_rewards=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    m = k if i % 4 else max(k - 1, 1)  # some pairs lack the rejected
    ratings = rng.normal(size=(k, num_rewards)).astype(np.float32)
    ratings[rng.random((k, num_rewards)) < 0.3] = np.nan
    out.append({
        "index": i, "prompt": list(rng.integers(3, 64, rng.integers(2, 9))),
        "responses": [list(rng.integers(3, 64, rng.integers(1, 7)))
                      for _ in range(m)],
        "labels": np.array([1, 0][:k], np.float32), "valid": np.arange(k) < m,
        "rewards": ratings, "ref_logps": np.zeros(k, np.float32)})
  return out


def _packed(exs, k, shared, num_rewards=0):
  layout = packing.Layout(k, 3, num_rewards, shared)
  ds = grain.MapDataset.source(exs).to_iter_dataset()
  (batch,) = packing.pack_and_batch(ds, layout, seq_len=T, batch_size=8,
                                    shuffle_bins=False, drop_remainder=False)
  return batch


def _np_gate(params, prompt):
  g = params["gate"]
  h = np.maximum(prompt @ np.asarray(g["hidden_kernel"])
                 + np.asarray(g["hidden_bias"]), 0)
  z = h @ np.asarray(g["out_kernel"]) + np.asarray(g["out_bias"])
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_gate_mixture_is_the_weighted_sum_of_the_adjusted_heads():
  params = _params(0, (0.3, -0.7, 1.0))
  rng = np.random.default_rng(0)
  resp, prompt = (rng.normal(size=(5, 32)).astype(np.float32)
                  for _ in range(2))
  raw = resp @ np.asarray(params["attribute_head"]) + np.asarray(
      params["attribute_bias"])
  adjusted = raw - np.array([0.3, -0.7, 1.0]) * raw[:, 2:3]
  want = np.sum(_np_gate(params, prompt) * adjusted, axis=-1)
  model = _model(params)
  np.testing.assert_allclose(model.preference_score(resp, prompt), want,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.adjusted(model.attribute_rewards(resp)),
                             adjusted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_slot_states_read_the_last_token_and_the_prompt(shared):
  exs = _examples(8, 2)
  batch = _packed(exs, 2, shared)
  last, prompt, present = _states(batch)
  valid = np.asarray(batch["valid"])
  np.testing.assert_array_equal(np.asarray(present), valid)
  # The last-token state gives the reward model's slot reward.
  rm = _rm()
  np.testing.assert_allclose(np.asarray(rm.rewards_from_hidden(last))[valid],
                             np.asarray(jax.jit(reward.slot_rewards)(
                                 rm, batch))[valid], rtol=1e-5, atol=1e-5)
  # The prompt state has read the prompt alone: each prompt as a row.
  rows = {"inputs": np.zeros((8, T), np.int32)}
  for i, ex in enumerate(exs):
    rows["inputs"][i, :len(ex["prompt"])] = ex["prompt"]
  segments = (rows["inputs"] > 0).astype(np.int32)
  alone = _hidden(_rm_params(), {
      "inputs": rows["inputs"], "segment_ids": segments,
      "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32),
      "prefix": np.zeros((8, T), bool),
      "attend_to": np.zeros((8, T), np.int32)})
  for b, s in zip(*np.nonzero(valid)):
    i = int(batch["index"][b, s])
    np.testing.assert_allclose(prompt[b, s],
                               alone[i, len(exs[i]["prompt"]) - 1],
                               rtol=1e-4, atol=1e-4)


def test_score_of_padded_rows_is_the_packed_preference_score():
  exs = _examples(8, 2, seed=3)
  batch = _packed(exs, 2, True)
  params = _params(0, (0.3, -0.7, 1.0))
  model = _model(params)
  last, prompt, _ = _states(batch)
  packed = np.asarray(model.preference_score(last, prompt))  # [B, S]
  # Each response alone, right-padded: prompt + response without EOS.
  rows, prompt_mask, want = [], [], []
  valid = np.asarray(batch["valid"])
  for b, s in zip(*np.nonzero(valid)):
    ex = exs[int(batch["index"][b, s])]
    seq = ex["prompt"] + ex["responses"][s % 2][:-1]
    rows.append(seq + [0] * (T - len(seq)))
    prompt_mask.append([i < len(ex["prompt"]) for i in range(T)])
    want.append(packed[b, s])
  tokens = np.asarray(rows, np.int32)
  score = jax.jit(lambda p, t, m: nnx.merge(GRAPHDEF, p).score(
      t, (t > 0).astype(np.int32), m))
  got, rewards, weights = score(params, tokens, np.asarray(prompt_mask))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.sum(weights * rewards, -1), got, rtol=1e-5,
                             atol=1e-6)


def test_multi_reward_loss_is_the_masked_squared_error():
  exs = _examples(10, 1, num_rewards=K)
  batch = _packed(exs, 1, True, num_rewards=K)
  model = _model()
  loss, (count, metrics) = jax.jit(functools.partial(
      multi_reward.multi_reward_objective, attributes=("a", "b", "c")))(
          model, batch, None)
  pred = np.asarray(model.attribute_rewards(_states(batch)[0]))
  valid = np.asarray(batch["valid"])
  target = np.asarray(batch["rewards"])
  err, n = 0.0, 0
  per_attr = np.zeros(K)
  for b, s in zip(*np.nonzero(valid)):
    for k in range(K):
      if np.isfinite(target[b, s, k]):
        d = (pred[b, s, k] - target[b, s, k]) ** 2
        err, n = err + d, n + 1
        per_attr[k] += d
  np.testing.assert_allclose(loss, err, rtol=1e-5)
  assert float(count) == n == sum(np.isfinite(ex["rewards"]).sum()
                                  for ex in exs)
  np.testing.assert_allclose(metrics["attr/b/mse"][0], per_attr[1], rtol=1e-5)


def _gate_loss(params, batch):
  return multi_reward.reward_gate_objective(nnx.merge(GRAPHDEF, params),
                                            batch, None,
                                            attributes=("a", "b", "c"))


def test_reward_gate_loss_and_only_the_gate_gets_gradients():
  params = _params(0, (0.2, 0.1, 1.0))
  batch = _packed(_examples(9, 2), 2, True)
  (loss, (count, metrics)), grads = jax.jit(jax.value_and_grad(
      _gate_loss, has_aux=True))(params, batch)
  model = _model(params)
  states, prompt, _ = _states(batch)
  r = np.asarray(model.adjusted(model.attribute_rewards(states))).reshape(
      -1, 2, K)
  g = np.asarray(model.gate_logits(prompt)).reshape(-1, 2, K)[:, 0]
  ok = np.asarray(batch["valid"]).reshape(-1, 2).all(-1)
  beta = float(model.gate.beta())
  e = np.exp(g - g.max(-1, keepdims=True))
  w = e / e.sum(-1, keepdims=True)
  margin = np.sum(w * (r[:, 0] - r[:, 1]), -1)
  np.testing.assert_allclose(loss, np.log1p(np.exp(-beta * margin))[ok].sum(),
                             rtol=1e-5)
  assert float(count) == ok.sum() == 6
  np.testing.assert_allclose(metrics["gate/a"][0] / metrics["gate/a"][1],
                             w[ok, 0].mean(), rtol=1e-5)
  grads = traverse_util.flatten_dict(grads)
  for path, g in grads.items():
    if path[0] == mr.GATE:
      continue
    assert not np.any(np.asarray(g)), path  # backbone and heads: stop_gradient
  assert np.any(np.asarray(grads[("gate", "hidden_kernel")]))
  assert np.any(np.asarray(grads[("gate", "log_beta")]))


@pytest.mark.parametrize("frozen,trained", [
    (multi_reward.stage1_frozen, ("attribute_head", "embed")),
    (multi_reward.stage2_frozen, ("gate",))])
def test_frozen_parameters_stay_put_under_weight_decay(frozen, trained):
  opt = dict(name="adamw", lr=0.1, warmup_steps=0, final_lr_ratio=1.0,
             b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5, grad_clip_norm=1.0)
  tx, _ = state_lib.build_optimizer(opt, 10, frozen=frozen)
  params = _params()

  @jax.jit
  def step(params):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return jax.tree.map(jnp.add, params, updates)

  new = traverse_util.flatten_dict(step(params))
  old = traverse_util.flatten_dict(params)
  for path in old:
    moved = bool(np.any(np.asarray(new[path]) != np.asarray(old[path])))
    assert moved == (not frozen(path)), path
  assert all(any(p[0] == name for p in old if not frozen(p))
             for name in trained)


def test_decorrelation_zeroes_the_correlation_with_verbosity():
  rng = np.random.default_rng(1)
  resp = rng.normal(size=(300, 32)).astype(np.float32)  # reference states
  model = _model()
  raw = np.asarray(model.attribute_rewards(resp))
  before = [stats.spearmanr(raw[:, k], raw[:, 2]).statistic for k in (0, 1)]
  lambdas = decorrelation.fit(raw, 2, "spearman")
  assert lambdas[2] == pytest.approx(1.0)
  adjusted = np.asarray(_model(_params(0, tuple(float(x) for x in lambdas)))
                        .adjusted(model.attribute_rewards(resp)))
  for k in (0, 1):
    rho = stats.spearmanr(adjusted[:, k], raw[:, 2]).statistic
    assert abs(rho) <= 3 / 300 + 1e-3, (k, rho, before)
  assert max(abs(b) for b in before) > 0.1
  np.testing.assert_allclose(adjusted[:, 2], 0.0, atol=1e-5)
  lambdas = decorrelation.fit(raw, 2, "pearson")
  adjusted = raw - lambdas * raw[:, 2:3]
  assert abs(np.corrcoef(adjusted[:, 0], raw[:, 2])[0, 1]) < 1e-4
  with pytest.raises(ValueError, match="decorrelation"):
    decorrelation.fit(raw, 2, "kendall")


def test_spurious_bins():
  v = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
  ok = jnp.array([True] * 7 + [False])
  edges = causal_reward.Spurious(edges=(2.5, 6.0))
  np.testing.assert_array_equal(causal_reward.spurious_bins(v, ok, edges),
                                [0, 0, 1, 1, 1, 2, 2, 2])
  quart = causal_reward.Spurious(num_bins=4)  # quartiles of the 7 valid
  want = np.searchsorted(np.quantile(np.arange(1, 8.0), [.25, .5, .75]),
                         np.arange(1, 9.0), side="right")
  np.testing.assert_array_equal(causal_reward.spurious_bins(v, ok, quart),
                                want)
  field = causal_reward.Spurious(field=0, num_bins=3)
  np.testing.assert_array_equal(
      causal_reward.spurious_bins(jnp.array([0.0, 2.0, 1.0]), ok[:3], field),
      [0, 2, 1])


@pytest.mark.parametrize("conditional", [False, True])
def test_causal_reward_is_bt_plus_the_mmd(conditional):
  rm = _rm()
  batch = _packed(_examples(9, 2, seed=2), 2, True)
  spur = causal_reward.Spurious(edges=(3.0, 5.0))
  run = jax.jit(lambda model, w: causal_reward.causal_reward_objective(
      model, batch, None, mmd_weight=w, spurious=spur,
      conditional=conditional, bandwidth=2.0))
  states, _, _ = _states(batch)
  r = np.asarray(rm.rewards_from_hidden(states)).reshape(-1, 2)
  ok = np.asarray(batch["valid"]).reshape(-1, 2).all(-1)
  plain = np.log1p(np.exp(-(r[:, 0] - r[:, 1])))[ok].sum()
  loss0, (count, _) = run(rm, 0.0)
  np.testing.assert_allclose(loss0, plain, rtol=1e-5)
  assert float(count) == ok.sum()
  loss, (_, metrics) = run(rm, 0.5)
  # The penalty by hand: token lengths, bins by the edges, the features.
  states = np.asarray(states).reshape(-1, 32)
  valid = np.asarray(batch["valid"]).reshape(-1)
  lengths = np.asarray(causal_reward.spurious_values(batch, spur)).reshape(-1)
  bins = np.searchsorted([3.0, 5.0], lengths, side="right")
  label = np.arange(len(valid)) % 2
  groups = [(b, l) for b in range(3) for l in range(2)] if conditional else [
      (b, None) for b in range(3)]
  members = {g: states[valid & (bins == g[0]) & (
      True if g[1] is None else label == g[1])] for g in groups}
  pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]
           if len(members[a]) and len(members[b]) and a[1] == b[1]]
  assert pairs
  penalty = np.mean([float(losses.mmd_squared(members[a], members[b],
                                              bandwidth=2.0))
                     for a, b in pairs])
  mmd_sum, mmd_count = metrics["reward/mmd"]
  np.testing.assert_allclose(mmd_sum / mmd_count, penalty, rtol=1e-4)
  np.testing.assert_allclose(loss, plain + 0.5 * penalty * float(count),
                             rtol=1e-4)
