"""``topn_kernels::topn_create``: the one ``torch.library`` op of Top-n creation, for every
backend (``docs/operators.md``, "topn_create").

This module holds what the backends share: the forward and backward schemas, the fake kernels
that check shapes and dtypes (what ``torch.compile`` and ``opcheck`` trace), and the autograd
registration. A backend supplies only its two kernels (:class:`Kernels`): the native one in
:mod:`topn_kernels.native.topn_create` (C++, CPU) and the Triton one in
:mod:`topn_kernels.triton.topn_create_launch` (CUDA; CPU under ``TRITON_INTERPRET=1``). The
``backend`` argument of the op names the kernels to run; it is a constant under
``torch.compile``, so the op stays one opaque node whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Kernels", "topn_create", "topn_create_backward"]

INPUTS = ("query", "angles", "table", "bias", "film")
OP = "topn_kernels::topn_create"
BACKWARD_OP = "topn_kernels::topn_create_backward"


class Kernels(NamedTuple):
    """A backend's kernels, called with validated, consistent inputs.

    ``forward(query, angles, table, bias, n, film, n_max, score_norm, sorted, *, n_fixed)``
    returns ``(x, mask, index, weight)``; ``backward(grad_x, grad_weight, query, angles, table,
    bias, n, film, index, score_norm, output_mask, deterministic, *, n_fixed)`` returns the
    gradients of query, angles, table, bias and film, None where ``output_mask`` is False.
    ``n`` is int64 (B,); ``n_fixed`` is the size of every set, or None: when it is given,
    ``n`` is not read and may be empty.
    """

    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor | None, ...]]


def _kernels(backend: str) -> Kernels:
    """The kernels of ``backend``, imported at the first call (Triton only when used)."""
    if backend == "native":
        from ..native import topn_create as module
    elif backend == "triton":
        from ..triton import topn_create_launch as module
    else:
        raise ValueError(f"{OP}: backend must be 'native' or 'triton', got {backend!r}")
    return Kernels(module.forward, module.backward)


@torch.library.custom_op(
    OP,
    mutates_args=(),
    schema="(Tensor query, Tensor angles, Tensor table, Tensor bias, Tensor n, Tensor film, "
    "SymInt n_max, str score_norm, bool sorted, str backend, SymInt n_fixed=-1) "
    "-> (Tensor x, Tensor mask, Tensor index, Tensor weight)",
)
def topn_create(
    query, angles, table, bias, n, film, n_max, score_norm, sorted, backend, n_fixed=-1
):
    """``(x, mask, index, weight)``: x (B, n_max, d) and weight (B, n_max) in the input dtype,
    mask (B, n_max) bool, index (B, n_max) int64 (-1 on padding). n is int64 (B,), or, when
    ``n_fixed`` >= 0 gives the size of every set, int64 (B,) or empty (0,); the public
    :func:`topn_kernels.topn_create` validates the values first."""
    args = (query, angles, table, bias, n, film, n_max, score_norm, sorted)
    return _kernels(backend).forward(*args, n_fixed=None if n_fixed < 0 else n_fixed)


@torch.library.custom_op(
    BACKWARD_OP,
    mutates_args=(),
    schema="(Tensor grad_x, Tensor grad_weight, Tensor query, Tensor angles, Tensor table, "
    "Tensor bias, Tensor n, Tensor film, Tensor index, str score_norm, bool[5] output_mask, "
    "bool deterministic, str backend, SymInt n_fixed=-1) -> (Tensor? grad_query, "
    "Tensor? grad_angles, Tensor? grad_table, Tensor? grad_bias, Tensor? grad_film)",
)
def topn_create_backward(
    grad_x,
    grad_weight,
    query,
    angles,
    table,
    bias,
    n,
    film,
    index,
    score_norm,
    output_mask,
    deterministic,
    backend,
    n_fixed=-1,
):
    """Gradients of query, angles, table, bias and film (None where ``output_mask`` is
    False) from those of x and weight; ``deterministic``: no atomics (a GPU concern: the
    native backward is deterministic always); n and n_fixed as for the forward."""
    args = (grad_x, grad_weight, query, angles, table, bias, n, film, index, score_norm)
    rest = (output_mask, deterministic)
    return _kernels(backend).backward(*args, *rest, n_fixed=None if n_fixed < 0 else n_fixed)


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    torch._check(tuple(t.shape) == shape, lambda: f"{name} must be {shape}, got {tuple(t.shape)}")


def _check_dtype(name: str, t: Tensor, dtype: torch.dtype) -> None:
    torch._check(
        t.dtype == dtype and t.dtype.is_floating_point,
        lambda: f"{name} must have the floating dtype of query, {dtype}, got {t.dtype}",
    )


def _check_inputs(query, angles, table, bias, n, film, n_fixed=-1) -> tuple[int, int, int, int]:
    """Shapes and dtypes the kernels rely on; returns (B, a, n0, d)."""
    torch._check(query.dim() == 2, lambda: f"query must be (B, a), got {tuple(query.shape)}")
    batch, a = query.shape
    torch._check(
        angles.dim() == 2 and angles.shape[1] == a,
        lambda: f"angles must be (n0, {a}), got {tuple(angles.shape)}",
    )
    n0 = angles.shape[0]
    torch._check(
        table.dim() == 2 and table.shape[0] == n0,
        lambda: f"table must be ({n0}, d), got {tuple(table.shape)}",
    )
    d = table.shape[1]
    _check_shape("bias", bias, (batch, d))
    _check_shape("film", film, (4, d))
    for name, t in zip(INPUTS, (query, angles, table, bias, film), strict=True):
        _check_dtype(name, t, query.dtype)
    shape_ok = tuple(n.shape) == (batch,) or (tuple(n.shape) == (0,) and n_fixed >= 0)
    torch._check(
        n.dtype == torch.int64 and shape_ok,
        lambda: f"n must be int64 ({batch},) ((0,) with n_fixed), got {n.dtype} {tuple(n.shape)}",
    )
    return batch, a, n0, d


@topn_create.register_fake
def _topn_create_fake(
    query, angles, table, bias, n, film, n_max, score_norm, sorted, backend, n_fixed=-1
):
    batch, _, _, d = _check_inputs(query, angles, table, bias, n, film, n_fixed)
    torch._check(n_max >= 0, lambda: f"n_max must be >= 0, got {n_max}")
    return (
        query.new_empty((batch, n_max, d)),
        query.new_empty((batch, n_max), dtype=torch.bool),
        query.new_empty((batch, n_max), dtype=torch.int64),
        query.new_empty((batch, n_max)),
    )


@topn_create_backward.register_fake
def _topn_create_backward_fake(
    grad_x,
    grad_weight,
    query,
    angles,
    table,
    bias,
    n,
    film,
    index,
    score_norm,
    output_mask,
    deterministic,
    backend,
    n_fixed=-1,
):
    batch, _, _, d = _check_inputs(query, angles, table, bias, n, film, n_fixed)
    torch._check(
        index.dim() == 2 and index.shape[0] == batch and index.dtype == torch.int64,
        lambda: f"index must be int64 ({batch}, n_max), got {index.dtype} {tuple(index.shape)}",
    )
    n_max = index.shape[1]
    torch._check(
        tuple(grad_x.shape) == (batch, n_max, d) and tuple(grad_weight.shape) == (batch, n_max),
        lambda: f"grad_x must be ({batch}, {n_max}, {d}) and grad_weight ({batch}, {n_max})",
    )
    inputs = (query, angles, table, bias, film)
    return tuple(
        torch.empty_like(t) if wanted else None
        for t, wanted in zip(inputs, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    query, angles, table, bias, n, film, _n_max, score_norm, _sorted, backend, *fixed = inputs
    ctx.save_for_backward(query, angles, table, bias, n, film, output[2])
    ctx.score_norm, ctx.backend = score_norm, backend
    ctx.n_fixed = fixed[0] if fixed else -1


def deterministic_backward() -> bool:
    """Whether the backward must avoid atomics: ``torch.use_deterministic_algorithms``."""
    return torch.are_deterministic_algorithms_enabled()


def _backward(ctx, grad_x, _grad_mask, _grad_index, grad_weight):
    # inputs: query, angles, table, bias, n, film, n_max, score_norm, sorted, backend, n_fixed
    wanted = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5)]
    if not any(wanted):
        return (None,) * 11
    query, angles, table, bias, n, film, index = ctx.saved_tensors
    if grad_x is None:
        grad_x = query.new_zeros((*index.shape, table.shape[1]))
    if grad_weight is None:
        grad_weight = query.new_zeros(index.shape)
    g_query, g_angles, g_table, g_bias, g_film = topn_create_backward(
        grad_x,
        grad_weight,
        query,
        angles,
        table,
        bias,
        n,
        film,
        index,
        ctx.score_norm,
        wanted,
        deterministic_backward(),
        ctx.backend,
        ctx.n_fixed,
    )
    return g_query, g_angles, g_table, g_bias, None, g_film, None, None, None, None, None


topn_create.register_autograd(_backward, setup_context=_setup_context)
