"""Tests of the attention paths: blockwise, splash, fused vs the reference.

The oracle is ``layers.einsum_attention`` on the dense mask, whose mask is
itself checked against a NumPy loop here (windows, ``attend_to``) and in
test_transformer.py (segments, prefix).
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from alignax import models
from alignax.models import attention, layers


def _segments(lengths, t):
  """Packed ``[T]`` segment ids (1, 2, ...; 0 after), restarting positions."""
  seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
  start = 0
  for n, length in enumerate(lengths):
    seg[start:start + length] = n + 1
    pos[start:start + length] = np.arange(length)
    start += length
  return seg, pos


def _rows(t, kind):
  """``MaskInfo`` ingredients of two rows of length ``t`` for one ``kind``."""
  rows = [_segments([t // 3, t // 2], t), _segments([5, t // 4, t // 3], t)]
  seg = np.stack([r[0] for r in rows])
  pos = np.stack([r[1] for r in rows])
  prefix = attend_to = None
  if kind == 'prefix':  # UL2: a different prefix length per row and segment.
    prefix = np.zeros((2, t), bool)
    prefix[0, :4] = True
    prefix[0, t // 3:t // 3 + 7] = True
    prefix[1, 5:5 + t // 8] = True
  if kind == 'attend_to':  # Shared prompt (segment 1) read by segments 2, 3.
    attend_to = np.where(seg > 1, 1, 0).astype(np.int32)
    for n in range(2):  # Responses continue the prompt's positions.
      pos[n] = np.where(seg[n] > 1, pos[n] + (seg[n] == 1).sum(), pos[n])
  return attention.MaskInfo(seg, pos, prefix, attend_to)


def _mask_numpy(info, window=0):
  """The mask by its definition, one (query, key) pair at a time."""
  seg, pos = info.segment_ids, info.positions
  b, t = seg.shape
  prefix = np.zeros((b, t), bool) if info.prefix is None else info.prefix
  att = np.zeros((b, t), int) if info.attend_to is None else info.attend_to
  mask = np.zeros((b, 1, t, t), bool)
  for n in range(b):
    for i in range(t):
      for j in range(t):
        same = seg[n, i] == seg[n, j] != 0
        visible = j <= i or (prefix[n, i] and prefix[n, j])
        other = att[n, i] == seg[n, j] != 0 and j <= i
        near = not window or pos[n, i] - pos[n, j] < window
        mask[n, 0, i, j] = ((same and visible) or i == j or other) and near
  return mask


KINDS = ['causal', 'prefix', 'attend_to']


@pytest.mark.parametrize('kind', KINDS)
def test_dense_mask_matches_numpy(kind):
  info = _rows(23, kind)
  for window in (None, 4):
    np.testing.assert_array_equal(
        attention.dense_mask(info._replace(window=window)),
        _mask_numpy(info, window))


def _qkv(t, h=4, kv=2, dh=8, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, t, h, dh)).astype(dtype)
  k, v = rng.normal(size=(2, 2, t, kv, dh)).astype(dtype)
  w = rng.normal(size=q.shape).astype(dtype)  # cotangent of the output
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
  """``fn(q, k, v)`` and the gradients of ``<fn(q, k, v), w>``, jitted."""

  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(jnp.asarray(w, out.dtype))

  return run(q, k, v)


def _assert_close(got, want, tol=2e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# T = 37 is a multiple of neither block size; the tail is padded.
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('window, softcap, kv, per_row', [
    (None, 0.0, 2, True), (5, 0.0, 2, False), (None, 3.0, 1, False),
    (6, 2.0, 4, True)])
def test_blockwise_equals_reference(kind, window, softcap, kv, per_row):
  info = _rows(37, kind)._replace(window=window)
  q, k, v, w = _qkv(37, kv=kv)
  mask = attention.dense_mask(info)
  want = _value_and_grads(lambda q, k, v: layers.einsum_attention(
      q, k, v, mask, scale=0.3, softcap=softcap), q, k, v, w)
  got = _value_and_grads(lambda q, k, v: attention.blockwise_attention(
      q, k, v, info, scale=0.3, softcap=softcap, block_q=8, block_k=16,
      per_row=per_row), q, k, v, w)
  _assert_close(got, want)


@pytest.mark.parametrize('kind', KINDS)
def test_fused_equals_reference(kind):
  info = _rows(37, kind)._replace(window=5)
  q, k, v, w = _qkv(37)
  mask = attention.dense_mask(info)
  want = _value_and_grads(
      lambda q, k, v: layers.einsum_attention(q, k, v, mask), q, k, v, w)
  got = _value_and_grads(
      lambda q, k, v: layers.fused_attention(q, k, v, mask), q, k, v, w)
  _assert_close(got, want)


def test_blockwise_padding_queries_are_finite():
  # Row 1 is all padding; row 0 is padding after 3 tokens.
  seg = np.array([[1, 1, 1] + [0] * 13, [0] * 16], np.int32)
  info = attention.MaskInfo(seg, np.zeros_like(seg))
  q, k, v, w = _qkv(16)
  out, grads = _value_and_grads(lambda q, k, v: attention.blockwise_attention(
      q, k, v, info, block_q=4, block_k=4), q, k, v, w)
  for x in (out,) + grads:
    assert np.isfinite(np.asarray(x)).all()
  # A padding query attends to itself only: its output is its own value.
  np.testing.assert_allclose(out[1], np.repeat(v[1], 2, axis=1), rtol=1e-6)


def test_blockwise_gradients_float64():
  with jax.enable_x64(True):
    info = _rows(13, 'prefix')._replace(window=4)
    q, k, v, _ = _qkv(13, dtype=np.float64)
    fn = jax.jit(lambda q, k, v: attention.blockwise_attention(
        q, k, v, info, softcap=2.0, block_q=4, block_k=8))
    check_grads(fn, (q, k, v), order=1, modes=['rev'])


def test_blockwise_window_is_traced():
  info = _rows(37, 'causal')
  q, k, v, _ = _qkv(37)
  fn = jax.jit(lambda window: attention.blockwise_attention(
      q, k, v, info._replace(window=window), block_q=8, block_k=8))
  for window in (0, 3):
    mask = attention.dense_mask(info._replace(window=window or None))
    np.testing.assert_allclose(fn(window), layers.einsum_attention(
        q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_live_tiles_skip_empty_tiles_and_keep_the_rest():
  # Causal, one segment: exactly the tiles on and below the diagonal.
  seg = np.ones((1, 64), np.int32)
  tokens = attention._row_tokens(attention.MaskInfo(seg, seg))
  live = attention._live_tiles(tokens, tokens, None, 16, 16)
  np.testing.assert_array_equal(live, np.tril(np.ones((4, 4), bool)))
  # Segments aligned to tiles: only tiles within a segment.
  seg = np.repeat(np.array([[1, 2]]), 32, axis=1)
  tokens = attention._row_tokens(attention.MaskInfo(seg, seg))
  live = attention._live_tiles(tokens, tokens, None, 16, 16)
  np.testing.assert_array_equal(live, np.kron(np.eye(2), np.tril(np.ones(
      (2, 2)))).astype(bool))
  # A window of 8 positions over tiles of 8: the diagonal and the one below.
  pos = np.arange(64)[None]
  tokens = attention._row_tokens(attention.MaskInfo(None, pos, window=8))
  live = attention._live_tiles(tokens, tokens, 8, 8, 8)
  np.testing.assert_array_equal(
      live, np.tri(8, dtype=bool) & ~np.tri(8, k=-2, dtype=bool))
  # Every tile the dense mask touches is live, for every kind of row.
  for kind in KINDS:
    info = _rows(40, kind)._replace(window=7)
    tokens = attention._row_tokens(info)
    live = attention._live_tiles(tokens, tokens, 7, 8, 8)
    touched = np.asarray(attention.dense_mask(info)).reshape(
        2, 5, 8, 5, 8).any(axis=(0, 2, 4))
    assert not (touched & ~np.asarray(live)).any()
    assert (~np.asarray(live)).any()  # something is skipped


def test_splash_equals_reference_in_interpret_mode():
  # The Pallas interpreter runs the TPU kernel on CPU: causal + segments.
  t = 256
  seg = np.stack([_segments([100, 140], t)[0], _segments([256], t)[0]])
  info = attention.MaskInfo(seg, np.zeros_like(seg))
  q, k, v, w = _qkv(t, h=2, kv=1, dh=128)
  keep = (seg > 0)[:, :, None, None]  # padding outputs differ (garbage)
  w = w * keep
  mask = attention.dense_mask(info)
  want = _value_and_grads(lambda q, k, v: layers.einsum_attention(
      q, k, v, mask, softcap=2.0) * keep, q, k, v, w)
  got = _value_and_grads(lambda q, k, v: attention.splash_attention(
      q, k, v, info, softcap=2.0, interpret=True) * keep, q, k, v, w)
  _assert_close(got, want, tol=2e-4)


def test_splash_and_cudnn_refuse_clearly_on_cpu():
  info = _rows(256, 'prefix')
  q, k, v, _ = _qkv(256)
  with pytest.raises(ValueError, match="'splash' needs a TPU"):
    attention.splash_attention(q, k, v, info)
  with pytest.raises(ValueError, match="'splash' cannot run this mask: it "
                     'has a bidirectional prefix'):
    attention.splash_attention(q, k, v, info, interpret=True)
  with pytest.raises(ValueError, match="'cudnn' cannot run"):
    attention.cudnn_attention(q, k, v, info)


def _runs_numpy(seg, max_runs):
  """cuDNN's packed layout by its definition: runs of equal id, in order."""
  b, t = seg.shape
  offsets = np.full((b, max_runs + 1), -1, np.int32)
  lengths = np.full((b, max_runs), -1, np.int32)
  fits = True
  for n in range(b):
    runs = []
    for i in range(t):
      if i == 0 or seg[n, i] != seg[n, i - 1]:
        runs.append([i, 0])
      runs[-1][1] += 1
    fits &= len(runs) <= max_runs
    for r, (start, length) in enumerate(runs[:max_runs]):
      offsets[n, r], lengths[n, r] = start, length
  return offsets, lengths, fits


