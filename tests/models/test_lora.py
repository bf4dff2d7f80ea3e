"""LoRA adapters: B = 0 is the base model, the math, shardings, the split."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import sharding as shd
from alignax import state as state_lib
from alignax.models import MLP, ModelConfig, Transformer, lora
from alignax.models import config as config_lib
from alignax.models.heads import RewardModel

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=8, d_ff=64, max_seq_len=16)
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def lora_cfg(**kw):
  return ModelConfig(**BASE, **dict(dict(lora_rank=4, lora_targets=ALL), **kw))


def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))


def randomise_b(params, seed=1):
  """Adapters with nonzero B (and the base untouched)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, x in flat:
    names = [p.key for p in path]
    if lora.is_adapter_path(names) and names[-1] == 'b':
      x = 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
    out[tuple(names)] = x
  from flax import traverse_util
  return traverse_util.unflatten_dict(out)


def base_logits(cfg, params):
  base_cfg = ModelConfig(**BASE)
  graphdef, _ = state_lib.abstract_model(base_cfg)
  return nnx.merge(graphdef, lora.split_trainable(params)[1])(tokens())


@pytest.mark.parametrize('kw', [{}, dict(lora_rslora=True),
                                dict(lora_targets=('q', 'down'))])
def test_zero_b_equals_the_base_model_exactly(kw):
  cfg = lora_cfg(**kw)
  params = state_lib.init_params(cfg, 0)
  graphdef, _ = state_lib.abstract_model(cfg)
  with_adapters = nnx.merge(graphdef, params)(tokens())
  np.testing.assert_array_equal(with_adapters, base_logits(cfg, params))


def test_nonzero_b_changes_the_model_and_switching_off_restores_the_base():
  cfg = lora_cfg()
  params = randomise_b(state_lib.init_params(cfg, 0))
  graphdef, _ = state_lib.abstract_model(cfg)
  model = nnx.merge(graphdef, params)
  adapted = model(tokens())
  assert float(jnp.abs(adapted - base_logits(cfg, params)).max()) > 1e-3
  np.testing.assert_array_equal(lora.without_adapters(model)(tokens()),
                                base_logits(cfg, params))
  # without_adapters leaves the policy itself switched on.
  np.testing.assert_array_equal(model(tokens()), adapted)


@pytest.mark.parametrize('rslora', [False, True])
def test_mlp_adapters_match_numpy(rslora):
  spec = lora.LoraSpec(rank=3, alpha=6.0, rslora=rslora,
                       targets=('gate', 'up', 'down'))
  mlp = MLP(8, 12, dtype=jnp.float32, param_dtype=jnp.float32,
            rngs=nnx.Rngs(0), adapters=spec)
  rng = np.random.default_rng(0)
  for name in ('gate', 'up', 'down'):
    ad = getattr(mlp, name + '_lora')
    ad.b[...] = jnp.asarray(rng.normal(size=ad.b.shape), jnp.float32)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  s = 6.0 / (math.sqrt(3) if rslora else 3)

  def w(name):  # merged weight in float64
    ad = getattr(mlp, name + '_lora')
    return (np.asarray(getattr(mlp, name)[...], np.float64)
            + s * np.asarray(ad.a[...], np.float64) @ np.asarray(ad.b[...],
                                                                 np.float64))

  silu = lambda z: z / (1 + np.exp(-z))
  want = (silu(x @ w('gate')) * (x @ w('up'))) @ w('down')
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(
      mlp.gate_lora.delta(),
      s * np.asarray(mlp.gate_lora.a[...]) @ np.asarray(mlp.gate_lora.b[...]),
      rtol=1e-6, atol=1e-7)


