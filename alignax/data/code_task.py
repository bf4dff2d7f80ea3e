"""An embedded verifiable task: write a stdlib function's body from its doctests.

Problems come from the Python sources of the embedded corpus
(:mod:`alignax.data.embedded`), so the task needs no download. A problem is
a module-level function, or a method of a module-level class, that

* has no decorators and a docstring with doctest examples (``>>>``),
* has a body of 1 to ``MAX_BODY_LINES`` non-blank lines after the
  docstring, every one indented (so :meth:`CodeTask.clean` keeps it whole),
* lives in an importable module outside ``SKIP_MODULES``,

and passes a check in the sandbox (:mod:`alignax.rewards.sandbox`): with the
original body every doctest example passes, and with the stub body ``pass``
at least one example fails. Examples that also pass with the stub (imports,
assignments) still run but are not scored, so the stub scores 0.

The prompt is the function's header and docstring, as in its source file,
after a comment naming it; a method comes inside a bare ``class Name:``
line::

  # statistics.median (Python standard library)
  def median(data):
      \"\"\"Return the median (middle value) of numeric data.
      ...
      >>> median([1, 3, 5])
      3
      ...
      \"\"\"

and the completion is the body. Its reward runs, in a fresh sandboxed
process: import the module, define the completed function there (replacing
the original in the module, or on its class), and run the docstring's
doctest examples (``doctest``'s default option flags) in a copy of the
module's namespace. The reward is the fraction of scored examples that pass
(or 1/0 for all of them with ``all_or_nothing=True``); a completion that
does not compile, times out, exhausts memory or crashes scores 0. The
examples are in the prompt, as in HumanEval's prompts, so a completion can
special-case them; the task measures whether a policy learns to write
bodies that agree with their documentation.

On CPython 3.11.7 (this repository's virtualenv) the task yields 84
problems from 101 candidates: 62 train and 22 held-out with the default
fractions (among them 23 ``pickletools`` readers, 15 ``statistics``
functions, 12 ``collections.Counter`` methods). Other Python versions have
other sources and yield other numbers.

The split is a pure function of the problem's name: a problem is held out
when its source document is held out of the corpus
(:func:`alignax.data.embedded.is_heldout` at ``corpus_heldout_fraction``;
pretraining never saw its code) or its name ``'code/<module>.<qualname>'``
hashes into ``heldout_fraction``. Building the problems takes one sandbox
run per chunk of candidates (a few seconds, cached per process); one reward
takes one sandbox run, about 0.1 CPU seconds (importing ``doctest`` is most
of it).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import numpy as np

from alignax.data import embedded
from alignax.rewards import sandbox
from alignax.rewards import verifiable

MAX_BODY_LINES = 20
# Modules whose import (or doctests) open windows, browsers or servers.
SKIP_MODULES = frozenset({"antigravity", "this", "turtle", "turtledemo",
                          "tkinter", "idlelib", "pydoc", "__main__"})
SPLITS = ("train", "heldout")
# Limits of one reward run (imports doctest and the module, runs examples).
DEFAULT_LIMITS = sandbox.Limits(timeout_s=10.0, cpu_s=5, memory_mb=1024,
                                file_mb=4)
_CHECK_SECONDS = 5  # per candidate while building (SIGALRM in the child)
_MIN_BUILD_CHUNK = 16  # candidates per building run, at least
_BUILD_LIMITS = sandbox.Limits(timeout_s=120.0, cpu_s=60, memory_mb=2048,
                               file_mb=16, output_bytes=2**20)


@dataclasses.dataclass(frozen=True)
class CodeProblem:
  """One function to complete.

  Attributes:
    name: ``'<module>.<qualname>'``, e.g. ``'statistics.median'``.
    module: the importable module, e.g. ``'json.decoder'``.
    owner: the class of a method, else None.
    function: the function's name.
    document: the corpus document it comes from.
    header: its ``def`` line(s) and docstring, as in the source.
    docstring: the raw docstring (its doctest examples are the tests).
    solution: the original body (the reference completion).
    scored: indices of the doctest examples the reward counts.
  """
  name: str
  module: str
  owner: str | None
  function: str
  document: str
  header: str
  docstring: str
  solution: str
  scored: tuple[int, ...] = ()

  @property
  def prompt(self) -> str:
    scaffold = f"class {self.owner}:\n" if self.owner else ""
    return (f"# {self.name} (Python standard library)\n"
            f"{scaffold}{self.header}")

  def source(self, body: str) -> str:
    """The definition with ``body`` completed, as the reward runs it."""
    scaffold = f"class {self.owner}:\n" if self.owner else ""
    body = body if body.endswith("\n") else body + "\n"
    return f"{scaffold}{self.header}{body}"

  @property
  def stub(self) -> str:
    first = self.solution.lstrip("\n")
    indent = first[:len(first) - len(first.lstrip())]
    return f"{indent}pass\n"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt and the problem its reward checks against."""
  text: str
  target: CodeProblem


