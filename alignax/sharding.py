"""Device mesh, logical-axis rules, and host -> global array placement.

The mesh has three axes (MaxText's naming, reduced to what alignax uses):

* ``data``   -- pure data parallelism (replicated parameters);
* ``fsdp``   -- data parallelism with parameters and optimizer state sharded
  (ZeRO-3 style); the batch is split over ``data`` x ``fsdp``;
* ``tensor`` -- tensor (Megatron) parallelism over heads and MLP columns.

Model kernels carry *logical* axis names (``embed``, ``mlp``, ``heads``, ...);
``rules`` map each logical name to a mesh axis (or ``None`` = replicated).

Activations carry logical names too (``activation_batch``, ...): the model
calls :func:`constrain` at block boundaries, which pins the batch to
``data`` x ``fsdp`` so that each chip holds only its own rows, and
:func:`gather_params` inside the layer loop, which all-gathers that layer's
``fsdp``-sharded weights just before use; their gradients are reduced back
onto the shards (ZeRO-3, as MaxText and levanter). Only ``tensor`` splits
activation features. Per-chip memory then depends on the rows per chip, not
on the pod size. The step functions set the mesh and rules with
:func:`activation_sharding`; without it (unit tests, notebooks) both return
their input unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import mesh_utils
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
    # Activations: rows over (data, fsdp), features split by tensor only.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
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


def num_slices(devices) -> int:
  """How many TPU slices (joined over the data-centre network) ``devices``
  span: 1 on CPU, GPU and single-slice TPU."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh over ``devices`` (default all).

  On a multi-slice TPU run ``mesh_cfg`` lays out one slice (its ICI) and
  the slices multiply ``data`` over the data-centre network (DCN), as
  MaxText's ``dcn_data_parallelism``: fsdp's per-layer gathers and
  reduce-scatters stay inside a slice, and only the data-parallel gradient
  reduction crosses DCN.
  """
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA's sharding propagation (GSPMD) places intermediates; the
  # explicit-sharding mode would demand out_sharding on every gather.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = num_slices(devices)
  if slices > 1:
    if len(devices) % slices:
      raise ValueError(f"{len(devices)} devices do not split evenly over "
                       f"{slices} slices")
    ici = mesh_shape(mesh_cfg, len(devices) // slices)
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, (slices,) + (1,) * (len(MESH_AXES) - 1), devices,
        allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  shape = mesh_shape(mesh_cfg, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if devices[0].platform == "tpu":  # e.g. an abstract topology's chips
    grid = mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)
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


# (mesh, rules) that ``constrain`` uses while a step is traced; None = off.
_ACTIVATION_MESH = contextvars.ContextVar("alignax_activation_mesh",
                                          default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
  """Within the block, :func:`constrain` places activations on ``mesh``.

  Enter it inside the function that ``jax.jit`` traces (the step builders
  do); ``mesh=None`` turns constraints off. Activation names missing from
  ``rules`` (rules written before they existed) take ``DEFAULT_RULES``'.
  """
  if mesh is None:
    token = _ACTIVATION_MESH.set(())  # off, even under jax.set_mesh
  else:
    merged = dict(DEFAULT_RULES)
    merged.update((name, axes) for name, axes in rules)
    token = _ACTIVATION_MESH.set((mesh, tuple(merged.items())))
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def with_activation_sharding(fn):
  """Decorates ``fn(..., mesh=None, rules=DEFAULT_RULES)`` to run inside
  :func:`activation_sharding` of its own ``mesh`` and ``rules``."""

  @functools.wraps(fn)
  def wrapped(*args, mesh=None, rules=DEFAULT_RULES, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, mesh=mesh, rules=rules, **kwargs)

  return wrapped


def _mesh_and_rules():
  """``(mesh, rules)`` of :func:`activation_sharding`, else of ``jax.set_mesh``
  (an abstract mesh, ``DEFAULT_RULES``); None without either or on one device.
  """
  context = _ACTIVATION_MESH.get()
  if context == ():
    return None
  if context is None:
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty or not set(MESH_AXES) <= set(abstract.axis_names):
      return None
    context = (abstract, DEFAULT_RULES)
  return None if context[0].size == 1 else context


def _place(x, logical, mesh, rules):
  spec = logical_to_spec(logical, x.shape, rules, mesh)
  if isinstance(mesh, Mesh):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, spec)  # under jax.set_mesh


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` of ``x`` by its logical axis names.

  Uses the mesh of the enclosing :func:`activation_sharding`, else the one
  set by ``jax.set_mesh`` (with ``DEFAULT_RULES``); with neither, or on a
  one-device mesh, returns ``x`` unchanged.
  """
  context = _mesh_and_rules()
  return x if context is None else _place(x, logical, *context)


