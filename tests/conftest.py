"""Test session set-up.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors: that mode
is chosen when the kernels are defined (the first Triton call), so it is set here, before any
test runs. An explicit ``TRITON_INTERPRET`` in the environment wins.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # fix the mode now: a test that changes TRITON_INTERPRET must not import triton under it
    import triton  # noqa: F401
except ImportError:
    pass


@pytest.fixture(autouse=True)
def poisoned_memory():
    """Fresh buffers hold NaN (floats), the largest value (integers) or True (bool), whoever
    allocates them (torch.empty in Python, at::empty and the native output pool in C++), so
    a kernel that reads memory it never wrote, or leaves an output element unwritten, fails
    its test. This is PyTorch's ``fill_uninitialized_memory``, which acts only with
    deterministic algorithms on: ``warn_only`` keeps ops without a deterministic version
    running. The Triton backward therefore runs its deterministic path by default here; tests
    of its atomic path patch ``topn_kernels.ops.topn_create_op.deterministic_backward``.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
