"""Online RL on one train state: sample, score, step (GRPO, RLOO, DisCO).

Each rollout step, on the one mesh and the one :class:`~alignax.train.Trainer`
state (no weight copy, no second model):

1. takes the next ``grpo.prompts_per_step`` training prompts of the task
   (``grpo.task``: ``code``, the embedded stdlib-function task of
   :mod:`alignax.data.code_task` rewarded by its doctests in the sandbox;
   ``docstring``, the docstring -> name task of :mod:`alignax.onpolicy`;
   ``grace``, :class:`alignax.grace.GraceTask`, which samples, scores and
   evaluates itself through ``rollout(trainer, prompts, rng)`` and
   ``evaluate(trainer)``), in an order fixed by ``config.seed`` so that a
   resumed run sees the same prompts;
2. samples ``G = grpo.num_generations`` completions of each with
   :func:`alignax.generate.generate` from the *current* parameters at
   ``grpo.temperature`` (rows in prompt-major groups);
3. scores them: the task's reward (batched; the code task runs its sandboxes
   concurrently) and, with ``grpo.reward_model``, a trained reward model's
   score (:class:`alignax.onpolicy.RewardModelScorer`); several rewards are
   combined by ``grpo.reward_combine`` (``sum``: the ``grpo.reward_weights``
   weighted sum, then the objective's advantages; ``gdpo``: GDPO's
   per-reward group normalisation, :mod:`alignax.rewards.combine`);
4. builds the rollout batch of :mod:`alignax.objectives.grpo` (its module
   docstring has the format): advantages by :func:`alignax.losses.
   group_advantages` (GRPO) or :func:`~alignax.losses.rloo_advantages` on
   rewards with the KL folded in (RLOO); the sampling policy's log-probs
   (``old_logps``, the fused :func:`~alignax.objectives.grpo.
   sampled_token_logps` under jit, no ``[B, T, V]`` logits) when
   ``grpo.num_iterations > 1`` or RLOO needs them; reference log-probs when
   ``grpo.beta > 0`` and ``config.reference='none'`` (from a copy of the
   starting parameters, computed once per rollout);
5. runs ``grpo.num_iterations`` optimizer steps of the normal jitted train
   step (:mod:`alignax.step`) on that batch.

``train.steps`` counts optimizer steps (a multiple of ``num_iterations``);
checkpoints (state only; the prompt order is a function of the step) are
written at the end of the rollout that reaches a ``checkpoint.save_every``
boundary, so a run resumes at a rollout boundary. ``metrics.jsonl`` (and
TensorBoard) get the objective's metrics (``train/loss``, clip ratios,
``train/kl``, ...), the rollout's (``rollout/reward/<name>``, its std,
completion lengths, truncated fraction), ``rollout/tokens_per_s``
(generated tokens per second of sampling), ``train/tokens_per_s`` and the
time split ``time/{generate,score,logps,train}_s``; every
``train.eval_every`` steps (and at 0 and the end) greedy completions of
``grpo.eval_prompts`` held-out prompts give ``eval/reward``.

Run (the UL2 demo checkpoint first)::

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.rl --config=configs/grpo_demo.py --workdir=/tmp/alignax_grpo
  python -m alignax.rl --config=configs/grpo_demo.py --workdir=/tmp/alignax_rloo \\
      --config.objective=rloo

References:
  Shao et al., 2024, DeepSeekMath (GRPO); Ahmadian et al., 2024, Back to
  Basics (RLOO); Li et al., 2025, DisCO; Liu et al., 2026, GDPO.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignax import checkpoint as ckpt_lib
from alignax import cli
from alignax import defaults
from alignax import generate as gen
from alignax import metrics as metrics_lib
from alignax import onpolicy
from alignax import rollout as rollout_lib
from alignax import train
from alignax.data import code_task
from alignax.data import function_task

OBJECTIVES = ("grpo", "rloo", "disco")
TASK_NAMES = ("code", "function", "docstring", "grace")


def build_task(config):
  """``grpo.task`` -> the task object (prompts, clean, rewards; or its own
  ``rollout`` and ``evaluate``, as GRACE's)."""
  g = config.grpo
  if g.task == "code":
    return code_task.CodeTask(max_workers=g.sandbox_workers or None)
  if g.task == "function":
    return function_task.FunctionTask(max_workers=g.sandbox_workers or None)
  if g.task == "docstring":
    return onpolicy.DocstringTask(config.data.heldout_fraction)
  if g.task == "grace":
    from alignax import grace  # pylint: disable=g-import-not-at-top
    return grace.GraceTask.from_config(config)
  raise ValueError(f"config.grpo.task={g.task!r}: use one of "
                   f"{list(TASK_NAMES)}")


def groups_per_prompt(config) -> int:
  """GRPO groups of ``G`` rows per prompt (GRACE: one per text of a pair)."""
  if config.grpo.task == "grace":
    from alignax import grace  # pylint: disable=g-import-not-at-top
    return grace.groups_per_prompt(config)
  return 1


# --- the trainer: train.Trainer without a data pipeline -----------------------


class RLTrainer(train.Trainer):
  """:class:`alignax.train.Trainer` fed by rollouts instead of a dataset.

  State creation, ``checkpoint.init_from``, LoRA, the frozen reference and
  checkpoints are the Trainer's; checkpoints carry no data-iterator state
  (the prompt order is a function of the step). With ``grpo.beta > 0`` and
  ``config.reference='none'`` the starting parameters are kept for the
  rollout's reference log-probs.
  """

  def __init__(self, config, workdir):
    # GRPO's 'batch' reference and RLOO's KL-in-reward read the start.
    self.keep_start = (bool(config.grpo.beta) and config.reference == "none"
                       and config.objective in ("grpo", "rloo"))
    self.start_params = None
    self._started = False
    super().__init__(config, workdir)

  def _make_train_iter(self):
    self.data_skipped = {}
    return None

  def _init_from(self, path):
    if not self._started:  # once, also when restore_or_init is called again
      super()._init_from(path)
      self._started = True

  def restore_or_init(self) -> int:
    if self.keep_start:
      if self.config.checkpoint.init_from:
        self._init_from(self.config.checkpoint.init_from)
      self.start_params = jax.tree.map(jnp.copy, self.state.params)
    return super().restore_or_init()

  def step(self, batch):
    """One optimizer step on a global (already placed) rollout batch."""
    self.state, m = self.train_step(self.state, batch, self.frozen)
    self.steps_done += 1
    return m

  def reference_logps(self, batch, temperature, chunk):
    """Reference log-probs of the rollout (RLOO's KL, GRPO's 'batch')."""
    rules = tuple(map(tuple, self.config.sharding_rules))
    kw = dict(temperature=temperature, chunk_size=chunk, mesh=self.mesh,
              rules=rules)
    ref = self.config.reference
    if ref == "base":
      return rollout_lib.token_logps(self.graphdef, self.state.params,
                                     batch, adapters=False, **kw)
    params = self.frozen if ref == "frozen" else self.start_params
    return rollout_lib.token_logps(self.graphdef, params, batch, **kw)


# --- one rollout --------------------------------------------------------------


def training_pool(task, config) -> list:
  """The task's training prompts in ``config.seed``'s order, the first
  ``grpo.train_prompts`` of them (0 = all)."""
  return task.prompts("train", config.grpo.get("train_prompts") or
                      sys.maxsize, seed=config.seed)


class Rollouts:
  """Samples, scores and batches rollouts of the trainer's current policy."""

  def __init__(self, trainer: RLTrainer, task):
    c = trainer.config
    self.trainer, self.task, self.g = trainer, task, c.grpo
    self.tok = trainer.tokenizer
    self.room = c.train.seq_len + 1 - self.g.max_completion_length
    self.stops = onpolicy.stop_token_ids(
        self.tok, tuple(getattr(task, "stop_strings", ())),
        trainer.model_cfg.vocab_size)
    self.scorer = (onpolicy.RewardModelScorer(c, self.g.reward_model,
                                              self.tok, trainer.mesh)
                   if self.g.reward_model else None)
    self.names = (c.grpo.task, *(("reward_model",) if self.scorer else ()))
    weights = tuple(self.g.reward_weights) or (1.0,) * len(self.names)
    if len(weights) != len(self.names):
      raise ValueError(f"config.grpo.reward_weights={tuple(weights)} needs "
                       f"one weight per reward {list(self.names)}")
    self.weights = np.asarray(weights, np.float64)
    self.pool = training_pool(task, c)
    if not self.pool:
      raise ValueError(f"config.grpo.task={c.grpo.task!r} has no training "
                       "prompts")
    self.heldout = ([] if hasattr(task, "evaluate") else
                    task.prompts("eval", self.g.eval_prompts, seed=0))
    self.per_step = c.train.batch_size // (self.g.num_generations
                                           * groups_per_prompt(c))

  def _ids(self, prompts):
    return [rollout_lib.prompt_ids(self.tok, p.text, room=self.room,
                                   mode=self.g.prompt_mode) for p in prompts]

  def sample(self, prompts, *, k, temperature, rng):
    """``(ids, completions)``: ``k`` samples of each prompt, prompt-major.

    Prompts are left-padded to ``room`` slots and the cache holds ``room +
    max_completion_length``: one shape, so sampling compiles once per run.
    """
    t, new = self.trainer, self.g.max_completion_length
    ids = self._ids(prompts)
    outs = gen.generate(
        t.graphdef, t.state.params, [x for x in ids for _ in range(k)],
        max_new_tokens=new, rng=rng, temperature=temperature,
        stop_tokens=self.stops, length_buckets=(self.room, self.room + new),
        mesh=t.mesh, rules=t.config.sharding_rules,
        prefix_lm=bool(self.g.prompt_mode))
    return ids, outs

  def text(self, completion) -> str:
    tok = self.tok
    return self.task.clean(tok.decode(
        [x for x in completion if x < tok.vocab_size and x != tok.eos_id]))

  def score(self, prompts, texts, k) -> np.ndarray:
    """``[len(texts), K]`` rewards; ``texts`` are ``k`` per prompt."""
    flat = [p for p in prompts for _ in range(k)]
    if hasattr(self.task, "rewards"):
      out = [np.asarray(self.task.rewards(flat, texts), np.float64)]
    else:
      out = [np.array([self.task.reward(p, x) for p, x in zip(flat, texts)],
                      np.float64)]
    if self.scorer is not None:
      records = [{"prompt": p.text, "responses": list(texts[i * k:(i + 1) * k])}
                 for i, p in enumerate(prompts)]
      out.append(np.concatenate([r["scores"] for r in
                                 self.scorer.rescore(records)]))
    return np.stack(out, -1)

  def __call__(self, rollout: int) -> rollout_lib.Rollout:
    c, g = self.trainer.config, self.g
    order = rollout_lib.prompt_order(rollout, self.per_step, len(self.pool),
                                     c.seed)
    prompts = [self.pool[i] for i in order]
    rng = jax.random.fold_in(jax.random.key(c.seed), rollout)
    t0 = time.perf_counter()
    if hasattr(self.task, "rollout"):  # samples and scores itself (GRACE)
      ids, outs, rewards = self.task.rollout(self.trainer, prompts, rng)
      t1 = t2 = time.perf_counter()  # all of it counted as generate
    else:
      ids, outs = self.sample(prompts, k=g.num_generations,
                              temperature=g.temperature, rng=rng)
      t1 = time.perf_counter()
      rewards = self.score(prompts, [self.text(o) for o in outs],
                           g.num_generations)
      t2 = time.perf_counter()
    batch = rollout_lib.token_batch(
        ids, outs, seq_len=c.train.seq_len, stop_tokens=self.stops,
        mask_truncated=g.mask_truncated_completions,
        prefix=bool(g.prompt_mode))
    batch = self._with_logps_and_advantages(batch, rewards)
    t3 = time.perf_counter()
    seconds = {"generate": t1 - t0, "score": t2 - t1, "logps": t3 - t2}
    return rollout_lib.Rollout(batch, rewards,
                               batch["rewards"].astype(np.float64), seconds)

  def _with_logps_and_advantages(self, batch, rewards):
    c, g, t = self.trainer.config, self.g, self.trainer
    scalar, gdpo = rollout_lib.combined_rewards(
        rewards, self.weights, num_generations=g.num_generations,
        combine_as=g.reward_combine)
    placed = rollout_lib.place(batch, t.mesh)
    if g.num_iterations > 1 or (c.objective == "rloo" and g.beta):
      batch["old_logps"] = rollout_lib.host_value(rollout_lib.token_logps(
          t.graphdef, t.state.params, placed, temperature=g.temperature,
          chunk_size=g.logps_chunk, mesh=t.mesh,
          rules=tuple(map(tuple, c.sharding_rules))))
    ref, kl_rows = None, None
    if g.beta and (c.objective == "rloo" or (
        c.objective == "grpo" and c.reference == "none")):
      ref = rollout_lib.host_value(
          t.reference_logps(placed, g.temperature, g.logps_chunk))
      if c.objective == "grpo":
        batch["ref_logps"] = ref
      else:  # RLOO: the sequence KL of the sampling policy, in the reward
        kl_rows = np.sum((batch["old_logps"] - ref) * batch["weights"], -1)
        batch["kl"] = kl_rows
    batch["advantages"] = rollout_lib.advantages(
        c.objective, scalar, num_generations=g.num_generations,
        scale_rewards=g.scale_rewards, normalize=g.normalize_advantages,
        gdpo=gdpo, kl_rows=kl_rows, beta=g.beta)
    batch["rewards"] = scalar.astype(np.float32)
    return batch

  def evaluate(self) -> dict[str, float]:
    """Greedy completions of the held-out prompts: mean rewards (or the
    task's own ``evaluate(trainer)``)."""
    if hasattr(self.task, "evaluate"):
      return self.task.evaluate(self.trainer)
    if not self.heldout:
      return {}
    _, outs = self.sample(self.heldout, k=1, temperature=0.0,
                          rng=jax.random.key(0))
    rewards = self.score(self.heldout, [self.text(o) for o in outs], 1)
    out = {f"reward/{n}": float(rewards[:, i].mean())
           for i, n in enumerate(self.names)}
    out["reward"] = float((rewards @ self.weights).mean())
    # Exact: all doctests pass (code), the true name (docstring).
    out["solved"] = float(np.mean(rewards[:, 0] >= 1.0))
    out["completions/mean_length"] = float(np.mean([len(o) for o in outs]))
    return out


