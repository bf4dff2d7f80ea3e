"""Contrastive losses on embeddings (pure functions on arrays).

Every loss takes ``[B, D]`` embeddings (row ``i`` of each input belongs to the
same example), keyword-only hyper-parameters, and returns unreduced
per-example losses ``[B]``; the mean over the batch is the usual batch loss.
The two monitors (:func:`alignment`, :func:`uniformity`) return scalars.

Losses defined on dot products (CLIP, SigLIP, DCL, DHEL, multi-view, Symile)
use the embeddings as given, so L2-normalise them first; MNRL and GISTEmbed
use cosine similarities, as sentence-transformers does. ``logit_scale`` is
``t = 1 / temperature`` itself (already exponentiated if learned as
``exp(log t)``). Computation is in at least float32.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def _float(x):
  """Casts to at least float32 (bf16 -> f32, f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x, jnp.float32))


def _check_matrix(name, x, min_rows=1):
  x = _float(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [B, D] array, got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows (in-batch "
                     f"negatives), got shape {x.shape}")
  return x


def _check_pair(x, y, names=("x", "y"), min_rows=1):
  x = _check_matrix(names[0], x, min_rows)
  y = _check_matrix(names[1], y, min_rows)
  if x.shape != y.shape:
    raise ValueError(f"{names[0]} and {names[1]} must have the same [B, D] "
                     f"shape, got {x.shape} and {y.shape}")
  return x, y


def _l2_normalize(x, eps=1e-12):
  # Same clamp as torch.nn.functional.normalize, which sentence-transformers'
  # cos_sim uses, so MNRL / GIST match it on (near-)zero rows too.
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def _cosine(u, v):
  return _l2_normalize(u) @ _l2_normalize(v).T


def _off_diagonal(n):
  return ~jnp.eye(n, dtype=bool)


def _flat_negatives(name, negatives, batch, dim, k=None):
  """Validates ``[B, k, D]`` hard negatives; returns them as ``[B * k, D]``."""
  n = _float(negatives)
  if (n.ndim != 3 or (n.shape[0], n.shape[2]) != (batch, dim)
      or k not in (None, n.shape[1])):
    raise ValueError(f"{name} must have shape [B, k, D] = [{batch}, "
                     f"{k or 'k'}, {dim}], got {n.shape}")
  return n.reshape(-1, dim)  # [B * k, D]


def infonce_loss(x, y, *, logit_scale):
  r"""One-way InfoNCE: row-wise cross-entropy with targets on the diagonal.

  .. math::
    \ell_i = -\log \frac{e^{t\, x_i^\top y_i}}{\sum_j e^{t\, x_i^\top y_j}}

  Args:
    x: queries / anchors, shape ``[B, D]``.
    y: keys / positives, shape ``[B, D]``; ``y[j]``, ``j != i`` are the
      in-batch negatives of ``x[i]``.
    logit_scale: scalar :math:`t` (inverse temperature).

  Returns:
    per-example losses, shape ``[B]``.

  References:
    van den Oord et al., *Representation Learning with Contrastive Predictive
    Coding*, 2018.
  """
  x, y = _check_pair(x, y)
  logits = logit_scale * (x @ y.T)  # [B, B]
  return jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)


def clip_loss(x, y, *, logit_scale):
  r"""Symmetric InfoNCE (CLIP): the mean of the x->y and y->x directions.

  .. math::
    \ell_i = \tfrac12\Big[\log\sum_j e^{t\,x_i^\top y_j}
      + \log\sum_j e^{t\,x_j^\top y_i}\Big] - t\, x_i^\top y_i

  Example ``i`` carries row ``i`` of the x->y loss and column ``i`` of the
  y->x loss, so the batch mean equals CLIP's batch loss.

  Args:
    x: first-modality embeddings (e.g. images), shape ``[B, D]``.
    y: second-modality embeddings (e.g. texts), shape ``[B, D]``.
    logit_scale: scalar :math:`t` (inverse temperature).

  Returns:
    per-example losses, shape ``[B]``.

  References:
    Radford et al., *Learning Transferable Visual Models From Natural Language
    Supervision*, 2021.
  """
  x, y = _check_pair(x, y)
  logits = logit_scale * (x @ y.T)  # [B, B]
  row = jax.nn.logsumexp(logits, axis=1)
  col = jax.nn.logsumexp(logits, axis=0)
  return 0.5 * (row + col) - jnp.diagonal(logits)


