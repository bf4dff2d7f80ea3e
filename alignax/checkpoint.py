"""Orbax checkpoints of the train state *and* the grain iterator, preemption.

Each step directory holds ``state/`` (the ``TrainState`` pytree, written by
every process for its own shards), ``data/`` (one JSON iterator state per
process, grain's own handler) and, when training updates it (TR-DPO),
``reference/`` (the frozen reference parameters, sharded like ``state``).
Orbax writes into a temporary directory and renames it when complete, so an
interrupted save never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp

from alignax.models import lora


class Checkpointer:
  """Save every ``save_every`` steps keeping ``keep``; restore the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int,
               async_save: bool = True, merge_data_states=None):
    """``merge_data_states(states) -> state``: how the data-iterator states
    of the processes that wrote a checkpoint become one, so that a run with
    another process count resumes it (``alignax.data.shards.merge_states``
    for ``config.data.num_shards``); None = each process reads its own."""
    if save_every <= 0:
      raise ValueError(f"config.checkpoint.save_every={save_every} must be > 0")
    if keep <= 0:
      raise ValueError(f"config.checkpoint.keep={keep} must be > 0")
    self.save_every = save_every
    self._merge_data_states = merge_data_states
    self._closed = False
    self._mngr = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1,
            enable_async_checkpointing=async_save, create=True))

  @property
  def directory(self):
    return self._mngr.directory

  def latest_step(self) -> int | None:
    """The newest finished step (read from disk once the manager is closed)."""
    if self._closed:
      steps = ocp.utils.checkpoint_steps(self.directory)
      return max(steps) if steps else None
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, data_iter=None, *, force: bool = False,
           reference=None) -> bool:
    """Saves (asynchronously) unless ``step`` is off-schedule and not forced.

    ``reference``: parameters saved beside the state (a reference model
    that training changes); see :meth:`restore_reference`.
    """
    if not (force or self.should_save(step)):
      return False
    if step in self._mngr.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if reference is not None:
      items["reference"] = ocp.args.StandardSave(reference)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores onto ``abstract_state``'s shardings (any mesh) and the iterator.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` carrying the
    *target* shardings, so a checkpoint saved on one mesh shape loads straight
    into the shards of another.
    """
    try:
      return self._restore(step, abstract_state, data_iter)
    except ValueError as e:
      if abstract_state.extras or "extras" not in str(e):
        raise
    # Written before TrainState had ``extras``; an objective without state
    # has nothing to restore there.
    fields = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state) if f.name != "extras"}
    return abstract_state.replace(
        **self._restore(step, fields, data_iter), extras={})

  def restore_reference(self, step: int, abstract_params):
    """The ``reference`` saved at ``step`` onto ``abstract_params``'
    shardings, or None when that step has none."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "reference")):
      return None
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        reference=ocp.args.StandardRestore(abstract_params)))
    return restored["reference"]

  def _restore(self, step, target, data_iter):
    items = {"state": ocp.args.StandardRestore(target)}
    data_dir = os.path.join(self.directory, str(step), "data")
    own = os.path.join(data_dir, f"process_{jax.process_index()}-of-"
                       f"{jax.process_count()}.json")
    merged = data_iter is not None and not os.path.exists(own)
    if data_iter is not None and not merged:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if merged:
      self._restore_merged_data(data_dir, data_iter)
    return restored["state"]

  def _restore_merged_data(self, data_dir, data_iter):
    """Sets ``data_iter`` from every writer process's state, merged."""
    files = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
    if not files:
      raise FileNotFoundError(f"{data_dir}: no data-iterator state")
    writers = int(files[0].rsplit("-of-", 1)[1].removesuffix(".json"))
    if self._merge_data_states is None:
      raise ValueError(
          f"{data_dir} was written by {writers} process(es), this run has "
          f"{jax.process_count()}: set config.data.num_shards (the same in "
          "both runs) to resume with another process count")
    states = []
    for f in files:
      with open(f) as fh:
        states.append(json.load(fh))
    data_iter.set_state(self._merge_data_states(states))
    if hasattr(data_iter, "start_prefetch"):
      data_iter.start_prefetch()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the TPU preemption notice reached the job."""
    return jax.process_count() > 1 and self._mngr.reached_preemption(step)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Finishes the save in flight, then closes; a second call does nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self._mngr.wait_until_finished()
    finally:
      self._mngr.close()


def _resolve(path: str) -> tuple[str, int]:
  """``(manager directory, step)`` for a workdir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  steps = ocp.utils.checkpoint_steps(path) if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint found at {path!r} (expected a "
                            "workdir, its checkpoints/ dir, or a step dir)")
  return path, max(steps)


MODEL_CONFIG_FILE = "model_config.json"


def write_model_config(workdir: str, cfg) -> None:
  """Records a run's ``ModelConfig`` next to its checkpoints (process 0).

  Tools that read a checkpoint without the run's config (the HF export, a
  grown vocabulary) take the exact shapes from here.
  """
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2)


def read_model_config(path: str) -> dict | None:
  """The fields :func:`write_model_config` recorded for the run of ``path``
  (a workdir, its checkpoints/ dir or a step dir), or None."""
  directory, _ = _resolve(path)
  file = os.path.join(os.path.dirname(directory), MODEL_CONFIG_FILE)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)


def load_params(path: str, abstract_params, *, base_loader=None):
  """Only the parameters of a checkpoint, placed on ``abstract_params``' shardings.

  Starts a new run (another objective, optimizer or mesh) from a trained
  model, e.g. DPO from the UL2 demo. ``path`` may be a workdir, its
  ``checkpoints/`` directory or one step directory (the latest step is used).

  A LoRA run with ``lora.save_base=False`` saved only its trainable
  parameters (adapters, heads) and named its base (:func:`read_lora_base`):
  ``base_loader(base, abstract_params)`` loads that base, and the saved
  parameters replace its trainable part.
  """
  base = read_lora_base(path)
  if base is None:
    return _restore_params(path, abstract_params)
  if base_loader is None or not lora.has_adapters(abstract_params):
    raise ValueError(
        f"{path} holds only LoRA adapters and heads (lora.save_base=False, "
        f"base {base!r}): load it into a model with its config.lora")
  trained = _restore_params(path, lora.trainable(abstract_params))
  frozen = lora.split_trainable(base_loader(base, abstract_params))[1]
  return lora.merge_trainable(trained, frozen)


def _restore_params(path: str, abstract_params):
  directory, step = _resolve(path)
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)
  with ocp.CheckpointManager(directory) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=args))
  logging.info("loaded parameters of %s step %d", directory, step)
  return restored["state"]["params"]


LORA_BASE_FILE = "lora_base.json"


def write_lora_base(workdir: str, source: str) -> None:
  """Records the base of a run whose checkpoints hold only its trainable
  parameters (``lora.save_base=False``): ``source`` is its
  ``checkpoint.init_from`` (an HF directory or an alignax checkpoint)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LORA_BASE_FILE), "w") as f:
      json.dump({"base": os.path.abspath(source)}, f, indent=2)


def read_lora_base(path: str) -> str | None:
  """The base :func:`write_lora_base` recorded for the run of ``path``, or
  None (its checkpoints hold every parameter)."""
  directory, _ = _resolve(path)
  file = os.path.join(os.path.dirname(directory), LORA_BASE_FILE)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)["base"]


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

  The loop then saves a checkpoint and exits cleanly; a second signal falls
  back to the default handler (so a stuck job can still be killed).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = threading.Event()
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint after this step", signum)
    self.requested.set()
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    return False
