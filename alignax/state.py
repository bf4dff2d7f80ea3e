"""The one train state shared by every path, and its sharded creation.

Shapes come first (``nnx.eval_shape``), shardings are derived from the
kernels' logical axis names, then ``jax.jit(init, out_shardings=...)`` builds
parameters and optimizer state directly in their shards, so no full copy of
the model ever lands on one device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from alignax import sharding as shd
from alignax.models import ModelConfig, Transformer
from alignax.models import lora
from alignax.models import quant


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: pure nested dict of fp32 arrays (``nnx.to_pure_dict`` layout).
    opt_state: optax state for ``lora.trainable(params)``: all of ``params``,
      or with LoRA adapters only the adapters (and any head), the base
      being frozen.
    rng: uint32 ``[2]`` key, split once per step.
    loss_scale: float32 scalar; 1 unless dynamic loss scaling is on (fp16).
    good_steps: int32 scalar, finite steps since the scale last changed.
    extras: dict of replicated arrays a stateful objective keeps across
      steps (e.g. BCO's running reward mean); empty for the others.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  loss_scale: jax.Array
  good_steps: jax.Array
  extras: Any = flax.struct.field(default_factory=dict)


def build_model_config(model_cfg: Mapping[str, Any], tokenizer) -> ModelConfig:
  """``ModelConfig`` from ``config.model``; vocab 0 = tokenizer's, padded.

  The vocabulary is rounded up to a multiple of 128 (MXU-friendly); a
  configured size smaller than the tokenizer's is an error.
  """
  fields = dict(model_cfg)
  if fields["vocab_size"] == 0:
    fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
  elif fields["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is "
                     f"smaller than the tokenizer's {tokenizer.vocab_size} ids")
  return ModelConfig(**fields)


def apply_lora_config(model_cfg: ModelConfig,
                      lora_cfg: Mapping[str, Any] | None) -> ModelConfig:
  """``model_cfg`` with the adapters of ``config.lora`` (if enabled)."""
  if not lora_cfg or not lora_cfg["enabled"]:
    return model_cfg
  return dataclasses.replace(
      model_cfg, lora_rank=int(lora_cfg["rank"]),
      lora_alpha=float(lora_cfg["alpha"]), lora_rslora=bool(lora_cfg["rslora"]),
      lora_targets=tuple(lora_cfg["targets"]), quant=str(lora_cfg["quant"]),
      lora_dropout=float(lora_cfg.get("dropout", 0.0)))


def build_schedule(opt_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * final_lr_ratio``."""
  warmup = int(opt_cfg["warmup_steps"])
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"config.optimizer.warmup_steps={warmup} must lie in "
                     f"[0, total_steps={total_steps}]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(opt_cfg["lr"]),
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=float(opt_cfg["lr"]) * float(opt_cfg["final_lr_ratio"]))