def clean(text: str) -> str:
  """A completion up to its first non-blank line at column 0 (the end of
  the function body)."""
  kept = []
  for line in text.split("\n"):
    if line.strip() and not line[0].isspace():
      break
    kept.append(line)
  return "\n".join(kept)


def _module_name(document):
  """``'stdlib/json/decoder.py'`` -> ``'json.decoder'``; None if skipped."""
  path = document.removeprefix("stdlib/").removesuffix(".py")
  parts = path.split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  if not parts or parts[0] in SKIP_MODULES or not all(
      p.isidentifier() for p in parts):
    return None
  return ".".join(parts)


def _candidate(lines, node, owner, module, document):
  """A problem (unscored) from a ``FunctionDef``, or None if unfit."""
  docstring = ast.get_docstring(node, clean=False)
  if (node.decorator_list or not docstring or ">>>" not in docstring
      or len(node.body) < 2 or node.body[1].lineno <= node.body[0].end_lineno):
    return None
  doc = node.body[0]
  header = lines[node.lineno - 1:doc.end_lineno]
  body = lines[doc.end_lineno:node.end_lineno]
  code = [line for line in body if line.strip()]
  if not 1 <= len(code) <= MAX_BODY_LINES or any(
      not line[0].isspace() for line in code):
    return None
  qualname = f"{owner}.{node.name}" if owner else node.name
  return CodeProblem(
      name=f"{module}.{qualname}", module=module, owner=owner,
      function=node.name, document=document,
      header="\n".join(header) + "\n", docstring=docstring,
      solution="\n".join(body) + "\n")


def candidates(document: dict) -> list[CodeProblem]:
  """The unchecked problems of one corpus document, in source order."""
  module = _module_name(document["name"])
  if (module is None or not document["name"].endswith(".py")
      or ">>>" not in document["text"]):
    return []
  try:
    tree = ast.parse(document["text"])
  except (SyntaxError, ValueError):
    return []
  lines = document["text"].split("\n")
  found = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef):
      found.append(_candidate(lines, node, None, module, document["name"]))
    elif isinstance(node, ast.ClassDef):
      found += [_candidate(lines, f, node.name, module, document["name"])
                for f in node.body if isinstance(f, ast.FunctionDef)]
  return [c for c in found if c is not None]


# Defines the completion in its module, then runs the docstring's examples.
# _check returns (indices of passing examples, number attempted).
_CHECK = r'''
import doctest as _doctest, importlib as _importlib, json as _json
import signal as _signal

class _Runner(_doctest.DocTestRunner):
    def report_success(self, out, test, example, got):
        self.passing.append(example)

def _check(module_name, owner, name, source, docstring):
    module = _importlib.import_module(module_name)
    target = getattr(module, owner) if owner else module
    original = target.__dict__[name]
    scope = {}
    try:
        exec(compile(source, "<completion>", "exec"), module.__dict__, scope)
        fn = scope[owner].__dict__[name] if owner else scope[name]
        setattr(target, name, fn)
        globs = dict(module.__dict__)
        globs.setdefault(module_name.rpartition(".")[2], module)
        test = _doctest.DocTestParser().get_doctest(
            docstring, globs, name, "<docstring>", 0)
        runner = _Runner(verbose=False, optionflags=0)
        runner.passing = []
        attempted = runner.run(test, out=lambda s: None).attempted
    finally:
        setattr(target, name, original)
    return ([i for i, e in enumerate(test.examples)
             if any(e is p for p in runner.passing)], attempted)
'''

