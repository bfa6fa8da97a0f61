"""The paper's metrics for the synthetic set experiment (docs/set_vae.md, Metrics; paper
section 5.3).

Sets come padded, ``points`` (B, N, D) with integer ``lengths`` (B,), as everywhere else.

- valency of a point: the number of other points of its set closer than ``neighbor_dist``;
- valency loss: the 1-D Wasserstein distance between the valency histogram of generated sets
  and that of the dataset;
- incorrect valency: the percentage of generated points with valency 0 or above
  ``max_valency``;
- W2: the 2-Wasserstein distance between uniform measures on two sets,
  ``sqrt(min_P mean |x_i - y_P(i)|^2)``, from our debiased ``sinkhorn_loss`` (p=2, whose value
  approaches W2^2 / 2 with a small blur and a slow eps-scaling, as used here);
- matched distance (the authors' "W2" column): per set, the mean Euclidean distance between
  matched points under an optimal one-to-one assignment of two sets of equal size,
  :func:`matched_distance` (exact, Hungarian algorithm);
- diversity: the mean optimal transport cost with the Euclidean ground cost (uniform weights)
  between random pairs of distinct generated sets, all pairs in one batched ``sinkhorn_loss``
  call (p=1) at a small blur.

:func:`exact_ot` computes the same transport costs exactly with POT (one linear program per
pair); :func:`evaluate` reports the largest gap between the two on a sample of pairs, so every
``metrics.json`` says how far its Sinkhorn values are from exact OT.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._ragged import lengths_mask
from .keops._pykeops import pykeops
from .ops import _dispatch, sinkhorn_loss
from .ops._checks import integer, integer_dtype, values_in_range

__all__ = [
    "diversity",
    "evaluate",
    "exact_ot",
    "generation_metrics",
    "incorrect_valency_pct",
    "matched_backend",
    "matched_distance",
    "ot_euclidean",
    "reconstruction_distances",
    "reconstruction_w2",
    "valency",
    "valency_histogram",
    "valency_loss",
    "w2_distance",
]

# Sinkhorn settings of the metrics: a small blur and a slow eps-scaling, for values within a
# fraction of a percent of exact OT on sets of this dataset's scale (checked in tests/).
METRIC_BLUR = 0.01
METRIC_SCALING = 0.9


def _check_sets(points: object, lengths: object, name: str = "points") -> None:
    if not isinstance(points, Tensor) or not points.dtype.is_floating_point or points.dim() != 3:
        got = points.shape if isinstance(points, Tensor) else type(points).__name__
        raise TypeError(f"{name} must be a floating-point tensor (B, N, D), got {got}")
    if not isinstance(lengths, Tensor) or not integer_dtype(lengths.dtype) or lengths.dim() != 1:
        raise TypeError(f"lengths of {name} must be an integer tensor (B,)")
    if lengths.shape[0] != points.shape[0]:
        raise ValueError(
            f"lengths has {lengths.shape[0]} entries but {name} has {points.shape[0]} sets"
        )
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > points.shape[1]):
        raise ValueError(f"lengths of {name} must be in [0, {points.shape[1]}]")


# ---------------------------------------------------------------------------------------------
# Valency
# ---------------------------------------------------------------------------------------------


def valency(points: Tensor, lengths: Tensor, neighbor_dist: float = 2.0) -> Tensor:
    """Number of other points of the same set closer than ``neighbor_dist``.

    points (B, N, D) floating point, lengths (B,) integer. Returns (B, N) int64, -1 on padding.
    Distances are computed in float64, so float32 data generated on the float32 grid gets
    exactly the valencies its generator tracked.
    """
    _check_sets(points, lengths)
    if not neighbor_dist > 0:
        raise ValueError(f"neighbor_dist must be > 0, got {neighbor_dist}")
    return valency_counts(
        points, lengths_mask(lengths.to(points.device), points.shape[1]), neighbor_dist
    )


def valency_counts(points: Tensor, mask: Tensor, neighbor_dist: float) -> Tensor:
    """:func:`valency` from the mask (B, N) of real points, without checks (for a model that
    has checked its inputs)."""
    x = points.detach().double()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    pairs = mask[:, :, None] & mask[:, None, :]
    pairs &= ~torch.eye(points.shape[1], dtype=torch.bool, device=points.device)
    counts = (pairs & (dist < neighbor_dist)).sum(-1)
    return torch.where(mask, counts, -1)


def _real_counts(counts: object, lengths: object) -> Tensor:
    """The valencies of the real points of ``counts`` (B, N) integer, each >= 0, with
    ``lengths`` (B,) integer in [0, N]: a 1-D tensor."""
    if not isinstance(counts, Tensor) or not integer_dtype(counts.dtype) or counts.dim() != 2:
        got = (counts.dtype, tuple(counts.shape)) if isinstance(counts, Tensor) else counts
        raise TypeError(f"counts must be an integer tensor (B, N), got {got}")
    if not isinstance(lengths, Tensor) or not integer_dtype(lengths.dtype) or lengths.dim() != 1:
        got = (lengths.dtype, tuple(lengths.shape)) if isinstance(lengths, Tensor) else lengths
        raise TypeError(f"lengths must be an integer tensor (B,), got {got}")
    if lengths.shape[0] != counts.shape[0]:
        raise ValueError(
            f"lengths has {lengths.shape[0]} entries but counts has {counts.shape[0]} sets"
        )
    lengths = lengths.to(counts.device)
    values_in_range(lengths, "lengths", 0, counts.shape[1], "N")
    real = counts[lengths_mask(lengths, counts.shape[1])]
    if real.numel() and int(real.min()) < 0:
        raise ValueError(
            f"counts of real points must be >= 0 (valencies; -1 marks padding only), got "
            f"{int(real.min())}"
        )
    return real


def valency_histogram(counts: Tensor, lengths: Tensor, num_bins: int) -> Tensor:
    """Fraction of real points with each valency: (max(num_bins, max valency + 1),) float64.

    counts (B, N) integer (as :func:`valency` returns), lengths (B,) integer in [0, N].
    """
    integer(num_bins, "num_bins", minimum=0)
    real = _real_counts(counts, lengths)
    if real.numel() == 0:
        raise ValueError("valency_histogram needs at least one real point")
    hist = torch.bincount(real.cpu(), minlength=num_bins).double()
    return hist / hist.sum()


def valency_loss(probs: Tensor, reference_probs: Tensor) -> float:
    """1-D Wasserstein distance between two valency histograms (probabilities over 0, 1, ...).

    On integer support it is ``sum_k |F(k) - G(k)|`` with F, G the cumulative distributions;
    the shorter histogram is padded with zeros.
    """
    for name, p in (("probs", probs), ("reference_probs", reference_probs)):
        if not isinstance(p, Tensor) or not p.dtype.is_floating_point:
            got = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        if p.numel() and not bool(((p >= 0) & p.isfinite()).all()):
            raise ValueError(f"{name} must be finite and >= 0 (probabilities), got {p.tolist()}")
        if p.dim() != 1 or p.numel() == 0 or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-6):
            raise ValueError(f"{name} must be a non-empty 1-D histogram summing to 1")
    size = max(probs.numel(), reference_probs.numel())
    p = torch.nn.functional.pad(probs.double().cpu(), (0, size - probs.numel()))
    q = torch.nn.functional.pad(reference_probs.double().cpu(), (0, size - reference_probs.numel()))
    return float((p.cumsum(0) - q.cumsum(0)).abs().sum())


def incorrect_valency_pct(counts: Tensor, lengths: Tensor, max_valency: int = 4) -> float:
    """Percentage of real points with valency 0 or above ``max_valency``.

    counts (B, N) integer (as :func:`valency` returns), lengths (B,) integer in [0, N].
    """
    integer(max_valency, "max_valency", minimum=0)
    real = _real_counts(counts, lengths)
    if real.numel() == 0:
        raise ValueError("incorrect_valency_pct needs at least one real point")
    return 100.0 * float(((real == 0) | (real > max_valency)).double().mean())


# ---------------------------------------------------------------------------------------------
# Transport distances
# ---------------------------------------------------------------------------------------------


def _sinkhorn_ot(
    x: Tensor, y: Tensor, x_lengths: Tensor, y_lengths: Tensor, p: int, backend: str
) -> Tensor:
    """(B,) float64 debiased Sinkhorn divergences at the metrics' blur; small negative values
    from rounding count as 0."""
    s = sinkhorn_loss(
        x.detach().double(),
        y.detach().double(),
        x_lengths,
        y_lengths,
        p=p,
        blur=METRIC_BLUR,
        scaling=METRIC_SCALING,
        batch_reduction="none",
        backend=backend,
    )
    return s.clamp_min(0)


def w2_distance(
    x: Tensor, y: Tensor, x_lengths: Tensor, y_lengths: Tensor, *, backend: str = "auto"
) -> Tensor:
    """(B,) float64 W2 distances between uniform measures on paired sets x (B, N, D), y (B, M, D).

    ``sqrt(2 S)`` with S our debiased Sinkhorn divergence (p=2, cost |x-y|^2/2) at blur
    ``METRIC_BLUR``; small negative S from rounding count as 0.
    """
    return (2 * _sinkhorn_ot(x, y, x_lengths, y_lengths, 2, backend)).sqrt()


def ot_euclidean(
    x: Tensor, y: Tensor, x_lengths: Tensor, y_lengths: Tensor, *, backend: str = "auto"
) -> Tensor:
    """(B,) float64 optimal transport costs with ground cost |x - y| (uniform weights) between
    paired sets, from our debiased ``sinkhorn_loss`` with p=1 at blur ``METRIC_BLUR``."""
    return _sinkhorn_ot(x, y, x_lengths, y_lengths, 1, backend)


def exact_ot(x: Tensor, y: Tensor, x_lengths: Tensor, y_lengths: Tensor, *, p: int) -> Tensor:
    """(B,) float64 exact transport between uniform measures with POT's network simplex.

    ``p=2``: the W2 distance ``sqrt(min_P sum P_ij |x_i - y_j|^2)``; ``p=1``: the cost with
    ground cost ``|x_i - y_j|``. One linear program per pair: for checks, not for training.
    x (B, N, D), y (B, M, D) float, lengths (B,) integer, each >= 1; a pair with a NaN or
    infinite cost gets NaN.
    """
    if importlib.util.find_spec("pykeops") is not None:
        pykeops()  # POT imports pykeops when it is installed: import it quietly first
    import ot  # POT: an optional dependency (requirements.txt pins it)

    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    _check_sets(x, x_lengths, "x")
    _check_sets(y, y_lengths, "y")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must have the same number of sets and dimension, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[0] and min(int(x_lengths.min()), int(y_lengths.min())) < 1:
        raise ValueError("x_lengths and y_lengths must be >= 1: an empty set has no measure")
    out = []
    for b in range(x.shape[0]):
        xb = x[b, : int(x_lengths[b])].detach().double().cpu()
        yb = y[b, : int(y_lengths[b])].detach().double().cpu()
        cost = torch.cdist(xb, yb, compute_mode="donot_use_mm_for_euclid_dist") ** p
        if not bool(cost.isfinite().all()):
            out.append(math.nan)
            continue
        value = ot.emd2(
            torch.full((xb.shape[0],), 1.0 / xb.shape[0], dtype=torch.float64).numpy(),
            torch.full((yb.shape[0],), 1.0 / yb.shape[0], dtype=torch.float64).numpy(),
            cost.numpy(),
        )
        out.append(math.sqrt(max(value, 0.0)) if p == 2 else float(value))
    return torch.tensor(out, dtype=torch.float64)


def matched_backend(losses_backend: str) -> str:
    """The ``backend=`` of :func:`matched_distance` that goes with a losses' backend: "reference"
    and "native" as given, anything else (a losses' "auto" or "keops", which the matched distance
    does not have) "auto"."""
    return losses_backend if losses_backend in ("reference", "native") else "auto"


def matched_distance(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """(B,) per set, the mean Euclidean distance between matched points under an optimal
    one-to-one assignment: ``min over permutations P of mean_i |x_i - y_P(i)|``.

    x (B, N, D), y (B, M, D) float, padded; x_lengths, y_lengths (B,) integer or None (all
    rows). The sets of a pair must have equal sizes (a ``ValueError`` otherwise), at least one
    point each; a set whose distances are not all finite (a NaN or infinite coordinate) gets
    NaN. The assignment is exact, on distances computed in float64: the Hungarian algorithm,
    scipy's ``linear_sum_assignment`` (``backend="reference"``) or this library's C++ one
    (``"native"``, CPU tensors, one task per set; ``"auto"`` picks it on CPU when the extension
    is built). The value is differentiable with respect to x and y, through the distances of
    the matched pairs (the assignment itself is piecewise constant; the native backend is
    differentiable once). Where several assignments are optimal (ties), the backends may pick
    different ones: the same value, up to rounding, and possibly other gradients. Returns x's
    dtype. This is the reconstruction loss and the "W2" column of the authors' released code;
    it is not a Wasserstein-2 distance (which averages squared distances).
    """
    from scipy.optimize import linear_sum_assignment

    _check_sets(x, x_lengths if x_lengths is not None else _full(x), "x")
    _check_sets(y, y_lengths if y_lengths is not None else _full(y), "y")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must have the same number of sets and dimension, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = x.dtype
    nx = (x_lengths if x_lengths is not None else _full(x)).cpu().tolist()
    ny = (y_lengths if y_lengths is not None else _full(y)).cpu().tolist()
    unequal = [b for b, (n, m) in enumerate(zip(nx, ny, strict=True)) if n != m or n < 1]
    if unequal:
        b = unequal[0]
        raise ValueError(
            f"x_lengths and y_lengths must be equal and >= 1 for every set, got "
            f"{nx[b]} and {ny[b]} for set {b}"
        )
    if not nx:
        return x.sum((1, 2))  # (0,), x's dtype
    if _dispatch.resolve("matched_distance", backend, x.device) == "native":
        from .native.matched_distance import matched_distance as native_matched_distance

        return native_matched_distance(x, y, torch.tensor(nx, dtype=torch.int64))
    # one batched distance matrix (float64, computed without the |x|^2 + |y|^2 - 2xy expansion,
    # and with a zero gradient at coincident points); one assignment per set
    lengths = torch.tensor(nx, device=x.device)
    x, y = (
        torch.where(lengths_mask(lengths, t.shape[1])[..., None], t.double(), 0.0) for t in (x, y)
    )  # padding rows, never matched, must not turn gradients into NaN either
    dist = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    cost = dist.detach().cpu().numpy()
    finite = [bool(np.isfinite(cost[b, :n, :n]).all()) for b, n in enumerate(nx)]
    # a set with a non-finite coordinate has no assignment: any pairing, then a NaN value
    pairs = [
        linear_sum_assignment(cost[b, :n, :n]) if ok else (np.arange(n), np.arange(n))
        for b, (n, ok) in enumerate(zip(nx, finite, strict=True))
    ]
    rows, cols = (
        torch.from_numpy(np.concatenate(p)).to(x.device) for p in zip(*pairs, strict=True)
    )
    sets = torch.repeat_interleave(torch.arange(len(nx), device=x.device), lengths)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    total = total.index_add(0, sets, dist[sets, rows, cols])
    total = torch.where(torch.tensor(finite, device=x.device), total, torch.nan)
    return (total / lengths).to(dtype)


def _full(x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)


def random_pairs(num_sets: int, num_pairs: int, generator: torch.Generator | None) -> Tensor:
    """(num_pairs, 2) int64 pairs of distinct set indices, uniform among ordered pairs."""
    if num_sets < 2:
        raise ValueError(f"random pairs need at least 2 sets, got {num_sets}")
    first = torch.randint(num_sets, (num_pairs,), generator=generator)
    offset = torch.randint(1, num_sets, (num_pairs,), generator=generator)
    return torch.stack([first, (first + offset) % num_sets], dim=1)


def diversity(
    points: Tensor,
    lengths: Tensor,
    *,
    num_pairs: int = 1000,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[float, Tensor]:
    """Mean Euclidean-cost OT between ``num_pairs`` random pairs of distinct sets.

    points (B, N, D), lengths (B,); ``num_pairs`` >= 1. All pairs go through one batched
    ``sinkhorn_loss`` (p=1). Returns (the mean, the (num_pairs, 2) pairs used).
    """
    _check_sets(points, lengths)
    integer(num_pairs, "num_pairs", minimum=1)  # the mean of no pair is NaN
    pairs = random_pairs(points.shape[0], num_pairs, generator).to(points.device)
    i, j = pairs[:, 0], pairs[:, 1]
    costs = ot_euclidean(points[i], points[j], lengths[i], lengths[j], backend=backend)
    return float(costs.mean()), pairs


# ---------------------------------------------------------------------------------------------
# A model's metrics
# ---------------------------------------------------------------------------------------------


def generation_metrics(
    points: Tensor,
    lengths: Tensor,
    reference_valency_probs: Tensor,
    *,
    neighbor_dist: float = 2.0,
    max_valency: int = 4,
    num_pairs: int = 1000,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> dict[str, float]:
    """Valency loss, incorrect valency % and diversity of generated sets (B, N, D)."""
    counts = valency(points, lengths, neighbor_dist)
    hist = valency_histogram(counts, lengths, reference_valency_probs.numel())
    div, _ = diversity(points, lengths, num_pairs=num_pairs, generator=generator, backend=backend)
    return {
        "valency_loss": valency_loss(hist, reference_valency_probs),
        "incorrect_valency_pct": incorrect_valency_pct(counts, lengths, max_valency),
        "diversity": div,
    }


@torch.no_grad()
def reconstruction_distances(
    reconstruct: Callable[[Tensor, Tensor], Tensor],
    points: Tensor,
    lengths: Tensor,
    *,
    batch_size: int = 250,
    backend: str = "auto",
) -> dict[str, Tensor]:
    """The distances between each set and ``reconstruct(points, lengths)`` (B, N, D) of it:
    ``{"w2": (S,) W2 distances, "matched": (S,) matched distances}`` (float64).

    points (S, N, D) padded dataset, lengths (S,).
    """
    _check_sets(points, lengths)
    w2, matched = [], []
    for start in range(0, points.shape[0], batch_size):
        n = lengths[start : start + batch_size]
        x = points[start : start + batch_size, : int(n.max())]
        rec = reconstruct(x, n)
        w2.append(w2_distance(rec, x, n, n, backend=backend))
        matched.append(
            matched_distance(rec.double(), x.double(), n, n, backend=matched_backend(backend)).cpu()
        )
    return {"w2": torch.cat(w2), "matched": torch.cat(matched)}


def reconstruction_w2(
    reconstruct: Callable[[Tensor, Tensor], Tensor],
    points: Tensor,
    lengths: Tensor,
    *,
    batch_size: int = 250,
    backend: str = "auto",
) -> tuple[float, Tensor]:
    """Mean W2 between each set and ``reconstruct(points, lengths)`` (B, N, D) of it.

    points (S, N, D) padded dataset, lengths (S,). Returns (the mean, the (S,) distances).
    """
    dist = reconstruction_distances(
        reconstruct, points, lengths, batch_size=batch_size, backend=backend
    )["w2"]
    return float(dist.mean()), dist


def _sinkhorn_vs_exact(
    fast: Callable[..., Tensor], x: Tensor, y: Tensor, lx: Tensor, ly: Tensor, p: int
) -> dict[str, float]:
    """Gaps between a Sinkhorn metric and exact OT on a sample of pairs: the largest absolute
    and relative gap of one pair, and the relative gap of the sample's mean (what a reported
    metric, a mean over sets or pairs, inherits)."""
    approx, exact = fast(x, y, lx, ly).cpu(), exact_ot(x, y, lx, ly, p=p)
    gap = (approx - exact).abs()
    return {
        "pairs": int(x.shape[0]),
        "max_abs_err": float(gap.max()),
        "max_rel_err": float((gap / exact.clamp_min(1e-12)).max()),
        "mean_rel_err": float((approx.mean() - exact.mean()).abs() / exact.mean().clamp_min(1e-12)),
    }


@torch.no_grad()
def evaluate(
    model,
    train_points: Tensor,
    train_lengths: Tensor,
    test_points: Tensor,
    test_lengths: Tensor,
    valency_probs: Tensor,
    extrap_valency_probs: Tensor,
    extrap_sizes: Tensor,
    *,
    num_generated: int = 1000,
    num_pairs: int = 1000,
    check_pairs: int = 64,
    seed: int = 0,
    neighbor_dist: float = 2.0,
    max_valency: int = 4,
    backend: str = "auto",
) -> dict:
    """Every metric of the paper's Table 4 for a trained set VAE, plus the exactness checks.

    ``model`` is a :class:`topn_kernels.models.SetVAE` (anything with ``reconstruct(points,
    lengths)``, ``sample_sizes(num)`` and ``generate(sizes) -> (x, mask)``). Generation draws
    ``num_generated`` sets with sizes from the training distribution, and again with the
    ``extrap_sizes`` (num_generated,) of the extrapolation setting; their valencies are compared
    with ``valency_probs`` and ``extrap_valency_probs``. Deterministic given ``seed``; the
    global RNG is left as it was.

    Returns a dict with ``train_w2``, ``test_w2``, ``train_matched``, ``test_matched`` (the
    mean :func:`matched_distance` of the reconstructions), ``valency_loss``,
    ``incorrect_valency_pct``, ``diversity``, the last three again with an ``extrap_`` prefix,
    and ``exactness`` (the Sinkhorn-vs-POT gaps of the W2 and diversity values on
    ``check_pairs`` pairs).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        metrics: dict = {}
        for name, pts, lens in (
            ("train", train_points, train_lengths),
            ("test", test_points, test_lengths),
        ):
            pts, lens = pts.to(device), lens.to(device)
            dist = reconstruction_distances(model.reconstruct, pts, lens, backend=backend)
            metrics[f"{name}_w2"] = float(dist["w2"].mean())
            metrics[f"{name}_matched"] = float(dist["matched"].mean())

        common = dict(neighbor_dist=neighbor_dist, max_valency=max_valency, num_pairs=num_pairs)
        generated = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            for prefix, sizes, probs in (
                ("", model.sample_sizes(num_generated), valency_probs),
                ("extrap_", extrap_sizes[:num_generated], extrap_valency_probs),
            ):
                x, mask = model.generate(sizes.to(device))
                lens = mask.sum(1)
                generated[prefix] = (x, lens)
                values = generation_metrics(
                    x, lens, probs, generator=gen, backend=backend, **common
                )
                metrics.update({prefix + k: v for k, v in values.items()})

        # exactness of the Sinkhorn values on a sample: reconstructions and generated pairs
        pts, lens = test_points[:check_pairs].to(device), test_lengths[:check_pairs].to(device)
        pts = pts[:, : int(lens.max())]
        rec = model.reconstruct(pts, lens)
        x, lx = generated[""]
        pairs = random_pairs(x.shape[0], check_pairs, torch.Generator().manual_seed(seed + 1))
        i, j = pairs[:, 0].to(device), pairs[:, 1].to(device)
        metrics["exactness"] = {
            "w2_vs_pot": _sinkhorn_vs_exact(
                lambda *a: w2_distance(*a, backend=backend), rec, pts, lens, lens, 2
            ),
            "diversity_vs_pot": _sinkhorn_vs_exact(
                lambda *a: ot_euclidean(*a, backend=backend), x[i], x[j], lx[i], lx[j], 1
            ),
        }
        return metrics
    finally:
        model.train(was_training)