# --- the loop -----------------------------------------------------------------


def _crossed(before: int, after: int, every: int) -> bool:
  return bool(every) and after // every > before // every


def _console_line(step, total, m) -> str:
  get = lambda k: m.get(k, float("nan"))
  clip = m.get("train/clip_ratio/region_mean",
               m.get("train/cispo_clip_ratio"))
  kl = m.get("train/kl", m.get("rollout/kl"))
  extra = "".join(f", {name} {v:.3g}" for name, v in (("clip", clip),
                                                      ("kl", kl))
                  if v is not None)
  return (f"step {step}/{total}: loss {get('train/loss'):.4g}, reward "
          f"{get('rollout/reward'):.3f} (std {get('rollout/reward_std'):.3f}), "
          f"length {get('rollout/completions/mean_length'):.1f}{extra}; "
          f"{get('rollout/tokens_per_s'):,.0f} sampled tok/s, "
          f"{get('train/tokens_per_s'):,.0f} train tok/s; generate/score/"
          f"logps/train {get('time/generate_s'):.2f}/{get('time/score_s'):.2f}"
          f"/{get('time/logps_s'):.2f}/{get('time/train_s'):.2f} s")


def _eval_line(step, scalars) -> str:
  return f"step {step} eval: " + ", ".join(
      f"{k.removeprefix('eval/')} {v:.4g}" for k, v in scalars.items()
      if k.startswith("eval/"))


