"""The training loop shared by every path.

``main(config, workdir)`` builds the mesh, tokenizer, sharded state, data
iterator and step; resumes from the workdir's latest checkpoint (state and
data iterator); trains with periodic logging, held-out evaluation and
checkpoints; saves on SIGTERM/SIGINT; and returns the last logged metrics.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from alignax import checkpoint as ckpt_lib
from alignax import defaults
from alignax import metrics as metrics_lib
from alignax import retrieval
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.data import pairs
from alignax.data import pipeline
from alignax.data import preference as preference_data
from alignax.data import tokenizer as tok_lib
from alignax.data import ul2_pipeline
from alignax.interop import hf
from alignax.models import ModelConfig
from alignax.objectives import binary
from alignax.objectives import contrastive
from alignax.objectives import lm
from alignax.objectives import preference
from alignax.objectives import reward
from alignax.objectives import ul2 as ul2_objective

# config.objective -> from_config(config) returning
# objective(model, batch, rng, *, frozen) -> (loss_sum, (loss_count, metrics)).
OBJECTIVES = {
    "lm": lm.from_config,
    "contrastive": contrastive.from_config,
    "cafe": contrastive.cafe_from_config,
    "dpo": preference.dpo_from_config,
    "lipo": preference.lipo_from_config,
    "kto": preference.kto_from_config,
    "modpo": preference.modpo_from_config,
    "orpo": preference.orpo_from_config,
    "simpo": preference.simpo_from_config,
    "cpo": preference.cpo_from_config,
    "reward_model": reward.from_config,
    "bco": binary.bco_from_config,
    "npo": binary.npo_from_config,
    "ul2": ul2_objective.from_config,
}

# config.data.task -> (train dataset builder, eval batches builder); both take
# the arguments of pipeline.build_lm_dataset / pipeline.build_eval_batches.
DATA_TASKS = {
    "lm": (pipeline.build_lm_dataset, pipeline.build_eval_batches),
    "pairs": (pairs.build_pairs_dataset, pairs.build_pair_eval_batches),
    "cafe": (pairs.build_cafe_dataset, pairs.build_cafe_eval_batches),
    "preference": (preference_data.build_preference_dataset,
                   preference_data.build_preference_eval_batches),
    "ul2": (ul2_pipeline.build_ul2_dataset,
            ul2_pipeline.build_ul2_eval_batches),
}

# Objectives whose loss is a token cross-entropy (eval/perplexity = exp).
LM_OBJECTIVES = ("lm", "ul2")

# config.data.task -> builder(config, tokenizer, mesh, graphdef) of
# evaluate(params) -> {name: float}, merged into the held-out metrics.
EVALUATORS = {
    "pairs": retrieval.from_config,
    "cafe": retrieval.from_config,
}


def build_objective(config):
  return OBJECTIVES[config.objective](config)


def build_model_config(model_cfg, tokenizer) -> ModelConfig:
  """``ModelConfig`` from ``config.model``; vocab 0 = tokenizer's, padded."""
  fields = dict(model_cfg)
  if fields["vocab_size"] == 0:
    fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
  elif fields["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is "
                     f"smaller than the tokenizer's {tokenizer.vocab_size} ids")
  return ModelConfig(**fields)


def build_loss_scale(config) -> step_lib.LossScaleConfig:
  return step_lib.LossScaleConfig(dynamic=bool(config.train.loss_scaling))


