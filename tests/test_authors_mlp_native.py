"""The native MLP of the authors' set VAE (csrc/cpu/authors_mlp.cpp, topn_kernels/native/
authors_mlp.py): the module's MLP, optionally followed by ReLU and a batch norm over the points
(the encoder's and decoder's stems), against the modules, its gradients, refusals, fake kernels
and the model's use of it."""

import copy

import pytest
import torch
from torch import nn

from topn_kernels import native
from topn_kernels.models import AuthorsSetVAE
from topn_kernels.models.authors import AuthorsMLP, _point_norm

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

if native.AVAILABLE:
    from topn_kernels.native.authors_mlp import mlp, mlp_plan

F64 = torch.float64

# (dim_in, dim_out, width, modulation, cond rows per set: "n" or 1 or None, with a norm)
CASES = {
    "encoder stem": (3, 12, 16, "+", "n", True),
    "decoder stem": (5, 12, 16, "film", 1, True),
    "film per point, residuals": (16, 16, 16, "film", "n", False),
    "plus per set, residual start": (16, 6, 16, "+", 1, True),
    "no second input, residual end": (7, 16, 16, None, None, False),
}


def _modules(case, dtype=F64):
    din, dout, width, modulation, _, with_norm = CASES[case]
    torch.manual_seed(0)
    kwargs = {} if modulation is None else {"cond_dim": 4, "modulation": modulation}
    module = AuthorsMLP(din, dout, width, 2, **kwargs).to(dtype)
    norm = nn.BatchNorm1d(dout).to(dtype) if with_norm else None
    if norm is not None:  # away from the identity, so that a dropped affine map shows
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    return module, norm


def _inputs(case, B=5, n=7, dtype=F64, x_grad=True, y_grad=True):
    din, _, _, modulation, cond, _ = CASES[case]
    x = torch.randn(B, n, din, dtype=dtype, requires_grad=x_grad)
    y = None
    if modulation is not None:
        y = torch.randn(B, n if cond == "n" else 1, 4, dtype=dtype, requires_grad=y_grad)
    return x, y


def _plain(module, norm, x, y):
    out = module(x, y)
    return out if norm is None else _point_norm(norm, torch.relu(out))


def _run_both(case, training, dtype=F64, x_grad=True, y_grad=True, B=5, n=7, ref_dtype=None):
    """(name, ours, the modules') for the output, the inputs' and parameters' gradients and the
    buffers; the modules run in ``ref_dtype`` (default: ``dtype``), their results cast back."""
    ref_dtype = dtype if ref_dtype is None else ref_dtype
    module, norm = _modules(case, dtype)
    ref_module = copy.deepcopy(module).to(ref_dtype)
    ref_norm = None if norm is None else copy.deepcopy(norm).to(ref_dtype)
    for m in (norm, ref_norm):
        if m is not None:
            m.train(training)
    x, y = _inputs(case, B=B, n=n, dtype=dtype, x_grad=x_grad, y_grad=y_grad)
    xr = x.detach().to(ref_dtype).requires_grad_(x_grad)
    yr = None if y is None else y.detach().to(ref_dtype).requires_grad_(y_grad)
    got, expected = mlp(module, x, y, norm), _plain(ref_module, ref_norm, xr, yr)
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad.to(ref_dtype))

    def back(t):
        return None if t is None else t.to(dtype) if t.is_floating_point() else t

    pairs = [("out", got, back(expected)), ("x.grad", x.grad, back(xr.grad))]
    if y is not None:
        pairs.append(("y.grad", y.grad, back(yr.grad)))
    mods = [(module, ref_module)] + ([] if norm is None else [(norm, ref_norm)])
    for a, b in mods:
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            pairs.append((f"{name}.grad", p.grad, back(q.grad)))
        for (name, buf), other in zip(a.named_buffers(), b.buffers(), strict=True):
            pairs.append((name, buf, back(other)))
    return pairs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_mlp_matches_the_modules(case, training):
    """Output, gradients of x, y and every parameter, and the norm's running statistics and
    batch count, against the modules (float64: up to rounding)."""
    for name, got, expected in _run_both(case, training):
        assert (got is None) == (expected is None), name
        if got is not None:
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["encoder stem", "decoder stem"])
def test_mlp_matches_the_modules_at_a_large_batch(case):
    """A batch norm over 720 points, whose column sums run in 45 chunks split between the
    threads (csrc/cpu/point_batch_norm.h), in training."""
    for name, got, expected in _run_both(case, True, B=48, n=15):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize(("B", "n"), [(5, 7), (48, 15)])
