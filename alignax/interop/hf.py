"""Hugging Face checkpoints in and out: import, export, init_from checkpoints.

Import reads a local directory (``config.json`` and ``*.safetensors``, with
or without ``model.safetensors.index.json``) tensor by tensor and places each
parameter directly into its shards on the mesh: for every parameter only the
shards this process addresses are filled on host (one layer's tensor read
at a time, copied into each local shard's buffer), then handed to their
devices. Peak host memory is therefore one parameter's local shards plus one
layer's tensor, never the model, and every process reads only what it needs.

Hugging Face's Llama-family tensors are already in the half-split RoPE
layout (their conversion script permutes q/k rows into ``rotate_half``
order), which is alignax's, so q/k are reshaped and transposed only.

Command line::

  python launch/tpu_train.py --config=configs/dpo_demo.py \\
      --config.checkpoint.init_from=HF_DIR      # import on the fly
  python -m alignax.interop.hf import HF_DIR WORKDIR   # or once, to orbax
  python launch/tpu_train.py --config=configs/dpo_demo.py \\
      --config.checkpoint.init_from=WORKDIR <the printed --config.model flags>
  python -m alignax.interop.hf export RUN_WORKDIR OUT_DIR --like=HF_DIR

Export without ``--like`` (a model pretrained here) builds the whole
directory from the run itself: ``config.json`` from the run's
``model_config.json`` in the family that can hold it
(:func:`hf_config.infer_model_type`: Llama for the plain model; Mistral,
Qwen2, Qwen3, Gemma, Gemma 2 for their features), the vocabulary at the
model's full (padded) size; the tokenizer converted to ``tokenizer.json``
with every reserved id (UL2 mode tokens, sentinels) at its id
(:mod:`alignax.interop.hf_tokenizer`); the chat template of a preference run
(``chat_template.jinja``); ``generation_config.json`` with the BOS/EOS/PAD
ids and, as ``suppress_tokens``, the reserved ids a sample must not
contain::

  python -m alignax.interop.hf export /tmp/alignax_demo /tmp/demo_hf

A ``transformers`` model then reads a prompt causally: a UL2 run's
``[S2S]`` mode prefix (see :mod:`alignax.generate`) is the caller's to add
(the text ``"[S2S]def "`` tokenizes to it there). With ``--like``, a run
whose parameter shapes differ from the ``--like`` model's is a one-line
error naming the first tensor that differs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import glob
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax import traverse_util
from jax.experimental import multihost_utils

from alignax import checkpoint as ckpt_lib
from alignax import cli
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.data import chat as chat_lib
from alignax.data import tokenizer as tok_lib
from alignax.interop import hf_config
from alignax.interop import hf_tokenizer
from alignax.models import ModelConfig
from alignax.models import lora
from alignax.models import quant
from alignax.models.config import ADAPTER_FIELDS

MODEL_CONFIG_FILE = ckpt_lib.MODEL_CONFIG_FILE
# Files copied next to an export so that it is a complete HF directory.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'tokenizer.model',
                   'generation_config.json', 'chat_template.jinja')
RUN_CONFIG_FILE = 'config.json'  # the run's resolved config (train.py)
_SAFETENSORS_DTYPES = {'float32': 'F32', 'float16': 'F16',
                       'bfloat16': 'BF16', 'float64': 'F64'}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One parameter: its pure-dict path, HF tensor name and layout maps.

  ``hf_name`` holds ``{i}`` for per-layer tensors, which alignax stacks on a
  leading ``[L]`` axis. ``to_alignax`` / ``to_hf`` convert one layer's
  tensor (they work on NumPy arrays and on tracers).
  """
  path: tuple[str, ...]
  hf_name: str
  to_alignax: Callable
  to_hf: Callable

  @property
  def stacked(self) -> bool:
    return '{i}' in self.hf_name


def _same(x):
  return x


def _transpose(x):
  return x.T


