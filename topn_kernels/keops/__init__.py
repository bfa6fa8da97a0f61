"""KeOps formulas of the losses and penalties (memory linear in the number of points).

Not implemented yet: ``unavailable()`` says so, and ``backend="auto"`` falls back to the
reference.
"""

from __future__ import annotations

import torch


def unavailable(device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the KeOps backend cannot run on ``device`` (exception type, reason), or None."""
    return NotImplementedError, "the KeOps losses are not implemented yet"
