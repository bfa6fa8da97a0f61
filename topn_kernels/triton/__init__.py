"""Triton kernels of topn_kernels (GPU; on CPU tensors under ``TRITON_INTERPRET=1``).

Not implemented yet: ``unavailable()`` says so, and ``backend="auto"`` on CUDA tensors falls
back to the reference.
"""

from __future__ import annotations

import torch


def unavailable(device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the Triton backend cannot run on ``device`` (exception type, reason), or None."""
    return NotImplementedError, "the Triton kernels are not implemented yet"
