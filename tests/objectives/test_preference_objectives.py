"""Preference objectives on packed batches: layouts, losses, metrics, sharding."""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import defaults
from alignax import losses
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.data import preference_packing as packing
from alignax.models import ModelConfig
from alignax.models import layers
from alignax.objectives import common
from alignax.objectives import preference as pref

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
T = 64
GRAPHDEF = state_lib.abstract_model(CFG)[0]


@functools.lru_cache(maxsize=None)
def params(seed):
  return state_lib.init_params(CFG, seed)


def examples(n, k, seed=0, num_rewards=0):
  """Random token examples: prompt 1..9 tokens, responses 1..6 tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    m = k if i % 4 else k - 1  # some lists lack their last response
    labels = np.zeros(k, np.float32)
    labels[:m] = rng.permutation(m) if k > 2 else [1, 0][:m]
    out.append({
        "index": i, "prompt": list(rng.integers(1, 64, rng.integers(1, 10))),
        "responses": [list(rng.integers(1, 64, rng.integers(1, 7)))
                      for _ in range(m)],
        "labels": labels, "valid": np.arange(k) < m,
        "rewards": rng.normal(size=(k, num_rewards)).astype(np.float32),
        "ref_logps": np.zeros(k, np.float32)})
  return out


def packed(exs, k, *, shared=True, rows=8, groups=3, num_rewards=0):
  layout = packing.Layout(k, groups, num_rewards, shared)
  ds = grain.MapDataset.source(exs).to_iter_dataset()
  batches = list(packing.pack_and_batch(ds, layout, seq_len=T, batch_size=rows,
                                        shuffle_bins=False,
                                        drop_remainder=False))
  assert len(batches) == 1, "test data should fill one batch"
  return batches[0]


@jax.jit
def _logits(p, tokens, segment_ids):
  return nnx.merge(GRAPHDEF, p)(tokens, segment_ids=segment_ids)


def _padded_token_logps(seed, exs):
  """Per-token answer log-probs ``{(i, j): array}``, NumPy log-softmax."""
  seqs = [(i, j, ex["prompt"] + resp) for i, ex in enumerate(exs)
          for j, resp in enumerate(ex["responses"])]
  tokens = np.zeros((len(seqs), T), np.int32)
  for row, (_, _, seq) in enumerate(seqs):
    tokens[row, :len(seq)] = seq
  logits = np.asarray(_logits(params(seed), tokens, (tokens > 0).astype(
      np.int32)), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
  out = {}
  for row, (i, j, seq) in enumerate(seqs):
    tok = logp[row, np.arange(len(seq) - 1), seq[1:]]
    out[i, j] = tok[len(exs[i]["prompt"]) - 1:]
  return out


def padded_logps(seed, exs, k):
  """Independent reference: one padded row per response, NumPy log-softmax."""
  out = np.zeros((len(exs), k))
  for (i, j), tok in _padded_token_logps(seed, exs).items():
    out[i, j] = tok.sum()
  return out


def run(objective, batch, seed=0, ref_seed=1):
  """The objective under jit (policy ``seed``, frozen reference ``ref_seed``)."""
  fn = jax.jit(lambda p, f, b: objective(nnx.merge(GRAPHDEF, p), b, None,
                                         frozen=f))
  return fn(params(seed), params(ref_seed), batch)


def slot_logps(seed, batch, chunk_size=None):
  """``(sums, lengths)`` per slot; the means are checked against them."""
  sums, lengths, means = jax.jit(lambda p, b: common.slot_logps(
      nnx.merge(GRAPHDEF, p), b, chunk_size=chunk_size))(params(seed), batch)
  np.testing.assert_allclose(means, sums / np.maximum(lengths, 1.0),
                             rtol=1e-6)
  return sums, lengths


def by_example(batch, values, k):
  """``[B, S]`` slot values -> ``[N, K]`` by record index."""
  n = int(batch["index"].max()) + 1
  out = np.zeros((n, k))
  rows, slots = np.nonzero(batch["valid"])
  out[batch["index"][rows, slots], slots % k] = np.asarray(values)[rows, slots]
  return out


def test_attend_to_mask_matches_loops():
  seg = np.array([[1, 1, 2, 2, 3, 3, 0], [1, 2, 2, 3, 3, 3, 3]])
  att = np.array([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 2, 2, 2, 2]])
  prefix = np.zeros_like(seg, bool)
  mask = np.asarray(layers.make_attention_mask(seg, prefix, att))[:, 0]
  for b in range(2):
    for i in range(7):
      for j in range(7):
        want = i == j or (j <= i and seg[b, i] != 0 and (
            seg[b, j] == seg[b, i] or (att[b, i] and seg[b, j] == att[b, i])))
        assert mask[b, i, j] == want, (b, i, j)
  # No attend_to: the old mask.
  np.testing.assert_array_equal(
      layers.make_attention_mask(seg, prefix),
      layers.make_attention_mask(seg, prefix, np.zeros_like(seg)))


@pytest.mark.parametrize("shared", [True, False])
def test_packed_logps_equal_padded_layout(shared):
  exs = examples(9, 3)
  batch = packed(exs, 3, shared=shared)
  assert int(batch["valid"].sum()) == 9 * 3 - 3
  logps, lengths = slot_logps(0, batch)
  got = by_example(batch, logps, 3)
  np.testing.assert_allclose(got, padded_logps(0, exs, 3), rtol=2e-5,
                             atol=2e-4)
  want_len = [[len(r) for r in ex["responses"]] + [0] * (3 - len(
      ex["responses"])) for ex in exs]
  np.testing.assert_array_equal(by_example(batch, lengths, 3), want_len)
  # Chunked log-probs (the long-sequence path) agree.
  chunked, _ = slot_logps(0, batch, chunk_size=16)
  np.testing.assert_allclose(chunked, logps, rtol=1e-5, atol=1e-4)


def test_shared_prompt_saves_tokens_and_equals_separate():
  exs = examples(9, 3)
  shared, separate = packed(exs, 3, shared=True), packed(exs, 3, shared=False,
                                                         groups=3, rows=16)
  a = by_example(shared, slot_logps(1, shared)[0], 3)
  b = by_example(separate, slot_logps(1, separate)[0], 3)
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-4)
  assert (shared["segment_ids"] > 0).sum() < (separate["segment_ids"] > 0).sum()


def np_dpo(c, r, rc, rr, beta):
  z = beta * ((c - rc) - (r - rr))
  return np.log1p(np.exp(-z))


def test_dpo_objective_loss_and_trl_metrics():
  exs = examples(9, 2)
  batch = packed(exs, 2)
  beta = 0.3
  objective = functools.partial(
      pref.pairwise_objective, pair_loss=pref.build_pair_loss(_pcfg(beta=beta)),
      beta=beta, reference="frozen")
  loss_sum, (count, m) = run(objective, batch)
  pol, ref = padded_logps(0, exs, 2), padded_logps(1, exs, 2)
  ok = np.array([len(e["responses"]) == 2 for e in exs])
  c, r, rc, rr = pol[ok, 0], pol[ok, 1], ref[ok, 0], ref[ok, 1]
  assert float(count) == ok.sum()
  np.testing.assert_allclose(loss_sum / count, np_dpo(c, r, rc, rr, beta).mean(),
                             rtol=1e-4)
  mean = lambda key: float(m[key][0] / m[key][1])
  cr, rr_ = beta * (c - rc), beta * (r - rr)
  np.testing.assert_allclose(mean("rewards/chosen"), cr.mean(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(mean("rewards/margins"), (cr - rr_).mean(),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mean("logps/rejected"), r.mean(), rtol=1e-5)
  assert mean("rewards/accuracies") == pytest.approx((cr > rr_).mean())
  assert mean("logps/accuracies") == pytest.approx((c > r).mean())
  # Policy == reference: every implicit reward is exactly 0, loss log 2.
  loss_sum, (count, m) = run(objective, batch, 0, 0)
  np.testing.assert_allclose(loss_sum / count, np.log(2.0), rtol=1e-6)
  assert float(m["rewards/accuracies"][0]) == 0.0  # TRL: ties are wrong


def _pcfg(**kw):
  c = defaults.base_config().preference
  c.update(kw)
  return c


def _pairs(seed=0, ref_seed=1):
  exs = examples(9, 2, seed=seed, num_rewards=2)
  batch = packed(exs, 2, num_rewards=2)
  lists = jax.jit(lambda p, f, b: common.gather_lists(
      nnx.merge(GRAPHDEF, p), b, f, list_size=2, reference="frozen"))(
          params(seed), params(ref_seed), batch)
  return common.to_pairs(lists), batch


# loss_type -> (public loss, keywords it gets from the config besides beta).
PUBLIC_LOSSES = {
    "sigmoid": (losses.dpo_loss, ()),
    "hinge": (losses.hinge_loss, ()),
    "ipo": (losses.ipo_loss, ("lengths",)),
    "sigmoid_norm": (losses.sigmoid_norm_loss, ("lengths",)),
    "exo_pair": (losses.exo_pair_loss, ("epsilon",)),
    "robust": (losses.robust_loss, ("label_smoothing",)),
    "discopop": (losses.discopop_loss, ()),
    "nca_pair": (losses.nca_pair_loss, ()),
    "bco_pair": (losses.bco_pair_loss, ()),
    "sppo_hard": (losses.sppo_hard_loss, ()),
    "apo_zero": (losses.apo_zero_loss, ()),
    "apo_down": (losses.apo_down_loss, ()),
}


def test_every_loss_type_and_combinations():
  p, _ = _pairs()
  v = np.asarray(p.valid)
  assert set(PUBLIC_LOSSES) | {"sft", "aot", "aot_unpaired"} == set(
      pref.PAIR_LOSSES)
  for name in pref.PAIR_LOSSES:
    ls = 1e-3 if name == "exo_pair" else 0.1
    out = pref.build_pair_loss(_pcfg(loss_type=name, label_smoothing=ls))(p)
    assert out.shape == v.shape and np.all(np.isfinite(out)), name
    if name in PUBLIC_LOSSES:  # sft and aot* couple the batch
      fn, keys = PUBLIC_LOSSES[name]
      args = [np.asarray(x)[v] for x in p[:4]]
      kw = {"epsilon": ls} if "epsilon" in keys else {}
      if "label_smoothing" in keys:
        kw["label_smoothing"] = ls
      if "lengths" in keys:
        kw.update(chosen_lengths=np.asarray(p.chosen_lengths)[v],
                  rejected_lengths=np.asarray(p.rejected_lengths)[v])
      np.testing.assert_allclose(out[v], fn(*args, beta=0.1, **kw), rtol=1e-5,
                                 atol=1e-6, err_msg=name)
  # MPO-style weighted sum; the sft term is TRL's token-mean chosen NLL.
  mix = pref.build_pair_loss(_pcfg(loss_type="sigmoid, sft",
                                   loss_weights=(0.8, 1.0)))(p)
  dpo = pref.build_pair_loss(_pcfg())(p)
  nll = -np.asarray(p.chosen)[v].sum() / np.asarray(p.chosen_lengths)[v].sum()
  np.testing.assert_allclose(mix[v].mean(), 0.8 * dpo[v].mean() + nll,
                             rtol=1e-5)
  js = pref.build_pair_loss(_pcfg(f_divergence="js_divergence"))(p)
  c, r = losses.logratios(*p[:4])
  np.testing.assert_allclose(js, losses.dpo_loss(jax.nn.log_sigmoid(c),
                                                 jax.nn.log_sigmoid(r), 0., 0.),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="loss_type='sigmod'"):
    pref.build_pair_loss(_pcfg(loss_type="sigmod"))


# --- f-divergences against TRL 1.16's DPOTrainer._compute_loss ---------------


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def trl_dpo_loss(loss_type, f_div, c, r, rc, rr, lc, lr, *, beta, ls, tau,
                 alpha):
  """NumPy transcription of TRL 1.16 ``_compute_loss`` (per sequence)."""
  cl, rl = c - rc, r - rr
  if f_div == "reverse_kl":
    cs, rs = cl, rl
  elif f_div == "forward_kl":
    cs, rs = 1 - np.exp(-cl), 1 - np.exp(-rl)
  elif f_div == "js_divergence":
    cs, rs = np.log(2) + _logsig(cl), np.log(2) + _logsig(rl)
  else:
    coef = 1.0 / (alpha - 1.0)
    cs = (np.exp(np.minimum((alpha - 1.0) * cl, 80.0)) - 1.0) * coef
    rs = (np.exp(np.minimum((alpha - 1.0) * rl, 80.0)) - 1.0) * coef
  d = cs - rs
  lc, lr = np.maximum(lc, 1.0), np.maximum(lr, 1.0)
  if loss_type == "sigmoid":
    return -_logsig(beta * d)
  if loss_type == "hinge":
    return np.maximum(0.0, 1 - beta * d)
  if loss_type == "ipo":
    return (cs / lc - rs / lr - 1 / (2 * beta)) ** 2
  if loss_type == "exo_pair":
    z = beta * d
    sig = lambda x: 1 / (1 + np.exp(-x))
    return (sig(z) * (_logsig(z) - np.log1p(-ls))
            + sig(-z) * (_logsig(-z) - np.log(ls)))
  if loss_type == "robust":
    clean = -(1 - ls) * _logsig(beta * d)
    flipped = -ls * _logsig(-beta * d)
    return (clean - flipped) / (1 - 2 * ls)
  if loss_type == "discopop":
    z = beta * d
    m = 1 / (1 + np.exp(-z / tau))
    return (1 - m) * -_logsig(z) + m * np.exp(-z)
  assert loss_type == "sigmoid_norm"
  return -_logsig(beta * (cs / lc - rs / lr))


def _synthetic_pairs(n=6, seed=0):
  """Pairs with unequal completion lengths (1 to 40 tokens), all valid."""
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 40, n).astype(np.float32)
  lr = rng.integers(1, 40, n).astype(np.float32)
  c, r = -0.8 * lc + rng.normal(0, 1, n), -0.8 * lr + rng.normal(0, 1, n)
  rc, rr = c + rng.normal(0, 0.7, n), r + rng.normal(0, 0.7, n)
  f = lambda x: jnp.asarray(x, jnp.float32)
  zeros = jnp.zeros((n, 0))
  return common.Pairs(f(c), f(r), f(rc), f(rr), f(lc), f(lr), f(c / lc),
                      f(r / lr), jnp.ones(n, bool), zeros, zeros)


@pytest.mark.parametrize("f_div", ["reverse_kl", "forward_kl", "js_divergence",
                                   "alpha_divergence"])
@pytest.mark.parametrize("loss_type", list(pref.F_DIVERGENCE_LOSSES[:-1]))
def test_f_divergences_equal_trl_on_unequal_lengths(f_div, loss_type):
  p = _synthetic_pairs()
  ls = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
  cfg = _pcfg(loss_type=loss_type, f_divergence=f_div, beta=0.1,
              label_smoothing=ls, alpha_divergence_coef=0.3)
  got = pref.build_pair_loss(cfg)(p)
  want = trl_dpo_loss(loss_type, f_div, *(np.asarray(x, np.float64)
                                          for x in p[:6]),
                      beta=0.1, ls=ls, tau=cfg.discopop_tau, alpha=0.3)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_forward_kl_ipo_keeps_trl_constant_hand_value():
  # One pair, logratios c = -1 (12 chosen tokens) and r = 0.5 (1 token):
  # scores 1 - e^1 = -1.718282 and 1 - e^-0.5 = 0.393469; the per-token
  # margin -1.718282 / 12 - 0.393469 = -0.536659 and beta = 0.1 give
  # (-0.536659 - 5)^2 = 30.654598. Dropping the constants gives 21.344.
  f = lambda x: jnp.asarray([x], jnp.float32)
  p = common.Pairs(f(-1.0), f(0.5), f(0.0), f(0.0), f(12.0), f(1.0),
                   f(-1 / 12), f(0.5), jnp.ones(1, bool), jnp.zeros((1, 0)),
                   jnp.zeros((1, 0)))
  got = pref.build_pair_loss(_pcfg(loss_type="ipo", f_divergence="forward_kl",
                                   beta=0.1))(p)
  np.testing.assert_allclose(got, [30.654598], rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard",
                                       "aot", "aot_unpaired", "apo_zero",
                                       "apo_down", "sigmoid, apo_zero"])
def test_f_divergence_refused_where_trl_refuses(loss_type):
  with pytest.raises(ValueError, match="does not go with loss_type"):
    pref.build_pair_loss(_pcfg(loss_type=loss_type,
                               f_divergence="js_divergence"))
  pref.build_pair_loss(_pcfg(loss_type=loss_type))  # reverse KL is fine


def test_label_smoothing_ranges_as_trl():
  with pytest.raises(ValueError, match="exo_pair"):
    pref.build_pair_loss(_pcfg(loss_type="exo_pair"))  # epsilon 0: log 0
  with pytest.raises(ValueError, match=r"\[0, 0.5\) for loss_type 'robust'"):
    pref.build_pair_loss(_pcfg(loss_type="robust", label_smoothing=0.5))
  # sigmoid ignores label_smoothing, as TRL >= 1.0 does (no cDPO).
  p = _synthetic_pairs()
  np.testing.assert_array_equal(
      pref.build_pair_loss(_pcfg(label_smoothing=0.2))(p),
      pref.build_pair_loss(_pcfg())(p))


def test_reference_free_and_modpo_losses():
  p, _ = _pairs()
  v = np.asarray(p.valid)
  c, r = np.asarray(p.chosen)[v], np.asarray(p.rejected)[v]
  lc, lr = np.asarray(p.chosen_lengths)[v], np.asarray(p.rejected_lengths)[v]
  nll = -c.sum() / lc.sum()
  cpo = pref.cpo_pair_loss(p, beta=0.2, label_smoothing=0.0, sft_weight=1.0)
  np.testing.assert_allclose(np.asarray(cpo)[v].mean(),
                             np.log1p(np.exp(-0.2 * (c - r))).mean() + nll,
                             rtol=1e-5)
  simpo = pref.simpo_pair_loss(p, beta=2.0, gamma=1.0, label_smoothing=0.0,
                               sft_weight=0.0)
  z = 2.0 * (c / lc - r / lr) - 1.0
  np.testing.assert_allclose(np.asarray(simpo)[v], np.log1p(np.exp(-z)),
                             rtol=1e-5)
  orpo = pref.orpo_pair_loss(p, beta=0.1)
  mc, mr = c / lc, r / lr
  log_odds = (mc - np.log1p(-np.exp(mc))) - (mr - np.log1p(-np.exp(mr)))
  np.testing.assert_allclose(np.asarray(orpo)[v].mean(),
                             nll + (0.1 * np.log1p(np.exp(-log_odds))).mean(),
                             rtol=1e-5)
  assert np.all(np.isfinite(orpo))  # invalid pairs stay finite
  # MODPO: one objective is DPO; a reward margin shifts the logit.
  one = pref.modpo_pair_loss(p, beta=0.1, weights=(1.0, 0.0, 0.0))
  np.testing.assert_allclose(one, pref.build_pair_loss(_pcfg())(p), rtol=1e-6)
  two = pref.modpo_pair_loss(p, beta=0.1, weights=(0.5, 0.3, 0.0))
  rc, rr = np.asarray(p.ref_chosen)[v], np.asarray(p.ref_rejected)[v]
  margin = 0.3 * (np.asarray(p.chosen_rewards)[v, 0]
                  - np.asarray(p.rejected_rewards)[v, 0])
  z = (0.1 * ((c - rc) - (r - rr)) - margin) / 0.5
  np.testing.assert_allclose(np.asarray(two)[v], np.log1p(np.exp(-z)),
                             rtol=1e-5)


def np_ndcg(scores, labels):
  order = np.argsort(-scores, kind="stable")
  gains = 2.0 ** labels - 1
  dcg = sum(gains[i] / np.log2(2 + rank) for rank, i in enumerate(order))
  ideal = sum(g / np.log2(2 + rank)
              for rank, g in enumerate(sorted(gains, reverse=True)))
  return dcg / ideal


def test_lipo_objective_and_ndcg():
  exs = examples(6, 4, seed=3)
  batch = packed(exs, 4, groups=2)
  beta = 0.5
  objective = functools.partial(
      pref.listwise_objective, list_loss=losses.lipo_lambda_loss, beta=beta,
      list_size=4, reference="frozen")
  loss_sum, (count, m) = run(objective, batch)
  pol, ref = padded_logps(0, exs, 4), padded_logps(1, exs, 4)
  scores = beta * (pol - ref)
  want, nd, acc = [], [], []
  for i, ex in enumerate(exs):
    n = len(ex["responses"])
    s, y = scores[i, :n], ex["labels"][:n]
    want.append(float(losses.lipo_lambda_loss(s, y)))
    nd.append(np_ndcg(s, y))
    acc += [s[a] > s[b] for a in range(n) for b in range(n) if y[a] > y[b]]
  assert float(count) == len(exs)
  np.testing.assert_allclose(loss_sum / count, np.mean(want), rtol=1e-4)
  np.testing.assert_allclose(m["rewards/ndcg"][0] / m["rewards/ndcg"][1],
                             np.mean(nd), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/accuracies"][0], np.sum(acc))
  assert float(m["rewards/accuracies"][1]) == len(acc)


def test_kto_objective_matches_formula():
  exs = examples(8, 2, seed=5)
  for i, ex in enumerate(exs):
    ex["labels"] = np.array([i % 2, 0], np.float32)
  batch = packed(exs, 2)
  objective = functools.partial(
      pref.kto_objective, beta=0.1, desirable_weight=1.0,
      undesirable_weight=2.0, reference="frozen")
  loss_sum, (count, m) = run(objective, batch)
  pol, ref = padded_logps(0, exs, 2), padded_logps(1, exs, 2)
  both = np.array([len(e["responses"]) == 2 for e in exs])
  kl = max(np.mean(pol[both, 1] - ref[both, 1]), 0.0)
  rho = pol[:, 0] - ref[:, 0]
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = np.where(np.arange(8) % 2, 1 - sig(0.1 * (rho - kl)),
                  2.0 * (1 - sig(0.1 * (kl - rho))))
  np.testing.assert_allclose(loss_sum / count, want.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["kl"][0], kl, rtol=1e-4, atol=1e-6)


def grads_on(mesh_cfg, devices=None):
  """The preference step's gradients, policy and reference sharded."""
  mesh = shd.make_mesh(mesh_cfg, devices)
  shardings = shd.param_shardings(state_lib.abstract_model(CFG)[1], mesh,
                                  shd.DEFAULT_RULES)
  policy, frozen = (jax.device_put(params(s), shardings) for s in (0, 1))
  objective = functools.partial(
      pref.pairwise_objective, pair_loss=pref.build_pair_loss(_pcfg()),
      beta=0.1, reference="frozen")
  grad_fn = step_lib.make_grad_fn(objective, GRAPHDEF, mesh=mesh)
  batch = shd.host_to_global(packed(examples(14, 2, seed=7), 2, rows=8), mesh)
  out = jax.jit(grad_fn)(policy, batch, jax.random.PRNGKey(0), frozen, 1.0)
  return jax.device_get(out)


