"""Python side of the native valency one-hot (csrc/cpu/valency.cpp): its fake kernel and
:func:`valency_onehot`, the encoder input of :class:`topn_kernels.models.authors.Encoder` in one
op."""

from __future__ import annotations

import torch
from torch import Tensor

from . import strided_cpu_float

__all__ = ["supports", "valency_onehot"]


@torch.library.register_fake("topn_kernels::valency_onehot")
def _valency_onehot_fake(x, neighbor_dist, classes):
    return x.new_empty((*x.shape[:2], classes))


def supports(x: Tensor) -> bool:
    """Whether :func:`valency_onehot` takes x: a strided float32 or float64 CPU tensor
    (B, n, d), d <= 3 (below ``torch.cdist``'s vector width on every CPU, where its float64
    sums run in order as the op's do, so the classes are the same)."""
    return strided_cpu_float(x, 3) and x.shape[2] <= 3


def valency_onehot(x: Tensor, neighbor_dist: float, classes: int) -> Tensor:
    """x (B, n, d) sets of equal size -> (B, n, classes) in x's dtype, not differentiable: for
    each point a one-hot of ``clamp(count - 1, 0, classes - 1)``, ``count`` its neighbours (the
    other points of its set closer than ``neighbor_dist``, distances in float64 as
    ``topn_kernels.metrics.valency_counts`` computes them). x must pass :func:`supports`;
    ``classes`` >= 1."""
    if not supports(x):
        raise ValueError(
            "valency_onehot: x must be a strided float32 or float64 CPU tensor (B, n, d), d <= 3"
        )
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"valency_onehot: classes must be an int >= 1, got {classes!r}")
    return torch.ops.topn_kernels.valency_onehot(x.detach(), float(neighbor_dist), classes)
