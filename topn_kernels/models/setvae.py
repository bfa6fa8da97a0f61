"""The reference set VAE of the paper's synthetic experiment (docs/set_vae.md; paper appendix D.2).

Encoder: per-point features -> 2-layer MLP -> masked batch norm -> 3 x [transformer layer with a
key padding mask, ReLU, masked batch norm, residual] -> PNA pooling (sum, mean, max, std over
the real points) -> 2-layer MLP -> (mu, log_var) of the latent.

Decoder: creation module (Top-n, First-n, i.i.d. or MLP) -> linear layer -> ReLU -> masked batch
norm -> 3 x the same transformer blocks -> 2-layer MLP -> points.

The per-point features of the encoder are the coordinates and, as in the authors' released code,
the one-hot valency of each point (its number of neighbours, capped at ``max_valency``),
computed here from the coordinates. Set sizes are given when reconstructing, and at generation
either given or drawn from the training distribution (the paper's choice), which
:meth:`SetVAE.set_size_distribution` stores in the model (and so in its checkpoints).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._ragged import lengths_mask
from ..metrics import valency_counts
from ..nn import make_creation, mlp
from ..ops._checks import integer, integer_dtype
from .backends import OpBackends
from .layers import MaskedBatchNorm, PNAPooling, SetBlock

__all__ = ["CREATIONS", "SetVAE", "SetVAEConfig", "VAEOutput"]

CREATIONS = ("topn", "firstn", "iid", "mlp")


@dataclass(frozen=True)
class SetVAEConfig:
    """Hyper-parameters; the defaults are the paper's and its released config's.

    ``n_max`` is the largest set the decoder makes (First-n and MLP keep that many points; Top-n
    has ``n_ref`` reference points; i.i.d. is capped at ``n_max`` too, for a fair comparison).
    ``score_norm`` of Top-n defaults to "all", the released code's normalisation (the paper's
    eq. 8 is "selected"). ``topn_backend`` is the ``backend=`` of ``topn_create``.
    """

    creation: str = "topn"
    point_dim: int = 3
    latent_dim: int = 30
    set_channels: int = 16
    angle_dim: int = 3
    hidden: int = 64
    heads: int = 4
    feedforward: int = 256
    layers: int = 3
    mlp_hidden: int = 128
    n_max: int = 35
    n_ref: int = 35
    score_norm: str = "all"
    angle_hidden: int = 32
    creation_mlp_hidden: int = 512
    encoder_valency: bool = True
    neighbor_dist: float = 2.0
    max_valency: int = 4
    topn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.creation not in CREATIONS:
            raise ValueError(f"creation must be one of {list(CREATIONS)}, got {self.creation!r}")
        # sets have 2..n_max points: below 2 the size distribution is empty (NaN probabilities)
        integer(self.n_max, "n_max", minimum=2)
        if not self.heads >= 1 or self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.creation == "topn" and self.n_ref < self.n_max:
            raise ValueError(f"n_ref={self.n_ref} must be >= n_max={self.n_max} for Top-n")

    def as_dict(self) -> dict:
        return asdict(self)


class VAEOutput(NamedTuple):
    """recon (B, N, point_dim) zero on padding, mask (B, N) bool, mu and log_var (B, latent)."""

    recon: Tensor
    mask: Tensor
    mu: Tensor
    log_var: Tensor


def _creation(cfg) -> nn.Module:
    return make_creation(
        cfg.creation,
        cfg.latent_dim,
        cfg.set_channels,
        cfg.n_max,
        n_ref=cfg.n_ref,
        angle_dim=cfg.angle_dim,
        angle_hidden=cfg.angle_hidden,
        score_norm=cfg.score_norm,
        mlp_hidden=cfg.creation_mlp_hidden,
        backend=cfg.topn_backend,
    )


class SetEncoder(nn.Module):
    """Padded sets (B, N, point_dim) and lengths (B,) -> (mu, log_var), each (B, latent_dim)."""

    def __init__(self, cfg: SetVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in = cfg.point_dim + (cfg.max_valency + 1 if cfg.encoder_valency else 0)
        self.embed = mlp(d_in, cfg.mlp_hidden, cfg.hidden)
        self.norm = MaskedBatchNorm(cfg.hidden)
        self.blocks = nn.ModuleList(
            SetBlock(cfg.hidden, cfg.heads, cfg.feedforward) for _ in range(cfg.layers)
        )
        self.pool = PNAPooling()
        self.head = mlp(4 * cfg.hidden, cfg.mlp_hidden, 2 * cfg.latent_dim)

    def forward(self, points: Tensor, mask: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        feats = points
        if self.cfg.encoder_valency:
            counts = valency_counts(points, mask, self.cfg.neighbor_dist)
            counts = counts.clamp(0, self.cfg.max_valency)
            feats = torch.cat([points, F.one_hot(counts, self.cfg.max_valency + 1).to(points)], -1)
        x = self.norm(torch.relu(self.embed(feats)), mask)
        for block in self.blocks:
            x = block(x, mask)
        mu, log_var = self.head(torch.relu(self.pool(x, mask))).chunk(2, dim=-1)
        return mu, log_var


class SetDecoder(nn.Module):
    """Latent (B, latent_dim) and sizes (B,) -> points (B, n_max_out, point_dim), mask."""

    def __init__(self, cfg: SetVAEConfig) -> None:
        super().__init__()
        self.creation = _creation(cfg)
        self.embed = nn.Linear(cfg.set_channels, cfg.hidden)
        self.norm = MaskedBatchNorm(cfg.hidden)
        self.blocks = nn.ModuleList(
            SetBlock(cfg.hidden, cfg.heads, cfg.feedforward) for _ in range(cfg.layers)
        )
        self.head = mlp(cfg.hidden, cfg.hidden, cfg.point_dim)

    def forward(self, z: Tensor, sizes: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
        x, mask = self.creation(z, sizes, n_max=width)
        x = self.norm(torch.relu(self.embed(x)), mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x).masked_fill(~mask[..., None], 0.0), mask


class SetVAE(nn.Module):
    """The set VAE: ``model(points, lengths) -> VAEOutput``.

    points (B, N, point_dim) float, zero or anything past each length; lengths (B,) integer in
    [2, n_max] (one point has no valency and no spread to pool). The reconstruction has the
    input's padded width N.
    """

    def __init__(self, cfg: SetVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = SetVAEConfig() if cfg is None else cfg
        self.encoder = SetEncoder(self.cfg)
        self.decoder = SetDecoder(self.cfg)
        sizes = torch.zeros(self.cfg.n_max + 1)
        sizes[2:] = 1.0  # until set_size_distribution: uniform over the sizes the decoder makes
        self.register_buffer("size_probs", sizes / sizes.sum())

    @classmethod
    def with_backend(cls, name: str, **config) -> SetVAE:
        """A model whose ``topn_create`` runs on the backend of ``OpBackends.from_name(name)``."""
        return cls(SetVAEConfig(topn_backend=OpBackends.from_name(name).topn_create, **config))

    def _inputs(self, points: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(points, Tensor) or points.dim() != 3:
            raise TypeError("points must be a tensor (B, N, point_dim)")
        if points.shape[-1] != self.cfg.point_dim:
            raise ValueError(f"points must have {self.cfg.point_dim} channels, got {points.shape}")
        if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point:
            raise TypeError("lengths must be an integer tensor (B,)")
        if tuple(lengths.shape) != (points.shape[0],):
            raise ValueError(f"lengths must have shape ({points.shape[0]},), got {lengths.shape}")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 2 or hi > min(points.shape[1], self.cfg.n_max):
            raise ValueError(
                f"lengths must be in [2, min(N={points.shape[1]}, n_max={self.cfg.n_max})], "
                f"got [{lo}, {hi}]"
            )
        lengths = lengths.to(points.device, torch.int64)
        mask = lengths_mask(lengths, points.shape[1])
        return points.masked_fill(~mask[..., None], 0.0), mask, lengths

    def encode(self, points: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var), each (B, latent_dim)."""
        points, mask, lengths = self._inputs(points, lengths)
        return self.encoder(points, mask, lengths)

    def forward(self, points: Tensor, lengths: Tensor, noise: Tensor | None = None) -> VAEOutput:
        """Encode, sample z = mu + sigma * eps, decode at the input's sizes.

        ``noise``: eps (B, latent_dim), for reproducible runs (e.g. across dtypes, which draw
        different numbers from one seed); None draws it from the global RNG.
        """
        points, mask, lengths = self._inputs(points, lengths)
        mu, log_var = self.encoder(points, mask, lengths)
        if noise is None:
            noise = torch.randn_like(mu)
        elif noise.shape != mu.shape:
            raise ValueError(f"noise must have shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
        z = mu + noise.to(mu) * (0.5 * log_var).exp()
        recon, _ = self.decoder(z, lengths, points.shape[1])
        return VAEOutput(recon, mask, mu, log_var)

    def reconstruct(self, points: Tensor, lengths: Tensor) -> Tensor:
        """Decodes the latent mean: (B, N, point_dim), zero on padding."""
        points, mask, lengths = self._inputs(points, lengths)
        mu, _ = self.encoder(points, mask, lengths)
        return self.decoder(mu, lengths, points.shape[1])[0]

    @torch.no_grad()
    def set_size_distribution(self, lengths: Tensor) -> None:
        """Stores the distribution of the training set sizes ``lengths`` (S,) (each in [2, n_max])
        for :meth:`sample_sizes`."""
        lengths = _training_sizes(lengths, self.size_probs.device)
        if lengths.numel() == 0 or int(lengths.min()) < 2 or int(lengths.max()) > self.cfg.n_max:
            raise ValueError(f"training sizes must be in [2, n_max={self.cfg.n_max}]")
        counts = torch.bincount(lengths, minlength=self.cfg.n_max + 1).to(self.size_probs)
        self.size_probs.copy_(counts / counts.sum())

    def sample_sizes(self, num: int, *, shift: int = 0, generator=None) -> Tensor:
        """(num,) int64 sizes from the training distribution, plus ``shift``, clamped to
        ``[1, n_max]``."""
        _check_draw(num, shift)
        sizes = torch.multinomial(self.size_probs.cpu(), num, replacement=True, generator=generator)
        return (sizes + shift).clamp(1, self.cfg.n_max).to(self.size_probs.device)

    def generate(self, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """New sets from z ~ N(0, I) (global RNG) with the given sizes (B,) in [1, n_max]:
        points (B, max size, point_dim) zero on padding, and the mask (B, max size)."""
        if not isinstance(sizes, Tensor) or sizes.dim() != 1 or sizes.dtype.is_floating_point:
            raise TypeError("sizes must be an integer tensor (B,)")
        if int(sizes.min()) < 1 or int(sizes.max()) > self.cfg.n_max:
            raise ValueError(f"sizes must be in [1, n_max={self.cfg.n_max}]")
        device, dtype = self.size_probs.device, self.size_probs.dtype
        z = torch.randn(sizes.shape[0], self.cfg.latent_dim, device=device, dtype=dtype)
        return self.decoder(z, sizes.to(device, torch.int64))


def _check_draw(num: object, shift: object) -> None:
    """The arguments of ``sample_sizes``: ints (not bools), num >= 0."""
    integer(num, "num", minimum=0)
    integer(shift, "shift")


def check_output_lengths(out: VAEOutput, points: Tensor, lengths: Tensor) -> Tensor:
    """``lengths`` (B,) on ``points``' device, checked to be the sizes ``out`` was made with
    (its mask): a loss of an output against other sizes would be silently wrong."""
    lengths = lengths.to(points.device)
    if out.mask.shape != points.shape[:2] or not torch.equal(out.mask.sum(1), lengths):
        raise ValueError("lengths must be the sizes the model's output was made with (out.mask)")
    return lengths


def _training_sizes(lengths: object, device: torch.device) -> Tensor:
    """``set_size_distribution``'s sizes: an integer tensor (S,), as int64 on ``device``."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or not integer_dtype(lengths.dtype):
        raise TypeError("lengths must be an integer tensor (S,)")
    return lengths.to(device, torch.int64)
