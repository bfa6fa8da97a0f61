"""The native transformer layer (csrc/cpu/set_transformer.cpp, topn_kernels/native/
set_transformer.py; docs/set_vae.md, "The native transformer layer") against
``torch.nn.TransformerEncoderLayer``: outputs and every gradient, set sizes on both sides of the
vector width, one head and several, float32 and float64; its fallbacks; and the authors' set
VAE with and without its native paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from topn_kernels import native
from topn_kernels.models import AuthorsConfig, AuthorsSetVAE

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

if native.AVAILABLE:
    from topn_kernels.native.set_transformer import _weights, supports, transformer_layer

F64 = torch.float64


def _layer(channels=16, heads=4, feedforward=32, dtype=F64, **kwargs) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        channels, heads, feedforward, dropout=0.0, batch_first=True, **kwargs
    ).to(dtype)
    with torch.no_grad():  # the norms' affine parameters away from 1 and 0, so they matter
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return layer


def _grads(layer, x, out, upstream):
    return torch.autograd.grad(out, [x, *layer.parameters()], upstream)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("sets", "n"), [(3, 1), (5, 7), (4, 8), (2, 9), (3, 20), (2, 35)])
# head widths 4, 12, 4, 16, 8: rows read in place where the width is a multiple of the vector
# width (4 float64 or 8 float32 lanes under AVX2), from padded copies elsewhere
@pytest.mark.parametrize(("channels", "heads"), [(16, 4), (12, 1), (20, 5), (32, 2), (24, 3)])
def test_layer_matches_torch(dtype, sets, n, channels, heads):
    layer = _layer(channels, heads, dtype=dtype)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(sets, n, channels, dtype=dtype, generator=g, requires_grad=True)
    upstream = torch.randn(sets, n, channels, dtype=dtype, generator=g)
    expected = layer(x)
    ours = transformer_layer(layer, x)
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == F64 else {"atol": 2e-5, "rtol": 2e-5}
    torch.testing.assert_close(ours, expected, **tol)
    for got, want in zip(
        _grads(layer, x, ours, upstream), _grads(layer, x, expected, upstream), strict=True
    ):
        torch.testing.assert_close(got, want, **tol)


def test_layer_gradcheck():
    layer = _layer(8, 2, 12)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    weights = [w.detach().clone().requires_grad_() for w in _weights(layer)]
    from topn_kernels.native.set_transformer import _Layer

    assert torch.autograd.gradcheck(lambda x, *w: _Layer.apply(x, 2, 1e-5, *w), (x, *weights))


def test_layer_attention_is_per_set():
    """Each set attends to its own points only: changing set 1 leaves set 0's output alone."""
    layer = _layer()
    x = torch.randn(2, 9, 16, dtype=F64)
    y = x.clone()
    y[1] += 3.0
    a, b = transformer_layer(layer, x), transformer_layer(layer, y)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_layer_results_do_not_depend_on_the_thread_count():
    layer = _layer(64, 4, 256, dtype=torch.float32)
    x = torch.randn(64, 11, 64, requires_grad=True)
    upstream = torch.randn(64, 11, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            out = transformer_layer(layer, x)
            results.append((out, *_grads(layer, x, out, upstream)))
    finally:
        torch.set_num_threads(threads)
    # attention and norms: bit for bit; the matrix products (MKL) may split their sums by
    # thread, which moves a gradient by a few roundings of its largest element
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"norm_first": True}, "post-norm"),
        ({"activation": "gelu"}, "activation"),
        ({"dropout": 0.1}, "dropouts"),
        ({"batch_first": False}, "batch-first"),
        ({"bias": False}, "bias"),
    ],
    ids=lambda c: next(iter(c)) if isinstance(c, dict) else "",
)
def test_unsupported_layers_fall_back(change, names):
    kwargs = {"dropout": 0.0, "batch_first": True, **change}
    layer = nn.TransformerEncoderLayer(16, 4, 32, **kwargs).double()
    x = torch.randn(2, 5, 16, dtype=F64)
    assert not supports(layer, x)
    with pytest.raises(ValueError, match=f"transformer_layer: layer.*{names}"):
        transformer_layer(layer, x)


def test_inputs_the_layer_cannot_take_are_refused_naming_the_argument():
    """Channels other than the layer's, or heads that do not divide them, fall back to the
    module (which raises its own error) and are a ValueError of the op naming x or layer."""
    layer = _layer()
    x = torch.randn(3, 5, 4, dtype=F64)
    assert not supports(layer, x)
    with pytest.raises(ValueError, match="x must have the layer's 16 channels, got 4"):
        transformer_layer(layer, x)
    layer.self_attn.num_heads = 3
    with pytest.raises(ValueError, match="layer: num_heads=3 must divide"):
        transformer_layer(layer, torch.randn(3, 5, 16, dtype=F64))
    with pytest.raises(ValueError, match="x must be a float32 or float64"):
        transformer_layer(_layer(), torch.randn(3, 5, 16).half())


