"""The rollout batch of the online objectives, built on the host.

:mod:`alignax.objectives.grpo` documents the batch (rows in prompt-major
groups of ``G``, ``inputs``/``targets``/``positions``/``segment_ids``,
``weights`` over the completions, ``advantages``, ``rewards``,
``old_logps``, ``ref_logps``); this module fills it from token-id prompts,
sampled completions and their rewards, and computes the sampled tokens'
log-probs by the fused path under jit. :mod:`alignax.rl` runs the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax import losses
from alignax import sharding as shd
from alignax.models import lora
from alignax.objectives import grpo
from alignax.rewards import combine


# --- the rollout batch (host side, NumPy) -------------------------------------


def prompt_order(rollout: int, per_step: int, pool_size: int,
                 seed: int) -> list[int]:
  """Indices into the prompt pool for rollout step ``rollout`` (0-based).

  Prompt ``i = rollout * per_step + j`` of the run is ``perm_e[i mod n]``,
  with ``e = i // n`` the epoch over the ``n`` prompts and ``perm_e`` a
  permutation drawn from ``(seed, e)``: every prompt once per epoch, and a
  pure function of the step (a resumed run continues the same order).
  """
  out = []
  for i in range(rollout * per_step, (rollout + 1) * per_step):
    epoch, k = divmod(i, pool_size)
    out.append(int(np.random.default_rng((seed, epoch)).permutation(
        pool_size)[k]))
  return out


def prompt_ids(tokenizer, text: str, *, room: int, mode: str = "") -> list[int]:
  """``[BOS] + ids`` (or ``[mode] + ids``), keeping the end within ``room``."""
  head = [tokenizer.mode_id(mode)] if mode else [tokenizer.bos_id]
  ids = tokenizer.encode(text)
  keep = room - len(head)
  return head + ids[max(0, len(ids) - keep):]


def token_batch(prompts: Sequence[Sequence[int]],
                completions: Sequence[Sequence[int]], *, seq_len: int,
                stop_tokens: Sequence[int] = (), mask_truncated: bool = False,
                prefix: bool = False, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The token fields of a rollout batch (``alignax.objectives.grpo``).

  Row ``i`` is ``prompts[i // G] + completions[i]`` (``G = len(completions)
  / len(prompts)``, prompt-major groups), the completion cut after its first
  stop token, right-padded to ``seq_len + 1`` tokens and shifted by one.
  ``weights`` is 1 on the completion's targets through the stop token, 0 on
  the prompt, padding and anything after the stop; with ``mask_truncated``
  also 0 on a completion that never stopped (TRL's
  ``mask_truncated_completions``). ``prefix`` marks the prompt tokens as a
  prefix-LM prefix (UL2 modes).

  Returns:
    ``inputs``, ``targets``, ``positions``, ``segment_ids`` (int32) and
    ``weights`` (float32), all ``[B, seq_len]``; ``prefix`` (bool) with
    ``prefix``; host-only ``truncated`` ``[B]`` bool and
    ``completion_lengths`` ``[B]`` (tokens kept, through the stop).
  """
  q, b = len(prompts), len(completions)
  if not q or b % q:
    raise ValueError(f"{b} completions do not make whole groups over {q} "
                     "prompts.")
  g, stops = b // q, set(int(t) for t in stop_tokens)
  rows = np.full((b, seq_len + 1), pad_id, np.int32)
  real = np.zeros((b, seq_len + 1), np.int32)
  weights = np.zeros((b, seq_len), np.float32)
  prompt_lens, truncated = np.zeros(b, np.int64), np.ones(b, bool)
  for i, c in enumerate(completions):
    p, c = list(prompts[i // g]), [int(t) for t in c]
    cut = next((k + 1 for k, t in enumerate(c) if t in stops), None)
    c, truncated[i] = (c, True) if cut is None else (c[:cut], False)
    n = len(p) + len(c)
    if n > seq_len + 1:
      raise ValueError(f"row {i}: prompt {len(p)} + completion {len(c)} "
                       f"tokens exceed seq_len + 1 = {seq_len + 1}.")
    rows[i, :n], real[i, :n], prompt_lens[i] = p + c, 1, len(p)
    if not (mask_truncated and truncated[i]):
      weights[i, len(p) - 1:n - 1] = 1.0  # targets rows[len(p):n]
  batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
           "positions": np.tile(np.arange(seq_len, dtype=np.int32), (b, 1)),
           "segment_ids": real[:, :-1], "weights": weights,
           "truncated": truncated,
           "completion_lengths": real.sum(-1) - prompt_lens}
  if prefix:
    batch["prefix"] = np.arange(seq_len)[None] < prompt_lens[:, None]
  return batch


def combined_rewards(rewards, weights, *, num_generations: int,
                     combine_as: str = "sum"):
  """``(scalar [B], gdpo advantages [B] or None)`` of ``rewards [B, K]``."""
  rewards = np.asarray(rewards, np.float64)
  grouped = rewards.reshape(-1, num_generations, rewards.shape[-1])
  scalar = combine.weighted_sum(grouped, weights).reshape(-1)
  if combine_as == "gdpo":
    return scalar, combine.gdpo_advantages(grouped, weights).reshape(-1)
  if combine_as != "sum":
    raise ValueError(f"config.grpo.reward_combine={combine_as!r}: use 'sum' "
                     "or 'gdpo'")
  return scalar, None


def advantages(objective: str, scalar, *, num_generations: int,
               scale_rewards: str = "group", normalize: bool = False,
               gdpo=None, kl_rows=None, beta: float = 0.0) -> np.ndarray:
  """``[B]`` advantages of the objective from the combined rewards.

  GRPO: :func:`alignax.losses.group_advantages` (or GDPO's, given);
  RLOO: :func:`~alignax.losses.rloo_advantages` of ``scalar - beta *
  kl_rows`` (the per-row KL of :func:`~alignax.losses.kl_penalized_rewards`
  when ``beta > 0``); DisCO reads the rewards instead (zeros).
  """
  scalar = jnp.asarray(scalar, jnp.float32)
  if objective == "grpo":
    if gdpo is not None:
      return np.asarray(gdpo, np.float32)
    return np.asarray(losses.group_advantages(
        scalar, num_generations=num_generations, scale_rewards=scale_rewards))
  if objective == "rloo":
    if beta:
      scalar = scalar - beta * jnp.asarray(kl_rows, jnp.float32)
    return np.asarray(losses.rloo_advantages(
        scalar, num_generations=num_generations, normalize=normalize))
  return np.zeros(scalar.shape, np.float32)


# --- log-probs of the sampled tokens, fused, under jit ------------------------


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "temperature", "chunk_size", "adapters", "mesh", "rules"))
@shd.with_activation_sharding
def token_logps(graphdef, params, batch, *, temperature: float,
                chunk_size: int = 0, adapters: bool = True, mesh=None,
                rules=shd.DEFAULT_RULES):
  """``[B, T]`` log-probs of ``batch['targets']`` at ``temperature``
  (:func:`alignax.objectives.grpo.sampled_token_logps`); ``adapters=False``
  is the LoRA base (``config.reference='base'``)."""
  del mesh, rules  # the decorator's activation sharding
  model = nnx.merge(graphdef, params)
  if not adapters:
    model = lora.without_adapters(model)
  return grpo.sampled_token_logps(model, batch, temperature=temperature,
                                  chunk_size=chunk_size)


