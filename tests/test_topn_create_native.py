"""What only the native CPU ``topn_create`` kernel has (docs/operators.md, "The native CPU
backend" and "Determinism, torch.compile and custom ops"): its output pool, its streaming
stores, the paths of its selection (clustered scores, large n0), and forward and backward
that are the same bits whatever the number of threads.

Its equivalence with the reference, shared with the other backends, is in
test_topn_create.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import topn_kernels as tk
from topn_kernels import native, reference

from .helpers import (
    F64,
    assert_close_scaled,
    assert_topn_matches_reference,
    assert_valid_selection,
    random_sizes,
    run_topn,
    topn_inputs,
)


def _assert_matches_reference(inputs, n, **kwargs):
    return assert_topn_matches_reference("native", inputs, n, rtol=1e-5, **kwargs)


def test_reused_output_blocks_are_fully_rewritten():
    """A block poisoned with NaN by its previous owner comes back from the pool: every element
    of the new output, padding included, must be written."""
    inputs = topn_inputs(64, 300, 3, 64, ties=True)
    n = random_sizes(64, 1, 300)
    first = tk.topn_create(*inputs[:4], n, inputs[4], backend="native").x
    assert first.nbytes >= 2**20  # large enough to come from the pool
    first.fill_(float("nan"))
    pointer = first.data_ptr()
    del first
    assert native.cached_bytes() > 0
    out = _assert_matches_reference(inputs, n)
    assert out.x.data_ptr() == pointer  # the same block, reused
    assert not out.x.isnan().any()


def test_cache_limit_and_empty_cache():
    inputs = topn_inputs(64, 100, 3, 64)
    previous = native.set_cache_limit(0)
    try:
        assert native.cached_bytes() == 0
        x = tk.topn_create(*inputs[:4], 100, inputs[4], backend="native").x
        del x
        assert native.cached_bytes() == 0  # nothing kept
        native.set_cache_limit(1 << 30)
        x = tk.topn_create(*inputs[:4], 100, inputs[4], backend="native").x
        del x
        assert native.cached_bytes() > 0
        native.empty_cache()
        assert native.cached_bytes() == 0
    finally:
        native.set_cache_limit(previous)


@pytest.mark.parametrize(("mb", "limit"), [("3", 3 << 20), (str(2**50), (2**63 - 1) >> 20 << 20)])
def test_cache_limit_from_the_environment(mb, limit):
    """TOPN_KERNELS_CPU_CACHE_MB in MiB; a bound beyond what bytes can count is the largest
    one (it wrapped around to a small limit before)."""
    code = "from topn_kernels import native; print(native.set_cache_limit(0))"
    env = {**os.environ, "TOPN_KERNELS_CPU_CACHE_MB": mb}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == limit


def test_pooled_outputs_behave_as_tensors():
    inputs = topn_inputs(64, 100, 3, 64)
    x = tk.topn_create(*inputs[:4], 100, inputs[4], backend="native").x
    x.resize_(2, 3)  # a resizable storage, as at::empty gives
    assert x.shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streaming_stores_write_the_same_values(monkeypatch, dtype):
    """float32 outputs above TOPN_KERNELS_STREAM_MIN_BYTES, in a block the pool recycles, are
    written with streaming stores; a threshold of 0 takes that path at a small, odd size
    (rows not 16-byte aligned)."""
    monkeypatch.setenv("TOPN_KERNELS_STREAM_MIN_BYTES", "0")
    inputs = topn_inputs(64, 300, 3, 37, dtype=dtype, ties=True)
    n = random_sizes(64, 1, 300)
    first = tk.topn_create(*inputs[:4], n, inputs[4], backend="native").x
    pointer = first.data_ptr()
    del first
    out = tk.topn_create(*inputs[:4], n, inputs[4], backend="native")
    assert out.x.data_ptr() == pointer  # a recycled block: the streaming path
    assert_valid_selection(out.index, n, inputs[0], inputs[1], sorted=True)
    ref = reference.topn_create_at(*inputs[:4], out.index, inputs[4])
    assert_close_scaled(out.x, ref[0], torch.finfo(dtype).eps)


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
def test_clustered_scores(sorted):
    """Angles within 1e-4 of each other: all scores fall in one or two selection buckets,
    which then need a real sort (not the few-per-bucket fast path)."""
    query, angles, table, bias, film = topn_inputs(6, 600, 3, 8)
    angles = angles[:1] + 1e-4 * angles
    n = random_sizes(6, 1, 600)
    _assert_matches_reference([query, angles, table, bias, film], n, sorted=sorted)


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
def test_large_reference_set(sorted):
    inputs = topn_inputs(4, 5000, 8, 16, ties=True)
    n = torch.tensor([1, 17, 2500, 5000])
    _assert_matches_reference(inputs, n, sorted=sorted)


def test_deterministic_across_runs_and_thread_counts():
    """The same bits, outputs and gradients, run after run and on one thread (exact by
    contract: the same backend on the same inputs, not two roundings to compare tie-aware)."""
    inputs = topn_inputs(64, 300, 3, 32, ties=True, requires_grad=True)
    n = random_sizes(64, 1, 300)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            for score_norm in ("selected", "all"):
                out, grads = run_topn("native", inputs, n, score_norm=score_norm)
                results.append((num_threads, score_norm, [*out, *grads]))
    finally:
        torch.set_num_threads(threads)
    first = {sn: tensors for _, sn, tensors in results[:2]}
    for _, score_norm, tensors in results[2:]:
        for got, want in zip(tensors, first[score_norm], strict=True):
            assert torch.equal(got, want)


def test_an_int_n_reaches_the_kernel_as_n_fixed():
    """An int n goes to the C++ kernel as ``n_fixed`` with an empty sizes tensor: the same
    bits as the (B,) sizes tensor, and the kernel checks the value itself."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (12, 3), (12, 8), (5, 8), (4, 8)]  # query, angles, table, bias, film
    query, angles, table, bias, film = (torch.randn(s, generator=g) for s in shapes)
    op = torch.ops.topn_kernels._topn_create_cpu
    sizes = torch.full((5,), 7, dtype=torch.int64)
    empty = torch.empty(0, dtype=torch.int64)
    want = op(query, angles, table, bias, sizes, film, 9, "selected", True)
    got = op(query, angles, table, bias, empty, film, 9, "selected", True, 7)
    for g_, w in zip(got, want, strict=True):
        assert torch.equal(g_, w)
    public = tk.topn_create(query, angles, table, bias, 7, film, n_max=9, backend="native")
    assert torch.equal(public.x, want[0]) and torch.equal(public.index, want[2])
    for bad in (0, 13):
        with pytest.raises(ValueError, match="n must be in"):
            op(query, angles, table, bias, empty, film, 13, "selected", True, bad)
    with pytest.raises(ValueError, match="n_max=9"):
        op(query, angles, table, bias, empty, film, 9, "selected", True, 10)


