"""Public set losses and penalties (docs/operators.md): validation, then the backend.

Sets come padded, x (B, N, D) and y (B, M, D), with optional integer lengths (B,); padding is
ignored exactly. Backends: "reference" (dense PyTorch, memory quadratic in the set size),
"keops" (memory linear) and, for Sinkhorn on CPU, "native" (the whole loop in C++, memory
linear). "auto" runs Sinkhorn on CPU natively, and otherwise the reference on small problems,
where KeOps' launch and set-up costs dominate, and KeOps on the others (see ``_SMALL_PAIRS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native, reference
from ..keops import chamfer as keops_chamfer
from ..keops import penalties as keops_penalties
from ..keops import sinkhorn as keops_sinkhorn
from . import _checks, _dispatch

__all__ = ["chamfer_loss", "repulsion_penalty", "sinkhorn_loss", "valency_penalty"]

_REDUCTIONS = ("mean", "sum", "none")

# "auto" runs the reference when the dense problem has at most this many point pairs
# (B * N * M). Measured with `python -m bench` on a 2-core CPU (bench/results): at the paper's
# scale (B=64, sets of 2..35 points, 78k pairs) the reference and KeOps are within 10% of each
# other for Sinkhorn and the penalties, the reference is 1.4x faster for a Chamfer forward and
# KeOps 1.2x faster for a Chamfer forward+backward; from B=16 sets of 1024 points KeOps is 4 to
# 30x faster.
_SMALL_PAIRS = 1 << 17


def _small(x: Tensor, y: Tensor, *, grad_favours_keops: bool = False) -> bool:
    """Whether "auto" should run the dense reference. ``grad_favours_keops``: at small sizes
    KeOps wins once a backward follows (Chamfer), so only a forward without autograd counts."""
    if grad_favours_keops and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return False
    return x.shape[0] * x.shape[1] * y.shape[1] <= _SMALL_PAIRS


def _lengths(lengths: Tensor | None, name: str, x: Tensor, minimum: int) -> Tensor | None:
    if lengths is None:
        if x.shape[1] < minimum and x.shape[0] > 0:
            points = name.removesuffix("_lengths")
            raise ValueError(
                f"{points} has shape {tuple(x.shape)}: with {name}=None every set has all "
                f"{x.shape[1]} rows, and a set needs at least {minimum} point(s)"
            )
        return None
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{name} must be an integer tensor ({x.shape[0]},) or None")
    lengths = _checks.int_vector(lengths, name, x.shape[0], x.device)
    _checks.values_in_range(lengths, name, minimum, x.shape[1], "the padded set size")
    return lengths


def _pair(x, y, x_lengths, y_lengths):
    """Validates two padded set batches for a loss; returns the lengths as int64 or None."""
    x = _checks.float_tensor(x, "x", "(B, N, D)")
    y = _checks.float_tensor(y, "y", "(B, M, D)")
    _checks.same_dtype({"x": x, "y": y})
    _checks.same_device({"x": x, "y": y})
    _checks.dim_equal("y", y.shape, 0, x.shape[0], "the batch size B of x")
    _checks.dim_equal("y", y.shape, 2, x.shape[2], "the point dim D of x")
    return _lengths(x_lengths, "x_lengths", x, 1), _lengths(y_lengths, "y_lengths", y, 1)


def chamfer_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    *,
    point_reduction: str = "mean",
    batch_reduction: str = "mean",
    return_index: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Chamfer distance between padded point sets (PyTorch3D's convention, norm 2).

    ``CD(X, Y) = red_i min_j |x_i - y_j|^2 + red_j min_i |x_i - y_j|^2``, squared distances
    summed over the D channels, ``red`` the mean or sum over each set's own points.

    Args:
        x: (B, N, D) padded sets; y: (B, M, D).
        x_lengths, y_lengths: integer (B,) real sizes, each in [1, N] (resp. M); None: all.
        point_reduction: "mean" or "sum" over each set's points.
        batch_reduction: "mean", "sum" or "none" (a (B,) tensor).
        return_index: also return the nearest-neighbour indices x->y (B, N) and y->x (B, M),
            int64, -1 on padding.
        backend: "auto", "reference" or "keops".
    """
    x_lengths, y_lengths = _pair(x, y, x_lengths, y_lengths)
    _checks.choice(point_reduction, "point_reduction", ("mean", "sum"))
    _checks.choice(batch_reduction, "batch_reduction", _REDUCTIONS)
    _checks.flag(return_index, "return_index")
    small = _small(x, y, grad_favours_keops=True)
    chosen = _dispatch.resolve("chamfer_loss", backend, x.device, small=small)
    impl = keops_chamfer.chamfer_loss if chosen == "keops" else reference.chamfer_loss
    return impl(
        x,
        y,
        x_lengths,
        y_lengths,
        point_reduction=point_reduction,
        batch_reduction=batch_reduction,
        return_index=return_index,
    )