def test_eight_devices_equal_one_device():
  one = grads_on({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = grads_on({"data": 2, "fsdp": 2, "tensor": 2})
  assert float(one[1]) > 8  # several pairs per row
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), one, eight)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(one[0])) > 0


def test_from_config_names_bad_fields():
  c = defaults.base_config()
  c.objective = "dpo"
  with pytest.raises(ValueError, match="needs a reference model"):
    pref.dpo_from_config(c)
  c.reference = "frozen"
  c.data.preference.format = "lists"
  with pytest.raises(ValueError, match="data.preference.format"):
    pref.dpo_from_config(c)
  c.data.preference.format = "pairs"
  assert pref.dpo_from_config(c).keywords["reference"] == "frozen"
  c.reference = "none"
  assert pref.simpo_from_config(c).keywords["reference"] == "none"
  c.data.preference.reward_fields = ("safety",)
  with pytest.raises(ValueError, match="modpo_weights"):
    pref.modpo_from_config(c)
  c.preference.list_loss = "lambdarank"
  with pytest.raises(ValueError, match="list_loss='lambdarank'"):
    pref.lipo_from_config(c)


def _binary_examples(seed):
  exs = examples(8, 2, seed=seed)
  for i, ex in enumerate(exs):
    ex["labels"] = np.array([i % 2, 0], np.float32)
  return exs


