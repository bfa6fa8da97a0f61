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


def _force_paths(monkeypatch, **choice) -> None:
    """Forces Triton paths for the rest of the test (topn_create_launch.paths)."""
    monkeypatch.setattr(topn_create_launch, "_forced", {**topn_create_launch._forced, **choice})


def _count_launches(monkeypatch) -> list[str]:
    """The names of the kernels launched from now on, in order."""
    names = []
    launch = topn_create_launch.Launch.__call__

    def spy(self, kernel, *args):
        names.append(kernel.fn.__name__)
        return launch(self, kernel, *args)

    monkeypatch.setattr(topn_create_launch.Launch, "__call__", spy)
    return names


# --- when the backend runs -------------------------------------------------------------------


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """(triton is imported already, by the imports above: it must be imported under the mode
    its kernels run in, since triton.language's own jit functions are made at import. Where
    there is a GPU it was imported compiled, so a TRITON_INTERPRET=1 set now comes too late.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    error, reason = triton_backend.unavailable(torch.device("cpu"))
    assert error is ValueError and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_backend._triton_interprets():
        assert triton_backend.unavailable(torch.device("cpu")) is None
    else:
        error, reason = triton_backend.unavailable(torch.device("cpu"))
        assert error is ValueError and "after triton was imported" in reason
    error, _ = triton_backend.unavailable(torch.device("meta"))
    assert error is ValueError
    if CUDA:
        assert triton_backend.unavailable(torch.device("cuda")) is None
    else:
        assert triton_backend.unavailable(torch.device("cuda"))[0] is RuntimeError


def test_kernels_launch_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: the forward and the backward make it the
    inputs' device (cuda:1 inputs while cuda:0 is current must not run on cuda:0)."""
    guard = topn_create_launch.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(topn_create_launch.on_device(torch.device("cpu")), torch.cuda.device)
    devices = []
    on_device = topn_create_launch.on_device
    monkeypatch.setattr(
        topn_create_launch, "on_device", lambda device: devices.append(device) or on_device(device)
    )
    run_topn("triton", _inputs(2, 8, 3, 4), 3)
    inputs_device = torch.empty(0, device=DEVICE).device  # cuda:0 where DEVICE says cuda
    assert devices == [inputs_device, inputs_device]  # forward, backward


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


