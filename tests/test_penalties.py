"""Everything about ``repulsion_penalty`` and ``valency_penalty`` (docs/operators.md,
"repulsion_penalty" and "valency_penalty"): the reference against literal loops and gradcheck,
the KeOps backend against the reference, and input validation ("Errors").

Ragged batches carry poisoned padding (NaN, inf, -1e30): it must change no value and no
gradient of a real point, and padded points get a zero gradient. Sets of one point and of no
point have a zero penalty.
"""

from __future__ import annotations

import pytest
import torch

import topn_kernels as tk
from topn_kernels import reference

from .helpers import (
    F64,
    X_LEN,
    Y_LEN,
    assert_close_scaled,
    assert_loss_matches_reference,
    assert_rows_match_alone,
    assert_same_bits_on_one_thread,
    needs_native,
    padded_sets,
    small_loss_inputs,
)

# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------

LEN = torch.tensor([6, 1, 0, 4])


def _literal_repulsion(p, min_dist):
    total = torch.zeros((), dtype=F64)
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            total = total + torch.relu(min_dist - (p[i] - p[j]).norm())
    return total


def _literal_valency(p, neighbor_dist, max_valency):
    total = torch.zeros((), dtype=F64)
    for i in range(len(p)):
        others = ((p[i] - p[j]).norm() for j in range(len(p)) if j != i)
        s = sorted(others, key=lambda v: float(v.detach()))
        if s:
            total = total + torch.relu(s[0] - neighbor_dist)
        for v in s[max_valency:]:
            total = total + torch.relu(neighbor_dist - v)
    return total


@pytest.mark.parametrize(
    ("penalty", "literal", "kwargs"),
    [
        (reference.repulsion_penalty, _literal_repulsion, {"min_dist": 1.3}),
        (reference.valency_penalty, _literal_valency, {"neighbor_dist": 1.5, "max_valency": 2}),
    ],
    ids=["repulsion", "valency"],
)
def test_reference_matches_loops(penalty, literal, kwargs):
    x = (padded_sets(4, 6, 3, LEN, seed=5) * 0.8).requires_grad_()
    values = penalty(x, LEN, **kwargs)
    assert values.shape == (4,)
    assert values[1] == 0 and values[2] == 0  # one point, no point
    (gx,) = torch.autograd.grad(values.sum(), x)
    alone = []
    for b in range(4):
        xb = x[b, : LEN[b]].detach().requires_grad_()
        want = literal(xb, *kwargs.values())
        assert_close_scaled(values[b], want, 1e-12)
        alone.append(
            torch.autograd.grad(want, xb)[0] if want.requires_grad else torch.zeros_like(xb)
        )
    assert_rows_match_alone(gx, alone, LEN)


@pytest.mark.parametrize(
    ("penalty", "lengths", "seed", "kwargs"),
    [
        (reference.repulsion_penalty, X_LEN, 8, {"min_dist": 1.5}),
        (reference.valency_penalty, Y_LEN, 9, {"neighbor_dist": 1.2, "max_valency": 2}),
    ],
    ids=["repulsion", "valency"],
)
def test_reference_gradcheck(penalty, lengths, seed, kwargs):
    x = padded_sets(4, 9, 3, lengths, seed=seed, poison=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: penalty(x, lengths, **kwargs), (x,))


# ---------------------------------------------------------------------------------------------
# KeOps against the reference
# ---------------------------------------------------------------------------------------------

KEOPS_LEN = torch.tensor([9, 1, 0, 2, 5])


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
def test_keops_matches_reference(name, kwargs):
    """Sets of 9, 1, 0, 2 and 5 points: no neighbour, fewer neighbours than max_valency,
    and coincident points (a zero distance, whose gradient is 0)."""
    x = (padded_sets(5, 9, 3, KEOPS_LEN, seed=6) * 0.8).requires_grad_()
    with torch.no_grad():
        x[0, 4] = x[0, 3]  # two coincident points
    op = getattr(tk, name)

    def fn(backend, x):
        return op(x, KEOPS_LEN, backend=backend, **kwargs)

    assert_loss_matches_reference(fn, [x], 1e-12, "keops")


def test_keops_float32():
    x = (padded_sets(5, 9, 3, KEOPS_LEN, seed=7) * 0.8).float().requires_grad_()
    for op in (tk.repulsion_penalty, tk.valency_penalty):

        def fn(backend, x, op=op):
            return op(x, KEOPS_LEN, backend=backend)

        assert_loss_matches_reference(fn, [x], 1e-5, "keops")


# ---------------------------------------------------------------------------------------------
# the native backend against the reference
# ---------------------------------------------------------------------------------------------

PENALTY_CASES = [
    ("repulsion_penalty", {"min_dist": 1.3}),
    ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 2}),
    ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 0}),
    ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 6}),
    ("valency_penalty", {"neighbor_dist": 0.3, "max_valency": 1}),
    ("valency_penalty", {"neighbor_dist": 1.5, "max_valency": 2**40}),
]
PENALTY_IDS = ["repulsion", "valency2", "valency0", "valency6", "valency-far", "valency-huge"]