def test_attention_adapters_match_merged_kernels():
  """x A B over multi-axis kernels (q [D,H,Dh], o [H,Dh,D]) = merged kernel."""
  cfg = lora_cfg()
  params = randomise_b(state_lib.init_params(cfg, 0))
  graphdef, _ = state_lib.abstract_model(cfg)
  adapted = nnx.merge(graphdef, params)(tokens())
  # Merge every adapter into its kernel and run the plain model.
  merged = jax.tree.map(lambda x: x, lora.split_trainable(params)[1])
  for group in ('attn', 'mlp'):
    for name in ALL:
      key = name + lora.SUFFIX
      if key not in params['blocks'][group]:
        continue
      ad = params['blocks'][group][key]
      s = cfg.lora_alpha / cfg.lora_rank
      delta = jax.vmap(lambda a, b: s * jnp.tensordot(a, b, axes=1))(
          ad['a'], ad['b'])  # per layer
      merged['blocks'][group][name] = merged['blocks'][group][name] + delta
  base_graph, _ = state_lib.abstract_model(ModelConfig(**BASE))
  np.testing.assert_allclose(nnx.merge(base_graph, merged)(tokens()), adapted,
                             rtol=1e-4, atol=1e-4)


def test_adapters_are_named_and_sharded_like_their_kernels():
  _, abstract = state_lib.abstract_model(lora_cfg())
  names = shd.logical_axes(abstract)['blocks']
  assert names['attn']['q_lora'] == {
      'a': ('layers', 'embed', None), 'b': ('layers', None, 'heads', 'head_dim')}
  assert names['attn']['o_lora'] == {
      'a': ('layers', 'heads', 'head_dim', None), 'b': ('layers', None, 'embed')}
  assert names['mlp']['down_lora'] == {
      'a': ('layers', 'mlp', None), 'b': ('layers', None, 'embed')}
  mesh = shd.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  sh = shd.param_shardings(abstract, mesh, shd.DEFAULT_RULES)['blocks']
  P = jax.sharding.PartitionSpec
  assert sh['attn']['q'].spec == P(None, 'fsdp', 'tensor', None)
  assert sh['attn']['q_lora']['a'].spec == P(None, 'fsdp', None)
  assert sh['attn']['q_lora']['b'].spec == P(None, None, 'tensor', None)
  assert sh['mlp']['gate_lora']['b'].spec == P(None, None, 'tensor')
  assert sh['mlp']['down_lora']['b'].spec == P(None, None, 'fsdp')


def test_trainable_split_keeps_adapters_and_heads():
  cfg = lora_cfg(lora_targets=('v', 'up'))
  params = state_lib.init_params(cfg, 0, build=RewardModel)
  train, frozen = lora.split_trainable(params)
  flat = lambda t: {jax.tree_util.keystr(p) for p, _ in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  assert flat(train) == {
      "['blocks']['attn']['v_lora']['a']", "['blocks']['attn']['v_lora']['b']",
      "['blocks']['mlp']['up_lora']['a']", "['blocks']['mlp']['up_lora']['b']",
      "['reward_bias']", "['reward_head']"}
  assert not any('lora' in k or 'reward' in k for k in flat(frozen))
  jax.tree.map(np.testing.assert_array_equal,
               lora.merge_trainable(train, frozen), params)
  # Without adapters everything trains (and the tree is the same object).
  plain = state_lib.init_params(ModelConfig(**BASE), 0)
  assert lora.split_trainable(plain) == (plain, {})


def test_param_count_and_config_checks():
  for cfg in (lora_cfg(), lora_cfg(lora_targets=('k', 'o', 'up'))):
    assert state_lib.param_count(state_lib.init_params(cfg, 0)) == (
        cfg.num_params())
  assert config_lib.LORA_TARGETS == lora.TARGETS
  with pytest.raises(ValueError, match='unknown'):
    lora_cfg(lora_targets=('q', 'qkv'))
  with pytest.raises(ValueError, match='lora_rank'):
    lora_cfg(lora_rank=-1)
  with pytest.raises(ValueError, match='lora_targets'):
    lora_cfg(lora_targets=())
  # JSON hands lists back (model_config.json): still hashable.
  assert hash(lora_cfg(lora_targets=['q', 'v']))


# --- dropout on the adapters' input (PEFT's lora_dropout) --------------------


def test_dropout_drops_adapter_inputs_unbiased_and_only_in_train_steps():
  spec = lora.LoraSpec(rank=3, alpha=6.0, rslora=False, targets=('up',),
                       dropout=0.25)
  adapter = lora.LoraAdapter((16, 24), ('embed', 'mlp'), 1, spec,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                             salt=2)
  rng = np.random.default_rng(0)
  adapter.b[...] = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)
  a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
  x = rng.normal(size=(4000, 16)).astype(np.float32)
  plain = 2.0 * (x @ a) @ b  # s = alpha / r = 2
  # No layer key (eval, generation, the reference): nothing is dropped.
  np.testing.assert_allclose(adapter(jnp.asarray(x), jnp.float32), plain,
                             rtol=1e-5, atol=1e-5)
  key = jax.random.key(7)
  with lora.layer_rng(key):
    dropped = np.asarray(adapter(jnp.asarray(x), jnp.float32))
  keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 2), 0.75,
                                         x.shape))
  # The NumPy formula: s ((x * keep / (1 - p)) A) B.
  np.testing.assert_allclose(dropped, 2.0 * ((x * keep / 0.75) @ a) @ b,
                             rtol=1e-4, atol=1e-4)
  assert abs(1 - keep.mean() - 0.25) < 0.01
  # Unbiased: the mean over rows of dropped outputs tracks the plain one.
  np.testing.assert_allclose(dropped.mean(0), plain.mean(0),
                             atol=0.05 * np.abs(plain).mean())


