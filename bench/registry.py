"""Every operator's benchmark cases, for ``python -m bench`` and pytest-benchmark."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import graphvae_step, losses, set2graph_logits, setvae_epoch, topn_create
from .cases import Case

OPS = (
    "topn_create",
    "chamfer_loss",
    "sinkhorn_loss",
    "repulsion_penalty",
    "valency_penalty",
    "set2graph_logits",
    "setvae_epoch",
    "graphvae_step",
)


def all_cases(device: torch.device) -> Iterator[Case]:
    yield from topn_create.cases(device)
    yield from losses.cases(device)
    yield from set2graph_logits.cases(device)
    yield from setvae_epoch.cases(device)
    yield from graphvae_step.cases(device)
