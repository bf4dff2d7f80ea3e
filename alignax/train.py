"""The training loop shared by every path.

``main(config, workdir)`` builds the mesh, tokenizer, sharded state, data
iterator and step; resumes from the workdir's latest checkpoint (state and
data iterator); trains with periodic logging, held-out evaluation and
checkpoints; saves on SIGTERM/SIGINT; and returns the last logged metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignax import checkpoint as ckpt_lib
from alignax import decorrelation
from alignax import defaults
from alignax import init_from
from alignax import metrics as metrics_lib
from alignax import objectives
from alignax import reference
from alignax import retrieval
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.data import pipeline
from alignax.data import records
from alignax.data import shards
from alignax.data import tasks
from alignax.data import tokenizer as tok_lib
from alignax.interop import peft
from alignax.models import lora
from alignax.objectives import multi_reward

# config.data.task -> builder(config, tokenizer, mesh, graphdef) of
# evaluate(params) -> {name: float}, merged into the held-out metrics.
EVALUATORS = {
    "pairs": retrieval.from_config,
    "cafe": retrieval.from_config,
    "ratings": multi_reward.ratings_evaluator,
}


def build_loss_scale(config) -> step_lib.LossScaleConfig:
  return step_lib.LossScaleConfig(dynamic=bool(config.train.loss_scaling))


class Trainer:
  """Holds what the loop needs; tests drive it step by step."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    # An HF directory in checkpoint.init_from brings its model and tokenizer.
    config = peft.run_config(config)  # and a PEFT adapter dir's LoRA + base
    self.config, self.workdir = config, workdir
    self.mesh = shd.make_mesh(config.mesh)
    self.batch_ways = shd.global_batch_size(self.mesh)
    defaults.validate(config, num_devices=self.mesh.size,
                      batch_ways=self.batch_ways)
    self.tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
    self.model_cfg = state_lib.apply_lora_config(
        state_lib.build_model_config(config.model, self.tokenizer), config.lora)
    self.optimizer, self.schedule = state_lib.build_optimizer(
        config.optimizer, config.optimizer.schedule_steps or config.train.steps,
        frozen=objectives.frozen_params(config))
    # None = the plain Transformer; embedding and reward objectives add a head.
    self.build_model = objectives.model_builder(config)
    self.objective = objectives.build_objective(config, mesh=self.mesh)
    # A stateful objective (BCO's running reward mean) keeps it in the state.
    self.extras = getattr(self.objective, "init_extras", dict)()
    self.graphdef, self.state, self.shardings = state_lib.create_train_state(
        self.model_cfg, self.optimizer, self.mesh, config.sharding_rules,
        seed=config.seed,
        init_loss_scale=2.0**15 if config.train.loss_scaling else 1.0,
        build=self.build_model, extras=self.extras)
    train_step = step_lib.make_train_step(
        self.objective, self.graphdef, self.optimizer, self.schedule,
        microbatches=config.train.microbatches, mesh=self.mesh,
        loss_scale=build_loss_scale(config), rules=config.sharding_rules)
    self.frozen = None  # set by restore_or_init when config.reference='frozen'
    # lora.save_base=False: checkpoints hold the trainable part only.
    self.save_base = not (config.lora.enabled and not config.lora.save_base)
    frozen_shardings = self.shardings.params if config.reference == "frozen" else None
    self.train_step = step_lib.jit_train_step(train_step, self.shardings, self.mesh,
                                              frozen_shardings)
    # TR-DPO: every ref_model_sync_steps steps the reference moves towards
    # the policy (check_values allows it with reference='frozen' only).
    self.sync_reference = None
    self.steps_done = 0  # optimizer steps of the state (state.step, on host)
    if config.preference.get("sync_ref_model", False):
      self.sync_reference = step_lib.jit_reference_sync(
          float(config.preference.ref_model_mixup_alpha), frozen_shardings)
      self.sync_every = int(config.preference.ref_model_sync_steps)
    self.eval_step = jax.jit(step_lib.make_eval_step(
        self.objective, self.graphdef, mesh=self.mesh,
        rules=config.sharding_rules))
    self.local_batch = config.train.batch_size // jax.process_count()
    self.data_iter = self._make_train_iter()
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint.save_every, keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
        # Shard-keyed data states resume under another process count.
        merge_data_states=(shards.merge_states if config.data.num_shards
                           else None))
    self._eval_batches = None
    self._evaluator = None  # EVALUATORS[config.data.task], built on first use

  def _make_train_iter(self):
    c = self.config
    ds = tasks.task(c.data.task)[0](
        c.data, self.tokenizer, split="train", seed=c.seed,
        seq_len=c.train.seq_len, batch_size=self.local_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    # Malformed records skipped under data.skip_malformed, by reason.
    self.data_skipped = records.skip_metrics(ds)
    return pipeline.make_iterator(ds)

  def eval_batches(self):
    if self._eval_batches is None:
      c = self.config
      self._eval_batches = list(tasks.task(c.data.task)[1](
          c.data, self.tokenizer, seq_len=c.train.seq_len,
          batch_size=self.local_batch, num_batches=c.train.eval_batches,
          process_index=jax.process_index(), process_count=jax.process_count()))
    return self._eval_batches

  def _init_from(self, path: str) -> None:
    """Replaces the fresh parameters by ``path``'s (new optimizer state).

    ``path`` is an alignax run, step or import directory, or a Hugging Face
    model directory (``init_from.load_init_params``).
    """
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        self.state.params, self.shardings.params)
    params = init_from.load_init_params(
        path, target, mesh=self.mesh, rules=self.config.sharding_rules,
        fresh=self.state.params)
    opt_state = jax.jit(lambda p: state_lib.init_opt_state(self.optimizer, p),
                        out_shardings=self.shardings.opt_state)(params)
    self.state = self.state.replace(params=params, opt_state=opt_state)

  def restore_or_init(self) -> int:
    """Resumes from the latest checkpoint in the workdir; returns its step.

    Without one, starts from ``config.checkpoint.init_from`` if set. The
    frozen reference is the *starting* parameters, also on resume; under
    TR-DPO (``preference.sync_ref_model``) it changes, is checkpointed and
    comes back from the checkpoint.
    """
    if self.config.checkpoint.init_from:
      self._init_from(self.config.checkpoint.init_from)
    if self.config.reference == "frozen":
      self.frozen = jax.tree.map(jnp.copy, self.state.params)  # never donated
    latest = self.checkpointer.latest_step()
    self.steps_done = latest or 0
    if latest is None:
      return 0
    target = state_lib.abstract_train_state(self.shardings, self.model_cfg,
                                            self.optimizer, self.build_model,
                                            self.extras)
    self.state = self._restore_state(latest, target)
    if self.sync_reference is not None:
      synced = self.checkpointer.restore_reference(latest, target.params)
      if synced is None:  # saved by a run without TR-DPO: still the start
        logging.warning("step %d has no saved reference: the reference "
                        "restarts from the starting parameters", latest)
      else:
        self.frozen = synced
    logging.info("resumed from step %d", latest)
    return latest

  def _restore_state(self, step: int, target):
    """The state saved at ``step``; adapters-only checkpoints
    (``lora.save_base=False``) land on the base loaded from init_from."""
    if self.save_base:
      return self.checkpointer.restore(step, target, self.data_iter)
    recorded = ckpt_lib.read_lora_base(self.checkpointer.directory)
    wanted = os.path.abspath(self.config.checkpoint.init_from)
    if recorded is not None and recorded != wanted:
      raise ValueError(
          f"{self.checkpointer.directory} holds LoRA adapters trained on "
          f"{recorded!r}, but config.checkpoint.init_from={wanted!r}")
    restored = self.checkpointer.restore(
        step, target.replace(params=lora.trainable(target.params)),
        self.data_iter)
    frozen = lora.split_trainable(self.state.params)[1]
    return restored.replace(params=lora.merge_trainable(restored.params, frozen))

  def checkpoint_state(self):
    """What a checkpoint holds: the state, or with ``lora.save_base=False``
    the state less the frozen base (it is reloaded from init_from)."""
    if self.save_base:
      return self.state
    return self.state.replace(params=lora.trainable(self.state.params))

  def evaluate(self) -> dict[str, float]:
    acc = metrics_lib.MetricsAccumulator()
    for batch in self.eval_batches():
      acc.add(self.eval_step(self.state.params, shd.host_to_global(batch, self.mesh),
                             self.frozen, self.state.extras))
    out = acc.result()
    if "loss" in out and objectives.spec(self.config.objective).token_loss:
      out["perplexity"] = float(np.exp(out["loss"]))
    task = self.config.data.task
    if task in EVALUATORS:
      if self._evaluator is None:
        self._evaluator = EVALUATORS[task](self.config, self.tokenizer,
                                           self.mesh, self.graphdef)
      out.update(self._evaluator(self.state.params))
    return out

  def step(self, batch):
    self.state, m = self.train_step(self.state, shd.host_to_global(batch, self.mesh),
                                    self.frozen)
    self.steps_done += 1
    if (self.sync_reference is not None
        and self.steps_done % self.sync_every == 0):
      # TRL's SyncRefModelCallback.on_step_end: after step k * tau.
      self.frozen = self.sync_reference(self.frozen, self.state.params)
    return m

  def saved_reference(self):
    """The reference a checkpoint must hold (TR-DPO changes it), or None."""
    return self.frozen if self.sync_reference is not None else None


