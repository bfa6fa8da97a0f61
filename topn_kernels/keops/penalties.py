"""The paper's pairwise penalties on KeOps (docs/operators.md, repulsion_penalty and
valency_penalty; paper D.2): Sum reductions over the block-diagonal ranges of a packed batch, and
``argKmin`` for the sorted neighbour distances (recomputed in torch from the indices, so that
autograd works). One value per set."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from .._ragged import Packed, block_ranges, pack
from ._pykeops import needs_coordinates, pykeops

# |x - y|, 0 with a zero gradient at x = y (as torch.linalg.vector_norm)
_DIST = "IfElse(-SqDist(X,Y), Zero(1), Sqrt(SqDist(X,Y)))"
# I, J: the positions of the two points in their set; I == J is the point itself
_SELF = "-SqDist(I,J)"


@functools.cache
def _sum(formula: str, dim: int):
    """KeOps reduction: for each i, sum_j formula(X_i, Y_j, I_i, J_j, C)."""
    pykeops()
    from pykeops.torch import Genred

    aliases = [f"X = Vi({dim})", f"Y = Vj({dim})", "I = Vi(1)", "J = Vj(1)", "C = Pm(1)"]
    return Genred(formula, aliases, reduction_op="Sum", axis=1)


@functools.cache
def _nearest_others(dim: int, k: int):
    """KeOps reduction: for each i, the indices of its k nearest other points."""
    pykeops()
    from pykeops.torch import Genred

    aliases = [f"X = Vi({dim})", f"Y = Vj({dim})", "I = Vi(1)", "J = Vj(1)", "C = Pm(1)"]
    return Genred(
        f"IfElse({_SELF}, C, SqDist(X,Y))", aliases, reduction_op="ArgKMin", axis=1, opt_arg=k
    )


def _packed(x: Tensor, lengths: Tensor | None) -> tuple[Packed, Tensor, tuple[Tensor, ...]]:
    px = pack(x, lengths)
    position = torch.arange(px.points.shape[0], device=x.device) - px.offsets[px.set_of]
    return px, position.to(px.points.dtype).view(-1, 1), block_ranges(px, px)


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.tensor([value], dtype=like.dtype, device=like.device)


@needs_coordinates(reference.repulsion_penalty)
def repulsion_penalty(x: Tensor, lengths: Tensor | None, *, min_dist: float) -> Tensor:
    """As :func:`topn_kernels.reference.repulsion_penalty`; inputs already validated."""
    px, position, ranges = _packed(x, lengths)
    pts = px.points
    op = _sum(f"IfElse({_SELF}, Zero(1), ReLU(C - {_DIST}))", pts.shape[1])
    per_point = op(pts, pts, position, position, _scalar(min_dist, pts), ranges=ranges).view(-1)
    return (px.segment_sum(per_point) / 2).to(x.dtype)  # each pair counted from both ends


@needs_coordinates(reference.valency_penalty)
def valency_penalty(
    x: Tensor, lengths: Tensor | None, *, neighbor_dist: float, max_valency: int
) -> Tensor:
    """As :func:`topn_kernels.reference.valency_penalty`; inputs already validated.

    Per point, with s the sorted distances to the other points of its set:
    relu(s_0 - nd) + sum_{k >= max_valency} relu(nd - s_k), the second term computed as the
    sum over all other points minus the sum over the max_valency nearest.
    """
    px, position, ranges = _packed(x, lengths)
    pts = px.points
    if pts.shape[0] == 0:  # no point in the batch: KeOps cannot reduce over nothing
        return x[:, :0].sum((1, 2))  # zeros (B,), in the graph of x
    nd = _scalar(neighbor_dist, pts)
    close = _sum(f"IfElse({_SELF}, Zero(1), ReLU(C - {_DIST}))", pts.shape[1])
    total = close(pts, pts, position, position, nd, ranges=ranges).view(-1)

    k = max(min(max_valency, x.shape[1] - 1), 1)  # a point has at most n - 1 neighbours
    nearest = _nearest_others(pts.shape[1], k)
    inf = _scalar(float("inf"), pts)
    index = nearest(pts.detach(), pts.detach(), position, position, inf, ranges=ranges).long()
    # entries past a point's number of neighbours (its set's length - 1) are not neighbours
    valid = torch.arange(k, device=x.device)[None, :] < (px.lengths[px.set_of] - 1)[:, None]
    index = torch.where(valid, index, torch.arange(pts.shape[0], device=x.device)[:, None])
    s = torch.linalg.vector_norm(pts[:, None, :] - pts[index], dim=-1)  # (P, k), ascending
    no_neighbor = torch.where(valid[:, 0], torch.relu(s[:, 0] - neighbor_dist), 0.0)
    nearest_close = torch.where(valid, torch.relu(neighbor_dist - s), 0.0)[:, :max_valency]
    # total - nearest_close is >= 0 (a sum of the other terms); clamping removes the rounding
    # of the difference, and where it is 0 every remaining term is inactive (zero gradient)
    per_point = no_neighbor + (total - nearest_close.sum(1)).clamp_min(0)
    return px.segment_sum(per_point).to(x.dtype)
