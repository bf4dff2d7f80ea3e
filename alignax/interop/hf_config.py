"""Hugging Face ``config.json`` <-> :class:`alignax.models.ModelConfig`.

Supported families (``model_type`` -> ``architectures``) are those of
``FAMILIES``. Each differs from Llama only in fields that ``ModelConfig``
has: Mistral (sliding window on every layer), Qwen2 (q/k/v biases, optional
windows), Qwen3 (QK-norm), Gemma (``(1 + w)`` norms, ``sqrt(d)`` embedding
scale, GeGLU, tied embeddings), Gemma 2 (Gemma plus sandwich norms,
attention and final soft-capping, ``query_pre_attn_scalar``, alternating
sliding windows). Anything else (other rope types, attention biases on the
output projection, MLP biases, partial rotary, bidirectional attention) is
rejected with an error naming the field, rather than imported wrongly.

Both the ``transformers`` 4 layout (``rope_theta`` + ``rope_scaling``) and
the 5 layout (``rope_parameters``) are read; exports write the 4 layout,
which both versions load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from alignax.models import ModelConfig
from alignax.models.config import ADAPTER_FIELDS

# model_type -> the *ForCausalLM class whose tensor names we read.
FAMILIES = {
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
    'qwen3': 'Qwen3ForCausalLM',
    'gemma': 'GemmaForCausalLM',
    'gemma2': 'Gemma2ForCausalLM',
}
_GEMMAS = ('gemma', 'gemma2')
# tie_word_embeddings when config.json omits it (the config classes' default).
_TIED_BY_DEFAULT = {'llama': False, 'mistral': False, 'qwen2': False,
                    'qwen3': False, 'gemma': True, 'gemma2': True}
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu',
                'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                'gelu': 'gelu'}
_ROPE_TYPES = ('default', 'linear', 'llama3')


def _family(hf: Mapping[str, Any]) -> str:
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise ValueError(
        f'Hugging Face model_type={model_type!r} is not supported; supported '
        f'model types: {sorted(FAMILIES)}.')
  architectures = hf.get('architectures') or [FAMILIES[model_type]]
  if list(architectures) != [FAMILIES[model_type]]:
    raise ValueError(
        f'Hugging Face architectures={architectures} is not supported for '
        f'model_type={model_type!r}; only {FAMILIES[model_type]!r} (a causal '
        'LM with its lm_head) is.')
  return model_type


def _reject(hf, field, ok, why):
  if not ok:
    raise ValueError(f'Hugging Face config {field}={hf.get(field)!r} is not '
                     f'supported: {why}.')


def _activation(hf, model_type) -> str:
  field = 'hidden_activation' if hf.get('hidden_activation') else 'hidden_act'
  name = hf.get(field) or ('gelu_pytorch_tanh' if model_type in _GEMMAS
                           else 'silu')
  if model_type in _GEMMAS and name == 'gelu':
    # transformers maps Gemma's legacy "gelu" to the tanh approximation.
    name = 'gelu_pytorch_tanh'
  _reject(hf, field, name in _ACTIVATIONS, f'known: {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def _rope(hf) -> dict:
  """RoPE fields of ModelConfig from either config layout."""
  params = dict(hf.get('rope_scaling') or {})
  params.update(hf.get('rope_parameters') or {})
  _reject(hf, 'rope_parameters', all(not isinstance(v, Mapping)
                                     for v in params.values()),
          'per-layer-type RoPE (Gemma 3 style)')
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in _ROPE_TYPES:
    raise ValueError(f'Hugging Face rope_type={kind!r} is not supported; '
                     f'supported: {_ROPE_TYPES}.')
  partial = params.get('partial_rotary_factor',
                       hf.get('partial_rotary_factor', 1.0))
  _reject(hf, 'partial_rotary_factor', partial in (None, 1.0),
          'RoPE on every head dimension only')
  out = dict(rope_theta=float(params.get('rope_theta',
                                         hf.get('rope_theta', 10000.0))))
  if kind == 'linear':
    out.update(rope_scaling='linear', rope_factor=float(params['factor']))
  elif kind == 'llama3':
    out.update(
        rope_scaling='llama3', rope_factor=float(params['factor']),
        rope_low_freq_factor=float(params['low_freq_factor']),
        rope_high_freq_factor=float(params['high_freq_factor']),
        rope_original_max_len=int(params['original_max_position_embeddings']))
  return out


def _layer_windows(hf, model_type, n_layers) -> tuple[int, ...]:
  """Per-layer sliding windows (0 = full), following transformers' rules."""
  window = hf.get('sliding_window')
  if model_type in ('qwen2', 'qwen3') and not hf.get('use_sliding_window'):
    window = None
  if model_type in ('llama', 'gemma'):
    window = None
  types = hf.get('layer_types')
  if types is None:
    if model_type == 'gemma2':  # even layers slide, odd ones are global
      types = ['sliding_attention' if (i + 1) % 2 else 'full_attention'
               for i in range(n_layers)]
    elif model_type in ('qwen2', 'qwen3'):
      first = hf.get('max_window_layers', n_layers)
      types = ['sliding_attention' if i >= first else 'full_attention'
               for i in range(n_layers)]
    else:
      types = ['sliding_attention'] * n_layers
  _reject(hf, 'layer_types', len(types) == n_layers and set(types) <= {
      'sliding_attention', 'full_attention'},
          f'{n_layers} of sliding_attention / full_attention')
  if not window:
    return ()
  windows = tuple(int(window) if t == 'sliding_attention' else 0
                  for t in types)
  return windows if any(windows) else ()


