"""Property-based tests (hypothesis): every operator and backend against the reference.

Random problems, edges included (B=1, n0=1, n=1, n=n0, a=1, d=1, n_max past n0, sets of one
point, lengths at 1 and N, empty sets for the penalties, B=0 and empty dimensions), in every
dtype, with non-contiguous, offset and expanded (stride-0) inputs, exact and near duplicate
angle rows, zero rows, and ragged batches whose padding holds NaN, inf and -1e30. Values and
gradients (under a random upstream gradient) are compared with :mod:`topn_kernels.reference`
at the equivalence tests' tolerances (topn_create: float32 1e-5, gradients 1e-4; float64
1e-12 / 1e-10; bfloat16/float16 one eps of the dtype; Chamfer and penalties 1e-5 / 1e-12;
Sinkhorn 1e-4 / 1e-10), ``topn_create`` through the tie-aware
``helpers.assert_topn_matches_reference``. Bad arguments must raise a TypeError/ValueError
that names them.

Profiles, chosen by the environment variable ``HYPOTHESIS_PROFILE``:

- ``ci`` (the default, part of ``make test``): derandomized (the same examples every run), a
  few examples per test, no example database;
- ``long``: many random examples per test (75 times ci's), different ones at every run, for
  fuzzing (about 20 minutes on 2 cores)::

      HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_properties.py

A failure prints the falsifying example and a ``@reproduce_failure`` blob that replays it.

KeOps compiles every new (formula, point dim D, dtype) once, ~15 s each, into
``KEOPS_CACHE_FOLDER``: the losses use D=3 (float32 and float64, as the other loss tests) and
D=1 (float64 only), and max_valency in {0, 2, 4, 6} (KeOps' K), so that the set of compiled
formulas stays small."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import topn_kernels as tk
from topn_kernels import reference

from .helpers import (
    POISON,
    assert_close_scaled,
    assert_topn_matches_reference,
    run_topn,
    topn_grads,
)

# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "database": None,  # nothing written into the repository
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", derandomize=True, max_examples=40, **_COMMON)
settings.register_profile("long", derandomize=False, max_examples=3000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _examples(share: float) -> settings:
    """The profile, with ``share`` of its max_examples (the tests' costs differ)."""
    return settings(PROFILE, max_examples=max(1, round(PROFILE.max_examples * share)))


F32, F64 = torch.float32, torch.float64
LOW = (torch.bfloat16, torch.float16)
SEEDS = st.integers(0, 2**32 - 1)


def _size(lo: int, hi: int):
    """An int in [lo, hi], drawing each bound about as often as everything in between."""
    return st.one_of(st.sampled_from(sorted({lo, hi})), st.integers(lo, hi))


def _named(message: str, name: str) -> bool:
    return re.search(rf"(^|[^\w]){re.escape(name)}([^\w]|$)", message) is not None


# ---------------------------------------------------------------------------------------------
# memory layouts: the same values, stored differently
# ---------------------------------------------------------------------------------------------

LAYOUTS_2D = ("contiguous", "transposed", "strided", "offset", "row_padded", "expanded")


def _layout_2d(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (R, C) viewed in ``layout``; storage around the view holds NaN, which a kernel
    that ignored the strides or the storage offset would read. "expanded" repeats row 0 (row
    stride 0), so the caller must use the returned values."""
    rows, cols = values.shape
    nan = float("nan")
    if layout == "transposed":  # column-major, as query = q.t() of an (a, B) tensor
        return values.t().contiguous().t()
    if layout == "strided":  # every other column of a wider tensor
        buf = values.new_full((rows, 2 * cols), nan)
        buf[:, ::2] = values
        return buf[:, ::2]
    if layout == "offset":  # contiguous, at a storage offset
        buf = values.new_full((rows * cols + 3,), nan)
        view = buf[3:].view(rows, cols)
        view.copy_(values)
        return view
    if layout == "row_padded":  # a block of a larger tensor: row stride > C, offset
        buf = values.new_full((rows + 1, cols + 2), nan)
        buf[1:, 1:-1] = values
        return buf[1:, 1:-1]
    if layout == "expanded":
        return values[:1].expand(rows, cols)
    return values.clone()


LAYOUTS_3D = ("contiguous", "permuted", "strided_n", "strided_d", "offset", "expanded")


def _layout_3d(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (B, N, D) viewed in ``layout`` (see :func:`_layout_2d`; "expanded" repeats
    set 0 along the batch, stride 0)."""
    batch, n, dim = values.shape
    nan = float("nan")
    if layout == "permuted":  # storage (D, N, B)
        return values.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    if layout == "strided_n":
        buf = values.new_full((batch, 2 * n, dim), nan)
        buf[:, ::2] = values
        return buf[:, ::2]
    if layout == "strided_d":
        buf = values.new_full((batch, n, 2 * dim), nan)
        buf[..., 1::2] = values
        return buf[..., 1::2]
    if layout == "offset":
        buf = values.new_full((values.numel() + 5,), nan)
        view = buf[5:].view(batch, n, dim)
        view.copy_(values)
        return view
    if layout == "expanded":
        return values[:1].expand(batch, n, dim)
    return values.clone()


# ---------------------------------------------------------------------------------------------
# topn_create
# ---------------------------------------------------------------------------------------------

TOPN_NAMES = ("query", "angles", "table", "bias", "film")


class TopNCase:
    """One topn_create problem: inputs (leaves), n, keyword arguments, and a description of
    how it was drawn (its repr, printed for a failing example)."""

    def __init__(self, inputs, n, kwargs, dtype, description):
        self.inputs, self.n, self.kwargs = inputs, n, kwargs
        self.dtype, self.description = dtype, description

    def __repr__(self) -> str:
        return f"TopNCase({self.description})"

    @property
    def sizes(self) -> torch.Tensor:
        batch = self.inputs[0].shape[0]
        if isinstance(self.n, torch.Tensor):
            return self.n.to(torch.int64).expand(batch)
        return torch.full((batch,), self.n)


def _angle_rows(g: torch.Generator, rows: int, a: int, kind: str) -> torch.Tensor:
    """float64 (rows, a): normal; "wide": rows scaled by 10^U(-3, 3); "integer": entries in
    {-2..2} (many exactly equal directions, some zero rows)."""
    if kind == "integer":
        return torch.randint(-2, 3, (rows, a), generator=g).double()
    values = torch.randn(rows, a, generator=g, dtype=F64)
    if kind == "wide":
        values *= 10 ** (6 * torch.rand(rows, 1, generator=g, dtype=F64) - 3)
    return values


@st.composite
def topn_cases(draw, *, max_batch: int, max_n0: int, max_a: int, max_d: int, dtypes) -> TopNCase:
    batch, n0 = draw(_size(1, max_batch)), draw(_size(1, max_n0))
    a, d = draw(_size(1, max_a)), draw(_size(1, max_d))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(SEEDS))
    kind = draw(st.sampled_from(["normal", "wide", "integer"]))
    angles, query = _angle_rows(g, n0, a, kind), _angle_rows(g, batch, a, kind)
    index = st.integers(0, n0 - 1)
    # exact duplicates, near duplicates (clustered scores), zero rows
    for src, dst in draw(st.lists(st.tuples(index, index), max_size=4)):
        angles[dst] = angles[src]
    near = st.tuples(index, index, st.sampled_from([1e-9, 1e-7, 1e-5, 1e-3]))
    for src, dst, rel in draw(st.lists(near, max_size=3)):
        noise = torch.randn(a, generator=g, dtype=F64)
        angles[dst] = angles[src] + rel * angles[src].norm() * noise
    for row in draw(st.lists(index, max_size=2)):
        angles[row] = 0.0
    for b, src in draw(st.lists(st.tuples(st.integers(0, batch - 1), index), max_size=2)):
        query[b] = angles[src] * 3.0  # the query points at a reference angle: score 1
    for b in draw(st.lists(st.integers(0, batch - 1), max_size=1)):
        query[b] = 0.0  # every score 0
    if dtype == torch.float16:  # a zero row's gradient (1e12 times the others, from the
        for rows in (angles, query):  # normalisation's clamp) overflows float16 to inf
            rows[rows.norm(dim=1) == 0] = 1.0
    scale = draw(st.sampled_from([0.01, 1.0] if dtype == torch.float16 else [0.01, 1.0, 100.0]))
    table, bias, film = (
        scale * torch.randn(shape, generator=g, dtype=F64)
        for shape in [(n0, d), (batch, d), (4, d)]
    )
    layouts = [draw(st.sampled_from(LAYOUTS_2D)) for _ in TOPN_NAMES]
    grads = draw(st.one_of(st.just([True] * 5), st.lists(st.booleans(), min_size=5, max_size=5)))
    inputs = [
        _layout_2d(t.to(dtype), layout).requires_grad_(grad)
        for t, layout, grad in zip((query, angles, table, bias, film), layouts, grads, strict=True)
    ]

    n_kind = draw(st.sampled_from(["int", "tensor", "tensor", "strided", "expanded"]))
    if n_kind == "int":
        n = draw(_size(1, n0))
        largest = n
    else:
        values = draw(st.lists(_size(1, n0), min_size=batch, max_size=batch))
        n_dtype = draw(st.sampled_from([torch.int64, torch.int32] + [torch.uint8] * (n0 < 256)))
        if n_kind == "expanded":  # one size for every set, stride 0 (and as a 0-d tensor)
            n = torch.tensor(values[:1], dtype=n_dtype).expand(batch)
        elif n_kind == "strided":
            n = torch.tensor(values, dtype=n_dtype).repeat_interleave(2)[::2]
        else:
            n = torch.tensor(values, dtype=n_dtype)
        largest = int(n.max())
    n_max = draw(st.one_of(st.none(), st.integers(largest, largest + 3)))  # may pass n0
    kwargs = {
        "n_max": n_max,
        "score_norm": draw(st.sampled_from(["selected", "all"])),
        "sorted": draw(st.booleans()),
    }
    description = {
        "B": batch,
        "n0": n0,
        "a": a,
        "d": d,
        "dtype": dtype,
        "values": kind,
        "scale": scale,
        "layouts": layouts,
        "requires_grad": grads,
        "n": n,
        **kwargs,
    }
    return TopNCase(inputs, n, kwargs, dtype, description)


TOPN_RTOL = {F32: (1e-5, 1e-4), F64: (1e-12, 1e-10)}


def _cancellation_floors(case: TopNCase, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of query and angles in float64 at the selection ``index``, and per row
    the scale of the terms they are summed from (float64, (B,) and (n0,)).

    Both are sums over the scores' gradients ds, projected off the direction of their row and
    divided by its norm: ``g_q[b] = P(sum_j ds_bj an_j) / |q_b|``, ``g_a[j] = P(sum_b ds_bj
    qn_b) / |a_j|``. Where they cancel to (nearly) 0 - a=1, where every direction is +-1;
    identical or near-identical angle rows, whose ds sum to 0 - what is left is rounding, a
    few eps times these scales, whatever the tensor's own largest entry. ds_bj is bounded by
    |ds_bj| + p_bj * sum_k w_bk |gw_bk| (the softmax's terms, gw the weights' gradient).
    """
    q, an, table, bias, film = (t.detach().double().requires_grad_() for t in case.inputs)
    captured = []
    cosine_scores = reference._cosine_scores

    def capture(query, angles):
        captured.append(cosine_scores(query, angles))
        return captured[-1]

    reference._cosine_scores = capture  # to read the gradient of the scores
    try:
        at = reference.topn_create_at(
            q, an, table, bias, index, film, score_norm=case.kwargs["score_norm"]
        )
    finally:
        reference._cosine_scores = cosine_scores
    g = torch.Generator().manual_seed(7)  # the upstream gradients of helpers.topn_grads
    gx = torch.randn(at[0].shape, generator=g).double()
    gw_up = torch.randn(at[3].shape, generator=g).double()
    loss = (at[0] * gx).sum() + (at[3] * gw_up).sum()
    g_q, g_a, ds, gw = torch.autograd.grad(loss, [q, an, captured[0], at[3]])
    w, mask = at[3].detach(), index >= 0
    if case.kwargs["score_norm"] == "all":
        p = torch.softmax(captured[0].detach(), dim=1)
    else:
        p = torch.zeros_like(ds).scatter_add(1, index.clamp_min(0), torch.where(mask, w, 0.0))
    terms = ds.abs() + p * (w.abs() * gw.abs()).sum(1, keepdim=True)  # (B, n0)
    q_norm, a_norm = q.detach().norm(dim=1), an.detach().norm(dim=1)
    unit_q, unit_a = (q_norm > 0).double(), (a_norm > 0).double()
    scale_q = (terms * unit_a[None, :]).sum(1) / q_norm.clamp_min(1e-12)
    scale_a = (terms * unit_q[:, None]).sum(0) / a_norm.clamp_min(1e-12)
    return g_q, g_a, scale_q, scale_a


def _assert_close_with_floor(actual, expected, rtol: float, floor) -> None:
    """assert_close_scaled's bound, plus ``floor`` (a number, or a tensor that broadcasts) for
    the rounding left where a sum cancels."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    want = expected.detach().double()
    scale = want.abs().max() if want.numel() else 0.0
    bound = rtol * (want.abs() + scale) + floor
    error = (actual.detach().double() - want).abs()
    assert (error <= bound).all(), (
        f"greatest excess {(error - bound).max().item():.3g} (error {error.max().item():.3g},"
        f" floor {torch.as_tensor(floor).max().item():.3g}): {actual} vs {expected}"
    )


def _check_topn(backend: str, case: TopNCase) -> tk.TopNOutput:
    """``backend`` against the reference with ``assert_topn_matches_reference``; the
    gradients of query and angles that cancel to (nearly) 0 are compared separately with a
    floor for their rounding (:func:`_cancellation_floors`), not relative to their own max."""
    note(f"topn case: {case.description}")
    inputs, n, kwargs = case.inputs, case.n, case.kwargs
    before = [t.detach().clone() for t in inputs]
    if case.dtype in LOW:  # both compute in float32 and round once: one unit in the last place
        rtol = grad_rtol = torch.finfo(case.dtype).eps
    else:
        rtol, grad_rtol = TOPN_RTOL[case.dtype]
    eps = torch.finfo(F64 if case.dtype == F64 else F32).eps
    with torch.no_grad():
        ref_index = reference.topn_create(*inputs[:4], n, inputs[4], **kwargs)[2]
    g_q, g_a, scale_q, scale_a = _cancellation_floors(case, ref_index)
    n0, a = inputs[1].shape
    floors = {0: 4 * (n0 + a + 8) * eps * scale_q, 1: 4 * (n0 + a + 8) * eps * scale_a}
    cancelled = [
        i
        for i, (grad, scale) in enumerate([(g_q, scale_q), (g_a, scale_a)])
        if inputs[i].requires_grad and 16 * eps * scale.max() > grad_rtol / 2 * grad.abs().max()
    ]
    note(f"gradients compared with a rounding floor: {[TOPN_NAMES[i] for i in cancelled]}")
    for i in cancelled:
        inputs[i].requires_grad_(False)
    try:
        out = assert_topn_matches_reference(
            backend, inputs, n, rtol=rtol, grad_rtol=grad_rtol, **kwargs
        )
    finally:
        for i in cancelled:
            inputs[i].requires_grad_(True)
    if cancelled:
        got, grads = run_topn(backend, inputs, n, **kwargs)
        assert torch.equal(got.index, out.index)
        at = reference.topn_create_at(
            *inputs[:4], got.index, inputs[4], score_norm=kwargs["score_norm"]
        )
        want = topn_grads(at, inputs)
        leaves = [i for i, t in enumerate(inputs) if t.requires_grad]
        for i in cancelled:
            k = leaves.index(i)
            _assert_close_with_floor(grads[k], want[k], grad_rtol, floors[i][:, None])
    batch, d = inputs[0].shape[0], inputs[2].shape[1]
    n_max = kwargs["n_max"]
    n_max = int(case.sizes.max()) if n_max is None else n_max
    assert out.x.shape == (batch, n_max, d) and out.index.shape == (batch, n_max)
    assert out.x.dtype == case.dtype and out.index.dtype == torch.int64
    assert torch.equal(out.mask.sum(1), case.sizes)
    assert out.x.isfinite().all() and out.weight.isfinite().all()
    for name, old, new in zip(TOPN_NAMES, before, inputs, strict=True):
        assert torch.equal(old, new.detach()), f"{name} was modified"
    return out


@_examples(1.0)
@given(case=topn_cases(max_batch=6, max_n0=40, max_a=6, max_d=10, dtypes=[F32, F64, *LOW]))
def test_topn_create_native_matches_reference(case):
    out = _check_topn("native", case)
    if isinstance(case.n, torch.Tensor) and case.n.stride(0) == 0:  # n as a 0-d tensor
        query, angles, table, bias, film = case.inputs
        scalar = tk.topn_create(
            query, angles, table, bias, case.n[0], film, backend="native", **case.kwargs
        )
        for got, want in zip(scalar, out, strict=True):
            assert torch.equal(got, want)
    # deterministic, and finite gradients for finite inputs (not float16, whose range a
    # gradient 1e3 times the upstream's, from a row of norm 1e-3, may leave)
    first, first_grads = run_topn("native", case.inputs, case.n, **case.kwargs)
    again, again_grads = run_topn("native", case.inputs, case.n, **case.kwargs)
    for got, want in zip([*again, *again_grads], [*first, *first_grads], strict=True):
        assert torch.equal(got, want), "native topn_create is not deterministic"
    assert torch.equal(first.index, out.index)
    if case.dtype != torch.float16:
        assert all(g.isfinite().all() for g in first_grads)


@_examples(0.2)
@given(case=topn_cases(max_batch=3, max_n0=9, max_a=3, max_d=5, dtypes=[F32, F64, *LOW]))
def test_topn_create_triton_matches_reference(case):
    """Triton's interpreter on CPU tensors (tests/conftest.py): slow, so tiny shapes."""
    _check_topn("triton", case)


# ---------------------------------------------------------------------------------------------
# losses and penalties
# ---------------------------------------------------------------------------------------------

# (point dim D, dtype): KeOps compiles every formula per (D, dtype), ~15 s each. D=3 in both
# dtypes (the other loss tests compile most of those formulas too), D=1 in float64 only.
LOSS_KINDS = ((3, F32), (3, F64), (1, F64))


@st.composite
def lengths_for(draw, batch: int, size: int, minimum: int):
    """None, or integer set lengths in [minimum, size]: a (B,) tensor or a 0-d one."""
    kind = draw(st.sampled_from(["none", "tensor", "tensor", "0-d"]))
    if kind == "none":
        return None
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    if kind == "0-d":
        return torch.tensor(draw(_size(minimum, size)), dtype=dtype)
    values = draw(st.lists(_size(minimum, size), min_size=batch, max_size=batch))
    return torch.tensor(values, dtype=dtype)


def _full_lengths(lengths: torch.Tensor | None, batch: int, size: int) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), size)
    return lengths.to(torch.int64).expand(batch)


