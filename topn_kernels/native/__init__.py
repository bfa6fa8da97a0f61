"""The native CPU extension: ``csrc/`` built by ``CMakeLists.txt`` into ``topn_kernels/_C.abi3.so``.

The library registers ``torch.ops.topn_kernels.*`` (schemas in ``csrc/registration.cpp``, CPU
kernels in ``csrc/cpu/``). Importing this module loads it when it is there; when it is not, the
package still imports, ``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON"]


def _load() -> str | None:
    """Loads the extension; returns None on success, else the reason it is unavailable."""
    try:
        spec = importlib.util.find_spec("topn_kernels._C")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return (
            "the C++ extension topn_kernels/_C.abi3.so is not built "
            "(run `make build`, or `pip install --no-build-isolation -e .`)"
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        return f"the C++ extension {spec.origin} failed to load: {err}"
    return None


UNAVAILABLE_REASON: str | None = _load()
AVAILABLE: bool = UNAVAILABLE_REASON is None

if AVAILABLE:
    from . import topn_create as _topn_create  # noqa: F401  (registers fake and autograd)
