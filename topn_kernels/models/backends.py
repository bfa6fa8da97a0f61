"""Which backend each operator of the set VAE runs on, from one user-facing name.

| name | ``topn_create`` | losses and penalties |
| --- | --- | --- |
| ``"reference"`` | reference | reference (every op in plain PyTorch: the oracle model) |
| ``"auto"`` | auto (native on CPU, Triton on CUDA) | auto (see below) |
| ``"native"`` | native (CPU) | auto |
| ``"keops"`` | auto | keops |

The losses' ``"auto"`` runs the Sinkhorn loss on the native C++ loop for CPU tensors and on KeOps
for CUDA tensors, the other losses and penalties on KeOps; problems small enough that the dense
reference is faster (at most 2^17 point pairs, as at the paper's scale; for Chamfer only when no
gradient is needed) run on the reference instead (docs/operators.md, Backends and dispatch).
``"auto"`` also runs the reference where the preferred backend is unavailable (with one warning per
reason), so what runs can change from call to call. :class:`BackendLog` records, call by call, the
backend each op resolved to; :meth:`OpBackends.resolved` checks up front that the requested ones can
run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..ops import _dispatch, record_backends

__all__ = ["BACKEND_NAMES", "BackendLog", "OpBackends"]

BACKEND_NAMES = ("auto", "reference", "native", "keops")

_LOSS_OPS = ("sinkhorn_loss", "repulsion_penalty", "valency_penalty")


@dataclass(frozen=True)
class OpBackends:
    """The ``backend=`` argument given to ``topn_create`` and to the losses."""

    topn_create: str = "auto"
    losses: str = "auto"

    @classmethod
    def from_name(cls, name: str) -> OpBackends:
        """The backends of a user-facing name (see the module's table)."""
        table = {
            "auto": cls("auto", "auto"),
            "reference": cls("reference", "reference"),
            "native": cls("native", "auto"),
            "keops": cls("auto", "keops"),
        }
        if name not in table:
            raise ValueError(f"backend must be one of {list(table)}, got {name!r}")
        return table[name]

    def resolved(self, device: torch.device) -> dict[str, str]:
        """The backend each op runs on ``device`` for large problems; raises, as the op would,
        when an explicitly requested backend cannot run (a check before training starts)."""
        out = {"topn_create": _dispatch.resolve("topn_create", self.topn_create, device)}
        for op in _LOSS_OPS:
            out[op] = _dispatch.resolve(op, self.losses, device)
        return out


class BackendLog:
    """Counts the backend that every call of the library's ops resolves to, while active.

        with BackendLog() as log:
            train_step(...)
        log.summary()  # {"topn_create": {"native": 32}, "sinkhorn_loss": {"reference": 32}, ...}

    It reports the library's own decisions (:func:`topn_kernels.record_backends`), including
    the per-call size-based choices of ``"auto"``; entering it again adds to its counts.
    """

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self._recording = None

    def __enter__(self) -> BackendLog:
        if self._recording is not None:
            raise RuntimeError("a BackendLog is not re-entrant")
        self._recording = record_backends()
        self._calls = self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)
        self._recording = None
        for op, calls in self._calls.items():  # a log may be entered again: counts add up
            self.counts.setdefault(op, Counter()).update(calls)

    def summary(self) -> dict[str, dict[str, int]]:
        """{op: {backend: number of calls}}, ops and backends sorted by name."""
        return {op: dict(sorted(c.items())) for op, c in sorted(self.counts.items())}
