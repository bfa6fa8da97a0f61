"""Softmax, log-softmax, dropout and a transformer layer for the graph model's shapes on CPU.

The graph VAE (docs/graph_vae.md) takes softmaxes over rows of 4 to 9 entries: attention over
the atoms of 9-atom molecules, and the four classes of each atom pair. PyTorch's CPU softmax
kernels are slow on such short rows (``torch.softmax`` over a last dimension of 9 takes about
six times as long as ``exp`` of the same tensor); the same formula written as ``exp(x - max)``
divided by its sum runs at the speed of the elementwise ops. Dropout on CPU draws one random
number per element with ``bernoulli_``; :func:`dropout` draws one 64-bit number per two
elements. With PyTorch's kernels, dropout and the softmaxes took about a fifth of a training
step of the graph VAE; ``python -m bench --op graphvae_step`` times the step.

Each function computes what its PyTorch counterpart computes (the same values up to float
rounding; :func:`dropout` with the same distribution, from other random numbers), with the
same gradients. Shapes are those of the counterparts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dropout", "log_softmax", "logsumexp", "softmax", "transformer_layer"]


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.softmax(x, dim)`` as ``exp(x - max) / sum``. A row of -inf only gives NaN, as
    ``torch.softmax`` does."""
    # the max only shifts the row, which softmax ignores: no gradient flows through it
    y = (x - x.amax(dim, keepdim=True).detach()).exp()
    return y / y.sum(dim, keepdim=True)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``F.log_softmax(x, dim)`` as ``(x - max) - log(sum(exp(x - max)))``."""
    y = x - x.amax(dim, keepdim=True).detach()
    return y - y.exp().sum(dim, keepdim=True).log()


def logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.logsumexp(x, dim)`` (the dimension removed) as ``max + log(sum(exp(x - max)))``;
    a row of -inf gives -inf, as ``torch.logsumexp`` does."""
    peak = x.amax(dim, keepdim=True).detach()
    peak = peak.masked_fill(peak == -torch.inf, 0.0)
    return (peak + (x - peak).exp().sum(dim, keepdim=True).log()).squeeze(dim)


_INT64 = (-(2**63), 2**63 - 1)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``: each element zeroed with probability ``p`` (to 2^-32;
    at most 1 - 2^-32), the others scaled by ``1 / (1 - p)``.

    The mask comes from ``torch.randint`` over the full int64 range (the global generator, so
    ``torch.manual_seed`` and a saved RNG state reproduce it), each 64-bit draw read as two
    32-bit uniform integers: half the draws of ``bernoulli_``. Not bit-identical to
    ``F.dropout``, which draws other numbers.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    count = x.numel()
    draws = torch.randint(*_INT64, ((count + 1) // 2,), dtype=torch.int64, device=x.device)
    uniform = draws.view(torch.int32)[:count].view(x.shape)  # uniform over [-2^31, 2^31)
    # keep when uniform >= threshold: P(drop) = round(p * 2^32) / 2^32
    threshold = min(round(p * 2.0**32), 2**32 - 1) - 2**31  # an int32 for p close to 1
    keep = (uniform >= threshold).to(x.dtype)
    return x * (keep * (1.0 / (1.0 - p)))


def transformer_layer(layer: nn.TransformerEncoderLayer, x: Tensor, mask: Tensor) -> Tensor:
    """``layer(x, src_key_padding_mask=~mask)`` for a post-norm ReLU layer with
    ``batch_first=True``, with :func:`softmax` for the attention and :func:`dropout` for
    its four dropouts (the attention weights, after the attention, inside and after the
    feed-forward block; each with the layer's own probability, in training mode only).

    x (B, n, C) float, mask (B, n) bool with True on real atoms; every row needs a real atom
    (a row without one gives NaN). Returns (B, n, C). Hooks on the layer itself and on its
    self-attention do not run (the graph decoder runs a layer with hooks as the module). Raises
    ``ValueError`` for a layer of another kind (pre-norm, another
    activation, separate key/value widths, ``bias_k``/``bias_v`` or ``add_zero_attn``).
    """
    attn = layer.self_attn
    if (
        layer.norm_first
        or not attn.batch_first
        or attn.in_proj_weight is None
        or attn.bias_k is not None
        or attn.add_zero_attn
        or layer.activation_relu_or_gelu != 1
    ):
        raise ValueError(
            "transformer_layer takes a post-norm ReLU layer with batch_first=True and plain "
            "self-attention (no bias_k/bias_v, no add_zero_attn, no kdim/vdim)"
        )
    b, n, c = x.shape
    heads, d = attn.num_heads, attn.head_dim
    train = layer.training
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B, h, n, d)
    scores = (q * d**-0.5) @ k.transpose(-1, -2)  # (B, h, n, n)
    scores = scores.masked_fill(~mask[:, None, None, :], -torch.inf)
    weights = dropout(softmax(scores), attn.dropout, train)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    h = layer.norm1(x + dropout(out, layer.dropout1.p, train))
    ff = layer.linear2(dropout(F.relu(layer.linear1(h)), layer.dropout.p, train))
    return layer.norm2(h + dropout(ff, layer.dropout2.p, train))