HOST_ONLY = ("truncated", "completion_lengths", "kl")


def model_fields(batch):
  """The batch the step reads (drops host-only fields)."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY}


def local_rows(batch):
  """This process's rows of a batch every process built whole."""
  n = jax.process_count()
  if n == 1:
    return batch
  i = jax.process_index()
  return {k: np.split(v, n)[i] for k, v in batch.items()}


def place(batch, mesh) -> dict:
  """The model fields of a host batch (every process built all rows) as
  global arrays sharded over the batch axes."""
  return shd.host_to_global(
      local_rows(model_fields(batch)), mesh)


def host_value(x) -> np.ndarray:
  """A global array's value on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- rollout statistics -------------------------------------------------------


@dataclasses.dataclass
class Rollout:
  """What one rollout step produced, on the host."""
  batch: dict  # the rollout batch (NumPy, global rows)
  rewards: np.ndarray  # [B, K] raw rewards
  scalar: np.ndarray  # [B] combined reward
  seconds: dict  # generate / score / logps


def rollout_metrics(r: Rollout, names: Sequence[str],
                    num_generations: int) -> dict[str, tuple]:
  """``{name: (sum, count)}`` of one rollout (prefixed ``rollout/``)."""
  b, one = r.batch, 1.0
  rows = float(len(r.scalar))
  grouped = r.scalar.reshape(-1, num_generations)
  out = {"reward": (r.scalar.sum(), rows), "reward_std": (r.scalar.std(), one),
         "frac_reward_zero_std": (float(np.sum(grouped.std(-1) == 0)),
                                  float(len(grouped))),
         "completions/mean_length": (float(b["completion_lengths"].sum()),
                                     rows),
         "completions/truncated": (float(b["truncated"].sum()), rows)}
  if "kl" in b:  # RLOO: the sequence KL folded into the rewards
    out["kl"] = (float(b["kl"].sum()), rows)
  for i, name in enumerate(names):
    out[f"reward/{name}"] = (r.rewards[:, i].sum(), rows)
    out[f"reward/{name}_std"] = (r.rewards[:, i].std(), one)
  return out


class Clock:
  """Seconds and tokens of the rollouts since the last log line."""

  def __init__(self):
    self.seconds = dict.fromkeys(("generate", "score", "logps", "train"), 0.0)
    self.generated = self.trained = 0.0
    self.rollouts = 0

  def add(self, r: Rollout, train_seconds: float, iterations: int):
    for k, v in r.seconds.items():
      self.seconds[k] += v
    self.seconds["train"] += train_seconds
    self.generated += float(r.batch["completion_lengths"].sum())
    self.trained += float(np.sum(r.batch["segment_ids"] > 0)) * iterations
    self.rollouts += 1

  def result(self) -> dict[str, float]:
    s, n = self.seconds, max(self.rollouts, 1)
    total = max(sum(s.values()), 1e-9)
    out = {f"time/{k}_s": v / n for k, v in s.items()}
    out.update({f"time/{k}_fraction": v / total for k, v in s.items()})
    out["rollout/tokens_per_s"] = self.generated / max(s["generate"], 1e-9)
    out["train/tokens_per_s"] = self.trained / max(s["train"], 1e-9)
    return out
