"""Backend selection (docs/operators.md, Backends and dispatch).

``backend="auto"`` picks, per device, the fastest backend that exists: Triton on CUDA and the
native extension on CPU for ``topn_create`` and ``set2graph_logits``; the native extension
on CPU for the losses too (``sinkhorn_loss`` without per-point weights, ``chamfer_loss``
without normals, indices or the point reductions "max" and None), except on batches of
fewer large sets than threads, where its one thread per set loses to KeOps (``slow``);
otherwise KeOps (and on CUDA), or the dense reference for problems small enough that
KeOps' overheads dominate. When that backend is not
available the call runs the reference instead and warns once, naming the reason. The
environment variable ``TOPN_KERNELS_BACKEND`` replaces ``"auto"`` (an explicit ``backend=``
argument wins). An explicitly requested backend that cannot run is an error.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping

import torch

from .. import keops as keops_backend
from .. import native
from .. import triton as triton_backend
from . import _checks

ENV_VAR = "TOPN_KERNELS_BACKEND"

# backends each operator accepts, besides "auto"
BACKENDS = {
    "topn_create": ("reference", "native", "triton"),
    "chamfer_loss": ("reference", "keops", "native"),
    "sinkhorn_loss": ("reference", "keops", "native"),
    "repulsion_penalty": ("reference", "keops", "native"),
    "valency_penalty": ("reference", "keops", "native"),
    "set2graph_logits": ("reference", "native", "triton"),
    "matched_distance": ("reference", "native"),
}

_CHOICES = {op: ("auto", *backends) for op, backends in BACKENDS.items()}

_warned: set[str] = set()


_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _forced() -> str | None:
    """The value of ``TOPN_KERNELS_BACKEND``. os.environ encodes the key at every lookup (a
    microsecond a call): CPython's own dict of encoded keys answers "unset" first."""
    data = getattr(os.environ, "_data", None)
    if data is not None and _ENV_KEY is not None and _ENV_KEY not in data:
        return None
    return os.environ.get(ENV_VAR)


def requested(backend: str) -> str:
    """``backend`` as the caller asked for it: ``"auto"`` replaced by ``TOPN_KERNELS_BACKEND``
    when that is set. For code that takes a plain-PyTorch path under ``"reference"``."""
    return (_forced() or backend) if backend == "auto" else backend


@functools.cache
def _candidates(op: str, device_type: str, small: bool) -> tuple[str, ...]:
    """The backends "auto" tries for ``op`` on a device of ``device_type``, best first (the
    reference runs when none of them can)."""
    if op in ("topn_create", "set2graph_logits"):
        return ("triton" if device_type == "cuda" else "native",)
    if op == "matched_distance":  # no KeOps path, and the native one is CPU only
        return ("native",) if device_type == "cpu" else ()
    # KeOps' launch and set-up costs dominate small problems: the dense reference instead
    after = ("reference" if small else "keops",)
    return ("native", *after) if device_type == "cpu" else after


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
    slow: Collection[str] = (),
) -> str:
    """The backend that runs ``op`` on ``device`` for the requested ``backend``.

    ``small``: the problem is small enough that the dense reference beats KeOps' launch and
    set-up costs; ``"auto"`` then runs the reference instead of KeOps. ``unsupported``:
    backends that lack an option this call uses, with the reason; asking for one explicitly
    is a ValueError giving the reason, and ``"auto"`` passes over it to KeOps (or, small, the
    reference). ``slow``: backends that can run the call but that ``"auto"`` passes over to
    KeOps for this problem (unless KeOps is unavailable); an explicit request still runs them.
    """
    chosen = _resolve(op, backend, device, small, unsupported or {}, slow)
    record(op, chosen)
    return chosen


def record(op: str, chosen: str) -> None:
    """Counts one call of ``op`` on backend ``chosen`` in the active recorders (what
    :func:`resolve` does for the calls it decides; for a caller that decided with
    ``_resolve`` and runs the op its own way)."""
    for counts in _recorders:
        counts.setdefault(op, Counter())[chosen] += 1


def _resolve(
    op: str,
    backend: object,
    device: torch.device,
    small: bool,
    unsupported: Mapping[str, str],
    slow: Collection[str],
) -> str:
    choices = _CHOICES[op]
    backend = _checks.choice(backend, "backend", choices)
    if (forced := requested(backend)) != backend:  # "auto" under TOPN_KERNELS_BACKEND
        backend = _checks.choice(forced, ENV_VAR, choices)
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

    candidates = _candidates(op, device.type, small)
    if unsupported:
        candidates = [c for c in candidates if c not in unsupported]
    if slow:  # the others first, the slow ones kept as a fallback
        candidates = [c for c in candidates if c not in slow] + [c for c in candidates if c in slow]
    skipped = None
    for candidate in candidates:
        problem = _unavailable(candidate, device, op)
        if problem is None:
            chosen = candidate
            break
        skipped = skipped or (candidate, problem[1])
    else:
        chosen = "reference"
    if skipped is not None and chosen == "reference":  # the dense path: say why
        message = (
            f"{op}: backend 'auto' falls back to {chosen!r}: {skipped[0]!r} unavailable "
            f"({skipped[1]})"
        )
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return chosen
