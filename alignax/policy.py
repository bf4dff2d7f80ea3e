"""Pure policy functions: per-token and per-sequence log-probabilities.

Everything here works on arrays, never on a model: the objective runs the
model, and these turn its logits (or its last hidden states plus the LM-head
kernel) into the log-probabilities that the preference losses consume.

Conventions: position ``t`` of ``logits``/``hidden`` scores ``targets[:, t]``;
callers shift once (``logits[:, :-1]`` against ``tokens[:, 1:]``). ``weights``
(0/1, or fractional) select the completion tokens; tokens with weight 0 never
contribute, whatever their target id (padding such as ``-100`` is allowed).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
LMHead = Callable[[Array], Array] | Array


def _compute_dtype(dtype: Any) -> Any:
  # bf16/f16 logits are upcast: logsumexp over a large vocabulary in bf16
  # loses ~2 digits. float64 (tests) stays float64.
  return jnp.promote_types(dtype, jnp.float32)


def _picked_minus_logsumexp(logits: Array, targets: Array) -> Array:
  """``logits[target] - logsumexp(logits)`` for ``[B, C, V]``, ``[B, C]``."""
  logits = logits.astype(_compute_dtype(logits.dtype))
  # mode="clip": out-of-range ids (padding) read some logit instead of NaN;
  # their weight is 0 downstream.
  picked = jnp.take_along_axis(
      logits, targets[..., None], axis=-1, mode="clip")[..., 0]  # [B, C]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _map_over_sequence(
    chunk_fn: Callable[[Array, Array], Array],
    inputs: Array,
    targets: Array,
    chunk_size: int | None,
) -> Array:
  """Applies ``chunk_fn(inputs[:, s], targets[:, s]) -> [B, C]`` per chunk.

  The chunk body is rematerialised (``jax.checkpoint``) so that the backward
  pass keeps only the chunk inputs, not the per-chunk ``[B, C, V]`` logits or
  softmax; the peak extra memory is one chunk.
  """
  batch, length = targets.shape
  if chunk_size is None or chunk_size >= length:
    return chunk_fn(inputs, targets)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  num_chunks = length // chunk_size

  @jax.checkpoint
  def body(start):
    x = jax.lax.dynamic_slice_in_dim(inputs, start, chunk_size, axis=1)
    y = jax.lax.dynamic_slice_in_dim(targets, start, chunk_size, axis=1)
    return chunk_fn(x, y)  # [B, C]

  starts = jnp.arange(num_chunks) * chunk_size
  out = jax.lax.map(body, starts)  # [N, B, C]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, num_chunks * chunk_size)
  done = num_chunks * chunk_size
  if done < length:  # the ragged tail is one more (smaller) chunk
    tail = chunk_fn(inputs[:, done:], targets[:, done:])
    out = jnp.concatenate([out, tail], axis=1)
  return out


def token_logps(
    logits: Array, targets: Array, *, chunk_size: int | None = None
) -> Array:
  r"""Per-token log-probabilities of ``targets`` under ``logits``.

  .. math:: \log p_{b,t} = z_{b,t,y_{b,t}} - \log\sum_v \exp z_{b,t,v}

  No ``[B, T, V]`` log-softmax copy is built: the target logit is gathered and
  the log-normaliser subtracted. With ``chunk_size`` the sequence is processed
  ``chunk_size`` positions at a time (``lax.map`` + remat), which bounds the
  float32 temporaries of low-precision logits to one chunk.

  Args:
    logits: ``[B, T, V]`` unnormalised scores; position ``t`` predicts
      ``targets[:, t]``.
    targets: ``[B, T]`` integer token ids.
    chunk_size: optional sequence chunk length; ``None`` does it in one go.

  Returns:
    ``[B, T]`` log-probabilities in at least float32.
  """
  logits, targets = jnp.asarray(logits), jnp.asarray(targets)
  if logits.ndim != 3 or targets.shape != logits.shape[:2]:
    raise ValueError(
        "token_logps expects logits [B, T, V] and targets [B, T]; got "
        f"logits {logits.shape} and targets {targets.shape}.")
  return _map_over_sequence(
      _picked_minus_logsumexp, logits, targets, chunk_size)


def token_logps_from_hidden(
    hidden: Array,
    lm_head: LMHead,
    targets: Array,
    *,
    chunk_size: int | None = None,
) -> Array:
  r"""Per-token log-probabilities computed from hidden states, chunk by chunk.

  .. math:: \log p_{b,t} = (h_{b,t} W)_{y_{b,t}} - \log\sum_v \exp (h_{b,t} W)_v

  Logits exist only for one ``[B, chunk_size, V]`` chunk at a time, in the
  forward and (thanks to remat) in the backward pass, so full ``[B, T, V]``
  logits are never materialised.

  Args:
    hidden: ``[B, T, D]`` final hidden states (after the final norm).
    lm_head: either a ``[D, V]`` kernel, or a pure function mapping
      ``[B, C, D]`` hidden states to ``[B, C, V]`` logits (e.g. a tied
      embedding ``lambda h: h @ embedding.T``).
    targets: ``[B, T]`` integer token ids.
    chunk_size: sequence chunk length; ``None`` projects everything at once.

  Returns:
    ``[B, T]`` log-probabilities in at least float32.
  """
  hidden, targets = jnp.asarray(hidden), jnp.asarray(targets)
  if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
    raise ValueError(
        "token_logps_from_hidden expects hidden [B, T, D] and targets [B, T];"
        f" got hidden {hidden.shape} and targets {targets.shape}.")
  if callable(lm_head):
    project = lm_head
  else:
    kernel = jnp.asarray(lm_head)
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
      raise ValueError(
          f"lm_head kernel must be [D, V] with D={hidden.shape[-1]}; got "
          f"{kernel.shape}.")
    out_dtype = _compute_dtype(jnp.result_type(hidden, kernel))

    def project(h):
      return jnp.einsum(
          "bcd,dv->bcv", h, kernel, preferred_element_type=out_dtype)

  def chunk_fn(h, y):
    return _picked_minus_logsumexp(project(h), y)

  return _map_over_sequence(chunk_fn, hidden, targets, chunk_size)


def _check_weights(token_logps_: Array, weights: Array) -> Array:
  if jnp.shape(weights) != jnp.shape(token_logps_):
    raise ValueError(
        f"weights shape {jnp.shape(weights)} must equal token_logps shape "
        f"{jnp.shape(token_logps_)}.")
  return jnp.asarray(weights).astype(jnp.result_type(token_logps_))


def completion_lengths(weights: Array) -> Array:
  """Number (total weight) of completion tokens per sequence.

  Args:
    weights: ``[..., T]`` completion mask (0/1 or fractional).

  Returns:
    ``[...]`` token counts, float.
  """
  weights = jnp.asarray(weights)
  dtype = _compute_dtype(
      weights.dtype if jnp.issubdtype(weights.dtype, jnp.floating)
      else jnp.float32)
  return jnp.sum(weights.astype(dtype), axis=-1)


def sequence_logps(token_logps: Array, weights: Array) -> Array:
  r"""Summed completion log-probability per sequence.

  .. math:: \log \pi(y \mid x) = \sum_t w_t \log p_t

  Args:
    token_logps: ``[..., T]`` per-token log-probabilities.
    weights: ``[..., T]`` completion mask; weight-0 tokens are ignored even if
      their log-probability is not finite.

  Returns:
    ``[...]`` summed log-probabilities.
  """
  token_logps = jnp.asarray(token_logps)
  weights = _check_weights(token_logps, weights)
  # where (not only *): a masked NaN/-inf must not leak through 0 * NaN.
  return jnp.sum(
      jnp.where(weights != 0, token_logps, 0.0) * weights, axis=-1)


def mean_logps(token_logps: Array, weights: Array) -> Array:
  r"""Length-normalised (average per completion token) log-probability.

  .. math:: \bar\ell = \frac{\sum_t w_t \log p_t}{\max(1, \sum_t w_t)}

  The ``max(1, .)`` matches TRL's ``clamp(min=1)`` so that empty completions
  give 0 rather than NaN.

  Args:
    token_logps: ``[..., T]`` per-token log-probabilities.
    weights: ``[..., T]`` completion mask.

  Returns:
    ``[...]`` average log-probabilities.
  """
  total = sequence_logps(token_logps, weights)
  return total / jnp.maximum(completion_lengths(weights), 1.0)
