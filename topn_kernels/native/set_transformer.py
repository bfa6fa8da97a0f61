"""Python side of the native transformer layer (csrc/cpu/set_transformer.cpp): fake kernels,
autograd, :func:`transformer_layer`, which runs a ``torch.nn.TransformerEncoderLayer`` on
equal-size sets in one op, and :func:`set_block`, which runs a block of the authors' set VAE,
``x + BatchNorm(relu(layer(x)))``, in one op (docs/set_vae.md, "The native transformer layer").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "block_plan",
    "block_unsupported",
    "norm_plan",
    "run_block",
    "set_block",
    "supports",
    "transformer_layer",
    "unsupported",
]

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


@torch.library.register_fake("topn_kernels::set_block")
def _block_fake(
    x, weights, heads, eps, norm_weight, norm_bias, running_mean, running_var, training, *_
):
    out, *saved = _layer_fake(x, weights, heads, eps)
    C = x.shape[2]
    stats = C if training else 0  # ATen's CPU batch norm saves no statistics in eval
    return [
        out,
        x.new_empty((out.shape[0] * out.shape[1], C)),
        *(x.new_empty((stats,)) for _ in range(2)),
        *saved,
    ]


@torch.library.register_fake("topn_kernels::set_block_backward")
def _block_backward_fake(grad_out, x, weights, heads, norm_weight, *_):
    return [
        x.new_empty(x.shape),
        *(w.new_empty(w.shape) for w in weights),
        *(norm_weight.new_empty(norm_weight.shape) for _ in range(2)),
    ]


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


def _attr(module: nn.Module, name: str):
    """``getattr(module, name)``, faster for parameters, buffers and submodules: those live in
    dicts that ``nn.Module.__getattr__`` searches only after a failed lookup (about 0.8 us a
    read, and the checks of a block read about 40 a call)."""
    d = module.__dict__
    for store in (d["_parameters"], d["_modules"], d["_buffers"]):
        if name in store:
            return store[name]
    return getattr(module, name)


def _weights(layer: nn.TransformerEncoderLayer) -> list[Tensor | None]:
    """The op's 12 weights, in its order (None where the layer has no such bias or affine)."""
    attn, out_proj = _attr(layer, "self_attn"), _attr(_attr(layer, "self_attn"), "out_proj")
    norm1, linear1 = _attr(layer, "norm1"), _attr(layer, "linear1")
    linear2, norm2 = _attr(layer, "linear2"), _attr(layer, "norm2")
    return [
        _attr(attn, "in_proj_weight"),
        _attr(attn, "in_proj_bias"),
        *(
            _attr(m, name)
            for m in (out_proj, norm1, linear1, linear2, norm2)
            for name in ("weight", "bias")
        ),
    ]


def supports(layer: nn.TransformerEncoderLayer, x: Tensor) -> bool:
    """Whether :func:`transformer_layer` computes ``layer(x)``: a batch-first, post-norm ReLU
    layer whose dropouts are off (p = 0, or their modules in eval mode), with every bias and
    affine norm and the default attention (one in-projection, no bias_k/bias_v or zero
    attention), on a strided float32 or float64 CPU tensor x (B, n, C) with n >= 1, the
    layer's C channels and dtype, outside autocast (:func:`unsupported` says why not)."""
    return _layer_plan(layer, x)[0] is None


def unsupported(layer: nn.TransformerEncoderLayer, x: Tensor) -> str | None:
    """Why :func:`transformer_layer` cannot compute ``layer(x)``, naming the argument at fault,
    or None when it can (:func:`supports`)."""
    return _layer_plan(layer, x)[0]


def _layer_plan(layer: nn.TransformerEncoderLayer, x: Tensor) -> tuple[str | None, list]:
    """(why the op cannot compute ``layer(x)`` or None, the op's 12 weights when it can)."""
    if (
        not isinstance(x, Tensor)
        or x.is_nested
        or x.layout != torch.strided
        or x.dim() != 3
        or x.shape[1] < 1
    ):
        got = tuple(x.shape) if isinstance(x, Tensor) and not x.is_nested else type(x).__name__
        return f"x must be a strided tensor (B, n, C) with n >= 1, got {got}", []
    if not x.is_cpu or x.dtype not in (torch.float32, torch.float64):
        return f"x must be a float32 or float64 CPU tensor, got {x.dtype} on {x.device}", []
    if torch.is_autocast_enabled("cpu"):
        return "x: CPU autocast must be off", []
    attn = _attr(layer, "self_attn")
    if x.shape[2] != attn.embed_dim:
        return f"x must have the layer's {attn.embed_dim} channels, got {x.shape[2]}", []
    if attn.embed_dim % attn.num_heads:
        return f"layer: num_heads={attn.num_heads} must divide its {attn.embed_dim} channels", []
    if not attn.batch_first or layer.norm_first:
        return "layer must be batch-first and post-norm (batch_first=True, norm_first=False)", []
    activation = _attr(layer, "activation")
    if not (activation is F.relu or isinstance(activation, nn.ReLU)):
        return "layer's activation must be ReLU", []
    dropouts = [_attr(layer, name) for name in ("dropout", "dropout1", "dropout2")]
    if any(m.p > 0 and m.training for m in dropouts) or (attn.dropout > 0 and attn.training):
        return "layer's dropouts must be off (p = 0, or the modules in eval mode)", []
    if not attn._qkv_same_embed_dim or _attr(attn, "bias_k") is not None or attn.add_zero_attn:
        return (
            "layer must use the default attention (one in-projection, no bias_k/v, no zero attn)",
            [],
        )
    if _attr(layer, "norm1").eps != _attr(layer, "norm2").eps:
        return "layer's two layer norms must have the same eps", []
    weights = _weights(layer)
    if any(w is None for w in weights):
        return "layer must have every bias and affine layer-norm weights", []
    dtype = x.dtype
    if any(w.dtype is not dtype or not w.is_cpu for w in weights):
        return f"layer's parameters must have x's dtype and device ({x.dtype}, {x.device})", []
    return None, weights


