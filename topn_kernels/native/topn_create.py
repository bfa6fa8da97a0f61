"""The native (C++, CPU) kernels of ``topn_kernels::topn_create``
(``csrc/cpu/topn_create.cpp``).

The op itself, its fake kernels and its autograd are in :mod:`topn_kernels.ops.topn_create_op`,
shared with the Triton backend; these are the two kernels it calls for ``backend="native"``.
The forward checks the set sizes itself (no extra pass, no sync): a bad ``n`` raises
``ValueError`` with the public function's message. The backward is deterministic, whatever
the number of threads, so ``deterministic`` changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_OPS = torch.ops.topn_kernels


def forward(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: Tensor,
    film: Tensor,
    n_max: int,
    score_norm: str,
    sorted: bool,
    *,
    n_fixed: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, mask, index, weight)``; CPU tensors, n int64 (B,), or ``n_fixed`` the size of
    every set (n is then not read)."""
    return _OPS._topn_create_cpu.default(
        query,
        angles,
        table,
        bias,
        n,
        film,
        n_max,
        score_norm,
        sorted,
        -1 if n_fixed is None else n_fixed,
    )


def backward(
    grad_x: Tensor,
    grad_weight: Tensor,
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: Tensor,
    film: Tensor,
    index: Tensor,
    score_norm: str,
    output_mask: Sequence[bool],
    deterministic: bool,
    *,
    n_fixed: int | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients of query, angles, table, bias, film; None where ``output_mask`` is False."""
    return _OPS._topn_create_backward_cpu.default(
        grad_x, grad_weight, query, angles, table, bias, film, index, score_norm, list(output_mask)
    )
