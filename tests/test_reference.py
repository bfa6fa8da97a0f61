"""The oracle itself: topn_kernels.reference against literal, brute-force loops of
docs/operators.md, against geomloss and POT, and torch.autograd.gradcheck in float64.

Ragged batches carry poisoned padding (NaN, inf, -1e30): it must change no value and no
gradient of a real point, and padded points get a zero gradient.
"""

from __future__ import annotations

import math

import geomloss
import numpy as np
import ot
import pytest
import torch

from topn_kernels import reference

from .helpers import assert_close_scaled, padded_sets, random_sizes, topn_inputs

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# topn_create
# ---------------------------------------------------------------------------------------------


def _normalized(v):
    return v / max(float(v.norm()), 1e-12)


def brute_topn(query, angles, table, bias, n, film, n_max, score_norm, by_score):
    """docs/operators.md, topn_create, step by step, one set and one point at a time."""
    batch, n0, d = query.shape[0], angles.shape[0], table.shape[1]
    x = torch.zeros(batch, n_max, d, dtype=F64)
    index = torch.full((batch, n_max), -1)
    weight = torch.zeros(batch, n_max, dtype=F64)
    for b in range(batch):
        q = _normalized(query[b])
        s = [float(q @ _normalized(angles[i])) for i in range(n0)]
        ranked = sorted(range(n0), key=lambda i: (-s[i], i))
        chosen = ranked[: int(n[b])] if by_score else sorted(ranked[: int(n[b])])
        if score_norm == "selected":
            top = max(s[i] for i in chosen)
            e = [math.exp(s[i] - top) for i in chosen]
            m = [v / sum(e) for v in e]
        else:
            top = max(s)
            z = sum(math.exp(v - top) for v in s)
            m = [int(n[b]) * math.exp(s[i] - top) / z for i in chosen]
        for j, i in enumerate(chosen):
            h = table[i] + bias[b]
            x[b, j] = h * (m[j] * film[0] + film[1]) + (m[j] * film[2] + film[3])
            index[b, j], weight[b, j] = i, m[j]
    return x, index >= 0, index, weight


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_topn_reference_matches_the_literal_definition(score_norm, sorted):
    inputs = topn_inputs(7, 23, 3, 5, dtype=F64, ties=True)
    n = random_sizes(7, 1, 23)
    got = reference.topn_create(*inputs[:4], n, inputs[4], n_max=25, score_norm=score_norm,
                                sorted=sorted)  # fmt: skip
    want = brute_topn(*inputs[:4], n, inputs[4], 25, score_norm, sorted)
    for name, g, w in zip(("x", "mask", "index", "weight"), got, want, strict=True):
        if g.dtype.is_floating_point:
            assert_close_scaled(g, w, 1e-12)
        else:
            assert torch.equal(g, w), name


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_topn_reference_gradcheck(score_norm, sorted):
    inputs = topn_inputs(3, 9, 3, 4, dtype=F64, requires_grad=True)
    n = torch.tensor([1, 4, 9])

    def f(*tensors):
        out = reference.topn_create(*tensors[:4], n, tensors[4], score_norm=score_norm,
                                    sorted=sorted)  # fmt: skip
        return out[0], out[3]

    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------
# Losses on ragged batches
# ---------------------------------------------------------------------------------------------

X_LEN = torch.tensor([5, 1, 9, 3])
Y_LEN = torch.tensor([2, 7, 9, 4])


def _ragged_pair(seed=0):
    x = padded_sets(4, 9, 3, X_LEN, seed=seed).requires_grad_()
    y = padded_sets(4, 9, 3, Y_LEN, seed=seed + 1).requires_grad_()
    return x, y


def _real_grad_rows_equal(grad, alone_grads, lengths):
    for b, g in enumerate(alone_grads):
        assert_close_scaled(grad[b, : lengths[b]], g, 1e-10)
        assert (grad[b, lengths[b] :] == 0).all()


