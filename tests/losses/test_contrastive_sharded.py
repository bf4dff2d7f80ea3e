"""Ring CLIP / SigLIP on 8 forced CPU devices equal the global losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignax.losses import _contrastive as C
from alignax.losses import _contrastive_sharded as S

B, D = 16, 8


def unit_rows(seed):
  v = np.random.default_rng(seed).normal(size=(B, D)).astype(np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


X, Y = unit_rows(0), unit_rows(1)
WEIGHTS = np.random.default_rng(2).uniform(0.5, 1.5, size=B).astype(np.float32)
SCALE, BIAS = np.float32(4.0), np.float32(-2.0)


def mesh_of(shape, names):
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


# (mesh shape, mesh axis names, axis_name argument)
MESHES = {
    "ring8": ((8,), ("data",), "data"),
    "2x4_both_axes": ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
    "2x4_fsdp_only": ((2, 4), ("data", "fsdp"), "fsdp"),
}


def losses(mesh, axis_name):
  """(ring loss, global loss), both ``(x, y, scale, bias) -> [B]``."""
  return {
      "clip": (
          lambda x, y, t, b: S.chunked_clip_loss(
              x, y, mesh=mesh, axis_name=axis_name, logit_scale=t),
          lambda x, y, t, b: C.clip_loss(x, y, logit_scale=t)),
      "siglip": (
          lambda x, y, t, b: S.chunked_siglip_loss(
              x, y, mesh=mesh, axis_name=axis_name, logit_scale=t,
              logit_bias=b),
          lambda x, y, t, b: C.siglip_loss(x, y, logit_scale=t, logit_bias=b)),
  }


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_ring_equals_global_loss_and_grads(mesh_name, loss):
  shape, names, axis_name = MESHES[mesh_name]
  mesh = mesh_of(shape, names)
  ring, full = losses(mesh, axis_name)[loss]
  rows = NamedSharding(mesh, P(axis_name, None))
  x, y = jax.device_put(X, rows), jax.device_put(Y, rows)

  out = jax.jit(ring)(x, y, SCALE, BIAS)
  assert out.shape == (B,)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(axis_name)), 1)
  close(out, full(X, Y, SCALE, BIAS))

  def weighted(fn):
    return lambda *a: jnp.sum(fn(*a) * WEIGHTS)

  argnums = (0, 1, 2, 3) if loss == "siglip" else (0, 1, 2)
  got = jax.jit(jax.grad(weighted(ring), argnums))(x, y, SCALE, BIAS)
  want = jax.grad(weighted(full), argnums)(X, Y, SCALE, BIAS)
  for g, w in zip(got, want):
    close(g, w)


def test_unsharded_inputs_are_accepted_eagerly():
  mesh = mesh_of((8,), ("data",))
  close(S.chunked_clip_loss(X, Y, mesh=mesh, axis_name="data",
                            logit_scale=2.0),
        C.clip_loss(X, Y, logit_scale=2.0))


def _shard_map_shapes(jaxpr, inside=False):
  """Shapes of every value computed inside a shard_map body, recursively."""
  for eqn in jaxpr.eqns:
    if inside:
      yield from (tuple(v.aval.shape) for v in eqn.outvars)
    nested = inside or eqn.primitive.name == "shard_map"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _shard_map_shapes(sub, nested)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_only_local_blocks_are_materialised(loss):
  # B_local = 2: no value inside the ring, forward or backward, may span the
  # global batch (16); the largest logits block is [2, 2].
  mesh = mesh_of((8,), ("data",))
  ring, _ = losses(mesh, "data")[loss]
  grad = jax.grad(lambda *a: jnp.sum(ring(*a)), (0, 1, 2))
  for fn in (ring, grad):
    shapes = list(_shard_map_shapes(
        jax.make_jaxpr(fn)(X, Y, SCALE, BIAS).jaxpr))
    assert shapes, "no shard_map found"
    assert all(B not in s for s in shapes), sorted(set(shapes))
    assert (2, 2) in shapes


def test_validation_names_the_bad_shape_and_axis():
  mesh = mesh_of((8,), ("data",))
  with pytest.raises(ValueError, match=r"\(12, 8\)"):
    S.chunked_clip_loss(X[:12], Y[:12], mesh=mesh, axis_name="data",
                        logit_scale=1.0)
  with pytest.raises(ValueError, match=r"\(16, 8\) and \(16, 4\)"):
    S.chunked_siglip_loss(X, Y[:, :4], mesh=mesh, axis_name="data",
                          logit_scale=1.0, logit_bias=0.0)
  with pytest.raises(ValueError, match="fsdp"):
    S.chunked_clip_loss(X, Y, mesh=mesh, axis_name=("data", "fsdp"),
                        logit_scale=1.0)