def _qkv_specs(name, n, dh, layer, bias):
  """q/k/v: HF ``[N*Dh, D]`` (torch Linear: out x in) <-> ``[D, N, Dh]``."""
  specs = [TensorSpec(
      ('blocks', 'attn', name), f'{layer}self_attn.{name}_proj.weight',
      lambda w: w.reshape(n, dh, w.shape[-1]).transpose(2, 0, 1),
      lambda w: w.transpose(1, 2, 0).reshape(n * dh, w.shape[0]))]
  if bias:
    specs.append(TensorSpec(
        ('blocks', 'attn', f'{name}_bias'),
        f'{layer}self_attn.{name}_proj.bias',
        lambda b: b.reshape(n, dh), lambda b: b.reshape(n * dh)))
  return specs


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every parameter of the model ``cfg`` describes, with its HF name."""
  h, dh, layer = cfg.n_heads, cfg.head_dim, 'model.layers.{i}.'
  specs = [
      TensorSpec(('embed', 'embedding'), 'model.embed_tokens.weight', _same,
                 _same),
      TensorSpec(('final_norm', 'scale'), 'model.norm.weight', _same, _same)]
  if not cfg.tie_embeddings:
    specs.append(TensorSpec(('lm_head',), 'lm_head.weight', _transpose,
                            _transpose))
  norms = {'attn_norm': 'input_layernorm',
           'mlp_norm': 'post_attention_layernorm'}
  if cfg.post_norms:  # Gemma 2 names its four norms by their position.
    norms = {'attn_norm': 'input_layernorm',
             'post_attn_norm': 'post_attention_layernorm',
             'mlp_norm': 'pre_feedforward_layernorm',
             'post_mlp_norm': 'post_feedforward_layernorm'}
  for ours, theirs in norms.items():
    specs.append(TensorSpec(('blocks', ours, 'scale'),
                            f'{layer}{theirs}.weight', _same, _same))
  for name, n in (('q', h), ('k', cfg.n_kv_heads), ('v', cfg.n_kv_heads)):
    specs += _qkv_specs(name, n, dh, layer, cfg.qkv_bias)
  specs.append(TensorSpec(  # HF [D, H*Dh] <-> ours [H, Dh, D]
      ('blocks', 'attn', 'o'), f'{layer}self_attn.o_proj.weight',
      lambda w: w.reshape(w.shape[0], h, dh).transpose(1, 2, 0),
      lambda w: w.transpose(2, 0, 1).reshape(w.shape[2], h * dh)))
  if cfg.qk_norm:
    for name in ('q', 'k'):
      specs.append(TensorSpec(('blocks', 'attn', f'{name}_norm', 'scale'),
                              f'{layer}self_attn.{name}_norm.weight', _same,
                              _same))
  for name in ('gate', 'up', 'down'):
    specs.append(TensorSpec(('blocks', 'mlp', name),
                            f'{layer}mlp.{name}_proj.weight', _transpose,
                            _transpose))
  return specs


def _hf_names(spec, n_layers):
  if not spec.stacked:
    return [spec.hf_name]
  return [spec.hf_name.format(i=i) for i in range(n_layers)]


class _SafetensorsDir(contextlib.ExitStack):
  """Tensor name -> open ``safe_open`` handle over a directory's files."""

  def __init__(self, directory):
    super().__init__()
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in
                     glob.glob(os.path.join(directory, '*.safetensors')))
      weight_map = None
    if not files:
      raise FileNotFoundError(f'no *.safetensors files in {directory!r}.')
    handles = {f: self.enter_context(
        safe_open(os.path.join(directory, f), framework='np')) for f in files}
    if weight_map is None:
      weight_map = {k: f for f, h in handles.items() for k in h.keys()}
    self.directory = directory
    self.names = {k: handles[f] for k, f in weight_map.items()}

  def get(self, name) -> np.ndarray:
    return self.names[name].get_tensor(name)


def _check_names(source, specs, cfg):
  """Fails on a missing tensor (named) or on tensors the model cannot hold."""
  needed = {}
  for spec in specs:
    for name in _hf_names(spec, cfg.n_layers):
      needed[name] = spec.path
  for name, path in needed.items():
    if name not in source.names:
      raise ValueError(
          f'{source.directory}: tensor {name!r} is missing (it holds alignax '
          f"parameter {'/'.join(path)}).")
  ignored = {'lm_head.weight'} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in set(source.names) - set(needed) - ignored
                      if not n.endswith('rotary_emb.inv_freq'))
  if unexpected:
    raise ValueError(
        f'{source.directory}: {len(unexpected)} tensors have no alignax '
        f'parameter, e.g. {unexpected[:3]}; the config.json does not describe '
        'these weights.')