def test_bco_objective_uses_the_running_mean_updated_with_the_batch():
  from alignax.objectives import binary  # pylint: disable=g-import-not-at-top
  exs = _binary_examples(6)
  batch = packed(exs, 2)
  objective = binary.BCOObjective(beta=0.1, reference="frozen")
  extras = {"bco/mean": jnp.float32(0.2), "bco/count": jnp.float32(24.0)}
  fn = jax.jit(lambda p, f, b, e: objective(nnx.merge(GRAPHDEF, p), b, None,
                                            frozen=f, extras=e))
  loss_sum, (count, m) = fn(params(0), params(1), batch, extras)
  pol, ref = padded_logps(0, exs, 2), padded_logps(1, exs, 2)
  rewards = 0.1 * (pol[:, 0] - ref[:, 0])  # every example has slot 0
  # TRL's RunningMoments: fold this batch's rewards in, then shift by it.
  delta = (0.2 * 24 + rewards.sum()) / (24 + len(rewards))
  desirable = np.arange(8) % 2 == 1
  z = np.where(desirable, rewards - delta, -(rewards - delta))
  want = np.log1p(np.exp(-z))
  np.testing.assert_allclose(loss_sum / count, want.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["bco/delta"][0], delta, rtol=1e-4)
  new = objective.update_extras(extras, m)
  np.testing.assert_allclose(new["bco/mean"], delta, rtol=1e-4)
  assert float(new["bco/count"]) == 32
  # delta is a constant of the loss: the gradient is BCO's at fixed delta.
  g = jax.grad(lambda p: fn(p, params(1), batch, extras)[0])(params(0))
  # A count so large that this batch cannot move the mean: delta fixed.
  fixed = {"bco/mean": jnp.float32(delta), "bco/count": jnp.float32(1e12)}
  g_fixed = jax.grad(lambda p: fn(p, params(1), batch, fixed)[0])(params(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3,
                                                       atol=1e-6), g, g_fixed)


