"""The native CPU extension: ``csrc/`` built by ``CMakeLists.txt`` into ``topn_kernels/_C.abi3.so``.

The library registers ``torch.ops.topn_kernels.*`` (schemas in ``csrc/registration.cpp``, CPU
kernels in ``csrc/cpu/``). Importing this module loads it when it is there; when it is not, the
package still imports, ``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why.

Large CPU outputs (1 MiB and more) come from a pool that keeps the blocks of freed outputs for
the next call of the same size, so a training loop does not pay the kernel's page zeroing at
every step (``csrc/cpu/output_pool.cpp``). ``cached_bytes()``, ``empty_cache()`` and
``set_cache_limit()`` manage it; ``TOPN_KERNELS_CPU_CACHE_MB`` sets its bound (default 2048).
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "cached_bytes", "empty_cache", "set_cache_limit"]


def _load() -> str | None:
    """Loads the extension; returns None on success, else the reason it is unavailable.

    ``TOPN_KERNELS_LIBRARY=/path/to/_C.abi3.so`` loads exactly that file instead of the
    installed one (``make sanitize`` points it at its ASan/UBSan build); a missing or
    unloadable file is then an ImportError, not a fallback to another backend.
    """
    import os

    override = os.environ.get("TOPN_KERNELS_LIBRARY")
    if override:
        path = os.path.abspath(override)
        if not os.path.isfile(path):
            raise ImportError(f"TOPN_KERNELS_LIBRARY={override}: no such file ({path})")
        try:
            torch.ops.load_library(path)
        except OSError as err:
            raise ImportError(f"TOPN_KERNELS_LIBRARY={override} failed to load: {err}") from err
        return None
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


def strided_cpu_float(x: object, dim: int) -> bool:
    """Whether x is a strided (not nested) float32 or float64 CPU tensor with ``dim``
    dimensions: what the native ops' Python sides check first."""
    return (
        isinstance(x, torch.Tensor)
        and x.layout == torch.strided
        and not x.is_nested
        and x.is_cpu
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == dim
    )


UNAVAILABLE_REASON: str | None = _load()
AVAILABLE: bool = UNAVAILABLE_REASON is None

if AVAILABLE:  # register the fake kernels and autograd of the ops
    from . import matched_distance as _matched_distance  # noqa: F401
    from . import pna_pooling as _pna_pooling  # noqa: F401
    from . import set_losses as _set_losses  # noqa: F401
    from . import set_transformer as _set_transformer  # noqa: F401
    from . import sinkhorn as _sinkhorn  # noqa: F401
    from . import topn_create as _topn_create  # noqa: F401
    from . import total_norm as _total_norm  # noqa: F401
    from . import valency as _valency  # noqa: F401


def _ops():
    if not AVAILABLE:
        raise RuntimeError(f"the native backend is unavailable: {UNAVAILABLE_REASON}")
    return torch.ops.topn_kernels


def cached_bytes() -> int:
    """Bytes the output pool holds for reuse (owned by no tensor)."""
    return int(_ops().cpu_cache_bytes())


def empty_cache() -> None:
    """Returns the pool's cached blocks to the system (tensors alive keep theirs)."""
    _ops().cpu_cache_clear()


def set_cache_limit(nbytes: int) -> int:
    """Sets the most bytes the pool keeps for reuse (0: none); returns the previous limit."""
    return int(_ops().cpu_cache_set_limit(nbytes))
