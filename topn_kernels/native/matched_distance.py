"""Python side of the native matched distance (csrc/cpu/matched_distance.cpp): fake kernel,
autograd, and :func:`matched_distance` on padded batches of equal-size sets.

The op returns every set's value and, when a gradient is wanted, the gradient of each set's
value with respect to its points; the backward scales those by the upstream gradient of each
set (one autograd node, differentiable once).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["matched_distance"]

_OPS = torch.ops.topn_kernels


@torch.library.register_fake("topn_kernels::matched_sets")
def _matched_fake(x, y, lengths, with_grad):
    grad_x = x.new_empty(x.shape if with_grad else (0,))
    grad_y = y.new_empty(y.shape if with_grad else (0,))
    return x.new_empty((x.shape[0],)), grad_x, grad_y


class _Matched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, lengths: Tensor) -> Tensor:
        value, grad_x, grad_y = _OPS.matched_sets(x, y, lengths, any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(grad_x, grad_y)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor):
        grad_x, grad_y = ctx.saved_tensors
        scale = grad_value[:, None, None]
        need_x, need_y, _ = ctx.needs_input_grad
        return grad_x * scale if need_x else None, grad_y * scale if need_y else None, None


def matched_distance(x: Tensor, y: Tensor, lengths: Tensor) -> Tensor:
    """As :func:`topn_kernels.metrics.matched_distance` with both sets of each pair of size
    ``lengths`` (B,); CPU tensors of one floating dtype, inputs validated. Returns (B,) in x's
    dtype."""
    return _Matched.apply(x, y, lengths)