@pytest.mark.parametrize("backward", ["split", "single"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_gradcheck_float64(score_norm, backward):
    """The float64 kernels (float64 keys and arithmetic) pass gradcheck, as the reference does
    (docs/operators.md, Dtypes and precision), on both backward paths; no ties, so that the
    perturbations keep the selection."""
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

    with topn_create_launch.paths(backward=backward):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_deterministic_backward(score_norm, monkeypatch):
    """With deterministic algorithms on, no atomics: the gathered gradients equal the reference
    and, run after run, each other bit for bit (on a GPU the atomics would not). The
    interpreter's atomics are in order too, so the test also checks that the sorted-segment
    path ran (of the split backward: the single one has no atomics to avoid)."""
    inputs = _inputs(16, 70, 3, 16)
    n = random_sizes(16, 2, 35).to(DEVICE)
    calls = _spy_on_sorted_segments(monkeypatch)
    _force_paths(monkeypatch, backward="split")
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
    _force_paths(monkeypatch, backward="split")
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


@pytest.mark.parametrize("forward", ["split", "fused", "single"])
@pytest.mark.parametrize(("sorted", "score_norm"), [(True, "selected"), (False, "all")])
def test_chunked_selection(monkeypatch, sorted, score_norm, forward):
    """Reference sets larger than one block are scored in chunks at every pass (on a GPU from
    n0 > 4096), by the radix selection of every writer; shrunk here so that n0 = 70 takes five
    chunks. (A forced sort falls back to radix there.)"""
    monkeypatch.setattr(topn_create_launch, "SELECT_ONE_BLOCK_MAX", 16)
    monkeypatch.setattr(topn_create_launch, "SELECT_CHUNK", 16)
    _force_paths(monkeypatch, select="sort", forward=forward)
    inputs = _inputs(3, 70, 3, 8)
    n = torch.tensor([1, 35, 70], device=DEVICE)
    _assert_matches_reference(inputs, n, sorted=sorted, score_norm=score_norm)


@pytest.mark.parametrize(
    ("select", "forward", "backward"),
    [("radix", "split", "split"), ("sort", "fused", "single"), ("radix", "single", "single")],
)
def test_every_output_element_is_written(monkeypatch, select, forward, backward):
    """Fresh buffers are poisoned (NaN, True, a large integer): a kernel that forgets an
    element (padding included) fails here, on every writer and backward."""
    _force_paths(monkeypatch, select=select, forward=forward, backward=backward)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else 77)

    inputs = _inputs(5, 37, 3, 6)
    n = torch.tensor([1, 37, 3, 9, 20], device=DEVICE)
    monkeypatch.setattr(torch, "empty", poisoned)
    cases = [(torch.float32, 1e-4, True, "all"), (torch.bfloat16, 2**-7, False, "selected")]
    for dtype, rtol, sorted, score_norm in cases:
        cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out, grads = run_topn("triton", cast, n, n_max=40, sorted=sorted, score_norm=score_norm)
        assert not any(t.isnan().any() for t in (out.x, out.weight, *grads))
        assert (out.index[~out.mask] == -1).all() and torch.equal(out.mask.sum(1), n)
        assert_valid_selection(out.index, n, cast[0], cast[1], sorted=sorted)
        at = reference.topn_create_at(*cast[:4], out.index, cast[4], score_norm=score_norm)
        wanted = (at[0], at[3], *topn_grads(at, cast))
        for got, want in zip((out.x, out.weight, *grads), wanted, strict=True):
            assert_close_scaled(got, want, rtol)


# --- paths: selection method, writer, backward ---------------------------------------------------

PATHS = [
    pytest.param(select, forward, backward, id=f"{select}-{forward}-{backward}")
    for select, forward, backward in [
        ("radix", "split", "split"),
        ("radix", "fused", "single"),
        ("radix", "single", "split"),
        ("sort", "split", "single"),
        ("sort", "fused", "split"),
        ("sort", "single", "single"),
    ]
]


@pytest.mark.parametrize(("select", "forward", "backward"), PATHS)
def test_every_path_matches_the_reference(monkeypatch, select, forward, backward):
    """Each selection method, writer and backward against the reference, tie-aware: exact
    ties (duplicated angle rows), ragged sizes with padding past n0, n as a tensor and as an
    int, both orders and both score norms, values and gradients."""
    _force_paths(monkeypatch, select=select, forward=forward, backward=backward)
    inputs = _inputs(5, 24, 3, 6)
    n = torch.tensor([1, 24, 7, 13, 2], device=DEVICE)
    for sorted, score_norm in ((True, "selected"), (False, "all")):
        kwargs = {"sorted": sorted, "score_norm": score_norm}
        _assert_matches_reference(inputs, n, n_max=26, **kwargs)
    _assert_matches_reference(inputs, 9, sorted=False, score_norm="selected")
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs]
    ulp = torch.finfo(torch.bfloat16).eps
    assert_topn_matches_reference("triton", low, n, rtol=ulp, score_norm="all")


def test_paths_select_the_same_points_bit_for_bit(monkeypatch):
    """Every selection method and writer computes the scores with the same operations, so all
    select exactly the same points in the same order, ties included (no tolerance), and the
    writers of one method write the same bits."""
    inputs = _inputs(6, 30, 3, 5, requires_grad=False)
    inputs[1][4] = float("nan")  # ranks first everywhere
    inputs[0][2] = 0.0  # a zero query: every score 0, ranked by index
    n = torch.tensor([3, 30, 11, 1, 17, 29], device=DEVICE)
    outs = {}
    for select in ("radix", "sort"):
        for forward in ("split", "fused", "single"):
            _force_paths(monkeypatch, select=select, forward=forward)
            for sorted in (True, False):
                out = tk.topn_create(*inputs[:4], n, inputs[4], sorted=sorted, backend="triton")
                outs[select, forward, sorted] = out
    for sorted in (True, False):
        first = outs["radix", "split", sorted]
        assert_valid_selection(first.index, n, inputs[0], inputs[1], sorted=sorted)
        if sorted:
            assert (first.index[:, 0] == 4).all()  # NaN first, also against a zero query
            assert first.index[2, :11].tolist() == [4, *range(4), *range(5, 11)]  # all 0
        else:
            assert first.index[2, :11].tolist() == list(range(11))
        for select in ("radix", "sort"):
            for forward in ("split", "fused", "single"):
                out = outs[select, forward, sorted]
                assert torch.equal(out.index, first.index), (select, forward, sorted)
                assert torch.equal(out.mask, first.mask)
                same = outs[select, "split", sorted]
                for got, want in ((out.x, same.x), (out.weight, same.weight)):
                    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("select", ["radix", "sort"])
