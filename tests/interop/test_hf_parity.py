"""Hugging Face import/export parity: tiny random models built by transformers.

The reference is ``transformers`` itself (eager attention, float32): each
family's tiny model is randomly initialised, perturbed so that norms and
biases are not at their trivial init, saved with ``save_pretrained`` and
imported; logits must agree within 1e-4 and the DPO sequence log-probs too.
"""
import json
import os
import shutil

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from alignax import checkpoint as ckpt_lib  # noqa: E402
from alignax import generate as gen  # noqa: E402
from alignax import policy  # noqa: E402
from alignax import sharding as shd  # noqa: E402
from alignax import state as state_lib  # noqa: E402
from alignax.interop import hf  # noqa: E402
from alignax.interop import hf_config  # noqa: E402

V, T = 128, 12
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
# Windows (4) shorter than T so that the sliding masks matter; llama3 RoPE
# with original length 8 puts one frequency in each of its branches; Gemma 2
# soft-caps small enough to bend the logits.
FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(**_COMMON, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8)),
    'mistral': lambda: transformers.MistralConfig(**_COMMON, sliding_window=4),
    'qwen2': lambda: transformers.Qwen2Config(
        **_COMMON, use_sliding_window=True, sliding_window=4,
        max_window_layers=1),
    'qwen3': lambda: transformers.Qwen3Config(**_COMMON),
    'gemma': lambda: transformers.GemmaConfig(**_COMMON),
    'gemma2': lambda: transformers.Gemma2Config(
        **_COMMON, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=1.5),
}


def _hf_model(family):
  config = FAMILIES[family]()
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """family -> (HF model, its save_pretrained directory)."""
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for family in FAMILIES:
    model = _hf_model(family)
    model.save_pretrained(root / family)
    out[family] = (model, str(root / family))
  return out


def _tokens():
  return np.random.default_rng(0).integers(0, V, (2, T))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@jax.jit
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def _ours(cfg, params, tokens):
  graphdef, _ = state_lib.abstract_model(cfg)
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))


def _torch_sequence_logps(logits, tokens, weights):
  """Independent reference: torch log_softmax, gather, masked sum."""
  logp = torch.log_softmax(torch.tensor(logits[:, :-1]), -1)
  picked = logp.gather(-1, torch.tensor(tokens[:, 1:])[..., None])[..., 0]
  return (picked * torch.tensor(weights)).sum(-1).numpy()


@pytest.mark.parametrize('family', list(FAMILIES))
def test_logits_and_sequence_logps_match(saved, family):
  model, path = saved[family]
  cfg, params = hf.load_hf(path)
  tokens = _tokens()
  ours, theirs = _ours(cfg, params, tokens), _hf_logits(model, tokens)
  assert ours.shape == theirs.shape == (2, T, V)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  weights = np.zeros((2, T - 1), np.float32)
  weights[0, 4:], weights[1, 7:] = 1, 1  # completions of different lengths
  logps = policy.sequence_logps(
      policy.token_logps(ours[:, :-1], tokens[:, 1:]), weights)
  np.testing.assert_allclose(
      logps, _torch_sequence_logps(theirs, tokens, weights), atol=1e-4)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_export_round_trip(saved, family, tmp_path):
  model, path = saved[family]
  cfg, params = hf.load_hf(path)
  base = hf.read_hf_config(path)
  hf.export_hf(str(tmp_path), cfg, params, model_type=family,
               base_config=base)
  # The same tensors, bit for bit, under the same names and shapes.
  original = load_file(os.path.join(path, 'model.safetensors'))
  exported = load_file(str(tmp_path / 'model.safetensors'))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  back = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation='eager').eval()
  assert type(back) is type(model)
  tokens = _tokens()
  np.testing.assert_allclose(_hf_logits(back, tokens),
                             _hf_logits(model, tokens), atol=1e-6)
  cfg2, params2 = hf.load_hf(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_export_loads_in_transformers(saved, tmp_path):
  model, path = saved['qwen2']
  cfg, params = hf.load_hf(path)
  hf.export_hf(str(tmp_path), cfg, params, dtype='bfloat16')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert back.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      back.model.layers[0].self_attn.q_proj.bias.detach().float().numpy(),
      model.model.layers[0].self_attn.q_proj.bias.detach().bfloat16().float()
      .numpy())


def test_bfloat16_checkpoint_and_sharded_index(saved, tmp_path):
  model, path = saved['llama']
  model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size='20KB')
  model.to(torch.float32)
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith('safetensors'))
  assert len(files) > 1 and (tmp_path / 'model.safetensors.index.json').exists()
  cfg, params = hf.load_hf(str(tmp_path))
  assert params['embed']['embedding'].dtype == jnp.float32
  expected = model.model.layers[1].self_attn.k_proj.weight.detach()
  expected = expected.bfloat16().float().numpy()  # [K*Dh, D]
  # NumPy reference of the layout map: [K*Dh, D] -> [D, K, Dh].
  np.testing.assert_array_equal(
      params['blocks']['attn']['k'][1],
      expected.reshape(2, 8, 32).transpose(2, 0, 1))
  del cfg


