"""Everything about ``topn_create`` that holds for every backend (docs/operators.md,
"topn_create" and "Ranking"), and its input validation ("Errors").

- the oracle: ``topn_kernels.reference.topn_create`` against the contract's steps written as
  literal loops, and ``torch.autograd.gradcheck`` in float64;
- equivalence of every backend with the reference, one suite parametrized by backend: forward
  (x, mask, index, weight) and gradients of query, angles, table, bias and film under a random
  upstream gradient of x and weight, compared tie-aware (``tests/helpers.py``:
  ``assert_topn_matches_reference``); ties, padding, NaN input, indices past 2^31;
- the tie-aware check itself: it accepts any order of near-equal scores and nothing else;
- the op ``topn_kernels::topn_create`` and its backward ("Determinism, torch.compile and custom
  ops"): opcheck, the fake kernel, the gradients asked for, torch.compile without graph break;
- bad input: a TypeError or ValueError naming the argument, before any kernel runs.

The triton backend runs on CUDA tensors where there is a GPU, else in Triton's interpreter on
CPU tensors (tests/conftest.py); the reference runs on the same device. Large shapes run on a
GPU only. What only one backend has is in test_topn_create_native.py and
test_topn_create_triton.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import topn_kernels as tk
from topn_kernels import reference
from topn_kernels.nn import TopNCreation

from .helpers import (
    CUDA,
    F64,
    META,
    TOPN_INPUTS,
    assert_close_scaled,
    assert_topn_matches_reference,
    assert_valid_selection,
    device_for,
    needs_gpu,
    on_device,
    random_sizes,
    topn_inputs,
)

BACKENDS = ["native", "triton"]
GPU_TRITON = pytest.param("triton", marks=[needs_gpu, pytest.mark.gpu])  # large shapes

# ---------------------------------------------------------------------------------------------
# the oracle: the reference against the contract's literal loops
# ---------------------------------------------------------------------------------------------


def _normalized(v):
    return v / max(float(v.norm()), 1e-12)


def literal_topn(query, angles, table, bias, n, film, n_max, score_norm, by_score, at=None):
    """docs/operators.md, topn_create, step by step, one set and one point at a time.

    ``at`` (B, n_max), when given, replaces the ranking of step 2: set b takes the points
    ``at[b, :n_b]`` in that order, so that steps 3 to 5 are evaluated at another ranking of
    near-equal scores ("Ranking").
    """
    batch, n0, d = query.shape[0], angles.shape[0], table.shape[1]
    x = torch.zeros(batch, n_max, d, dtype=F64)
    index = torch.full((batch, n_max), -1)
    weight = torch.zeros(batch, n_max, dtype=F64)
    for b in range(batch):
        nb = int(n[b])
        q = _normalized(query[b])
        s = [float(q @ _normalized(angles[i])) for i in range(n0)]
        if at is None:
            ranked = sorted(range(n0), key=lambda i: (-s[i], i))
            chosen = ranked[:nb] if by_score else sorted(ranked[:nb])
        else:
            chosen = at[b, :nb].tolist()
        if score_norm == "selected":
            top = max(s[i] for i in chosen)
            e = [math.exp(s[i] - top) for i in chosen]
            m = [v / sum(e) for v in e]
        else:
            top = max(s)
            z = sum(math.exp(v - top) for v in s)
            m = [nb * math.exp(s[i] - top) / z for i in chosen]
        for j, i in enumerate(chosen):
            h = table[i] + bias[b]
            x[b, j] = h * (m[j] * film[0] + film[1]) + (m[j] * film[2] + film[3])
            index[b, j], weight[b, j] = i, m[j]
    return x, index >= 0, index, weight


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_reference_matches_the_literal_definition(score_norm, sorted):
    """Tie-aware: the reference's and the loops' rankings must each be one the contract
    allows (near-equal scores may rank either way, depending on rounding), and the loops'
    steps 3 to 5, evaluated at the reference's ranking, give the reference's values."""
    inputs = topn_inputs(7, 23, 3, 5, dtype=F64, ties=True)
    query, angles, table, bias, film = inputs
    n = random_sizes(7, 1, 23)
    kwargs = {"n_max": 25, "score_norm": score_norm, "sorted": sorted}
    got = reference.topn_create(query, angles, table, bias, n, film, **kwargs)
    literal = literal_topn(query, angles, table, bias, n, film, 25, score_norm, sorted)
    assert_valid_selection(got[2], n, query, angles, sorted=sorted)
    assert_valid_selection(literal[2], n, query, angles, sorted=sorted)
    want = literal_topn(query, angles, table, bias, n, film, 25, score_norm, sorted, at=got[2])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert_close_scaled(got[0], want[0], 1e-12)
    assert_close_scaled(got[3], want[3], 1e-12)


@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_reference_gradcheck(score_norm, sorted):
    inputs = topn_inputs(3, 9, 3, 4, dtype=F64, requires_grad=True)
    n = torch.tensor([1, 4, 9])

    def f(query, angles, table, bias, film):
        out = reference.topn_create(
            query, angles, table, bias, n, film, score_norm=score_norm, sorted=sorted
        )
        return out[0], out[3]

    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------
# every backend against the reference
# ---------------------------------------------------------------------------------------------

# (B, n0, n, a, d); n is an int or (low, high) for per-set sizes
CASES = [
    pytest.param(3, 1, 1, 2, 4, id="B3-n0_1-n1"),
    pytest.param(5, 37, 1, 3, 8, id="B5-n0_37-n1"),
    pytest.param(5, 37, 37, 3, 8, id="B5-n0_37-n=n0"),
    pytest.param(16, 70, (2, 35), 3, 16, id="B16-n0_70-n2..35"),
    pytest.param(9, 100, (1, 100), 5, 33, id="B9-n0_100-n1..100"),
    pytest.param(6, 257, 64, 8, 48, id="B6-n0_257-n64"),
]

# GPU only (triton): the bandwidth target's shape, a point cloud, and reference sets larger than
# one block of the selection (scored in chunks)
GPU_CASES = [
    pytest.param(4096, 1024, 256, 8, 256, id="B4096-n0_1024-n256-d256"),
    pytest.param(32, 4096, (1, 2048), 8, 128, id="B32-n0_4096-n1..2048"),
    pytest.param(8, 16384, (1, 16384), 8, 16, id="B8-n0_16384-n1..16384"),
]

FORWARD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _sizes(n, batch):
    return random_sizes(batch, *n, seed=batch) if isinstance(n, tuple) else n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
@pytest.mark.parametrize(("B", "n0", "n", "a", "d"), CASES)
def test_matches_reference(backend, dtype, sorted, score_norm, B, n0, n, a, d):
    inputs = topn_inputs(B, n0, a, d, dtype=dtype, ties=True, requires_grad=True)
    inputs, n = on_device(device_for(backend), inputs, _sizes(n, B))
    assert_topn_matches_reference(
        backend,
        inputs,
        n,
        rtol=FORWARD_RTOL[dtype],
        grad_rtol=GRAD_RTOL[dtype],
        score_norm=score_norm,
        sorted=sorted,
    )


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sorted", [True, False], ids=["sorted", "by_index"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
@pytest.mark.parametrize(("B", "n0", "n", "a", "d"), GPU_CASES)
def test_large_shapes_match_reference_on_gpu_triton(sorted, score_norm, B, n0, n, a, d):
    inputs = topn_inputs(B, n0, a, d, ties=True, requires_grad=True)
    inputs, n = on_device(device_for("triton"), inputs, _sizes(n, B))
    assert_topn_matches_reference(
        "triton",
        inputs,
        n,
        rtol=FORWARD_RTOL[torch.float32],
        grad_rtol=GRAD_RTOL[torch.float32],
        score_norm=score_norm,
        sorted=sorted,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_low_precision_matches_reference(backend, dtype, score_norm):
    """Both compute in fp32 and round once: results agree to one unit in the last place."""
    inputs = topn_inputs(12, 70, 3, 32, dtype=dtype, ties=True, requires_grad=True)
    inputs, n = on_device(device_for(backend), inputs, random_sizes(12, 2, 35))
    ulp = torch.finfo(dtype).eps
    assert_topn_matches_reference(backend, inputs, n, rtol=ulp, score_norm=score_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_longer_than_the_reference_set(backend):
    """n_max may exceed every n_b and even n0: the extra rows are padding."""
    inputs = topn_inputs(4, 5, 3, 6, requires_grad=True)
    inputs, n = on_device(device_for(backend), inputs, torch.tensor([1, 5, 3, 2]))
    out = assert_topn_matches_reference(backend, inputs, n, rtol=1e-5, grad_rtol=1e-4, n_max=9)
    assert out.x.shape == (4, 9, 6)
    assert torch.equal(out.mask.sum(1), n)
    assert (out.index[~out.mask] == -1).all() and (out.weight[~out.mask] == 0).all()
    assert (out.x[~out.mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_smaller_index(backend):
    """Identical angle rows score exactly equally: the smaller index ranks first, in both
    orders. Exact by construction ("Ranking"), hence compared exactly."""
    query, angles, table, bias, film = topn_inputs(2, 6, 3, 4)
    angles[:] = angles[0]  # every score equal
    inputs = on_device(device_for(backend), [query, angles, table, bias, film])
    query, angles, table, bias, film = inputs
    for sorted in (True, False):
        out = tk.topn_create(query, angles, table, bias, 4, film, sorted=sorted, backend=backend)
        assert out.index.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorted_false_is_the_same_selection_by_index(backend):
    """Tie-aware: both orders select the best points (either side of a near tie at the
    cut-off), by decreasing score or by increasing index; each call's values are the
    reference's at its own selection."""
    inputs, n = on_device(device_for(backend), topn_inputs(8, 50, 4, 8), random_sizes(8, 1, 50))
    query, angles, table, bias, film = inputs
    by_score = tk.topn_create(query, angles, table, bias, n, film, backend=backend)
    by_index = tk.topn_create(query, angles, table, bias, n, film, sorted=False, backend=backend)
    assert_valid_selection(by_score.index, n, query, angles, sorted=True)
    assert_valid_selection(by_index.index, n, query, angles, sorted=False)
    for out in (by_score, by_index):
        at = reference.topn_create_at(query, angles, table, bias, out.index, film)
        assert_close_scaled(out.x, at[0], 1e-5)
        assert_close_scaled(out.weight, at[3], 1e-5)
    for b in range(8):
        weight = by_score.weight[b, : n[b]]  # decreasing weight = decreasing score, to rounding
        assert (weight[:-1] >= weight[1:] * (1 - 1e-5)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_not_a_crash(backend):
    query, angles, table, bias, film = topn_inputs(3, 20, 3, 5)
    query[1, 0] = float("nan")
    angles[7, 2] = float("nan")
    inputs = on_device(device_for(backend), [query, angles, table, bias, film])
    query, angles, table, bias, film = inputs
    out = tk.topn_create(query, angles, table, bias, 6, film, backend=backend)
    assert out.x[1].isnan().all() and out.weight[1].isnan().all()
    assert ((out.index >= 0) & (out.index < 20)).all()
    assert (out.index[[0, 2], 0] == 7).all()  # a NaN score ranks first, as torch.sort puts it
    ref = reference.topn_create_at(query, angles, table, bias, out.index, film)
    torch.testing.assert_close(out.x, ref[0], equal_nan=True)
    assert_valid_selection(out.index, 6, query, angles, sorted=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_a_softmax_over_one_point_has_zero_query_gradient_and_passes_nan(backend, score_norm):
    """One point per set ("selected"; one reference point for "all"): the weight is 1 whatever
    the score, so the query's gradient is 0 exactly, as the reference's; a NaN upstream
    gradient still gives NaN, as in the reference."""
    n0 = 1 if score_norm == "all" else 9
    inputs = on_device(device_for(backend), topn_inputs(3, n0, 3, 5, requires_grad=True))
    query, angles, table, bias, film = inputs
    out = tk.topn_create(
        query, angles, table, bias, 1, film, score_norm=score_norm, backend=backend
    )
    grad_x = torch.ones_like(out.x)
    grad_x[1] = float("nan")
    (got,) = torch.autograd.grad((out.x, out.weight), query, (grad_x, torch.ones_like(out.weight)))
    ref = reference.topn_create_at(
        query, angles, table, bias, out.index, film, score_norm=score_norm
    )
    (want,) = torch.autograd.grad((ref[0], ref[3]), query, (grad_x, torch.ones_like(ref[3])))
    assert (want[[0, 2]] == 0).all() and want[1].isnan().all()  # the reference's
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", GPU_TRITON])
def test_indexes_past_int32(backend):
    """x has more than 2^31 elements (4 GiB of float16): the last set's rows land where the
    reference puts them."""
    batch, n0, d = 1025, 1024, 2048
    assert batch * n0 * d > 2**31
    inputs = on_device(device_for(backend), topn_inputs(batch, n0, 3, d, dtype=torch.float16))
    query, angles, table, bias, film = inputs
    out = tk.topn_create(query, angles, table, bias, n0, film, backend=backend)
    for b in (0, batch - 1):
        one = (query[b : b + 1], angles, table, bias[b : b + 1])
        assert_valid_selection(out.index[b : b + 1], n0, query[b : b + 1], angles, sorted=True)
        ref = reference.topn_create_at(*one, out.index[b : b + 1], film)
        assert_close_scaled(out.x[b], ref[0][0], torch.finfo(torch.float16).eps)


# ---------------------------------------------------------------------------------------------
# the tie-aware check every equivalence test relies on
# ---------------------------------------------------------------------------------------------


def test_the_tie_aware_check_rejects_what_the_contract_forbids():
    """assert_valid_selection, which every equivalence test relies on, accepts any order of
    near-equal scores and nothing else."""
    theta = torch.tensor([0.0, 0.3, 0.6, 0.9, 0.3, 1.2, 1.5, 1.5 + 1e-7])  # 4 = 1; 7 ~ 6
    angles = torch.stack([theta.cos(), theta.sin(), torch.zeros(8)], 1)
    angles[4] = angles[1]  # an exact duplicate
    query = torch.tensor([[1.0, 0.0, 0.0]])
    check = functools.partial(assert_valid_selection, query=query, angles=angles)
    check(torch.tensor([[0, 1, 4, 2, 3, 5, 6, 7]]), 8, sorted=True)
    check(torch.tensor([[0, 1, 4, 2, 3, 5, 7, 6]]), 8, sorted=True)  # a near tie, either way
    check(torch.tensor([[0, 1, 4, 2, 3, 5, 7]]), 7, sorted=True)  # either side of the cut
    check(torch.tensor([[0, 1, 2, 3, 4, 5, 7, -1]]), 7, sorted=False)
    wrong = [
        ([[0, 1, 4, 3, 2, 5, 6, 7]], 8, True),  # 0.6 and 0.9 swapped
        ([[0, 4, 1, 2, 3, 5, 6, 7]], 8, True),  # equal rows, larger index first
        ([[0, 4, 2, 3, 5, 6, 7, -1]], 7, True),  # the larger of two equal rows chosen
        ([[0, 1, 4, 2, 3, 6, 7, -1]], 7, True),  # 1.2 left out
        ([[0, 1, 4, 2, 3, 5, -1, -1]], 7, True),  # a slot missing
        ([[0, 1, 3, 2, 4, 5, 6, -1]], 7, False),  # not by index
        ([[0, 1, 2, 3, 4, 5, 5, -1]], 7, False),  # a point twice
    ]
    for index, n, sorted in wrong:
        with pytest.raises(AssertionError):
            check(torch.tensor(index), n, sorted=sorted)


# ---------------------------------------------------------------------------------------------
# the op: topn_kernels::topn_create, one schema for every backend
# ---------------------------------------------------------------------------------------------

OP = torch.ops.topn_kernels.topn_create.default
BACKWARD_OP = torch.ops.topn_kernels.topn_create_backward.default


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n_max", "score_norm", "sorted"), [(35, "selected", True), (40, "all", False)]
)
def test_opcheck_forward(backend, n_max, score_norm, sorted):
    device = device_for(backend)
    inputs = on_device(device, topn_inputs(6, 70, 3, 8, requires_grad=True))
    n = random_sizes(6, 2, 35).to(device)
    args = (*inputs[:4], n, inputs[4], n_max, score_norm, sorted, backend)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomics"])
@pytest.mark.parametrize("score_norm", ["selected", "all"])
@pytest.mark.parametrize("wanted", [(True,) * 5, (False, True, False, True, False)])
def test_opcheck_backward(backend, deterministic, score_norm, wanted):
    if CUDA and backend == "triton" and not deterministic:
        pytest.skip("atomics sum in a varying order on a GPU: runs differ by rounding")
    device = device_for(backend)
    query, angles, table, bias, film = on_device(device, topn_inputs(6, 70, 3, 8))
    n = random_sizes(6, 2, 35).to(device)
    out = tk.topn_create(query, angles, table, bias, n, film, score_norm=score_norm)
    g = torch.Generator().manual_seed(0)
    grad_x, grad_w = torch.randn(6, 35, 8, generator=g), torch.randn(6, 35, generator=g)
    grad_x, grad_w, index = grad_x.to(device), grad_w.to(device), out.index.to(device)
    args = (grad_x, grad_w, query, angles, table, bias, n, film, index, score_norm)
    args = (*args, list(wanted), deterministic, backend)
    grads = BACKWARD_OP(*args)
    assert [g is not None for g in grads] == list(wanted)
    torch.library.opcheck(BACKWARD_OP, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_computed(backend, monkeypatch):
    """The backward's output_mask follows ctx.needs_input_grad, and the gradients it does
    compute still match the reference."""
    from topn_kernels.ops import topn_create_op

    masks = []
    backward = topn_create_op._backward

    def spy(ctx, *grads):
        masks.append([ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5)])
        return backward(ctx, *grads)

    monkeypatch.setattr(topn_create_op, "_backward", spy)
    topn_create_op.topn_create.register_autograd(spy, setup_context=topn_create_op._setup_context)
    try:
        device = device_for(backend)
        for wanted in ((False, True, False, False, False), (False, False, True, True, True)):
            inputs = topn_inputs(7, 40, 3, 6, ties=True)
            inputs = [t.to(device).requires_grad_(w) for t, w in zip(inputs, wanted, strict=True)]
            n = random_sizes(7, 1, 40).to(device)
            assert_topn_matches_reference(backend, inputs, n, rtol=1e-5, grad_rtol=1e-4)
            assert masks[-1] == list(wanted)
    finally:
        topn_create_op.topn_create.register_autograd(
            backward, setup_context=topn_create_op._setup_context
        )


def test_the_fake_kernel_checks_shapes_and_dtypes():
    """What torch.compile traces: the fake kernel rejects inconsistent shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = topn_inputs(3, 10, 2, 4)
    n = torch.full((3,), 2)
    bad = {
        "table": torch.randn(9, 4),
        "bias": torch.randn(3, 5),
        "film": torch.randn(3, 4),
        "angles": torch.randn(10, 2, dtype=torch.float64),
    }
    rest = (2, "selected", True, "native")  # n_max, score_norm, sorted, backend
    with FakeTensorMode(allow_non_fake_inputs=True):
        OP(*inputs[:4], n, inputs[4], *rest)  # consistent: fine
        for name, value in bad.items():
            args = dict(zip(TOPN_INPUTS, inputs, strict=True)) | {name: value}
            with pytest.raises(RuntimeError, match=name):
                OP(*[args[k] for k in TOPN_INPUTS[:4]], n, args["film"], *rest)
        with pytest.raises(RuntimeError, match="n must be int64"):
            OP(*inputs[:4], n.int(), inputs[4], *rest)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_matches_eager_without_graph_break(backend):
    """fullgraph=True fails on any graph break; values and gradients equal eager."""
    torch.manual_seed(0)
    device = device_for(backend)
    model = TopNCreation(latent_dim=8, set_dim=16, n_ref=35, backend=backend).to(device)
    z = torch.randn(12, 8, device=device)
    n = random_sizes(12, 2, 35).to(device)
    target = torch.randn(12, 35, 16, device=device)

    def step(z, n):
        x, mask = model(z, n, n_max=35)
        return ((x - target) ** 2 * mask[..., None]).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        loss = fn(z, n)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        assert_close_scaled(got, want, 1e-5)


# ---------------------------------------------------------------------------------------------
# input validation (docs/operators.md, Errors)
# ---------------------------------------------------------------------------------------------


def _topn_call(**changes):
    """A valid topn_create call (B=3, n0=5, a=2, d=4, n=2) with some arguments replaced."""
    query, angles, table, bias, film = topn_inputs(3, 5, 2, 4)
    kwargs = dict(query=query, angles=angles, table=table, bias=bias, n=2, film=film)
    kwargs = kwargs | {"backend": "native"} | changes
    return lambda: tk.topn_create(**kwargs)


VALIDATION_CASES = [
    ("query-1d", {"query": torch.randn(3)}, ValueError, "query"),
    ("query-list", {"query": [[1.0, 2.0]]}, TypeError, "query"),
    ("query-int", {"query": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "query"),
    ("angles-a", {"angles": torch.randn(5, 3)}, ValueError, "angles"),
    ("table-n0", {"table": torch.randn(6, 4)}, ValueError, "table"),
    ("table-3d", {"table": torch.randn(5, 4, 1)}, ValueError, "table"),
    ("bias-d", {"bias": torch.randn(3, 5)}, ValueError, "bias"),
    ("bias-B", {"bias": torch.randn(2, 4)}, ValueError, "bias"),
    ("film-rows", {"film": torch.randn(3, 4)}, ValueError, "film"),
    ("film-d", {"film": torch.randn(4, 5)}, ValueError, "film"),
    ("mixed-dtype", {"table": torch.randn(5, 4, dtype=torch.float64)}, TypeError, "table"),
    ("other-device", {"bias": torch.empty(3, 4, device=META)}, ValueError, "bias"),
    ("n-zero", {"n": 0}, ValueError, "n must"),
    ("n-above-n0", {"n": 6}, ValueError, "n must"),
    ("n-float", {"n": 2.0}, TypeError, "n must"),
    ("n-bool", {"n": True}, TypeError, "n must"),
    ("n-tensor-zero", {"n": torch.tensor([1, 0, 2])}, ValueError, "n must"),
    ("n-tensor-above-n0", {"n": torch.tensor([1, 6, 2])}, ValueError, "n0"),
    ("n-tensor-length", {"n": torch.tensor([1, 2])}, ValueError, "n must"),
    ("n-tensor-2d", {"n": torch.ones(3, 1, dtype=torch.int64)}, ValueError, "n must"),
    ("n-tensor-float", {"n": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "n must"),
    ("n-tensor-device", {"n": torch.ones(3, dtype=torch.int64, device=META)}, ValueError, "n "),
    ("n_max-below-n", {"n_max": 1}, ValueError, "n_max"),
    ("n_max-below-max-n", {"n": torch.tensor([1, 3, 2]), "n_max": 2}, ValueError, "n_max"),
    ("n_max-float", {"n_max": 3.0}, TypeError, "n_max"),
    ("n_max-huge", {"n_max": 2**62}, ValueError, "n_max"),
    ("n_max-beyond-int64", {"n_max": 2**64}, ValueError, "n_max"),
    ("n_max-huge-tensor-n", {"n": torch.tensor([1, 3, 2]), "n_max": 2**62}, ValueError, "n_max"),
    ("score_norm", {"score_norm": "softmax"}, ValueError, "score_norm"),
    ("sorted-int", {"sorted": 1}, TypeError, "sorted"),
    ("backend-unknown", {"backend": "cuda"}, ValueError, "backend"),
    ("backend-keops", {"backend": "keops"}, ValueError, "backend"),
]


@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [pytest.param(c, e, n, id=i) for i, c, e, n in VALIDATION_CASES],
)
def test_validation_names_the_bad_argument(changes, error, names):
    with pytest.raises(error, match=names):
        _topn_call(**changes)()


def test_validation_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _topn_call(backend="triton")()
