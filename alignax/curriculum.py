"""Curry-DPO: ranked pairs from graded lists, trained easy to hard.

From graded lists (``{"prompt", "responses": [...], "scores": [...]}``,
higher is better; JSONL files in ``data.paths``) every prompt gives several
preference pairs (``curriculum.pairing``):

* ``best_vs_rest``: the best response against each other one (the paper's
  setting: with 4 ranked responses, ``(R1, R4)``, ``(R1, R3)``, ``(R1, R2)``);
* ``all``: every two responses with different scores.

Within a prompt the pairs are ranked by their score gap, largest first (the
easiest to tell apart); a pair of rank ``i`` goes to stage
``min(i, stages - 1)``, so with 4 responses, ``best_vs_rest`` and 3 stages
each stage holds one pair per prompt, as in the paper. Ties in a gap keep
the responses' order. Stage ``s`` lives in ``workdir/stage_<s>``: its pairs
(``pairs.jsonl``, the ``pairs`` record format) are trained by
:func:`alignax.train.run` from stage ``s - 1``'s final parameters
(stage 0: ``checkpoint.init_from``), with those starting parameters as the
frozen reference: the reference moves to the previous stage's policy
between stages (the paper's iterative Curry-DPO). Stages resume: a finished
one is skipped, an interrupted one resumes from its checkpoints::

  python -m alignax.curriculum --config=configs/dpo_demo.py \\
      --workdir=/tmp/curry --config.data.source=jsonl \\
      --config.data.paths=graded.jsonl \\
      --config.data.eval_paths=graded_eval.jsonl --config.curriculum.stages=3

Held-out lists (``data.eval_paths``) are evaluated as their best-vs-worst
pairs in every stage.

References:
  Pattnaik et al., 2024, Curry-DPO: Enhancing Alignment using Curriculum
  Learning & Ranked Preferences.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Sequence

import jax
import ml_collections

from alignax import cli
from alignax import train

PAIRINGS = ("best_vs_rest", "all")
METRICS_FILE = "stage_metrics.json"


def _read_lists(paths: Sequence[str]) -> list[dict]:
  """Graded lists of ``paths``; a malformed line is an error naming it."""
  out = []
  for path in paths:
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not JSON ({e.msg})") from None
        responses, scores = record.get("responses"), record.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list) or (
            len(responses) != len(scores)):
          raise ValueError(f"{where}: a graded list needs 'responses' and "
                           "'scores' lists of one length")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                   and math.isfinite(s) for s in scores):
          raise ValueError(f"{where}: field 'scores' must hold finite "
                           f"numbers, got {scores!r:.60}")
        out.append(record)
  return out


def ranked_pairs(record: dict, *, pairing: str = "best_vs_rest") -> list[dict]:
  """A graded list's pairs, largest score gap first, each with its ``gap``."""
  if pairing not in PAIRINGS:
    raise ValueError(f"config.curriculum.pairing={pairing!r} not in "
                     f"{PAIRINGS}")
  order = sorted(range(len(record["scores"])),
                 key=lambda i: -record["scores"][i])  # stable: ties keep order
  scores, responses = record["scores"], record["responses"]
  if pairing == "best_vs_rest":
    candidates = [(order[0], j) for j in order[1:]]
  else:
    candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
  pairs = [{"prompt": record["prompt"], "chosen": responses[i],
            "rejected": responses[j], "gap": scores[i] - scores[j]}
           for i, j in candidates if scores[i] > scores[j]]
  return sorted(pairs, key=lambda p: -p["gap"])


def stage_pairs(records: Iterable[dict], *, stages: int,
                pairing: str = "best_vs_rest") -> list[list[dict]]:
  """``stages`` lists of pairs: a prompt's pair of gap rank ``i`` goes to
  stage ``min(i, stages - 1)`` (easy first)."""
  if stages < 1:
    raise ValueError(f"config.curriculum.stages={stages} must be >= 1")
  out = [[] for _ in range(stages)]
  for record in records:
    for rank, pair in enumerate(ranked_pairs(record, pairing=pairing)):
      out[min(rank, stages - 1)].append(pair)
  return out


def heldout_pairs(records: Iterable[dict]) -> list[dict]:
  """Best against worst response of each held-out list (ties dropped)."""
  return [p[0] for p in (ranked_pairs(r, pairing="all") for r in records) if p]


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      for r in records:
        f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                + "\n")
    os.replace(path + ".tmp", path)


def stage_config(config: ml_collections.ConfigDict, pairs_path: str,
                 eval_path: str, start: str) -> ml_collections.ConfigDict:
  """One stage's run: its pairs, and its start as the frozen reference."""
  c = copy.deepcopy(config)
  c.checkpoint.init_from = start
  c.reference = "frozen"
  c.data.source = "jsonl"
  c.data.paths = (pairs_path,)
  c.data.eval_paths = (eval_path,)
  c.data.preference.format = "pairs"
  return c


def _finished(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, METRICS_FILE))


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the stages; each stage's last train/eval metrics."""
  cur = config.curriculum
  if config.objective != "dpo" or config.data.source != "jsonl":
    raise ValueError("Curry-DPO trains objective='dpo' on graded lists in "
                     "JSONL files: set config.objective='dpo' and "
                     "config.data.source='jsonl' (data.paths, data.eval_paths)")
  if not config.data.paths or not config.data.eval_paths:
    raise ValueError("config.data.paths and config.data.eval_paths must name "
                     "graded-list JSONL files")
  stages = stage_pairs(_read_lists(config.data.paths), stages=int(cur.stages),
                       pairing=cur.pairing)
  if not all(stages):
    sizes = [len(s) for s in stages]
    raise ValueError(f"config.curriculum.stages={cur.stages} leaves a stage "
                     f"without pairs (pairs per stage: {sizes}): use fewer")
  eval_path = os.path.join(workdir, "eval_pairs.jsonl")
  _write_jsonl(eval_path, heldout_pairs(_read_lists(config.data.eval_paths)))
  if not config.tokenizer.cache_dir:  # one tokenizer for every stage
    config = copy.deepcopy(config)
    config.tokenizer.cache_dir = os.path.join(workdir, "tokenizer")
  history, start = [], config.checkpoint.init_from
  for s, pairs in enumerate(stages):
    stage_dir = os.path.join(workdir, f"stage_{s}")
    if _finished(stage_dir):
      with open(os.path.join(stage_dir, METRICS_FILE)) as f:
        history.append(json.load(f))
      start = stage_dir
      continue
    pairs_path = os.path.join(stage_dir, "pairs.jsonl")
    _write_jsonl(pairs_path, pairs)
    _, last = train.run(stage_config(config, pairs_path, eval_path, start),
                        stage_dir)
    metrics = dict(last, stage=s, pairs=len(pairs),
                   mean_gap=sum(p["gap"] for p in pairs) / len(pairs))
    if jax.process_index() == 0:
      with open(os.path.join(stage_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    history.append(metrics)
    start = stage_dir
  return history


def _print_stages(config, workdir):
  for h in run(config, workdir):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in h.items()
                      if k in ("stage", "pairs", "mean_gap", "step")
                      or k.startswith(("eval/loss", "eval/rewards/acc"))}))


if __name__ == "__main__":
  cli.config_command(_print_stages, "Root of the stages.")