def _for_reference(lengths: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Lengths as the public functions pass them on: int64 (B,) (the reference takes no 0-d)."""
    return None if lengths is None else lengths.to(torch.int64).expand(batch).contiguous()


@st.composite
def point_sets(
    draw, batch: int, size: int, dim: int, lengths, dtype, *, grad: bool = True, scale=None
):
    """(B, N, D) padded sets (normal points times ``scale``, drawn when None) in a random
    layout, padding poisoned (NaN, inf, -1e30), some points of a set coinciding; a leaf."""
    g = torch.Generator().manual_seed(draw(SEEDS))
    full = _full_lengths(lengths, batch, size)
    layout = draw(st.sampled_from(LAYOUTS_3D))
    largest = int(full.max()) if batch else size
    sets = 1 if layout == "expanded" else batch
    values = torch.randn(sets, size, dim, generator=g, dtype=F64)
    values *= draw(st.sampled_from([0.1, 1.0, 4.0])) if scale is None else scale
    coincide = st.tuples(st.integers(0, max(sets - 1, 0)), st.integers(0, 99))
    for b, j in draw(st.lists(coincide, max_size=2 if sets else 0)):
        real = int(full[b]) if layout != "expanded" else largest
        if real >= 2:  # point j copies point 0 of its set
            values[b, 1 + j % (real - 1)] = values[b, 0]
    for b in range(sets):  # poison: what padding holds must never matter
        real = int(full[b]) if layout != "expanded" else largest
        for j in range(real, size):
            values[b, j] = POISON[j % len(POISON)]
    x = _layout_3d(values.to(dtype), layout)
    if layout == "expanded":
        x = x.expand(batch, size, dim)
    note(f"points {tuple(x.shape)} {dtype} layout={layout} lengths={lengths}")
    return x.requires_grad_(grad)


class PairCase:
    """Two padded batches x, y (leaves) with their lengths."""

    def __init__(self, x, y, x_lengths, y_lengths, dtype):
        self.x, self.y, self.x_lengths, self.y_lengths = x, y, x_lengths, y_lengths
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"PairCase(x {tuple(self.x.shape)} stride {self.x.stride()}, y "
            f"{tuple(self.y.shape)} stride {self.y.stride()}, x_lengths={self.x_lengths}, "
            f"y_lengths={self.y_lengths}, {self.dtype})"
        )


@st.composite
def pair_cases(draw, *, max_batch: int = 4, max_size: int = 7) -> PairCase:
    """Two ragged batches x (B, N, D), y (B, M, D) with lengths in [1, N] / [1, M]; sometimes
    y holds some of x's points, or is x itself."""
    batch, n, m = draw(_size(1, max_batch)), draw(_size(1, max_size)), draw(_size(1, max_size))
    dim, dtype = draw(st.sampled_from(LOSS_KINDS))
    x_lengths = draw(lengths_for(batch, n, 1))
    x = draw(point_sets(batch, n, dim, x_lengths, dtype))
    relation = draw(st.sampled_from(["independent", "independent", "shared", "identical"]))
    if relation == "identical":
        y_lengths, m = x_lengths, n
        y = x.detach().clone().requires_grad_(draw(st.booleans()))
    else:
        y_lengths = draw(lengths_for(batch, m, 1))
        y = draw(point_sets(batch, m, dim, y_lengths, dtype, grad=draw(st.booleans())))
        if relation == "shared":  # y's first point is x's first point, in every set
            shared = y.detach().clone()
            shared[:, 0] = x.detach()[:, 0]
            y = shared.requires_grad_(y.requires_grad)
    note(f"relation={relation}")
    return PairCase(x, y, x_lengths, y_lengths, dtype)


def _upstream(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _value_and_grads(fn, inputs, seed: int):
    """fn(*inputs) -> value or (value, ...); the gradients of <value, g> (g seeded random)
    with respect to the inputs that require them (None for the others)."""
    out = fn(*inputs)
    value = out[0] if isinstance(out, tuple) else out
    g = _upstream(value.shape, seed)
    leaves = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad((value * g.to(value.dtype)).sum(), leaves))
    return out, [next(grads) if t.requires_grad else None for t in inputs]


def _coincident_sums(grad: torch.Tensor, x: torch.Tensor, lengths) -> torch.Tensor:
    """Each real point's gradient replaced by the sum over the real points of its set that
    coincide with it: where a nearest neighbour (or a k-th nearest) is one of several equal
    points, backends may pick any of them, and only this sum is defined."""
    out = grad.clone()
    full = _full_lengths(lengths, x.shape[0], x.shape[1])
    for b in range(x.shape[0]):
        pts = x.detach()[b, : int(full[b])]
        same = (pts[:, None, :] == pts[None, :, :]).all(-1).to(grad.dtype)
        out[b, : int(full[b])] = same @ grad[b, : int(full[b])]
    return out


def _real_points(x: torch.Tensor, lengths) -> torch.Tensor:
    """(P, D) float64: the real points of a padded batch."""
    full = _full_lengths(lengths, x.shape[0], x.shape[1])
    return x.detach()[torch.arange(x.shape[1])[None, :] < full[:, None]].double()


def _check_grads(
    grads, ref_grads, inputs, lengths, rtol: float, *, ties: bool, floor: float = 0.0
) -> None:
    """Finite everywhere, zero on padding, close to the reference's (plus ``floor``)."""
    for got, want, x, lens in zip(grads, ref_grads, inputs, lengths, strict=True):
        if got is None:
            assert want is None
            continue
        assert got.shape == x.shape and got.dtype == x.dtype
        assert got.isfinite().all(), "non-finite gradient"
        full = _full_lengths(lens, x.shape[0], x.shape[1])
        padding = torch.arange(x.shape[1])[None, :] >= full[:, None]
        assert (got[padding] == 0).all(), "padding got a gradient"
        if ties:
            got, want = _coincident_sums(got, x, lens), _coincident_sums(want, x, lens)
        if floor:
            _assert_close_with_floor(got, want, rtol, floor)
        else:
            assert_close_scaled(got, want, rtol)


LOSS_RTOL = {F32: 1e-5, F64: 1e-12}
SINKHORN_RTOL = {F32: 1e-4, F64: 1e-10}
BATCH_REDUCTIONS = ["mean", "sum", "none"]


def _check_nearest(index, ref_index, src, dst) -> None:
    """Nearest-neighbour indices equal the reference's, but where two points of ``dst`` are
    at the same distance: the chosen one must then be as near (float64 recomputation)."""
    if torch.equal(index, ref_index):
        return
    assert torch.equal(index < 0, ref_index < 0), "padding indices differ"
    for b, i in (index != ref_index).nonzero().tolist():
        p = src.detach()[b, i].double()
        got = (p - dst.detach()[b, int(index[b, i])].double()).square().sum()
        want = (p - dst.detach()[b, int(ref_index[b, i])].double()).square().sum()
        assert torch.isclose(got, want, rtol=1e-5, atol=0), (b, i, got, want)


@_examples(0.6)
@given(
    case=pair_cases(),
    backend=st.sampled_from(["keops", "reference", "native"]),
    point_reduction=st.sampled_from(["mean", "sum", "max"]),
    batch_reduction=st.sampled_from(BATCH_REDUCTIONS),
    return_index=st.booleans(),
    weighted=st.booleans(),
    seed=SEEDS,
)
def test_chamfer_matches_reference(
    case, backend, point_reduction, batch_reduction, return_index, weighted, seed
):
    # the native Chamfer has the point reductions mean and sum, without indices
    assume(backend != "native" or (point_reduction != "max" and not return_index))
    batch = case.x.shape[0]
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kwargs = {
        "point_reduction": point_reduction,
        "batch_reduction": batch_reduction,
        "return_index": return_index,
        "weights": weights.to(case.dtype) if weighted else None,
    }
    inputs, lengths = [case.x, case.y], [case.x_lengths, case.y_lengths]
    out, grads = _value_and_grads(
        lambda x, y: tk.chamfer_loss(x, y, *lengths, backend=backend, **kwargs), inputs, seed
    )
    ref_lengths = [_for_reference(t, case.x.shape[0]) for t in lengths]
    ref, ref_grads = _value_and_grads(
        lambda x, y: reference.chamfer_loss(x, y, *ref_lengths, **kwargs), inputs, seed
    )
    if return_index:
        (out, x_nn, y_nn), (ref, x_ref, y_ref) = out, ref
        assert x_nn.dtype == torch.int64 and x_nn.shape == case.x.shape[:2]
        assert y_nn.shape == case.y.shape[:2]
        _check_nearest(x_nn, x_ref, case.x, case.y)
        _check_nearest(y_nn, y_ref, case.y, case.x)
    assert out.dtype == case.dtype and out.shape == ref.shape
    assert out.isfinite().all()
    assert_close_scaled(out, ref, LOSS_RTOL[case.dtype])
    _check_grads(grads, ref_grads, inputs, lengths, LOSS_RTOL[case.dtype], ties=True)


@pytest.mark.parametrize("backend", ["native", "keops"])
@_examples(0.5)
@given(
    case=pair_cases(),
    p=st.sampled_from([1, 2]),
    blur=st.sampled_from([0.05, 0.1, 0.5, 2.0]),
    scaling=st.sampled_from([0.3, 0.5, 0.8]),
    diameter=st.sampled_from([None, None, 0.5, 6.0]),
    debias=st.booleans(),
    batch_reduction=st.sampled_from(BATCH_REDUCTIONS),
    seed=SEEDS,
)
def test_sinkhorn_matches_reference(
    backend, case, p, blur, scaling, diameter, debias, batch_reduction, seed
):
    kwargs = {
        "p": p,
        "blur": blur,
        "scaling": scaling,
        "diameter": diameter,
        "debias": debias,
        "batch_reduction": batch_reduction,
    }
    inputs, lengths = [case.x, case.y], [case.x_lengths, case.y_lengths]
    out, grads = _value_and_grads(
        lambda x, y: tk.sinkhorn_loss(x, y, *lengths, backend=backend, **kwargs), inputs, seed
    )
    ref_lengths = [_for_reference(t, case.x.shape[0]) for t in lengths]
    ref, ref_grads = _value_and_grads(
        lambda x, y: reference.sinkhorn_loss(x, y, *ref_lengths, **kwargs), inputs, seed
    )
    assert out.dtype == case.dtype and out.shape == ref.shape
    assert out.isfinite().all()
    # the gradients are softmax averages at temperature eps = blur^p: costs up to C carry
    # rounding eps_dtype * C / eps into them (float32 at scale 4 and blur 0.05: 1e-3, for
    # the reference too)
    real = torch.cat([_real_points(case.x, case.x_lengths), _real_points(case.y, case.y_lengths)])
    cost = (real.amax(0) - real.amin(0)).norm().item() ** p / p if real.numel() else 0.0
    conditioning = 4 * torch.finfo(case.dtype).eps * cost / blur**p
    rtol = max(SINKHORN_RTOL[case.dtype], conditioning)
    # where a value or a gradient cancels to ~0 (debiasing, symmetric points), its rounding is
    # judged at the problem's scale: a few eps of the costs (~C per set) for the value (eps
    # times the rounding of an exponent: not amplified), |upstream| diameter^(p-1) times the
    # tolerance for the gradients
    eps, batch = torch.finfo(case.dtype).eps, max(case.x.shape[0], 1)
    _assert_close_with_floor(out, ref, SINKHORN_RTOL[case.dtype], 64 * eps * batch * cost)
    upstream = _upstream(out.shape, seed).abs().max().item() if out.numel() else 0.0
    floor = rtol * upstream * max(cost * p, 1e-30) ** ((p - 1) / p)
    _check_grads(grads, ref_grads, inputs, lengths, rtol, ties=False, floor=floor)


@st.composite
def penalty_cases(draw, *, max_batch: int = 5, max_size: int = 8):
    """A ragged batch for the penalties: lengths in [0, N] (empty sets are legal; now and
    then no set, or sets of no point, B=0 or N=0)."""
    batch, n = draw(_size(1, max_batch)), draw(_size(1, max_size))
    empty = draw(st.integers(0, 15))
    batch, n = (0 if empty == 1 else batch), (0 if empty == 2 else n)
    dim, dtype = draw(st.sampled_from(LOSS_KINDS))
    lengths = draw(lengths_for(batch, n, 0))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    # a distance parameter around the typical distance between two points, sqrt(2D) scale
    distance = draw(st.floats(0.1, 2.0)) * scale * math.sqrt(2 * dim)
    return draw(point_sets(batch, n, dim, lengths, dtype, scale=scale)), lengths, dtype, distance


@pytest.mark.parametrize("backend", ["native", "keops"])
@_examples(0.4)
@given(case=penalty_cases(), seed=SEEDS)
def test_repulsion_penalty_matches_reference(backend, case, seed):
    x, lengths, dtype, min_dist = case
    ref_lengths = _for_reference(lengths, x.shape[0])
    out, grads = _value_and_grads(
        lambda x: tk.repulsion_penalty(x, lengths, min_dist=min_dist, backend=backend), [x], seed
    )
    ref, ref_grads = _value_and_grads(
        lambda x: reference.repulsion_penalty(x, ref_lengths, min_dist=min_dist), [x], seed
    )
    assert out.dtype == dtype and out.shape == (x.shape[0],) and out.isfinite().all()
    assert_close_scaled(out, ref, LOSS_RTOL[dtype])
    _check_grads(grads, ref_grads, [x], [lengths], LOSS_RTOL[dtype], ties=False)


@pytest.mark.parametrize("backend", ["native", "keops"])
@_examples(0.4)
@given(
    case=penalty_cases(),
    max_valency=st.sampled_from([0, 2, 4, 6]),  # KeOps compiles per K: a fixed set
    seed=SEEDS,
)
def test_valency_penalty_matches_reference(backend, case, max_valency, seed):
    x, lengths, dtype, neighbor_dist = case
    ref_lengths = _for_reference(lengths, x.shape[0])
    kwargs = {"neighbor_dist": neighbor_dist, "max_valency": max_valency}
    out, grads = _value_and_grads(
        lambda x: tk.valency_penalty(x, lengths, backend=backend, **kwargs), [x], seed
    )
    ref, ref_grads = _value_and_grads(
        lambda x: reference.valency_penalty(x, ref_lengths, **kwargs), [x], seed
    )
    assert out.dtype == dtype and out.shape == (x.shape[0],) and out.isfinite().all()
    # KeOps sums the terms over all other points, then subtracts those of the k nearest:
    # where nothing is left (no term past the k-th), the rounding of that difference is left,
    # a few eps of the terms (each <= neighbor_dist, gradient <= 1 per pair)
    eps, size = torch.finfo(dtype).eps, x.shape[1]
    floor = 8 * eps * size**2 * neighbor_dist
    _assert_close_with_floor(out, ref, LOSS_RTOL[dtype], floor)
    floor = 8 * eps * size * (_upstream(out.shape, seed).abs().max().item() if out.numel() else 0)
    # coincident points are equally near: which of them counts among the k nearest is free
    _check_grads(grads, ref_grads, [x], [lengths], LOSS_RTOL[dtype], ties=True, floor=floor)


@given(
    batch=st.sampled_from([0, 0, 2]),
    n0=st.sampled_from([0, 3]),
    a=st.sampled_from([0, 2]),
    d=st.sampled_from([0, 3]),
    n_max=st.sampled_from([None, 2]),
    score_norm=st.sampled_from(["selected", "all"]),
    backend=st.sampled_from(["reference", "native", "triton"]),
)
@_examples(0.5)
def test_topn_create_empty_dimensions(batch, n0, a, d, n_max, score_norm, backend):
    """B=0, n0=0, a=0 or d=0: the backends agree with the reference (x, index, weight and
    gradients), or every one of them rejects the call with a TypeError/ValueError."""
    g = torch.Generator().manual_seed(1)
    shapes = [(batch, a), (n0, a), (n0, d), (batch, d), (4, d)]
    inputs = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    n = torch.full((batch,), min(n0, 2), dtype=torch.int64)
    kwargs = {"n_max": n_max, "score_norm": score_norm}
    results = {}
    for name in ("reference", backend):
        try:
            out = tk.topn_create(*inputs[:4], n, inputs[4], backend=name, **kwargs)
            g = torch.Generator().manual_seed(3)
            up_x = torch.randn(out.x.shape, generator=g)
            up_w = torch.randn(out.weight.shape, generator=g)
            loss = (out.x * up_x).sum() + (out.weight * up_w).sum()
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            grads = [
                torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)
            ]
            results[name] = (out, grads)
        except (TypeError, ValueError) as err:
            results[name] = err
    note(repr(results))
    ref, got = results["reference"], results[backend]
    if isinstance(ref, Exception) or isinstance(got, Exception):
        assert type(ref) is type(got), results
        return
    for x, y in zip([*got[0], *got[1]], [*ref[0], *ref[1]], strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert_close_scaled(x.double(), y.double(), 1e-5)


@given(
    op=st.sampled_from(["chamfer_loss", "sinkhorn_loss", "repulsion_penalty", "valency_penalty"]),
    backend=st.sampled_from(["reference", "keops", "native"]),
    shape=st.sampled_from([(0, 3), (2, 0), (0, 0)]),
    which=st.sampled_from(["x", "y"]),
    batch_reduction=st.sampled_from(["none", "sum"]),
)
@_examples(0.5)
def test_losses_on_no_sets_or_empty_sets(op, backend, shape, which, batch_reduction):
    """B=0 (no set) or N=0 (sets of no point, lengths None). The penalties and chamfer take
    both (0 per set, as PyTorch3D's chamfer_distance). sinkhorn needs a point per set: N=0
    must raise a ValueError naming the empty input; B=0 gives no value per set (an empty (0,)
    tensor with "none", 0 summed)."""
    if backend == "native" and op != "sinkhorn_loss":
        backend = "keops"
    batch, size = shape
    pair = op in ("chamfer_loss", "sinkhorn_loss")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, size if which == "x" or not pair else 3, 3, generator=g)
    args = [x]
    kwargs = {"backend": backend}
    if pair:
        args.append(torch.randn(batch, size if which == "y" else 3, 3, generator=g))
        kwargs["batch_reduction"] = batch_reduction
    call = lambda: getattr(tk, op)(*args, **kwargs)  # noqa: E731
    if op == "sinkhorn_loss" and size == 0 and batch > 0:
        _expect_rejection(call, which)
        return
    value = call()
    if not pair or batch_reduction == "none":
        assert torch.equal(value, torch.zeros(batch))
    else:
        assert value.item() == 0