def test_ties_break_by_index_in_every_method(monkeypatch, select):
    """Scores exactly equal: the smaller index first, whatever the method (the sort's packed
    keys carry 2^32 - 1 - index in their low word)."""
    _force_paths(monkeypatch, select=select)
    query, angles, table, bias, film = topn_inputs(2, 20, 3, 4)
    angles[:] = angles[0]
    angles[[5, 11]] = 2 * angles[0]  # the same direction: the same score, exactly
    inputs = [t.to(DEVICE) for t in (query, angles, table, bias, film)]
    for sorted in (True, False):
        out = tk.topn_create(*inputs[:4], 7, inputs[4], sorted=sorted, backend="triton")
        assert out.index.tolist() == [list(range(7))] * 2


def test_an_int_n_is_a_kernel_argument(monkeypatch):
    """An int n reaches the kernels as an integer: the op gets an empty n and n_fixed, and the
    results are those of the same sizes as a tensor, bit for bit."""
    inputs = _inputs(4, 20, 3, 5)
    calls = []
    op = topn_create_op.topn_create

    def spy(*args):
        calls.append((args[4].shape, args[10]))
        return op(*args)

    monkeypatch.setattr(sys.modules["topn_kernels.ops.topn_create"], "topn_create_op", spy)
    for forward in ("split", "single"):
        _force_paths(monkeypatch, forward=forward)
        fixed, grads_fixed = run_topn("triton", inputs, 6)
        tensor, grads_tensor = run_topn("triton", inputs, torch.full((4,), 6, device=DEVICE))
        assert calls[-2:] == [(torch.Size([0]), 6), (torch.Size([4]), -1)]
        for got, want in zip((*fixed, *grads_fixed), (*tensor, *grads_tensor), strict=True):
            assert torch.equal(got, want)


