"""Seeded test inputs and comparison helpers shared by the test modules: ``topn_create``
inputs and the tie-aware comparison of its backends (docs/operators.md, "Ranking"), devices,
ragged loss inputs with poisoned padding ("General rules"), the loss-versus-reference
comparison, and the bad-argument cases common to the losses ("Errors")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import topn_kernels as tk
from topn_kernels import reference

F64 = torch.float64
POISON = (float("nan"), float("inf"), -1e30)
TOPN_INPUTS = ("query", "angles", "table", "bias", "film")


def topn_inputs(
    batch: int,
    n0: int,
    a: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ties: bool = False,
    requires_grad: bool = False,
) -> list[Tensor]:
    """[query (B, a), angles (n0, a), table (n0, d), bias (B, d), film (4, d)].

    ``ties``: every third angle row repeats the row before it, so some scores are exactly
    equal and only the index order decides between them.
    """
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, a, generator=g)
    angles = torch.randn(n0, a, generator=g)
    if ties and n0 > 1:
        angles[1::3] = angles[0::3][: angles[1::3].shape[0]]
    table = torch.randn(n0, d, generator=g)
    bias = torch.randn(batch, d, generator=g)
    film = torch.randn(4, d, generator=g)
    tensors = [t.to(dtype) for t in (query, angles, table, bias, film)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def random_sizes(batch: int, low: int, high: int, seed: int = 0) -> Tensor:
    """int64 (B,) uniform in [low, high], with low and high both present when B >= 2."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (batch,), generator=g)
    if batch >= 2:
        sizes[0], sizes[-1] = low, high
    return sizes


