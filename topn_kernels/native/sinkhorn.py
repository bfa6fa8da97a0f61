"""Python side of the native ``topn_kernels::sinkhorn`` (csrc/cpu/sinkhorn.cpp): fake kernel,
autograd, and the loss on padded batches.

The C++ op runs geomloss's whole Sinkhorn loop per set and, when a gradient is wanted, returns
the gradient of each set's value with respect to its points (the envelope gradient); the
backward scales those by the upstream gradient of each set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ragged import reduce_batch
from .._schedule import prepare

_OPS = torch.ops.topn_kernels


@torch.library.register_fake("topn_kernels::sinkhorn")
def _sinkhorn_fake(x, y, x_offsets, y_offsets, eps_list, p, debias, with_grad):
    batch = x_offsets.shape[0] - 1
    return (
        x.new_empty((batch,)),
        x.new_empty((x.shape[0] if with_grad else 0, x.shape[1])),
        y.new_empty((y.shape[0] if with_grad else 0, y.shape[1])),
    )


def _setup_context(ctx, inputs, output) -> None:
    _x, _y, x_offsets, y_offsets, *_, with_grad = inputs
    _value, grad_x, grad_y = output
    ctx.mark_non_differentiable(grad_x, grad_y)
    ctx.save_for_backward(grad_x, grad_y, x_offsets, y_offsets)
    ctx.with_grad = with_grad


def _backward(ctx, grad_value, _grad_grad_x, _grad_grad_y):
    grad_x, grad_y, x_offsets, y_offsets = ctx.saved_tensors
    if not ctx.with_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        raise RuntimeError("topn_kernels::sinkhorn was called with with_grad=False")
    per_x = grad_value.repeat_interleave(x_offsets.diff())[:, None]
    per_y = grad_value.repeat_interleave(y_offsets.diff())[:, None]
    return grad_x * per_x, grad_y * per_y, None, None, None, None, None, None


torch.library.register_autograd("topn_kernels::sinkhorn", _backward, setup_context=_setup_context)


def sinkhorn_loss(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    *,
    p: int,
    blur: float,
    scaling: float,
    diameter: float | None,
    debias: bool,
    batch_reduction: str,
) -> Tensor:
    """As :func:`topn_kernels.reference.sinkhorn_loss`; CPU tensors, inputs validated."""
    px, py, eps_list = prepare(
        x, y, x_lengths, y_lengths, p=p, blur=blur, scaling=scaling, diameter=diameter
    )
    with_grad = torch.is_grad_enabled() and (px.points.requires_grad or py.points.requires_grad)
    value, _, _ = _OPS.sinkhorn.default(
        px.points.contiguous(),
        py.points.contiguous(),
        px.offsets,
        py.offsets,
        eps_list,
        p,
        debias,
        with_grad,
    )
    return reduce_batch(value, batch_reduction).to(x.dtype)
