"""set2graph_logits cases (docs/operators.md, set2graph_logits; the oracle is
topn_kernels/reference.py): named shapes x providers x directions.

Providers: ``eager`` (the reference: the dense (B, n, n, 2s) pairs through the MLP),
``compile`` (torch.compile of the plain formulation, ``nn.Sequential(Linear, ReLU, Linear)`` on
cat(x_i, x_j) at a fixed n, padding masked as the reference does; compiled, and run once, when
the case is built, outside the timed region), ``native`` (the C++ kernels, CPU) and ``triton``
(the Triton kernels, CUDA only; run once when the case is built, so that the kernels are
compiled outside the timed region).

Directions: ``fwd`` under no_grad, and ``fwd+bwd`` timed as a training step: the forward, the
loss ``(out * g).sum()`` for a fixed random g, ``loss.backward()``, then every gradient set to
None (so each step allocates its gradients, as a training loop with ``zero_grad()`` does).

Shapes: ``qm9`` (B=512 sets of 1..9 points, s=64, h=64, k=4), ``large`` (B=4 sets of 1024
points, s=64, h=128, k=4; the dense providers need about 10 GB and take seconds to minutes per
call there, so they run once, as heavy cases), and the memory case ``n4096`` (one set of 4096
points, h=128: native and triton only, one timed call with its peak memory; the dense providers
would hold (n^2, h) activations, about 17 GB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import topn_kernels as tk
from topn_kernels import reference

from .cases import DIRECTIONS, Case, fresh_compile


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n: int
    s: int
    h: int
    k: int
    ragged: bool = False  # lengths uniform in [1, n], else every set has n points
    dense_heavy: bool = False  # eager and compile: one timed call
    native_only: bool = False  # memory case: the dense providers would not fit (native, triton)


SHAPES = [
    Shape("qm9", 512, 9, 64, 64, 4, ragged=True),
    Shape("large", 4, 1024, 64, 128, 4, dense_heavy=True),
    Shape("n4096", 1, 4096, 64, 128, 4, native_only=True),
]


def plain(mlp: nn.Sequential, x: Tensor, lengths: Tensor) -> Tensor:
    """The plain formulation: the MLP on the concatenated pairs (B, n, n, 2s), padding rows of
    x replaced by 0 first and pairs with a padding point set to 0, as the reference does."""
    n = x.shape[1]
    mask = torch.arange(n, device=x.device)[None, :] < lengths[:, None]
    x = torch.where(mask[..., None], x, 0.0)
    pairs = torch.cat([x[:, :, None].expand(-1, -1, n, -1), x[:, None].expand(-1, n, -1, -1)], -1)
    out = mlp(pairs)
    return torch.where((mask[:, :, None] & mask[:, None, :])[..., None], out, 0.0)


def _providers(shape: Shape, device: torch.device) -> dict[str, tuple[Callable, bool]]:
    """name -> (make(mlp) -> f(x, lengths), heavy)."""
    out: dict[str, tuple[Callable, bool]] = {}
    if not shape.native_only:

        def eager(mlp):
            weights = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
            return lambda x, lengths: reference.set2graph_logits(x, *weights, lengths)

        def compiled(mlp):
            fn = torch.compile(plain, dynamic=False)
            return lambda x, lengths: fn(mlp, x, lengths)

        out["eager"] = (eager, shape.dense_heavy)
        out["compile"] = (compiled, shape.dense_heavy)
    if device.type == "cpu" and tk.native.AVAILABLE:

        def native(mlp):
            weights = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
            return lambda x, lengths: tk.set2graph_logits(x, *weights, lengths, backend="native")

        out["native"] = (native, shape.native_only)
    if device.type == "cuda" and tk.triton.unavailable(device) is None:

        def triton(mlp):
            weights = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
            return lambda x, lengths: tk.set2graph_logits(x, *weights, lengths, backend="triton")

        out["triton"] = (triton, shape.native_only)
    return out


def make_inputs(shape: Shape, device: torch.device) -> tuple[nn.Sequential, Tensor, Tensor]:
    """The MLP (seeded), x (B, n, s) requiring grad and the lengths (B,) int64."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2 * shape.s, shape.h), nn.ReLU(), nn.Linear(shape.h, shape.k))
    x = torch.randn(shape.batch, shape.n, shape.s, generator=g)
    if shape.ragged:
        lengths = torch.randint(1, shape.n + 1, (shape.batch,), generator=g)
    else:
        lengths = torch.full((shape.batch,), shape.n)
    return mlp.to(device), x.to(device).requires_grad_(), lengths.to(device)


def timed_call(
    fn: Callable, mlp: nn.Module, x: Tensor, lengths: Tensor, direction: str
) -> Callable[[], object]:
    """Forward under no_grad, or a training step: forward, loss, backward, gradients to None."""
    if direction == "fwd":

        def forward_only():
            with torch.no_grad():
                return fn(x, lengths)

        return forward_only
    b, n, k = x.shape[0], x.shape[1], mlp[2].out_features
    g = torch.randn(b, n, n, k, generator=torch.Generator().manual_seed(2)).to(x.device)
    leaves = [x, *mlp.parameters()]

    def training_step():
        loss = (fn(x, lengths) * g).sum()
        loss.backward()
        for t in leaves:
            t.grad = None
        return loss

    return training_step


def cases(device: torch.device) -> Iterator[Case]:
    for shape in SHAPES:
        params = {"B": shape.batch, "n": shape.n, "s": shape.s, "h": shape.h, "k": shape.k}
        params["lengths"] = f"1..{shape.n}" if shape.ragged else str(shape.n)
        for direction in DIRECTIONS:
            for name, (make, heavy) in _providers(shape, device).items():

                def build(make=make, shape=shape, direction=direction, name=name):
                    fresh_compile(name)
                    mlp, x, lengths = make_inputs(shape, device)
                    call = timed_call(make(mlp), mlp, x, lengths, direction)
                    if name in ("compile", "triton"):
                        call()  # compiles: outside the timed region
                    return call

                op = "set2graph_logits"
                yield Case(op, shape.name, direction, name, params, None, build, heavy=heavy)
