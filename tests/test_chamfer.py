"""Everything about ``chamfer_loss`` (docs/operators.md, "chamfer_loss"): the reference against
literal nearest-neighbour loops and gradcheck, the KeOps backend against the reference, the
"auto" choice between them ("Backends and dispatch"), KeOps staying quiet, PyTorch3D's options
(weights, norm, single_directional, point reductions max and None, normals, clouds of no
point) on both backends against a naive port of PyTorch3D's chamfer_distance, and input
validation ("Errors").

Ragged batches carry poisoned padding (NaN, inf, -1e30): it must change no value and no
gradient of a real point, and padded points get a zero gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import topn_kernels as tk
from topn_kernels import reference

from .helpers import (
    LOSS_VALIDATION_CASES,
    X_LEN,
    Y_LEN,
    assert_close_scaled,
    assert_loss_matches_reference,
    assert_rows_match_alone,
    assert_same_bits_on_one_thread,
    needs_native,
    padded_sets,
    ragged_pair,
    small_loss_inputs,
)

# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------


def _literal_chamfer(x, y, point_reduction):
    """One set: nearest-neighbour squared distances by plain loops."""

    def one_way(p, q):
        def dist(i, j):
            return ((p[i] - q[j]) ** 2).sum()

        best = [min(range(len(q)), key=lambda j: float(dist(i, j).detach())) for i in range(len(p))]
        d = torch.stack([dist(i, best[i]) for i in range(len(p))])
        return (d.mean() if point_reduction == "mean" else d.sum()), best

    (cx, ix), (cy, iy) = one_way(x, y), one_way(y, x)
    return cx + cy, ix, iy


@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("point_reduction", ["mean", "sum"])
def test_reference_matches_loops(point_reduction, batch_reduction):
    x, y = ragged_pair()
    kwargs = {"point_reduction": point_reduction, "return_index": True}
    loss, x_idx, y_idx = reference.chamfer_loss(
        x, y, X_LEN, Y_LEN, batch_reduction=batch_reduction, **kwargs
    )
    per_set, alone_x, alone_y = [], [], []
    for b in range(4):
        xb = x[b, : X_LEN[b]].detach().requires_grad_()
        yb = y[b, : Y_LEN[b]].detach().requires_grad_()
        value, ix, iy = _literal_chamfer(xb, yb, point_reduction)
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
    assert_rows_match_alone(gx, alone_x, X_LEN)
    assert_rows_match_alone(gy, alone_y, Y_LEN)


def test_reference_gradcheck():
    x = padded_sets(4, 9, 3, X_LEN, seed=8, poison=False).requires_grad_()
    y = padded_sets(4, 9, 3, Y_LEN, seed=9, poison=False).requires_grad_()

    def fn(x, y):
        return reference.chamfer_loss(x, y, X_LEN, Y_LEN, batch_reduction="none")

    assert torch.autograd.gradcheck(fn, (x, y))


# ---------------------------------------------------------------------------------------------
# KeOps against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("point_reduction", ["mean", "sum"])
def test_keops_matches_reference(point_reduction, batch_reduction):
    kwargs = {"point_reduction": point_reduction, "batch_reduction": batch_reduction}

    def fn(backend, x, y):
        return tk.chamfer_loss(x, y, X_LEN, Y_LEN, return_index=True, backend=backend, **kwargs)

    assert_loss_matches_reference(fn, list(ragged_pair()), 1e-12, "keops")


def test_keops_float32_and_full_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 3, generator=g).requires_grad_()
    y = torch.randn(3, 50, 3, generator=g).requires_grad_()

    def fn(backend, x, y):
        return tk.chamfer_loss(x, y, batch_reduction="none", backend=backend)

    assert_loss_matches_reference(fn, [x, y], 1e-5, "keops")


def test_auto_runs_native_unless_few_large_sets_or_options_it_lacks(monkeypatch):
    """On CPU: the native backend, except for a large problem with fewer sets than threads
    (KeOps) and for options the native Chamfer lacks (the reference when small, else KeOps;
    with a backward to follow KeOps even when small)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    small, large = torch.randn(4, 20, 3), torch.randn(3, 400, 3)
    trained, many_large = torch.randn(4, 20, 3, requires_grad=True), torch.randn(4, 400, 3)
    normals = {"x_normals": small, "y_normals": small}
    with tk.record_backends() as calls:
        tk.chamfer_loss(small, small)
        tk.chamfer_loss(trained, small)
        tk.chamfer_loss(many_large, many_large)
    assert calls["chamfer_loss"] == {"native": 3}
    with tk.record_backends() as calls:
        tk.chamfer_loss(large, large)
        tk.chamfer_loss(small, small, **normals)
        tk.chamfer_loss(small, small, point_reduction="max")
        tk.chamfer_loss(large, large, x_normals=large, y_normals=large)
        tk.chamfer_loss(trained, small, return_index=True)
    assert calls["chamfer_loss"] == {"keops": 3, "reference": 2}