def test_npo_objective_forgets_label0_and_retains_label1():
  from alignax.objectives import binary  # pylint: disable=g-import-not-at-top
  exs = _binary_examples(8)
  batch = packed(exs, 2)
  pol, ref = padded_logps(0, exs, 2), padded_logps(1, exs, 2)
  lengths = np.array([len(e["responses"][0]) for e in exs], np.float64)
  desirable = np.arange(8) % 2 == 1
  forget = -(2 / 0.1) * np.log(1 / (1 + np.exp(0.1 * (pol[:, 0] - ref[:, 0]))))
  for w in (0.0, 0.5):
    objective = functools.partial(binary.npo_objective, beta=0.1,
                                  retain_weight=w, reference="frozen")
    loss_sum, (count, m) = run(objective, batch)
    per = np.where(desirable, w * (-pol[:, 0] / lengths), forget)
    keep = ~desirable | (w > 0)
    assert float(count) == keep.sum()
    np.testing.assert_allclose(loss_sum, per[keep].sum(), rtol=1e-4)
  np.testing.assert_allclose(m["npo/forget_logps"][0] / m["npo/forget_logps"][1],
                             pol[~desirable, 0].mean(), rtol=1e-5)


def test_ld_weights_hand_example():
  # One row, prompt of 2 tokens, chosen of 3 and rejected of 1 token: the
  # shared length is 1, so the chosen answer's last two tokens get alpha.
  batch = {"labels": np.zeros((1, 2), np.float32),
           "slot": np.array([[-1, -1, 0, 0, 0, 1, -1]]),
           "weights": np.array([[0, 0, 1, 1, 1, 1, 0]], np.float32)}
  w = np.asarray(common.ld_weights(batch, list_size=2, alpha=0.25))
  np.testing.assert_array_equal(w, [[[0, 0, 1, .25, .25, 0, 0],
                                     [0, 0, 0, 0, 0, 1, 0]]])
  # Token log-probs -1, -2, -3 (chosen) and -1 (rejected): LD-DPO's sums
  # (TRL: shared + ld_alpha * tail) are -1 + 0.25 * -5 = -2.25 and -1.
  tokens = np.array([0, 0, -1, -2, -3, -1, 0], np.float32)
  np.testing.assert_allclose((w * tokens).sum(-1), [[-2.25, -1.0]])


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_ld_dpo_equals_numpy_reference(alpha):
  exs = examples(9, 2)
  batch = packed(exs, 2)
  beta = 0.2
  objective = functools.partial(
      pref.pairwise_objective, pair_loss=pref.build_pair_loss(_pcfg(beta=beta)),
      beta=beta, reference="frozen", ld_alpha=alpha)
  loss_sum, (count, m) = run(objective, batch)
  pol, ref = _padded_token_logps(0, exs), _padded_token_logps(1, exs)

  def ld(toks, i):
    shared = min(len(toks[i, 0]), len(toks[i, 1]))
    return [t[:shared].sum() + alpha * t[shared:].sum()
            for t in (toks[i, 0], toks[i, 1])]

  ok = [i for i, e in enumerate(exs) if len(e["responses"]) == 2]
  (c, r), (rc, rr) = (np.array([ld(t, i) for i in ok]).T
                      for t in (pol, ref))
  np.testing.assert_allclose(loss_sum / count,
                             np_dpo(c, r, rc, rr, beta).mean(), rtol=1e-4)
  mean = lambda key: float(m[key][0] / m[key][1])
  np.testing.assert_allclose(mean("logps/chosen"), c.mean(), rtol=1e-5)
  # alpha = 1 is plain DPO, exactly.
  ones = run(functools.partial(objective, ld_alpha=1.0), batch)[0]
  base = run(functools.partial(pref.pairwise_objective,
                               pair_loss=pref.build_pair_loss(_pcfg(beta=beta)),
                               beta=beta, reference="frozen"), batch)[0]
  assert float(ones) == float(base)


