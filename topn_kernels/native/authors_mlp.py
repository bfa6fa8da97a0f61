"""Python side of the native MLP of the authors' set VAE (csrc/cpu/authors_mlp.cpp): fake kernels
and :func:`mlp`, which runs an :class:`~topn_kernels.models.authors.AuthorsMLP` of at most two
maps, optionally followed by a ReLU and a ``BatchNorm1d`` over the points (the model's stems), as
one op with one C++ autograd node (docs/set_vae.md, "The native transformer layer").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .set_transformer import _attr, norm_plan

__all__ = ["mlp", "mlp_plan", "run_mlp"]

_OPS = torch.ops.topn_kernels
_MODULATIONS = {None: 0, "+": 1, "film": 2}


@torch.library.register_fake("topn_kernels::authors_mlp")
def _mlp_fake(inputs, modulation, residual_start, residual_end, running, training, *_):
    x, w1, wf = inputs[0], inputs[2 if modulation else 1], inputs[-4 if running else -2]
    B, n, _ = x.shape
    rows, width, dout = B * n, w1.shape[0], wf.shape[0]
    ny = inputs[1].shape[1] if modulation else 0
    new, none = x.new_empty, x.new_empty((0,))  # (0,) where the op keeps nothing
    stats = dout if running and training else 0  # ATen's CPU batch norm saves none in eval
    return [
        new((B, n, dout)),
        new((rows, width)),
        new((rows, width)) if residual_start else none,
        new((rows, width)) if modulation == 2 else none,
        new((B * ny, width)) if modulation == 2 else none,
        new((rows, dout)) if running else none,
        new((stats,)),
        new((stats,)),
    ]


@torch.library.register_fake("topn_kernels::authors_mlp_backward")
def _mlp_backward_fake(grad_out, inputs, modulation, residual_start, residual_end, running, *rest):
    x_grad, y_grad = rest[-2:]
    grads = [t.new_empty(t.shape) for t in inputs]
    grads[0] = grads[0] if x_grad else inputs[0].new_empty((0,))
    if modulation:
        grads[1] = grads[1] if y_grad else inputs[1].new_empty((0,))
    return grads


@torch.library.register_fake("topn_kernels::authors_mlp_autograd")
def _mlp_autograd_fake(inputs, modulation, residual_start, residual_end, running, *_):
    x, wf = inputs[0], inputs[-4 if running else -2]
    return x.new_empty((*x.shape[:2], wf.shape[0]))


def mlp_plan(
    module: nn.Module, x: Tensor, y: Tensor | None = None, norm: nn.Module | None = None
) -> tuple[str | None, list[Tensor]]:
    """(why :func:`mlp` cannot compute the module's output, naming the argument at fault, or
    None; the op's tensors when it can): one pass of the checks, for callers that fall back to
    the modules.

    The op takes an ``AuthorsMLP`` without hidden maps, whose maps are ``nn.Linear`` with
    biases; x (B, n, Din) and y (B, n or 1, K), strided float32/float64 CPU tensors of the
    module's dtype, outside autocast; and, for ``norm``, a ``BatchNorm1d`` with affine weights,
    running statistics and a momentum (and, in training, at least 2 points).
    """
    if not isinstance(x, Tensor) or x.is_nested or x.layout != torch.strided or x.dim() != 3:
        return "x must be a strided tensor (B, n, Din)", []
    if not x.is_cpu or x.dtype not in (torch.float32, torch.float64):
        return f"x must be a float32 or float64 CPU tensor, got {x.dtype} on {x.device}", []
    if torch.is_autocast_enabled("cpu"):
        return "x: CPU autocast must be off", []
    modules = _attr(module, "_modules")
    if len(modules["hidden"]):
        return "module must have no hidden maps (layers <= 2)", []
    modulation = module.modulation
    names = ["lin1", *(["lin2"] if modulation else []), *(["lin3"] if modulation == "film" else [])]
    linears = [modules[name] for name in names] + [modules["lin_final"]]
    if any(type(m) is not nn.Linear or m.bias is None for m in linears):
        return "module's maps must be nn.Linear with biases", []
    if x.shape[2] != linears[0].in_features:
        return f"x must have the module's {linears[0].in_features} input channels", []
    inputs = [x]
    if modulation:
        if (
            not isinstance(y, Tensor)
            or y.is_nested
            or y.layout != torch.strided
            or y.dim() != 3
            or y.shape[0] != x.shape[0]
            or y.shape[1] not in (1, x.shape[1])
            or y.shape[2] != linears[1].in_features
        ):
            return "y must be a strided tensor (B, n or 1, K) of the module's K channels", []
        inputs.append(y)
    elif y is not None:
        return "y must be None for a module without a second input", []
    for m in linears:
        inputs += [_attr(m, "weight"), _attr(m, "bias")]
    running: list[Tensor] = []
    if norm is not None:
        out = linears[-1].out_features
        reason, tensors = norm_plan(norm, out, "the module's {} output channels", x)
        if reason is not None:
            return reason, []
        inputs += tensors[:2]
        running = tensors[2:]
    dtype = x.dtype
    if any(t.dtype is not dtype or not t.is_cpu for t in inputs[1:] + running):
        return f"the module's tensors and y must have x's dtype and device ({dtype}, CPU)", []
    return None, [inputs, running]


def run_mlp(module: nn.Module, norm: nn.Module | None, tensors: list) -> Tensor:
    """:func:`mlp` with the tensors :func:`mlp_plan` gave for these modules and inputs."""
    inputs, running = tensors
    training, momentum, eps = False, 0.0, 0.0
    if norm is not None:
        training, momentum, eps = norm.training, norm.momentum, norm.eps
        if training:
            _attr(norm, "num_batches_tracked").add_(1)
    return _OPS.authors_mlp_autograd(
        inputs,
        _MODULATIONS[module.modulation],
        module.residual_start,
        module.residual_end,
        running,
        training,
        momentum,
        eps,
    )


def mlp(
    module: nn.Module, x: Tensor, y: Tensor | None = None, norm: nn.BatchNorm1d | None = None
) -> Tensor:
    """``module(x, y)`` (x (B, n, Din), y (B, n or 1, K) or None) -> (B, n, Dout), and with
    ``norm``, ``norm(relu(module(x, y)).flatten(0, 1)).view(B, n, Dout)`` with ``norm``'s
    running statistics (and ``num_batches_tracked``) updated as the module updates them in
    training, in one native op. The modules must pass :func:`mlp_plan`; gradients reach x, y and
    the modules' parameters through one C++ autograd node (``topn_kernels::authors_mlp_autograd``),
    differentiable once. The modules are not called, so their hooks do not run.
    """
    reason, tensors = mlp_plan(module, x, y, norm)
    if reason is not None:
        raise ValueError(f"mlp: {reason}")
    return run_mlp(module, norm, tensors)
