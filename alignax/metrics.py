"""Metrics as (sum, count) pairs, throughput/MFU, and the writers.

Steps return ``{name: (sum, count)}``; sums and counts are added over steps,
microbatches and hosts and divided only when written, so averages stay right
however the work was split.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Keys are matched
# against ``device.device_kind`` (lower case, substring).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # Trillium / v6e
    "tpu v6e": 918e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
}


class MetricsAccumulator:
  """Adds ``{name: (sum, count)}`` dicts on the host; ``result()`` averages."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._counts: dict[str, float] = {}

  def add(self, metrics: Mapping[str, tuple]) -> None:
    metrics = jax.device_get(metrics)
    for name, (s, c) in metrics.items():
      self._sums[name] = self._sums.get(name, 0.0) + float(s)
      self._counts[name] = self._counts.get(name, 0.0) + float(c)

  def result(self) -> dict[str, float]:
    return {k: self._sums[k] / self._counts[k] if self._counts[k] else float("nan")
            for k in self._sums}

  def __bool__(self) -> bool:
    return bool(self._sums)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best observed fp32 matmul FLOP/s on the default device (the CPU peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def device_peak_flops(device=None) -> float:
  """Peak FLOP/s of one device: datasheet for accelerators, measured on CPU."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, flops in PEAK_FLOPS.items():
    if key in kind:
      return flops
  if device.platform == "cpu":
    # All forced host "devices" share the same cores: divide the socket's peak.
    return measured_matmul_flops() / jax.local_device_count()
  return float("nan")


def throughput(tokens: float, seconds: float, flops_per_token: float,
               num_devices: int, peak_flops: float) -> dict[str, float]:
  """tokens/s and model FLOPs utilisation (MFU, PaLM appendix B)."""
  tps = tokens / max(seconds, 1e-9)
  return {"tokens_per_s": tps,
          "mfu": tps * flops_per_token / (num_devices * peak_flops)}


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the records of ``path`` past ``last_step``; returns how many.

  A run killed after logging step ``N + k`` resumes from its checkpoint
  ``N`` and logs ``N + 1..`` again: without this each of those steps would
  appear twice. The file is rewritten under a temporary name and renamed,
  so a crash here leaves the old file or the new one, never half of one.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut by a kill mid-write
  if len(keep) == len(lines):
    return 0
  with open(path + ".tmp", "w") as f:
    f.writelines(line if line.endswith("\n") else line + "\n"
                 for line in keep)
  os.replace(path + ".tmp", path)
  return len(lines) - len(keep)


def _wandb_run(workdir: str, wandb_cfg, config, resume_step: int):
  """A Weights & Biases run in ``workdir/wandb`` that resumes with the run.

  The run id is kept in ``workdir/wandb_run_id``, so a resumed training run
  continues the same W&B run (``resume='allow'``). W&B keeps its own step
  counter and drops the history of steps it already holds, so steps logged
  before a crash and logged again after the resume appear once there too.
  """
  import wandb  # pylint: disable=g-import-not-at-top
  id_path = os.path.join(workdir, "wandb_run_id")
  run_id = None
  if resume_step and os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip() or None
  run = wandb.init(
      project=wandb_cfg.project, entity=wandb_cfg.entity or None,
      name=wandb_cfg.name or os.path.basename(os.path.abspath(workdir)),
      tags=list(wandb_cfg.tags) or None, mode=wandb_cfg.mode,
      dir=workdir, id=run_id, resume="allow",
      config=config)
  with open(id_path, "w") as f:
    f.write(run.id)
  return run


class MetricsWriter:
  """Writes one JSON object per log step and TensorBoard scalars (process 0).

  ``resume_step``: the checkpoint step a run resumes from; records and
  TensorBoard events past it (logged before a crash, about to be logged
  again) are dropped, so every step appears once after any number of
  resumes.

  ``wandb_cfg`` (``config.wandb``): with a ``project`` the same scalars also
  go to Weights & Biases (``mode`` online, offline or disabled), with
  ``config`` (a dict) as the run's config.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int = 0, wandb_cfg=None, config=None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      # A run starting at step 0 in a workdir whose earlier run died before
      # its first checkpoint logs every step again: drop them all.
      truncate_jsonl(path, resume_step if resume_step else -1)
      self._jsonl = open(path, "a")
      from tensorboardX import SummaryWriter  # heavy import, process 0 only
      # purge_step hides the events at or past it that an earlier run wrote.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                               purge_step=resume_step + 1 if resume_step
                               else 0)
      if wandb_cfg is not None and wandb_cfg.project:
        self._wandb = _wandb_run(workdir, wandb_cfg, config, resume_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step"},
                      step=int(step))

  def close(self) -> None:
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


