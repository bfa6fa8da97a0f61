"""Public ``set2graph_logits``: validation, then the reference or the native kernels
(docs/operators.md, set2graph_logits)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _checks, _dispatch
from .set2graph_op import set2graph_logits as set2graph_logits_op

__all__ = ["set2graph_logits"]


def _validate(x, weight1, bias1, weight2, bias2, lengths, backend):
    """Checks every argument; returns (lengths int64 (B,), the backend to run)."""
    x = _checks.float_tensor(x, "x", "(B, n, s)")
    weight1 = _checks.float_tensor(weight1, "weight1", "(h, 2s)")
    bias1 = _checks.float_tensor(bias1, "bias1", "(h)")
    weight2 = _checks.float_tensor(weight2, "weight2", "(k, h)")
    bias2 = _checks.float_tensor(bias2, "bias2", "(k)")
    floats = {"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}
    _checks.same_dtype(floats)
    _checks.same_device(floats)
    batch, n, s = x.shape
    h = weight1.shape[0]
    _checks.dim_equal("weight1", weight1.shape, 1, 2 * s, "twice the point dim s of x")
    _checks.dim_equal("bias1", bias1.shape, 0, h, "the hidden size h of weight1")
    _checks.dim_equal("weight2", weight2.shape, 1, h, "the hidden size h of weight1")
    _checks.dim_equal("bias2", bias2.shape, 0, weight2.shape[0], "the classes k of weight2")
    if lengths is None:
        sizes = torch.full((batch,), n, dtype=torch.int64, device=x.device)
    elif not isinstance(lengths, Tensor):
        raise TypeError(
            f"lengths must be an integer tensor ({batch},) or None, got {type(lengths).__name__}"
        )
    else:
        sizes = _checks.int_vector(lengths, "lengths", batch, x.device)
    chosen = _dispatch.resolve("set2graph_logits", backend, x.device)
    if lengths is not None and chosen != "native":  # the native kernel checks them itself
        _checks.values_in_range(sizes, "lengths", 0, n, "the padded set size")
    return sizes, chosen


def set2graph_logits(
    x: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lengths: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Set2Graph edge logits (docs/operators.md, set2graph_logits): the MLP ``Linear(2s, h), ReLU,
    Linear(h, k)`` on the concatenation of every ordered pair of real points of each set,

    ``out[b, i, j] = weight2 @ relu(weight1 @ cat(x[b, i], x[b, j]) + bias1) + bias2`` for
    ``i, j < lengths[b]`` (the diagonal included), and 0 elsewhere.

    Args:
        x: (B, n, s) padded sets; rows past a set's length are padding, never read.
        weight1: (h, 2s), bias1: (h,): the first layer (``nn.Linear(2s, h)``).
        weight2: (k, h), bias2: (k,): the second layer (``nn.Linear(h, k)``).
        lengths: integer tensor (B,) of set sizes, each in [0, n] (a set of 0 points gives an
            all-zero block); None: every set has n points.
        backend: "auto", "reference", "native" (CPU) or "triton" (CUDA; CPU tensors under
            TRITON_INTERPRET=1). "auto" runs "native" on CPU tensors and "triton" on CUDA
            tensors (the reference, with a one-time RuntimeWarning, when Triton cannot run).

    Returns:
        (B, n, n, k) in the input dtype. float16/bfloat16/float32/float64 inputs (one dtype
        for all); computed in float32 (float64 for float64). Gradients reach x (0 on padding
        rows), weight1, bias1, weight2 and bias2. The native and Triton kernels never store the
        (B, n, n, h) hidden activations (their memory grows as the output, B n^2 k); the
        reference does.
    """
    sizes, chosen = _validate(x, weight1, bias1, weight2, bias2, lengths, backend)
    if chosen == "reference":
        return reference.set2graph_logits(x, weight1, bias1, weight2, bias2, sizes)
    return set2graph_logits_op(x, weight1, bias1, weight2, bias2, sizes, chosen)
