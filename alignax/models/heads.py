"""Embedding heads on the shared backbone: pooling, projection, temperature.

Pooling lives here (not in ``alignax.policy``) because it is part of the
embedding model: pure functions from final hidden states ``[..., T, D]`` and a
token mask ``[..., T]`` to one vector per row, ``[..., D]``. Each is a
weighted sum of the hidden states with per-token weights (a one-hot for
``last`` / ``first``, the normalised mask for ``mean``), so

* left and right padding need no special case: the mask says where the text
  is, e.g. ``last`` reads position ``T - 1`` of a left-padded row and the
  last non-padding position of a right-padded one;
* packed rows (several texts per row) pool every segment at once: pass the
  per-segment masks of :func:`segment_masks`, ``[B, S, T]``, with the hidden
  states broadcast as ``[B, 1, T, D]``; the result is ``[B, S, D]``;
* a row with an empty mask pools to zeros.

:class:`EmbeddingModel` is the :class:`~alignax.models.Transformer` plus an
:class:`EmbeddingHead` (attribute ``head``). Its parameter tree is the
transformer's plus ``head``, so an LM checkpoint restores into it (the head
keeps its fresh initialisation), its ``__call__`` still returns LM logits (the
LM objective and CAFe-style joint training run on it unchanged), and the
backbone of a fresh ``EmbeddingModel`` equals a fresh ``Transformer`` built
with the same seed.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import sharding
from alignax.models import layers
from alignax.models.config import ModelConfig
from alignax.models.transformer import Transformer

# Initial log logit scales: CLIP's temperature 0.07, SigLIP's t' = log 10
# (Radford et al., 2021; Zhai et al., 2023), and SigLIP's bias init.
CLIP_LOG_SCALE = math.log(1 / 0.07)
SIGLIP_LOG_SCALE = math.log(10.0)
SIGLIP_BIAS = -10.0


def _weighted_sum(hidden, weights):
  """``sum_t weights[..., t] * hidden[..., t, :]`` in float32, broadcasting."""
  f32 = layers.at_least_f32(hidden.dtype)
  return jnp.einsum("...t,...td->...d", weights.astype(f32), hidden.astype(f32))


def _check(hidden, mask):
  if hidden.ndim < 2 or mask.ndim < 1 or mask.shape[-1] != hidden.shape[-2]:
    raise ValueError(f"pooling needs hidden [..., T, D] and mask [..., T] with "
                     f"the same T, got {hidden.shape} and {mask.shape}")
  return mask.astype(bool)


def last_pool(hidden, mask):
  """Hidden state of the last position where ``mask`` is True.

  Args:
    hidden: ``[..., T, D]`` final hidden states.
    mask: ``[..., T]`` bool, True on the text's tokens (any padding side).

  Returns:
    ``[..., D]`` float32; zeros where ``mask`` is all False.
  """
  mask = _check(hidden, mask)
  pos = jnp.arange(mask.shape[-1])
  last = jnp.max(jnp.where(mask, pos, -1), axis=-1, keepdims=True)  # [..., 1]
  return _weighted_sum(hidden, pos == last)


def first_pool(hidden, mask):
  """Hidden state of the first position where ``mask`` is True (CLS style).

  Shapes as :func:`last_pool`.
  """
  mask = _check(hidden, mask)
  t = mask.shape[-1]
  pos = jnp.arange(t)
  first = jnp.min(jnp.where(mask, pos, t), axis=-1, keepdims=True)  # [..., 1]
  return _weighted_sum(hidden, pos == first)


def mean_pool(hidden, mask):
  r"""Mean of the hidden states over the positions where ``mask`` is True.

  .. math:: e = \frac{\sum_t m_t h_t}{\max(1, \sum_t m_t)}

  Shapes as :func:`last_pool`.
  """
  mask = _check(hidden, mask).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)  # [..., 1]
  return _weighted_sum(hidden, mask / count)


POOLINGS = {"last": last_pool, "mean": mean_pool, "first": first_pool}


def segment_masks(segment_ids, num_segments):
  """Per-segment masks of packed rows: ``[B, T] -> [B, S, T]`` bool.

  Segment ``s`` (``s = 1 .. num_segments``) is row ``s - 1`` of the result;
  pool with ``POOLINGS[name](hidden[:, None], segment_masks(...))``.
  """
  ids = jnp.arange(1, num_segments + 1)
  return segment_ids[..., None, :] == ids[:, None]  # [B, S, T]


def positions_from_mask(mask):
  """RoPE positions ``[..., T]`` counting from 0 at the first True token.

  Gives ``arange`` for right padding and the correct offsets for left
  padding; positions on padding are clamped at 0 (they are masked anyway).
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
  """Hyper-parameters of :class:`EmbeddingHead`.

  Attributes:
    pooling: a key of ``POOLINGS``.
    proj_dim: width of a linear projection after pooling; 0 = none.
    normalize: L2-normalise the embeddings.
    init_log_scale: initial :math:`\\log t` (``CLIP_LOG_SCALE`` or
      ``SIGLIP_LOG_SCALE``).
    max_logit_scale: ``t`` is clamped to at most this (CLIP: 100).
    learn_logit_scale: whether ``t`` is trained.
    init_bias: initial sigmoid-loss bias (SigLIP: -10).
  """
  pooling: str = "last"
  proj_dim: int = 0
  normalize: bool = True
  init_log_scale: float = CLIP_LOG_SCALE
  max_logit_scale: float = 100.0
  learn_logit_scale: bool = True
  init_bias: float = SIGLIP_BIAS

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"HeadConfig.pooling={self.pooling!r} is not one of "
                       f"{sorted(POOLINGS)}")
    if self.proj_dim < 0:
      raise ValueError(f"HeadConfig.proj_dim={self.proj_dim} must be >= 0")
    if not self.max_logit_scale > 0:
      raise ValueError(f"HeadConfig.max_logit_scale={self.max_logit_scale} "
                       "must be > 0")


