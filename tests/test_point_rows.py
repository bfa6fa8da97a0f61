"""The per-point loops of the native layers (csrc/cpu/point_rows.h): the transformer layer's
layer norm, ReLU backward and bias sums, and the blocks' and stems' batch norm, forward and
backward, through their test ops (``torch.ops.topn_kernels.point_layer_norm``,
``point_batch_norm``, their backwards, ``point_relu_backward_sum``, ``point_column_sums``):
against ATen's formulas in float64, the same bits at any thread count and in both builds of the
loops (portable and AVX2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("topn_kernels.native.set_transformer")
OPS = torch.ops.topn_kernels
F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]

# (M, C): one row; tails of every kind (C below a vector, not a multiple of 16 or of 8); a
# chunk and a bit; many chunks split between the threads
SHAPES = [(1, 3), (2, 12), (17, 20), (33, 16), (300, 67), (1000, 64)]


def _inputs(M, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, C, generator=g, dtype=F64) * 3 + 1).to(dtype)
    w, b = (torch.randn(C, generator=g, dtype=F64).to(dtype) for _ in range(2))
    up = torch.randn(M, C, generator=g, dtype=F64).to(dtype)
    return x, w, b, up


def _tol(dtype, ref):
    scale = float(ref.detach().abs().max()) if ref.numel() else 1.0
    if dtype == F64:
        return {"atol": 1e-12 * max(scale, 1.0), "rtol": 1e-10}
    return {"atol": 2e-6 * max(scale, 1.0), "rtol": 1e-4}


def _layer_norm_all(x, w, b, up):
    out, mean, rstd = OPS.point_layer_norm(x, w, b, 1e-5)
    return [out, mean, rstd, *OPS.point_layer_norm_backward(up, x, mean, rstd, w)]


def _batch_norm_all(x, w, b, up):
    running = [torch.zeros_like(w), torch.ones_like(w)]
    out, mean, invstd = OPS.point_batch_norm(x, w, b, *running, 0.1, 1e-5)
    return [out, mean, invstd, *running, *OPS.point_batch_norm_backward(up, x, w, mean, invstd)]


def _relu_inputs(M, C, dtype, seed=0):
    """A ReLU's output u (M, C) with zeros, negative zeros and NaNs in every column, the tail
    columns too, and an upstream gradient."""
    x, _, _, up = _inputs(M, C, dtype, seed)
    u = x.clamp_min(0)
    u[::3] = 0.0
    u[1::5] = -0.0
    u[2::7] = float("nan")
    return up, u


def _relu_sums_all(up, u):
    return [*OPS.point_relu_backward_sum(up, u), OPS.point_column_sums(up)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("M", "C"), SHAPES)
def test_relu_backward_and_column_sums_match_aten(M, C, dtype):
    """ReLU's backward (threshold_backward's rule: 0 where u <= 0, NaN u keeps the gradient)
    with its column sums, and plain column sums."""
    up, u = _relu_inputs(M, C, dtype)
    masked, sums, column = _relu_sums_all(up, u)
    want = torch.ops.aten.threshold_backward(up, u, 0)
    assert torch.equal(masked, want)
    for got, exact in ((sums, want.to(F64).sum(0)), (column, up.to(F64).sum(0))):
        assert got.dtype == dtype and got.shape == (C,)
        torch.testing.assert_close(got.to(F64), exact, **_tol(dtype, exact))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("M", "C"), SHAPES)
def test_layer_norm_matches_aten_in_float64(M, C, dtype):
    x, w, b, up = _inputs(M, C, dtype)
    got = _layer_norm_all(x, w, b, up)
    x64, w64, b64 = (t.to(F64).requires_grad_() for t in (x, w, b))
    out, mean, rstd = torch.native_layer_norm(x64, [C], w64, b64, 1e-5)
    gx, gw, gb = torch.autograd.grad(out, [x64, w64, b64], up.to(F64))
    want = [out, mean, rstd, gx, gw, gb, gx.sum(0)]
    names = ["out", "mean", "rstd", "grad_x", "grad_w", "grad_b", "grad_x sums"]
    for name, a, e in zip(names, got, want, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.to(F64), e.detach(), **_tol(dtype, e), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("M", "C"), [s for s in SHAPES if s[0] >= 2])
def test_batch_norm_matches_aten_in_float64(M, C, dtype):
    x, w, b, up = _inputs(M, C, dtype)
    got = _batch_norm_all(x, w, b, up)
    x64, w64, b64 = (t.to(F64).requires_grad_() for t in (x, w, b))
    running = [torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)]
    out, mean, invstd = torch.native_batch_norm(x64, w64, b64, *running, True, 0.1, 1e-5)
    gx, gw, gb = torch.autograd.grad(out, [x64, w64, b64], up.to(F64))
    want = [out, mean, invstd, *running, gx, gw, gb]
    names = ["out", "mean", "invstd", "running_mean", "running_var", "grad_x", "grad_w", "grad_b"]
    for name, a, e in zip(names, got, want, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.to(F64), e.detach(), **_tol(dtype, e), msg=name)


def test_backwards_take_atens_saved_statistics():
    """Either forward's saved statistics work with either backward (the native layers fall
    back to ATen's for inputs the loops do not take)."""
    x, w, b, up = _inputs(300, 67, F64)
    _, mean, rstd = torch.native_layer_norm(x, [67], w, b, 1e-5)
    want = torch.ops.aten.native_layer_norm_backward(up, x, [67], mean, rstd, w, b, [True] * 3)
    got = OPS.point_layer_norm_backward(up, x, mean, rstd, w)
    for a, e in zip(got, want, strict=False):
        torch.testing.assert_close(a, e, **_tol(F64, e))
    running = [torch.zeros(67, dtype=F64), torch.ones(67, dtype=F64)]
    _, mean, invstd = torch.native_batch_norm(x, w, b, *running, True, 0.1, 1e-5)
    want = torch.ops.aten.native_batch_norm_backward(
        up, x, w, *running, mean, invstd, True, 1e-5, [True] * 3
    )
    got = OPS.point_batch_norm_backward(up, x, w, mean, invstd)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, **_tol(F64, e))


