"""Pooling, the embedding head and the EmbeddingModel wrapper."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax.models import ModelConfig, Transformer
from alignax.models import heads

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                  n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=16)


def np_pool(hidden, mask, kind):
  """Reference: loops over rows, picks positions explicitly."""
  out = np.zeros(hidden.shape[:-2] + hidden.shape[-1:], np.float64)
  for idx in np.ndindex(*mask.shape[:-1]):
    h = hidden[idx] if hidden.shape[:-2] == mask.shape[:-1] else hidden[idx[0], 0]
    where = np.flatnonzero(mask[idx])
    if not len(where):
      continue
    if kind == "last":
      out[idx] = h[where[-1]]
    elif kind == "first":
      out[idx] = h[where[0]]
    else:
      out[idx] = h[where].mean(0)
  return out


@pytest.mark.parametrize("kind", ["last", "mean", "first"])
def test_pooling_left_right_padding_and_empty_rows(kind):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(4, 6, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0],   # right padding
                   [0, 0, 1, 1, 1, 1],   # left padding
                   [1, 1, 1, 1, 1, 1],   # no padding
                   [0, 0, 0, 0, 0, 0]],  # empty -> zeros
                  bool)
  got = heads.POOLINGS[kind](jnp.asarray(hidden), jnp.asarray(mask))
  np.testing.assert_allclose(got, np_pool(hidden, mask, kind), rtol=1e-6)
  # Hand-checked positions for last pooling: 3, 5, 5; row 3 is zeros.
  if kind == "last":
    np.testing.assert_array_equal(got[:3], hidden[[0, 1, 2], [3, 5, 5]])
    np.testing.assert_array_equal(got[3], 0)
  # jit and vmap over rows agree with the batched call.
  fn = jax.jit(heads.POOLINGS[kind])
  np.testing.assert_allclose(fn(hidden, mask), got, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(hidden, mask), got, rtol=1e-6)


@pytest.mark.parametrize("kind", ["last", "mean", "first"])
def test_pooling_packed_rows_is_pooling_each_segment(kind):
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(2, 7, 3)).astype(np.float32)
  segs = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]])
  got = heads.POOLINGS[kind](jnp.asarray(hidden)[:, None],
                             heads.segment_masks(jnp.asarray(segs), 3))
  assert got.shape == (2, 3, 3)
  for b in range(2):
    for s in range(3):
      mask = segs[b] == s + 1
      want = np_pool(hidden[b][None], mask[None], kind)[0]
      np.testing.assert_allclose(got[b, s], want, rtol=1e-6, atol=1e-7)
  if kind == "last":  # last token of each segment: positions 1, 4, - / 0, 1, 6
    np.testing.assert_array_equal(got[0, :2], hidden[0, [1, 4]])
    np.testing.assert_array_equal(got[0, 2], 0)
    np.testing.assert_array_equal(got[1], hidden[1, [0, 1, 6]])


def test_pooling_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match=r"\[\.\.\., T, D\]"):
    heads.last_pool(jnp.zeros((2, 5, 3)), jnp.ones((2, 4), bool))


def test_positions_from_mask():
  mask = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(heads.positions_from_mask(mask),
                                [[0, 1, 2, 2], [0, 0, 0, 1]])


def test_head_projection_normalisation_and_logit_scale():
  cfg = heads.HeadConfig(pooling="mean", proj_dim=5, max_logit_scale=100.0)
  head = heads.EmbeddingHead(16, cfg, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  hidden = jax.random.normal(jax.random.key(0), (3, 4, 16))
  mask = jnp.ones((3, 4), bool)
  out = head(hidden, mask)
  want = np.asarray(hidden).mean(1) @ np.asarray(head.proj[...])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(out, want, rtol=1e-5)
  # CLIP init: t = 1 / 0.07; SigLIP init: t = 10, b = -10 (the papers').
  np.testing.assert_allclose(head.logit_scale(), 1 / 0.07, rtol=1e-6)
  assert float(head.logit_bias[...]) == -10.0
  siglip = heads.EmbeddingHead(
      16, heads.HeadConfig(init_log_scale=heads.SIGLIP_LOG_SCALE),
      param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(siglip.logit_scale(), 10.0, rtol=1e-6)
  # The clamp: log t above log 100 reads as 100 and passes no gradient.
  head.log_logit_scale[...] = jnp.float32(math.log(500.0))
  np.testing.assert_allclose(head.logit_scale(), 100.0, rtol=1e-6)
  graphdef, state = nnx.split(head)
  pure = nnx.to_pure_dict(state)

  def scale_grad(log_t):
    p = dict(pure, log_logit_scale=jnp.float32(log_t))
    grads = jax.grad(lambda q: nnx.merge(graphdef, q).logit_scale())(p)
    return grads["log_logit_scale"]

  assert float(scale_grad(math.log(500.0))) == 0.0  # clamped: no gradient
  # Below the clamp d t / d log t = t.
  np.testing.assert_allclose(scale_grad(math.log(20.0)), 20.0, rtol=1e-5)


def test_fixed_temperature_gets_no_gradient():
  head = heads.EmbeddingHead(8, heads.HeadConfig(learn_logit_scale=False),
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  _, state = nnx.split(head)
  g = jax.grad(lambda s: nnx.merge(nnx.graphdef(head), s).logit_scale())(state)
  assert float(g["log_logit_scale"][...]) == 0.0


def test_head_config_validation():
  with pytest.raises(ValueError, match="pooling"):
    heads.HeadConfig(pooling="max")
  with pytest.raises(ValueError, match="proj_dim"):
    heads.HeadConfig(proj_dim=-1)


def jitted_encode(model):
  """``model.encode`` under jit (eager NNX calls dispatch op by op: slow)."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames="bidirectional")
  def encode(state, tokens, segment_ids, bidirectional=False):
    return nnx.merge(graphdef, state).encode(tokens, segment_ids,
                                             bidirectional=bidirectional)
  return functools.partial(encode, state)