@pytest.mark.slow  # torch.compile
def test_compiled_with_an_int_n_without_graph_break():
    """torch.compile(fullgraph=True) traces the op with n_fixed, for two values of n (an int
    that changes may become a symbolic one): values and gradients equal eager."""
    inputs = _inputs(4, 20, 3, 5)

    def fn(query, angles, table, bias, film, n):
        out = tk.topn_create(query, angles, table, bias, n, film, n_max=9, backend="triton")
        return out.x, out.weight

    compiled = torch.compile(fn, fullgraph=True)
    for n in (6, 8):
        got, want = compiled(*inputs, n), fn(*inputs, n)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
        grads = torch.autograd.grad(got[0].sum() + got[1].sum(), inputs)
        wanted = torch.autograd.grad(want[0].sum() + want[1].sum(), inputs)
        for g, w in zip(grads, wanted, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_opcheck_with_n_fixed(score_norm):
    """The op and its backward with n_fixed (n empty): schema, fake kernels, autograd."""
    inputs = _inputs(4, 20, 3, 5)
    n = torch.empty((0,), dtype=torch.int64, device=DEVICE)
    args = (*inputs[:4], n, inputs[4], 8, score_norm, True, "triton", 6)
    torch.library.opcheck(torch.ops.topn_kernels.topn_create.default, args)
    out = topn_create_op.topn_create(*args)
    g = torch.Generator().manual_seed(0)
    grad_x, grad_w = torch.randn(4, 8, 5, generator=g), torch.randn(4, 8, generator=g)
    plain = [t.detach() for t in inputs]  # the backward op has no backward of its own
    args = (grad_x.to(DEVICE), grad_w.to(DEVICE), *plain[:4], n, plain[4], out[2], score_norm)
    args = (*args, [True] * 5, True, "triton", 6)
    torch.library.opcheck(torch.ops.topn_kernels.topn_create_backward.default, args)


def test_single_paths_launch_one_kernel_forward_and_two_backward(monkeypatch):
    """The small-shape paths: the forward is one launch (normalisation, scores, selection,
    weights and FiLM in one program per set), the backward two (no normalisation launch, no
    zeroing, the film gradient reduced in-kernel); the split ones take more."""
    names = _count_launches(monkeypatch)
    inputs = _inputs(4, 20, 3, 5)
    _force_paths(monkeypatch, forward="single", backward="single")
    out = tk.topn_create(*inputs[:4], 6, inputs[4], backend="triton")
    assert names == ["fused_kernel"]
    torch.autograd.grad(out.x.sum() + out.weight.sum(), inputs)
    assert names[1:] == ["set_backward_kernel", "point_dense_kernel"]
    names.clear()
    _force_paths(monkeypatch, forward="split", backward="split")
    out = tk.topn_create(*inputs[:4], 6, inputs[4], backend="triton")
    assert names == ["normalize_angles_kernel", "select_kernel", "film_kernel"]
    _force_paths(monkeypatch, forward="fused")
    names.clear()
    tk.topn_create(*inputs[:4], 6, inputs[4], backend="triton")
    assert names == ["normalize_angles_kernel", "fused_kernel"]


def test_paths_auto_and_forced(monkeypatch):
    """What "auto" picks by shape, and the choices forced by TOPN_KERNELS_TRITON_PATHS and by
    the paths context manager (which wins); a choice that does not apply falls back."""
    L = topn_create_launch
    cuda = torch.device("cuda")
    monkeypatch.setattr(L, "_sm_count", lambda device: 132)
    monkeypatch.delenv(L.PATHS_VAR, raising=False)
    assert L.resolve_paths(512, 70, 35, False, cuda, False) == L.Paths(True, "single", "single")
    assert L.resolve_paths(4096, 1024, 256, False, cuda, False) == L.Paths(True, "fused", "split")
    assert L.resolve_paths(32, 4096, 2048, False, cuda, False) == L.Paths(True, "split", "split")
    assert not L.resolve_paths(32, 4097, 2048, False, cuda, False).use_sort  # chunks: radix
    assert not L.resolve_paths(512, 70, 35, True, cuda, False).use_sort  # float64: radix
    assert not L.resolve_paths(512, 70, 35, False, cuda, True).use_sort  # the interpreter
    monkeypatch.setenv(L.PATHS_VAR, "select=sort, forward=split,backward=split")
    assert L.resolve_paths(512, 70, 35, False, cuda, True) == L.Paths(True, "split", "split")
    assert not L.resolve_paths(512, 70, 35, True, cuda, True).use_sort  # no sort in float64
    with L.paths(forward="fused"):
        assert L.resolve_paths(512, 70, 35, False, cuda, True) == L.Paths(True, "fused", "split")
    assert L.resolve_paths(512, 70, 35, False, cuda, True).forward == "split"
    monkeypatch.setenv(L.PATHS_VAR, "select=bitonic")
    with pytest.raises(ValueError, match=L.PATHS_VAR):
        L.resolve_paths(512, 70, 35, False, cuda, True)
    with pytest.raises(ValueError, match="writer"), L.paths(writer="fused"):
        pass


# --- the GPU check ------------------------------------------------------------------------------


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
        row("paper", "fwd", "compile_ro", 1.0),
        row("paper", "fwd", "triton", 0.5),
        row("paper", "fwd+bwd", "compile", 2.0),
        row("paper", "fwd+bwd", "triton", 1.5),
        row("target", "fwd", "triton", 1.0, pct=85.0),
    ]
    got = {(t["target"], t["shape"]): (t["measured"], t["met"]) for t in check_targets(rows)}
    compiled, ro = "torch.compile(reference)", 'torch.compile(reference, mode="reduce-overhead")'
    assert got[("fwd >= 80% of copy bandwidth", "target")] == (85.0, True)
    assert got[("fwd >= 80% of copy bandwidth", "target_bf16")] == (None, False)
    assert got[(f"fwd >= 3x {compiled}", "paper")] == (6.0, True)
    assert got[(f"fwd+bwd >= 2x {compiled}", "paper")] == (pytest.approx(4 / 3), False)
    assert got[(f"fwd+bwd >= 2x {compiled}", "large_batch")] == (None, False)
    assert got[(f"fwd >= 3x {ro}", "paper")] == (2.0, False)
    assert got[(f"fwd+bwd >= 2x {ro}", "paper")] == (None, False)
    assert got[(f"fwd+bwd >= 2x {compiled}", "paper_n35")] == (None, False)
    assert len(got) == 9


def test_bandwidth_counts_what_must_reach_memory():
    """bench.topn_create.forward_bytes: every output element once; the table once, however
    many slots gather its rows (they come from L2); bias and the sizes once."""
    from dataclasses import replace

    from bench.topn_create import TARGET, Shape, forward_bytes

    b, n0, n, a, d = 4096, 1024, 256, 8, 256
    outputs = b * n * (4 * d + 1 + 8 + 4)  # x, mask, index, weight
    inputs = 4 * (n0 * (d + a) + b * (a + d) + 4 * d)
    assert forward_bytes(TARGET, 4) == outputs + inputs
    twice = replace(TARGET, n0=2 * n0)  # a larger table, as many slots: one more table
    assert forward_bytes(twice, 4) - forward_bytes(TARGET, 4) == 4 * n0 * (d + a)
    ragged = Shape("ragged", b, n0, (1, n), a, d)  # n_max = n, and n read once
    assert forward_bytes(ragged, 2) - forward_bytes(TARGET, 2) == 8 * b
    assert forward_bytes(TARGET, 2) == b * n * (2 * d + 1 + 8 + 2) + inputs // 2  # bfloat16


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


