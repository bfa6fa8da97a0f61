"""Quiet, lazy access to pykeops."""

from __future__ import annotations

import contextlib
import functools
import io
import os
from types import ModuleType


@functools.cache
def pykeops() -> ModuleType:
    """The pykeops module, imported once. Unless the user asked for KeOps' messages (by
    setting KEOPS_VERBOSE or PYKEOPS_VERBOSE), its import-time notices are swallowed and its
    compile notices switched off."""
    if "KEOPS_VERBOSE" in os.environ or "PYKEOPS_VERBOSE" in os.environ:
        import pykeops as module
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            import pykeops as module
        module.set_verbose(False)
    return module


def lazy_tensor(*args, **kwargs):
    """pykeops.torch.LazyTensor."""
    pykeops()
    from pykeops.torch import LazyTensor

    return LazyTensor(*args, **kwargs)
