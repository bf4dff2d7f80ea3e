"""Tests of alignax.generate: KV-cache decode, sampling, stops, buckets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import generate as gen
from alignax import models
from alignax import sharding as shd
from alignax import state as state_lib

# Every family feature that touches decoding: biases, QK-norm, (1 + w)
# norms, sandwich norms, embedding scale, a sliding window on layer 0,
# attention and final soft-caps (einsum attention).
CFG = models.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, d_ff=64, max_seq_len=64, qkv_bias=True, qk_norm=True,
    norm_offset=1.0, post_norms=True, embed_scale=True, layer_windows=(4, 0),
    attention='einsum', attn_logit_softcap=3.0, final_logit_softcap=5.0,
    mlp_activation='gelu_tanh')
FUSED = dataclasses.replace(CFG, attention='fused', attn_logit_softcap=0.0)


def _params(cfg):
  """Random params, perturbed: biases and (1 + w) scales start at zero."""
  params = jax.jit(lambda: state_lib.init_params(cfg, 0))()
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def model_and_params():
  params = _params(CFG)
  graphdef, _ = state_lib.abstract_model(CFG)
  return graphdef, params


@jax.jit
def _full_logits(graphdef, params, tokens, segment_ids):
  return nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids)


def _next_logits(graphdef, params, seq, length=32):
  """Full-forward logits after ``seq``; right-padded to one compiled length."""
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(seq)] = seq
  segment_ids = (np.arange(length) < len(seq)).astype(np.int32)[None]
  logits = _full_logits(graphdef, params, tokens, segment_ids)
  return np.asarray(logits[0, len(seq) - 1])


@jax.jit
def _decode(graphdef, params, tokens, cache, positions):
  return nnx.merge(graphdef, params).decode(tokens, cache, positions=positions)


@pytest.mark.parametrize('cfg', [CFG, FUSED], ids=['einsum', 'fused'])
def test_prefill_and_steps_equal_the_full_forward(cfg):
  params = _params(cfg)
  graphdef, _ = state_lib.abstract_model(cfg)
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, 64, (2, 9))
  # Row 1 is left-padded by 3: its positions start at 0 on its first token.
  tokens, positions = gen.left_pad([seqs[0, :6], seqs[1, :3]], 6, rows=2)
  cache = models.init_cache(cfg, 2, 12)
  logits, cache = _decode(graphdef, params, tokens, cache, positions)
  steps = [logits]
  for t in range(3):
    step = np.array([[seqs[0, 6 + t]], [seqs[1, 3 + t]]])  # [2, 1]
    logits, cache = _decode(graphdef, params, step, cache,
                            np.array([[6 + t], [3 + t]]))
    steps.append(logits)
  decoded = np.concatenate(steps, axis=1)  # [2, 9, V]
  full = np.asarray(_full_logits(graphdef, params, seqs,
                                 np.ones((2, 9), np.int32)))
  np.testing.assert_allclose(decoded[0], full[0], atol=1e-5)
  np.testing.assert_allclose(decoded[1, 3:], full[1, :6], atol=1e-5)
  assert int(cache['index']) == 9
  np.testing.assert_array_equal(cache['positions'][1, :9],
                                [-1] * 3 + list(range(6)))


def test_greedy_equals_stepwise_argmax(model_and_params):
  graphdef, params = model_and_params
  prompts = [[5, 9, 2, 7, 1, 33, 60], [7, 40], [3, 3, 3, 8, 12]]
  out = gen.generate(graphdef, params, prompts, max_new_tokens=10,
                     rng=jax.random.key(0))
  for prompt, completion in zip(prompts, out):
    seq = list(prompt)
    for _ in range(10):
      seq.append(int(np.argmax(_next_logits(graphdef, params, seq))))
    assert completion == seq[len(prompt):]


def test_stop_tokens_truncate_each_row(model_and_params):
  graphdef, params = model_and_params
  prompts = [[5, 9, 2], [7, 40, 1, 1], [3]]
  free = gen.generate(graphdef, params, prompts, max_new_tokens=8,
                      rng=jax.random.key(0))
  stop = free[0][3]
  stopped = gen.generate(graphdef, params, prompts, max_new_tokens=8,
                         rng=jax.random.key(0), stop_tokens=(stop, 63))
  for full, cut in zip(free, stopped):
    ends = [i for i, t in enumerate(full) if t in (stop, 63)]
    assert cut == (full[:ends[0] + 1] if ends else full)
  assert stopped[0][-1] == stop and len(stopped[0]) <= 4


def test_sampling_frequencies_match_hand_computed():
  # p = [0.5, 0.3, 0.15, 0.05]. By hand: top_p=0.7 keeps {0, 1} (mass before
  # token 2 is 0.8 >= 0.7) -> [0.625, 0.375, 0, 0]; top_k=3 -> p[:3] / 0.95
  # = [0.5263, 0.3158, 0.1579, 0]; temperature 0.5 squares p then
  # normalises: [0.25, 0.09, 0.0225, 0.0025] / 0.365.
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  cases = [
      (dict(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0]),
      (dict(temperature=1.0, top_k=3), [0.5263, 0.3158, 0.1579, 0]),
      (dict(temperature=0.5), [0.6849, 0.2466, 0.0616, 0.0068]),
      (dict(temperature=1.0, top_k=3, top_p=0.9), [0.5263, 0.3158, 0.1579, 0]),
  ]
  keys = jax.random.split(jax.random.key(0), 4000)
  for kwargs, expected in cases:
    draws = jax.vmap(lambda k: gen.sample_logits(logits, k, **kwargs))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
    np.testing.assert_allclose(freq, expected, atol=0.025, err_msg=kwargs)
    assert freq[np.asarray(expected) == 0].sum() == 0
  assert int(gen.sample_logits(logits, keys[0])[0]) == 0  # greedy


def test_buckets_bound_the_compiles(model_and_params):
  graphdef, params = model_and_params
  cache_size = gen.generate_padded._cache_size  # pylint: disable=W0212
  before = cache_size()
  for prompts, new in (([[1, 2, 3], [4], [5, 6]], 4),
                       ([[4] * 9, [5], [6, 7], [8] * 16], 16)):
    out = gen.generate(graphdef, params, prompts, max_new_tokens=new,
                       rng=jax.random.key(1), temperature=1.0, top_k=5)
    assert [len(o) for o in out] == [new] * len(prompts)
  # Prompt bucket 16, cache bucket 32, 4 rows, max_new_tokens traced: one
  # program for both requests.
  assert cache_size() - before == 1


def test_sampling_is_the_same_on_a_sharded_mesh(model_and_params):
  graphdef, params = model_and_params
  prompts = [[5, 9, 2], [7], [3, 3, 8, 1, 1]]
  # The settings and shapes of test_buckets_bound_the_compiles: the local
  # run reuses its program.
  kwargs = dict(max_new_tokens=6, rng=jax.random.key(3), temperature=1.0,
                top_k=5)
  local = gen.generate(graphdef, params, prompts, **kwargs)
  mesh = shd.make_mesh({'fsdp': -1})  # 8 devices: rows padded 4 -> 8
  _, abstract = state_lib.abstract_model(CFG)
  sharded = jax.device_put(
      params, shd.param_shardings(abstract, mesh, shd.DEFAULT_RULES))
  assert gen.generate(graphdef, sharded, prompts, mesh=mesh, **kwargs) == local


def test_padding_helpers_validate():
  assert gen.bucket_length(17, (16, 32)) == 32
  with pytest.raises(ValueError, match='exceeds the largest bucket 32'):
    gen.bucket_length(33, (16, 32))
  tokens, positions = gen.left_pad([[4, 5], [6]], 4, rows=3, pad_id=0)
  np.testing.assert_array_equal(tokens, [[0, 0, 4, 5], [0, 0, 0, 6],
                                         [0, 0, 0, 0]])
  np.testing.assert_array_equal(positions, [[-1, -1, 0, 1], [-1, -1, -1, 0],
                                            [-1] * 4])
  with pytest.raises(ValueError, match='prompt 1 has 0 tokens'):
    gen.left_pad([[1], []], 4, rows=2)
