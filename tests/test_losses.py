"""The KeOps losses and penalties, and the native Sinkhorn, against the reference and the peers
(docs/operators.md).

Ragged batches carry poisoned padding (NaN, inf, -1e30): values and gradients of real points
must equal the reference's, and padding must get a zero gradient. float64 judges the
algorithms tightly; one float32 case per operator checks the float32 path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import geomloss
import numpy as np
import ot
import pytest
import torch

import topn_kernels as tk
from topn_kernels.keops import chamfer as keops_chamfer

from .helpers import assert_close_scaled, padded_sets

F64 = torch.float64
X_LEN = torch.tensor([5, 1, 9, 3])
Y_LEN = torch.tensor([2, 7, 9, 4])


def _ragged_pair(dtype=F64, seed=0):
    x = padded_sets(4, 9, 3, X_LEN, seed=seed).to(dtype).requires_grad_()
    y = padded_sets(4, 9, 3, Y_LEN, seed=seed + 1).to(dtype).requires_grad_()
    return x, y


SINKHORN_BACKENDS = ["keops", "native"]


def _compare(fn, inputs, rtol, backend="keops"):
    """fn(backend, *inputs) -> tensor or tuple whose first item is the value: ``backend``
    against the reference, value and gradients under a random upstream gradient."""
    results = []
    for name in (backend, "reference"):
        out = fn(name, *inputs)
        value = out[0] if isinstance(out, tuple) else out
        g = torch.randn(value.shape, generator=torch.Generator().manual_seed(3), dtype=value.dtype)
        grads = torch.autograd.grad((value * g).sum(), inputs)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    if isinstance(out, tuple):
        for got, want in zip(out[1:], ref[1:], strict=True):
            assert torch.equal(got, want)
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype
    assert_close_scaled(out, ref, rtol)
    for got, want, x in zip(grads, ref_grads, inputs, strict=True):
        assert_close_scaled(got, want, rtol)
        assert got.isfinite().all() and (got[x.isnan()] == 0).all()


@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("point_reduction", ["mean", "sum"])
def test_chamfer_keops_matches_reference(point_reduction, batch_reduction):
    def fn(backend, x, y):
        return tk.chamfer_loss(x, y, X_LEN, Y_LEN, point_reduction=point_reduction,
                               batch_reduction=batch_reduction, return_index=True,
                               backend=backend)  # fmt: skip

    _compare(fn, _ragged_pair(), 1e-12)


def test_chamfer_keops_float32_and_full_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 3, generator=g).requires_grad_()
    y = torch.randn(3, 50, 3, generator=g).requires_grad_()
    _compare(lambda b, x, y: tk.chamfer_loss(x, y, batch_reduction="none", backend=b), [x, y],
             1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
def test_sinkhorn_matches_reference(backend, p, debias):
    def fn(backend, x, y):
        return tk.sinkhorn_loss(x, y, X_LEN, Y_LEN, p=p, debias=debias, batch_reduction="none",
                                backend=backend)  # fmt: skip

    _compare(fn, _ragged_pair(), 1e-10, backend)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_sinkhorn_float32(backend):
    x, y = _ragged_pair(torch.float32)
    _compare(lambda b, x, y: tk.sinkhorn_loss(x, y, X_LEN, Y_LEN, blur=0.1, batch_reduction="sum",
                                              backend=b), [x, y], 1e-4, backend)  # fmt: skip


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_sinkhorn_ragged_equals_each_set_alone(backend):
    x, y = _ragged_pair()
    values = tk.sinkhorn_loss(x, y, X_LEN, Y_LEN, batch_reduction="none", diameter=6.0,
                              backend=backend)  # fmt: skip
    for b in range(4):
        alone = tk.sinkhorn_loss(x[b : b + 1, : X_LEN[b]], y[b : b + 1, : Y_LEN[b]],
                                 diameter=6.0, backend=backend)  # fmt: skip
        assert_close_scaled(values[b], alone, 1e-12)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("blur", [0.05, 0.3])
def test_sinkhorn_matches_geomloss(backend, blur):
    """Equal-size sets, the same parameters: geomloss's value and gradient within 1e-4."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 30, 3, generator=g).requires_grad_()
    y = (torch.randn(3, 25, 3, generator=g) + 0.5).requires_grad_()
    ours = tk.sinkhorn_loss(x, y, blur=blur, batch_reduction="none", backend=backend)
    peer = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.5, backend="online")(x, y)
    torch.testing.assert_close(ours, peer, rtol=1e-4, atol=0)
    w = torch.tensor([1.0, -2.0, 0.5])
    for got, want in zip(torch.autograd.grad((ours * w).sum(), (x, y)),
                         torch.autograd.grad((peer * w).sum(), (x, y)), strict=True):  # fmt: skip
        assert_close_scaled(got, want, 1e-4)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_tends_to_exact_ot(backend, p):
    """As blur -> 0 with slower annealing, the divergence approaches W1 (p=1) or W2^2/2 (p=2)
    from POT's exact solver: within 0.5% with ~800 annealing steps (the error left is the
    annealing's, one iteration per scale as in geomloss; the reference test shows 6e-5 at
    blur 1e-3, scaling 0.999)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, 3, dtype=F64, generator=g)
    y = torch.randn(1, 17, 3, dtype=F64, generator=g)
    dist = torch.cdist(x[0], y[0])
    cost = (dist if p == 1 else dist**2 / 2).numpy()
    exact = ot.emd2(np.full(12, 1 / 12), np.full(17, 1 / 17), cost)
    errors = [
        abs(tk.sinkhorn_loss(x, y, p=p, blur=blur, scaling=scaling, backend=backend).item()
            - exact) / exact
        for blur, scaling in [(0.1, 0.5), (1e-3, 0.99)]
    ]  # fmt: skip
    assert errors[1] < min(5e-3, errors[0] / 5), errors


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_sinkhorn_identical_and_collapsed_clouds_give_zero(backend):
    x = torch.randn(2, 6, 3, dtype=F64)
    assert (tk.sinkhorn_loss(x, x.clone(), batch_reduction="none", backend=backend) == 0).all()
    point = torch.ones(1, 4, 3, dtype=F64)  # zero diameter
    assert tk.sinkhorn_loss(point, point.clone(), backend=backend).item() == 0.0


def test_native_sinkhorn_large_sets_match_reference_and_do_not_depend_on_threads():
    """Few large sets: the native loop runs its softmins in parallel over rows; sets of
    different sizes; the value and gradient equal the reference's and are the same on 1
    thread."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 300, 3, generator=g).requires_grad_()
    y = torch.randn(2, 200, 3, generator=g).requires_grad_()
    x_len, y_len = torch.tensor([300, 171]), torch.tensor([133, 200])
    _compare(lambda b, x, y: tk.sinkhorn_loss(x, y, x_len, y_len, batch_reduction="none",
                                              backend=b), [x, y], 1e-4, "native")  # fmt: skip
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (threads, 1):
            torch.set_num_threads(num_threads)
            value = tk.sinkhorn_loss(x, y, x_len, y_len, backend="native")
            results.append([value, *torch.autograd.grad(value, (x, y))])
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


