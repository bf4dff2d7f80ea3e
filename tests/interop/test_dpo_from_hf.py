"""A new user's path: a local HF Llama and TRL-format JSONL, through
``configs/dpo_from_hf.py`` on the command line, to an export that
``transformers`` reloads with its chat template and generates from."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from tokenizers import Tokenizer  # noqa: E402
from tokenizers import decoders  # noqa: E402
from tokenizers import models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from tokenizers import trainers  # noqa: E402

from alignax.data import embedded  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
            "{% generation %}{{ m['content'] }}{% endgeneration %}</s>"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
            "{% endif %}")


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny random Llama with a byte-level BPE tokenizer and chat template."""
  root = tmp_path_factory.mktemp('hf_user')
  texts = [doc['text'] for doc in embedded.embedded_documents('train')[:40]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<pad>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
      pad_token='<pad>')
  fast.chat_template = TEMPLATE
  fast.save_pretrained(root)
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=8, max_position_embeddings=128, bos_token_id=1,
      eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root)
  return str(root)


def _trl_records():
  user = [{'role': 'user', 'content': 'Name a color.'}]
  plain = {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'}
  conversational = {
      'prompt': user, 'chosen': [{'role': 'assistant', 'content': 'Blue.'}],
      'rejected': [{'role': 'assistant', 'content': 'Loud.'}]}
  implicit = {'chosen': 'Q: 2+2? A: 4', 'rejected': 'Q: 2+2? A: five'}
  return [plain, conversational, implicit] * 8


def _run(args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  env['XLA_FLAGS'] = ' '.join(  # one device, as a laptop user has
      f for f in env.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count'))
  done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        check=False, **kwargs)
  assert done.returncode == 0, done.stderr[-4000:]
  return done


def test_recipe_from_hf_and_trl_jsonl_to_a_transformers_export(hf_dir,
                                                               tmp_path):
  data = tmp_path / 'prefs.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in _trl_records()))
  workdir = str(tmp_path / 'run')
  _run([os.path.join('launch', 'tpu_train.py'),
        f'--config=configs/dpo_from_hf.py:{hf_dir}', f'--workdir={workdir}',
        f'--config.data.paths={data}', '--config.data.eval_fraction=0.2',
        '--config.train.steps=2', '--config.train.batch_size=2',
        '--config.train.seq_len=64', '--config.train.eval_every=2',
        '--config.train.eval_batches=1', '--config.train.progress_bar=False',
        '--config.checkpoint.save_every=2', '--config.model.dtype=float32',
        '--config.optimizer.warmup_steps=1',
        '--config.data.preference.max_prompt_len=24',
        '--config.data.preference.max_response_len=16'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('eval/loss' in r for r in records)
  out = str(tmp_path / 'export')
  _run(['-m', 'alignax.interop.hf', 'export', workdir, out,
        f'--like={hf_dir}'])
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.chat_template == TEMPLATE
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  prompt = tokenizer.apply_chat_template(
      [{'role': 'user', 'content': 'Name a color.'}],
      add_generation_prompt=True, return_tensors='pt', return_dict=True)
  with torch.no_grad():
    ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)
  assert ids.shape[1] > prompt['input_ids'].shape[1]
  text = _run(['-m', 'alignax.generate', f'--workdir={workdir}',
               '--prompt=The sky is', '--max_new_tokens=4']).stdout
  assert text.strip()
