"""The sandbox: every misbehaving program ends in its own status, in time."""

import os
import time

import pytest

from alignax.rewards import sandbox

# The memory cap keeps the memory bomb well inside a shared 24 GiB machine.
# Both clocks are generous: on a loaded 2-core machine a memory bomb took
# over 2 s of wall clock (CI) and 1 s of CPU time (1.0 s of CPU under a
# test run here, against 0.15 s idle) to reach its MemoryError, and a
# tighter limit reported it as a timeout. Only the busy loop (CPU limit)
# and the sleeper (wall clock) run into them.
LIMITS = sandbox.Limits(timeout_s=8.0, cpu_s=4, memory_mb=256, file_mb=1,
                        output_bytes=4096)

CASES = {
    "correct": ("print(sum(range(10)))", sandbox.PASSED),
    "assertion": ("assert 1 + 1 == 3", sandbox.FAILED),
    "exception": ("raise ValueError('bad')", sandbox.FAILED),
    "infinite_loop": ("while True:\n  pass", sandbox.TIMEOUT),
    "sleep_forever": ("import time\ntime.sleep(3600)", sandbox.TIMEOUT),
    "memory_bomb": ("a = []\nwhile True:\n  a.append(bytearray(2**25))",
                    sandbox.MEMORY),
    "huge_allocation": ("x = bytearray(2**40)", sandbox.MEMORY),
    # At most 32 processes even where forking were allowed; they would sleep
    # and die with the process group.
    "fork_bomb": ("import os, time\nfor _ in range(32):\n"
                  "  if os.fork() == 0:\n    time.sleep(3600)",
                  sandbox.FAILED),
    "ctypes_fork": ("import ctypes\nassert ctypes.CDLL(None).fork() == -1",
                    sandbox.PASSED),
    "thread": ("import threading\nthreading.Thread(target=print).start()",
               sandbox.FAILED),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])",
                   sandbox.FAILED),
    "segfault": ("import ctypes\nctypes.string_at(0)", sandbox.CRASH),
    "abort": ("import os\nos.abort()", sandbox.CRASH),
    "os_exit_0": ("import os\nos._exit(0)", sandbox.CRASH),
    "sys_exit_0": ("import sys\nprint('done')\nsys.exit(0)", sandbox.PASSED),
    "sys_exit_2": ("import sys\nsys.exit(2)", sandbox.FAILED),
    "huge_stdout": ("while True:\n  print('x' * 10000)", sandbox.OUTPUT_LIMIT),
    "huge_stderr": ("import sys\nwhile True:\n  sys.stderr.write('y' * 10000)",
                    sandbox.OUTPUT_LIMIT),
    "huge_file": ("open('big', 'wb').write(b'0' * 2**24)",
                  sandbox.OUTPUT_LIMIT),
}


@pytest.fixture(scope="module")
def results():
  names = list(CASES)
  start = time.monotonic()
  # All 19 at once, so that the whole run waits for one wall clock.
  out = sandbox.run_many([CASES[n][0] for n in names], LIMITS,
                         max_workers=len(names))
  elapsed = time.monotonic() - start
  # The slowest (the sleeper) is bounded by the wall clock.
  assert elapsed < LIMITS.timeout_s + 7.0
  return dict(zip(names, out))


@pytest.mark.parametrize("name", list(CASES))
def test_each_program_gets_its_status_in_bounded_time(results, name):
  result = results[name]
  assert result.status == CASES[name][1], (result.status, result.stderr)
  assert result.wall_s < LIMITS.timeout_s + 1.5
  assert len(result.stdout) <= LIMITS.output_bytes
  assert len(result.stderr) <= LIMITS.output_bytes


def test_details_of_the_outcomes(results):
  assert results["correct"].stdout == "45\n"
  assert results["correct"].passed and results["correct"].returncode == 0
  assert "AssertionError" in results["assertion"].stderr
  assert results["segfault"].returncode == -11
  assert "BlockingIOError" in results["fork_bomb"].stderr
  assert results["sys_exit_2"].returncode == 2
  # Only the last output_bytes of the 1 MiB that were written come back.
  assert len(results["huge_stdout"].stdout) == LIMITS.output_bytes
  assert set(results["huge_stdout"].stdout) <= {"x", "\n"}
  assert "File too large" in results["huge_file"].stderr
  # The busy loop stops at the CPU limit (or at the wall clock, when a
  # loaded machine gives it less than 4 CPU seconds in 8 s); the sleeper
  # uses almost no CPU and is stopped by the wall clock.
  assert results["infinite_loop"].cpu_s < LIMITS.cpu_s + 1.5
  assert results["sleep_forever"].cpu_s < 1.0


def test_clean_environment_fresh_directory_and_fixed_hash_seed():
  program = ("import os, sys\n"
             "print(sorted(os.environ))\n"
             "print(os.getcwd())\n"
             "print(os.listdir('.'))\n"
             "print(hash('alignax'), sys.flags.no_user_site)\n")
  first, second = sandbox.run_many([program, program], LIMITS)
  assert first.passed and second.passed, first.stderr
  env, cwd, files, hashes = first.stdout.splitlines()
  assert env == str(sorted(["HOME", "LANG", "LC_ALL", "PATH", "PYTHONHASHSEED",
                            "PYTHONIOENCODING", "TMPDIR"]))
  assert os.path.basename(cwd).startswith("alignax-sandbox-")
  assert not os.path.exists(cwd)  # deleted afterwards
  assert "main.py" in files
  assert hashes == second.stdout.splitlines()[3]
  assert hashes.endswith(" 1")
  assert cwd != second.stdout.splitlines()[1]


def test_many_concurrent_samples_come_back_in_order():
  programs = [f"print({i} * {i})" for i in range(12)]
  results = sandbox.run_many(programs, LIMITS, max_workers=4)
  assert [r.status for r in results] == [sandbox.PASSED] * 12
  assert [int(r.stdout) for r in results] == [i * i for i in range(12)]


def test_concurrent_hangs_are_killed_by_the_wall_clock_together():
  limits = sandbox.Limits(timeout_s=1.0, cpu_s=5, memory_mb=256)
  start = time.monotonic()
  results = sandbox.run_many(["import time\nwhile True:\n  time.sleep(0.01)"]
                             * 6, limits, max_workers=6)
  assert time.monotonic() - start < 5.0
  assert {r.status for r in results} == {sandbox.TIMEOUT}


def test_bad_arguments_fail_with_clear_errors():
  with pytest.raises(ValueError, match="timeout_s must be > 0"):
    sandbox.Limits(timeout_s=0)
  with pytest.raises(ValueError, match="cpu_s must be whole seconds"):
    sandbox.Limits(cpu_s=1.5)
  with pytest.raises(TypeError, match="program must be a str"):
    sandbox.run(b"print(1)")
  with pytest.raises(ValueError, match="max_workers must be >= 1"):
    sandbox.run_many(["pass"], max_workers=0)
  assert sandbox.run_many([]) == []
