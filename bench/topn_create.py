"""topn_create cases: named shapes x providers x directions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import topn_kernels as tk
from topn_kernels import reference


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n0: int
    n: int | tuple[int, int]  # fixed size, or per-set sizes uniform in [low, high]
    a: int
    d: int


SHAPES = [
    Shape("paper", 512, 70, (2, 35), 3, 64),
    Shape("point_cloud", 32, 4096, 2048, 8, 128),
    Shape("large_batch", 2048, 128, 64, 8, 256),
]


def providers(device: torch.device) -> dict[str, Callable]:
    """name -> topn_create-like callable (the same arguments as the public function)."""
    out = {
        "eager": reference.topn_create,
        "compile": torch.compile(reference.topn_create, dynamic=False),
    }
    if device.type == "cpu" and tk.native.AVAILABLE:
        out["native"] = lambda *args, **kw: tk.topn_create(*args, backend="native", **kw)
    return out


def make_case(shape: Shape, device: torch.device, dtype: torch.dtype = torch.float32):
    """Inputs (requiring grad), set sizes, n_max, and the bytes a forward must move."""
    g = torch.Generator().manual_seed(0)
    dims = [(shape.batch, shape.a), (shape.n0, shape.a), (shape.n0, shape.d),
            (shape.batch, shape.d), (4, shape.d)]  # fmt: skip
    inputs = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in dims]
    if isinstance(shape.n, tuple):
        sizes = torch.randint(shape.n[0], shape.n[1] + 1, (shape.batch,), generator=g)
        n, n_max = sizes.to(device), shape.n[1]
    else:
        sizes = torch.full((shape.batch,), shape.n)
        n, n_max = shape.n, shape.n
    es = inputs[0].element_size()
    slots = shape.batch * n_max
    nbytes = slots * (shape.d * es + 8 + es) + int(sizes.sum()) * shape.d * es
    return inputs, n, n_max, nbytes


def make_call(fn: Callable, inputs, n, n_max: int, direction: str) -> Callable[[], object]:
    """The timed closure: forward, or forward + backward from fixed upstream gradients."""
    query, angles, table, bias, film = inputs

    def forward():
        return fn(query, angles, table, bias, n, film, n_max=n_max)

    if direction == "fwd":

        def forward_only():
            with torch.no_grad():
                return forward()

        return forward_only
    out = forward()
    g = torch.Generator().manual_seed(1)
    grad_x = torch.randn(out[0].shape, generator=g).to(out[0])
    grad_w = torch.randn(out[3].shape, generator=g).to(out[3])

    def forward_backward():
        x, _, _, weight = forward()
        return torch.autograd.grad((x, weight), inputs, (grad_x, grad_w))

    return forward_backward
