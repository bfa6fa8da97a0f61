"""Python side of the native transformer layer (csrc/cpu/set_transformer.cpp): fake kernels,
autograd, and :func:`transformer_layer`, which runs a ``torch.nn.TransformerEncoderLayer`` on
equal-size sets in one op (docs/set_vae.md, "The native transformer layer").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["supports", "transformer_layer", "unsupported"]

_OPS = torch.ops.topn_kernels


@torch.library.register_fake("topn_kernels::set_transformer_layer")
def _layer_fake(x, weights, heads, eps):
    B, n, C = x.shape
    F = weights[6].shape[0]
    rows = B * n
    new = x.new_empty
    return [
        new((B, n, C)),
        new((rows, 3 * C)),
        new((B, heads, n, n)),
        *(new((rows, C)) for _ in range(2)),
        *(new((rows, 1)) for _ in range(2)),
        new((rows, C)),
        new((rows, F)),
        new((rows, C)),
        *(new((rows, 1)) for _ in range(2)),
    ]


@torch.library.register_fake("topn_kernels::set_transformer_layer_backward")
def _layer_backward_fake(grad_out, x, weights, heads, saved):
    return [x.new_empty(x.shape), *(w.new_empty(w.shape) for w in weights)]


class _Layer(torch.autograd.Function):
    """One autograd node per layer. A plain Function, not torch.library.register_autograd:
    that wrapper costs about half a millisecond a call, as much as the layer's attention."""

    @staticmethod
    def forward(ctx, x: Tensor, heads: int, eps: float, *weights: Tensor) -> Tensor:
        out, *saved = _OPS.set_transformer_layer(x, weights, heads, eps)
        ctx.heads = heads
        ctx.save_for_backward(x, *weights, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, *rest = ctx.saved_tensors
        weights, saved = rest[:12], rest[12:]
        grads = _OPS.set_transformer_layer_backward(grad_out, x, weights, ctx.heads, saved)
        return grads[0], None, None, *grads[1:]


def _weights(layer: nn.TransformerEncoderLayer) -> list[Tensor | None]:
    """The op's 12 weights, in its order (None where the layer has no such bias or affine)."""
    attn = layer.self_attn
    return [
        attn.in_proj_weight,
        attn.in_proj_bias,
        attn.out_proj.weight,
        attn.out_proj.bias,
        layer.norm1.weight,
        layer.norm1.bias,
        layer.linear1.weight,
        layer.linear1.bias,
        layer.linear2.weight,
        layer.linear2.bias,
        layer.norm2.weight,
        layer.norm2.bias,
    ]


def supports(layer: nn.TransformerEncoderLayer, x: Tensor) -> bool:
    """Whether :func:`transformer_layer` computes ``layer(x)``: a batch-first, post-norm ReLU
    layer whose dropouts are off (p = 0, or their modules in eval mode), with every bias and
    affine norm and the default attention (one in-projection, no bias_k/bias_v or zero
    attention), on a strided float32 or float64 CPU tensor x (B, n, C) with n >= 1, the
    layer's C channels and dtype, outside autocast (:func:`unsupported` says why not)."""
    return unsupported(layer, x) is None


def unsupported(layer: nn.TransformerEncoderLayer, x: Tensor) -> str | None:
    """Why :func:`transformer_layer` cannot compute ``layer(x)``, naming the argument at fault,
    or None when it can (:func:`supports`)."""
    if (
        not isinstance(x, Tensor)
        or x.is_nested
        or x.layout != torch.strided
        or x.dim() != 3
        or x.shape[1] < 1
    ):
        got = tuple(x.shape) if isinstance(x, Tensor) and not x.is_nested else type(x).__name__
        return f"x must be a strided tensor (B, n, C) with n >= 1, got {got}"
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return f"x must be a float32 or float64 CPU tensor, got {x.dtype} on {x.device}"
    if torch.is_autocast_enabled("cpu"):
        return "x: CPU autocast must be off"
    attn = layer.self_attn
    if x.shape[2] != attn.embed_dim:
        return f"x must have the layer's {attn.embed_dim} channels, got {x.shape[2]}"
    if attn.embed_dim % attn.num_heads:
        return f"layer: num_heads={attn.num_heads} must divide its {attn.embed_dim} channels"
    if not attn.batch_first or layer.norm_first:
        return "layer must be batch-first and post-norm (batch_first=True, norm_first=False)"
    if not (layer.activation is F.relu or isinstance(layer.activation, nn.ReLU)):
        return "layer's activation must be ReLU"
    dropouts = ((layer.dropout, layer.dropout.p), (layer.dropout1, layer.dropout1.p))
    dropouts += ((layer.dropout2, layer.dropout2.p), (attn, attn.dropout))
    if any(p > 0 and module.training for module, p in dropouts):
        return "layer's dropouts must be off (p = 0, or the modules in eval mode)"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "layer must use the default attention (one in-projection, no bias_k/v, no zero attn)"
    if layer.norm1.eps != layer.norm2.eps:
        return "layer's two layer norms must have the same eps"
    weights = _weights(layer)
    if any(w is None for w in weights):
        return "layer must have every bias and affine layer-norm weights"
    if any(w.dtype != x.dtype or w.device != x.device for w in weights):
        return f"layer's parameters must have x's dtype and device ({x.dtype}, {x.device})"
    return None


def transformer_layer(layer: nn.TransformerEncoderLayer, x: Tensor) -> Tensor:
    """``layer(x)`` (no mask) in one native op: x (B, n, C) -> (B, n, C), same dtype.

    The layer must pass :func:`supports`; gradients reach x and the layer's parameters.
    """
    if (reason := unsupported(layer, x)) is not None:
        raise ValueError(f"transformer_layer: {reason}")
    return _Layer.apply(x, layer.self_attn.num_heads, layer.norm1.eps, *_weights(layer))
