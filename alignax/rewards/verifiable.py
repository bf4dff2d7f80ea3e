"""Verifiable rewards: exact match and unit tests run in the sandbox.

A reward function scores a batch, ``fn(completions, references, **kw) ->
list[float]`` (one reward per completion, reference ``i`` belonging to
completion ``i``), so the unit-test rewards can run their programs
concurrently. Configs name them by string through the registry::

  fn = verifiable.get("unit_tests")
  rewards = fn(completions, [["assert add(1, 2) == 3", ...], ...])

Registered names: ``exact_match`` (references are target strings),
``unit_tests`` (the fraction of a sample's tests that pass) and
``unit_tests_all`` (1 when every test passes, else 0); :func:`register` adds
more.

A unit-test program runs the completion, then each test (a Python statement
or block, usually ``assert``) in its own ``try``, so one failing test costs
only itself; then it prints one result line (:func:`read_report` reads it).
Anything that stops the program from reaching that line (a timeout, a memory
or output blow-up, a crash, ``os._exit``) scores 0. ``SystemExit`` while
defining the completion fails every test, and inside a test fails that
test. The completion shares the
process with the harness, so a policy could in principle forge the result
line; the sandbox guards resources, not against an adversary.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence

from alignax.rewards import sandbox

RESULT_PREFIX = "__alignax_test_result__ "

RewardFn = Callable[..., list[float]]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: makes a batch reward function available as ``get(name)``."""
  def add(fn):
    if name in _REGISTRY:
      raise ValueError(f"reward {name!r} is already registered.")
    _REGISTRY[name] = fn
    return fn
  return add


def get(name: str) -> RewardFn:
  """The registered reward function called ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown reward {name!r}; registered: "
                     f"{sorted(_REGISTRY)}.")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def normalize_answer(text: str) -> str:
  """Canonical form for exact match: NFKC, case-folded, whitespace runs
  collapsed, outer whitespace, quotes and a final period removed."""
  text = unicodedata.normalize("NFKC", text).casefold()
  text = re.sub(r"\s+", " ", text).strip()
  text = text.removesuffix(".").strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"`":
    text = text[1:-1].strip()
  return text


def _check_batch(completions, references):
  if len(completions) != len(references):
    raise ValueError(f"{len(completions)} completions but "
                     f"{len(references)} references.")


@register("exact_match")
def exact_match(completions: Sequence[str],
                references: Sequence[str]) -> list[float]:
  """1.0 where ``normalize_answer`` of completion and reference agree."""
  _check_batch(completions, references)
  return [float(normalize_answer(c) == normalize_answer(r))
          for c, r in zip(completions, references)]


_HARNESS = '''\
import json as _json
_SOLUTION = {solution!r}
_TESTS = {tests!r}
_ns = {{"__name__": "__solution__"}}
try:
    exec(compile(_SOLUTION, "<solution>", "exec"), _ns)
    _ok = True
except BaseException:
    _ok = False
_passed = 0
for _test in _TESTS if _ok else ():
    try:
        exec(compile(_test, "<test>", "exec"), _ns)
        _passed += 1
    except BaseException:
        pass
print()
print({prefix!r} + _json.dumps({{"passed": _passed, "total": len(_TESTS)}}),
      flush=True)
'''


def unit_test_program(solution: str, tests: Sequence[str]) -> str:
  """The sandbox program that runs ``solution`` and then each of ``tests``.

  Args:
    solution: Python source (setup code, imports, the completed function).
    tests: statements run one by one in the solution's namespace, each
      passing when it raises nothing.
  """
  if isinstance(tests, str):
    raise TypeError("tests must be a sequence of test strings, not a str.")
  if not tests:
    raise ValueError("tests must not be empty.")
  return _HARNESS.format(solution=solution, tests=[str(t) for t in tests],
                         prefix=RESULT_PREFIX)


def read_report(result: sandbox.Result) -> tuple[int, int] | None:
  """``(passed, total)`` from a harness run, None unless it ran to its end.

  Reads the last result line of a program that printed one in this
  module's format (:func:`unit_test_program`, or a task's own harness).
  """
  if not result.passed:
    return None
  for line in reversed(result.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      try:
        report = json.loads(line[len(RESULT_PREFIX):])
        passed, total = int(report["passed"]), int(report["total"])
      except (ValueError, KeyError, TypeError):
        return None
      return (min(max(passed, 0), total), total) if total > 0 else None
  return None


def fraction_passed(result: sandbox.Result, expected_total: int) -> float:
  """Passed / total of a harness run; 0 if it did not finish or reports a
  different number of tests than ``expected_total``."""
  report = read_report(result)
  if report is None or report[1] != expected_total:
    return 0.0
  return report[0] / report[1]


def _run_tests(completions, references, limits, max_workers):
  _check_batch(completions, references)
  programs = [unit_test_program(c, r) for c, r in zip(completions, references)]
  results = sandbox.run_many(programs, limits, max_workers=max_workers)
  return [fraction_passed(res, len(ref))
          for res, ref in zip(results, references)]


@register("unit_tests")
def unit_test_fraction(completions: Sequence[str],
                       references: Sequence[Sequence[str]], *,
                       limits: sandbox.Limits = sandbox.Limits(),
                       max_workers: int | None = None) -> list[float]:
  """The fraction of each completion's tests that pass, in ``[0, 1]``.

  Args:
    completions: Python sources, one per sample.
    references: each sample's tests (see :func:`unit_test_program`).
    limits: the sandbox limits of each sample's program.
    max_workers: concurrent sandboxes (default ``os.cpu_count()``).
  """
  return _run_tests(completions, references, limits, max_workers)


@register("unit_tests_all")
def unit_test_all(completions: Sequence[str],
                  references: Sequence[Sequence[str]], *,
                  limits: sandbox.Limits = sandbox.Limits(),
                  max_workers: int | None = None) -> list[float]:
  """1.0 for a completion that passes every one of its tests, else 0.0
  (arguments as in :func:`unit_test_fraction`)."""
  fractions = _run_tests(completions, references, limits, max_workers)
  return [float(f == 1.0) for f in fractions]