@pytest.mark.slow  # two KeOps compilations from a cold cache
def test_keops_is_quiet_on_first_use(tmp_path):
    """A fresh compile cache (KEOPS_CACHE_FOLDER): importing pykeops and compiling a formula
    print nothing, unless KEOPS_VERBOSE asks for it."""
    script = textwrap.dedent(
        """
        import torch, topn_kernels as tk
        x = torch.randn(2, 5, 2, dtype=torch.float64)
        tk.chamfer_loss(x, x + 1, backend="keops")
        """
    )
    env = {k: v for k, v in os.environ.items() if "KEOPS_VERBOSE" not in k}
    env["KEOPS_CACHE_FOLDER"] = str(tmp_path)

    def run(env):
        command = [sys.executable, "-c", script]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    quiet = run(env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and "KeOps" not in quiet.stderr
    loud = run({**env, "KEOPS_VERBOSE": "1"})
    assert loud.returncode == 0 and "KeOps" in loud.stdout


# ---------------------------------------------------------------------------------------------
# the native backend against the reference
# ---------------------------------------------------------------------------------------------

NATIVE_OPTIONS = [
    {"point_reduction": pr, "norm": norm, "single_directional": single}
    for pr in ("mean", "sum")
    for norm in (1, 2)
    for single in (False, True)
]


@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kwargs", NATIVE_OPTIONS, ids=lambda k: "-".join(map(str, k.values())))
def test_native_matches_reference(kwargs, batch_reduction):
    """Ragged sets with clouds of no point on either side, poisoned padding, per-set weights
    (one 0), and two coincident points of y that are the nearest of some x: the gradient goes
    to the first, as the reference's argmin."""
    needs_native()
    x = padded_sets(5, 9, 3, X_LEN0, seed=11).requires_grad_()
    y = padded_sets(5, 9, 3, Y_LEN0, seed=12)
    y[0, 1] = y[0, 0]
    y.requires_grad_()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0], dtype=x.dtype, requires_grad=True)
    options = {**kwargs, "batch_reduction": batch_reduction}

    def fn(backend, x, y, w):
        return tk.chamfer_loss(x, y, X_LEN0, Y_LEN0, weights=w, backend=backend, **options)

    assert_loss_matches_reference(fn, [x, y, weights], 1e-12, "native")

    def unweighted(backend, x, y):
        return tk.chamfer_loss(x, y, X_LEN0, Y_LEN0, backend=backend, **options)

    assert_loss_matches_reference(unweighted, [x, y], 1e-12, "native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_low_precision_and_full_sets(dtype):
    """Full sets larger than a vector of the distance loop; float16 and bfloat16 run in
    float32 and come back in their own dtype."""
    needs_native()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 3, generator=g).to(dtype).requires_grad_()
    y = torch.randn(3, 53, 3, generator=g).to(dtype).requires_grad_()

    def fn(backend, x, y):
        return tk.chamfer_loss(x, y, batch_reduction="none", backend=backend)

    assert_loss_matches_reference(fn, [x, y], 1e-5 if dtype == torch.float32 else 1e-2, "native")


def test_native_nan_point_gives_its_set_nan():
    """A NaN coordinate of a real point is the nearest of everything (torch.min propagates
    NaN): its set's value is NaN, the others' are not."""
    needs_native()
    x, y = ragged_pair()
    x = x.detach().clone()
    x[2, 4, 1] = float("nan")
    for backend in ("native", "reference"):
        values = tk.chamfer_loss(x, y, X_LEN, Y_LEN, batch_reduction="none", backend=backend)
        assert values.isnan().tolist() == [False, False, True, False], backend