def test_mlp_matches_the_modules_in_float32(B, n):
    """Against the modules in float64, within a few float32 roundings of each tensor's largest
    value: the op's batch norm sums in its own order (at 720 points several times closer to the
    exact values than ATen's float32 kernels; about as close at 35)."""
    run = _run_both("decoder stem", True, dtype=torch.float32, B=B, n=n, ref_dtype=F64)
    for name, got, expected in run:
        atol = 2e-6 * float(expected.abs().max())
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4, msg=name)


def test_mlp_computes_only_the_input_gradients_asked_for():
    """The encoder's stem: neither the points nor the one-hot valencies need a gradient."""
    run = _run_both("encoder stem", True, x_grad=False, y_grad=False)
    pairs = {name: (got, expected) for name, got, expected in run}
    assert pairs["x.grad"] == (None, None) and pairs["y.grad"] == (None, None)
    torch.testing.assert_close(*pairs["lin1.weight.grad"])


@pytest.mark.parametrize("case", ["decoder stem", "film per point, residuals", "encoder stem"])
def test_mlp_gradcheck(case):
    """The gradients of x and y (the parameters': the next test) against finite differences."""
    module, norm = _modules(case)
    x, y = _inputs(case, B=3, n=4)
    assert torch.autograd.gradcheck(lambda x, y: mlp(module, x, y, norm), (x, y))


