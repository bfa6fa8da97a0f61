"""Python side of the native Top-n creation of the authors' set VAE (csrc/cpu/authors_topn.cpp,
its autograd in C++ there): fake kernels, :func:`topn_plan` and :func:`run_topn`, the part of
:class:`topn_kernels.models.authors.TopN` after its angle MLP in one op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import strided_cpu_float
from .set_transformer import _attr

__all__ = ["run_topn", "topn_plan"]

_OPS = torch.ops.topn_kernels


@torch.library.register_fake("topn_kernels::authors_topn")
def _topn_fake(q, weights, n):
    B, a, R = q.shape[0], q.shape[1], weights[0].shape[0]
    d = weights[1].shape[1]
    return [
        q.new_empty((B, n, d)),
        q.new_empty((B, a)),
        q.new_empty((B,)),
        q.new_empty((B, R)),
        q.new_empty((B, n), dtype=torch.int64),
        q.new_empty((B, n)),
    ]


@torch.library.register_fake("topn_kernels::authors_topn_backward")
def _topn_backward_fake(grad_x, q, weights, n, saved):
    return [q.new_empty(q.shape), *(w.new_empty(w.shape) for w in weights)]


@torch.library.register_fake("topn_kernels::authors_topn_autograd")
def _topn_autograd_fake(q, weights, n):
    return q.new_empty((q.shape[0], n, weights[1].shape[1]))


def topn_plan(module: nn.Module, q: Tensor, n: int) -> tuple[str | None, list[Tensor]]:
    """(why the op cannot compute the rest of ``module`` (a ``TopN``) from q, or None; its 6
    weights when it can): q a strided float32/float64 CPU tensor (B, a) of the module's angle
    width and dtype, outside autocast; ``gamma`` and ``beta`` ``nn.Linear(1, d)`` with biases;
    n in [1, R], R the module's reference points."""
    if not strided_cpu_float(q, 2):
        return "q must be a strided float32 or float64 CPU tensor (B, a)", []
    if torch.is_autocast_enabled("cpu"):
        return "q: CPU autocast must be off", []
    angles, points = _attr(module, "angles"), _attr(module, "points")
    gamma, beta = _attr(module, "gamma"), _attr(module, "beta")
    if any(type(m) is not nn.Linear or m.bias is None or m.in_features != 1 for m in (gamma, beta)):
        return "gamma and beta must be nn.Linear(1, d) with biases", []
    weights = [angles, points, _attr(gamma, "weight"), _attr(gamma, "bias")]
    weights += [_attr(beta, "weight"), _attr(beta, "bias")]
    if q.shape[1] != angles.shape[1]:
        return f"q must have the module's {angles.shape[1]} angle channels", []
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= angles.shape[0]:
        return f"n must be an int in [1, {angles.shape[0]}], got {n!r}", []
    if gamma.out_features != points.shape[1] or beta.out_features != points.shape[1]:
        return "gamma and beta must map to the points' channels", []
    if any(w.dtype is not q.dtype or not w.is_cpu for w in weights):
        return f"module's parameters must have q's dtype and device ({q.dtype}, {q.device})", []
    return None, weights


def run_topn(q: Tensor, weights: list[Tensor], n: int) -> Tensor:
    """The op with the weights :func:`topn_plan` gave: x (B, n, d), differentiable once with
    respect to q and the weights."""
    return _OPS.authors_topn_autograd(q, weights, n)
