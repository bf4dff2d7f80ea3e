"""On-policy preference rounds: sample K responses, score, align, repeat.

Round ``r`` lives in ``workdir/round_<r>``:

1. the policy is the previous round's final parameters (round 0:
   ``config.checkpoint.init_from``, or a fresh init when empty);
2. it samples ``K = data.preference.list_size`` responses for each of
   ``onpolicy.prompts_per_round`` training prompts (:mod:`alignax.generate`),
   a reward function scores them, and the round's records are written to
   ``samples.jsonl`` in the preference record formats of
   :mod:`alignax.data.preference`: ``lists`` (``prompt/responses/scores``)
   for ``objective='lipo'``, else ``pairs`` (best against worst response,
   ties dropped) for DPO and its relatives;
3. ``train.run`` aligns the policy on that file, starting from it and with
   it as the frozen reference (iterative DPO: each round's reference is its
   starting policy).

After each round the policy is evaluated on held-out prompts by greedy
decoding: mean reward and exact-match rate. Rounds resume: a finished round
(its checkpoint reached ``train.steps``) is skipped and its metrics are read
back, an interrupted one resumes from its checkpoints, and its
``samples.jsonl`` is reused. Every process samples the same records
(replicated prompts, the same rng); process 0 writes the files, which must
be on a filesystem all processes read.

The demo task is the embedded docstring -> function-name task
(:mod:`alignax.data.preference_task`) with its computed reward, the
similarity of the sampled name to the true one::

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.onpolicy --config=configs/onpolicy_demo.py \\
      --workdir=/tmp/alignax_onpolicy

or a learned reward: a reward model (``objective='reward_model'``, the
backbone plus a scalar head trained with the Bradley–Terry loss on
preference pairs) named by ``onpolicy.reward_model`` scores the samples
instead (:class:`RewardModelScorer`); the held-out evaluation keeps the
task's own reward, the ground truth the learned one approximates::

  python launch/tpu_train.py --config=configs/dpo_demo.py --workdir=/tmp/rm \\
      --config.objective=reward_model --config.reference=none
  python -m alignax.onpolicy --config=configs/onpolicy_demo.py \\
      --workdir=/tmp/alignax_onpolicy_rm --config.onpolicy.reward_model=/tmp/rm

References:
  Tajwar et al., 2024, Preference Fine-Tuning of LLMs Should Leverage
  Suboptimal, On-Policy Data; Rosset et al., 2024, Direct Nash Optimization.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from alignax import checkpoint as ckpt_lib
from alignax import cli
from alignax import generate as gen
from alignax import init_from
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import train
from alignax.data import preference as preference_data
from alignax.data import preference_task
from alignax.data import tokenizer as tok_lib
from alignax.interop import hf
from alignax.models import heads
from alignax.models.config import ADAPTER_FIELDS
from alignax.objectives import preference

# Objectives trained on K-lists; every other one gets best/worst pairs.
LIST_OBJECTIVES = ("lipo",)
METRICS_FILE = "onpolicy_metrics.json"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt and whatever its reward compares against."""
  text: str
  target: Any = None


class DocstringTask:
  """The embedded docstring -> name task: prompts and a computed reward.

  A response is cut after its first ``(`` (the offline records' form,
  ``"name("``) or newline; its reward is ``difflib`` similarity of the name
  to the true one, 1 for an exact match.
  """

  stop_strings = ("(", "\n")

  def __init__(self, heldout_fraction: float = 0.02):
    self._fraction = heldout_fraction

  def _source(self, split, fmt="pairs", list_size=2):
    return preference_task.DocstringNames(
        split, fmt, list_size=list_size, repeats=1,
        heldout_fraction=self._fraction)

  def prompts(self, split: str, n: int, *, seed: int) -> list[Prompt]:
    """``n`` distinct prompts of ``split``, drawn by ``seed``."""
    source = self._source(split)
    order = np.random.default_rng(seed).permutation(len(source))[:n]
    return [Prompt(*source.candidates(int(i))[:2]) for i in order]

  def clean(self, text: str) -> str:
    cut = min((text.index(s) + (s == "(") for s in self.stop_strings
               if s in text), default=len(text))
    return text[:cut]

  def reward(self, prompt: Prompt, response: str) -> float:
    return preference_task.similarity(prompt.target,
                                      response.removesuffix("("))

  def heldout_records(self, fmt: str, list_size: int) -> list[dict]:
    """The offline held-out records (train.py's eval data)."""
    source = self._source("eval", fmt, list_size)
    return [source[i] for i in range(len(source))]