def test_packed_runs_match_numpy():
  rng = np.random.default_rng(0)
  seg = np.stack([_segments(rng.integers(1, 9, size=n), 40)[0]
                  for n in (1, 3, 6)])
  seg[0, 5:8] = 0  # padding inside a row is a run of its own
  for max_runs in (3, 4, 7, 40):
    got = jax.jit(attention.packed_runs, static_argnums=1)(seg, max_runs)
    want = _runs_numpy(seg, max_runs)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  assert not attention.packed_runs(seg, 6)[2]  # row 2: 6 segments + padding


def _emulated_cudnn_packed(q, k, v, offsets, lengths, scale):
  """cuDNN's packed causal kernel, emulated from the offsets and lengths.

  A token attends causally within the run that covers it; the test checks
  that runs built by ``packed_runs`` reproduce ``dense_mask`` (for every
  non-padding query) without ever reading the segment ids.
  """
  t = q.shape[1]
  idx = jnp.arange(t)
  inside = ((idx[None, None] >= offsets[:, :-1, None])
            & (idx[None, None] < offsets[:, :-1, None] + lengths[..., None])
            & (lengths[..., None] > 0))  # [B, runs, T]
  run = jnp.argmax(inside, axis=1) + jnp.where(inside.any(1), 1, -t)
  mask = ((run[:, :, None] == run[:, None, :])
          & (idx[None, :] <= idx[:, None])[None])[:, None]
  return layers.einsum_attention(q, k, v, mask, scale=scale).astype(q.dtype)