def _brute_chamfer(x, y, point_reduction):
    """One set: nearest-neighbour squared distances by plain loops."""

    def one_way(p, q):
        best = [min(range(len(q)), key=lambda j: float(((p[i] - q[j]) ** 2).sum().detach()))
                for i in range(len(p))]  # fmt: skip
        dist = torch.stack([((p[i] - q[best[i]]) ** 2).sum() for i in range(len(p))])
        return (dist.mean() if point_reduction == "mean" else dist.sum()), best

    (cx, ix), (cy, iy) = one_way(x, y), one_way(y, x)
    return cx + cy, ix, iy


@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("point_reduction", ["mean", "sum"])
def test_chamfer_reference_matches_loops(point_reduction, batch_reduction):
    x, y = _ragged_pair()
    loss, x_idx, y_idx = reference.chamfer_loss(
        x, y, X_LEN, Y_LEN, point_reduction=point_reduction,
        batch_reduction=batch_reduction, return_index=True,
    )  # fmt: skip
    per_set, alone_x, alone_y = [], [], []
    for b in range(4):
        xb = x[b, : X_LEN[b]].detach().requires_grad_()
        yb = y[b, : Y_LEN[b]].detach().requires_grad_()
        value, ix, iy = _brute_chamfer(xb, yb, point_reduction)
        assert x_idx[b].tolist() == ix + [-1] * (9 - X_LEN[b])
        assert y_idx[b].tolist() == iy + [-1] * (9 - Y_LEN[b])
        gx, gy = torch.autograd.grad(value, (xb, yb))
        per_set.append(value.detach())
        alone_x.append(gx)
        alone_y.append(gy)
    want = torch.stack(per_set)
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[batch_reduction]
    assert_close_scaled(loss, want, 1e-12)

    per_set_loss = reference.chamfer_loss(
        x, y, X_LEN, Y_LEN, point_reduction=point_reduction, batch_reduction="none"
    )
    gx, gy = torch.autograd.grad(per_set_loss.sum(), (x, y))
    _real_grad_rows_equal(gx, alone_x, X_LEN)
    _real_grad_rows_equal(gy, alone_y, Y_LEN)


def _batch_diameter(x, y):
    pts = torch.cat([x[b, : X_LEN[b]] for b in range(4)] + [y[b, : Y_LEN[b]] for b in range(4)])
    return float((pts.amax(0) - pts.amin(0)).norm())


@pytest.mark.parametrize("debias", [True, False])
def test_sinkhorn_ragged_equals_each_set_alone(debias):
    x, y = _ragged_pair()
    values = reference.sinkhorn_loss(x, y, X_LEN, Y_LEN, debias=debias, batch_reduction="none")
    gx, gy = torch.autograd.grad(values.sum(), (x, y))
    diameter = _batch_diameter(x.detach(), y.detach())
    alone_x, alone_y = [], []
    for b in range(4):
        xb = x[b : b + 1, : X_LEN[b]].detach().requires_grad_()
        yb = y[b : b + 1, : Y_LEN[b]].detach().requires_grad_()
        alone = reference.sinkhorn_loss(xb, yb, diameter=diameter, debias=debias)
        assert_close_scaled(values[b], alone, 1e-10)
        gxb, gyb = torch.autograd.grad(alone, (xb, yb))
        alone_x.append(gxb[0])
        alone_y.append(gyb[0])
    _real_grad_rows_equal(gx, alone_x, X_LEN)
    _real_grad_rows_equal(gy, alone_y, Y_LEN)


@pytest.mark.parametrize(
    ("blur", "scaling", "debias"), [(0.05, 0.5, True), (0.3, 0.8, True), (0.05, 0.5, False)]
)
def test_sinkhorn_reference_matches_geomloss(blur, scaling, debias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 15, 3, dtype=F64, generator=g).requires_grad_()
    y = (torch.randn(3, 20, 3, dtype=F64, generator=g) + 0.5).requires_grad_()
    ours = reference.sinkhorn_loss(x, y, blur=blur, scaling=scaling, debias=debias,
                                   batch_reduction="none")  # fmt: skip
    peer = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=debias,
                                backend="tensorized")(x, y)  # fmt: skip
    assert_close_scaled(ours, peer, 1e-10)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for got, want in zip(torch.autograd.grad((ours * w).sum(), (x, y)),
                         torch.autograd.grad((peer * w).sum(), (x, y)), strict=True):  # fmt: skip
        assert_close_scaled(got, want, 1e-10)


