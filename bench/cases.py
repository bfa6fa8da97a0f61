"""What a benchmark case is, and the registry of every operator's cases."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One timed call: an operator on a named shape, by one provider, in one direction."""

    op: str
    shape: str
    direction: str  # "fwd" (under no_grad) or "fwd+bwd"
    provider: str  # "eager" and "compile" are the baselines every other provider is compared to
    params: dict
    nbytes: int | None  # bytes one forward must move (for GB/s), None where not meaningful
    build: Callable[[], Callable[[], object]]  # makes the inputs, returns the timed closure
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    heavy: bool = False  # seconds per call: one timed call (no warm-up), peak memory of it

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.direction}-{self.provider}"


def all_cases(device: torch.device) -> Iterator[Case]:
    from . import losses, topn_create

    yield from topn_create.cases(device)
    yield from losses.cases(device)


OPS = ("topn_create", "chamfer_loss", "sinkhorn_loss", "repulsion_penalty", "valency_penalty")
