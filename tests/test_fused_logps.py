"""Tests for the fused LM-head log-probabilities of alignax.policy."""

import re

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from flax import nnx

from alignax import losses
from alignax import policy
from alignax.losses import _lm
from alignax.models import ModelConfig
from alignax.models import Transformer
from alignax.models import heads


def _np_head(hidden, kernel, targets, *, transposed=False, softcap=0.0):
  """Independent reference in float64: log p, lse, entropy, argmax, and
  log sum_v p_v^2, from the full logits."""
  h, w = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  z = h @ (w.T if transposed else w)  # [B, T, V]
  if softcap:
    z = softcap * np.tanh(z / softcap)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  logp_all = z - lse[..., None]
  logp = np.take_along_axis(logp_all, np.asarray(targets)[..., None],
                            -1)[..., 0]
  entropy = -(np.exp(logp_all) * logp_all).sum(-1)
  correct = z.argmax(-1) == np.asarray(targets)
  log_sum_p2 = np.log((np.exp(logp_all) ** 2).sum(-1))
  return logp, lse, entropy, correct, log_sum_p2


def _plain(h, w, y, *, transposed=False, softcap=0.0):
  """The unfused JAX path: full logits, log_softmax, gather (autodiff)."""
  z = jnp.einsum("btd,vd->btv" if transposed else "btd,dv->btv", h, w)
  if softcap:
    z = softcap * jnp.tanh(z / softcap)
  return jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1)[..., 0]