def test_backward_op_checks_the_selection_and_gradient_dtypes():
    """Called directly, the backward op refuses an index that is not a selection followed by
    -1 padding, and gradients that are not floating point (it converted them silently)."""
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (10, 4), (10, 5), (3, 5), (4, 5)]  # query, angles, table, bias, film
    query, angles, table, bias, film = (torch.randn(s, generator=g, dtype=F64) for s in shapes)
    sizes = torch.tensor([1, 3, 10])
    ops = torch.ops.topn_kernels
    x, _, index, weight = ops._topn_create_cpu(
        query, angles, table, bias, sizes, film, 10, "selected", True
    )

    def backward(index, gx=None):
        gx = torch.ones_like(x) if gx is None else gx
        args = (query, angles, table, bias, film, index, "selected", [True] * 5)
        return ops._topn_create_backward_cpu(gx, torch.ones_like(weight), *args)

    backward(index)  # the forward's own index is accepted
    for b, j, value in ((0, 2, 10**12), (1, 0, -5), (2, 4, 10)):
        bad = index.clone()
        bad[b, j] = value
        with pytest.raises(RuntimeError, match="topn_create_backward: index"):
            backward(bad)
    with pytest.raises(RuntimeError, match="floating-point"):
        backward(index, gx=torch.ones_like(x, dtype=torch.int64))