def test_import_shards_onto_the_mesh(saved):
  _, path = saved['qwen3']
  _, single = hf.load_hf(path, mesh=shd.make_mesh({'fsdp': 1},
                                                 jax.devices()[:1]))
  mesh = shd.make_mesh({'fsdp': 4, 'tensor': 2})
  cfg, params = hf.load_hf(path, mesh=mesh)
  q = params['blocks']['attn']['q']  # [L, D, H, Dh]
  assert q.sharding.spec == jax.P(None, 'fsdp', 'tensor', None)
  assert params['embed']['embedding'].sharding.spec == jax.P('tensor', 'fsdp')
  assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
  jax.tree.map(np.testing.assert_array_equal, params, single)
  del cfg


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  with open(os.path.join(dst, 'config.json')) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(dst)


@pytest.mark.parametrize('changes, message', [
    (dict(model_type='gpt2'), "model_type='gpt2' is not supported"),
    (dict(architectures=['LlamaForSequenceClassification']),
     "architectures=\\['LlamaForSequenceClassification'\\]"),
    (dict(rope_parameters=dict(rope_type='yarn', factor=2.0,
                               rope_theta=1e4)), "rope_type='yarn'"),
    (dict(attention_bias=True), 'attention_bias=True'),
    (dict(intermediate_size=48), "'model.layers.0.mlp.gate_proj.weight' has "
     'shape'),
])
def test_unsupported_configs_fail_naming_the_field(saved, tmp_path, changes,
                                                   message):
  path = _edit_config(saved['llama'][1], tmp_path / 'edited', **changes)
  with pytest.raises(ValueError, match=message):
    hf.load_hf(path)


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
  src = saved['llama'][1]
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  missing = tmp_path / 'missing'
  missing.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), missing)
  save_file({k: v for k, v in tensors.items()
             if k != 'model.layers.1.mlp.up_proj.weight'},
            str(missing / 'model.safetensors'))
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' "
                     r'is missing \(it holds alignax parameter blocks/mlp/up'):
    hf.load_hf(str(missing))
  extra = tmp_path / 'extra'
  extra.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), extra)
  save_file(dict(tensors, **{'model.layers.0.mlp.gate_proj.bias':
                             np.zeros(64, np.float32)}),
            str(extra / 'model.safetensors'))
  with pytest.raises(ValueError, match='gate_proj.bias'):
    hf.load_hf(str(extra))


def test_export_rejects_what_the_family_cannot_hold(saved):
  cfg, _ = hf.load_hf(saved['qwen2'][1])
  with pytest.raises(ValueError, match="'llama' cannot express "
                     'ModelConfig.qkv_bias=True'):
    hf_config.hf_config_from_model(cfg, 'llama')
  assert hf_config.infer_model_type(cfg) == 'qwen2'


def test_cli_import_init_from_checkpoint_and_export(saved, tmp_path, capsys):
  model, path = saved['gemma2']
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'exported')
  hf.main(['import', path, workdir])
  printed = capsys.readouterr().out
  assert f'--config.checkpoint.init_from={workdir}' in printed
  assert '--config.model.layer_windows=(4,0)' in printed
  cfg = hf.read_model_config(workdir)
  assert cfg == hf.load_hf(path)[0]
  # What train.py's init_from does: a partial restore of params only.
  _, abstract = state_lib.abstract_model(cfg)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                        nnx.to_pure_dict(abstract))
  params = ckpt_lib.load_params(workdir, target)
  tokens = _tokens()
  np.testing.assert_allclose(_ours(cfg, params, tokens),
                             _hf_logits(model, tokens), atol=1e-4)
  hf.main(['export', workdir, out, '--like', path])
  back = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation='eager').eval()
  np.testing.assert_allclose(_hf_logits(back, tokens),
                             _hf_logits(model, tokens), atol=1e-6)


@pytest.mark.parametrize('family', ['llama', 'gemma2'])
def test_greedy_generation_equals_transformers(saved, family):
  model, path = saved[family]
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  cfg, params = hf.load_hf(path)
  prompts = [[5, 17, 99, 3, 41, 8], [64, 2, 90]]
  new = 8  # 6 + 8 > window 4: the decode windows matter
  batch = torch.zeros((2, 6), dtype=torch.long)
  mask = torch.zeros((2, 6), dtype=torch.long)
  for r, p in enumerate(prompts):  # left padding, as alignax does
    batch[r, 6 - len(p):], mask[r, 6 - len(p):] = torch.tensor(p), 1
  with torch.no_grad():
    theirs = model.generate(batch, attention_mask=mask, max_new_tokens=new,
                            do_sample=False)[:, 6:].tolist()
  graphdef, _ = state_lib.abstract_model(cfg)
  ours = gen.generate(graphdef, params, prompts, max_new_tokens=new,
                      rng=jax.random.key(0))
  assert ours == theirs


def test_top_k_top_p_keep_the_same_tokens_as_transformers():
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
  for top_k, top_p in ((5, 1.0), (0, 0.6), (8, 0.3)):
    warpers = []
    if top_k:
      warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
      warpers.append(transformers.TopPLogitsWarper(top_p))
    warped = torch.tensor(logits)
    for w in warpers:
      warped = w(None, warped)
    kept_hf = np.isfinite(warped.numpy())
    samples = jax.vmap(lambda k: gen.sample_logits(
        jnp.asarray(logits), k, temperature=1.0, top_k=top_k, top_p=top_p))(
            jax.random.split(jax.random.key(0), 400))  # [400, 4]
    for row in range(4):
      seen = np.unique(np.asarray(samples[:, row]))
      assert kept_hf[row, seen].all()
      assert len(seen) == kept_hf[row].sum()  # 400 draws hit every kept id
