"""End to end: the loop, resume, restore on another mesh, metrics, errors."""

import dataclasses
import json
import os
import shutil
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
  with pytest.raises(FloatingPointError, match="step 7: non-finite"):
    train._check_finite([(7, m)], "stop")
  train._check_finite([(7, m)], "skip")  # skipping is allowed


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


# --- faults (issue 13): NaN never saved, metrics once, one-line errors -----


def _saved_params(workdir, step, trainer):
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        trainer.state.params)
  return ckpt_lib.load_params(os.path.join(workdir, "checkpoints", str(step)),
                              target)


def test_overflowing_lr_never_reaches_a_checkpoint(tok_dir, tmp_path):
  # lr = 1e39 is Inf in float32 (and 0 * Inf = NaN during warmup): finite
  # gradients, non-finite update.
  c = tiny_config(tok_dir, on_nonfinite="skip", log_every=1, eval_every=0)
  c.optimizer.lr = 1e39
  trainer, last = train.run(c, str(tmp_path / "skip"))
  assert last["train/nonfinite"] == 1.0  # every step after warmup dropped
  for step in (2, 4):
    params = _saved_params(str(tmp_path / "skip"), step, trainer)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  c = tiny_config(tok_dir, on_nonfinite="stop", log_every=1, eval_every=0)
  c.optimizer.lr = 1e39
  with pytest.raises(FloatingPointError,
                     match="step 1: non-finite.*No checkpoint is on disk"):
    train.run(c, str(tmp_path / "stop"))
  steps = os.listdir(tmp_path / "stop" / "checkpoints")
  assert not [s for s in steps if "tmp" in s]  # no half-written save


def test_metrics_hold_each_step_once_after_resume(tok_dir, tmp_path):
  workdir = str(tmp_path)
  c = tiny_config(tok_dir, log_every=1, eval_every=0)
  train.run(c, workdir)
  # A kill after step 4 was logged but before its save landed: the resume
  # starts from step 2 and logs steps 3 and 4 again.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  train.run(c, workdir)
  steps = [r["step"] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]
  # A kill before the first checkpoint landed: the rerun starts at step 0
  # and logs every step again, once.
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  train.run(c, workdir)
  steps = [r["step"] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]


def test_truncate_jsonl_keeps_records_up_to_the_step(tmp_path):
  path = str(tmp_path / "m.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)))
    f.write('{"step": 6, "x"')  # cut by a kill mid-write
  assert metrics_lib.truncate_jsonl(path, 3) == 3
  assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [0, 1, 2, 3]
  assert metrics_lib.truncate_jsonl(path, 3) == 0


@pytest.mark.parametrize("field,value,expect", [
    ("optimizer.lr", -1.0, "config.optimizer.lr=-1.0 must be"),
    ("optimizer.lr", float("nan"), "config.optimizer.lr=nan must be"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0 must be in [0, 1)"),
    ("train.log_every", 0, "config.train.log_every=0"),
    ("checkpoint.keep", 0, "config.checkpoint.keep=0"),
    ("data.source", "csv", "config.data.source='csv'"),
    ("model.n_kv_heads", 3, "config.model: ModelConfig.n_kv_heads=3"),
    ("preference.beta", 0.0, "config.preference.beta=0.0"),
])
def test_impossible_values_are_named_before_anything_is_built(
    tok_dir, field, value, expect):
  c = tiny_config(tok_dir)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError) as e:
    defaults.check_values(c)
  assert expect in str(e.value) and "\n" not in str(e.value)


def _launch_recipe(workdir, *overrides, config="demo.py"):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "tpu_train.py"),
       f"--config={os.path.join(ROOT, 'configs', config)}",
       f"--workdir={workdir}", *overrides],
      capture_output=True, text=True, timeout=300)