def test_native_values_do_not_depend_on_the_thread_count():
    """The batch splits across threads at the paper's scale; values and gradients are the
    same bits on one thread."""
    needs_native()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 35, 3, generator=g).requires_grad_()
    y = torch.randn(64, 35, 3, generator=g).requires_grad_()
    lengths = torch.randint(2, 36, (64,), generator=g)

    def fn(x, y):
        return tk.chamfer_loss(x, y, lengths, lengths, batch_reduction="none", backend="native")

    assert_same_bits_on_one_thread(fn, [x, y])


def test_native_refuses_options_it_lacks():
    needs_native()
    x, y = ragged_pair()
    for kwargs in (
        {"point_reduction": "max"},
        {"point_reduction": None, "batch_reduction": None},
        {"return_index": True},
        {"x_normals": x, "y_normals": y},
    ):
        with pytest.raises(ValueError, match="native Chamfer computes point reductions"):
            tk.chamfer_loss(x, y, X_LEN, Y_LEN, backend="native", **kwargs)


def test_native_op_checks_its_inputs():
    """The C++ op itself (reachable as torch.ops.topn_kernels.chamfer_sets) refuses lengths
    out of range before reading any point."""
    needs_native()
    x = torch.randn(2, 4, 3)
    op = torch.ops.topn_kernels.chamfer_sets
    with pytest.raises(ValueError, match=r"x_lengths\[1\] = 5 is outside \[0, 4\]"):
        op(x, x, torch.tensor([1, 5]), None, 2, True, False, False)
    with pytest.raises(RuntimeError, match="int64"):
        op(x, x, torch.tensor([1, 2], dtype=torch.int32), None, 2, True, False, False)
    with pytest.raises(RuntimeError, match="norm must be 1 or 2"):
        op(x, x, None, None, 3, True, False, False)


# ---------------------------------------------------------------------------------------------
# input validation (docs/operators.md, Errors)
# ---------------------------------------------------------------------------------------------


# Chamfer takes clouds of no point (PyTorch3D does): a length 0 is legal
CHAMFER_VALIDATION_CASES = [c for c in LOSS_VALIDATION_CASES if c.id != "x_lengths-zero"]


@pytest.mark.parametrize(("changes", "error", "names"), CHAMFER_VALIDATION_CASES)
def test_validation_names_the_bad_argument(changes, error, names):
    x, y = small_loss_inputs()
    with pytest.raises(error, match=names):
        tk.chamfer_loss(**{"x": x, "y": y, **changes})


_NORMALS = torch.randn(3, 6, 2), torch.randn(3, 5, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"point_reduction": "none"}, ValueError, "point_reduction"),
        ({"point_reduction": "min"}, ValueError, "point_reduction"),
        ({"point_reduction": None}, ValueError, "batch_reduction"),  # needs batch_reduction None
        ({"batch_reduction": "max"}, ValueError, "batch_reduction"),
        ({"return_index": "yes"}, TypeError, "return_index"),
        ({"single_directional": 1}, TypeError, "single_directional"),
        ({"abs_cosine": None}, TypeError, "abs_cosine"),
        ({"norm": 3}, ValueError, "norm"),
        ({"norm": 2.0}, TypeError, "norm"),
        ({"norm": True}, TypeError, "norm"),
        ({"x_lengths": torch.tensor([1, -1, 6])}, ValueError, "x_lengths"),
        ({"weights": torch.tensor([1.0, -1.0, 1.0])}, ValueError, "weights"),
        ({"weights": torch.tensor([1.0, float("nan"), 1.0])}, ValueError, "weights"),
        ({"weights": torch.ones(2)}, ValueError, "weights"),
        ({"weights": torch.ones(3, 1)}, ValueError, "weights"),
        ({"weights": torch.ones(3, dtype=torch.float64)}, TypeError, "weights"),
        ({"weights": torch.ones(3, dtype=torch.int64)}, TypeError, "weights"),
        ({"weights": [1.0, 1.0, 1.0]}, TypeError, "weights"),
        ({"x_normals": _NORMALS[0]}, ValueError, "y_normals"),
        ({"y_normals": _NORMALS[1]}, ValueError, "x_normals"),
        ({"x_normals": _NORMALS[1], "y_normals": _NORMALS[1]}, ValueError, "x_normals"),
        ({"x_normals": _NORMALS[0], "y_normals": _NORMALS[1][:, :, :1]}, ValueError, "y_normals"),
        (
            {"x_normals": _NORMALS[0].double(), "y_normals": _NORMALS[1].double()},
            TypeError,
            "x_normals",
        ),
        (
            {"x_normals": _NORMALS[0], "y_normals": _NORMALS[1], "point_reduction": "max"},
            ValueError,
            "point_reduction",
        ),
    ],
)
def test_validation_of_chamfer_arguments(kwargs, error, names):
    with pytest.raises(error, match=names):
        tk.chamfer_loss(*small_loss_inputs(), **kwargs)


