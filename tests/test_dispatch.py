"""Backend selection (docs/operators.md, Backends and dispatch) and the package without its
C++ extension."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import topn_kernels as tk
from topn_kernels.ops import _dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)


LOSSES = ("chamfer_loss", "sinkhorn_loss", "repulsion_penalty", "valency_penalty")


def test_auto_picks_native_on_cpu():
    assert _dispatch.resolve("topn_create", "auto", CPU) == "native"
    for op in LOSSES:
        assert _dispatch.resolve(op, "auto", CPU) == "native"
        assert _dispatch.resolve(op, "auto", CPU, small=True) == "native"
        assert _dispatch.resolve(op, "auto", CUDA) == "keops"


def test_auto_passes_over_a_slow_native_backend_to_keops():
    """``slow``: auto prefers KeOps (or, KeOps unavailable, still the native backend); an
    explicit request runs the native backend."""
    assert _dispatch.resolve("chamfer_loss", "auto", CPU, slow=("native",)) == "keops"
    assert _dispatch.resolve("chamfer_loss", "native", CPU, slow=("native",)) == "native"


def test_auto_on_cuda_falls_back_to_reference_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(
        _dispatch.triton_backend, "unavailable", lambda device: (RuntimeError, "no GPU here")
    )
    with pytest.warns(RuntimeWarning, match="'triton' unavailable \\(no GPU here\\)"):
        assert _dispatch.resolve("topn_create", "auto", CUDA) == "reference"


NO_NATIVE = {"native": "an option the native backend lacks"}


def test_auto_picks_keops_for_losses_and_the_reference_for_small_ones():
    """Where the native backend cannot run the call (an option it lacks)."""
    assert _dispatch.resolve("chamfer_loss", "auto", CPU, unsupported=NO_NATIVE) == "keops"
    with warnings_as_errors():  # a deliberate choice, not a fallback: no warning
        small = _dispatch.resolve("chamfer_loss", "auto", CPU, small=True, unsupported=NO_NATIVE)
        assert small == "reference"
    assert _dispatch.resolve("chamfer_loss", "keops", CPU, small=True) == "keops"
    with pytest.raises(ValueError, match="an option the native backend lacks"):
        _dispatch.resolve("chamfer_loss", "native", CPU, unsupported=NO_NATIVE)


def test_auto_falls_back_to_reference_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(
        _dispatch.keops_backend, "unavailable", lambda device: (RuntimeError, "no pykeops")
    )
    with pytest.warns(RuntimeWarning, match="'keops' unavailable \\(no pykeops\\)"):
        assert _dispatch.resolve("chamfer_loss", "auto", CPU, unsupported=NO_NATIVE) == "reference"
    with warnings_as_errors():  # the same reason is not repeated
        assert _dispatch.resolve("chamfer_loss", "auto", CPU, unsupported=NO_NATIVE) == "reference"
        # a slow native backend still beats the reference
        assert _dispatch.resolve("chamfer_loss", "auto", CPU, slow=("native",)) == "native"
    with pytest.raises(RuntimeError, match="no pykeops"):
        _dispatch.resolve("chamfer_loss", "keops", CPU)


def test_explicit_backend_that_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="native backend runs on CPU"):
        _dispatch.resolve("topn_create", "native", CUDA)


def test_environment_variable_replaces_auto_only(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.resolve("topn_create", "auto", CPU) == "reference"
    assert _dispatch.resolve("topn_create", "native", CPU) == "native"
    monkeypatch.setenv(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _dispatch.resolve("topn_create", "auto", CPU)


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_package_imports_without_the_extension():
    """With topn_kernels._C hidden, the package imports, native says why it is missing,
    auto falls back to the reference and an explicit native request is an error."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "topn_kernels._C":
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Hide())
        import torch, topn_kernels as tk
        from topn_kernels import native
        assert not native.AVAILABLE and "not built" in native.UNAVAILABLE_REASON
        shapes = [(2, 3), (5, 3), (5, 4), (2, 4)]
        args = (*[torch.randn(s) for s in shapes], 2, torch.randn(4, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tk.topn_create(*args)
        assert out.x.shape == (2, 2, 4) and "not built" in str(caught[0].message)
        try:
            tk.topn_create(*args, backend="native")
        except RuntimeError as err:
            assert "not built" in str(err)
        else:
            raise AssertionError("backend='native' ran without the extension")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_record_backends_counts_what_ran():
    import topn_kernels as tk

    x = torch.randn(2, 5, 3)
    with tk.record_backends() as calls:
        tk.chamfer_loss(x, x)  # on CPU: native
        tk.chamfer_loss(x, x, backend="keops")
        shapes = [(2, 3), (6, 3), (6, 4), (2, 4)]  # query, angles, table, bias
        tk.topn_create(*[torch.randn(s) for s in shapes], 2, torch.randn(4, 4))
    assert calls == {"chamfer_loss": {"native": 1, "keops": 1}, "topn_create": {"native": 1}}
    tk.chamfer_loss(x, x)  # no longer recorded
    assert sum(calls["chamfer_loss"].values()) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y, b: tk.chamfer_loss(x, y, backend=b),
        lambda x, y, b: tk.sinkhorn_loss(x, y, backend=b),
        lambda x, y, b: tk.repulsion_penalty(x, backend=b, min_dist=1.5),
        lambda x, y, b: tk.valency_penalty(x, backend=b),
    ],
    ids=["chamfer", "sinkhorn", "repulsion", "valency"],
)
def test_keops_points_without_coordinates_give_the_reference(call):
    """KeOps formulas need a coordinate: points of dimension 0 (every distance 0) take the
    reference's path, value and gradient, instead of an error from inside KeOps."""
    x = torch.randn(2, 4, 0, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 0, dtype=torch.float64)
    got, want = call(x, y, "keops"), call(x, y, "reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.requires_grad
