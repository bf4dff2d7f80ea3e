"""Compile a run's train and eval steps for a TPU topology, on any host.

With libtpu installed (``pip install -e '.[tpu]'``) JAX compiles for TPU
chips that are not attached: ``jax.experimental.topologies`` describes a
slice, the mesh is built over its compile-only devices, and the steps are
lowered from the real abstract train state (``state.abstract_train_state``)
and batch shapes, then compiled. Nothing is allocated or trained::

  python launch/tpu_train.py --config=configs/ul2_pod.py --workdir=/tmp/aot \\
      --compile_for=v5p-32 [--compile_slices=2]

writes ``workdir/aot.json`` (per-chip bytes, whether they fit the chip's HBM,
compile seconds, the compiler's FLOPs and step-time estimate, model FLOPs and
the implied MFU), prints one line, and exits non-zero when the step does not
fit, naming the largest buffers. MaxText's ``train_compile`` does the same.

XLA's cost analysis counts the body of a loop once, so the scanned layers
are counted once whatever ``n_layers`` is. The estimate corrects for it
with two more compiles of the same step with 1 and 2 layers *unrolled*:
``c(L) = c(1) + (L - 1) (c(2) - c(1))``; a microbatch loop is counted once
too, so that is multiplied by the microbatches (see :func:`layer_cost`).
XLA's ``optimal_seconds`` is the compiler's idealised estimate of the step
time, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh

from alignax import objectives
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax import train
from alignax.data import packing
from alignax.data import pairs
from alignax.data import preference as preference_data
from alignax.data import preference_packing
from alignax.data import ul2_pipeline
from alignax.interop import hf
from alignax.models import ModelConfig
from alignax.objectives import grpo

GiB = 2**30
# Quiets libtpu's search for TPU hardware and its metadata server, and lets
# several processes (pytest workers) load it at once: nothing runs on a chip.
LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8",
              "TPU_WORKER_HOSTNAMES": "localhost",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: how slices are named and what a chip holds."""
  prefix: str  # libtpu's topology prefix
  cores_per_chip: int  # the -N of a slice name counts TensorCores or chips
  ndim: int  # torus dimensions
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s per chip


CHIPS = {
    "v4": Chip("v4", 2, 3, 32 * GiB, 275e12),
    "v5p": Chip("v5p", 2, 3, 95 * GiB, 459e12),
    "v5e": Chip("v5e", 1, 2, 16 * GiB, 197e12),
    "v5litepod": Chip("v5e", 1, 2, 16 * GiB, 197e12),
    "v6e": Chip("v6e", 1, 2, 32 * GiB, 918e12),
}


