"""The paper's metrics (topn_kernels.metrics; docs/set_vae.md, "Metrics") on hand-made sets
with known answers, and the Sinkhorn-based transport metrics against exact OT (POT)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import scipy.stats
import torch

import topn_kernels
from topn_kernels import metrics, native
from topn_kernels.data import generate_sets

from .helpers import F64


def line(*xs: float) -> torch.Tensor:
    """(n, 3) points on the x axis."""
    return torch.tensor([[x, 0.0, 0.0] for x in xs], dtype=F64)


def batch(*sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.shape[0] for s in sets])
    out = torch.full((len(sets), int(lengths.max()), 3), float("nan"), dtype=F64)  # poisoned
    for b, s in enumerate(sets):
        out[b, : s.shape[0]] = s
    return out, lengths


def test_valency_counts_neighbours_strictly_closer_than_the_threshold():
    # spacing 1.5: ends have 1 neighbour, inner points 2; 10 is isolated; exactly 2.0 is no bond
    pts, lengths = batch(line(0, 1.5, 3, 4.5, 10), line(0, 2.0), line(0, 0.5, 1, 1.5, 1.9, 2.5))
    got = metrics.valency(pts, lengths)
    assert got.dtype == torch.int64
    assert got[0].tolist() == [1, 2, 2, 1, 0, -1]
    assert got[1].tolist() == [0, 0, -1, -1, -1, -1]
    assert got[2].tolist() == [4, 4, 5, 5, 5, 3]  # 2.5 - 0.5 is exactly 2.0: no bond
    assert metrics.valency(pts, lengths, neighbor_dist=2.01)[1, :2].tolist() == [1, 1]


def test_incorrect_valency_pct():
    counts = torch.tensor([[0, 1, 5, 4, -1], [2, 3, 4, 6, 0]])
    lengths = torch.tensor([4, 4])  # the trailing 0 of set 1 is padding
    assert metrics.incorrect_valency_pct(counts, lengths) == pytest.approx(100 * 3 / 8)
    assert metrics.incorrect_valency_pct(counts, lengths, max_valency=6) == pytest.approx(12.5)


def test_valency_histogram_and_loss():
    counts = torch.tensor([[1, 2, 2, -1], [3, 1, 1, 1]])
    hist = metrics.valency_histogram(counts, torch.tensor([3, 4]), num_bins=6)
    torch.testing.assert_close(hist, torch.tensor([0, 4, 2, 1, 0, 0], dtype=F64) / 7)
    one, two = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])
    assert metrics.valency_loss(one, two) == pytest.approx(1.0)  # one unit of mass, one step
    assert metrics.valency_loss(torch.tensor([0.5, 0, 0, 0.5]), one) == pytest.approx(1.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p, q = torch.rand(7, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
        want = scipy.stats.wasserstein_distance(range(7), range(5), p.numpy(), q.numpy())
        assert metrics.valency_loss(p / p.sum(), q / q.sum()) == pytest.approx(want)
    with pytest.raises(ValueError, match="summing to 1"):
        metrics.valency_loss(torch.tensor([0.5]), one)


def test_transport_metrics_on_hand_made_sets():
    # a set and its translate by t: W2 = OT cost = |t|
    base = line(0, 1.5, 3) + torch.tensor([0.0, 1.0, -2.0], dtype=F64)
    t = torch.tensor([0.6, -0.8, 0.0], dtype=F64)  # |t| = 1
    x, lx = batch(base + t, line(0, 1))
    y, ly = batch(base, line(0, 3))  # {0, 1} -> {0, 3}: W2 = sqrt(4 / 2), OT = 1
    want_w2 = torch.tensor([1.0, math.sqrt(2.0)], dtype=F64)
    want_ot = torch.tensor([1.0, 1.0], dtype=F64)
    torch.testing.assert_close(metrics.exact_ot(x, y, lx, ly, p=2), want_w2)
    torch.testing.assert_close(metrics.exact_ot(x, y, lx, ly, p=1), want_ot)
    torch.testing.assert_close(metrics.w2_distance(x, y, lx, ly), want_w2, rtol=5e-3, atol=0)
    torch.testing.assert_close(metrics.ot_euclidean(x, y, lx, ly), want_ot, rtol=5e-3, atol=0)


def test_exact_ot_keeps_keops_quiet():
    """POT imports pykeops when it is installed; its notices must not reach users' logs."""
    script = (
        "import torch; from topn_kernels.metrics import exact_ot; x = torch.randn(1, 3, 3); "
        "print(float(exact_ot(x, x, torch.tensor([3]), torch.tensor([3]), p=2)[0]))"
    )
    env = {k: v for k, v in os.environ.items() if "KEOPS_VERBOSE" not in k}
    command = [sys.executable, "-c", script]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "0.0\n" and "KeOps" not in run.stderr