class Trainer:
  """Holds what the loop needs; tests drive it step by step."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    # An HF directory in checkpoint.init_from brings its model and tokenizer.
    config = hf.run_config(config)
    self.config, self.workdir = config, workdir
    self.mesh = shd.make_mesh(config.mesh)
    self.batch_ways = shd.global_batch_size(self.mesh)
    defaults.validate(config, num_devices=self.mesh.size,
                      batch_ways=self.batch_ways)
    self.tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
    self.model_cfg = build_model_config(config.model, self.tokenizer)
    self.optimizer, self.schedule = state_lib.build_optimizer(
        config.optimizer, config.optimizer.schedule_steps or config.train.steps)
    # None = the plain Transformer; embedding and reward objectives add a head.
    self.build_model = (reward.model_builder(config)
                        if config.objective == "reward_model"
                        else contrastive.model_builder(config))
    self.objective = build_objective(config)
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
        loss_scale=build_loss_scale(config))
    self.frozen = None  # set by restore_or_init when config.reference='frozen'
    frozen_shardings = self.shardings.params if config.reference == "frozen" else None
    self.train_step = step_lib.jit_train_step(train_step, self.shardings, self.mesh,
                                              frozen_shardings)
    self.eval_step = jax.jit(step_lib.make_eval_step(self.objective, self.graphdef))
    self.local_batch = config.train.batch_size // jax.process_count()
    self.data_iter = self._make_train_iter()
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint.save_every, keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save)
    self._eval_batches = None
    self._evaluator = None  # EVALUATORS[config.data.task], built on first use

  def _make_train_iter(self):
    c = self.config
    ds = DATA_TASKS[c.data.task][0](
        c.data, self.tokenizer, split="train", seed=c.seed,
        seq_len=c.train.seq_len, batch_size=self.local_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    return pipeline.make_iterator(ds)

  def eval_batches(self):
    if self._eval_batches is None:
      c = self.config
      self._eval_batches = list(DATA_TASKS[c.data.task][1](
          c.data, self.tokenizer, seq_len=c.train.seq_len,
          batch_size=self.local_batch, num_batches=c.train.eval_batches,
          process_index=jax.process_index(), process_count=jax.process_count()))
    return self._eval_batches

  def _init_from(self, path: str) -> None:
    """Replaces the fresh parameters by a checkpoint's (new optimizer state).

    ``path`` is an alignax run, step or import directory, or a Hugging Face
    model directory (streamed onto the mesh by ``interop.hf.load_hf``).
    """
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        self.state.params, self.shardings.params)
    if hf.is_hf_dir(path):
      _, loaded = hf.load_hf(
          path, mesh=self.mesh, rules=self.config.sharding_rules,
          param_dtype=self.model_cfg.param_dtype,
          vocab_size=self.model_cfg.vocab_size)
      params = {k: loaded.get(k, v) for k, v in target.items()}
    else:
      params = ckpt_lib.load_params(path, target)
    # Parameters the checkpoint lacks (a new embedding head) stay fresh.
    params = state_lib.fill_missing(params, self.state.params)
    opt_state = jax.jit(self.optimizer.init,
                        out_shardings=self.shardings.opt_state)(params)
    self.state = self.state.replace(params=params, opt_state=opt_state)

  def restore_or_init(self) -> int:
    """Resumes from the latest checkpoint in the workdir; returns its step.

    Without one, starts from ``config.checkpoint.init_from`` if set. The
    frozen reference is always the *starting* parameters, also on resume.
    """
    if self.config.checkpoint.init_from:
      self._init_from(self.config.checkpoint.init_from)
    if self.config.reference == "frozen":
      self.frozen = jax.tree.map(jnp.copy, self.state.params)  # never donated
    latest = self.checkpointer.latest_step()
    if latest is None:
      return 0
    target = state_lib.abstract_train_state(self.shardings, self.model_cfg,
                                            self.optimizer, self.build_model,
                                            self.extras)
    self.state = self.checkpointer.restore(latest, target, self.data_iter)
    logging.info("resumed from step %d", latest)
    return latest

  def evaluate(self) -> dict[str, float]:
    acc = metrics_lib.MetricsAccumulator()
    for batch in self.eval_batches():
      acc.add(self.eval_step(self.state.params, shd.host_to_global(batch, self.mesh),
                             self.frozen, self.state.extras))
    out = acc.result()
    if "loss" in out and self.config.objective in LM_OBJECTIVES:
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
    return m


def describe(trainer: Trainer) -> str:
  """Devices, mesh, parameter count and per-device state memory."""
  state_bytes = sum(x.addressable_shards[0].data.nbytes
                    for x in jax.tree.leaves(trainer.state))
  n_params = state_lib.param_count(trainer.state.params)
  c = trainer.config.train
  return "\n".join([
      f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.process_count()} process(es))",
      f"mesh: {dict(trainer.mesh.shape)}",
      f"params: {n_params:,} ({trainer.model_cfg.num_params():,} by formula)",
      f"state per device (params + optimizer): {state_bytes / 2**20:.1f} MiB",
      f"batch: {c.batch_size} x {c.seq_len} tokens, "
      f"{c.microbatches} microbatch(es); {trainer.local_batch} rows per process",
  ])


def _check_finite(pending, on_nonfinite: str, last_saved) -> None:
  """Raises on the first non-finite step when the config says to stop."""
  for step, m in pending:
    if float(m["nonfinite"][0]) and on_nonfinite == "stop":
      loss, count = (float(x) for x in m["loss"])
      raise FloatingPointError(
          f"step {step}: non-finite loss or gradients (loss sum={loss}, "
          f"count={count}, grad_norm={float(m['grad_norm'][0])}). The update "
          f"was dropped; the last checkpoint is step {last_saved}. Set "
          "config.train.on_nonfinite='skip' to step over such batches.")


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir``; returns the last logged metrics."""
  return run(config, workdir)[1]