def _shard_key(index, shape):
  """A device's shard as ``((start, stop), ...)`` (hashable, no Nones)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _place(read, shape, dtype, sharding, stacked):
  """A global array of ``shape`` built shard by shard from ``read``.

  ``read(i)`` returns layer ``i`` (``read(None)`` the whole tensor when not
  stacked) in alignax's layout. Only the shards of this process's devices
  are filled, each distinct shard once (replicas share its buffer).
  """
  keys = {d: _shard_key(idx, shape)
          for d, idx in sharding.addressable_devices_indices_map(shape).items()}
  buffers = {k: np.empty([b - a for a, b in k], dtype)
             for k in set(keys.values())}
  layers = range(shape[0]) if stacked else [None]
  for i in layers:
    tensor = read(i)
    for key, buf in buffers.items():
      if i is None:
        buf[...] = tensor[tuple(slice(a, b) for a, b in key)]
      elif key[0][0] <= i < key[0][1]:
        buf[i - key[0][0]] = tensor[tuple(slice(a, b) for a, b in key[1:])]
  arrays = [jax.device_put(buffers[k], d) for d, k in keys.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _tree_set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_hf_config(directory: str) -> dict:
  with open(os.path.join(directory, 'config.json')) as f:
    return json.load(f)


def load_hf(directory: str, *, mesh=None, rules=shd.DEFAULT_RULES,
            dtype: str = 'float32', param_dtype: str = 'float32',
            max_seq_len: int | None = None,
            vocab_size: int | None = None) -> tuple[ModelConfig, dict]:
  """Imports a local Hugging Face causal-LM directory onto a mesh.

  Args:
    directory: holds ``config.json`` and ``*.safetensors``.
    mesh: target mesh; default all devices on ``fsdp`` (the train default).
    rules: logical-axis rules, as ``config.sharding_rules``.
    dtype: compute dtype of the returned config.
    param_dtype: storage dtype of the parameters (alignax trains in fp32).
    max_seq_len: override of ``max_position_embeddings``.
    vocab_size: grow the vocabulary to this many ids (for ids the tokenizer
      reserves beyond the checkpoint's); new embedding and LM-head rows start
      at the mean of the existing ones, as ``transformers``'
      ``resize_token_embeddings`` does. Default: the checkpoint's.

  Returns:
    ``(ModelConfig, params)`` with params a pure dict (``nnx.to_pure_dict``
    layout) of ``jax.Array`` sharded by ``sharding.param_shardings``.

  Raises:
    ValueError: for an unsupported family or config field, a missing tensor
      (named), unexpected tensors, or a tensor of the wrong shape.
  """
  cfg = hf_config.model_config_from_hf(
      read_hf_config(directory), dtype=dtype, param_dtype=param_dtype,
      max_seq_len=max_seq_len)
  specs = tensor_specs(cfg)
  if vocab_size is not None and vocab_size != cfg.vocab_size:
    specs = _grown_vocab_specs(specs, cfg.vocab_size, vocab_size, directory)
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
  mesh = mesh if mesh is not None else shd.make_mesh({'fsdp': -1})
  _, abstract = state_lib.abstract_model(cfg)
  shapes = nnx.to_pure_dict(abstract)
  shardings = shd.param_shardings(abstract, mesh, rules)
  params = {}
  with _SafetensorsDir(directory) as source:
    _check_names(source, specs, cfg)
    for spec in specs:
      shape = _tree_get(shapes, spec.path).shape
      read = _reader(source, spec, shape)
      _tree_set(params, spec.path, _place(
          read, shape, jnp.dtype(param_dtype), _tree_get(shardings, spec.path),
          spec.stacked))
  if jax.tree.structure(params) != jax.tree.structure(shapes):
    raise AssertionError('tensor_specs do not cover the model parameters.')
  return cfg, params


# Vocabulary axis of the parameters that have one (embed [V, D], lm_head [D, V]).
_VOCAB_AXES = {('embed', 'embedding'): 0, ('lm_head',): 1}


def _grown_vocab_specs(specs, old: int, new: int, directory: str):
  """``specs`` whose vocabulary tensors gain ``new - old`` mean-valued rows."""
  if new < old:
    raise ValueError(
        f'{directory}: vocab_size={new} is smaller than the checkpoint\'s '
        f'{old}; alignax can grow a vocabulary, not cut one.')

  def grow(to_alignax, axis):
    def convert(w):
      w = to_alignax(w)
      mean = w.mean(axis=axis, keepdims=True)
      return np.concatenate(
          [w, np.repeat(mean, new - old, axis=axis).astype(w.dtype)], axis)
    return convert

  return [dataclasses.replace(s, to_alignax=grow(s.to_alignax,
                                                 _VOCAB_AXES[s.path]))
          if s.path in _VOCAB_AXES else s for s in specs]


def is_hf_dir(path: str) -> bool:
  """True for a local Hugging Face model directory (``config.json`` and
  ``*.safetensors``), which ``checkpoint.init_from`` accepts."""
  return bool(path) and os.path.isfile(os.path.join(path, 'config.json')) and (
      bool(glob.glob(os.path.join(path, '*.safetensors'))))


def has_chat_template(directory: str) -> bool:
  """Whether an HF directory ships a chat template (Jinja file or config)."""
  if os.path.isfile(os.path.join(directory, 'chat_template.jinja')):
    return True
  config = os.path.join(directory, 'tokenizer_config.json')
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    return bool(json.load(f).get('chat_template'))


# config.model fields that a run chooses for itself; an imported model's
# config.json sets every other one.
RUN_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention', 'attention_impl',
              'scan_layers')


def run_config(config):
  """``config`` for a run that starts from an HF directory, else ``config``.

  When ``config.checkpoint.init_from`` is a Hugging Face directory, returns
  a copy whose ``config.model`` describes that model (from its
  ``config.json``; command-line model overrides other than ``RUN_FIELDS``
  are replaced) and whose tokenizer is the directory's ``tokenizer.json``
  (unless ``tokenizer.kind='hf'`` names another), with no sentinels and a
  vocabulary grown to the ids the tokenizer reserves (see :func:`load_hf`);
  chat records use the directory's chat template when it has one.
  """
  path = config.checkpoint.init_from
  if not is_hf_dir(path):
    return config
  c = copy.deepcopy(config)
  cfg = hf_config.model_config_from_hf(read_hf_config(path))
  if not (c.tokenizer.kind == 'hf' and c.tokenizer.path):
    c.tokenizer.kind = 'hf'
    c.tokenizer.path = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(c.tokenizer.path):
      raise FileNotFoundError(
          f'{path}: no tokenizer.json; pass --config.tokenizer.kind=hf '
          '--config.tokenizer.path=<tokenizer.json>')
  c.tokenizer.num_sentinels = 0  # the checkpoint was not trained with them
  if not c.data.preference.chat_template and has_chat_template(path):
    c.data.preference.chat_template = path  # chat records: the model's own
  needed = tok_lib.load_hf_tokenizer(c.tokenizer.path, 0).vocab_size
  for field in dataclasses.fields(ModelConfig):
    if field.name not in RUN_FIELDS + ADAPTER_FIELDS:
      c.model[field.name] = getattr(cfg, field.name)
  c.model.vocab_size = max(cfg.vocab_size, needed)
  if cfg.attention == 'einsum':  # soft-capped attention (Gemma 2)
    c.model.attention = 'einsum'
  return c


def _reader(source, spec, shape):
  """``read(i)``: layer ``i`` of ``spec`` in alignax's layout, shape-checked."""
  want = tuple(shape[1:] if spec.stacked else shape)

  def read(i):
    name = spec.hf_name.format(i=i) if spec.stacked else spec.hf_name
    raw = source.get(name)
    try:
      out = spec.to_alignax(raw)
    except ValueError:
      out = None
    if out is None or out.shape != want:
      raise ValueError(
          f'{source.directory}: tensor {name!r} has shape {raw.shape}, which '
          f'does not fit alignax parameter {"/".join(spec.path)} {want} '
          'implied by config.json.')
    return out

  return read


def _to_host(x) -> np.ndarray:
  """One (possibly multi-host sharded) array gathered onto every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def export_hf(directory: str, cfg: ModelConfig, params: Mapping, *,
              model_type: str | None = None, dtype: str | None = None,
              base_config: Mapping | None = None,
              copy_from: str | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` that ``transformers`` loads.

  Tensors are fetched one layer at a time (gathered across hosts), converted
  and appended to the file, so host memory holds one layer's tensor. Every
  process must call this; process 0 writes.

  Args:
    directory: output directory (created).
    cfg: the model's config.
    params: pure dict of parameters (``TrainState.params``); LoRA
      adapters (``cfg.lora_rank > 0``) are merged into their kernels.
    model_type: a key of ``hf_config.FAMILIES``; default inferred from cfg.
    dtype: tensor dtype written (``'bfloat16'``, ...); default the params'.
    base_config: original ``config.json`` whose other fields are kept.
    copy_from: directory whose tokenizer/generation files are copied over.
  """
  if cfg.lora_rank:  # LoRA adapters are merged: a plain HF model
    params = lora.merge_into_base(params, lora.spec_of(cfg))
    cfg = dataclasses.replace(cfg, lora_rank=0)
  dtype = dtype or str(jax.tree.leaves(params)[0].dtype)
  if dtype not in _SAFETENSORS_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of '
                     f'{sorted(_SAFETENSORS_DTYPES)}.')
  hf = hf_config.hf_config_from_model(cfg, model_type, base=base_config,
                                      torch_dtype=dtype)
  entries = []  # (hf name, spec, layer index or None, HF shape)
  for spec in tensor_specs(cfg):
    leaf = _tree_get(params, spec.path)
    layer_shape = leaf.shape[1:] if spec.stacked else leaf.shape
    hf_shape = jax.eval_shape(
        spec.to_hf, jax.ShapeDtypeStruct(layer_shape, jnp.float32)).shape
    for i, name in enumerate(_hf_names(spec, cfg.n_layers)):
      entries.append((name, spec, i if spec.stacked else None, hf_shape))
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(hf, f, indent=2)
    for name in TOKENIZER_FILES if copy_from else ():
      if os.path.exists(os.path.join(copy_from, name)):
        shutil.copy(os.path.join(copy_from, name), directory)
  path = os.path.join(directory, 'model.safetensors')
  with _SafetensorsWriter(path, [(n, s) for n, _, _, s in entries], dtype,
                          enabled=writer) as out:
    for _, spec, i, _ in entries:
      leaf = _tree_get(params, spec.path)
      tensor = _to_host(leaf if i is None else leaf[i])
      out.write(np.asarray(spec.to_hf(tensor)).astype(jnp.dtype(dtype)))


