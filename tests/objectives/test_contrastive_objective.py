"""Contrastive and CAFe objectives: GradCache exactness, sharding, mixing."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from alignax import defaults
from alignax import objectives
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.models import ModelConfig
from alignax.models import heads
from alignax.models import lora
from alignax.objectives import contrastive as con
from alignax.objectives import gradcache
from alignax.objectives import lm

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                  n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=16)
BUILD = functools.partial(heads.EmbeddingModel,
                          head=heads.HeadConfig(proj_dim=8))


@pytest.fixture(scope="module")
def model_and_params():
  graphdef, _ = state_lib.abstract_model(CFG, BUILD)
  return graphdef, state_lib.init_params(CFG, 0, BUILD)


def make_batch(b=8, v=2, t=10, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, t + 1, (b, v))
  segment_ids = (np.arange(t) < lengths[..., None]).astype(np.int32)
  tokens = rng.integers(1, CFG.vocab_size, (b, v, t)).astype(np.int32)
  return {"tokens": tokens * segment_ids, "segment_ids": segment_ids}


def value_and_grads(objective, graphdef, params, batch):
  def f(p):
    loss, (count, metrics) = objective(nnx.merge(graphdef, p), batch, None)
    return loss, (count, metrics)
  return jax.jit(jax.value_and_grad(f, has_aux=True))(params, )


def assert_trees_close(a, b, rtol=2e-5, scale_atol=2e-6):
  """Leafwise allclose with ``atol`` relative to the leaf's largest entry:
  float32 sums in another order differ by ~1e-6 of the gradient's scale."""
  def check(x, y):
    y = np.asarray(y)
    atol = scale_atol * float(np.max(np.abs(y), initial=0.0))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
  jax.tree.map(check, a, b)


# X, Y from the issue (unit rows); values from the CLIP / SigLIP formulas.
X = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
Y = np.array([[0.8, 0.6], [1.0, 0.0], [-0.6, 0.8]])


def test_views_loss_hand_values():
  emb = jnp.stack([X, Y], axis=1)  # [B=3, V=2, D=2]
  clip = con.views_loss("clip")(emb, 10.0, 0.0)
  np.testing.assert_allclose(jnp.mean(clip), 1.952045, rtol=1e-6)
  siglip = con.views_loss("siglip")(emb, 10.0, -10.0)
  np.testing.assert_allclose(jnp.mean(siglip), 3.165703, rtol=1e-6)
  with pytest.raises(ValueError, match=r"2 texts per example.*\(3, 3, 2\)"):
    con.views_loss("clip")(jnp.stack([X, Y, Y], axis=1), 10.0, 0.0)


def _np_lse_off_diagonal(s):
  """Row-wise log-sum-exp of ``s`` without its diagonal."""
  s = np.where(np.eye(len(s), dtype=bool), -np.inf, s)
  return np.log(np.exp(s).sum(1))


def test_decoupled_and_symile_losses_match_numpy():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(5, 3, 4))
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  t = 4.0
  x, y, z = emb[:, 0], emb[:, 1], emb[:, 2]
  # DHEL: -t x_i.y_i + energies of both views (same-view negatives only).
  want = (_np_lse_off_diagonal(t * x @ x.T) + _np_lse_off_diagonal(t * y @ y.T)
          - t * np.sum(x * y, -1))
  np.testing.assert_allclose(con.views_loss("dhel")(emb[:, :2], t, 0.0), want,
                             rtol=1e-5)
  # DCL: the positive leaves the denominator; both directions averaged.
  def one_way(a, b):
    neg = np.concatenate([np.where(np.eye(5, dtype=bool), -np.inf, t * a @ a.T),
                          np.where(np.eye(5, dtype=bool), -np.inf, t * a @ b.T)],
                         1)
    return np.log(np.exp(neg).sum(1)) - t * np.sum(a * b, -1)
  np.testing.assert_allclose(con.views_loss("dcl")(emb[:, :2], t, 0.0),
                             0.5 * (one_way(x, y) + one_way(y, x)), rtol=1e-5)
  # Symile, 3 views: the anchor x_i scores every (y_j, z_k) by t * sum x y z;
  # the loss averages the three anchors' cross-entropies.
  def anchor(a, b, c):
    scores = t * np.einsum("id,jd,kd->ijk", a, b, c).reshape(5, 25)
    target = np.arange(5) * 5 + np.arange(5)
    return np.log(np.exp(scores).sum(1)) - scores[np.arange(5), target]
  got = con.views_loss("symile")(emb, t, 0.0)
  want = (anchor(x, y, z) + anchor(y, x, z) + anchor(z, x, y)) / 3
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match=">= 3 views"):
    con.views_loss("symile")(emb[:, :2], t, 0.0)