def test_transport_metrics_match_exact_ot_on_dataset_sets():
    """Pairs of different sizes from the dataset: Sinkhorn within 1% of POT per pair, and
    0.5% on the mean (what a reported metric is)."""
    data = generate_sets(48, seed=11)
    x, y = data.points[:24].double(), data.points[24:].double()
    lx, ly = data.lengths[:24], data.lengths[24:]
    for fast, p in ((metrics.w2_distance, 2), (metrics.ot_euclidean, 1)):
        got, want = fast(x, y, lx, ly), metrics.exact_ot(x, y, lx, ly, p=p)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
        assert got.mean() == pytest.approx(want.mean().item(), rel=5e-3)


def test_diversity_is_batched_exact_ot_over_distinct_random_pairs():
    data = generate_sets(30, seed=12)
    g = torch.Generator().manual_seed(0)
    value, pairs = metrics.diversity(data.points, data.lengths, num_pairs=200, generator=g)
    assert pairs.shape == (200, 2) and (pairs[:, 0] != pairs[:, 1]).all()
    assert pairs.min() >= 0 and pairs.max() < 30 and len(set(pairs[:, 0].tolist())) > 20
    i, j = pairs[:, 0], pairs[:, 1]
    exact = metrics.exact_ot(data.points[i], data.points[j], data.lengths[i], data.lengths[j], p=1)
    assert value == pytest.approx(exact.mean().item(), rel=5e-3)
    again, _ = metrics.diversity(
        data.points, data.lengths, num_pairs=200, generator=torch.Generator().manual_seed(0)
    )
    assert again == value  # seeded
    # two sets, translates of each other by |t| = 1: every distinct pair costs exactly 1
    x, lengths = batch(line(0, 1.5, 3), line(0, 1.5, 3) + torch.tensor([0.0, 0.0, 1.0], dtype=F64))
    assert metrics.diversity(x, lengths, num_pairs=10)[0] == pytest.approx(1.0, rel=5e-3)


def test_generation_metrics_of_the_data_itself():
    """The dataset judged against its own histogram: no valency loss, no incorrect valency."""
    data = generate_sets(100, seed=13)
    hist = metrics.valency_histogram(metrics.valency(data.points, data.lengths), data.lengths, 35)
    got = metrics.generation_metrics(data.points, data.lengths, hist, num_pairs=50)
    assert got["valency_loss"] == pytest.approx(0.0, abs=1e-12)
    assert got["incorrect_valency_pct"] == 0.0
    assert 1.0 < got["diversity"] < 10.0


MATCHED_BACKENDS = [
    "reference",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not native.AVAILABLE, reason=f"native backend: {native.UNAVAILABLE_REASON}"
        ),
    ),
]


@pytest.mark.parametrize("backend", MATCHED_BACKENDS)
def test_matched_distance_is_the_best_assignment(backend):
    """Brute force over every permutation, on a ragged batch with NaN in its padding; the
    gradient is that of the matched distances, zero on padding rows."""
    torch.manual_seed(0)
    sets = [torch.randn(n, 3, dtype=F64) for n in (1, 4, 6)]
    x, lengths = batch(*sets)
    y, _ = batch(*(torch.randn_like(s) for s in sets))
    x.requires_grad_(True)
    got = metrics.matched_distance(x, y, lengths, lengths, backend=backend)
    xs = x.detach()
    for b, n in enumerate(lengths.tolist()):
        costs = [
            sum(float((xs[b, i] - y[b, p[i]]).norm()) for i in range(n)) / n
            for p in itertools.permutations(range(n))
        ]
        assert float(got[b]) == pytest.approx(min(costs), rel=1e-12)
    got.sum().backward()
    assert x.grad[:, :1].isfinite().all() and (x.grad[0, 1:] == 0).all()
    assert (x.grad[1, 4:] == 0).all() and x.grad[2].abs().sum() > 0


