"""The Triton topn_create as ``torch.library`` ops: ``topn_kernels::triton_topn_create`` and
``topn_kernels::triton_topn_create_backward``, their fake kernels and the autograd that joins
them.

Registered with ``torch.library.custom_op`` rather than ``triton_op``: the op is one opaque
node under ``torch.compile`` (no graph break; its kernels are fused already), and the same
registration works under ``TRITON_INTERPRET=1``, where ``wrap_triton`` cannot trace interpreted
kernels, so opcheck and torch.compile are tested on CPU too.
"""

from __future__ import annotations

import torch

from .topn_create_launch import backward, forward

OP = "topn_kernels::triton_topn_create"
BACKWARD_OP = "topn_kernels::triton_topn_create_backward"


@torch.library.custom_op(
    OP,
    mutates_args=(),
    schema="(Tensor query, Tensor angles, Tensor table, Tensor bias, Tensor n, Tensor film, "
    "SymInt n_max, str score_norm, bool sorted) "
    "-> (Tensor x, Tensor mask, Tensor index, Tensor weight)",
)
def topn_create_op(query, angles, table, bias, n, film, n_max, score_norm, sorted):
    """``(x, mask, index, weight)`` (DESIGN 3.1); n int64 (B,), inputs validated."""
    return forward(query, angles, table, bias, n, film, n_max, score_norm, sorted)


@topn_create_op.register_fake
def _topn_create_fake(query, angles, table, bias, n, film, n_max, score_norm, sorted):
    batch, d = query.shape[0], table.shape[1]
    return (
        query.new_empty((batch, n_max, d)),
        query.new_empty((batch, n_max), dtype=torch.bool),
        query.new_empty((batch, n_max), dtype=torch.int64),
        query.new_empty((batch, n_max)),
    )


@torch.library.custom_op(
    BACKWARD_OP,
    mutates_args=(),
    schema="(Tensor grad_x, Tensor grad_weight, Tensor query, Tensor angles, Tensor table, "
    "Tensor bias, Tensor film, Tensor n, Tensor index, str score_norm, bool deterministic) "
    "-> (Tensor grad_query, Tensor grad_angles, Tensor grad_table, Tensor grad_bias, "
    "Tensor grad_film)",
)
def topn_create_backward_op(grad_x, grad_weight, query, angles, table, bias, film, n, index,
                            score_norm, deterministic):  # fmt: skip
    """Gradients of query, angles, table, bias, film. ``deterministic``: no atomics."""
    return backward(grad_x, grad_weight, query, angles, table, bias, film, n, index, score_norm,
                    deterministic)  # fmt: skip


@topn_create_backward_op.register_fake
def _topn_create_backward_fake(grad_x, grad_weight, query, angles, table, bias, film, n, index,
                               score_norm, deterministic):  # fmt: skip
    return tuple(torch.empty_like(t) for t in (query, angles, table, bias, film))


def _setup_context(ctx, inputs, output) -> None:
    query, angles, table, bias, n, film, _n_max, score_norm, _sorted = inputs
    ctx.save_for_backward(query, angles, table, bias, film, n, output[2])
    ctx.score_norm = score_norm


def _autograd_backward(ctx, grad_x, _grad_mask, _grad_index, grad_weight):
    query, angles, table, bias, film, n, index = ctx.saved_tensors
    if grad_x is None:
        grad_x = query.new_zeros((*index.shape, table.shape[1]))
    if grad_weight is None:
        grad_weight = query.new_zeros(index.shape)
    grads = topn_create_backward_op(
        grad_x, grad_weight, query, angles, table, bias, film, n, index, ctx.score_norm,
        torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    g_query, g_angles, g_table, g_bias, g_film = grads
    return g_query, g_angles, g_table, g_bias, None, g_film, None, None, None


topn_create_op.register_autograd(_autograd_backward, setup_context=_setup_context)
