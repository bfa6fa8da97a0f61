"""What a benchmark case is. Each operator's module (bench/topn_create.py, bench/losses.py)
makes its own cases; bench/registry.py gathers them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

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
    repeats: int = 1  # heavy cases: timed calls (median and p20/p80), peak memory of the first

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.direction}-{self.provider}"


def training_cases(
    op: str,
    shape_prefix: str,
    creations: tuple[str, ...],
    providers: tuple[str, ...],
    make: Callable[[str, str], Callable[[], object]],
    params: Callable[[str, str], dict],
    repeats: int,
) -> Iterator[Case]:
    """The cases of a training benchmark (setvae_epoch, graphvae_step): one heavy fwd+bwd case
    per creation method and provider, shape ``{shape_prefix}_{creation}``, built by
    ``make(creation, provider)``, timed ``repeats`` times."""
    for creation in creations:
        for provider in providers:
            yield Case(
                op,
                f"{shape_prefix}_{creation}",
                "fwd+bwd",
                provider,
                params(creation, provider),
                None,
                partial(make, creation, provider),
                heavy=True,
                repeats=repeats,
            )


def fresh_compile(provider: str) -> None:
    """Before a torch.compile provider's case: clears dynamo's caches. torch.compile keeps at
    most ``recompile_limit`` (8) compiled versions of a function, shared by every wrapper of
    it, and past that silently runs it eagerly; one case per fresh cache keeps every
    ``compile*`` row compiled."""
    if provider.startswith("compile"):
        import torch._dynamo

        torch._dynamo.reset()


def format_targets(targets: list[dict]) -> str:
    """One line per target of ``cpu_targets`` / ``check_targets`` rows: met or not, the
    measured value."""
    lines = []
    for t in targets:
        value = "missing" if t["measured"] is None else f"{t['measured']:.2f}"
        unit = " us" if "us" in t["target"] else ("x" if t["measured"] is not None else "")
        unit = t.get("unit", unit) if t["measured"] is not None else ""
        lines.append(
            f"[{'met' if t['met'] else 'NOT met'}] {t['shape']}: {t['target']}: {value}{unit}"
        )
    return "\n".join(lines)
