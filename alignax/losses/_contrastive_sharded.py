"""Ring (chunked) CLIP and SigLIP losses over a batch sharded on mesh axes.

Each device holds ``B_local`` rows of ``x`` and ``y``. The ``y`` blocks travel
around a ring of ``lax.ppermute`` hops, so a device only ever materialises one
``[B_local, B_local]`` logits block instead of ``[B_local, B]`` (or the full
``[B, B]`` of a gathered loss). CLIP keeps streaming (online) log-sum-exps: the
row direction on the device of ``x``, the column direction on a running
accumulator that travels with its ``y`` block and returns home after one lap.
SigLIP needs only a running sum.

Gradients are JAX's own through ``ppermute`` (its transpose is the reverse
hop). Each ring step is rematerialised (``jax.checkpoint``), so the backward
pass also holds one logits block at a time; it keeps the ``n - 1`` visiting
``y`` blocks (``[B, D]`` in all, the size of an all-gather of ``y``) and
``[B_local]`` accumulators per step.

The results equal :func:`alignax.losses._contrastive.clip_loss` and
``siglip_loss`` on the global batch, sharded like the inputs' rows.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P


def _axes(axis_name: str | Sequence[str]) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _check(x, y, mesh, axes):
  """Validates inputs and returns ``(x, y, ring_size)``."""
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"axis names {missing} are not in the mesh axes "
                     f"{tuple(mesh.shape)}")
  n = math.prod(mesh.shape[a] for a in axes)
  if jnp.ndim(x) != 2 or jnp.shape(x) != jnp.shape(y):
    raise ValueError(f"x and y must be [B, D] arrays of one shape, got "
                     f"{jnp.shape(x)} and {jnp.shape(y)}")
  if jnp.shape(x)[0] % n:
    raise ValueError(f"batch of shape {jnp.shape(x)} does not split into {n} "
                     f"equal blocks over mesh axes {axes}")
  dtype = jnp.result_type(x, jnp.float32)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype), n


def _ring_shift(value, axes, n):
  """Sends ``value`` from ring position ``k`` to ``k + 1`` (mod ``n``)."""
  name = axes[0] if len(axes) == 1 else axes
  return lax.ppermute(value, name, perm=[(k, (k + 1) % n) for k in range(n)])


def chunked_clip_loss(x, y, *, mesh: Mesh, axis_name: str | Sequence[str],
                      logit_scale):
  r"""CLIP loss on a sharded batch, one ``[B_local, B_local]`` block at a time.

  .. math::
    \ell_i = \tfrac12\Big[\log\sum_j e^{t\,x_i^\top y_j}
      + \log\sum_j e^{t\,x_j^\top y_i}\Big] - t\, x_i^\top y_i

  Args:
    x: ``[B, D]`` embeddings, rows sharded (or to be sharded) over
      ``axis_name``; ``B`` divisible by the product of those axes' sizes.
    y: ``[B, D]`` embeddings, same sharding.
    mesh: the device mesh.
    axis_name: a mesh axis name or a sequence of them (e.g.
      ``('data', 'fsdp')``) that the batch is split over, in that order.
    logit_scale: scalar :math:`t`.

  Returns:
    per-example losses ``[B]``, sharded over ``axis_name`` like the rows.

  References:
    Radford et al., *Learning Transferable Visual Models From Natural Language
    Supervision*, 2021; Liu et al., *Ring Attention with Blockwise
    Transformers*, 2023 (the ring schedule).
  """
  axes = _axes(axis_name)
  x, y, n = _check(x, y, mesh, axes)

  def local(x, y, t):  # x, y: [B_local, D]; t: []
    logits = t * (x @ y.T)  # [B_local, B_local], own block
    pos = jnp.diagonal(logits)
    row = jax.nn.logsumexp(logits, axis=1)
    col = jax.nn.logsumexp(logits, axis=0)

    @jax.checkpoint
    def step(carry, _):
      y_blk, col_blk, row = carry
      y_blk, col_blk = _ring_shift((y_blk, col_blk), axes, n)
      logits = t * (x @ y_blk.T)  # [B_local, B_local]
      col_blk = jnp.logaddexp(col_blk, jax.nn.logsumexp(logits, axis=0))
      row = jnp.logaddexp(row, jax.nn.logsumexp(logits, axis=1))
      return (y_blk, col_blk, row), None

    (_, col, row), _ = lax.scan(step, (y, col, row), None, length=n - 1)
    col = _ring_shift(col, axes, n)  # one last hop brings it home
    return 0.5 * (row + col) - pos

  rows = P(axes, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()),
                       out_specs=P(axes))(x, y, jnp.asarray(logit_scale))


def chunked_siglip_loss(x, y, *, mesh: Mesh, axis_name: str | Sequence[str],
                        logit_scale, logit_bias):
  r"""SigLIP loss on a sharded batch, one local logits block at a time.

  .. math::
    \ell_i = -\sum_j \log\sigma\big(z_{ij}(t\,x_i^\top y_j + b)\big),
    \quad z_{ij} = 2\,[i = j] - 1

  Args:
    x: ``[B, D]`` embeddings, rows sharded (or to be sharded) over
      ``axis_name``; ``B`` divisible by the product of those axes' sizes.
    y: ``[B, D]`` embeddings, same sharding.
    mesh: the device mesh.
    axis_name: a mesh axis name or a sequence of them.
    logit_scale: scalar :math:`t`.
    logit_bias: scalar :math:`b`.

  Returns:
    per-example losses ``[B]`` (row sums), sharded over ``axis_name``.

  References:
    Zhai et al., *Sigmoid Loss for Language Image Pre-Training*, 2023
    (section 3.3 describes this chunked schedule).
  """
  axes = _axes(axis_name)
  x, y, n = _check(x, y, mesh, axes)

  def local(x, y, t, b):  # x, y: [B_local, D]; t, b: []
    logits = t * (x @ y.T) + b  # [B_local, B_local], own block
    signs = 2.0 * jnp.eye(x.shape[0], dtype=logits.dtype) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1)

    @jax.checkpoint
    def step(carry, _):
      y_blk, loss = carry
      y_blk = _ring_shift(y_blk, axes, n)
      logits = t * (x @ y_blk.T) + b  # [B_local, B_local], all negatives
      loss = loss - jnp.sum(jax.nn.log_sigmoid(-logits), axis=-1)
      return (y_blk, loss), None

    (_, loss), _ = lax.scan(step, (y, loss), None, length=n - 1)
    return loss

  rows = P(axes, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P(), P()),
                       out_specs=P(axes))(x, y, jnp.asarray(logit_scale),
                                          jnp.asarray(logit_bias))
