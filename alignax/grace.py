"""GRACE on the one state: the policy's rationales become its embeddings.

GRACE (Sun et al., 2025) trains an LM as a text encoder with a policy
gradient: the policy writes a rationale for each text, the embedding of a
text is the mean of the policy's final hidden states over its rationale (and,
as the authors pool it, the text it read), and the contrastive score of that
embedding is the reward (:mod:`alignax.rewards.grace`) that GRPO
(:mod:`alignax.objectives.grpo`) maximises. Generation, embedding and the
train step all use the one parameter tree on the one mesh.

This module has the pieces and the task:

* :func:`rationale_embeddings`: jitted masked mean of ``Transformer(...,
  return_hidden=True)`` states (no logits), rows over the mesh's batch axes;
  :func:`embed` runs it over any number of rows;
* :data:`QUERY_TEMPLATE`, :data:`DOC_TEMPLATE`, :func:`prompt_ids`: how a
  text becomes a rationale prompt for the demo model, which completes
  Python (a docstring is followed by code, code by a ``#`` comment line);
* :func:`rationale_rows`: prompt + rationale rows (the token fields of the
  rollout batch of :mod:`alignax.objectives.grpo`) and the pooling mask;
* :class:`GraceTask`: docstring -> code pairs of the embedded corpus
  (:func:`alignax.data.retrieval_task.code_search_pairs`); each rollout
  (:func:`grace_rollout`) samples one anchor rationale per text
  (temperature ``grpo.grace.anchor_temperature``, 0.5 as the authors) and
  ``G`` rationales of each document (and, with ``grpo.grace.train_queries``,
  of each query), scores every sample against its partner's anchor, and
  returns the rows of the GRPO rollout batch with their rewards;
* :func:`evaluate`: greedy rationales of held-out queries and documents,
  their embeddings and Recall@k / MRR@10 by :func:`alignax.retrieval.
  retrieve` (cosine), beside the same model's plain mean-pooled embeddings
  of the raw texts (no rationale);
* the loop is :mod:`alignax.rl` with ``grpo.task='grace'``: each rollout
  step takes the next ``grpo.prompts_per_step`` training pairs, calls
  :meth:`GraceTask.rollout` with the trainer's current parameters, builds
  the GRPO rollout batch of the returned rows and rewards and runs the
  jitted train step; its held-out evaluation is :meth:`GraceTask.evaluate`
  (``eval/rationale/...``, ``eval/plain/...``)::

    python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
    python -m alignax.rl --config=configs/grace_demo.py --workdir=/tmp/alignax_grace

What follows the authors' code (github.com/GasolSun36/GRACE, f636fdc:
``verl/workers/reward_manager/grace.py``, ``vllm_rollout_spmd.py``,
``train.sh``): the reward terms and weights, the last layer's hidden states
mean-pooled over the text and its rationale with the instruction excluded
(``grpo.grace.pool='text_and_rationale'``; ``'rationale'`` pools the
rationale only), L2-normalised; one anchor rationale per partner text at
temperature 0.5; -1 for a rationale that never stops. What differs: the
authors train only the document's rationales (``train_queries=False``
here) and use an explicit hard negative per pair; the embedded pairs have
none, so the ``negative`` term is 0 and the in-batch ``cross_group`` term
carries the negatives. The instruction prompt is replaced by the templates
below, which a small code LM can continue.

References:
  Sun et al., 2025, GRACE: Generative Representation Learning via
  Contrastive Policy Optimization (arXiv:2510.04506; ICLR 2026).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignax import generate as gen
from alignax import retrieval
from alignax import sharding as shd
from alignax.data import retrieval_task
from alignax.interop import hf
from alignax.rewards import grace as grace_rewards

POOLS = ("text_and_rationale", "rationale")
STOP_STRINGS = ("\n",)  # a rationale is one line


@dataclasses.dataclass(frozen=True)
class Template:
  """A rationale prompt: ``head + text + tail``, then the rationale."""
  head: str
  tail: str


# A docstring is followed by the code it documents; code by a comment on it.
QUERY_TEMPLATE = Template(head='"""', tail='"""\n')
DOC_TEMPLATE = Template(head="", tail="\n# ")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One rationale prompt: its ids and where the text sits in them."""
  ids: tuple[int, ...]
  text_span: tuple[int, int]  # [start, end) of the text's ids


