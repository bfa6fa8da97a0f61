"""Public set losses and penalties (docs/operators.md): validation, then the backend.

Sets come padded, x (B, N, D) and y (B, M, D), with optional integer lengths (B,); padding is
ignored exactly. Backends: "reference" (dense PyTorch, memory quadratic in the set size),
"keops" (memory linear) and, on CPU, "native" (C++, every set of the batch in one call,
memory linear). "auto" runs the native backend on CPU when it has the call's options (see
``_dispatch``) and the batch has at least as many sets as threads or is small; otherwise
the reference on small problems, where KeOps' launch and set-up costs dominate, and KeOps on
the others (see ``_SMALL_PAIRS``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import native, reference
from .._ragged import compute_dtype, lengths_mask, reduce_batch
from ..keops import chamfer as keops_chamfer
from ..keops import penalties as keops_penalties
from ..keops import sinkhorn as keops_sinkhorn
from . import _checks, _dispatch
from .set_loss_op import set_loss

__all__ = ["chamfer_loss", "repulsion_penalty", "sinkhorn_loss", "valency_penalty"]

_REDUCTIONS = ("mean", "sum", "none")

# Where the native backend does not run, "auto" runs the reference when the dense problem has
# at most this many point pairs (B * N * M). Measured with `python -m bench` on a 2-core CPU
# (bench/results): at the paper's scale (B=64, sets of 2..35 points, 78k pairs) the
# reference and KeOps are within 10% of each other for Sinkhorn and the penalties, the
# reference is 1.4x faster for a Chamfer forward and KeOps 1.2x faster for a Chamfer
# forward+backward; from B=16 sets of 1024 points KeOps is 4 to 30x faster.
_SMALL_PAIRS = 1 << 17


def _small(x: Tensor, y: Tensor, *, grad_favours_keops: bool = False) -> bool:
    """Whether "auto" should run the dense reference. ``grad_favours_keops``: at small sizes
    KeOps wins once a backward follows (Chamfer), so only a forward without autograd counts."""
    if grad_favours_keops and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return False
    return x.shape[0] * x.shape[1] * y.shape[1] <= _SMALL_PAIRS


@torch.compiler.assume_constant_result
def _threads() -> int:
    return torch.get_num_threads()


def _few_large_sets(x: Tensor, y: Tensor) -> tuple[str, ...]:
    """("native",) when the native losses, parallel over sets, would leave threads idle on
    a problem too large for that not to matter: "auto" then prefers KeOps."""
    pairs = x.shape[0] * x.shape[1] * y.shape[1]
    return () if x.shape[0] >= _threads() or pairs <= _SMALL_PAIRS else ("native",)


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


def _pair(
    x: object, y: object, x_lengths: object, y_lengths: object, minimum: int = 1
) -> tuple[Tensor | None, Tensor | None]:
    """Validates two padded set batches for a loss; returns the lengths as int64 or None.
    ``minimum``: the smallest set size allowed (Chamfer takes sets of no point)."""
    x = _checks.float_tensor(x, "x", "(B, N, D)")
    y = _checks.float_tensor(y, "y", "(B, M, D)")
    _checks.same_dtype({"x": x, "y": y})
    _checks.same_device({"x": x, "y": y})
    _checks.dim_equal("y", y.shape, 0, x.shape[0], "the batch size B of x")
    _checks.dim_equal("y", y.shape, 2, x.shape[2], "the point dim D of x")
    return (
        _lengths(x_lengths, "x_lengths", x, minimum),
        _lengths(y_lengths, "y_lengths", y, minimum),
    )


def _like(value: object, name: str, shape: tuple[int, ...], ref: Tensor, what: str) -> Tensor:
    """A float tensor of exactly ``shape``, with the dtype and device of x (``ref``); ``what``
    describes the shape in messages, e.g. "(B, N, D), the shape of x"."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {what}, got {type(value).__name__}"
        )
    if value.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {what} = {tuple(shape)}, got {tuple(value.shape)}"
        )
    _checks.same_dtype({"x": ref, name: value})
    _checks.same_device({"x": ref, name: value})
    return value


def _chamfer_normals(x_normals: object, y_normals: object, x: Tensor, y: Tensor) -> bool:
    """Validates the normals (both or neither); returns whether they are given."""
    if x_normals is None and y_normals is None:
        return False
    for name, other in (("x_normals", y_normals), ("y_normals", x_normals)):
        if other is None:
            missing = "y_normals" if name == "x_normals" else "x_normals"
            raise ValueError(f"{name} is given but {missing} is None: give both or neither")
    _like(x_normals, "x_normals", x.shape, x, "(B, N, D), the shape of x")
    _like(y_normals, "y_normals", y.shape, x, "(B, M, D), the shape of y")
    return True


