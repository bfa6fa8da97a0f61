"""One custom-op boundary, ``topn_kernels::set_loss``, that lets ``torch.compile(fullgraph=True)``
trace the public losses whole when their backend cannot be traced (docs/operators.md,
"torch.compile").

The KeOps backends and the native Sinkhorn pack ragged batches (shapes that depend on the
lengths' values), build KeOps formulas and compute the eps schedule from tensor values; none
of that can enter a traced graph. Under ``torch.compiler.is_compiling()`` the public losses
therefore call this op instead: it runs the backend eagerly on padded tensors and returns the
per-set values (B,) and, when a gradient is wanted, the gradient of every set's value with
respect to x, y, a and b (each set's value depends on its own points only, so the gradient of
the sum holds them all). The registered backward scales those by the upstream gradient of each
set, as the native Sinkhorn's envelope gradient does. The fake kernel gives the traced graph
every output's shape from the inputs' shapes alone. Outside compilation the backends run as
they are (same values, same gradients: tests/test_compile.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _checks

__all__ = ["KINDS", "set_loss"]


def _sinkhorn(module: str) -> Callable:
    def run(x, y, x_lengths, y_lengths, a, b, params: Sequence[float]) -> Tensor:
        from .. import native
        from ..keops import sinkhorn as keops_sinkhorn

        p, blur, scaling, diameter, debias = params
        impl = (native.sinkhorn if module == "native" else keops_sinkhorn).sinkhorn_loss
        weights = {"a": a, "b": b} if module == "keops" else {}
        return impl(
            x,
            y,
            x_lengths,
            y_lengths,
            p=int(p),
            blur=blur,
            scaling=scaling,
            diameter=None if math.isnan(diameter) else diameter,
            debias=bool(debias),
            batch_reduction="none",
            **weights,
        )

    return run


def _repulsion(x, y, x_lengths, y_lengths, a, b, params: Sequence[float]) -> Tensor:
    from ..keops import penalties

    return penalties.repulsion_penalty(x, x_lengths, min_dist=params[0])


def _valency(x, y, x_lengths, y_lengths, a, b, params: Sequence[float]) -> Tensor:
    from ..keops import penalties

    neighbor_dist, max_valency = params
    return penalties.valency_penalty(
        x, x_lengths, neighbor_dist=neighbor_dist, max_valency=int(max_valency)
    )


# kind -> the eager backend, f(x, y, x_lengths, y_lengths, a, b, params) -> (B,) per set;
# params: Sinkhorn (p, blur, scaling, diameter or NaN for the batch's, debias), repulsion
# (min_dist,), valency (neighbor_dist, max_valency)
KINDS: dict[str, Callable] = {
    "sinkhorn_native": _sinkhorn("native"),
    "sinkhorn_keops": _sinkhorn("keops"),
    "repulsion_keops": _repulsion,
    "valency_keops": _valency,
}


def _whole(value: float, name: str, minimum: int) -> None:
    """A params entry that holds an integer >= minimum (params are floats in the schema)."""
    if not (math.isfinite(value) and float(value).is_integer() and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def _check_params(kind: str, params: Sequence[float]) -> None:
    """``kind`` and its ``params`` (see :data:`KINDS`), for a direct call of the op: the public
    losses pass checked values, and a bad one (a scaling >= 1, a blur <= 0) gave a value
    silently, or numpy's error from the eps schedule."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    names = {
        "sinkhorn": ("p", "blur", "scaling", "diameter", "debias"),
        "repulsion": ("min_dist",),
        "valency": ("neighbor_dist", "max_valency"),
    }[kind.split("_")[0]]
    if len(params) != len(names):
        raise ValueError(
            f"params of {kind} must be the {len(names)} values ({', '.join(names)}), "
            f"got {len(params)}: {list(params)}"
        )
    value = dict(zip(names, params, strict=True))
    label = {name: f"params[{i}] ({name})" for i, name in enumerate(names)}
    if kind.startswith("sinkhorn"):
        if value["p"] not in (1, 2):
            raise ValueError(f"{label['p']} must be 1 or 2, got {value['p']}")
        _checks.positive_number(value["blur"], label["blur"])
        if not _checks.positive_number(value["scaling"], label["scaling"]) < 1:
            raise ValueError(f"{label['scaling']} must be in (0, 1), got {value['scaling']}")
        if not math.isnan(value["diameter"]):  # NaN: the batch's diameter
            _checks.positive_number(value["diameter"], label["diameter"])
        if value["debias"] not in (0, 1):
            raise ValueError(f"{label['debias']} must be 0 or 1, got {value['debias']}")
    elif kind.startswith("repulsion"):
        _checks.positive_number(value["min_dist"], label["min_dist"])
    else:
        _checks.positive_number(value["neighbor_dist"], label["neighbor_dist"])
        _whole(value["max_valency"], label["max_valency"], 0)