def test_sinkhorn_reference_tends_to_exact_ot():
    """As blur -> 0 (slow annealing), the divergence tends to W2^2/2 from POT's exact solver."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, 2, dtype=F64, generator=g)
    y = torch.randn(1, 17, 2, dtype=F64, generator=g)
    cost = (((x[0, :, None] - y[0, None]) ** 2).sum(-1) / 2).numpy()
    exact = ot.emd2(np.full(12, 1 / 12), np.full(17, 1 / 17), cost)
    approx = reference.sinkhorn_loss(x, y, blur=1e-3, scaling=0.999).item()
    assert abs(approx - exact) < 2e-4 * exact


def test_sinkhorn_identical_or_collapsed_clouds_give_zero():
    x = torch.randn(2, 6, 3, dtype=F64)
    assert torch.equal(reference.sinkhorn_loss(x, x.clone(), batch_reduction="none"),
                       torch.zeros(2, dtype=F64))  # fmt: skip
    point = torch.ones(1, 4, 3, dtype=F64)  # zero diameter
    value = reference.sinkhorn_loss(point, point.clone())
    assert value.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------

LEN = torch.tensor([6, 1, 0, 4])


def _brute_repulsion(p, min_dist):
    total = torch.zeros((), dtype=F64)
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            total = total + torch.relu(min_dist - (p[i] - p[j]).norm())
    return total


def _brute_valency(p, neighbor_dist, max_valency):
    total = torch.zeros((), dtype=F64)
    for i in range(len(p)):
        s = sorted(
            ((p[i] - p[j]).norm() for j in range(len(p)) if j != i), key=lambda v: float(v.detach())
        )
        if s:
            total = total + torch.relu(s[0] - neighbor_dist)
        for v in s[max_valency:]:
            total = total + torch.relu(neighbor_dist - v)
    return total


@pytest.mark.parametrize(
    ("penalty", "brute", "kwargs"),
    [
        (reference.repulsion_penalty, _brute_repulsion, {"min_dist": 1.3}),
        (reference.valency_penalty, _brute_valency, {"neighbor_dist": 1.5, "max_valency": 2}),
    ],
    ids=["repulsion", "valency"],
)
def test_penalties_match_loops(penalty, brute, kwargs):
    x = (padded_sets(4, 6, 3, LEN, seed=5) * 0.8).requires_grad_()
    values = penalty(x, LEN, **kwargs)
    assert values.shape == (4,)
    assert values[1] == 0 and values[2] == 0  # one point, no point
    (gx,) = torch.autograd.grad(values.sum(), x)
    alone = []
    for b in range(4):
        xb = x[b, : LEN[b]].detach().requires_grad_()
        want = brute(xb, *kwargs.values())
        assert_close_scaled(values[b], want, 1e-12)
        alone.append(
            torch.autograd.grad(want, xb)[0] if want.requires_grad else torch.zeros_like(xb)
        )
    _real_grad_rows_equal(gx, alone, LEN)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: reference.chamfer_loss(x, y, X_LEN, Y_LEN, batch_reduction="none"),
        lambda x, y: reference.repulsion_penalty(x, X_LEN, min_dist=1.5),
        lambda x, y: reference.valency_penalty(y, Y_LEN, neighbor_dist=1.2, max_valency=2),
    ],
    ids=["chamfer", "repulsion", "valency"],
)
def test_loss_reference_gradcheck(fn):
    x = padded_sets(4, 9, 3, X_LEN, seed=8, poison=False).requires_grad_()
    y = padded_sets(4, 9, 3, Y_LEN, seed=9, poison=False).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, y))
