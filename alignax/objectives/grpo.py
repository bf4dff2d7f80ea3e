"""Online policy-gradient objectives on rollout batches: GRPO, RLOO, DisCO.

Every objective has the shared signature
``objective(model, batch, rng, *, frozen) -> (loss_sum, (count, metrics))``
(see :mod:`alignax.objectives.lm`); the losses are
:func:`alignax.losses.grpo_loss`, :func:`~alignax.losses.rloo_loss` and
:func:`~alignax.losses.disco_loss`. The policy's per-token log-probs of the
sampled tokens go through the fused LM-head path
(:func:`alignax.policy.model_token_logps`): no ``[B, T, V]`` logits, in the
forward or the backward pass.

**The rollout batch** (what a rollout fills; ``B`` rows, ``T`` tokens, all
``[B, T]`` unless said). One row per sampled completion, rows in
prompt-major groups of ``G = grpo.num_generations`` (rows ``q*G .. q*G+G-1``
answer prompt ``q``, TRL's order), every row a real sample:

* ``inputs``, ``targets``: int32 token ids; ``targets[:, t]`` is the token
  after ``inputs[:, t]`` (the prompt + completion row shifted by one, as in
  the LM batches). The left-padded prompts of :mod:`alignax.generate` and
  their samples fit as they come: ``row = concat(prompt, completion)``,
  ``inputs = row[:, :-1]``, ``targets = row[:, 1:]``.
* ``positions`` int32 (RoPE positions, from 0 at each row's first real
  token), ``segment_ids`` int32 (1 on real tokens, 0 on padding, which is
  never attended).
* ``weights``: float32 completion mask over ``targets``: 1 where the target
  is a sampled completion token (through its stop token), 0 on prompt,
  padding and after the stop (TRL's ``completion_mask``; 0 also masks a
  truncated completion out).
* ``prefix`` (optional): bool, True on a prefix-LM (UL2 ``[S2S]``) prompt
  read bidirectionally, as :func:`alignax.generate.generate_prefix_lm_padded`
  sampled it; absent = causal.
* ``advantages``: ``[B]`` float32 (GRPO:
  :func:`alignax.losses.group_advantages`; RLOO:
  :func:`~alignax.losses.rloo_advantages`, on rewards with the KL folded in
  by :func:`~alignax.losses.kl_penalized_rewards`). Unused by DisCO.
* ``rewards``: ``[B]`` float32; DisCO's binary labels (1 correct, 0 not),
  a metric for the others.
* ``old_logps`` (optional): float32 log-probs of ``targets`` under the
  policy that sampled them, at the sampling temperature (kept across the
  ``num_iterations`` updates of one rollout). Absent = on-policy: the
  current log-probs under ``stop_gradient``, as TRL does when
  ``num_iterations == 1``.
* ``ref_logps`` (GRPO with ``beta > 0`` and ``config.reference='none'``):
  float32 reference log-probs precomputed by the rollout. With
  ``config.reference`` ``'frozen'`` (the starting parameters, passed to the
  step) or ``'base'`` (the policy with its LoRA adapters off) they are
  computed here instead.

Log-probs are taken at ``grpo.temperature`` (``log softmax(z / tau)``, the
distribution that was sampled), as TRL does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax import losses
from alignax import policy
from alignax.losses._policy_gradient import DISCO_SCORES  # noqa: F401
from alignax.losses._policy_gradient import GRPO_LOSS_TYPES  # noqa: F401
from alignax.losses._policy_gradient import IMPORTANCE_SAMPLING_LEVELS  # noqa: F401
from alignax.losses._policy_gradient import SCALE_REWARDS  # noqa: F401
from alignax.models import lora
from alignax.objectives import common

Array = jax.Array
mean_of = common.mean_of


def sampled_token_logps(model, batch, *, temperature: float = 1.0,
                        chunk_size: int = 0) -> Array:
  """``[B, T]`` log-probs of ``batch['targets']`` at ``temperature``.

  Dividing the final hidden states by the temperature divides the logits
  (the LM head is linear); a soft-capped head is not, so that case refuses.
  """
  hidden = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"], prefix=batch.get("prefix"),
                 return_hidden=True)  # [B, T, D]
  if temperature != 1.0:
    if model.cfg.final_logit_softcap:
      raise ValueError("log-probs at a temperature != 1 under a final-logit "
                       "soft-cap are not supported (set grpo.temperature=1)")
    hidden = hidden / jnp.asarray(temperature, hidden.dtype)
  return policy.model_token_logps(model, hidden, batch["targets"],
                                  chunk_size=chunk_size)


def reference_token_logps(model, batch, frozen, *, reference: str,
                          temperature: float = 1.0, chunk_size: int = 0):
  """``[B, T]`` reference log-probs: live (``'frozen'``, ``'base'``) or the
  batch's ``ref_logps`` (``'batch'``); no gradient."""
  if reference == "batch":
    return batch["ref_logps"].astype(jnp.float32)
  if reference == "base":
    ref_model = lora.without_adapters(model)
  elif reference == "frozen":
    if frozen is None:
      raise ValueError("reference='frozen' but the step got no frozen "
                       "parameters (config.reference must be 'frozen').")
    ref_model = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(frozen))
  else:
    raise ValueError(f"reference={reference!r}: use 'frozen', 'base' or "
                     "'batch'")
  return jax.lax.stop_gradient(sampled_token_logps(
      ref_model, batch, temperature=temperature, chunk_size=chunk_size))