def test_mlp_parameter_gradients_match_finite_differences():
    """The weights' gradients (which gradcheck of x and y does not reach) against central
    differences of the output's weighted sum."""
    module, norm = _modules("decoder stem")
    norm.eval()  # running statistics: the output is a fixed function of the parameters
    x, y = _inputs("decoder stem", B=3, n=4)
    weight = torch.randn(3, 4, 12, dtype=F64)
    (mlp(module, x, y, norm) * weight).sum().backward()
    params = list(module.parameters()) + list(norm.parameters())
    for p in params:
        flat, grad = p.detach().view(-1), p.grad.view(-1)
        for i in (0, flat.numel() // 2, flat.numel() - 1):
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + 1e-6
                up = (mlp(module, x, y, norm) * weight).sum()
                flat[i] = old - 1e-6
                down = (mlp(module, x, y, norm) * weight).sum()
                flat[i] = old
            assert abs((up - down).item() / 2e-6 - grad[i].item()) < 1e-5


def test_mlp_is_differentiable_once():
    module, norm = _modules("decoder stem")
    x, y = _inputs("decoder stem")
    out = mlp(module, x, y, norm)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_mlp_runs_under_inference_mode():
    module, norm = _modules("decoder stem")
    x, y = _inputs("decoder stem", x_grad=False, y_grad=False)
    with torch.no_grad():
        expected = _plain(copy.deepcopy(module), copy.deepcopy(norm), x, y)
    with torch.inference_mode():
        got = mlp(module, x, y, norm)
    torch.testing.assert_close(got, expected)


def test_mlp_plan_refuses_what_it_cannot_run_naming_the_argument():
    module, norm = _modules("decoder stem")
    x, y = _inputs("decoder stem")
    assert mlp_plan(module, x, y, norm)[0] is None
    assert "x must be" in mlp_plan(module, x[0], y, norm)[0]
    assert "float32 or float64" in mlp_plan(module, x.half(), y, norm)[0]
    assert "y must be" in mlp_plan(module, x, y[:, :, :2], norm)[0]
    assert "y must be" in mlp_plan(module, x, torch.randn(5, 3, 4, dtype=F64), norm)[0]
    assert "y must be" in mlp_plan(module, x, None, norm)[0]
    assert "x's dtype" in mlp_plan(module, x, y.float(), norm)[0]
    assert "BatchNorm1d" in mlp_plan(module, x, y, nn.LayerNorm(12))[0]
    assert (
        "running statistics"
        in mlp_plan(module, x, y, nn.BatchNorm1d(12, track_running_stats=False).double())[0]
    )
    assert "output channels" in mlp_plan(module, x, y, nn.BatchNorm1d(8).double())[0]
    assert "at least 2" in mlp_plan(module, x[:1, :1], y[:1], norm)[0]
    deep = AuthorsMLP(5, 12, 16, 3, cond_dim=4, modulation="film").double()
    assert "hidden maps" in mlp_plan(deep, x, y, norm)[0]
    with pytest.raises(ValueError, match="mlp: y must be"):
        mlp(module, x, None, norm)


def test_mlp_op_checks_its_inputs():
    module, norm = _modules("decoder stem")
    x, y = _inputs("decoder stem", x_grad=False, y_grad=False)
    _, (inputs, running) = mlp_plan(module, x, y, norm)
    inputs = [t.detach() for t in inputs]
    op = torch.ops.topn_kernels.authors_mlp
    with pytest.raises(RuntimeError, match="tensors expected"):
        op(inputs[:-1], 2, False, False, running, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="W2 must have shape"):
        op([*inputs[:4], inputs[4][:, :3], *inputs[5:]], 2, False, False, running, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="residual_start"):
        op(inputs, 2, True, False, running, True, 0.1, 1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", ["decoder stem", "film per point, residuals"])
def test_mlp_op_fake_kernels(case, training):
    module, norm = _modules(case)
    x, y = _inputs(case, x_grad=False, y_grad=False)
    _, (inputs, running) = mlp_plan(module, x, y, norm)
    inputs, running = [t.detach() for t in inputs], [t.clone() for t in running]
    modulation = {"+": 1, "film": 2}[module.modulation]
    flags = (modulation, module.residual_start, module.residual_end)
    args = (inputs, *flags, running, training, 0.1, 1e-5)
    torch.library.opcheck(
        torch.ops.topn_kernels.authors_mlp.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
    out = torch.ops.topn_kernels.authors_mlp(*args)
    back = (torch.randn_like(out[0]), inputs, *flags, running, training, 1e-5, out[1:])
    for grads in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(
            torch.ops.topn_kernels.authors_mlp_backward.default,
            (*back, *grads),
            test_utils=("test_schema", "test_faketensor"),
        )
    with pytest.raises(RuntimeError, match="7 saved tensors"):
        torch.ops.topn_kernels.authors_mlp_backward(*back[:-1], out[2:], True, True)


def test_model_stems_run_native_and_fall_back_for_a_hook():
    """The model's stems take the op (one node for MLP, ReLU and batch norm) unless a hook is
    registered on their modules; either way the same output, up to rounding."""
    torch.manual_seed(0)
    model = AuthorsSetVAE()
    x, n, noise = torch.randn(4, 6, 3), torch.full((4,), 6), torch.zeros(4, 30)
    out = model(x, n, noise=noise).recon
    assert _stem_nodes(out) == 2
    seen = []
    handle = model.decoder.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.train(False)
    hooked = model(x, n, noise=noise).recon
    handle.remove()
    plain = model(x, n, noise=noise).recon
    assert seen == [(24, 64)]
    torch.testing.assert_close(hooked, plain)


def _stem_nodes(out: torch.Tensor) -> int:
    """The number of the native MLP's autograd nodes in out's graph."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "AuthorsMlpFunction" in node.name()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count
