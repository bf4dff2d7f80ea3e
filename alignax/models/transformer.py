"""Decoder-only transformer (Llama-style, prefix-LM capable) in Flax NNX.

Pre-norm blocks (RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU),
stacked on a leading ``layers`` axis and applied with ``nnx.scan`` so that
one block is compiled whatever ``n_layers`` is; each block is optionally
rematerialised with ``nnx.remat``. ``ModelConfig``'s family fields add what
Qwen, Gemma and Mistral need (biases, QK-norm, GeGLU, sandwich norms,
soft-capping, sliding windows); ``Transformer.decode`` runs the same blocks
over a KV cache for generation.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import sharding
from alignax.models import attention, layers, lora
from alignax.models.config import ModelConfig, remat_policy

# Logical name of the stacked-layers axis that nnx.vmap / nnx.scan prepend to
# the ``out_sharding`` names of every block parameter.
LAYERS_AXIS = 'layers'
_LAYERS_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}
# Logical names of the residual stream [B, T, D] (see alignax.sharding): rows
# stay on their chip, so each layer's weights are gathered, not activations.
ACTIVATION_BTD = ('activation_batch', 'activation_length', 'activation_embed')


class Block(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm_kw = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdt, rngs=rngs,
                   offset=cfg.norm_offset)
    self.attn_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.mlp = layers.MLP(cfg.d_model, cfg.d_ff, dtype=dtype, param_dtype=pdt,
                          rngs=rngs, activation=cfg.mlp_activation,
                          adapters=lora.spec_of(cfg), quantized=cfg.quant)
    if cfg.post_norms:
      self.post_attn_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
      self.post_mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.post_norms = cfg.post_norms

  def __call__(self, x, positions, mask):
    x = self._add_attention(x, self.attn(self.attn_norm(x), positions, mask))
    return self._add_mlp(x)

  def decode(self, x, positions, mask, k_cache, v_cache, index):
    """The block over a KV cache, see ``Attention.decode``."""
    out, k_cache, v_cache = self.attn.decode(
        self.attn_norm(x), positions, mask, k_cache, v_cache, index)
    return self._add_mlp(self._add_attention(x, out)), k_cache, v_cache

  def _add_attention(self, x, out):
    return x + (self.post_attn_norm(out) if self.post_norms else out)

  def _add_mlp(self, x):
    out = self.mlp(self.mlp_norm(x))
    return x + (self.post_mlp_norm(out) if self.post_norms else out)


class Transformer(nnx.Module):
  """Decoder-only LM over packed rows with optional bidirectional prefixes.

  Example::

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)  # [B, T, 64] float32
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                              param_dtype=pdt, rngs=rngs)

    # One Block whose params have a leading [n_layers] axis, each layer with
    # its own init key.
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                                     dtype=dtype, param_dtype=pdt, rngs=rngs,
                                     offset=cfg.norm_offset)
    if not cfg.tie_embeddings:
      self.lm_head = layers.partitioned_param(
          rngs, nnx.initializers.lecun_normal(), (cfg.d_model, cfg.vocab_size),
          ('embed', 'vocab'), pdt)

  def __call__(self, tokens, *, positions=None, segment_ids=None, prefix=None,
               attend_to=None, return_hidden=False):
    """Logits or final hidden states.

    Args:
      tokens: ``[B, T]`` int token ids.
      positions: ``[B, T]`` int RoPE positions; default ``arange(T)``. Packed
        rows restart them at 0 per segment.
      segment_ids: ``[B, T]`` int, 0 = padding; default all ones.
      prefix: ``[B, T]`` bool, True inside a segment's bidirectional prefix;
        default all False (pure causal LM).
      attend_to: ``[B, T]`` int, one more (earlier) segment each token may
        attend, 0 = none (see ``layers.make_attention_mask``); default none.
        Shared-prompt preference batches point responses at their prompt.
      return_hidden: return the final-normed hidden states instead of logits.

    Returns:
      ``[B, T, V]`` float32 logits, or ``[B, T, D]`` hidden states in the
      compute dtype when ``return_hidden``.
    """
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [B, T], got shape {tokens.shape}.')
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    for name, x in (('positions', positions), ('segment_ids', segment_ids),
                    ('prefix', prefix), ('attend_to', attend_to)):
      if x is not None and x.shape != tokens.shape:
        raise ValueError(
            f'{name} shape {x.shape} must equal tokens shape {tokens.shape}.')
    # The mask's [B, T] ingredients, not the [B, 1, T, T] mask: the blockwise
    # paths build it tile by tile (None = default, lets 'auto' pick splash or
    # cuDNN), only the reference paths expand it (layers.Attention).
    mask = attention.MaskInfo(segment_ids, positions, prefix, attend_to)
    h = self._apply_blocks(self._embed(tokens), positions, mask)
    h = sharding.constrain(self.final_norm(h), ACTIVATION_BTD)
    return h if return_hidden else self.logits_from_hidden(h)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """LM head on final-normed hidden states: ``[..., D] -> [..., V]`` fp32.

    Callers that cannot hold ``[B, T, V]`` apply it to chunks of ``h``.
    """
    if self.cfg.tie_embeddings:
      logits = sharding.gather_params(self.embed, self.cfg.dtype).attend(h)
    else:
      dtype = jnp.dtype(self.cfg.dtype)
      head = sharding.gather(self.lm_head[...].astype(dtype), ('embed', 'vocab'))
      logits = jnp.einsum('...d,dv->...v', h.astype(dtype), head,
                          preferred_element_type=layers.at_least_f32(dtype))
    # Leading axis rows, then positions; vocab split over tensor only.
    names = (('activation_batch',) + ('activation_length',) * (logits.ndim - 2)
             + ('activation_vocab',))
    logits = sharding.constrain(logits, names[-logits.ndim:])
    cap = self.cfg.final_logit_softcap
    return cap * jnp.tanh(logits / cap) if cap else logits

  def decode(self, tokens, cache, *, positions):
    """Logits of ``T`` new tokens attending over a KV cache, and the cache.

    Prefill passes the (left-padded) prompts, a decode step one token per
    row. The new keys/values go to slots ``[cache['index'], + T)``; a query
    at position ``p`` sees every filled slot of its row at a position
    ``<= p`` (within its layer's sliding window), so rows must be written in
    increasing positions, one sequence per row, causally (no prefix-LM).

    Args:
      tokens: ``[B, T]`` int token ids.
      cache: from :func:`init_cache` or the previous call.
      positions: ``[B, T]`` int RoPE positions; ``-1`` marks padding, whose
        slots are never attended.

    Returns:
      ``([B, T, V] float32 logits, updated cache)``.
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
      raise ValueError(f'tokens {tokens.shape} and positions '
                       f'{positions.shape} must both be [B, T].')
    index, positions = cache['index'], positions.astype(jnp.int32)
    k_pos = jax.lax.dynamic_update_slice_in_dim(
        cache['positions'], positions, index, axis=1)  # [B, S]
    visible = ((k_pos[:, None, :] >= 0)
               & (k_pos[:, None, :] <= positions[:, :, None]))  # [B, T, S]
    rope_positions = jnp.maximum(positions, 0)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=(nnx.Carry, 0, 0),
              transform_metadata=_LAYERS_METADATA)
    def scan_blocks(x, block, k, v, window):
      mask = self._window_mask(visible[:, None], positions, k_pos, window)
      block = sharding.gather_params(block, self.cfg.dtype)
      x, k, v = block.decode(x, rope_positions, mask, k, v, index)
      return sharding.constrain(x, ACTIVATION_BTD), k, v

    x, k, v = scan_blocks(self._embed(tokens), self.blocks, cache['k'],
                          cache['v'], self._windows())
    logits = self.logits_from_hidden(self.final_norm(x))
    return logits, dict(k=k, v=v, positions=k_pos,
                        index=index + tokens.shape[1])

  def _embed(self, tokens):
    x = sharding.gather_params(self.embed, self.cfg.dtype)(tokens)
    if self.cfg.embed_scale:
      # sqrt(D) rounded to the compute dtype, as Hugging Face's Gemma does.
      x = x * jnp.asarray(math.sqrt(self.cfg.d_model), x.dtype)
    return sharding.constrain(x, ACTIVATION_BTD)

  def _windows(self):
    """``[L]`` int32 sliding-window length per layer, 0 = full."""
    return jnp.asarray(self.cfg.layer_windows or (0,) * self.cfg.n_layers,
                       jnp.int32)

  def _window_mask(self, mask, q_positions, k_positions, window):
    """Decode's ``mask`` limited to keys less than ``window`` positions back."""
    if not self.cfg.layer_windows:
      return mask
    near = (q_positions[:, :, None] - k_positions[:, None, :]) < window
    return mask & ((window == 0) | near)[:, None]  # [B, 1, T, S]

  def _apply_blocks(self, x, positions, mask):
    """Scans ``x [B, T, D]`` through the stacked blocks (``mask``: MaskInfo)."""
    # LoRA dropout in a train step: one key per layer, scanned alongside.
    step_key = lora.step_dropout_rng()
    if step_key is not None and not lora.uses_dropout(self.blocks):
      step_key = None
    keys = (jnp.zeros((self.cfg.n_layers,), jnp.int32) if step_key is None
            else jax.random.split(step_key, self.cfg.n_layers))

    def body(block, x, window, key):
      # ZeRO-3: this layer's weights are gathered whole, rows stay put.
      block = sharding.gather_params(block, self.cfg.dtype)
      layer_mask = mask._replace(window=window) if self.cfg.layer_windows else (
          mask)
      with lora.layer_rng(None if step_key is None else key):
        x = block(sharding.constrain(x, ACTIVATION_BTD), positions, layer_mask)
      return sharding.constrain(x, ACTIVATION_BTD)

    if self.cfg.remat != 'none':
      # prevent_cse=False is safe (and faster) under scan, see jax.checkpoint.
      body = nnx.remat(body, policy=remat_policy(self.cfg.remat),
                       prevent_cse=False)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_METADATA,
              unroll=1 if self.cfg.scan_layers else True)
    def scan_blocks(x, block, window, key):
      return body(block, x, window, key)

    return scan_blocks(x, self.blocks, self._windows(), keys)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache for :meth:`Transformer.decode`.

  Args:
    cfg: the model's config.
    batch: rows ``B``.
    length: slots ``S`` (prompt plus generated tokens).
    dtype: storage dtype of keys and values; default the compute dtype.

  Returns:
    dict with ``k``, ``v``: ``[L, B, S, K, Dh]`` zeros; ``positions``:
    ``[B, S]`` int32 ``-1`` (empty); ``index``: int32 0, the next slot.
  """
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              positions=jnp.full((batch, length), -1, jnp.int32),
              index=jnp.zeros((), jnp.int32))