def padded_sets(
    batch: int, size: int, dim: int, lengths: Tensor | None, *, seed: int = 0, poison: bool = True
) -> Tensor:
    """(B, size, D) normal points; rows past each length hold NaN, inf and -1e30 when poisoned."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, dim, generator=g, dtype=torch.float64)
    if lengths is not None and poison:
        for b in range(batch):
            for j in range(int(lengths[b]), size):
                x[b, j] = POISON[j % len(POISON)]
    return x


def assert_close_scaled(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """|actual - expected| <= rtol * (|expected| + max|expected|) elementwise, NaN == NaN.

    The absolute part is relative to the tensor's largest entry, so entries that cancel to
    near zero are judged at the scale of the computation rather than their own.
    """
    scale = expected.detach().abs().nan_to_num(posinf=0.0).max().item() if expected.numel() else 0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True
    )


# ---------------------------------------------------------------------------------------------
# topn_create: the tie-aware comparison every equivalence test uses
# ---------------------------------------------------------------------------------------------


def float64_scores(query: Tensor, angles: Tensor) -> Tensor:
    """(B, n0) cosine scores recomputed in float64; NaN becomes +inf (NaN ranks first)."""
    q, an = query.detach().double().cpu(), angles.detach().double().cpu()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    an = an / an.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (q @ an.T).nan_to_num(nan=math.inf)


def _tie_groups(scores: Tensor, tolerance: float) -> tuple[Tensor, Tensor]:
    """(order, group): the points of one set by decreasing score (ties by index), and each
    point's near-tie group, numbered along that order; neighbours in the order whose scores
    differ by at most ``tolerance`` share a group."""
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = scores[order]
    gaps = ranked[:-1] - ranked[1:]
    breaks = torch.cat([torch.zeros(1, dtype=torch.int64), (gaps > tolerance).long()])
    group = torch.empty_like(order)
    group[order] = breaks.cumsum(0)
    return order, group


def assert_valid_selection(
    index: Tensor, n: int | Tensor, query: Tensor, angles: Tensor, *, sorted: bool
) -> None:
    """``index`` (B, n_max) is a ranking that ``docs/operators.md`` allows.

    - padding: set b has ``n_b`` slots, then -1;
    - near ties: wherever neighbouring scores, recomputed in float64, differ by more than
      :func:`topn_kernels.reference.ranking_tolerance`, the selection (and, sorted, the slot
      order) is the exact ranking's; inside a group of near-equal scores any order goes;
    - exact ties: of exactly equal angle rows, the smaller indices are selected first and
      (sorted) come first.
    """
    index = index.cpu()
    batch, n_max = index.shape
    n0, a = angles.shape
    sizes = n.cpu() if isinstance(n, Tensor) else torch.full((batch,), n)
    expected_mask = torch.arange(n_max)[None, :] < sizes[:, None]
    assert torch.equal(index >= 0, expected_mask), "padding slots must hold -1, real ones >= 0"
    assert (index[~expected_mask] == -1).all()
    tolerance = reference.ranking_tolerance(a, query.dtype)
    tolerance += reference.ranking_tolerance(a, torch.float64)  # error of the recomputation
    scores = float64_scores(query, angles)
    _, duplicate_of = torch.unique(angles.detach().cpu(), dim=0, return_inverse=True)
    # rank of each point among the points with exactly its angle row, by index
    by_row = torch.sort(duplicate_of, stable=True).indices  # equal rows together, by index
    counts = torch.bincount(duplicate_of, minlength=n0)
    starts = counts.cumsum(0) - counts
    rank_among_equal = torch.empty(n0, dtype=torch.int64)
    rank_among_equal[by_row] = torch.arange(n0) - starts[duplicate_of[by_row]]
    for b in range(batch):
        nb = int(sizes[b])
        chosen = index[b, :nb]
        assert ((chosen >= 0) & (chosen < n0)).all(), f"set {b}: index out of range"
        assert chosen.unique().numel() == nb, f"set {b}: a point selected twice"
        order, group = _tie_groups(scores[b], tolerance)
        want = group[order[:nb]]
        if sorted:
            assert torch.equal(group[chosen], want), f"set {b}: not in decreasing score order"
        else:
            assert (chosen[1:] > chosen[:-1]).all(), f"set {b}: not in increasing index order"
            assert torch.equal(group[chosen].sort().values, want.sort().values), (
                f"set {b}: not the {nb} best scores"
            )
        classes = duplicate_of[chosen]
        taken = torch.bincount(classes, minlength=n0)
        assert (rank_among_equal[chosen] < taken[classes]).all(), (
            f"set {b}: of equal angle rows, a larger index was selected before a smaller one"
        )
        if sorted:
            by_class = torch.sort(classes, stable=True).indices
            seq, cls = chosen[by_class], classes[by_class]
            later = cls[1:] == cls[:-1]
            assert (seq[1:] > seq[:-1])[later].all(), (
                f"set {b}: equal angle rows are not in increasing index order"
            )


def run_topn(
    backend: str, inputs: list[Tensor], n: int | Tensor, **kwargs
) -> tuple[tk.TopNOutput, tuple[Tensor, ...]]:
    """``topn_create`` on ``backend``, and the gradients of ``<x, gx> + <weight, gw>`` for
    seeded random ``gx``, ``gw`` with respect to the inputs that require them."""
    out = tk.topn_create(*inputs[:4], n, inputs[4], backend=backend, **kwargs)
    return out, topn_grads(out, inputs)


def topn_grads(out, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """Gradients of ``<x, gx> + <weight, gw>`` (seeded gx, gw) for the inputs that need them."""
    leaves = [t for t in inputs if t.requires_grad]
    if not leaves:
        return ()
    g = torch.Generator().manual_seed(7)
    gx = torch.randn(out[0].shape, generator=g).to(out[0])
    gw = torch.randn(out[3].shape, generator=g).to(out[3])
    return torch.autograd.grad((out[0] * gx).sum() + (out[3] * gw).sum(), leaves)


def assert_topn_matches_reference(
    backend: str,
    inputs: list[Tensor],
    n: int | Tensor,
    *,
    rtol: float,
    grad_rtol: float | None = None,
    **kwargs,
) -> tk.TopNOutput:
    """``backend`` against the reference, tie-aware; returns the backend's output.

    Both selections must be rankings ``docs/operators.md`` allows (assert_valid_selection).
    The backend's x, weight and gradients are then compared with the reference evaluated at
    the backend's own selection (``reference.topn_create_at``): where the two rank a near tie
    differently, rows are compared point by point rather than slot by slot. Most of the time
    the two selections are equal and this is the plain comparison.
    """
    sorted = kwargs.get("sorted", True)
    query, angles = inputs[0], inputs[1]
    out, grads = run_topn(backend, inputs, n, **kwargs)
    ref = reference.topn_create(*inputs[:4], n, inputs[4], **kwargs)
    assert_valid_selection(ref[2], n, query, angles, sorted=sorted)
    assert_valid_selection(out.index, n, query, angles, sorted=sorted)
    assert torch.equal(out.mask, ref[1])
    score_norm = kwargs.get("score_norm", "selected")
    at = reference.topn_create_at(
        *inputs[:4], out.index.to(query.device), inputs[4], score_norm=score_norm
    )
    want_grads = topn_grads(at, inputs)
    assert out.x.dtype == at[0].dtype and out.weight.dtype == at[3].dtype
    assert_close_scaled(out.x, at[0], rtol)
    assert_close_scaled(out.weight, at[3], rtol)
    names = [name for name, t in zip(TOPN_INPUTS, inputs, strict=True) if t.requires_grad]
    for name, got, want in zip(names, grads, want_grads, strict=True):
        assert got.dtype == want.dtype, name
        assert_close_scaled(got, want, rtol if grad_rtol is None else grad_rtol)
    return out


# ---------------------------------------------------------------------------------------------
# devices: the Triton backend on CUDA where there is a GPU, else in its interpreter on CPU
# ---------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def device_for(backend: str) -> torch.device:
    """Where ``backend`` runs its tests: CUDA for triton on a GPU machine, else the CPU."""
    return torch.device("cuda" if backend == "triton" and CUDA else "cpu")


def on_device(device: torch.device, inputs: list[Tensor], n=None):
    """The inputs as leaves on ``device`` (keeping requires_grad), and ``n`` there too when
    given: ``inputs`` alone, or ``(inputs, n)``."""
    moved = [t.detach().to(device).requires_grad_(t.requires_grad) for t in inputs]
    if n is None:
        return moved
    return moved, n.to(device) if isinstance(n, Tensor) else n


# ---------------------------------------------------------------------------------------------
# losses and penalties on ragged batches
# ---------------------------------------------------------------------------------------------

X_LEN = torch.tensor([5, 1, 9, 3])  # real lengths of ragged_pair's x (padded to 9)
Y_LEN = torch.tensor([2, 7, 9, 4])  # and of its y


def ragged_pair(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x (4, 9, 3) and y (4, 9, 3), leaves requiring grad, real lengths X_LEN and Y_LEN,
    padding poisoned (NaN, inf, -1e30)."""
    x = padded_sets(4, 9, 3, X_LEN, seed=seed).to(dtype).requires_grad_()
    y = padded_sets(4, 9, 3, Y_LEN, seed=seed + 1).to(dtype).requires_grad_()
    return x, y


