"""Decoder-only transformer (Llama-style, prefix-LM capable) in Flax NNX.

Pre-norm blocks (RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU),
stacked on a leading ``layers`` axis and applied with ``nnx.scan`` so that
one block is compiled whatever ``n_layers`` is; each block is optionally
rematerialised with ``nnx.remat``.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models import layers
from alignax.models.config import REMAT_POLICIES, ModelConfig

# Logical name of the stacked-layers axis that nnx.vmap / nnx.scan prepend to
# the ``out_sharding`` names of every block parameter.
LAYERS_AXIS = 'layers'
_LAYERS_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}


class Block(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm_kw = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdt, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm_kw)
    self.mlp = layers.MLP(cfg.d_model, cfg.d_ff, dtype=dtype, param_dtype=pdt,
                          rngs=rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


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
                                     dtype=dtype, param_dtype=pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.partitioned_param(
          rngs, nnx.initializers.lecun_normal(), (cfg.d_model, cfg.vocab_size),
          ('embed', 'vocab'), pdt)

  def __call__(self, tokens, *, positions=None, segment_ids=None, prefix=None,
               return_hidden=False):
    """Logits or final hidden states.

    Args:
      tokens: ``[B, T]`` int token ids.
      positions: ``[B, T]`` int RoPE positions; default ``arange(T)``. Packed
        rows restart them at 0 per segment.
      segment_ids: ``[B, T]`` int, 0 = padding; default all ones.
      prefix: ``[B, T]`` bool, True inside a segment's bidirectional prefix;
        default all False (pure causal LM).
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
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if prefix is None:
      prefix = jnp.zeros((b, t), bool)
    for name, x in (('positions', positions), ('segment_ids', segment_ids),
                    ('prefix', prefix)):
      if x.shape != tokens.shape:
        raise ValueError(
            f'{name} shape {x.shape} must equal tokens shape {tokens.shape}.')
    mask = layers.make_attention_mask(segment_ids, prefix)  # [B, 1, T, T]
    h = self._apply_blocks(self.embed(tokens), positions, mask)
    h = self.final_norm(h)
    return h if return_hidden else self.logits_from_hidden(h)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """LM head on final-normed hidden states: ``[..., D] -> [..., V]`` fp32.

    Callers that cannot hold ``[B, T, V]`` apply it to chunks of ``h``.
    """
    if self.cfg.tie_embeddings:
      return self.embed.attend(h)
    dtype = jnp.dtype(self.cfg.dtype)
    return jnp.einsum('...d,dv->...v', h.astype(dtype),
                      self.lm_head[...].astype(dtype),
                      preferred_element_type=layers.at_least_f32(dtype))

  def _apply_blocks(self, x, positions, mask):
    """Scans ``x [B, T, D]`` through the stacked blocks."""

    def body(block, x):
      return block(x, positions, mask)

    if self.cfg.remat != 'none':
      # prevent_cse=False is safe (and faster) under scan, see jax.checkpoint.
      body = nnx.remat(body, policy=REMAT_POLICIES[self.cfg.remat],
                       prevent_cse=False)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_METADATA)
    def scan_blocks(x, block):
      return body(block, x)

    return scan_blocks(x, self.blocks)
