"""Sampling from a policy: prefill + KV-cache decode under one ``jax.jit``.

Prompts are **left-padded**: every row's last prompt token sits in the same
slot, so prefill ends on one column of logits and all rows then write the
same cache slot per step (one ``dynamic_update_slice``, no per-row scatter).
Padding slots get position ``-1`` and are never attended; real tokens are at
positions ``0, 1, ...`` from their first token, as if unpadded.

Shapes come from a fixed set of buckets so a server or an on-policy loop
compiles a handful of programs, not one per request: the prompt length is
rounded up to a bucket ``P``, the cache length ``P + max_new_tokens`` to a
bucket ``S``, the batch to a power of two (times the mesh's batch ways).
``max_new_tokens`` itself is a traced value; the sampling settings
(temperature, top-k, top-p, stop tokens) are static, one compile each.

Example::

  graphdef, _ = state.abstract_model(cfg)
  completions = generate(graphdef, params, [[5, 9, 2], [7]],
                         max_new_tokens=16, rng=jax.random.key(0),
                         temperature=0.7, top_p=0.9, stop_tokens=(eos,))

**Text in, text out** from a run's workdir, on the command line or in
Python (:func:`load` returns a :class:`Loaded` with ``.model``,
``.params``, ``.tokenizer`` and a string-level ``.generate``)::

  python -m alignax.generate --workdir=/tmp/alignax_demo --prompt="def " \
      [--prompts_file=FILE] [--max_new_tokens=64 --temperature=0.8 \
       --top_k=40 --top_p=0.95 --seed=0]

  lm = alignax.load('/tmp/alignax_demo')
  lm.generate('def ', max_new_tokens=32)          # -> str
  lm.generate(['def ', 'import '], temperature=0.7)  # -> list[str]

The command samples (llama.cpp's defaults, shown above; ``--temperature=0``
for greedy), ``Loaded.generate`` is greedy unless told otherwise, as
``transformers``' ``generate`` is. A small model decodes greedily into
loops (the 300-step demo: blank lines after ``"def "``); sampling reads
better.

How a prompt becomes ids follows the run's config (``config.json``):

* **UL2 runs** (``data.task == 'ul2'``) were trained on
  ``[mode] + inputs -> targets``, the mode token and inputs a bidirectional
  prefix. Only the S-denoiser's target continues its input, so a prompt is
  ``[S2S] + ids`` read as a prefix-LM prefix
  (:func:`generate_prefix_lm_padded`); ``[NLU]``/``[NLG]`` ask for
  span-corruption targets (``<extra_id_i>`` + the missing span), which is
  not text. The S-denoiser's EOS marks the end of a training window (about
  a third of the prompt's length), not of the text, so UL2 samples do not
  stop at EOS by default (``stop_at_eos=False``): they run for
  ``max_new_tokens``.
* **Other runs**: ``[BOS] + ids`` when the run's rows began with BOS
  (``data.add_bos``, preference data), else the ids; sampling stops at EOS.

In every run the reserved ids (sentinels ``<extra_id_*>``, mode tokens,
unused and padding rows, BOS) are masked out of sampling (``-inf`` logits),
so no sample contains them.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from alignax import cli
from alignax import init_from
from alignax import sharding as shd
from alignax.interop import hf
from alignax.models import init_cache

DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                          16384, 32768)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ``>= n``.

  Raises:
    ValueError: if ``n`` exceeds the largest bucket.
  """
  for b in sorted(buckets):
    if b >= n:
      return int(b)
  raise ValueError(f'length {n} exceeds the largest bucket {max(buckets)}.')


