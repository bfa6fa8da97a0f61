"""Every loss under ``torch.compile(fullgraph=True)`` with tensor lengths (docs/operators.md,
"torch.compile"): one graph, no break, and the same values and gradients as the eager call.

``fullgraph=True`` turns any graph break into an error. The ``aot_eager`` backend traces the
forward and the backward through the fake kernels and the registered autograd of the custom ops
without generating code; one test also runs inductor, the default backend, on the paper's
batch.
"""

from __future__ import annotations

import functools

import pytest
import torch

import topn_kernels as tk

from .helpers import needs_native

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOSSES = {
    "chamfer_loss": lambda x, y, xl, yl, **kw: tk.chamfer_loss(x, y, xl, yl, **kw),
    "sinkhorn_loss": lambda x, y, xl, yl, **kw: tk.sinkhorn_loss(x, y, xl, yl, **kw),
    "repulsion_penalty": lambda x, y, xl, yl, **kw: tk.repulsion_penalty(x, xl, **kw).sum(),
    "valency_penalty": lambda x, y, xl, yl, **kw: tk.valency_penalty(x, xl, **kw).sum(),
}
BACKENDS = {
    "chamfer_loss": ("auto", "reference", "keops", "native"),
    "sinkhorn_loss": ("auto", "keops", "native"),
    "repulsion_penalty": ("auto", "reference", "keops", "native"),
    "valency_penalty": ("auto", "reference", "keops", "native"),
}
CASES = [(op, backend) for op, backends in BACKENDS.items() for backend in backends]