def test_validation_nan_points_give_nan():
    """NaN is not an error: the sets it belongs to get NaN, the others their value."""
    x, y = small_loss_inputs()
    x[1, 2, 0] = float("nan")
    values = tk.chamfer_loss(x, y, batch_reduction="none", backend="reference")
    assert values.isnan().tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------
# PyTorch3D's options against a naive port of its chamfer_distance
# ---------------------------------------------------------------------------------------------

# ragged lengths with clouds of no point: set 1 has no x, set 2 no y, set 4 neither
X_LEN0 = torch.tensor([5, 0, 9, 3, 0])
Y_LEN0 = torch.tensor([2, 7, 0, 4, 0])


def _pytorch3d_chamfer(
    x,
    y,
    x_lengths,
    y_lengths,
    x_normals=None,
    y_normals=None,
    weights=None,
    batch_reduction="mean",
    point_reduction="mean",
    norm=2,
    single_directional=False,
    abs_cosine=True,
):
    """PyTorch3D's ``chamfer_distance`` written as plain loops over clouds and points: returns
    ``(loss, loss_normals)`` (loss_normals None without normals), the loss a pair (x->y,
    y->x) of per-point terms (B, P) for point_reduction None.

    Its rules: the distance to the nearest neighbour is squared L2 (norm 2) or L1 (norm 1);
    a point whose other cloud is empty has distance 0 and a zero neighbour normal (cosine 0);
    padding terms are 0; the per-point terms are multiplied by the cloud's weight; "mean"
    over points divides by max(length, 1), "max" takes the maximum over the padded row (0 on
    padding); the two directions add ("max": their maximum); "mean" over clouds divides by
    the sum of the weights (1 if it is 0; without weights by max(B, 1)); all-zero weights give
    zeros."""
    batch = x.shape[0]

    def cos(u, v):
        # torch's cosine_similarity: u.v / (max(|u|, eps) max(|v|, eps)), eps = 1e-6
        dot = sum(u[k] * v[k] for k in range(u.shape[0]))
        nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v)  # gradient 0 at 0
        return dot / (torch.clamp(nu, min=1e-6) * torch.clamp(nv, min=1e-6))

    def one_direction(p, q, p_len, q_len, p_n, q_n):
        dists = torch.zeros(batch, p.shape[1], dtype=torch.float64)
        cosines = torch.zeros(batch, p.shape[1], dtype=torch.float64)
        for b in range(batch):
            for i in range(int(p_len[b])):
                candidates = []
                for j in range(int(q_len[b])):
                    diff = p[b, i] - q[b, j]
                    d = diff.abs().sum() if norm == 1 else (diff * diff).sum()
                    candidates.append((float(d.detach()), j, d))
                if candidates:
                    _, j, d = min(candidates, key=lambda c: (c[0], c[1]))
                    dists = dists.index_put((torch.tensor(b), torch.tensor(i)), d)
                    near = q_n[b, j] if q_n is not None else None
                else:
                    near = torch.zeros(p.shape[2], dtype=torch.float64)
                if p_n is not None:
                    c = cos(p_n[b, i], near)
                    term = 1 - (c.abs() if abs_cosine else c)
                    cosines = cosines.index_put((torch.tensor(b), torch.tensor(i)), term)
        return dists, cosines

    def reduce_points(terms, lengths):
        if weights is not None:
            terms = terms * weights[:, None]
        if point_reduction is None:
            return terms
        if point_reduction == "max":
            return terms.max(1).values if terms.shape[1] else torch.zeros(batch, dtype=terms.dtype)
        total = terms.sum(1)
        return total / lengths.clamp(min=1) if point_reduction == "mean" else total

    def reduce_batch(value):
        if batch_reduction is None:
            return value
        total = value.sum()
        if batch_reduction == "sum":
            return total
        if weights is None:
            return total / max(batch, 1)
        return total / (weights.sum() if weights.sum() != 0 else 1)

    if weights is not None and weights.sum() == 0:
        zero = (x.sum((1, 2)) * weights) * 0.0  # PyTorch3D returns zeros tied to the inputs
        z = zero.sum() if batch_reduction is not None else zero
        return z, (z if x_normals is not None else None)
    with_normals = x_normals is not None
    cx, nx = one_direction(x, y, x_lengths, y_lengths, x_normals, y_normals)
    cy, ny = one_direction(y, x, y_lengths, x_lengths, y_normals, x_normals)
    results = []
    for fx, fy in ((cx, cy), (nx, ny)):
        vx, vy = reduce_points(fx, x_lengths), reduce_points(fy, y_lengths)
        if single_directional:
            value = reduce_batch(vx)
        elif point_reduction == "max":
            value = reduce_batch(torch.maximum(vx, vy))
        elif point_reduction is None:
            value = (vx, vy)
        else:
            value = reduce_batch(vx + vy)
        results.append(value)
    return results[0], (results[1] if with_normals else None)