class _SafetensorsWriter:
  """Streams tensors, in a fixed order, into one ``.safetensors`` file.

  The format is an 8-byte little-endian header length, a JSON header
  (dtype, shape, byte offsets per tensor) and the raw row-major bytes; the
  header is known up front from the shapes, so tensors are appended one by
  one instead of being collected in a dict as ``safetensors.save_file``
  needs. Written to a temporary name and renamed when complete.
  """

  def __init__(self, path, entries: Sequence[tuple[str, tuple]], dtype, *,
               enabled=True):
    itemsize = jnp.dtype(dtype).itemsize
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape in entries:
      size = int(np.prod(shape)) * itemsize
      header[name] = {'dtype': _SAFETENSORS_DTYPES[dtype],
                      'shape': list(shape), 'data_offsets': [offset,
                                                             offset + size]}
      offset += size
    raw = json.dumps(header, separators=(',', ':')).encode()
    self._header = raw + b' ' * (-len(raw) % 8)  # 8-byte aligned data
    self._path, self._enabled, self._file = path, enabled, None

  def __enter__(self):
    if self._enabled:
      self._file = open(self._path + '.tmp', 'wb')
      self._file.write(len(self._header).to_bytes(8, 'little'))
      self._file.write(self._header)
    return self

  def write(self, tensor: np.ndarray):
    if self._file is not None:
      self._file.write(np.ascontiguousarray(tensor).tobytes())

  def __exit__(self, exc_type, *exc):
    if self._file is not None:
      self._file.close()
      if exc_type is None:
        os.replace(self._path + '.tmp', self._path)
      else:
        os.remove(self._path + '.tmp')
    return False


