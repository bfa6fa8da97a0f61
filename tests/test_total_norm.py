"""The native total gradient norm (csrc/cpu/total_norm.cpp) that train_step clips by, against
the norm of all elements together and against clip_grad_norm_'s own."""

from __future__ import annotations

import pytest
import torch

from topn_kernels import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_total_norm_is_the_norm_of_everything(dtype):
    """Tensors of many shapes (scalars, empty, non-contiguous, sizes around the 8-way unroll),
    against float64 over their concatenation and torch's get_total_norm, at one thread and
    two (the same value bit for bit)."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g, dtype=dtype) for shape in ((), (0,), (7,), (9,))]
    tensors += [
        torch.randn(33, 17, generator=g, dtype=dtype).t(),
        1e3 * torch.ones(5, 3, dtype=dtype),
    ]
    tensors += [torch.randn(1000, generator=g, dtype=dtype)[::3]]
    exact = torch.cat([t.reshape(-1).double() for t in tensors]).norm()
    threads = torch.get_num_threads()
    try:
        values = []
        for count in (1, 2):
            torch.set_num_threads(count)
            values.append(torch.ops.topn_kernels.total_norm(tensors))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(values[0], values[1])
    got = values[0]
    assert got.dtype == dtype and got.dim() == 0
    rtol = 1e-7 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(tensors), rtol=1e-6, atol=0)


def test_native_total_norm_refuses_what_it_cannot_sum():
    op = torch.ops.topn_kernels.total_norm
    with pytest.raises(RuntimeError, match="empty list of Tensors"):
        op([])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match="one dtype"):
        op([torch.ones(3), torch.ones(3, dtype=torch.float64)])
