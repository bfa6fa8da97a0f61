"""``topn_kernels::set2graph_logits``: the one ``torch.library`` op of the Set2Graph edge head,
for every backend (docs/operators.md, ``set2graph_logits``).

This module holds what the backends share: the forward and backward schemas, the fake kernels
that check shapes and dtypes (what ``torch.compile`` and ``opcheck`` trace), and the autograd
registration. A backend supplies only its two kernels (:class:`Kernels`): the native one in
:mod:`topn_kernels.native.set2graph` (C++, CPU) and the Triton one in
:mod:`topn_kernels.triton.set2graph_launch` (CUDA; CPU under ``TRITON_INTERPRET=1``). Both
backwards are deterministic (no atomics), so the op has no ``deterministic`` argument. The
``backend`` argument of the op names the kernels to run; it is a constant under
``torch.compile``, so the op stays one opaque node whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Kernels", "set2graph_logits", "set2graph_logits_backward"]

INPUTS = ("x", "weight1", "bias1", "weight2", "bias2")
OP = "topn_kernels::set2graph_logits"
BACKWARD_OP = "topn_kernels::set2graph_logits_backward"


class Kernels(NamedTuple):
    """A backend's kernels, called with validated, consistent inputs.

    ``forward(x, weight1, bias1, weight2, bias2, lengths)`` returns out (B, n, n, k);
    ``backward(grad_out, x, weight1, bias1, weight2, bias2, lengths, output_mask)`` returns the
    gradients of x, weight1, bias1, weight2 and bias2, None where ``output_mask`` is False.
    """

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor | None, ...]]


def _kernels(backend: str) -> Kernels:
    """The kernels of ``backend``, imported at the first call (Triton only when used)."""
    if backend == "native":
        from ..native import set2graph as module
    elif backend == "triton":
        from ..triton import set2graph_launch as module
    else:
        raise ValueError(f"{OP}: backend must be 'native' or 'triton', got {backend!r}")
    return Kernels(module.forward, module.backward)


@torch.library.custom_op(
    OP,
    mutates_args=(),
    schema="(Tensor x, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, "
    "Tensor lengths, str backend) -> Tensor",
)
def set2graph_logits(x, weight1, bias1, weight2, bias2, lengths, backend):
    """out (B, n, n, k) in the input dtype. lengths is int64 (B,); the public
    :func:`topn_kernels.set2graph_logits` validates the values first."""
    return _kernels(backend).forward(x, weight1, bias1, weight2, bias2, lengths)


@torch.library.custom_op(
    BACKWARD_OP,
    mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight1, Tensor bias1, Tensor weight2, "
    "Tensor bias2, Tensor lengths, bool[5] output_mask, str backend) -> (Tensor? grad_x, "
    "Tensor? grad_weight1, Tensor? grad_bias1, Tensor? grad_weight2, Tensor? grad_bias2)",
)
def set2graph_logits_backward(
    grad_out, x, weight1, bias1, weight2, bias2, lengths, output_mask, backend
):
    """Gradients of x, weight1, bias1, weight2 and bias2 (None where ``output_mask`` is False)
    from the gradient of out."""
    return _kernels(backend).backward(
        grad_out, x, weight1, bias1, weight2, bias2, lengths, output_mask
    )


def _check_inputs(x, weight1, bias1, weight2, bias2, lengths) -> tuple[int, int, int, int, int]:
    """Shapes and dtypes the kernels rely on; returns (B, n, s, h, k)."""
    torch._check(x.dim() == 3, lambda: f"x must be (B, n, s), got {tuple(x.shape)}")
    batch, n, s = x.shape
    torch._check(
        weight1.dim() == 2 and weight1.shape[1] == 2 * s,
        lambda: f"weight1 must be (h, {2 * s}), got {tuple(weight1.shape)}",
    )
    h = weight1.shape[0]
    torch._check(
        tuple(bias1.shape) == (h,), lambda: f"bias1 must be ({h},), got {tuple(bias1.shape)}"
    )
    torch._check(
        weight2.dim() == 2 and weight2.shape[1] == h,
        lambda: f"weight2 must be (k, {h}), got {tuple(weight2.shape)}",
    )
    k = weight2.shape[0]
    torch._check(
        tuple(bias2.shape) == (k,), lambda: f"bias2 must be ({k},), got {tuple(bias2.shape)}"
    )
    for name, t in zip(INPUTS, (x, weight1, bias1, weight2, bias2), strict=True):
        torch._check(
            t.dtype == x.dtype and t.dtype.is_floating_point,
            lambda name=name, t=t: (
                f"{name} must have the floating dtype of x, {x.dtype}, got {t.dtype}"
            ),
        )
    torch._check(
        lengths.dtype == torch.int64 and tuple(lengths.shape) == (batch,),
        lambda: f"lengths must be int64 ({batch},), got {lengths.dtype} {tuple(lengths.shape)}",
    )
    return batch, n, s, h, k


@set2graph_logits.register_fake
def _set2graph_logits_fake(x, weight1, bias1, weight2, bias2, lengths, backend):
    batch, n, _, _, k = _check_inputs(x, weight1, bias1, weight2, bias2, lengths)
    return x.new_empty((batch, n, n, k))


@set2graph_logits_backward.register_fake
def _set2graph_logits_backward_fake(
    grad_out, x, weight1, bias1, weight2, bias2, lengths, output_mask, backend
):
    batch, n, _, _, k = _check_inputs(x, weight1, bias1, weight2, bias2, lengths)
    torch._check(
        tuple(grad_out.shape) == (batch, n, n, k) and grad_out.dtype == x.dtype,
        lambda: (
            f"grad_out must be {x.dtype} ({batch}, {n}, {n}, {k}), "
            f"got {grad_out.dtype} {tuple(grad_out.shape)}"
        ),
    )
    inputs = (x, weight1, bias1, weight2, bias2)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else None
        for t, wanted in zip(inputs, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight1, bias1, weight2, bias2, lengths, backend = inputs
    ctx.save_for_backward(x, weight1, bias1, weight2, bias2, lengths)
    ctx.backend = backend


def _backward(ctx, grad_out):
    # inputs: x, weight1, bias1, weight2, bias2, lengths, backend
    wanted = list(ctx.needs_input_grad[:5])
    if not any(wanted):
        return (None,) * 7
    x, weight1, bias1, weight2, bias2, lengths = ctx.saved_tensors
    grads = set2graph_logits_backward(
        grad_out, x, weight1, bias1, weight2, bias2, lengths, wanted, ctx.backend
    )
    return (*grads, None, None)


set2graph_logits.register_autograd(_backward, setup_context=_setup_context)
