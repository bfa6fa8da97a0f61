"""Set layers of the reference set VAE; every one takes a padded batch and its mask.

x is (B, N, C) float, mask (B, N) bool with True on real points. Outputs are zero on padding,
and padding never changes a real point's output (nor a statistic: batch norm and pooling see
real points only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskedBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` over the real points of a batch only (padding gets 0).

    In training the statistics are those of the batch's real points; in eval the running ones.
    Under DDP on CPU every process keeps its own statistics (``SyncBatchNorm`` needs CUDA);
    DDP broadcasts rank 0's running statistics at each forward.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = x.new_zeros(x.shape)
        out[mask] = self.bn(x[mask])
        return out


class SetBlock(nn.Module):
    """A transformer layer with a key padding mask, then ReLU, masked batch norm, residual:
    ``x + BN(relu(Transformer(x)))`` (the released code's block; dropout 0)."""

    def __init__(self, channels: int, heads: int, feedforward: int) -> None:
        super().__init__()
        self.attn = nn.TransformerEncoderLayer(
            channels, heads, feedforward, dropout=0.0, batch_first=True
        )
        self.norm = MaskedBatchNorm(channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = torch.relu(self.attn(x, src_key_padding_mask=~mask))
        out = self.norm(out.masked_fill(~mask[..., None], 0.0), mask)
        return x + out


class PNAPooling(nn.Module):
    """Sum, mean, max and standard deviation of each channel over the real points:
    (B, N, C) -> (B, 4 C). Every set needs at least one real point; the std has a 1e-5
    floor under the root so its gradient stays finite on constant channels."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].to(x.dtype)
        count = m.sum(1)
        total = (x * m).sum(1)
        mean = total / count
        peak = x.masked_fill(~mask[..., None], -torch.inf).amax(1)
        var = (((x - mean[:, None, :]) * m) ** 2).sum(1) / count
        return torch.cat([total, mean, peak, (var + 1e-5).sqrt()], dim=-1)
