"""Seeded test inputs and comparison helpers shared by the test modules."""

from __future__ import annotations

import torch
from torch import Tensor

POISON = (float("nan"), float("inf"), -1e30)


def topn_inputs(
    batch: int,
    n0: int,
    a: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ties: bool = False,
    requires_grad: bool = False,
) -> list[Tensor]:
    """[query (B, a), angles (n0, a), table (n0, d), bias (B, d), film (4, d)].

    ``ties``: every third angle row repeats the row before it, so some scores are exactly
    equal and only the index order decides between them.
    """
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, a, generator=g)
    angles = torch.randn(n0, a, generator=g)
    if ties and n0 > 1:
        angles[1::3] = angles[0::3][: angles[1::3].shape[0]]
    table = torch.randn(n0, d, generator=g)
    bias = torch.randn(batch, d, generator=g)
    film = torch.randn(4, d, generator=g)
    tensors = [t.to(dtype) for t in (query, angles, table, bias, film)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def random_sizes(batch: int, low: int, high: int, seed: int = 0) -> Tensor:
    """int64 (B,) uniform in [low, high], with low and high both present when B >= 2."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (batch,), generator=g)
    if batch >= 2:
        sizes[0], sizes[-1] = low, high
    return sizes


def padded_sets(
    batch: int, size: int, dim: int, lengths: Tensor | None, *, seed: int = 0, poison: bool = True
) -> Tensor:
    """(B, size, D) normal points; rows past each length hold NaN, inf and -1e30 when poisoned."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, dim, generator=g, dtype=torch.float64)
    if lengths is not None and poison:
        for b in range(batch):
            for j in range(int(lengths[b]), size):
                x[b, j] = POISON[j % len(POISON)]
    return x


def assert_close_scaled(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """|actual - expected| <= rtol * (|expected| + max|expected|) elementwise, NaN == NaN.

    The absolute part is relative to the tensor's largest entry, so entries that cancel to
    near zero are judged at the scale of the computation rather than their own.
    """
    scale = expected.detach().abs().nan_to_num(posinf=0.0).max().item() if expected.numel() else 0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True
    )
