"""The embedded code task: problems, split, prompts and sandboxed rewards."""

import sys

import pytest

from alignax.data import code_task


@pytest.fixture(scope="module")
def task():
  return code_task.CodeTask()


@pytest.fixture(scope="module")
def problems():
  return {p.name: p for p in code_task.all_problems()}


def _prompt(problem):
  return code_task.Prompt(problem.prompt, problem)


def test_problem_count_and_shape(task, problems):
  if sys.version_info[:3] == (3, 11, 7):  # the number the docstring gives
    assert (len(problems), len(task.problems("train")),
            len(task.problems("heldout"))) == (84, 62, 22)
  assert len(problems) >= 40
  for p in problems.values():
    assert p.scored and ">>>" in p.docstring
    assert 1 <= sum(1 for line in p.solution.split("\n") if line.strip()) <= (
        code_task.MAX_BODY_LINES)
    assert code_task.clean(p.solution) == p.solution
  median = problems["statistics.median"]
  assert median.prompt.startswith(
      "# statistics.median (Python standard library)\ndef median(data):\n")
  assert median.prompt.endswith('"""\n')
  ratio = problems["difflib.SequenceMatcher.ratio"]
  assert ratio.owner == "SequenceMatcher"
  assert "\nclass SequenceMatcher:\n    def ratio(self):\n" in ratio.prompt


def test_split_is_deterministic_and_disjoint(task, problems):
  train = [p.name for p in task.problems("train")]
  heldout = [p.name for p in task.problems("heldout")]
  assert heldout and train
  assert not set(train) & set(heldout)
  assert set(train) | set(heldout) == set(problems)
  other = code_task.CodeTask()  # a fresh instance agrees
  assert [p.name for p in other.problems("eval")] == heldout
  first = [p.target.name for p in task.prompts("train", 10, seed=3)]
  assert first == [p.target.name for p in other.prompts("train", 10, seed=3)]
  assert first != [p.target.name for p in task.prompts("train", 10, seed=4)]
  assert len(set(first)) == 10
  assert len(task.prompts("heldout", 10_000, seed=0)) == len(heldout)
  # Problems of held-out corpus documents are always held out.
  everything_out = code_task.CodeTask(corpus_heldout_fraction=1.0)
  assert not everything_out.problems("train")
  with pytest.raises(ValueError, match="split must be"):
    task.problems("test")
  with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
    code_task.CodeTask(heldout_fraction=1.5)


def test_reference_scores_one_and_wrong_bodies_zero(task, problems):
  median = problems["statistics.median"]
  cases = [(median, median.solution, 1.0), (median, median.stub, 0.0),
           (median, "", 0.0),
           (median, "    return 12345\n", 0.0),
           (median, "    raise NotImplementedError\n", 0.0)]
  for name in ["difflib.SequenceMatcher.ratio", "pickle.decode_long"]:
    p = problems[name]  # a method, and a function of another module
    cases += [(p, p.solution, 1.0), (p, p.stub, 0.0)]
  got = task.rewards([_prompt(p) for p, _, _ in cases],
                     [body for _, body, _ in cases])
  assert got == [reward for _, _, reward in cases]
  assert task.reward(_prompt(median), median.solution) == 1.0


def test_partial_credit_and_all_or_nothing(problems):
  median = problems["statistics.median"]
  # Right for odd lengths, wrong for even ones: 1 of its 2 examples.
  half = "    data = sorted(data)\n    return data[len(data) // 2]\n"
  assert code_task.CodeTask().reward(_prompt(median), half) == 0.5
  strict = code_task.CodeTask(all_or_nothing=True)
  assert strict.reward(_prompt(median), half) == 0.0
  assert strict.reward(_prompt(median), median.solution) == 1.0


def test_misbehaving_completions_score_zero_in_bounded_time(problems):
  median = problems["statistics.median"]
  limits = code_task.sandbox.Limits(timeout_s=1.0, cpu_s=1, memory_mb=512)
  task = code_task.CodeTask(limits=limits, max_workers=5)
  bodies = ["    while True:\n        pass\n",
            "    import os\n    os._exit(0)\n",
            "    import sys\n    sys.exit(0)\n",
            "    return bytearray(2**40)\n",
            "    import ctypes\n    ctypes.string_at(0)\n"]
  assert task.rewards([_prompt(median)] * len(bodies), bodies) == [0.0] * 5


def test_clean_stops_at_the_end_of_the_body():
  text = "    x = 1\n\n    return x\ndef other():\n    pass\n"
  assert code_task.clean(text) == "    x = 1\n\n    return x"
  assert code_task.clean("print('escape')\n") == ""
