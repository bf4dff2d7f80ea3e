"""Pure policy functions: per-token and per-sequence log-probabilities.

Everything here works on arrays, never runs a model: the objective runs the
model, and these turn its logits (or its last hidden states plus the LM-head
kernel) into the log-probabilities that the preference losses consume.
:func:`fused_token_logps` (and ``..._and_stats``: log-normaliser, entropy,
accuracy; ``..._and_log_sum_p2``: WPO's log collision probability) goes from
hidden states to log-probs without ever holding ``[B, T, V]`` logits, in the
forward or the backward pass; :func:`model_token_logps` reads the LM head
(kernel, tying, soft-cap, dtype) off an alignax model for it.

Conventions: position ``t`` of ``logits``/``hidden`` scores ``targets[:, t]``;
callers shift once (``logits[:, :-1]`` against ``tokens[:, 1:]``). ``weights``
(0/1, or fractional) select the completion tokens; tokens with weight 0 never
contribute, whatever their target id (padding such as ``-100`` is allowed).
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

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
  logits are never materialised. Plain autodiff (forward mode works too);
  :func:`fused_token_logps` also chunks the vocabulary and returns stats.

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


# Fused LM head + log-softmax: neither pass holds a [B, T, V] array.


class TokenStats(NamedTuple):
  r"""Per-token softmax statistics of :func:`fused_token_logps_and_stats`.

  Attributes:
    lse: ``[..., T]`` float32 log-normaliser
      :math:`\operatorname{lse}_t = \log\sum_v e^{z_{t,v}}`; differentiable, so
      the z-loss :math:`\lambda_z \operatorname{lse}_t^2` trains through it.
    entropy: ``[..., T]`` float32 :math:`H_t = -\sum_v p_{t,v}\log p_{t,v}`;
      differentiable (an entropy bonus trains through it).
    correct: ``[..., T]`` bool, the target is the argmax of the logits (the
      first maximum, as ``jnp.argmax``).
  """
  lse: Array
  entropy: Array
  correct: Array


class _Head(NamedTuple):
  """Static settings of the fused head (hashable: a ``custom_vjp`` nondiff)."""
  transposed: bool
  softcap: float
  chunk_size: int
  vocab_chunk: int
  with_stats: bool  # lse, entropy, argmax
  with_p2: bool = False  # log sum_v p_v^2
  with_entropy: bool = True  # (with_stats) False: entropy left at 0, no pass


class _Online(NamedTuple):
  """Online-softmax state over the vocabulary chunks seen so far, ``[B, C]``."""
  m: Array  # running max logit
  s: Array  # sum_v exp(z_v - m)
  picked: Array  # the target's logit (0 until its chunk is seen)
  a: Array  # sum_v exp(z_v - m) (z_v - m), for the entropy
  s2: Array  # sum_v exp(2 (z_v - m)), for log sum_v p_v^2
  idx: Array  # first argmax so far


def _balanced(size: int, chunk: int) -> tuple[int, int]:
  """``(length, count)`` of ``ceil(size / chunk)`` near-equal chunks."""
  if chunk <= 0 or chunk >= size:
    return size, 1
  count = -(-size // chunk)
  return -(-size // count), count


def _chunk_logits(h, kernel, start, size, head):
  """Soft-capped logits ``[B, C, Vc]`` of ids ``start:start+size``, tanh, W."""
  w = jax.lax.dynamic_slice_in_dim(kernel, start, size,
                                   axis=0 if head.transposed else 1)
  spec = "bcd,vd->bcv" if head.transposed else "bcd,dv->bcv"
  u = jnp.einsum(spec, h, w,
                 preferred_element_type=_compute_dtype(h.dtype))  # [B, C, Vc]
  if not head.softcap:
    return u, None, w
  t = jnp.tanh(u / head.softcap)
  return head.softcap * t, t, w


def _vocab_chunk(j, vocab, vc):
  """Start, column ids and fresh-column mask of vocabulary chunk ``j``.

  The last chunk is shifted left to end at ``V`` (no padded kernel copy); its
  columns before ``j * vc`` were already counted and are masked out. The
  mask is ``None`` where every column is fresh, known when tracing: chunk
  ``0`` (a Python int) and every chunk when ``vc`` divides ``V``. Then no
  select over the ``[B, C, Vc]`` block is emitted (XLA on CPU materialises
  each one).
  """
  start = jnp.minimum(j * vc, vocab - vc)
  cols = start + jnp.arange(vc)  # [Vc]
  if vocab % vc == 0 or (isinstance(j, int) and j == 0):
    return start, cols, None
  return start, cols, cols >= j * vc


def _picked_logit(z, start, first, y):
  """``z[..., y - start]`` where ``y`` is a fresh column of this chunk (id
  ``>= first``), else 0: a gather of ``[B, C]`` values instead of a masked
  sum over the ``[B, C, Vc]`` block."""
  vc = z.shape[-1]
  idx = y - start
  inside = (idx >= 0) & (idx < vc) & (y >= first)
  got = jnp.take_along_axis(z, jnp.clip(idx, 0, vc - 1)[..., None],
                            axis=-1)[..., 0]
  return jnp.where(inside, got, 0.0)


def _chunk_state(z, start, first, cols, fresh, y, head) -> _Online:
  zf = z if fresh is None else jnp.where(fresh, z, -jnp.inf)  # [B, C, Vc]
  m = jnp.max(zf, axis=-1)  # [B, C], finite: every chunk has a fresh column
  shifted = zf - m[..., None]
  e = jnp.exp(shifted)  # 0 on stale columns
  picked = _picked_logit(z, start, first, y)
  zero = jnp.zeros_like(m)
  s2 = jnp.sum(e * e, -1) if head.with_p2 else zero
  if not head.with_stats:
    return _Online(m, jnp.sum(e, -1), picked, zero, s2,
                   jnp.zeros(m.shape, jnp.int32))
  a = zero
  if head.with_entropy:
    if fresh is not None:
      shifted = jnp.where(fresh, shifted, 0.0)  # -inf there, and e = 0
    a = jnp.sum(e * shifted, axis=-1)
  return _Online(m, jnp.sum(e, -1), picked, a, s2,
                 cols[jnp.argmax(zf, axis=-1)])


def _merge(x: _Online, y: _Online, head: _Head) -> _Online:
  """State of chunks ``x`` then ``y``; the earlier argmax wins ties."""
  m = jnp.maximum(x.m, y.m)
  cx, cy = jnp.exp(x.m - m), jnp.exp(y.m - m)
  a, s2 = x.a, x.s2
  if head.with_stats and head.with_entropy:
    # sum e^{z-m}(z-m): e^{m_x-m}(a_x + (m_x-m) s_x)
    a = cx * (x.a + (x.m - m) * x.s) + cy * (y.a + (y.m - m) * y.s)
  if head.with_p2:  # sum e^{2(z-m)} rescales by e^{2(m_x-m)}
    s2 = cx * cx * x.s2 + cy * cy * y.s2
  return _Online(m, cx * x.s + cy * y.s, x.picked + y.picked, a, s2,
                 jnp.where(y.m > x.m, y.idx, x.idx))


def _forward_chunk(h, y, kernel, head):
  """``(logp, lse, entropy, log_sum_p2, correct)``, each ``[B, C]``."""
  vocab = kernel.shape[0 if head.transposed else 1]
  vc, count = _balanced(vocab, head.vocab_chunk)

  def state(j):
    start, cols, fresh = _vocab_chunk(j, vocab, vc)
    z, _, _ = _chunk_logits(h, kernel, start, vc, head)
    return _chunk_state(z, start, j * vc, cols, fresh, y, head)

  st = state(0)
  if count > 1:
    st = jax.lax.fori_loop(
        1, count, lambda j, st: _merge(st, state(j), head), st)
  log_s = jnp.log(st.s)
  lse = st.m + log_s
  # log sum p^2 = log sum e^{2(z-m)} - 2 log sum e^{z-m}: the max cancels.
  log_p2 = (jnp.log(st.s2) - 2.0 * log_s if head.with_p2
            else jnp.zeros_like(lse))
  ent = (log_s - st.a / st.s if head.with_stats and head.with_entropy
         else jnp.zeros_like(lse))
  return st.picked - lse, lse, ent, log_p2, st.idx == y


def _backward_chunk(h, y, cts, lse, ent, log_p2, kernel, dw, head):
  """``dh`` ``[B, C, D]`` of one chunk and ``dw`` with its share added.

  With :math:`p = \\mathrm{softmax}(z)`, :math:`S_2 = \\sum_u p_u^2` and
  cotangents ``g`` of ``(logp, lse, entropy, log_sum_p2)``:
  :math:`\\partial/\\partial z_v = g_{lp}(\\delta_{vy} - p_v) + g_{lse} p_v
  - g_H p_v(\\log p_v + H) + 2 g_2 p_v (p_v / S_2 - 1)`, times
  :math:`1 - \\tanh^2(u_v / c)` under the cap.
  """
  g_logp, g_lse, g_ent, g_p2 = cts
  vocab = kernel.shape[0 if head.transposed else 1]
  vc, count = _balanced(vocab, head.vocab_chunk)
  acc = dw.dtype

  def add(j, carry):
    dh, dw = carry
    start, cols, fresh = _vocab_chunk(j, vocab, vc)
    z, t, w = _chunk_logits(h, kernel, start, vc, head)  # again [B, C, Vc]
    logp_v = z - lse[..., None]
    p = jnp.exp(logp_v)
    hit = cols == y[..., None]  # the target's column
    if fresh is not None:
      p, hit = jnp.where(fresh, p, 0.0), hit & fresh
    coef = (g_lse - g_logp)[..., None]
    if head.with_stats and head.with_entropy:
      coef = coef - g_ent[..., None] * (logp_v + ent[..., None])
    if head.with_p2:
      coef = coef + 2.0 * g_p2[..., None] * (
          p * jnp.exp(-log_p2)[..., None] - 1.0)
    gz = p * coef + jnp.where(hit, g_logp[..., None], 0.0)  # [B, C, Vc]
    if head.softcap:
      gz = gz * (1.0 - t * t)
    gz = gz.astype(h.dtype)
    if head.transposed:
      dh = dh + jnp.einsum("bcv,vd->bcd", gz, w, preferred_element_type=acc)
      dwc = jnp.einsum("bcv,bcd->vd", gz, h, preferred_element_type=acc)
    else:
      dh = dh + jnp.einsum("bcv,dv->bcd", gz, w, preferred_element_type=acc)
      dwc = jnp.einsum("bcd,bcv->dv", h, gz, preferred_element_type=acc)
    if count == 1:
      return dh, dw + dwc
    axis = 0 if head.transposed else 1
    old = jax.lax.dynamic_slice_in_dim(dw, start, vc, axis=axis)
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, old + dwc, start, axis)

  carry = (jnp.zeros(h.shape, acc), dw)
  if count == 1:
    return add(0, carry)
  return jax.lax.fori_loop(0, count, add, carry)


def _seq_chunks(head, *arrays):
  """``[B, T, ...]`` arrays padded to ``T' = k * c``, as ``[k, B, c, ...]``.

  Chunks run along the sequence so every chunk keeps all ``B`` rows: a
  batch-sharded input stays sharded the same way inside the loop.
  """
  length = arrays[0].shape[1]
  c, k = _balanced(length, head.chunk_size)
  pad = c * k - length
  out = []
  for x in arrays:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    fill = -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0
    x = jnp.pad(x, widths, constant_values=fill)  # padded targets match no id
    out.append(jnp.moveaxis(x.reshape(x.shape[0], k, c, *x.shape[2:]), 1, 0))
  return k, c, out


def _unchunk(x, length):
  """``[k, B, c, ...] -> [B, T, ...]`` (drops the padding)."""
  x = jnp.moveaxis(x, 0, 1)  # [B, k, c, ...]
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _fused_forward(hidden, kernel, targets, head):
  k, _, (h, y) = _seq_chunks(head, hidden, targets)  # [k, B, c, D], [k, B, c]
  if k == 1:
    return _forward_chunk(h[0], y[0], kernel, head)
  outs = jax.lax.map(lambda hy: _forward_chunk(*hy, kernel, head), (h, y))
  return tuple(_unchunk(o, targets.shape[1]) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden, kernel, targets, head):
  return _fused_forward(hidden, kernel, targets, head)


def _fused_fwd(hidden, kernel, targets, head):
  out = _fused_forward(hidden, kernel, targets, head)
  return out, (hidden, kernel, targets, *out[1:4])


def _fused_bwd(head, res, cts):
  hidden, kernel, targets, lse, ent, log_p2 = res
  g = [x.astype(lse.dtype) for x in cts[:4]]  # the bool `correct` has none
  k, _, xs = _seq_chunks(head, hidden, targets, *g, lse, ent, log_p2)
  dw = jnp.zeros(kernel.shape, _compute_dtype(kernel.dtype))

  def body(dw, xs):
    h, y, gl, gs, ge, g2, ls, en, l2 = xs
    dh, dw = _backward_chunk(h, y, (gl, gs, ge, g2), ls, en, l2, kernel, dw,
                             head)
    return dw, dh

  if k == 1:
    dw, dh = body(dw, [x[0] for x in xs])  # dh [B, T, D]
  else:
    dw, dh = jax.lax.scan(body, dw, xs)  # dh [k, B, c, D]
    dh = _unchunk(dh, hidden.shape[1])
  return dh.astype(hidden.dtype), dw.astype(kernel.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _fused_call(hidden, kernel, targets, head):
  hidden, kernel = jnp.asarray(hidden), jnp.asarray(kernel)
  targets = jnp.asarray(targets)
  d = hidden.shape[-1] if hidden.ndim else None
  if (hidden.ndim < 2 or targets.shape != hidden.shape[:-1] or kernel.ndim != 2
      or kernel.shape[1 if head.transposed else 0] != d):
    want = "[V, D]" if head.transposed else "[D, V]"
    raise ValueError(
        f"fused token log-probs expect hidden [..., T, D], targets [..., T] "
        f"and kernel {want} with D={d}; got hidden {hidden.shape}, targets "
        f"{targets.shape}, kernel {kernel.shape}.")
  dtype = jnp.result_type(hidden, kernel)
  length = targets.shape[-1]
  out = _fused(
      hidden.reshape(-1, length, d).astype(dtype), kernel.astype(dtype),
      targets.reshape(-1, length).astype(jnp.int32), head)  # each [B, T]
  # (logp, lse, entropy, log_sum_p2, correct); unrequested ones are zeros.
  return tuple(x.reshape(targets.shape) for x in out)


def fused_token_logps(
    hidden: Array,
    kernel: Array,
    targets: Array,
    *,
    transposed: bool = False,
    softcap: float = 0.0,
    chunk_size: int = 0,
    vocab_chunk: int = 4096,
) -> Array:
  r"""Per-token log-probabilities straight from hidden states and LM head.

  .. math::
    z_{t} = c \tanh(h_t W / c), \qquad
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t,v}}

  (no :math:`\tanh` when ``softcap`` :math:`c = 0`). The sequence goes
  ``chunk_size`` positions at a time (all ``B`` rows per chunk, so batch
  sharding is kept); within a chunk the vocabulary goes ``vocab_chunk``
  columns at a time with an online log-sum-exp. A ``custom_vjp`` recomputes
  each chunk's logits in the backward pass, so neither pass holds more than
  a few ``[B, chunk_size, vocab_chunk]`` blocks (never ``[B, T, V]``); the
  gradients are accumulated in float32. Softmax and loss are float32
  whatever the input dtype; the matmuls run in the inputs' dtype with
  float32 accumulation (as ``Transformer.logits_from_hidden``). Reverse mode
  only (no ``jvp``).

  Targets outside ``[0, V)`` (padding such as ``-100``) give
  ``-logsumexp``, finite; give them weight 0.

  Choosing the chunks: a block is ``[B, T / k_T, V / k_V] * 4`` bytes and a
  pass holds 2-3 of them. Under GSPMD with the batch sharded, the kernel
  gradient accumulated over a loop is all-reduced (or reduce-scattered)
  inside the loop, and an FSDP-sharded kernel is all-gathered there: the
  vocabulary loop moves each kernel column once in total, the sequence loop
  moves the whole kernel once per sequence chunk. Hence the defaults: the
  whole sequence, ``vocab_chunk`` columns at a time. A kernel sharded over
  the vocabulary (tensor parallel) wants ``vocab_chunk=0`` (slicing a sharded
  axis gathers it) and bounds memory with ``chunk_size``.

  Args:
    hidden: ``[..., T, D]`` final (normed) hidden states; position ``t``
      scores ``targets[..., t]`` (leading axes are flattened into ``B``).
    kernel: ``[D, V]`` LM-head kernel, or ``[V, D]`` tied embedding with
      ``transposed=True``.
    targets: ``[..., T]`` integer token ids.
    transposed: ``kernel`` is ``[V, D]`` (tied input embedding).
    softcap: final-logit soft-cap :math:`c` (Gemma 2); 0 = none.
    chunk_size: sequence positions per chunk (``T`` is split into
      ``k_T = ceil(T / chunk_size)`` near-equal chunks); 0 = all at once.
    vocab_chunk: vocabulary columns per chunk (``k_V`` near-equal chunks);
      0 = the whole vocabulary.

  Returns:
    ``[..., T]`` log-probabilities, float32 (float64 for float64 inputs).
  """
  head = _Head(transposed, float(softcap), chunk_size, vocab_chunk, False)
  return _fused_call(hidden, kernel, targets, head)[0]


def fused_token_logps_and_stats(
    hidden: Array,
    kernel: Array,
    targets: Array,
    *,
    transposed: bool = False,
    softcap: float = 0.0,
    chunk_size: int = 0,
    vocab_chunk: int = 4096,
    entropy: bool = True,
) -> tuple[Array, TokenStats]:
  r""":func:`fused_token_logps` plus log-normaliser, entropy and accuracy.

  Same arguments; ``entropy=False`` leaves ``stats.entropy`` at 0 and skips
  its work (one pass over each logits block forward and one term backward:
  the LM loss needs only ``lse`` and ``correct``). The cross-entropy with
  z-loss is
  ``-logp + z_loss * stats.lse**2``; gradients flow through ``logp``,
  ``stats.lse`` and ``stats.entropy`` (``correct`` is a bool):

  .. math::
    H_t = \operatorname{lse}_t - \sum_v p_{t,v} z_{t,v}

  Returns:
    ``(logp, TokenStats(lse, entropy, correct))``, each ``[..., T]``.
  """
  head = _Head(transposed, float(softcap), chunk_size, vocab_chunk, True,
               with_entropy=bool(entropy))
  logp, lse, ent, _, correct = _fused_call(hidden, kernel, targets, head)
  return logp, TokenStats(lse, ent, correct)


def fused_token_logps_and_log_sum_p2(
    hidden: Array,
    kernel: Array,
    targets: Array,
    *,
    transposed: bool = False,
    softcap: float = 0.0,
    chunk_size: int = 0,
    vocab_chunk: int = 4096,
) -> tuple[Array, Array]:
  r""":func:`fused_token_logps` plus each position's log collision probability.

  Same arguments. The second output is

  .. math::
    \log\sum_v p_{t,v}^2 = \log\sum_v e^{2 z_{t,v}} - 2\operatorname{lse}_t

  (minus the Renyi-2 entropy), accumulated online over the vocabulary chunks
  as the log-normaliser is: no ``[B, T, V]`` array in either pass. WPO
  calibrates token log-probs by it (:func:`alignax.losses.wpo_weights`).
  Both outputs are differentiable.

  Returns:
    ``(logp, log_sum_p2)``, each ``[..., T]``, float32 (float64 for float64
    inputs).
  """
  head = _Head(transposed, float(softcap), chunk_size, vocab_chunk, False,
               True)
  out = _fused_call(hidden, kernel, targets, head)
  return out[0], out[3]


def _model_head(model):
  """``(kernel, transposed, softcap, compute dtype)`` of an alignax LM.

  Mirrors ``Transformer.logits_from_hidden`` (also inherited by
  ``EmbeddingModel`` and ``RewardModel``): the tied ``[V, D]`` embedding or
  the ``[D, V]`` ``lm_head``, both cast to the compute dtype.
  """
  cfg = model.cfg
  if cfg.tie_embeddings:
    kernel, dtype = model.embed.embedding[...], model.embed.dtype  # [V, D]
  else:
    kernel, dtype = model.lm_head[...], cfg.dtype  # [D, V]
  dtype = jnp.dtype(dtype)
  return (kernel.astype(dtype), cfg.tie_embeddings, cfg.final_logit_softcap,
          dtype)


def model_token_logps(model, hidden: Array, targets: Array, *,
                      chunk_size: int = 0, vocab_chunk: int = 4096) -> Array:
  """:func:`fused_token_logps` with ``model``'s LM head.

  Equals ``token_logps(model.logits_from_hidden(hidden), targets)`` without
  building the logits. ``hidden`` is ``model(..., return_hidden=True)``
  (already final-normed). Works for ``Transformer``, ``EmbeddingModel`` and
  ``RewardModel``.
  """
  kernel, transposed, softcap, dtype = _model_head(model)
  return fused_token_logps(
      jnp.asarray(hidden).astype(dtype), kernel, targets,
      transposed=transposed, softcap=softcap, chunk_size=chunk_size,
      vocab_chunk=vocab_chunk)


def model_token_logps_and_log_sum_p2(
    model, hidden: Array, targets: Array, *, chunk_size: int = 0,
    vocab_chunk: int = 4096) -> tuple[Array, Array]:
  """:func:`fused_token_logps_and_log_sum_p2` with ``model``'s LM head."""
  kernel, transposed, softcap, dtype = _model_head(model)
  return fused_token_logps_and_log_sum_p2(
      jnp.asarray(hidden).astype(dtype), kernel, targets,
      transposed=transposed, softcap=softcap, chunk_size=chunk_size,
      vocab_chunk=vocab_chunk)


def model_token_logps_and_stats(
    model, hidden: Array, targets: Array, *, chunk_size: int = 0,
    vocab_chunk: int = 4096, entropy: bool = True
) -> tuple[Array, TokenStats]:
  """:func:`fused_token_logps_and_stats` with ``model``'s LM head."""
  kernel, transposed, softcap, dtype = _model_head(model)
  return fused_token_logps_and_stats(
      jnp.asarray(hidden).astype(dtype), kernel, targets,
      transposed=transposed, softcap=softcap, chunk_size=chunk_size,
      vocab_chunk=vocab_chunk, entropy=entropy)


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