def stop_token_ids(tokenizer, strings: Sequence[str],
                   vocab_size: int) -> tuple[int, ...]:
  """Ids that end a sample: EOS, base-vocabulary ids whose text contains one
  of ``strings``, and the model's padding ids past the tokenizer's range."""
  ids = {tokenizer.eos_id, *range(tokenizer.vocab_size, vocab_size)}
  for i in range(tokenizer.base_vocab_size):
    if any(s in tokenizer.decode([i]) for s in strings):
      ids.add(i)
  return tuple(sorted(ids))


def sample_records(graphdef, params, tokenizer, prompts: Sequence[Prompt],
                   task, *, k: int, rng, max_prompt_len: int,
                   max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, batch_size: int = 64,
                   mesh=None) -> list[dict]:
  """``K`` scored samples per prompt as ``lists`` records.

  Prompts are tokenized as the preference pipeline does (``[BOS] + ids``,
  keeping the end); samples stop at EOS or a token holding one of the
  task's ``stop_strings`` and are cleaned by ``task.clean``.
  """
  vocab_size = nnx.merge(graphdef, params).cfg.vocab_size
  stops = stop_token_ids(tokenizer, task.stop_strings, vocab_size)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p.text)[-(max_prompt_len - 1):]
         for p in prompts]
  flat = [x for x in ids for _ in range(k)]
  outs = []
  for start in range(0, len(flat), batch_size):
    outs += gen.generate(
        graphdef, params, flat[start:start + batch_size],
        max_new_tokens=max_new_tokens, rng=jax.random.fold_in(rng, start),
        temperature=temperature, top_p=top_p, stop_tokens=stops, mesh=mesh)
  records = []
  for i, prompt in enumerate(prompts):
    texts = [task.clean(tokenizer.decode(
        [t for t in out if t < tokenizer.vocab_size and t != tokenizer.eos_id]))
             for out in outs[i * k:(i + 1) * k]]
    records.append({"prompt": prompt.text, "responses": texts,
                    "scores": [task.reward(prompt, t) for t in texts]})
  return records


class RewardModelScorer:
  """Scores sampled responses with a trained reward model's checkpoint.

  The reward model (``objective='reward_model'``, a
  :class:`~alignax.models.heads.RewardModel`) must share the policy's
  tokenizer and ``config.model``; each response is scored as the row
  ``[BOS] + prompt + response`` (no EOS), truncated as the preference
  pipeline truncates, i.e. at the position its training read.
  """

  def __init__(self, config, path: str, tokenizer, mesh=None):
    self._tok, self._pref = tokenizer, config.data.preference
    cfg = with_recorded_adapters(
        state_lib.build_model_config(config.model, tokenizer), path)
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
    self._graphdef, self._params = init_from.model_params(
        path, cfg, mesh, config.sharding_rules, build=heads.RewardModel)
    self._rows = shd.global_batch_size(mesh)

  def rescore(self, records: Sequence[dict], batch_size: int = 64) -> list[dict]:
    """``records`` (``prompt``/``responses``) with reward-model ``scores``."""
    rows = [score_row(self._tok, self._pref, r["prompt"], t)
            for r in records for t in r["responses"]]
    scores = []
    for n, tokens, segments, _ in score_batches(rows, batch_size, self._rows):
      scores += np.asarray(_score(self._graphdef, self._params, tokens,
                                  segments))[:n].tolist()
    out, i = [], 0
    for r in records:
      k = len(r["responses"])
      out.append(dict(r, scores=scores[i:i + k]))
      i += k
    return out


def score_row(tokenizer, pref, prompt: str,
              response: str) -> tuple[list[int], int]:
  """``([BOS] + prompt + response ids, prompt length)``, no EOS, truncated
  as the preference pipeline truncates (:func:`alignax.data.preference.
  truncate_prompt` with ``pref`` = ``config.data.preference``), i.e. read
  where a reward model's training read."""
  prompt_ids, cap = preference_data.truncate_prompt(
      [tokenizer.bos_id] + tokenizer.encode(prompt), pref)
  # The training row's response: EOS appended, then cut to cap; a response
  # that kept its EOS is scored without it.
  response_ids = (tokenizer.encode(response) + [tokenizer.eos_id])[:cap]
  if response_ids[-1:] == [tokenizer.eos_id]:
    response_ids = response_ids[:-1]
  return prompt_ids + response_ids, len(prompt_ids)


