"""Sinkhorn divergence on KeOps (docs/operators.md): log-domain Sinkhorn with eps-scaling and
debiasing, geomloss's loop and conventions, every softmin a KeOps log-sum-exp over the
block-diagonal ranges of a packed batch. Memory linear in the number of points.

The loop runs without autograd; the gradient comes from one last extrapolation step under
autograd with the potentials held fixed (envelope theorem), as geomloss does.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from .._ragged import Packed, block_ranges, pack, reduce_batch
from .._schedule import prepare
from ._pykeops import needs_coordinates, pykeops

# cost |x - y|^p / p; the distance for p=1 is 0 (with a zero gradient) at x = y
_COSTS = {
    1: "IfElse(-SqDist(X,Y), Zero(1), Sqrt(SqDist(X,Y)))",
    2: "(SqDist(X,Y) / IntCst(2))",
}


@functools.cache
def _log_sum_exp(p: int, dim: int):
    """KeOps reduction: for each i, log sum_j exp(H_j - P * cost(X_i, Y_j))."""
    pykeops()
    from pykeops.torch import generic_logsumexp

    return generic_logsumexp(
        f"(H - P * {_COSTS[p]})",
        "R = Vi(1)",
        f"X = Vi({dim})",
        f"Y = Vj({dim})",
        "H = Vj(1)",
        "P = Pm(1)",
    )


def _probabilities(
    weights: Tensor | None, packed: Packed, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(P,) weights of the packed points (None: uniform), each set's summing to 1, and their
    logs, detached. KeOps' log-sum-exp starts from -inf and would take exp(-inf - (-inf)) =
    NaN for a leading -inf: a point of weight 0 gets log-weight -1e30 instead, whose term
    underflows to exactly 0 as -inf's does."""
    ct = packed.points.dtype
    if weights is None:
        w = torch.ones(packed.points.shape[0], dtype=ct, device=packed.points.device)
    else:
        w = pack(weights[..., None], lengths).points[:, 0]
    w = w / packed.segment_sum(w)[packed.set_of]
    return w, w.detach().log().clamp_min(-1e30)


@needs_coordinates(reference.sinkhorn_loss)
def sinkhorn_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    *,
    p: int,
    blur: float,
    scaling: float,
    diameter: float | None,
    debias: bool,
    batch_reduction: str,
    a: Tensor | None = None,
    b: Tensor | None = None,
) -> Tensor:
    """As :func:`topn_kernels.reference.sinkhorn_loss`; inputs already validated."""
    px, py, eps_list = prepare(
        x, y, x_lengths, y_lengths, p=p, blur=blur, scaling=scaling, diameter=diameter
    )
    xs, ys = px.points, py.points
    xd, yd = xs.detach(), ys.detach()
    ct = xs.dtype
    lse = _log_sum_exp(p, xs.shape[1])
    r_xy, r_yx = block_ranges(px, py), block_ranges(py, px)
    r_xx, r_yy = block_ranges(px, px), block_ranges(py, py)

    def softmin(eps: float, rows: Tensor, cols: Tensor, h: Tensor, ranges) -> Tensor:
        inv = torch.tensor([1.0 / eps], dtype=ct, device=rows.device)
        return -eps * lse(rows, cols, h.view(-1, 1), inv, ranges=ranges).view(-1)

    # the weights of the real points, summing to 1 per set (differentiable), and their logs
    # (held fixed: only the final sums are differentiated with respect to the weights)
    a, a_log = _probabilities(a, px, x_lengths)
    b, b_log = _probabilities(b, py, y_lengths)

    with torch.no_grad():
        eps = eps_list[0]
        f_ba, g_ab = softmin(eps, xd, yd, b_log, r_xy), softmin(eps, yd, xd, a_log, r_yx)
        f_aa, g_bb = softmin(eps, xd, xd, a_log, r_xx), softmin(eps, yd, yd, b_log, r_yy)
        for eps in eps_list:
            ft_ba = softmin(eps, xd, yd, b_log + g_ab / eps, r_xy)
            gt_ab = softmin(eps, yd, xd, a_log + f_ba / eps, r_yx)
            f_ba, g_ab = (f_ba + ft_ba) / 2, (g_ab + gt_ab) / 2
            if debias:
                ft_aa = softmin(eps, xd, xd, a_log + f_aa / eps, r_xx)
                gt_bb = softmin(eps, yd, yd, b_log + g_bb / eps, r_yy)
                f_aa, g_bb = (f_aa + ft_aa) / 2, (g_bb + gt_bb) / 2

    eps = eps_list[-1]  # last extrapolation, under autograd; C(x, y) through x only
    f_ba, g_ab = (
        softmin(eps, xs, yd, b_log + g_ab / eps, r_xy),
        softmin(eps, ys, xd, a_log + f_ba / eps, r_yx),
    )
    if debias:
        f_ba = f_ba - softmin(eps, xs, xd, a_log + f_aa / eps, r_xx)
        g_ab = g_ab - softmin(eps, ys, yd, b_log + g_bb / eps, r_yy)
    value = px.segment_sum(a * f_ba) + py.segment_sum(b * g_ab)
    return reduce_batch(value, batch_reduction).to(x.dtype)
