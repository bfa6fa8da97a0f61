"""Chamfer distance on KeOps (docs/operators.md): nearest neighbours by KeOps ``argmin`` over the
block-diagonal ranges of a packed batch, distances recomputed in torch from the indices so
that autograd works (KeOps' ``Min`` has no gradient). Memory linear in the number of points.

Every option of :func:`topn_kernels.reference.chamfer_loss` (PyTorch3D's ``chamfer_distance``):
L1 or squared L2 distances, one or both directions, point reductions mean, sum, max and None,
per-set weights, normals, sets of no point (their ranges are empty: KeOps' argmin over an
empty range is meaningless and is masked out here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ragged import Packed, block_ranges, pack
from ._pykeops import lazy_tensor


def nearest(
    rows: Tensor, cols: Tensor, ranges: tuple[Tensor, ...], norm: int = 2
) -> tuple[Tensor, Tensor]:
    """Global indices of the nearest column of every row and the nearest row of every column,
    within each block of ``ranges``, by squared Euclidean (norm 2) or L1 (norm 1) distance;
    rows (P, D), cols (Q, D) -> (P,), (Q,) int64. A row whose block has no column (and a
    column whose block has no row) gets an arbitrary index: the caller masks it."""
    diff = lazy_tensor(rows.detach()[:, None, :]) - lazy_tensor(cols.detach()[None, :, :])
    d = diff.abs().sum(-1) if norm == 1 else (diff**2).sum(-1)
    d.ranges = ranges
    return d.argmin(dim=1).view(-1), d.argmin(dim=0).view(-1)


def _distances(p: Packed, q: Packed, nn: Tensor, found: Tensor, norm: int) -> Tensor:
    """(P,) distance of each point of p to its nearest neighbour ``nn`` in q (0 where not
    ``found``), differentiable with respect to both."""
    if q.points.shape[0] == 0:  # nothing to be nearest to
        return p.points.new_zeros(p.points.shape[0])
    diff = p.points - q.points[nn.clamp_min(0)]
    d = diff.abs().sum(-1) if norm == 1 else (diff**2).sum(-1)
    return torch.where(found, d, 0.0)


def _cosine_terms(
    p_normals: Tensor, q_normals: Tensor, nn: Tensor, found: Tensor, abs_cosine: bool
) -> Tensor:
    """(P,) ``1 - |cos|`` (or ``1 - cos``) between each normal and its nearest neighbour's
    (a zero normal where there is none)."""
    if q_normals.shape[0] == 0:
        near = torch.zeros_like(p_normals)
    else:
        near = torch.where(found[:, None], q_normals[nn.clamp_min(0)], 0.0)
    cos = F.cosine_similarity(p_normals, near, dim=1, eps=1e-6)
    return 1 - (cos.abs() if abs_cosine else cos)


def _reduce_points(terms: Tensor, p: Packed, point_reduction: str | None) -> Tensor:
    """(P,) packed per-point terms -> (B,) per set, or (B, N) padded with 0 for None."""
    if point_reduction in ("mean", "sum"):
        total = p.segment_sum(terms)
        return total / p.lengths.clamp_min(1) if point_reduction == "mean" else total
    padded = p.unpack(terms, 0.0)
    if point_reduction is None:
        return padded
    return padded.max(1).values if p.size > 0 else padded.new_zeros(p.batch)


def _reduce_batch(values: Tensor, weights: Tensor | None, batch_reduction: str) -> Tensor:
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
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    x_normals: Tensor | None,
    y_normals: Tensor | None,
    weights: Tensor | None,
    *,
    point_reduction: str | None,
    batch_reduction: str,
    norm: int,
    single_directional: bool,
    abs_cosine: bool,
    return_index: bool,
) -> Tensor | tuple:
    """As :func:`topn_kernels.reference.chamfer_loss`; inputs already validated."""
    px, py = pack(x, x_lengths), pack(y, y_lengths)
    ct = px.points.dtype
    if px.points.shape[0] > 0 and py.points.shape[0] > 0:
        x_nn, y_nn = nearest(px.points, py.points, block_ranges(px, py), norm)
    else:  # no point on one side: nothing to search (KeOps takes no empty input)
        x_nn = torch.zeros(px.points.shape[0], dtype=torch.int64, device=x.device)
        y_nn = torch.zeros(py.points.shape[0], dtype=torch.int64, device=x.device)
    x_found = (py.lengths > 0)[px.set_of]  # the other set has a point to be nearest
    y_found = (px.lengths > 0)[py.set_of]
    parts = [
        [
            (_distances(px, py, x_nn, x_found, norm), px),
            (_distances(py, px, y_nn, y_found, norm), py),
        ]
    ]
    if x_normals is not None and y_normals is not None:
        xn, yn = pack(x_normals, x_lengths).points, pack(y_normals, y_lengths).points
        parts.append(
            [
                (_cosine_terms(xn, yn, x_nn, x_found, abs_cosine), px),
                (_cosine_terms(yn, xn, y_nn, y_found, abs_cosine), py),
            ]
        )

    w = None if weights is None else weights.to(ct)
    scale = None if w is None else w * (w.sum() > 0)  # all-zero weights: 0, zero gradients
    outputs = []
    for part in parts:
        values = [_reduce_points(terms, p, point_reduction) for terms, p in part]
        if single_directional:
            values = values[:1]
        elif point_reduction == "max":
            values = [torch.maximum(values[0], values[1])]
        elif point_reduction is not None:
            values = [values[0] + values[1]]
        if scale is not None:
            values = [v * (scale if point_reduction else scale[:, None]) for v in values]
        values = [_reduce_batch(v, w, batch_reduction).to(x.dtype) for v in values]
        outputs.append(values[0] if len(values) == 1 else tuple(values))
    if return_index:
        x_local = torch.where(x_found, px.local(x_nn, py), -1)
        y_local = torch.where(y_found, py.local(y_nn, px), -1)
        outputs += [px.unpack(x_local, -1), py.unpack(y_local, -1)]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
