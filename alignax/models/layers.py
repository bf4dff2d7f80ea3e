"""Building blocks of the decoder: RMSNorm, embedding, RoPE, GQA attention, MLP.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``, ``norm``) in its ``out_sharding``
metadata; ``alignax.sharding`` maps them to mesh axes. Parameters are stored
in ``param_dtype`` and cast to the compute ``dtype`` where they are used.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from alignax import sharding
from alignax.models import attention
from alignax.models import lora
from alignax.models import quant
# Re-exported: the mask's definition lives next to the blockwise attention.
from alignax.models.attention import make_attention_mask  # noqa: F401
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

  .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot (s + o)

  ``offset`` ``o`` is 0 (Llama) or 1 (Gemma stores ``w = s - 1``); the scale
  is initialised so that ``s + o = 1``.

  References:
    Zhang & Sennrich, 2019, Root Mean Square Layer Normalization.
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs, offset: float = 0.0):
    self.scale = partitioned_param(rngs, _init.constant(1.0 - offset), (dim,),
                                   ('norm',), param_dtype)
    self.eps = eps
    self.dtype = dtype
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(at_least_f32(x.dtype))
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(x32.dtype)
    if self.offset:
      scale = scale + self.offset
    return (x32 * inv_rms * scale).astype(self.dtype)


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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, *,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  r"""Rotary position embedding, half-split (GPT-NeoX / MaxText) layout.

  Dimension pairs ``(i, i + Dh/2)`` are rotated by the angle
  :math:`p\,\theta^{-2i/D_h}`, so :math:`\langle R_p q, R_s k\rangle` depends
  on ``p - s`` only. This is Hugging Face's ``rotate_half`` layout (its Llama
  conversion permutes q/k rows into it), so their kernels load unpermuted.

  Args:
    x: ``[B, T, N, Dh]`` queries or keys.
    positions: ``[B, T]`` integer positions (restart at 0 per packed segment).
    theta: base wavelength.
    inv_freq: optional ``[Dh/2]`` frequencies replacing ``theta``'s, e.g. the
      scaled ones of :func:`rope_frequencies`.

  Returns:
    rotated ``x``, same shape and dtype.

  References:
    Su et al., 2021, RoFormer: Enhanced Transformer with Rotary Position
    Embedding.
  """
  half, f32 = x.shape[-1] // 2, at_least_f32(x.dtype)
  if inv_freq is None:
    inv_freq = theta ** (-jnp.arange(half, dtype=f32) / half)  # [Dh/2]
  else:
    inv_freq = jnp.asarray(inv_freq, f32)
  angles = positions.astype(f32)[..., None] * inv_freq  # [B, T, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, *, scaling: str = 'none',
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
  r"""RoPE inverse frequencies ``[Dh/2]`` (float32), optionally rescaled.

  ``'none'``: :math:`\theta^{-2i/D_h}`. ``'linear'`` (position
  interpolation) divides them all by ``factor``. ``'llama3'`` divides only
  the low frequencies (wavelength above ``original_max_len /
  low_freq_factor``) by ``factor``, keeps the high ones (wavelength below
  ``original_max_len / high_freq_factor``) and interpolates in between,
  following Hugging Face's ``_compute_llama3_parameters``.

  References:
    Chen et al., 2023, Extending Context Window of Large Language Models via
    Positional Interpolation; Meta, 2024, The Llama 3 Herd of Models.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
  if scaling == 'none':
    return inv_freq
  if scaling == 'linear':
    return (inv_freq / np.float32(factor)).astype(np.float32)
  if scaling != 'llama3':
    raise ValueError(f'unknown RoPE scaling {scaling!r}.')
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_max_len / low_freq_factor
  high_freq_wavelen = original_max_len / high_freq_factor
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = ((original_max_len / wavelen - low_freq_factor)
            / (high_freq_factor - low_freq_factor))
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """``x`` contracted over its last ``n_in`` axes with ``w``'s first ``n_in``.

  Computed as one 2-D matmul ``[rows, in] @ [in, out]``: the leading axes
  of ``x`` and the trailing axes of ``w`` are merged first (free reshapes of
  contiguous axes). Mathematically the einsum ``'...i,io->...o'``, but XLA
  on CPU lays out the backward of a 3-D einsum badly: the weight gradient
  contracts over both batch and sequence, and the layout pass transposes the
  ``[B, T, F]`` cotangent into a copy before the dot. In the DPO benchmark
  step those copies were 21% of the thread time (profiled); on the 2-D form
  they are gone (``benchmarks/RESULTS.md``, "2-D projections").
  """
  lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
  k = math.prod(w.shape[:n_in])
  y = x.reshape(math.prod(lead), k) @ w.reshape(k, math.prod(out))
  return y.reshape(*lead, *out)


