"""LoRA adapters exported for PEFT and merged; ``transformers`` is the judge.

A PEFT adapter directory loaded with ``peft.PeftModel.from_pretrained`` onto
the Hugging Face base, and the merged export loaded on its own, must give
alignax's logits (float32, 1e-4). The end-to-end test trains LoRA DPO
(``configs/dpo_lora.py``) from an HF Llama directory first.
"""
import dataclasses
import json
import math
import os

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

import importlib.util  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers import decoders  # noqa: E402
from tokenizers import models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from tokenizers import trainers  # noqa: E402

from alignax import state as state_lib  # noqa: E402
from alignax import train  # noqa: E402
from alignax.data import embedded  # noqa: E402
from alignax.interop import hf  # noqa: E402
from alignax.interop import peft as peft_lib  # noqa: E402
from alignax.models import lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny random Llama with a byte-level BPE tokenizer of its vocabulary."""
  root = tmp_path_factory.mktemp('hf_lora')
  texts = [doc['text'] for doc in embedded.embedded_documents('train')[:40]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<pad>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(root / 'tokenizer.json'))
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=8, max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  model.save_pretrained(root)
  return str(root), tok.get_vocab_size()


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _load_hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation='eager', dtype=torch.float32).eval()


def _peft_logits(base_path, adapter_dir, tokens):
  model = peft.PeftModel.from_pretrained(_load_hf(base_path), adapter_dir)
  return _hf_logits(model.eval(), tokens)


@pytest.mark.parametrize('rslora,targets', [(False, ALL), (True, ('q', 'o',
                                                                  'down'))])
def test_peft_and_merged_exports_give_alignax_logits(hf_dir, tmp_path, rslora,
                                                     targets):
  path, vocab = hf_dir
  cfg, base = hf.load_hf(path)
  cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0,
                            lora_rslora=rslora, lora_targets=targets)
  adapters = lora.trainable(state_lib.init_params(cfg, 0))
  keys = iter(jax.random.split(jax.random.key(1), 32))
  adapters = jax.tree.map(  # B away from 0, so the adapters matter
      lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
  params = lora.merge_trainable(adapters, base)
  graphdef, _ = state_lib.abstract_model(cfg)
  tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
  ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))
  base_logits = _hf_logits(_load_hf(path), tokens)
  assert np.abs(ours - base_logits).max() > 1e-3  # the adapters do something

  peft_dir = str(tmp_path / 'peft')
  peft_lib.export_peft(peft_dir, cfg, params, base_model=path)
  with open(os.path.join(peft_dir, 'adapter_config.json')) as f:
    written = json.load(f)
  assert written['r'] == 4 and written['use_rslora'] == rslora
  np.testing.assert_allclose(_peft_logits(path, peft_dir, tokens), ours,
                             atol=1e-4)

  merged_dir = str(tmp_path / 'merged')
  hf.export_hf(merged_dir, cfg, params)
  assert not os.path.exists(os.path.join(merged_dir, 'adapter_config.json'))
  np.testing.assert_allclose(_hf_logits(_load_hf(merged_dir), tokens), ours,
                             atol=1e-4)


def _dpo_lora_config(path, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'dpo_lora', os.path.join(ROOT, 'configs', 'dpo_lora.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(path)
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma']
  with open(tmp_path / 'pairs.jsonl', 'w') as f:
    for i in range(40):
      pick = lambda k: ' '.join(rng.choice(words, k))
      f.write(json.dumps({'prompt': pick(1 + i % 5), 'chosen': pick(2),
                          'rejected': pick(1 + i % 3)}) + '\n')
  c.data.update(paths=(str(tmp_path / 'pairs.jsonl'),),
                eval_paths=(str(tmp_path / 'pairs.jsonl'),))
  c.data.preference.update(max_prompt_len=24, max_response_len=8,
                           groups_per_row=2)
  c.model.update(dtype='float32', remat='none')
  c.lora.update(rank=4, alpha=8.0)
  c.train.update(steps=3, batch_size=8, seq_len=64, log_every=1,
                 eval_every=0, progress_bar=False)
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.checkpoint.update(save_every=3, async_save=False)
  return c


def test_lora_dpo_from_an_hf_directory_trains_and_exports(hf_dir, tmp_path):
  path, vocab = hf_dir
  workdir = str(tmp_path / 'run')
  trainer, _ = train.run(_dpo_lora_config(path, tmp_path), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  np.testing.assert_allclose(records[0]['train/loss'], math.log(2), rtol=1e-6)
  assert records[-1]['train/loss'] < math.log(2)  # it trains
  # The frozen base is still the HF model: its logits, bit for bit.
  cfg = trainer.model_cfg
  tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
  graphdef = trainer.graphdef
  params = jax.device_get(trainer.state.params)
  ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))[..., :vocab]
  base_ours = np.asarray(lora.without_adapters(nnx.merge(graphdef, params))(
      jnp.asarray(tokens)))[..., :vocab]
  np.testing.assert_allclose(base_ours, _hf_logits(_load_hf(path), tokens),
                             atol=1e-4)
  assert np.abs(ours - base_ours).max() > 1e-4

  # lora.save_base=False: checkpoints hold adapters (and their optimizer
  # state) and name the base; stopped at step 2 and resumed, the run ends
  # bit for bit where the straight one did.
  light = str(tmp_path / 'light')
  c = _dpo_lora_config(path, tmp_path)
  c.lora.save_base = False
  c.train.steps, c.checkpoint.save_every = 2, 2
  c.optimizer.schedule_steps = 3  # the straight run's schedule
  train.run(c, light)
  c.train.steps = 3
  resumed, _ = train.run(c, light)
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.device_get(resumed.state.params))
  with open(os.path.join(light, 'lora_base.json')) as f:
    assert json.load(f) == {'base': os.path.abspath(path)}
  def saved(w):  # the parameter paths a checkpoint's state holds
    with open(os.path.join(w, 'checkpoints', '3', 'state', '_METADATA')) as f:
      return [k for k in json.load(f)['tree_metadata'] if "'params'" in k]
  full_keys, light_keys = saved(workdir), saved(light)
  assert any("'embedding'" in k for k in full_keys)
  assert light_keys and all('_lora' in k for k in light_keys), light_keys
  assert len(light_keys) < len(full_keys)

  with pytest.raises(ValueError, match='holds only LoRA adapters'):
    hf.load_checkpoint_params(light, dataclasses.replace(
        cfg, lora_rank=0, lora_targets=()))
  # Exports read the adapters and reload the base: the same logits.
  peft_dir = str(tmp_path / 'peft')
  peft_lib.main(['export', light, peft_dir, '--base', path])
  np.testing.assert_allclose(_peft_logits(path, peft_dir, tokens), ours,
                             atol=1e-4)
  merged_dir = str(tmp_path / 'merged')
  hf.main(['export', light, merged_dir, '--like', path])
  np.testing.assert_allclose(_hf_logits(_load_hf(merged_dir), tokens), ours,
                             atol=1e-4)
  assert cfg.lora_rank == 4


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_qlora_from_an_hf_directory_quantizes_on_load_and_merges(
    hf_dir, tmp_path, kind):
  path, vocab = hf_dir
  c = _dpo_lora_config(path, tmp_path)
  c.lora.quant = kind
  c.train.steps = 2
  c.checkpoint.save_every = 2
  workdir = str(tmp_path / 'run')
  trainer, _ = train.run(c, workdir)
  params = jax.device_get(trainer.state.params)
  assert params['blocks']['attn']['q'].dtype == (
      np.int8 if kind == 'int8' else np.uint8)
  tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
  model = nnx.merge(trainer.graphdef, params)
  base_ours = np.asarray(lora.without_adapters(model)(
      jnp.asarray(tokens)))[..., :vocab]
  theirs = _hf_logits(_load_hf(path), tokens)
  err = np.abs(base_ours - theirs).max()
  assert 0 < err < (0.02 if kind == 'int8' else 0.2) * np.abs(theirs).max()
  # The merged export is the dequantized base plus the adapters.
  ours = np.asarray(model(jnp.asarray(tokens)))[..., :vocab]
  merged_dir = str(tmp_path / 'merged')
  hf.main(['export', workdir, merged_dir, '--like', path])
  np.testing.assert_allclose(_hf_logits(_load_hf(merged_dir), tokens), ours,
                             atol=1e-4)


def test_init_from_a_peft_directory_starts_from_its_adapters(hf_dir,
                                                             tmp_path):
  path, vocab = hf_dir
  cfg, base = hf.load_hf(path)
  cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_rslora=True,
                            lora_targets=('q', 'v', 'down'))
  adapters = lora.trainable(state_lib.init_params(cfg, 0))
  keys = iter(jax.random.split(jax.random.key(2), 32))
  adapters = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
  peft_dir = str(tmp_path / 'peft')
  peft_lib.export_peft(peft_dir, cfg, lora.merge_trainable(adapters, base),
                       base_model=path)
  # Start a run from the adapter directory: its rank/alpha/targets and base.
  c = _dpo_lora_config(path, tmp_path)
  c.checkpoint.init_from = peft_dir
  c.lora.update(rank=8, alpha=1.0, rslora=False, targets=('q',))  # replaced
  trainer = train.Trainer(c, str(tmp_path / 'run'))
  trainer.restore_or_init()
  assert (trainer.model_cfg.lora_rank, trainer.model_cfg.lora_alpha,
          trainer.model_cfg.lora_rslora, trainer.model_cfg.lora_targets) == (
              4, 8.0, True, ('q', 'v', 'down'))
  loaded = jax.device_get(lora.trainable(trainer.state.params))
  jax.tree.map(np.testing.assert_array_equal, loaded,
               jax.device_get(adapters))
  tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
  ours = np.asarray(nnx.merge(trainer.graphdef, trainer.state.params)(
      jnp.asarray(tokens)))[..., :vocab]
  np.testing.assert_allclose(_peft_logits(path, peft_dir, tokens), ours,
                             atol=1e-4)
