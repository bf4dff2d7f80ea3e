"""ModelConfig: the frozen hyper-parameters of the decoder-only transformer."""
import dataclasses

import jax
import jax.numpy as jnp

# Names accepted by ``ModelConfig.remat``: the ``jax.checkpoint`` policy of
# each block. 'none' means no rematerialisation; 'full' (MaxText's name) saves
# nothing and recomputes the whole block in the backward pass.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
}
ATTENTIONS = ('fused', 'einsum')
ATTENTION_IMPLS = (None, 'xla', 'cudnn')


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
    remat: rematerialisation policy of each block, a key of ``REMAT_POLICIES``.
    attention: ``'fused'`` (``jax.nn.dot_product_attention``) or ``'einsum'``
      (explicit float32 reference).
    attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``:
      None, ``'xla'`` or ``'cudnn'``.
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
  attention: str = 'fused'
  attention_impl: str | None = None

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
    _check_choice('remat', self.remat, tuple(REMAT_POLICIES))
    _check_choice('attention', self.attention, ATTENTIONS)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)

  def num_params(self) -> int:
    """Exact number of parameters of the model built from this config."""
    d, v = self.d_model, self.vocab_size
    norms = 2 * d
    per_layer = self._matmul_params_per_layer() + norms
    lm_head = 0 if self.tie_embeddings else d * v
    return v * d + self.n_layers * per_layer + d + lm_head

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
