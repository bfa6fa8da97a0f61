"""Peak memory of one call: what it adds on top of the memory in use when it starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory growth of fn(): the CUDA allocator's peak on a GPU; on the CPU the growth
    of the process's resident high-water mark (reset through /proc/self/clear_refs). None
    where neither is available."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) * 1024
    except (OSError, KeyError):
        return None
