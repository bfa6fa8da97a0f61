"""Loss and penalty cases: Chamfer, Sinkhorn and the pairwise penalties (docs/operators.md,
sections "chamfer_loss", "sinkhorn_loss", "repulsion_penalty" and "valency_penalty"), on ragged
batches at the paper's scale and on large sets, against dense PyTorch and geomloss.

Providers: ``eager`` (the dense reference), ``compile`` (torch.compile of it, paper scale),
``keops``, ``native`` (C++, CPU), ``auto`` (what the public function picks), ``cdist``
(dense ``torch.cdist`` + min, the usual Chamfer), ``geomloss_online`` /
``geomloss_tensorized`` (the peer library's Sinkhorn). Dense providers run only where their
(B, N, M) matrices fit comfortably.

Directions: ``fwd`` under no_grad, ``fwd+bwd`` (the forward and ``torch.autograd.grad``) and,
at the paper's scale, ``step``: a training step, the forward, ``loss.backward()``, then the
grads set to None. :func:`cpu_targets` reads the paper-scale rows.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import topn_kernels as tk
from topn_kernels import reference

from .cases import DIRECTIONS, Case, fresh_compile

SINKHORN = {"blur": 0.05, "scaling": 0.5}
PENALTIES = {
    "repulsion_penalty": {"min_dist": 1.0},
    "valency_penalty": {"neighbor_dist": 2.0, "max_valency": 4},
}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n: int | tuple[int, int]  # fixed set size, or sizes uniform in [low, high] (ragged)
    dim: int = 3
    dense: bool = True  # whether dense (B, N, M) providers run
    heavy: bool = False  # one timed call only (memory targets)
    cdist: bool = False  # dense torch.cdist runs although the other dense providers don't


def _kwargs(op: str) -> dict:
    """The operator's keyword arguments besides the sets."""
    return SINKHORN if op == "sinkhorn_loss" else PENALTIES.get(op, {})


def _shapes(op: str, device: torch.device) -> list[Shape]:
    paper = Shape("paper", 64, (2, 35))
    if op == "chamfer_loss":
        return [
            paper,
            Shape("n1024", 16, 1024),
            Shape("n8192", 4, 8192, dense=False, cdist=True),
            Shape("n30000", 2, 30000, dense=False, heavy=True),
        ]
    if op == "sinkhorn_loss":
        large = [Shape("n8192", 4, 8192, dense=False)] if device.type == "cuda" else []
        return [
            paper,
            Shape("n512", 8, 512),
            Shape("n2048", 2, 2048, dense=False),
            *large,
            Shape("n8000", 2, 8000, dense=False, heavy=True),
        ]
    return [paper, Shape("n1024", 8, 1024)]


def _sets(shape: Shape, device: torch.device, seed: int):
    """Padded sets (B, N, D) requiring grad, with lengths (None when every set is full)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(shape.n, tuple):
        lengths = torch.randint(shape.n[0], shape.n[1] + 1, (shape.batch,), generator=g)
        size = shape.n[1]
    else:
        lengths, size = None, shape.n
    x = torch.randn(shape.batch, size, shape.dim, generator=g)
    if lengths is not None:
        lengths = lengths.to(device)
    return x.to(device).requires_grad_(), lengths


def _geomloss(backend: str) -> Callable:
    """geomloss's SamplesLoss, built at the first call (listing cases imports nothing)."""

    @functools.cache
    def loss():
        from topn_kernels.keops._pykeops import pykeops

        pykeops()  # a quiet import first: geomloss imports pykeops
        import geomloss

        return geomloss.SamplesLoss("sinkhorn", p=2, backend=backend, **SINKHORN)

    return lambda x, y, xl, yl: loss()(x, y).mean()


def _cdist_chamfer(x, y, xl, yl):
    d2 = torch.cdist(x, y) ** 2
    return (d2.min(2).values.mean(1) + d2.min(1).values.mean(1)).mean()


