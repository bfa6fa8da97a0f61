"""Python side of the native set losses (csrc/cpu/set_losses.cpp): fake kernels, autograd, and
Chamfer, repulsion and valency on padded batches.

Each C++ op takes the padded sets and their lengths as they are (no packing, so
``torch.compile(fullgraph=True)`` traces straight through it) and returns every set's value
and, when a gradient is wanted, the gradient of each set's value with respect to its points;
the backward scales those by the upstream gradient of each set. Float16 and bfloat16 inputs
run in float32 (docs/operators.md, Dtypes and precision).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ragged import compute_dtype, reduce_weighted_batch

_OPS = torch.ops.topn_kernels


def _grad_shape(x: Tensor, with_grad: bool) -> Tensor:
    return x.new_empty(x.shape if with_grad else (0,))


@torch.library.register_fake("topn_kernels::chamfer_sets")
def _chamfer_fake(x, y, x_lengths, y_lengths, norm, mean, single_directional, with_grad):
    return x.new_empty((x.shape[0],)), _grad_shape(x, with_grad), _grad_shape(y, with_grad)


@torch.library.register_fake("topn_kernels::repulsion_sets")
def _repulsion_fake(x, lengths, min_dist, with_grad):
    return x.new_empty((x.shape[0],)), _grad_shape(x, with_grad)


@torch.library.register_fake("topn_kernels::valency_sets")
def _valency_fake(x, lengths, neighbor_dist, max_valency, with_grad):
    return x.new_empty((x.shape[0],)), _grad_shape(x, with_grad)


@torch.library.register_fake("topn_kernels::authors_point_terms")
def _point_terms_fake(x, y, lengths, min_dist, neighbor_dist, max_valency, with_grad):
    return [x.new_empty(()) for _ in range(3)] + [_grad_shape(x, with_grad) for _ in range(3)]


@torch.library.register_fake("topn_kernels::authors_point_terms_autograd")
def _point_terms_autograd_fake(x, y, lengths, min_dist, neighbor_dist, max_valency):
    return tuple(x.new_empty(()) for _ in range(3))


@torch.library.register_fake("topn_kernels::authors_kl_total")
def _kl_total_fake(mu, log_var, rec, rep, val, kl_weight, repulsion_weight, valency_weight):
    return [mu.new_empty(()), mu.new_empty(())]


@torch.library.register_fake("topn_kernels::authors_kl_total_autograd")
def _kl_total_autograd_fake(mu, log_var, rec, rep, val, *weights):
    return mu.new_empty(()), mu.new_empty(())


def _setup_context(ctx, inputs, output) -> None:
    _value, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)


def _scaled(ctx, name: str, grad_value: Tensor, needed: tuple[bool, ...]) -> list:
    """The saved per-set gradients times the upstream gradient of each set (None where no
    gradient is wanted)."""
    out = []
    for g, need in zip(ctx.saved_tensors, needed, strict=True):
        if not need:
            out.append(None)
        elif g.dim() == 1:  # the op ran with with_grad=False
            raise RuntimeError(f"topn_kernels::{name} was called with with_grad=False")
        else:
            out.append(g * grad_value[:, None, None])
    return out


def _chamfer_backward(ctx, grad_value, *_):
    gx, gy = _scaled(ctx, "chamfer_sets", grad_value, ctx.needs_input_grad[:2])
    return gx, gy, None, None, None, None, None, None


def _penalty_backward(name: str, extra: int):
    def backward(ctx, grad_value, *_):
        (gx,) = _scaled(ctx, name, grad_value, ctx.needs_input_grad[:1])
        return gx, *([None] * extra)

    return backward


torch.library.register_autograd(
    "topn_kernels::chamfer_sets", _chamfer_backward, setup_context=_setup_context
)
torch.library.register_autograd(
    "topn_kernels::repulsion_sets",
    _penalty_backward("repulsion_sets", 3),
    setup_context=_setup_context,
)
torch.library.register_autograd(
    "topn_kernels::valency_sets",
    _penalty_backward("valency_sets", 4),
    setup_context=_setup_context,
)


def _wants_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def chamfer_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    weights: Tensor | None,
    *,
    point_reduction: str,
    batch_reduction: str,
    norm: int,
    single_directional: bool,
) -> Tensor:
    """As :func:`topn_kernels.reference.chamfer_loss` for point_reduction "mean" or "sum",
    without normals or indices; CPU tensors, inputs validated."""
    ct = compute_dtype(x.dtype)
    xs, ys = x.to(ct), y.to(ct)
    value, _, _ = _OPS.chamfer_sets(
        xs,
        ys,
        x_lengths,
        y_lengths,
        norm,
        point_reduction == "mean",
        single_directional,
        _wants_grad(xs, ys),
    )
    w = None
    if weights is not None:
        w = weights.to(ct)
        value = value * (w * (w.sum() > 0))  # all-zero weights: 0, zero gradients
    return reduce_weighted_batch(value, w, batch_reduction).to(x.dtype)


def repulsion_penalty(x: Tensor, lengths: Tensor | None, *, min_dist: float) -> Tensor:
    """As :func:`topn_kernels.reference.repulsion_penalty`; CPU tensors, inputs validated."""
    xs = x.to(compute_dtype(x.dtype))
    value, _ = _OPS.repulsion_sets(xs, lengths, min_dist, _wants_grad(xs))
    return value.to(x.dtype)


def valency_penalty(
    x: Tensor, lengths: Tensor | None, *, neighbor_dist: float, max_valency: int
) -> Tensor:
    """As :func:`topn_kernels.reference.valency_penalty`; CPU tensors, inputs validated."""
    xs = x.to(compute_dtype(x.dtype))
    max_valency = min(max_valency, x.shape[1])  # from N - 1 on, no point has too many
    value, _ = _OPS.valency_sets(xs, lengths, neighbor_dist, max_valency, _wants_grad(xs))
    return value.to(x.dtype)
