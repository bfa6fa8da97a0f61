"""The native Top-n creation of the authors' set VAE after its angle MLP
(csrc/cpu/authors_topn.cpp, topn_kernels/native/authors_topn.py) against the module's tensor
ops: values and the gradients of z and every parameter, gradcheck, fake kernels, refusals, and
the model's use of it."""

import copy

import pytest
import torch
from torch import nn

from topn_kernels import native
from topn_kernels.models import AuthorsConfig, AuthorsSetVAE
from topn_kernels.models.authors import TopN

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

if native.AVAILABLE:
    from topn_kernels.native.authors_topn import run_topn, topn_plan

F64 = torch.float64


def _pair(dtype=F64):
    torch.manual_seed(0)
    plain = TopN(AuthorsConfig()).to(dtype)
    with torch.no_grad():  # FiLM maps away from their init, so that a dropped term shows
        for p in (*plain.gamma.parameters(), *plain.beta.parameters()):
            p.uniform_(-1.5, 1.5)
    fast = copy.deepcopy(plain)
    fast.native = True
    return plain, fast


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("sets", "n"), [(1, 4), (64, 5), (7, 35), (3, 1)])
def test_matches_the_module(dtype, sets, n):
    plain, fast = _pair(dtype)
    g = torch.Generator().manual_seed(sets * 100 + n)
    z = torch.randn(sets, 30, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(sets, n, 16, generator=g, dtype=dtype)
    expected, got = plain(z, n), fast(z, n)
    assert "AuthorsTopn" in got.grad_fn.name()  # the op ran
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, expected, **tol)
    want = torch.autograd.grad(expected, [z, *plain.parameters()], upstream)
    ours = torch.autograd.grad(got, [z, *fast.parameters()], upstream)
    names = ["z", *(name for name, _ in plain.named_parameters())]
    for name, a, b in zip(names, ours, want, strict=True):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def test_gradcheck_and_second_order_refused():
    torch.manual_seed(1)
    q = torch.randn(3, 3, dtype=F64, requires_grad=True)
    weights = [
        torch.randn(6, 3, dtype=F64),
        torch.randn(6, 4, dtype=F64),
        torch.randn(4, 1, dtype=F64),
        torch.randn(4, dtype=F64),
        torch.randn(4, 1, dtype=F64),
        torch.randn(4, dtype=F64),
    ]
    weights = [w.requires_grad_(True) for w in weights]
    assert torch.autograd.gradcheck(lambda q, *w: run_topn(q, list(w), 3), (q, *weights))
    out = run_topn(q, weights, 2).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, q, create_graph=True)


def test_fake_kernels_inference_mode_and_op_checks():
    plain, _ = _pair()
    q = torch.randn(5, 3, dtype=F64)
    reason, weights = topn_plan(plain, q, 4)
    assert reason is None
    ops = torch.ops.topn_kernels
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.authors_topn.default, (q, weights, 4), test_utils=utils)
    outs = ops.authors_topn(q, weights, 4)
    args = (torch.randn_like(outs[0]), q, weights, 4, outs[1:])
    torch.library.opcheck(ops.authors_topn_backward.default, args, test_utils=utils)
    torch.library.opcheck(
        ops.authors_topn_autograd.default,
        (q.clone().requires_grad_(True), weights, 4),
        test_utils=(*utils, "test_autograd_registration"),
    )
    with torch.inference_mode():
        torch.testing.assert_close(ops.authors_topn_autograd(q, weights, 4), outs[0])
    with pytest.raises(RuntimeError, match="n must be in"):
        ops.authors_topn(q, weights, 36)
    with pytest.raises(RuntimeError, match="gamma_w must be"):  # d is the points' width
        ops.authors_topn(q, [weights[0], weights[1][:, :3], *weights[2:]], 4)


def test_plan_refuses_what_the_op_does_not_take():
    plain, _ = _pair()
    q = torch.randn(5, 3, dtype=F64)
    assert "n must be" in topn_plan(plain, q, 36)[0]
    assert "n must be" in topn_plan(plain, q, 0)[0]
    assert "angle channels" in topn_plan(plain, torch.randn(5, 4, dtype=F64), 3)[0]
    assert "dtype" in topn_plan(plain, q.float(), 3)[0]
    assert "strided" in topn_plan(plain, q[0], 3)[0]
    other = copy.deepcopy(plain)
    other.gamma = nn.Linear(1, 16, bias=False).double()
    assert "gamma and beta" in topn_plan(other, q, 3)[0]


def test_a_hook_sends_the_module_through_its_ops():
    _, fast = _pair()
    calls = []
    fast.gamma.register_forward_hook(lambda *a: calls.append(1))
    out = fast(torch.randn(2, 30, dtype=F64), 3)
    assert calls == [1] and "AuthorsTopn" not in out.grad_fn.name()


def test_the_model_uses_it_when_native():
    model = AuthorsSetVAE(AuthorsConfig(creation="topn"), native=True)
    assert model.decoder.creation.native
    recon = model.decoder(torch.randn(4, 30), 6)
    assert recon.shape == (4, 6, 3)
    model.use_native(False)
    assert not model.decoder.creation.native


def test_the_backward_refuses_an_index_outside_the_points():
    plain, _ = _pair()
    q = torch.randn(3, 3, dtype=F64)
    _, weights = topn_plan(plain, q, 2)
    ops = torch.ops.topn_kernels
    outs = ops.authors_topn(q, weights, 2)
    saved = list(outs[1:])
    saved[3] = saved[3].clone()
    saved[3][0, 0] = 35
    with pytest.raises(RuntimeError, match="index"):
        ops.authors_topn_backward(torch.ones_like(outs[0]), q, weights, 2, saved)