def model_config_from_hf(hf: Mapping[str, Any], *, dtype: str = 'float32',
                         param_dtype: str = 'float32',
                         max_seq_len: int | None = None) -> ModelConfig:
  """The :class:`ModelConfig` of a Hugging Face ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``.
    dtype: compute dtype of the alignax model.
    param_dtype: storage dtype of its parameters.
    max_seq_len: override of ``max_position_embeddings``.

  Raises:
    ValueError: naming the unsupported ``model_type``/``architectures`` or
      config field.
  """
  model_type = _family(hf)
  _reject(hf, 'attention_bias', not hf.get('attention_bias'),
          'biases on the output projection too')
  _reject(hf, 'mlp_bias', not hf.get('mlp_bias'), 'MLP biases')
  _reject(hf, 'use_bidirectional_attention',
          not hf.get('use_bidirectional_attention'), 'causal LMs only')
  d, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  n_layers = int(hf['num_hidden_layers'])
  fields = dict(
      vocab_size=int(hf['vocab_size']), d_model=d, n_layers=n_layers,
      n_heads=heads,
      n_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or d // heads),
      d_ff=int(hf['intermediate_size']),
      max_seq_len=int(max_seq_len or hf.get('max_position_embeddings', 2048)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings',
                                 _TIED_BY_DEFAULT[model_type])),
      dtype=dtype, param_dtype=param_dtype,
      mlp_activation=_activation(hf, model_type),
      qkv_bias=model_type == 'qwen2', qk_norm=model_type == 'qwen3',
      layer_windows=_layer_windows(hf, model_type, n_layers),
      **_rope(hf))
  if model_type in _GEMMAS:
    fields.update(norm_offset=1.0, embed_scale=True)
  if model_type == 'gemma2':
    softcap = float(hf.get('attn_logit_softcapping') or 0.0)
    fields.update(
        post_norms=True,
        attn_scale=float(hf.get('query_pre_attn_scalar', 256)) ** -0.5,
        attn_logit_softcap=softcap,
        final_logit_softcap=float(hf.get('final_logit_softcapping') or 0.0),
        # jax.nn.dot_product_attention cannot soft-cap.
        attention='einsum' if softcap else 'fused')
  return ModelConfig(**fields)


def infer_model_type(cfg: ModelConfig) -> str:
  """The family whose layout ``cfg`` has (Llama when nothing else fits)."""
  if cfg.post_norms:
    return 'gemma2'
  if cfg.norm_offset or cfg.embed_scale:
    return 'gemma'
  if cfg.qk_norm:
    return 'qwen3'
  if cfg.qkv_bias:
    return 'qwen2'
  return 'mistral' if cfg.layer_windows else 'llama'


