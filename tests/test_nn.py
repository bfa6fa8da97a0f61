"""Creation modules (docs/operators.md, Creation modules): shapes, masks, zero padding, and
what each one computes."""

from __future__ import annotations

import pytest
import torch

import topn_kernels as tk
from topn_kernels.nn import FirstNCreation, IIDCreation, MLPCreation, TopNCreation
from topn_kernels.reference import topn_create_at

from .helpers import assert_close_scaled, assert_topn_matches_reference, random_sizes

N = torch.tensor([3, 1, 7, 5])


def _check_padding(x, mask, n, n_max):
    assert x.shape[:2] == mask.shape == (len(n), n_max)
    assert torch.equal(mask.sum(1), n)
    assert (x[~mask] == 0).all()


def _topn_create_inputs(module: TopNCreation, z: torch.Tensor) -> list[torch.Tensor]:
    """[query, angles, table, bias, film]: the topn_create inputs the module's forward is
    documented to pass (docs/operators.md, Creation modules)."""
    table = module.points @ module.W1.weight.T
    return [module.angle_mlp(z), module.angles, table, module.W2(z), module.film]


def test_topn_creation_is_topn_create_on_its_parameters():
    """The module's x is topn_create's on its parameters (the same backend, so the same
    selection), and that is the reference's at that selection (tie-aware, docs/operators.md
    "Ranking")."""
    torch.manual_seed(0)
    module = TopNCreation(latent_dim=6, set_dim=5, n_ref=9, score_norm="all")
    z = torch.randn(4, 6)
    x, mask = module(z, N, n_max=8)
    _check_padding(x, mask, N, 8)
    inputs = _topn_create_inputs(module, z)
    want = assert_topn_matches_reference(
        module.backend, inputs, N, rtol=1e-5, grad_rtol=1e-4, n_max=8, score_norm="all"
    )
    assert_close_scaled(x, want.x, 1e-5)
    x.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_topn_creation_backends_agree_and_extrapolate_to_n_ref():
    """Tie-aware (docs/operators.md, "Ranking"): each module's x is the reference's at the
    selection its backend made, and the two selections are rankings the contract allows."""
    torch.manual_seed(1)
    native = TopNCreation(latent_dim=6, set_dim=5, n_ref=12)
    reference = TopNCreation(latent_dim=6, set_dim=5, n_ref=12, backend="reference")
    reference.load_state_dict(native.state_dict())
    z = torch.randn(4, 6)
    inputs = _topn_create_inputs(native, z)
    for n in (N, 12):  # 12: a set as large as the whole reference set
        index = assert_topn_matches_reference("native", inputs, n, rtol=1e-5, grad_rtol=1e-4).index
        at = topn_create_at(*inputs[:4], index, inputs[4])
        assert_close_scaled(native(z, n)[0], at[0], 1e-5)
        index = tk.topn_create(*inputs[:4], n, inputs[4], backend="reference").index
        at = topn_create_at(*inputs[:4], index, inputs[4])
        assert_close_scaled(reference(z, n)[0], at[0], 1e-5)
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


@pytest.mark.parametrize(
    "module",
    [
        TopNCreation(4, 3, 6),
        FirstNCreation(4, 3, 6),
        IIDCreation(4, 3),
        MLPCreation(4, 3, 6, hidden=8),
    ],
    ids=["topn", "firstn", "iid", "mlp"],
)
def test_creation_modules_check_z_and_n_max_first(module):
    """z of another width or dtype than the module's, or of another rank, and an n_max whose
    output could not be allocated, are errors naming the argument (torch's matmul or allocator
    errors before, and an error naming topn_create's query)."""
    z = torch.randn(2, 4)
    module(z, 2)
    with pytest.raises(ValueError, match="z must have latent_dim=4"):
        module(torch.randn(2, 7), 2)
    with pytest.raises(TypeError, match="z must have the module's dtype"):
        module(z.double(), 2)
    with pytest.raises(ValueError, match="z must be 2-D"):
        module(torch.randn(2, 4, 1), 2)
    with pytest.raises(TypeError, match="z must be"):
        module(z.long(), 2)
    with pytest.raises(ValueError, match="n_max"):
        module(z, 2, n_max=2**62)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts z: no dtype error
        module(z.bfloat16(), 2)


def test_topn_creation_under_cpu_autocast():
    """Under autocast the query, table and bias come out of linear layers in bfloat16 while
    angles and film stay float32: the module promotes them to one dtype (topn_create refused
    the mix before). The result is the float32 one up to bfloat16 rounding of those layers,
    and the gradients reach every parameter."""
    torch.manual_seed(7)
    module = TopNCreation(latent_dim=6, set_dim=4, n_ref=12)
    z = torch.randn(5, 6)
    n = torch.tensor([1, 3, 12, 7, 5])
    x32, mask32 = module(z, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, mask = module(z, n)
    assert x.dtype == torch.float32 and torch.equal(mask, mask32)
    torch.testing.assert_close(x, x32, rtol=0.05, atol=0.05)
    x.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
