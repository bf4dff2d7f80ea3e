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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from alignax import sharding as shd
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


@functools.partial(
    jax.jit, static_argnames=('graphdef', 'cache_len', 'temperature', 'top_k',
                              'top_p', 'stop_tokens', 'pad_id', 'mesh',
                              'rules'))
def generate_padded(graphdef, params, tokens, positions, rng, max_new_tokens,
                    *, cache_len: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0,
                    stop_tokens: tuple[int, ...] = (), pad_id: int = 0,
                    mesh=None, rules=shd.DEFAULT_RULES):
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
    token = sample_logits(logits, jax.random.fold_in(rng, i),
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


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0,
             length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
             mesh=None, rules=shd.DEFAULT_RULES) -> list[list[int]]:
  """Completions of a batch of token-id prompts of any lengths.

  Pads prompts (left), cache length and batch to buckets, runs
  :func:`generate_padded`, and strips the padding.

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
  out, lengths = generate_padded(
      graphdef, params, tokens, positions, rng, jnp.int32(max_new_tokens),
      cache_len=cache_len, temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), stop_tokens=tuple(int(t) for t in stop_tokens),
      pad_id=int(pad_id), mesh=mesh, rules=tuple(map(tuple, rules)))
  out, lengths = np.asarray(out), np.asarray(lengths)
  return [out[r, :lengths[r]].tolist() for r in range(len(prompts))]
