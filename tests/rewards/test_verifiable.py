"""Verifiable rewards: exact match, unit tests in the sandbox, the registry."""

import pytest

from alignax.rewards import sandbox
from alignax.rewards import verifiable

LIMITS = sandbox.Limits(timeout_s=2.0, cpu_s=1, memory_mb=256, file_mb=1)

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0",
             "assert add(2, 2) == 4", "assert add('a', 'b') == 'ab'"]


def test_normalize_answer():
  assert verifiable.normalize_answer("  The  Answer\n is 42. ") == (
      "the answer is 42")
  assert verifiable.normalize_answer('"Paris"') == "paris"
  assert verifiable.normalize_answer("３．５") == "3.5"  # NFKC
  assert verifiable.normalize_answer("3.5") != verifiable.normalize_answer(
      "35")


def test_exact_match():
  got = verifiable.exact_match(["42", " Paris. ", "london", "4 2"],
                               ["42", "paris", "London ", "42"])
  assert got == [1.0, 1.0, 1.0, 0.0]
  with pytest.raises(ValueError, match="2 completions but 1 references"):
    verifiable.exact_match(["a", "b"], ["a"])


def test_unit_tests_score_the_fraction_that_passes():
  completions = [
      "def add(a, b):\n  return a + b\n",  # all pass
      "def add(a, b):\n  return a + b if a != 2 else 0\n",  # 3 of 4
      "def add(a, b):\n  return int(a) + int(b)\n",  # 3 of 4 (strings)
      "def add(a, b) return a + b\n",  # syntax error
      "def add(a, b):\n  while True:\n    pass\n",  # hangs in the tests
      "import os\nos._exit(0)\n",  # leaves before the result line
      "x = bytearray(2**40)\n",  # memory
  ]
  refs = [ADD_TESTS] * len(completions)
  got = verifiable.unit_test_fraction(completions, refs, limits=LIMITS,
                                      max_workers=len(completions))
  assert got == [1.0, 0.75, 0.75, 0.0, 0.0, 0.0, 0.0]
  all_or_nothing = verifiable.unit_test_all(completions[:3], refs[:3],
                                            limits=LIMITS)
  assert all_or_nothing == [1.0, 0.0, 0.0]


def test_exits_and_a_forged_result_line_do_not_score():
  forged = (f"print({verifiable.RESULT_PREFIX!r} + "
            "'{\"passed\": 4, \"total\": 4}')\n")
  completions = [
      forged + "raise SystemExit(0)\n",  # stops the solution: every test fails
      "import sys\ndef add(a, b):\n  sys.exit(0)\n",  # each test fails
      forged + "def add(a, b):\n  return -99\n",  # printed before the harness
  ]
  got = verifiable.unit_test_fraction(completions, [ADD_TESTS] * 3,
                                      limits=LIMITS, max_workers=3)
  assert got == [0.0, 0.0, 0.0]


def test_read_report_needs_a_finished_run_and_the_expected_total():
  ok = sandbox.Result(sandbox.PASSED, 0,
                      f"noise\n{verifiable.RESULT_PREFIX}"
                      '{"passed": 2, "total": 3}\n', "", 0.1, 0.1)
  assert verifiable.read_report(ok) == (2, 3)
  assert verifiable.fraction_passed(ok, 3) == pytest.approx(2 / 3)
  assert verifiable.fraction_passed(ok, 4) == 0.0
  crashed = sandbox.Result(sandbox.CRASH, -11, ok.stdout, "", 0.1, 0.1)
  assert verifiable.read_report(crashed) is None
  garbled = sandbox.Result(sandbox.PASSED, 0,
                           verifiable.RESULT_PREFIX + "{oops\n", "", 0.1, 0.1)
  assert verifiable.read_report(garbled) is None


def test_registry_names_rewards_by_string():
  assert verifiable.get("exact_match") is verifiable.exact_match
  assert verifiable.get("unit_tests") is verifiable.unit_test_fraction
  assert verifiable.get("unit_tests_all") is verifiable.unit_test_all
  assert {"exact_match", "unit_tests", "unit_tests_all"} <= set(
      verifiable.names())
  with pytest.raises(ValueError, match="unknown reward 'bleu'; registered"):
    verifiable.get("bleu")
  with pytest.raises(ValueError, match="'exact_match' is already registered"):
    verifiable.register("exact_match")(lambda c, r: [])


def test_unit_test_program_validates_its_tests():
  with pytest.raises(TypeError, match="sequence of test strings"):
    verifiable.unit_test_program("x = 1", "assert x == 1")
  with pytest.raises(ValueError, match="tests must not be empty"):
    verifiable.unit_test_program("x = 1", [])
