"""What only the Triton ``topn_create`` backend has (docs/operators.md, "Backends and dispatch"
and "Determinism, torch.compile and custom ops"): when it can run, its backward's two paths
(deterministic sorted segments, and atomics), its chunked selection for large reference sets,
buffers it must fully write, and its kernels compiled for a GPU.

Its equivalence with the reference, opcheck and torch.compile, shared with the other backends,
are in test_topn_create.py. On a machine without CUDA everything here runs in Triton's
interpreter on CPU tensors (tests/conftest.py), except the tests marked ``gpu``;
bench/gpu_check.sh runs those on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import topn_kernels as tk
from topn_kernels import TopNOutput, reference
from topn_kernels import triton as triton_backend
from topn_kernels.ops import topn_create_op
from topn_kernels.triton import topn_create_launch

from .helpers import (
    CUDA,
    assert_close_scaled,
    assert_topn_matches_reference,
    assert_valid_selection,
    device_for,
    needs_gpu,
    random_sizes,
    run_topn,
    topn_grads,
    topn_inputs,
)

DEVICE = device_for("triton")
ROOT = Path(__file__).resolve().parents[1]


def _inputs(*shape, dtype=torch.float32, requires_grad=True):
    """topn_inputs on DEVICE, with ties."""
    tensors = topn_inputs(*shape, dtype=dtype, ties=True)
    return [t.to(DEVICE).requires_grad_(requires_grad) for t in tensors]


def _assert_matches_reference(inputs, n, **kwargs):
    return assert_topn_matches_reference("triton", inputs, n, rtol=1e-5, grad_rtol=1e-4, **kwargs)


def _spy_on_sorted_segments(monkeypatch) -> list[int]:
    """Counts the calls of the deterministic backward's segment sort (one per backward)."""
    calls = []
    sort = topn_create_launch.slots_by_point

    def spy(*args):
        calls.append(1)
        return sort(*args)

    monkeypatch.setattr(topn_create_launch, "slots_by_point", spy)
    return calls


