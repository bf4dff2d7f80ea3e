"""A model pretrained here exported as a complete Hugging Face directory.

``python -m alignax.interop.hf export WORKDIR OUT`` (no ``--like``) writes
``config.json`` from the run's ``model_config.json``, the SentencePiece
tokenizer as ``tokenizer.json`` (reserved ids kept), the chat template and
``generation_config.json``. The reference is ``transformers``: the export
must give the run's logits and token ids.
"""
import json
import os

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import alignax  # noqa: E402
from alignax import defaults  # noqa: E402
from alignax import generate as gen  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax import train  # noqa: E402
from alignax.data import chat  # noqa: E402
from alignax.data import embedded  # noqa: E402
from alignax.interop import hf  # noqa: E402

TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<<assistant>>"
            "{% endif %}")
TEXTS = ['def add(a, b):\n    return a + b\n', '  two  spaces',
         'naïve café 🙂', 'x = [1, 2, 3]']


def tiny_config(tok_dir):
  """configs/demo.py shrunk to seconds (tests/test_train.py's sizes)."""
  c = defaults.base_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=32)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=2, batch_size=8, seq_len=32, log_every=2,
                 eval_every=0, progress_bar=False)
  c.checkpoint.update(save_every=2, keep=1, async_save=False)
  c.optimizer.update(lr=1e-2, warmup_steps=1, schedule_steps=2)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A trained tiny run whose config names a chat template."""
  root = tmp_path_factory.mktemp('export')
  template = root / 'chat.jinja'
  template.write_text(TEMPLATE)
  c = tiny_config(str(root / 'tok'))
  c.data.preference.chat_template = str(template)
  trainer, _ = train.run(c, str(root / 'run'))
  return trainer, str(root / 'run')


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  _, workdir = run
  out = str(tmp_path_factory.mktemp('hf') / 'model')
  hf.main(['export', workdir, out])
  return out


def test_export_reloads_with_equal_logits_and_ids(run, exported):
  trainer, _ = run
  names = sorted(os.listdir(exported))
  for name in ('config.json', 'model.safetensors', 'tokenizer.json',
               'tokenizer_config.json', 'special_tokens_map.json',
               'generation_config.json', 'chat_template.jinja'):
    assert name in names, names
  model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  assert type(model).__name__ == 'LlamaForCausalLM'
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  ours = trainer.tokenizer
  for text in TEXTS:
    assert tokenizer.encode(text, add_special_tokens=False) == ours.encode(
        text), text
    assert tokenizer.decode(ours.encode(text)) == text
  # Reserved ids keep their ids and renderings.
  reserved = [ours.mode_id('[S2S]'), ours.sentinel_id(0), ours.sentinel_id(7)]
  assert tokenizer.convert_ids_to_tokens(reserved) == [
      '[S2S]', '<extra_id_0>', '<extra_id_7>']
  assert tokenizer.eos_token_id == ours.eos_id
  tokens = np.asarray([ours.encode(TEXTS[0])[:20]], np.int32)
  cfg = trainer.model_cfg
  graphdef, _ = state_lib.abstract_model(cfg)
  logits = nnx.merge(graphdef, hf.load_checkpoint_params(
      run[1], cfg))(jnp.asarray(tokens))
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert theirs.shape == (1, tokens.shape[1], cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(logits), theirs, atol=1e-4, rtol=1e-4)


def test_converted_tokenizer_encodes_the_corpus_alike(run, exported):
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  ours = run[0].tokenizer
  docs = [d['text'] for d in embedded.embedded_documents('heldout')]
  docs += [d['text'] for d in embedded.embedded_documents('train')[:50]]
  for doc in docs:
    assert tokenizer.encode(doc, add_special_tokens=False) == ours.encode(doc)


def test_export_keeps_chat_template_and_generation_config(run, exported):
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert tokenizer.chat_template == TEMPLATE
  messages = [{'role': 'user', 'content': 'hi'}]
  assert tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True) == (
          '<<user>>hi<<assistant>>')
  generation = transformers.GenerationConfig.from_pretrained(exported)
  ours = run[0].tokenizer
  assert generation.eos_token_id == ours.eos_id
  assert ours.sentinel_id(0) in generation.suppress_tokens
  assert ours.mode_id('[S2S]') in generation.suppress_tokens
  assert ours.eos_id not in generation.suppress_tokens


def test_load_and_transformers_generate_the_same_greedy_ids(run, exported):
  """``alignax.load`` of a plain LM run: ids as trained, stops at EOS; the
  export's ``generate`` (its generation_config) samples the same ids."""
  lm = alignax.load(run[1])
  tok = lm.tokenizer
  assert lm.mode is None and not lm.add_bos
  ids = lm.prompt_ids(TEXTS[0])
  assert ids == tok.encode(TEXTS[0])
  ours = gen.generate(lm.graphdef, lm.params, [ids], max_new_tokens=8,
                      rng=jax.random.key(0), stop_tokens=(tok.eos_id,),
                      suppress_tokens=lm.suppressed_ids(stop_at_eos=True),
                      mesh=lm.mesh)[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=8,
                         do_sample=False)
  assert out[0, len(ids):].tolist()[:len(ours)] == ours
  text = lm.generate(TEXTS[0], max_new_tokens=8)
  assert isinstance(text, str) and '<extra_id_' not in text


def test_builtin_chat_template_is_the_builtin_renderer():
  run = {'data': {'task': 'preference', 'preference': {'chat_template': ''}}}
  source = hf.run_chat_template(run)
  messages = [{'role': 'system', 'content': 'be brief'},
              {'role': 'user', 'content': 'hi'}]
  rendered = chat.TemplateChat(source).render(messages,
                                              add_generation_prompt=True)
  assert rendered == chat.BuiltinChat().prompt(messages)
  assert hf.run_chat_template({'data': {'task': 'lm'}}) is None


def test_mismatched_like_is_one_line_naming_the_tensor(run, tmp_path, capsys):
  _, workdir = run
  like = tmp_path / 'other'
  like.mkdir()
  config = transformers.LlamaConfig(
      vocab_size=run[0].model_cfg.vocab_size, hidden_size=64,
      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
  config.save_pretrained(like)
  with pytest.raises(SystemExit) as e:
    hf.main(['export', workdir, str(tmp_path / 'out'), '--like', str(like)])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "'model.embed_tokens.weight'" in err and 'does not fit' in err


def test_export_of_an_older_run_without_config_is_one_line(run, tmp_path,
                                                           capsys):
  workdir = tmp_path / 'old'
  workdir.mkdir()
  (workdir / 'model_config.json').write_text(json.dumps({}))
  with pytest.raises(SystemExit):
    hf.main(['export', str(workdir), str(tmp_path / 'out')])
  err = capsys.readouterr().err
  assert 'config.json is missing' in err and len(err.strip().splitlines()) == 1