def score_batches(rows, batch_size: int, multiple: int):
  """Padded batches of :func:`score_row` rows: ``(n rows, tokens,
  segment_ids, prompt_mask)``, ``batch_size`` rounded up to ``multiple``
  (the mesh's batch ways), lengths in the generator's fixed buckets."""
  batch_size = -(-batch_size // multiple) * multiple
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    length = gen.bucket_length(max(len(ids) for ids, _ in chunk),
                               gen.DEFAULT_LENGTH_BUCKETS)
    tokens = np.zeros((batch_size, length), np.int32)
    segments = np.zeros_like(tokens)
    prompt_mask = np.zeros(tokens.shape, bool)
    for i, (ids, prompt_len) in enumerate(chunk):
      tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
      prompt_mask[i, :prompt_len] = True
    yield len(chunk), tokens, segments, prompt_mask


def with_recorded_adapters(cfg, path: str):
  """``cfg`` with the LoRA adapters (and quantization) that the run of
  ``path`` trained with, as its recorded model config says: a reward model
  trained with ``config.lora`` scores with its adapters, whatever the
  policy's own ``config.lora``."""
  if not path or hf.is_hf_dir(path):
    return cfg
  recorded = ckpt_lib.read_model_config(path)
  if not recorded or not recorded.get("lora_rank"):
    return cfg
  return dataclasses.replace(cfg, **{
      f: tuple(recorded[f]) if f == "lora_targets" else recorded[f]
      for f in ADAPTER_FIELDS if f in recorded})


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, tokens, segment_ids):
  return nnx.merge(graphdef, params).score(tokens, segment_ids)


def to_pairs(records: Sequence[dict]) -> list[dict]:
  """Best against worst response of each list; all-tie lists are dropped."""
  pairs = []
  for r in records:
    scores = np.asarray(r["scores"])
    if scores.max() > scores.min():
      pairs.append({"prompt": r["prompt"],
                    "chosen": r["responses"][int(scores.argmax())],
                    "rejected": r["responses"][int(scores.argmin())]})
  return pairs


def evaluate(graphdef, params, tokenizer, prompts, task, *, max_prompt_len,
             max_new_tokens, mesh=None) -> dict[str, float]:
  """Greedy held-out mean reward and exact-match rate (reward 1)."""
  records = sample_records(
      graphdef, params, tokenizer, prompts, task, k=1, rng=jax.random.key(0),
      max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
      temperature=0.0, mesh=mesh)
  rewards = np.array([r["scores"][0] for r in records])
  return {"heldout/mean_reward": float(rewards.mean()),
          "heldout/exact_match": float((rewards == 1.0).mean())}


def write_jsonl(path, records):
  """``records`` as JSONL at ``path`` (atomic; process 0 writes)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def _finished(round_dir, steps) -> bool:
  directory = os.path.join(round_dir, "checkpoints")
  done = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
  return steps in done and os.path.exists(os.path.join(round_dir, METRICS_FILE))


def needs_reference(config) -> bool:
  """False for rejection-sampling fine-tuning (``objective='dpo'`` with
  ``preference.loss_type='sft'``: the chosen NLL alone), which reads no
  reference model; every other objective's rounds use a frozen one."""
  return config.objective != "dpo" or preference.reads_reference(config)


def _round_config(config, samples, eval_path, policy, fmt):
  c = copy.deepcopy(config)
  c.checkpoint.init_from = policy or ""
  c.reference = "frozen" if needs_reference(config) else "none"
  c.data.source = "jsonl"
  c.data.paths = (samples,)
  c.data.eval_paths = (eval_path,)
  c.data.preference.format = fmt
  return c


class _Policy:
  """The sampling side: tokenizer, graphdef, mesh and parameter loading."""

  def __init__(self, config, workdir):
    self.tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
    # With config.lora the policy's adapters are part of what is loaded.
    self.model_cfg = state_lib.apply_lora_config(
        state_lib.build_model_config(config.model, self.tokenizer),
        config.lora)
    self.mesh = shd.make_mesh(config.mesh)
    self.seed, self.rules = config.seed, config.sharding_rules
    self.graphdef, _ = state_lib.abstract_model(self.model_cfg)

  def params(self, path):
    """A checkpoint's (or HF directory's) parameters; the run's fresh init
    when ``path`` is None."""
    return init_from.model_params(path or "", self.model_cfg, self.mesh,
                                  self.rules, seed=self.seed)[1]


def policy_path(config, workdir: str) -> str:
  """Where the policy after ``config.onpolicy.rounds`` rounds lives: the
  last round's directory (``checkpoint.init_from`` with no rounds)."""
  rounds = int(config.onpolicy.rounds)
  if rounds == 0:
    return config.checkpoint.init_from
  return os.path.join(workdir, f"round_{rounds - 1}")


