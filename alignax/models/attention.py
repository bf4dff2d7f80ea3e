r"""Attention over packed, prefix-LM rows without a ``[T, T]`` mask.

A row's mask is described by its per-token ingredients, a :class:`MaskInfo`
(segment ids, UL2 bidirectional-prefix flags, shared-prompt ``attend_to``,
positions and a sliding window); :func:`make_attention_mask` expands them to
the dense ``[B, 1, T, T]`` mask for the reference and decode paths, while
:func:`blockwise_attention` builds each ``[block_q, block_k]`` tile of it on
the fly and skips the tiles it empties. The paths, chosen by
``ModelConfig.attention`` through :func:`resolve_attention`:

* ``'blockwise'``: pure-JAX FlashAttention-2 (online softmax forward, a
  ``custom_vjp`` backward that recomputes each tile's probabilities from the
  saved log-sum-exp), memory ``O(T * block)`` in both passes, any backend.
* ``'splash'``: the Pallas TPU splash kernel, causal + segment ids only.
* ``'cudnn'``: cuDNN's flash kernel on GPU, fp16/bf16, causal rows: plain
  ones through ``jax.nn.dot_product_attention(implementation='cudnn')``,
  packed ones (segment ids, padding) through cuDNN's packed layout; rows
  with a bidirectional prefix fall back to blockwise on the device.
* ``'reference'`` (old name ``'einsum'``) and ``'fused'``: the dense mask
  with ``layers.einsum_attention`` / ``jax.nn.dot_product_attention``.
* ``'auto'``: splash on TPU, cudnn on GPU where they apply, else blockwise.

References:
  Dao, 2023, FlashAttention-2: Faster Attention with Better Parallelism and
  Work Partitioning; Rabe & Staats, 2021, Self-attention Does Not Need
  O(n^2) Memory.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from alignax.models.config import ATTENTIONS

_SPLASH_BLOCK = 128  # splash's default block sizes; T must be a multiple.


class MaskInfo(NamedTuple):
  """The ingredients of an attention mask, ``[B, T]`` each, never ``[T, T]``.

  Attributes:
    segment_ids: int, 0 = padding; None = one segment, no padding.
    positions: int RoPE positions (the sliding window compares them).
    prefix: bool, True inside a segment's bidirectional prefix; None = none.
    attend_to: int id of one more earlier segment each query may read
      (causally), 0 = none; None = none anywhere.
    window: int scalar sliding-window length, 0 or None = full attention.
  """
  segment_ids: jax.Array | None
  positions: jax.Array
  prefix: jax.Array | None = None
  attend_to: jax.Array | None = None
  window: jax.Array | int | None = None


def make_attention_mask(segment_ids: jax.Array, prefix: jax.Array,
                        attend_to: jax.Array | None = None) -> jax.Array:
  """Boolean attention mask for packed, prefix-LM rows.

  Query ``i`` attends key ``j`` iff both are in the same non-padding segment
  and ``j <= i`` or both are in that segment's bidirectional prefix. Padding
  queries (segment 0) attend only to themselves so that their softmax is
  finite; their outputs are garbage that the loss masks away.

  ``attend_to`` lets a segment also read one earlier segment of its row:
  query ``i`` attends key ``j <= i`` whose segment id is ``attend_to[i]``.
  Shared-prompt preference batches use it so that the prompt is encoded once
  and every response segment reads it, as if the prompt preceded each one.

  Args:
    segment_ids: ``[B, T]`` int, 0 marks padding.
    prefix: ``[B, T]`` bool, True inside the bidirectional prefix.
    attend_to: optional ``[B, T]`` int, the id of one more segment each
      query may attend (causally); 0 = none.

  Returns:
    ``[B, 1, T, T]`` bool mask, True where attention is allowed.
  """
  if segment_ids.shape != prefix.shape or segment_ids.ndim != 2:
    raise ValueError(
        f'segment_ids {segment_ids.shape} and prefix {prefix.shape} must both '
        'be [B, T].')
  if attend_to is not None and attend_to.shape != segment_ids.shape:
    raise ValueError(f'attend_to {attend_to.shape} must equal segment_ids '
                     f'{segment_ids.shape}.')
  idx = jnp.arange(segment_ids.shape[1])
  mask = _tile_mask(_Tokens(segment_ids, prefix, attend_to, None),
                    _Tokens(segment_ids, prefix, None, None), idx, idx, None)
  return mask[:, None]


def dense_mask(info: MaskInfo) -> jax.Array:
  """``[B, 1, T, T]`` bool: :func:`make_attention_mask` and the window."""
  t = _row_tokens(info)
  prefix = jnp.zeros(t.segment_ids.shape, bool) if t.prefix is None else (
      t.prefix)
  mask = make_attention_mask(t.segment_ids, prefix, t.attend_to)
  if info.window is None:
    return mask
  pos = info.positions
  near = (pos[:, :, None] - pos[:, None, :]) < info.window  # [B, T, T]
  return mask & ((info.window == 0) | near)[:, None]


class _Tokens(NamedTuple):
  """Per-token mask ingredients of one side (queries or keys), ``[B, n]``."""
  segment_ids: jax.Array
  prefix: jax.Array | None
  attend_to: jax.Array | None
  positions: jax.Array | None


def _row_tokens(info: MaskInfo) -> _Tokens:
  seg = info.segment_ids
  if seg is None:
    seg = jnp.ones(info.positions.shape, jnp.int32)
  for name in ('prefix', 'attend_to'):
    x = getattr(info, name)
    if x is not None and x.shape != seg.shape:
      raise ValueError(f'{name} {x.shape} must equal segment_ids {seg.shape}.')
  positions = None if info.window is None else info.positions
  return _Tokens(seg, info.prefix, info.attend_to, positions)


def _tile_mask(tq: _Tokens, tk: _Tokens, idx_q, idx_k, window) -> jax.Array:
  """``[B, n_q, n_k]`` bool mask of queries ``idx_q`` against keys ``idx_k``.

  The single definition of the mask: :func:`make_attention_mask` calls it on
  the whole row, :func:`blockwise_attention` on one tile.
  """
  seg_q, seg_k = tq.segment_ids[:, :, None], tk.segment_ids[:, None, :]
  causal = idx_k[None, :] <= idx_q[:, None]  # [n_q, n_k]
  allowed = causal
  if tq.prefix is not None:
    allowed = causal | (tq.prefix[:, :, None] & tk.prefix[:, None, :])
  mask = ((seg_q == seg_k) & (seg_q != 0) & allowed) | (
      idx_q[:, None] == idx_k[None, :])  # [B, n_q, n_k]
  if tq.attend_to is not None:
    att = tq.attend_to[:, :, None]
    mask = mask | ((att == seg_k) & (att != 0) & causal)
  if window is not None:
    near = (tq.positions[:, :, None] - tk.positions[:, None, :]) < window
    mask = mask & ((window == 0) | near)
  return mask


def _block_range(x, valid, block):
  """Min and max of ``x [B, n * block]`` over ``valid`` per block: ``[B, n]``.

  Blocks with nothing valid get the empty range ``(big, -big)``.
  """
  b = x.shape[0]
  x, valid = x.reshape(b, -1, block), valid.reshape(b, -1, block)
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.where(valid, x, big).min(-1)
  hi = jnp.where(valid, x, -big).max(-1)
  return lo, hi


def _overlap(a, b):
  """``[B, n_q, n_k]``: ranges ``a = (lo, hi) [B, n_q]`` meet ``b [B, n_k]``."""
  return ((a[0][:, :, None] <= b[1][:, None, :])
          & (b[0][:, None, :] <= a[1][:, :, None]))


def _live_tiles(tq, tk, window, bq, bk):
  r"""``[n_q, n_k]`` bool: tiles that some row's mask does not empty.

  Conservative per-tile summaries of each row (min/max segment id, of the
  prefix's segment ids, of ``attend_to``, of positions) bound what a tile can
  hold: a tile is live iff its index ranges meet the diagonal, or its
  segment ranges meet and it is on/below the diagonal (or both sides hold
  prefix tokens), or the ``attend_to`` range meets the key segments below
  the diagonal; and the window can reach it. Rows are OR-ed: a tile is
  skipped (one ``lax.cond``) when it is empty in every row of the batch;
  ``per_row`` calls this on one row at a time.
  """
  nq, nk = tq.segment_ids.shape[1] // bq, tk.segment_ids.shape[1] // bk
  q_start, k_start = jnp.arange(nq) * bq, jnp.arange(nk) * bk
  below = k_start[None, :] <= q_start[:, None] + bq - 1  # [n_q, n_k]
  diagonal = below & (q_start[:, None] <= k_start[None, :] + bk - 1)
  seg_q, seg_k = tq.segment_ids, tk.segment_ids
  k_range = _block_range(seg_k, seg_k != 0, bk)
  live = _overlap(_block_range(seg_q, seg_q != 0, bq), k_range) & below
  if tq.prefix is not None:
    live |= _overlap(_block_range(seg_q, tq.prefix & (seg_q != 0), bq),
                     _block_range(seg_k, tk.prefix & (seg_k != 0), bk))
  if tq.attend_to is not None:
    att = tq.attend_to
    live |= _overlap(_block_range(att, att != 0, bq), k_range) & below
  live |= diagonal
  if window is not None:
    ones_q, ones_k = jnp.ones_like(seg_q, bool), jnp.ones_like(seg_k, bool)
    q_min = _block_range(tq.positions, ones_q, bq)[0]  # [B, n_q]
    k_max = _block_range(tk.positions, ones_k, bk)[1]  # [B, n_k]
    live &= (window == 0) | (q_min[:, :, None] - k_max[:, None, :] < window)
  return live.any(0)


def _loop_bounds(live):
  """First and one-past-last live column per row of ``live [n, m]``."""
  first = jnp.argmax(live, axis=1)
  last = live.shape[1] - jnp.argmax(live[:, ::-1], axis=1)
  return first, last


def _pad(x, length):
  """``x`` zero-padded along axis 1 to ``length`` (0 = padding segment)."""
  if x is None or x.shape[1] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  return jnp.pad(x, widths)


def _slice(x, start, size, axis=1):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _scores(q, k, scale, softcap):
  """Tile scores ``[B, K, G, bq, bk]`` (soft-capped) and ``tanh`` (or None).

  q: ``[B, bq, K, G, Dh]``; k: ``[B, bk, K, Dh]``.
  """
  acc = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum('bqkgd,bskd->bkgqs', q, k,
                 preferred_element_type=acc) * scale
  if not softcap:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def blockwise_attention(q, k, v, info: MaskInfo, *, scale=None, softcap=0.0,
                        block_q=None, block_k=None, per_row=None):
  r"""GQA attention in tiles with an online softmax; no ``[T, T]`` array.

  .. math:: o = \mathrm{softmax}(c \tanh(a\,q k^T / c) + m) v

  as :func:`alignax.models.layers.einsum_attention` on
  ``dense_mask(info)``, computed over ``[block_q, block_k]`` tiles whose mask
  is built from ``info`` on the fly (FlashAttention-2). Tiles the mask
  empties (in every row, or per row) are skipped (``_live_tiles``); the backward
  pass recomputes each live tile's probabilities
  :math:`p = \exp(s - \mathrm{lse})` from ``q``, ``k`` and the saved
  log-sum-exp, so memory is ``O(T * block)`` in both passes. Scores and
  accumulators are float32 (float64 kept); ``p`` is cast to ``v.dtype``
  before ``p v``.

  Args:
    q: ``[B, T, H, Dh]``; k, v: ``[B, T, K, Dh]``, ``K`` divides ``H``
      (query head ``h`` reads kv head ``h // (H / K)``).
    info: the mask's ingredients, ``[B, T]`` each.
    scale: score scale ``a``; None = ``1 / sqrt(Dh)``.
    softcap: score soft-cap ``c``; 0 = none.
    block_q, block_k: tile sizes; clipped to ``T``, which they need not
      divide (the tail is padded as segment 0). None = 128 (an MXU tile),
      64 on CPU (faster there, see benchmarks/attention.py).
    per_row: loop over the batch rows (``lax.map``) so that each row skips
      its own empty tiles, rather than the tiles empty in every row; more,
      smaller steps. None = on CPU only.

  Returns:
    ``[B, T, H, Dh]`` in ``q.dtype``.
  """
  b, t, h, dh = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, t) or h % k.shape[2]:
    raise ValueError(f'q {q.shape}, k {k.shape}, v {v.shape}: want [B, T, H, '
                     'Dh] and [B, T, K, Dh] with K dividing H.')
  tokens = _row_tokens(info)
  if tokens.segment_ids.shape != (b, t):
    raise ValueError(f'mask ingredients {tokens.segment_ids.shape} must be '
                     f'[B, T] = {(b, t)}.')
  window = info.window
  if window is not None:
    window = jnp.asarray(window, jnp.int32)
  scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
  cpu = jax.default_backend() == 'cpu'
  block_q = block_q or (64 if cpu else 128)
  block_k = block_k or (64 if cpu else 128)
  per_row = cpu if per_row is None else per_row
  return _flash(q, k, v, tokens, window, scale, float(softcap),
                min(block_q, t), min(block_k, t), bool(per_row))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, tokens, window, scale, softcap, bq, bk, per_row):
  return _flash_fwd(q, k, v, tokens, window, scale, softcap, bq, bk,
                    per_row)[0]


def _rowwise(per_row, fn, *args):
  """``fn(*args)``, or ``fn`` on one batch row at a time (``lax.map``)."""
  if not per_row or args[0].shape[0] == 1:
    return fn(*args)

  def one_row(row):
    out = fn(*jax.tree.map(lambda x: x[None], row))
    return jax.tree.map(lambda x: x[0], out)

  return jax.lax.map(one_row, args)


def _plan(tokens, window, t, bq, bk):
  """Padded query/key ingredients and the ``[n_q, n_k]`` live-tile table."""
  nq, nk = -(-t // bq), -(-t // bk)
  tq = jax.tree.map(lambda x: _pad(x, nq * bq), tokens)
  tk = jax.tree.map(lambda x: _pad(x, nk * bk), tokens)
  return tq, tk, _live_tiles(tq, tk, window, bq, bk)


def _flash_forward(q, k, v, tokens, window, scale, softcap, bq, bk):
  """Output ``[B, T, H, Dh]`` and log-sum-exp ``[B, K, G, nq * bq]``."""
  b, t, h, dh = q.shape
  kh = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  tq, tk, live = _plan(tokens, window, t, bq, bk)
  nq, nk = live.shape
  qp = _pad(q, nq * bq).reshape(b, nq, bq, kh, h // kh, dh)
  q_blocks = jnp.moveaxis(qp, 1, 0)  # [nq, B, bq, K, G, Dh]
  tq_blocks = jax.tree.map(
      lambda x: jnp.moveaxis(x.reshape(b, nq, bq), 1, 0), tq)
  kp, vp = _pad(k, nk * bk), _pad(v, nk * bk)  # [B, nk * bk, K, Dh]
  first, last = _loop_bounds(live)

  def q_tile(_, xs):
    i, q_i, tq_i = xs
    idx_q = i * bq + jnp.arange(bq)

    def update(j, carry):
      m, l, o = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, Dh]
      tk_j = jax.tree.map(lambda x: _slice(x, j * bk, bk), tk)
      mask = _tile_mask(tq_i, tk_j, idx_q, j * bk + jnp.arange(bk), window)
      s, _ = _scores(q_i, _slice(kp, j * bk, bk), scale, softcap)
      s = jnp.where(mask[:, None, None], s, -jnp.inf)  # [B, K, G, bq, bk]
      m_new = jnp.maximum(m, s.max(-1))
      # A query row with nothing live yet keeps m = -inf; exp(-inf - 0) = 0.
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(v.dtype),
                      _slice(vp, j * bk, bk), preferred_element_type=acc)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * o + pv

    def kv_tile(j, carry):
      return jax.lax.cond(live[i, j], update, lambda j, c: c, j, carry)

    stats = jnp.full((b, kh, h // kh, bq), -jnp.inf, acc)
    init = (stats, jnp.zeros_like(stats), jnp.zeros(stats.shape + (dh,), acc))
    m, l, o = jax.lax.fori_loop(first[i], last[i], kv_tile, init)
    # Every query sees at least itself, so l > 0.
    return None, (o / l[..., None], m + jnp.log(l))

  _, (o, lse) = jax.lax.scan(q_tile, None, (jnp.arange(nq), q_blocks,
                                            tq_blocks))
  # o [nq, B, K, G, bq, Dh] -> [B, nq * bq, H, Dh]
  out = o.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, dh)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, h // kh, nq * bq)
  return out.astype(q.dtype), lse


def _flash_fwd(q, k, v, tokens, window, scale, softcap, bq, bk, per_row):
  forward = lambda q, k, v, tokens: _flash_forward(
      q, k, v, tokens, window, scale, softcap, bq, bk)
  out, lse = _rowwise(per_row, forward, q, k, v, tokens)
  return out, (q, k, v, tokens, window, out, lse)


def _flash_bwd(scale, softcap, bq, bk, per_row, residuals, d_out):
  q, k, v, tokens, window, out, lse = residuals
  backward = lambda q, k, v, tokens, out, lse, d_out: _flash_backward(
      q, k, v, tokens, window, out, lse, d_out, scale, softcap, bq, bk)
  grads = _rowwise(per_row, backward, q, k, v, tokens, out, lse, d_out)
  return grads + (None, None)  # no cotangents for the mask ingredients


def _flash_backward(q, k, v, tokens, window, out, lse, d_out, scale, softcap,
                    bq, bk):
  r"""FlashAttention-2 backward, kv tiles outside, query tiles inside.

  With :math:`D_i = \sum_d dO_{id} O_{id}` and recomputed
  :math:`p = e^{s - \mathrm{lse}}`: :math:`dV = p^T dO`,
  :math:`dS = p \odot (dO V^T - D)` (times :math:`1 - \tanh^2` under the
  soft-cap), :math:`dQ = a\,dS K`, :math:`dK = a\,dS^T Q`. ``dK``/``dV`` of
  one kv tile accumulate in the inner loop's carry; ``dQ [B, T, H, Dh]``
  is carried through both loops and updated one query tile at a time.
  """
  b, t, h, dh = q.shape
  kh, g = k.shape[2], h // k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  tq, tk, live = _plan(tokens, window, t, bq, bk)
  nq, nk = live.shape
  qp = _pad(q, nq * bq).reshape(b, nq * bq, kh, g, dh)
  dop = _pad(d_out, nq * bq).reshape(b, nq * bq, kh, g, dh)
  delta = jnp.einsum('bqkgd,bqkgd->bkgq', dop.astype(acc),
                     _pad(out, nq * bq).reshape(dop.shape).astype(acc))
  k_blocks = jnp.moveaxis(_pad(k, nk * bk).reshape(b, nk, bk, kh, dh), 1, 0)
  v_blocks = jnp.moveaxis(_pad(v, nk * bk).reshape(b, nk, bk, kh, dh), 1, 0)
  tk_blocks = jax.tree.map(
      lambda x: jnp.moveaxis(x.reshape(b, nk, bk), 1, 0), tk)
  first, last = _loop_bounds(live.T)

  def kv_tile(dq, xs):
    j, k_j, v_j, tk_j = xs
    idx_k = j * bk + jnp.arange(bk)

    def update(i, carry):
      dq, dk, dv = carry
      start = i * bq
      q_i, do_i = _slice(qp, start, bq), _slice(dop, start, bq)
      tq_i = jax.tree.map(lambda x: _slice(x, start, bq), tq)
      mask = _tile_mask(tq_i, tk_j, start + jnp.arange(bq), idx_k, window)
      s, tanh = _scores(q_i, k_j, scale, softcap)  # [B, K, G, bq, bk]
      lse_i = _slice(lse, start, bq, axis=3)[..., None]
      p = jnp.where(mask[:, None, None], jnp.exp(s - lse_i), 0.0)
      dv = dv + jnp.einsum('bkgqs,bqkgd->bskd', p.astype(do_i.dtype), do_i,
                           preferred_element_type=acc)
      dp = jnp.einsum('bqkgd,bskd->bkgqs', do_i, v_j,
                      preferred_element_type=acc)
      ds = p * (dp - _slice(delta, start, bq, axis=3)[..., None])
      if softcap:
        ds = ds * (1.0 - tanh * tanh)
      ds = ds * scale
      dq_i = jnp.einsum('bkgqs,bskd->bqkgd', ds.astype(k_j.dtype), k_j,
                        preferred_element_type=acc)
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, _slice(dq, start, bq) + dq_i, start, axis=1)
      dk = dk + jnp.einsum('bkgqs,bqkgd->bskd', ds.astype(q_i.dtype), q_i,
                           preferred_element_type=acc)
      return dq, dk, dv

    def q_tile(i, carry):
      return jax.lax.cond(live[i, j], update, lambda i, c: c, i, carry)

    zeros = jnp.zeros((b, bk, kh, dh), acc)
    dq, dk, dv = jax.lax.fori_loop(first[j], last[j], q_tile,
                                   (dq, zeros, zeros))
    return dq, (dk, dv)

  dq = jnp.zeros((b, nq * bq, kh, g, dh), acc)
  dq, (dk, dv) = jax.lax.scan(kv_tile, dq, (jnp.arange(nk), k_blocks,
                                            v_blocks, tk_blocks))
  dq = dq.reshape(b, nq * bq, h, dh)[:, :t].astype(q.dtype)
  # [nk, B, bk, K, Dh] -> [B, T, K, Dh]
  dk = jnp.moveaxis(dk, 0, 1).reshape(b, nk * bk, kh, dh)[:, :t]
  dv = jnp.moveaxis(dv, 0, 1).reshape(b, nk * bk, kh, dh)[:, :t]
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def splash_fits(info: MaskInfo, seq_len: int) -> str:
  """Why the splash kernel cannot run this mask ('' when it can)."""
  if info.prefix is not None or info.attend_to is not None:
    return 'it has a bidirectional prefix or attend_to'
  if info.window is not None:
    return 'it has sliding windows'
  if seq_len % _SPLASH_BLOCK:
    return f'T={seq_len} is not a multiple of {_SPLASH_BLOCK}'
  return ''


def splash_attention(q, k, v, info: MaskInfo, *, scale=None, softcap=0.0,
                     interpret=False):
  """Causal + segment-id attention with the Pallas TPU splash kernel.

  Padding (segment 0) attends causally to padding rather than to itself
  only; those outputs are garbage either way. Under a multi-device mesh the
  kernel needs ``shard_map`` around it (not done here).

  Args:
    q: ``[B, T, H, Dh]``; k, v: ``[B, T, K, Dh]``.
    info: mask ingredients; only ``segment_ids`` may be set.
    scale: score scale; None = ``1 / sqrt(Dh)``.
    softcap: score soft-cap; 0 = none.
    interpret: run the kernel in the Pallas interpreter (tests on CPU).

  Returns:
    ``[B, T, H, Dh]`` in ``q.dtype``.
  """
  b, t, h, dh = q.shape
  if jax.default_backend() != 'tpu' and not interpret:
    raise ValueError(f"attention='splash' needs a TPU, the backend is "
                     f"{jax.default_backend()!r}; use 'auto' or 'blockwise'.")
  why = splash_fits(info, t)
  if why:
    raise ValueError(f"attention='splash' cannot run this mask: {why}; use "
                     "'auto' or 'blockwise'.")
  scale = 1.0 / math.sqrt(dh) if scale is None else scale
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([splash.CausalMask((t, t))] * h), head_shards=1,
      q_seq_shards=1, attn_logits_soft_cap=softcap or None,
      interpret=interpret)
  seg = info.segment_ids
  if seg is None:
    seg = jnp.ones((b, t), jnp.int32)
  seg = splash.SegmentIds(q=seg.astype(jnp.int32), kv=seg.astype(jnp.int32))
  out = jax.vmap(kernel)(
      jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2),  # [B, H, T, Dh]
      jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), segment_ids=seg)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


CUDNN_MAX_SEGMENTS = 64  # runs of equal segment id per row the packed layout takes


def cudnn_fits(info: MaskInfo, dtype, head_dim: int) -> str:
  """Why cuDNN flash attention cannot run this mask ('' when it can).

  Causal rows, packed (segment ids, padding) or not, fit; a bidirectional
  prefix is only checked at run time (see :func:`cudnn_attention`).
  """
  if info.attend_to is not None or info.window is not None:
    return 'it has a shared-prompt attend_to or a sliding window'
  packed = info.segment_ids is not None or info.prefix is not None
  capability = _gpu_capability()
  if packed and capability is not None and capability < (9, 0):
    return (f'packed rows need a Hopper or newer GPU (compute capability '
            f'{".".join(map(str, capability))})')
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f'dtype {jnp.dtype(dtype).name} is not bfloat16/float16'
  if head_dim % 8 or head_dim > 128:
    return f'head_dim={head_dim} is not a multiple of 8 up to 128'
  return ''


def packed_runs(segment_ids: jax.Array, max_runs: int):
  """cuDNN's packed layout of ``[B, T]`` segment ids: runs of equal id.

  Every maximal run of one id is one cuDNN segment, padding runs (id 0)
  included, so that every token lies in a segment (a padding run attends
  causally within itself; its outputs are masked by the loss, as in
  :func:`make_attention_mask`, where padding attends only to itself).

  Returns:
    ``(offsets [B, max_runs + 1], lengths [B, max_runs], fits)``: each run's
    start and length, -1 past a row's last run, and a bool scalar, False
    when some row has more than ``max_runs`` runs (they would be dropped).
  """
  b, t = segment_ids.shape
  seg = segment_ids.astype(jnp.int32)
  start = jnp.concatenate(
      [jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1  # [B, T] run index
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  offsets = jnp.full((b, max_runs + 1), -1, jnp.int32).at[
      rows, jnp.where(start & (run < max_runs), run, max_runs + 1)].set(
          pos, mode='drop')
  lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(
      1, mode='drop')
  lengths = jnp.where(lengths > 0, lengths, -1)
  return offsets, lengths, jnp.all(run[:, -1] < max_runs)


def _backend() -> str:
  return jax.default_backend()


def _gpu_capability() -> tuple[int, ...] | None:
  """The CUDA compute capability of the first device; None off a GPU."""
  if _backend() != 'gpu':
    return None
  cc = getattr(jax.devices()[0], 'compute_capability', None)
  if cc is None:
    return None
  try:
    return tuple(int(x) for x in str(cc).split('.'))
  except ValueError:  # not a CUDA device (ROCm names its targets gfx...)
    return (0,)


def _cudnn_packed(q, k, v, offsets, lengths, scale):
  """cuDNN's packed (THD) causal attention: each run attends itself only."""
  # pylint: disable=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  if k.shape[2] != q.shape[2]:  # the packed path strides k/v by q's heads
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  return cudnn.dot_product_attention(
      q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
      mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout='BTNH')


def cudnn_attention(q, k, v, info: MaskInfo, *, scale=None,
                    max_runs: int = CUDNN_MAX_SEGMENTS):
  """Causal attention with cuDNN's flash kernel: ``-> [B, T, H, Dh]``.

  Plain rows go through ``jax.nn.dot_product_attention(implementation=
  'cudnn')``; packed rows through cuDNN's packed layout (each run of equal
  segment id a sequence, Hopper or newer). Rows that cuDNN cannot run, a
  bidirectional prefix or more than ``max_runs`` runs in a row, are checked
  on the device and take :func:`blockwise_attention` instead (``lax.cond``),
  so the result always follows :func:`make_attention_mask`.
  """
  why = cudnn_fits(info, q.dtype, q.shape[-1])
  if _backend() != 'gpu':
    why = f'it needs a GPU, the backend is {_backend()!r}'
  if why:
    raise ValueError(f"attention='cudnn' cannot run: {why}; use 'auto' or "
                     "'blockwise'.")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if info.segment_ids is None and info.prefix is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation='cudnn')
  seg = info.segment_ids
  if seg is None:
    seg = jnp.ones(q.shape[:2], jnp.int32)
  offsets, lengths, fits = packed_runs(seg, min(max_runs, q.shape[1]))
  if info.prefix is not None:
    fits &= ~jnp.any(info.prefix & (seg > 0))
  return jax.lax.cond(
      fits,
      lambda q, k, v: _cudnn_packed(q, k, v, offsets, lengths, scale),
      lambda q, k, v: blockwise_attention(q, k, v, info, scale=scale),
      q, k, v)


def resolve_attention(name: str, info: MaskInfo, *, seq_len: int, dtype,
                      head_dim: int, softcap: float = 0.0,
                      backend: str | None = None) -> str:
  """The path ``name`` runs: ``'auto'`` picked per backend, old names mapped.

  Returns one of ``'blockwise'``, ``'splash'``, ``'cudnn'``, ``'reference'``,
  ``'fused'``.
  """
  if name not in ATTENTIONS:
    raise ValueError(f'attention {name!r} is not one of {list(ATTENTIONS)}.')
  if name == 'einsum':
    return 'reference'
  if name != 'auto':
    return name
  backend = backend or jax.default_backend()
  if backend == 'tpu' and not splash_fits(info, seq_len):
    return 'splash'
  if backend == 'gpu' and not softcap and not cudnn_fits(info, dtype,
                                                          head_dim):
    return 'cudnn'
  return 'blockwise'
