"""The native operators as torch.library ops: opcheck (schema, fake kernels, autograd
registration, AOT dispatch). torch.compile(fullgraph=True) of a model using topn_create is
in tests/test_topn_create.py, for every backend."""

from __future__ import annotations

import pytest
import torch

OPS = torch.ops.topn_kernels


@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_sinkhorn(with_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, requires_grad=with_grad)
    y = torch.randn(7, 3, generator=g, requires_grad=with_grad)
    x_offsets, y_offsets = torch.tensor([0, 4, 9]), torch.tensor([0, 2, 7])
    args = (x, y, x_offsets, y_offsets, [4.0, 1.0, 0.25, 0.0025], 2, True, with_grad)
    torch.library.opcheck(OPS.sinkhorn.default, args)
