"""Runs generated Python in a throw-away subprocess with resource limits.

Each program runs as ``python -s -P -B -X faulthandler`` (isolated like
``-I``: no user site, no script directory or cwd on ``sys.path``, and an
environment built from scratch, so no ``PYTHON*`` variable leaks in; ``-I``
itself is not used because it would also ignore the fixed
``PYTHONHASHSEED=0`` that makes set and dict orders, and so printed outputs,
the same on every run), in a fresh temporary directory that is its cwd,
``HOME`` and ``TMPDIR`` and is deleted afterwards, in a new session (its own
process group). Before the program's first line, a small bootstrap in the
child sets

* ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL a second later),
* ``RLIMIT_AS`` (allocation fails: ``MemoryError``),
* ``RLIMIT_FSIZE`` (caps every file it writes, its stdout and stderr too:
  they go to files in the temporary directory, never into the caller's
  memory, and only their last ``output_bytes`` are read back),
* ``RLIMIT_CORE = 0`` (no core dumps) and ``RLIMIT_NPROC = 0``,
* and, on x86-64 and aarch64 Linux, a seccomp filter that makes ``fork``,
  ``vfork``, ``clone`` and ``clone3`` fail with ``EAGAIN``: the program can
  start neither processes nor threads. ``RLIMIT_NPROC`` alone does not stop
  a fork bomb when the caller runs as root (the kernel exempts uid 0), and
  this project's machines do; where seccomp is unavailable the bootstrap
  keeps the rlimits only.

The caller waits at most ``timeout_s`` of wall-clock time, then kills the
whole process group (``SIGKILL``); after a normal exit the group is killed
too, so nothing the program left behind outlives the call. Every outcome is
a :class:`Result`; nothing the program does (an infinite loop, a memory
bomb, a fork bomb, a segfault through ``ctypes``, ``os._exit``, gigabytes of
output) raises in, or hangs, the caller. :func:`run_many` runs programs
concurrently from a bounded thread pool, each thread waiting on its own
subprocess.

Linux only (``resource``, ``os.waitid``, process groups, seccomp). This is a
resource sandbox for model-generated code, not a security boundary: the
program runs as the caller's user, can read what the caller can read, and
shares the process with any test harness around it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

PASSED = "passed"  # ran to its end (or sys.exit(0)), exit status 0
FAILED = "failed"  # an uncaught exception, or sys.exit(nonzero)
TIMEOUT = "timeout"  # wall-clock or CPU-time limit
MEMORY = "memory"  # MemoryError at the address-space limit
CRASH = "crash"  # killed by a signal, or ended without finishing (os._exit)
OUTPUT_LIMIT = "output_limit"  # stdout, stderr or a file hit the size cap
STATUSES = (PASSED, FAILED, TIMEOUT, MEMORY, CRASH, OUTPUT_LIMIT)

# The bootstrap's exit statuses after a MemoryError and after a write past
# the file-size limit (unusual numbers, so that a program's own sys.exit(3)
# is not taken for one).
_MEMORY_EXIT = 213
_OUTPUT_EXIT = 214
_NONCE_VAR = "ALIGNAX_SANDBOX_NONCE"
_DONE_FILE = ".alignax_done"
_PROGRAM_FILE = "main.py"

# Runs in the child before the program: limits, the seccomp filter, then the
# program. Written for the interpreter the caller runs (sys.executable).
_BOOTSTRAP = r'''
import errno, json, os, resource, sys

def _seccomp_no_processes():
    import ctypes, platform, struct
    arch = {"x86_64": (0xC000003E, (56, 57, 58, 435)),
            "aarch64": (0xC00000B7, (220, 435))}.get(platform.machine())
    if arch is None:
        return
    audit_arch, calls = arch
    deny, allow = 0x00050000 | 11, 0x7FFF0000  # SECCOMP_RET_ERRNO|EAGAIN
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    n = len(calls)
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny),
            (ld, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]
    prog += [(jeq, n - i, 0, nr) for i, nr in enumerate(calls)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Prog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
        libc.prctl(22, 2, ctypes.byref(fprog), 0, 0)  # SECCOMP_MODE_FILTER

def _bootstrap():
    cfg = json.loads(sys.argv[1])
    nonce = os.environ.pop(cfg["nonce_var"])
    done = os.open(cfg["done_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        _seccomp_no_processes()
    except Exception:
        pass  # rlimits only
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0),
                        ("RLIMIT_FSIZE", cfg["file_bytes"]),
                        ("RLIMIT_AS", cfg["memory_bytes"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    with open(cfg["program"], "rb") as f:
        code = compile(f.read(), cfg["program"], "exec")
    sys.argv = [cfg["program"]]
    try:
        exec(code, {"__name__": "__main__", "__file__": cfg["program"],
              "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    except MemoryError:
        os.write(2, b"MemoryError (sandbox address-space limit)\n")
        os._exit(cfg["memory_exit"])
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            raise
        os.write(2, b"File too large (sandbox file-size limit)\n")
        os._exit(cfg["output_exit"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(done, nonce.encode())

_bootstrap()
'''


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one sandboxed program may use.

  Attributes:
    timeout_s: wall-clock seconds before its process group is killed.
    cpu_s: CPU seconds (``RLIMIT_CPU``, whole seconds, >= 1).
    memory_mb: address space in MiB (``RLIMIT_AS``; the interpreter itself
      takes about 30 MiB of it).
    file_mb: the largest file it may write, stdout and stderr included
      (``RLIMIT_FSIZE``).
    output_bytes: how much of the end of stdout and of stderr comes back.
  """
  timeout_s: float = 10.0
  cpu_s: int = 10
  memory_mb: int = 1024
  file_mb: int = 8
  output_bytes: int = 16_384

  def __post_init__(self):
    for field in ("timeout_s", "cpu_s", "memory_mb", "file_mb",
                  "output_bytes"):
      if not getattr(self, field) > 0:
        raise ValueError(f"Limits.{field} must be > 0, got "
                         f"{getattr(self, field)!r}.")
    if int(self.cpu_s) != self.cpu_s:
      raise ValueError(f"Limits.cpu_s must be whole seconds, got "
                       f"{self.cpu_s!r}.")