class StepProfiler:
  """A jax profiler trace of steps ``start .. start + steps - 1``.

  The trace (XPlane and a Chrome trace) goes to ``workdir/profile``, for
  TensorBoard's profile plugin or Perfetto. Process 0 only; a run resumed
  past ``start`` traces nothing.
  """

  def __init__(self, workdir: str, *, start: int, steps: int,
               enabled: bool = True):
    self.directory = os.path.join(workdir, "profile")
    self._first, self._last = start, start + steps - 1
    self._enabled = enabled and steps > 0
    self._active = False

  def before(self, step: int) -> None:
    if self._enabled and step == self._first:
      import jax  # pylint: disable=g-import-not-at-top
      jax.profiler.start_trace(self.directory)
      self._active = True

  def after(self, step: int, outputs) -> bool:
    """Ends the trace after its last step; True when it did."""
    if self._active and step == self._last:
      self.close(outputs)
      return True
    return False

  def close(self, outputs=None) -> None:
    if self._active:
      import jax  # pylint: disable=g-import-not-at-top
      jax.block_until_ready(outputs)  # the traced steps' work, finished
      jax.profiler.stop_trace()
      self._active = False


def _short(scalars: Mapping[str, float], prefix: str, keys) -> str:
  parts = []
  for key in keys:
    value = scalars.get(f"{prefix}/{key}")
    if value is not None:
      parts.append(f"{key} {value:.4g}")
  return ", ".join(parts)


class Console:
  """What a person reads (process 0): a tqdm bar on a terminal, else lines.

  On a terminal with ``progress_bar`` the bar shows loss and tokens/s; in a
  log file (stdout not a TTY) or without the bar, each log step prints one
  plain line instead of piling up carriage returns. Evaluations, the
  resume and the final summary always print a line.
  """

  TRAIN_KEYS = ("loss", "accuracy", "grad_norm", "lr")
  EVAL_KEYS = ("loss", "perplexity", "accuracy", "rewards/accuracies",
               "retrieval/recall@10")

  def __init__(self, *, total: int, initial: int, enabled: bool,
               progress_bar: bool, stream=None):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._stream = stream or sys.stdout
    self.enabled = enabled
    self.use_bar = enabled and progress_bar and self._stream.isatty()
    self._bar = tqdm(total=total, initial=initial, disable=not self.use_bar,
                     dynamic_ncols=True, file=self._stream)
    self._total = total

  def print(self, line: str) -> None:
    if not self.enabled:
      return
    if self.use_bar:
      self._bar.write(line, file=self._stream)
    else:
      print(line, file=self._stream, flush=True)

  def step(self) -> None:
    self._bar.update(1)

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """A log step: the bar's postfix, or one plain line."""
    if self.use_bar:
      self._bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                            tok_s=f"{scalars['train/tokens_per_s']:.0f}")
    else:
      self.print(f"step {step}/{self._total}: "
                 f"{_short(scalars, 'train', self.TRAIN_KEYS)}, "
                 f"{scalars.get('train/tokens_per_s', 0.0):,.0f} tokens/s")
    if any(k.startswith("eval/") for k in scalars):
      self.print(f"step {step} eval: {_short(scalars, 'eval', self.EVAL_KEYS)}")

  def close(self) -> None:
    self._bar.close()


def prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def read_jsonl(path: str) -> list[dict]:
  """Reads ``metrics.jsonl`` back (for tests, notebooks and plots)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