@pytest.mark.parametrize('kind, max_runs', [
    ('causal', 8), ('causal', 1), ('prefix', 8), ('plain', 8)])
def test_cudnn_packed_layout_and_fallback(monkeypatch, kind, max_runs):
  """The packed cuDNN path, its kernel emulated on CPU, equals the reference.

  ``max_runs=1`` is fewer runs than a row has and ``'prefix'`` rows have a
  bidirectional prefix: both must take the blockwise branch of the
  ``lax.cond`` and still match.
  """
  monkeypatch.setattr(attention, '_backend', lambda: 'gpu')
  monkeypatch.setattr(attention, '_gpu_capability', lambda: (9, 0))
  calls = []

  def emulated(*args):
    calls.append(1)
    return _emulated_cudnn_packed(*args)

  monkeypatch.setattr(attention, '_cudnn_packed', emulated)
  info = _rows(37, 'causal' if kind == 'plain' else kind)
  if kind == 'plain':
    info = info._replace(segment_ids=None)
  q, k, v, w = _qkv(37, kv=2, dh=16, dtype=jnp.bfloat16)
  keep = (np.ones((2, 37), bool) if info.segment_ids is None
          else info.segment_ids > 0)[:, :, None, None]
  w = w * keep
  mask = attention.dense_mask(info)
  f32 = lambda x: x.astype(jnp.float32)
  want = _value_and_grads(lambda q, k, v: layers.einsum_attention(
      f32(q), f32(k), f32(v), mask, scale=0.3) * keep, q, k, v, w)
  if kind == 'plain':  # jax.nn's cuDNN call, which has no CPU lowering
    with pytest.raises(Exception, match='cudnn|cuDNN|CUDA|GPU|gpu'):
      _value_and_grads(lambda q, k, v: attention.cudnn_attention(
          q, k, v, info, scale=0.3), q, k, v, w)
    return
  got = _value_and_grads(lambda q, k, v: attention.cudnn_attention(
      q, k, v, info, scale=0.3, max_runs=max_runs) * keep, q, k, v, w)
  assert calls  # the packed kernel is traced in every case (lax.cond)
  _assert_close(jax.tree.map(f32, got), want, tol=3e-2)
  offsets, lengths, fits = attention.packed_runs(info.segment_ids, max_runs)
  assert bool(fits) == (max_runs == 8)
  # Where the fallback was taken, the packed kernel alone would be wrong.
  alone = _emulated_cudnn_packed(q, k, v, offsets, lengths, 0.3) * keep
  wrong = not np.allclose(f32(alone), want[0], atol=3e-2)
  assert wrong == (kind == 'prefix' or max_runs == 1)