def siglip_loss(x, y, *, logit_scale, logit_bias):
  r"""Pairwise sigmoid loss (SigLIP).

  .. math::
    \ell_i = -\sum_j \log\sigma\big(z_{ij}(t\,x_i^\top y_j + b)\big),
    \quad z_{ij} = \begin{cases} 1 & i = j \\ -1 & i \ne j \end{cases}

  The batch mean is the paper's loss (sum over all pairs divided by ``B``).

  Args:
    x: first-modality embeddings, shape ``[B, D]``.
    y: second-modality embeddings, shape ``[B, D]``.
    logit_scale: scalar :math:`t`.
    logit_bias: scalar :math:`b` (the paper initialises it at -10).

  Returns:
    per-example losses (row sums), shape ``[B]``.

  References:
    Zhai et al., *Sigmoid Loss for Language Image Pre-Training*, 2023.
  """
  x, y = _check_pair(x, y)
  logits = logit_scale * (x @ y.T) + logit_bias  # [B, B]
  signs = 2.0 * jnp.eye(x.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1)


def mnrl_loss(anchors, positives, negatives=None, *, scale=20.0):
  r"""Multiple-negatives ranking loss (sentence-transformers semantics).

  Candidates for every anchor are all positives of the batch plus all hard
  negatives of the batch, ``C = [p_1..p_B, n_{1,1}..n_{B,k}]``:

  .. math::
    \ell_i = -\log \frac{e^{s \cos(a_i, p_i)}}{\sum_{c \in C} e^{s\cos(a_i, c)}}

  Without negatives this is :func:`infonce_loss` on L2-normalised inputs with
  ``logit_scale=scale``.

  Args:
    anchors: shape ``[B, D]``.
    positives: shape ``[B, D]``.
    negatives: optional hard negatives, shape ``[B, k, D]``.
    scale: multiplier :math:`s` of the cosine similarities.

  Returns:
    per-anchor losses, shape ``[B]``.

  References:
    Henderson et al., *Efficient Natural Language Response Suggestion for
    Smart Reply*, 2017; sentence-transformers ``MultipleNegativesRankingLoss``.
  """
  anchors, positives = _check_pair(anchors, positives,
                                   ("anchors", "positives"))
  candidates = positives
  if negatives is not None:
    flat = _flat_negatives("negatives", negatives, *anchors.shape)
    candidates = jnp.concatenate([positives, flat])  # [B * (1 + k), D]
  logits = scale * _cosine(anchors, candidates)  # [B, B * (1 + k)]
  return jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)


