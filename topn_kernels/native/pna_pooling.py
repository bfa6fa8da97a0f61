"""Python side of the native PNA pooling (csrc/cpu/pna_pooling.cpp, its autograd in C++ there):
fake kernels and :func:`pna_pool`, the reductions of :class:`topn_kernels.models.authors.PNAPooling`
in one op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import strided_cpu_float

__all__ = ["pna_pool", "supports"]

_OPS = torch.ops.topn_kernels


@torch.library.register_fake("topn_kernels::pna_pool")
def _pool_fake(x, scales):
    return x.new_empty((x.shape[0], 12 * x.shape[2]))


@torch.library.register_fake("topn_kernels::pna_pool_backward")
def _pool_backward_fake(grad_out, x, out, scales):
    return x.new_empty(x.shape)


@torch.library.register_fake("topn_kernels::pna_pool_autograd")
def _pool_autograd_fake(x, scales):
    return x.new_empty((x.shape[0], 12 * x.shape[2]))


def supports(x: Tensor) -> bool:
    """Whether :func:`pna_pool` takes x: a strided float32 or float64 CPU tensor (B, n, C) with
    n >= 2, outside autocast."""
    return strided_cpu_float(x, 3) and x.shape[1] >= 2 and not torch.is_autocast_enabled("cpu")


def pna_pool(x: Tensor, scales: Tensor) -> Tensor:
    """x (B, n, C) and the 3 degree scalers (3,) of x's dtype -> (B, 12 C): per channel the sum,
    max, mean and standard deviation over the n points (unbiased, with a 1e-12 floor under the
    root), each times each scaler (the deviation's variance times its square), ordered
    (channel, reduction, scaler). Differentiable once with respect to x (the scalers are
    constants); x must pass :func:`supports`."""
    if not supports(x):
        raise ValueError("pna_pool: x must be a float32 or float64 CPU tensor (B, n, C), n >= 2")
    return _OPS.pna_pool_autograd(x, scales)
