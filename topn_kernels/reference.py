"""Pure-PyTorch oracle of every operator (docs/operators.md).

Plain, differentiable PyTorch, written to be read and trusted rather than to be fast. Tests
and benchmarks compare every backend with these functions; ``backend="reference"`` runs them.
This module imports nothing else of the package and does no input validation (the public
functions in :mod:`topn_kernels.ops` do); it computes in float32 (float64 for float64 inputs)
and returns results in the input dtype.

Padded sets: rows past a set's length are replaced by zeros before any arithmetic, so whatever
the padding holds (NaN included) never reaches a value or a gradient.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "chamfer_loss",
    "ranking_tolerance",
    "repulsion_penalty",
    "set2graph_logits",
    "sinkhorn_loss",
    "topn_create",
    "topn_create_at",
    "valency_penalty",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sizes(n: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """Set sizes as an int64 tensor (B,)."""
    if isinstance(n, Tensor):
        return n.to(device=device, dtype=torch.int64).expand(batch)
    return torch.full((batch,), int(n), dtype=torch.int64, device=device)


def _point_mask(lengths: Tensor | None, batch: int, size: int, device: torch.device) -> Tensor:
    """(B, size) bool, True on the real points of each set."""
    if lengths is None:
        return torch.ones(batch, size, dtype=torch.bool, device=device)
    return torch.arange(size, device=device)[None, :] < lengths.to(device)[:, None]


def _real_points(x: Tensor, mask: Tensor) -> Tensor:
    """x in the compute dtype with its padding rows set to 0."""
    return torch.where(mask[..., None], x.to(_compute_dtype(x.dtype)), 0.0)


def _normalize(v: Tensor) -> Tensor:
    """``v / max(|v|, 1e-12)`` over the last dim, as ``F.normalize``, written as
    ``v / sqrt(max(sum_k v_k^2, 1e-24))`` with the squares summed in index order."""
    sq = torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device)
    for k in range(v.shape[-1]):
        sq = sq + v[..., k] * v[..., k]
    return v / sq.clamp_min(1e-24).sqrt()[..., None]


def _cosine_scores(query: Tensor, angles: Tensor) -> Tensor:
    """(B, n0) ``<normalize(query_b), normalize(angles_i)>``, summed over k in order."""
    qn, an = _normalize(query), _normalize(angles)
    scores = torch.zeros(query.shape[0], angles.shape[0], dtype=qn.dtype, device=qn.device)
    for k in range(query.shape[-1]):
        scores = scores + qn[:, None, k] * an[None, :, k]
    return scores


@torch.no_grad()
def _ranking_scores(query: Tensor, angles: Tensor) -> Tensor:
    """The scores that rank the points: :func:`_cosine_scores` of each distinct angle row,
    copied to its duplicates, so that exactly equal rows score exactly equal wherever they sit
    (a vectorised kernel need not round a value the same way at every position)."""
    if angles.shape[0] == 0:
        return _cosine_scores(query, angles)
    distinct, inverse = torch.unique(angles, dim=0, return_inverse=True)
    return _cosine_scores(query, distinct)[:, inverse]


def ranking_tolerance(a: int, dtype: torch.dtype) -> float:
    """Scores closer than this may be ranked in either order by different backends.

    Every backend computes a score in the compute dtype (float32, float64 for float64
    inputs) within ``(a + 4) * eps`` of the exact cosine, for an angle dimension ``a``
    (``docs/operators.md``, "Ranking"); two backends can therefore disagree only on scores
    whose exact values differ by less than twice that, ``(2a + 8) * eps``.
    """
    return (2 * a + 8) * torch.finfo(_compute_dtype(dtype)).eps


def _reduce_batch(values: Tensor, batch_reduction: str) -> Tensor:
    if batch_reduction == "mean":
        return values.mean() if values.numel() else values.sum()  # no set: 0, not 0/0
    if batch_reduction == "sum":
        return values.sum()
    return values


# ---------------------------------------------------------------------------------------------
# Top-n creation (docs/operators.md, topn_create)
# ---------------------------------------------------------------------------------------------


def topn_create(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: int | Tensor,
    film: Tensor,
    *,
    n_max: int | None = None,
    score_norm: str = "selected",
    sorted: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-n creation; returns ``(x, mask, index, weight)`` (``docs/operators.md``).

    query (B, a), angles (n0, a), table (n0, d), bias (B, d), film (4, d); n an int or (B,).
    x (B, n_max, d), mask (B, n_max) bool, index (B, n_max) int64 (-1 on padding),
    weight (B, n_max) (0 on padding).
    """
    batch, n0 = query.shape[0], angles.shape[0]
    sizes = _sizes(n, batch, query.device)
    if n_max is None:
        n_max = int(sizes.max()) if batch > 0 else 0

    # 1. cosine scores (B, n0)
    ct = _compute_dtype(query.dtype)
    scores = _ranking_scores(query.to(ct), angles.to(ct))
    # 2. ranking: decreasing score; a stable sort keeps equal scores in increasing index order
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.arange(n_max, device=query.device)[None, :] < sizes[:, None]
    top = F.pad(order[:, : min(n_max, n0)], (0, max(n_max - n0, 0)))  # (B, n_max)
    if not sorted:  # the same selection, in increasing index order (padding n0 sorts last)
        top = torch.where(mask, top, n0).sort(dim=-1).values
    index = torch.where(mask, top, -1)
    return topn_create_at(query, angles, table, bias, index, film, score_norm=score_norm)


