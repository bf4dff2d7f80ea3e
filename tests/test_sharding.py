"""Activation constraints: off without a mesh, batch over data x fsdp with one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from alignax import sharding as shd
from alignax.models import ModelConfig, Transformer

BTD = ("activation_batch", "activation_length", "activation_embed")


def placed_as(x, mesh, spec):
  return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_constrain_is_identity_without_a_mesh():
  x = jnp.ones((8, 4, 16))
  assert shd.constrain(x, BTD) is x
  with shd.activation_sharding(None):
    assert shd.constrain(x, BTD) is x


@pytest.mark.parametrize("mesh_cfg,spec", [
    ({"fsdp": 8}, P("fsdp", None, None)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, P(("data", "fsdp"), None, None)),
])
def test_constrain_splits_rows_not_features(mesh_cfg, spec):
  mesh = shd.make_mesh(mesh_cfg)

  @jax.jit
  def f(x):
    with shd.activation_sharding(mesh):
      return shd.constrain(x * 2, BTD)

  out = f(jnp.ones((8, 4, 16)))
  assert placed_as(out, mesh, spec)


def test_constrain_splits_vocab_over_tensor_and_replicates_odd_dims():
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
  names = ("activation_batch", "activation_length", "activation_vocab")

  @jax.jit
  def f(x, y):
    with shd.activation_sharding(mesh):
      return shd.constrain(x, names), shd.constrain(y, names)

  even, odd = f(jnp.ones((8, 4, 32)), jnp.ones((3, 4, 5)))
  assert placed_as(even, mesh, P("fsdp", None, "tensor"))
  assert placed_as(odd, mesh, P())


def test_constrain_follows_jax_set_mesh():
  mesh = shd.make_mesh({"fsdp": 8})

  @jax.jit
  def f(x):
    return shd.constrain(x + 1, BTD)

  with jax.set_mesh(mesh):
    out = f(jnp.ones((8, 4, 16)))
  assert placed_as(out, mesh, P("fsdp"))


def test_rules_without_activation_names_take_the_defaults():
  mesh = shd.make_mesh({"fsdp": 8})
  old_rules = [r for r in shd.DEFAULT_RULES if not r[0].startswith("activ")]

  @jax.jit
  def f(x):
    with shd.activation_sharding(mesh, old_rules):
      return shd.constrain(x, BTD)

  assert placed_as(f(jnp.ones((8, 4, 16))), mesh, P("fsdp"))


def test_model_under_mesh_equals_model_without():
  """Constraints place arrays; they never change the numbers."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})

  def logits(params, tokens, mesh):
    with shd.activation_sharding(mesh):
      return nnx.merge(graphdef, params)(tokens)

  plain = jax.jit(lambda p, t: logits(p, t, None))(params, tokens)
  sharded = jax.jit(lambda p, t: logits(p, t, mesh))(params, tokens)
  assert placed_as(sharded, mesh, P("fsdp", None, "tensor"))
  np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)
