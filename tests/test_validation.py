"""Bad input is a TypeError/ValueError naming the argument, raised before any kernel runs
(docs/operators.md, Errors); NaN input is not an error and gives NaN, not a crash."""

from __future__ import annotations

import pytest
import torch

import topn_kernels as tk

from .helpers import topn_inputs


def _topn_call(**changes):
    """A valid topn_create call (B=3, n0=5, a=2, d=4, n=2) with some arguments replaced."""
    query, angles, table, bias, film = topn_inputs(3, 5, 2, 4)
    kwargs = {
        "query": query, "angles": angles, "table": table, "bias": bias, "n": 2, "film": film,
        "backend": "native",
    }  # fmt: skip
    kwargs.update(changes)
    return lambda: tk.topn_create(**kwargs)


META = torch.device("meta")

TOPN_CASES = [
    ("query-1d", {"query": torch.randn(3)}, ValueError, "query"),
    ("query-list", {"query": [[1.0, 2.0]]}, TypeError, "query"),
    ("query-int", {"query": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "query"),
    ("angles-a", {"angles": torch.randn(5, 3)}, ValueError, "angles"),
    ("table-n0", {"table": torch.randn(6, 4)}, ValueError, "table"),
    ("table-3d", {"table": torch.randn(5, 4, 1)}, ValueError, "table"),
    ("bias-d", {"bias": torch.randn(3, 5)}, ValueError, "bias"),
    ("bias-B", {"bias": torch.randn(2, 4)}, ValueError, "bias"),
    ("film-rows", {"film": torch.randn(3, 4)}, ValueError, "film"),
    ("film-d", {"film": torch.randn(4, 5)}, ValueError, "film"),
    ("mixed-dtype", {"table": torch.randn(5, 4, dtype=torch.float64)}, TypeError, "table"),
    ("other-device", {"bias": torch.empty(3, 4, device=META)}, ValueError, "bias"),
    ("n-zero", {"n": 0}, ValueError, "n must"),
    ("n-above-n0", {"n": 6}, ValueError, "n must"),
    ("n-float", {"n": 2.0}, TypeError, "n must"),
    ("n-bool", {"n": True}, TypeError, "n must"),
    ("n-tensor-zero", {"n": torch.tensor([1, 0, 2])}, ValueError, "n must"),
    ("n-tensor-above-n0", {"n": torch.tensor([1, 6, 2])}, ValueError, "n0"),
    ("n-tensor-length", {"n": torch.tensor([1, 2])}, ValueError, "n must"),
    ("n-tensor-2d", {"n": torch.ones(3, 1, dtype=torch.int64)}, ValueError, "n must"),
    ("n-tensor-float", {"n": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "n must"),
    ("n-tensor-device", {"n": torch.ones(3, dtype=torch.int64, device=META)}, ValueError, "n "),
    ("n_max-below-n", {"n_max": 1}, ValueError, "n_max"),
    ("n_max-below-max-n", {"n": torch.tensor([1, 3, 2]), "n_max": 2}, ValueError, "n_max"),
    ("n_max-float", {"n_max": 3.0}, TypeError, "n_max"),
    ("score_norm", {"score_norm": "softmax"}, ValueError, "score_norm"),
    ("sorted-int", {"sorted": 1}, TypeError, "sorted"),
    ("backend-unknown", {"backend": "cuda"}, ValueError, "backend"),
    ("backend-keops", {"backend": "keops"}, ValueError, "backend"),
]


@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [pytest.param(c, e, n, id=i) for i, c, e, n in TOPN_CASES],
)
def test_topn_create_rejects(changes, error, names):
    with pytest.raises(error, match=names):
        _topn_call(**changes)()


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _topn_call(backend="triton")()


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 6, 2, generator=g), torch.randn(3, 5, 2, generator=g)


LOSSES = {
    "chamfer": tk.chamfer_loss,
    "sinkhorn": tk.sinkhorn_loss,
}