def topn_create_at(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    index: Tensor,
    film: Tensor,
    *,
    score_norm: str = "selected",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 3-5 of :func:`topn_create` for a given selection: ``(x, mask, index, weight)``.

    ``index`` (B, n_max) int64 holds each set's selected reference points, in slot order,
    followed by -1 padding; set b has ``n_b = (index[b] >= 0).sum()`` points. With the
    ``index`` that :func:`topn_create` returns, this returns exactly its outputs; tests call it
    with a backend's ``index`` to compare values and gradients where two backends rank
    near-equal scores differently.
    """
    out_dtype = query.dtype
    ct = _compute_dtype(out_dtype)
    query, angles, table, bias, film = (t.to(ct) for t in (query, angles, table, bias, film))
    mask = index >= 0
    top = index.clamp_min(0)
    scores = _cosine_scores(query, angles)

    # 3. weights of the selected points
    if score_norm == "selected":
        weight = torch.softmax(scores.gather(1, top).masked_fill(~mask, -math.inf), dim=-1)
    else:  # "all": n_b * softmax over all n0 scores, read at the selected points
        sizes = mask.sum(1, keepdim=True).to(ct)
        weight = sizes * torch.softmax(scores, dim=-1).gather(1, top)
    weight = weight.masked_fill(~mask, 0.0)

    # 4-5. gather, add the per-set bias, FiLM; padding rows are 0
    h = table[top] + bias[:, None, :]
    m = weight[..., None]
    x = h * (m * film[0] + film[1]) + (m * film[2] + film[3])
    x = x.masked_fill(~mask[..., None], 0.0)
    return x.to(out_dtype), mask, index, weight.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Losses (docs/operators.md, chamfer_loss and sinkhorn_loss)
# ---------------------------------------------------------------------------------------------


def _nearest(
    p: Tensor, q: Tensor, p_mask: Tensor, q_mask: Tensor, norm: int
) -> tuple[Tensor, Tensor]:
    """For each point of p (B, P, D), the distance to the nearest real point of q (B, Q, D),
    squared Euclidean (norm 2) or L1 (norm 1), and that point's index; (B, P) each. Padding
    of p, and points whose set of q is empty, get distance 0 and index -1."""
    diff = p[:, :, None, :] - q[:, None, :, :]  # (B, P, Q, D)
    d = diff.abs().sum(-1) if norm == 1 else (diff**2).sum(-1)
    if q.shape[1] == 0:
        return d.new_zeros(p.shape[:2]), torch.full(p.shape[:2], -1, device=p.device)
    dist, index = d.masked_fill(~q_mask[:, None, :], math.inf).min(dim=2)
    found = p_mask & q_mask.any(1, keepdim=True)  # a real point, and a neighbour to find
    return torch.where(found, dist, 0.0), torch.where(found, index, -1)


def _normal_terms(
    p_normals: Tensor, q_normals: Tensor, index: Tensor, p_mask: Tensor, abs_cosine: bool
) -> Tensor:
    """(B, P): ``1 - |cos|`` (``1 - cos`` without abs_cosine) between each point's normal and
    the normal of its nearest neighbour ``index`` (-1, no neighbour: a zero normal, cos 0);
    0 on padding."""
    near = q_normals.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, q_normals.shape[2]))
    near = torch.where(index[..., None] >= 0, near, 0.0)
    cos = F.cosine_similarity(p_normals, near, dim=2, eps=1e-6)
    return torch.where(p_mask, 1 - (cos.abs() if abs_cosine else cos), 0.0)


def _reduce_points(terms: Tensor, mask: Tensor, point_reduction: str | None) -> Tensor:
    """(B, P) per-point terms, 0 on padding -> (B,) by ``point_reduction`` (None: the terms
    themselves); a set of no point gives 0 (its mean divides by max(n_b, 1))."""
    if point_reduction is None:
        return terms
    if point_reduction == "max":
        return terms.max(1).values if terms.shape[1] > 0 else terms.new_zeros(terms.shape[0])
    total = terms.sum(1)
    return total / mask.sum(1).clamp_min(1) if point_reduction == "mean" else total


def _reduce_chamfer_batch(values: Tensor, weights: Tensor | None, batch_reduction: str) -> Tensor:
    """PyTorch3D's batch reduction of per-set (or per-point) values already multiplied by
    their set's weight: "none" keeps them, "sum" adds them, "mean" divides their sum by B
    (at least 1) or, with weights, by the sum of the weights (by 1 if that is 0)."""
    if batch_reduction == "none":
        return values
    total = values.sum()
    if batch_reduction == "sum":
        return total
    if weights is None:
        return total / max(values.shape[0], 1)
    weight_sum = weights.sum()
    return total / torch.where(weight_sum > 0, weight_sum, 1.0)


def chamfer_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    x_normals: Tensor | None = None,
    y_normals: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    point_reduction: str | None = "mean",
    batch_reduction: str = "mean",
    norm: int = 2,
    single_directional: bool = False,
    abs_cosine: bool = True,
    return_index: bool = False,
) -> Tensor | tuple:
    """Chamfer distance between padded sets x (B, N, D) and y (B, M, D): PyTorch3D's
    ``chamfer_distance`` (docs/operators.md, chamfer_loss). Lengths (B,) may be 0.

    Per real point, the distance to its nearest neighbour among the real points of the other
    set, squared Euclidean (``norm=2``) or L1 (``norm=1``), summed over the D channels; 0
    where the other set is empty. Each direction is reduced over its set's points by
    ``point_reduction``: "mean" (0 for a set of no point), "sum", "max", or None (the
    per-point terms (B, N), 0 on padding). The two directions are added ("max": their
    maximum; None: the pair (x->y (B, N), y->x (B, M))); x->y alone with
    ``single_directional``. ``weights`` (B,) >= 0 multiply each set's terms (all zero: the
    loss is 0, gradients too). ``batch_reduction``: "none", "sum", or "mean" (the sum divided
    by B, or by the sum of the weights).

    With normals x_normals (B, N, D) and y_normals (B, M, D) the same reductions of ``1 -
    |cos|`` (``1 - cos`` if not ``abs_cosine``) between a point's normal and its nearest
    neighbour's (a zero normal where there is none: the term is 1) give ``loss_normals``.

    Returns ``loss``, or ``(loss, loss_normals)`` with normals; ``return_index`` appends the
    nearest-neighbour indices x->y (B, N) and y->x (B, M), int64, -1 on padding and where the
    other set is empty.
    """
    out_dtype = x.dtype
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    x_mask = _point_mask(x_lengths, batch, n, x.device)
    y_mask = _point_mask(y_lengths, batch, m, x.device)
    x, y = _real_points(x, x_mask), _real_points(y, y_mask)
    x_dist, x_index = _nearest(x, y, x_mask, y_mask, norm)
    y_dist, y_index = _nearest(y, x, y_mask, x_mask, norm)
    parts = [[(x_dist, x_mask), (y_dist, y_mask)]]  # distances, then the normals' terms
    if x_normals is not None and y_normals is not None:
        xn, yn = _real_points(x_normals, x_mask), _real_points(y_normals, y_mask)
        x_cos = _normal_terms(xn, yn, x_index, x_mask, abs_cosine)
        y_cos = _normal_terms(yn, xn, y_index, y_mask, abs_cosine)
        parts.append([(x_cos, x_mask), (y_cos, y_mask)])

    w = None if weights is None else weights.to(x.dtype)
    scale = None if w is None else w * (w.sum() > 0)  # all-zero weights: 0, zero gradients
    outputs = []
    for part in parts:
        values = [_reduce_points(t, mask, point_reduction) for t, mask in part]
        if single_directional:
            values = values[:1]
        elif point_reduction == "max":
            values = [torch.maximum(values[0], values[1])]
        elif point_reduction is not None:
            values = [values[0] + values[1]]
        if scale is not None:
            values = [v * (scale if point_reduction else scale[:, None]) for v in values]
        values = [_reduce_chamfer_batch(v, w, batch_reduction).to(out_dtype) for v in values]
        outputs.append(values[0] if len(values) == 1 else tuple(values))
    if return_index:
        outputs += [x_index, y_index]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _diameter(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor) -> float:
    """Diagonal of the bounding box of the real points of the whole batch (geomloss's rule),
    leaving out points with a non-finite coordinate (they must not change the other sets)."""
    pts = torch.cat([x.flatten(0, 1), y.flatten(0, 1)]).detach()
    real = torch.cat([x_mask.flatten(), y_mask.flatten()])[:, None]
    real = real & pts.isfinite().all(1, keepdim=True)
    if pts.shape[0] == 0:
        return 0.0
    lo = pts.masked_fill(~real, math.inf).amin(0)
    hi = pts.masked_fill(~real, -math.inf).amax(0)
    return float((hi - lo).norm())


def _epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's eps-scaling: diameter^p, then down by scaling^p per step, to blur^p.

    The schedule starts at max(diameter, blur): a zero or non-finite diameter (identical or
    NaN clouds) then gives a short, valid schedule instead of log(0) or NaN steps.
    """
    if not math.isfinite(diameter) or diameter < blur:
        diameter = blur
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return [diameter**p] + [float(np.exp(e)) for e in steps] + [blur**p]


def _probabilities(weights: Tensor | None, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, P) weights (None: uniform) on the real points, 0 on padding, each set's summing
    to 1."""
    w = mask.to(dtype) if weights is None else torch.where(mask, weights.to(dtype), 0.0)
    return w / w.sum(1, keepdim=True)


def sinkhorn_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    *,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    diameter: float | None = None,
    debias: bool = True,
    batch_reduction: str = "mean",
    a: Tensor | None = None,
    b: Tensor | None = None,
) -> Tensor:
    """Debiased Sinkhorn divergence between measures on padded sets (dense, log domain).

    ``a`` (B, N), ``b`` (B, M): the weights of the points (None: uniform), renormalised to sum
    to 1 over each set's real points (padding weighs 0 whatever it holds).

    geomloss's conventions: cost |x-y|^p / p (p = 1 or 2), eps = blur^p, eps-scaling from
    diameter^p to blur^p by scaling^p, symmetric (averaged) updates, ``S = OT(a,b) - OT(a,a)/2
    - OT(b,b)/2`` written with the dual potentials. The iterations run without autograd; the
    gradient comes from one last extrapolation step under autograd, with the potentials held
    fixed (envelope theorem), as geomloss does. ``diameter=None``: the bounding-box diagonal of
    the real points of the batch. Returns (B,) or its mean/sum. (For p=1 the gradient of
    |x - y| at x = y is taken as 0; geomloss clamps the distance at 1e-4 there instead.)
    """
    if p not in (1, 2):
        raise ValueError(f"sinkhorn_loss: p must be 1 or 2, got p={p}")
    out_dtype = x.dtype
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    x_mask = _point_mask(x_lengths, batch, n, x.device)
    y_mask = _point_mask(y_lengths, batch, m, x.device)
    x, y = _real_points(x, x_mask), _real_points(y, y_mask)
    if diameter is None:
        diameter = _diameter(x, y, x_mask, y_mask)
    eps_list = _epsilon_schedule(p, diameter, blur, scaling)

    # weights on the real points, summing to 1 per set; log-weight -inf on padding (and on
    # points of weight 0) removes them from every sum
    a = _probabilities(a, x_mask, x.dtype)
    b = _probabilities(b, y_mask, x.dtype)
    a_log, b_log = a.detach().log(), b.detach().log()

    def cost(u: Tensor, v: Tensor) -> Tensor:  # (B, I, J): |u_i - v_j|^p / p
        if p == 1:
            return torch.linalg.vector_norm(u[:, :, None, :] - v[:, None, :, :], dim=-1)
        return ((u[:, :, None, :] - v[:, None, :, :]) ** 2).sum(-1) / 2

    def softmin(eps: float, c: Tensor, h: Tensor) -> Tensor:  # -eps log sum_j exp(h_j - c_ij/eps)
        return -eps * torch.logsumexp(h[:, None, :] - c / eps, dim=2)

    # geomloss differentiates C(x, y) through its first argument only
    c_xy, c_yx = cost(x, y.detach()), cost(y, x.detach())
    c_xx, c_yy = cost(x, x.detach()), cost(y, y.detach())

    with torch.no_grad():
        eps = eps_list[0]
        f_ba, g_ab = softmin(eps, c_xy, b_log), softmin(eps, c_yx, a_log)
        f_aa, g_bb = softmin(eps, c_xx, a_log), softmin(eps, c_yy, b_log)
        for eps in eps_list:
            ft_ba = softmin(eps, c_xy, b_log + g_ab / eps)
            gt_ab = softmin(eps, c_yx, a_log + f_ba / eps)
            ft_aa = softmin(eps, c_xx, a_log + f_aa / eps)
            gt_bb = softmin(eps, c_yy, b_log + g_bb / eps)
            f_ba, g_ab = (f_ba + ft_ba) / 2, (g_ab + gt_ab) / 2
            f_aa, g_bb = (f_aa + ft_aa) / 2, (g_bb + gt_bb) / 2

    eps = eps_list[-1]  # last extrapolation, under autograd
    f_ba, g_ab = (
        softmin(eps, c_xy, (b_log + g_ab / eps).detach()),
        softmin(eps, c_yx, (a_log + f_ba / eps).detach()),
    )
    if debias:
        f_aa = softmin(eps, c_xx, (a_log + f_aa / eps).detach())
        g_bb = softmin(eps, c_yy, (b_log + g_bb / eps).detach())
        f_ba, g_ab = f_ba - f_aa, g_ab - g_bb
    value = torch.where(x_mask, a * f_ba, 0.0).sum(1) + torch.where(y_mask, b * g_ab, 0.0).sum(1)
    return _reduce_batch(value, batch_reduction).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Pairwise penalties (paper appendix D.2)
# ---------------------------------------------------------------------------------------------


def _pairwise_distances(x: Tensor) -> Tensor:
    """(B, N, N) Euclidean distances; the gradient at a zero distance is 0, not NaN."""
    return torch.linalg.vector_norm(x[:, :, None, :] - x[:, None, :, :], dim=-1)


def repulsion_penalty(x: Tensor, lengths: Tensor | None = None, *, min_dist: float = 1.0) -> Tensor:
    """Per set, ``sum_{i<j} relu(min_dist - |x_i - x_j|)``; x (B, N, D) -> (B,)."""
    out_dtype = x.dtype
    batch, n = x.shape[0], x.shape[1]
    mask = _point_mask(lengths, batch, n, x.device)
    x = _real_points(x, mask)
    pairs = mask[:, :, None] & mask[:, None, :]
    pairs = pairs & torch.ones(n, n, dtype=torch.bool, device=x.device).triu(diagonal=1)
    penalty = torch.relu(min_dist - _pairwise_distances(x))
    return torch.where(pairs, penalty, 0.0).sum((1, 2)).to(out_dtype)


def valency_penalty(
    x: Tensor,
    lengths: Tensor | None = None,
    *,
    neighbor_dist: float = 2.0,
    max_valency: int = 4,
) -> Tensor:
    """Per set, ``sum_i relu(s_i0 - neighbor_dist) + sum_{k >= max_valency} relu(neighbor_dist -
    s_ik)``, s_i the sorted distances from point i to the other points of its set; (B,).
    A set of one point contributes 0.
    """
    out_dtype = x.dtype
    batch, n = x.shape[0], x.shape[1]
    mask = _point_mask(lengths, batch, n, x.device)
    x = _real_points(x, mask)
    others = mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=x.device)
    s = _pairwise_distances(x).masked_fill(~others, math.inf).sort(dim=-1).values  # inf last
    no_neighbor = torch.relu(s[..., 0] - neighbor_dist) if n > 0 else x.new_zeros(batch, 0)
    too_many = torch.relu(neighbor_dist - s[..., max_valency:]).sum(-1)  # relu(-inf) = 0
    counted = mask & (mask.sum(1, keepdim=True) >= 2)
    return torch.where(counted, no_neighbor + too_many, 0.0).sum(1).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Set2Graph edge head (docs/operators.md, set2graph_logits)
# ---------------------------------------------------------------------------------------------


def set2graph_logits(
    x: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lengths: Tensor | None = None,
) -> Tensor:
    """Set2Graph edge logits: ``out[b, i, j] = weight2 @ relu(weight1 @ cat(x_bi, x_bj) + bias1)
    + bias2`` for i, j < lengths[b] (the diagonal included), 0 elsewhere.

    x (B, n, s), weight1 (h, 2s), bias1 (h,), weight2 (k, h), bias2 (k,) -> (B, n, n, k): the
    MLP ``Linear(2s, h), ReLU, Linear(h, k)`` on every ordered pair of real points, built here
    as the dense (B, n, n, 2s) tensor of concatenated pairs.
    """
    out_dtype = x.dtype
    ct = _compute_dtype(out_dtype)
    batch, n = x.shape[0], x.shape[1]
    mask = _point_mask(lengths, batch, n, x.device)
    x = _real_points(x, mask)  # (B, n, s), padding rows 0
    weight1, bias1, weight2, bias2 = (t.to(ct) for t in (weight1, bias1, weight2, bias2))
    rows = x[:, :, None, :].expand(-1, -1, n, -1)  # x_i at [b, i, j]
    cols = x[:, None, :, :].expand(-1, n, -1, -1)  # x_j at [b, i, j]
    pairs = torch.cat([rows, cols], dim=-1)  # (B, n, n, 2s)
    hidden = torch.relu(pairs @ weight1.T + bias1)  # (B, n, n, h)
    out = hidden @ weight2.T + bias2  # (B, n, n, k)
    real_pairs = mask[:, :, None] & mask[:, None, :]
    return torch.where(real_pairs[..., None], out, 0.0).to(out_dtype)
