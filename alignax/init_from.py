"""A model's parameters on a mesh: fresh, from an alignax checkpoint, or HF.

Every entry point that needs parameters goes through :func:`load_init_params`
(or :func:`model_params`, which also builds the model's graph): the trainer's
``checkpoint.init_from``, the reference-cache preparation, the retrieval
evaluator and hard-negative mining, on-policy sampling and the reward-model
scorer. ``source`` is

* ``""``: the seed's fresh initialisation;
* an alignax run, its ``checkpoints/`` directory, a step directory, or a
  ``python -m alignax.interop.hf import`` directory (partial restore);
* a local Hugging Face model directory (``config.json`` + ``*.safetensors``),
  streamed tensor by tensor onto the mesh; ids reserved past the
  checkpoint's vocabulary grow it (mean-initialised rows);
* a PEFT LoRA adapter directory: its HF base (``base_model_name_or_path``),
  then its adapters (``alignax.interop.peft``).

Parameters the source lacks (a new embedding or reward head on an LM
checkpoint) keep their fresh initialisation (logged); a source that holds
none of the model's parameters is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax import traverse_util

from alignax import checkpoint as ckpt_lib
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.interop import hf
from alignax.interop import peft
from alignax.models import ModelConfig
from alignax.models import quant


def abstract_params(abstract, mesh, rules):
  """``ShapeDtypeStruct`` tree of a model's params, carrying their shardings.

  Args:
    abstract: the model's abstract ``nnx.State`` (``state.abstract_model``).
    mesh: the device mesh.
    rules: logical-axis rules (``config.sharding_rules``).
  """
  shardings = shd.param_shardings(abstract, mesh, rules)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nnx.to_pure_dict(abstract), shardings)


def load_init_params(source: str, target, *, mesh, rules,
                     fresh: Callable[[], Any] | Any = None):
  """Parameters shaped and sharded like ``target``, read from ``source``.

  Args:
    source: ``""``, an alignax checkpoint path or an HF directory (see the
      module docstring).
    target: ``ShapeDtypeStruct`` tree with shardings (:func:`abstract_params`).
    mesh: the mesh ``target``'s shardings live on.
    rules: logical-axis rules, for placing an HF checkpoint's tensors.
    fresh: the fresh parameters, or a function returning them, for
      ``source=""`` and for the leaves the source lacks; called only then.

  Returns:
    the parameters, a pure dict of sharded ``jax.Array``.
  """
  get_fresh = fresh if callable(fresh) else (lambda: fresh)
  if not source:
    return get_fresh()
  if peft.is_peft_dir(source):  # the HF base, then the PEFT adapters
    params = load_init_params(peft.base_dir(source), target, mesh=mesh,
                              rules=rules, fresh=fresh)
    return peft.load_adapters(source, params, target)
  if hf.is_hf_dir(source):
    params = hf.load_params_like(source, target, mesh=mesh, rules=rules)
  else:
    _check_not_quantizing(source, target)
    # An adapters-only LoRA checkpoint (lora.save_base=False) lands on its
    # recorded base, loaded as any init_from source is.
    params = ckpt_lib.load_params(
        source, target, base_loader=lambda base, t: load_init_params(
            base, t, mesh=mesh, rules=rules, fresh=fresh))
  is_missing = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  if not any(is_missing(x) for x in jax.tree.leaves(params,
                                                    is_leaf=is_missing)):
    return params
  return state_lib.fill_missing(params, get_fresh())


def _check_not_quantizing(source, target) -> None:
  """A float alignax checkpoint does not restore into quantized kernels."""
  flat = traverse_util.flatten_dict(target)
  quantized = any(quant.kernel_of_scale(k, flat) for k in flat)
  recorded = ckpt_lib.read_model_config(source) or {}
  if quantized and recorded.get("quant", "none") == "none":
    raise ValueError(
        f"checkpoint.init_from={source!r} holds float kernels and "
        "config.lora.quant quantizes them: start QLoRA from a Hugging Face "
        "directory (quantized on load), or set config.lora.quant='none'")


def model_params(source: str, model_cfg: ModelConfig, mesh, rules, *,
                 seed: int = 0, build=None):
  """``(graphdef, params)`` of ``build(model_cfg)`` from ``source``.

  Fresh parameters are initialised from ``seed`` directly in their shards,
  and only when needed (``source=""`` or leaves the source lacks).
  """
  graphdef, abstract = state_lib.abstract_model(model_cfg, build)
  target = abstract_params(abstract, mesh, rules)
  shardings = jax.tree.map(lambda t: t.sharding, target)

  def fresh():
    return jax.jit(lambda: state_lib.init_params(model_cfg, seed, build),
                   out_shardings=shardings)()

  return graphdef, load_init_params(source, target, mesh=mesh, rules=rules,
                                    fresh=fresh)
