"""LoRA adapters on the model's kernels, and the trainable/frozen split.

A target kernel ``W`` (say ``q``, ``[D, H, Dh]``) contracts its first
``n_in`` axes with the input. Its adapter holds ``A`` of shape
``W.shape[:n_in] + (r,)`` and ``B`` of shape ``(r,) + W.shape[n_in:]``; the
layer computes

.. math:: y = x W + s\\,(x A) B, \\qquad s = \\alpha / r
   \\;(\\text{rsLoRA: } \\alpha / \\sqrt{r})

``B`` starts at zero, so a fresh adapter leaves the model exactly as it was.
``A`` carries the kernel's input-axis names and ``B`` its output-axis names
(the rank axis is replicated), so both are sharded like the kernel they
adapt; inside ``nnx.vmap``'d blocks they get the ``layers`` axis too.

Switching adapters off (:func:`set_enabled`) skips their matmuls; the DPO
reference of ``config.reference='base'`` is the policy so switched off, from
the same arrays under ``stop_gradient``: no second copy of the weights.

Why a small NNX module and not ``qwix`` (Google's JAX quantization/LoRA
library, 0.1.8 installs against the pinned jax 0.10.2 / flax 0.12.8 without
changing them): qwix adds LoRA by intercepting ``einsum``/``dot_general``
calls of a module at trace time and creating the adapter parameters lazily on
the module that made the call. alignax's kernels are raw ``nnx.Param`` arrays
stacked over a leading ``layers`` axis and applied inside ``nnx.scan`` after
:func:`alignax.sharding.gather_params`; adapters created lazily inside that
scan body would not be stacked per layer, would not carry the kernels'
logical axis names (our sharding rules read them), and the
trainable/frozen split, the PEFT export and the reference switch would have
to reverse-engineer qwix's naming. Explicit adapters next to their kernels
cost ~100 lines and keep all of that visible; quantization is equally small
(:mod:`alignax.models.quant`).

References:
  Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models.
  Kalajdzievski, 2023, A Rank Stabilization Scaling Factor for Fine-Tuning
  with LoRA (rsLoRA).
"""
import contextlib
import dataclasses
import math
import threading

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from alignax.models import quant
from alignax.models.config import LORA_TARGETS