def prompt_ids(tokenizer, text: str, template: Template, *, room: int,
               mode: str = "") -> Prompt:
  """``[mode or BOS] + head + text + tail`` in at most ``room`` ids.

  The text keeps its start (a function's signature, a docstring's summary)
  when it must be cut; the template is never cut.
  """
  head = [tokenizer.mode_id(mode)] if mode else [tokenizer.bos_id]
  head += tokenizer.encode(template.head) if template.head else []
  tail = tokenizer.encode(template.tail) if template.tail else []
  keep = room - len(head) - len(tail)
  if keep < 1:
    raise ValueError(f"room={room} ids leave no room for a text between "
                     f"{len(head)} head and {len(tail)} tail ids.")
  text = tokenizer.encode(text)[:keep]
  return Prompt(tuple(head + text + tail),
                (len(head), len(head) + len(text)))


def rationale_rows(prompts: Sequence[Prompt],
                   completions: Sequence[Sequence[int]], *, seq_len: int,
                   stop_tokens: Sequence[int], pool: str = "text_and_rationale",
                   prefix: bool = False) -> tuple[dict, np.ndarray]:
  """The rows ``prompt + rationale``: the rollout batch and the pooling mask.

  Row ``i`` is ``prompts[i // G] + completions[i]`` (``G = len(completions)
  / len(prompts)``), the completion cut after its first stop token,
  right-padded to ``seq_len + 1`` ids and shifted by one, in the rollout
  batch format of :mod:`alignax.objectives.grpo`: ``weights`` is 1 on the
  rationale's targets (through its stop token). ``prefix`` marks the prompts
  as prefix-LM prefixes (UL2 modes).

  Returns:
    ``(batch, mask)``: ``batch`` with ``inputs``, ``targets``,
    ``positions``, ``segment_ids`` (int32, ``[B, seq_len]``), ``weights``
    (float32), ``prefix`` (bool, with ``prefix``) and host-only
    ``truncated`` ``[B]`` (never stopped) and ``completion_lengths`` ``[B]``;
    ``mask`` ``[B, seq_len]`` float32 over ``inputs``: 1 on the rationale's
    ids (through its stop token), and on the text's with
    ``pool='text_and_rationale'``.
  """
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}: use one of {list(POOLS)}")
  q, b = len(prompts), len(completions)
  if not q or b % q:
    raise ValueError(f"{b} completions do not make whole groups over {q} "
                     "prompts.")
  g, stops = b // q, {int(t) for t in stop_tokens}
  rows = np.zeros((b, seq_len + 1), np.int32)
  weights = np.zeros((b, seq_len), np.float32)
  mask = np.zeros((b, seq_len), np.float32)
  starts, lengths = np.zeros(b, np.int64), np.zeros(b, np.int64)
  truncated = np.ones(b, bool)
  for i, c in enumerate(completions):
    p, c = prompts[i // g], [int(t) for t in c]
    cut = next((k + 1 for k, t in enumerate(c) if t in stops), None)
    if cut is not None:
      c, truncated[i] = c[:cut], False
    n = len(p.ids) + len(c)
    if n > seq_len + 1:
      raise ValueError(f"row {i}: prompt {len(p.ids)} + completion {len(c)} "
                       f"ids exceed seq_len + 1 = {seq_len + 1}.")
    rows[i, :n] = list(p.ids) + c
    weights[i, len(p.ids) - 1:n - 1] = 1.0  # targets rows[len(p):n]
    mask[i, len(p.ids):min(n, seq_len)] = 1.0  # inputs hold rows[:seq_len]
    if pool == "text_and_rationale":
      mask[i, p.text_span[0]:p.text_span[1]] = 1.0
    starts[i], lengths[i] = len(p.ids), len(c)
  batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
           "positions": np.tile(np.arange(seq_len, dtype=np.int32), (b, 1)),
           "segment_ids": (np.arange(seq_len)[None]
                           < (starts + lengths)[:, None]).astype(np.int32),
           "weights": weights, "truncated": truncated,
           "completion_lengths": lengths}
  if prefix:
    batch["prefix"] = np.arange(seq_len)[None] < starts[:, None]
  return batch, mask