_REWARD = r'''
_P = _json.loads({problem!r})
try:
    _passing = set(_check(_P["module"], _P["owner"], _P["function"],
                          _P["source"], _P["docstring"])[0])
except BaseException:
    _passing = set()
print()
print({prefix!r} + _json.dumps({{
    "passed": len(_passing & set(_P["scored"])), "total": len(_P["scored"])}}),
    flush=True)
'''

_BUILD = r'''
def _alarm(signum, frame):
    raise TimeoutError("example took too long")

_signal.signal(_signal.SIGALRM, _alarm)
for _P in _json.loads({problems!r}):
    _out = {{"name": _P["name"]}}
    for _label in ("solution", "stub"):
        _signal.alarm({seconds})
        try:
            _out[_label] = _check(_P["module"], _P["owner"], _P["function"],
                                  _P[_label], _P["docstring"])
        except BaseException:
            _out[_label] = None
        finally:
            _signal.alarm(0)
    print({prefix!r} + _json.dumps(_out), flush=True)
'''


def _build_program(problems):
  items = [dict(name=p.name, module=p.module, owner=p.owner,
                function=p.function, docstring=p.docstring,
                solution=p.source(p.solution), stub=p.source(p.stub))
           for p in problems]
  return _CHECK + _BUILD.format(problems=json.dumps(items), seconds=_CHECK_SECONDS,
                       prefix=verifiable.RESULT_PREFIX)


def _checked_lines(result):
  """The per-candidate JSON lines a building run printed."""
  prefix = verifiable.RESULT_PREFIX
  return [json.loads(line[len(prefix):]) for line in
          result.stdout.splitlines() if line.startswith(prefix)]


def _scored(report):
  """The scored example indices of a checked candidate, or None."""
  solution, stub = report.get("solution"), report.get("stub")
  if not solution or not stub:
    return None
  (passing, attempted), (stub_passing, _) = solution, stub
  if attempted == 0 or len(passing) != attempted:
    return None
  scored = tuple(sorted(set(passing) - set(stub_passing)))
  return scored or None


