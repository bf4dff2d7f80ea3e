"""Device mesh, logical-axis rules, and host -> global array placement.

The mesh has three axes (MaxText's naming, reduced to what alignax uses):

* ``data``   -- pure data parallelism (replicated parameters);
* ``fsdp``   -- data parallelism with parameters and optimizer state sharded
  (ZeRO-3 style); the batch is split over ``data`` x ``fsdp``;
* ``tensor`` -- tensor (Megatron) parallelism over heads and MLP columns.

Model kernels carry *logical* axis names (``embed``, ``mlp``, ``heads``, ...);
``rules`` map each logical name to a mesh axis (or ``None`` = replicated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis. Kernels are sharded over fsdp on the embed axis
# and over tensor on the head / MLP / vocab axes, as in MaxText's defaults.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
)

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves ``{'data': d, 'fsdp': f, 'tensor': t}`` with one ``-1`` allowed.

  Raises:
    ValueError: naming the field when the sizes do not multiply to
      ``num_devices`` or more than one axis is ``-1``.
  """
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; "
                     f"valid axes are {MESH_AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{a}={s}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"config.mesh: {num_devices} devices are not divisible by the "
          f"fixed axes' product {known} ({dict(zip(MESH_AXES, sizes))})")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs "
        f"{math.prod(sizes)} devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh over ``devices`` (default all)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: XLA's sharding propagation (GSPMD) places intermediates; the
  # explicit-sharding mode would demand out_sharding on every gather.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                    rules: Rules, mesh: Mesh) -> P:
  """Maps logical axis names of one array to a ``PartitionSpec``.

  A dimension that the mapped mesh axes do not divide is replicated instead
  (tiny test models on 8 devices); a mesh axis is used at most once.

  Raises:
    ValueError: for a logical name that has no rule.
  """
  if not logical:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules "
                       f"cover {sorted(table)}")
    axes = table[name]
    flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
    if not flat or dim % _mesh_axis_size(mesh, flat):
      if flat:
        logging.debug("replicating dim %d (%s): not divisible by %s", dim,
                      name, flat)
      spec.append(None)
      continue
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def logical_axes(abstract_state: nnx.State) -> dict:
  """Pure nested dict (like ``nnx.to_pure_dict``) of each variable's names."""
  out: dict = {}
  for path, var in nnx.to_flat_state(abstract_state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = var.get_metadata().get("out_sharding")
  return out


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
  """``NamedSharding`` per parameter, as a pure dict matching the params."""
  shapes = nnx.to_pure_dict(abstract_state)
  names = logical_axes(abstract_state)
  return jax.tree.map(
      lambda s, n: NamedSharding(mesh, logical_to_spec(n, s.shape, rules, mesh)),
      shapes, names, is_leaf=lambda x: x is None or isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``data`` x ``fsdp``; other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (the global batch must divide by it)."""
  return _mesh_axis_size(mesh, BATCH_AXES)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Places this process's rows of a batch as one global ``jax.Array`` each.

  Every process passes its own ``[B_local, ...]`` rows; the result has the
  global batch ``B_local * process_count`` sharded over ``data`` x ``fsdp``.
  """
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
      for k, v in batch.items()
  }


def split_rows(x, num_chunks: int, mesh=None):
  """``[N, ...] -> [n, N / n, ...]`` for ``n = num_chunks``; chunk j = rows j::n."""
  if x.shape[0] % num_chunks:
    raise ValueError(f"{x.shape[0]} rows (shape {x.shape}) do not split into "
                     f"{num_chunks} equal sub-batches")
  x = x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)  # [n, N/n, ...]
  if mesh is not None:
    spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return x


def merge_rows(x, mesh=None):
  """Inverse of :func:`split_rows`: ``[n, N / n, ...] -> [N, ...]``."""
  x = jnp.swapaxes(x, 0, 1)  # [N/n, n, ...]
  x = x.reshape(-1, *x.shape[2:])
  if mesh is not None:
    spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return x
