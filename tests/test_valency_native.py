"""The native one-hot valencies of the authors' encoder (csrc/cpu/valency.cpp,
topn_kernels/native/valency.py) against topn_kernels.metrics.valency_counts and a one-hot:
the same classes, at the neighbour threshold too; its refusals, fake kernel, and the encoder's
use of it."""

import pytest
import torch
import torch.nn.functional as F

from topn_kernels import native
from topn_kernels.metrics import valency_counts
from topn_kernels.models import AuthorsConfig, AuthorsSetVAE

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

if native.AVAILABLE:
    from topn_kernels.native.valency import supports, valency_onehot


def _reference(x: torch.Tensor, dist: float, classes: int) -> torch.Tensor:
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    counts = valency_counts(x, mask, dist)
    return F.one_hot((counts - 1).clamp(0, classes - 1), classes).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(1, 2, 3), (7, 5, 3), (128, 6, 3), (3, 35, 3), (4, 9, 2), (5, 8, 1)]
)
def test_classes_match_the_reference(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 1.6).contiguous()
    for dist, classes in ((2.0, 4), (1.0, 3), (3.5, 6), (2.0, 1)):
        out = valency_onehot(x, dist, classes)
        assert out.dtype == dtype and out.shape == (*shape[:2], classes)
        assert torch.equal(out, _reference(x, dist, classes))


def test_points_at_and_around_the_threshold_and_nan_points():
    """Neighbours at exactly the distance (not counted), one ulp inside and outside it, on a
    grid where many distances are exactly 2; a NaN point has no neighbours and is no one's."""
    grid = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.2, 1.6, 0.0]])
    near = torch.nextafter(torch.tensor(2.0), torch.tensor(0.0)).item()
    far = torch.nextafter(torch.tensor(2.0), torch.tensor(4.0)).item()
    ring = torch.tensor([[0.0, 0.0, 0.0], [near, 0.0, 0.0], [0.0, far, 0.0], [0.0, 0.0, -2.0]])
    nan = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0, 0]])
    for dtype in (torch.float32, torch.float64):
        x = torch.stack([grid, ring, nan]).to(dtype)
        out = valency_onehot(x, 2.0, 4)
        assert torch.equal(out, _reference(x, 2.0, 4))
        assert out[2, 1].tolist() == [1, 0, 0, 0]  # the NaN point: no neighbours
        assert out[2, 0].argmax() == 1  # two neighbours left, not three


def test_empty_batches_and_single_points():
    for shape in ((0, 4, 3), (3, 1, 3), (2, 0, 3)):
        x = torch.zeros(shape)
        assert torch.equal(valency_onehot(x, 2.0, 4), _reference(x, 2.0, 4))


def test_refuses_what_it_does_not_take():
    x = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="x must be"):
        valency_onehot(torch.zeros(2, 3, 4), 2.0, 4)  # d > 3: cdist's sums run vectorised
    with pytest.raises(ValueError, match="x must be"):
        valency_onehot(torch.zeros(2, 3, 3, dtype=torch.int64), 2.0, 4)
    with pytest.raises(ValueError, match="x must be"):
        valency_onehot(torch.zeros(6, 3), 2.0, 4)
    with pytest.raises(ValueError, match="classes"):
        valency_onehot(x, 2.0, 0)
    assert not supports(torch.zeros(2, 3, 4)) and supports(x)


def test_gradients_do_not_flow_and_the_fake_kernel_agrees():
    x = torch.randn(3, 5, 3, requires_grad=True)
    out = valency_onehot(x, 2.0, 4)
    assert not out.requires_grad
    torch.library.opcheck(torch.ops.topn_kernels.valency_onehot.default, (x.detach(), 2.0, 4))


def test_the_encoder_uses_it_and_gives_the_plain_models_classes():
    model = AuthorsSetVAE(AuthorsConfig(), native=True)
    x = torch.randn(16, 7, 3) * 1.5
    calls = []
    original = native.valency.valency_onehot

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    native.valency.valency_onehot = counting
    try:
        native_out = model.encoder.valency_onehot(x)
    finally:
        native.valency.valency_onehot = original
    assert calls == [x.shape]
    model.use_native(False)
    assert torch.equal(native_out, model.encoder.valency_onehot(x))