def build_optimizer(opt_cfg: Mapping[str, Any], total_steps: int, *,
                    frozen=None):
  """AdamW with global-norm clipping; returns ``(optimizer, schedule)``.

  Weight decay skips 1-D parameters (norm scales), as in MaxText and Llama.
  ``frozen(path) -> bool`` (a flattened parameter path) marks parameters
  the optimizer leaves exactly as they are: their updates, weight decay
  included, are zeroed (e.g. ArmoRM's stage 2 trains only its gate; the
  optimizer state keeps the usual layout).
  """
  if opt_cfg["name"] != "adamw":
    raise ValueError(f"config.optimizer.name={opt_cfg['name']!r}: only "
                     "'adamw' is supported")
  schedule = build_schedule(opt_cfg, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  chain = []
  if opt_cfg["grad_clip_norm"]:
    chain.append(optax.clip_by_global_norm(float(opt_cfg["grad_clip_norm"])))
  chain.append(optax.adamw(
      schedule, b1=float(opt_cfg["b1"]), b2=float(opt_cfg["b2"]),
      eps=float(opt_cfg["eps"]), weight_decay=float(opt_cfg["weight_decay"]),
      mask=decay_mask))
  if frozen is not None:  # last, so that weight decay is zeroed too
    chain.append(optax.masked(optax.set_to_zero(), lambda params: (
        traverse_util.path_aware_map(lambda path, _: frozen(path), params))))
  return optax.chain(*chain), schedule


def abstract_model(model_cfg: ModelConfig, build=None):
  """``(graphdef, abstract nnx.State)`` of the model without allocating it.

  ``build(model_cfg, rngs=...)`` makes the module; the default is
  ``Transformer`` (e.g. ``alignax.models.heads.EmbeddingModel`` adds a head).
  """
  build = build or Transformer
  model = nnx.eval_shape(lambda: build(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def init_params(model_cfg: ModelConfig, seed, build=None) -> dict:
  """Fresh parameters as a pure dict (call under jit to place them sharded)."""
  build = build or Transformer
  model = build(model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_opt_state(optimizer, params):
  """Optimizer state of the trainable part of ``params`` (``lora.trainable``)."""
  return optimizer.init(lora.trainable(params))


def fill_missing(restored, fresh):
  """``restored`` params; leaves the checkpoint lacked come from ``fresh``.

  A partial restore (``checkpoint.load_params``) leaves parameters that are
  not in the checkpoint as ``jax.ShapeDtypeStruct``; e.g. the new embedding
  head when an LM checkpoint starts a dual-encoder run. Those keep their
  fresh initialisation (logged); a checkpoint that matched nothing raises.
  """
  is_missing = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  flat, treedef = jax.tree.flatten_with_path(restored, is_leaf=is_missing)
  missing = [jax.tree_util.keystr(p) for p, x in flat if is_missing(x)]
  if len(missing) == len(flat):
    raise ValueError("the checkpoint holds none of the model's parameters")
  if missing:
    logging.warning("parameters not in the checkpoint keep their fresh "
                    "initialisation: %s", ", ".join(missing))
  return jax.tree.map(lambda r, f: f if is_missing(r) else r, restored, fresh,
                      is_leaf=is_missing)


def state_shardings(params_sharding, optimizer, mesh: Mesh, params_shape,
                    extras=None):
  """Shardings of a ``TrainState`` whose params are sharded as given.

  Optimizer moments follow their parameter (``optax.tree_map_params``);
  only trainable parameters have them (``lora.trainable``). Counters, the
  rng and ``extras`` (a tree of arrays or shapes) are replicated.
  """
  rep = shd.replicated(mesh)
  opt_shape = jax.eval_shape(optimizer.init, lora.trainable(params_shape))
  opt_sharding = optax.tree_map_params(
      optimizer, lambda _, s: s, opt_shape, lora.trainable(params_sharding),
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=rep, params=params_sharding, opt_state=opt_sharding,
                    rng=rep, loss_scale=rep, good_steps=rep,
                    extras=jax.tree.map(lambda _: rep, extras or {}))


def create_train_state(model_cfg: ModelConfig, optimizer, mesh: Mesh, rules,
                       *, seed: int, init_loss_scale: float = 1.0, build=None,
                       extras=None):
  """Builds ``(graphdef, state, shardings)`` with every array born sharded.

  ``build`` makes the model module (see :func:`abstract_model`); ``extras``
  is the objective's initial state (``objective.init_extras()``), if any.
  """
  graphdef, abstract = abstract_model(model_cfg, build)
  params_sharding = shd.param_shardings(abstract, mesh, rules)
  params_shape = nnx.to_pure_dict(abstract)
  extras = extras or {}
  shardings = state_shardings(params_sharding, optimizer, mesh, params_shape,
                              extras)

  def init(seed):
    params = init_params(model_cfg, seed, build)
    return TrainState(
        step=jnp.int32(0), params=params,
        opt_state=init_opt_state(optimizer, params),
        rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        loss_scale=jnp.float32(init_loss_scale), good_steps=jnp.int32(0),
        extras=extras)

  state = jax.jit(init, out_shardings=shardings)(seed)
  return graphdef, state, shardings


def abstract_train_state(shardings: TrainState, model_cfg: ModelConfig,
                         optimizer, build=None, extras=None) -> TrainState:
  """``ShapeDtypeStruct`` tree of a ``TrainState`` carrying ``shardings``.

  Orbax restores onto this target, so a checkpoint written on one mesh loads
  directly into the shards of another. ``build`` as in :func:`abstract_model`.
  """
  _, abstract = abstract_model(model_cfg, build)
  params_shape = nnx.to_pure_dict(abstract)
  shapes = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params_shape,
      opt_state=jax.eval_shape(optimizer.init, lora.trainable(params_shape)),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
      loss_scale=jax.ShapeDtypeStruct((), jnp.float32),
      good_steps=jax.ShapeDtypeStruct((), jnp.int32),
      extras=jax.eval_shape(lambda: extras or {}))
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def param_count(params) -> int:
  """Parameters of the model (a QLoRA kernel counts as its float kernel)."""
  return quant.logical_size(params)
