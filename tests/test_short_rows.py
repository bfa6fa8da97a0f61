"""topn_kernels.models.short_rows against the PyTorch functions and modules it replaces in the
graph VAE (docs/graph_vae.md, "Speed")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topn_kernels.models import GraphVAE, GraphVAEConfig
from topn_kernels.models import short_rows as sr


def _rows(shape, masked: bool) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) * 5
    if masked:  # some -inf entries, never a whole row
        hide = torch.rand(shape) < 0.3
        hide[..., 0] = False
        x = x.masked_fill(hide, -math.inf)
    return x


@pytest.mark.parametrize("width", [1, 4, 9])
@pytest.mark.parametrize("masked", [False, True])
def test_softmaxes_match_torch_values_and_gradients(width, masked):
    torch.manual_seed(0)
    x = _rows((6, 5, width), masked)
    cases = [
        (sr.softmax, torch.softmax),
        (sr.log_softmax, F.log_softmax),
        (sr.logsumexp, torch.logsumexp),
    ]
    for ours, theirs in cases:
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        out_a, out_b = ours(a, dim=-1), theirs(b, dim=-1)
        torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
        weight = torch.randn_like(out_b).masked_fill(~torch.isfinite(out_b), 0.0)
        # -inf * 0 is NaN: compare gradients of the finite outputs
        (out_a.masked_fill(~torch.isfinite(out_a), 0.0) * weight).sum().backward()
        (out_b.masked_fill(~torch.isfinite(out_b), 0.0) * weight).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_softmaxes_along_another_dim_and_a_row_of_minus_inf():
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(sr.softmax(x, dim=1), torch.softmax(x, dim=1))
    torch.testing.assert_close(sr.log_softmax(x, dim=0), F.log_softmax(x, dim=0))
    torch.testing.assert_close(sr.logsumexp(x, dim=1), torch.logsumexp(x, dim=1))
    dead = torch.full((2, 3), -math.inf)
    assert torch.equal(sr.logsumexp(dead), torch.logsumexp(dead, -1))
    assert torch.isnan(sr.softmax(dead)).all() and torch.isnan(torch.softmax(dead, -1)).all()


def test_dropout_drops_p_and_scales_the_rest():
    torch.manual_seed(0)
    p, count = 0.1, 1_000_001  # odd: the last draw is cut in half
    x = torch.rand(count, dtype=torch.float64) + 1.0
    out = sr.dropout(x, p)
    kept = out != 0
    sd = math.sqrt(p * (1 - p) / count)
    assert abs((1 - kept.double().mean().item()) - p) < 5 * sd
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)
    # the two halves of each 64-bit draw are independent: both of a pair dropped ~ p^2
    pairs = ~kept[: count - 1].view(-1, 2)
    both = pairs.all(1).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / pairs.shape[0])
    # neighbours in a row of a 2-D tensor are not correlated either
    grid = ~sr.dropout(torch.ones(1000, 1000), 0.5).bool()
    corr = torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]).float())
    assert abs(corr[0, 1].item()) < 0.01


def test_dropout_is_seeded_by_the_global_generator_and_has_the_masked_gradient():
    x = torch.randn(4, 9, 64, requires_grad=True)
    torch.manual_seed(3)
    a = sr.dropout(x, 0.25)
    torch.manual_seed(3)
    b = sr.dropout(x, 0.25)
    assert torch.equal(a, b)
    assert not torch.equal(a, sr.dropout(x, 0.25))
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() / 0.75)


def test_dropout_off_and_bad_probability():
    x = torch.randn(5, 3)
    assert sr.dropout(x, 0.3, training=False) is x
    assert sr.dropout(x, 0.0) is x
    torch.manual_seed(0)  # p within 2^-33 of 1: the threshold must not wrap around in int32
    assert (sr.dropout(torch.ones(10_000), 1 - 2**-34) == 0).all()
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            sr.dropout(x, p)


def _layer(dropout: float, **kw) -> nn.TransformerEncoderLayer:
    torch.manual_seed(1)
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=dropout, batch_first=True, **kw)


@pytest.mark.parametrize("training", [False, True])
def test_transformer_layer_matches_the_module_with_a_padding_mask(training):
    layer = _layer(0.0 if training else 0.1).double().train(training)
    torch.manual_seed(2)
    x = torch.randn(5, 9, 16, dtype=torch.float64)
    mask = torch.arange(9) < torch.tensor([9, 1, 4, 7, 2])[:, None]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = sr.transformer_layer(layer, a, mask)
    theirs = layer(b, src_key_padding_mask=~mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * weight).sum(), [a, *layer.parameters()])
    grads_theirs = torch.autograd.grad((theirs * weight).sum(), [b, *layer.parameters()])
    for g_ours, g_theirs in zip(grads_ours, grads_theirs, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)


def test_transformer_layer_dropout_in_training_only():
    layer = _layer(0.5)
    x, mask = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    torch.manual_seed(0)
    first = sr.transformer_layer(layer, x, mask)
    torch.manual_seed(0)
    assert torch.equal(first, sr.transformer_layer(layer, x, mask))
    assert not torch.allclose(first, layer.eval()(x))  # training drew a mask
    torch.testing.assert_close(sr.transformer_layer(layer, x, mask), layer(x), atol=1e-5, rtol=0)


def test_transformer_layer_drops_where_the_module_does(monkeypatch):
    layer = _layer(0.1)
    layer.self_attn.dropout, layer.dropout1.p = 0.1, 0.2
    layer.dropout.p, layer.dropout2.p = 0.3, 0.4
    calls = []

    def record(x, p, training=True):
        calls.append((tuple(x.shape), p, training))
        return x

    monkeypatch.setattr(sr, "dropout", record)
    x, mask = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    out = sr.transformer_layer(layer, x, mask)
    # the attention weights, after the attention block, inside and after the feed-forward block
    assert calls == [((3, 4, 6, 6), 0.1, True), ((3, 6, 16), 0.2, True),
                     ((3, 6, 32), 0.3, True), ((3, 6, 16), 0.4, True)]  # fmt: skip
    torch.testing.assert_close(out, layer.eval()(x), atol=1e-5, rtol=0)  # identity dropouts
    calls.clear()
    sr.transformer_layer(layer, x, mask)
    assert [c[2] for c in calls] == [False] * 4


def test_transformer_layer_rejects_other_layers():
    x, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    others = [_layer(0.0, norm_first=True), _layer(0.0, activation="gelu")]
    bias_k = nn.Parameter(torch.zeros(1, 1, 16))
    for attribute, value in (("bias_k", bias_k), ("add_zero_attn", True)):
        layer = _layer(0.0)
        setattr(layer.self_attn, attribute, value)
        others.append(layer)
    for layer in others:
        with pytest.raises(ValueError, match="post-norm ReLU"):
            sr.transformer_layer(layer, x, mask)


def test_graph_decoder_with_short_rows_matches_the_reference_backend():
    torch.manual_seed(0)
    plain = GraphVAE(GraphVAEConfig(backend="reference")).eval()
    fast = GraphVAE(GraphVAEConfig(backend="auto")).eval()
    fast.load_state_dict(plain.state_dict())
    z, sizes = torch.randn(6, plain.cfg.latent_dim), torch.tensor([9, 1, 4, 7, 2, 9])
    with torch.no_grad():
        a, b = plain.decoder(z, sizes), fast.decoder(z, sizes)
    assert not a.short_rows and b.short_rows
    torch.testing.assert_close(b.atom_logits, a.atom_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.edge_logits, a.edge_logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(b.edge_log_probs(), a.edge_log_probs(), strict=True):
        pair = torch.isfinite(y)
        torch.testing.assert_close(x[pair], y[pair], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.log_atom_probs(), a.log_atom_probs(), atol=1e-5, rtol=1e-5)


def test_graph_decoder_takes_the_plain_path_under_the_reference_environment(monkeypatch):
    torch.manual_seed(0)
    model = GraphVAE(GraphVAEConfig()).eval()
    z, sizes = torch.randn(2, model.cfg.latent_dim), torch.tensor([3, 5])
    assert model.decoder(z, sizes).short_rows
    monkeypatch.setenv("TOPN_KERNELS_BACKEND", "reference")
    assert not model.decoder(z, sizes).short_rows


def test_graph_decoder_runs_a_hooked_layer_as_the_module():
    """A hook on a transformer layer sends it through the module (the hook runs, the values are
    those of the short-row path up to rounding); the short-row layer calls the layer's
    submodules, so their hooks run either way."""
    torch.manual_seed(0)
    model = GraphVAE(GraphVAEConfig()).eval()
    z, sizes = torch.randn(3, model.cfg.latent_dim), torch.tensor([3, 5, 9])
    before = model.decoder(z, sizes).edge_logits
    shapes = []
    block = model.decoder.blocks[0]
    handle = block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    hooked = model.decoder(z, sizes).edge_logits
    handle.remove()
    assert len(shapes) == 1 and shapes[0][:2] == (3, 9)
    torch.testing.assert_close(hooked, before, rtol=1e-5, atol=1e-5)