# ---------------------------------------------------------------------------------------------
# validation: bad arguments raise a TypeError/ValueError naming them, before any kernel
# ---------------------------------------------------------------------------------------------

META = torch.device("meta")
OTHER_FLOAT = {F32: F64, F64: F32, torch.float16: F32, torch.bfloat16: torch.float16}


def _bad_tensors(t: torch.Tensor, *, alone: bool = False):
    """Wrong kinds, dtypes, ranks and devices for a 2-D or 3-D float tensor ``t``; ``alone``:
    the function takes no other tensor (another float dtype or device is then legal)."""
    mixed = [] if alone else [t.to(OTHER_FLOAT[t.dtype]), torch.empty(t.shape, device=META)]
    return st.sampled_from(
        [
            *mixed,
            t.tolist(),
            None,
            1.0,
            t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy(),
            t.long(),
            t.bool(),
            t.to(torch.complex64) if t.dtype != torch.bfloat16 else t.int(),
            t[0],
            t[..., None],
        ]
    )


def _wrong_dim(t: torch.Tensor, axis: int, draw) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = draw(
        st.sampled_from([v for v in (0, 1, shape[axis] + 1, shape[axis] + 3) if v != shape[axis]])
    )
    return torch.zeros(shape, dtype=t.dtype)


def _bad_sizes(batch: int, upper: int):
    """Bad set sizes / lengths tensors for a batch of B with an upper bound."""
    wrong = [
        [1] * batch,
        (1,) * batch,
        torch.ones(batch),
        torch.ones(batch, dtype=torch.bool),
        torch.ones(batch + 1, dtype=torch.int64),
        torch.ones(batch, 2, dtype=torch.int64),
        torch.ones(batch, dtype=torch.int64, device=META),
        1.5,
        "2",
    ]
    return st.one_of(
        st.sampled_from(wrong),
        st.integers(0, batch - 1).flatmap(
            lambda b: st.sampled_from([-1, 0, upper + 1, 2**40]).map(
                lambda v: torch.ones(batch, dtype=torch.int64).index_fill(0, torch.tensor(b), v)
            )
        ),
    )