class EmbeddingHead(nnx.Module):
  """Pooling, optional projection, L2 norm; learnable logit scale and bias.

  ``logit_scale()`` is :math:`t = \\exp(\\min(\\log t, \\log t_{max}))`; the
  clamp stops the temperature from collapsing (CLIP clamps at 100) and passes
  no gradient while active. ``logit_bias`` is the SigLIP bias; losses without
  a bias leave it untouched.
  """

  def __init__(self, d_model: int, cfg: HeadConfig, *, param_dtype,
               rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.proj_dim:
      self.proj = layers.partitioned_param(
          rngs, nnx.initializers.lecun_normal(), (d_model, cfg.proj_dim),
          ("embed", None), param_dtype)
    # Scalars stay float32 whatever param_dtype is: exp() of a bf16 log-scale
    # would move in steps of ~3%.
    self.log_logit_scale = nnx.Param(
        jnp.asarray(cfg.init_log_scale, jnp.float32))
    self.logit_bias = nnx.Param(jnp.asarray(cfg.init_bias, jnp.float32))

  def __call__(self, hidden, mask):
    """``[..., T, D]`` hidden states + ``[..., T]`` mask -> ``[..., D']``."""
    x = POOLINGS[self.cfg.pooling](hidden, mask)  # [..., D] float32
    if self.cfg.proj_dim:
      proj = sharding.gather(self.proj[...].astype(x.dtype), ("embed", None))
      x = jnp.einsum("...d,dp->...p", x, proj)
    # Rows stay on their chip (the ring losses shard_map over them).
    names = (("activation_batch",) + (None,) * max(x.ndim - 2, 0)
             + ("activation_embed",))
    x = sharding.constrain(x, names[-x.ndim:])
    if self.cfg.normalize:
      # Same clamp as torch.nn.functional.normalize: zero rows stay zero.
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x

  def logit_scale(self):
    log_t = jnp.minimum(self.log_logit_scale[...],
                        math.log(self.cfg.max_logit_scale))
    if not self.cfg.learn_logit_scale:
      log_t = jax.lax.stop_gradient(log_t)
    return jnp.exp(log_t)


class EmbeddingModel(Transformer):
  """The transformer with an embedding head; one tower for queries and docs.

  Queries and documents share every weight; instruction prefixes in the text
  (``'query: '``, ``'passage: '``, added by the data pipeline) tell the sides
  apart. ``__call__`` is the transformer's (LM logits).

  Example::

    model = EmbeddingModel(cfg, HeadConfig(pooling='mean'), rngs=nnx.Rngs(0))
    emb = model.encode(tokens, segment_ids)  # [B, D], unit rows
  """

  def __init__(self, cfg: ModelConfig, head: HeadConfig = HeadConfig(), *,
               rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.head = EmbeddingHead(cfg.d_model, head,
                              param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

  def encode(self, tokens, segment_ids, *, bidirectional=False):
    """Embeddings of padded rows, one text per row.

    Args:
      tokens: ``[N, T]`` int ids, padded on either side.
      segment_ids: ``[N, T]`` int, nonzero on the text, 0 on padding.
      bidirectional: attend bidirectionally within the text (the prefix-LM
        mask) instead of causally.

    Returns:
      ``[N, D']`` float32 embeddings.
    """
    mask = segment_ids > 0
    h = self(tokens, positions=positions_from_mask(mask),
             segment_ids=segment_ids, prefix=mask if bidirectional else None,
             return_hidden=True)  # [N, T, D]
    return self.head(h, mask)

  def encode_segments(self, tokens, segment_ids, positions, *, num_segments,
                     bidirectional=False):
    """Embeddings of packed rows: ``[N, T]`` -> ``[N, S, D']``.

    ``positions`` restart at 0 in every segment (the packed batch format);
    segment ``s`` of a row is ``[:, s - 1]``; absent segments give zeros.
    """
    h = self(tokens, positions=positions, segment_ids=segment_ids,
             prefix=segment_ids > 0 if bidirectional else None,
             return_hidden=True)  # [N, T, D]
    return self.head(h[:, None], segment_masks(segment_ids, num_segments))


class RewardModel(Transformer):
  r"""The transformer with a scalar reward head (a Bradley–Terry reward model).

  .. math:: r(x, y) = w^\top h_t + b

  with ``h_t`` the final hidden state at the last token of the response
  (the one whose target is EOS in the preference batches, i.e. the position
  that has read the whole prompt and response). The parameter tree is the
  transformer's plus ``reward_head`` and ``reward_bias`` (both zero at init,
  so every reward starts at 0), so an LM checkpoint initialises the backbone.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    pdt = jnp.dtype(cfg.param_dtype)
    self.reward_head = layers.partitioned_param(
        rngs, nnx.initializers.zeros_init(), (cfg.d_model,), ('embed',), pdt)
    self.reward_bias = nnx.Param(jnp.zeros((), pdt))

  def rewards_from_hidden(self, hidden):
    """``[..., D]`` hidden states -> ``[...]`` float32 rewards."""
    f32 = layers.at_least_f32(hidden.dtype)
    head = sharding.gather(self.reward_head[...].astype(f32), ('embed',))
    return (jnp.einsum('...d,d->...', hidden.astype(f32), head)
            + self.reward_bias[...].astype(f32))

  def score(self, tokens, segment_ids):
    """Rewards of padded rows (prompt + response, no EOS), one per row.

    Args:
      tokens: ``[N, T]`` int ids, padded on either side.
      segment_ids: ``[N, T]`` int, nonzero on the text, 0 on padding.

    Returns:
      ``[N]`` float32 rewards, read at each row's last text token.
    """
    mask = segment_ids > 0
    h = self(tokens, positions=positions_from_mask(mask),
             segment_ids=segment_ids, return_hidden=True)  # [N, T, D]
    return self.rewards_from_hidden(last_pool(h, mask))
