"""Tests of the decoder-only transformer, its layers and ModelConfig."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from alignax import models
from alignax.models import layers

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
T = 16


def _model(**overrides):
  return models.Transformer(dataclasses.replace(CFG, **overrides),
                            rngs=nnx.Rngs(0))


@nnx.jit(static_argnames='return_hidden')
def _forward(model, tokens, positions, segment_ids, prefix, return_hidden):
  return model(tokens, positions=positions, segment_ids=segment_ids,
               prefix=prefix, return_hidden=return_hidden)


def _logits(model, tokens, positions=None, segment_ids=None, prefix=None,
            return_hidden=False):
  """Jitted forward; defaults spelled out so every call shares one compile."""
  b, t = tokens.shape
  if positions is None:
    positions = np.broadcast_to(np.arange(t), (b, t))
  if segment_ids is None:
    segment_ids = np.ones((b, t), np.int32)
  if prefix is None:
    prefix = np.zeros((b, t), bool)
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(segment_ids), jnp.asarray(prefix),
                             return_hidden))


def _tokens(b=1, t=T, seed=0):
  return np.random.default_rng(seed).integers(1, CFG.vocab_size, (b, t))


def _pad_to(x, value=0):
  """Right-pads ``[1, t]`` to ``[1, T]`` so calls reuse one compile."""
  return np.pad(x, ((0, 0), (0, T - x.shape[1])), constant_values=value)


def _packed_row():
  """Segment 1 (6 tokens, prefix 3), segment 2 (7 tokens, prefix 2), 3 pad."""
  segment_ids = np.array([[1] * 6 + [2] * 7 + [0] * 3])
  positions = np.array([list(range(6)) + list(range(7)) + [0] * 3])
  prefix = np.array([[1, 1, 1, 0, 0, 0] + [1, 1, 0, 0, 0, 0, 0] + [0] * 3],
                    bool)
  return segment_ids, positions, prefix


@pytest.fixture(scope='module')
def model():
  return _model()


# --- ModelConfig ------------------------------------------------------------


@pytest.mark.parametrize('field, value', [
    ('d_model', 0), ('n_layers', -1), ('vocab_size', 0), ('norm_eps', 0.0),
    ('n_kv_heads', 3), ('head_dim', 7), ('remat', 'sometimes'),
    ('attention', 'flash'), ('attention_impl', 'triton'), ('dtype', 'float7'),
])
def test_config_validation_names_field(field, value):
  with pytest.raises(ValueError, match=f'ModelConfig.{field}'):
    dataclasses.replace(CFG, **{field: value})


@pytest.mark.parametrize('overrides', [
    {}, {'tie_embeddings': True}, {'n_kv_heads': 4}, {'n_kv_heads': 1},
])
def test_num_params_matches_module(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  state = nnx.state(
      nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))),
      nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()


def test_num_params_and_flops_hand_computed():
  # By hand for CFG: per layer q,o 2*32*4*8=2048, k,v 2*32*2*8=1024,
  # mlp 3*32*64=6144, norms 64 -> 9280; embed 64*32=2048, final norm 32,
  # lm head 2048 -> 2*9280 + 2048 + 32 + 2048 = 22688.
  assert CFG.num_params() == 22688
  # matmul params 2*(2048+1024+6144) + 2048 = 20480; 6*20480 = 122880;
  # attention 12*2*4*8*16 = 12288.
  assert CFG.flops_per_token(16) == 122880 + 12288


# --- layers against NumPy references ----------------------------------------


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  norm = layers.RMSNorm(8, eps=1e-6, dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.arange(1, 9, dtype=jnp.float32)
  expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.arange(
      1, 9)
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)
  # By hand: [3, 4] has rms sqrt(12.5) -> [0.84853, 1.13137].
  norm2 = layers.RMSNorm(2, eps=0.0, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(norm2(jnp.array([3.0, 4.0])),
                             [0.848528, 1.131371], rtol=1e-5)


def _rope_numpy(x, positions, theta):
  """Rotates pair (i, i + Dh/2) by angle p * theta**(-2i/Dh), one 2x2 matrix
  at a time."""
  out = np.array(x, np.float64)
  half = x.shape[-1] // 2
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(half):
        a = positions[b, t] * theta**(-2.0 * i / x.shape[-1])
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pair = np.stack([x[b, t, :, i], x[b, t, :, i + half]])  # [2, N]
        out[b, t, :, i], out[b, t, :, i + half] = rot @ pair
  return out


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 50, (2, 5))
  np.testing.assert_allclose(layers.apply_rope(jnp.asarray(x), pos, 100.0),
                             _rope_numpy(x, pos, 100.0), rtol=1e-4, atol=1e-5)
  # By hand: Dh=2, position 1 rotates [1, 0] by 1 rad; position 0 is identity.
  e1 = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
  np.testing.assert_allclose(layers.apply_rope(e1, np.array([[1]]), 1e4),
                             [[[[np.cos(1.0), np.sin(1.0)]]]], rtol=1e-6)
  np.testing.assert_allclose(layers.apply_rope(e1, np.array([[0]]), 1e4), e1)
  # <R_p q, R_s k> depends only on p - s.
  q, k = jnp.asarray(x[:1, :1]), jnp.asarray(x[1:, :1])
  def dot(p, s):
    return float(jnp.sum(layers.apply_rope(q, np.array([[p]]), 1e4)
                         * layers.apply_rope(k, np.array([[s]]), 1e4)))
  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  np.testing.assert_allclose(dot(0, 5), dot(20, 25), rtol=1e-4)
  assert abs(dot(7, 3) - dot(3, 7)) > 1e-3  # and on its sign


def _mask_numpy(segment_ids, prefix):
  b, t = segment_ids.shape
  mask = np.zeros((b, 1, t, t), bool)
  for n in range(b):
    for i in range(t):
      for j in range(t):
        same = segment_ids[n, i] == segment_ids[n, j] != 0
        visible = j <= i or (prefix[n, i] and prefix[n, j])
        mask[n, 0, i, j] = (same and visible) or i == j
  return mask


def test_attention_mask_matches_numpy():
  segment_ids, _, prefix = _packed_row()
  np.testing.assert_array_equal(
      layers.make_attention_mask(segment_ids, prefix),
      _mask_numpy(segment_ids, prefix))
  rng = np.random.default_rng(1)
  seg = np.sort(rng.integers(0, 4, (3, 12)), axis=1)[:, ::-1]
  pre = rng.random((3, 12)) < 0.4
  np.testing.assert_array_equal(jax.jit(layers.make_attention_mask)(seg, pre),
                                _mask_numpy(seg, pre))
  with pytest.raises(ValueError, match=r'prefix \(3, 11\)'):
    layers.make_attention_mask(seg, pre[:, :11])


def _attention_numpy(q, k, v, mask):
  """Per-head softmax attention; query head h reads kv head h // (H / K)."""
  b, t, h, dh = q.shape
  group = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for n in range(b):
    for head in range(h):
      s = q[n, :, head] @ k[n, :, head // group].T / np.sqrt(dh)  # [T, S]
      s = np.where(mask[n, 0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[n, :, head] = (p / p.sum(-1, keepdims=True)) @ v[n, :, head // group]
  return out


@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_attention_functions_match_numpy(kv_heads):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(1, T, 4, 8)).astype(np.float32)
  k, v = rng.normal(size=(2, 1, T, kv_heads, 8)).astype(np.float32)
  segment_ids, _, prefix = _packed_row()
  mask = np.asarray(layers.make_attention_mask(segment_ids, prefix))
  expected = _attention_numpy(q, k, v, mask)
  for fn in (layers.einsum_attention, layers.fused_attention):
    out = np.asarray(fn(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_gradients_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 6, 4, 4))
    k, v = rng.normal(size=(2, 1, 6, 2, 4))
    segment_ids = np.array([[1, 1, 1, 2, 2, 0]])
    prefix = np.array([[1, 1, 0, 1, 0, 0]], bool)
    mask = layers.make_attention_mask(segment_ids, prefix)
    attention_then_rope = jax.jit(lambda q, k, v: layers.apply_rope(
        layers.einsum_attention(q, k, v, mask), np.arange(6)[None], 1e4))
    check_grads(attention_then_rope, (q, k, v), order=1, modes=['rev'])


# --- the Transformer ----------------------------------------------------------


def test_logical_axis_names():
  state = nnx.state(nnx.eval_shape(lambda: _model()), nnx.Param)
  names = {'.'.join(map(str, path)): v.get_metadata('out_sharding')
           for path, v in nnx.to_flat_state(state)}
  layer_names = {
      'attn.q': ('embed', 'heads', 'head_dim'),
      'attn.k': ('embed', 'kv_heads', 'head_dim'),
      'attn.v': ('embed', 'kv_heads', 'head_dim'),
      'attn.o': ('heads', 'head_dim', 'embed'),
      'mlp.gate': ('embed', 'mlp'), 'mlp.up': ('embed', 'mlp'),
      'mlp.down': ('mlp', 'embed'),
      'attn_norm.scale': ('norm',), 'mlp_norm.scale': ('norm',),
  }
  expected = {f'blocks.{k}': ('layers',) + v for k, v in layer_names.items()}
  expected.update({'embed.embedding': ('vocab', 'embed'),
                   'final_norm.scale': ('norm',),
                   'lm_head': ('embed', 'vocab')})
  assert names == expected
  assert state['blocks']['attn']['q'].shape == (2, 32, 4, 8)
  # Names without a rule pass through unchanged, so every name needs one.
  rules = (('layers', None), ('embed', 'fsdp'), ('heads', 'tensor'),
           ('head_dim', None))
  with nnx.logical_axis_rules(rules):
    spec = nnx.get_partition_spec(state)['blocks']['attn']['q'].get_value()
  assert spec == jax.P(None, 'fsdp', 'tensor', None)


def test_causality(model):
  tokens = _tokens()
  base = _logits(model, tokens)
  assert base.shape == (1, T, CFG.vocab_size) and base.dtype == np.float32
  for t in (0, 5, T - 1):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    out = _logits(model, changed)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


def test_packed_segments_equal_separate_rows(model):
  segment_ids, positions, prefix = _packed_row()
  tokens = _tokens()
  packed = _logits(model, tokens, positions, segment_ids, prefix)
  for start, stop in ((0, 6), (6, 13)):
    # The segment alone at the start of a row, the rest padding.
    alone = _logits(model, _pad_to(tokens[:, start:stop]),
                    _pad_to(positions[:, start:stop]),
                    _pad_to(np.ones((1, stop - start), int)),
                    _pad_to(prefix[:, start:stop], False))
    np.testing.assert_allclose(packed[:, start:stop], alone[:, :stop - start],
                               atol=1e-5)
  # Padding tokens do not leak into real ones either.
  other_pad = tokens.copy()
  other_pad[:, 13:] = 5
  np.testing.assert_allclose(
      _logits(model, other_pad, positions, segment_ids, prefix)[:, :13],
      packed[:, :13], atol=1e-6)


def test_prefix_lm_visibility(model):
  # One segment: prefix = tokens 0..4, targets 5..15.
  prefix = np.array([[True] * 5 + [False] * 11])
  tokens = _tokens()
  base = _logits(model, tokens, prefix=prefix)

  def changed_at(t):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    return np.abs(_logits(model, changed, prefix=prefix) - base).max(-1)[0]

  diff = changed_at(3)  # a late prefix token is seen by the whole prefix...
  assert (diff[:5] > 1e-5).all()
  diff = changed_at(8)  # ...while a target sees the past only
  assert (diff[:8] == 0).all() and diff[8] > 1e-5
  diff = changed_at(5)  # the first target is not part of the prefix
  assert (diff[:5] == 0).all()


def test_einsum_equals_fused_attention(model):
  # GQA (K=2 < H=4); MHA and MQA are compared at the function level above.
  # The packed row ends in 3 padding tokens, whose rows must stay finite.
  segment_ids, positions, prefix = _packed_row()
  tokens = _tokens()
  fused = _logits(model, tokens, positions, segment_ids, prefix)
  ref = _logits(_model(attention='einsum'), tokens, positions, segment_ids,
                prefix)
  assert np.isfinite(fused).all() and np.isfinite(ref).all()
  np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv(model):
  # A GQA model is an MHA model whose k/v kernels repeat each kv head G times.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name in ('k', 'v'):
    kernel = params['blocks']['attn'][name]  # [L, D, K, Dh]
    params['blocks']['attn'][name] = jnp.repeat(kernel, 2, axis=2)
  mha = _model(n_kv_heads=4)
  mha_params = nnx.state(mha, nnx.Param)
  nnx.replace_by_pure_dict(mha_params, params)
  nnx.update(mha, mha_params)
  tokens = _tokens()
  np.testing.assert_allclose(_logits(mha, tokens), _logits(model, tokens),
                             rtol=1e-5, atol=1e-5)


def test_tied_embeddings():
  tied = _model(tie_embeddings=True)
  assert not hasattr(tied, 'lm_head')
  tokens = _tokens()
  hidden = _logits(tied, tokens, return_hidden=True)
  assert hidden.shape == (1, T, CFG.d_model)
  logits = _logits(tied, tokens)
  embedding = np.asarray(tied.embed.embedding[...])
  np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(tied.logits_from_hidden(hidden), logits,
                             rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params(model):
  bf16 = _model(dtype='bfloat16')
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  tokens = _tokens()
  out = _logits(bf16, tokens)
  assert out.dtype == np.float32 and np.isfinite(out).all()
  assert _logits(bf16, tokens, return_hidden=True).dtype == jnp.bfloat16
  np.testing.assert_allclose(out, _logits(model, tokens), atol=0.1)


def _loss_and_grads(model, tokens):
  def loss_fn(model):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
  return nnx.jit(nnx.value_and_grad(loss_fn))(model)


def test_remat_policies_same_loss_and_grads(model):
  tokens = jnp.asarray(_tokens())
  loss, grads = _loss_and_grads(model, tokens)
  assert np.isfinite(float(loss))
  # 'full' is the very policy of 'nothing_saveable', so it stands for both.
  assert (models.REMAT_POLICIES['full']
          is models.REMAT_POLICIES['nothing_saveable'])
  for remat in (*(p for p in models.REMAT_POLICIES
                  if p not in ('none', 'nothing_saveable')),
                'save:context,mlpwo'):
    loss_r, grads_r = _loss_and_grads(_model(remat=remat), tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 nnx.state(grads_r), nnx.state(grads))


def _saved_bytes(remat, t=256):
  """Temp bytes of the compiled loss + gradient, f32, 2 layers, [2, t]."""
  cfg = dataclasses.replace(CFG, remat=remat, max_seq_len=t, d_model=64,
                            d_ff=256, head_dim=16, attention='blockwise')
  graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, t + 1)))

  def loss(params):
    h = nnx.merge(graphdef, params)(tokens[:, :-1], return_hidden=True)
    return jnp.sum(h ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_named_remat_policies_save_what_they_name():
  # Each saved [L, B, T, ...] stack costs temp memory in the compiled
  # gradient; saving more names costs more, saving nothing the least.
  full = _saved_bytes('full')
  qkv = _saved_bytes('save_qkv_proj')
  except_mlp = _saved_bytes('save_dot_except_mlp')
  everything = _saved_bytes('none')
  assert full < qkv < except_mlp < everything
  # mlpwo feeds only the residual add, whose gradient does not need it, so
  # saving it may cost nothing; never less than not saving it.
  assert _saved_bytes('save_dot_except_mlpwi') >= except_mlp
  # 'save:<names>' is the same policy as the named one it spells out.
  assert _saved_bytes('save:query_proj,key_proj,value_proj') == qkv
  # Saving q, k and v ([L, B, T, H + 2K, Dh] = 2 x 2 x 256 x 8 x 16 floats)
  # costs at least those bytes more than saving nothing.
  assert qkv - full >= 2 * 2 * 256 * 8 * 16 * 4


def test_remat_names_are_checked():
  with pytest.raises(ValueError, match="unknown: \\['mlp'\\]"):
    _model(remat='save:query_proj,mlp')
  with pytest.raises(ValueError, match='list one or more'):
    _model(remat='save:')
  with pytest.raises(ValueError, match='not one of'):
    _model(remat='save_everything')


def test_model_gradients_match_finite_differences_float64(model):
  # einsum attention: jax.nn.dot_product_attention's softmax is float32.
  cfg = dataclasses.replace(CFG, dtype='float64', param_dtype='float64',
                            attention='einsum')
  tokens = np.array([[1, 5, 7, 2, 9, 3]])
  segment_ids = np.array([[1, 1, 1, 2, 2, 0]])
  prefix = np.array([[1, 1, 0, 1, 0, 0]], bool)
  eps = 1e-6
  with jax.enable_x64(True):
    # Reuse the fixture's weights (same shapes) instead of a second init.
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: np.asarray(x, np.float64),
                          nnx.state(model))
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape), params)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids,
                                           prefix=prefix)
      return jnp.sum(jnp.sin(logits))

    @jax.jit  # One compile for the gradient and both shifted losses.
    def grad_and_central_difference(params, direction):
      shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d,
                                          params, direction)
      return jax.grad(loss)(params), (loss(shifted(1)) - loss(shifted(-1))) / (
          2 * eps)

    grads, numerical = grad_and_central_difference(params, direction)
    analytic = sum(np.vdot(g, d) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numerical, rtol=1e-7)