def test_user_errors_print_one_line_and_exit_2(tmp_path):
  cases = [
      (("--config.train.stepz=3",),
       "--config.train.stepz: no such config field 'stepz'"),
      (("--config.mesh.pipeline=2",),
       "--config.mesh.pipeline: no such config field 'pipeline'"),
      (("--config.optimizer.lr=-1",), "config.optimizer.lr=-1"),
      (("--config.mesh.data=3",), "config.mesh"),
  ]
  for overrides, expect in cases:
    workdir = tmp_path / "w"
    proc = _launch_recipe(workdir, *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("alignax: error: ") and expect in lines[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()  # nothing written before the check
  proc = _launch_recipe(tmp_path / "w", config="no_such_recipe.py")
  assert proc.returncode == 2 and "no_such_recipe" in proc.stderr
  assert "Traceback" not in proc.stderr
  # --debug brings the traceback back.
  proc = _launch_recipe(tmp_path / "w", "--config.optimizer.lr=-1", "--debug")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unwritable_workdir_is_one_line(tmp_path):
  # (A read-only directory would not stop root, who runs CI here.)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _launch_recipe(blocker / "run", "--config.train.steps=1")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines[-1].startswith("alignax: error: Not a directory")
  assert "Traceback" not in proc.stderr


def test_every_default_field_is_documented():
  # python -m alignax.defaults prints these: every field, with its comment.
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield prefix + k
  docs = defaults.field_docs()
  assert {name for name, _, _ in docs} == set(
      flat(defaults.base_config().to_dict()))
  assert all(comment for _, _, comment in docs)


def test_resume_merges_the_data_states_of_another_process_count(tok_dir,
                                                                 tmp_path):
  # With data.num_shards the data state is keyed by shard: a checkpoint
  # whose step-2 state was written by two processes (one shard each)
  # resumes in one process and continues exactly as the straight run.
  def config(steps):
    c = tiny_config(tok_dir, steps=steps, log_every=1, eval_every=0)
    c.data.num_shards = 2
    return c
  straight, _ = train.run(config(4), str(tmp_path / "a"))
  train.run(config(2), str(tmp_path / "b"))
  data = tmp_path / "b" / "checkpoints" / "2" / "data"
  state = json.loads((data / "process_0-of-1.json").read_text())
  assert sorted(state["shards"]) == ["0", "1"]
  for i, shard in enumerate(("0", "1")):
    part = dict(state, shards={shard: state["shards"][shard]})
    (data / f"process_{i}-of-2.json").write_text(json.dumps(part))
  (data / "process_0-of-1.json").unlink()
  resumed, _ = train.run(config(4), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, final_params(straight),
               final_params(resumed))
  # Without shards there is nothing to merge: one line says what to set.
  c = tiny_config(tok_dir, steps=2, log_every=1, eval_every=0)
  train.run(c, str(tmp_path / "c"))
  data = tmp_path / "c" / "checkpoints" / "2" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  with pytest.raises(ValueError, match="written by 2 process.*num_shards"):
    train.run(tiny_config(tok_dir, steps=4, log_every=1, eval_every=0),
              str(tmp_path / "c"))


def test_run_saves_a_reusable_config_and_prints_a_summary(tok_dir, tmp_path,
                                                          capsys):
  import importlib.util  # pylint: disable=g-import-not-at-top
  c = tiny_config(tok_dir, steps=2, log_every=1, eval_every=2)
  c.optimizer.lr = 1e-3
  train.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert "step 2 eval: loss" in out  # eval lines reach the console
  assert "done: step 2 of 2" in out and "best" in out
  spec = importlib.util.spec_from_file_location(
      "from_json", os.path.join(ROOT, "configs", "from_json.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  again = module.get_config(str(tmp_path / train.CONFIG_FILE))
  assert again.optimizer.lr == 1e-3 and again.train.steps == 2
  assert again.to_dict() == c.to_dict()
  # The reloaded config trains (resumes: nothing left to do at step 2).
  _, last = train.run(again, str(tmp_path))
  assert last == {}


def _wandb_history(run_file):
  """``{step: {key: value}}`` from an offline W&B transaction log.

  The log is W&B's LevelDB-style record file: a 7-byte header, then 32 KiB
  blocks of records (crc32 4 bytes, length 2, type 1: full/first/middle/
  last) holding ``wandb_internal_pb2.Record`` protobufs.
  """
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = open(run_file, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, payload, history = 7, 32768, b"", {}
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header
      pos += block - pos % block
      continue
    length = int.from_bytes(data[pos + 4:pos + 6], "little")
    kind = data[pos + 6]
    payload += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # full or last: a whole record
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      payload = b""
      if record.WhichOneof("record_type") == "history":
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                 for i in record.history.item}
        history[int(items.pop("_step"))] = items
  return history


def test_wandb_offline_and_profiler_trace(tok_dir, tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  import glob  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = str(tmp_path)
  c = tiny_config(tok_dir, log_every=1, eval_every=0, profile_start=2,
                  profile_steps=2)
  c.wandb.update(project="alignax-test", mode="offline", tags=("ci",))
  train.run(c, workdir)
  logged = {r["step"]: r for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "metrics.jsonl"))}
  runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  assert len(runs) == 1
  history = _wandb_history(runs[0])
  assert sorted(history) == [1, 2, 3, 4]
  for step, items in history.items():
    assert items["train/loss"] == pytest.approx(logged[step]["train/loss"])
  # A resume continues the same W&B run (its id is kept in the workdir).
  run_id = open(os.path.join(workdir, "wandb_run_id")).read()
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  train.run(c, workdir)
  runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  assert len(runs) == 2 and all(r.endswith(f"run-{run_id}.wandb") for r in runs)
  # The profiler traced steps 2-3 of the first run (the resume starts past
  # them) into workdir/profile, as XPlane and a Chrome trace.
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile",
                                  "*", "*"))
  assert any(t.endswith(".xplane.pb") for t in traces)
  assert any(t.endswith(".trace.json.gz") for t in traces)


def test_two_processes_equal_one_and_resume_across_process_counts(tok_dir,
                                                                  tmp_path):
  """``--multihost`` (jax.distributed over 2 processes, gloo collectives).

  With data.num_shards the global batch does not depend on the process
  count: 2 processes x 1 device train as 1 process x 2 devices (float
  rounding), and a run resumes 2 -> 1 -> 2 processes on the way."""
  train.run(tiny_config(tok_dir, steps=1), str(tmp_path / "warm"))  # tokenizer
  shard_flags = ["--config.data.num_shards=2",
                 "--config.checkpoint.save_every=2",
                 "--config.optimizer.schedule_steps=6"]

  def one_process(workdir, steps):
    env = _launch_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    done = subprocess.run(
        _tiny_flags(tok_dir, workdir) + shard_flags
        + [f"--config.train.steps={steps}"], env=env, capture_output=True,
        text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices: 2 x cpu (1 process(es))" in done.stdout

  def two_processes(workdir, steps):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen(
        _tiny_flags(tok_dir, workdir) + shard_flags + [
            f"--config.train.steps={steps}", "--multihost",
            f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={i}"], env=_launch_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    printed = outs[0][0]
    assert "devices: 2 x cpu (2 process(es))" in printed
    assert ("batch: 4 x 32 tokens, 1 microbatch(es); 2 rows per process"
            in printed)
    assert "params: " in printed and "state per device" in printed
    assert "devices:" not in outs[1][0]  # only process 0 reports

  def losses(workdir):
    return {r["step"]: r["train/loss"] for r in metrics_lib.read_jsonl(
        os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}

  def params(workdir, step):
    """Host arrays of a checkpoint saved on another topology."""
    ocp = ckpt_lib.ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata
    tree = getattr(tree, "tree", tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=as_numpy))["params"]

  straight, mixed = str(tmp_path / "straight"), str(tmp_path / "mixed")
  one_process(straight, 6)
  two_processes(mixed, 2)
  one_process(mixed, 4)
  two_processes(mixed, 6)
  want, got = losses(straight), losses(mixed)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([got[s] for s in range(1, 7)],
                             [want[s] for s in range(1, 7)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               params(straight, 6), params(mixed, 6))
  records = metrics_lib.read_jsonl(os.path.join(mixed, "metrics.jsonl"))
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 2, 4, 6]
  assert all(np.isfinite(r["eval/loss"]) for r in evals)
