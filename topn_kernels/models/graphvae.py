"""The Set2Graph VAE of the paper's QM9 experiment (docs/graph_vae.md; paper appendix D.3, the
authors' ``molecule_generation`` code).

Graphs are padded dense batches: atoms (B, n) int64 in [0, 4) with -1 past each molecule's
``lengths`` (B,) (n <= 9 heavy atoms), bonds (B, n, n) int64 symmetric in {0, 1, 2, 3} (0: no
bond; 1, 2, 3: single, double, triple).

Encoder: one-hot atoms -> 2-layer MLP -> 2 x dense NNConv (edge-conditioned messages, mean over
the neighbours, residual ReLU) -> pooled features (graph size, bond-type counts, atom-type sum,
mean and max, and the mean and max over atoms of every NNConv output) -> 2-layer MLP ->
(mu, log_var).

Decoder: creation module (Top-n with 12 reference points, First-n, i.i.d. or MLP) -> an MLP that
merges each point with the latent -> 3 x [transformer layer with a key padding mask, ReLU,
residual] -> an MLP to per-atom features -> the Set2Graph edge head
(:class:`topn_kernels.nn.Set2GraphHead`, 4 logits per ordered pair: single, double, triple,
no bond) and the atom-type MLP (features and expected bond-type degrees -> 4 logits).

The loss (:func:`graph_vae_loss`) sorts the atoms of the target and of the prediction by the
matching score (:func:`matching_score`) and compares them position by position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._ragged import lengths_mask
from ..nn import Set2GraphHead, make_creation, mlp
from ..ops._checks import integer, integer_dtype
from ..ops._dispatch import requested
from . import short_rows
from ._hooks import has_hooks

__all__ = [
    "GRAPH_CREATIONS",
    "GRAPH_LOSS_TERMS",
    "PRED_ORDERS",
    "GraphDecoding",
    "GraphLossConfig",
    "GraphVAE",
    "GraphVAEConfig",
    "GraphVAEOutput",
    "graph_vae_loss",
    "match_graphs",
    "matching_score",
]

GRAPH_CREATIONS = ("topn", "firstn", "iid", "mlp")
GRAPH_LOSS_TERMS = (
    "atoms",
    "edges",
    "edge_types",
    "formula",
    "num_edges",
    "num_edge_types",
    "valency",
    "kl",
    "total",
)


@dataclass(frozen=True)
class GraphVAEConfig:
    """Hyper-parameters; the defaults are the authors' ``config_graph.yaml`` (docs/graph_vae.md
    lists where this model differs). ``n_ref`` is the number of Top-n reference points (the
    paper's 12); ``angle_dim`` is the authors' ``cosine_channels``; ``backend`` is passed to
    ``topn_create`` and ``set2graph_logits``, and on CPU any backend but ``"reference"``
    (given here, or ``"auto"`` with ``TOPN_KERNELS_BACKEND=reference``) runs the decoder's
    transformer layers and softmaxes with :mod:`.short_rows` (faster at these shapes; its
    dropout draws other random numbers than ``nn.Dropout``), except a layer with a hook on it or
    its submodules (or a global module hook), which runs as the module."""

    creation: str = "topn"
    num_atom_types: int = 4
    num_edge_types: int = 3
    max_atoms: int = 9
    latent_dim: int = 256
    set_channels: int = 16
    angle_dim: int = 4
    angle_hidden: int = 32
    n_ref: int = 12
    score_norm: str = "all"
    creation_mlp_hidden: int = 512
    encoder_hidden: int = 32
    encoder_layers: int = 2
    encoder_final_hidden: int = 256
    decoder_hidden: int = 64
    decoder_initial_hidden: int = 128
    transformer_layers: int = 3
    heads: int = 4
    feedforward: int = 128
    dropout: float = 0.1
    spatial_dim: int = 64
    last_hidden: int = 128
    edge_hidden: int = 64
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.creation not in GRAPH_CREATIONS:
            raise ValueError(
                f"creation must be one of {list(GRAPH_CREATIONS)}, got {self.creation!r}"
            )
        # the size distribution is over 1..max_atoms: with none, its probabilities are NaN
        integer(self.max_atoms, "max_atoms", minimum=1)
        if not self.heads >= 1 or self.decoder_hidden % self.heads:
            raise ValueError(
                f"decoder_hidden={self.decoder_hidden} must be divisible by heads={self.heads}"
            )
        if self.creation == "topn" and self.n_ref < self.max_atoms:
            raise ValueError(f"n_ref={self.n_ref} must be >= max_atoms={self.max_atoms}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def as_dict(self) -> dict:
        return asdict(self)


class GraphDecoding(NamedTuple):
    """Decoder output: atom_logits (B, n, A), edge_logits (B, n, n, E + 1) (the last class is
    "no bond"; 0 on pairs with a padding atom), mask (B, n) bool. ``short_rows``: take the
    log-probabilities with :mod:`.short_rows` (the same values, faster on CPU) instead of
    PyTorch's kernels."""

    atom_logits: Tensor
    edge_logits: Tensor
    mask: Tensor
    short_rows: bool = False

    def log_atom_probs(self) -> Tensor:
        """(B, n, A) log-probabilities of the atom types."""
        return self._log_softmax(self.atom_logits)

    def edge_log_probs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(bond), log p(no bond)) each (B, n, n), and the bond-type log-probabilities
        given a bond (B, n, n, E)."""
        logp = self._log_softmax(self.edge_logits)
        logsumexp = short_rows.logsumexp if self.short_rows else torch.logsumexp
        return (
            logsumexp(logp[..., :-1], dim=-1),
            logp[..., -1],
            self._log_softmax(self.edge_logits[..., :-1]),
        )

    def _log_softmax(self, x: Tensor) -> Tensor:
        return _log_softmax(x, self.short_rows)


def _log_softmax(x: Tensor, short: bool) -> Tensor:
    """Log-softmax over the last dimension, with :mod:`.short_rows` when ``short``."""
    return short_rows.log_softmax(x) if short else F.log_softmax(x, dim=-1)


class GraphVAEOutput(NamedTuple):
    """``GraphVAE.forward``: the decoding and the latent (mu, log_var), each (B, latent_dim)."""

    decoding: GraphDecoding
    mu: Tensor
    log_var: Tensor


def _check_graphs(atoms, lengths, bonds, num_atom_types: int, num_edge_types: int, max_atoms):
    """Validates a padded graph batch; returns (atoms clamped to >= 0, lengths int64, bonds,
    mask (B, n))."""
    if not isinstance(atoms, Tensor) or atoms.dim() != 2 or not integer_dtype(atoms.dtype):
        raise TypeError("atoms must be an integer tensor (B, n)")
    b, n = atoms.shape
    if not isinstance(lengths, Tensor) or not integer_dtype(lengths.dtype):
        raise TypeError("lengths must be an integer tensor (B,)")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if not isinstance(bonds, Tensor) or not integer_dtype(bonds.dtype):
        raise TypeError("bonds must be an integer tensor (B, n, n)")
    if tuple(bonds.shape) != (b, n, n):
        raise ValueError(f"bonds must have shape ({b}, {n}, {n}), got {tuple(bonds.shape)}")
    if b == 0:
        raise ValueError("atoms must hold at least one graph")
    lengths = lengths.to(atoms.device, torch.int64)
    if int(lengths.min()) < 1 or int(lengths.max()) > min(n, max_atoms):
        raise ValueError(
            f"lengths must be in [1, min(n={n}, max_atoms={max_atoms})], got "
            f"[{int(lengths.min())}, {int(lengths.max())}]"
        )
    mask = lengths_mask(lengths, n)
    real = atoms[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_atom_types):
        raise ValueError(f"atoms must be in [0, {num_atom_types}) on real atoms")
    if int(bonds.min()) < 0 or int(bonds.max()) > num_edge_types:
        raise ValueError(f"bonds must be in [0, {num_edge_types}]")
    pairs = mask[:, :, None] & mask[:, None, :]
    if bool(((bonds != bonds.transpose(1, 2)) & pairs).any()):
        raise ValueError("bonds must be symmetric over each molecule's atoms")
    if bool((bonds.diagonal(dim1=1, dim2=2)[mask] != 0).any()):
        raise ValueError("bonds must be 0 on the diagonal (no atom bonds to itself)")
    return atoms.clamp(min=0).masked_fill(~mask, 0), lengths, bonds, mask


class DenseNNConv(nn.Module):
    """Edge-conditioned convolution (NNConv, Gilmer et al. 2017) on a dense padded graph, with
    an edge network ``Linear(num_edge_types, c_in * c_out)`` and the mean over neighbours:

    ``out_i = W_root h_i + b + mean_{j: bond(i, j)} h_j Theta(e_ij)``, Theta(e) (c_in, c_out).

    With one-hot bond types, ``Theta(e) = Theta_0 + sum_t e_t Theta_t``, so the messages are
    computed per bond type without forming Theta for every pair. h (B, n, c_in), edges
    (B, n, n, T) one-hot float (0 on non-bonds and padding) -> (B, n, c_out); an atom without
    neighbours gets ``W_root h_i + b``.
    """

    def __init__(self, c_in: int, c_out: int, num_edge_types: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.edge_net = nn.Linear(num_edge_types, c_in * c_out)
        self.root = nn.Linear(c_in, c_out)

    def forward(self, h: Tensor, edges: Tensor) -> Tensor:
        adj = edges.sum(-1)  # (B, n, n)
        degree = adj.sum(-1, keepdim=True).clamp(min=1.0)
        per_type = torch.einsum("bijt,bjc->btic", edges, h)  # sum_j e_ijt h_j
        theta_t = self.edge_net.weight.view(self.c_in, self.c_out, -1)  # (c_in, c_out, T)
        theta_0 = self.edge_net.bias.view(self.c_in, self.c_out)
        msg = torch.einsum("btic,cot->bio", per_type, theta_t) + (adj @ h) @ theta_0
        return self.root(h) + msg / degree


def _pair_mask(mask: Tensor) -> Tensor:
    """(B, n, n) bool: both atoms real and distinct."""
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & ~eye


def _masked_mean_max(x: Tensor, mask: Tensor) -> Tensor:
    """(B, n, C) -> (B, 2C): mean and max over the real atoms."""
    m = mask[..., None].to(x.dtype)
    mean = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    peak = x.masked_fill(~mask[..., None], -torch.inf).amax(1)
    return torch.cat([mean, peak], dim=-1)


class GraphEncoder(nn.Module):
    """Padded graphs -> (mu, log_var), each (B, latent_dim). Takes one-hot atoms (B, n, A)
    and one-hot bonds (B, n, n, T), both zero on padding, and the mask (B, n)."""

    def __init__(self, cfg: GraphVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, a, t = cfg.encoder_hidden, cfg.num_atom_types, cfg.num_edge_types
        self.embed = mlp(a, h, h)
        self.convs = nn.ModuleList(DenseNNConv(h, h, t) for _ in range(cfg.encoder_layers))
        pooled = 1 + t + 3 * a + 2 * h * cfg.encoder_layers
        self.head = mlp(pooled, cfg.encoder_final_hidden, 2 * cfg.latent_dim)

    def forward(self, x: Tensor, edges: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scale = float(self.cfg.max_atoms)
        sizes = mask.sum(1, keepdim=True).to(x.dtype)
        feats = [
            sizes / scale,
            edges.sum((1, 2)) / scale,  # bond-type counts, each bond counted from both ends
            x.sum(1) / scale,
            _masked_mean_max(x, mask),
        ]
        h = self.embed(x).masked_fill(~mask[..., None], 0.0)
        for conv in self.convs:
            new = conv(h, edges)
            feats.append(_masked_mean_max(new, mask))
            h = (torch.relu(new) + h).masked_fill(~mask[..., None], 0.0)
        mu, log_var = self.head(torch.cat(feats, dim=-1)).chunk(2, dim=-1)
        return mu, log_var


def _creation(cfg) -> nn.Module:
    return make_creation(
        cfg.creation,
        cfg.latent_dim,
        cfg.set_channels,
        cfg.max_atoms,
        n_ref=cfg.n_ref,
        angle_dim=cfg.angle_dim,
        angle_hidden=cfg.angle_hidden,
        score_norm=cfg.score_norm,
        mlp_hidden=cfg.creation_mlp_hidden,
        backend=cfg.backend,
    )


class GraphDecoder(nn.Module):
    """Latent (B, latent_dim) and sizes (B,) -> :class:`GraphDecoding` of width ``width``
    (default: the largest size)."""

    def __init__(self, cfg: GraphVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.creation = _creation(cfg)
        self.merge_x = nn.Linear(cfg.set_channels, cfg.decoder_initial_hidden)
        self.merge_z = nn.Linear(cfg.latent_dim, cfg.decoder_initial_hidden)
        self.merge_out = nn.Linear(cfg.decoder_initial_hidden, cfg.decoder_hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.decoder_hidden,
                cfg.heads,
                cfg.feedforward,
                dropout=cfg.dropout,
                batch_first=True,
            )
            for _ in range(cfg.transformer_layers)
        )
        self.to_features = mlp(cfg.decoder_hidden, cfg.last_hidden, cfg.spatial_dim)
        self.edge_head = Set2GraphHead(
            cfg.spatial_dim, cfg.edge_hidden, cfg.num_edge_types + 1, backend=cfg.backend
        )
        self.atom_head = mlp(
            cfg.spatial_dim + cfg.num_edge_types, cfg.last_hidden, cfg.num_atom_types
        )

    def forward(self, z: Tensor, sizes: Tensor, width: int | None = None) -> GraphDecoding:
        x, mask = self.creation(z, sizes, n_max=width)
        fast = z.device.type == "cpu" and requested(self.cfg.backend) != "reference"
        pad = ~mask[..., None]
        h = torch.relu(self.merge_out(torch.relu(self.merge_x(x) + self.merge_z(z)[:, None])))
        h = h.masked_fill(pad, 0.0)
        for block in self.blocks:
            if fast and not has_hooks(block):
                t = short_rows.transformer_layer(block, h, mask)
            else:
                t = block(h, src_key_padding_mask=~mask)
            h = (torch.relu(t) + h).masked_fill(pad, 0.0)
        feats = self.to_features(h).masked_fill(pad, 0.0)
        lengths = mask.sum(1)
        edge_logits = self.edge_head(feats, lengths)
        # expected number of bonds of each type at each atom, over the other real atoms
        logp = _log_softmax(edge_logits, fast)[..., :-1].exp()
        n = mask.shape[1]
        pair = (
            mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=z.device)
        )
        degrees = (logp * pair[..., None]).sum(2) / float(self.cfg.max_atoms)
        atom_logits = self.atom_head(torch.cat([feats, degrees], dim=-1)).masked_fill(pad, 0.0)
        return GraphDecoding(atom_logits, edge_logits, mask, fast)


class GraphVAE(nn.Module):
    """The graph VAE: ``model(atoms, lengths, bonds) -> GraphVAEOutput`` (shapes in the module
    docstring); the decoding has the input's padded width n."""

    def __init__(self, cfg: GraphVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = GraphVAEConfig() if cfg is None else cfg
        self.encoder = GraphEncoder(self.cfg)
        self.decoder = GraphDecoder(self.cfg)
        sizes = torch.ones(self.cfg.max_atoms + 1)
        sizes[0] = 0.0  # until set_size_distribution: uniform over 1..max_atoms
        self.register_buffer("size_probs", sizes / sizes.sum())

    def one_hot(
        self, atoms: Tensor, lengths: Tensor, bonds: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Validated one-hot inputs: atoms (B, n, A) and bonds (B, n, n, T) float (zero on
        padding and non-bonds), and the mask (B, n)."""
        cfg = self.cfg
        atoms, lengths, bonds, mask = _check_graphs(
            atoms, lengths, bonds, cfg.num_atom_types, cfg.num_edge_types, cfg.max_atoms
        )
        dtype = self.size_probs.dtype
        x = F.one_hot(atoms, cfg.num_atom_types).to(dtype) * mask[..., None]
        pair = (mask[:, :, None] & mask[:, None, :])[..., None]
        e = F.one_hot(bonds, cfg.num_edge_types + 1)[..., 1:].to(dtype) * pair
        return x, e, mask

    def encode(self, atoms: Tensor, lengths: Tensor, bonds: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var), each (B, latent_dim)."""
        return self.encoder(*self.one_hot(atoms, lengths, bonds))

    def forward(
        self, atoms: Tensor, lengths: Tensor, bonds: Tensor, noise: Tensor | None = None
    ) -> GraphVAEOutput:
        """Encode, sample z = mu + sigma * eps (``noise`` = eps (B, latent_dim), or drawn from
        the global RNG), decode at the input's sizes and width."""
        x, e, mask = self.one_hot(atoms, lengths, bonds)
        mu, log_var = self.encoder(x, e, mask)
        if noise is None:
            noise = torch.randn_like(mu)
        elif noise.shape != mu.shape:
            raise ValueError(f"noise must have shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
        z = mu + noise.to(mu) * (0.5 * log_var).exp()
        decoding = self.decoder(z, mask.sum(1), atoms.shape[1])
        return GraphVAEOutput(decoding, mu, log_var)

    @torch.no_grad()
    def set_size_distribution(self, lengths: Tensor) -> None:
        """Stores the distribution of the training molecules' sizes ``lengths`` (M,), each in
        [1, max_atoms], for :meth:`sample_sizes`."""
        if (
            not isinstance(lengths, Tensor)
            or lengths.dim() != 1
            or not integer_dtype(lengths.dtype)
        ):
            raise TypeError("lengths must be an integer tensor (M,)")
        lengths = lengths.to(self.size_probs.device, torch.int64)
        if (
            lengths.numel() == 0
            or int(lengths.min()) < 1
            or int(lengths.max()) > self.cfg.max_atoms
        ):
            raise ValueError(f"lengths must be non-empty and in [1, {self.cfg.max_atoms}]")
        counts = torch.bincount(lengths, minlength=self.cfg.max_atoms + 1).to(self.size_probs)
        self.size_probs.copy_(counts / counts.sum())

    def sample_sizes(self, num: int, *, authors_clip: bool = False, generator=None) -> Tensor:
        """(num,) int64 sizes drawn from the stored training distribution. ``authors_clip``
        applies the authors' rounding at generation: sizes <= 1 become 2 and sizes >= the
        largest (9) become that minus one (8); it needs max_atoms >= 3."""
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        if authors_clip and self.cfg.max_atoms < 3:
            # clamp(2, max_atoms - 1) with an empty range gives max_atoms - 1 (0 or 1), not 2
            raise ValueError(
                f"authors_clip needs max_atoms >= 3 (sizes clipped to [2, max_atoms - 1]), "
                f"got max_atoms={self.cfg.max_atoms}"
            )
        sizes = torch.multinomial(self.size_probs.cpu(), num, replacement=True, generator=generator)
        if authors_clip:
            sizes = sizes.clamp(2, self.cfg.max_atoms - 1)
        return sizes.to(self.size_probs.device)

    @torch.no_grad()
    def generate(
        self,
        num: int,
        sizes: Tensor | None = None,
        *,
        z: Tensor | None = None,
        authors_clip: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New molecules as the authors' ``generate``: z ~ N(0, I), sizes from the training
        distribution (or ``sizes`` (num,)), decode, then draw each atom type from its softmax,
        each bond of the lower triangle (i > j) from its bond probability, and the type of each
        drawn bond from its bond-type softmax. Uses the global RNG.

        ``z`` (num, latent_dim) float: decode these latent codes instead of prior samples
        (e.g. encoder means, to compare the decoder on the data's latents with the prior).

        Returns atoms (num, w) int64 (-1 past each size), lengths (num,) int64, bonds
        (num, w, w) int64 symmetric in {0..3}, w the largest size.
        """
        if z is not None:  # checked before anything draws from the RNG
            if not isinstance(z, Tensor) or not z.dtype.is_floating_point:
                raise TypeError(f"z must be a float tensor ({num}, {self.cfg.latent_dim}) or None")
            if tuple(z.shape) != (num, self.cfg.latent_dim):
                raise ValueError(
                    f"z must have shape ({num}, {self.cfg.latent_dim}), got {tuple(z.shape)}"
                )
            if not bool(z.isfinite().all()):
                raise ValueError("z must be finite (its softmaxes are drawn from)")
        if sizes is None:
            sizes = self.sample_sizes(num, authors_clip=authors_clip)
        elif not isinstance(sizes, Tensor) or not integer_dtype(sizes.dtype):
            raise TypeError(f"sizes must be an integer tensor ({num},) or None")
        elif sizes.shape != (num,):
            raise ValueError(f"sizes must have shape ({num},), got {tuple(sizes.shape)}")
        elif int(sizes.min()) < 1 or int(sizes.max()) > self.cfg.max_atoms:
            raise ValueError(f"sizes must be in [1, {self.cfg.max_atoms}]")
        device, dtype = self.size_probs.device, self.size_probs.dtype
        sizes = sizes.to(device, torch.int64)
        if z is None:
            z = torch.randn(num, self.cfg.latent_dim, device=device, dtype=dtype)
        else:
            z = z.to(device, dtype)
        dec = self.decoder(z, sizes)
        mask = dec.mask
        w = mask.shape[1]
        probs = F.softmax(dec.atom_logits.float(), dim=-1).reshape(-1, self.cfg.num_atom_types)
        atoms = torch.multinomial(probs, 1).view(num, w).masked_fill(~mask, -1)
        log_bond, _, log_types = dec.edge_log_probs()
        lower = torch.tril(torch.ones(w, w, dtype=torch.bool, device=device), diagonal=-1)
        pair = mask[:, :, None] & mask[:, None, :] & lower
        drawn = (torch.bernoulli(log_bond.float().exp().clamp(0, 1)) > 0) & pair
        bonds = torch.zeros(num, w, w, dtype=torch.int64, device=device)
        if drawn.any():
            type_probs = log_types[drawn].float().exp()
            bonds[drawn] = torch.multinomial(type_probs, 1).squeeze(1) + 1
        bonds = bonds + bonds.transpose(1, 2)
        return atoms, sizes, bonds


# ---------------------------------------------------------------------------------------------
# Matching and loss
# ---------------------------------------------------------------------------------------------


def matching_score(
    atom_type: Tensor, adjacency: Tensor, edge_type: Tensor, mask: Tensor, neighbor: str = "exp"
) -> Tensor:
    """The matching score of every atom (B, n):

    ``1e5 * a_i + 1e4 * sum_j A_ij + sum_j A_ij * g(t_ij) * a_j``,

    with a_i the atom type counted from 1 (1..4), A the adjacency, t_ij the bond type (1..3) and
    g(t) = 10**t (``neighbor="exp"``, the authors' code) or g(t) = t (``"linear"``, the paper's
    formula). For predictions pass expectations: a_i = sum_k p_ik (k + 1), A_ij = p(bond),
    t_ij = sum_t p(t | bond) t. atom_type (B, n), adjacency and edge_type (B, n, n); padding
    atoms (mask (B, n) False) get +inf and sort last; the diagonal of ``adjacency`` is ignored.
    """
    if neighbor not in ("exp", "linear"):
        raise ValueError(f"neighbor must be 'exp' or 'linear', got {neighbor!r}")
    adj = adjacency * _pair_mask(mask)
    g = torch.pow(10.0, edge_type) if neighbor == "exp" else edge_type
    neigh = (adj * g * atom_type[:, None, :]).sum(-1)
    score = 1e5 * atom_type + 1e4 * adj.sum(-1) + neigh
    return score.masked_fill(~mask, torch.inf)


def _permute_nodes(x: Tensor, order: Tensor, pairwise: bool) -> Tensor:
    """Reorders the atom axis (1, and 2 when ``pairwise``) of x by ``order`` (B, n)."""
    b, n = order.shape
    idx = order.view(b, n, *([1] * (x.dim() - 2))).expand(b, n, *x.shape[2:])
    x = torch.gather(x, 1, idx)
    if pairwise:
        idx2 = order.view(b, 1, n, *([1] * (x.dim() - 3))).expand(b, n, n, *x.shape[3:])
        x = torch.gather(x, 2, idx2)
    return x


PRED_ORDERS = ("score", "type", "slot")


def match_graphs(
    decoding: GraphDecoding,
    atoms: Tensor,
    bonds: Tensor,
    mask: Tensor,
    neighbor: str = "exp",
    pred_order: str = "score",
) -> tuple[GraphDecoding, Tensor, Tensor]:
    """Sorts the target's atoms by their matching score (ascending, stable; padding last) and
    orders the prediction's atoms by ``pred_order``, then returns both reordered: (decoding,
    atoms (B, n), bonds (B, n, n)). The order is not differentiated; the reordered values are.

    ``pred_order``: ``"score"`` sorts the prediction by its expected matching score (the
    authors' code); ``"type"`` by its most likely atom type only, keeping the decoder's slot
    order among atoms of one type; ``"slot"`` keeps the decoder's order. The last two give
    every slot a target that does not move between steps (docs/graph_vae.md, Matching).
    """
    if pred_order not in PRED_ORDERS:
        raise ValueError(f"pred_order must be one of {list(PRED_ORDERS)}, got {pred_order!r}")
    with torch.no_grad():
        t_atoms = atoms.clamp(min=0).to(torch.float64) + 1.0
        t_adj = (bonds > 0).to(torch.float64)
        t_score = matching_score(t_atoms, t_adj, bonds.to(torch.float64), mask, neighbor)
        t_order = torch.sort(t_score, dim=1, stable=True).indices
        p_order = _prediction_order(decoding, mask, neighbor, pred_order)
    targets = _permute_nodes(atoms, t_order, False), _permute_nodes(bonds, t_order, True)
    if p_order is None:
        return decoding, *targets
    matched = decoding._replace(
        atom_logits=_permute_nodes(decoding.atom_logits, p_order, False),
        edge_logits=_permute_nodes(decoding.edge_logits, p_order, True),
    )
    return matched, *targets


def _prediction_order(
    decoding: GraphDecoding, mask: Tensor, neighbor: str, pred_order: str
) -> Tensor | None:
    """The order (B, n) of the predicted atoms for :func:`match_graphs`; None: as they are."""
    if pred_order == "slot":
        return None
    if pred_order == "type":
        p_score = decoding.atom_logits.argmax(-1).to(torch.float64)
        return torch.sort(p_score.masked_fill(~mask, torch.inf), dim=1, stable=True).indices
    p_atom = F.softmax(decoding.atom_logits.double(), -1)
    k = torch.arange(1, p_atom.shape[-1] + 1, dtype=torch.float64, device=mask.device)
    log_bond, _, log_types = decoding.edge_log_probs()
    t = torch.arange(1, log_types.shape[-1] + 1, dtype=torch.float64, device=mask.device)
    p_score = matching_score(
        p_atom @ k, log_bond.double().exp(), log_types.double().exp() @ t, mask, neighbor
    )
    return torch.sort(p_score, dim=1, stable=True).indices


@dataclass(frozen=True)
class GraphLossConfig:
    """Weights of the loss terms, the authors' ``lambdas`` (docs/graph_vae.md, Loss), the
    matching's neighbour term (see :func:`matching_score`) and how the prediction's atoms are
    ordered (``pred_order``, see :func:`match_graphs`)."""

    atoms: float = 10.0
    edges: float = 10000.0
    edge_types: float = 0.5
    formula: float = 1.0
    num_edges: float = 1.0
    num_edge_types: float = 0.002
    valency: float = 1.0
    kl: float = 0.001
    neighbor: str = "exp"
    matching: bool = True
    pred_order: str = "score"

    def __post_init__(self) -> None:
        if self.pred_order not in PRED_ORDERS:
            raise ValueError(
                f"pred_order must be one of {list(PRED_ORDERS)}, got {self.pred_order!r}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


def graph_vae_loss(
    output: GraphVAEOutput,
    atoms: Tensor,
    lengths: Tensor,
    bonds: Tensor,
    cfg: GraphLossConfig | None = None,
) -> dict[str, Tensor]:
    """The loss of a batch, as the authors' ``GraphVAELoss`` (summed over the batch; the terms
    of a molecule of n atoms normalised by n or n (n - 1) as theirs): weighted terms ``atoms``,
    ``edges``, ``edge_types``, ``formula``, ``num_edges``, ``num_edge_types``, ``valency``,
    ``kl`` and their sum ``total`` (scalars). Inputs as :meth:`GraphVAE.forward` takes them, at
    the decoding's width. Molecules of one atom contribute no pair term.
    """
    cfg = GraphLossConfig() if cfg is None else cfg
    dec = output.decoding
    num_atom_types = dec.atom_logits.shape[-1]
    num_edge_types = dec.edge_logits.shape[-1] - 1
    atoms, lengths, bonds, mask = _check_graphs(
        atoms, lengths, bonds, num_atom_types, num_edge_types, dec.atom_logits.shape[1]
    )
    if atoms.shape != dec.mask.shape or not torch.equal(mask, dec.mask):
        raise ValueError("atoms and lengths must match the decoding's sizes and width")
    if cfg.matching:
        dec, atoms, bonds = match_graphs(dec, atoms, bonds, mask, cfg.neighbor, cfg.pred_order)
    b = mask.shape[0]
    dtype = dec.atom_logits.dtype
    size = lengths.to(dtype)
    pairs = (size * (size - 1)).clamp(min=1.0)
    pair = _pair_mask(mask)
    pairf = pair.to(dtype)
    adj = (bonds > 0) & pair
    adjf = adj.to(dtype)

    log_atoms = dec.log_atom_probs()
    log_bond, log_none, log_types = dec.edge_log_probs()
    p_bond = log_bond.exp()
    p_types = log_types.exp()

    nll_atoms = -(log_atoms.gather(-1, atoms[..., None]).squeeze(-1) * mask).sum(1)
    terms = {"atoms": (nll_atoms / size).sum()}
    bce = -(torch.where(adj, log_bond, log_none) * pairf).sum((1, 2))
    terms["edges"] = (bce / pairs / pairs).sum() / b  # the authors' mean over the batch's pairs
    type_index = (bonds - 1).clamp(min=0)[..., None]
    nll_types = -(log_types.gather(-1, type_index).squeeze(-1) * adjf).sum((1, 2))
    terms["edge_types"] = (nll_types / size).sum()
    real_formula = (F.one_hot(atoms, num_atom_types).to(dtype) * mask[..., None]).sum(1)
    pred_formula = (log_atoms.exp() * mask[..., None]).sum(1)
    terms["formula"] = (((pred_formula - real_formula) ** 2).sum(1) / size).sum()
    real_edges = adjf.sum((1, 2))
    pred_edges = (p_bond * pairf).sum((1, 2))
    terms["num_edges"] = ((pred_edges - real_edges) ** 2 / pairs).sum()
    one_hot_types = F.one_hot(bonds, num_edge_types + 1)[..., 1:].to(dtype) * adjf[..., None]
    real_type_counts = one_hot_types.sum((1, 2))
    pred_type_counts = (p_types * (p_bond * pairf)[..., None]).sum((1, 2))
    terms["num_edge_types"] = (((pred_type_counts - real_type_counts) ** 2).sum(1) / size).sum()
    order = torch.arange(1, num_edge_types + 1, dtype=dtype, device=mask.device)
    real_valency = (one_hot_types @ order).sum(2)
    pred_valency = ((p_types @ order) * adjf).sum(2)
    terms["valency"] = (((pred_valency - real_valency) ** 2).sum(1) / pairs).sum()
    mu, log_var = output.mu, output.log_var
    terms["kl"] = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum()
    weighted = {k: getattr(cfg, k) * v for k, v in terms.items()}
    weighted["total"] = sum(weighted.values())
    return weighted