def _padded_token_wpo_terms(seed, exs):
  """Per-token ``logp - log sum_v p_v^2`` of each answer ``{(i, j): array}``,
  from the full logits in NumPy (TRL's ``use_weighting`` branch)."""
  seqs = [(i, j, ex["prompt"] + resp) for i, ex in enumerate(exs)
          for j, resp in enumerate(ex["responses"])]
  tokens = np.zeros((len(seqs), T), np.int32)
  for row, (_, _, seq) in enumerate(seqs):
    tokens[row, :len(seq)] = seq
  z = np.asarray(_logits(params(seed), tokens, (tokens > 0).astype(np.int32)),
                 np.float64)
  lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + (
      x.max(-1))
  lse1, lse2 = lse(z), lse(2.0 * z)
  out = {}
  for row, (i, j, seq) in enumerate(seqs):
    t = np.arange(len(exs[i]["prompt"]) - 1, len(seq) - 1)
    out[i, j] = z[row, t, np.asarray(seq)[t + 1]] - lse2[row, t] + lse1[row, t]
  return out


def _wpo_objective(beta, sft_weight=0.0, use_weighting=True):
  extra = (("sft", sft_weight),) if sft_weight else ()
  return functools.partial(
      pref.pairwise_objective, beta=beta, reference="frozen",
      pair_loss=pref.build_pair_loss(_pcfg(beta=beta), extra=extra),
      use_weighting=use_weighting)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_wpo_equals_numpy_reference_from_full_logits(sft_weight):
  exs = examples(9, 2)
  batch = packed(exs, 2)
  beta = 0.2
  loss_sum, (count, m) = run(_wpo_objective(beta, sft_weight), batch)
  pol, ref = _padded_token_logps(0, exs), _padded_token_logps(1, exs)
  terms = _padded_token_wpo_terms(0, exs)
  ok = [i for i, e in enumerate(exs) if len(e["responses"]) == 2]
  w = np.array([np.exp(terms[i, 0].mean()) * np.exp(terms[i, 1].mean())
                for i in ok])
  (c, r), (rc, rr) = (np.array([[t[i, 0].sum(), t[i, 1].sum()] for i in ok]).T
                      for t in (pol, ref))
  # TRL: mean(dpo_i * w_i) + sft_weight * mean(nll * w_i), the sft term
  # being the batch's token-mean chosen NLL.
  nll = -c.sum() / sum(len(pol[i, 0]) for i in ok)
  want = (np_dpo(c, r, rc, rr, beta) * w).mean() + sft_weight * nll * w.mean()
  assert np.abs(w - 1.0).max() > 0.05  # the weights matter here
  np.testing.assert_allclose(loss_sum / count, want, rtol=1e-4)
  np.testing.assert_allclose(m["wpo/weights"][0] / m["wpo/weights"][1],
                             w.mean(), rtol=1e-4)