def _data(b=2, t=7, d=6, v=13, *, transposed=False, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  hidden = (scale * rng.normal(size=(b, t, d))).astype(np.float32)
  kernel = rng.normal(size=(v, d) if transposed else (d, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  weights = (rng.random((b, t)) < 0.7).astype(np.float32)
  return hidden, kernel, targets, weights


# chunk_size 3 of T=7 and vocab_chunk 4/5 of V=13: neither divides.
CASES = [
    dict(chunk_size=0, vocab_chunk=0),
    dict(chunk_size=3, vocab_chunk=0),
    dict(chunk_size=3, vocab_chunk=4),
    dict(chunk_size=7, vocab_chunk=5),
    dict(chunk_size=2, vocab_chunk=13),
    dict(chunk_size=3, vocab_chunk=1),
]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("chunks", CASES)
def test_values_and_stats_match_numpy(chunks, softcap, transposed):
  hidden, kernel, targets, _ = _data(transposed=transposed)
  kw = dict(transposed=transposed, softcap=softcap)
  logp, stats = policy.fused_token_logps_and_stats(hidden, kernel, targets,
                                                   **kw, **chunks)
  want = _np_head(hidden, kernel, targets, **kw)
  assert logp.dtype == stats.lse.dtype == jnp.float32
  assert stats.correct.dtype == jnp.bool_
  np.testing.assert_allclose(logp, want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.lse, want[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.entropy, want[2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats.correct, want[3])
  np.testing.assert_array_equal(
      policy.fused_token_logps(hidden, kernel, targets, **kw, **chunks), logp)


@pytest.mark.parametrize("chunks", [CASES[2], CASES[3], CASES[5]])
def test_log_sum_p2_matches_numpy(chunks):
  hidden, kernel, targets, _ = _data(transposed=True)
  kw = dict(transposed=True, softcap=2.5, **chunks)
  logp, log_sum_p2 = policy.fused_token_logps_and_log_sum_p2(
      hidden, kernel, targets, **kw)
  want = _np_head(hidden, kernel, targets, transposed=True, softcap=2.5)
  np.testing.assert_allclose(log_sum_p2, want[4], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      logp, policy.fused_token_logps(hidden, kernel, targets, **kw))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("chunks", CASES[1:4])
def test_gradients_match_plain_log_softmax(chunks, softcap, transposed):
  hidden, kernel, targets, weights = _data(transposed=transposed)
  kw = dict(transposed=transposed, softcap=softcap)

  def fused(h, w):
    return jnp.sum(weights * policy.fused_token_logps(h, w, targets, **kw,
                                                      **chunks))

  def plain(h, w):
    return jnp.sum(weights * _plain(h, w, targets, **kw))

  got = jax.value_and_grad(fused, argnums=(0, 1))(hidden, kernel)
  want = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_check_grads_float64_all_outputs():
  hidden, kernel, targets, weights = _data(t=5, v=11)
  with jax.enable_x64(True):
    h, w = jnp.asarray(hidden, jnp.float64), jnp.asarray(kernel, jnp.float64)

    def f(h, w):
      logp, st = policy.fused_token_logps_and_stats(
          h, w, targets, softcap=3.0, chunk_size=2, vocab_chunk=4)
      # Every differentiable output gets its own cotangent.
      return jnp.sum(weights * (logp + 0.3 * st.lse**2 - 0.7 * st.entropy))

    assert f(h, w).dtype == jnp.float64
    # Reverse mode only: a custom_vjp has no jvp.
    check_grads(jax.jit(f), (h, w), order=1, modes=("rev",))

    def g(h, w):
      return policy.fused_token_logps(h, w.T, targets, transposed=True,
                                      chunk_size=3, vocab_chunk=5)

    check_grads(jax.jit(g), (h, w), order=1, modes=("rev",))

    def p2(h, w):
      logp, log_sum_p2 = policy.fused_token_logps_and_log_sum_p2(
          h, w, targets, softcap=3.0, chunk_size=2, vocab_chunk=4)
      return jnp.sum(weights * (logp + 0.5 * log_sum_p2))

    check_grads(jax.jit(p2), (h, w), order=1, modes=("rev",))


@pytest.mark.parametrize("entropy", [True, False])
def test_z_loss_cross_entropy_equals_token_cross_entropy(entropy):
  # entropy=False (the LM objective's) skips the entropy work only.
  hidden, kernel, targets, weights = _data()
  z_loss = 1e-2

  def fused(h, w):
    logp, st = policy.fused_token_logps_and_stats(h, w, targets, chunk_size=3,
                                                  vocab_chunk=4,
                                                  entropy=entropy)
    return jnp.sum(weights * (z_loss * st.lse**2 - logp))

  _, st = policy.fused_token_logps_and_stats(hidden, kernel, targets,
                                             chunk_size=3, vocab_chunk=4,
                                             entropy=entropy)
  logits = np.asarray(hidden @ kernel, np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(st.lse, lse, rtol=1e-5)
  np.testing.assert_array_equal(st.correct, logits.argmax(-1) == targets)
  if not entropy:
    np.testing.assert_array_equal(st.entropy, 0.0)

  def plain(h, w):
    ce = _lm.token_cross_entropy(h @ w, targets, z_loss=z_loss)
    return jnp.sum(weights * ce)

  got = jax.value_and_grad(fused, argnums=(0, 1))(hidden, kernel)
  want = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_entropy_gradient_matches_autodiff():
  hidden, kernel, targets, weights = _data()

  def fused(h, w):
    _, st = policy.fused_token_logps_and_stats(h, w, targets, softcap=2.0,
                                               chunk_size=2, vocab_chunk=6)
    return jnp.sum(weights * st.entropy)

  def plain(h, w):
    z = 2.0 * jnp.tanh(h @ w / 2.0)
    p = jax.nn.softmax(z)
    return jnp.sum(weights * -jnp.sum(p * jax.nn.log_softmax(z), -1))

  for g, r in zip(jax.grad(fused, (0, 1))(hidden, kernel),
                  jax.grad(plain, (0, 1))(hidden, kernel)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_accuracy_ties_take_the_first_argmax_across_vocab_chunks():
  hidden, kernel, _, _ = _data(b=1, t=4, v=12)
  kernel[:, 2] *= 50.0
  kernel[:, 9] = kernel[:, 2]  # columns 2 and 9 tie, in vocab chunks 0 and 2
  hidden = np.abs(hidden) * np.sign(kernel[:, 2])  # and are the max
  targets = np.array([[2, 9, 0, 2]])
  _, st = policy.fused_token_logps_and_stats(hidden, kernel, targets,
                                             vocab_chunk=4)
  np.testing.assert_array_equal(st.correct, [[True, False, False, True]])
  np.testing.assert_array_equal(
      st.correct, np.argmax(hidden @ kernel, -1) == targets)


def test_masked_tokens_with_padding_ids_equal_slicing():
  hidden, kernel, targets, weights = _data()
  targets = np.where(weights > 0, targets, -100)  # padding ids on masked

  def fused(h, w):
    logp = policy.fused_token_logps(h, w, targets, chunk_size=3, vocab_chunk=5)
    return policy.sequence_logps(logp, weights).sum()

  keep = weights > 0

  def sliced(h, w):  # only the kept tokens, through the plain path
    z = h[keep] @ w  # [K, V]
    picked = jnp.take_along_axis(jax.nn.log_softmax(z),
                                 targets[keep][:, None], -1)
    return picked.sum()

  assert np.all(np.isfinite(policy.fused_token_logps(hidden, kernel, targets)))
  got = jax.value_and_grad(fused, (0, 1))(hidden, kernel)
  want = jax.value_and_grad(sliced, (0, 1))(hidden, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got[1][0])[~keep] == 0)  # masked rows: no gradient


def test_bfloat16_inputs_compute_in_float32():
  hidden, kernel, targets, weights = _data(d=32, v=50, scale=0.5)
  h, w = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)

  def fused(h, w):
    return jnp.sum(weights * policy.fused_token_logps(
        h, w, targets, softcap=4.0, chunk_size=3, vocab_chunk=16))

  value, (gh, gw) = jax.value_and_grad(fused, (0, 1))(h, w)
  assert value.dtype == jnp.float32
  assert gh.dtype == gw.dtype == jnp.bfloat16
  # Reference: the same bf16-rounded inputs, in float32 (and float64).
  h32, w32 = h.astype(jnp.float32), w.astype(jnp.float32)
  want = _np_head(h32, w32, targets, softcap=4.0)[0]
  np.testing.assert_allclose(
      policy.fused_token_logps(h, w, targets, softcap=4.0, chunk_size=3,
                               vocab_chunk=16), want, rtol=2e-2, atol=2e-2)
  ref = jax.grad(lambda h, w: jnp.sum(weights * _plain(h, w, targets,
                                                       softcap=4.0)),
                 (0, 1))(h32, w32)
  np.testing.assert_allclose(gh.astype(jnp.float32), ref[0], rtol=5e-2,
                             atol=5e-2)
  np.testing.assert_allclose(gw.astype(jnp.float32), ref[1], rtol=5e-2,
                             atol=5e-2)


def test_jit_vmap_and_leading_axes():
  hidden, kernel, targets, _ = _data()
  kw = dict(chunk_size=3, vocab_chunk=4)
  eager = policy.fused_token_logps(hidden, kernel, targets, **kw)
  jitted = jax.jit(lambda h, w: policy.fused_token_logps(h, w, targets, **kw))
  np.testing.assert_allclose(jitted(hidden, kernel), eager, rtol=1e-6,
                             atol=1e-6)
  stacked = jax.vmap(
      lambda h, y: policy.fused_token_logps(h, kernel, y, **kw))(
          jnp.stack([hidden, hidden[::-1]]),
          jnp.stack([targets, targets[::-1]]))
  np.testing.assert_allclose(stacked[0], eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stacked[1], eager[::-1], rtol=1e-5, atol=1e-5)
  # [T, D] and [A, B, T, D] inputs: leading axes are batch rows.
  np.testing.assert_allclose(
      policy.fused_token_logps(hidden[0], kernel, targets[0], **kw), eager[0],
      rtol=1e-6, atol=1e-6)
  four = policy.fused_token_logps(hidden[None], kernel, targets[None], **kw)
  np.testing.assert_allclose(four[0], eager, rtol=1e-6, atol=1e-6)


def test_shape_validation():
  hidden, kernel, targets, _ = _data()
  with pytest.raises(ValueError, match="kernel"):
    policy.fused_token_logps(hidden, kernel.T, targets)
  with pytest.raises(ValueError, match="targets"):
    policy.fused_token_logps(hidden, kernel, targets[:, :-1])
  with pytest.raises(ValueError, match=r"\[V, D\]"):
    policy.fused_token_logps(hidden, kernel, targets, transposed=True)


_CFG = dict(vocab_size=61, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
            head_dim=8, d_ff=32, max_seq_len=16)


@pytest.mark.parametrize("build, kw", [
    (Transformer, dict()),
    (Transformer, dict(tie_embeddings=True, final_logit_softcap=3.0)),
    (heads.EmbeddingModel, dict(tie_embeddings=True)),
    (heads.RewardModel, dict(final_logit_softcap=5.0)),
    (Transformer, dict(dtype="bfloat16")),
])
def test_model_token_logps_equals_model_logits(build, kw):
  model = build(ModelConfig(**_CFG, **kw), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 61, size=(2, 9)))
  targets = jnp.roll(tokens, -1, axis=1)
  hidden = model(tokens, return_hidden=True)  # final-normed [B, T, D]
  logits = model.logits_from_hidden(hidden)  # [B, T, V] float32
  tol = 2e-2 if kw.get("dtype") == "bfloat16" else 1e-5
  logp, st = policy.model_token_logps_and_stats(model, hidden, targets,
                                                chunk_size=4, vocab_chunk=16)
  np.testing.assert_allclose(logp, policy.token_logps(logits, targets),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(st.lse, jax.nn.logsumexp(logits, -1), rtol=tol,
                             atol=tol)
  np.testing.assert_allclose(
      policy.model_token_logps(model, hidden, targets, chunk_size=4), logp,
      rtol=1e-6, atol=1e-6)
  if not kw.get("dtype"):
    np.testing.assert_array_equal(st.correct,
                                  jnp.argmax(logits, -1) == targets)

  # Gradients wrt the model's parameters, through nnx.split/merge.
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, fused):
    m = nnx.merge(graphdef, params)
    h = m(tokens, return_hidden=True)
    lp = (policy.model_token_logps(m, h, targets, chunk_size=4,
                                   vocab_chunk=16)
          if fused else policy.token_logps(m.logits_from_hidden(h), targets))
    return lp.sum()

  got, want = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=10 * tol, atol=10 * tol)


def _big_arrays(hlo_text, limit):
  """Shapes in an HLO dump with at least ``limit`` elements."""
  found = []
  for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]+)\]", hlo_text):
    size = int(np.prod([int(x) for x in dims.split(",")]))
    if size >= limit:
      found.append(dims)
  return found