def np_clip(q, d, t):
  logits = t * q @ d.T
  row = np.log(np.exp(logits).sum(1))
  col = np.log(np.exp(logits).sum(0))
  return 0.5 * (row + col) - np.diag(logits)


def test_objective_matches_numpy_on_model_embeddings(model_and_params):
  graphdef, params = model_and_params
  batch = make_batch()
  objective = functools.partial(con.contrastive_objective,
                                loss_fn=con.views_loss("clip"))
  model = nnx.merge(graphdef, params)
  loss, (count, metrics) = objective(model, batch, None)
  emb = np.asarray(model.encode(batch["tokens"].reshape(16, 10),
                                batch["segment_ids"].reshape(16, 10)))
  emb = emb.reshape(8, 2, -1)
  want = np_clip(emb[:, 0], emb[:, 1], 1 / 0.07)
  np.testing.assert_allclose(loss, want.sum(), rtol=1e-5)
  assert float(count) == 8
  np.testing.assert_allclose(metrics["contrastive/temperature"][0], 0.07,
                             rtol=1e-6)
  top1 = (np.argmax(emb[:, 0] @ emb[:, 1].T, 1) == np.arange(8)).sum()
  assert float(metrics["contrastive/accuracy"][0]) == top1


def test_gradcache_equals_uncached(model_and_params):
  """InfoNCE with a hard negative (V = 3): 24 texts in 4 sub-batches."""
  graphdef, params = model_and_params
  batch = make_batch(v=3, seed=1)
  plain = functools.partial(con.contrastive_objective,
                            loss_fn=con.views_loss("infonce"))
  cached = functools.partial(plain, chunk_size=6)
  (l0, (_, m0)), g0 = value_and_grads(plain, graphdef, params, batch)
  (l1, (_, m1)), g1 = value_and_grads(cached, graphdef, params, batch)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert_trees_close(g1, g0)
  assert_trees_close(m1, m0)
  # The temperature (a loss parameter, not an embedding one) gets its grad.
  assert float(jnp.abs(g1["head"]["log_logit_scale"])) > 0