def run(config: ml_collections.ConfigDict, workdir: str):
  """Trains; returns ``(trainer, last logged metrics)``."""
  trainer = Trainer(config, workdir)
  c = config.train
  start = trainer.restore_or_init()
  is_main = jax.process_index() == 0
  ckpt_lib.write_model_config(workdir, trainer.model_cfg)  # for export tools
  if is_main:
    print(describe(trainer), flush=True)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  flops_per_token = trainer.model_cfg.flops_per_token(c.seq_len)
  peak = metrics_lib.device_peak_flops()
  bar = tqdm(total=c.steps, initial=start, disable=not (is_main and c.progress_bar),
             dynamic_ncols=True)
  acc, pending, last = metrics_lib.MetricsAccumulator(), [], {}
  last_saved = start if start else None
  tokens, t0 = 0.0, time.perf_counter()
  if start == 0 and c.eval_every:
    # The untrained model's held-out metrics: the baseline learning is judged by.
    writer.write(0, metrics_lib.prefixed("eval", trainer.evaluate()))
  with ckpt_lib.PreemptionGuard() as guard:
    for step in range(start + 1, c.steps + 1):
      batch = next(trainer.data_iter)
      tokens += float(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
      pending.append((step, trainer.step(batch)))
      preempted = guard.requested.is_set() or trainer.checkpointer.reached_preemption(step)
      boundary = step % c.log_every == 0 or step == c.steps
      saving = trainer.checkpointer.should_save(step) or step == c.steps or preempted
      if boundary or saving:
        pending = jax.device_get(pending)
        # Overflow steps are routine under dynamic loss scaling: skip them.
        _check_finite(pending, "skip" if c.loss_scaling else c.on_nonfinite,
                      last_saved)
        for _, m in pending:
          acc.add(m)
        pending = []
      if boundary:
        elapsed = time.perf_counter() - t0
        scalars = metrics_lib.prefixed("train", acc.result())
        scalars.update(metrics_lib.prefixed("train", metrics_lib.throughput(
            tokens, elapsed, flops_per_token, jax.device_count(), peak)))
        if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
          scalars.update(metrics_lib.prefixed("eval", trainer.evaluate()))
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                        tok_s=f"{scalars['train/tokens_per_s']:.0f}")
        last = dict(scalars, step=step)
        acc, tokens, t0 = metrics_lib.MetricsAccumulator(), 0.0, time.perf_counter()
      if saving:
        trainer.checkpointer.save(step, trainer.state, trainer.data_iter, force=True)
        last_saved = step
      bar.update(1)
      if preempted:
        logging.warning("stopping at step %d after a preemption request", step)
        break
  bar.close()
  trainer.checkpointer.close()
  writer.close()
  return trainer, last