def test_input_shape_errors(model):
  tokens = jnp.asarray(_tokens())
  with pytest.raises(ValueError, match=r'segment_ids shape \(2, 15\)'):
    model(tokens, segment_ids=jnp.ones((2, 15), jnp.int32))
  with pytest.raises(ValueError, match=r'tokens must be \[B, T\]'):
    model(tokens[0])


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_equals_einsum_with_gradients(n_in):
  rng = np.random.default_rng(n_in)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)))
  w = jnp.asarray(rng.normal(size=(5, 6) if n_in == 1 else (4, 5, 6)))
  if n_in == 1:  # [..., 5] x [5, 6]
    want = lambda x, w: jnp.einsum('abcd,de->abce', x, w)
  else:  # [..., 4, 5] x [4, 5, 6]
    want = lambda x, w: jnp.einsum('abcd,cde->abe', x, w)
  np.testing.assert_allclose(layers.dense(x, w, n_in), want(x, w),
                             rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(lambda x, w: layers.dense(x, w, n_in)), (0, 1))(x, w)
  ref = jax.grad(loss(want), (0, 1))(x, w)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_block_backward_has_no_transposed_activation_copy():
  # XLA on CPU transposed the [B*T, F] cotangent of a 3-D `x @ w` into a copy
  # before the weight-gradient dot (21% of the DPO benchmark step); the
  # 2-D form of layers.dense leaves no transpose of an activation-sized
  # array in the compiled backward of the block.
  cfg = dataclasses.replace(CFG, d_model=48, d_ff=96, n_layers=1,
                            scan_layers=False)
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  b, t = 4, 16
  tokens = jnp.zeros((b, t), jnp.int32)

  def loss(params):
    hidden = nnx.merge(graphdef, params)(tokens, return_hidden=True)
    return jnp.sum(hidden ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  rows = b * t
  activation = re.compile(
      rf"f32\[(?:{rows},(?:48|96)|(?:48|96),{rows}|{b},{t},(?:48|96)|"
      rf"(?:48|96),{b},{t})\]")
  bad = [line for line in hlo.splitlines()
         if (" transpose(" in line or " copy(" in line)
         and activation.search(line.split("=")[1] if "=" in line else "")]
  assert not bad, "\n".join(bad[:5])
