"""The native operators as torch.library ops: opcheck (schema, fake kernels, autograd
registration, AOT dispatch). torch.compile(fullgraph=True) of a model using topn_create is
in tests/test_topn_create.py, for every backend."""

from __future__ import annotations

import pytest
import torch

import topn_kernels as tk

from .helpers import random_sizes, topn_inputs

OPS = torch.ops.topn_kernels


@pytest.mark.parametrize(
    ("n_max", "score_norm", "sorted"), [(35, "selected", True), (40, "all", False)]
)
def test_opcheck_forward(n_max, score_norm, sorted):
    inputs = topn_inputs(6, 70, 3, 8, requires_grad=True)
    n = random_sizes(6, 2, 35)
    args = (*inputs[:4], n, inputs[4], n_max, score_norm, sorted)
    torch.library.opcheck(OPS.topn_create.default, args)


@pytest.mark.parametrize("score_norm", ["selected", "all"])
def test_opcheck_backward(score_norm):
    inputs = topn_inputs(6, 70, 3, 8)
    n = random_sizes(6, 2, 35)
    index = tk.topn_create(*inputs[:4], n, inputs[4], score_norm=score_norm).index
    grad_x, grad_weight = torch.randn(6, 35, 8), torch.randn(6, 35)
    args = (grad_x, grad_weight, *inputs, index, score_norm)
    torch.library.opcheck(OPS.topn_create_backward.default, args)


@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_sinkhorn(with_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, requires_grad=with_grad)
    y = torch.randn(7, 3, generator=g, requires_grad=with_grad)
    x_offsets, y_offsets = torch.tensor([0, 4, 9]), torch.tensor([0, 2, 7])
    args = (x, y, x_offsets, y_offsets, [4.0, 1.0, 0.25, 0.0025], 2, True, with_grad)
    torch.library.opcheck(OPS.sinkhorn.default, args)
