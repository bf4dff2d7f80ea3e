"""Objectives: ``config.objective`` -> the objective and the model it trains.

Every objective has the signature
``objective(model, batch, rng, *, frozen) -> (loss_sum, (count, metrics))``
(see :mod:`alignax.objectives.lm`). :data:`OBJECTIVES` is the one registry:
for each name, the builder of the objective from the run config (and the
run's mesh), the builder of its model (``None`` = the plain
``Transformer``), and whether its loss is a token cross-entropy (so that
``eval/perplexity = exp(eval/loss)`` means something).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from alignax.objectives import binary
from alignax.objectives import causal_reward
from alignax.objectives import contrastive
from alignax.objectives import grpo
from alignax.objectives import lm
from alignax.objectives import multi_reward
from alignax.objectives import preference
from alignax.objectives import reward
from alignax.objectives import ul2


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """How ``config.objective`` becomes a step's objective and model.

  Attributes:
    build: ``build(config, *, mesh) -> objective``.
    model: ``model(config) -> build(model_cfg, rngs=...)`` of the module the
      objective trains, or ``None`` for ``alignax.models.Transformer``.
    token_loss: the loss is a mean token cross-entropy.
    frozen: ``frozen(path) -> bool`` of a flattened parameter path: the
      parameters the optimizer leaves as they are (updates and weight decay
      zeroed), or ``None`` = all trained.
  """
  build: Callable[..., Any]
  model: Callable[[Any], Any] | None = None
  token_loss: bool = False
  frozen: Callable[[tuple], bool] | None = None


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "lm": ObjectiveSpec(lm.from_config, token_loss=True),
    "ul2": ObjectiveSpec(ul2.from_config, token_loss=True),
    "contrastive": ObjectiveSpec(contrastive.from_config,
                                 contrastive.embedding_model_builder),
    "cafe": ObjectiveSpec(contrastive.cafe_from_config,
                          contrastive.embedding_model_builder),
    "dpo": ObjectiveSpec(preference.dpo_from_config),
    "lipo": ObjectiveSpec(preference.lipo_from_config),
    "kto": ObjectiveSpec(preference.kto_from_config),
    "modpo": ObjectiveSpec(preference.modpo_from_config),
    "orpo": ObjectiveSpec(preference.orpo_from_config),
    "simpo": ObjectiveSpec(preference.simpo_from_config),
    "cpo": ObjectiveSpec(preference.cpo_from_config),
    "bco": ObjectiveSpec(binary.bco_from_config),
    "npo": ObjectiveSpec(binary.npo_from_config),
    "reward_model": ObjectiveSpec(reward.from_config, reward.model_builder),
    "multi_reward": ObjectiveSpec(multi_reward.multi_reward_from_config,
                                  multi_reward.model_builder,
                                  frozen=multi_reward.stage1_frozen),
    "reward_gate": ObjectiveSpec(multi_reward.reward_gate_from_config,
                                 multi_reward.model_builder,
                                 frozen=multi_reward.stage2_frozen),
    "causal_reward": ObjectiveSpec(causal_reward.from_config,
                                   causal_reward.model_builder),
    "grpo": ObjectiveSpec(grpo.grpo_from_config),
    "rloo": ObjectiveSpec(grpo.rloo_from_config),
    "disco": ObjectiveSpec(grpo.disco_from_config),
}


def spec(name: str) -> ObjectiveSpec:
  """The registry entry of ``config.objective``, or a one-line error."""
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: known objectives are "
                     f"{sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def build_objective(config, *, mesh=None):
  """The objective of ``config.objective`` (``mesh``: the run's mesh)."""
  return spec(config.objective).build(config, mesh=mesh)


def frozen_params(config):
  """``frozen(path) -> bool`` of ``config.objective`` (None = all trained)."""
  return spec(config.objective).frozen


def model_builder(config):
  """``build(model_cfg, rngs=...)`` of the model ``config.objective`` trains,
  or ``None`` for the plain ``Transformer``."""
  model = spec(config.objective).model
  return model(config) if model is not None else None
