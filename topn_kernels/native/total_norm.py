"""Python side of the native total norm (csrc/cpu/total_norm.cpp): its fake kernel and
:func:`total_norm`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["total_norm"]


@torch.library.register_fake("topn_kernels::total_norm")
def _total_norm_fake(tensors):
    return tensors[0].new_empty(())


def total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all elements of ``tensors`` together (float32 or float64 strided CPU
    tensors of one dtype, at least one): a 0-d tensor of their dtype, summed in float64, the
    same value at any thread count."""
    return torch.ops.topn_kernels.total_norm(tensors)