def describe(trainer: Trainer) -> str:
  """Devices, mesh, parameter count and per-device state memory."""
  state_bytes = sum(x.addressable_shards[0].data.nbytes
                    for x in jax.tree.leaves(trainer.state))
  n_params = state_lib.param_count(trainer.state.params)
  c = trainer.config.train
  state_line = (f"state per device (params + optimizer): "
                f"{state_bytes / 2**20:.1f} MiB")
  if trainer.frozen is not None:  # the reference copy, a second argument
    frozen_bytes = sum(x.addressable_shards[0].data.nbytes
                       for x in jax.tree.leaves(trainer.frozen))
    state_line += f" + frozen reference {frozen_bytes / 2**20:.1f} MiB"
  trainable = state_lib.param_count(lora.trainable(trainer.state.params))
  if trainable != n_params:  # LoRA: adapters (and heads) only
    state_line += f"; {trainable:,} trainable params (LoRA)"
  return "\n".join([
      f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.process_count()} process(es))",
      f"mesh: {dict(trainer.mesh.shape)}",
      f"params: {n_params:,} ({trainer.model_cfg.num_params():,} by formula)",
      state_line,
      f"batch: {c.batch_size} x {c.seq_len} tokens, "
      f"{c.microbatches} microbatch(es); {trainer.local_batch} rows per process",
  ])