def gist_loss(anchors, positives, guide_anchors, guide_positives,
              negatives=None, guide_negatives=None, *, temperature=0.01,
              margin=0.0):
  r"""GISTEmbed: in-batch negatives filtered by a guide model.

  Row ``i`` scores the pairs ``(a_i, p_j)``, ``(a_i, a_j)``, ``(p_i, p_j)``
  and, if given, ``(a_i, n)`` for every hard negative ``n`` of the batch, by
  the model's cosine similarity. A pair is dropped when the guide's cosine
  :math:`g` finds it more similar than the true pair, up to ``margin`` (the
  "absolute" strategy of sentence-transformers' ``GISTEmbedLoss``); the true
  pair ``(a_i, p_i)`` is always kept:

  .. math::
    \ell_i = -\log \frac{e^{\cos(a_i, p_i)/\tau}}
      {\sum_{(r, c) \in \mathcal{C}_i} e^{\cos(r, c)/\tau}},\quad
    \mathcal{C}_i = \{(r, c) : g(r, c) \le g(a_i, p_i) - m\}
      \cup \{(a_i, p_i)\}

  Self pairs ``(a_i, a_i)``, ``(p_i, p_i)`` have guide similarity 1, so they
  are dropped whenever ``g(a_i, p_i) - m < 1``.

  Args:
    anchors: model embeddings, shape ``[B, D]``.
    positives: model embeddings, shape ``[B, D]``.
    guide_anchors: guide-model embeddings of the anchors, ``[B, G]``.
    guide_positives: guide-model embeddings of the positives, ``[B, G]``.
    negatives: optional hard negatives, ``[B, k, D]``.
    guide_negatives: guide embeddings of ``negatives``, ``[B, k, G]``;
      required with ``negatives``.
    temperature: :math:`\tau`, divides the cosine similarities.
    margin: :math:`m`, absolute margin on the guide threshold.

  Returns:
    per-anchor losses, shape ``[B]``. No gradient flows into the guide.

  References:
    Solatorio, *GISTEmbed: Guided In-sample Selection of Training Negatives
    for Text Embedding Fine-tuning*, 2024; sentence-transformers
    ``GISTEmbedLoss``.
  """
  a, p = _check_pair(anchors, positives, ("anchors", "positives"))
  ga, gp = _check_pair(guide_anchors, guide_positives,
                       ("guide_anchors", "guide_positives"))
  if ga.shape[0] != a.shape[0]:
    raise ValueError(f"guide embeddings {ga.shape} and model embeddings "
                     f"{a.shape} must have the same batch size")
  ga, gp = jax.lax.stop_gradient(ga), jax.lax.stop_gradient(gp)
  g_pos = jnp.sum(_l2_normalize(ga) * _l2_normalize(gp), -1)[:, None]  # [B,1]
  eye = jnp.eye(a.shape[0], dtype=bool)

  def block(u, v, gu, gv, keep=None):
    drop = _cosine(gu, gv) > g_pos - margin
    drop = drop if keep is None else drop & ~keep
    return jnp.where(drop, -jnp.inf, _cosine(u, v))

  blocks = [block(a, p, ga, gp, keep=eye), block(a, a, ga, ga),
            block(p, p, gp, gp)]
  if negatives is not None:
    if guide_negatives is None:
      raise ValueError("guide_negatives is required when negatives are given")
    n = _flat_negatives("negatives", negatives, *a.shape)
    gn = _flat_negatives("guide_negatives", guide_negatives, *ga.shape,
                         k=jnp.shape(negatives)[1])
    blocks.append(block(a, n, ga, jax.lax.stop_gradient(gn)))
  scores = jnp.concatenate(blocks, axis=1) / temperature  # [B, 3B (+ Bk)]
  return jax.nn.logsumexp(scores, axis=-1) - jnp.diagonal(scores)


def matryoshka_loss(loss_fn: Callable[..., jax.Array], *embeddings,
                    dims: Sequence[int], weights: Sequence[float] | None = None,
                    **loss_kwargs):
  r"""Matryoshka representation learning around any embedding loss.

  Every embedding array is truncated to its first ``d`` features (last axis)
  and L2-normalised again, then ``loss_fn`` is applied:

  .. math::
    \ell_i = \sum_{k} w_k\, \mathcal{L}\big(\tfrac{x_{:d_k}}{\|x_{:d_k}\|},
      \tfrac{y_{:d_k}}{\|y_{:d_k}\|}, \dots\big)_i

  Inputs that must not be truncated (e.g. GIST's guide embeddings) go through
  ``loss_kwargs``.

  Args:
    loss_fn: a per-example loss of this module, e.g. :func:`clip_loss`.
    *embeddings: its positional embedding arrays, ``[..., D]`` each.
    dims: truncation sizes, each in ``[1, D]``.
    weights: one weight per entry of ``dims`` (default all 1).
    **loss_kwargs: passed to ``loss_fn`` unchanged (hyper-parameters etc.).

  Returns:
    the weighted sum of ``loss_fn``'s outputs over ``dims``.

  References:
    Kusupati et al., *Matryoshka Representation Learning*, 2022.
  """
  if not embeddings:
    raise ValueError("matryoshka_loss needs at least one embedding array")
  full = {jnp.shape(e)[-1] for e in embeddings}
  if len(full) != 1:
    raise ValueError(f"embeddings must share the last axis, got shapes "
                     f"{[jnp.shape(e) for e in embeddings]}")
  full = full.pop()
  if not dims or any(not 0 < d <= full for d in dims):
    raise ValueError(f"dims must be non-empty, each in [1, {full}], got {dims}")
  weights = (1.0,) * len(dims) if weights is None else tuple(weights)
  if len(weights) != len(dims):
    raise ValueError(f"weights {weights} must have one entry per dim {dims}")
  total = 0.0
  for dim, weight in zip(dims, weights):
    truncated = [_l2_normalize(_float(e)[..., :dim]) for e in embeddings]
    total = total + weight * loss_fn(*truncated, **loss_kwargs)
  return total