def _relu_sums_of(x, w, b, up):
    return _relu_sums_all(*_relu_inputs(*x.shape, x.dtype))


@pytest.mark.parametrize("norm", [_layer_norm_all, _batch_norm_all, _relu_sums_of])
def test_results_do_not_depend_on_the_thread_count(norm):
    inputs = _inputs(1000, 67, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(norm(*inputs))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_inputs_the_loops_cannot_take_are_refused():
    x, w, b, _ = _inputs(8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.point_layer_norm(x.t(), w[:8], b[:8], 1e-5)
    with pytest.raises(RuntimeError, match="w must have shape"):
        OPS.point_layer_norm(x, w[:3], b, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        OPS.point_layer_norm(x.half(), w.half(), b.half(), 1e-5)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        OPS.point_batch_norm(x[:1], w, b, torch.zeros(16), torch.ones(16), 0.1, 1e-5)


def _has_avx2_and_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not _has_avx2_and_fma(), reason="one build only: no AVX2 and FMA here")
def test_every_cpu_build_gives_the_same_bits(tmp_path):
    """The portable build (TOPN_KERNELS_PORTABLE=1) against the AVX2 one, in a fresh
    interpreter: every sum in the same order, so the same bits."""
    script = textwrap.dedent(
        """
        import sys, torch
        import topn_kernels.native.set_transformer
        from tests import test_point_rows as t
        out = []
        for M, C in t.SHAPES:
            for dtype in (torch.float32, torch.float64):
                out += t._layer_norm_all(*t._inputs(M, C, dtype))
                out += t._relu_sums_all(*t._relu_inputs(M, C, dtype))
                if M >= 2:
                    out += t._batch_norm_all(*t._inputs(M, C, dtype))
        torch.save(out, sys.argv[1])
        """
    )
    results = []
    for portable in ("0", "1"):
        path = tmp_path / f"build_{portable}.pt"
        env = dict(os.environ, TOPN_KERNELS_PORTABLE=portable)
        run = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