@pytest.mark.parametrize("backend", MATCHED_BACKENDS)
def test_matched_distance_equals_exact_ot_on_equal_sizes(backend):
    """With uniform weights on sets of one size, an optimal plan is a permutation: POT's exact
    transport cost with the Euclidean ground cost is the matched distance."""
    data = generate_sets(8, seed=3)
    x = torch.stack([data[i][:5] for i in range(8)]).double()
    y = x.flip(0) + 0.3 * torch.randn_like(x)
    n = torch.full((8,), 5)
    expected = metrics.exact_ot(x, y, n, n, p=1)
    got = metrics.matched_distance(x, y, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    coincident = metrics.matched_distance(x.requires_grad_(True), x.detach(), backend=backend)
    assert (coincident == 0).all()
    (grad,) = torch.autograd.grad(coincident.sum(), x)
    assert grad.isfinite().all()


def test_matched_distance_rejects_unequal_sizes():
    x, y = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="x_lengths and y_lengths"):
        metrics.matched_distance(x, y, torch.tensor([4, 3]), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="dimension"):
        metrics.matched_distance(x, torch.randn(2, 4, 2))
    with pytest.raises(TypeError, match="x"):
        metrics.matched_distance(x.long(), y)
    with pytest.raises(TypeError, match="dtype"):
        metrics.matched_distance(x, y.double())
    with pytest.raises(TypeError, match="lengths of x"):
        metrics.matched_distance(x, y, torch.tensor([True, True]), torch.tensor([4, 4]))


@pytest.mark.parametrize("backend", MATCHED_BACKENDS)
def test_matched_distance_nonfinite_sets_and_empty_batch(backend):
    """A NaN or infinite coordinate makes its set's value NaN and leaves the others; an empty
    batch gives an empty result in the inputs' dtype."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    clean = metrics.matched_distance(x, y, backend=backend)
    x[0, 1, 0], y[2, 0, 1] = float("nan"), float("inf")
    x.requires_grad_(True)
    got = metrics.matched_distance(x, y, backend=backend)
    assert got[0].isnan() and got[2].isnan()
    assert got[1] == clean[1]
    (grad,) = torch.autograd.grad(got.nansum(), x)  # NaN sets: 0 (native) or NaN (reference)
    assert (grad[[0, 2]].nan_to_num() == 0).all()
    assert grad[1].isfinite().all() and grad[1].abs().sum() > 0
    empty = metrics.matched_distance(x[:0].half(), y[:0].half(), backend=backend)
    assert empty.shape == (0,) and empty.dtype == torch.float16


@pytest.mark.skipif(not native.AVAILABLE, reason=f"native backend: {native.UNAVAILABLE_REASON}")
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_matched_distance_native_matches_scipy(dtype):
    """The C++ assignment against scipy's on ragged batches up to the authors' largest sets
    (35 points), on padding of other widths for x and y: values and the gradients of a
    weighted sum of them; "auto" runs the native one on CPU."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 35, 35])
    x = torch.randn(10, 35, 3, generator=g).to(dtype).requires_grad_(True)
    y = (3 * torch.randn(10, 37, 3, generator=g)).to(dtype).requires_grad_(True)
    weights = torch.rand(10, generator=g).to(dtype)
    with topn_kernels.record_backends() as calls:
        got = metrics.matched_distance(x, y, lengths, lengths)
    assert calls["matched_distance"] == {"native": 1}
    want = metrics.matched_distance(x, y, lengths, lengths, backend="reference")
    assert got.dtype == dtype
    tol = {torch.float32: 1e-6, F64: 1e-13, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    grads = torch.autograd.grad((got * weights).sum(), [x, y])
    expected = torch.autograd.grad((want * weights).sum(), [x, y])
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert (grads[0][0, 1:] == 0).all() and (grads[1][7, 34:] == 0).all()  # padding


@pytest.mark.skipif(not native.AVAILABLE, reason=f"native backend: {native.UNAVAILABLE_REASON}")
def test_matched_distance_native_is_differentiable_once_and_cpu_only():
    x, y = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 4, 3)
    (g,) = torch.autograd.grad(
        metrics.matched_distance(x, y, backend="native").square().sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    with pytest.raises(ValueError, match="native backend runs on CPU"):
        metrics.matched_distance(x.to("meta"), y.to("meta"), backend="native")
    with pytest.raises(ValueError, match="backend"):
        metrics.matched_distance(x, y, backend="keops")


def test_bad_inputs():
    pts, lengths = batch(line(0, 1), line(0, 1, 2))
    with pytest.raises(TypeError, match="floating-point tensor"):
        metrics.valency(pts[0], lengths)
    with pytest.raises(ValueError, match="entries"):
        metrics.valency(pts, lengths[:1])
    with pytest.raises(ValueError, match=r"lengths of points must be in \[0, 3\]"):
        metrics.valency(pts, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="at least 2 sets"):
        metrics.diversity(pts[:1], lengths[:1])
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        metrics.exact_ot(pts, pts, lengths, lengths, p=3)


@pytest.mark.parametrize("fn", ["incorrect_valency_pct", "valency_histogram"])
def test_valency_metrics_check_counts_and_lengths(fn):
    # lengths were not checked against counts: lengths past N counted padding, negative
    # lengths counted nothing, float lengths were used as is
    counts = torch.tensor([[1, 2, -1], [0, 5, 3]])
    call = getattr(metrics, fn)
    args = (5,) if fn == "valency_histogram" else ()
    with pytest.raises(ValueError, match=r"lengths must be in \[0, N=3\], got 7"):
        call(counts, torch.tensor([2, 7]), *args)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, N=3\], got -1"):
        call(counts, torch.tensor([-1, 2]), *args)
    with pytest.raises(ValueError, match="lengths has 3 entries but counts has 2 sets"):
        call(counts, torch.tensor([2, 3, 1]), *args)
    with pytest.raises(TypeError, match=r"lengths must be an integer tensor \(B,\)"):
        call(counts, torch.tensor([2.0, 3.0]), *args)
    with pytest.raises(TypeError, match=r"lengths must be an integer tensor \(B,\)"):
        call(counts, torch.tensor(2), *args)
    with pytest.raises(TypeError, match=r"counts must be an integer tensor \(B, N\)"):
        call(counts.double(), torch.tensor([2, 3]), *args)
    with pytest.raises(ValueError, match="counts of real points must be >= 0"):
        call(counts, torch.tensor([3, 3]), *args)  # the padding marker -1 as a valency
    call(counts, torch.tensor([2, 3]), *args)