def dcl_loss(x, y, *, logit_scale):
  r"""Decoupled contrastive learning: the positive leaves the denominator.

  .. math::
    \ell^{(x)}_i = -t\,x_i^\top y_i
      + \log \sum_{j \ne i} \big(e^{t\,x_i^\top x_j} + e^{t\,x_i^\top y_j}\big)

  and :math:`\ell^{(y)}_i` with ``x`` and ``y`` swapped; the result is
  :math:`\tfrac12(\ell^{(x)}_i + \ell^{(y)}_i)`.

  Args:
    x: first view, shape ``[B, D]``, ``B >= 2``.
    y: second view, shape ``[B, D]``.
    logit_scale: scalar :math:`t = 1/\tau`.

  Returns:
    per-example losses, shape ``[B]``.

  References:
    Yeh et al., *Decoupled Contrastive Learning*, ECCV 2022.
  """
  x, y = _check_pair(x, y, min_rows=2)
  xy = logit_scale * (x @ y.T)  # [B, B]
  xx = logit_scale * (x @ x.T)
  yy = logit_scale * (y @ y.T)
  keep = jnp.tile(_off_diagonal(x.shape[0]), (1, 2))  # [B, 2B]
  neg_x = jax.nn.logsumexp(jnp.concatenate([xx, xy], 1), 1, where=keep)
  neg_y = jax.nn.logsumexp(jnp.concatenate([yy, xy.T], 1), 1, where=keep)
  return 0.5 * (neg_x + neg_y) - jnp.diagonal(xy)


def dhel_loss(x, y, *, logit_scale):
  r"""Decoupled hyperspherical energy loss (DHEL).

  The denominator holds only same-view similarities, so alignment (numerator)
  and uniformity (energy of each view) decouple:

  .. math::
    \ell_i = -t\,x_i^\top y_i + \log\sum_{j\ne i} e^{t\,x_i^\top x_j}
      + \log\sum_{j\ne i} e^{t\,y_i^\top y_j}

  Both views' energies enter, as in the authors' reference implementation
  (``include_augs=True``, its default) and as the two-view case of
  :func:`mv_dhel_loss`.

  Args:
    x: first view, shape ``[B, D]``, ``B >= 2``.
    y: second view, shape ``[B, D]``.
    logit_scale: scalar :math:`t = 1/\tau`.

  Returns:
    per-example losses, shape ``[B]``.

  References:
    Koromilas et al., *Bridging Mini-Batch and Asymptotic Analysis in
    Contrastive Learning: From InfoNCE to Kernel-Based Losses*, ICML 2024.
  """
  x, y = _check_pair(x, y, min_rows=2)
  keep = _off_diagonal(x.shape[0])
  energy_x = jax.nn.logsumexp(logit_scale * (x @ x.T), 1, where=keep)
  energy_y = jax.nn.logsumexp(logit_scale * (y @ y.T), 1, where=keep)
  return energy_x + energy_y - logit_scale * jnp.sum(x * y, axis=-1)


def _check_views(views):
  views = _float(views)
  if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
    raise ValueError("views must be a [N, B, D] array with N >= 2 views and "
                     f"B >= 2, got shape {views.shape}")
  return views


def mv_infonce_loss(views, *, logit_scale):
  r"""Multi-view InfoNCE: all views of an instance in one term.

  With :math:`u_{il}` the embedding of instance ``i`` in view ``l``:

  .. math::
    \ell_i = -\log \frac{\sum_{l \ne l'} e^{t\,u_{il}^\top u_{il'}}}
      {\sum_{l}\sum_{(j, m) \ne (i, l)} e^{t\,u_{il}^\top u_{jm}}}

  (the denominator keeps the other views of ``i``, as InfoNCE keeps the
  positive; this follows the authors' reference implementation).

  Args:
    views: shape ``[N, B, D]``, ``N >= 2`` views of ``B >= 2`` instances.
    logit_scale: scalar :math:`t = 1/\tau`.

  Returns:
    per-instance losses, shape ``[B]``.

  References:
    Koromilas et al., *A Principled Framework for Multi-View Contrastive
    Learning*, 2025 (arXiv:2507.06979).
  """
  views = _check_views(views)
  n, b, _ = views.shape
  sims = logit_scale * jnp.einsum("lid,mjd->ilmj", views, views)  # [B,N,N,B]
  same = jnp.eye(b, dtype=bool)[:, None, None, :] & jnp.eye(
      n, dtype=bool)[None, :, :, None]  # (j, m) == (i, l)
  energy = jax.nn.logsumexp(sims, axis=(1, 2, 3), where=~same)
  pos = jnp.diagonal(sims, axis1=0, axis2=3)  # [N, N, B]: u_il . u_im
  other_view = _off_diagonal(n)[..., None]  # l != m
  return energy - jax.nn.logsumexp(pos, axis=(0, 1), where=other_view)