def left_pad(prompts: Sequence[Sequence[int]], length: int, *, rows: int,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, positions)``, both ``[rows, length]`` int32, left-padded.

  Rows past ``len(prompts)`` are all padding (batch-bucket filler);
  positions are ``-1`` on padding and count from 0 on each prompt.
  """
  tokens = np.full((rows, length), pad_id, np.int32)
  positions = np.full((rows, length), -1, np.int32)
  for r, prompt in enumerate(prompts):
    n = len(prompt)
    if not 0 < n <= length:
      raise ValueError(f'prompt {r} has {n} tokens; need 1..{length}.')
    tokens[r, length - n:] = prompt
    positions[r, length - n:] = np.arange(n)
  return tokens, positions


def sample_logits(logits: jax.Array, rng: jax.Array, *,
                  temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  r"""One token per row from ``[B, V]`` logits.

  ``temperature == 0`` is greedy (argmax). Otherwise, as Hugging Face's
  warpers in this order: divide by the temperature, keep the ``top_k``
  largest (0 = all), keep the smallest most-likely set whose probability
  reaches ``top_p`` (nucleus; 1 = all), and sample. Row ``r`` draws with
  ``fold_in(rng, r)``, so a row's sample does not depend on how many rows
  (batch-bucket padding) or devices there are.

  Returns:
    ``[B]`` int32 token ids.

  References:
    Holtzman et al., 2020, The Curious Case of Neural Text Degeneration.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k or top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    threshold = jnp.full(logits.shape[:1], -jnp.inf)
    if top_k:
      threshold = ordered[:, min(top_k, logits.shape[-1]) - 1]
    if top_p < 1.0:
      probs = jax.nn.softmax(jnp.where(ordered >= threshold[:, None], ordered,
                                       -jnp.inf), axis=-1)
      # Token j (in descending order) stays iff the mass before it < top_p;
      # the most likely token always stays.
      before = jnp.cumsum(probs, axis=-1) - probs
      kept = jnp.sum(before < top_p, axis=-1)  # [B], >= 1
      threshold = jnp.maximum(
          threshold, jnp.take_along_axis(ordered, kept[:, None] - 1, -1)[:, 0])
    logits = jnp.where(logits >= threshold[:, None], logits, -jnp.inf)
  keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(
      jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _constrain_cache(cache, mesh, rules):
  """Batch over data x fsdp, kv heads over tensor (when they divide)."""
  if mesh is None:
    return cache
  names = (None, 'batch', None, 'kv_heads', 'head_dim')
  spec = shd.logical_to_spec(names, cache['k'].shape, rules, mesh)
  kv = NamedSharding(mesh, spec)
  return dict(cache, k=jax.lax.with_sharding_constraint(cache['k'], kv),
              v=jax.lax.with_sharding_constraint(cache['v'], kv))


def _suppressed(logits, suppress):
  """``[B, V]`` logits with the ``suppress [V]`` ids at ``-inf``."""
  if suppress is None:
    return logits
  return jnp.where(suppress[None, :logits.shape[-1]], -jnp.inf, logits)


def suppress_mask(token_ids: Sequence[int], vocab_size: int):
  """``[vocab_size]`` bool, True at ``token_ids`` (None when empty)."""
  if not token_ids:
    return None
  mask = np.zeros((vocab_size,), bool)
  mask[np.asarray(list(token_ids), np.int64)] = True
  return jnp.asarray(mask)


_STATIC = ('graphdef', 'cache_len', 'temperature', 'top_k', 'top_p',
           'stop_tokens', 'pad_id', 'mesh', 'rules')


@functools.partial(jax.jit, static_argnames=_STATIC)
@shd.with_activation_sharding  # weights gathered per layer, rows kept local
def generate_padded(graphdef, params, tokens, positions, rng, max_new_tokens,
                    *, cache_len: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0,
                    stop_tokens: tuple[int, ...] = (), pad_id: int = 0,
                    mesh=None, rules=shd.DEFAULT_RULES, suppress=None):
  """Prefill then decode up to ``max_new_tokens``, all under one jit.

  Args:
    graphdef: the model's graphdef (``state.abstract_model(cfg)[0]``).
    params: pure dict of parameters (any sharding).
    tokens: ``[B, P]`` left-padded prompts (see :func:`left_pad`).
    positions: ``[B, P]`` their positions, ``-1`` on padding.
    rng: PRNG key; step ``i`` samples with ``fold_in(rng, i)``.
    max_new_tokens: int scalar (traced) ``<= cache_len - P``.
    cache_len: KV-cache slots ``S`` (static).
    temperature, top_k, top_p: see :func:`sample_logits` (static).
    stop_tokens: ids that end a row (kept in its output).
    pad_id: written after a row has stopped.
    mesh, rules: when given, the KV cache is sharded like the batch/heads.
    suppress: optional ``[V]`` bool, ids never sampled (:func:`suppress_mask`).

  Returns:
    ``(out [B, S - P] int32, lengths [B] int32)``: generated tokens, then
    ``pad_id``; ``lengths`` counts them (a stop token included).
  """
  model = nnx.merge(graphdef, params)
  batch, prompt_len = tokens.shape
  slots = cache_len - prompt_len
  cache = _constrain_cache(init_cache(model.cfg, batch, cache_len), mesh, rules)
  logits, cache = model.decode(tokens, cache, positions=positions)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
  max_new = jnp.minimum(max_new_tokens, slots)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, out, done, pos = carry
    token = sample_logits(_suppressed(logits, suppress),
                          jax.random.fold_in(rng, i),
                          temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, i].set(token)
    done = done | jnp.isin(token, stops)
    # Merged again inside the loop: NNX modules may not cross trace levels.
    step_logits, cache = nnx.merge(graphdef, params).decode(
        token[:, None], cache, positions=pos[:, None])
    return (i + 1, step_logits[:, 0], cache, out, done, pos + 1)

  out = jnp.full((batch, slots), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  next_pos = positions[:, -1] + 1
  _, _, _, out, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), logits[:, -1], cache, out, done, next_pos))
  return out, _lengths(out, stops, max_new)


