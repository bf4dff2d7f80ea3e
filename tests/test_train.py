"""End to end: the loop, resume, restore on another mesh, metrics, errors."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from alignax import checkpoint as ckpt_lib
from alignax import defaults
from alignax import metrics as metrics_lib
from alignax import state as state_lib
from alignax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizer"))


def tiny_config(tok_dir, **train_overrides):
  c = defaults.base_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=32)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=4, batch_size=8, seq_len=32, log_every=2, eval_every=2,
                 eval_batches=2, progress_bar=False)
  c.train.update(train_overrides)
  c.checkpoint.update(save_every=2, keep=3, async_save=True)
  c.optimizer.update(warmup_steps=1, schedule_steps=4)
  return c


def final_params(trainer):
  return jax.device_get(trainer.state.params)


def test_resume_equals_straight_run_and_other_mesh(tok_dir, tmp_path):
  straight, last = train.run(tiny_config(tok_dir), str(tmp_path / "a"))
  assert last["step"] == 4
  # N steps, stop, then resume for N more: bitwise-equal parameters on CPU.
  train.run(tiny_config(tok_dir, steps=2), str(tmp_path / "b"))
  resumed, _ = train.run(tiny_config(tok_dir), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, final_params(straight),
               final_params(resumed))
  # Resume the step-2 checkpoint onto a different mesh shape.
  train.run(tiny_config(tok_dir, steps=2), str(tmp_path / "c"))
  c = tiny_config(tok_dir)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  other, _ = train.run(c, str(tmp_path / "c"))
  kernel = jax.tree.leaves(other.state.params)[0]
  assert kernel.sharding.mesh.shape["tensor"] == 2
  # Another mesh sums in another order; Adam's g/sqrt(v) magnifies that
  # fp32 noise for near-zero gradients (rare embedding rows) to ~1e-4.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-4),
               final_params(straight), final_params(other))


def test_metrics_files_and_learning(tok_dir, tmp_path):
  c = tiny_config(tok_dir, steps=30, log_every=10, eval_every=10)
  c.optimizer.update(lr=1e-2, warmup_steps=5, schedule_steps=0)
  train.run(c, str(tmp_path))
  records = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [0, 10, 20, 30]
  assert records[0]["eval/loss"] > records[-1]["eval/loss"]  # it learned
  records = records[1:]
  for key in ("train/loss", "train/tokens_per_s", "train/mfu", "train/grad_norm",
              "eval/loss", "eval/perplexity", "train/lr"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert 0 < records[-1]["train/mfu"] < 1
  np.testing.assert_allclose(records[-1]["eval/perplexity"],
                             np.exp(records[-1]["eval/loss"]), rtol=1e-6)
  assert records[-1]["eval/loss"] < records[0]["eval/loss"]
  assert os.listdir(tmp_path / "tb")


def test_nonfinite_stop_names_the_step():
  m = {"nonfinite": (1.0, 1.0), "loss": (float("nan"), 3.0),
       "grad_norm": (float("nan"), 1.0)}
  with pytest.raises(FloatingPointError, match="step 7: non-finite.*step 5"):
    train._check_finite([(7, m)], "stop", 5)
  train._check_finite([(7, m)], "skip", 5)  # skipping is allowed


def test_inconsistent_config_fields_are_named(tok_dir):
  c = tiny_config(tok_dir, batch_size=12, microbatches=1)
  with pytest.raises(ValueError, match="batch_size=12"):
    defaults.validate(c, num_devices=8, batch_ways=8)
  c = tiny_config(tok_dir, seq_len=64)
  with pytest.raises(ValueError, match="max_seq_len"):
    defaults.validate(c, num_devices=8, batch_ways=8)
  c = tiny_config(tok_dir, on_nonfinite="ignore")
  with pytest.raises(ValueError, match="on_nonfinite"):
    defaults.validate(c, num_devices=8, batch_ways=8)


def test_launch_rejects_unknown_field(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "tpu_train.py"),
       f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
       f"--workdir={tmp_path}", "--config.train.stepz=3"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr


def test_init_from_and_frozen_reference(tok_dir, tmp_path):
  first, _ = train.run(tiny_config(tok_dir, steps=2), str(tmp_path / "a"))
  c = tiny_config(tok_dir, steps=2)
  c.checkpoint.init_from = str(tmp_path / "a")
  c.reference = "frozen"
  second, _ = train.run(c, str(tmp_path / "b"))
  trained = final_params(first)
  # The reference is the loaded starting point; the policy moved away from it.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.frozen), trained)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), final_params(second), trained)
  assert max(jax.tree.leaves(moved)) > 0
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    c.checkpoint.init_from = str(tmp_path / "missing")
    train.run(c, str(tmp_path / "d"))


def test_sigterm_saves_stops_and_resumes_exactly(tok_dir, tmp_path, monkeypatch):
  """A preemption notice (SIGTERM) mid-run: save that step, stop, resume."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  straight, _ = train.run(tiny_config(tok_dir, save_every=100),
                          str(tmp_path / "a"))
  step = train.Trainer.step
  before = signal.getsignal(signal.SIGTERM)

  def step_then_preempt(self, batch):
    out = step(self, batch)
    if int(self.state.step) == 3:  # the notice arrives during step 3
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(train.Trainer, "step", step_then_preempt)
  c = tiny_config(tok_dir, steps=6)
  c.optimizer.schedule_steps = 4  # the straight run's schedule
  c.checkpoint.save_every = 100  # only the preemption save
  stopped, last = train.run(c, str(tmp_path / "b"))
  assert stopped.checkpointer.latest_step() == 3
  assert int(stopped.state.step) == 3 and last["step"] == 2
  monkeypatch.setattr(train.Trainer, "step", step)
  # The guard put the previous handler back: a later SIGTERM is not swallowed.
  assert signal.getsignal(signal.SIGTERM) is before
  resumed, _ = train.run(tiny_config(tok_dir, save_every=100),
                         str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, final_params(straight),
               final_params(resumed))


