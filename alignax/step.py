"""One train-step skeleton for every path, and its eval twin.

``objective(model, batch, rng, *, frozen) -> (loss_sum, (loss_count, metrics))``
(see ``alignax.objectives.lm``). A stateful objective also has
``init_extras()`` and ``update_extras(extras, metrics)``: it is called with
``extras=state.extras`` and the step stores the updated tree in the state. The step differentiates ``loss_sum`` per
microbatch, sums gradients over microbatches and divides by the total count,
so accumulation gives exactly the gradient of the full-batch mean.

Non-finite values never reach the state: when the loss, the gradients, the
new parameters, the new optimizer state or the objective's new extras hold
a NaN or Inf (an lr that overflows float32 makes finite gradients give
infinite parameters), the whole update is dropped inside the step and
reported as ``nonfinite``; the loop decides whether to stop (the default)
or go on (``on_nonfinite='skip'``). With dynamic
loss scaling (fp16 compute) such steps halve the scale instead, as in
mixed-precision training (Micikevicius et al., 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alignax import sharding as shd
from alignax.models import lora
from alignax.state import TrainState


@dataclass(frozen=True)
class LossScaleConfig:
  """Dynamic loss scaling: halve on overflow, double after ``period`` good steps."""
  dynamic: bool = False
  period: int = 2000
  factor: float = 2.0
  min_scale: float = 1.0


_LORA_DROPOUT_SALT = 0x10A  # fold_in constant of the adapters' dropout key


def _split_microbatches(batch, microbatches: int, mesh):
  """``[B, ...] -> [M, B/M, ...]`` taking every M-th row into one microbatch.

  Strided (not contiguous) selection keeps each microbatch spread over all
  data shards instead of landing on the first devices only.
  """
  return jax.tree.map(lambda x: shd.split_rows(x, microbatches, mesh), batch)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def all_finite(tree) -> jax.Array:
  """True when every float leaf of ``tree`` is finite (ints always are)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _extras_kwarg(extras):
  """Stateful objectives (``init_extras``) get ``extras=``; others nothing."""
  return {"extras": extras} if extras else {}


def make_grad_fn(objective, graphdef, *, microbatches: int = 1, mesh=None):
  """``(params, batch, rng, frozen, scale) -> (grads_sum, loss_count, metrics)``.

  Gradients are taken for ``lora.trainable(params)`` only: with LoRA
  adapters the frozen base is an input of the loss but not differentiated,
  so no full-size weight gradient is ever computed.
  """

  def loss_fn(train, fixed, batch, rng, frozen, scale, extras):
    model = nnx.merge(graphdef, lora.merge_trainable(train, fixed))
    # LoRA dropout (if any adapter has a rate) in train steps only; its key
    # is folded off the step's so the objective's own draws do not change.
    with lora.dropout_rng(jax.random.fold_in(rng, _LORA_DROPOUT_SALT)):
      loss_sum, (count, metrics) = objective(model, batch, rng, frozen=frozen,
                                             **_extras_kwarg(extras))
    return loss_sum * scale, (count, metrics)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulate(params, batch, rng, frozen, scale, extras=None):
    params, fixed = lora.split_trainable(params)
    if microbatches == 1:
      grads, (count, metrics) = grad_fn(params, fixed, batch, rng, frozen,
                                        scale, extras)
      return grads, count, metrics
    micro = _split_microbatches(batch, microbatches, mesh)
    rngs = jax.random.split(rng, microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, fixed, first, rngs[0], frozen,
                            scale, extras)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

    def body(carry, xs):
      mb, r = xs
      grads, aux = grad_fn(params, fixed, mb, r, frozen, scale, extras)
      return _add(carry, (grads, aux)), None

    (grads, (count, metrics)), _ = jax.lax.scan(body, zeros, (micro, rngs))
    return grads, count, metrics

  return accumulate


def _next_loss_scale(state: TrainState, finite, cfg: LossScaleConfig):
  if not cfg.dynamic:
    return state.loss_scale, state.good_steps
  grow = finite & (state.good_steps + 1 >= cfg.period)
  scale = jnp.where(finite, jnp.where(grow, state.loss_scale * cfg.factor,
                                      state.loss_scale),
                    jnp.maximum(state.loss_scale / cfg.factor, cfg.min_scale))
  good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
  return scale.astype(jnp.float32), good.astype(jnp.int32)