CONFIG_FILE = "config.json"


class NonFiniteStepError(FloatingPointError):
  """A step whose update was dropped as non-finite, with ``on_nonfinite='stop'``."""


def _check_finite(pending, on_nonfinite: str) -> None:
  """Raises on the first non-finite step when the config says to stop."""
  for step, m in pending:
    if float(m["nonfinite"][0]) and on_nonfinite == "stop":
      loss, count = (float(x) for x in m["loss"])
      raise NonFiniteStepError(
          f"step {step}: non-finite loss, gradients or update (loss sum="
          f"{loss}, count={count}, grad_norm={float(m['grad_norm'][0])}); the "
          "update was dropped. Set config.train.on_nonfinite='skip' to step "
          "over such batches.")


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir``; returns the last logged metrics."""
  return run(config, workdir)[1]


def run(config: ml_collections.ConfigDict, workdir: str):
  """Trains; returns ``(trainer, last logged metrics)``.

  Values no run can use are rejected before anything is built or written.
  With ``config.preference.cache_reference`` the reference log-probs are
  computed (or found) first (:func:`alignax.reference.prepare`). On any
  error the checkpoint being written is finished before the error goes on,
  and a non-finite stop names the step that really is on disk.
  """
  defaults.check_values(config)
  config = reference.prepare(config, workdir)
  config = decorrelation.prepare(config, workdir)  # reward_gate: ArmoRM's lambdas
  trainer = Trainer(config, workdir)
  try:
    last = _train(trainer, workdir)
  except NonFiniteStepError as e:
    trainer.checkpointer.close()  # the save in flight lands first
    on_disk = trainer.checkpointer.latest_step()
    where = (f"the last checkpoint on disk is step {on_disk}"
             if on_disk is not None else "no checkpoint is on disk yet")
    raise NonFiniteStepError(f"{e} {where[0].upper()}{where[1:]}.") from None
  finally:
    trainer.checkpointer.close()  # idempotent: waits for the async save
  return trainer, last


def _train(trainer: Trainer, workdir: str) -> dict[str, float]:
  """The loop: steps, logging, evaluation and checkpoints."""
  start = trainer.restore_or_init()
  is_main = jax.process_index() == 0
  ckpt_lib.write_model_config(workdir, trainer.model_cfg)  # for export tools
  if not trainer.save_base:  # where the frozen base comes from
    ckpt_lib.write_lora_base(workdir, trainer.config.checkpoint.init_from)
  if is_main:
    # The resolved config, reusable: --config=configs/from_json.py:W/config.json
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(trainer.config.to_json_best_effort(indent=2, sort_keys=True))
    print(describe(trainer), flush=True)
    if start:
      print(f"resumed from step {start} "
            f"({os.path.join(trainer.checkpointer.directory, str(start))})",
            flush=True)
  # Steps past the checkpoint (logged before a crash) are logged again now.
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                     resume_step=start,
                                     wandb_cfg=trainer.config.get("wandb"),
                                     config=trainer.config.to_dict())
  try:
    return _steps(trainer, writer, start)
  finally:
    writer.close()


def _steps(trainer: Trainer, writer, start: int) -> dict[str, float]:
  c = trainer.config.train
  is_main = jax.process_index() == 0
  flops_per_token = trainer.model_cfg.flops_per_token(c.seq_len)
  if trainer.frozen is not None or trainer.config.reference == "base":
    # The frozen reference runs one more forward pass per token: forward is
    # a third of the forward + backward FLOPs that flops_per_token counts.
    flops_per_token = flops_per_token * 4 / 3
  peak = metrics_lib.device_peak_flops()
  console = metrics_lib.Console(total=c.steps, initial=start, enabled=is_main,
                                progress_bar=c.progress_bar)
  acc, pending, last = metrics_lib.MetricsAccumulator(), [], {}
  tokens, t0, wall0 = 0.0, time.perf_counter(), time.perf_counter()
  total_tokens, evals = 0.0, []
  if start == 0 and c.eval_every:
    # The untrained model's held-out metrics: the baseline learning is judged by.
    scalars = metrics_lib.prefixed("eval", trainer.evaluate())
    writer.write(0, scalars)
    console.log(0, scalars)
    evals.append((0, scalars))
  profiler = metrics_lib.StepProfiler(
      trainer.workdir, start=c.get("profile_start", 0),
      steps=c.get("profile_steps", 0),
      enabled=is_main)
  with ckpt_lib.PreemptionGuard() as guard, contextlib.closing(profiler):
    for step in range(start + 1, c.steps + 1):
      profiler.before(step)
      batch = next(trainer.data_iter)
      row_tokens = float(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
      tokens += row_tokens
      total_tokens += row_tokens
      pending.append((step, trainer.step(batch)))
      if profiler.after(step, trainer.state):
        console.print(f"profiled steps {c.profile_start}-{step} into "
                      f"{profiler.directory}")
      preempted = guard.requested.is_set() or trainer.checkpointer.reached_preemption(step)
      boundary = step % c.log_every == 0 or step == c.steps
      saving = trainer.checkpointer.should_save(step) or step == c.steps or preempted
      if step == start + 1 and not boundary:
        # tokens/s leaves the first step out: it includes the compilation.
        jax.block_until_ready(trainer.state.step)
        console.print(f"first step (compilation included): "
                      f"{time.perf_counter() - t0:.1f} s")
        tokens, t0 = 0.0, time.perf_counter()
      if boundary or saving:
        pending = jax.device_get(pending)
        # Overflow steps are routine under dynamic loss scaling: skip them.
        _check_finite(pending, "skip" if c.loss_scaling else c.on_nonfinite)
        for _, m in pending:
          acc.add(m)
        pending = []
      if boundary:
        elapsed = time.perf_counter() - t0
        scalars = metrics_lib.prefixed("train", acc.result())
        scalars.update(metrics_lib.prefixed("train", metrics_lib.throughput(
            tokens, elapsed, flops_per_token, jax.device_count(), peak)))
        if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
          evaluated = metrics_lib.prefixed("eval", trainer.evaluate())
          scalars.update(evaluated)
          evals.append((step, evaluated))
        scalars.update(trainer.data_skipped)
        writer.write(step, scalars)
        console.log(step, scalars)
        last = dict(scalars, step=step)
        acc, tokens, t0 = metrics_lib.MetricsAccumulator(), 0.0, time.perf_counter()
      if saving:
        trainer.checkpointer.save(step, trainer.checkpoint_state(),
                                  trainer.data_iter,
                                  force=True,
                                  reference=trainer.saved_reference())
      console.step()
      if preempted:
        logging.warning("stopping at step %d after a preemption request", step)
        break
  console.close()
  console.print(_summary(trainer, last, evals, total_tokens,
                         time.perf_counter() - wall0))
  return last


def _summary(trainer, last, evals, tokens, seconds) -> str:
  """The run's last line: steps, tokens, wall time, evals, checkpoint."""
  lines = [f"done: step {last.get('step', '?')} of "
           f"{trainer.config.train.steps}, {tokens:,.0f} tokens in "
           f"{seconds:.1f} s this run; checkpoints in "
           f"{trainer.checkpointer.directory}"]
  losses = [(s, m["eval/loss"]) for s, m in evals if "eval/loss" in m]
  if losses:
    best = min(losses, key=lambda x: x[1])
    lines.append(f"eval/loss: last {losses[-1][1]:.4f} (step {losses[-1][0]})"
                 f", best {best[1]:.4f} (step {best[0]})")
  return "\n".join(lines)
