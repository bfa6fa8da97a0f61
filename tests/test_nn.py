"""Creation modules (docs/operators.md, Creation modules): shapes, masks, zero padding, and
what each one computes."""

from __future__ import annotations

import pytest
import torch

import topn_kernels as tk
from topn_kernels.nn import FirstNCreation, IIDCreation, MLPCreation, TopNCreation

from .helpers import assert_close_scaled, random_sizes

N = torch.tensor([3, 1, 7, 5])


def _check_padding(x, mask, n, n_max):
    assert x.shape[:2] == mask.shape == (len(n), n_max)
    assert torch.equal(mask.sum(1), n)
    assert (x[~mask] == 0).all()


def test_topn_creation_is_topn_create_on_its_parameters():
    torch.manual_seed(0)
    module = TopNCreation(latent_dim=6, set_dim=5, n_ref=9, score_norm="all")
    z = torch.randn(4, 6)
    x, mask = module(z, N, n_max=8)
    _check_padding(x, mask, N, 8)
    table = module.points @ module.W1.weight.T
    want = tk.topn_create(module.angle_mlp(z), module.angles, table, module.W2(z), N,
                          module.film, n_max=8, score_norm="all", backend="reference")  # fmt: skip
    assert_close_scaled(x, want.x, 1e-5)
    x.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_topn_creation_backends_agree_and_extrapolate_to_n_ref():
    torch.manual_seed(1)
    native = TopNCreation(latent_dim=6, set_dim=5, n_ref=12)
    reference = TopNCreation(latent_dim=6, set_dim=5, n_ref=12, backend="reference")
    reference.load_state_dict(native.state_dict())
    z = torch.randn(4, 6)
    for n in (N, 12):  # 12: a set as large as the whole reference set
        assert_close_scaled(native(z, n)[0], reference(z, n)[0], 1e-5)
    with pytest.raises(ValueError, match="n must"):
        native(z, 13)


def test_first_n_creation():
    torch.manual_seed(2)
    module = FirstNCreation(latent_dim=6, set_dim=5, n_max=7)
    z = torch.randn(4, 6)
    x, mask = module(z, N)
    _check_padding(x, mask, N, 7)
    shift = module.W2(z)
    for b, size in enumerate(N.tolist()):
        assert_close_scaled(x[b, :size], module.points[:size] + shift[b], 1e-6)
    with pytest.raises(ValueError, match="n must"):
        module(z, 8)


def test_mlp_creation():
    torch.manual_seed(3)
    module = MLPCreation(latent_dim=6, set_dim=5, n_max=7, hidden=16)
    z = torch.randn(4, 6)
    x, mask = module(z, N, n_max=9)
    _check_padding(x, mask, N, 9)
    full = module.mlp(z).view(4, 7, 5)
    for b, size in enumerate(N.tolist()):
        assert torch.equal(x[b, :size], full[b, :size])
    with pytest.raises(ValueError, match="n must"):
        module(z, 8)


def test_iid_creation():
    torch.manual_seed(4)
    module = IIDCreation(latent_dim=6, set_dim=3)
    z = torch.randn(256, 6)
    n = random_sizes(256, 1, 40)
    x, mask = module(z, n)
    _check_padding(x, mask, n, 40)
    noise = (x - module.W2(z)[:, None, :])[mask]  # the standard normal part of real points
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