def small_loss_inputs() -> tuple[Tensor, Tensor]:
    """x (3, 6, 2) and y (3, 5, 2), float32, every row real: the valid call that the input
    validation tests alter one argument of."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 6, 2, generator=g), torch.randn(3, 5, 2, generator=g)


def assert_rows_match_alone(grad: Tensor, alone: list[Tensor], lengths: Tensor) -> None:
    """The gradient rows of each set's real points equal ``alone[b]`` (that set computed on
    its own), and padding rows are exactly zero."""
    for b, g in enumerate(alone):
        assert_close_scaled(grad[b, : lengths[b]], g, 1e-10)
        assert (grad[b, lengths[b] :] == 0).all()


def assert_loss_matches_reference(fn, inputs: list[Tensor], rtol: float, backend: str) -> None:
    """``fn(backend_name, *inputs)`` on ``backend`` against ``"reference"``.

    ``fn`` returns a tensor, or a tuple whose first item is the value and whose other items
    (indices) must be equal. Values and the gradients under a seeded random upstream gradient
    are compared with :func:`assert_close_scaled`; gradients must be finite, and zero at NaN
    (poisoned padding) inputs.
    """
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


META = torch.device("meta")

# bad arguments common to chamfer_loss and sinkhorn_loss (docs/operators.md, Errors):
# (changed arguments, error type, text the message must contain)
LOSS_VALIDATION_CASES = [
    pytest.param(changes, error, names, id=case_id)
    for case_id, changes, error, names in [
        ("x-2d", {"x": torch.randn(6, 2)}, ValueError, "x"),
        ("x-int", {"x": torch.ones(3, 6, 2, dtype=torch.int32)}, TypeError, "x"),
        ("y-D", {"y": torch.randn(3, 5, 3)}, ValueError, "y"),
        ("y-B", {"y": torch.randn(2, 5, 2)}, ValueError, "y"),
        ("y-dtype", {"y": torch.randn(3, 5, 2, dtype=torch.float64)}, TypeError, "y"),
        ("y-device", {"y": torch.empty(3, 5, 2, device=META)}, ValueError, "y"),
        ("x_lengths-zero", {"x_lengths": torch.tensor([1, 0, 6])}, ValueError, "x_lengths"),
        ("x_lengths-above-N", {"x_lengths": torch.tensor([1, 7, 6])}, ValueError, "x_lengths"),
        ("x_lengths-float", {"x_lengths": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "x_lengths"),
        ("x_lengths-size", {"x_lengths": torch.tensor([1, 2])}, ValueError, "x_lengths"),
        ("x_lengths-list", {"x_lengths": [1, 2, 3]}, TypeError, "x_lengths"),
        ("y_lengths-above-M", {"y_lengths": torch.tensor([1, 6, 5])}, ValueError, "y_lengths"),
        ("batch_reduction", {"batch_reduction": "max"}, ValueError, "batch_reduction"),
        ("backend-triton", {"backend": "triton"}, ValueError, "backend"),
    ]
]


def needs_native() -> None:
    """Skips the calling test when the native extension is not built."""
    from topn_kernels import native

    if not native.AVAILABLE:
        pytest.skip("the native extension is not built")


def assert_same_bits_on_one_thread(fn, inputs: list[Tensor]) -> None:
    """``fn(*inputs)`` (per-set values) and its gradients with the default thread count and
    with one thread are the same bits (the sums of the native kernels have a fixed order)."""
    results = []
    threads = torch.get_num_threads()
    for count in (threads, 1):
        torch.set_num_threads(count)
        try:
            value = fn(*inputs)
            results.append([value, *torch.autograd.grad(value.sum(), inputs)])
        finally:
            torch.set_num_threads(threads)
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