# --- when the backend runs -------------------------------------------------------------------


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """(triton is imported already, by the imports above: it must be imported under the mode
    its kernels run in, since triton.language's own jit functions are made at import.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    error, reason = triton_backend.unavailable(torch.device("cpu"))
    assert error is ValueError and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.unavailable(torch.device("cpu")) is None
    error, _ = triton_backend.unavailable(torch.device("meta"))
    assert error is ValueError
    if CUDA:
        assert triton_backend.unavailable(torch.device("cuda")) is None
    else:
        assert triton_backend.unavailable(torch.device("cuda"))[0] is RuntimeError


def test_interpreter_must_be_on_before_triton_is_imported():
    """Triton's own helpers (tl.sum...) are made at its import: a late TRITON_INTERPRET=1 is a
    clear error, not a failure inside a kernel."""
    script = (
        "import os, torch, triton, topn_kernels as tk\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "error, reason = tk.triton.unavailable(torch.device('cpu'))\n"
        "assert error is ValueError and 'after triton was imported' in reason, reason\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_gradients_through_x_alone_and_weight_alone():
    """An output nobody uses reaches the backward as None."""
    inputs = _inputs(5, 40, 3, 6)
    n = random_sizes(5, 1, 40).to(DEVICE)

    def grads(backend, pick):
        out = tk.topn_create(*inputs[:4], n, inputs[4], backend=backend)
        return torch.autograd.grad(pick(out), inputs, allow_unused=True, materialize_grads=True)

    for pick in (lambda o: (o.x * o.x).sum(), lambda o: (o.weight * o.weight).sum()):
        for g, w in zip(grads("triton", pick), grads("reference", pick), strict=True):
            assert_close_scaled(g, w, 1e-4)


# --- backward paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_gradcheck_float64(score_norm):
    """The float64 kernels (float64 keys and arithmetic) pass gradcheck, as the reference does
    (docs/operators.md, Dtypes and precision); no ties, so that the perturbations keep the
    selection."""
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 3), (6, 3), (6, 4), (2, 4), (4, 4)]
    inputs = [
        torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for s in shapes
    ]
    n = torch.tensor([2, 5], device=DEVICE)

    def fn(query, angles, table, bias, film):
        out = tk.topn_create(
            query, angles, table, bias, n, film, score_norm=score_norm, backend="triton"
        )
        return out.x, out.weight

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_deterministic_backward(score_norm, monkeypatch):
    """With deterministic algorithms on, no atomics: the gathered gradients equal the reference
    and, run after run, each other bit for bit (on a GPU the atomics would not). The
    interpreter's atomics are in order too, so the test also checks that the sorted-segment
    path ran."""
    inputs = _inputs(16, 70, 3, 16)
    n = random_sizes(16, 2, 35).to(DEVICE)
    calls = _spy_on_sorted_segments(monkeypatch)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _assert_matches_reference(inputs, n, score_norm=score_norm)
        _, first = run_topn("triton", inputs, n, score_norm=score_norm)
        _, second = run_topn("triton", inputs, n, score_norm=score_norm)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(calls) == 3  # one per backward
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score_norm", ["selected", "all"])
@pytest.mark.parametrize(
    ("B", "n0", "n", "a", "d", "dtype"),
    [
        pytest.param(16, 70, (2, 35), 3, 16, torch.float32, id="B16-n0_70-n2..35-fp32"),
        pytest.param(9, 100, (1, 100), 5, 33, torch.float64, id="B9-n0_100-n1..100-fp64"),
    ],
)
def test_atomic_backward(monkeypatch, score_norm, B, n0, n, a, d, dtype):
    """The backward's other path, atomics into the table and angle gradients, taken whenever
    deterministic algorithms are off (the test session turns them on, tests/conftest.py): the
    gradients equal the reference's, and the sorted-segment path did not run."""
    monkeypatch.setattr(topn_create_op, "deterministic_backward", lambda: False)
    calls = _spy_on_sorted_segments(monkeypatch)
    inputs = _inputs(B, n0, a, d, dtype=dtype)
    sizes = random_sizes(B, *n, seed=B).to(DEVICE)
    rtol, grad_rtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-10)
    assert_topn_matches_reference(
        "triton", inputs, sizes, rtol=rtol, grad_rtol=grad_rtol, score_norm=score_norm
    )
    assert calls == []


def test_nan_backward_gives_nan_not_a_crash():
    inputs = _inputs(3, 20, 3, 5, requires_grad=False)
    inputs[0][1, 0] = float("nan")
    inputs = [t.requires_grad_() for t in inputs]
    out, grads = run_topn("triton", inputs, 6)
    assert out.x[1].isnan().all() and not out.x[0].isnan().any()
    assert grads[0][1].isnan().all() and not grads[0][0].isnan().any()


# --- selection paths --------------------------------------------------------------------------


@pytest.mark.parametrize(("sorted", "score_norm"), [(True, "selected"), (False, "all")])
def test_chunked_selection(monkeypatch, sorted, score_norm):
    """Reference sets larger than one block are scored in chunks at every pass (on a GPU from
    n0 > 4096); shrunk here so that n0 = 70 takes five chunks."""
    monkeypatch.setattr(topn_create_launch, "SELECT_ONE_BLOCK_MAX", 16)
    monkeypatch.setattr(topn_create_launch, "SELECT_CHUNK", 16)
    inputs = _inputs(3, 70, 3, 8)
    n = torch.tensor([1, 35, 70], device=DEVICE)
    _assert_matches_reference(inputs, n, sorted=sorted, score_norm=score_norm)


