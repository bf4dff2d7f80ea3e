"""Training from a Hugging Face directory given on the command line.

``launch/tpu_train.py --config=configs/dpo_demo.py
--config.checkpoint.init_from=HF_DIR`` takes the model from ``config.json``,
the tokenizer from ``tokenizer.json`` and streams the weights onto the mesh.
The reference is ``transformers``: with a zero learning rate the trained
checkpoint must still give its logits, and DPO's loss with the policy equal
to its reference is exactly log 2.
"""
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers import decoders  # noqa: E402
from tokenizers import models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from tokenizers import trainers  # noqa: E402

from alignax import checkpoint as ckpt_lib  # noqa: E402
from alignax import defaults  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax.data import embedded  # noqa: E402
from alignax.interop import hf  # noqa: E402
from alignax.models import ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _train_tokenizer(path):
  """A small byte-level BPE ``tokenizer.json`` trained on stdlib text."""
  texts = [doc['text'] for doc in embedded.embedded_documents('train')[:40]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<pad>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(path)
  return tok.get_vocab_size()


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny random Llama whose vocabulary is exactly its tokenizer's."""
  root = tmp_path_factory.mktemp('hf_init')
  vocab = _train_tokenizer(str(root / 'tokenizer.json'))
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=8, max_position_embeddings=64)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  model.save_pretrained(root)
  return model, str(root), vocab


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_vocab_grows_with_mean_rows(hf_dir):
  model, path, vocab = hf_dir
  cfg, params = hf.load_hf(path, vocab_size=vocab + 5)
  assert cfg.vocab_size == vocab + 5
  embed = np.asarray(params['embed']['embedding'])
  theirs = model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(embed[:vocab], theirs)
  np.testing.assert_allclose(embed[vocab:], np.broadcast_to(
      theirs.mean(0), (5, theirs.shape[1])), rtol=1e-6)
  head = np.asarray(params['lm_head'])  # [D, V]
  np.testing.assert_allclose(
      head[:, vocab:], np.broadcast_to(
          model.lm_head.weight.detach().numpy().mean(0)[:, None],
          (head.shape[0], 5)), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='smaller than the checkpoint'):
    hf.load_hf(path, vocab_size=vocab - 1)


def test_run_config_takes_model_and_tokenizer_from_the_directory(hf_dir):
  _, path, vocab = hf_dir
  c = defaults.base_config()
  c.model.dtype = 'bfloat16'  # a run field: kept
  c.model.n_layers = 7  # an architecture field: replaced
  assert hf.run_config(c) is c  # no init_from: unchanged
  c.checkpoint.init_from = path
  out = hf.run_config(c)
  assert (out.model.n_layers, out.model.d_model, out.model.dtype) == (
      2, 32, 'bfloat16')
  assert out.tokenizer.kind == 'hf'
  assert out.tokenizer.path == os.path.join(path, 'tokenizer.json')
  assert out.tokenizer.num_sentinels == 0
  # [NLU]/[NLG]/[S2S] are reserved past the base vocabulary ('</s>' is EOS,
  # BOS is reserved too): the model grows by those ids.
  assert out.model.vocab_size == vocab + 4
  assert c.model.n_layers == 7  # the caller's config is not modified


def _launch_dpo_demo(path, workdir, *extra, one_device=False):
  """The DPO demo for 2 steps at lr 0 from the HF directory ``path``."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  if one_device:  # as a laptop user has
    env['XLA_FLAGS'] = ' '.join(
        f for f in env.get('XLA_FLAGS', '').split()
        if not f.startswith('--xla_force_host_platform_device_count'))
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'tpu_train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'dpo_demo.py'),
         f'--workdir={workdir}', f'--config.checkpoint.init_from={path}',
         '--config.train.steps=2', '--config.train.seq_len=64',
         '--config.train.log_every=1',
         '--config.train.eval_every=0', '--config.train.progress_bar=False',
         '--config.checkpoint.save_every=2', '--config.optimizer.lr=0',
         '--config.optimizer.warmup_steps=0',
         '--config.data.preference.max_prompt_len=24',
         '--config.data.preference.max_response_len=8', *extra]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-4000:]


def test_launch_dpo_demo_from_an_hf_directory(hf_dir, tmp_path):
  model, path, _ = hf_dir
  workdir = str(tmp_path / 'dpo')
  _launch_dpo_demo(path, workdir, '--config.train.batch_size=4',
                   one_device=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  # Policy = reference (lr 0): every implicit reward is 0, the loss log 2.
  for r in records:
    np.testing.assert_allclose(r['train/loss'], math.log(2), rtol=1e-5)
  # The trained checkpoint is the HF model, grown by the reserved ids.
  c = defaults.base_config()
  c.checkpoint.init_from = path
  cfg = hf.run_config(c).model
  cfg = ModelConfig(**cfg)
  graphdef, abstract = state_lib.abstract_model(cfg)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                        nnx.to_pure_dict(abstract))
  params = ckpt_lib.load_params(workdir, target)
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size,
                                             (2, 12))
  ours = nnx.merge(graphdef, params)(jnp.asarray(tokens))
  np.testing.assert_allclose(
      np.asarray(ours)[..., :model.config.vocab_size],
      _hf_logits(model, tokens), atol=1e-4)
  # Export cuts the grown vocabulary back: transformers loads the original.
  assert ckpt_lib.read_model_config(workdir)["vocab_size"] == cfg.vocab_size
  out = str(tmp_path / 'exported')
  hf.main(['export', workdir, out, '--like', path])
  back = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation='eager').eval()
  np.testing.assert_allclose(_hf_logits(back, tokens),
                             _hf_logits(model, tokens), atol=1e-6)
  assert os.path.isfile(os.path.join(out, 'tokenizer.json'))


def test_launch_cached_reference_from_an_hf_directory(hf_dir, tmp_path):
  # cache_reference through the launcher: the cache is filled from the HF
  # model (the policy's start) before training. With lr 0 the cached
  # reference equals the policy, so DPO's loss is log 2 at every step.
  _, path, _ = hf_dir
  workdir = str(tmp_path / 'dpo_cached')
  _launch_dpo_demo(path, workdir, '--config.reference=none',
                   '--config.preference.cache_reference=True',
                   '--config.train.batch_size=8')
  caches = os.listdir(os.path.join(workdir, 'reference_cache'))
  assert len(caches) == 1
  with open(os.path.join(workdir, 'reference_cache', caches[0],
                         'spec.json')) as f:
    spec = json.load(f)
  assert spec['model']['d_model'] == 32  # the HF model's, not the demo's
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2
  for r in records:
    np.testing.assert_allclose(r['train/loss'], math.log(2), rtol=1e-5)