def save_checkpoint(workdir: str, cfg: ModelConfig, params) -> str:
  """Writes ``params`` as step 0 of ``workdir/checkpoints`` for ``init_from``.

  The step holds a ``state`` item with only ``params`` (what
  ``checkpoint.load_params`` restores, partially, into a new run) and
  ``workdir/model_config.json`` records ``cfg``. Returns the step directory.
  """
  with ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params})))
    mngr.wait_until_finished()
  ckpt_lib.write_model_config(workdir, cfg)
  return os.path.join(os.path.abspath(workdir), 'checkpoints', '0')


def read_model_config(workdir: str) -> ModelConfig:
  """The :class:`ModelConfig` that :func:`save_checkpoint` (or a training
  run) recorded."""
  fields = ckpt_lib.read_model_config(workdir)
  if fields is None:
    raise FileNotFoundError(f'{workdir}: no {MODEL_CONFIG_FILE}')
  return ModelConfig(**fields)


def _export_params(workdir: str, cfg: ModelConfig, mesh=None):
  """A run's parameters for the HF model ``cfg``: a vocabulary the run grew
  (ids reserved past the tokenizer's) is cut back to ``cfg.vocab_size``."""
  recorded = ckpt_lib.read_model_config(workdir)
  grown = recorded and recorded['vocab_size'] > cfg.vocab_size
  if recorded and recorded.get('lora_rank'):  # the run's adapters, merged
    adapters = {f: recorded[f] for f in ADAPTER_FIELDS}
    params = load_checkpoint_params(
        workdir, dataclasses.replace(cfg, vocab_size=recorded['vocab_size'],
                                     **adapters), mesh=mesh)
    cfg_adapters = ModelConfig(**recorded)
    params = lora.merge_into_base(params, lora.spec_of(cfg_adapters))
  else:
    params = load_checkpoint_params(
        workdir, dataclasses.replace(cfg, vocab_size=recorded['vocab_size'])
        if grown else cfg, mesh=mesh)
  if grown:
    v = cfg.vocab_size
    params = dict(params, embed={'embedding': params['embed']['embedding'][:v]})
    if 'lm_head' in params:
      params['lm_head'] = params['lm_head'][:, :v]
  return params


