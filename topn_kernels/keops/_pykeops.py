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


def needs_coordinates(reference_impl):
    """Decorator of a KeOps loss ``fn(x, ...)``: KeOps formulas need points of at least one
    coordinate, so a call whose points ``x`` (..., D) have D = 0 (every distance 0) runs
    ``reference_impl`` with the same arguments instead."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(x, *args, **kwargs):
            if x.shape[-1] == 0:
                return reference_impl(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        return run

    return wrap


def lazy_tensor(*args, **kwargs):
    """pykeops.torch.LazyTensor."""
    pykeops()
    from pykeops.torch import LazyTensor

    return LazyTensor(*args, **kwargs)
