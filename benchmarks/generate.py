"""Prefill and decode throughput of alignax.generate.

  python benchmarks/generate.py                      # demo size + HF tiny
  python benchmarks/generate.py --batch=8 --prompt_len=64 --new_tokens=64

Prefill = one jitted ``Transformer.decode`` over ``[batch, prompt_len]``
left-padded prompts into an empty KV cache; tokens/s counts prompt tokens.
Decode = ``generate_padded`` (prefill + ``new_tokens`` greedy steps, no stop
token, so every step runs) minus the prefill time; tokens/s counts generated
tokens. Each number is the median of ``--repeats`` timed runs after a
compile run. Models are randomly initialised: the demo size of
``configs/demo.py``, and a tiny Llama built with ``transformers``, saved
and imported through ``alignax.interop.hf`` (skipped without torch).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from alignax import generate as gen  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax.models import ModelConfig  # noqa: E402
from alignax.models import init_cache  # noqa: E402

# configs/demo.py's model (vocab: its tokenizer's 2151 ids padded to 2176).
DEMO = ModelConfig(vocab_size=2176, d_model=128, n_layers=4, n_heads=4,
                   n_kv_heads=2, head_dim=32, d_ff=384, max_seq_len=1024)


def _median_seconds(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(name, cfg, params, *, batch, prompt_len, new_tokens, repeats):
  graphdef, _ = state_lib.abstract_model(cfg)
  cache_len = gen.bucket_length(prompt_len + new_tokens,
                                gen.DEFAULT_LENGTH_BUCKETS)
  prompts = [[(7 * r + t) % cfg.vocab_size for t in range(prompt_len)]
             for r in range(batch)]
  tokens, positions = gen.left_pad(prompts, prompt_len, rows=batch)

  @jax.jit
  def prefill(params, tokens, positions):
    cache = init_cache(cfg, batch, cache_len)
    return nnx.merge(graphdef, params).decode(tokens, cache,
                                              positions=positions)

  t_prefill = _median_seconds(lambda: prefill(params, tokens, positions),
                              repeats)
  t_total = _median_seconds(lambda: gen.generate_padded(
      graphdef, params, tokens, positions, jax.random.key(0),
      jnp.int32(new_tokens), cache_len=cache_len), repeats)
  t_decode = max(t_total - t_prefill, 1e-9)
  print(f'| {name} | {cfg.num_params():,} | {batch} x {prompt_len} + '
        f'{new_tokens} | {batch * prompt_len / t_prefill:,.0f} | '
        f'{batch * new_tokens / t_decode:,.0f} | '
        f'{1e3 * t_decode / new_tokens:.1f} |', flush=True)


def imported_tiny():
  """A tiny Llama made by transformers, saved and imported (None w/o torch)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from alignax.interop import hf  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=64, intermediate_size=176,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=1024)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    return hf.load_hf(d)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=64)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  kw = dict(batch=args.batch, prompt_len=args.prompt_len,
            new_tokens=args.new_tokens, repeats=args.repeats)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  print('| model | params | batch x prompt + new | prefill tokens/s | '
        'decode tokens/s | ms per decode step |')
  print('|---|---|---|---|---|---|')
  params = jax.jit(lambda: state_lib.init_params(DEMO, 0))()
  bench('demo (configs/demo.py size)', DEMO, params, **kw)
  imported = imported_tiny()
  if imported is None:
    print('(transformers not installed: imported model skipped)')
  else:
    bench('tiny Llama imported from transformers', *imported, **kw)


if __name__ == '__main__':
  main()
