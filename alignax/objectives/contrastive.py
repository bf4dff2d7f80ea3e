"""Contrastive dual-encoder objective and the CAFe-style joint objective.

Batches come from ``alignax.data.pairs``: ``tokens`` and ``segment_ids`` of
shape ``[B, V, T]``, ``V`` texts per example (view 0 the query, view 1 its
positive, views ``2..V-1`` hard negatives; or ``V`` symmetric views). All
``B * V`` texts go through one :class:`~alignax.models.heads.EmbeddingModel`
(queries and documents share the tower); the loss sees ``[B, V, D]``
embeddings and the head's logit scale ``t`` and bias ``b``.

In-batch negatives make the loss a function of the whole batch, so the train
step must not split it into microbatches (``config.train.microbatches = 1``);
``config.contrastive.chunk_size`` bounds memory instead, with exact gradient
caching (:mod:`alignax.objectives.gradcache`), and ``contrastive.ring`` uses
the ring ``shard_map`` losses that never hold the ``[B, B]`` logits.

The CAFe objective (Yu et al., 2025) adds the LM loss of the ``lm_*`` fields
of the same batch on the same parameters:
``L = w_con * mean(L_con) + w_lm * mean(L_lm)``.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignax import losses
from alignax import sharding as shd
from alignax.models import heads
from alignax.objectives import gradcache as gc
from alignax.objectives import lm

LM_PREFIX = "lm_"


def _two_views(name, emb):
  if emb.shape[1] != 2:
    raise ValueError(f"contrastive.loss={name!r} needs 2 texts per example "
                     f"(query, positive), got embeddings of shape {emb.shape}; "
                     "use loss='infonce' with hard negatives")
  return emb[:, 0], emb[:, 1]


def _clip(emb, t, b):
  del b
  return losses.clip_loss(*_two_views("clip", emb), logit_scale=t)


def _siglip(emb, t, b):
  return losses.siglip_loss(*_two_views("siglip", emb), logit_scale=t,
                            logit_bias=b)


def _infonce(emb, t, b):
  """One-way InfoNCE, hard negatives (views 2..) as extra columns (MNRL)."""
  del b
  negatives = emb[:, 2:] if emb.shape[1] > 2 else None  # [B, k, D]
  return losses.mnrl_loss(emb[:, 0], emb[:, 1], negatives, scale=t)


def _mv_infonce(emb, t, b):
  del b
  return losses.mv_infonce_loss(jnp.swapaxes(emb, 0, 1), logit_scale=t)


def _dcl(emb, t, b):
  del b
  return losses.dcl_loss(*_two_views("dcl", emb), logit_scale=t)


def _dhel(emb, t, b):
  del b
  return losses.dhel_loss(*_two_views("dhel", emb), logit_scale=t)


def _mv_dhel(emb, t, b):
  del b
  return losses.mv_dhel_loss(jnp.swapaxes(emb, 0, 1), logit_scale=t)


def _symile(emb, t, b):
  """Symile over the ``V >= 3`` views (all ``B^(V-1)`` candidate tuples)."""
  del b
  if emb.shape[1] < 3:
    raise ValueError(f"contrastive.loss='symile' needs >= 3 views per "
                     f"example, got embeddings of shape {emb.shape}")
  return losses.symile_loss(*jnp.unstack(emb, axis=1), logit_scale=t)


def _ring_clip(emb, t, b, *, mesh):
  del b
  q, d = _two_views("clip", emb)
  return losses.chunked_clip_loss(q, d, mesh=mesh, axis_name=shd.BATCH_AXES,
                                  logit_scale=t)


def _ring_siglip(emb, t, b, *, mesh):
  q, d = _two_views("siglip", emb)
  return losses.chunked_siglip_loss(q, d, mesh=mesh, axis_name=shd.BATCH_AXES,
                                    logit_scale=t, logit_bias=b)


# contrastive.loss -> per-example loss(emb [B, V, D], t, b) -> [B].
LOSSES = {"clip": _clip, "siglip": _siglip, "infonce": _infonce,
          "mv_infonce": _mv_infonce, "dcl": _dcl, "dhel": _dhel,
          "mv_dhel": _mv_dhel, "symile": _symile}
RING_LOSSES = {"clip": _ring_clip, "siglip": _ring_siglip}


def views_loss(name, *, ring=False, mesh=None, matryoshka_dims=()):
  """The per-example loss ``(emb [B, V, D], t, b) -> [B]`` named ``name``."""
  if ring:
    return functools.partial(RING_LOSSES[name], mesh=mesh)
  fn = LOSSES[name]
  if not matryoshka_dims:
    return fn

  def matryoshka(emb, t, b):
    return losses.matryoshka_loss(lambda e: fn(e, t, b), emb,
                                  dims=tuple(matryoshka_dims))
  return matryoshka


def _metrics(emb, per_example, t, b, *, pairwise):
  """Loss, temperature and monitors as ``(sum, count)`` pairs."""
  n = jnp.float32(emb.shape[0])
  one = jnp.float32(1.0)
  q, d = emb[:, 0], emb[:, 1]
  out = {
      "loss": (jnp.sum(per_example), n),
      "contrastive/loss": (jnp.sum(per_example), n),
      "contrastive/logit_scale": (t, one),
      "contrastive/temperature": (1.0 / t, one),
      "contrastive/logit_bias": (b, one),
      "contrastive/alignment": (losses.alignment(q, d) * n, n),
  }
  if pairwise:  # [B, B] similarities; the ring path avoids materialising them
    top1 = jnp.argmax(q @ d.T, axis=-1) == jnp.arange(q.shape[0])
    out["contrastive/accuracy"] = (jnp.sum(top1.astype(jnp.float32)), n)
    out["contrastive/uniformity"] = (losses.uniformity(d), one)
  return out


def contrastive_objective(model, batch, rng, *, frozen=None, loss_fn,
                          chunk_size=0, bidirectional=False, pairwise=True,
                          mesh=None):
  """Contrastive loss of ``B`` examples of ``V`` texts each.

  Args:
    model: an ``EmbeddingModel``.
    batch: ``tokens`` and ``segment_ids``, ``[B, V, T]`` (right-padded).
    rng: unused (the model is deterministic).
    frozen: unused.
    loss_fn: ``(emb [B, V, D], t, b) -> [B]``, see :func:`views_loss`.
    chunk_size: texts per GradCache sub-batch; 0 embeds all ``B * V`` texts
      at once.
    bidirectional: encode texts with bidirectional attention.
    pairwise: also report in-batch top-1 accuracy and uniformity.
    mesh: device mesh for GradCache's sub-batch sharding (or ``None``).

  Returns:
    ``(loss_sum, (B, metrics))``.
  """
  del rng, frozen
  # The step's activation constraints and per-layer weight gathers
  # deadlocked the 8-device CPU step of the embedding paths (an XLA
  # collective rendezvous abort in tests/test_train_contrastive.py); these
  # objectives run with GSPMD's own layout, as before the FSDP rules.
  with shd.activation_sharding(None):
    return _contrastive(model, batch, loss_fn=loss_fn, chunk_size=chunk_size,
                        bidirectional=bidirectional, pairwise=pairwise,
                        mesh=mesh)


def _contrastive(model, batch, *, loss_fn, chunk_size, bidirectional,
                 pairwise, mesh):
  tokens, segment_ids = batch["tokens"], batch["segment_ids"]
  if tokens.ndim != 3 or tokens.shape != segment_ids.shape:
    raise ValueError(f"tokens and segment_ids must be [B, V, T] of one shape, "
                     f"got {tokens.shape} and {segment_ids.shape}")
  b, v, t = tokens.shape
  inputs = {"tokens": tokens.reshape(b * v, t),  # [B * V, T]
            "segment_ids": segment_ids.reshape(b * v, t)}
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def embed(p, x):
    return nnx.merge(graphdef, p).encode(x["tokens"], x["segment_ids"],
                                         bidirectional=bidirectional)

  def loss_of(emb, p):
    head = nnx.merge(graphdef, p).head
    scale, bias = head.logit_scale(), head.logit_bias[...]
    emb = emb.reshape(b, v, -1)  # [B, V, D]
    per_example = loss_fn(emb, scale, bias)
    metrics = _metrics(jax.lax.stop_gradient(emb), per_example, scale, bias,
                       pairwise=pairwise)
    return jnp.sum(per_example), metrics

  if chunk_size:
    cached = gc.gradcache(embed, loss_of, num_chunks=(b * v) // chunk_size,
                          mesh=mesh)
    loss_sum, metrics = cached(params, inputs)
  else:
    loss_sum, metrics = loss_of(embed(params, inputs), params)
  return loss_sum, (jnp.float32(b), metrics)


def cafe_objective(model, batch, rng, *, frozen=None, contrastive, language,
                   weight=1.0, lm_weight=1.0):
  r"""Contrastive + LM loss on one model (CAFe).

  .. math:: L = w_{con}\,\overline{L_{con}} + w_{lm}\,\overline{L_{lm}}

  Args:
    model: an ``EmbeddingModel``.
    batch: the pair fields of :func:`contrastive_objective` plus the packed
      LM batch fields prefixed ``lm_`` (``lm_inputs``, ``lm_targets``, ...).
    rng: passed on to both objectives.
    frozen: passed on to both objectives.
    contrastive: a contrastive objective (see :func:`contrastive_objective`).
    language: an LM objective (see ``alignax.objectives.lm``).
    weight: :math:`w_{con}`.
    lm_weight: :math:`w_{lm}`.

  Returns:
    ``(L, (1, metrics))``: both means are taken here, so the step's count is
    1 (exact because contrastive steps use one microbatch).

  References:
    Yu et al., *CAFe: Unifying Representation and Generation with
    Contrastive-Autoregressive Finetuning*, 2025.
  """
  with shd.activation_sharding(None):  # see contrastive_objective
    return _cafe(model, batch, rng, frozen, contrastive, language, weight,
                 lm_weight)


def _cafe(model, batch, rng, frozen, contrastive, language, weight,
          lm_weight):
  con_sum, (con_count, con_metrics) = contrastive(model, batch, rng,
                                                  frozen=frozen)
  lm_batch = {k[len(LM_PREFIX):]: x for k, x in batch.items()
              if k.startswith(LM_PREFIX)}
  lm_sum, (lm_count, lm_metrics) = language(model, lm_batch, rng,
                                            frozen=frozen)
  loss = (weight * con_sum / con_count
          + lm_weight * lm_sum / jnp.maximum(lm_count, 1.0))
  metrics = {k: x for k, x in con_metrics.items() if k != "loss"}
  metrics.update({f"lm/{k}": x for k, x in lm_metrics.items()})
  metrics["loss"] = (loss, jnp.float32(1.0))
  return loss, (jnp.float32(1.0), metrics)


def head_config(con_cfg) -> heads.HeadConfig:
  """``HeadConfig`` from ``config.contrastive``."""
  default = (heads.SIGLIP_LOG_SCALE if con_cfg.loss == "siglip"
             else heads.CLIP_LOG_SCALE)
  init = -math.log(con_cfg.temperature) if con_cfg.temperature else default
  return heads.HeadConfig(
      pooling=con_cfg.pooling, proj_dim=con_cfg.proj_dim,
      normalize=con_cfg.normalize, init_log_scale=init,
      max_logit_scale=con_cfg.max_logit_scale,
      learn_logit_scale=con_cfg.learn_temperature, init_bias=con_cfg.bias)


def embedding_model_builder(config):
  """``build(model_cfg, rngs=...)`` of the ``EmbeddingModel`` of ``config``."""
  return functools.partial(heads.EmbeddingModel,
                           head=head_config(config.contrastive))


def from_config(config, *, mesh=None):
  """The contrastive objective of ``config.contrastive`` on ``mesh``.

  The ring losses and GradCache's sub-batch placement need the run's mesh
  (passed in, never rebuilt here).
  """
  c = config.contrastive
  if c.ring and mesh is None:
    raise ValueError("config.contrastive.ring=True needs the run's mesh: "
                     "build the objective with from_config(config, mesh=...)")
  return functools.partial(
      contrastive_objective,
      loss_fn=views_loss(c.loss, ring=c.ring, mesh=mesh,
                         matryoshka_dims=tuple(c.matryoshka_dims)),
      chunk_size=c.chunk_size, bidirectional=c.bidirectional,
      pairwise=not c.ring, mesh=mesh)


def cafe_from_config(config, *, mesh=None):
  """The CAFe objective: ``from_config`` + the LM objective, weighted."""
  return functools.partial(
      cafe_objective, contrastive=from_config(config, mesh=mesh),
      language=lm.from_config(config), weight=config.contrastive.weight,
      lm_weight=config.contrastive.lm_weight)
