"""Fault trials anyone can rerun: random kill -9s, NaN injection, bad configs.

Each kill trial starts the launcher on a tiny recipe, kills it with SIGKILL
at a random moment (during steps and during async saves alike), reruns the
same command to the end and checks that

* the final parameters equal the uninterrupted run's bit for bit,
* at most one save interval of logged steps was lost to the kill,
* ``metrics.jsonl`` holds every step exactly once.

The NaN trials run ``optimizer.lr=1e39`` (Inf in float32: finite gradients,
infinite update) with ``on_nonfinite`` skip and stop and check that no
checkpoint holds a non-finite value. The config trials launch bad values and
count those answered by one ``alignax: error:`` line with exit status 2.
Counts are printed at the end::

  python benchmarks/fault_trials.py --kills=20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "tpu_train.py")
TINY = ["--config.model.d_model=32", "--config.model.n_layers=2",
        "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
        "--config.model.head_dim=8", "--config.model.d_ff=64",
        "--config.model.max_seq_len=32", "--config.tokenizer.vocab_size=512",
        "--config.tokenizer.num_sentinels=8", "--config.train.batch_size=8",
        "--config.train.seq_len=32", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.progress_bar=False",
        "--config.optimizer.warmup_steps=1"]


EXTRA = []  # flags every launch gets (--sync_saves)


def launch(workdir, *extra, steps, save_every, tok_dir, wait=True):
  cmd = [sys.executable, LAUNCH,
         f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
         f"--workdir={workdir}", *TINY, f"--config.train.steps={steps}",
         f"--config.checkpoint.save_every={save_every}",
         "--config.checkpoint.keep=100", f"--config.tokenizer.cache_dir={tok_dir}",
         *EXTRA, *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v5p-8",
             TPU_WORKER_HOSTNAMES="localhost")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if wait:
    out, err = proc.communicate()
    return proc.returncode, out, err
  return proc


def final_params(workdir):
  """The newest checkpoint's parameters as host arrays (one flat list)."""
  # Imported here: the trial driver itself never needs jax.
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  step = max(ocp.utils.checkpoint_steps(directory))
  with ocp.CheckpointManager(directory) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  return step, [np.asarray(x) for x in
                jax.tree.leaves(restored["state"]["params"])]


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line)["step"])
      except (ValueError, KeyError):
        pass
  return out


def saved_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def kill_trials(n, root, tok_dir, steps, save_every, rng):
  straight = os.path.join(root, "straight")
  t0 = time.perf_counter()
  proc = launch(straight, steps=steps, save_every=save_every,
                tok_dir=tok_dir, wait=False)
  first_logged = None
  while proc.poll() is None:  # times the loop: from step 1 to the end
    if first_logged is None and logged_steps(straight):
      first_logged = time.perf_counter()
    time.sleep(0.02)
  duration = time.perf_counter() - t0
  _, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  step_seconds = (time.perf_counter() - (first_logged or t0)) / steps
  want_step, want = final_params(straight)
  results = {"equal": 0, "lost_at_most_one_interval": 0, "steps_once": 0,
             "max_lost_steps": 0}
  for i in range(n):
    workdir = os.path.join(root, f"kill_{i}")
    proc = launch(workdir, steps=steps, save_every=save_every,
                  tok_dir=tok_dir, wait=False)
    # Kill inside the training loop: after a random number of logged steps
    # (the first N-1), then a random part of a step later, so kills land
    # between steps, inside steps and during the async saves alike.
    target = rng.randint(1, steps - 1)
    deadline = time.perf_counter() + 20 * duration
    while (len(logged_steps(workdir)) < target and proc.poll() is None
           and time.perf_counter() < deadline):
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0) * step_seconds)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    logged, saved = logged_steps(workdir), saved_steps(workdir)
    lost = (max(logged) if logged else 0) - (max(saved) if saved else 0)
    rc, _, err = launch(workdir, steps=steps, save_every=save_every,
                        tok_dir=tok_dir)
    assert rc == 0, err[-3000:]
    step, got = final_params(workdir)
    equal = step == want_step and all(
        np.array_equal(a, b) for a, b in zip(got, want))
    once = sorted(logged_steps(workdir)) == list(range(1, steps + 1))
    results["equal"] += equal
    results["lost_at_most_one_interval"] += lost <= save_every
    results["steps_once"] += once
    results["max_lost_steps"] = max(results["max_lost_steps"], lost)
    print(f"kill {i}: killed after {len(logged)} logged steps, "
          f"{len(saved)} saves; lost {lost}; equal={equal}; "
          f"steps once={once}", flush=True)
  return results