def test_gradcache_generic_float64():
  """A linear 'model' in float64: value and gradient equal, any chunking."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(5, 4))),
              "t": jnp.asarray(3.0)}
    inputs = {"x": jnp.asarray(rng.normal(size=(12, 5)))}
    embed = lambda p, c: jnp.tanh(c["x"] @ p["w"])  # [c, 4]

    def loss(e, p):
      q, d = e[:6], e[6:]
      per = jax.nn.logsumexp(p["t"] * q @ d.T, -1) - p["t"] * jnp.sum(q * d, -1)
      return jnp.sum(per), {"n": jnp.float64(6)}

    direct = jax.jit(jax.value_and_grad(lambda p: loss(embed(p, inputs), p)[0]))
    want_value, want_grad = direct(params)
    for chunks in (1, 4):
      f = gradcache.gradcache(embed, loss, num_chunks=chunks)
      # 7x: a scaled cotangent (e.g. a loss scale) flows through the replay.
      cached = jax.jit(jax.value_and_grad(lambda p: 7 * f(p, inputs)[0]))
      value, grad = cached(params)
      np.testing.assert_allclose(value, 7 * want_value, rtol=1e-12)
      assert_trees_close(grad, jax.tree.map(lambda g: 7 * g, want_grad),
                         rtol=1e-12, scale_atol=1e-12)
    with pytest.raises(ValueError, match="do not split into 5"):
      gradcache.gradcache(embed, loss, num_chunks=5)(params, inputs)


@pytest.fixture
def no_persistent_cache():
  """Compiles afresh: this XLA CPU build deadlocks (mismatched collective
  rendezvous, both op_id=1) when it reloads from the persistent compilation
  cache a program whose scans hold collectives next to the gradient
  all-reduces (the ring and GradCache steps); fresh compiles run fine."""
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


@pytest.mark.usefixtures("no_persistent_cache")
def test_one_device_equals_eight(model_and_params):
  graphdef, params = model_and_params
  batch = make_batch(b=16, seed=3)
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  _, abstract = state_lib.abstract_model(CFG, BUILD)
  p_sharding = shd.param_shardings(abstract, mesh, shd.DEFAULT_RULES)
  sharded_params = jax.device_put(params, p_sharding)
  sharded_batch = jax.device_put(batch, shd.batch_sharding(mesh))
  base = functools.partial(con.contrastive_objective,
                           loss_fn=con.views_loss("clip"))
  (l1, _), g1 = value_and_grads(base, graphdef, params, batch)
  variants = {
      "global": base,
      # The ring loss inside GradCache: both scaling paths in one program.
      "ring+gradcache": functools.partial(
          con.contrastive_objective, pairwise=False, chunk_size=8, mesh=mesh,
          loss_fn=con.views_loss("clip", ring=True, mesh=mesh)),
  }
  for name, objective in variants.items():
    (l8, _), g8 = value_and_grads(objective, graphdef, sharded_params,
                                  sharded_batch)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, err_msg=name)
    assert_trees_close(g8, g1, rtol=1e-4, scale_atol=1e-5)


def test_cafe_is_the_weighted_sum(model_and_params):
  graphdef, params = model_and_params
  batch = make_batch(seed=4)
  rng = np.random.default_rng(5)
  for k, dtype in (("inputs", np.int32), ("targets", np.int32)):
    batch["lm_" + k] = rng.integers(1, CFG.vocab_size, (8, 10)).astype(dtype)
  batch["lm_weights"] = (rng.random((8, 10)) < 0.8).astype(np.float32)
  batch["lm_positions"] = np.tile(np.arange(10, dtype=np.int32), (8, 1))
  batch["lm_segment_ids"] = np.ones((8, 10), np.int32)
  batch["lm_prefix"] = np.zeros((8, 10), bool)
  contrastive = functools.partial(con.contrastive_objective,
                                  loss_fn=con.views_loss("clip"))
  cafe = functools.partial(con.cafe_objective, contrastive=contrastive,
                           language=lm.lm_objective, weight=0.3, lm_weight=2.0)
  lm_batch = {k[3:]: v for k, v in batch.items() if k.startswith("lm_")}

  @jax.jit
  def losses(p):
    model = nnx.merge(graphdef, p)
    loss, (count, metrics) = cafe(model, batch, None)
    c_sum, (c_n, _) = contrastive(model, batch, None)
    l_sum, (l_n, _) = lm.lm_objective(model, lm_batch, None)
    return loss, count, metrics, c_sum / c_n, l_sum / l_n

  loss, count, metrics, con_mean, lm_mean = losses(params)
  np.testing.assert_allclose(loss, 0.3 * con_mean + 2.0 * lm_mean, rtol=1e-6)
  assert float(count) == 1.0
  np.testing.assert_allclose(metrics["lm/loss"][0] / metrics["lm/loss"][1],
                             lm_mean, rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive/loss"][0] / 8, con_mean,
                             rtol=1e-6)


def test_matryoshka_objective_sums_truncations(model_and_params):
  graphdef, params = model_and_params
  batch = make_batch(seed=6)
  model = nnx.merge(graphdef, params)
  obj = lambda dims: functools.partial(
      con.contrastive_objective,
      loss_fn=con.views_loss("clip", matryoshka_dims=dims))(model, batch,
                                                            None)[0]
  emb = model.encode(batch["tokens"].reshape(16, 10),
                     batch["segment_ids"].reshape(16, 10)).reshape(8, 2, 8)
  want = 0.0
  for d in (4, 8):
    e = np.asarray(emb[..., :d])
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    want += np_clip(e[:, 0], e[:, 1], 1 / 0.07).sum()
  np.testing.assert_allclose(obj((4, 8)), want, rtol=1e-5)


def test_head_config_and_validation():
  c = defaults.base_config()
  c.objective = "contrastive"
  assert math.isclose(con.head_config(c.contrastive).init_log_scale,
                      math.log(1 / 0.07))
  c.contrastive.loss = "siglip"
  assert math.isclose(con.head_config(c.contrastive).init_log_scale,
                      math.log(10.0))
  c.contrastive.temperature = 0.05
  assert math.isclose(con.head_config(c.contrastive).init_log_scale,
                      math.log(20.0), rel_tol=1e-6)
  assert objectives.model_builder(c) is not None  # EmbeddingModel
  c.objective = "lm"
  assert objectives.model_builder(c) is None  # the plain Transformer
  bad = [({"train.microbatches": 2, "train.batch_size": 16}, "microbatches"),
         ({"contrastive.loss": "triplet"}, "contrastive.loss"),
         ({"contrastive.ring": True, "contrastive.loss": "infonce"}, "ring"),
         ({"contrastive.chunk_size": 3}, "chunk_size=3"),
         ({"data.task": "lm"}, "does not go with")]
  for overrides, match in bad:
    c = defaults.base_config()
    c.objective, c.data.task = "contrastive", "pairs"
    for key, value in overrides.items():
      group, field = key.split(".")
      c[group][field] = value
    with pytest.raises(ValueError, match=match):
      defaults.validate(c, num_devices=8, batch_ways=8)
  assert isinstance(c.contrastive, ml_collections.ConfigDict)


def _lora_params(cfg, build, seed=0):
  """Params of ``build(cfg)`` with nonzero LoRA ``B`` (the base untouched)."""
  params = jax.jit(lambda: state_lib.init_params(cfg, seed, build))()
  flat = traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(flat)))
  return traverse_util.unflatten_dict({
      k: (0.1 * jax.random.normal(next(keys), v.shape, v.dtype)
          if lora.is_adapter_path(k) and k[-1] == "b" else v)
      for k, v in flat.items()})


def test_lora_adapters_train_through_gradcache_and_cafe():
  """One state, every path: the same adapters on the contrastive objective
  (GradCache = whole batch) and CAFe; gradients reach only adapters and the
  embedding head. One device (see test_one_device_equals_eight for 8)."""
  cfg = dataclasses.replace(CFG, lora_rank=2, lora_targets=("q", "v", "up"))
  graphdef, _ = state_lib.abstract_model(cfg, BUILD)
  params = _lora_params(cfg, BUILD)
  batch = make_batch(b=8, seed=7)
  whole = functools.partial(con.contrastive_objective,
                            loss_fn=con.views_loss("clip"))
  cached = functools.partial(con.contrastive_objective, chunk_size=4,
                             loss_fn=con.views_loss("clip"))
  grads = {}
  for name, objective in (("whole", whole), ("gradcache", cached)):
    grad_fn = jax.jit(step_lib.make_grad_fn(objective, graphdef))
    grads[name] = grad_fn(params, batch, jax.random.key(0), None,
                          jnp.float32(1))[0]
  assert_trees_close(grads["gradcache"], grads["whole"], rtol=1e-4,
                     scale_atol=1e-5)
  flat = traverse_util.flatten_dict(grads["whole"])
  base = set(traverse_util.flatten_dict(lora.split_trainable(params)[1]))
  assert base and not base & set(flat)  # no gradient for the frozen base
  adapters = [k for k in flat if lora.is_adapter_path(k)]
  assert len(adapters) == 2 * 3 and all(
      np.abs(flat[k]).max() > 0 for k in adapters)
  assert set(flat) - set(adapters)  # the embedding head trains too

  rng = np.random.default_rng(5)
  for k in ("inputs", "targets"):
    batch["lm_" + k] = rng.integers(1, CFG.vocab_size, (8, 10)).astype(np.int32)
  batch["lm_weights"] = np.ones((8, 10), np.float32)
  batch["lm_positions"] = np.tile(np.arange(10, dtype=np.int32), (8, 1))
  batch["lm_segment_ids"] = np.ones((8, 10), np.int32)
  batch["lm_prefix"] = np.zeros((8, 10), bool)
  cafe = functools.partial(con.cafe_objective, contrastive=whole,
                           language=lm.lm_objective, weight=0.3, lm_weight=2.0)
  grad_fn = jax.jit(step_lib.make_grad_fn(cafe, graphdef))
  cafe_grads = traverse_util.flatten_dict(
      grad_fn(params, batch, jax.random.key(0), None, jnp.float32(1))[0])
  assert set(cafe_grads) == set(flat)
  assert all(np.isfinite(g).all() for g in cafe_grads.values())
  # The LM term moves the adapters beyond the contrastive gradient alone.
  assert not np.allclose(cafe_grads[adapters[0]], 0.3 * flat[adapters[0]])
