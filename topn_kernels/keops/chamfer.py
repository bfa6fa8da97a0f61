"""Chamfer distance on KeOps (docs/operators.md): nearest neighbours by KeOps ``argmin`` over the
block-diagonal ranges of a packed batch, behind a custom op that returns them as padded indices;
distances recomputed in torch from the indices on the padded sets, so that autograd works
(KeOps' ``Min`` has no gradient) and torch.compile traces everything but the search. Memory
linear in the number of points.

Every option of :func:`topn_kernels.reference.chamfer_loss` (PyTorch3D's ``chamfer_distance``):
L1 or squared L2 distances, one or both directions, point reductions mean, sum, max and None,
per-set weights, normals, sets of no point (their ranges are empty: KeOps' argmin over an
empty range is meaningless and is masked out here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._ragged import block_ranges, compute_dtype, lengths_mask, pack, reduce_weighted_batch
from ._pykeops import lazy_tensor, needs_coordinates


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


@torch.library.custom_op("topn_kernels::keops_chamfer_nearest", mutates_args=())
def nearest_padded(
    x: Tensor, y: Tensor, x_lengths: Tensor | None, y_lengths: Tensor | None, norm: int
) -> tuple[Tensor, Tensor]:
    """The index of every real point's nearest neighbour among the real points of the other set
    of its pair: x (B, N, D), y (B, M, D) -> (B, N), (B, M) int64, -1 on padding and where the
    other set is empty. A custom op (with a fake kernel), so that torch.compile traces the
    loss around it: the packing and KeOps run inside."""
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm}")
    px, py = pack(x.detach(), x_lengths), pack(y.detach(), y_lengths)
    if px.points.shape[0] == 0 or py.points.shape[0] == 0:  # KeOps takes no empty input
        return x.new_full(x.shape[:2], -1, dtype=torch.int64), y.new_full(
            y.shape[:2], -1, dtype=torch.int64
        )
    x_nn, y_nn = nearest(px.points, py.points, block_ranges(px, py), norm)
    x_found = (py.lengths > 0)[px.set_of]  # the other set has a point to be nearest
    y_found = (px.lengths > 0)[py.set_of]
    x_local = torch.where(x_found, px.local(x_nn, py), -1)
    y_local = torch.where(y_found, py.local(y_nn, px), -1)
    return px.unpack(x_local, -1), py.unpack(y_local, -1)


@nearest_padded.register_fake
def _nearest_padded_fake(x, y, x_lengths, y_lengths, norm):
    return x.new_empty(x.shape[:2], dtype=torch.int64), y.new_empty(y.shape[:2], dtype=torch.int64)


def _gather(points: Tensor, index: Tensor) -> Tensor:
    """points (B, M, D), index (B, N) with -1 for none -> (B, N, D), zero where none."""
    if points.shape[1] == 0:  # nothing to gather from: every index is -1
        return points.new_zeros((*index.shape, points.shape[2]))
    idx = index.clamp_min(0)[..., None].expand(-1, -1, points.shape[2])
    return torch.where(index[..., None] >= 0, torch.gather(points, 1, idx), 0.0)


def _distances(p: Tensor, q: Tensor, index: Tensor, norm: int) -> Tensor:
    """(B, N) distance of each point of p (B, N, D) to its nearest neighbour in q (B, M, D),
    0 where ``index`` (B, N) is -1 (padding, or an empty other set); differentiable with
    respect to both, padding zeroed by the caller."""
    diff = p - _gather(q, index)
    d = diff.abs().sum(-1) if norm == 1 else (diff**2).sum(-1)
    return torch.where(index >= 0, d, 0.0)


def _cosine_terms(
    p_normals: Tensor, q_normals: Tensor, index: Tensor, mask: Tensor, abs_cosine: bool
) -> Tensor:
    """(B, N) ``1 - |cos|`` (or ``1 - cos``) between each normal and its nearest neighbour's
    (a zero normal where there is none), 0 on padding (``mask`` (B, N) False)."""
    near = _gather(q_normals, index)
    cos = F.cosine_similarity(p_normals, near, dim=2, eps=1e-6)
    return torch.where(mask, 1 - (cos.abs() if abs_cosine else cos), 0.0)


def _reduce_points(terms: Tensor, lengths: Tensor, point_reduction: str | None) -> Tensor:
    """(B, N) per-point terms, 0 on padding -> (B,) per set, or themselves for None."""
    if point_reduction in ("mean", "sum"):
        total = terms.sum(1)
        return total / lengths.clamp_min(1) if point_reduction == "mean" else total
    if point_reduction is None:
        return terms
    return terms.max(1).values if terms.shape[1] > 0 else terms.new_zeros(terms.shape[0])


def _mask(lengths: Tensor | None, x: Tensor) -> Tensor:
    """(B, N) bool, True on the real points of x (B, N, D)."""
    if lengths is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return lengths_mask(lengths, x.shape[1])


def _real(x: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """x (B, N, D) in ``dtype`` with its padding set to 0."""
    return torch.where(mask[..., None], x.to(dtype), 0.0)


@needs_coordinates(reference.chamfer_loss)
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
    ct = compute_dtype(x.dtype)
    x_mask, y_mask = _mask(x_lengths, x), _mask(y_lengths, y)
    x_len, y_len = x_mask.sum(1), y_mask.sum(1)
    x_index, y_index = nearest_padded(x, y, x_lengths, y_lengths, norm)
    # padding zeroed, so that whatever it holds (NaN) reaches neither values nor gradients
    xs, ys = _real(x, x_mask, ct), _real(y, y_mask, ct)
    parts = [
        [
            (_distances(xs, ys, x_index, norm), x_len),
            (_distances(ys, xs, y_index, norm), y_len),
        ]
    ]
    if x_normals is not None and y_normals is not None:
        xn, yn = _real(x_normals, x_mask, ct), _real(y_normals, y_mask, ct)
        parts.append(
            [
                (_cosine_terms(xn, yn, x_index, x_mask, abs_cosine), x_len),
                (_cosine_terms(yn, xn, y_index, y_mask, abs_cosine), y_len),
            ]
        )

    w = None if weights is None else weights.to(ct)
    scale = None if w is None else w * (w.sum() > 0)  # all-zero weights: 0, zero gradients
    outputs = []
    for part in parts:
        values = [_reduce_points(terms, n, point_reduction) for terms, n in part]
        if single_directional:
            values = values[:1]
        elif point_reduction == "max":
            values = [torch.maximum(values[0], values[1])]
        elif point_reduction is not None:
            values = [values[0] + values[1]]
        if scale is not None:
            values = [v * (scale if point_reduction else scale[:, None]) for v in values]
        values = [reduce_weighted_batch(v, w, batch_reduction).to(x.dtype) for v in values]
        outputs.append(values[0] if len(values) == 1 else tuple(values))
    if return_index:
        outputs += [x_index, y_index]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
