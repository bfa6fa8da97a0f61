"""Packed ragged batches: the real points of every set, one after the other.

A batch of padded sets (B, N, D) with lengths (B,) becomes points (P, D), P = sum of the
lengths, with ``offsets`` (B + 1,) and the set of each point. KeOps reduces over
block-diagonal ``ranges`` built from two such packings, so that a point only meets the points
of its own set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    points: Tensor  # (P, D), compute dtype; differentiable w.r.t. the padded input
    offsets: Tensor  # (B + 1,) int64: set b holds points[offsets[b]:offsets[b + 1]]
    set_of: Tensor  # (P,) int64: the set of each point
    lengths: Tensor  # (B,) int64
    size: int  # N, the padded set size
    mask: Tensor | None  # (B, N) bool, True on real points; None when there is no padding

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def segment_sum(self, values: Tensor) -> Tensor:
        """(P, ...) per-point values -> (B, ...) per-set sums (differentiable)."""
        out = values.new_zeros((self.batch, *values.shape[1:]))
        return out.index_add(0, self.set_of, values)

    def unpack(self, values: Tensor, fill: float | int) -> Tensor:
        """(P,) per-point values -> (B, N) padded with ``fill``."""
        if self.mask is None:
            return values.view(self.batch, self.size)
        out = values.new_full((self.batch, self.size), fill)
        out[self.mask] = values
        return out

    def local(self, global_index: Tensor, other: Packed) -> Tensor:
        """Indices into other.points -> indices within each point's set of ``other``."""
        return global_index - other.offsets[self.set_of]


def lengths_mask(lengths: Tensor, width: int) -> Tensor:
    """(B, width) bool, True on the first lengths[b] entries of row b."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, else float32 (docs/operators.md, Dtypes and precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack(x: Tensor, lengths: Tensor | None) -> Packed:
    """Packs x (B, N, D) with lengths (B,) int64 (None: every set has N points); the points
    in the compute dtype."""
    batch, n, dim = x.shape
    dtype = compute_dtype(x.dtype)
    device = x.device
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=device)
        points, mask = x.reshape(batch * n, dim).to(dtype), None
    else:
        mask = lengths_mask(lengths, n)
        points = x[mask].to(dtype)
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    offsets[1:] = lengths.cumsum(0)
    set_of = torch.repeat_interleave(
        torch.arange(batch, device=device), lengths, output_size=points.shape[0]
    )
    return Packed(points, offsets, set_of, lengths, n, mask)


def block_ranges(rows: Packed, cols: Packed) -> tuple[Tensor, ...]:
    """KeOps ranges of the block-diagonal (rows x cols) pattern: set b's rows meet set b's
    columns only. The 6-tuple (ranges_i, slices_i, redranges_j, ranges_j, slices_j,
    redranges_i) serves reductions over either axis."""
    ri = torch.stack([rows.offsets[:-1], rows.offsets[1:]], 1).int().contiguous()
    rj = torch.stack([cols.offsets[:-1], cols.offsets[1:]], 1).int().contiguous()
    slices = torch.arange(1, rows.batch + 1, dtype=torch.int32, device=ri.device)
    return (ri, slices, rj, rj, slices, ri)


def reduce_batch(values: Tensor, batch_reduction: str) -> Tensor:
    """(B,) per-set values -> their mean (0 for B = 0), their sum, or themselves ("none")."""
    if batch_reduction == "mean":
        return values.mean() if values.numel() else values.sum()
    if batch_reduction == "sum":
        return values.sum()
    return values


def reduce_weighted_batch(values: Tensor, weights: Tensor | None, batch_reduction: str) -> Tensor:
    """PyTorch3D's batch reduction of per-set (or per-point) values already multiplied by
    their set's weight: "none" keeps them, "sum" adds them, "mean" divides their sum by B
    (at least 1) or, with weights (B,), by the sum of the weights (by 1 if that is 0)."""
    if batch_reduction == "none":
        return values
    total = values.sum()
    if batch_reduction == "sum":
        return total
    if weights is None:
        return total / max(values.shape[0], 1)
    weight_sum = weights.sum()
    return total / torch.where(weight_sum > 0, weight_sum, 1.0)