def test_wpo_gradient_is_the_constant_weight_times_the_dpo_gradient():
  exs = examples(2, 2)  # example 0 lacks its rejected answer: one valid pair
  batch = packed(exs, 2)

  def grad_of(objective):  # (d/d lm_head, (count, metrics)), under jit
    # The LM head alone keeps the compile small; w depends on it too.
    loss = lambda head, p, f: objective(
        nnx.merge(GRAPHDEF, {**p, "lm_head": head}), batch, None, frozen=f)
    return jax.jit(jax.grad(loss, has_aux=True))(params(0)["lm_head"],
                                                  params(0), params(1))

  (g_wpo, (count, m)), (g_dpo, _) = (grad_of(_wpo_objective(0.2, 0.0, u))
                                     for u in (True, False))
  terms = _padded_token_wpo_terms(0, exs)
  w = np.exp(terms[1, 0].mean()) * np.exp(terms[1, 1].mean())
  assert float(count) == 1
  np.testing.assert_allclose(m["wpo/weights"][0], w, rtol=1e-5)
  # The weight is a constant: d(w l)/d(theta) = w dl/d(theta), no l dw.
  assert np.abs(g_dpo).max() > 1e-3
  np.testing.assert_allclose(g_wpo, w * g_dpo, rtol=1e-4, atol=1e-7)


def test_wpo_refused_with_sorting_losses_as_trl():
  with pytest.raises(ValueError, match=r"use_weighting=True \(WPO\) does not "
                     r"go with loss_type \['aot'\]"):
    pref.build_pair_loss(_pcfg(use_weighting=True, loss_type="sigmoid,aot"))