def test_embedding_model_backbone_and_padding_invariance():
  model = heads.EmbeddingModel(CFG, heads.HeadConfig(), rngs=nnx.Rngs(3))
  plain = Transformer(CFG, rngs=nnx.Rngs(3))
  # Same seed, same backbone: LM checkpoints and fresh runs line up.
  backbone = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  del backbone["head"]
  jax.tree.map(np.testing.assert_array_equal, backbone,
               nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
  text = jnp.array([5, 9, 13, 2, 7])
  right = jnp.zeros((1, 8), jnp.int32).at[0, :5].set(text)
  left = jnp.zeros((1, 8), jnp.int32).at[0, 3:].set(text)
  seg_r = (right > 0).astype(jnp.int32)
  seg_l = (left > 0).astype(jnp.int32)
  encode = jitted_encode(model)
  for bidirectional in (False, True):
    a = encode(right, seg_r, bidirectional=bidirectional)
    b = encode(left, seg_l, bidirectional=bidirectional)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)
  # encode == last-pool of the LM's final hidden states, normalised.
  h = nnx.jit(lambda m, t, s: m(t, segment_ids=s, return_hidden=True))(
      model, right, seg_r)
  want = h[0, 4] / jnp.linalg.norm(h[0, 4])
  np.testing.assert_allclose(encode(right, seg_r)[0], want, rtol=1e-5)
  # The LM head still works: __call__ gives logits.
  graphdef, state = nnx.split(model)
  logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(right), state)
  assert logits.shape == (1, 8, CFG.vocab_size)


def test_encode_segments_equals_separate_rows():
  model = heads.EmbeddingModel(CFG, heads.HeadConfig(pooling="mean"),
                               rngs=nnx.Rngs(0))
  a, b = jnp.array([3, 4, 5]), jnp.array([6, 7, 8, 9])
  packed = jnp.concatenate([a, b, jnp.zeros(1, jnp.int32)])[None]  # [1, 8]
  segs = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
  got = nnx.jit(lambda m: m.encode_segments(packed, segs, pos,
                                            num_segments=2))(model)  # [1, 2, D]
  encode = jitted_encode(model)
  for i, text in enumerate((a, b)):
    row = jnp.zeros((1, 8), jnp.int32).at[0, :len(text)].set(text)
    want = encode(row, (row > 0).astype(jnp.int32))
    np.testing.assert_allclose(got[0, i], want[0], rtol=1e-5, atol=1e-6)
