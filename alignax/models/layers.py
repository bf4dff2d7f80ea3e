"""Building blocks of the decoder: RMSNorm, embedding, RoPE, GQA attention, MLP.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``, ``norm``) in its ``out_sharding``
metadata; ``alignax.sharding`` maps them to mesh axes. Parameters are stored
in ``param_dtype`` and cast to the compute ``dtype`` where they are used.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models.config import ModelConfig

_init = nnx.initializers


def at_least_f32(dtype):
  """float32 for low-precision dtypes, float64 kept (for gradient tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def partitioned_param(rngs, initializer, shape, names, dtype):
  """A Param holding ``initializer(key, shape, dtype)`` named ``names``.

  ``eager_sharding=False`` keeps the names as metadata only, so the model can
  be built without a mesh (tests, notebooks, ``jax.eval_shape``); shardings
  are derived from the names afterwards and applied by ``jax.jit``.
  """
  init = nnx.with_partitioning(initializer, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
  r"""Root-mean-square layer norm, computed in float32.

  .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot s

  References:
    Zhang & Sennrich, 2019, Root Mean Square Layer Normalization.
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.scale = partitioned_param(rngs, _init.ones, (dim,), ('norm',),
                                   param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(at_least_f32(x.dtype))
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale[...].astype(x32.dtype)).astype(
        self.dtype)


class Embed(nnx.Module):
  """Token embedding ``[V, D]``; ``attend`` is the tied LM head."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    # std 1/sqrt(D) keeps tied logits h @ E^T of order one at init.
    self.embedding = partitioned_param(
        rngs, _init.normal(1.0 / math.sqrt(dim)), (vocab_size, dim),
        ('vocab', 'embed'), param_dtype)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Float32 logits ``x @ E^T``: ``[..., D] -> [..., V]``."""
    return jnp.einsum('...d,vd->...v', x.astype(self.dtype),
                      self.embedding[...].astype(self.dtype),
                      preferred_element_type=at_least_f32(self.dtype))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  r"""Rotary position embedding, half-split (GPT-NeoX / MaxText) layout.

  Dimension pairs ``(i, i + Dh/2)`` are rotated by the angle
  :math:`p\,\theta^{-2i/D_h}`, so :math:`\langle R_p q, R_s k\rangle` depends
  on ``p - s`` only.

  Args:
    x: ``[B, T, N, Dh]`` queries or keys.
    positions: ``[B, T]`` integer positions (restart at 0 per packed segment).
    theta: base wavelength.

  Returns:
    rotated ``x``, same shape and dtype.

  References:
    Su et al., 2021, RoFormer: Enhanced Transformer with Rotary Position
    Embedding.
  """
  half, f32 = x.shape[-1] // 2, at_least_f32(x.dtype)
  inv_freq = theta ** (-jnp.arange(half, dtype=f32) / half)  # [Dh/2]
  angles = positions.astype(f32)[..., None] * inv_freq  # [B, T, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def make_attention_mask(segment_ids: jax.Array,
                        prefix: jax.Array) -> jax.Array:
  """Boolean attention mask for packed, prefix-LM rows.

  Query ``i`` attends key ``j`` iff both are in the same non-padding segment
  and ``j <= i`` or both are in that segment's bidirectional prefix. Padding
  queries (segment 0) attend only to themselves so that their softmax is
  finite; their outputs are garbage that the loss masks away.

  Args:
    segment_ids: ``[B, T]`` int, 0 marks padding.
    prefix: ``[B, T]`` bool, True inside the bidirectional prefix.

  Returns:
    ``[B, 1, T, T]`` bool mask, True where attention is allowed.
  """
  if segment_ids.shape != prefix.shape or segment_ids.ndim != 2:
    raise ValueError(
        f'segment_ids {segment_ids.shape} and prefix {prefix.shape} must both '
        'be [B, T].')
  t = segment_ids.shape[1]
  same_segment = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                  & (segment_ids[:, :, None] != 0))  # [B, T, T]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  both_prefix = prefix[:, :, None] & prefix[:, None, :]  # [B, T, T]
  mask = (same_segment & (causal | both_prefix)) | jnp.eye(t, dtype=bool)
  return mask[:, None]


def fused_attention(q, k, v, mask, *, implementation=None):
  """``jax.nn.dot_product_attention`` (GQA natively): ``-> [B, T, H, Dh]``."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                      implementation=implementation)


def einsum_attention(q, k, v, mask):
  r"""Reference GQA attention with an explicit float32 softmax.

  .. math:: o = \mathrm{softmax}(q k^T / \sqrt{D_h} + m) v

  Query head ``h`` reads key/value head ``h // (H / K)``, as in
  ``jax.nn.dot_product_attention``.

  Args:
    q: ``[B, T, H, Dh]``; k, v: ``[B, S, K, Dh]``; mask: ``[B, 1, T, S]`` bool.

  Returns:
    ``[B, T, H, Dh]`` in ``q.dtype``.
  """
  b, t, h, dh = q.shape
  kv_heads, dtype, f32 = k.shape[2], q.dtype, at_least_f32(q.dtype)
  q = q.astype(f32).reshape(b, t, kv_heads, h // kv_heads, dh)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(f32))
  logits = logits / math.sqrt(dh)  # [B, K, G, T, S]
  # Same finite fill value as jax.nn.dot_product_attention.
  fill = -0.7 * jnp.finfo(jnp.float32).max
  logits = jnp.where(mask[:, :, None], logits, fill)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v.astype(f32))
  return out.reshape(b, t, h, dh).astype(dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and no biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    in_init = _init.lecun_normal(in_axis=0, out_axis=(1, 2))
    out_init = _init.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.q = partitioned_param(rngs, in_init, (d, h, dh),
                               ('embed', 'heads', 'head_dim'), pdt)
    self.k = partitioned_param(rngs, in_init, (d, kv, dh),
                               ('embed', 'kv_heads', 'head_dim'), pdt)
    self.v = partitioned_param(rngs, in_init, (d, kv, dh),
                               ('embed', 'kv_heads', 'head_dim'), pdt)
    self.o = partitioned_param(rngs, out_init, (h, dh, d),
                               ('heads', 'head_dim', 'embed'), pdt)
    self.dtype = jnp.dtype(cfg.dtype)
    self.rope_theta = cfg.rope_theta
    self.attention = cfg.attention
    self.attention_impl = cfg.attention_impl

  def __call__(self, x, positions, mask):
    """``x [B, T, D]``, ``positions [B, T]``, ``mask [B, 1, T, T]``."""
    x = x.astype(self.dtype)
    q = jnp.einsum('btd,dhk->bthk', x, self.q[...].astype(self.dtype))
    k = jnp.einsum('btd,dhk->bthk', x, self.k[...].astype(self.dtype))
    v = jnp.einsum('btd,dhk->bthk', x, self.v[...].astype(self.dtype))
    q = apply_rope(q, positions, self.rope_theta)  # [B, T, H, Dh]
    k = apply_rope(k, positions, self.rope_theta)  # [B, T, K, Dh]
    if self.attention == 'fused':
      out = fused_attention(q, k, v, mask, implementation=self.attention_impl)
    else:
      out = einsum_attention(q, k, v, mask)
    return jnp.einsum('bthk,hkd->btd', out, self.o[...].astype(self.dtype))


class MLP(nnx.Module):
  r"""SwiGLU feed-forward: :math:`W_d(\mathrm{silu}(x W_g) \odot x W_u)`.

  References:
    Shazeer, 2020, GLU Variants Improve Transformer.
  """

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    init = _init.lecun_normal()
    self.gate = partitioned_param(rngs, init, (dim, hidden), ('embed', 'mlp'),
                                  param_dtype)
    self.up = partitioned_param(rngs, init, (dim, hidden), ('embed', 'mlp'),
                                param_dtype)
    self.down = partitioned_param(rngs, init, (hidden, dim), ('mlp', 'embed'),
                                  param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    gate = x @ self.gate[...].astype(self.dtype)  # [B, T, F]
    up = x @ self.up[...].astype(self.dtype)
    return (jax.nn.silu(gate) * up) @ self.down[...].astype(self.dtype)