def _train(trainer: RLTrainer, task, workdir: str) -> dict[str, float]:
  """Restores or starts, then rollout steps until ``train.steps``."""
  c = trainer.config
  start = trainer.restore_or_init()
  is_main = jax.process_index() == 0
  ckpt_lib.write_model_config(workdir, trainer.model_cfg)
  if not trainer.save_base:
    ckpt_lib.write_lora_base(workdir, c.checkpoint.init_from)
  if is_main:
    with open(os.path.join(workdir, train.CONFIG_FILE), "w") as f:
      f.write(c.to_json_best_effort(indent=2, sort_keys=True))
    print(train.describe(trainer), flush=True)
    if start:
      print(f"resumed from step {start}", flush=True)
  rollouts = Rollouts(trainer, task)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                     resume_step=start,
                                     wandb_cfg=c.get("wandb"),
                                     config=c.to_dict())
  console = metrics_lib.Console(total=c.train.steps, initial=start,
                                enabled=is_main, progress_bar=False)
  try:
    return _rollout_steps(trainer, rollouts, writer, console, start)
  finally:
    writer.close()
    console.close()


def _log(step, acc, roll_acc, clock, evaluated, writer, console, total):
  """Writes and prints one log step; returns its scalars (and ``step``)."""
  scalars = metrics_lib.prefixed("train", acc.result())
  scalars.update(metrics_lib.prefixed("rollout", roll_acc.result()))
  scalars.update(clock.result())
  scalars.update(metrics_lib.prefixed("eval", evaluated))
  writer.write(step, scalars)
  console.print(_console_line(step, total, scalars))
  if evaluated:
    console.print(_eval_line(step, scalars))
  return dict(scalars, step=step)