def check(problems: Sequence[CodeProblem],
          limits: sandbox.Limits = _BUILD_LIMITS) -> list[CodeProblem]:
  """``problems`` that pass the sandbox check, with their scored examples.

  Candidates run in about one chunk per CPU, one sandbox process each,
  concurrently; when a chunk's process dies mid-way, the candidate it was
  checking is dropped and the rest of the chunk is checked again.
  """
  problems = list(problems)
  size = max(_MIN_BUILD_CHUNK, -(-len(problems) // (os.cpu_count() or 1)))
  chunks = [problems[i:i + size] for i in range(0, len(problems), size)]
  results = sandbox.run_many([_build_program(c) for c in chunks], limits)
  kept, retry = [], []
  for chunk, result in zip(chunks, results):
    reports = _checked_lines(result)
    for p, report in zip(chunk, reports):
      scored = _scored(report) if report["name"] == p.name else None
      if scored is not None:
        kept.append(dataclasses.replace(p, scored=scored))
    retry += chunk[len(reports) + 1:]
  if retry:
    kept += check(retry, limits)
  order = {p.name: i for i, p in enumerate(problems)}
  return sorted(kept, key=lambda p: order[p.name])


@functools.lru_cache(maxsize=None)
def all_problems() -> tuple[CodeProblem, ...]:
  """Every checked problem of the embedded corpus, in corpus order."""
  docs = embedded.embedded_documents("train", 0.0)  # all, in name order
  found = [c for doc in docs for c in candidates(doc)]
  return tuple(check(found))


def wants_heldout(split: str) -> bool:
  """True for ``'heldout'`` (or ``'eval'``), False for ``'train'``."""
  split = "heldout" if split == "eval" else split
  if split not in SPLITS:
    raise ValueError(f"split must be 'train', 'heldout' or 'eval', got "
                     f"{split!r}.")
  return split == "heldout"


class CodeTask:
  """Complete a stdlib function body; rewarded by its doctests.

  Exposes the on-policy task interface of
  :class:`alignax.onpolicy.DocstringTask`: :meth:`prompts`, :meth:`clean`,
  :meth:`reward` (and the batched :meth:`rewards`).

  Args:
    heldout_fraction: expected fraction of problems held out by name.
    corpus_heldout_fraction: the corpus's held-out fraction (the
      pretraining run's); problems of its held-out documents are held out.
    all_or_nothing: reward 1 only when every scored example passes.
    limits: the sandbox limits of one reward run.
    max_workers: concurrent reward runs in :meth:`rewards`.
  """

  stop_strings = ()

  def __init__(self, heldout_fraction: float = 0.25,
               corpus_heldout_fraction: float = 0.02, *,
               all_or_nothing: bool = False,
               limits: sandbox.Limits = DEFAULT_LIMITS,
               max_workers: int | None = None):
    for value in (heldout_fraction, corpus_heldout_fraction):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"held-out fractions must be in [0, 1], got {value}.")
    self._fractions = (heldout_fraction, corpus_heldout_fraction)
    self._all_or_nothing = all_or_nothing
    self._limits, self._max_workers = limits, max_workers

  def is_heldout(self, problem: CodeProblem) -> bool:
    by_name, by_document = self._fractions
    return (embedded.is_heldout(problem.document, by_document)
            or embedded.is_heldout(f"code/{problem.name}", by_name))

  def problems(self, split: str) -> list[CodeProblem]:
    """The problems of ``'train'`` or ``'heldout'`` (``'eval'``)."""
    want = wants_heldout(split)
    return [p for p in all_problems() if self.is_heldout(p) == want]

  def prompts(self, split: str, n: int, *, seed: int) -> list[Prompt]:
    """``min(n, len(problems))`` distinct prompts of ``split``, by ``seed``."""
    problems = self.problems(split)
    order = np.random.default_rng(seed).permutation(len(problems))[:n]
    return [Prompt(problems[i].prompt, problems[i]) for i in order]

  def clean(self, text: str) -> str:
    return clean(text)

  def program(self, prompt: Prompt, completion: str) -> str:
    """The sandbox program that scores ``completion`` (after :meth:`clean`)."""
    p = prompt.target
    fields = dict(module=p.module, owner=p.owner, function=p.function,
                  docstring=p.docstring, scored=list(p.scored),
                  source=p.source(clean(completion)))
    return _CHECK + _REWARD.format(problem=json.dumps(fields),
                          prefix=verifiable.RESULT_PREFIX)

  def _score(self, result, prompt):
    fraction = verifiable.fraction_passed(result, len(prompt.target.scored))
    return float(fraction == 1.0) if self._all_or_nothing else fraction

  def reward(self, prompt: Prompt, completion: str) -> float:
    """The completion's reward in ``[0, 1]`` (one sandbox run)."""
    return self._score(sandbox.run(self.program(prompt, completion),
                                   self._limits), prompt)

  def rewards(self, prompts, completions) -> list[float]:
    """Rewards of many completions, scored concurrently."""
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                       f"completions.")
    programs = [self.program(p, c) for p, c in zip(prompts, completions)]
    results = sandbox.run_many(programs, self._limits,
                               max_workers=self._max_workers)
    return [self._score(r, p) for r, p in zip(results, prompts)]
