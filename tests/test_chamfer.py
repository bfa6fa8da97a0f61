"""Everything about ``chamfer_loss`` (docs/operators.md, "chamfer_loss"): the reference against
literal nearest-neighbour loops and gradcheck, the KeOps backend against the reference, the
"auto" choice between them ("Backends and dispatch"), KeOps staying quiet, and input
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
from topn_kernels.keops import chamfer as keops_chamfer

from .helpers import (
    LOSS_VALIDATION_CASES,
    X_LEN,
    Y_LEN,
    assert_close_scaled,
    assert_loss_matches_reference,
    assert_rows_match_alone,
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


def test_auto_runs_the_reference_on_small_problems_and_keops_on_large(monkeypatch):
    calls = []
    real = keops_chamfer.chamfer_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keops_chamfer, "chamfer_loss", spy)
    small, large = torch.randn(4, 20, 3), torch.randn(2, 400, 3)
    tk.chamfer_loss(small, small)
    assert calls == []
    tk.chamfer_loss(large, large)
    assert calls == [1]
    tk.chamfer_loss(small.requires_grad_(), small)  # a backward follows: KeOps is faster
    assert calls == [1, 1]


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
# input validation (docs/operators.md, Errors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "error", "names"), LOSS_VALIDATION_CASES)
def test_validation_names_the_bad_argument(changes, error, names):
    x, y = small_loss_inputs()
    with pytest.raises(error, match=names):
        tk.chamfer_loss(**{"x": x, "y": y, **changes})


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"point_reduction": "none"}, ValueError, "point_reduction"),
        ({"return_index": "yes"}, TypeError, "return_index"),
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