def _gelu_after_construction(layer):
    layer.activation = torch.nn.functional.gelu  # the module's relu flag stays set


def _attention_dropout_in_training(layer):
    layer.eval()
    layer.self_attn.train()
    layer.self_attn.dropout = 0.5


def _plain_norm(layer):
    layer.norm2 = nn.LayerNorm(16, elementwise_affine=False, dtype=F64)


@pytest.mark.parametrize(
    "mutate", [_gelu_after_construction, _attention_dropout_in_training, _plain_norm]
)
def test_layers_changed_after_construction_fall_back(mutate):
    layer = _layer()
    x = torch.randn(2, 5, 16, dtype=F64)
    assert supports(layer, x)
    mutate(layer)
    assert not supports(layer, x)


def test_no_native_layer_under_autocast_or_for_nested_tensors():
    layer = _layer(dtype=torch.float32)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not supports(layer, x)
    nested = torch.nested.nested_tensor(
        [torch.randn(3, 16), torch.randn(2, 16)], layout=torch.jagged
    )
    assert not supports(layer, nested)


def test_layer_is_differentiable_once():
    """A second-order gradient is refused, not silently wrong."""
    layer = _layer()
    x = torch.randn(2, 5, 16, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(transformer_layer(layer, x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_unsupported_inputs_fall_back():
    layer = _layer()
    assert supports(layer, torch.randn(2, 5, 16, dtype=F64))
    assert not supports(layer, torch.randn(2, 5, 16))  # dtype differs from the layer's
    assert not supports(layer, torch.randn(10, 16, dtype=F64))  # not (B, n, C)
    assert not supports(layer, torch.randn(2, 0, 16, dtype=F64))  # empty sets
    assert not supports(layer.half(), torch.randn(2, 5, 16, dtype=torch.float16))
    layer = _layer(dtype=torch.float32)
    layer.eval()
    layer.dropout.p = 0.5  # eval mode: dropout is off, so the layer is supported
    assert supports(layer, torch.randn(2, 5, 16))


def test_op_checks_shapes():
    layer = _layer()
    weights = [w.detach() for w in _weights(layer)]
    x = torch.randn(2, 5, 16, dtype=F64)
    with pytest.raises(RuntimeError, match="heads=3 must divide"):
        torch.ops.topn_kernels.set_transformer_layer(x, weights, 3, 1e-5)
    with pytest.raises(RuntimeError, match="in_proj_weight must have shape"):
        torch.ops.topn_kernels.set_transformer_layer(x, [weights[2], *weights[1:]], 4, 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.topn_kernels.set_transformer_layer(x.float(), weights, 4, 1e-5)
    out, *saved = torch.ops.topn_kernels.set_transformer_layer(x, weights, 4, 1e-5)
    backward = torch.ops.topn_kernels.set_transformer_layer_backward
    with pytest.raises(RuntimeError, match="grad_out must have"):
        backward(out[:1], x, weights, 4, saved)
    with pytest.raises(RuntimeError, match=r"saved\[1\] must have shape"):
        backward(out, x, weights, 4, [saved[0], saved[1][:, :, :2], *saved[2:]])
    transposed = [
        s if i != 1 else s.transpose(2, 3).contiguous().transpose(2, 3) for i, s in enumerate(saved)
    ]
    torch.testing.assert_close(
        backward(out, x, weights, 4, transposed)[0], backward(out, x, weights, 4, saved)[0]
    )  # a non-contiguous saved tensor is read by its strides


def test_op_fake_kernels():
    layer = _layer()
    weights = [w.detach() for w in _weights(layer)]
    x = torch.randn(3, 6, 16, dtype=F64)
    args = (x, weights, 4, 1e-5)
    torch.library.opcheck(
        torch.ops.topn_kernels.set_transformer_layer.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
    out = torch.ops.topn_kernels.set_transformer_layer(*args)
    back = (torch.randn_like(out[0]), x, weights, 4, out[1:])
    torch.library.opcheck(
        torch.ops.topn_kernels.set_transformer_layer_backward.default,
        back,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("creation", ["topn", "firstn", "iid", "mlp"])
def test_authors_model_native_paths_match_plain_model(creation):
    """The same parameters with and without the native paths (stems, set blocks, PNA
    pooling, Top-n's creation, the MLP creation's last map cut to the points kept): the same
    outputs and gradients up to rounding, in training mode (batch statistics) and in eval mode
    (i.i.d. creation: the same draws, from the same seed).

    Every size has at least two sets: a batch of one set of 2 points makes the gradients of the
    encoder's batch-norm biases ill-conditioned (the plain model's own change by 100% when the
    input moves by 1e-13), so no two implementations agree there."""
    torch.manual_seed(0)
    plain = AuthorsSetVAE(AuthorsConfig(creation=creation), native=False).double()
    fast = AuthorsSetVAE(AuthorsConfig(creation=creation), native=True).double()
    fast.load_state_dict(plain.state_dict())
    points = torch.randn(7, 9, 3, dtype=F64)
    lengths = torch.tensor([9, 9, 4, 4, 4, 2, 2])
    noise = torch.randn(7, 30, dtype=F64)
    for train in (True, False):
        plain.train(train), fast.train(train)
        torch.manual_seed(1)
        a = plain(points, lengths, noise)
        torch.manual_seed(1)
        b = fast(points, lengths, noise)
        torch.testing.assert_close(b.recon, a.recon, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(b.mu, a.mu, atol=1e-10, rtol=1e-9)
        if train:
            a.recon.square().sum().backward()
            b.recon.square().sum().backward()
            for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-8, msg=name)
    for (name, buf), other in zip(plain.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(other, buf, msg=name)  # batch-norm running statistics
    if creation == "mlp":  # the cut last map ran: the MLP module itself was not called
        fast.decoder.creation.mlp.forward = lambda *args: pytest.fail("the MLP ran whole")
        fast(points, lengths, noise)


@pytest.mark.parametrize("creation", ["topn", "mlp"])
def test_authors_model_native_switch(creation):
    model = AuthorsSetVAE(AuthorsConfig(creation=creation), native=False)
    blocks = [m for m in model.modules() if hasattr(m, "native")]
    # 6 blocks, the pooling, the encoder and decoder (their stems), the creation module
    assert len(blocks) == 10 and not any(m.native for m in blocks)
    assert model.use_native() is model and all(m.native for m in blocks)
    assert all(m.native for m in AuthorsSetVAE().modules() if hasattr(m, "native"))


def test_authors_model_runs_a_hooked_layer_as_the_module():
    """A hook on a layer's submodule, or a global module hook, sends the layer through the
    module, so that the hook runs; the output is the native model's, up to rounding."""
    torch.manual_seed(0)
    model = AuthorsSetVAE()  # training mode, gradients on: the module takes its plain path
    x, n, noise = torch.randn(4, 6, 3), torch.full((4,), 6), torch.zeros(4, 30)
    before = model(x, n, noise=noise).recon
    shapes = []
    linear1 = model.encoder.blocks[1].attn.linear1
    handle = linear1.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    hooked = model(x, n, noise=noise).recon
    handle.remove()
    assert shapes == [(4, 6, 256)]
    torch.testing.assert_close(hooked, before, rtol=1e-5, atol=1e-5)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    model(x, n, noise=noise)
    handle.remove()
    assert seen.count("TransformerEncoderLayer") == 6
    shapes.clear()
    model(x, n, noise=noise)
    assert shapes == []  # the hook is gone, and so is the module path


def _block(channels=16, heads=4, feedforward=32, dtype=F64):
    from topn_kernels.models.authors import SetBlock

    torch.manual_seed(0)
    block = SetBlock(channels, heads, feedforward).to(dtype)
    with torch.no_grad():  # affine weights and running statistics away from 1 and 0
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
        block.norm.running_mean.uniform_(-0.5, 0.5)
        block.norm.running_var.uniform_(0.5, 1.5)
    return block


def _plain_block(block, x):
    """The block as its modules compute it."""
    from topn_kernels.models.authors import _point_norm

    return x + _point_norm(block.norm, torch.relu(block.attn(x)))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("sets", "n"), [(3, 1), (5, 7), (2, 17), (40, 14)])
@pytest.mark.parametrize("training", [True, False])
def test_block_matches_its_modules(dtype, sets, n, training):
    """set_block against the modules: output, the gradients of x and of every parameter, and
    the batch norm's running statistics and batch count after the call. In float32 the modules
    run in float64: the block's norms sum in their own order (csrc/cpu/point_rows.h), and
    ATen's float32 norms are themselves several times further from the exact values."""
    import copy

    from topn_kernels.native.set_transformer import set_block

    block = _block(dtype=dtype).train(training)
    plain = copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(sets, n, 16, dtype=dtype, generator=g, requires_grad=True)
    upstream = torch.randn(sets, n, 16, dtype=dtype, generator=g)
    x64 = x.detach().double().requires_grad_()
    ours, expected = set_block(block.attn, block.norm, x), _plain_block(plain, x64)
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == F64 else {"atol": 3e-5, "rtol": 3e-5}
    torch.testing.assert_close(ours, expected.to(dtype), **tol)
    got = torch.autograd.grad(ours, [x, *block.parameters()], upstream)
    want = torch.autograd.grad(expected, [x64, *plain.parameters()], upstream.double())
    for (name, _), a, b in zip(block.named_parameters(), got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b.to(dtype), **tol, msg=name)
    torch.testing.assert_close(got[0], want[0].to(dtype), **tol)
    for (name, a), b in zip(block.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), msg=name)
    assert int(block.norm.num_batches_tracked) == int(training)


def test_block_gradcheck():
    """The block's op with its C++ autograd, in training (batch statistics) and eval (running
    statistics), against finite differences; a second-order gradient is refused."""
    from topn_kernels.native.set_transformer import _weights

    block = _block(8, 2, 12)
    norm = block.norm
    x = torch.randn(3, 4, 8, dtype=F64, requires_grad=True)
    weights = [w.detach().clone().requires_grad_() for w in _weights(block.attn)]
    weights += [t.detach().clone().requires_grad_() for t in (norm.weight, norm.bias)]
    stats = (norm.running_mean.clone(), norm.running_var.clone())
    op = torch.ops.topn_kernels.set_block_autograd
    for training in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, *w, t=training: op(x, list(w), 2, 1e-5, *stats, t, 0.1, 1e-5),
            (x, *weights),
        )
    out = op(x, weights, 2, 1e-5, *stats, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    torch.library.opcheck(
        op.default,
        (x, weights, 2, 1e-5, *stats, True, 0.1, 1e-5),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("norm", "names"),
    [
        (nn.BatchNorm1d(16, affine=False, dtype=F64), "affine weights"),
        (nn.BatchNorm1d(16, track_running_stats=False, dtype=F64), "running statistics"),
        (nn.BatchNorm1d(16, momentum=None, dtype=F64), "momentum"),
        (nn.BatchNorm1d(8, dtype=F64), "x's 16 channels"),
        (nn.BatchNorm1d(16), "dtype"),
        (nn.LayerNorm(16, dtype=F64), "BatchNorm1d"),
    ],
    ids=["no-affine", "no-running-stats", "cumulative", "channels", "dtype", "layer-norm"],
)
def test_block_refuses_norms_it_cannot_run_and_the_model_falls_back(norm, names):
    from topn_kernels.native.set_transformer import block_unsupported, set_block

    block = _block()
    block.native = True
    x = torch.randn(2, 5, 16, dtype=F64)
    assert block_unsupported(block.attn, block.norm, x) is None
    block.norm = norm
    assert names in block_unsupported(block.attn, norm, x)
    with pytest.raises(ValueError, match=f"set_block: norm.*{names}"):
        set_block(block.attn, norm, x)
    if names not in ("x's 16 channels", "dtype", "BatchNorm1d"):  # modules that can run
        torch.testing.assert_close(block(x), _plain_block(block, x))


def test_block_runs_under_inference_mode_and_falls_back_where_the_module_decides():
    """Below autograd (inference mode) the op runs its forward alone; a training batch of one
    point (no batch statistics) and an empty batch go to the modules, which answer for them."""
    block = _block()
    block.native = True
    x = torch.randn(3, 5, 16, dtype=F64)
    with torch.no_grad():
        expected = _plain_block(block, x)  # the modules (batch statistics: training mode)
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got, expected)
    from topn_kernels.native.set_transformer import block_unsupported

    assert "at least 2" in block_unsupported(block.attn, block.norm, x[:1, :1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(x[:1, :1])
    assert block(x[:0]).shape == (0, 5, 16)
    block.eval()
    assert block_unsupported(block.attn, block.norm, x[:1, :1]) is None  # running statistics


@pytest.mark.parametrize("training", [True, False])
def test_block_op_fake_kernels(training):
    block = _block()
    norm = block.norm
    weights = [w.detach() for w in _weights(block.attn)]
    x = torch.randn(3, 6, 16, dtype=F64)
    stats = [norm.running_mean.clone(), norm.running_var.clone()]
    args = (x, weights, 4, 1e-5, norm.weight.detach(), norm.bias.detach(), *stats, training)
    args += (0.1, 1e-5)
    torch.library.opcheck(
        torch.ops.topn_kernels.set_block.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
    out = torch.ops.topn_kernels.set_block(*args)
    back = (torch.randn_like(out[0]), x, weights, 4, norm.weight.detach(), *stats, training, 1e-5)
    torch.library.opcheck(
        torch.ops.topn_kernels.set_block_backward.default,
        (*back, out[1:]),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(RuntimeError, match="14 saved tensors"):
        torch.ops.topn_kernels.set_block_backward(*back, out[2:])
    with pytest.raises(RuntimeError, match="batch norm's weight"):
        torch.ops.topn_kernels.set_block(x, weights, 4, 1e-5, stats[0][:3], *args[5:])