def libtpu_available() -> bool:
  """Whether a TPU topology can be described (libtpu importable)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.get_tpu_library_path() is not None


def _torus(chips: int, ndim: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape: ``64 -> 4x4x4``, ``128 -> 4x4x8``, ``16 -> 4x4``.

  Starting from ``2x2x1`` (3-D) or ``1x1``, the last of the smallest
  dimensions doubles until the chips are placed.
  """
  dims = [2, 2, 1] if ndim == 3 and chips >= 4 else [1] * ndim
  if chips & (chips - 1) or chips < math.prod(dims):
    raise ValueError(f"{chips} chips: give the topology as "
                     f"'PREFIX:AxBxC' for sizes that are not powers of two")
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def parse_topology(name: str) -> tuple[Chip, str, int]:
  """``'v5p-128'`` or ``'v5p:4x4x4'`` -> ``(chip, libtpu name, chips)``."""
  match = re.fullmatch(r"(v\w+?)[-:]([\dx]+)", name.strip())
  if not match or match.group(1) not in CHIPS:
    raise ValueError(f"--compile_for={name!r}: expected e.g. v5p-128, "
                     f"v5e-16 or v5p:4x4x4 (generations {sorted(CHIPS)})")
  chip, size = CHIPS[match.group(1)], match.group(2)
  if "x" in size:
    dims = tuple(int(d) for d in size.split("x"))
  else:
    cores = int(size)
    if cores % chip.cores_per_chip:
      raise ValueError(f"{name}: {chip.prefix} slices count "
                       f"{chip.cores_per_chip} cores per chip")
    dims = _torus(cores // chip.cores_per_chip, chip.ndim)
  return chip, f"{chip.prefix}:{'x'.join(map(str, dims))}", math.prod(dims)


def topology_mesh(mesh_cfg: Mapping[str, int], topology: str,
                  slices: int = 1) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh over a topology's compile-only chips.

  ``mesh_cfg`` lays out one slice (over its ICI); with ``slices > 1`` the
  slices add a data-parallel factor over the data-centre network (DCN), as
  MaxText's ``dcn_data_parallelism``, through a hybrid device mesh.
  """
  chip, libtpu_name, _ = parse_topology(topology)
  # v4 and v5p chips have two TensorCores: one JAX device each (megacore).
  kwargs = {"chip_config_name": "megacore"} if chip.cores_per_chip == 2 else {}
  if slices > 1:
    kwargs["num_slices"] = slices
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name=libtpu_name, **kwargs).devices
  return shd.make_mesh(mesh_cfg, devices)  # slices: hybrid, data over DCN


def host_batch(config, rows: int) -> dict[str, np.ndarray]:
  """An all-padding batch of ``config.data.task``'s format, ``rows`` rows."""
  task, seq_len = config.data.task, config.train.seq_len
  if config.objective in ("grpo", "rloo", "disco"):  # a rollout's batch
    return grpo.empty_batch(rows, seq_len, **grpo.batch_keys(config))
  if task == "lm":
    return packing.empty_rows(rows, seq_len)
  if task == "ul2":
    return ul2_pipeline.empty_batch(rows, seq_len)
  if task == "preference":
    layout = preference_data._layout(config.data)  # pylint: disable=protected-access
    return preference_packing.empty_rows(layout, rows, seq_len)
  if task in ("pairs", "cafe"):
    views = (rows, pairs.option(config.data, "num_views"), seq_len)
    out = {"tokens": np.zeros(views, np.int32),
           "segment_ids": np.zeros(views, np.int32)}
    if task == "cafe":
      out.update({pairs.LM_PREFIX + k: v
                  for k, v in packing.empty_rows(rows, seq_len).items()})
    return out
  raise ValueError(f"config.data.task={task!r}: no batch format for AOT")


def abstract_batch(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as shapes sharded like ``sharding.host_to_global``."""
  rows = config.train.batch_size
  sharding = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype,
                                  sharding=sharding)
          for k, v in host_batch(config, 1).items()}


def model_config(config) -> ModelConfig:
  """``config.model`` (with ``config.lora``'s adapters) as a ``ModelConfig``;
  a vocab of 0 needs the tokenizer."""
  fields = dict(config.model)
  if fields["vocab_size"] == 0:
    raise ValueError("config.model.vocab_size=0 takes the tokenizer's size; "
                     "set it (e.g. --config.model.vocab_size=32768) to "
                     "compile without building the tokenizer")
  return state_lib.apply_lora_config(ModelConfig(**fields), config.get("lora"))


@dataclasses.dataclass
class Steps:
  """What a compile needs: jitted steps and their abstract arguments."""
  train: object
  eval: object
  train_args: tuple
  eval_args: tuple


def build_steps(config, model_cfg: ModelConfig, mesh: Mesh) -> Steps:
  """The Trainer's train and eval steps (jitted) over abstract arguments."""
  rules = config.sharding_rules
  optimizer, schedule = state_lib.build_optimizer(
      config.optimizer, config.optimizer.schedule_steps or config.train.steps)
  build = objectives.model_builder(config)
  objective = objectives.build_objective(config, mesh=mesh)
  extras = getattr(objective, "init_extras", dict)()
  graphdef, abstract = state_lib.abstract_model(model_cfg, build)
  params_shape = nnx.to_pure_dict(abstract)
  shardings = state_lib.state_shardings(
      shd.param_shardings(abstract, mesh, rules), optimizer, mesh,
      params_shape, extras)
  state = state_lib.abstract_train_state(shardings, model_cfg, optimizer,
                                         build, extras)
  frozen = frozen_shardings = None
  if config.reference == "frozen":
    frozen, frozen_shardings = state.params, shardings.params
  batch = abstract_batch(config, mesh)
  train_step = step_lib.make_train_step(
      objective, graphdef, optimizer, schedule,
      microbatches=config.train.microbatches, mesh=mesh,
      loss_scale=train.build_loss_scale(config), rules=rules)
  # The arguments of step.jit_train_step's jit, reproduced to call .lower.
  train_jit = jax.jit(
      train_step,
      in_shardings=(shardings, shd.batch_sharding(mesh), frozen_shardings),
      out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
  eval_jit = jax.jit(step_lib.make_eval_step(objective, graphdef, mesh=mesh,
                                             rules=rules))
  return Steps(train_jit, eval_jit, (state, batch, frozen),
               (state.params, batch, frozen, state.extras))


def _memory(compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled step (``total`` counts aliases once)."""
  m = compiled.memory_analysis()
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                  + out["code"])
  return {k: int(v) for k, v in out.items()}


def _cost(compiled) -> dict[str, float]:
  """Per-chip HLO FLOPs and the compiler's seconds (loop bodies once)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)),
          "seconds": float(cost.get("optimal_seconds", float("nan")))}


def _progress(message: str) -> None:
  """Compiles of large models take minutes: say which one is running."""
  print(f"aot: {message}", file=sys.stderr, flush=True)


class DoesNotFit(Exception):
  """The compiler ran out of HBM; ``str`` is its report of the buffers."""


def compile_step(jitted, args):
  """``(compiled, seconds)``; raises :class:`DoesNotFit` on an HBM overflow."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(str(e)) from None
  return compiled, time.perf_counter() - start


def layer_cost(config, model_cfg: ModelConfig, mesh: Mesh,
               scanned: dict[str, float]) -> dict:
  """Per-chip FLOPs and seconds of a train step, every layer counted.

  ``scanned`` is the cost of the real step, whose layer loop XLA counts
  once. Two more compiles, of the same step with 1 and 2 layers unrolled,
  fit ``c(L) = c(1) + (L - 1) (c(2) - c(1))`` (exact: nothing else grows
  with ``L`` but the optimizer's few FLOPs per parameter). A microbatch loop
  is counted once too, so the result is multiplied by the microbatches (the
  optimizer update then counts once per microbatch: a slight overestimate).
  """
  micro = max(int(config.train.microbatches), 1)
  cost = dict(scanned)
  if model_cfg.scan_layers and model_cfg.n_layers > 1:
    costs = []
    for n in (1, 2):
      _progress(f"cost estimate: compiling the step with {n} unrolled "
                f"layer{'s' * (n > 1)}")
      cfg = dataclasses.replace(model_cfg, n_layers=n, scan_layers=False,
                                layer_windows=model_cfg.layer_windows[:n])
      steps = build_steps(config, cfg, mesh)
      costs.append(_cost(compile_step(steps.train, steps.train_args)[0]))
    one, two = costs
    cost = {k: one[k] + (model_cfg.n_layers - 1) * (two[k] - one[k])
            for k in one}
  return {k: micro * v for k, v in cost.items()}


def tokens_per_step(config) -> int:
  """Tokens the model reads in one step (every view of a pair batch)."""
  shapes = host_batch(config, 1)
  tokens = config.train.batch_size * config.train.seq_len
  if config.data.task in ("pairs", "cafe"):
    tokens *= shapes["tokens"].shape[1]
  if config.data.task == "cafe":
    tokens += config.train.batch_size * config.train.seq_len
  return tokens


def model_flops(config, model_cfg: ModelConfig) -> float:
  """Model FLOPs per step (PaLM's ``6N + 12LHDT``), plus the frozen
  reference's forward pass (a third of it) when ``config.reference='frozen'``."""
  per_token = model_cfg.flops_per_token(config.train.seq_len)
  if config.reference == "frozen":
    per_token += per_token / 3
  return float(per_token * tokens_per_step(config))


def _largest_buffers(message: str, limit: int = 8) -> list[str]:
  """The compiler's lines about its largest allocations, if it gave them."""
  lines = [l.strip() for l in message.splitlines()]
  keep = [l for l in lines if re.search(r"Size: |Shape: |Allocation type|"
                                        r"exceed|hbm|HBM", l)]
  return keep[:limit * 3] or lines[:limit]


def compile_for(config, topology: str, *, slices: int = 1,
                layer_cost_estimate: bool = True,
                eval_step: bool = True) -> dict:
  """Compiles ``config``'s steps for ``topology``; returns the report dict.

  ``layer_cost_estimate`` adds the two compiles of :func:`layer_cost`;
  ``eval_step`` the eval step's compile (both on by default).
  """
  config = hf.run_config(config)  # an HF init_from brings the model's shape
  chip, libtpu_name, chips = parse_topology(topology)
  mesh = topology_mesh(config.mesh, topology, slices)
  model_cfg = model_config(config)
  rows = config.train.batch_size
  ways = shd.global_batch_size(mesh)
  if rows % ways:
    raise ValueError(f"config.train.batch_size={rows} must divide by the "
                     f"mesh's data x fsdp = {ways}")
  report = {
      "topology": topology, "libtpu_topology": libtpu_name, "slices": slices,
      "chips": chips * slices, "mesh": dict(mesh.shape),
      "global_batch": rows, "rows_per_chip": rows / ways, "seq_len": config.train.seq_len,
      "microbatches": int(config.train.microbatches),
      "objective": config.objective, "reference": config.reference,
      "params": model_cfg.num_params(), "hbm_bytes": chip.hbm_bytes,
      "peak_flops_per_chip": chip.peak_flops,
  }
  steps = build_steps(config, model_cfg, mesh)
  _progress(f"compiling the train step for {topology} ({report['chips']} "
            f"chips, mesh {report['mesh']})")
  try:
    train_compiled, seconds = compile_step(steps.train, steps.train_args)
  except DoesNotFit as e:
    report.update(fits=False, error=str(e).splitlines()[0][:500],
                  largest_buffers=_largest_buffers(str(e)))
    return report
  _progress(f"train step compiled in {seconds:.0f} s")
  memory = _memory(train_compiled)
  cost = _cost(train_compiled)
  report.update(
      per_chip_bytes=memory, fits=memory["total"] <= chip.hbm_bytes,
      compile_seconds={"train": round(seconds, 2)},
      hlo_flops_per_chip_scan_once=cost["flops"],
      step_seconds_scan_once=cost["seconds"],
      model_flops_per_step=model_flops(config, model_cfg))
  if eval_step:
    _progress("compiling the eval step")
    eval_compiled, eval_seconds = compile_step(steps.eval, steps.eval_args)
    report["eval_per_chip_bytes"] = _memory(eval_compiled)
    report["compile_seconds"]["eval"] = round(eval_seconds, 2)
  if layer_cost_estimate:
    cost = layer_cost(config, model_cfg, mesh, cost)
    report["hlo_flops_per_chip"] = cost["flops"]
    if math.isfinite(cost["seconds"]) and cost["seconds"] > 0:
      report["estimated_step_seconds"] = cost["seconds"]
      report["mfu"] = report["model_flops_per_step"] / (
          cost["seconds"] * report["chips"] * chip.peak_flops)
    else:
      # libtpu's cost model returns negative times for multi-slice steps
      # (seen with 2 x v5p-32): no estimate is better than a wrong one.
      report["step_estimate_error"] = (
          f"the compiler's time estimate is {cost['seconds']:.3g} s; "
          "no step estimate")
  return report


def summary(report: dict) -> str:
  """The one line printed after a compile."""
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  head = (f"aot {report['topology']}"
          f"{' x' + str(report['slices']) if report['slices'] > 1 else ''} "
          f"({report['chips']} chips, {mesh}): {report['global_batch']} x "
          f"{report['seq_len']} tokens, {report['rows_per_chip']:g} rows/chip")
  hbm = report["hbm_bytes"] / GiB
  if "per_chip_bytes" not in report:
    return f"{head}: DOES NOT FIT in {hbm:.1f} GiB HBM: {report['error']}"
  m = {k: v / GiB for k, v in report["per_chip_bytes"].items()}
  line = (f"{head}: {m['total']:.2f} of {hbm:.1f} GiB per chip (args "
          f"{m['argument']:.2f}, temp {m['temp']:.2f}), "
          f"{'fits' if report['fits'] else 'DOES NOT FIT'}")
  if "estimated_step_seconds" in report:
    line += (f"; step ~{report['estimated_step_seconds']:.3f} s (compiler "
             f"estimate), MFU ~{100 * report['mfu']:.0f}%")
  elif "step_estimate_error" in report:
    line += f"; {report['step_estimate_error']}"
  return line + f"; compiled in {report['compile_seconds']['train']:.0f} s"


def main(config, workdir: str, topology: str, *, slices: int = 1) -> int:
  """``--compile_for``: compile, write ``workdir/aot.json``, print a line.

  Returns the process exit code: 0 when the train step fits, 1 otherwise.
  """
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  if not os.environ.get("JAX_PLATFORMS"):
    # The default backend only traces; never probe for attached TPUs.
    jax.config.update("jax_platforms", "cpu")
  if not libtpu_available():
    raise SystemExit("--compile_for needs libtpu: pip install -e '.[tpu]'")
  report = compile_for(config, topology, slices=slices)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "aot.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  print(summary(report) + f" -> {path}", flush=True)
  if not report["fits"]:
    for line in report.get("largest_buffers", []):
      print("  " + line)
    return 1
  return 0
