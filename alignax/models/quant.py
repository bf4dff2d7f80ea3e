"""Quantized frozen kernels for QLoRA: int8 and NF4, dequantized in the layer.

Under ``ModelConfig.quant`` the block kernels (q, k, v, o, gate, up, down)
are stored quantized and frozen; LoRA adapters train on top (QLoRA). A
kernel ``W`` whose first ``n_in`` axes are its inputs is stored as

* ``'int8'``: symmetric per output channel,
  :math:`s_j = \\max_i |W_{ij}| / 127`, :math:`q = \\mathrm{round}(W / s)`
  (int8, same shape and logical names as ``W``); the error of each weight is
  at most :math:`s_j / 2`.
* ``'nf4'``: 4-bit NormalFloat (Dettmers et al., 2023): ``W`` as
  ``[IN, OUT]`` in blocks of ``NF4_BLOCK`` input rows, each scaled by its
  absmax ``m`` and rounded to the nearest of the 16 NF4 code values; two
  codes packed per uint8 (``[IN / 2, OUT]``). The error of each weight is at
  most ``m`` times half the widest gap between neighbouring codes.

The layer dequantizes just before its matmul, inside the layer scan, so only
one layer's float kernel exists at a time (after ``gather_params`` moved the
quantized bytes). Like the LoRA adapters this is a small module of our own,
not ``qwix`` (see :mod:`alignax.models.lora` for why).

References:
  Dettmers et al., 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ``ModelConfig.quant``.
QUANTS = ('none', 'int8', 'nf4')
# The 16 NF4 code values (bitsandbytes' table): quantiles of N(0, 1) scaled
# to [-1, 1], with an exact 0.
NF4_CODE = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64  # input rows per absmax (smaller when IN is smaller)
SCALE_SUFFIX = '_scale'


def quantize_int8(w: jax.Array, n_in: int):
  """``(q int8 like w, scale float32 [out...])``; ``w ~ q * scale``."""
  w = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return q.astype(dtype) * scale.astype(dtype)


def nf4_block(rows: int) -> int:
  """Block length of ``rows`` input rows: ``NF4_BLOCK`` or all of them."""
  return NF4_BLOCK if rows % NF4_BLOCK == 0 else rows


def quantize_nf4(w: jax.Array, n_in: int):
  """``(packed uint8 [IN/2, out...], absmax float32 [IN/block, out...])``."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  rows = int(np.prod(in_shape))
  if rows % 2:
    raise ValueError(f'nf4 needs an even number of input rows, got {rows}.')
  block = nf4_block(rows)
  w = w.astype(jnp.float32).reshape(rows // block, block, -1)  # [NB, bs, OUT]
  absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
  absmax = jnp.where(absmax > 0, absmax, 1.0)
  codes = jnp.argmin(jnp.abs((w / absmax)[..., None] - NF4_CODE), axis=-1)
  codes = codes.reshape(rows, -1).astype(jnp.uint8)  # [IN, OUT]
  packed = (codes[0::2] << 4) | codes[1::2]  # [IN/2, OUT]
  return (packed.reshape((rows // 2,) + out_shape),
          absmax.reshape((rows // block,) + out_shape))


def dequantize_nf4(packed: jax.Array, absmax: jax.Array, in_shape,
                   dtype) -> jax.Array:
  """The float kernel ``in_shape + out...`` of :func:`quantize_nf4`'s output."""
  out_shape = packed.shape[1:]
  rows = int(np.prod(in_shape))
  packed = packed.reshape(rows // 2, -1)
  codes = jnp.stack([packed >> 4, packed & 15], axis=1).reshape(rows, -1)
  values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]  # [IN, OUT]
  block = rows // absmax.shape[0]
  values = values.reshape(rows // block, block, -1) * absmax.reshape(
      rows // block, 1, -1)
  return values.reshape(tuple(in_shape) + tuple(out_shape)).astype(dtype)


def quantize_kernels(module: nnx.Module, kind: str, kernels) -> None:
  """Replaces ``module``'s float kernels by their quantized form (in place).

  ``kernels`` maps kernel name -> ``(logical names, n_in)``; the scale goes
  to ``<name>_scale``, named by the output axes.
  """
  if kind == 'none':
    return
  for name, (names, n_in) in kernels.items():
    param = getattr(module, name)
    w = param[...]
    if kind == 'int8':
      q, scale = quantize_int8(w, n_in)
      q_names = tuple(names)
      scale_names = tuple(names[n_in:])
    else:
      q, scale = quantize_nf4(w, n_in)
      # The block axis of the absmax is a coarse input axis: named like it,
      # so that it shards over fsdp with the packed kernel.
      in_name = names[0] if n_in == 1 else None
      q_names = (in_name,) + tuple(names[n_in:])
      scale_names = (in_name,) + tuple(names[n_in:])
    setattr(module, name, nnx.Param(q, out_sharding=q_names,
                                    eager_sharding=False))
    setattr(module, name + SCALE_SUFFIX,
            nnx.Param(scale, out_sharding=scale_names, eager_sharding=False))


def kernel(module: nnx.Module, name: str, dtype, in_shape=None) -> jax.Array:
  """Kernel ``name`` of ``module`` in ``dtype``, dequantized if stored so.

  ``in_shape``: the kernel's input axes (needed for nf4, whose packed form
  has lost them).
  """
  w = getattr(module, name)[...]
  scale = getattr(module, name + SCALE_SUFFIX, None)
  if scale is None:
    return w.astype(dtype)
  if w.dtype == jnp.int8:
    return dequantize_int8(w, scale[...], dtype)
  return dequantize_nf4(w, scale[...], in_shape, dtype)


def kernel_of_scale(key, flat):
  """The kernel key whose quantization scale ``key`` is, or None.

  ``key`` (a flattened path) is a scale when it ends with ``SCALE_SUFFIX``
  and the kernel it names is in ``flat``; other names ending in ``_scale``
  (a contrastive head's ``logit_scale``) are not.
  """
  if not key[-1].endswith(SCALE_SUFFIX):
    return None
  kernel_key = key[:-1] + (key[-1].removesuffix(SCALE_SUFFIX),)
  return kernel_key if kernel_key in flat else None


def quantize_loaded(params, target):
  """Float kernels of ``params`` quantized where ``target`` holds a scale.

  ``params`` is a pure dict whose kernels came from a float checkpoint (an
  HF directory); ``target`` the quantized model's abstract params.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(target)
  for key, spec in want.items():
    kernel_key = kernel_of_scale(key, want)
    if kernel_key is None:
      continue
    w = flat[kernel_key]
    if w.dtype == want[kernel_key].dtype:
      continue  # already quantized
    is_int8 = want[kernel_key].dtype == jnp.int8
    # Scales: int8 [L, out...], nf4 [L, blocks, out...]; kernels [L, in..., out...].
    n_in = w.ndim - 1 - (spec.ndim - (1 if is_int8 else 2))
    fn = quantize_int8 if is_int8 else quantize_nf4
    shardings = (getattr(want[kernel_key], 'sharding', None),
                 getattr(spec, 'sharding', None))
    flat[kernel_key], flat[key] = jax.jit(
        jax.vmap(lambda x, fn=fn, n_in=n_in: fn(x, n_in)),
        out_shardings=shardings if None not in shardings else None)(w)
  return traverse_util.unflatten_dict(flat)


def logical_size(params) -> int:
  """Parameters of the float model ``params`` stores: a quantized kernel
  counts as its float kernel (nf4 packs two per byte), scales not at all."""
  flat = {tuple(str(getattr(k, 'key', k)) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  total = 0
  for key, x in flat.items():
    if kernel_of_scale(key, flat) is not None:
      continue
    packed = (x.dtype == jnp.uint8
              and key[:-1] + (key[-1] + SCALE_SUFFIX,) in flat)
    total += int(x.size) * (2 if packed else 1)
  return total

