"""Gradient caching (GradCache): in-batch-negative losses at any batch size.

A contrastive loss couples every example of the batch through the
similarity matrix, so splitting the batch into microbatches changes the loss.
GradCache (Gao et al., 2021) keeps the loss exact and bounds activation
memory by one sub-batch:

1. embed the batch sub-batch by sub-batch **without** keeping activations;
2. evaluate the loss on the ``[N, D]`` embeddings and take its gradient
   ``G = dL/dE`` (and the gradient of the loss's own parameters, e.g. the
   temperature);
3. replay each sub-batch's forward pass with gradients and pull ``G``'s rows
   back to the parameters (``vjp``), summing over sub-batches.

:func:`gradcache` wraps steps 1-3 in a ``jax.custom_vjp``: its forward is
steps 1-2, its backward step 3, so an objective built on it returns an
ordinary ``loss_sum`` and the shared train step (``alignax.step``) needs no
change. The replay recomputes exactly the forward of step 1 (same inputs,
same parameters; the backbone has no dropout, so there is no RNG to replay),
which makes loss and gradients equal to the uncached ones up to float
summation order.

Sub-batches are strided (rows ``j, j + n, j + 2n, ...``) like the step's
microbatches, so each one stays spread over the data-parallel devices.

References:
  Gao et al., *Scaling Deep Contrastive Learning Batch Size under Memory
  Limited Setup*, RepL4NLP 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax import sharding as shd


def gradcache(embed_fn, loss_fn, *, num_chunks: int, mesh=None):
  """Returns ``f(params, inputs) -> (loss, aux)`` computed with GradCache.

  Args:
    embed_fn: ``embed_fn(params, chunk) -> [c, D]`` embeddings of a chunk of
      ``inputs`` (a pytree whose leaves have ``c`` leading rows).
    loss_fn: ``loss_fn(embeddings, params) -> (loss, aux)`` on all ``[N, D]``
      embeddings; ``params`` is for the loss's own parameters (temperature,
      bias). ``aux`` is not differentiated (metrics).
    num_chunks: sub-batches; each leaf of ``inputs`` has ``N`` rows with
      ``N`` divisible by ``num_chunks``.
    mesh: the device mesh, to keep sub-batches spread over the batch axes;
      ``None`` outside a mesh.

  Returns:
    ``f`` with ``f(params, inputs) == loss_fn(embed_fn(params, inputs),
    params)`` in value and gradient w.r.t. ``params``; peak activation
    memory is that of one sub-batch. ``inputs`` get no gradient.
  """

  plain_embed_fn = embed_fn

  def embed_fn(params, chunk):  # pylint: disable=function-redefined
    # Sub-batches are laid out by split_rows; the step's activation
    # constraints and per-layer weight gathers inside these loops made the
    # 8-device CPU step deadlock in a collective (found in
    # tests/test_train_contrastive.py), so they are off here. The
    # contrastive objective turns them off too, but the custom VJP's
    # backward is traced after it returns, so this one is still needed.
    with shd.activation_sharding(None):
      return plain_embed_fn(params, chunk)

  def embed_all(params, inputs):
    chunks = jax.tree.map(lambda x: shd.split_rows(x, num_chunks, mesh), inputs)
    emb = jax.lax.map(lambda c: embed_fn(params, c), chunks)  # [n, c, D]
    return shd.merge_rows(emb, mesh)  # [N, D]

  @jax.custom_vjp
  def cached(params, inputs):
    return loss_fn(embed_all(params, inputs), params)

  def fwd(params, inputs):
    emb = jax.lax.stop_gradient(embed_all(params, inputs))
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, aux), (g_emb, g_params) = grad_fn(emb, params)
    return (loss, aux), (params, inputs, g_emb, g_params)

  def bwd(residuals, cotangents):
    params, inputs, g_emb, g_params = residuals
    g_loss = cotangents[0]  # aux is not differentiated
    chunks = jax.tree.map(lambda x: shd.split_rows(x, num_chunks, mesh), inputs)
    g_chunks = shd.split_rows(g_emb * g_loss, num_chunks, mesh)  # [n, c, D]

    def replay(acc, xs):
      chunk, g = xs
      _, pull = jax.vjp(lambda p: embed_fn(p, chunk), params)
      return jax.tree.map(jnp.add, acc, pull(g)[0]), None

    start = jax.tree.map(lambda g: g * g_loss, g_params)
    grads, _ = jax.lax.scan(replay, start, (chunks, g_chunks))
    return grads, None

  cached.defvjp(fwd, bwd)
  return cached