def sinkhorn_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    *,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    diameter: float | None = None,
    debias: bool = True,
    batch_reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Sinkhorn divergence between uniform measures on padded sets (geomloss's conventions).

    ``S = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2`` (``debias=True``) with cost
    ``|x - y|^p / p``, ``eps = blur^p``, eps-scaling from ``diameter^p`` down to ``blur^p`` by
    ``scaling^p`` per step; comparable with ``geomloss.SamplesLoss("sinkhorn", p=p, ...)``.
    It is not the exact OT cost (W2^2 / 2 for p=2, W1 for p=1): the eps-scaling stops after a
    fixed number of steps, so at the default ``scaling=0.5`` the value stays several percent
    below exact OT for p=2, and more for p=1, however small the blur. It approaches exact OT
    as blur goes to 0 *and* scaling goes to 1 (more steps, slower).
    Each set's value equals that set computed alone with the same diameter.

    Args:
        x: (B, N, D) padded sets; y: (B, M, D).
        x_lengths, y_lengths: integer (B,) real sizes, each in [1, N] (resp. M); None: all.
        p: 1 (cost |x - y|) or 2 (cost |x - y|^2 / 2).
        blur: > 0, the final entropic scale.
        scaling: in (0, 1), the ratio between successive scales.
        diameter: > 0, the first scale; None: the bounding-box diagonal of the batch's real
            points.
        debias: subtract the self-transport terms (the Sinkhorn divergence) or not (OT_eps).
        batch_reduction: "mean", "sum" or "none" (a (B,) tensor).
        backend: "auto", "reference", "keops" or "native" (C++, CPU tensors).
    """
    x_lengths, y_lengths = _pair(x, y, x_lengths, y_lengths)
    p = _checks.integer(p, "p")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 (cost |x-y|) or 2 (cost |x-y|^2 / 2), got {p}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    blur = _checks.power_in_range(_checks.positive_number(blur, "blur"), "blur", p, compute)
    scaling = _checks.positive_number(scaling, "scaling")
    if not scaling < 1:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if diameter is not None:
        diameter = _checks.positive_number(diameter, "diameter")
        diameter = _checks.power_in_range(diameter, "diameter", p, compute)
    _checks.flag(debias, "debias")
    _checks.choice(batch_reduction, "batch_reduction", _REDUCTIONS)
    chosen = _dispatch.resolve("sinkhorn_loss", backend, x.device, small=_small(x, y))
    if chosen == "native":  # native.sinkhorn exists only when the extension loaded
        impl = native.sinkhorn.sinkhorn_loss
    else:
        impl = keops_sinkhorn.sinkhorn_loss if chosen == "keops" else reference.sinkhorn_loss
    return impl(
        x,
        y,
        x_lengths,
        y_lengths,
        p=p,
        blur=blur,
        scaling=scaling,
        diameter=diameter,
        debias=debias,
        batch_reduction=batch_reduction,
    )


def repulsion_penalty(
    x: Tensor, lengths: Tensor | None = None, *, min_dist: float = 1.0, backend: str = "auto"
) -> Tensor:
    """Per set ``sum_{i<j} relu(min_dist - |x_i - x_j|)`` (paper D.2, reg2).

    x (B, N, D) padded sets, lengths integer (B,) in [0, N] or None; returns (B,) in x's dtype.
    """
    x = _checks.float_tensor(x, "x", "(B, N, D)")
    lengths = _lengths(lengths, "lengths", x, 0)
    min_dist = _checks.positive_number(min_dist, "min_dist")
    chosen = _dispatch.resolve("repulsion_penalty", backend, x.device, small=_small(x, x))
    impl = keops_penalties.repulsion_penalty if chosen == "keops" else reference.repulsion_penalty
    return impl(x, lengths, min_dist=min_dist)


def valency_penalty(
    x: Tensor,
    lengths: Tensor | None = None,
    *,
    neighbor_dist: float = 2.0,
    max_valency: int = 4,
    backend: str = "auto",
) -> Tensor:
    """Per set ``sum_i relu(s_i0 - neighbor_dist) + sum_{k >= max_valency} relu(neighbor_dist -
    s_ik)``, s_i the sorted distances from point i to the others (paper D.2, reg3).

    Penalises points with no neighbour within ``neighbor_dist`` and points with more than
    ``max_valency`` neighbours. x (B, N, D), lengths integer (B,) in [0, N] or None; returns
    (B,) in x's dtype; a set of one point contributes 0.
    """
    x = _checks.float_tensor(x, "x", "(B, N, D)")
    lengths = _lengths(lengths, "lengths", x, 0)
    neighbor_dist = _checks.positive_number(neighbor_dist, "neighbor_dist")
    _checks.integer(max_valency, "max_valency", minimum=0)
    chosen = _dispatch.resolve("valency_penalty", backend, x.device, small=_small(x, x))
    impl = keops_penalties.valency_penalty if chosen == "keops" else reference.valency_penalty
    return impl(x, lengths, neighbor_dist=neighbor_dist, max_valency=max_valency)