def _policy_logps(model, batch, temperature, chunk_size):
  """``(logps, old_logps, mask)``, each ``[B, T]`` float32."""
  logps = sampled_token_logps(model, batch, temperature=temperature,
                              chunk_size=chunk_size)
  old = batch.get("old_logps")
  old = jax.lax.stop_gradient(logps) if old is None else old.astype(
      jnp.float32)
  return logps, old, batch["weights"].astype(jnp.float32)


def _rollout_metrics(batch, mask):
  rows = jnp.ones(mask.shape[:1], bool)
  out = {"completions/mean_length": mean_of(jnp.sum(mask, -1), rows)}
  if "rewards" in batch:
    out["reward"] = mean_of(batch["rewards"], rows)
  return out


@dataclasses.dataclass(frozen=True)
class GRPOHparams:
  """The keywords of :func:`alignax.losses.grpo_loss` (TRL's names)."""
  loss_type: str = "dapo"
  epsilon_low: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.0
  importance_sampling_level: str = "token"
  max_completion_length: int | None = None
  delta: float | None = None
  sapo_temperature_pos: float = 1.0
  sapo_temperature_neg: float = 1.05


def _clip_metrics(logps, old, adv, mask, h: GRPOHparams):
  """TRL's clip fractions, means over the completion tokens."""
  coef = jnp.exp(losses.log_importance_weights(
      logps, old, mask, level=h.importance_sampling_level))
  coef = jnp.broadcast_to(coef, mask.shape)
  adv = adv[:, None]
  where = mask > 0
  high = h.epsilon_low if h.epsilon_high is None else h.epsilon_high
  if h.loss_type == "cispo":
    return {"cispo_clip_ratio": mean_of((coef > high) & (adv > 0), where)}
  if h.loss_type == "sapo":
    return {}
  low = (coef < 1 - h.epsilon_low) & (adv < 0)
  up = (coef > 1 + high) & (adv > 0)
  return {"clip_ratio/low_mean": mean_of(low, where),
          "clip_ratio/high_mean": mean_of(up, where),
          "clip_ratio/region_mean": mean_of(low | up, where)}


def grpo_objective(model, batch, rng, *, frozen=None, hparams: GRPOHparams,
                   reference: str = "none", temperature: float = 1.0,
                   chunk_size: int = 0):
  """The GRPO family (``hparams.loss_type``) on a rollout batch.

  ``(loss_sum, count)`` are TRL's reductions as sums (see
  :func:`alignax.losses.grpo_loss`): the step divides the sums of both over
  microbatches and hosts, so DAPO/CISPO normalise by the tokens of the whole
  batch, GRPO/SAPO/Dr. GRPO average over its rows, and bnpo normalises each
  (micro)batch by its own tokens (TRL's per-local-batch normalisation).
  ``reference``: ``'none'`` (``beta = 0``), ``'frozen'``, ``'base'`` or
  ``'batch'``.
  """
  del rng
  logps, old, mask = _policy_logps(model, batch, temperature, chunk_size)
  h = hparams
  ref = None
  if h.beta:
    ref = reference_token_logps(model, batch, frozen, reference=reference,
                                temperature=temperature, chunk_size=chunk_size)
  adv = batch["advantages"].astype(jnp.float32)
  sums, counts = losses.grpo_loss(logps, old, ref, adv, mask,
                                  **dataclasses.asdict(h))
  if h.loss_type == "bnpo":  # this batch's token mean, counted per row
    sums = sums * sums.shape[0] / jnp.maximum(jnp.sum(counts), 1.0)
    counts = jnp.ones_like(counts)
  metrics = {**_rollout_metrics(batch, mask),
             **_clip_metrics(logps, old, adv, mask, h)}
  if h.beta:
    metrics["kl"] = mean_of(losses.k3_kl(logps, ref), mask > 0)
  loss_sum, count = jnp.sum(sums), jnp.sum(counts)
  return loss_sum, (count, {"loss": (loss_sum, count), **metrics})