def _expect_rejection(call, name: str) -> None:
    """``call()`` raises a TypeError or ValueError whose message names ``name``."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert _named(str(info.value), name), f"the message does not name {name!r}: {info.value}"


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("sizes", [[-1], [-3, -1], [0, -2]], ids=str)
def test_topn_create_rejects_sizes_all_below_one(backend, sizes):
    """Found by the long profile of test_topn_create_rejects_bad_arguments: a tensor n whose
    every entry is below 1 (and no n_max) must raise the ValueError naming n."""
    g = torch.Generator().manual_seed(0)
    batch = len(sizes)
    query, angles = torch.randn(batch, 3, generator=g), torch.randn(5, 3, generator=g)
    table, bias, film = torch.randn(5, 4), torch.randn(batch, 4), torch.randn(4, 4)
    n = torch.tensor(sizes)
    call = lambda: tk.topn_create(query, angles, table, bias, n, film, backend=backend)  # noqa: E731
    _expect_rejection(call, "n")


@_examples(0.75)
@given(
    case=topn_cases(max_batch=4, max_n0=6, max_a=3, max_d=4, dtypes=[F32, F64, *LOW]),
    backend=st.sampled_from(["native", "triton", "reference"]),
    data=st.data(),
)
def test_topn_create_rejects_bad_arguments(case, backend, data):
    query, angles, table, bias, film = (t.detach() for t in case.inputs)
    batch, n0 = query.shape[0], angles.shape[0]
    kwargs = {
        "query": query,
        "angles": angles,
        "table": table,
        "bias": bias,
        "n": case.n,
        "film": film,
        **case.kwargs,
        "backend": backend,
    }
    draw = data.draw
    name = draw(st.sampled_from([*TOPN_NAMES, "shape", "n", "n_max", "score_norm", "sorted"]))
    if name in TOPN_NAMES:
        kwargs[name] = draw(_bad_tensors(kwargs[name]))  # mixed dtypes: both named
    elif name == "shape":
        name, axis, of = draw(
            st.sampled_from(
                [
                    ("angles", 1, "angles"),
                    ("table", 0, "table"),
                    ("bias", 0, "bias"),
                    ("bias", 1, "bias"),
                    ("film", 0, "film"),
                    ("film", 1, "film"),
                ]
            )
        )
        kwargs[name] = _wrong_dim(kwargs[of], axis, draw)
    elif name == "n":
        kwargs["n"] = draw(
            st.one_of(
                st.sampled_from([0, -1, n0 + 1, 2**63, 2.0, True, None]), _bad_sizes(batch, n0)
            )
        )
        kwargs["n_max"] = None
    elif name == "n_max":
        smallest = int(case.sizes.max())
        kwargs["n_max"] = draw(st.sampled_from([-1, smallest - 1, float(smallest), "3", True]))
    elif name == "score_norm":
        kwargs["score_norm"] = draw(st.sampled_from(["softmax", "", None, 1, "Selected"]))
    else:
        kwargs["sorted"] = draw(st.sampled_from([1, 0, None, "True", torch.tensor(True)]))
    note(f"bad {name}: {kwargs.get(name, '?')!r}")
    _expect_rejection(lambda: tk.topn_create(**kwargs), name)


@_examples(0.75)
@given(
    op=st.sampled_from(["chamfer_loss", "sinkhorn_loss", "repulsion_penalty", "valency_penalty"]),
    batch=_size(1, 3),
    n=_size(1, 4),
    backend=st.sampled_from(["auto", "reference", "keops", "native"]),
    data=st.data(),
)
def test_losses_reject_bad_arguments(op, batch, n, backend, data):
    draw = data.draw
    if backend == "native" and op != "sinkhorn_loss":
        backend = "keops"
    x = torch.randn(batch, n, 3, dtype=F64)
    pair = op in ("chamfer_loss", "sinkhorn_loss")
    kwargs = {"x": x, "backend": backend}
    names = ["x", "shape", "x_lengths" if pair else "lengths"]
    if pair:
        kwargs.update(y=torch.randn(batch, n + 1, 3, dtype=F64), x_lengths=None, y_lengths=None)
        names += ["y", "y_lengths", "batch_reduction"]
    names += {
        "chamfer_loss": ["point_reduction", "return_index"],
        "sinkhorn_loss": ["p", "blur", "scaling", "diameter", "debias"],
        "repulsion_penalty": ["min_dist"],
        "valency_penalty": ["neighbor_dist", "max_valency"],
    }[op]
    name = draw(st.sampled_from(names))
    if name in ("x", "y"):
        kwargs[name] = draw(_bad_tensors(kwargs[name], alone=not pair))  # mixed dtypes: both named
    elif name == "shape":
        if pair:
            name, axis = draw(st.sampled_from([("y", 0), ("y", 2)]))
            kwargs["y"] = _wrong_dim(kwargs["y"], axis, draw)
        else:
            return  # a penalty takes one tensor
    elif name.endswith("lengths"):
        size = n if name != "y_lengths" else n + 1
        bad = draw(_bad_sizes(batch, size))
        legal = (  # the penalties and chamfer take empty sets
            op != "sinkhorn_loss"
            and isinstance(bad, torch.Tensor)
            and bad.device.type == "cpu"
            and bad.dtype == torch.int64
            and bad.shape == (batch,)
            and 0 <= int(bad.min())
            and int(bad.max()) <= size
        )
        if legal:
            return
        kwargs[name] = bad
    elif name in ("blur", "min_dist", "neighbor_dist", "diameter"):
        kwargs[name] = draw(st.sampled_from([0, 0.0, -1.0, math.nan, -math.inf, "1", True, [1.0]]))
    elif name == "scaling":
        kwargs[name] = draw(st.sampled_from([0.0, 1.0, 1.5, -0.5, math.nan, math.inf, "0.5"]))
    elif name == "p":
        kwargs[name] = draw(st.sampled_from([0, 3, -1, 2.0, "2", None]))
    elif name == "max_valency":
        kwargs[name] = draw(st.sampled_from([-1, 2.5, "3", None]))
    elif name in ("debias", "return_index"):
        kwargs[name] = draw(st.sampled_from([1, 0, None, "yes"]))
    elif op == "chamfer_loss":  # reductions: also "max" and None, as PyTorch3D
        bad = ["", "Mean", 0, "min"] + (["max"] if name == "batch_reduction" else [])
        kwargs[name] = draw(st.sampled_from(bad))
    else:  # reductions
        kwargs[name] = draw(st.sampled_from(["max", "", None, "Mean", 0]))
    note(f"bad {name}: {kwargs.get(name, '?')!r}")
    _expect_rejection(lambda: getattr(tk, op)(**kwargs), name)


@_examples(0.25)
@given(
    backend=st.sampled_from(["reference", "native", "keops"]),
    p=st.sampled_from([1, 2]),
    blur=st.floats(1e-320, 1e308, allow_subnormal=True),
    scaling=st.floats(0.01, 0.9),
    diameter=st.one_of(st.none(), st.floats(1e-320, math.inf, allow_subnormal=True)),
)
def test_sinkhorn_extreme_parameters_give_a_value_or_a_clean_error(
    backend, p, blur, scaling, diameter
):
    """Any blur and diameter > 0 (as documented): a finite value, or a ValueError naming the
    argument; not NaN, not an OverflowError or a RuntimeError from inside the computation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g, dtype=F64)
    y = torch.randn(2, 3, 3, generator=g, dtype=F64)
    kwargs = {"p": p, "blur": blur, "scaling": scaling, "diameter": diameter}
    start = 10.0 if diameter is None else diameter if math.isfinite(diameter) else blur
    steps = math.log(max(start, blur) / blur) / -math.log(scaling)  # inf if that overflows
    if steps > 500:
        return  # a legal but very long schedule: not what this test is about
    try:
        value = tk.sinkhorn_loss(x, y, backend=backend, **kwargs)
    except (TypeError, ValueError) as err:
        assert _named(str(err), "blur") or _named(str(err), "diameter"), err
        return
    assert value.isfinite().all(), value
