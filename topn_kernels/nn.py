"""Set creation layers (docs/operators.md, Creation modules): turn a latent vector into a
padded set of points.

Every module is called as ``module(z, n, n_max=None)`` with ``z`` (B, latent_dim) and ``n`` an
int or an integer tensor (B,) of set sizes, and returns ``(x, mask)``: x (B, n_max, set_dim)
with zero rows past each set's size, mask (B, n_max) bool. Only :class:`TopNCreation` can
create sets larger than any seen in training (up to ``n_ref``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ragged import lengths_mask
from .ops import _checks
from .ops.set2graph import set2graph_logits
from .ops.topn_create import topn_create

__all__ = [
    "FirstNCreation",
    "IIDCreation",
    "MLPCreation",
    "Set2GraphHead",
    "TopNCreation",
    "make_creation",
]


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """A 2-layer MLP: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _latent(z: object, first: nn.Linear) -> Tensor:
    """z checked against the module's first layer on it: a float tensor (B, latent_dim) of the
    layer's dtype (outside autocast)."""
    z = _checks.float_tensor(z, "z", "(B, latent_dim)")
    if z.shape[1] != first.in_features:
        raise ValueError(
            f"z must have latent_dim={first.in_features} columns, got shape {tuple(z.shape)}"
        )
    if z.dtype != first.weight.dtype and not torch.is_autocast_enabled(z.device.type):
        raise TypeError(f"z must have the module's dtype {first.weight.dtype}, got {z.dtype}")
    return z


def _sizes_and_mask(
    z: Tensor, n: int | Tensor, n_max: int | None, capacity: int | None, set_dim: int
) -> tuple[Tensor, int]:
    """The mask (B, n_max) of validated sizes n <= capacity (None: any), and n_max."""
    sizes, n_max = _checks.set_sizes(n, n_max, z.shape[0], capacity, "capacity", z.device)
    _checks.output_length(n_max, "n_max", z.shape[0], set_dim, z.dtype)
    return lengths_mask(sizes, n_max), n_max