# Kernels that can carry an adapter: attention projections and the gated
# MLP's three matrices (names of the kernels in ``layers``).
TARGETS = LORA_TARGETS
# Suffix of an adapter's attribute next to its kernel: ``q`` -> ``q_lora``.
SUFFIX = '_lora'
# Top-level parameter groups of ``Transformer``; with adapters they are
# frozen (except the adapters inside them). Heads that subclasses add
# (embedding projection, reward head) stay trainable.
BASE_GROUPS = ('embed', 'blocks', 'final_norm', 'lm_head')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What adapters a layer builds: rank, scaling and target kernel names."""
  rank: int
  alpha: float
  rslora: bool
  targets: tuple[str, ...]
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def spec_of(cfg) -> LoraSpec | None:
  """The ``LoraSpec`` of a ``ModelConfig``, None without adapters."""
  if not cfg.lora_rank:
    return None
  return LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_rslora,
                  tuple(cfg.lora_targets), cfg.lora_dropout)


# --- dropout on the adapters' inputs (train steps only) -------------------------
#
# PEFT applies ``lora_dropout`` to the adapter's input: ``s B A drop(x)``.
# The key is not a model variable (a key inside the model would follow the
# frozen reference and the parameter tree around): the train step opens
# :func:`dropout_rng` around its objective, the transformer splits the key
# over its stacked layers (a scanned input, so remat recomputes the same
# masks) and opens :func:`layer_rng` around each layer; each adapter folds
# in its kernel's index. Outside a train step nothing is dropped.

_DROPOUT = threading.local()


@contextlib.contextmanager
def _scoped(name, value):
  old = getattr(_DROPOUT, name, None)
  setattr(_DROPOUT, name, value)
  try:
    yield
  finally:
    setattr(_DROPOUT, name, old)


def dropout_rng(key: jax.Array | None):
  """Context: adapters with ``dropout > 0`` drop inputs, keyed by ``key``."""
  return _scoped('step', key)


def step_dropout_rng() -> jax.Array | None:
  """The key of the enclosing :func:`dropout_rng`, None outside one."""
  return getattr(_DROPOUT, 'step', None)


def layer_rng(key: jax.Array | None):
  """Context: the dropout key of the layer being applied."""
  return _scoped('layer', key)


def uses_dropout(model: nnx.Module) -> bool:
  """True when some enabled adapter of ``model`` has a dropout rate."""
  return any(isinstance(m, LoraAdapter) and m.enabled and m.dropout > 0
             for _, m in nnx.iter_modules(model))


class LoraAdapter(nnx.Module):
  """``A [in..., r]`` and ``B [r, out...]`` of one kernel; ``B`` starts at 0.

  Args:
    shape: the adapted kernel's shape; its first ``n_in`` axes are
      contracted with the input.
    names: the kernel's logical axis names.
    n_in: number of input axes of the kernel.
    spec: rank and scaling.
    param_dtype: storage dtype of ``A`` and ``B``.
    rngs: ``params`` stream for ``A``.
  """

  def __init__(self, shape, names, n_in: int, spec: LoraSpec, *, param_dtype,
               rngs: nnx.Rngs, salt: int = 0):
    r = spec.rank
    # Uniform(+-1/sqrt(fan_in)): PEFT's kaiming_uniform(a=sqrt(5)) default.
    a_init = nnx.initializers.variance_scaling(
        1.0 / 3.0, 'fan_in', 'uniform', in_axis=tuple(range(n_in)),
        out_axis=n_in)
    self.a = _param(rngs, a_init, tuple(shape[:n_in]) + (r,),
                    tuple(names[:n_in]) + (None,), param_dtype)
    self.b = _param(rngs, nnx.initializers.zeros, (r,) + tuple(shape[n_in:]),
                    (None,) + tuple(names[n_in:]), param_dtype)
    self.n_in = n_in
    self.scale = spec.scale
    self.dropout = spec.dropout
    self.salt = salt  # its kernel's index in TARGETS: one mask per adapter
    self.enabled = True

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    """``s (drop(x) A) B``: ``[..., in...] -> [..., out...]`` in ``dtype``."""
    x = x.astype(dtype)
    key = getattr(_DROPOUT, 'layer', None)
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt),
                                  1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, dtype),
                    jnp.zeros((), dtype))
    xa = jnp.tensordot(x, self.a[...].astype(dtype), axes=self.n_in)  # [..., r]
    xab = jnp.tensordot(xa, self.b[...].astype(dtype), axes=1)
    return xab * jnp.asarray(self.scale, dtype)

  def delta(self) -> jax.Array:
    """``s A B`` with the kernel's shape (float32), for merging."""
    a = self.a[...].astype(jnp.float32)
    b = self.b[...].astype(jnp.float32)
    return self.scale * jnp.tensordot(a, b, axes=1)


def _param(rngs, initializer, shape, names, dtype):
  init = nnx.with_partitioning(initializer, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, dtype))


def make_adapters(module: nnx.Module, spec: LoraSpec | None, kernels, *,
                  param_dtype, rngs: nnx.Rngs) -> None:
  """Adds ``<name>_lora`` adapters to ``module`` for the targeted kernels.

  ``kernels`` maps kernel name -> ``(shape, logical names, n_in)``.
  """
  if spec is None:
    return
  for name, (shape, names, n_in) in kernels.items():
    if name in spec.targets:
      setattr(module, name + SUFFIX,
              LoraAdapter(shape, names, n_in, spec, param_dtype=param_dtype,
                          rngs=rngs, salt=TARGETS.index(name)))


