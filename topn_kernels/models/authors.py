"""The set VAE of the paper's synthetic experiment as the authors' released code builds and
trains it (docs/set_vae.md, "The authors' preset"); :mod:`.setvae` is this library's variant.

Every batch holds sets of one size (the data is sorted by size and cut into batches of at most
``batch_size``), so nothing is padded inside the model. Calls with sets of several sizes
(evaluation, generation) run each size on its own and pad the results.

Encoder: ``x`` (n, 3) and the one-hot valency (n, 4) of each point -> :class:`AuthorsMLP` (the
two inputs added after their first linear maps) -> ReLU -> batch norm -> 3 x [transformer
layer, ReLU, batch norm, residual] -> :class:`PNAPooling` with 3 degree scalers -> ReLU ->
MLP -> (mu, log_var).

Decoder: creation module (no latent input) -> MLP whose first layer is gated by z,
``lin1(x) * sigmoid(lin2(z)) + lin3(z)`` -> ReLU -> batch norm -> the same 3 blocks -> MLP
with a residual on its hidden layer -> points.

Creation modules (``creation``):

- ``topn``: query ``q = MLP(z)``, scores ``angles @ q / (|q| + 1e-5)`` over the ``n_ref``
  reference points (the angles are unit vectors at initialisation only, so a score is not a
  cosine), ``m = n * softmax(scores)`` at the n best points (sorted),
  ``x = R[sigma] * (gamma_w m + gamma_b) + (beta_w m + beta_b)``. Plain PyTorch:
  :func:`topn_kernels.topn_create` computes true cosines, which these scores are not.
- ``firstn``: the first n of ``n_ref`` trainable points.
- ``iid``: n standard normal points divided by sqrt(n), drawn at every call.
- ``mlp``: an MLP from z to ``n_max`` points, of which the first n are kept.

The loss (:func:`authors_loss`) is summed over the sets of a batch: the matched distance
(:func:`topn_kernels.metrics.matched_distance`, exact assignment), ``0.003 * KL``, 200 times the
repulsion summed over ordered pairs (twice :func:`topn_kernels.repulsion_penalty`) and 200 times
:func:`topn_kernels.valency_penalty`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import matched_backend, matched_distance, valency_counts
from ..native import AVAILABLE as _NATIVE_AVAILABLE

if _NATIVE_AVAILABLE:
    from ..native import authors_mlp as native_mlp
    from ..native import authors_topn as native_topn
    from ..native import pna_pooling as native_pool
    from ..native import set_transformer as native_layer
    from ..native import valency as native_valency
else:
    native_layer = native_pool = native_mlp = native_valency = native_topn = None
from ..ops import _checks, _dispatch, repulsion_penalty, valency_penalty
from ..ops._checks import integer_dtype
from ..ops.losses import _few_large_sets, _small
from ._hooks import has_hooks
from .setvae import CREATIONS, VAEOutput, _check_draw, _training_sizes, check_output_lengths

__all__ = [
    "AuthorsConfig",
    "AuthorsLossConfig",
    "AuthorsMLP",
    "AuthorsSetVAE",
    "PNAPooling",
    "authors_loss",
    "iterate_batches",
    "size_grouped_batches",
]


@dataclass(frozen=True)
class AuthorsConfig:
    """Hyper-parameters of the released code's configuration.

    ``n_ref`` is the number of reference points of Top-n and First-n and the number of points
    the MLP creation makes (the released ``max_n``); generated sizes are clamped to
    ``[2, size_cap]`` (the released code's ``[2, max_n - 1]``). ``valency_classes`` is the
    width of the encoder's one-hot valency (valencies 1..4).
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
    encoder_mlp_hidden: int = 128
    encoder_final_hidden: int = 128
    decoder_mlp_hidden: int = 128
    decoder_final_hidden: int = 64
    angle_hidden: int = 32
    creation_mlp_hidden: int = 512
    n_ref: int = 35
    size_cap: int = 34
    pna_average_n: float = 9.0
    valency_classes: int = 4
    neighbor_dist: float = 2.0

    def __post_init__(self) -> None:
        if self.creation not in CREATIONS:
            raise ValueError(f"creation must be one of {list(CREATIONS)}, got {self.creation!r}")
        if not self.heads >= 1 or self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if not 2 <= self.size_cap <= self.n_ref:
            raise ValueError(f"size_cap={self.size_cap} must be in [2, n_ref={self.n_ref}]")
        if not self.pna_average_n > 0:  # its log(n + 1) divides the degree scalers
            raise ValueError(f"pna_average_n must be > 0, got {self.pna_average_n}")

    @property
    def n_max(self) -> int:
        """The largest set the model makes."""
        return self.size_cap

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class AuthorsMLP(nn.Module):
    """The released code's MLP: ``layers`` linear maps of width ``width`` with ReLUs, residual
    connections where the widths allow, and an optional second input ``y``.

    ``forward(x, y=None)``: x (..., dim_in), y (..., cond_dim) broadcastable -> (..., dim_out).

    1. ``h = lin1(x)``, then with y: ``h + lin2(y)`` (``modulation="+"``) or
       ``h * sigmoid(lin2(y)) + lin3(y)`` (``"film"``);
    2. ``h = relu(h) + (x if dim_in == width)``;
    3. each of the ``layers - 2`` hidden maps: ``h = h + hidden(relu(h))``;
    4. ``out = lin_final(relu(h)) + (h if dim_out == width)``.

    ``layers`` of 1 and 2 give the same two maps.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        width: int,
        layers: int,
        cond_dim: int | None = None,
        modulation: str = "+",
    ) -> None:
        super().__init__()
        if modulation not in ("+", "film"):
            raise ValueError(f"modulation must be '+' or 'film', got {modulation!r}")
        self.modulation = modulation if cond_dim is not None else None
        self.lin1 = nn.Linear(dim_in, width)
        if cond_dim is not None:
            self.lin2 = nn.Linear(cond_dim, width)
            if modulation == "film":
                self.lin3 = nn.Linear(cond_dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 2))
        self.lin_final = nn.Linear(width, dim_out)
        self.residual_start, self.residual_end = dim_in == width, dim_out == width

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.lin1(x)
        if self.modulation == "+":
            h = h + self.lin2(y)
        elif self.modulation == "film":
            h = h * torch.sigmoid(self.lin2(y)) + self.lin3(y)
        h = F.relu(h)
        if self.residual_start:
            h = h + x
        for layer in self.hidden:
            h = h + layer(F.relu(h))
        # relu(h) is h where h is still the first ReLU's output (relu is idempotent): the
        # released code's second ReLU and its "+ 0" residuals are skipped, not computed
        if self.residual_start or len(self.hidden):
            out = self.lin_final(F.relu(h))
        else:
            out = self.lin_final(h)
        return out + h if self.residual_end else out


class PNAPooling(nn.Module):
    """Principal neighbourhood aggregation over the points of equal-size sets:
    (B, n, C) -> (B, 12 C).

    Each channel is taken as is and scaled by ``log(n + 1) / log(average_n + 1)`` and by its
    inverse (3 degree scalers); each of the three is reduced by sum, max, mean and standard
    deviation (unbiased, n >= 2) over the n points. The output is ordered (channel, reduction,
    scaler). The std has a 1e-12 floor under the root, so that a constant channel has a finite
    gradient (the released code has none).

    With ``native`` set (:meth:`AuthorsSetVAE.use_native`), the whole pooling is one native op
    on float32/float64 CPU tensors (:func:`topn_kernels.native.pna_pooling.pna_pool`, one
    autograd node; about 0.3 ms forward and backward at 128 sets of 5 points against 0.8 ms),
    and elsewhere the variance is computed in two passes, ``sum((x - mean)^2) / (n - 1)``
    (about 20 times faster on CPU than ``torch.var`` over the middle dimension at these
    shapes): the same values up to rounding.
    """

    def __init__(self, average_n: float = 9.0) -> None:
        super().__init__()
        self.log_average = math.log(average_n + 1.0)
        self.native = False
        self._scales: dict[tuple, Tensor] = {}  # the degree scalers made for each n

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n < 2:
            raise ValueError(f"PNA pooling needs sets of at least 2 points, got {n}")
        scales = self.scales(n, x)
        if self.native and native_pool is not None and native_pool.supports(x):
            return native_pool.pna_pool(x, scales)
        # the reductions of x * scale are the reductions of x, scaled (var by scale^2): one
        # pass over x instead of three over a strided stack
        mean = x.mean(1)
        linear = torch.stack([x.sum(1), x.amax(1), mean], dim=2)[..., None] * scales
        if self.native:
            centred = x - mean[:, None]
            var = (centred * centred).sum(1) / (n - 1)
        else:
            var = x.var(dim=1)
        std = (var[..., None] * scales**2 + 1e-12).sqrt()  # (B, C, 3)
        # (B, C, 4, 3) -> (B, 12 C)
        return torch.cat([linear, std[:, :, None, :]], dim=2).flatten(1)

    def scales(self, n: int, x: Tensor) -> Tensor:
        """The 3 degree scalers (3,) of sets of n points, in x's dtype and device: 1,
        ``log(n + 1) / log(average_n + 1)`` and its inverse. Made once per n, dtype and device
        (seven small tensor ops, about 15 us) and kept, except under inference mode, for fake
        tensors, and while ``torch.compile`` traces the module: log(n + 1) is then taken of a
        tensor, not by math.log of an int, so that a model compiled with dynamic shapes makes one
        graph for every n, not one per n."""
        key = (n, x.dtype, x.device, self.log_average)
        compiling = torch.compiler.is_compiling()
        if not compiling and key in self._scales:
            return self._scales[key]
        log_n = torch.full((), n + 1.0, dtype=torch.float64, device=x.device).log()
        amplify = log_n / self.log_average  # > 0
        scales = torch.stack([torch.ones_like(amplify), amplify, 1.0 / amplify]).to(x.dtype)
        # kept only as a plain tensor made outside inference mode (an inference tensor cannot be
        # saved for a later backward) and outside fake-tensor tracing
        if not compiling and type(scales) is Tensor and not scales.is_inference():
            self._scales[key] = scales
        return scales


class SetBlock(nn.Module):
    """``x + BN(relu(Transformer(x)))`` on equal-size sets (B, n, C); batch norm over all points.

    With ``native`` set (:meth:`AuthorsSetVAE.use_native`), the whole block runs as one native
    op (:func:`topn_kernels.native.set_transformer.set_block`: the layer, the ReLU, the batch
    norm with its running statistics, the residual; one autograd node, in C++, differentiable
    once) where that op supports
    the modules and input (float32/float64 CPU tensors, a batch norm with affine weights,
    running statistics and a momentum) and no hook is registered on the block or its
    submodules (nor a global module hook), else as the modules.
    """

    def __init__(self, channels: int, heads: int, feedforward: int) -> None:
        super().__init__()
        self.attn = nn.TransformerEncoderLayer(
            channels, heads, feedforward, dropout=0.0, batch_first=True
        )
        self.norm = nn.BatchNorm1d(channels)
        self.native = False

    def forward(self, x: Tensor) -> Tensor:
        if self.native and native_layer is not None and not has_hooks(self):
            reason, weights = native_layer.block_plan(self.attn, self.norm, x)
            if reason is None:
                return native_layer.run_block(self.attn, self.norm, x, weights)
        return x + _point_norm(self.norm, F.relu(self.attn(x)))


def _point_norm(norm: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """Batch norm over the points of (B, n, C)."""
    return norm(x.flatten(0, 1)).view(x.shape)


def _stem(native: bool, mlp: AuthorsMLP, norm: nn.BatchNorm1d, x: Tensor, y: Tensor) -> Tensor:
    """``norm(relu(mlp(x, y)))`` over the points of (B, n, C), the encoder's and decoder's first
    step: with ``native``, one native op with one C++ autograd node (the MLP, the ReLU and the
    batch norm: :func:`topn_kernels.native.authors_mlp.mlp`) where the op takes the modules and
    inputs and no hook is registered on them, else the modules."""
    if native and native_mlp is not None and not has_hooks(mlp) and not has_hooks(norm):
        reason, tensors = native_mlp.mlp_plan(mlp, x, y, norm)
        if reason is None:
            return native_mlp.run_mlp(mlp, norm, tensors)
    return _point_norm(norm, F.relu(mlp(x, y)))


# ---------------------------------------------------------------------------------------------
# Creation modules: (z (B, latent), n) -> (B, n, set_channels)
# ---------------------------------------------------------------------------------------------


class TopN(nn.Module):
    """The released code's Top-n (module docstring)."""

    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.points = nn.Parameter(torch.randn(cfg.n_ref, cfg.set_channels))
        angles = torch.randn(cfg.n_ref, cfg.angle_dim)
        self.angles = nn.Parameter(angles / (angles.norm(dim=1, keepdim=True) + 1e-5))
        self.angle_mlp = AuthorsMLP(cfg.latent_dim, cfg.angle_dim, cfg.angle_hidden, 2)
        self.gamma = nn.Linear(1, cfg.set_channels)
        self.beta = nn.Linear(1, cfg.set_channels)
        self.native = False  # what follows the angle MLP as one native op

    def forward(self, z: Tensor, n: int) -> Tensor:
        q = self.angle_mlp(z)
        # the op stands in for gamma's and beta's calls (the angle MLP and this module run)
        if (
            self.native
            and native_topn is not None
            and not has_hooks(self.gamma)
            and not has_hooks(self.beta)
        ):
            reason, weights = native_topn.topn_plan(self, q, n)
            if reason is None:
                return native_topn.run_topn(q, weights, n)
        q = q / (q.norm(dim=1, keepdim=True) + 1e-5)
        probs = torch.softmax(q @ self.angles.T, dim=1)  # (B, n_ref)
        top, index = torch.topk(probs, n, dim=1, largest=True, sorted=True)
        m = (n * top)[..., None]  # (B, n, 1)
        return self.gamma(m) * self.points[index] + self.beta(m)


class FirstN(nn.Module):
    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.points = nn.Parameter(torch.randn(cfg.n_ref, cfg.set_channels))

    def forward(self, z: Tensor, n: int) -> Tensor:
        return self.points[:n].expand(z.shape[0], -1, -1)


class IID(nn.Module):
    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.set_channels = cfg.set_channels

    def forward(self, z: Tensor, n: int) -> Tensor:
        return torch.randn(z.shape[0], n, self.set_channels, dtype=z.dtype, device=z.device) / (
            math.sqrt(n)
        )


class MLPCreation(nn.Module):
    """An MLP from z to ``n_ref`` points, of which the first n are kept. With ``native``
    (:meth:`AuthorsSetVAE.use_native`), its last map computes only the ``n * set_channels``
    outputs kept (the rows of its weight and bias that make them: the gradient of the other rows
    is zero either way), where no hook is registered on the MLP."""

    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.shape = (cfg.n_ref, cfg.set_channels)
        self.mlp = AuthorsMLP(
            cfg.latent_dim, cfg.n_ref * cfg.set_channels, cfg.creation_mlp_hidden, 2
        )
        self.native = False

    def forward(self, z: Tensor, n: int) -> Tensor:
        mlp, kept = self.mlp, n * self.shape[1]
        # without residuals or hidden maps the MLP is lin_final(relu(lin1(z))), and its first n
        # points depend on the first n * set_channels rows of lin_final alone
        if (
            self.native
            and n < self.shape[0]
            and type(mlp) is AuthorsMLP
            and mlp.modulation is None
            and not (mlp.residual_start or mlp.residual_end or len(mlp.hidden))
            and type(mlp.lin1) is nn.Linear
            and type(mlp.lin_final) is nn.Linear
            and not has_hooks(mlp)
        ):
            final = mlp.lin_final
            bias = None if final.bias is None else final.bias[:kept]
            out = F.linear(F.relu(mlp.lin1(z)), final.weight[:kept], bias)
            return out.view(z.shape[0], n, self.shape[1])
        return mlp(z).view(z.shape[0], *self.shape)[:, :n]


_CREATION_MODULES = {"topn": TopN, "firstn": FirstN, "iid": IID, "mlp": MLPCreation}


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Equal-size sets x (B, n, point_dim) -> (mu, log_var), each (B, latent_dim)."""

    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = AuthorsMLP(
            cfg.point_dim, cfg.hidden, cfg.encoder_mlp_hidden, 2, cond_dim=cfg.valency_classes
        )
        self.norm = nn.BatchNorm1d(cfg.hidden)
        self.blocks = nn.ModuleList(
            SetBlock(cfg.hidden, cfg.heads, cfg.feedforward) for _ in range(cfg.layers)
        )
        self.pool = PNAPooling(cfg.pna_average_n)
        self.head = AuthorsMLP(12 * cfg.hidden, 2 * cfg.latent_dim, cfg.encoder_final_hidden, 1)
        self.native = False  # the one-hot valencies and the stem as native ops

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = _stem(self.native, self.embed, self.norm, x, self.valency_onehot(x))
        for block in self.blocks:
            h = block(h)
        mu, log_var = self.head(F.relu(self.pool(h))).chunk(2, dim=-1)
        return mu, log_var

    def valency_onehot(self, x: Tensor) -> Tensor:
        """The one-hot valency classes (B, n, valency_classes) of x (B, n, point_dim), in x's
        dtype: each point's neighbours (closer than ``neighbor_dist``) minus one, clamped to the
        classes. With ``native``, one op (csrc/cpu/valency.cpp) where it takes x, else
        :func:`topn_kernels.metrics.valency_counts` and a one-hot; the same classes."""
        classes = self.cfg.valency_classes
        if self.native and native_valency is not None and native_valency.supports(x):
            return native_valency.valency_onehot(x, self.cfg.neighbor_dist, classes)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        counts = valency_counts(x, mask, self.cfg.neighbor_dist)
        return F.one_hot((counts - 1).clamp(0, classes - 1), classes).to(x.dtype)


class Decoder(nn.Module):
    """z (B, latent_dim) and a size n -> points (B, n, point_dim)."""

    def __init__(self, cfg: AuthorsConfig) -> None:
        super().__init__()
        self.creation = _CREATION_MODULES[cfg.creation](cfg)
        self.embed = AuthorsMLP(
            cfg.set_channels,
            cfg.hidden,
            cfg.decoder_mlp_hidden,
            2,
            cond_dim=cfg.latent_dim,
            modulation="film",
        )
        self.norm = nn.BatchNorm1d(cfg.hidden)
        self.blocks = nn.ModuleList(
            SetBlock(cfg.hidden, cfg.heads, cfg.feedforward) for _ in range(cfg.layers)
        )
        self.head = AuthorsMLP(cfg.hidden, cfg.point_dim, cfg.decoder_final_hidden, 2)
        self.native = False  # the stem as one native op (_stem)

    def forward(self, z: Tensor, n: int) -> Tensor:
        x = self.creation(z, n)
        h = _stem(self.native, self.embed, self.norm, x, z[:, None, :])
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _by_size(
    fn: Callable[[Tensor | slice, int], Tensor],
    lengths: Tensor,
    width: int,
    sizes: list[int] | None = None,
) -> Tensor:
    """Runs ``fn(index, n)`` -> (len(index), n, C) on the sets of each size n and pads the
    results into (B, width, C). A batch of one size (every training batch) is one call with
    ``index = slice(None)``: no gather, and no scatter where ``n == width``. ``fn`` makes what
    it takes contiguous, as a gather would (a float64 matrix product may round a strided input
    differently). ``sizes``: the distinct sizes of ``lengths``, ascending, where the caller
    has them."""
    if sizes is None:
        sizes = torch.unique(lengths).tolist()
    if len(sizes) == 1:
        part = fn(slice(None), sizes[0])
        if part.shape[1] == width:
            return part
        out = part.new_zeros(lengths.shape[0], width, part.shape[-1])
        out[:, : sizes[0]] = part
        return out
    out: Tensor | None = None
    for n in sizes:
        index = (lengths == n).nonzero().squeeze(1)
        part = fn(index, n)
        if out is None:
            out = part.new_zeros(lengths.shape[0], width, part.shape[-1])
        out[index, :n] = part
    assert out is not None
    return out


class AuthorsSetVAE(nn.Module):
    """The released code's set VAE, with the interface of :class:`.SetVAE`:
    ``model(points, lengths) -> VAEOutput``, ``reconstruct``, ``generate``, ``sample_sizes``.

    points (B, N, point_dim), lengths (B,) integer in [2, N]. Sets of one size pass through the
    model as one batch (batch norm statistics over all their points); a call with several sizes
    runs each size as its own batch.

    ``native`` (default: when the native extension is built) runs the model's CPU hot spots
    with this library's code (:meth:`use_native`); False keeps every layer plain PyTorch. The
    parameters, and so the state dicts, are the same either way.
    """

    def __init__(self, cfg: AuthorsConfig | None = None, *, native: bool | None = None) -> None:
        super().__init__()
        self.cfg = AuthorsConfig() if cfg is None else cfg
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        sizes = torch.zeros(self.cfg.n_ref + 1)
        sizes[2 : self.cfg.size_cap + 1] = 1.0
        self.register_buffer("size_probs", sizes / sizes.sum())
        self.use_native(_NATIVE_AVAILABLE if native is None else native)

    def use_native(self, enabled: bool = True) -> AuthorsSetVAE:
        """Switches the native paths on or off; returns the model.

        On: each set block (transformer layer, ReLU, batch norm, residual) runs as one fused op
        on float32/float64 CPU tensors, the PNA pooling as another, the encoder's and decoder's
        stems (MLP, ReLU, batch norm) as a third, the encoder's one-hot valencies as a fourth,
        and Top-n's creation after its angle MLP as a fifth (other devices and dtypes keep the
        modules); the MLP creation computes only the points it keeps. Outputs agree with the
        plain model up to rounding (tests/test_set_transformer.py). Raises ``RuntimeError``
        when asked for the native paths and the extension is not built.
        """
        if enabled and not _NATIVE_AVAILABLE:
            from ..native import UNAVAILABLE_REASON

            raise RuntimeError(f"native paths unavailable: {UNAVAILABLE_REASON}")
        for module in self.modules():
            if isinstance(module, (SetBlock, PNAPooling, Encoder, Decoder, TopN, MLPCreation)):
                module.native = bool(enabled)
        return self

    def _inputs(self, points: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(points, Tensor) or points.dim() != 3:
            raise TypeError("points must be a tensor (B, N, point_dim)")
        if points.shape[-1] != self.cfg.point_dim:
            raise ValueError(f"points must have {self.cfg.point_dim} channels, got {points.shape}")
        if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point:
            raise TypeError("lengths must be an integer tensor (B,)")
        if tuple(lengths.shape) != (points.shape[0],):
            raise ValueError(f"lengths must have shape ({points.shape[0]},), got {lengths.shape}")
        if points.shape[0] == 0:
            raise ValueError("points must hold at least one set")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 2 or hi > points.shape[1]:
            raise ValueError(f"lengths must be in [2, N={points.shape[1]}], got [{lo}, {hi}]")
        if hi > self.cfg.n_ref and self.cfg.creation != "iid":  # at most n_ref points made
            raise ValueError(f"lengths must be <= n_ref={self.cfg.n_ref}, got {hi}")
        return points, lengths.to(points.device, torch.int64)

    def _encode(
        self, points: Tensor, lengths: Tensor, sizes: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        if sizes is None:
            sizes = torch.unique(lengths).tolist()
        if len(sizes) == 1:  # one call, its outputs as they are
            return self.encoder(points[:, : sizes[0]].contiguous())

        def stats_of(i: Tensor | slice, n: int) -> Tensor:
            return torch.cat(self.encoder(points[i, :n].contiguous()), -1)[:, None]

        stats = _by_size(stats_of, lengths, 1, sizes)
        return stats[:, 0].chunk(2, dim=-1)

    def encode(self, points: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var), each (B, latent_dim)."""
        return self._encode(*self._inputs(points, lengths))

    def forward(self, points: Tensor, lengths: Tensor, noise: Tensor | None = None) -> VAEOutput:
        """Encode, sample ``z = mu + sigma * noise`` (noise from the global RNG when None),
        decode at the input's sizes; recon (B, N, point_dim) is zero past each length."""
        points, lengths = self._inputs(points, lengths)
        sizes = torch.unique(lengths).tolist()
        mu, log_var = self._encode(points, lengths, sizes)
        if noise is None:
            noise = torch.randn_like(mu)
        elif not isinstance(noise, Tensor) or noise.shape != mu.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape {tuple(mu.shape)}, got {got}")
        z = mu + noise.to(mu) * (0.5 * log_var).exp()
        recon = _by_size(
            lambda i, n: self.decoder(z[i].contiguous(), n), lengths, points.shape[1], sizes
        )
        mask = torch.arange(points.shape[1], device=points.device) < lengths[:, None]
        return VAEOutput(recon, mask, mu, log_var)

    def reconstruct(self, points: Tensor, lengths: Tensor) -> Tensor:
        """Decodes the latent mean: (B, N, point_dim), zero on padding."""
        points, lengths = self._inputs(points, lengths)
        mu, _ = self._encode(points, lengths)
        return _by_size(lambda i, n: self.decoder(mu[i].contiguous(), n), lengths, points.shape[1])

    @torch.no_grad()
    def set_size_distribution(self, lengths: Tensor) -> None:
        """Stores the distribution of the training sizes ``lengths`` (S,), each in [2, n_ref]."""
        lengths = _training_sizes(lengths, self.size_probs.device)
        if lengths.numel() == 0 or int(lengths.min()) < 2 or int(lengths.max()) > self.cfg.n_ref:
            raise ValueError(f"training sizes must be in [2, n_ref={self.cfg.n_ref}]")
        counts = torch.bincount(lengths, minlength=self.cfg.n_ref + 1).to(self.size_probs)
        self.size_probs.copy_(counts / counts.sum())

    def sample_sizes(self, num: int, *, shift: int = 0, generator=None) -> Tensor:
        """(num,) int64 sizes drawn from the training distribution, plus ``shift``, clamped to
        ``[2, size_cap]`` (the released code's extrapolation: ``shift=10``)."""
        _check_draw(num, shift)
        sizes = torch.multinomial(self.size_probs.cpu(), num, replacement=True, generator=generator)
        return (sizes + shift).clamp(2, self.cfg.size_cap).to(self.size_probs.device)

    def generate(self, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """New sets from z ~ N(0, I) (global RNG), sizes (B,) in [2, size_cap]: points
        (B, max size, point_dim) zero on padding, and the mask (B, max size)."""
        if not isinstance(sizes, Tensor) or sizes.dim() != 1 or sizes.dtype.is_floating_point:
            raise TypeError("sizes must be an integer tensor (B,)")
        if int(sizes.min()) < 2 or int(sizes.max()) > self.cfg.size_cap:
            raise ValueError(f"sizes must be in [2, size_cap={self.cfg.size_cap}]")
        device, dtype = self.size_probs.device, self.size_probs.dtype
        sizes = sizes.to(device, torch.int64)
        z = torch.randn(sizes.shape[0], self.cfg.latent_dim, device=device, dtype=dtype)
        width = int(sizes.max())
        x = _by_size(lambda i, n: self.decoder(z[i].contiguous(), n), sizes, width)
        return x, torch.arange(width, device=device) < sizes[:, None]


# ---------------------------------------------------------------------------------------------
# Loss and batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorsLossConfig:
    """Weights of the released code's loss (``lmbdas``) and the dataset's geometry."""

    kl: float = 0.003
    repulsion: float = 200.0
    valency: float = 200.0
    min_dist: float = 1.0
    neighbor_dist: float = 2.0
    max_valency: int = 4
    backend: str = "auto"

    def as_dict(self) -> dict:
        return asdict(self)


def authors_loss(out: VAEOutput, points: Tensor, lengths: Tensor, cfg: AuthorsLossConfig) -> dict:
    """The released code's loss, each term summed over the sets of the batch (0-d tensors):
    ``loss`` (to backpropagate) = ``reconstruction + kl * KL + repulsion * R + valency * V``
    with ``reconstruction`` the matched distances, ``KL`` summed over latent dimensions, ``R``
    the repulsion over ordered pairs, ``V`` the valency penalty (terms unweighted). ``lengths``
    must be the sizes ``out`` was made with (``ValueError`` otherwise)."""
    lengths = check_output_lengths(out, points, lengths)
    terms = _native_point_terms(out.recon, points, lengths, cfg)
    if terms is not None:
        rec, rep, val = terms
    else:
        rec = matched_distance(
            out.recon, points, lengths, lengths, backend=matched_backend(cfg.backend)
        ).sum()
        rep = 2 * repulsion_penalty(out.recon, lengths, min_dist=cfg.min_dist, backend=cfg.backend)
        val = valency_penalty(
            out.recon,
            lengths,
            neighbor_dist=cfg.neighbor_dist,
            max_valency=cfg.max_valency,
            backend=cfg.backend,
        )
        rep, val = rep.sum(), val.sum()
    if terms is not None and _native_latent(out.mu, out.log_var, rec):  # one more node
        total, kl = torch.ops.topn_kernels.authors_kl_total_autograd(
            out.mu, out.log_var, rec, rep, val, cfg.kl, cfg.repulsion, cfg.valency
        )
    else:
        kl = -0.5 * (1 + out.log_var - out.mu**2 - out.log_var.exp()).sum()
        total = rec + cfg.kl * kl + cfg.repulsion * rep + cfg.valency * val
    return {"loss": total, "reconstruction": rec, "kl": kl, "repulsion": rep, "valency": val}


def _native_latent(mu: Tensor, log_var: Tensor, rec: Tensor) -> bool:
    """Whether the KL term and the weighted total run as one native op
    (``topn_kernels::authors_kl_total_autograd``, csrc/cpu/authors_loss.cpp: the KL summed in
    float64, the total in the terms' dtype in the Python expression's order; the same values up
    to rounding), after the native point terms: mu and log_var strided CPU tensors (B, L) of the
    terms' dtype."""
    return (
        mu.layout == torch.strided
        and log_var.layout == torch.strided
        and mu.is_cpu
        and log_var.is_cpu
        and mu.dtype == rec.dtype
        and log_var.dtype == rec.dtype
        and mu.shape == log_var.shape
    )


def _native_point_terms(
    recon: Tensor, points: Tensor, lengths: Tensor, cfg: AuthorsLossConfig
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The loss's reconstruction, repulsion and valency sums as one native op with one C++
    autograd node (``topn_kernels::authors_point_terms_autograd``, csrc/cpu/authors_loss.cpp:
    the same kernels as the three functions, one node instead of three and the sums and
    products between them), where all three would run their native backends (on CPU with the
    extension built, for the config's ``backend``; each choice recorded as the functions record
    it), on float32/float64 sets of equal sizes, at least one point each, with points that take
    no gradient; else None (the caller runs the three functions)."""
    if (
        not _NATIVE_AVAILABLE
        or not recon.is_cpu
        or recon.dtype not in (torch.float32, torch.float64)
        or points.dtype != recon.dtype
        or recon.shape != points.shape
        or points.requires_grad
        or recon.shape[0] == 0
    ):
        return None
    _checks.positive_number(cfg.min_dist, "min_dist")
    _checks.positive_number(cfg.neighbor_dist, "neighbor_dist")
    _checks.integer(cfg.max_valency, "max_valency", minimum=0)
    device, small, slow = recon.device, _small(recon, recon), _few_large_sets(recon, recon)
    calls = (
        ("matched_distance", matched_backend(cfg.backend), False, ()),
        ("repulsion_penalty", cfg.backend, small, slow),
        ("valency_penalty", cfg.backend, small, slow),
    )
    # decided without recording; recorded below once the op runs (the fallback records its own)
    if any(_dispatch._resolve(op, b, device, sm, {}, sl) != "native" for op, b, sm, sl in calls):
        return None
    if not bool((lengths >= 1).all()):
        return None
    for op, *_ in calls:
        _dispatch.record(op, "native")
    max_valency = min(cfg.max_valency, recon.shape[1])  # as valency_penalty clamps it
    return torch.ops.topn_kernels.authors_point_terms_autograd(
        recon, points, lengths, cfg.min_dist, cfg.neighbor_dist, max_valency
    )


def size_grouped_batches(lengths: Tensor, batch_size: int) -> list[Tensor]:
    """The released code's batches: set indices sorted by size (stable), cut into runs of at
    most ``batch_size`` sets of one size. Returns a list of int64 index tensors, in order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = _training_sizes(lengths, torch.device("cpu"))
    order = torch.argsort(lengths, stable=True)
    batches = []
    for n in torch.unique(lengths).tolist():
        same = order[lengths[order] == n]
        batches.extend(same.split(batch_size))
    return batches


def iterate_batches(
    points: Tensor, lengths: Tensor, batches: list[Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(points (b, n, D), lengths (b,)) of each batch, trimmed to its one size n.

    Each of ``batches`` is a non-empty 1-D integer tensor of indices into ``lengths`` whose sets
    all have one size (as :func:`size_grouped_batches` makes them); checked for every batch at
    the call, before the first one is yielded (a batch of several sizes would have its larger
    sets cut to the first one's size, with lengths that still say otherwise)."""
    batches = list(batches)
    sizes = _batch_sizes(lengths, batches)
    return ((points[index, :n], lengths[index]) for index, n in zip(batches, sizes, strict=True))


def _batch_sizes(lengths: object, batches: list[object]) -> list[int]:
    """The one size of each batch of :func:`iterate_batches`, its arguments checked."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or not integer_dtype(lengths.dtype):
        raise TypeError("lengths must be an integer tensor (S,)")
    for i, index in enumerate(batches):
        if not isinstance(index, Tensor) or index.dim() != 1 or not integer_dtype(index.dtype):
            raise TypeError(f"batches[{i}] must be a 1-D integer tensor of set indices")
        if index.numel() == 0:
            raise ValueError(f"batches[{i}] is empty")
    if not batches:
        return []
    flat = torch.cat([index.to(lengths.device) for index in batches])
    counts = torch.tensor([len(index) for index in batches], device=lengths.device)
    owner = torch.arange(len(batches), device=lengths.device).repeat_interleave(counts)
    outside = (flat < 0) | (flat >= len(lengths))
    if bool(outside.any()):
        i = int(owner[outside][0])
        raise ValueError(
            f"batches[{i}] holds index {int(flat[outside][0])}: indices must be in "
            f"[0, len(lengths) - 1={len(lengths) - 1}]"
        )
    sizes = lengths[flat]
    first = sizes[torch.cumsum(counts, 0) - counts]
    mixed = sizes != first[owner]
    if bool(mixed.any()):
        i = int(owner[mixed][0])
        found = sorted(set(lengths[batches[i].to(lengths.device)].tolist()))
        raise ValueError(
            f"batches[{i}] holds sets of sizes {found}: each batch must hold sets of one size "
            f"(size_grouped_batches makes such batches)"
        )
    return first.tolist()