def _flat(out) -> list:
    """The tensors of a (nested) Chamfer output, in order."""
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flat(item)]
    return [] if out is None else [out]


def _chamfer_case(seed: int = 0, dtype=torch.float64):
    """x (5, 9, 3), y (5, 9, 3) with lengths X_LEN0, Y_LEN0 (clouds of no point included),
    normals (some zero, one exactly opposite its neighbour's), weights; padding poisoned."""
    x = padded_sets(5, 9, 3, X_LEN0, seed=seed).to(dtype).requires_grad_()
    y = padded_sets(5, 9, 3, Y_LEN0, seed=seed + 1).to(dtype).requires_grad_()
    xn = padded_sets(5, 9, 3, X_LEN0, seed=seed + 2)
    yn = padded_sets(5, 9, 3, Y_LEN0, seed=seed + 3)
    xn[0, 1] = 0.0  # a zero normal: cosine 0, no NaN
    x_normals, y_normals = xn.to(dtype).requires_grad_(), yn.to(dtype).requires_grad_()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0], dtype=dtype).requires_grad_()
    return x, y, x_normals, y_normals, weights


CHAMFER_OPTIONS = [
    pytest.param(kwargs, id="-".join(f"{k}={v}" for k, v in kwargs.items()))
    for kwargs in [
        {"point_reduction": "mean", "batch_reduction": "mean"},
        {"point_reduction": "sum", "batch_reduction": "sum", "norm": 1},
        {"point_reduction": "mean", "batch_reduction": None, "normals": True},
        {"point_reduction": "mean", "batch_reduction": "mean", "weights": True, "normals": True},
        {"point_reduction": "sum", "batch_reduction": "mean", "norm": 1, "weights": True},
        {"point_reduction": "max", "batch_reduction": "mean"},
        {"point_reduction": "max", "batch_reduction": "sum", "norm": 1, "weights": True},
        {"point_reduction": "max", "batch_reduction": None, "single_directional": True},
        {"point_reduction": None, "batch_reduction": None, "normals": True, "weights": True},
        {"point_reduction": None, "batch_reduction": None, "single_directional": True, "norm": 1},
        {
            "point_reduction": "sum",
            "batch_reduction": "sum",
            "single_directional": True,
            "normals": True,
            "abs_cosine": False,
        },
        {
            "point_reduction": "mean",
            "batch_reduction": "mean",
            "normals": True,
            "abs_cosine": False,
            "weights": True,
            "norm": 1,
        },
    ]
]


def _options(kwargs, x_normals, y_normals, weights):
    """(normals and weights arguments, the other keyword arguments) of a CHAMFER_OPTIONS case."""
    kwargs = dict(kwargs)
    normals = kwargs.pop("normals", False)
    with_weights = kwargs.pop("weights", False)
    tensors = (
        x_normals if normals else None,
        y_normals if normals else None,
        weights if with_weights else None,
    )
    return tensors, kwargs