@pytest.mark.parametrize(("name", "kwargs"), PENALTY_CASES, ids=PENALTY_IDS)
def test_native_matches_reference(name, kwargs):
    """Sets of 9, 1, 0, 2 and 5 points, poisoned padding, two coincident points (a zero
    distance, whose gradient is 0), points without a neighbour and with too many."""
    needs_native()
    x = (padded_sets(5, 9, 3, KEOPS_LEN, seed=6) * 0.8).requires_grad_()
    with torch.no_grad():
        x[0, 4] = x[0, 3]
    op = getattr(tk, name)

    def fn(backend, x):
        return op(x, KEOPS_LEN, backend=backend, **kwargs)

    assert_loss_matches_reference(fn, [x], 1e-12, "native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_low_precision_and_full_sets(dtype):
    """Full sets of 40 points (many neighbours within reach); float16 and bfloat16 run in
    float32 and come back in their own dtype."""
    needs_native()
    x = (torch.randn(3, 40, 3, generator=torch.Generator().manual_seed(9)) * 1.5).to(dtype)
    x.requires_grad_()
    for op in (tk.repulsion_penalty, tk.valency_penalty):

        def fn(backend, x, op=op):
            return op(x, backend=backend)

        assert_loss_matches_reference(fn, [x], 1e-5 if dtype == torch.float32 else 1e-2, "native")


@pytest.mark.parametrize("penalty", [tk.repulsion_penalty, tk.valency_penalty])
def test_native_values_do_not_depend_on_the_thread_count(penalty):
    needs_native()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 35, 3, generator=g) * 1.5).requires_grad_()
    lengths = torch.randint(2, 36, (64,), generator=g)
    assert_same_bits_on_one_thread(lambda x: penalty(x, lengths, backend="native"), [x])


def test_native_ops_check_their_inputs():
    needs_native()
    x = torch.randn(2, 4, 3)
    ops = torch.ops.topn_kernels
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1 is outside \[0, 4\]"):
        ops.repulsion_sets(x, torch.tensor([-1, 2]), 1.0, False)
    with pytest.raises(RuntimeError, match="max_valency must be >= 0"):
        ops.valency_sets(x, None, 1.0, -1, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.valency_sets(x.half(), None, 1.0, 2, False)


# ---------------------------------------------------------------------------------------------
# input validation (docs/operators.md, Errors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("penalty", "kwargs", "error", "names"),
    [
        (tk.repulsion_penalty, {"lengths": torch.tensor([1, -1, 2])}, ValueError, "lengths"),
        (tk.repulsion_penalty, {"lengths": torch.tensor([1, 7, 2])}, ValueError, "lengths"),
        (tk.repulsion_penalty, {"min_dist": 0.0}, ValueError, "min_dist"),
        (tk.valency_penalty, {"neighbor_dist": -1.0}, ValueError, "neighbor_dist"),
        (tk.valency_penalty, {"neighbor_dist": float("inf")}, ValueError, "neighbor_dist"),
        (tk.valency_penalty, {"neighbor_dist": float("nan")}, ValueError, "neighbor_dist"),
        (tk.repulsion_penalty, {"min_dist": float("inf")}, ValueError, "min_dist"),
        (tk.valency_penalty, {"max_valency": -1}, ValueError, "max_valency"),
        (tk.valency_penalty, {"max_valency": 2.5}, TypeError, "max_valency"),
        (tk.valency_penalty, {"x": torch.randn(6, 2)}, ValueError, "x"),
    ],
)
def test_validation_names_the_bad_argument(penalty, kwargs, error, names):
    kwargs = {"x": small_loss_inputs()[0], **kwargs}
    with pytest.raises(error, match=names):
        penalty(**kwargs)


@pytest.mark.parametrize(
    "penalty", [tk.repulsion_penalty, tk.valency_penalty], ids=["repulsion", "valency"]
)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_validation_nan_points_give_nan(penalty, backend):
    """NaN is not an error: the set it belongs to gets NaN, the others do not."""
    if backend == "native":
        needs_native()
    x = small_loss_inputs()[0]
    x[1, 2, 0] = float("nan")
    values = penalty(x, backend=backend)
    assert values.isnan().tolist() == [i == 1 for i in range(x.shape[0])]


def test_keops_valency_larger_than_any_set():
    """A max_valency beyond n - 1 neighbours leaves nothing to subtract: KeOps asks for at most
    n - 1 nearest points (an argKmin of 2**40 would crash)."""
    lengths = torch.tensor([7, 3, 1])
    x = (padded_sets(3, 7, 3, lengths, seed=8) * 0.8).requires_grad_()
    for max_valency in (6, 2**40):

        def fn(backend, x, max_valency=max_valency):
            return tk.valency_penalty(x, lengths, max_valency=max_valency, backend=backend)

        assert_loss_matches_reference(fn, [x], 1e-12, "keops")


def test_native_ops_check_their_distances():
    """min_dist and neighbor_dist finite and > 0 in the ops themselves (a NaN made valency 0)."""
    needs_native()
    x = torch.randn(2, 4, 3)
    ops = torch.ops.topn_kernels
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(RuntimeError, match="min_dist must be finite"):
            ops.repulsion_sets(x, None, bad, False)
        with pytest.raises(RuntimeError, match="neighbor_dist must be finite"):
            ops.valency_sets(x, None, bad, 1, False)