def rloo_objective(model, batch, rng, *, frozen=None, epsilon_low=0.2,
                   epsilon_high=None, temperature=1.0, chunk_size=0):
  """RLOO: the clipped sequence ratio, mean over the rows (TRL)."""
  del rng, frozen  # RLOO's KL is in the rewards (the rollout folds it in)
  logps, old, mask = _policy_logps(model, batch, temperature, chunk_size)
  per_row = losses.rloo_loss(logps, old, batch["advantages"], mask,
                             epsilon_low=epsilon_low,
                             epsilon_high=epsilon_high)
  rows = jnp.ones(per_row.shape, bool)
  return common.reduce(per_row, rows, _rollout_metrics(batch, mask))


def disco_objective(model, batch, rng, *, frozen=None, num_generations,
                    score="log_l", tau=0.0, beta=1e3, delta=1e-4,
                    temperature=1.0, chunk_size=0):
  """DisCO: one loss per prompt (group of ``num_generations`` rows).

  The KL penalty is of the (micro)batch's KL to the sampling policy; run
  it on whole batches (``train.microbatches=1``) for the paper's loss.
  """
  del rng, frozen  # the constraint is to pi_old, not to a reference
  logps, old, mask = _policy_logps(model, batch, temperature, chunk_size)
  rewards = batch["rewards"].astype(jnp.float32)
  per_prompt = losses.disco_loss(logps, old, mask, rewards,
                                 num_generations=num_generations, score=score,
                                 tau=tau, beta=beta, delta=delta)
  groups = (rewards > 0.5).reshape(-1, num_generations)
  mixed = jnp.any(groups, -1) & ~jnp.all(groups, -1)
  one = jnp.float32(1.0)
  metrics = {
      **_rollout_metrics(batch, mask),
      "kl": (jax.lax.stop_gradient(losses.old_policy_kl(logps, old, mask)),
             one),
      "disco/mixed_groups": mean_of(mixed, jnp.ones_like(mixed)),
  }
  return common.reduce(per_prompt, jnp.ones_like(mixed), metrics)


def empty_batch(rows: int, seq_len: int, *, old_logps: bool = False,
                ref_logps: bool = False) -> dict:
  """An all-padding rollout batch (the format above) of ``rows`` rows:
  the shapes ``--compile_for`` compiles the step for."""
  tokens = np.zeros((rows, seq_len), np.int32)
  out = {"inputs": tokens, "targets": tokens, "positions": tokens,
         "segment_ids": tokens, "weights": np.zeros((rows, seq_len),
                                                     np.float32),
         "advantages": np.zeros((rows,), np.float32),
         "rewards": np.zeros((rows,), np.float32)}
  for name, wanted in (("old_logps", old_logps), ("ref_logps", ref_logps)):
    if wanted:
      out[name] = np.zeros((rows, seq_len), np.float32)
  return out


def batch_keys(config) -> dict:
  """Which optional rollout arrays ``config`` needs: ``old_logps`` (more
  than one update per rollout) and ``ref_logps`` (a precomputed reference)."""
  return {"old_logps": config.grpo.num_iterations > 1,
          "ref_logps": (config.objective == "grpo"
                        and _reference(config) == "batch")}


# --- from_config: config.objective -> objective -------------------------------


def _reference(config) -> str:
  if not config.grpo.beta:
    return "none"
  return config.reference if config.reference in ("frozen", "base") else (
      "batch")


def grpo_hparams(g) -> GRPOHparams:
  """``config.grpo`` -> :class:`GRPOHparams`."""
  return GRPOHparams(
      loss_type=g.loss_type, epsilon_low=g.epsilon,
      epsilon_high=g.epsilon_high, beta=g.beta,
      importance_sampling_level=g.importance_sampling_level,
      max_completion_length=g.max_completion_length, delta=g.delta,
      sapo_temperature_pos=g.sapo_temperature_pos,
      sapo_temperature_neg=g.sapo_temperature_neg)


def grpo_from_config(config, *, mesh=None):
  """GRPO family: ``config.grpo`` (TRL ``GRPOConfig`` names)."""
  del mesh
  g = config.grpo
  return functools.partial(
      grpo_objective, hparams=grpo_hparams(g), reference=_reference(config),
      temperature=g.temperature, chunk_size=g.logps_chunk)


def rloo_from_config(config, *, mesh=None):
  del mesh
  g = config.grpo
  return functools.partial(
      rloo_objective, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high,
      temperature=g.temperature, chunk_size=g.logps_chunk)


def disco_from_config(config, *, mesh=None):
  del mesh
  g, d = config.grpo, config.grpo.disco
  return functools.partial(
      disco_objective, num_generations=g.num_generations, score=d.score,
      tau=d.tau, beta=d.beta, delta=d.delta, temperature=g.temperature,
      chunk_size=g.logps_chunk)