@pytest.mark.parametrize("backend", ["reference", "keops"])
@pytest.mark.parametrize("kwargs", CHAMFER_OPTIONS)
def test_options_match_pytorch3d_loops(kwargs, backend):
    """Every option of PyTorch3D's chamfer_distance, on a ragged batch with clouds of no
    point and poisoned padding: values, loss_normals and the gradients with respect to the
    points, the normals and the weights equal those of the naive port; padding gets a zero
    gradient; nearest-neighbour indices are the naive argmin (-1 where there is none)."""
    x, y, x_normals, y_normals, weights = _chamfer_case()
    if kwargs["point_reduction"] == "max":
        # a weight of exactly 0 is a kink of max_i(w d_i): PyTorch3D's gradient there is the
        # d_i of whichever of the equal zeros max picks; ours is the one-sided max_i d_i
        weights = (weights.detach() + 0.25).requires_grad_()
    (xn, yn, w), options = _options(kwargs, x_normals, y_normals, weights)
    out = tk.chamfer_loss(
        x, y, X_LEN0, Y_LEN0, xn, yn, w, return_index=True, backend=backend, **options
    )
    *values, x_index, y_index = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in (x, y, xn, yn, w) if t is not None]
    want = _pytorch3d_chamfer(x, y, X_LEN0, Y_LEN0, xn, yn, w, **options)
    got_flat, want_flat = _flat(values), _flat(want)
    assert (
        len(got_flat)
        == len(want_flat)
        == (2 if xn is not None else 1)
        * (2 if options["point_reduction"] is None and not options.get("single_directional") else 1)
    )
    g = torch.Generator().manual_seed(5)
    upstream = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want_flat]
    grads = torch.autograd.grad(
        sum((t * u).sum() for t, u in zip(got_flat, upstream, strict=True)), leaves
    )
    want_grads = torch.autograd.grad(
        sum((t * u).sum() for t, u in zip(want_flat, upstream, strict=True)),
        leaves,
        allow_unused=True,
    )
    for got, expected in zip(got_flat, want_flat, strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert_close_scaled(got, expected, 1e-12)
    for got, expected, leaf in zip(grads, want_grads, leaves, strict=True):
        expected = torch.zeros_like(leaf) if expected is None else expected
        assert got.isfinite().all()
        assert_close_scaled(got, expected, 1e-12)
    for index, p, q, p_len, q_len in (
        (x_index, x, y, X_LEN0, Y_LEN0),
        (y_index, y, x, Y_LEN0, X_LEN0),
    ):
        for b in range(5):
            real = [int(j) for j in index[b, : p_len[b]]]
            if q_len[b] == 0:
                assert real == [-1] * int(p_len[b])
            else:
                diff = (p[b, : p_len[b], None] - q[b, None, : q_len[b]]).detach()
                d = diff.abs().sum(-1) if options.get("norm") == 1 else (diff**2).sum(-1)
                assert real == d.argmin(1).tolist()
            assert (index[b, p_len[b] :] == -1).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": 1, "point_reduction": "max", "weights": True},
        {"normals": True, "weights": True, "abs_cosine": False},
        {"normals": True, "point_reduction": "sum", "batch_reduction": None, "norm": 1},
    ],
    ids=["l1-max-weights", "normals-weights", "normals-l1-sum"],
)
def test_options_reference_gradcheck(kwargs):
    """gradcheck in float64 of the reference with the new options (no padding poison: the
    finite differences perturb padding too); clouds of no point included."""
    x_len, y_len = torch.tensor([4, 0, 3]), torch.tensor([2, 3, 0])
    tensors = [
        padded_sets(3, 4, 3, n, seed=s, poison=False).requires_grad_()
        for s, n in ((1, x_len), (2, y_len))
    ]
    (xn, yn, w), options = _options(
        kwargs,
        padded_sets(3, 4, 3, None, seed=3),
        padded_sets(3, 4, 3, None, seed=4),
        torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
    )
    extra = [t.requires_grad_() for t in (xn, yn, w) if t is not None]

    def fn(*args):
        x, y, *rest = args
        xn = rest.pop(0) if kwargs.get("normals") else None
        yn = rest.pop(0) if kwargs.get("normals") else None
        w = rest.pop(0) if kwargs.get("weights") else None
        out = reference.chamfer_loss(x, y, x_len, y_len, xn, yn, w, **options)
        return tuple(_flat(out))

    assert torch.autograd.gradcheck(fn, (*tensors, *extra))