def _launch_env():
  """One CPU device per process, as a laptop or one host of a pod has."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def _tiny_flags(tok_dir, workdir):
  return [sys.executable, os.path.join(ROOT, "launch", "tpu_train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
          f"--workdir={workdir}", "--config.model.d_model=32",
          "--config.model.n_layers=2", "--config.model.d_ff=64",
          "--config.model.head_dim=8", "--config.model.max_seq_len=32",
          "--config.tokenizer.vocab_size=512", "--config.tokenizer.num_sentinels=8",
          f"--config.tokenizer.cache_dir={tok_dir}", "--config.train.steps=2",
          "--config.train.batch_size=4", "--config.train.seq_len=32",
          "--config.train.log_every=1", "--config.train.eval_every=2",
          "--config.train.eval_batches=1", "--config.train.progress_bar=False",
          "--config.checkpoint.save_every=2", "--config.optimizer.warmup_steps=1"]


def test_launch_two_processes_with_cpu_collectives(tok_dir, tmp_path):
  """``--multihost``: jax.distributed over 2 processes, gloo collectives."""
  train.run(tiny_config(tok_dir, steps=1), str(tmp_path / "warm"))  # tokenizer
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "mp")
  procs = [subprocess.Popen(
      _tiny_flags(tok_dir, workdir) + [
          "--multihost", f"--coordinator_address=localhost:{port}",
          "--num_processes=2", f"--process_id={i}"],
      env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  printed = outs[0][0]
  assert "devices: 2 x cpu (2 process(es))" in printed
  assert "batch: 4 x 32 tokens, 1 microbatch(es); 2 rows per process" in printed
  assert "params: " in printed and "state per device" in printed
  assert "devices:" not in outs[1][0]  # only process 0 reports
  records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [0, 1, 2]
  assert np.isfinite(records[-1]["train/loss"])
  assert np.isfinite(records[-1]["eval/loss"])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_restores_a_checkpoint_written_before_train_state_extras(tok_dir,
                                                                 tmp_path):
  trainer = train.Trainer(tiny_config(tok_dir), str(tmp_path / "run"))
  st = trainer.state
  old = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)
         if f.name != "extras"}  # the state tree as older versions saved it
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), save_every=1, keep=1,
                             async_save=False)
  ck.save(1, old, trainer.data_iter, force=True)
  ck.wait()
  target = state_lib.abstract_train_state(trainer.shardings, trainer.model_cfg,
                                          trainer.optimizer)
  restored = ck.restore(1, target, trainer.data_iter)
  assert restored.extras == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(st.params))
  # A stateful objective's extras cannot come from such a checkpoint.
  with_extras = target.replace(extras={"bco/mean": jax.ShapeDtypeStruct(
      (), np.float32, sharding=target.step.sharding)})
  with pytest.raises(ValueError, match="extras"):
    ck.restore(1, with_extras, trainer.data_iter)
  ck.close()