def test_resolve_attention_per_backend():
  packed = attention.MaskInfo(np.ones((1, 256), np.int32), None)
  plain = attention.MaskInfo(None, None)
  prefix = packed._replace(prefix=np.zeros((1, 256), bool))
  kw = dict(seq_len=256, dtype=jnp.bfloat16, head_dim=64)
  resolve = attention.resolve_attention
  assert resolve('auto', packed, backend='tpu', **kw) == 'splash'
  assert resolve('auto', prefix, backend='tpu', **kw) == 'blockwise'
  assert resolve('auto', packed._replace(window=4), backend='tpu',
                 **kw) == 'blockwise'
  assert resolve('auto', packed, backend='tpu', **{**kw, 'seq_len': 100}) == (
      'blockwise')
  assert resolve('auto', plain, backend='gpu', **kw) == 'cudnn'
  assert resolve('auto', plain, backend='gpu', softcap=1.0, **kw) == (
      'blockwise')
  assert resolve('auto', packed, backend='gpu', **kw) == 'cudnn'
  assert resolve('auto', prefix, backend='gpu', **kw) == 'cudnn'  # run time
  assert resolve('auto', packed._replace(window=4), backend='gpu',
                 **kw) == 'blockwise'
  assert resolve('auto', plain, backend='gpu',
                 **{**kw, 'dtype': jnp.float32}) == 'blockwise'
  for backend in ('cpu', None):
    assert resolve('auto', plain, backend=backend, **kw) == 'blockwise'
  assert resolve('einsum', plain, **kw) == 'reference'
  for name in ('fused', 'blockwise', 'splash', 'cudnn', 'reference'):
    assert resolve(name, plain, **kw) == name


