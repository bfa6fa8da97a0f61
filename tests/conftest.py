"""Test session set-up.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors: that mode
is chosen when the kernels are defined (the first Triton call), so it is set here, before any
test runs. An explicit ``TRITON_INTERPRET`` in the environment wins.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # fix the mode now: a test that changes TRITON_INTERPRET must not import triton under it
    import triton  # noqa: F401
except ImportError:
    pass