# --- embeddings -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
@shd.with_activation_sharding
def rationale_embeddings(graphdef, params, rows, masks, *, positions=None,
                         segment_ids=None, prefix=None, mesh=None,
                         rules=shd.DEFAULT_RULES):
  """``[N, D]`` float32 means of the final hidden states over ``masks``.

  Args:
    graphdef, params: the policy (``nnx.split``).
    rows: ``[N, T]`` int token ids (prompt + rationale, right-padded).
    masks: ``[N, T]`` pooling weights (1 on the pooled tokens); a row with
      none gives zeros.
    positions, segment_ids, prefix: as :class:`~alignax.models.transformer.
      Transformer` (default ``arange(T)``, all ones, causal).
    mesh, rules: activation sharding (rows over the batch axes).
  """
  del mesh, rules  # the decorator's activation sharding
  model = nnx.merge(graphdef, params)
  h = model(rows, positions=positions, segment_ids=segment_ids, prefix=prefix,
            return_hidden=True).astype(jnp.float32)  # [N, T, D]
  m = masks.astype(jnp.float32)
  total = jnp.einsum("ntd,nt->nd", h, m)  # [N, D]
  return total / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)


MODEL_FIELDS = ("inputs", "positions", "segment_ids", "prefix")


def embed(graphdef, params, batch: dict, mask: np.ndarray, *, mesh=None,
          rules=shd.DEFAULT_RULES, batch_size: int = 64) -> np.ndarray:
  """Host ``[B, D]`` :func:`rationale_embeddings` of a host batch, in
  chunks of ``batch_size`` rows (padded, so one compile per shape)."""
  ways = shd.global_batch_size(mesh) if mesh is not None else 1
  size = -(-batch_size // ways) * ways
  n, out = len(mask), []
  rules = tuple(map(tuple, rules))
  for start in range(0, n, size):
    rows = {k: batch[k][start:start + size] for k in MODEL_FIELDS
            if k in batch}
    rows["mask"] = mask[start:start + size]
    count = len(rows["mask"])
    rows = {k: np.concatenate([v, np.zeros((size - count,) + v.shape[1:],
                                           v.dtype)]) for k, v in rows.items()}
    if mesh is not None:
      rows = {k: retrieval.global_rows(v, mesh) for k, v in rows.items()}
    emb = rationale_embeddings(
        graphdef, params, rows["inputs"], rows["mask"],
        positions=rows["positions"], segment_ids=rows["segment_ids"],
        prefix=rows.get("prefix"), mesh=mesh, rules=rules)
    if mesh is not None:
      emb = multihost_utils.process_allgather(emb, tiled=True)
    out.append(np.asarray(emb)[:count])
  return np.concatenate(out)


# --- sampling ---------------------------------------------------------------------


@dataclasses.dataclass
class Policy:
  """What sampling and embedding need: the model, its tokenizer, the mesh."""
  graphdef: object
  params: object
  tokenizer: object
  mesh: object = None
  rules: tuple = shd.DEFAULT_RULES
  mode: str = ""  # UL2 mode token of the prompts ("" = BOS, causal)
  batch_size: int = 64  # rows per embedding call
  room: int = 0  # prompt slots (> 0: one prompt and cache bucket, one compile)

  @functools.cached_property
  def vocab_size(self) -> int:
    return nnx.merge(self.graphdef, self.params).cfg.vocab_size

  @functools.cached_property
  def stop_tokens(self) -> tuple[int, ...]:
    """EOS, the model's padding ids and every id whose text holds a
    :data:`STOP_STRINGS` (as :func:`alignax.onpolicy.stop_token_ids`)."""
    tok, vocab = self.tokenizer, self.vocab_size
    ids = {tok.eos_id, *range(tok.vocab_size, vocab)}
    ids |= {i for i in range(tok.base_vocab_size)
            if any(s in tok.decode([i]) for s in STOP_STRINGS)}
    return tuple(sorted(ids))

  @functools.cached_property
  def suppressed(self) -> tuple[int, ...]:
    """Reserved ids (sentinels, modes, padding rows) and BOS: never sampled."""
    return tuple(sorted(set(hf.suppressed_ids(self.tokenizer, self.vocab_size))
                        | {self.tokenizer.bos_id}))

  def sample(self, prompts: Sequence[Prompt], *, k: int, max_new_tokens: int,
             temperature: float, rng) -> list[list[int]]:
    """``k`` rationales of each prompt, prompt-major."""
    buckets = ((self.room, self.room + max_new_tokens) if self.room
               else gen.DEFAULT_LENGTH_BUCKETS)
    return gen.generate(
        self.graphdef, self.params, [list(p.ids) for p in prompts
                                     for _ in range(k)],
        max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
        stop_tokens=self.stop_tokens, suppress_tokens=self.suppressed,
        length_buckets=buckets, mesh=self.mesh, rules=self.rules,
        prefix_lm=bool(self.mode))

  def embed_rows(self, prompts, completions, *, seq_len: int, pool: str):
    """``(embeddings [B, D], batch, mask)`` of prompt + rationale rows."""
    batch, mask = rationale_rows(prompts, completions, seq_len=seq_len,
                                 stop_tokens=self.stop_tokens, pool=pool,
                                 prefix=bool(self.mode))
    return embed(self.graphdef, self.params, batch, mask, mesh=self.mesh,
                 rules=self.rules, batch_size=self.batch_size), batch, mask


# --- the task ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """``config.grpo.grace`` and the rollout fields GRACE reads."""
  num_generations: int = 4
  max_new_tokens: int = 16
  seq_len: int = 128
  temperature: float = 1.0  # sampling temperature of the trained rationales
  anchor_temperature: float = 0.5
  reward_temperature: float = 0.1
  clustering_weight: float = 0.2
  cross_group_weight: float = 0.2
  length_penalty: bool = True
  train_queries: bool = True
  pool: str = "text_and_rationale"
  mode: str = ""
  reward: str = "grace"  # grace | infonce (alignax.rewards.grace)

  @property
  def room(self) -> int:
    """Prompt ids that leave room for a rationale within ``seq_len``."""
    return self.seq_len - self.max_new_tokens

  @classmethod
  def from_config(cls, config) -> "Settings":
    g, r = config.grpo, config.grpo.grace
    return cls(num_generations=g.num_generations,
               max_new_tokens=g.max_completion_length,
               seq_len=config.train.seq_len, temperature=g.temperature,
               anchor_temperature=r.anchor_temperature,
               reward_temperature=r.temperature,
               clustering_weight=r.clustering_weight,
               cross_group_weight=r.cross_group_weight,
               length_penalty=r.length_penalty,
               train_queries=r.train_queries, pool=r.pool,
               mode=g.prompt_mode, reward=r.reward)


@dataclasses.dataclass
class Scored:
  """One GRACE rollout on the host: rows, rewards and their terms."""
  prompts: list[Prompt]  # one per group (documents, then queries)
  completions: list[list[int]]  # G per group, group-major
  rewards: np.ndarray  # [B] total reward (length penalty applied)
  terms: dict[str, np.ndarray]  # [B] each: GRACE's terms / tau
  truncated: np.ndarray  # [B] bool
  batch: dict  # the rows (rationale_rows): the rollout batch's token fields


def text_prompts(tokenizer, pairs, s: Settings):
  """``(query prompts, document prompts)`` of ``pairs``."""
  q = [prompt_ids(tokenizer, p["query"], QUERY_TEMPLATE, room=s.room,
                  mode=s.mode) for p in pairs]
  d = [prompt_ids(tokenizer, p["positive"], DOC_TEMPLATE, room=s.room,
                  mode=s.mode) for p in pairs]
  return q, d


def _score_side(anchor_emb, sample_emb, truncated, s: Settings):
  g = s.num_generations
  if s.reward == "infonce":
    total, terms = grace_rewards.infonce_rewards(
        anchor_emb, sample_emb, num_generations=g,
        temperature=s.reward_temperature)
  else:
    total, terms = grace_rewards.grace_rewards(
        np.repeat(anchor_emb, g, axis=0), sample_emb, num_generations=g,
        temperature=s.reward_temperature,
        clustering_weight=s.clustering_weight,
        cross_group_weight=s.cross_group_weight)
  if s.length_penalty:
    total = grace_rewards.length_penalized(total, truncated)
  return total, terms


def grace_rollout(policy: Policy, pairs, s: Settings, rng) -> Scored:
  """Samples and scores one GRACE rollout of ``pairs`` (P pairs).

  Anchors: one rationale per query and per document at
  ``anchor_temperature``; samples: ``G`` rationales per document (then per
  query with ``train_queries``) at ``temperature``. A document's samples are
  scored against its query's anchor, a query's against its document's.
  Groups: the ``P`` documents, then the ``P`` queries.
  """
  q, d = text_prompts(policy.tokenizer, pairs, s)
  p, g = len(pairs), s.num_generations
  rng_anchor, rng_sample = jax.random.split(rng)
  anchors = policy.sample(q + d, k=1, max_new_tokens=s.max_new_tokens,
                          temperature=s.anchor_temperature, rng=rng_anchor)
  anchor_emb, _, _ = policy.embed_rows(q + d, anchors, seq_len=s.seq_len,
                                       pool=s.pool)
  groups = d + q if s.train_queries else d
  outs = policy.sample(groups, k=g, max_new_tokens=s.max_new_tokens,
                       temperature=s.temperature, rng=rng_sample)
  emb, batch, _ = policy.embed_rows(groups, outs, seq_len=s.seq_len,
                                    pool=s.pool)
  truncated = batch["truncated"]
  side = p * g
  total, terms = _score_side(anchor_emb[:p], emb[:side], truncated[:side], s)
  if s.train_queries:  # queries' samples against the documents' anchors
    t2, terms2 = _score_side(anchor_emb[p:], emb[side:], truncated[side:], s)
    total = np.concatenate([total, t2])
    terms = {k: np.concatenate([v, terms2[k]]) for k, v in terms.items()}
  return Scored(groups, outs, total, terms, truncated, batch)


def policy_of(trainer) -> Policy:
  """The :class:`Policy` of an :class:`alignax.train.Trainer`'s current
  parameters (no copy)."""
  c = trainer.config
  return Policy(trainer.graphdef, trainer.state.params, trainer.tokenizer,
                mesh=trainer.mesh, rules=tuple(map(tuple, c.sharding_rules)),
                mode=c.grpo.prompt_mode, batch_size=c.train.batch_size,
                room=Settings.from_config(c).room)


def groups_per_prompt(config) -> int:
  """GRPO groups per pair: the document's, and the query's with
  ``grpo.grace.train_queries``."""
  return 2 if config.grpo.grace.train_queries else 1


@dataclasses.dataclass(frozen=True)
class PairPrompt:
  """A pair as a rollout prompt (``text``: the query)."""
  text: str
  target: dict


class GraceTask:
  """The embedded docstring -> code pairs as a GRACE task of
  :mod:`alignax.rl` (``grpo.task='grace'``).

  ``prompts(split, n, seed=...)`` are pairs (:class:`PairPrompt`);
  :meth:`rollout` samples and scores the rationales of some pairs with a
  trainer's current parameters; :meth:`evaluate` is the held-out retrieval
  evaluation. Each pair makes ``groups_per_prompt`` groups of ``G`` rows.
  """

  stop_strings = STOP_STRINGS

  def __init__(self, settings: Settings, heldout_fraction: float = 0.02,
               eval_pairs: int = 0):
    self.settings = settings
    self._fraction = heldout_fraction
    self._eval_pairs = eval_pairs
    self.last_terms = {}  # the last rollout's mean reward terms

  @classmethod
  def from_config(cls, config) -> "GraceTask":
    return cls(Settings.from_config(config), config.data.heldout_fraction,
               config.grpo.grace.eval_pairs)

  @property
  def groups_per_prompt(self) -> int:
    return 2 if self.settings.train_queries else 1

  def pairs(self, split: str) -> list[dict]:
    """``'train'`` or ``'eval'`` (the corpus's held-out) pairs."""
    return retrieval_task.code_search_pairs(
        "heldout" if split == "eval" else split, self._fraction)

  def prompts(self, split: str, n: int, *, seed: int) -> list[PairPrompt]:
    """``min(n, #pairs)`` distinct pairs of ``split``, drawn by ``seed``."""
    pairs = self.pairs(split)
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [PairPrompt(pairs[int(i)]["query"], pairs[int(i)]) for i in order]

  def clean(self, text: str) -> str:
    return text

  def rollout(self, trainer, prompts: Sequence[PairPrompt], rng):
    """``(prompt ids per group, completions, rewards [B, 1])`` of one
    rollout of ``prompts`` (:func:`grace_rollout`)."""
    scored = grace_rollout(policy_of(trainer), [p.target for p in prompts],
                           self.settings, rng)
    self.last_terms = {k: float(v.mean()) for k, v in scored.terms.items()}
    return ([list(p.ids) for p in scored.prompts], scored.completions,
            scored.rewards[:, None])

  def evaluate(self, trainer) -> dict[str, float]:
    """:func:`evaluate` on the held-out pairs (``eval_pairs`` of them)."""
    pairs = self.pairs("eval")
    if self._eval_pairs:
      pairs = pairs[:self._eval_pairs]
    return evaluate(policy_of(trainer), pairs, self.settings)


# --- evaluation -------------------------------------------------------------------


def _metrics(queries, docs, k_max: int = 10) -> dict[str, float]:
  """Recall@1/5/10 and MRR@10 of query i -> document i (cosine)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True),
                                  1e-12)
  k = min(k_max, len(docs))
  _, ids = retrieval.retrieve(unit(queries), unit(docs), k=k)
  relevant = np.arange(len(queries))[:, None]
  m = retrieval.ranking_metrics(ids, relevant, recall_at=(1, 5, 10),
                                mrr_at=(10,), ndcg_at=(10,), map_at=(10,))
  return {name: float(jnp.mean(v)) for name, v in m.items()
          if name in ("recall@1", "recall@5", "recall@10", "mrr@10")}


def evaluate(policy: Policy, pairs, s: Settings) -> dict[str, float]:
  """Held-out retrieval with greedy rationales, and without any.

  Returns:
    ``rationale/{recall@1,recall@5,recall@10,mrr@10}`` of the rationale
    embeddings (greedy, pooled as ``s.pool``), ``plain/...`` of the mean of
    the hidden states over each raw text (``[mode or BOS] + text``, no
    template, no rationale), and ``rationale/mean_length`` (tokens).
  """
  q, d = text_prompts(policy.tokenizer, pairs, s)
  outs = policy.sample(q + d, k=1, max_new_tokens=s.max_new_tokens,
                       temperature=0.0, rng=jax.random.key(0))
  emb, batch, _ = policy.embed_rows(q + d, outs, seq_len=s.seq_len,
                                    pool=s.pool)
  n = len(pairs)
  out = {f"rationale/{k}": v for k, v in _metrics(emb[:n], emb[n:]).items()}
  out["rationale/mean_length"] = float(np.mean(batch["completion_lengths"]))
  bare = Template("", "")
  raw = [prompt_ids(policy.tokenizer, t, bare, room=s.seq_len, mode=s.mode)
         for t in [p["query"] for p in pairs] + [p["positive"] for p in pairs]]
  plain, _, _ = policy.embed_rows(raw, [[] for _ in raw], seq_len=s.seq_len,
                                  pool="text_and_rationale")
  out.update({f"plain/{k}": v for k, v in _metrics(plain[:n],
                                                   plain[n:]).items()})
  return out

