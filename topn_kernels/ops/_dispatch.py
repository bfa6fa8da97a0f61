"""Backend selection (docs/operators.md, Backends and dispatch).

``backend="auto"`` picks, per device, the fastest backend that exists: Triton on CUDA and the
native extension on CPU for ``topn_create`` and ``set2graph_logits``; the
native extension on CPU for ``sinkhorn_loss`` (without per-point weights, which it lacks);
KeOps for the other losses (and Sinkhorn on CUDA), or the dense reference for problems small
enough that KeOps' overheads dominate. When that backend is not
available the call runs the reference instead and warns once, naming the reason. The
environment variable ``TOPN_KERNELS_BACKEND`` replaces ``"auto"`` (an explicit ``backend=``
argument wins). An explicitly requested backend that cannot run is an error.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping

import torch

from .. import keops as keops_backend
from .. import native
from .. import triton as triton_backend
from . import _checks

ENV_VAR = "TOPN_KERNELS_BACKEND"

# backends each operator accepts, besides "auto"
BACKENDS = {
    "topn_create": ("reference", "native", "triton"),
    "chamfer_loss": ("reference", "keops"),
    "sinkhorn_loss": ("reference", "keops", "native"),
    "repulsion_penalty": ("reference", "keops"),
    "valency_penalty": ("reference", "keops"),
    "set2graph_logits": ("reference", "native", "triton"),
}

_warned: set[str] = set()


def _preferred(op: str, device: torch.device) -> str:
    if op in ("topn_create", "set2graph_logits"):
        return "triton" if device.type == "cuda" else "native"
    if op == "sinkhorn_loss" and device.type == "cpu":
        return "native"
    return "keops"


def _unavailable(
    backend: str, device: torch.device, op: str | None = None
) -> tuple[type[Exception], str] | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (exception type and reason), or None."""
    if backend == "native":
        if device.type != "cpu":
            return ValueError, f"the native backend runs on CPU tensors, got {device} tensors"
        if not native.AVAILABLE:
            return RuntimeError, str(native.UNAVAILABLE_REASON)
    elif backend == "triton":
        return triton_backend.unavailable(device)
    elif backend == "keops":
        return keops_backend.unavailable(device)
    return None


_recorders: list[dict[str, Counter]] = []


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, Counter]]:
    """While active, counts the backend every operator call runs on::

        with topn_kernels.record_backends() as calls:
            loss = model_step(...)
        calls  # {"topn_create": Counter({"native": 1}), "sinkhorn_loss": Counter(...)}

    ``"auto"`` decides per call (device, availability, problem size): this says what ran.
    """
    counts: dict[str, Counter] = {}
    _recorders.append(counts)
    try:
        yield counts
    finally:
        _recorders.remove(counts)


def resolve(
    op: str,
    backend: object,
    device: torch.device,
    *,
    small: bool = False,
    unsupported: Mapping[str, str] | None = None,
) -> str:
    """The backend that runs ``op`` on ``device`` for the requested ``backend``.

    ``small``: the problem is small enough that the dense reference beats KeOps' launch and
    set-up costs; ``"auto"`` then runs the reference instead of KeOps. ``unsupported``:
    backends that lack an option this call uses, with the reason; asking for one explicitly
    is a ValueError giving the reason, and ``"auto"`` passes over it to KeOps (or, small, the
    reference).
    """
    chosen = _resolve(op, backend, device, small, unsupported or {})
    for counts in _recorders:
        counts.setdefault(op, Counter())[chosen] += 1
    return chosen


def _resolve(
    op: str, backend: object, device: torch.device, small: bool, unsupported: Mapping[str, str]
) -> str:
    allowed = BACKENDS[op]
    backend = _checks.choice(backend, "backend", ("auto", *allowed))
    if backend == "auto":
        forced = os.environ.get(ENV_VAR)
        if forced:
            backend = _checks.choice(forced, ENV_VAR, ("auto", *allowed))
    if backend != "auto":
        if backend in unsupported:
            raise ValueError(
                f"{op}: backend={backend!r} cannot run this call: {unsupported[backend]}"
            )
        problem = _unavailable(backend, device, op)
        if problem is not None:
            error, reason = problem
            raise error(f"{op}: backend={backend!r} is unavailable: {reason}")
        return backend

    wanted = _preferred(op, device)
    if wanted in unsupported:
        wanted = "keops"
    if small and wanted == "keops":
        return "reference"
    problem = _unavailable(wanted, device, op)
    if problem is None:
        return wanted
    message = (
        f"{op}: backend 'auto' falls back to 'reference': {wanted!r} unavailable ({problem[1]})"
    )
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return "reference"