def nan_trials(root, tok_dir):
  out = {}
  for mode in ("skip", "stop"):
    workdir = os.path.join(root, f"nan_{mode}")
    rc, _, err = launch(workdir, "--config.optimizer.lr=1e39",
                        f"--config.train.on_nonfinite={mode}", steps=4,
                        save_every=2, tok_dir=tok_dir)
    finite = True
    for step in saved_steps(workdir):
      shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                      os.path.join(root, f"one_{mode}_{step}", "checkpoints",
                                   str(step)))
      _, params = final_params(os.path.join(root, f"one_{mode}_{step}"))
      finite &= all(np.all(np.isfinite(p)) for p in params)
    out[mode] = {"exit": rc, "checkpoints": saved_steps(workdir),
                 "all_finite": finite, "last_line": err.strip().splitlines()[-1]
                 if err.strip() else ""}
  return out


BAD_CONFIGS = [
    "--config.train.stepz=3", "--config.optimizer.lr=-1",
    "--config.optimizer.lr=nan", "--config.optimizer.lr=inf",
    "--config.optimizer.b1=1.5", "--config.optimizer.eps=0",
    "--config.optimizer.warmup_steps=-2", "--config.optimizer.name=sgdd",
    "--config.train.steps=0", "--config.train.batch_size=0",
    "--config.train.seq_len=4096", "--config.train.microbatches=3",
    "--config.train.log_every=0", "--config.train.on_nonfinite=ignore",
    "--config.checkpoint.save_every=0", "--config.checkpoint.keep=0",
    "--config.mesh.data=3", "--config.mesh.fsdp=0", "--config.mesh.pipeline=2",
    "--config.model.n_kv_heads=3", "--config.model.head_dim=7",
    "--config.model.dtype=float8", "--config.model.remat=some",
    "--config.objective=dpoo", "--config.data.task=ul3",
    "--config.data.source=csv",
]


def config_trials(root, tok_dir):
  one_line = 0
  for i, flag in enumerate(BAD_CONFIGS):
    rc, _, err = launch(os.path.join(root, f"cfg_{i}"), flag, steps=2,
                        save_every=2, tok_dir=tok_dir)
    lines = err.strip().splitlines()
    ok = (rc == 2 and lines and lines[-1].startswith("alignax: error: ")
          and "Traceback" not in err)
    one_line += ok
    print(f"{flag}: exit {rc}: {lines[-1] if lines else ''}", flush=True)
  return {"bad_configs": len(BAD_CONFIGS), "one_line": one_line}


def main():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  parser = argparse.ArgumentParser()
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--save_every", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sync_saves", action="store_true",
                      help="checkpoint.async_save=False: a kill then loses "
                      "at most one save interval; with async saves (the "
                      "default) the save in flight can add the steps run "
                      "while it was written")
  parser.add_argument("--skip", default="", help="comma list: kill,nan,config")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  rng = random.Random(args.seed)
  if args.sync_saves:
    EXTRA.append("--config.checkpoint.async_save=False")
  root = tempfile.mkdtemp(prefix="alignax_faults_")
  tok_dir = os.path.join(root, "tokenizer")
  summary = {"load_average": os.getloadavg(),
             "async_save": not args.sync_saves}
  if "kill" not in skip:
    summary["kill"] = dict(kill_trials(args.kills, root, tok_dir, args.steps,
                                       args.save_every, rng), trials=args.kills)
  if "nan" not in skip:
    summary["nan"] = nan_trials(root, tok_dir)
  if "config" not in skip:
    summary["config"] = config_trials(root, tok_dir)
  summary["load_average_end"] = os.getloadavg()
  print(json.dumps(summary, indent=1))
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