def config_flags(cfg: ModelConfig) -> list[str]:
  """``--config.model.<field>=<value>`` flags that rebuild ``cfg`` in train.

  The required fields and those that differ from ``ModelConfig``'s defaults
  (which ``defaults.base_config().model`` shares).
  """
  flags = []
  for field in dataclasses.fields(ModelConfig):
    value = getattr(cfg, field.name)
    if value is None or value == field.default or field.name in ADAPTER_FIELDS:
      continue
    if isinstance(value, (tuple, list)):
      value = '(' + ','.join(map(str, value)) + (',)' if len(value) == 1
                                                 else ')')
    flags.append(f'--config.model.{field.name}={value}')
  return flags


def load_checkpoint_params(workdir: str, cfg: ModelConfig, *, mesh=None,
                           rules=shd.DEFAULT_RULES):
  """Parameters of any alignax checkpoint (a run's or an import's), sharded.

  A LoRA run that saved only its adapters (``lora.save_base=False``) comes
  back on its recorded base (an HF directory or an alignax checkpoint).
  """
  mesh = mesh if mesh is not None else shd.make_mesh({'fsdp': -1})
  _, abstract = state_lib.abstract_model(cfg)
  target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nnx.to_pure_dict(abstract), shd.param_shardings(abstract, mesh, rules))
  return ckpt_lib.load_params(workdir, target, base_loader=functools.partial(
      load_params_like, mesh=mesh, rules=rules))