def _providers(op: str, shape: Shape, device: torch.device) -> dict[str, Callable]:
    """name -> f(x, y, x_lengths, y_lengths) (penalties: f(x, lengths))."""
    public = getattr(tk, op)
    kwargs = _kwargs(op)
    out: dict[str, Callable] = {}
    if shape.dense:
        ref = functools.partial(getattr(reference, op), **kwargs)
        out["eager"] = ref
        if shape.name == "paper" and op != "sinkhorn_loss":  # the Sinkhorn loop reads floats
            out["compile"] = torch.compile(ref, dynamic=False)
    out["keops"] = functools.partial(public, backend="keops", **kwargs)
    if device.type == "cpu" and tk.native.AVAILABLE:
        out["native"] = functools.partial(public, backend="native", **kwargs)
    if not shape.heavy:
        out["auto"] = functools.partial(public, backend="auto", **kwargs)
    if op == "chamfer_loss" and (shape.dense or shape.cdist) and isinstance(shape.n, int):
        out["cdist"] = _cdist_chamfer
    has_geomloss = importlib.util.find_spec("geomloss") is not None
    if op == "sinkhorn_loss" and isinstance(shape.n, int) and not shape.heavy and has_geomloss:
        out["geomloss_online"] = _geomloss("online")
        if shape.dense or shape.name == "n2048":
            out["geomloss_tensorized"] = _geomloss("tensorized")
    return out


def _timed(fn: Callable, args: tuple, direction: str) -> Callable[[], object]:
    def forward():
        value = fn(*args)
        return value.sum() if value.dim() else value

    if direction == "fwd":

        def forward_only():
            with torch.no_grad():
                return forward()

        return forward_only
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), inputs)

    def step():
        forward().backward()
        for t in inputs:
            t.grad = None

    return step


def cases(device: torch.device) -> Iterator[Case]:
    for op in ("chamfer_loss", "sinkhorn_loss", *PENALTIES):
        pairwise = op in PENALTIES
        for shape in _shapes(op, device):
            params = {"B": shape.batch, "N": shape.n, "D": shape.dim, **_kwargs(op)}
            directions = (*DIRECTIONS, "step") if shape.name == "paper" else DIRECTIONS
            for direction in directions:
                for name, fn in _providers(op, shape, device).items():

                    def build(
                        fn=fn, shape=shape, direction=direction, pairwise=pairwise, name=name
                    ):
                        fresh_compile(name)
                        x, xl = _sets(shape, device, seed=0)
                        if pairwise:
                            return _timed(fn, (x, xl), direction)
                        y, yl = _sets(shape, device, seed=1)
                        return _timed(fn, (x, y, xl, yl), direction)

                    # dense cdist past the dense shapes takes seconds: one call
                    heavy = shape.heavy or (name == "cdist" and not shape.dense)
                    yield Case(op, shape.name, direction, name, params, None, build, heavy=heavy)


def cpu_targets(rows: list[dict]) -> list[dict]:
    """The CPU targets of the losses at the paper's scale (B=64, sets of 2..35 points), from
    the rows of one run: with ``auto``, the training step >= 2x torch.compile of the reference
    and the forward >= 1x (never slower). Sinkhorn has no compiled baseline: torch.compile of
    the reference recompiles at every new schedule (its eps values are Python floats read from
    the data). Each entry: target, shape, measured (None if a row is missing), met."""
    ms = {(r["op"], r["direction"], r["provider"]): r["ms"] for r in rows if r["shape"] == "paper"}
    out = []
    for op in ("chamfer_loss", "repulsion_penalty", "valency_penalty"):
        for direction, bound in (("step", 2.0), ("fwd", 1.0)):
            base, ours = ms.get((op, direction, "compile")), ms.get((op, direction, "auto"))
            x = None if base is None or ours is None else base / ours
            text = f"{op} {direction}: auto >= {bound:g}x torch.compile(reference)"
            met = x is not None and x >= bound
            out.append({"target": text, "shape": "paper", "measured": x, "met": met})
    return out