_BIG = (8, 2048, 256, 32768)  # B, T, D, V: N * V * 4 bytes = 2 GiB of logits


def _compile_big(f):
  b, t, d, v = _BIG
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32),
          jax.ShapeDtypeStruct((b, t), jnp.float32))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()


def test_memory_scanner_sees_plain_logits():
  b, t, _, v = _BIG
  compiled = _compile_big(lambda h, w, y, m: -jnp.sum(m * _plain(h, w, y)))
  assert _big_arrays(compiled.as_text(), b * t * v)


@pytest.mark.parametrize("chunk_size, vocab_chunk",
                         [(0, 2048), (128, 8192), (128, 0)])
def test_compiled_memory_has_no_full_logits(chunk_size, vocab_chunk):
  b, t, d, v = _BIG
  n = b * t

  def fused(h, w, y, m):
    logp, st = policy.fused_token_logps_and_stats(
        h, w, y, chunk_size=chunk_size, vocab_chunk=vocab_chunk)
    return jnp.sum(m * (1e-4 * st.lse**2 - logp))

  compiled = _compile_big(fused)
  # No [B, T, V] (or larger) array, forward or backward.
  assert not _big_arrays(compiled.as_text(), n * v)
  temp = compiled.memory_analysis().temp_size_in_bytes
  # A [B, T / k_T, V / k_V] f32 block is at most 128 MiB here (a pass holds
  # 2-3), the f32 kernel gradient 32 MiB; full logits: N * V * 4 = 2 GiB.
  assert temp < n * v * 4 / 4, temp


def test_compiled_memory_of_wpo_weights_has_no_full_logits():
  b, t, _, v = _BIG

  def wpo_weighted_nll(h, w, y, m):
    logp, log_sum_p2 = policy.fused_token_logps_and_log_sum_p2(
        h, w, y, vocab_chunk=2048)
    return -jnp.sum(m * logp) * jnp.sum(losses.wpo_weights(logp, log_sum_p2,
                                                           m))

  compiled = _compile_big(wpo_weighted_nll)
  assert not _big_arrays(compiled.as_text(), b * t * v)
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < b * t * v * 4 / 4, temp


def test_batch_sharded_equals_one_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (forced CPU) devices, see tests/conftest.py")
  hidden, kernel, targets, weights = _data(b=8, t=6, v=29)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  full = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def loss(h, w, y, m):
    logp, st = policy.fused_token_logps_and_stats(h, w, y, chunk_size=4,
                                                  vocab_chunk=8)
    return jnp.sum(m * (1e-2 * st.lse**2 - logp))

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  want = jax.jit(grad)(hidden, kernel, targets, weights)
  sharded = jax.jit(grad, in_shardings=(rows, full, rows, rows))
  got = sharded(hidden, kernel, targets, weights)
  assert got[1][0].sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
