"""The ModelConfig fields that Qwen, Gemma, Mistral and Llama 3 need.

End-to-end agreement with each family's transformers implementation is in
tests/interop/test_hf_parity.py; these check the pieces on their own.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import models
from alignax.models import layers

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)


@pytest.mark.parametrize('field, value', [
    ('mlp_activation', 'relu'), ('rope_scaling', 'yarn'),
    ('layer_windows', (4,)), ('layer_windows', (4, -1)),
    ('attn_logit_softcap', 2.0), ('final_logit_softcap', -1.0),
])
def test_config_validation_names_field(field, value):
  with pytest.raises(ValueError, match=f'ModelConfig.{field}'):
    # 'fused' (jax.nn.dot_product_attention) cannot soft-cap.
    dataclasses.replace(CFG, attention='fused', **{field: value})


def test_layer_windows_become_a_hashable_tuple():
  cfg = dataclasses.replace(CFG, layer_windows=[4, 0])
  assert cfg.layer_windows == (4, 0) and hash(cfg)


@pytest.mark.parametrize('overrides', [
    dict(qkv_bias=True), dict(qk_norm=True), dict(post_norms=True),
    dict(qkv_bias=True, qk_norm=True, post_norms=True, tie_embeddings=True),
])
def test_num_params_matches_module(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  state = nnx.state(
      nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))),
      nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()
  # By hand, on top of CFG's 22688 (test_transformer): biases
  # 2 * (4 + 2 + 2) * 8 = 128; QK-norm 2 * 2 * 8 = 32; post norms 2 * 2 * 32
  # = 128; tying removes 32 * 64 = 2048.
  extra = {'qkv_bias': 128, 'qk_norm': 32, 'post_norms': 128,
           'tie_embeddings': -2048}
  assert cfg.num_params() == 22688 + sum(extra[k] for k in overrides)


def test_rope_frequencies_hand_computed():
  np.testing.assert_allclose(layers.rope_frequencies(8, 1e4),
                             [1, 0.1, 0.01, 0.001], rtol=1e-6)
  np.testing.assert_allclose(
      layers.rope_frequencies(8, 1e4, scaling='linear', factor=4.0),
      [0.25, 0.025, 0.0025, 0.00025], rtol=1e-6)
  # llama3, original length 8, low/high factors 1/4: wavelengths 2 pi / f =
  # [6.28, 62.8, 628, 6283]; 6.28 lies in [8/4, 8/1] so it is smoothed with
  # s = (8 / 6.2832 - 1) / 3 = 0.091080: (1 - s) / 8 + s = 0.204695; the
  # others exceed 8 and are divided by the factor 8.
  np.testing.assert_allclose(
      layers.rope_frequencies(8, 1e4, scaling='llama3', factor=8.0,
                              low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_len=8),
      [0.204695, 0.0125, 0.00125, 0.000125], rtol=1e-5)


def test_rmsnorm_offset_multiplies_by_one_plus_scale():
  norm = layers.RMSNorm(4, eps=0.0, dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0), offset=1.0)
  np.testing.assert_array_equal(norm.scale[...], np.zeros(4))  # 1 + 0 = 1
  norm.scale[...] = jnp.array([0.0, 1.0, -0.5, 2.0])
  x = np.array([1.0, -2.0, 3.0, 4.0], np.float32)
  expected = x / np.sqrt(np.mean(x**2)) * np.array([1.0, 2.0, 0.5, 3.0])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-6)


def test_einsum_attention_scale_and_softcap_match_numpy():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
  k, v = rng.normal(size=(2, 1, 5, 1, 4)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None, None]
  out = layers.einsum_attention(q, k, v, mask, scale=0.7, softcap=1.5)
  for h in range(2):
    s = q[0, :, h] @ k[0, :, 0].T * 0.7
    s = 1.5 * np.tanh(s / 1.5)
    s = np.where(mask[0, 0], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, :, h], p @ v[0, :, 0], rtol=1e-5,
                               atol=1e-6)


def test_sliding_windows_bound_the_receptive_field():
  # Window 2 on both layers: a layer sees positions i-1 and i, so two layers
  # see i-2..i. A change at position 3 reaches 3, 4, 5 and nothing later.
  cfg = dataclasses.replace(CFG, layer_windows=(2, 2))
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 64, (1, 10))
  changed = tokens.copy()
  changed[0, 3] = (changed[0, 3] + 1) % 64
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  diff = np.abs(forward(params, changed) - forward(params, tokens)).max(-1)[0]
  assert (diff[:3] == 0).all() and (diff[3:6] > 1e-6).all()
  assert (diff[6:] == 0).all()


def test_final_softcap_and_embed_scale():
  cfg = dataclasses.replace(CFG, final_logit_softcap=2.0, embed_scale=True)
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  plain = models.Transformer(CFG, rngs=nnx.Rngs(0))  # the same weights
  tokens = jnp.arange(8)[None]
  logits = model(tokens)
  assert float(jnp.abs(logits).max()) < 2.0
  # Scaling every embedding by sqrt(32) is the same as scaling the weights.
  plain.embed.embedding[...] = plain.embed.embedding[...] * np.sqrt(32.0)
  np.testing.assert_allclose(
      logits, 2.0 * np.tanh(np.asarray(plain(tokens)) / 2.0), atol=1e-5)
