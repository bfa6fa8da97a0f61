"""Triton kernels of topn_kernels (GPU; on CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package does not import Triton: ``unavailable()`` imports it when asked, and the
kernels are defined at the first call. Whether Triton compiles or interprets a kernel is fixed
when it is defined, and for Triton's own helpers (``tl.sum``...) when ``triton`` is imported:
to run the kernels on CPU tensors, set ``TRITON_INTERPRET=1`` before anything imports
``triton``.

- ``topn_create_forward.py``, ``topn_create_backward.py``: the kernels;
- ``topn_create_launch.py``: which path each call takes (selection method, writer,
  backward; ``TOPN_KERNELS_TRITON_PATHS``), launch configurations, the host forward and
  backward: the kernels that the op ``topn_kernels::topn_create``
  (``topn_kernels/ops/topn_create_op.py``, shared with the native backend) runs for
  ``backend="triton"``;
- ``set2graph_forward.py``, ``set2graph_backward.py``: the pair kernels of set2graph_logits;
- ``set2graph_launch.py``: their tile sizes, the host forward and backward: the kernels that
  the op ``topn_kernels::set2graph_logits`` (``topn_kernels/ops/set2graph_op.py``, shared with
  the native backend) runs for ``backend="triton"``;
- ``_math.py``: exactly rounded arithmetic and ranking keys shared by the kernels.

``unavailable`` is the same for every operator: the kernels of both run wherever Triton does.
"""

from __future__ import annotations

import os

import torch


def _interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` is set (read from os.environ, which torch.compile can trace, rather
    than through triton.knobs, which it cannot)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_interprets() -> bool:
    """Whether triton was imported in interpreter mode (its own jit helpers, such as tl.sum,
    are interpreted)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def unavailable(device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the Triton backend cannot run on ``device`` (exception type, reason), or None."""
    if device.type not in ("cuda", "cpu"):
        return ValueError, f"the Triton backend runs on CUDA tensors, got {device} tensors"
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return RuntimeError, f"triton is not installed ({err})"
    if device.type == "cpu" and not _interpreter_requested():
        return ValueError, (
            "the Triton backend runs on CUDA tensors; CPU tensors only under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    if device.type == "cpu" and not _triton_interprets():
        return ValueError, "TRITON_INTERPRET=1 was set after triton was imported: set it before"
    if device.type == "cuda" and not torch.cuda.is_available():
        return RuntimeError, "torch finds no CUDA device"
    return None