def add(module: nnx.Module, name: str, y: jax.Array, x: jax.Array,
        dtype) -> jax.Array:
  """``y`` plus kernel ``name``'s adapter applied to ``x``, if it has one on."""
  adapter = getattr(module, name + SUFFIX, None)
  if adapter is None or not adapter.enabled:
    return y
  return y + adapter(x, dtype)


def set_enabled(model: nnx.Module, enabled: bool) -> nnx.Module:
  """Switches every adapter of ``model`` on or off (in place); returns it."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoraAdapter):
      module.enabled = enabled
  return model


def without_adapters(model: nnx.Module) -> nnx.Module:
  """The base model of ``model``: same arrays (no gradient), adapters off.

  This is the DPO reference of ``config.reference='base'``; merging from
  the policy's own (stop-gradient) arrays makes no copy of the weights.
  """
  graphdef, state = nnx.split(model)
  return set_enabled(nnx.merge(graphdef, jax.lax.stop_gradient(state)), False)


# --- the parameter tree: adapters (trained) and the base (frozen) ---------------


def is_adapter_path(path) -> bool:
  """True for a flattened param path inside an adapter (``..., 'q_lora', 'a'``)."""
  return any(isinstance(k, str) and k.endswith(SUFFIX) for k in path)


def has_adapters(params) -> bool:
  return any(is_adapter_path(p) for p in traverse_util.flatten_dict(params))


def _is_trainable(path) -> bool:
  return is_adapter_path(path) or path[0] not in BASE_GROUPS


def split_trainable(params) -> tuple[dict, dict]:
  """``(trainable, frozen)`` nested dicts of a pure param dict.

  Without adapters everything is trainable: ``(params, {})``. With them the
  trainable part is the adapters plus any head outside the base transformer
  (``BASE_GROUPS``); the rest is the frozen base.
  """
  if not has_adapters(params):
    return params, {}
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if _is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not _is_trainable(k)}
  return (traverse_util.unflatten_dict(train),
          traverse_util.unflatten_dict(frozen))


def trainable(params):
  """The part of ``params`` that gets gradients and optimizer state."""
  return split_trainable(params)[0]


def merge_trainable(train, frozen):
  """Inverse of :func:`split_trainable`."""
  if not frozen:
    return train
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(train))
  return traverse_util.unflatten_dict(flat)


# --- merging: W + s A B --------------------------------------------------------


def merge_into_base(params, spec: LoraSpec):
  """The base params with every adapter folded in, ``W + s A B``; no adapters.

  Kernels of stacked blocks carry a leading ``[L]`` axis, as do their
  adapters. The sum is taken in float32 and cast to the kernel's dtype.
  """
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not is_adapter_path(k)}
  for key in [k for k in flat if is_adapter_path(k) and k[-1] == 'a']:
    kernel = key[:-2] + (key[-2].removesuffix(SUFFIX),)
    a, b, w = flat[key], flat[key[:-1] + ('b',)], out[kernel]
    scale = out.pop(kernel[:-1] + (kernel[-1] + quant.SCALE_SUFFIX,), None)
    if scale is not None:  # QLoRA: the float kernel, then the update
      in_shape = a.shape[1:-1]
      w = jax.vmap(lambda q, s: _dequantize(q, s, in_shape))(w, scale)
    # Blocks are stacked on a leading [L] axis (nnx.vmap), adapters too.
    delta = adapter_delta(a, b, spec.scale, stacked=key[0] == 'blocks')
    out[kernel] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


def _dequantize(q, scale, in_shape):
  if q.dtype == jnp.int8:
    return quant.dequantize_int8(q, scale, jnp.float32)
  return quant.dequantize_nf4(q, scale, in_shape, jnp.float32)


def adapter_delta(a, b, scale: float, *, stacked: bool) -> jax.Array:
  """``s A B`` (float32), per layer when ``stacked`` (leading ``[L]`` axis)."""
  prod = lambda a, b: scale * jnp.tensordot(
      a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  return jax.vmap(prod)(a, b) if stacked else prod(a, b)