def chamfer_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    x_normals: Tensor | None = None,
    y_normals: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    point_reduction: str | None = "mean",
    batch_reduction: str | None = "mean",
    norm: int = 2,
    single_directional: bool = False,
    abs_cosine: bool = True,
    return_index: bool = False,
    backend: str = "auto",
) -> Tensor | tuple:
    """Chamfer distance between padded point sets: PyTorch3D's ``chamfer_distance``, with its
    argument names, options and return conventions (docs/operators.md, chamfer_loss).

    Per set, ``red_i d(x_i, NN_Y(x_i)) + red_j d(y_j, NN_X(y_j))`` with ``d`` the squared
    Euclidean distance summed over the D channels (``norm=2``) or the L1 distance
    (``norm=1``), ``red`` the mean, sum or max over the set's own points.

    Args:
        x: (B, N, D) padded sets; y: (B, M, D).
        x_lengths, y_lengths: integer (B,) real sizes, each in [0, N] (resp. M); None: all.
            A point whose other set is empty contributes 0 (its normal term 1); the mean
            over a set of no point is 0.
        x_normals, y_normals: (B, N, D) and (B, M, D) normals (both or neither): the call
            then also returns ``loss_normals``, the same reductions of ``1 - |cos|`` between
            each point's normal and its nearest neighbour's (``1 - cos`` if not abs_cosine).
        weights: (B,) per-set weights >= 0, multiplying each set's terms; "mean" then
            divides by their sum (all zero: the loss is 0).
        point_reduction: "mean", "sum", "max" (the two directions' maximum, Hausdorff-like;
            no normals) or None (the per-point terms (B, N) and (B, M), 0 on padding; needs
            batch_reduction None).
        batch_reduction: "mean", "sum", or "none" / None (per set, (B,)).
        norm: 2 (squared Euclidean) or 1 (L1).
        single_directional: the x->y term only.
        abs_cosine: the normals' term ignores their orientation.
        return_index: also return the nearest-neighbour indices x->y (B, N) and y->x
            (B, M), int64, -1 on padding and where the other set is empty.
        backend: "auto", "reference" or "keops".

    Returns:
        ``loss`` ((x->y, y->x) per-point terms for point_reduction None; x->y alone when
        single_directional); ``(loss, loss_normals)`` with normals; ``return_index`` appends
        ``x_index, y_index``. Without normals the loss is returned alone (PyTorch3D returns
        ``(loss, None)``).
    """
    x_lengths, y_lengths = _pair(x, y, x_lengths, y_lengths, minimum=0)
    normals = _chamfer_normals(x_normals, y_normals, x, y)
    if weights is not None:
        weights = _like(weights, "weights", (x.shape[0],), x, "(B,)")
        if not torch.compiler.is_compiling() and not bool((weights >= 0).all()):
            raise ValueError("weights must be >= 0 (and not NaN), got a negative or NaN entry")
    if point_reduction is not None:
        _checks.choice(point_reduction, "point_reduction", ("mean", "sum", "max"))
    batch_reduction = "none" if batch_reduction is None else batch_reduction
    _checks.choice(batch_reduction, "batch_reduction", _REDUCTIONS)
    if point_reduction is None and batch_reduction != "none":
        raise ValueError(
            f"point_reduction=None (per-point terms) needs batch_reduction None or 'none', "
            f"got batch_reduction={batch_reduction!r}"
        )
    if point_reduction == "max" and normals:
        raise ValueError(
            "point_reduction='max' takes no normals: x_normals, y_normals must be None"
        )
    norm = _checks.integer(norm, "norm")
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 (L1) or 2 (squared Euclidean), got {norm}")
    _checks.flag(single_directional, "single_directional")
    _checks.flag(abs_cosine, "abs_cosine")
    _checks.flag(return_index, "return_index")
    small = _small(x, y, grad_favours_keops=True)
    unsupported = None
    if point_reduction not in ("mean", "sum") or normals or return_index:
        unsupported = {"native": _NATIVE_CHAMFER_OPTIONS}
    chosen = _dispatch.resolve(
        "chamfer_loss",
        backend,
        x.device,
        small=small,
        unsupported=unsupported,
        slow=_few_large_sets(x, y),
    )
    if chosen == "native":
        return native.set_losses.chamfer_loss(
            x,
            y,
            x_lengths,
            y_lengths,
            weights,
            point_reduction=point_reduction,
            batch_reduction=batch_reduction,
            norm=norm,
            single_directional=single_directional,
        )
    impl = keops_chamfer.chamfer_loss if chosen == "keops" else reference.chamfer_loss
    return impl(
        x,
        y,
        x_lengths,
        y_lengths,
        x_normals,
        y_normals,
        weights,
        point_reduction=point_reduction,
        batch_reduction=batch_reduction,
        norm=norm,
        single_directional=single_directional,
        abs_cosine=abs_cosine,
        return_index=return_index,
    )


