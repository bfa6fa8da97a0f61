"""KeOps backend of the losses and penalties: memory linear in the number of points.

Ragged batches are packed (the real points of every set, one after the other) and every
reduction runs over KeOps' block-diagonal ``ranges``, so padding is never read and never
computed on. pykeops is imported on first use, quietly: its notices (no CUDA found, formulas
being compiled) stay out of the user's logs unless ``KEOPS_VERBOSE`` or ``PYKEOPS_VERBOSE`` is
set. Compiled formulas are cached in ``KEOPS_CACHE_FOLDER`` (KeOps' default otherwise).
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["unavailable"]


def unavailable(device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the KeOps backend cannot run on ``device`` (exception type, reason), or None."""
    if importlib.util.find_spec("pykeops") is None:
        return RuntimeError, "pykeops is not installed (pip install pykeops)"
    if device.type not in ("cpu", "cuda"):
        return ValueError, f"the KeOps backend runs on CPU and CUDA tensors, got {device} tensors"
    return None
