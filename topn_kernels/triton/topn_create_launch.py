"""Host side of the Triton topn_create: launch configurations, forward and backward.

``forward`` and ``backward`` take validated inputs (``topn_kernels.ops``: one dtype and device,
consistent shapes, ``n`` int64 (B,) in [1, min(n0, n_max)] in eager mode; under
``torch.compile`` the kernels clamp ``n`` rather than read out of bounds). Each ``*_launch``
function gives one kernel's grid, constexprs and compile options for a shape: the
interpreter's (few, large programs: each program costs Python time) or a GPU's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from .._ragged import compute_dtype
from . import _math, topn_create_backward, topn_create_forward

# Sets of up to this many reference points are scored once, into registers; larger ones in
# chunks of SELECT_CHUNK points, scored again at every pass of the selection.
SELECT_ONE_BLOCK_MAX = 4096
SELECT_CHUNK = 1024


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def _tile(is_f64: bool, interpret: bool) -> int:
    """Elements of the largest 2-D tile of a program."""
    return (1 << 15 if interpret else 1 << 12) >> int(is_f64)


@dataclass(frozen=True)
class Launch:
    grid: tuple[int, ...]
    meta: dict  # constexprs
    num_warps: int = 4
    fp_fusion: bool = False  # False: a * b + c rounds twice, as in the reference

    def __call__(self, kernel, *args) -> None:
        """Launches ``kernel``; the interpreter ignores the compile options."""
        kernel[self.grid](
            *args, **self.meta, num_warps=self.num_warps, enable_fp_fusion=self.fp_fusion
        )


def normalize_launch(n0: int, is_f64: bool, interpret: bool) -> Launch:
    block = min(_pow2(n0, 16), 4096 if interpret else 256)
    return Launch((triton.cdiv(n0, block),), {"BLOCK": block, "IS_F64": is_f64})


def select_launch(
    batch: int, n0: int, sorted: bool, score_all: bool, is_f64: bool, interpret: bool
) -> Launch:
    one_chunk = n0 <= SELECT_ONE_BLOCK_MAX
    block_n = _pow2(n0, 16) if one_chunk else SELECT_CHUNK
    num_warps = min(16, max(4, block_n // 256))
    # the ranking compares BLOCK_R x BLOCK_R tiles: at most 16 pairs per thread on a GPU
    block_r = 64 if interpret or num_warps > 4 else 32
    meta = {
        "BLOCK_N": block_n,
        "ONE_CHUNK": one_chunk,
        "BLOCK_R": block_r,
        "SORTED": sorted,
        "SCORE_ALL": score_all,
        "IS_F64": is_f64,
    }
    return Launch((batch,), meta, num_warps=num_warps)


def film_launch(rows: int, d: int, write_weight: bool, is_f64: bool, interpret: bool) -> Launch:
    block_d = _pow2(d, 16) if interpret else min(_pow2(d, 16), 256)
    block_r = min(_pow2(rows), max(1, _tile(is_f64, interpret) // block_d))
    grid = (triton.cdiv(rows, block_r), max(1, triton.cdiv(d, block_d)))
    meta = {"BLOCK_R": block_r, "BLOCK_D": block_d, "WRITE_WEIGHT": write_weight, "IS_F64": is_f64}
    return Launch(grid, meta, num_warps=8)


def set_backward_launch(
    batch: int,
    n0: int,
    a: int,
    d: int,
    n_max: int,
    score_all: bool,
    atomic: bool,
    is_f64: bool,
    interpret: bool,
) -> Launch:
    tile = _tile(is_f64, interpret) // 2
    block_d = _pow2(d, 16)  # a slot's whole row in one tile
    meta = {
        "A_BLOCK": _pow2(a, 2),
        "BLOCK_D": block_d,
        "BLOCK_J": min(_pow2(n_max), max(1, tile // block_d)),
        "BLOCK_N": min(_pow2(n0, 16), max(16, tile // _pow2(a, 2))),
        "SCORE_ALL": score_all,
        "ATOMIC": atomic,
        "IS_F64": is_f64,
    }
    return Launch((batch,), meta, fp_fusion=True)


def gather_launch(
    n0: int, a: int, d: int, slots: int, angles: bool, is_f64: bool, interpret: bool
) -> Launch:
    block_d = _pow2(d, 16)
    meta = {
        "A_BLOCK": _pow2(a, 2),
        "BLOCK_D": block_d,
        "BLOCK_S": min(_pow2(slots), max(1, _tile(is_f64, interpret) // 2 // block_d)),
        "ANGLES": angles,
        "IS_F64": is_f64,
    }
    return Launch((n0,), meta, fp_fusion=True)


def finish_launch(
    n0: int, a: int, batch: int, dense: bool, is_f64: bool, interpret: bool
) -> Launch:
    block_i = min(_pow2(n0, 16), 256 if interpret else 32)
    meta = {
        "A_BLOCK": _pow2(a, 2),
        "BLOCK_I": block_i,
        "BLOCK_B": min(_pow2(batch, 2), 64 if interpret else 16),
        "DENSE": dense,
        "IS_F64": is_f64,
    }
    return Launch((triton.cdiv(n0, block_i),), meta, fp_fusion=True)


def normalized_angles(angles: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """(a, n0) normalised angles, transposed, and (n0,) squared norms, in the compute dtype."""
    n0, a = angles.shape
    an = torch.empty((a, n0), dtype=ct, device=angles.device)
    sq = torch.empty((n0,), dtype=ct, device=angles.device)
    if n0 > 0:
        launch = normalize_launch(n0, ct == torch.float64, interpreting())
        launch(_math.normalize_angles_kernel, angles, an, sq, n0, a)
    return an, sq


def forward(query, angles, table, bias, n, film, n_max: int, score_norm: str, sorted: bool):
    """``(x, mask, index, weight)`` of docs/operators.md, topn_create; n int64 (B,)."""
    query, angles, table, bias, film = (t.contiguous() for t in (query, angles, table, bias, film))
    n = n.to(torch.int64).contiguous()
    batch, a = query.shape
    n0, d = table.shape
    dtype, device = query.dtype, query.device
    ct = compute_dtype(dtype)
    is_f64, interpret = ct == torch.float64, interpreting()
    x = torch.empty((batch, n_max, d), dtype=dtype, device=device)
    mask = torch.empty((batch, n_max), dtype=torch.bool, device=device)
    index = torch.empty((batch, n_max), dtype=torch.int64, device=device)
    w = torch.empty((batch, n_max), dtype=ct, device=device)  # the weights, compute dtype
    weight = w if ct == dtype else torch.empty((batch, n_max), dtype=dtype, device=device)
    if batch == 0 or n_max == 0:
        return x, mask, index, weight

    an, _ = normalized_angles(angles, ct)
    # Scratch of the ranking: keys (unsigned, allocated signed: deterministic mode fills fresh
    # memory, which torch may not do for unsigned dtypes) and indices.
    cs = max(1, min(n_max, n0)) if sorted else 1
    key_dtypes = (torch.int64, torch.uint64) if is_f64 else (torch.int32, torch.uint32)
    ckey = torch.empty((batch, cs), dtype=key_dtypes[0], device=device).view(key_dtypes[1])
    cidx = torch.empty((batch, cs), dtype=torch.int64, device=device)
    launch = select_launch(batch, n0, sorted, score_norm == "all", is_f64, interpret)
    launch(topn_create_forward.select_kernel, query, an, n, index, w, ckey, cidx, n0, a, n_max, cs)
    rows = batch * n_max
    launch = film_launch(rows, d, weight is not w, is_f64, interpret)
    inputs, outputs = (table, bias, film, index, w), (x, mask, weight)
    launch(topn_create_forward.film_kernel, *inputs, *outputs, rows, n_max, n0, d)
    return x, mask, index, weight


def backward(
    grad_x: Tensor,
    grad_weight: Tensor,
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: Tensor,
    film: Tensor,
    index: Tensor,
    score_norm: str,
    output_mask: Sequence[bool],
    deterministic: bool,
) -> tuple[Tensor | None, ...]:
    """Gradients of query, angles, table, bias and film from those of x and weight (None where
    ``output_mask`` is False), without atomics when ``deterministic``; n int64 (B,), index the
    forward's. One kernel gives the per-set gradients; the per-point ones (table, angles) take
    one or two more, skipped when neither is wanted."""
    query, angles, table, bias, film, index = (
        t.contiguous() for t in (query, angles, table, bias, film, index)
    )
    n = n.to(torch.int64).contiguous()
    batch, a = query.shape
    n0, d = table.shape
    n_max = index.shape[1]
    dtype, device = query.dtype, query.device
    ct = compute_dtype(dtype)
    is_f64, interpret = ct == torch.float64, interpreting()
    score_all = score_norm == "all"
    grad_x = grad_x.to(dtype).contiguous()
    grad_weight = grad_weight.to(dtype).contiguous()

    def empty(*shape, dtype=ct):
        return torch.empty(shape, dtype=dtype, device=device)

    def zeros(*shape):
        return torch.zeros(shape, dtype=ct, device=device)

    g_query, g_bias = empty(batch, a, dtype=dtype), empty(batch, d, dtype=dtype)
    film_part = empty(batch, 4, d)  # each set's terms of the film gradient
    # Atomics sum grad table (and grad of the normalised angles when score_norm="selected")
    # into zeroed buffers; else each point's slots are gathered in order.
    gt_acc = zeros(n0, d) if not deterministic else empty(1)
    dan_acc = zeros(n0, a) if not deterministic and not score_all else empty(1)
    an, angles_sq = normalized_angles(angles, ct)
    qn, m, dm, ds = empty(batch, a), empty(batch, n_max), empty(batch, n_max), empty(batch, n_max)
    ds_dense = empty(batch, n0) if score_all else empty(1)
    if batch > 0 and n_max > 0:
        launch = set_backward_launch(
            batch, n0, a, d, n_max, score_all, not deterministic, is_f64, interpret
        )
        inputs = (grad_x, grad_weight, query, an, table, bias, film, index, n)
        outputs = (g_query, g_bias, film_part, qn, m, dm, ds, ds_dense, gt_acc, dan_acc)
        launch(topn_create_backward.set_backward_kernel, *inputs, *outputs, n0, a, d, n_max)
    else:  # no slot: every gradient is 0
        g_query.zero_(), g_bias.zero_(), film_part.zero_(), ds_dense.zero_()

    want_query, want_angles, want_table, want_bias, want_film = output_mask
    g_film = film_part.sum(0).to(dtype) if want_film else None
    if not (want_table or want_angles):
        g_query, g_bias = (g_query if want_query else None), (g_bias if want_bias else None)
        return g_query, None, None, g_bias, g_film
    g_angles = empty(n0, a, dtype=dtype)
    if deterministic:
        g_table = empty(n0, d, dtype=dtype)
        if n0 > 0:
            order, starts = slots_by_point(index, n0)
            launch = gather_launch(n0, a, d, batch * n_max, not score_all, is_f64, interpret)
            inputs = (grad_x, film, angles, angles_sq, order, starts, m, ds, qn)
            kernel = topn_create_backward.point_gather_kernel
            launch(kernel, *inputs, g_table, g_angles, a, d, n_max)
    else:
        g_table = gt_acc if ct == dtype else gt_acc.to(dtype)
    if (score_all or not deterministic) and n0 > 0:
        launch = finish_launch(n0, a, batch, score_all, is_f64, interpret)
        inputs = (angles, angles_sq, dan_acc, ds_dense, qn)
        launch(topn_create_backward.angles_finish_kernel, *inputs, g_angles, batch, n0, a)
    grads = (g_query, g_angles, g_table, g_bias)
    return (*(g if wanted else None for g, wanted in zip(grads, output_mask, strict=False)), g_film)


def slots_by_point(index: Tensor, n0: int) -> tuple[Tensor, Tensor]:
    """The slots (flat indices into (B, n_max)) sorted by the point they selected, stably, and
    where each point's run starts: point i's slots are ``order[starts[i]:starts[i + 1]]``."""
    points, order = torch.sort(index.reshape(-1), stable=True)
    starts = torch.searchsorted(points, torch.arange(n0 + 1, device=index.device))
    return order, starts