def mv_dhel_loss(views, *, logit_scale):
  r"""Multi-view DHEL: one alignment term, one energy per view.

  .. math::
    \ell_i = -\log \sum_{l < l'} e^{t\,u_{il}^\top u_{il'}}
      + \sum_{l} \log \sum_{j \ne i} e^{t\,u_{il}^\top u_{jl}}

  With two views this is :func:`dhel_loss`.

  Args:
    views: shape ``[N, B, D]``, ``N >= 2`` views of ``B >= 2`` instances.
    logit_scale: scalar :math:`t = 1/\tau`.

  Returns:
    per-instance losses, shape ``[B]``.

  References:
    Koromilas et al., *A Principled Framework for Multi-View Contrastive
    Learning*, 2025 (arXiv:2507.06979).
  """
  views = _check_views(views)
  n, b, _ = views.shape
  same_view = logit_scale * jnp.einsum("lid,ljd->lij", views, views)  # [N,B,B]
  energy = jax.nn.logsumexp(same_view, axis=-1, where=_off_diagonal(b))
  cross = logit_scale * jnp.einsum("lid,mid->lmi", views, views)  # [N, N, B]
  upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)[..., None]
  return jnp.sum(energy, axis=0) - jax.nn.logsumexp(cross, (0, 1), where=upper)


def _check_modalities(modalities):
  if len(modalities) < 2:
    raise ValueError(f"need at least 2 modalities, got {len(modalities)}")
  shapes = [jnp.shape(m) for m in modalities]
  if len(shapes[0]) != 2 or len(set(shapes)) != 1:
    raise ValueError(f"modalities must all be [B, D] arrays of one shape, got "
                     f"{shapes}")
  return [_float(m) for m in modalities]


def _multilinear(modalities):
  """Row-wise multilinear inner product :math:`\\sum_d \\prod_m u_{m,d}`."""
  prod = modalities[0]
  for m in modalities[1:]:
    prod = prod * m
  return jnp.sum(prod, axis=-1)


def symile_loss(*modalities, logit_scale):
  r"""Symile with all :math:`B^{M-1}` candidate tuples (no sampling).

  For each target modality ``m`` and instance ``i``, the candidates are every
  combination of the other modalities' rows, the positive being the tuple of
  row ``i``; scores are multilinear inner products (MIP):

  .. math::
    \ell_i = \frac1M \sum_{m} \Big[\log \sum_{\mathbf{j} \in [B]^{M-1}}
      e^{t\,\mathrm{MIP}(u^{(m)}_i, u^{(-m)}_{\mathbf{j}})}\Big]
      - t\,\mathrm{MIP}(u^{(1)}_i, \dots, u^{(M)}_i)

  This is the paper's exhaustive (``O(B^{M-1})`` negatives per anchor;
  ``O(N^2)`` for three modalities) scheme, deterministic;
  :func:`symile_sampled_loss` is its ``O(N)`` variant. With two modalities it
  is :func:`clip_loss`. Memory is ``B^M``: keep ``B`` moderate.

  Args:
    *modalities: ``M >= 2`` arrays of shape ``[B, D]``.
    logit_scale: scalar :math:`t`.

  Returns:
    per-example losses, shape ``[B]``.

  References:
    Saporta et al., *Contrasting with Symile: Simple Model-Agnostic
    Representation Learning for Unlimited Modalities*, NeurIPS 2024.
  """
  modalities = _check_modalities(modalities)
  dim = modalities[0].shape[1]
  lse = 0.0
  for m, target in enumerate(modalities):
    others = modalities[:m] + modalities[m + 1:]
    tuples = others[0]
    for other in others[1:]:
      tuples = (tuples[:, None] * other[None]).reshape(-1, dim)  # [B^k, D]
    lse = lse + jax.nn.logsumexp(logit_scale * (target @ tuples.T), axis=-1)
  return lse / len(modalities) - logit_scale * _multilinear(modalities)


