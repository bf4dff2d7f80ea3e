"""Text in, text out: ``alignax.load`` and ``python -m alignax.generate``.

A UL2 run is prompted as it was trained (``[S2S]`` + a bidirectional
prefix) and never samples sentinels or mode tokens; the prefix-LM sampler
equals a step-by-step full forward with the prefix mask.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import alignax
from alignax import defaults
from alignax import generate as gen
from alignax import models
from alignax import state as state_lib
from alignax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESERVED = ('<extra_id_', '[NLU]', '[NLG]', '[S2S]', '<unused_', '[BOS]',
            '[EOS]')
CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)


def tiny_config(tok_dir, task):
  """configs/ul2_demo.py (or demo.py) shrunk to seconds."""
  c = defaults.base_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=3, batch_size=8, seq_len=32, log_every=3,
                 eval_every=0, progress_bar=False)
  c.checkpoint.update(save_every=3, keep=1, async_save=False)
  c.optimizer.update(lr=1e-2, warmup_steps=1, schedule_steps=3)
  if task == 'ul2':
    c.objective = 'ul2'
    c.data.task = 'ul2'
  return c


@pytest.fixture(scope='module')
def ul2_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('ul2_text')
  workdir = str(root / 'run')
  train.run(tiny_config(str(root / 'tok'), 'ul2'), workdir)
  return workdir


def test_ul2_run_prompts_with_s2s_and_never_samples_reserved_ids(ul2_run):
  lm = alignax.load(ul2_run)
  tok = lm.tokenizer
  assert lm.mode == '[S2S]'
  assert lm.prompt_ids('def ') == [tok.mode_id('[S2S]')] + tok.encode('def ')
  banned = set(lm.suppressed_ids(stop_at_eos=False))
  assert {tok.sentinel_id(0), tok.sentinel_id(7), tok.mode_id('[NLU]'),
          tok.eos_id, tok.bos_id} <= banned
  outs = lm.generate(['def ', 'import os\n'], max_new_tokens=24,
                     temperature=1.0, seed=3)
  for text in outs:
    assert text.strip()
    assert not any(r in text for r in RESERVED), text
  greedy = lm.generate('def ', max_new_tokens=24)  # temperature 0
  assert isinstance(greedy, str) and greedy.strip()
  assert not any(r in greedy for r in RESERVED), greedy


def test_cli_prints_text_without_sentinels(ul2_run, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('class \n\nreturn \n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  env.pop('XLA_FLAGS', None)
  done = subprocess.run(
      [sys.executable, '-m', 'alignax.generate', f'--workdir={ul2_run}',
       '--prompt=def ', f'--prompts_file={prompts}', '--max_new_tokens=16',
       '--temperature=0.8', '--seed=1'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  outs = done.stdout.rstrip('\n').split('\n---\n')
  assert len(outs) == 3, done.stdout
  for text in outs:
    assert text.strip() and not any(r in text for r in RESERVED), text


def test_cli_user_error_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  done = subprocess.run(
      [sys.executable, '-m', 'alignax.generate', f'--workdir={tmp_path}',
       '--prompt=x'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().startswith('alignax: error:')
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _params(seed=0):
  params = jax.jit(lambda: state_lib.init_params(CFG, seed))()
  return jax.tree.map(lambda x: x * 3.0, params)  # peaky logits


def test_prefix_lm_sampler_equals_the_full_forward_with_prefix():
  graphdef, _ = state_lib.abstract_model(CFG)
  params = _params()
  prompts = [[5, 9, 2, 7, 11], [3, 8]]
  outs = gen.generate(graphdef, params, prompts, max_new_tokens=6,
                      rng=jax.random.key(0), prefix_lm=True)
  model = nnx.merge(graphdef, params)
  for prompt, out in zip(prompts, outs):
    seq = list(prompt)
    for _ in range(6):
      ids = np.asarray([seq])
      prefix = np.arange(len(seq))[None] < len(prompt)
      logits = model(ids, prefix=prefix)
      seq.append(int(np.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]
  # A bidirectional prefix is not the causal reading: outputs differ.
  causal = gen.generate(graphdef, params, prompts, max_new_tokens=6,
                        rng=jax.random.key(0))
  assert causal != outs


@pytest.mark.parametrize('prefix_lm', [False, True])
def test_suppressed_tokens_are_never_sampled(prefix_lm):
  graphdef, _ = state_lib.abstract_model(CFG)
  params = _params()
  free = [4, 17]
  banned = [i for i in range(CFG.vocab_size) if i not in free]
  outs = gen.generate(graphdef, params, [[5, 9, 2], [3]], max_new_tokens=8,
                      rng=jax.random.key(1), temperature=1.5,
                      suppress_tokens=banned, prefix_lm=prefix_lm)
  assert all(t in free for out in outs for t in out)
  plain = gen.generate(graphdef, params, [[5, 9, 2], [3]], max_new_tokens=8,
                       rng=jax.random.key(1), temperature=1.5,
                       prefix_lm=prefix_lm)
  assert any(t not in free for out in plain for t in out)
