"""LoRA adapters as a PEFT adapter directory, and the merged model.

``export_peft`` writes what ``peft.PeftModel.from_pretrained(base, DIR)``
loads onto the Hugging Face base model: ``adapter_config.json`` (``r``,
``lora_alpha``, ``use_rslora``, ``target_modules``) and
``adapter_model.safetensors`` with, per layer and target,
``base_model.model.model.layers.{i}.<module>.lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]`` (torch ``Linear`` layout). alignax's adapter
``A [in..., r]`` / ``B [r, out...]`` flatten their multi-axis sides in the
same row-major order as the kernels' HF layout (``[N * Dh]`` heads), so the
conversion is a reshape and a transpose. PEFT adds
``scaling * B (A x)`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``): exactly ``alignax.models.lora``'s update.

The merged model (``W + s A B``, a plain HF directory) is written by
``python -m alignax.interop.hf export``, which folds adapters in.

Import: ``--config.checkpoint.init_from=PEFT_DIR`` starts a LoRA run from
an adapter directory whose ``base_model_name_or_path`` is a local HF
directory (:func:`run_config`, ``alignax.init_from``).

Run:
  python -m alignax.interop.peft export WORKDIR OUT_DIR [--base=HF_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from alignax import cli
from alignax.interop import hf
from alignax.models import ModelConfig
from alignax.models import lora

# alignax kernel -> the HF Llama-family module it adapts.
HF_MODULES = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
    'down': 'mlp.down_proj',
}
_GROUP = {'q': 'attn', 'k': 'attn', 'v': 'attn', 'o': 'attn', 'gate': 'mlp',
          'up': 'mlp', 'down': 'mlp'}
PREFIX = 'base_model.model.model.layers.{i}.'


def adapter_config(cfg: ModelConfig, base_model: str = '') -> dict:
  """PEFT's ``LoraConfig`` as ``adapter_config.json`` holds it."""
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model or None,
      'r': cfg.lora_rank, 'lora_alpha': cfg.lora_alpha,
      'use_rslora': cfg.lora_rslora, 'lora_dropout': cfg.lora_dropout, 'bias': 'none',
      'fan_in_fan_out': False, 'inference_mode': True,
      'init_lora_weights': True, 'modules_to_save': None,
      'target_modules': sorted(HF_MODULES[t].split('.')[-1]
                               for t in cfg.lora_targets),
  }


def peft_tensors(cfg: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
  """HF-named ``lora_A`` ``[r, in]`` / ``lora_B`` ``[out, r]`` per layer."""
  out = {}
  for target in cfg.lora_targets:
    adapter = params['blocks'][_GROUP[target]][target + lora.SUFFIX]
    a = np.asarray(hf._to_host(adapter['a']), np.float32)  # [L, in..., r]
    b = np.asarray(hf._to_host(adapter['b']), np.float32)  # [L, r, out...]
    for i in range(cfg.n_layers):
      name = PREFIX.format(i=i) + HF_MODULES[target]
      out[name + '.lora_A.weight'] = a[i].reshape(-1, cfg.lora_rank).T
      out[name + '.lora_B.weight'] = b[i].reshape(cfg.lora_rank, -1).T
  return out


def export_peft(directory: str, cfg: ModelConfig, params: Mapping, *,
                base_model: str = '', dtype: str = 'float32') -> None:
  """Writes ``adapter_config.json`` + ``adapter_model.safetensors``.

  Every process must call it (adapters may be sharded across hosts);
  process 0 writes.
  """
  if not cfg.lora_rank:
    raise ValueError('the model has no LoRA adapters (lora_rank=0): export '
                     'the full model with python -m alignax.interop.hf export')
  unknown = set(cfg.lora_targets) - set(HF_MODULES)
  if unknown:
    raise ValueError(f'no PEFT module name for targets {sorted(unknown)}')
  tensors = peft_tensors(cfg, params)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config(cfg, base_model), f, indent=2)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v.astype(dtype))
             for k, v in tensors.items()},
            os.path.join(directory, 'adapter_model.safetensors'),
            metadata={'format': 'pt'})


def export_run(workdir: str, out_dir: str, *, base_model: str = '') -> None:
  """The adapters of a LoRA run's latest checkpoint as a PEFT directory."""
  cfg = hf.read_model_config(hf.run_dir(workdir))
  params = hf.load_checkpoint_params(workdir, cfg)
  export_peft(out_dir, cfg, params, base_model=base_model)