@dataclasses.dataclass(frozen=True)
class Result:
  """How one program ended.

  Attributes:
    status: one of :data:`STATUSES`.
    returncode: the exit status, ``-signal`` when killed by a signal.
    stdout: the last ``Limits.output_bytes`` of its stdout (UTF-8,
      undecodable bytes replaced).
    stderr: the same for stderr (tracebacks land here).
    wall_s: seconds from start to exit.
    cpu_s: user + system CPU seconds it used.
  """
  status: str
  returncode: int
  stdout: str
  stderr: str
  wall_s: float
  cpu_s: float

  @property
  def passed(self) -> bool:
    return self.status == PASSED


def _tail(path, limit):
  try:
    with open(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - limit))
      return f.read().decode("utf-8", errors="replace"), size
  except OSError:
    return "", 0


def _exited(pid, deadline):
  """Waits (without reaping) until ``pid`` exits; False at the deadline."""
  delay = 0.001
  while os.waitid(os.P_PID, pid,
                  os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    time.sleep(min(delay, remaining))
    delay = min(2 * delay, 0.02)
  return True


def _kill_group(pid):
  # The leader is not reaped yet, so its pid (the group id) is not reused.
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _status(returncode, timed_out, cpu_s, limits, sizes, done):
  """Classifies an exit: timeout > signals > output cap > memory > exit."""
  if timed_out:
    return TIMEOUT
  if returncode < 0:
    sig = -returncode
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                 and cpu_s >= limits.cpu_s):
      return TIMEOUT
    return OUTPUT_LIMIT if sig == signal.SIGXFSZ else CRASH
  if returncode == _OUTPUT_EXIT or max(sizes) >= limits.file_mb * 2**20:
    return OUTPUT_LIMIT
  if returncode == _MEMORY_EXIT:
    return MEMORY
  if returncode == 0:
    return PASSED if done else CRASH
  return FAILED


def _environment(tmp, nonce):
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp,
          "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
          "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
          _NONCE_VAR: nonce}


def run(program: str, limits: Limits = Limits()) -> Result:
  """Runs the Python source ``program`` in a sandboxed subprocess.

  Args:
    program: Python source, run as ``__main__`` from ``main.py`` in a fresh
      temporary directory; stdin is ``/dev/null``.
    limits: its :class:`Limits`.

  Returns:
    its :class:`Result`. Only failing to start the interpreter at all (the
    caller's own machine out of processes, say) raises.
  """
  if not isinstance(program, str):
    raise TypeError(f"program must be a str, got {type(program).__name__}.")
  nonce = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix="alignax-sandbox-",
                                   ignore_cleanup_errors=True) as tmp:
    with open(os.path.join(tmp, _PROGRAM_FILE), "w", encoding="utf-8") as f:
      f.write(program)
    cfg = {"nonce_var": _NONCE_VAR, "done_file": _DONE_FILE,
           "program": _PROGRAM_FILE, "cpu_s": int(limits.cpu_s),
           "memory_bytes": int(limits.memory_mb * 2**20),
           "file_bytes": int(limits.file_mb * 2**20),
           "memory_exit": _MEMORY_EXIT, "output_exit": _OUTPUT_EXIT}
    out_path, err_path = (os.path.join(tmp, n) for n in (".stdout",
                                                          ".stderr"))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      start = time.monotonic()
      proc = subprocess.Popen(
          [sys.executable, "-s", "-P", "-B", "-X", "faulthandler", "-c",
           _BOOTSTRAP, json.dumps(cfg)],
          stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=tmp,
          env=_environment(tmp, nonce), start_new_session=True)
    timed_out = not _exited(proc.pid, start + limits.timeout_s)
    _kill_group(proc.pid)
    _, wait_status, usage = os.wait4(proc.pid, 0)
    wall_s = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    stdout, out_size = _tail(out_path, limits.output_bytes)
    stderr, err_size = _tail(err_path, limits.output_bytes)
    done_text, _ = _tail(os.path.join(tmp, _DONE_FILE), 64)
  cpu_s = usage.ru_utime + usage.ru_stime
  status = _status(proc.returncode, timed_out, cpu_s, limits,
                   (out_size, err_size), done_text == nonce)
  return Result(status, proc.returncode, stdout, stderr, wall_s, cpu_s)


def run_many(programs: Sequence[str], limits: Limits = Limits(), *,
             max_workers: int | None = None) -> list[Result]:
  """Runs ``programs`` concurrently, at most ``max_workers`` at a time.

  Args:
    programs: Python sources, each run as :func:`run` runs one.
    limits: the :class:`Limits` of every program.
    max_workers: concurrent subprocesses; default ``os.cpu_count()``.

  Returns:
    their :class:`Result` s, in the order of ``programs``.
  """
  programs = list(programs)
  if max_workers is None:
    max_workers = os.cpu_count() or 1
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}.")
  if not programs:
    return []
  workers = min(max_workers, len(programs))
  with concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix="alignax-sandbox") as pool:
    return list(pool.map(lambda p: run(p, limits), programs))