PENALTY_LEN = torch.tensor([9, 1, 0, 2, 5])


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("repulsion_penalty", {"min_dist": 1.3}),
        ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 2}),
        ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 0}),
        ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 6}),
    ],
    ids=["repulsion", "valency2", "valency0", "valency6"],
)
def test_penalties_keops_match_reference(name, kwargs):
    """Sets of 9, 1, 0, 2 and 5 points: no neighbour, fewer neighbours than max_valency,
    and coincident points (a zero distance, whose gradient is 0)."""
    x = (padded_sets(5, 9, 3, PENALTY_LEN, seed=6) * 0.8).requires_grad_()
    with torch.no_grad():
        x[0, 4] = x[0, 3]  # two coincident points
    op = getattr(tk, name)
    _compare(lambda backend, x: op(x, PENALTY_LEN, backend=backend, **kwargs), [x], 1e-12)


def test_penalties_keops_float32():
    x = (padded_sets(5, 9, 3, PENALTY_LEN, seed=7) * 0.8).float().requires_grad_()
    for op in (tk.repulsion_penalty, tk.valency_penalty):
        _compare(lambda backend, x, op=op: op(x, PENALTY_LEN, backend=backend), [x], 1e-5)


def test_auto_runs_the_reference_on_small_problems_and_keops_on_large(monkeypatch):
    calls = []
    real = keops_chamfer.chamfer_loss
    monkeypatch.setattr(
        keops_chamfer, "chamfer_loss", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    small, large = torch.randn(4, 20, 3), torch.randn(2, 400, 3)
    tk.chamfer_loss(small, small)
    assert calls == []
    tk.chamfer_loss(large, large)
    assert calls == [1]
    tk.chamfer_loss(small.requires_grad_(), small)  # a backward follows: KeOps is faster
    assert calls == [1, 1]


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
    env = {k: v for k, v in __import__("os").environ.items() if "KEOPS_VERBOSE" not in k}
    env["KEOPS_CACHE_FOLDER"] = str(tmp_path)
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=600)  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and "KeOps" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, "KEOPS_VERBOSE": "1"}, timeout=600)  # fmt: skip
    assert loud.returncode == 0 and "KeOps" in loud.stdout


def test_native_sinkhorn_portable_build_matches_reference():
    """The portable build of the softmin (machines without AVX2), forced on this one."""
    script = textwrap.dedent(
        """
        import torch, topn_kernels as tk
        from topn_kernels import reference
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 21, 3, dtype=torch.float64, generator=g).requires_grad_()
        y = torch.randn(3, 13, 3, dtype=torch.float64, generator=g).requires_grad_()
        for p in (1, 2):
            ours = tk.sinkhorn_loss(x, y, p=p, batch_reduction="sum", backend="native")
            ref = reference.sinkhorn_loss(x, y, p=p, batch_reduction="sum")
            gx, gr = torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0]
            assert abs(ours.item() - ref.item()) <= 1e-12 * abs(ref.item()), (ours, ref)
            assert (gx - gr).abs().max() <= 1e-10 * gr.abs().max()
        print("ok")
        """
    )
    env = {**__import__("os").environ, "TOPN_KERNELS_PORTABLE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
