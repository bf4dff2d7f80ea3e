"""QLoRA kernels: int8 / NF4 round trips and matmuls within their error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import state as state_lib
from alignax.models import ModelConfig, lora, quant

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=8, d_ff=64, max_seq_len=16)
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# Widest gap between neighbouring NF4 codes, halved: the rounding error per
# unit of absmax.
NF4_HALF_GAP = float(np.max(np.diff(quant.NF4_CODE))) / 2


def kernel(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('shape,n_in', [((32, 48), 1), ((32, 4, 8), 1),
                                        ((4, 8, 32), 2)])
def test_int8_matmul_is_within_the_quantization_error(shape, n_in):
  w = kernel(shape)
  q, scale = quant.quantize_int8(jnp.asarray(w), n_in)
  assert q.dtype == jnp.int8 and scale.shape == shape[n_in:]
  # NumPy reference: per output channel absmax / 127.
  want_scale = np.abs(w).max(axis=tuple(range(n_in))) / 127
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  deq = np.asarray(quant.dequantize_int8(q, scale, jnp.float32))
  assert np.all(np.abs(deq - w) <= want_scale / 2 * (1 + 1e-5))
  x = kernel((5,) + shape[:n_in], seed=1)
  flat = lambda a: a.reshape(int(np.prod(shape[:n_in])), -1)
  x2 = x.reshape(5, -1)
  exact, got = x2 @ flat(w), x2 @ flat(deq)
  # |x (W - W~)| <= |x| (s / 2), per output column.
  bound = np.abs(x2) @ np.broadcast_to(
      want_scale.reshape(1, -1) / 2, flat(w).shape)
  assert np.all(np.abs(got - exact) <= bound * (1 + 1e-4) + 1e-6)
  assert np.abs(got - exact).max() > 0  # it is really quantized


@pytest.mark.parametrize('shape,n_in', [((128, 48), 1), ((32, 4, 8), 1),
                                        ((4, 8, 32), 2)])
def test_nf4_matmul_is_within_the_quantization_error(shape, n_in):
  w = kernel(shape)
  packed, absmax = quant.quantize_nf4(jnp.asarray(w), n_in)
  rows = int(np.prod(shape[:n_in]))
  block = quant.nf4_block(rows)
  assert packed.dtype == jnp.uint8 and packed.shape == (rows // 2,) + shape[n_in:]
  assert absmax.shape == (rows // block,) + shape[n_in:]
  deq = np.asarray(quant.dequantize_nf4(packed, absmax, shape[:n_in],
                                        jnp.float32))
  # NumPy reference of the per-block absmax, then the error bound.
  w2 = w.reshape(rows // block, block, -1)
  m = np.abs(w2).max(axis=1, keepdims=True)
  err = np.abs(deq.reshape(w2.shape) - w2)
  assert np.all(err <= m * NF4_HALF_GAP * (1 + 1e-5))
  # Every weight is a code value times its block's absmax.
  codes = deq.reshape(w2.shape) / m
  assert np.all(np.min(np.abs(codes[..., None] - quant.NF4_CODE), -1) < 1e-5)
  x = kernel((5, rows), seed=1)
  bound = np.abs(x) @ np.repeat(m[:, 0] * NF4_HALF_GAP, block, axis=0)
  got = x @ deq.reshape(rows, -1)
  assert np.all(np.abs(got - x @ w.reshape(rows, -1)) <= bound * (1 + 1e-4))


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_qlora_model_is_the_dequantized_base_plus_adapters(kind):
  cfg = ModelConfig(**BASE, lora_rank=4, lora_targets=ALL, quant=kind)
  params = state_lib.init_params(cfg, 0)
  dtypes = {np.dtype(np.int8 if kind == 'int8' else np.uint8)}
  assert {params['blocks']['attn']['q'].dtype,
          params['blocks']['mlp']['down'].dtype} == dtypes
  train, frozen = lora.split_trainable(params)
  assert all(lora.is_adapter_path(p) for p in
             __import__('flax').traverse_util.flatten_dict(train))
  # B = 0: the QLoRA model is the float model on the dequantized kernels.
  merged = lora.merge_into_base(params, lora.spec_of(cfg))
  plain, _ = state_lib.abstract_model(ModelConfig(**BASE))
  graphdef, _ = state_lib.abstract_model(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
  ours = nnx.merge(graphdef, params)(tokens)
  np.testing.assert_allclose(ours, nnx.merge(plain, merged)(tokens),
                             rtol=1e-5, atol=1e-5)
  # Gradients reach the adapters (through the dequantized matmuls) only.
  def loss(train):
    model = nnx.merge(graphdef, lora.merge_trainable(train, frozen))
    return jnp.mean(model(tokens) ** 2)
  grads = jax.grad(loss)(train)
  assert float(jnp.abs(grads['blocks']['attn']['q_lora']['b']).max()) > 0


def test_quant_needs_lora():
  with pytest.raises(ValueError, match='lora_rank'):
    ModelConfig(**BASE, quant='int8')
  with pytest.raises(ValueError, match='quant'):
    ModelConfig(**BASE, lora_rank=2, lora_targets=('q',), quant='int4')


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_param_count_counts_quantized_kernels_as_their_float_kernels(kind):
  """The launcher's count equals the formula under QLoRA (nf4 packs two
  values per byte; scales are not parameters of the model)."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16,
                    lora_rank=2, lora_targets=('q', 'down'), quant=kind)
  params = jax.eval_shape(lambda: state_lib.init_params(cfg, 0))
  assert state_lib.param_count(params) == cfg.num_params()
  stored = sum(int(x.size) for x in jax.tree.leaves(params))
  assert stored != cfg.num_params()  # what the launcher printed before