# --- GPU only: every path at the benchmark shapes ------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("B", "n0", "n", "a", "d", "backward"),
    [
        pytest.param(512, 70, (2, 35), 3, 64, True, id="paper"),
        pytest.param(4096, 1024, 256, 8, 256, False, id="target"),
    ],
)
def test_every_path_at_the_benchmark_shapes_on_gpu(monkeypatch, B, n0, n, a, d, backward):
    """What bench/gpu_check.sh times: every path selects the same points as the first, bit for
    bit, with the same values (and gradients, at the paper shape); the first path's ranking is
    one the contract allows (and its values and gradients the reference's)."""
    inputs = _inputs(B, n0, a, d, requires_grad=backward)
    sizes = random_sizes(B, *n).to(DEVICE) if isinstance(n, tuple) else n
    first = None
    for param in PATHS:
        select, forward, backward_path = param.values
        _force_paths(monkeypatch, select=select, forward=forward, backward=backward_path)
        if backward:
            out, grads = run_topn("triton", inputs, sizes)
        else:
            out, grads = tk.topn_create(*inputs[:4], sizes, inputs[4], backend="triton"), ()
        if first is None:
            assert_valid_selection(out.index, sizes, inputs[0], inputs[1], sorted=True)
            if backward:
                _assert_matches_reference(inputs, sizes)
            first, first_grads = out, grads
            continue
        assert torch.equal(out.index, first.index), param.id
        wanted = (first.x, first.weight, *first_grads)
        for got, want in zip((out.x, out.weight, *grads), wanted, strict=True):
            assert_close_scaled(got, want, 1e-4)


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


# --- no host sync on CUDA ---------------------------------------------------------------------


def test_sizes_are_read_on_the_host_only_where_that_costs_no_sync(monkeypatch):
    """On CUDA with n_max given, the values of a tensor n are not read on the host (a
    device-to-host sync per call) unless TOPN_KERNELS_CHECK_SIZES=1; everywhere else they are
    (the native kernel checks them itself)."""
    from topn_kernels.ops.topn_create import CHECK_SIZES_VAR, host_checks_sizes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(CHECK_SIZES_VAR, raising=False)
    assert not host_checks_sizes("triton", cuda, 35)
    assert host_checks_sizes("triton", cuda, None)
    assert host_checks_sizes("triton", cpu, 35)
    assert host_checks_sizes("reference", cuda, 35)
    assert not host_checks_sizes("native", cpu, 35)
    monkeypatch.setenv(CHECK_SIZES_VAR, "1")
    assert host_checks_sizes("triton", cuda, 35)


def test_kernels_clamp_sizes_out_of_range():
    """What makes skipping the host check safe: called with sizes outside [1, min(n0, n_max)]
    (the op itself, past the public function's checks), the kernels clamp each n_b to
    [0, min(n0, n_max)], forward and backward, and write nothing out of bounds."""
    inputs = _inputs(4, 9, 3, 5)
    bad = torch.tensor([-3, 0, 50, 4], device=DEVICE)
    x, mask, index, weight = topn_create_op.topn_create(
        *inputs[:4], bad, inputs[4], 12, "selected", True, "triton"
    )
    clamped = bad.clamp(0, 9)
    assert torch.equal(mask.sum(1), clamped)
    assert (index[~mask] == -1).all() and (x[~mask] == 0).all() and (weight[~mask] == 0).all()
    at = reference.topn_create_at(*inputs[:4], index, inputs[4])
    assert_close_scaled(x, at[0], 1e-5)
    grads = torch.autograd.grad((x * x).sum() + weight.sum(), inputs)
    want = torch.autograd.grad((at[0] * at[0]).sum() + at[3].sum(), inputs)
    for got, expected in zip(grads, want, strict=True):
        assert_close_scaled(got, expected, 1e-4)


@needs_gpu
@pytest.mark.gpu
def test_no_device_to_host_sync_with_a_tensor_n_and_n_max():
    inputs = _inputs(64, 70, 3, 16)
    n = random_sizes(64, 1, 35).to(DEVICE)
    tk.topn_create(*inputs[:4], n, inputs[4], n_max=35, backend="triton")  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tk.topn_create(*inputs[:4], n, inputs[4], n_max=35, backend="triton")
        torch.autograd.grad((out.x * out.x).sum(), inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