@pytest.mark.parametrize("backend", ["reference", "keops"])
def test_empty_clouds_follow_pytorch3d(backend):
    """A cloud of no point: its own terms are 0; a point whose other cloud is empty has
    distance 0 and normal term 1 (its neighbour's normal counts as 0); the mean over no
    point is 0. No NaN in the loss or the gradients, whatever the padding holds."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]], [[0.0, 0.0, 0.0], [nan, 0.0, 0.0]]])
    y = torch.tensor([[[inf, 1.0, 0.0]], [[2.0, 0.0, 0.0]]])
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    normals = torch.ones(2, 2, 3, dtype=torch.float64, requires_grad=True)
    y_normals = torch.ones(2, 1, 3, dtype=torch.float64, requires_grad=True)
    x_len, y_len = torch.tensor([2, 1]), torch.tensor([0, 1])
    loss, loss_normals = tk.chamfer_loss(
        x, y, x_len, y_len, normals, y_normals, batch_reduction=None, backend=backend
    )
    # set 0: x has 2 points, y none: distances 0, normal terms 1 (x->y mean), 0 (y->x, empty)
    # set 1: x = [(0, 0)], y = [(2, 0)]: 4 + 4; parallel normals
    torch.testing.assert_close(loss, torch.tensor([0.0, 8.0], dtype=torch.float64))
    torch.testing.assert_close(loss_normals, torch.tensor([1.0, 0.0], dtype=torch.float64))
    grads = torch.autograd.grad(loss.sum() + loss_normals.sum(), (x, y, normals, y_normals))
    assert all(g.isfinite().all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all()  # set 0's distances are 0
    empty = tk.chamfer_loss(x[:, :0], y, torch.tensor([0, 0]), y_len, backend=backend)
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "keops"])
@pytest.mark.parametrize("batch_reduction", ["mean", "sum", None])
def test_zero_weights_give_zero_with_zero_gradients(backend, batch_reduction):
    """PyTorch3D's rule: weights summing to 0 give a zero loss (no division by 0), and then
    no gradient flows to the points or the weights."""
    x, y, x_normals, y_normals, _ = _chamfer_case()
    weights = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    loss, loss_normals = tk.chamfer_loss(
        x,
        y,
        X_LEN0,
        Y_LEN0,
        x_normals,
        y_normals,
        weights,
        batch_reduction=batch_reduction,
        backend=backend,
    )
    assert (loss == 0).all() and (loss_normals == 0).all()
    grads = torch.autograd.grad(loss.sum() + loss_normals.sum(), (x, y, weights))
    assert all((g == 0).all() for g in grads)


def test_batch_reduction_none_is_an_alias_and_weights_scale():
    x, y, *_ = _chamfer_case()
    none = tk.chamfer_loss(x, y, X_LEN0, Y_LEN0, batch_reduction="none")
    assert torch.equal(tk.chamfer_loss(x, y, X_LEN0, Y_LEN0, batch_reduction=None), none)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0], dtype=torch.float64)
    weighted = tk.chamfer_loss(x, y, X_LEN0, Y_LEN0, weights=w, batch_reduction="mean")
    assert_close_scaled(weighted, (none * w).sum() / w.sum(), 1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_options_in_low_precision(dtype):
    """float32, float16, bfloat16 inputs: KeOps and the reference agree (both compute in
    float32) and return the input dtype; values, normals and gradients within a few units
    of the dtype's last place."""
    x, y, x_normals, y_normals, weights = _chamfer_case(dtype=dtype)
    results = []
    for backend in ("reference", "keops"):
        loss, loss_normals = tk.chamfer_loss(
            x, y, X_LEN0, Y_LEN0, x_normals, y_normals, weights, backend=backend
        )
        assert loss.dtype == loss_normals.dtype == dtype
        grads = torch.autograd.grad(loss + 2 * loss_normals, (x, y, x_normals, weights))
        results.append([loss, loss_normals, *grads])
    rtol = 4 * torch.finfo(dtype).eps
    for got, want in zip(*results, strict=True):
        assert got.isfinite().all()
        assert_close_scaled(got.double(), want.double(), rtol)
