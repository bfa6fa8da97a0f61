"""Chamfer distance on KeOps (docs/operators.md): nearest neighbours by KeOps ``argmin`` over the
block-diagonal ranges of a packed batch, distances recomputed in torch from the indices so
that autograd works (KeOps' ``Min`` has no gradient). Memory linear in the number of points."""

from __future__ import annotations

from torch import Tensor

from .._ragged import block_ranges, pack, reduce_batch
from ._pykeops import lazy_tensor


def nearest(rows: Tensor, cols: Tensor, ranges: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Global indices of the nearest column of every row and the nearest row of every column,
    within each block of ``ranges``; rows (P, D), cols (Q, D) -> (P,), (Q,) int64."""
    d2 = (
        (lazy_tensor(rows.detach()[:, None, :]) - lazy_tensor(cols.detach()[None, :, :])) ** 2
    ).sum(-1)
    d2.ranges = ranges
    return d2.argmin(dim=1).view(-1), d2.argmin(dim=0).view(-1)


def chamfer_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    *,
    point_reduction: str,
    batch_reduction: str,
    return_index: bool,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """As :func:`topn_kernels.reference.chamfer_loss`; inputs already validated."""
    px, py = pack(x, x_lengths), pack(y, y_lengths)
    x_nn, y_nn = nearest(px.points, py.points, block_ranges(px, py))
    x_term = px.segment_sum(((px.points - py.points[x_nn]) ** 2).sum(-1))
    y_term = py.segment_sum(((py.points - px.points[y_nn]) ** 2).sum(-1))
    if point_reduction == "mean":
        x_term = x_term / px.lengths
        y_term = y_term / py.lengths
    loss = reduce_batch(x_term + y_term, batch_reduction).to(x.dtype)
    if not return_index:
        return loss
    return loss, px.unpack(px.local(x_nn, py), -1), py.unpack(py.local(y_nn, px), -1)