def _batch(batch=5, n=7, m=6, seed=0, min_length=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(batch, m, 3, generator=g, dtype=torch.float64)
    xl = torch.randint(min_length, n + 1, (batch,), generator=g)
    yl = torch.randint(min_length, m + 1, (batch,), generator=g)
    xl[0], yl[-1] = n, m  # a full set on each side
    return x, y, xl, yl


def _value_and_grads(fn, x, y, xl, yl):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    value = fn(x, y, xl, yl)
    value.backward()
    return value.detach(), x.grad, y.grad


@pytest.mark.parametrize(("op", "backend"), CASES)
def test_loss_traces_whole_and_matches_eager(op, backend):
    if backend == "native":
        needs_native()
    torch._dynamo.reset()
    fn = functools.partial(LOSSES[op], backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, y, xl, yl = _batch(min_length=0 if op == "chamfer_loss" else 1)
    want = _value_and_grads(fn, x, y, xl, yl)
    got = _value_and_grads(compiled, x, y, xl, yl)
    for w, g, what in zip(want, got, ("value", "grad x", "grad y"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=what)
    assert float(want[1].abs().sum()) > 0  # the gradient is not trivially zero
    # other lengths, same shapes: the same graph, new values
    x2, y2, xl2, yl2 = _batch(seed=1, min_length=1)
    want = _value_and_grads(fn, x2, y2, xl2, yl2)
    got = _value_and_grads(compiled, x2, y2, xl2, yl2)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_compiled_chamfer_options_match_eager():
    """The KeOps Chamfer's options through the traced graph: normals, weights, per-point
    terms, indices."""
    torch._dynamo.reset()
    x, y, xl, yl = _batch(min_length=0)
    g = torch.Generator().manual_seed(5)
    xn, yn = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(y.shape, dtype=x.dtype)
    w = torch.rand(x.shape[0], generator=g, dtype=x.dtype)

    def fn(x, y):
        loss, normals, xi, yi = tk.chamfer_loss(
            x, y, xl, yl, xn, yn, w, norm=1, return_index=True, backend="keops"
        )
        per_x, per_y = tk.chamfer_loss(
            x, y, xl, yl, point_reduction=None, batch_reduction=None, backend="keops"
        )
        return loss + normals + per_x.sum() + per_y.sum(), xi, yi

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for f in (fn, compiled):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        value, xi, yi = f(xx, yy)
        value.backward()
        if f is fn:
            want = (value.detach(), xi, yi, xx.grad, yy.grad)
        else:
            for a, b in zip((value.detach(), xi, yi, xx.grad, yy.grad), want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_sinkhorn_weights_and_options_match_eager():
    """Sinkhorn through the op with per-point weights (gradients for them too), p=1, a given
    diameter, and without debiasing."""
    torch._dynamo.reset()
    x, y, xl, yl = _batch()
    g = torch.Generator().manual_seed(6)
    a = torch.rand(x.shape[:2], generator=g, dtype=x.dtype) + 0.1
    b = torch.rand(y.shape[:2], generator=g, dtype=x.dtype) + 0.1

    def fn(x, y, a, b):
        first = tk.sinkhorn_loss(x, y, xl, yl, a=a, b=b, backend="auto")
        second = tk.sinkhorn_loss(
            x, y, xl, yl, p=1, diameter=8.0, debias=False, batch_reduction="sum"
        )
        return first + second

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, y, a, b)]
        value = f(*leaves)
        value.backward()
        results.append([value.detach(), *(t.grad for t in leaves)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_losses_compile_with_inductor_at_the_paper_scale():
    """The default backend (inductor), B=64 sets of 2..35 points in float32, every loss with
    backend "auto" in one compiled training-step loss."""
    needs_native()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 35, 3, generator=g)
    y = torch.randn(64, 35, 3, generator=g)
    xl, yl = torch.randint(2, 36, (64,), generator=g), torch.randint(2, 36, (64,), generator=g)

    def fn(x, y, xl, yl):
        return sum(f(x, y, xl, yl) for f in LOSSES.values())

    compiled = torch.compile(fn, fullgraph=True)
    want = _value_and_grads(fn, x, y, xl, yl)
    got = _value_and_grads(compiled, x, y, xl, yl)
    for w, gg in zip(want, got, strict=True):
        torch.testing.assert_close(gg, w, rtol=1e-4, atol=1e-5)


def test_the_loss_custom_ops_pass_opcheck():
    """Schema, fake kernel and autograd registration of the two ops the losses trace through."""
    x, y, xl, yl = _batch(min_length=0)
    ops = torch.ops.topn_kernels
    torch.library.opcheck(ops.keops_chamfer_nearest.default, (x, y, xl, yl, 2))
    x, y, xl, yl = _batch()
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    params = [2, 0.05, 0.5, float("nan"), 1.0]
    for args in (
        (xg, yg, xl, yl, None, None, "sinkhorn_keops", params, True),
        (x, y, xl, yl, None, None, "sinkhorn_keops", params, False),
        (xg, None, xl, None, None, None, "repulsion_keops", [1.0], True),
        (xg, None, xl, None, None, None, "valency_keops", [2.0, 4.0], True),
    ):
        torch.library.opcheck(ops.set_loss.default, args)


NAN = float("nan")


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        (
            "sinkhorn_native",
            [2, 0.05, 1.5, NAN, 1.0],
            r"params\[2\] \(scaling\) must be in \(0, 1\)",
        ),
        (
            "sinkhorn_keops",
            [2, 0.05, 1.0, NAN, 1.0],
            r"params\[2\] \(scaling\) must be in \(0, 1\)",
        ),
        ("sinkhorn_native", [2, 0.05, 0.0, NAN, 1.0], r"params\[2\] \(scaling\) must be finite"),
        (
            "sinkhorn_native",
            [2, 0.0, 0.5, NAN, 1.0],
            r"params\[1\] \(blur\) must be finite and > 0",
        ),
        (
            "sinkhorn_keops",
            [2, -1.0, 0.5, NAN, 1.0],
            r"params\[1\] \(blur\) must be finite and > 0",
        ),
        (
            "sinkhorn_native",
            [2, NAN, 0.5, NAN, 1.0],
            r"params\[1\] \(blur\) must be finite and > 0",
        ),
        ("sinkhorn_native", [1.5, 0.05, 0.5, NAN, 1.0], r"params\[0\] \(p\) must be 1 or 2"),
        ("sinkhorn_native", [2, 0.05, 0.5, -1.0, 1.0], r"params\[3\] \(diameter\) must be finite"),
        ("sinkhorn_native", [2, 0.05, 0.5, NAN, 0.5], r"params\[4\] \(debias\) must be 0 or 1"),
        ("sinkhorn_native", [2, 0.05], "params of sinkhorn_native must be the 5 values"),
        ("repulsion_keops", [0.0], r"params\[0\] \(min_dist\) must be finite and > 0"),
        ("valency_keops", [0.0, 4.0], r"params\[0\] \(neighbor_dist\) must be finite and > 0"),
        ("valency_keops", [2.0, -1.0], r"params\[1\] \(max_valency\) must be an integer >= 0"),
        ("valency_keops", [2.0, 2.5], r"params\[1\] \(max_valency\) must be an integer >= 0"),
        ("chamfer", [1.0], "kind must be one of"),
    ],
)
def test_the_loss_op_checks_its_params_when_called_directly(kind, params, match):
    # the public losses check these; a direct call gave a value silently (scaling >= 1 or 0,
    # p 1.5, a negative diameter, min_dist <= 0, ...) or numpy's error from the eps schedule
    x, y, xl, yl = _batch()
    y = y if kind.startswith("sinkhorn") else None
    yl = yl if kind.startswith("sinkhorn") else None
    for with_grad in (False, True):
        with pytest.raises(ValueError, match=match):
            torch.ops.topn_kernels.set_loss(x, y, xl, yl, None, None, kind, params, with_grad)
    with torch._subclasses.FakeTensorMode() as mode:  # the fake kernel, at trace time
        fx = mode.from_tensor(x)
        fy = None if y is None else mode.from_tensor(y)
        with pytest.raises(ValueError, match=match):
            torch.ops.topn_kernels.set_loss(fx, fy, None, None, None, None, kind, params, False)


def test_the_native_loss_ops_pass_opcheck():
    """Schema, fake kernel and autograd registration of the native losses' C++ ops, with and
    without gradients, with and without lengths."""
    needs_native()
    x, y, xl, yl = _batch(min_length=0)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    ops = torch.ops.topn_kernels
    for with_grad, (a, b) in ((True, (xg, yg)), (False, (x, y))):
        for lengths in ((xl, yl), (None, None)):
            torch.library.opcheck(
                ops.chamfer_sets.default, (a, b, *lengths, 2, True, False, with_grad)
            )
            torch.library.opcheck(
                ops.chamfer_sets.default, (a, b, *lengths, 1, False, True, with_grad)
            )
            torch.library.opcheck(ops.repulsion_sets.default, (a, lengths[0], 1.0, with_grad))
            torch.library.opcheck(ops.valency_sets.default, (a, lengths[0], 1.5, 2, with_grad))


PER_SET = {
    **{
        f"chamfer_{b}": functools.partial(
            lambda x, y, xl, yl, b: tk.chamfer_loss(x, y, xl, yl, batch_reduction=None, backend=b),
            b=b,
        )
        for b in ("keops", "native")
    },
    **{
        f"sinkhorn_{b}": functools.partial(
            lambda x, y, xl, yl, b: tk.sinkhorn_loss(
                x, y, xl, yl, batch_reduction="none", backend=b
            ),
            b=b,
        )
        for b in ("keops", "native")
    },
    **{
        f"{name}_{b}": functools.partial(
            lambda x, y, xl, yl, b, op: op(x, xl, backend=b), b=b, op=op
        )
        for name, op in (("repulsion", tk.repulsion_penalty), ("valency", tk.valency_penalty))
        for b in ("keops", "native")
    },
}


PER_SET_CASES = [
    (loss, wrt)
    for loss in PER_SET
    for wrt in (("x",) if loss.startswith(("repulsion", "valency")) else ("x", "y", "both"))
]


@pytest.mark.parametrize(("loss", "wrt"), PER_SET_CASES)
def test_compiled_per_set_values_take_per_set_upstream_gradients(loss, wrt):
    """Per-set values (B,) weighted by signed per-set weights: the backward through the
    custom ops must scale each set's gradient by its own upstream gradient; also with only one
    of x and y requiring grad."""
    if loss.endswith("native"):
        needs_native()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(8)
    x, y, xl, yl = _batch(min_length=1)
    signs = torch.randn(x.shape[0], generator=g, dtype=x.dtype)

    def fn(x, y):
        return (PER_SET[loss](x, y, xl, yl) * signs).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        xx = x.clone().requires_grad_(wrt in ("x", "both"))
        yy = y.clone().requires_grad_(wrt in ("y", "both"))
        value = f(xx, yy)
        value.backward()
        results.append([value.detach(), xx.grad, yy.grad])
    for got, want in zip(results[1], results[0], strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert any(r is not None and float(r.abs().sum()) > 0 for r in results[0][1:])