def _windows_to_hf(cfg: ModelConfig, model_type: str) -> dict:
  sizes = sorted(set(cfg.layer_windows) - {0})
  if len(sizes) > 1:
    raise ValueError(f'ModelConfig.layer_windows={cfg.layer_windows}: '
                     'Hugging Face configs have a single sliding_window.')
  window = sizes[0] if sizes else None
  types = ['sliding_attention' if w else 'full_attention'
           for w in cfg.layer_windows or (0,) * cfg.n_layers]
  if model_type == 'mistral':
    return dict(sliding_window=window)
  if model_type in ('qwen2', 'qwen3'):
    return dict(sliding_window=window, use_sliding_window=bool(window),
                max_window_layers=cfg.n_layers, layer_types=types)
  if model_type == 'gemma2':
    return dict(sliding_window=window or 4096, layer_types=[
        t if window else 'full_attention' for t in types])
  return {}


def hf_config_from_model(cfg: ModelConfig, model_type: str | None = None, *,
                         base: Mapping[str, Any] | None = None,
                         torch_dtype: str = 'float32') -> dict:
  """A ``config.json`` dict for ``cfg`` in the family ``model_type``.

  Args:
    cfg: the alignax model config.
    model_type: a key of ``FAMILIES``; default :func:`infer_model_type`.
    base: an original ``config.json`` whose other fields (token ids, ...)
      are kept.
    torch_dtype: dtype name recorded in the config (that of the weights).

  Raises:
    ValueError: if the family cannot express ``cfg`` (the field is named).
  """
  model_type = model_type or infer_model_type(cfg)
  if model_type not in FAMILIES:
    raise ValueError(f'model_type={model_type!r} is not one of '
                     f'{sorted(FAMILIES)}.')
  out = {k: v for k, v in (base or {}).items()
         if k not in ('rope_parameters', 'rope_scaling', 'layer_types')}
  act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh',
         'gelu': 'gelu'}[cfg.mlp_activation]
  out.update(
      architectures=[FAMILIES[model_type]], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      rope_theta=cfg.rope_theta, attention_bias=False, hidden_act=act,
      torch_dtype=torch_dtype, **_windows_to_hf(cfg, model_type))
  if cfg.rope_scaling == 'linear':
    out['rope_scaling'] = dict(rope_type='linear', factor=cfg.rope_factor)
  elif cfg.rope_scaling == 'llama3':
    out['rope_scaling'] = dict(
        rope_type='llama3', factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_len)
  if model_type == 'gemma2':
    out.update(hidden_activation=act,
               query_pre_attn_scalar=_pre_attn_scalar(cfg),
               attn_logit_softcapping=cfg.attn_logit_softcap or None,
               final_logit_softcapping=cfg.final_logit_softcap or None)
  _check_round_trip(cfg, out, model_type)
  return out


def _pre_attn_scalar(cfg):
  if not cfg.attn_scale:
    return cfg.head_dim
  scalar = cfg.attn_scale ** -2.0
  return int(round(scalar)) if math.isclose(scalar, round(scalar)) else scalar


def _check_round_trip(cfg, hf, model_type):
  """Raises unless reading ``hf`` back gives ``cfg`` (family can hold it)."""
  back = model_config_from_hf(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              max_seq_len=cfg.max_seq_len)
  ignore = ('attention', 'attention_impl', 'remat') + ADAPTER_FIELDS
  for field in dataclasses.fields(ModelConfig):
    a, b = getattr(cfg, field.name), getattr(back, field.name)
    if field.name == 'attn_scale':  # 0 means the default 1 / sqrt(Dh)
      a, b = (x or cfg.head_dim ** -0.5 for x in (a, b))
    if field.name in ignore or a == b or (
        isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)):
      continue
    raise ValueError(
        f'model_type={model_type!r} cannot express ModelConfig.{field.name}='
        f'{a!r} (it would load as {b!r}).')