def _autograd_enabled():
    """A context in which autograd records again inside the op's kernel, which the dispatcher
    runs with the autograd keys excluded (and grad mode off)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        keys.AutogradFunctionality,
        keys.AutogradOther,
        keys.AutogradNestedTensor,
        keys.ADInplaceOrView,
    ):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    return torch._C._ForceDispatchKeyGuard(include, exclude)


def _empty_like(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t.new_empty(t.shape)


@torch.library.custom_op("topn_kernels::set_loss", mutates_args=())
def _set_loss(
    x: Tensor,
    y: Tensor | None,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    kind: str,
    params: Sequence[float],
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_params(kind, params)
    fn = KINDS[kind]
    inputs = [x, y, a, b]
    if not with_grad:
        with torch.no_grad():
            value = fn(x, y, x_lengths, y_lengths, a, b, params)
        return value.clone(), *(x.new_empty((0,)) for _ in inputs)
    with torch.enable_grad(), _autograd_enabled():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        value = fn(leaves[0], leaves[1], x_lengths, y_lengths, leaves[2], leaves[3], params)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(value.sum(), wanted, allow_unused=True))
    out = []
    for t in leaves:  # grads holds one entry per given input, None where it is unused
        g = None if t is None else next(grads)
        out.append(x.new_empty((0,)) if t is None else t.new_zeros(t.shape) if g is None else g)
    return value.detach(), *out


@_set_loss.register_fake
def _set_loss_fake(x, y, x_lengths, y_lengths, a, b, kind, params, with_grad):
    _check_params(kind, params)  # at trace time already
    value = x.new_empty((x.shape[0],))
    if not with_grad:
        return value, *(x.new_empty((0,)) for _ in range(4))
    return value, *(_empty_like(t, x) for t in (x, y, a, b))


def _setup_context(ctx, inputs, output) -> None:
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)


def _backward(ctx, grad_value, *_):
    grads = ctx.saved_tensors
    out = []
    for g, needed in zip(grads, (ctx.needs_input_grad[i] for i in (0, 1, 4, 5)), strict=True):
        if not needed:
            out.append(None)
        elif g.dim() == 1 and g.shape[0] == 0:
            raise RuntimeError("topn_kernels::set_loss was called with with_grad=False")
        else:
            out.append(g * grad_value.view(-1, *([1] * (g.dim() - 1))))
    gx, gy, ga, gb = out
    return gx, gy, None, None, ga, gb, None, None, None


_set_loss.register_autograd(_backward, setup_context=_setup_context)


def set_loss(
    kind: str,
    x: Tensor,
    y: Tensor | None,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    params: Sequence[float],
    a: Tensor | None = None,
    b: Tensor | None = None,
) -> Tensor:
    """Per-set values (B,) of the backend ``kind`` (a key of :data:`KINDS`) through the
    op; inputs already validated by the public function."""
    differentiable = [t for t in (x, y, a, b) if t is not None]
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    value, *_ = _set_loss(x, y, x_lengths, y_lengths, a, b, kind, list(params), with_grad)
    return value