def test_every_output_element_is_written(monkeypatch):
    """Fresh buffers are poisoned (NaN, True, a large integer): a kernel that forgets an
    element (padding included) fails here."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else 77)

    inputs = _inputs(5, 37, 3, 6)
    n = torch.tensor([1, 37, 3, 9, 20], device=DEVICE)
    monkeypatch.setattr(torch, "empty", poisoned)
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, torch.finfo(torch.bfloat16).eps)):
        cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
        for sorted, score_norm in ((True, "all"), (False, "selected")):
            kwargs = {"n_max": 40, "sorted": sorted, "score_norm": score_norm}
            out = assert_topn_matches_reference("triton", cast, n, rtol=rtol, **kwargs)
            _, grads = run_topn("triton", cast, n, **kwargs)
            assert not any(t.isnan().any() for t in (out.x, out.weight, *grads))


# --- the GPU build ----------------------------------------------------------------------------


@pytest.mark.slow  # minutes from a cold Triton cache
@pytest.mark.skipif(CUDA, reason="on a GPU the kernels compile for real in the other tests")
def test_kernels_compile_for_hopper():
    """Every kernel the host code launches for a GPU compiles for sm_90 (Triton's compiler and
    ptxas run on the CPU, tests/triton_aot.py); the forward keeps the reference's rounding (no
    fused multiply-add, no approximate division or square root) and nothing spills much."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["kernel"] for r in rows} == {
        "normalize_angles_kernel",
        "select_kernel",
        "film_kernel",
        "set_backward_kernel",
        "point_gather_kernel",
        "angles_finish_kernel",
    }
    for r in rows:
        assert r["spill_bytes"] <= 64, r
        if not r["fp_fusion"]:
            assert r["approx_div_sqrt"] == 0, r
            # float64 exp (libdevice) is written with fma: only the float32 select has none
            if not (r["kernel"] == "select_kernel" and r["constexprs"]["IS_F64"]):
                assert r["fma"] == 0, r


def test_check_targets_reads_benchmark_rows():
    """bench/gpu_check.sh judges the Triton kernels' GPU targets with
    bench.topn_create.check_targets."""
    from bench.topn_create import check_targets

    def row(shape, direction, provider, ms, pct=None):
        return {
            "op": "topn_create",
            "shape": shape,
            "direction": direction,
            "provider": provider,
            "ms": ms,
            "pct_peak": pct,
        }

    rows = [
        row("paper", "fwd", "compile", 3.0),
        row("paper", "fwd", "triton", 0.5),
        row("paper", "fwd+bwd", "compile", 2.0),
        row("paper", "fwd+bwd", "triton", 1.5),
        row("target", "fwd", "triton", 1.0, pct=85.0),
    ]
    got = {
        (t["target"].split()[0], t["shape"]): (t["measured"], t["met"]) for t in check_targets(rows)
    }
    assert got[("fwd", "target")] == (85.0, True)
    assert got[("fwd", "target_bf16")] == (None, False)
    assert got[("fwd", "paper")] == (6.0, True)
    assert got[("fwd+bwd", "paper")] == (pytest.approx(4 / 3), False)
    assert got[("fwd+bwd", "large_batch")] == (None, False)


def test_gpu_check_fails_cleanly_without_a_gpu(tmp_path):
    if CUDA:
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no CUDA GPU" in result.stdout + result.stderr
    assert (tmp_path / "gpu_check.json").exists()


# --- GPU only: low precision against PyTorch's own error ----------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_is_that_of_pytorch(dtype):
    """Against the float32 reference, the kernel's error is at most about that of plain
    PyTorch (the reference) run in the same low precision."""
    # inputs that the low precision holds exactly: one ranking for all three runs
    inputs = [t.detach().to(dtype).float().requires_grad_() for t in _inputs(1024, 1024, 8, 256)]
    n = random_sizes(1024, 1, 256).to(DEVICE)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, grads = run_topn("triton", low, n)
    assert_valid_selection(out.index, n, low[0], low[1], sorted=True)
    want = reference.topn_create_at(*inputs[:4], out.index, inputs[4])
    want_grads = topn_grads(want, inputs)
    plain = reference.topn_create_at(*low[:4], out.index, low[4])
    plain_grads = topn_grads(plain, low)
    want, plain = TopNOutput(*want), TopNOutput(*plain)

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    cases = [(out.x, plain.x, want.x), (out.weight, plain.weight, want.weight)]
    cases += zip(grads, plain_grads, want_grads, strict=True)
    for got, base, ref in cases:
        assert err(got, ref) <= 2 * err(base, ref) + 1e-6