def fused_attention(q, k, v, mask, *, implementation=None, scale=None):
  """``jax.nn.dot_product_attention`` (GQA natively): ``-> [B, T, H, Dh]``."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation=implementation)


def einsum_attention(q, k, v, mask, *, scale=None, softcap=0.0):
  r"""Reference GQA attention with an explicit float32 softmax.

  .. math:: o = \mathrm{softmax}(c \tanh(a\,q k^T / c) + m) v

  with scale :math:`a = 1/\sqrt{D_h}` by default and the Gemma 2 soft-cap
  ``c`` only when ``softcap > 0``. Query head ``h`` reads key/value head
  ``h // (H / K)``, as in ``jax.nn.dot_product_attention``.

  Args:
    q: ``[B, T, H, Dh]``; k, v: ``[B, S, K, Dh]``; mask: ``[B, 1, T, S]`` bool.
    scale: score scale ``a``; None = ``1 / sqrt(Dh)``.
    softcap: score soft-cap ``c``; 0 = none.

  Returns:
    ``[B, T, H, Dh]`` in ``q.dtype``.
  """
  b, t, h, dh = q.shape
  kv_heads, dtype, f32 = k.shape[2], q.dtype, at_least_f32(q.dtype)
  q = q.astype(f32).reshape(b, t, kv_heads, h // kv_heads, dh)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(f32))
  if scale is None:
    logits = logits / math.sqrt(dh)  # [B, K, G, T, S]
  else:
    logits = logits * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  # Same finite fill value as jax.nn.dot_product_attention.
  fill = -0.7 * jnp.finfo(jnp.float32).max
  logits = jnp.where(mask[:, :, None], logits, fill)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v.astype(f32))
  return out.reshape(b, t, h, dh).astype(dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; optional q/k/v biases, QK-norm.

  ``__call__`` attends within the given rows (training, scoring); ``decode``
  writes the new keys and values into a KV cache and attends over it.
  """

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
    lora.make_adapters(self, lora.spec_of(cfg), {
        'q': ((d, h, dh), ('embed', 'heads', 'head_dim'), 1),
        'k': ((d, kv, dh), ('embed', 'kv_heads', 'head_dim'), 1),
        'v': ((d, kv, dh), ('embed', 'kv_heads', 'head_dim'), 1),
        'o': ((h, dh, d), ('heads', 'head_dim', 'embed'), 2),
    }, param_dtype=pdt, rngs=rngs)
    quant.quantize_kernels(self, cfg.quant, {
        'q': (('embed', 'heads', 'head_dim'), 1),
        'k': (('embed', 'kv_heads', 'head_dim'), 1),
        'v': (('embed', 'kv_heads', 'head_dim'), 1),
        'o': (('heads', 'head_dim', 'embed'), 2),
    })
    if cfg.qkv_bias:
      self.q_bias = partitioned_param(rngs, _init.zeros, (h, dh),
                                      ('heads', 'head_dim'), pdt)
      self.k_bias = partitioned_param(rngs, _init.zeros, (kv, dh),
                                      ('kv_heads', 'head_dim'), pdt)
      self.v_bias = partitioned_param(rngs, _init.zeros, (kv, dh),
                                      ('kv_heads', 'head_dim'), pdt)
    self.dtype = jnp.dtype(cfg.dtype)
    if cfg.qk_norm:
      norm_kw = dict(eps=cfg.norm_eps, dtype=self.dtype, param_dtype=pdt,
                     rngs=rngs, offset=cfg.norm_offset)
      self.q_norm = RMSNorm(dh, **norm_kw)
      self.k_norm = RMSNorm(dh, **norm_kw)
    self.rope_theta = cfg.rope_theta
    self.attention = cfg.attention
    self.attention_impl = cfg.attention_impl
    self.cfg = cfg

  def __call__(self, x, positions, mask: attention.MaskInfo):
    """``x [B, T, D]``, ``positions [B, T]``; ``mask``'s ingredients ``[B, T]``.

    ``cfg.attention`` picks the path (see ``attention.resolve_attention``);
    only ``'reference'`` and ``'fused'`` build the ``[B, 1, T, T]`` mask.
    """
    q, k, v = self._project(x, positions)
    cfg, scale = self.cfg, self.cfg.attn_scale or None
    softcap = cfg.attn_logit_softcap
    path = attention.resolve_attention(
        cfg.attention, mask, seq_len=x.shape[1], dtype=self.dtype,
        head_dim=cfg.head_dim, softcap=softcap)

    def attend(q, k, v, mask):
      if path == 'blockwise':
        return attention.blockwise_attention(q, k, v, mask, scale=scale,
                                             softcap=softcap)
      if path == 'splash':
        return attention.splash_attention(q, k, v, mask, scale=scale,
                                          softcap=softcap)
      if path == 'cudnn':
        return attention.cudnn_attention(q, k, v, mask, scale=scale)
      return self._attend(q, k, v, attention.dense_mask(mask))

    # Each chip attends its own rows (and heads) under a mesh: GSPMD cannot
    # see through the kernels' loops and would gather every row.
    return self._output(sharding.per_row_shards(attend)(q, k, v, mask))

  def decode(self, x, positions, mask, k_cache, v_cache, index):
    """Attends ``T`` new tokens over a KV cache after writing theirs into it.

    Args:
      x: ``[B, T, D]`` inputs of the new tokens.
      positions: ``[B, T]`` their RoPE positions.
      mask: ``[B, 1, T, S]`` bool, visible cache slots (the new ones included).
      k_cache, v_cache: ``[B, S, K, Dh]`` this layer's cache.
      index: int scalar, the slot of the first new token.

    Returns:
      ``([B, T, D] output, k_cache, v_cache)`` with the new slots written.
    """
    q, k, v = self._project(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        k_cache, k.astype(k_cache.dtype), index, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        v_cache, v.astype(v_cache.dtype), index, axis=1)
    out = self._attend(q, k_cache.astype(self.dtype),
                       v_cache.astype(self.dtype), mask)
    return self._output(out), k_cache, v_cache

  def _project(self, x, positions):
    """q ``[B, T, H, Dh]``, k and v ``[B, T, K, Dh]``, RoPE applied."""
    cfg, x = self.cfg, x.astype(self.dtype)
    d = (cfg.d_model,)
    q = dense(x, quant.kernel(self, 'q', self.dtype, d))  # [B, T, H, Dh]
    k = dense(x, quant.kernel(self, 'k', self.dtype, d))
    v = dense(x, quant.kernel(self, 'v', self.dtype, d))
    # Named for the remat policies (ModelConfig.remat, MaxText's names).
    q = checkpoint_name(lora.add(self, 'q', q, x, self.dtype), 'query_proj')
    k = checkpoint_name(lora.add(self, 'k', k, x, self.dtype), 'key_proj')
    v = checkpoint_name(lora.add(self, 'v', v, x, self.dtype), 'value_proj')
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(self.dtype)
      k = k + self.k_bias[...].astype(self.dtype)
      v = v + self.v_bias[...].astype(self.dtype)
    if cfg.qk_norm:  # Per head, before RoPE (Qwen3).
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = None
    if cfg.rope_scaling != 'none':
      inv_freq = rope_frequencies(
          cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling,
          factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
          high_freq_factor=cfg.rope_high_freq_factor,
          original_max_len=cfg.rope_original_max_len)
    q = apply_rope(q, positions, self.rope_theta, inv_freq=inv_freq)
    k = apply_rope(k, positions, self.rope_theta, inv_freq=inv_freq)
    return q, k, v

  def _attend(self, q, k, v, mask):
    """Attention under an explicit mask: ``'fused'``, else the reference."""
    scale = self.cfg.attn_scale or None
    if self.attention == 'fused' or (
        self.attention in ('auto', 'blockwise', 'splash', 'cudnn')
        and not self.cfg.attn_logit_softcap):
      return fused_attention(q, k, v, mask, implementation=self.attention_impl,
                             scale=scale)
    return einsum_attention(q, k, v, mask, scale=scale,
                            softcap=self.cfg.attn_logit_softcap)

  def _output(self, out):
    out = checkpoint_name(out, 'context')
    o = quant.kernel(self, 'o', self.dtype, out.shape[2:])
    y = dense(out, o, n_in=2)  # [B, T, H, Dh] x [H, Dh, D]
    return checkpoint_name(lora.add(self, 'o', y, out, self.dtype), 'out_proj')