def transformer_layer(layer: nn.TransformerEncoderLayer, x: Tensor) -> Tensor:
    """``layer(x)`` (no mask) in one native op: x (B, n, C) -> (B, n, C), same dtype.

    The layer must pass :func:`supports`; gradients reach x and the layer's parameters.
    """
    reason, weights = _layer_plan(layer, x)
    if reason is not None:
        raise ValueError(f"transformer_layer: {reason}")
    return _Layer.apply(x, _attr(layer, "self_attn").num_heads, _attr(layer, "norm1").eps, *weights)


@torch.library.register_fake("topn_kernels::set_block_autograd")
def _block_autograd_fake(x, weights, heads, eps, running_mean, running_var, *_):
    return x.new_empty(x.shape)


def norm_plan(
    norm: nn.Module, channels: int, what: str, x: Tensor
) -> tuple[str | None, list[Tensor]]:
    """(why a native op cannot run ``norm`` over the points of x (B, n, ...), or None; its
    weight, bias, running mean and running variance when it can): ``norm`` must be a
    ``BatchNorm1d`` of ``channels`` channels (``what.format(channels)`` names them in the
    reason, formatted only then) with affine weights, running statistics and a momentum, and
    x must hold points, at least 2 in training (otherwise the module answers: an empty output,
    or its error for the batch statistics of one point). The dtypes and devices are the
    caller's to check."""
    if type(norm) is not nn.BatchNorm1d:
        return f"norm must be a BatchNorm1d, got {type(norm).__name__}", []
    tensors = [_attr(norm, name) for name in ("weight", "bias", "running_mean", "running_var")]
    if any(t is None for t in tensors) or norm.momentum is None:
        return "norm must have affine weights, running statistics and a momentum", []
    if norm.num_features != channels:
        return f"norm must have {what.format(channels)}, got {norm.num_features}", []
    if x.shape[0] == 0 or (norm.training and x.shape[0] * x.shape[1] < 2):
        return "x must hold points (at least 2 in training, for the batch statistics)", []
    return None, tensors


def block_unsupported(layer: nn.TransformerEncoderLayer, norm: nn.Module, x: Tensor) -> str | None:
    """Why :func:`set_block` cannot compute ``x + norm(relu(layer(x)))`` (``norm`` over the
    points), naming the argument at fault, or None when it can: the layer passes
    :func:`supports`, and ``norm`` is a ``BatchNorm1d`` of x's channels, dtype and device with
    affine weights, running statistics and a momentum (not a cumulative average)."""
    return block_plan(layer, norm, x)[0]


def block_plan(
    layer: nn.TransformerEncoderLayer, norm: nn.Module, x: Tensor
) -> tuple[str | None, list[Tensor]]:
    """(why :func:`set_block` cannot run, or None; the weights :func:`run_block` takes when
    it can): one pass of the checks, for callers that fall back to the modules."""
    reason, weights = _layer_plan(layer, x)
    if reason is not None:
        return reason, []
    reason, tensors = norm_plan(norm, x.shape[2], "x's {} channels", x)
    if reason is not None:
        return reason, []
    dtype = x.dtype
    if any(t.dtype is not dtype or not t.is_cpu for t in tensors):
        return (
            f"norm's parameters and buffers must have x's dtype and device ({x.dtype}, {x.device})",
            [],
        )
    return None, [*weights, *tensors]


def set_block(layer: nn.TransformerEncoderLayer, norm: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """``x + norm(relu(layer(x)).flatten(0, 1)).view(x.shape)`` (no mask) in one native op:
    x (B, n, C) -> (B, n, C), same dtype, with ``norm``'s running statistics (and
    ``num_batches_tracked``) updated as the module updates them in training mode.

    The modules must pass :func:`block_unsupported`; gradients reach x and both modules'
    parameters, through one C++ autograd node (``topn_kernels::set_block_autograd``),
    differentiable once. The modules themselves are not called, so their hooks do not run.
    """
    reason, weights = block_plan(layer, norm, x)
    if reason is not None:
        raise ValueError(f"set_block: {reason}")
    return run_block(layer, norm, x, weights)


def run_block(
    layer: nn.TransformerEncoderLayer, norm: nn.BatchNorm1d, x: Tensor, weights: list[Tensor]
) -> Tensor:
    """:func:`set_block` with the weights :func:`block_plan` gave for these modules and x."""
    *layer_weights, norm_weight, norm_bias, running_mean, running_var = weights
    if norm.training:
        _attr(norm, "num_batches_tracked").add_(1)
    return _OPS.set_block_autograd(
        x,
        [*layer_weights, norm_weight, norm_bias],
        _attr(layer, "self_attn").num_heads,
        _attr(layer, "norm1").eps,
        running_mean,
        running_var,
        norm.training,
        norm.momentum,
        norm.eps,
    )