def make_train_step(objective, graphdef, optimizer, schedule=None, *,
                    microbatches: int = 1, mesh=None,
                    loss_scale: LossScaleConfig = LossScaleConfig(),
                    rules=shd.DEFAULT_RULES):
  """Returns ``train_step(state, batch, frozen) -> (state, metrics)`` (unjitted).

  ``metrics`` maps names to ``(sum, count)``; the objective's metrics plus
  ``grad_norm``, ``param_norm``, ``update_norm``, ``lr``, ``loss_scale`` and
  ``nonfinite`` (1 when the update was dropped); the norms are over the
  trainable parameters (``lora.trainable``: the adapters under LoRA). With
  a ``mesh`` the model's activations are constrained by ``rules``
  (``sharding.activation_sharding``).
  """
  grads_of = make_grad_fn(objective, graphdef, microbatches=microbatches, mesh=mesh)
  update_extras = getattr(objective, "update_extras", lambda e, _: e)

  def train_step(state: TrainState, batch, frozen=None):
    rng, step_rng = jax.random.split(state.rng)
    scale = state.loss_scale
    grads, count, metrics = grads_of(state.params, batch, step_rng, frozen, scale,
                                     state.extras)
    # d(sum)/count = d(mean): exact for any split into microbatches.
    grads = jax.tree.map(lambda g: g / (scale * jnp.maximum(count, 1e-9)), grads)
    old, fixed = lora.split_trainable(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, old)
    params = optax.apply_updates(old, updates)
    extras = update_extras(state.extras, metrics)
    finite = (all_finite(grads) & jnp.isfinite(metrics["loss"][0])
              & all_finite((params, opt_state, extras)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_scale, good = _next_loss_scale(state, finite, loss_scale)
    new_state = state.replace(
        step=state.step + 1,
        params=lora.merge_trainable(keep(params, old), fixed),
        opt_state=keep(opt_state, state.opt_state),
        rng=rng, loss_scale=new_scale, good_steps=good,
        extras=keep(extras, state.extras))
    one = jnp.float32(1.0)
    metrics = dict(metrics)
    metrics.update(
        grad_norm=(optax.tree.norm(grads), one),
        param_norm=(optax.tree.norm(old), one),
        update_norm=(optax.tree.norm(updates), one),
        nonfinite=((~finite).astype(jnp.float32), one),
        loss_scale=(state.loss_scale, one))
    if schedule is not None:
      metrics["lr"] = (jnp.asarray(schedule(state.step), jnp.float32), one)
    return new_state, metrics

  return _under_mesh(train_step, mesh, rules)


def _under_mesh(fn, mesh, rules):
  """``fn`` traced inside ``sharding.activation_sharding(mesh, rules)``."""
  if mesh is None:
    return fn

  def wrapped(*args, **kwargs):
    with shd.activation_sharding(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def make_eval_step(objective, graphdef, *, mesh=None, rules=shd.DEFAULT_RULES):
  """Returns ``eval_step(params, batch, frozen, extras) -> metrics`` (unjitted).

  ``mesh`` and ``rules`` constrain activations as in :func:`make_train_step`.
  """

  def eval_step(params, batch, frozen=None, extras=None):
    model = nnx.merge(graphdef, params)
    _, (_, metrics) = objective(model, batch, jax.random.PRNGKey(0), frozen=frozen,
                                **_extras_kwarg(extras))
    return metrics

  return _under_mesh(eval_step, mesh, rules)


def soft_update(reference, params, *, alpha: float):
  r"""TR-DPO's update of the frozen reference towards the policy.

  .. math:: \theta_{ref} \leftarrow \alpha\,\theta + (1 - \alpha)\,\theta_{ref}

  As TRL's ``SyncRefModelCallback`` (``ref.mul_(1 - alpha).add_(policy,
  alpha=alpha)``), leaf by leaf in the reference's dtype; ``alpha = 1``
  copies the policy exactly.

  Args:
    reference: the frozen reference parameters (a pytree).
    params: the policy's parameters, the same tree.
    alpha: the mixing weight in ``(0, 1]``.

  Returns:
    the new reference parameters.

  References:
    Gorbatovski et al., *Learn Your Reference Model for Real Good
    Alignment*, 2024 (TR-DPO, soft update).
  """
  return jax.tree.map(
      lambda r, p: ((1.0 - alpha) * r + alpha * p.astype(r.dtype)
                    ).astype(r.dtype), reference, params)


def jit_reference_sync(alpha: float, params_shardings):
  """``sync(reference, params) -> reference``: :func:`soft_update` under jit.

  The reference keeps ``params_shardings`` (it is the policy's tree, sharded
  the same way) and is donated: the update happens in place, so no second
  reference copy is ever held.
  """
  return jax.jit(lambda r, p: soft_update(r, p, alpha=alpha),
                 in_shardings=(params_shardings, params_shardings),
                 out_shardings=params_shardings, donate_argnums=(0,))


def jit_train_step(train_step, state_shardings, mesh, frozen_shardings=None,
                   *, rules=shd.DEFAULT_RULES):
  """jit with the state donated and kept in place; ``frozen`` is not donated.

  Activations are constrained on ``mesh`` by ``rules`` unless ``train_step``
  set its own (``make_train_step(mesh=...)``).

  Returns ``step(state, batch, frozen=None) -> (state, metrics)``.
  """
  jitted = jax.jit(
      _under_mesh(train_step, mesh, rules),
      in_shardings=(state_shardings, shd.batch_sharding(mesh), frozen_shardings),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,))
  return lambda state, batch, frozen=None: jitted(state, batch, frozen)