_ACTIVATIONS = {
    'silu': jax.nn.silu,
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):
  r"""Gated feed-forward: :math:`W_d(f(x W_g) \odot x W_u)`.

  ``f`` is silu (SwiGLU, the default) or a gelu (GeGLU, Gemma).

  References:
    Shazeer, 2020, GLU Variants Improve Transformer.
  """

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, activation: str = 'silu',
               adapters: lora.LoraSpec | None = None, quantized: str = 'none'):
    init = _init.lecun_normal()
    self.gate = partitioned_param(rngs, init, (dim, hidden), ('embed', 'mlp'),
                                  param_dtype)
    self.up = partitioned_param(rngs, init, (dim, hidden), ('embed', 'mlp'),
                                param_dtype)
    self.down = partitioned_param(rngs, init, (hidden, dim), ('mlp', 'embed'),
                                  param_dtype)
    lora.make_adapters(self, adapters, {
        'gate': ((dim, hidden), ('embed', 'mlp'), 1),
        'up': ((dim, hidden), ('embed', 'mlp'), 1),
        'down': ((hidden, dim), ('mlp', 'embed'), 1),
    }, param_dtype=param_dtype, rngs=rngs)
    quant.quantize_kernels(self, quantized, {
        'gate': (('embed', 'mlp'), 1), 'up': (('embed', 'mlp'), 1),
        'down': (('mlp', 'embed'), 1)})
    self.dtype = dtype
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    w = lambda name, rows: quant.kernel(self, name, self.dtype, (rows,))
    d = x.shape[-1]
    gate = checkpoint_name(lora.add(self, 'gate', dense(x, w('gate', d)), x,
                                    self.dtype), 'mlpwi_0')  # [B, T, F]
    up = checkpoint_name(lora.add(self, 'up', dense(x, w('up', d)), x,
                                  self.dtype), 'mlpwi_1')
    hidden = _ACTIVATIONS[self.activation](gate) * up
    return checkpoint_name(
        lora.add(self, 'down', dense(hidden, w('down', hidden.shape[-1])),
                 hidden, self.dtype), 'mlpwo')
