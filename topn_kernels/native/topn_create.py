"""Python side of the native ``topn_kernels::topn_create`` operator.

The C++ library defines the schemas and the CPU kernels; this module registers what the
dispatcher needs from Python: fake (meta) kernels, so ``torch.compile`` traces the op as one
node, and autograd, which calls ``topn_kernels::topn_create_backward``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_OPS = torch.ops.topn_kernels


def topn_create(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: Tensor,
    film: Tensor,
    n_max: int,
    score_norm: str,
    sorted: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, mask, index, weight)`` on CPU; n is int64 (B,), inputs already validated."""
    return _OPS.topn_create.default(query, angles, table, bias, n, film, n_max, score_norm, sorted)


@torch.library.register_fake("topn_kernels::topn_create")
def _topn_create_fake(query, angles, table, bias, n, film, n_max, score_norm, sorted):
    batch, d = query.shape[0], table.shape[1]
    return (
        query.new_empty((batch, n_max, d)),
        query.new_empty((batch, n_max), dtype=torch.bool),
        query.new_empty((batch, n_max), dtype=torch.int64),
        query.new_empty((batch, n_max)),
    )


@torch.library.register_fake("topn_kernels::topn_create_backward")
def _topn_create_backward_fake(
    grad_x, grad_weight, query, angles, table, bias, film, index, score_norm
):
    return tuple(torch.empty_like(t) for t in (query, angles, table, bias, film))


def _setup_context(ctx, inputs, output) -> None:
    query, angles, table, bias, _n, film, _n_max, score_norm, _sorted = inputs
    _x, _mask, index, _weight = output
    ctx.save_for_backward(query, angles, table, bias, film, index)
    ctx.score_norm = score_norm


def _backward(ctx, grad_x, _grad_mask, _grad_index, grad_weight):
    query, angles, table, bias, film, index = ctx.saved_tensors
    if grad_x is None:
        grad_x = query.new_zeros((*index.shape, table.shape[1]))
    if grad_weight is None:
        grad_weight = query.new_zeros(index.shape)
    grads = _OPS.topn_create_backward.default(
        grad_x, grad_weight, query, angles, table, bias, film, index, ctx.score_norm
    )
    g_query, g_angles, g_table, g_bias, g_film = grads
    return g_query, g_angles, g_table, g_bias, None, g_film, None, None, None


torch.library.register_autograd(
    "topn_kernels::topn_create", _backward, setup_context=_setup_context
)