def run(config, workdir: str, task=None, *, scorer=None,
        evaluate_fn=None) -> list[dict[str, float]]:
  """Runs (or resumes) ``config.onpolicy.rounds`` rounds; per-round metrics.

  The first entry (round -1) evaluates the starting policy (kept in
  ``workdir/initial_onpolicy_metrics.json``, read back on resume); each
  later one holds the round's last train/eval metrics and its held-out
  evaluation (``round_<r>/onpolicy_metrics.json``).

  Args:
    config: the run's config (``onpolicy``, ``data.preference``, ...).
    workdir: root of the rounds.
    task: prompts, ``clean``, ``reward`` and ``heldout_records`` (default
      :class:`DocstringTask`).
    scorer: replaces the task's rewards of each round's samples
      (``rescore(records, batch_size)``); default the reward model of
      ``onpolicy.reward_model``, if any.
    evaluate_fn: ``(graphdef, params, tokenizer, heldout prompts, mesh) ->
      metrics`` of a policy (default :func:`evaluate`).
  """
  task = task or DocstringTask(config.data.heldout_fraction)
  op, pref = config.onpolicy, config.data.preference
  config = hf.run_config(copy.deepcopy(config))  # an HF init_from's model
  if not config.tokenizer.cache_dir:  # one tokenizer for all rounds
    config.tokenizer.cache_dir = os.path.join(workdir, "tokenizer")
  sampler = _Policy(config, workdir)
  if scorer is None and op.reward_model:
    scorer = RewardModelScorer(config, op.reward_model, sampler.tokenizer,
                               sampler.mesh)
  fmt = "lists" if config.objective in LIST_OBJECTIVES else "pairs"
  eval_path = os.path.join(workdir, f"eval_{fmt}.jsonl")
  if not os.path.exists(eval_path):
    write_jsonl(eval_path, task.heldout_records(fmt, pref.list_size))
  heldout = task.prompts("eval", op.eval_prompts, seed=0)
  eval_kw = dict(max_prompt_len=pref.max_prompt_len,
                 max_new_tokens=op.max_new_tokens, mesh=sampler.mesh)

  def held_out(params):
    if evaluate_fn is not None:
      return evaluate_fn(sampler.graphdef, params, sampler.tokenizer,
                         heldout, sampler.mesh)
    return evaluate(sampler.graphdef, params, sampler.tokenizer, heldout,
                    task, **eval_kw)

  policy = config.checkpoint.init_from or None
  # Round -1, the starting policy's held-out evaluation: written once and
  # read back on resume (it is the baseline every round is judged by).
  initial_path = os.path.join(workdir, "initial_" + METRICS_FILE)
  if os.path.exists(initial_path):
    with open(initial_path) as f:
      history = [json.load(f)]
  else:
    history = [dict(held_out(sampler.params(policy)), round=-1)]
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(initial_path + ".tmp", "w") as f:
        json.dump(history[0], f, indent=2)
      os.replace(initial_path + ".tmp", initial_path)
  for r in range(op.rounds):
    round_dir = os.path.join(workdir, f"round_{r}")
    if _finished(round_dir, config.train.steps):
      with open(os.path.join(round_dir, METRICS_FILE)) as f:
        history.append(json.load(f))
      policy = round_dir
      continue
    samples = os.path.join(round_dir, "samples.jsonl")
    if not os.path.exists(samples):
      records = sample_records(
          sampler.graphdef, sampler.params(policy), sampler.tokenizer,
          task.prompts("train", op.prompts_per_round, seed=config.seed + r),
          task, k=pref.list_size, rng=jax.random.key(config.seed + r),
          temperature=op.temperature, top_p=op.top_p,
          batch_size=op.sample_batch, **eval_kw)
      if scorer is not None:  # the learned reward replaces the task's
        records = scorer.rescore(records, op.sample_batch)
      write_jsonl(samples, records if fmt == "lists" else to_pairs(records))
    trainer, last = train.run(
        _round_config(config, samples, eval_path, policy, fmt), round_dir)
    metrics = dict(last, round=r, **held_out(trainer.state.params))
    if jax.process_index() == 0:
      with open(os.path.join(round_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    history.append(metrics)
    policy = round_dir
  return history


def _print_rounds(config, workdir):
  for h in run(config, workdir):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in h.items()
                      if k.startswith(("heldout/", "eval/rewards", "round",
                                       "eval/logps/acc"))}))


if __name__ == "__main__":
  cli.config_command(_print_rounds, "Root of the rounds.")