def _sinkhorn_points(
    x: object, y: object, x_lengths: object, y_lengths: object
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """x, y as batches (B, N, D), (B, M, D) and their lengths; unbatched (N, D), (M, D) inputs
    (geomloss's) become one set, and take no lengths. Returns (x, y, x_lengths, y_lengths,
    unbatched)."""
    unbatched = isinstance(x, Tensor) and x.dim() == 2
    if not unbatched:
        return (x, y, *_pair(x, y, x_lengths, y_lengths), False)
    x = _checks.float_tensor(x, "x", "(N, D)")
    if isinstance(y, Tensor) and y.dim() != 2:
        raise ValueError(
            f"x is unbatched (N, D) = {tuple(x.shape)}: y must be (M, D) too, got shape "
            f"{tuple(y.shape)}"
        )
    y = _checks.float_tensor(y, "y", "(M, D)")
    for name, value in (("x_lengths", x_lengths), ("y_lengths", y_lengths)):
        if value is not None:
            raise ValueError(f"{name} must be None for unbatched (N, D) points, got {value!r}")
    x_lengths, y_lengths = _pair(x[None], y[None], None, None)
    return x[None], y[None], x_lengths, y_lengths, True


def _point_weights(
    w: object, name: str, points: Tensor, points_name: str, lengths: Tensor | None, unbatched: bool
) -> Tensor | None:
    """Validates per-point weights (B, N) of ``points`` (B, N, D) ((N,) if unbatched): >= 0
    on the real points with a positive sum per set, finite in the compute dtype (padding
    ignored whatever it holds).
    Returns them as (B, N), or None."""
    if w is None:
        return None
    size_name = "N" if points_name == "x" else "M"
    if unbatched:
        what = f"({size_name},) for {points_name} ({size_name}, D)"
        w = _like(w, name, (points.shape[1],), points, what)[None]
    else:
        what = f"(B, {size_name}) for {points_name} (B, {size_name}, D)"
        w = _like(w, name, tuple(points.shape[:2]), points, what)
    size = points.shape[1]
    if not torch.compiler.is_compiling() and w.numel() > 0:
        real = w if lengths is None else torch.where(lengths_mask(lengths, size), w, 0.0)
        if bool((real < 0).any()):
            raise ValueError(f"{name} must be >= 0 on the real points, got a negative weight")
        sums = real.to(compute_dtype(real.dtype)).sum(1)
        if bool((sums <= 0).any()):
            raise ValueError(
                f"{name}: the weights of each set's real points must have a positive sum, "
                f"got a set whose weights are all 0"
            )
        if not bool(sums.isfinite().all()):
            raise ValueError(
                f"{name}: the weights of each set's real points must have a finite sum, got "
                f"an infinite weight or a sum beyond {compute_dtype(real.dtype)}'s range"
            )
    return w


def sinkhorn_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None = None,
    y_lengths: Tensor | None = None,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    diameter: float | None = None,
    debias: bool = True,
    batch_reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Sinkhorn divergence between measures on padded sets (geomloss's conventions).

    ``S = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2`` (``debias=True``) with cost
    ``|x - y|^p / p``, ``eps = blur^p``, eps-scaling from ``diameter^p`` down to ``blur^p`` by
    ``scaling^p`` per step, one Sinkhorn iteration per scale; comparable with
    ``geomloss.SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling)(a, x, b, y)``.
    Each set's value equals that set computed alone with the same diameter.

    Accuracy: the value is not the exact OT cost (W2^2 / 2 for p=2, W1 for p=1), and a
    smaller blur alone does not bring it there. Two things set the error: ``scaling``, the
    speed of the eps-annealing (one Sinkhorn iteration per scale, as geomloss: at 0.5 the
    loop stops far from convergence, and that error dominates whatever the blur), and
    ``blur``, the entropic bias left at the last scale (eps = blur^p: it matters much more
    for p=1). Measured against POT's exact ``ot.emd2`` on Gaussian clouds (3-D: 100, 300
    and 1000 points; 2-D: 30 and 100; two seeds each): at scaling 0.5 the value was 2.5 to
    8% below exact OT for p=2 and 8 to 32% below for p=1 (more with more points: 28 to 32%
    at 1000), and blur 0.001 instead of 0.05 changed that by at most 0.1 point (p=2) and 4
    points (p=1); at scaling 0.9 and blur 0.001, up to 1.1% (p=2) and 6% (p=1) below; at
    scaling 0.99, blur 0.05 still left p=1 4 to 13% below. Blur 0.001 with scaling 0.99 came
    within 1e-3 of exact OT in every case (at most 9.3e-4 for p=2, 7.1e-4 for p=1), and
    scaling 0.999 within 1e-15 (p=2) and 5.7e-4 (p=1) on the 2-D sets it was run on. The
    cost grows with the number of scales, about ``log(diameter / blur) / -log(scaling)``:
    15 or 16 at blur 0.001 and scaling 0.5 against 880 to 930 at scaling 0.99 on those
    clouds. geomloss gives the same values (the same loop).

    Args:
        x: (B, N, D) padded sets, or (N, D) one unbatched set (then y is (M, D), the lengths
            None, a (N,) and b (M,), and the result 0-d); y: (B, M, D).
        x_lengths, y_lengths: integer (B,) real sizes, each in [1, N] (resp. M); None: all.
        a, b: (B, N) and (B, M) weights of the points of x and y (None: uniform), >= 0 with
            a positive sum per set; renormalised to sum to 1 over each set's real points,
            padding ignored whatever it holds. Differentiable.
        p: 1 (cost |x - y|) or 2 (cost |x - y|^2 / 2).
        blur: > 0, the final entropic scale.
        scaling: in (0, 1), the ratio between successive scales.
        diameter: > 0, the first scale; None: the bounding-box diagonal of the batch's real
            points.
        debias: subtract the self-transport terms (the Sinkhorn divergence) or not (OT_eps).
        batch_reduction: "mean", "sum" or "none" (a (B,) tensor).
        backend: "auto", "reference", "keops" or "native" (C++, CPU tensors; uniform weights
            only: with ``a`` or ``b``, "auto" runs KeOps, or the reference on small
            problems, and "native" is an error).
    """
    x, y, x_lengths, y_lengths, unbatched = _sinkhorn_points(x, y, x_lengths, y_lengths)
    a = _point_weights(a, "a", x, "x", x_lengths, unbatched)
    b = _point_weights(b, "b", y, "y", y_lengths, unbatched)
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
    weighted = a is not None or b is not None
    unsupported = {"native": _NATIVE_NO_WEIGHTS} if weighted else None
    compiling = torch.compiler.is_compiling()
    # traced, "auto" prefers KeOps to the reference, whose schedule reads tensor values (the
    # batch's diameter) unless it is given
    small = _small(x, y) and not (compiling and diameter is None)
    chosen = _dispatch.resolve(
        "sinkhorn_loss", backend, x.device, small=small, unsupported=unsupported
    )
    if compiling and chosen in ("native", "keops"):
        kind = "sinkhorn_native" if chosen == "native" else "sinkhorn_keops"
        params = [p, blur, scaling, math.nan if diameter is None else diameter, float(debias)]
        values = set_loss(kind, x, y, x_lengths, y_lengths, params, a, b)
        return reduce_batch(values, "sum" if unbatched else batch_reduction)
    if chosen == "native":  # native.sinkhorn exists only when the extension loaded
        impl = native.sinkhorn.sinkhorn_loss
    else:
        impl = keops_sinkhorn.sinkhorn_loss if chosen == "keops" else reference.sinkhorn_loss
    kwargs = {"a": a, "b": b} if weighted else {}
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
        batch_reduction="sum" if unbatched else batch_reduction,
        **kwargs,
    )


_NATIVE_CHAMFER_OPTIONS = (
    "the native Chamfer computes point reductions 'mean' and 'sum', without normals or "
    "indices (use backend='keops' or 'reference', or 'auto', which picks one of them)"
)

_NATIVE_NO_WEIGHTS = (
    "the native C++ loop has uniform weights built in and takes no per-point weights a, b "
    "(use backend='keops' or 'reference', or 'auto', which picks one of them)"
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
    chosen = _dispatch.resolve(
        "repulsion_penalty", backend, x.device, small=_small(x, x), slow=_few_large_sets(x, x)
    )
    if chosen == "native":
        return native.set_losses.repulsion_penalty(x, lengths, min_dist=min_dist)
    if chosen == "keops" and torch.compiler.is_compiling():
        return set_loss("repulsion_keops", x, None, lengths, None, [min_dist])
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
    chosen = _dispatch.resolve(
        "valency_penalty", backend, x.device, small=_small(x, x), slow=_few_large_sets(x, x)
    )
    if chosen == "native":
        return native.set_losses.valency_penalty(
            x, lengths, neighbor_dist=neighbor_dist, max_valency=max_valency
        )
    if chosen == "keops" and torch.compiler.is_compiling():
        params = [neighbor_dist, float(max_valency)]
        return set_loss("valency_keops", x, None, lengths, None, params)
    impl = keops_penalties.valency_penalty if chosen == "keops" else reference.valency_penalty
    return impl(x, lengths, neighbor_dist=neighbor_dist, max_valency=max_valency)