def _rollout_steps(trainer, rollouts, writer, console, start):
  c, g = trainer.config, trainer.config.grpo
  mu = g.num_iterations
  if start == 0 and c.train.eval_every:  # the starting policy's baseline
    scalars = metrics_lib.prefixed("eval", rollouts.evaluate())
    writer.write(0, scalars)
    console.print(_eval_line(0, scalars))
  acc, roll_acc = metrics_lib.MetricsAccumulator(), (
      metrics_lib.MetricsAccumulator())
  clock, last = rollout_lib.Clock(), {}
  with ckpt_lib.PreemptionGuard() as guard:
    for r in range(start // mu, c.train.steps // mu):
      before = r * mu
      rollout = rollouts(r)
      t0 = time.perf_counter()
      placed = rollout_lib.place(rollout.batch, trainer.mesh)
      pending = [trainer.step(placed) for _ in range(mu)]
      pending = jax.device_get(pending)  # waits for the steps
      clock.add(rollout, time.perf_counter() - t0, mu)
      step = before + mu
      # Overflow steps are routine under dynamic loss scaling (train.py).
      on_nonfinite = "skip" if c.train.loss_scaling else c.train.on_nonfinite
      train._check_finite(  # pylint: disable=protected-access
          list(zip(range(before + 1, step + 1), pending)), on_nonfinite)
      for m in pending:
        acc.add(m)
      roll_acc.add(rollout_lib.rollout_metrics(rollout, rollouts.names,
                                               g.num_generations))
      roll_acc.add({f"{g.task}/{k}": (v, 1.0) for k, v in
                    getattr(rollouts.task, "last_terms", {}).items()})
      preempted = guard.requested.is_set() or (
          trainer.checkpointer.reached_preemption(step))
      final = step == c.train.steps
      if _crossed(before, step, c.train.log_every) or final or preempted:
        evaluate = _crossed(before, step, c.train.eval_every) or (
            final and c.train.eval_every)
        last = _log(step, acc, roll_acc, clock,
                    rollouts.evaluate() if evaluate else {}, writer, console,
                    c.train.steps)
        acc, roll_acc = metrics_lib.MetricsAccumulator(), (
            metrics_lib.MetricsAccumulator())
        clock = rollout_lib.Clock()
      if _crossed(before, step, c.checkpoint.save_every) or final or preempted:
        trainer.checkpointer.save(step, trainer.checkpoint_state(), None,
                                  force=True,
                                  reference=trainer.saved_reference())
      if preempted:
        console.print(f"stopping at step {step} after a preemption request")
        break
  return last


def prepare_config(config, workdir: str):
  """The run's config: ``train.batch_size`` from ``grpo.prompts_per_step``,
  then the checks that no run could pass."""
  del workdir
  c = copy.deepcopy(config)
  g = c.grpo
  if c.objective not in OBJECTIVES:
    raise ValueError(f"config.objective={c.objective!r}: alignax.rl trains "
                     f"one of {list(OBJECTIVES)}")
  if g.prompts_per_step:
    c.train.batch_size = (g.prompts_per_step * g.num_generations
                          * groups_per_prompt(c))
  defaults.check_values(c)
  if c.train.steps % g.num_iterations:
    raise ValueError(f"config.train.steps={c.train.steps} must be a multiple "
                     f"of config.grpo.num_iterations={g.num_iterations} (the "
                     "optimizer steps of one rollout)")
  if g.reward_combine == "gdpo" and c.objective != "grpo":
    raise ValueError(f"config.grpo.reward_combine='gdpo' gives GRPO's "
                     f"advantages; objective {c.objective!r} needs 'sum'")
  return c


def run(config, workdir: str, task=None):
  """Trains (or resumes) online; returns ``(trainer, last logged metrics)``.

  ``task``: an object with ``prompts(split, n, *, seed)``, ``clean(text)``
  and ``rewards(prompts, completions)`` (or ``reward(prompt, completion)``);
  default :func:`build_task` of ``config.grpo.task``.
  """
  config = prepare_config(config, workdir)
  trainer = RLTrainer(config, workdir)
  try:
    last = _train(trainer, task if task is not None else build_task(config),
                  workdir)
  finally:
    trainer.checkpointer.close()
  return trainer, last


def _print_last(config, workdir):
  _, last = run(config, workdir)
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                    for k, v in last.items()
                    if k.startswith(("eval/", "rollout/reward", "step"))}))


if __name__ == "__main__":
  cli.config_command(_print_last, "Where checkpoints and metrics go.")