def test_valency_metric_arguments_are_checked():
    counts, lengths = torch.tensor([[1, 2, -1]]), torch.tensor([2])
    with pytest.raises(TypeError, match="max_valency must be an int"):
        metrics.incorrect_valency_pct(counts, lengths, max_valency=4.5)
    with pytest.raises(ValueError, match="num_bins must be >= 0"):
        metrics.valency_histogram(counts, lengths, -1)
    one = torch.tensor([0.0, 1.0])
    # a negative entry summing to 1 was a silently wrong loss; NaN a misleading message
    for bad in ([1.5, -0.5], [float("nan"), 1.0], [float("inf"), 0.0]):
        with pytest.raises(ValueError, match=r"probs must be finite and >= 0"):
            metrics.valency_loss(torch.tensor(bad), one)
        with pytest.raises(ValueError, match=r"reference_probs must be finite and >= 0"):
            metrics.valency_loss(one, torch.tensor(bad))
    with pytest.raises(TypeError, match="probs must be a floating-point tensor"):
        metrics.valency_loss([0.0, 1.0], one)


def test_diversity_needs_a_pair():
    pts, lengths = batch(line(0, 1), line(0, 1, 2))
    for num_pairs in (0, -3):  # the mean of no pair was NaN
        with pytest.raises(ValueError, match=f"num_pairs must be >= 1, got {num_pairs}"):
            metrics.diversity(pts, lengths, num_pairs=num_pairs)
    with pytest.raises(TypeError, match="num_pairs must be an int"):
        metrics.diversity(pts, lengths, num_pairs=2.0)


def test_exact_ot_checks_its_inputs_and_gives_nan_for_nan():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 4, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    nx, ny = torch.tensor([4, 2]), torch.tensor([3, 3])
    clean = metrics.exact_ot(x, y, nx, ny, p=2)
    x[0, 1, 0] = float("nan")
    got = metrics.exact_ot(x, y, nx, ny, p=2)
    assert got[0].isnan() and got[1] == clean[1]  # it was 0.0 for the NaN set
    with pytest.raises(ValueError, match="x_lengths and y_lengths must be >= 1"):
        metrics.exact_ot(x, y, torch.tensor([0, 2]), ny, p=2)
    with pytest.raises(ValueError, match="lengths of x"):
        metrics.exact_ot(x, y, torch.tensor([5, 2]), ny, p=2)
    with pytest.raises(ValueError, match="dimension"):
        metrics.exact_ot(x, y[..., :1], nx, ny, p=2)