LOSS_CASES = [
    ("x-2d", {"x": torch.randn(6, 2)}, ValueError, "x"),
    ("x-int", {"x": torch.ones(3, 6, 2, dtype=torch.int32)}, TypeError, "x"),
    ("y-D", {"y": torch.randn(3, 5, 3)}, ValueError, "y"),
    ("y-B", {"y": torch.randn(2, 5, 2)}, ValueError, "y"),
    ("y-dtype", {"y": torch.randn(3, 5, 2, dtype=torch.float64)}, TypeError, "y"),
    ("y-device", {"y": torch.empty(3, 5, 2, device=META)}, ValueError, "y"),
    ("x_lengths-zero", {"x_lengths": torch.tensor([1, 0, 6])}, ValueError, "x_lengths"),
    ("x_lengths-above-N", {"x_lengths": torch.tensor([1, 7, 6])}, ValueError, "x_lengths"),
    ("x_lengths-float", {"x_lengths": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "x_lengths"),
    ("x_lengths-size", {"x_lengths": torch.tensor([1, 2])}, ValueError, "x_lengths"),
    ("x_lengths-list", {"x_lengths": [1, 2, 3]}, TypeError, "x_lengths"),
    ("y_lengths-above-M", {"y_lengths": torch.tensor([1, 6, 5])}, ValueError, "y_lengths"),
    ("batch_reduction", {"batch_reduction": "max"}, ValueError, "batch_reduction"),
    ("backend-triton", {"backend": "triton"}, ValueError, "backend"),
]


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [pytest.param(c, e, n, id=i) for i, c, e, n in LOSS_CASES],
)
def test_losses_reject(loss, changes, error, names):
    x, y = _loss_inputs()
    kwargs = {"x": x, "y": y, **changes}
    with pytest.raises(error, match=names):
        loss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"point_reduction": "none"}, ValueError, "point_reduction"),
        ({"return_index": "yes"}, TypeError, "return_index"),
    ],
)
def test_chamfer_rejects(kwargs, error, names):
    with pytest.raises(error, match=names):
        tk.chamfer_loss(*_loss_inputs(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"blur": 0.0}, ValueError, "blur"),
        ({"blur": -1.0}, ValueError, "blur"),
        ({"scaling": 1.0}, ValueError, "scaling"),
        ({"scaling": 0}, ValueError, "scaling"),
        ({"diameter": -2.0}, ValueError, "diameter"),
        ({"p": 3}, ValueError, "p must"),
        ({"p": 2.0}, TypeError, "p must"),
        ({"debias": None}, TypeError, "debias"),
    ],
)
def test_sinkhorn_rejects(kwargs, error, names):
    with pytest.raises(error, match=names):
        tk.sinkhorn_loss(*_loss_inputs(), **kwargs)


@pytest.mark.parametrize(
    ("penalty", "kwargs", "error", "names"),
    [
        (tk.repulsion_penalty, {"lengths": torch.tensor([1, -1, 2])}, ValueError, "lengths"),
        (tk.repulsion_penalty, {"lengths": torch.tensor([1, 7, 2])}, ValueError, "lengths"),
        (tk.repulsion_penalty, {"min_dist": 0.0}, ValueError, "min_dist"),
        (tk.valency_penalty, {"neighbor_dist": -1.0}, ValueError, "neighbor_dist"),
        (tk.valency_penalty, {"max_valency": -1}, ValueError, "max_valency"),
        (tk.valency_penalty, {"max_valency": 2.5}, TypeError, "max_valency"),
        (tk.valency_penalty, {"x": torch.randn(6, 2)}, ValueError, "x"),
    ],
)
def test_penalties_reject(penalty, kwargs, error, names):
    kwargs = {"x": _loss_inputs()[0], **kwargs}
    with pytest.raises(error, match=names):
        penalty(**kwargs)


def test_losses_on_nan_points_give_nan():
    x, y = _loss_inputs()
    x[1, 2, 0] = float("nan")
    kwargs = {"batch_reduction": "none", "backend": "reference"}
    assert tk.chamfer_loss(x, y, **kwargs).isnan().tolist() == [False, True, False]
    assert tk.sinkhorn_loss(x, y, **kwargs)[1].isnan()
    assert tk.repulsion_penalty(x, backend="reference")[1].isnan()
    assert tk.valency_penalty(x, backend="reference")[1].isnan()