def _without_batch_axes(rules: Rules) -> Rules:
  def keep(axes):
    flat = () if axes is None else (axes,) if isinstance(axes, str) else axes
    flat = tuple(a for a in flat if a not in BATCH_AXES)
    return flat[0] if len(flat) == 1 else (flat or None)
  return tuple((name, keep(axes)) for name, axes in rules)


def gather(w: jax.Array, logical: Sequence[str | None] | None) -> jax.Array:
  """A weight made whole over ``data`` and ``fsdp`` (still split by ``tensor``).

  This is ZeRO-3's all-gather, written where the weight is used: XLA then
  cannot choose to move activations instead (it does, left to itself, once
  the weights are small next to the rows), and the gradient is reduced back
  onto the weight's ``fsdp`` shards. Same no-op cases as :func:`constrain`.
  """
  context = _mesh_and_rules()
  if context is None:
    return w
  mesh, rules = context
  return _place(w, logical, mesh, _without_batch_axes(rules))


def gather_params(module: nnx.Module, dtype=None) -> nnx.Module:
  """A copy of ``module`` whose parameters went through :func:`gather`.

  Call it inside the layer loop, so that one layer's weights are whole at a
  time. Matrices are first cast to ``dtype`` (the compute dtype the layers
  cast them to anyway), halving the bytes gathered; vectors (norm scales)
  keep their dtype. Without a mesh the module itself is returned.
  """
  if _mesh_and_rules() is None:
    return module

  def whole(var):
    w = var[...]
    if dtype is not None and w.ndim >= 2 and jnp.issubdtype(w.dtype,
                                                            jnp.floating):
      w = w.astype(dtype)
    return var.replace(gather(w, var.get_metadata().get("out_sharding")))

  graphdef, state = nnx.split(module)
  state = jax.tree.map(whole, state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.merge(graphdef, state)


# Logical names by rank of the arrays that per_row_shards splits.
_ROW_NAMES = {2: ("activation_batch", "activation_length"),
              4: ("activation_batch", "activation_length", "activation_heads",
                  None)}


def per_row_shards(fn):
  """``fn`` run by every chip on its own rows and heads (``shard_map``).

  For row-independent computations whose loops GSPMD cannot see through
  (blockwise / kernel attention: it would gather every row to every chip):
  axis 0 of every array is split over ``data`` x ``fsdp``; axis 2 of 4-D
  arrays (``[B, T, heads, Dh]``) over ``tensor`` when it divides in all of
  them (else whole: GQA groups must stay together); scalars and other axes
  are whole. Takes and returns arrays (pytrees, ``None`` leaves allowed);
  without a mesh, ``fn`` itself.
  """
  context = _mesh_and_rules()
  if context is None:
    return fn
  mesh, rules = context

  def wrapped(*args):
    args = jax.tree.map(jnp.asarray, args)
    rank4 = [x for x in jax.tree.leaves(args) if x.ndim == 4]
    split_heads = all(
        logical_to_spec(_ROW_NAMES[4], x.shape, rules, mesh)[2] is not None
        for x in rank4)
    table = rules if split_heads else tuple(
        (n, None if n == "activation_heads" else a) for n, a in rules)
    spec = lambda x: logical_to_spec(_ROW_NAMES.get(x.ndim, ()), x.shape,
                                     table, mesh)
    in_specs = jax.tree.map(spec, args)
    out_shape = jax.eval_shape(fn, *args)
    out_specs = jax.tree.map(spec, out_shape)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)(*args)

  return wrapped


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
