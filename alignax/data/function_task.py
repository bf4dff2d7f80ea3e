"""An embedded verifiable task small models can learn: one-line functions.

The stdlib task (:mod:`alignax.data.code_task`) asks for real standard-
library bodies, which a demo-size LM never writes (its reward stays 0, so
GRPO has no signal). This task asks for one-line bodies whose docstring
names the returned expression::

  def compute(a, b):
      \"\"\"Return max(a, b).

      >>> compute(3, -2)
      3
      \"\"\"

and rewards a completion by running it on ``TESTS_PER_PROBLEM`` inputs in
the sandbox (:mod:`alignax.rewards.sandbox`, through the ``unit_tests``
harness of :mod:`alignax.rewards.verifiable`): the reward is the fraction of
``assert compute(x, y) == expected`` tests that pass. The inputs include
zeros, equal and negative values, so a partial answer (``return a``) earns
partial credit and GRPO's groups see different rewards from the start.

Problems are every combination of an expression template (integer, string
and list operations, ``TEMPLATES``), an argument naming (``a, b``, ``x, y``,
...) and a neutral function name (``FUNCTION_NAMES``), so the name says
nothing about the body: 1,240 problems. The split is a pure function of the
problem's text: ``heldout_fraction`` of them (by hash) are held out. Every
template occurs in both splits with other names and arguments, so the
held-out reward measures whether the policy learned to write the body the
docstring describes, not one memorised answer.

Expected values are computed here by evaluating this module's own templates
(never model output) on the test inputs; the model's completion only ever
runs in the sandbox.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np

from alignax.data import code_task
from alignax.rewards import sandbox
from alignax.rewards import verifiable

TESTS_PER_PROBLEM = 4
SPLITS = ("train", "heldout")
FUNCTION_NAMES = ("compute", "apply", "transform", "result", "value", "func",
                  "evaluate", "process", "calc", "get")
# kind: argument names of one problem.
ARGUMENTS = {
    "int2": (("a", "b"), ("x", "y"), ("m", "n"), ("i", "j")),
    "int1": (("a",), ("x",), ("n",), ("value",)),
    "str1": (("s",), ("text",), ("name",), ("word",)),
    "list1": (("xs",), ("items",), ("values",), ("data",)),
}
# kind -> expressions over the placeholders {0}, {1} (the arguments).
TEMPLATES = {
    "int2": ("{0} + {1}", "{0} - {1}", "{0} * {1}", "max({0}, {1})",
             "min({0}, {1})", "{0} % {1}", "{0} // {1}"),
    "int1": ("{0} + 1", "{0} - 1", "{0} * 2", "{0} * {0}", "abs({0})", "-{0}",
             "{0} % 2", "{0} // 2"),
    "str1": ("{0}.upper()", "{0}.lower()", "{0}.strip()", "{0}[::-1]",
             "len({0})", "{0} + {0}", "{0}[0]", "{0}[-1]"),
    "list1": ("len({0})", "sum({0})", "max({0})", "min({0})", "sorted({0})",
              "{0}[0]", "{0}[-1]", "{0}[::-1]"),
}
_WORDS = ("abc", " Hi ", "Python", "x y", "level", "Data", "ok", "  pad")
_DIVIDES = ("%", "//")
# Limits of one reward run: no imports beyond the harness's json.
DEFAULT_LIMITS = sandbox.Limits(timeout_s=5.0, cpu_s=2, memory_mb=256,
                                file_mb=1)


@dataclasses.dataclass(frozen=True)
class FunctionProblem:
  """One function to complete.

  Attributes:
    name: the function's name.
    args: its argument names.
    expression: the body's returned expression (the reference answer).
    tests: ``assert name(...) == expected`` statements.
    example: the docstring's doctest call and its printed result.
    kind: the argument kind, a key of ``TEMPLATES``.
  """
  name: str
  args: tuple[str, ...]
  expression: str
  tests: tuple[str, ...]
  example: tuple[str, str]
  kind: str = ""

  @property
  def header(self) -> str:
    call, result = self.example
    return (f"def {self.name}({', '.join(self.args)}):\n"
            f'    """Return {self.expression}.\n\n'
            f"    >>> {call}\n    {result}\n"
            f'    """\n')

  @property
  def prompt(self) -> str:
    return f"# Complete the function body.\n{self.header}"

  @property
  def solution(self) -> str:
    return f"    return {self.expression}\n"

  @property
  def key(self) -> str:
    return f"function/{self.name}({', '.join(self.args)}) = {self.expression}"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt and the problem its reward checks against."""
  text: str
  target: FunctionProblem


def _inputs(kind, rng, expression):
  """``TESTS_PER_PROBLEM`` argument tuples, edge cases first."""
  if kind == "int2":
    fixed = [(0, 4), (5, 0), (-3, 3)]
    if any(op in expression for op in _DIVIDES):
      fixed = [(0, 4), (7, 2), (-3, 3)]
    out = fixed + [(int(rng.integers(-9, 10)), int(rng.integers(1, 10)))]
  elif kind == "int1":
    out = [(0,), (-4,), (7,), (int(rng.choice([-9, -7, -2, 3, 5, 8, 9])),)]
  elif kind == "str1":
    out = [(str(w),) for w in rng.choice(_WORDS, TESTS_PER_PROBLEM,
                                          replace=False)]
  else:
    out = [([int(x) for x in rng.integers(-5, 10, int(rng.integers(1, 5)))],)
           for _ in range(TESTS_PER_PROBLEM)]
  return out[:TESTS_PER_PROBLEM]


def _evaluate(expression, args, values):
  """The reference value: this module's own template, never model output."""
  return eval(expression, {"__builtins__": {"max": max, "min": min,  # pylint: disable=eval-used
                                            "abs": abs, "len": len,
                                            "sum": sum, "sorted": sorted}},
              dict(zip(args, values)))


