"""The set VAE's loss (paper appendix D.2) and one optimisation step.

``loss = W + kl * KL + repulsion * reg2 + valency * reg3`` with, per set and averaged over the
batch: W the debiased Sinkhorn divergence between the input and its reconstruction (p=2, cost
|x-y|^2/2, so about W2^2 / 2), KL the Kullback-Leibler divergence of the posterior from N(0, I)
(summed over latent dims), reg2 :func:`topn_kernels.repulsion_penalty` and reg3
:func:`topn_kernels.valency_penalty` of the reconstruction. Weights: 0.003, 200, 200.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..ops import repulsion_penalty, sinkhorn_loss, valency_penalty
from ._hooks import walk
from .fused_adam import FusedAdam, clip_scale, scalable_grads
from .setvae import VAEOutput, check_output_lengths

__all__ = ["LOSS_TERMS", "LossConfig", "make_adam", "setvae_loss", "train_step"]

LOSS_TERMS = ("loss", "reconstruction", "kl", "repulsion", "valency")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms, Sinkhorn settings, the dataset's geometry, and the
    ``backend=`` given to the losses and penalties."""

    kl: float = 0.003
    repulsion: float = 200.0
    valency: float = 200.0
    blur: float = 0.05
    scaling: float = 0.5
    min_dist: float = 1.0
    neighbor_dist: float = 2.0
    max_valency: int = 4
    backend: str = "auto"

    def as_dict(self) -> dict:
        return asdict(self)


def setvae_loss(out: VAEOutput, points: Tensor, lengths: Tensor, cfg: LossConfig) -> dict:
    """The loss terms, each a 0-d tensor (batch means of per-set values), under ``LOSS_TERMS``
    names: ``loss`` (the weighted total, to backpropagate), ``reconstruction``, ``kl``,
    ``repulsion``, ``valency`` (unweighted).

    out: the model's output on ``points`` (B, N, D) with ``lengths`` (B,) (other lengths are a
    ``ValueError``).
    """
    lengths = check_output_lengths(out, points, lengths)
    rec = sinkhorn_loss(
        out.recon,
        points,
        lengths,
        lengths,
        p=2,
        blur=cfg.blur,
        scaling=cfg.scaling,
        backend=cfg.backend,
    )
    kl = -0.5 * (1 + out.log_var - out.mu**2 - out.log_var.exp()).sum(-1).mean()
    rep = repulsion_penalty(out.recon, lengths, min_dist=cfg.min_dist, backend=cfg.backend).mean()
    val = valency_penalty(
        out.recon,
        lengths,
        neighbor_dist=cfg.neighbor_dist,
        max_valency=cfg.max_valency,
        backend=cfg.backend,
    ).mean()
    total = rec + cfg.kl * kl + cfg.repulsion * rep + cfg.valency * val
    return {"loss": total, "reconstruction": rec, "kl": kl, "repulsion": rep, "valency": val}


def make_adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam with PyTorch's fused implementation (one kernel over all parameters, on CPU and
    CUDA), its per-step Python bookkeeping cut short (:class:`.fused_adam.FusedAdam`: the same
    updates and state dicts as ``torch.optim.Adam(fused=True)``): the training programs'
    optimizer."""
    return FusedAdam(parameters, lr=lr)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    points: Tensor,
    lengths: Tensor,
    cfg,
    *,
    clip: float | None = 4.0,
    loss: Callable[..., dict] = setvae_loss,
) -> dict[str, float]:
    """One step: forward (through ``model``, so a DDP wrapper syncs the gradients), loss,
    backward, gradient-norm clipping at ``clip`` (the released code's 4.0; None: none), update.

    The clipping is ``clip_grad_norm_``'s: every gradient scaled by ``clip / (norm + 1e-6)``
    where that is below 1, ``norm`` the 2-norm of all gradients together (of the model's
    parameters, which are the optimizer's). With a fused Adam over float32 parameters
    (:func:`make_adam`; ``torch.optim.Adam(fused=True)`` too) the scaling happens inside its
    update, as a division by ``(norm + 1e-6) / clip`` (the ``grad_scale`` input the fused
    kernels take from ``torch.amp.GradScaler``), instead of one more pass over every gradient
    tensor, and the norm is one native call on CPU (:func:`.fused_adam.grad_norm`): the same
    update up to float32 rounding. :class:`.fused_adam.FusedAdam` is given the clip as its
    ``max_grad_norm`` for the step and, on CPU, computes the norm and the factor inside its
    native update. ``clip`` <= 0 is a ``ValueError``.

    ``loss(out, points, lengths, cfg)`` gives the terms (``setvae_loss`` with a
    :class:`LossConfig`, or :func:`.authors.authors_loss` with its own config).

    Returns the loss terms as floats. A non-finite loss is a ``FloatingPointError``, raised
    before the update, with the model's buffers (batch norms' running statistics, which the
    forward updated) restored: the model is left as the step found it.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    optimizer.zero_grad(set_to_none=True)
    buffers = _buffers(model) if isinstance(model, nn.Module) else []
    saved = [b.clone() for b in buffers]  # about 30 us for the set VAEs' 25 buffers
    terms = loss(model(points, lengths), points, lengths, cfg)
    with torch.no_grad():  # every term's value in one op and one read, not one each
        values = dict(zip(terms, torch.stack(list(terms.values())).tolist(), strict=True))
    if not math.isfinite(values["loss"]):
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)
        raise FloatingPointError(f"non-finite loss: {values}")
    terms["loss"].backward()
    if clip is None:
        optimizer.step()
    elif type(optimizer) is FusedAdam:  # a subclass may step otherwise: the general path
        own = optimizer.max_grad_norm  # the caller's (None: the class default), kept
        optimizer.max_grad_norm = clip
        try:
            optimizer.step()
        finally:
            if own is None:
                del optimizer.max_grad_norm
            else:
                optimizer.max_grad_norm = own
    elif grads := scalable_grads(optimizer):
        optimizer.grad_scale = clip_scale(grads, clip)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
    return values


def _buffers(model: nn.Module) -> list[Tensor]:
    """The buffers of ``model`` and its submodules (each module once): those of
    ``model.buffers()``, in about two thirds of its time (50 us against 80 us for the set VAE's
    100 modules)."""
    return [b for m in walk(model) for b in m._buffers.values() if b is not None]
