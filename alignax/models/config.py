"""ModelConfig: the frozen hyper-parameters of the decoder-only transformer."""
import dataclasses

import jax
import jax.numpy as jnp

# Activations of a block that carry a ``jax.ad_checkpoint.checkpoint_name``
# (MaxText's names): the q/k/v projections (before RoPE), the attention
# output before its projection (``context``), that projection
# (``out_proj``), the MLP's gate and up projections (``mlpwi_0``,
# ``mlpwi_1``) and its down projection (``mlpwo``).
CHECKPOINT_NAMES = ('query_proj', 'key_proj', 'value_proj', 'context',
                    'out_proj', 'mlpwi_0', 'mlpwi_1', 'mlpwo')
_QKV = ('query_proj', 'key_proj', 'value_proj')
_save = jax.checkpoint_policies.save_only_these_names
# Names accepted by ``ModelConfig.remat``: the ``jax.checkpoint`` policy of
# each block. 'none' means no rematerialisation; 'full' (MaxText's name) saves
# nothing and recomputes the whole block in the backward pass. The named
# policies are MaxText's ``remat_policy`` values and save the named
# activations of ``CHECKPOINT_NAMES`` (everything else is recomputed);
# 'minimal' saves every matmul with the weights (no batch dimension), and
# ``'save:<name>,<name>,...'`` saves the listed names.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'minimal_with_context': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        _save('context')),
    'save_dot_with_context_except_mlp': _save(*_QKV, 'context', 'out_proj'),
    'save_dot_except_mlpwi': _save(*_QKV, 'out_proj', 'mlpwo'),
    'save_dot_except_mlp': _save(*_QKV, 'out_proj'),
    'save_qkv_proj': _save(*_QKV),
    'save_out_proj': _save('out_proj'),
    'qkv_proj_offloaded': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(_QKV),
        offload_src='device', offload_dst='pinned_host'),
}
CUSTOM_REMAT_PREFIX = 'save:'


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy of ``ModelConfig.remat`` (None: no remat).

  ``'save:query_proj,out_proj'`` saves exactly the listed names of
  ``CHECKPOINT_NAMES``.
  """
  if name.startswith(CUSTOM_REMAT_PREFIX):
    names = [n.strip() for n in name[len(CUSTOM_REMAT_PREFIX):].split(',')
             if n.strip()]
    bad = [n for n in names if n not in CHECKPOINT_NAMES]
    if not names or bad:
      raise ValueError(
          f'ModelConfig.remat={name!r}: list one or more of '
          f'{list(CHECKPOINT_NAMES)} after {CUSTOM_REMAT_PREFIX!r}'
          + (f' (unknown: {bad})' if bad else '') + '.')
    return _save(*names)
  if name not in REMAT_POLICIES:
    raise ValueError(
        f'ModelConfig.remat={name!r} is not one of {list(REMAT_POLICIES)} '
        f'or {CUSTOM_REMAT_PREFIX!r} + names of {list(CHECKPOINT_NAMES)}.')
  return REMAT_POLICIES[name]


# ``ModelConfig.attention``: see alignax.models.attention. 'einsum' is the old
# name of 'reference'; 'fused' is jax.nn.dot_product_attention on the dense
# mask.
ATTENTIONS = ('auto', 'blockwise', 'splash', 'cudnn', 'reference', 'fused',
              'einsum')
# The paths that implement the attention-logit soft-cap (Gemma 2).
SOFTCAP_ATTENTIONS = ('auto', 'blockwise', 'splash', 'reference', 'einsum')
ATTENTION_IMPLS = (None, 'xla', 'cudnn')
# ``ModelConfig.mlp_activation``: the gate nonlinearity of the gated MLP
# (SwiGLU for 'silu', GeGLU for the gelus; 'gelu_tanh' is Gemma's).
MLP_ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')
# ``ModelConfig.rope_scaling``: how RoPE frequencies are stretched for
# contexts longer than pretraining ('llama3' is Llama 3.1's).
ROPE_SCALINGS = ('none', 'linear', 'llama3')
# ``ModelConfig.lora_targets``: kernels that can carry a LoRA adapter
# (``alignax.models.lora.TARGETS``).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# Fields set from the run config's ``lora`` block, not mirrored in
# ``config.model`` (code that copies fields between them skips these).
ADAPTER_FIELDS = ('lora_rank', 'lora_alpha', 'lora_rslora', 'lora_targets',
                  'lora_dropout', 'quant')
# ``ModelConfig.quant``: storage of the frozen block kernels under LoRA.
QUANTS = ('none', 'int8', 'nf4')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of :class:`alignax.models.Transformer`.

  Attributes:
    vocab_size: number of token ids ``V``.
    d_model: width of the residual stream ``D``.
    n_layers: number of transformer blocks ``L``.
    n_heads: number of query heads ``H``.
    n_kv_heads: number of key/value heads ``K`` (GQA); divides ``n_heads``.
    head_dim: width of one attention head ``Dh``; even (RoPE rotates pairs).
    d_ff: hidden width ``F`` of the SwiGLU MLP.
    max_seq_len: longest sequence the data pipeline will feed.
    rope_theta: RoPE base wavelength.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: if True the LM head is the transposed embedding matrix.
    dtype: compute dtype name, e.g. ``'bfloat16'``.
    param_dtype: storage dtype name of the parameters.
    remat: rematerialisation policy of each block, a key of ``REMAT_POLICIES``
      or ``'save:'`` + comma-separated names of ``CHECKPOINT_NAMES``.
    attention: one of ``ATTENTIONS``: ``'blockwise'`` (pure-JAX flash
      attention, no ``[T, T]`` array), ``'splash'`` (TPU kernel, causal +
      segment ids), ``'cudnn'`` (GPU, causal, packed or not; packed rows
      need Hopper or newer), ``'auto'`` (splash on TPU, cuDNN on GPU where
      they fit, else blockwise), ``'reference'`` / ``'einsum'`` (explicit
      float32 softmax on the dense mask) or
      ``'fused'`` (``jax.nn.dot_product_attention`` on the dense mask).
    attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``
      for ``'fused'`` and KV-cache decoding: None, ``'xla'`` or ``'cudnn'``.
    qkv_bias: add learned biases to the q, k, v projections (Qwen2).
    qk_norm: RMSNorm over ``head_dim`` of q and k before RoPE (Qwen3).
    norm_offset: every RMSNorm multiplies by ``scale + norm_offset``; 1.0 is
      Gemma's ``(1 + w)`` (scales then start at 0).
    mlp_activation: gate nonlinearity, one of ``MLP_ACTIVATIONS``.
    embed_scale: multiply the input embeddings by ``sqrt(d_model)`` (Gemma).
    post_norms: RMSNorm the attention and MLP outputs before their residual
      add too (Gemma 2's sandwich norms).
    attn_scale: query-key scale; 0 = ``1 / sqrt(head_dim)``.
    attn_logit_softcap: ``c * tanh(s / c)`` on attention scores; 0 = off
      (Gemma 2). Needs an attention in ``SOFTCAP_ATTENTIONS``.
    final_logit_softcap: the same on the output logits; 0 = off.
    layer_windows: per-layer sliding-window length (0 = full attention):
      key ``j`` is visible from query ``i`` iff ``pos_i - pos_j < window``;
      empty = every layer full (Mistral, Gemma 2, Qwen windows).
    rope_scaling: one of ``ROPE_SCALINGS``.
    rope_factor: context-extension factor of ``'linear'``/``'llama3'``.
    rope_low_freq_factor: ``'llama3'`` low-frequency factor.
    rope_high_freq_factor: ``'llama3'`` high-frequency factor.
    rope_original_max_len: ``'llama3'`` pretraining context length.
    scan_layers: keep the layer loop a loop in the compiled program (one
      block compiled); False unrolls it (MaxText's ``scan_layers=False``):
      longer compiles, and XLA's cost analysis then counts every layer.
    lora_rank: rank ``r`` of the LoRA adapters (``alignax.models.lora``);
      0 = no adapters.
    lora_alpha: LoRA scale numerator: adapters add ``alpha / r`` (rsLoRA:
      ``alpha / sqrt(r)``) times ``x A B``.
    lora_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    lora_targets: kernels that get adapters, names from
      ``alignax.models.lora.TARGETS`` (q, k, v, o, gate, up, down).
    lora_dropout: dropout rate on each adapter's input in training steps
      (PEFT's ``lora_dropout``); 0 = none.
    quant: storage of the (frozen) block kernels, one of ``QUANTS``:
      ``'int8'`` or ``'nf4'`` (QLoRA, ``alignax.models.quant``) need LoRA.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  max_seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'
  attention_impl: str | None = None
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_offset: float = 0.0
  mlp_activation: str = 'silu'
  embed_scale: bool = False
  post_norms: bool = False
  attn_scale: float = 0.0
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  layer_windows: tuple[int, ...] = ()
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  scan_layers: bool = True
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_targets: tuple[str, ...] = ()
  lora_dropout: float = 0.0
  quant: str = 'none'

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads',
                 'head_dim', 'd_ff', 'max_seq_len', 'rope_theta', 'norm_eps'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or (
          value <= 0):
        raise ValueError(f'ModelConfig.{name} must be positive, got {value!r}.')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f'ModelConfig.n_kv_heads={self.n_kv_heads} must divide '
          f'ModelConfig.n_heads={self.n_heads}.')
    if self.head_dim % 2:
      raise ValueError(
          f'ModelConfig.head_dim={self.head_dim} must be even for RoPE.')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      try:
        jnp.dtype(value)
      except TypeError as e:
        raise ValueError(
            f'ModelConfig.{name}={value!r} is not a dtype name.') from e
    if not isinstance(self.remat, str):
      raise ValueError(f'ModelConfig.remat must be a string, got '
                       f'{self.remat!r}.')
    remat_policy(self.remat)  # raises on an unknown name
    _check_choice('attention', self.attention, ATTENTIONS)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    self._check_extensions()

  def _check_extensions(self):
    """Validates the family-specific fields (Qwen, Gemma, Mistral, Llama 3)."""
    _check_choice('mlp_activation', self.mlp_activation, MLP_ACTIVATIONS)
    _check_choice('rope_scaling', self.rope_scaling, ROPE_SCALINGS)
    for name in ('attn_scale', 'attn_logit_softcap', 'final_logit_softcap',
                 'norm_offset'):
      if getattr(self, name) < 0:
        raise ValueError(f'ModelConfig.{name} must be >= 0, got '
                         f'{getattr(self, name)!r}.')
    if self.attn_logit_softcap and self.attention not in SOFTCAP_ATTENTIONS:
      raise ValueError(
          f'ModelConfig.attn_logit_softcap={self.attn_logit_softcap} needs '
          f'attention in {list(SOFTCAP_ATTENTIONS)}, not '
          f'{self.attention!r} (jax.nn.dot_product_attention has no softcap).')
    # ml_collections hands lists over; the frozen config must stay hashable.
    windows = tuple(int(w) for w in self.layer_windows)
    object.__setattr__(self, 'layer_windows', windows)
    if windows and (len(windows) != self.n_layers or min(windows) < 0):
      raise ValueError(
          f'ModelConfig.layer_windows={windows} must be empty or hold '
          f'n_layers={self.n_layers} lengths >= 0.')
    if self.rope_scaling != 'none' and self.rope_factor <= 0:
      raise ValueError(
          f'ModelConfig.rope_factor={self.rope_factor} must be > 0.')
    self._check_lora()

  def _check_lora(self):
    """Validates the adapter fields (see ``alignax.models.lora``)."""
    targets = tuple(str(t) for t in self.lora_targets)
    object.__setattr__(self, 'lora_targets', targets)  # JSON gives lists
    if isinstance(self.lora_rank, bool) or not isinstance(
        self.lora_rank, int) or self.lora_rank < 0:
      raise ValueError(f'ModelConfig.lora_rank={self.lora_rank!r} must be an '
                       'integer >= 0 (0 = no adapters).')
    _check_choice('quant', self.quant, QUANTS)
    if self.quant != 'none' and not self.lora_rank:
      raise ValueError(f'ModelConfig.quant={self.quant!r} freezes the kernels '
                       'quantized: it needs LoRA adapters (lora_rank > 0).')
    if not self.lora_rank:
      return
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if not targets or unknown:
      raise ValueError(
          f'ModelConfig.lora_targets={targets} must name one or more of '
          f'{list(LORA_TARGETS)}' + (f'; unknown: {unknown}' if unknown else ''))
    if not self.lora_alpha > 0:
      raise ValueError(
          f'ModelConfig.lora_alpha={self.lora_alpha!r} must be > 0.')
    if not 0 <= self.lora_dropout < 1:
      raise ValueError(
          f'ModelConfig.lora_dropout={self.lora_dropout!r} must lie in [0, 1).')

  def num_params(self) -> int:
    """Exact number of parameters of the model built from this config."""
    d, v = self.d_model, self.vocab_size
    # Per-layer vectors: norm scales and biases.
    vectors = (4 if self.post_norms else 2) * d
    if self.qk_norm:
      vectors += 2 * self.head_dim
    if self.qkv_bias:
      vectors += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    per_layer = self._matmul_params_per_layer() + vectors
    lm_head = 0 if self.tie_embeddings else d * v
    return (v * d + self.n_layers * (per_layer + self._lora_params_per_layer())
            + d + lm_head)

  def _lora_params_per_layer(self) -> int:
    """``r * (fan_in + fan_out)`` per adapted kernel."""
    if not self.lora_rank:
      return 0
    d, f = self.d_model, self.d_ff
    q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    fans = dict(q=d + q, k=d + kv, v=d + kv, o=q + d, gate=d + f, up=d + f,
                down=f + d)
    return self.lora_rank * sum(fans[t] for t in self.lora_targets)

  def flops_per_token(self, seq_len: int) -> int:
    r"""Training FLOPs (forward + backward) per token, PaLM appendix B.

    .. math:: 6 N + 12 L H D_h T

    ``N`` counts the parameters that take part in matrix multiplies: the
    attention and MLP kernels of every layer plus the ``D x V`` LM head
    (counted even when tied, since the tied matrix is still multiplied).
    The embedding lookup and the norm scales are not matmuls and are left
    out. ``12 L H D_h T`` is the ``Q K^T`` and ``P V`` products (``2 * 2``
    FLOPs per multiply-add, times 3 for forward + backward) over a context of
    ``T = seq_len`` keys, without halving for the causal mask, as in PaLM and
    MaxText, so MFU numbers are comparable with theirs.

    Args:
      seq_len: attention context length ``T``.

    Returns:
      FLOPs per trained token.

    References:
      Chowdhery et al., 2022, PaLM: Scaling Language Modeling with Pathways,
      Appendix B.
    """
    matmul_params = (self.n_layers * self._matmul_params_per_layer()
                     + self.d_model * self.vocab_size)
    attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 6 * matmul_params + attention

  def _matmul_params_per_layer(self) -> int:
    d, dh = self.d_model, self.head_dim
    q_and_o = 2 * d * self.n_heads * dh
    k_and_v = 2 * d * self.n_kv_heads * dh
    return q_and_o + k_and_v + 3 * d * self.d_ff


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(
        f'ModelConfig.{name}={value!r} is not one of {list(choices)}.')