def test_dropout_in_a_step_is_keyed_and_remat_recomputes_its_masks():
  cfg = lora_cfg(lora_dropout=0.5)
  params = randomise_b(jax.jit(lambda: state_lib.init_params(cfg, 0))())
  graphdef, _ = state_lib.abstract_model(cfg)
  plain = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens()))(params)
  loss = lambda p, c: jnp.sum(nnx.merge(c, p)(tokens()) ** 2)

  @functools.partial(jax.jit, static_argnums=0)
  def run(g, key):
    with lora.dropout_rng(key):
      return jax.value_and_grad(loss)(params, g)

  key = jax.random.key(3)
  value, grads = run(graphdef, key)
  assert abs(float(value) - float(jnp.sum(plain ** 2))) > 1e-3
  # Same key, same masks; another key, others.
  np.testing.assert_array_equal(run(graphdef, key)[0], value)
  assert float(run(graphdef, jax.random.key(4))[0]) != float(value)
  # Remat recomputes the forward in the backward pass: the same masks.
  remat_def, _ = state_lib.abstract_model(
      ModelConfig(**BASE, lora_rank=4, lora_targets=ALL, lora_dropout=0.5,
                  remat='full'))
  r_value, r_grads = run(remat_def, key)
  np.testing.assert_allclose(r_value, value, rtol=1e-6)
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(r_grads)):
    # Fused differently with remat: float32 noise, not other masks (those
    # move gradients by their own size).
    np.testing.assert_allclose(g, h, rtol=1e-4,
                               atol=1e-3 * float(np.abs(h).max()))
  with pytest.raises(ValueError, match=r'lora_dropout=1\.0 must lie in'):
    lora_cfg(lora_dropout=1.0)


def test_train_steps_apply_dropout_and_other_callers_do_not():
  from alignax import step as step_lib

  def objective(model, batch, rng, *, frozen):
    del rng, frozen
    return jnp.sum(model(batch) ** 2), (jnp.float32(1), {})

  params = randomise_b(jax.jit(lambda: state_lib.init_params(lora_cfg(), 0))())
  grads, logits = {}, {}
  for rate in (0.0, 0.3):
    graphdef, _ = state_lib.abstract_model(lora_cfg(lora_dropout=rate))
    grad_fn = jax.jit(step_lib.make_grad_fn(objective, graphdef))
    grads[rate] = [grad_fn(params, tokens(), jax.random.key(s), None,
                           jnp.float32(1))[0] for s in (0, 1)]
    # Outside a train step (eval, sampling, scoring): the plain model.
    logits[rate] = jax.jit(lambda p, g=graphdef: nnx.merge(g, p)(tokens()))(
        params)
  np.testing.assert_array_equal(logits[0.3], logits[0.0])
  same = lambda a, b: all(np.array_equal(x, y) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(*grads[0.0])  # no dropout: the step's key changes nothing
  assert not same(*grads[0.3])  # dropout: each step's key, its own masks
  assert not same(grads[0.0][0], grads[0.3][0])