def symile_sampled_loss(*modalities, key, logit_scale):
  r"""Symile with ``B - 1`` sampled negatives per anchor (the paper's O(N)).

  For target modality ``m`` each other modality ``o`` is shuffled by its own
  permutation :math:`\pi_{m,o}`; candidate ``j`` of anchor ``i`` is the tuple
  :math:`(u^{(o)}_{\pi_{m,o}(j)})_{o \ne m}`, and the diagonal ``j = i`` is
  replaced by the positive tuple:

  .. math::
    \ell_i = \frac1M \sum_m \Big[\log\big(e^{t\,\mathrm{MIP}_i}
      + \sum_{j \ne i} e^{t\,\mathrm{MIP}(u^{(m)}_i,
        (u^{(o)}_{\pi_{m,o}(j)})_{o\ne m})}\big)\Big] - t\,\mathrm{MIP}_i

  ``pi[m, o] = jax.random.permutation(fold_in(fold_in(key, m), o), B)``.
  A shuffled tuple can coincide with the positive (a rare false negative),
  as in the paper.

  Args:
    *modalities: ``M >= 2`` arrays of shape ``[B, D]``.
    key: PRNG key for the permutations.
    logit_scale: scalar :math:`t`.

  Returns:
    per-example losses, shape ``[B]``.

  References:
    Saporta et al., *Contrasting with Symile: Simple Model-Agnostic
    Representation Learning for Unlimited Modalities*, NeurIPS 2024.
  """
  modalities = _check_modalities(modalities)
  batch = modalities[0].shape[0]
  pos = logit_scale * _multilinear(modalities)  # [B]
  eye = jnp.eye(batch, dtype=bool)
  lse = 0.0
  for m, target in enumerate(modalities):
    key_m = jax.random.fold_in(key, m)
    tuples = 1.0
    for o, other in enumerate(modalities):
      if o != m:
        perm = jax.random.permutation(jax.random.fold_in(key_m, o), batch)
        tuples = tuples * other[perm]  # [B, D]
    logits = jnp.where(eye, pos[:, None], logit_scale * (target @ tuples.T))
    lse = lse + jax.nn.logsumexp(logits, axis=-1)
  return lse / len(modalities) - pos


def alignment(x, y, *, alpha=2.0):
  r"""Alignment of positive pairs (label-free monitor, lower is better).

  .. math:: \mathcal{A} = \frac1B \sum_i \|x_i - y_i\|_2^{\alpha}

  Args:
    x: shape ``[B, D]`` (L2-normalised).
    y: shape ``[B, D]``.
    alpha: exponent :math:`\alpha > 0`.

  Returns:
    a scalar.

  References:
    Wang & Isola, *Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere*, ICML 2020.
  """
  x, y = _check_pair(x, y)
  # Power of the squared norm avoids sqrt's infinite gradient at x == y.
  return jnp.mean(jnp.sum(jnp.square(x - y), axis=-1) ** (alpha / 2))


def uniformity(x, *, t=2.0):
  r"""Uniformity on the hypersphere (label-free monitor, lower is better).

  .. math::
    \mathcal{U} = \log \frac{1}{B(B-1)} \sum_{i \ne j}
      e^{-t \|x_i - x_j\|_2^2}

  Args:
    x: shape ``[B, D]`` (L2-normalised), ``B >= 2``.
    t: kernel scale :math:`t > 0`.

  Returns:
    a scalar.

  References:
    Wang & Isola, *Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere*, ICML 2020.
  """
  x = _check_matrix("x", x, min_rows=2)
  sq = jnp.sum(jnp.square(x), axis=-1)
  dist2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)  # [B, B]
  b = x.shape[0]
  lse = jax.nn.logsumexp(-t * dist2, where=_off_diagonal(b))
  return lse - jnp.log(b * (b - 1.0))