class TopNCreation(nn.Module):
    """Top-n creation (paper section 4): a learned query picks the n most relevant points of
    a trainable reference set of ``n_ref`` points, modulated by their scores (FiLM).

    Parameters: ``angle_mlp`` (z -> query, paper eq. 5), ``angles`` (n_ref, angle_dim),
    ``points`` R (n_ref, ref_dim), ``W1`` (ref_dim -> set_dim, no bias), ``W2`` (latent_dim ->
    set_dim, with bias), ``film`` (4, set_dim) rows gamma_w, gamma_b, beta_w, beta_b, initialised
    as the authors' two ``nn.Linear(1, set_dim)`` layers.
    """

    def __init__(
        self,
        latent_dim: int,
        set_dim: int,
        n_ref: int,
        angle_dim: int = 3,
        ref_dim: int | None = None,
        hidden: int = 32,
        score_norm: str = "selected",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        ref_dim = set_dim if ref_dim is None else ref_dim
        self.n_ref, self.score_norm, self.backend = n_ref, score_norm, backend
        self.angle_mlp = mlp(latent_dim, hidden, angle_dim)
        self.angles = nn.Parameter(F.normalize(torch.randn(n_ref, angle_dim), dim=-1))
        self.points = nn.Parameter(torch.randn(n_ref, ref_dim))
        self.W1 = nn.Linear(ref_dim, set_dim, bias=False)
        self.W2 = nn.Linear(latent_dim, set_dim)
        self.film = nn.Parameter(torch.empty(4, set_dim).uniform_(-1.0, 1.0))

    def forward(
        self, z: Tensor, n: int | Tensor, n_max: int | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _latent(z, self.W2)
        table = self.W1(self.points)  # (n_ref, set_dim) = R W1, shared by every set
        query, angles, table, bias, film = _common_dtype(
            self.angle_mlp(z), self.angles, table, self.W2(z), self.film
        )
        out = topn_create(
            query,
            angles,
            table,
            bias,
            n,
            film,
            n_max=n_max,
            score_norm=self.score_norm,
            backend=self.backend,
        )
        return out.x, out.mask


def _common_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their widest dtype: under autocast the linear layers' outputs are
    bfloat16/float16 while the parameters used directly stay float32, and ``topn_create``
    takes one dtype (it computes in float32 whatever its inputs)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


class FirstNCreation(nn.Module):
    """First-n creation: the first n rows of a trainable set of ``n_max`` points, plus z W2."""

    def __init__(self, latent_dim: int, set_dim: int, n_max: int) -> None:
        super().__init__()
        self.points = nn.Parameter(torch.randn(n_max, set_dim))
        self.W2 = nn.Linear(latent_dim, set_dim)

    def forward(
        self, z: Tensor, n: int | Tensor, n_max: int | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _latent(z, self.W2)
        mask, n_max = _sizes_and_mask(z, n, n_max, self.points.shape[0], self.W2.out_features)
        points = F.pad(self.points[:n_max], (0, 0, 0, n_max - min(n_max, self.points.shape[0])))
        x = points[None] + self.W2(z)[:, None, :]
        return x.masked_fill(~mask[..., None], 0.0), mask


class IIDCreation(nn.Module):
    """i.i.d. creation: n standard normal points per set, plus z W2. Any size can be asked."""

    def __init__(self, latent_dim: int, set_dim: int) -> None:
        super().__init__()
        self.set_dim = set_dim
        self.W2 = nn.Linear(latent_dim, set_dim)

    def forward(
        self, z: Tensor, n: int | Tensor, n_max: int | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _latent(z, self.W2)
        mask, n_max = _sizes_and_mask(z, n, n_max, None, self.W2.out_features)
        noise = torch.randn(z.shape[0], n_max, self.set_dim, device=z.device, dtype=z.dtype)
        x = noise + self.W2(z)[:, None, :]
        return x.masked_fill(~mask[..., None], 0.0), mask


class MLPCreation(nn.Module):
    """MLP creation: an MLP maps z to ``n_max * set_dim`` values; a set keeps its first n rows."""

    def __init__(self, latent_dim: int, set_dim: int, n_max: int, hidden: int = 128) -> None:
        super().__init__()
        self.n_max, self.set_dim = n_max, set_dim
        self.mlp = mlp(latent_dim, hidden, n_max * set_dim)

    def forward(
        self, z: Tensor, n: int | Tensor, n_max: int | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _latent(z, self.mlp[0])
        mask, n_max = _sizes_and_mask(z, n, n_max, self.n_max, self.set_dim)
        x = self.mlp(z).view(z.shape[0], self.n_max, self.set_dim)
        x = F.pad(x[:, :n_max], (0, 0, 0, n_max - min(n_max, self.n_max)))
        return x.masked_fill(~mask[..., None], 0.0), mask


class Set2GraphHead(nn.Module):
    """The edge head of Set2Graph: the MLP ``Linear(2 set_dim, hidden), ReLU, Linear(hidden,
    num_classes)`` on the concatenation of every ordered pair of points of a set
    (:func:`topn_kernels.set2graph_logits`, docs/operators.md, set2graph_logits).

    Parameters, initialised as ``nn.Linear`` initialises its own: ``weight1`` (hidden,
    2 set_dim), ``bias1`` (hidden,), ``weight2`` (num_classes, hidden), ``bias2``
    (num_classes,). ``forward(x, lengths=None)``: x (B, n, set_dim), lengths an integer tensor
    (B,) of set sizes in [0, n] or None; returns the logits (B, n, n, num_classes), 0 on
    pairs with a padding point.
    """

    def __init__(self, set_dim: int, hidden: int, num_classes: int, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        first, second = nn.Linear(2 * set_dim, hidden), nn.Linear(hidden, num_classes)
        self.weight1, self.bias1 = first.weight, first.bias
        self.weight2, self.bias2 = second.weight, second.bias

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return set2graph_logits(
            x, self.weight1, self.bias1, self.weight2, self.bias2, lengths, backend=self.backend
        )


def make_creation(
    kind: str,
    latent_dim: int,
    set_dim: int,
    n_max: int,
    *,
    n_ref: int,
    angle_dim: int = 3,
    angle_hidden: int = 32,
    score_norm: str = "selected",
    mlp_hidden: int = 512,
    backend: str = "auto",
) -> nn.Module:
    """The creation layer ``kind`` ("topn", "firstn", "iid" or "mlp") making sets of
    ``set_dim`` channels from a latent of ``latent_dim``: Top-n with ``n_ref`` reference points,
    First-n and MLP with ``n_max`` points, i.i.d. with any number."""
    if kind == "topn":
        return TopNCreation(
            latent_dim,
            set_dim,
            n_ref,
            angle_dim=angle_dim,
            hidden=angle_hidden,
            score_norm=score_norm,
            backend=backend,
        )
    if kind == "firstn":
        return FirstNCreation(latent_dim, set_dim, n_max)
    if kind == "iid":
        return IIDCreation(latent_dim, set_dim)
    if kind == "mlp":
        return MLPCreation(latent_dim, set_dim, n_max, hidden=mlp_hidden)
    raise ValueError(f"kind must be 'topn', 'firstn', 'iid' or 'mlp', got {kind!r}")