def _seed(text):
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _problem(kind, template, args, name):
  expression = template.format(*args)
  rng = np.random.default_rng(_seed(f"{name}/{args}/{expression}"))
  inputs = _inputs(kind, rng, expression)
  call = lambda values: f"{name}({', '.join(map(repr, values))})"
  tests = tuple(f"assert {call(v)} == {_evaluate(expression, args, v)!r}"
                for v in inputs)
  shown = inputs[-1]
  return FunctionProblem(name, tuple(args), expression, tests,
                         (call(shown), repr(_evaluate(expression, args, shown))),
                         kind)


@functools.lru_cache(maxsize=None)
def all_problems() -> tuple[FunctionProblem, ...]:
  """Every problem, in a fixed order."""
  return tuple(_problem(kind, template, args, name)
               for kind, templates in TEMPLATES.items()
               for template in templates
               for args in ARGUMENTS[kind]
               for name in FUNCTION_NAMES)


def is_heldout(problem: FunctionProblem, fraction: float) -> bool:
  """Held out by a hash of the problem's text (stable across runs)."""
  return _seed(problem.key) % 10_000 < fraction * 10_000


class FunctionTask:
  """Complete a one-line function from its docstring; rewarded by tests.

  The on-policy task interface of :class:`alignax.data.code_task.CodeTask`:
  :meth:`prompts`, :meth:`clean`, :meth:`reward` and :meth:`rewards`.

  Args:
    heldout_fraction: fraction of problems held out (by hash).
    all_or_nothing: reward 1 only when every test passes.
    limits: the sandbox limits of one reward run.
    max_workers: concurrent reward runs in :meth:`rewards`.
  """

  stop_strings = ()

  def __init__(self, heldout_fraction: float = 0.25, *,
               all_or_nothing: bool = False,
               limits: sandbox.Limits = DEFAULT_LIMITS,
               max_workers: int | None = None):
    if not 0.0 < heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got "
                       f"{heldout_fraction}.")
    self._fraction = heldout_fraction
    self._all_or_nothing = all_or_nothing
    self._limits, self._max_workers = limits, max_workers

  def problems(self, split: str) -> list[FunctionProblem]:
    """The problems of ``'train'`` or ``'heldout'`` (``'eval'``)."""
    want = code_task.wants_heldout(split)
    return [p for p in all_problems()
            if is_heldout(p, self._fraction) == want]

  def prompts(self, split: str, n: int, *, seed: int) -> list[Prompt]:
    """``min(n, len(problems))`` distinct prompts of ``split``, by ``seed``."""
    problems = self.problems(split)
    order = np.random.default_rng(seed).permutation(len(problems))[:n]
    return [Prompt(problems[i].prompt, problems[i]) for i in order]

  def clean(self, text: str) -> str:
    """The completion up to the end of the function body."""
    return code_task.clean(text)

  def source(self, prompt: Prompt, completion: str) -> str:
    """The definition the tests run: header + cleaned body."""
    return prompt.target.header + self.clean(completion) + "\n"

  def rewards(self, prompts, completions) -> list[float]:
    """Rewards of many completions, scored concurrently in the sandbox."""
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                       f"completions.")
    fn = verifiable.get("unit_tests_all" if self._all_or_nothing
                        else "unit_tests")
    return fn([self.source(p, c) for p, c in zip(prompts, completions)],
              [list(p.target.tests) for p in prompts], limits=self._limits,
              max_workers=self._max_workers)

  def reward(self, prompt: Prompt, completion: str) -> float:
    """One completion's reward in ``[0, 1]``."""
    return self.rewards([prompt], [completion])[0]


def write_jsonl(path: str, split: str = "train",
                heldout_fraction: float = 0.25) -> int:
  """Writes ``{"text": prompt + solution}`` per problem of ``split`` to
  ``path`` (a supervised warm-up for the LM path, ``data.source=jsonl``);
  returns the number of records."""
  import json  # pylint: disable=import-outside-toplevel
  problems = FunctionTask(heldout_fraction).problems(split)
  with open(path, "w", encoding="utf-8") as f:
    for p in problems:
      f.write(json.dumps({"text": p.prompt + p.solution}) + "\n")
  return len(problems)


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=(
      "Write the function task's problems with their reference bodies as "
      "JSONL text records (the warm-up of configs/grpo_demo.py:function)."))
  parser.add_argument("path")
  parser.add_argument("--split", default="train", choices=SPLITS)
  parser.add_argument("--heldout_fraction", type=float, default=0.25)
  args = parser.parse_args(argv)
  n = write_jsonl(args.path, args.split, args.heldout_fraction)
  print(f"wrote {n} {args.split} problems to {args.path}")


if __name__ == "__main__":
  main()