def load_params_like(source: str, target, *, mesh, rules):
  """``target``-shaped parameters from an HF directory or an alignax
  checkpoint; leaves the source lacks stay ``ShapeDtypeStruct``.

  An HF checkpoint's vocabulary grows to ``target``'s, and kernels that
  ``target`` stores quantized (QLoRA) are quantized on load.
  """
  adapters = os.path.join(source, 'adapter_config.json')
  if os.path.isfile(adapters):  # a PEFT directory: its base's weights
    with open(adapters) as f:
      source = json.load(f).get('base_model_name_or_path') or ''
  if not is_hf_dir(source):
    return ckpt_lib.load_params(source, target, base_loader=functools.partial(
        load_params_like, mesh=mesh, rules=rules))
  embedding = target['embed']['embedding']  # [V, D]
  _, loaded = load_hf(source, mesh=mesh, rules=rules,
                      param_dtype=jnp.dtype(embedding.dtype).name,
                      vocab_size=embedding.shape[0])
  # Leaf by leaf: LoRA adapters inside the loaded groups stay missing.
  flat = traverse_util.flatten_dict(loaded)
  params = traverse_util.unflatten_dict({
      k: flat.get(k, v) for k, v in traverse_util.flatten_dict(target).items()})
  return quant.quantize_loaded(params, target)  # QLoRA: int8 / nf4 base


def run_dir(path: str) -> str:
  """The run workdir of ``path`` (a workdir, its checkpoints/ or a step)."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path),
                    os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, MODEL_CONFIG_FILE)):
      return candidate
  raise FileNotFoundError(
      f'{path}: no {MODEL_CONFIG_FILE} in the run directory; export with '
      '--like=HF_DIR (the directory the model was imported from).')


def read_run_config(workdir: str) -> dict:
  """The resolved run config (``config.json``) that ``train`` wrote."""
  path = os.path.join(run_dir(workdir), RUN_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} is missing (runs record it since issue 14); export with '
        '--like=HF_DIR or rerun one step with the same config.')
  with open(path) as f:
    return json.load(f)


def run_tokenizer(workdir: str, run: Mapping | None = None):
  """The run's :class:`~alignax.data.tokenizer.Tokenizer`, from its config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  run = run if run is not None else read_run_config(workdir)
  return tok_lib.build_tokenizer(ml_collections.ConfigDict(run['tokenizer']),
                                 run_dir(workdir))


def run_chat_template(run: Mapping) -> str | None:
  """The Jinja chat template a preference run rendered its records with."""
  data = run.get('data', {})
  path = data.get('preference', {}).get('chat_template', '')
  if path:
    return chat_lib.TemplateChat.from_path(path).source
  return chat_lib.BUILTIN_JINJA if data.get('task') == 'preference' else None


def suppressed_ids(tokenizer, vocab_size: int) -> list[int]:
  """Ids a sample must not contain: every reserved id but BOS/EOS (mode
  tokens, sentinels, unused) and the model's padding rows."""
  keep = {tokenizer.bos_id, tokenizer.eos_id}
  return [i for i in range(tokenizer.base_vocab_size, vocab_size)
          if i not in keep]


def export_run(workdir: str, out_dir: str, *, dtype: str | None = None,
               mesh=None) -> None:
  """A run pretrained here as a complete HF directory (no ``--like``).

  See the module docstring for what is written. Every process must call it.
  """
  run = read_run_config(workdir)
  cfg = read_model_config(run_dir(workdir))
  tokenizer = run_tokenizer(workdir, run)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f'{workdir}: the tokenizer has {tokenizer.vocab_size} '
                     f'ids, the model {cfg.vocab_size}.')
  ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
             pad_token_id=tokenizer.pad_id)
  params = load_checkpoint_params(workdir, cfg, mesh=mesh)
  export_hf(out_dir, cfg, params, dtype=dtype, base_config=ids)
  if jax.process_index() != 0:
    return
  hf_tokenizer.write_tokenizer(out_dir, tokenizer,
                               chat_template=run_chat_template(run),
                               model_max_length=cfg.max_seq_len)
  suppress = set(suppressed_ids(tokenizer, cfg.vocab_size)) | (
      {tokenizer.bos_id} - {tokenizer.eos_id})  # never sample a BOS
  generation = dict(ids, max_length=cfg.max_seq_len,
                    suppress_tokens=sorted(suppress))
  with open(os.path.join(out_dir, 'generation_config.json'), 'w') as f:
    json.dump(generation, f, indent=2)