# --- import: a PEFT adapter directory as the starting adapters -----------------


ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def is_peft_dir(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> dict:
  with open(os.path.join(path, ADAPTER_CONFIG)) as f:
    return json.load(f)


def _targets(adapter_cfg: Mapping) -> tuple[str, ...]:
  by_module = {m.split('.')[-1]: t for t, m in HF_MODULES.items()}
  modules = adapter_cfg['target_modules']
  modules = [modules] if isinstance(modules, str) else modules
  unknown = sorted(set(modules) - set(by_module))
  if unknown:
    raise ValueError(f'adapter target_modules {unknown} have no alignax '
                     f'kernel; alignax adapts {sorted(by_module)}')
  return tuple(t for t in lora.TARGETS if HF_MODULES[t].split('.')[-1]
               in modules)


def run_config(config):
  """``config`` with an init_from PEFT directory resolved.

  ``checkpoint.init_from=PEFT_DIR``: ``config.lora`` takes the adapter's
  rank, alpha, rsLoRA and targets, and the model and tokenizer come from
  its ``base_model_name_or_path`` (a local HF directory; see
  ``interop.hf.run_config``); init_from stays the PEFT directory, which
  :func:`alignax.init_from.load_init_params` reads (base, then adapters).
  Other configs go through ``hf.run_config`` unchanged.
  """
  source = config.checkpoint.init_from
  if not is_peft_dir(source):
    return hf.run_config(config)
  adapter = read_adapter_config(source)
  base = base_dir(source)
  c = config.copy_and_resolve_references()
  if adapter.get('peft_type', 'LORA') != 'LORA':
    raise ValueError(f'{source}: peft_type={adapter["peft_type"]!r}, only '
                     'LORA adapters are imported')
  c.lora.update(enabled=True, rank=int(adapter['r']),
                alpha=float(adapter['lora_alpha']),
                rslora=bool(adapter.get('use_rslora', False)),
                dropout=float(adapter.get('lora_dropout') or 0.0),
                targets=_targets(adapter))
  c.checkpoint.init_from = base
  c = hf.run_config(c)
  c.checkpoint.init_from = source
  return c


def base_dir(source: str) -> str:
  """The local HF base directory a PEFT adapter directory names."""
  base = read_adapter_config(source).get('base_model_name_or_path') or ''
  if not hf.is_hf_dir(base):
    raise ValueError(
        f'{source}: adapter_config.json base_model_name_or_path={base!r} is '
        'not a local Hugging Face directory (config.json + *.safetensors); '
        'point it at the base model\'s directory')
  return base


def load_adapters(source: str, params, target):
  """``params`` with their adapters replaced by ``source``'s PEFT tensors.

  ``target``: the abstract params (shapes and shardings) they must match.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(source, ADAPTER_WEIGHTS))
  tensors = {k.replace('.lora_A.default.', '.lora_A.').replace(
      '.lora_B.default.', '.lora_B.'): v for k, v in tensors.items()}
  out = jax.tree.map(lambda x: x, params)
  for target_name, module in HF_MODULES.items():
    group = out['blocks'][_GROUP[target_name]]
    key = target_name + lora.SUFFIX
    if key not in group:
      continue
    want = target['blocks'][_GROUP[target_name]][key]
    layers = want['a'].shape[0]
    names = [PREFIX.format(i=i) + module for i in range(layers)]
    try:
      a = np.stack([tensors[n + '.lora_A.weight'].T for n in names])
      b = np.stack([tensors[n + '.lora_B.weight'].T for n in names])
    except KeyError as e:
      raise ValueError(f'{source}: adapter tensor {e} is missing') from None
    for part, value in (('a', a), ('b', b)):
      spec = want[part]
      value = value.reshape(spec.shape).astype(spec.dtype)
      group[key][part] = jax.device_put(value, getattr(spec, 'sharding', None))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """``export WORKDIR OUT_DIR [--base=HF_DIR]``."""
  parser = argparse.ArgumentParser(prog='python -m alignax.interop.peft')
  parser.add_argument('--debug', action='store_true',
                      help='full traceback of a user error')
  sub = parser.add_subparsers(dest='command', required=True)
  exp = sub.add_parser('export', help='LoRA run -> PEFT adapter directory')
  exp.add_argument('workdir', help='a run workdir, checkpoints/ or step dir')
  exp.add_argument('out_dir')
  exp.add_argument('--base', default='',
                   help='recorded as base_model_name_or_path (the HF base)')
  args = parser.parse_args(argv)
  try:
    export_run(args.workdir, args.out_dir, base_model=args.base)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or not cli.is_user_error(e):
      raise
    cli.fail(cli.one_line(e))
  print(f'wrote {args.out_dir}; load it with peft.PeftModel.from_pretrained('
        'base_model, out_dir)')


if __name__ == '__main__':
  main()
