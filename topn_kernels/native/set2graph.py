"""The native (C++, CPU) kernels of ``topn_kernels::set2graph_logits``
(``csrc/cpu/set2graph.cpp``).

The op itself, its fake kernels and its autograd are in :mod:`topn_kernels.ops.set2graph_op`;
these are the two kernels it calls for ``backend="native"``. The forward checks the lengths
itself (no extra pass, no sync): a length outside [0, n] raises ``ValueError`` with the public
function's message. Both kernels are deterministic, whatever the number of threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_OPS = torch.ops.topn_kernels


def forward(
    x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, lengths: Tensor
) -> Tensor:
    """out (B, n, n, k) in x's dtype; CPU tensors, lengths int64 (B,)."""
    return _OPS._set2graph_logits_cpu.default(x, weight1, bias1, weight2, bias2, lengths)


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lengths: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of x, weight1, bias1, weight2, bias2; None where ``output_mask`` is False."""
    return _OPS._set2graph_logits_backward_cpu.default(
        grad_out, x, weight1, bias1, weight2, bias2, lengths, list(output_mask)
    )