def test_cudnn_packed_rows_need_hopper(monkeypatch):
  packed = attention.MaskInfo(np.ones((1, 256), np.int32), None)
  plain = attention.MaskInfo(None, None)
  kw = dict(seq_len=256, dtype=jnp.bfloat16, head_dim=64, backend='gpu')
  monkeypatch.setattr(attention, '_gpu_capability', lambda: (8, 0))  # A100
  assert 'Hopper' in attention.cudnn_fits(packed, jnp.bfloat16, 64)
  assert attention.resolve_attention('auto', packed, **kw) == 'blockwise'
  assert attention.resolve_attention('auto', plain, **kw) == 'cudnn'
  monkeypatch.setattr(attention, '_gpu_capability', lambda: (9, 0))  # H100
  assert attention.resolve_attention('auto', packed, **kw) == 'cudnn'


# --- through the model --------------------------------------------------------


CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=40,
                         layer_windows=(6, 0), attn_logit_softcap=3.0,
                         attention='reference')


def test_config_accepts_old_and_new_attention_names():
  for name in models.config.ATTENTIONS:
    softcap = 0.0 if name in ('fused', 'cudnn') else 3.0
    dataclasses.replace(CFG, attention=name, attn_logit_softcap=softcap)
  for name in ('fused', 'cudnn'):
    with pytest.raises(ValueError, match='ModelConfig.attn_logit_softcap'):
      dataclasses.replace(CFG, attention=name)


@pytest.mark.parametrize('kind', ['prefix', 'attend_to'])
def test_transformer_auto_equals_reference(kind):
  info = _rows(37, kind)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 37))
  kw = dict(positions=info.positions, segment_ids=info.segment_ids,
            prefix=info.prefix, attend_to=info.attend_to)

  def loss_and_grads(name):
    model = models.Transformer(dataclasses.replace(CFG, attention=name),
                               rngs=nnx.Rngs(0))

    @nnx.jit
    def run(model):
      def loss(model):
        logits = model(tokens, **kw)
        return jnp.sum(jnp.where(info.segment_ids[..., None] > 0,
                                 jax.nn.log_softmax(logits), 0.0))
      return nnx.value_and_grad(loss)(model)

    return run(model)

  # On CPU 'auto' is 'blockwise' (test_resolve_attention_per_backend).
  want, got = loss_and_grads('reference'), loss_and_grads('auto')
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_close(jax.tree.leaves(nnx.state(got[1])),
                jax.tree.leaves(nnx.state(want[1])), tol=1e-4)


# --- memory: nothing T x T --------------------------------------------------


def _compiled_blockwise(t, b=1, h=4, dh=32):
  """Forward + backward of blockwise attention on packed rows, compiled."""
  q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    info = attention.MaskInfo(seg, seg)
    return attention.blockwise_attention(q, k, v, info).sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.lower(q, q, q, seg).compile()


def test_blockwise_never_holds_t_by_t_and_grows_linearly():
  small, large = _compiled_blockwise(2048), _compiled_blockwise(4096)
  for t, compiled in ((2048, small), (4096, large)):
    for dims in re.findall(r'\[([0-9,]+)\]', compiled.as_text()):
      sizes = [int(d) for d in dims.split(',') if d]
      # No T x T (or T x T x heads) buffer anywhere: at most T x block.
      assert np.prod(sizes) < t * t // 4, (t, dims)
  temp_small = small.memory_analysis().temp_size_in_bytes
  temp_large = large.memory_analysis().temp_size_in_bytes
  assert temp_large < 2.5 * temp_small, (temp_small, temp_large)
  # A quarter of one head's dense float32 scores (64 MiB; all heads: 256).
  assert temp_large < 4096 * 4096 * 4 // 4, temp_large


def test_transformer_auto_builds_nothing_t_by_t():
  t = 1024
  cfg = dataclasses.replace(CFG, attention='auto', max_seq_len=t)
  graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def loss(params, tokens, seg, prefix, attend_to):
    model = nnx.merge(graphdef, params)
    return model(tokens, segment_ids=seg, prefix=prefix,
                 attend_to=attend_to).sum()

  hlo = jax.jit(jax.grad(loss)).lower(
      params, tokens, tokens, jax.ShapeDtypeStruct((1, t), bool),
      tokens).compile().as_text()
  for dims in re.findall(r'\[([0-9,]+)\]', hlo):
    assert np.prod([int(d) for d in dims.split(',') if d]) < t * t // 4, dims
