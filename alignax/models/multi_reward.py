r"""ArmoRM: K attribute rewards on one backbone, mixed by a prompt gate.

:class:`MultiRewardModel` is the :class:`~alignax.models.Transformer` plus

* ``attribute_head`` ``[D, K]`` and ``attribute_bias`` ``[K]``: a linear
  regression of K interpretable rewards on the final hidden state at the
  response's last token, :math:`r = W^\top h_{last} + b` (ArmoRM's stage 1;
  zero at init);
* ``verbosity_lambda`` ``[K]``: the verbosity decorrelation
  :math:`r_k' = r_k - \lambda_k r_v` with :math:`r_v` the attribute at
  ``verbose_index`` (0 at init = no adjustment; fitted on a reference set
  between the stages and never trained, see
  :func:`alignax.losses.spearman_decorrelation`);
* ``gate``: an MLP on the final hidden state at the prompt's last token
  (which has read the prompt and nothing else), ``D -> H -> K`` with a ReLU,
  whose softmax weighs the adjusted rewards:
  :math:`R = \sum_k g_k(x)\, r_k'(x, y)`; its last layer is zero at init,
  so the gate starts uniform. ``gate.log_beta`` is the Bradley–Terry scale
  :math:`\beta` of stage 2 (:func:`alignax.losses.gated_bradley_terry_loss`).

The parameter tree is the transformer's plus these, so an LM or a reward-
model checkpoint initialises the backbone, and a stage-1 checkpoint holds
everything stage 2 needs.

References:
  Wang, Xiong, Xie, Zhao & Zhang, *Interpretable Preferences via
  Multi-Objective Reward Modeling and Mixture-of-Experts*, 2024.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import losses
from alignax import sharding
from alignax.models import heads
from alignax.models import layers
from alignax.models.config import ModelConfig
from alignax.models.transformer import Transformer

# Top-level parameter groups of the heads (the rest is the backbone).
GATE = "gate"
REGRESSION = ("attribute_head", "attribute_bias")
DECORRELATION = "verbosity_lambda"


class Gate(nnx.Module):
  """``[..., D]`` prompt states -> ``[..., K]`` gate logits (a 2-layer MLP)."""

  def __init__(self, d_model, num_attributes, hidden, *, beta, param_dtype,
               rngs: nnx.Rngs):
    self.hidden_kernel = layers.partitioned_param(
        rngs, nnx.initializers.lecun_normal(), (d_model, hidden),
        ("embed", None), param_dtype)
    self.hidden_bias = nnx.Param(jnp.zeros((hidden,), param_dtype))
    self.out_kernel = nnx.Param(jnp.zeros((hidden, num_attributes),
                                          param_dtype))
    self.out_bias = nnx.Param(jnp.zeros((num_attributes,), param_dtype))
    self.log_beta = nnx.Param(jnp.log(jnp.asarray(beta, jnp.float32)))

  def __call__(self, x):
    f32 = layers.at_least_f32(x.dtype)
    w1 = sharding.gather(self.hidden_kernel[...].astype(f32), ("embed", None))
    h = jax.nn.relu(jnp.einsum("...d,dh->...h", x.astype(f32), w1)
                    + self.hidden_bias[...].astype(f32))
    return (jnp.einsum("...h,hk->...k", h, self.out_kernel[...].astype(f32))
            + self.out_bias[...].astype(f32))

  def beta(self):
    return jnp.exp(self.log_beta[...])


class MultiRewardModel(Transformer):
  """The transformer with K attribute-reward heads and a prompt gate.

  Args:
    cfg: the backbone's config.
    num_attributes: K.
    gate_hidden: H, the gate MLP's width.
    verbose_index: the attribute that is the verbosity reward (-1 = none:
      no decorrelation).
    gate_beta: initial Bradley–Terry scale of the mixture.
  """

  def __init__(self, cfg: ModelConfig, *, num_attributes: int,
               gate_hidden: int = 64, verbose_index: int = -1,
               gate_beta: float = 1.0, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if num_attributes < 1 or not -1 <= verbose_index < num_attributes:
      raise ValueError(f"num_attributes={num_attributes} must be >= 1 and "
                       f"verbose_index={verbose_index} in [-1, K)")
    pdt = jnp.dtype(cfg.param_dtype)
    self.num_attributes, self.verbose_index = num_attributes, verbose_index
    self.attribute_head = layers.partitioned_param(
        rngs, nnx.initializers.zeros_init(), (cfg.d_model, num_attributes),
        ("embed", None), pdt)
    self.attribute_bias = nnx.Param(jnp.zeros((num_attributes,), pdt))
    self.verbosity_lambda = nnx.Param(jnp.zeros((num_attributes,),
                                                jnp.float32))
    self.gate = Gate(cfg.d_model, num_attributes, gate_hidden,
                     beta=gate_beta, param_dtype=pdt, rngs=rngs)

  def attribute_rewards(self, hidden):
    """``[..., D]`` response states -> ``[..., K]`` float32 raw rewards."""
    f32 = layers.at_least_f32(hidden.dtype)
    head = sharding.gather(self.attribute_head[...].astype(f32),
                           ("embed", None))
    return (jnp.einsum("...d,dk->...k", hidden.astype(f32), head)
            + self.attribute_bias[...].astype(f32))

  def adjusted(self, rewards):
    """``[..., K]`` raw -> verbosity-decorrelated rewards."""
    if self.verbose_index < 0:
      return rewards
    return losses.verbosity_adjusted(rewards, rewards[..., self.verbose_index],
                                     self.verbosity_lambda[...])

  def gate_logits(self, prompt_hidden):
    """``[..., D]`` prompt states -> ``[..., K]`` gate logits."""
    return self.gate(prompt_hidden)

  def preference_score(self, response_hidden, prompt_hidden):
    """The scalar :math:`R = \\sum_k g_k r_k'`, ``[...]`` float32."""
    weights = jax.nn.softmax(self.gate_logits(prompt_hidden), axis=-1)
    return losses.gated_rewards(
        self.adjusted(self.attribute_rewards(response_hidden)), weights)

  def score(self, tokens, segment_ids, prompt_mask):
    """Preference scores of padded rows (prompt + response, no EOS).

    Args:
      tokens: ``[N, T]`` int ids, padded on either side.
      segment_ids: ``[N, T]`` int, nonzero on the text, 0 on padding.
      prompt_mask: ``[N, T]`` bool, True on the prompt's tokens.

    Returns:
      ``([N] scores, [N, K] adjusted attribute rewards, [N, K] gate
      weights)``, float32.
    """
    mask = segment_ids > 0
    h = self(tokens, positions=heads.positions_from_mask(mask),
             segment_ids=segment_ids, return_hidden=True)  # [N, T, D]
    response = heads.last_pool(h, mask)
    prompt = heads.last_pool(h, prompt_mask & mask)
    rewards = self.adjusted(self.attribute_rewards(response))
    weights = jax.nn.softmax(self.gate_logits(prompt), axis=-1)
    return losses.gated_rewards(rewards, weights), rewards, weights