def check_like(workdir: str, cfg: ModelConfig, like: str) -> None:
  """Raises, naming the first tensor, unless the run's parameters have the
  shapes of the ``--like`` model's (a vocabulary the run grew excepted)."""
  fields = ckpt_lib.read_model_config(workdir)
  if fields is None:
    return  # an import or an older run: orbax checks the shapes
  # Quantized (QLoRA) kernels are exported dequantized: compare float shapes.
  run_cfg = dataclasses.replace(ModelConfig(**fields), quant='none')
  if run_cfg.vocab_size > cfg.vocab_size:  # cut back on export
    run_cfg = dataclasses.replace(run_cfg, vocab_size=cfg.vocab_size)
  theirs = nnx.to_pure_dict(state_lib.abstract_model(cfg)[1])
  ours = nnx.to_pure_dict(state_lib.abstract_model(run_cfg)[1])
  for spec in tensor_specs(cfg):
    try:
      mine = _tree_get(ours, spec.path).shape
    except KeyError:
      mine = None
    want = _tree_get(theirs, spec.path).shape
    if mine != want:
      name = spec.hf_name.format(i=0)
      raise ValueError(
          f'--like={like} does not fit {workdir}: tensor {name!r} (alignax '
          f'{"/".join(spec.path)}) is {want} there but {mine} in the run; '
          'export without --like to write the run\'s own config.')
  for field in ('n_layers', 'tie_embeddings'):
    if getattr(cfg, field) != getattr(run_cfg, field):
      raise ValueError(
          f'--like={like} does not fit {workdir}: {field}='
          f'{getattr(cfg, field)} there, {getattr(run_cfg, field)} in the run.')


def main(argv: Sequence[str] | None = None) -> None:
  """``import HF_DIR WORKDIR`` or ``export WORKDIR OUT_DIR [--like=HF_DIR]``."""
  parser = argparse.ArgumentParser(prog='python -m alignax.interop.hf')
  parser.add_argument('--debug', action='store_true',
                      help='full traceback of a user error')
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='HF directory -> alignax checkpoint')
  imp.add_argument('hf_dir')
  imp.add_argument('workdir')
  imp.add_argument('--param_dtype', default='float32')
  exp = sub.add_parser('export', help='alignax checkpoint -> HF directory')
  exp.add_argument('workdir', help='a run workdir, checkpoints/ or step dir')
  exp.add_argument('out_dir')
  exp.add_argument('--like', default=None,
                   help='the HF directory the model was imported from; '
                   'default: config and tokenizer from the run itself')
  exp.add_argument('--dtype', default=None, help='e.g. bfloat16')
  args = parser.parse_args(argv)
  try:
    _main(args)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or not cli.is_user_error(e):
      raise
    cli.fail(cli.one_line(e))


def _main(args) -> None:
  if args.command == 'import':
    cfg, params = load_hf(args.hf_dir, param_dtype=args.param_dtype)
    step_dir = save_checkpoint(args.workdir, cfg, params)
    tokenizer = os.path.join(os.path.abspath(args.hf_dir), 'tokenizer.json')
    print(f'wrote {step_dir}; train from it with\n  '
          f'--config.checkpoint.init_from={os.path.abspath(args.workdir)} '
          + ' '.join(config_flags(cfg))
          + f' --config.tokenizer.kind=hf --config.tokenizer.path={tokenizer}')
    return
  if args.like is None:
    export_run(args.workdir, args.out_dir, dtype=args.dtype)
    print(f'wrote {args.out_dir}')
    return
  base = read_hf_config(args.like)
  cfg = hf_config.model_config_from_hf(base)
  check_like(args.workdir, cfg, args.like)
  params = _export_params(args.workdir, cfg)
  export_hf(args.out_dir, cfg, params, model_type=base['model_type'],
            dtype=args.dtype, base_config=base, copy_from=args.like)
  print(f'wrote {args.out_dir}')


if __name__ == '__main__':
  main()