def _lengths(out, stops, max_new):
  """Tokens generated per row: through the first stop, else ``max_new``."""
  steps = jnp.arange(out.shape[1])
  is_stop = jnp.isin(out, stops) & (steps < max_new)  # [B, N]
  first = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1) + 1, max_new)
  return first.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=_STATIC)
@shd.with_activation_sharding
def generate_prefix_lm_padded(graphdef, params, tokens, positions, rng,
                              max_new_tokens, *, cache_len: int,
                              temperature: float = 0.0, top_k: int = 0,
                              top_p: float = 1.0,
                              stop_tokens: tuple[int, ...] = (),
                              pad_id: int = 0, mesh=None,
                              rules=shd.DEFAULT_RULES, suppress=None):
  """:func:`generate_padded` with each prompt a bidirectional prefix.

  A UL2 model reads its mode token and inputs as a prefix-LM prefix (every
  prompt token sees every other); the KV-cache decode is causal only, so
  this recomputes the whole ``[B, S]`` row per new token with the model's
  prefix mask: exact, and ``O(S)`` times the work of a cached step, which
  is fine for a demo model or a short answer. Same arguments and results
  as :func:`generate_padded`.
  """
  del mesh, rules  # the decorator's activation sharding uses them
  batch, prompt_len = tokens.shape
  slots = cache_len - prompt_len
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
  max_new = jnp.minimum(max_new_tokens, slots)
  row = jnp.concatenate([tokens, jnp.full((batch, slots), pad_id, jnp.int32)],
                        axis=1)  # [B, S]
  pos = jnp.concatenate(
      [positions, positions[:, -1:] + 1 + jnp.arange(slots)[None]], 1)
  segment_ids = (pos >= 0).astype(jnp.int32)  # left padding is segment 0
  prefix = (jnp.arange(cache_len)[None] < prompt_len) & (segment_ids > 0)

  def cond(carry):
    i, _, _, done = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, row, out, done = carry
    model = nnx.merge(graphdef, params)
    h = model(row, positions=jnp.maximum(pos, 0), segment_ids=segment_ids,
              prefix=prefix, return_hidden=True)  # [B, S, D]
    last = jax.lax.dynamic_index_in_dim(h, prompt_len - 1 + i, 1, False)
    logits = model.logits_from_hidden(last)  # [B, V]
    token = sample_logits(_suppressed(logits, suppress),
                          jax.random.fold_in(rng, i),
                          temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    row = jax.lax.dynamic_update_slice_in_dim(row, token[:, None],
                                              prompt_len + i, 1)
    return (i + 1, row, out.at[:, i].set(token),
            done | jnp.isin(token, stops))

  out = jnp.full((batch, slots), pad_id, jnp.int32)
  _, _, out, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), row, out, jnp.zeros((batch,), bool)))
  return out, _lengths(out, stops, max_new)


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0,
             length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
             mesh=None, rules=shd.DEFAULT_RULES,
             suppress_tokens: Sequence[int] = (),
             prefix_lm: bool = False) -> list[list[int]]:
  """Completions of a batch of token-id prompts of any lengths.

  Pads prompts (left), cache length and batch to buckets, runs
  :func:`generate_padded` (:func:`generate_prefix_lm_padded` when
  ``prefix_lm``: each prompt a bidirectional prefix), and strips the
  padding. ``suppress_tokens`` are never sampled.

  Returns:
    one list of generated ids per prompt, ending with its stop token if it
    produced one, else ``max_new_tokens`` long.
  """
  if not prompts:
    return []
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  prompt_len = bucket_length(max(len(p) for p in prompts), length_buckets)
  cache_len = bucket_length(prompt_len + max_new_tokens, length_buckets)
  ways = shd.global_batch_size(mesh) if mesh is not None else 1
  rows = ways * (1 << max(0, (-(-len(prompts) // ways) - 1).bit_length()))
  tokens, positions = left_pad(prompts, prompt_len, rows=rows, pad_id=pad_id)
  if mesh is not None:
    tokens, positions = (jax.device_put(x, shd.batch_sharding(mesh))
                         for x in (tokens, positions))
  vocab_size = nnx.merge(graphdef, params).cfg.vocab_size
  padded = generate_prefix_lm_padded if prefix_lm else generate_padded
  out, lengths = padded(
      graphdef, params, tokens, positions, rng, jnp.int32(max_new_tokens),
      cache_len=cache_len, temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), stop_tokens=tuple(int(t) for t in stop_tokens),
      pad_id=int(pad_id), mesh=mesh, rules=tuple(map(tuple, rules)),
      suppress=suppress_mask(suppress_tokens, vocab_size))
  out, lengths = np.asarray(out), np.asarray(lengths)
  return [out[r, :lengths[r]].tolist() for r in range(len(prompts))]


# UL2's S-denoiser mode: a prefix-LM prefix whose target continues it.
UL2_PROMPT_MODE = '[S2S]'


@dataclasses.dataclass
class Loaded:
  """A run's model, parameters and tokenizer with string-level sampling.

  Attributes:
    graphdef: the model's graphdef; ``params``: its parameters (pure dict).
    tokenizer: the run's :class:`~alignax.data.tokenizer.Tokenizer`.
    config: the run's resolved config (``config.json``, a dict).
    mode: UL2 mode token every prompt starts with, or None (see the module
      docstring).
    add_bos: whether a prompt starts with BOS (after the mode token).
    mesh: the mesh the parameters live on.
  """
  graphdef: Any
  params: Any
  tokenizer: Any
  config: dict
  mode: str | None = None
  add_bos: bool = False
  mesh: Any = None

  @property
  def model(self):
    """The NNX model (``nnx.merge(graphdef, params)``)."""
    return nnx.merge(self.graphdef, self.params)

  def prompt_ids(self, text: str) -> list[int]:
    """``[mode] + [BOS] + ids`` as the run's rows began (module docstring)."""
    head = [self.tokenizer.mode_id(self.mode)] if self.mode else []
    head += [self.tokenizer.bos_id] if self.add_bos else []
    return head + self.tokenizer.encode(text)

  def suppressed_ids(self, *, stop_at_eos: bool) -> list[int]:
    """Ids never sampled: reserved ids, BOS, padding rows; EOS unless it
    stops a sample."""
    tok, vocab = self.tokenizer, self.model.cfg.vocab_size
    ids = set(hf.suppressed_ids(tok, vocab)) | {tok.bos_id}
    ids = ids - {tok.eos_id} if stop_at_eos else ids | {tok.eos_id}
    return sorted(ids)

  def generate(self, prompts: str | Sequence[str], *,
               max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_at_eos: bool | None = None) -> str | list[str]:
    """Completions of text prompts (a string for a string).

    Args:
      prompts: a prompt or a list of prompts.
      max_new_tokens: most tokens generated per prompt.
      temperature, top_k, top_p: see :func:`sample_logits` (0 = greedy).
      seed: sampling seed.
      stop_at_eos: whether EOS ends a sample; default True except for UL2
        runs (module docstring).

    Returns:
      the generated text of each prompt (without the prompt or EOS).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    stop = self.mode is None if stop_at_eos is None else stop_at_eos
    cfg, tok = self.model.cfg, self.tokenizer
    room = cfg.max_seq_len - max_new_tokens
    if room < 2:
      raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for '
                       f'a prompt in the model\'s {cfg.max_seq_len} positions.')
    ids = []
    for text in texts:
      row = self.prompt_ids(text)
      head = int(self.mode is not None) + int(self.add_bos)
      ids.append(row if len(row) <= room else row[:head] + row[len(row) -
                                                                room + head:])
    outs = generate(
        self.graphdef, self.params, ids, max_new_tokens=max_new_tokens,
        rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
        top_p=top_p, stop_tokens=(tok.eos_id,) if stop else (),
        suppress_tokens=self.suppressed_ids(stop_at_eos=stop),
        prefix_lm=self.mode is not None, mesh=self.mesh)
    out = [tok.decode([t for t in o if t != tok.eos_id]) for o in outs]
    return out[0] if single else out


def load(workdir: str, *, mesh=None) -> Loaded:
  """A run's latest checkpoint, tokenizer and prompt format (``Loaded``).

  Args:
    workdir: a run's workdir (``config.json``, ``model_config.json`` and
      ``checkpoints/``), its ``checkpoints/`` or one step directory.
    mesh: where to place the parameters; default all devices on ``fsdp``.
  """
  run = hf.read_run_config(workdir)
  cfg = hf.read_model_config(hf.run_dir(workdir))
  tokenizer = hf.run_tokenizer(workdir, run)
  mesh = mesh if mesh is not None else shd.make_mesh({'fsdp': -1})
  graphdef, params = init_from.model_params(workdir, cfg, mesh,
                                            shd.DEFAULT_RULES)
  data = run.get('data', {})
  return Loaded(graphdef, params, tokenizer, run,
                mode=UL2_PROMPT_MODE if data.get('task') == 'ul2' else None,
                add_bos=bool(data.get('add_bos'))
                or data.get('task') == 'preference', mesh=mesh)


def _read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
  prompts = [prompt] if prompt is not None else []
  if prompts_file:
    with open(prompts_file) as f:
      prompts += [line.rstrip('\n') for line in f if line.strip()]
  if not prompts:
    raise ValueError('give --prompt=TEXT or --prompts_file=FILE (one prompt '
                     'per line).')
  return prompts


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m alignax.generate --workdir=W --prompt=TEXT``: prints the
  completion of each prompt (several separated by ``---`` lines)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string('workdir', None, 'A run\'s workdir.')
  prompt = flags.DEFINE_string('prompt', None, 'One prompt.')
  prompts_file = flags.DEFINE_string('prompts_file', None,
                                     'A file of prompts, one per line.')
  max_new = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens per sample.')
  temperature = flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
  top_k = flags.DEFINE_integer('top_k', 40, 'Keep the k likeliest (0 = all).')
  top_p = flags.DEFINE_float('top_p', 0.95, 'Nucleus mass (1 = all).')
  seed = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.mark_flag_as_required('workdir')

  def body(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's restore is chatty
    with cli.user_errors():
      prompts = _read_prompts(prompt.value, prompts_file.value)
      lm = load(workdir.value)
      outs = lm.generate(prompts, max_new_tokens=max_new.value,
                         temperature=temperature.value, top_k=top_k.value,
                         top_p=top_p.value, seed=seed.value)
      print('\n---\n'.join(outs), flush=True)

  app.run(body, argv=argv or sys.argv, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  main()
