"""The one-line function task: problems, split, rewards in the sandbox."""
import json
import re

import pytest

from alignax import defaults
from alignax import rl
from alignax.data import function_task as ft


def _template(p):
  """The problem's expression with its arguments as {0}, {1}."""
  expr = p.expression
  for i, arg in enumerate(p.args):
    expr = re.sub(rf"\b{arg}\b", f"{{{i}}}", expr)
  return expr


def test_every_template_argument_and_name_combination_is_a_problem():
  problems = ft.all_problems()
  expected = sum(len(t) * len(ft.ARGUMENTS[k]) * len(ft.FUNCTION_NAMES)
                 for k, t in ft.TEMPLATES.items())
  assert len(problems) == expected == 1240
  assert len({p.key for p in problems}) == len(problems)


def test_split_is_disjoint_stable_and_covers_every_template():
  task = ft.FunctionTask(0.25)
  train, heldout = task.problems("train"), task.problems("heldout")
  assert len(train) + len(heldout) == len(ft.all_problems())
  assert not {p.key for p in train} & {p.key for p in heldout}
  assert 0.2 < len(heldout) / len(ft.all_problems()) < 0.3
  assert [p.key for p in ft.FunctionTask(0.25).problems("eval")] == [
      p.key for p in heldout]
  every = {t for ts in ft.TEMPLATES.values() for t in ts}
  assert {_template(p) for p in heldout} == every
  assert {_template(p) for p in train} == every


def test_prompt_states_the_expression_and_a_checked_example():
  p = next(p for p in ft.all_problems()
           if p.expression == "max(a, b)" and p.name == "compute")
  assert p.prompt.startswith("# Complete the function body.\n"
                             "def compute(a, b):\n"
                             '    """Return max(a, b).\n')
  call, result = p.example
  assert f"    >>> {call}\n    {result}\n" in p.prompt
  assert eval(call, {"compute": max}) == eval(result)  # pylint: disable=eval-used
  assert p.solution == "    return max(a, b)\n"
  # The hand-checked edge cases come first: a zero, a zero divisor-free
  # pair and a sign change.
  assert p.tests[:3] == ("assert compute(0, 4) == 4",
                         "assert compute(5, 0) == 5",
                         "assert compute(-3, 3) == 3")


def test_reference_bodies_score_one_partial_answers_partial_credit():
  task = ft.FunctionTask(0.25)
  first = {}
  for p in ft.all_problems():  # one problem per template and kind
    first.setdefault((p.kind, _template(p)), p)
  prompts = [ft.Prompt(p.prompt, p) for p in first.values()]
  assert len(prompts) == sum(len(t) for t in ft.TEMPLATES.values())
  assert task.rewards(prompts, [p.target.solution for p in prompts]) == [
      1.0] * len(prompts)
  sub = next(p for p in prompts if p.target.expression == "a - b")
  crash = "    raise SystemExit(3)\n"
  loop_free_wrong = "    return b\n"
  rewards = task.rewards([sub] * 5, [
      "    return a\n",              # right only for (5, 0)
      loop_free_wrong,               # right for none of the tests
      crash,
      "    return a -",              # a syntax error
      "    return a - b\nprint('after the body')\n"])  # cut at column 0
  assert rewards == [0.25, 0.0, 0.0, 0.0, 1.0]
  strict = ft.FunctionTask(0.25, all_or_nothing=True)
  assert strict.rewards([sub, sub], ["    return a\n", "    return a - b"]) == [
      0.0, 1.0]


def test_write_jsonl_holds_train_prompts_with_their_bodies(tmp_path):
  path = tmp_path / "train.jsonl"
  n = ft.write_jsonl(str(path), "train")
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert n == len(records) == len(ft.FunctionTask().problems("train"))
  first = ft.FunctionTask().problems("train")[0]
  assert records[0]["text"] == first.prompt + first.solution


def test_rl_builds_the_function_task_and_checks_the_name():
  c = defaults.base_config()
  c.grpo.task = "function"
  assert isinstance(rl.build_task(c), ft.FunctionTask)
  with pytest.raises(ValueError, match="heldout_fraction"):
    ft.FunctionTask(1.0)


def test_grpo_demo_function_variant_is_a_valid_run_config():
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  spec = importlib.util.spec_from_file_location(
      "grpo_demo", os.path.join(root, "configs", "grpo_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = rl.prepare_config(module.get_config("function"), "/tmp/unused")
  assert c.grpo.task == "function" and c.grpo.prompt_mode == ""
  assert c.train.batch_size == 8 * 8  # prompts x G
  assert module.get_config().grpo.task == "code"  # the default is kept
  with pytest.raises(ValueError, match="variant 'function'"):
    module.get_config("fn")
