"""Host side of the Triton topn_create: which kernels run, their launch configurations, the
forward and the backward.

``forward`` and ``backward`` take validated inputs (``topn_kernels.ops``: one dtype and device,
consistent shapes, ``n`` int64 (B,) in [1, min(n0, n_max)] in eager mode, or ``n_fixed`` >= 0
for the size of every set, with ``n`` then unread; under ``torch.compile``, and on CUDA when
``n_max`` is given, the kernels clamp the sizes rather than read out of bounds). Each
``*_launch`` function gives one kernel's grid, constexprs and compile options for a shape: the
interpreter's (few, large programs: each program costs Python time) or a GPU's.

Paths. Each call picks one way of each kind (``resolve_paths``); ``auto`` decides by shape,
a choice can be forced with the ``paths`` context manager or the environment variable
``TOPN_KERNELS_TRITON_PATHS`` (e.g. ``select=radix,forward=fused``; the context manager wins):

- ``select``: ``sort`` (packed 64-bit keys through ``tl.topk``/``tl.sort``) or ``radix``
  (topn_create_forward.py). auto: sort where it applies (float32 compute dtype, n0 <=
  SELECT_ONE_BLOCK_MAX) on a GPU; radix in the interpreter, where a bitonic sort costs about
  a second per program, and wherever sort does not apply (a forced sort falls back there too).
- ``forward``: ``split`` (normalise the angles, select, FiLM: three launches), ``fused`` (the
  normalisation, then one program per set that selects and writes its own rows) or
  ``single`` (that program normalises the angles itself: one launch). auto: single for small
  reference sets (n0 <= SINGLE_N0_MAX, where normalising them in every set costs little);
  else fused when there are enough sets to fill the GPU twice (B >= 2 x the SM count), where
  each set's selection hides under the other sets' stores; else split, whose writer spreads x
  over many programs.
- ``backward``: ``split`` (the normalisation, one program per set, then the per-point
  gradients by atomics or, deterministic, by sorted segments) or ``single`` (two launches,
  deterministic: topn_create_backward.py). auto: single for small shapes (n0 <= SINGLE_N0_MAX
  and B * n0 <= SINGLE_DENSE_MAX, the dense maps it writes), else split.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterator, Sequence
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
# "auto" takes the single-launch paths up to this many reference points, and the single
# backward up to this many entries of its dense (B, n0) maps
SINGLE_N0_MAX = 256
SINGLE_DENSE_MAX = 1 << 22
# SMs counted for the interpreter (an H100's), which has none
INTERPRETER_SMS = 132

PATHS_VAR = "TOPN_KERNELS_TRITON_PATHS"
PATH_OPTIONS = {
    "select": ("auto", "radix", "sort"),
    "forward": ("auto", "split", "fused", "single"),
    "backward": ("auto", "split", "single"),
}
# every forced combination: what tests/triton_aot.py compiles
PATH_CHOICES = [
    {"select": s, "forward": f, "backward": b}
    for (s, f), b in zip(
        itertools.product(("radix", "sort"), ("split", "fused", "single")),
        itertools.cycle(("split", "single")),
        strict=False,
    )
]
_forced: dict[str, str] = {}


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _check_paths(choice: dict[str, str], source: str) -> dict[str, str]:
    for kind, value in choice.items():
        if kind not in PATH_OPTIONS or value not in PATH_OPTIONS[kind]:
            options = "; ".join(f"{k}: {', '.join(v)}" for k, v in PATH_OPTIONS.items())
            raise ValueError(f"{source}: {kind}={value!r} is not a path ({options})")
    return choice


def requested_paths() -> dict[str, str]:
    """The path of each kind that was asked for: ``paths`` over ``TOPN_KERNELS_TRITON_PATHS``
    over "auto"."""
    env = {}
    for item in os.environ.get(PATHS_VAR, "").split(","):
        if item.strip():
            kind, _, value = item.strip().partition("=")
            env[kind.strip()] = value.strip()
    return {kind: "auto" for kind in PATH_OPTIONS} | _check_paths(env, PATHS_VAR) | _forced


@contextlib.contextmanager
def paths(**choice: str) -> Iterator[None]:
    """Forces paths while active, e.g. ``paths(select="radix", forward="split")``."""
    global _forced
    previous = _forced
    _forced = {**previous, **_check_paths(choice, "paths")}
    try:
        yield
    finally:
        _forced = previous


@dataclass(frozen=True)
class Paths:
    use_sort: bool
    forward: str  # "split", "fused" or "single"
    backward: str  # "split" or "single"


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def resolve_paths(
    batch: int, n0: int, n_max: int, is_f64: bool, device: torch.device, interpret: bool
) -> Paths:
    """The paths a call of this shape takes (see the module's docstring)."""
    want = requested_paths()
    can_sort = not is_f64 and 0 < n0 <= SELECT_ONE_BLOCK_MAX
    if want["select"] == "auto":
        use_sort = can_sort and not interpret
    else:
        use_sort = can_sort and want["select"] == "sort"
    forward = want["forward"]
    if forward == "auto":
        if n0 <= SINGLE_N0_MAX:
            forward = "single"
        elif batch >= 2 * _sm_count(device):
            forward = "fused"
        else:
            forward = "split"
    backward = want["backward"]
    if backward == "auto":
        small = n0 <= SINGLE_N0_MAX and batch * n0 <= SINGLE_DENSE_MAX
        backward = "single" if small else "split"
    if batch == 0 or n_max == 0 or n0 == 0:  # nothing to select: every gradient is 0
        backward = "split"
    return Paths(use_sort, forward, backward)


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


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device while kernels are launched on it: Triton
    launches on the current device, whichever device the tensors are on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def normalize_launch(n0: int, is_f64: bool, interpret: bool) -> Launch:
    block = min(_pow2(n0, 16), 4096 if interpret else 256)
    return Launch((triton.cdiv(n0, block),), {"BLOCK": block, "IS_F64": is_f64})


def _selection_meta(
    n0: int, n_max: int, use_sort: bool, interpret: bool, norm_angles: bool = False
) -> tuple[dict, int]:
    """(constexprs of the selection, num_warps) shared by select_kernel and fused_kernel.
    ``norm_angles``: the program normalises the angles too, whose registers leave no room for
    more than SELECT_CHUNK radix keys beside them."""
    one_chunk = n0 <= (SELECT_CHUNK if norm_angles and not use_sort else SELECT_ONE_BLOCK_MAX)
    block_n = _pow2(n0, 16) if one_chunk else SELECT_CHUNK
    # about 8 keys per thread (4 warps up to 512 points, 16 from 2048); the warps that the
    # compile check (tests/triton_aot.py) finds spill-free for chunks of 1024
    num_warps = min(16, max(4, block_n // 128))
    if not one_chunk:
        num_warps = 16 if norm_angles else 8
    elif norm_angles and use_sort:
        num_warps = 4 if block_n <= 1024 else 8
    # the ranking compares BLOCK_R x BLOCK_R tiles: at most 16 pairs per thread on a GPU
    block_r = 64 if interpret or num_warps > 4 else 32
    meta = {
        "BLOCK_N": block_n,
        "ONE_CHUNK": one_chunk,
        "BLOCK_R": block_r,
        # at least 2: tl.topk(x, 1) fails to compile under triton 3.6 (its last reshape gets a
        # scalar), and a second key costs nothing (slots >= nb are masked)
        "TOP_K": min(block_n, _pow2(min(n_max, n0), 2)) if use_sort else 1,
        "USE_SORT": use_sort,
    }
    return meta, num_warps


def select_launch(
    batch: int, n0: int, n_max: int, use_sort: bool, is_f64: bool, interpret: bool
) -> Launch:
    meta, num_warps = _selection_meta(n0, n_max, use_sort, interpret)
    return Launch((batch,), {**meta, "IS_F64": is_f64}, num_warps=num_warps)


def film_launch(rows: int, d: int, write_weight: bool, is_f64: bool, interpret: bool) -> Launch:
    block_d = _pow2(d, 16) if interpret else min(_pow2(d, 16), 256)
    block_r = min(_pow2(rows), max(1, _tile(is_f64, interpret) // block_d))
    grid = (triton.cdiv(rows, block_r), max(1, triton.cdiv(d, block_d)))
    meta = {"BLOCK_R": block_r, "BLOCK_D": block_d, "WRITE_WEIGHT": write_weight, "IS_F64": is_f64}
    return Launch(grid, meta, num_warps=8)


def fused_launch(
    batch: int,
    n0: int,
    n_max: int,
    d: int,
    use_sort: bool,
    norm_angles: bool,
    write_weight: bool,
    is_f64: bool,
    interpret: bool,
) -> Launch:
    meta, num_warps = _selection_meta(n0, n_max, use_sort, interpret, norm_angles)
    block_d = _pow2(d, 16) if interpret else min(_pow2(d, 16), 256)
    # half film_kernel's tile: the selection's registers are live beside it
    block_fr = min(_pow2(n_max), max(1, _tile(is_f64, interpret) // 2 // block_d))
    meta |= {
        "NORM_ANGLES": norm_angles,
        "BLOCK_FR": block_fr,
        "BLOCK_D": block_d,
        "WRITE_WEIGHT": write_weight,
        "IS_F64": is_f64,
    }
    return Launch((batch,), meta, num_warps=num_warps)


def set_backward_launch(
    batch: int,
    n0: int,
    a: int,
    d: int,
    n_max: int,
    score_all: bool,
    atomic: bool,
    single: bool,
    is_f64: bool,
    interpret: bool,
) -> Launch:
    """``single``: the dense maps of point_dense_kernel, the angles normalised in-kernel."""
    tile = _tile(is_f64, interpret) // 2
    block_d = _pow2(d, 16)  # a slot's whole row in one tile
    meta = {
        "A_BLOCK": _pow2(a, 2),
        "BLOCK_D": block_d,
        "BLOCK_J": min(_pow2(n_max), max(1, tile // block_d)),
        "BLOCK_N": min(_pow2(n0, 16), max(16, tile // _pow2(a, 2))),
        "SCORE_ALL": score_all,
        "ATOMIC": atomic and not single,
        "DENSE_OUT": single,
        "NORM_ANGLES": single,
        "IS_F64": is_f64,
    }
    # 8 warps: a slot tile of d <= 256 features per 256 threads keeps every variant under
    # 255 registers per thread without spilling, and 2 programs per SM stay resident
    return Launch((batch,), meta, num_warps=8, fp_fusion=True)


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


def point_dense_launch(
    batch: int,
    n0: int,
    a: int,
    d: int,
    table: bool,
    angles: bool,
    film: bool,
    is_f64: bool,
    interpret: bool,
) -> Launch:
    """n0 programs, one per point, and one for the film gradient."""
    tile = _tile(is_f64, interpret) // 2
    block_d = _pow2(d, 16)
    block_b = min(_pow2(batch), max(2, tile // block_d))
    meta = {
        "A_BLOCK": _pow2(a, 2),
        "BLOCK_D": block_d,
        "BLOCK_B": block_b,
        "BLOCK_F": min(_pow2(4 * d), max(16, tile // block_b)),
        "TABLE": table,
        "ANGLES": angles,
        "FILM": film,
        "IS_F64": is_f64,
    }
    return Launch((n0 + 1,), meta, fp_fusion=True)


def normalized_angles(angles: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """(a, n0) normalised angles, transposed, and (n0,) squared norms, in the compute dtype."""
    n0, a = angles.shape
    an = torch.empty((a, n0), dtype=ct, device=angles.device)
    sq = torch.empty((n0,), dtype=ct, device=angles.device)
    if n0 > 0:
        launch = normalize_launch(n0, ct == torch.float64, interpreting())
        launch(_math.normalize_angles_kernel, angles, an, sq, n0, a)
    return an, sq


def _sizes_arg(n: Tensor, n_fixed: int | None, fallback: Tensor) -> tuple[Tensor, int]:
    """(sizes pointer, n_fixed argument): with n_fixed the kernels never read the pointer,
    which may then be an empty tensor; a real one (``fallback``) is passed instead."""
    if n_fixed is None:
        return n.to(torch.int64).contiguous(), -1
    return (n if n.numel() > 0 else fallback), int(n_fixed)


def forward(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: Tensor,
    film: Tensor,
    n_max: int,
    score_norm: str,
    sorted: bool,
    n_fixed: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, mask, index, weight)`` of docs/operators.md, topn_create: x (B, n_max, d), mask
    (B, n_max) bool, index (B, n_max) int64, weight (B, n_max); n int64 (B,), unread when
    ``n_fixed`` (every set's size) is given."""
    with on_device(query.device):
        return _forward(query, angles, table, bias, n, film, n_max, score_norm, sorted, n_fixed)


def _forward(query, angles, table, bias, n, film, n_max, score_norm, sorted, n_fixed):
    query, angles, table, bias, film = (t.contiguous() for t in (query, angles, table, bias, film))
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

    chosen = resolve_paths(batch, n0, n_max, is_f64, device, interpret)
    sizes, n_arg = _sizes_arg(n, n_fixed, index)
    score_all = score_norm == "all"
    # Scratch of the radix ranking: keys (unsigned, allocated signed: deterministic mode fills
    # fresh memory, which torch may not do for unsigned dtypes) and indices.
    cs = max(1, min(n_max, n0)) if sorted and not chosen.use_sort else 1
    key_dtypes = (torch.int64, torch.uint64) if is_f64 else (torch.int32, torch.uint32)
    ckey = torch.empty((batch, cs), dtype=key_dtypes[0], device=device).view(key_dtypes[1])
    cidx = torch.empty((batch, cs), dtype=torch.int64, device=device)
    scratch = (ckey, cidx)
    if chosen.forward == "split":
        an, _ = normalized_angles(angles, ct)
        launch = select_launch(batch, n0, n_max, chosen.use_sort, is_f64, interpret)
        launch(
            topn_create_forward.select_kernel,
            query,
            an,
            sizes,
            index,
            w,
            *scratch,
            n_arg,
            int(sorted),
            int(score_all),
            n0,
            a,
            n_max,
            cs,
        )
        rows = batch * n_max
        launch = film_launch(rows, d, weight is not w, is_f64, interpret)
        inputs, outputs = (table, bias, film, index, w), (x, mask, weight)
        launch(topn_create_forward.film_kernel, *inputs, *outputs, rows, n_max, n0, d)
        return x, mask, index, weight
    single = chosen.forward == "single"
    an = angles if single else normalized_angles(angles, ct)[0]
    launch = fused_launch(
        batch,
        n0,
        n_max,
        d,
        chosen.use_sort,
        single,
        weight is not w,
        is_f64,
        interpret,
    )
    inputs = (query, an, table, bias, film, sizes)
    outputs = (x, mask, weight, index, w, *scratch)
    flags = (n_arg, int(sorted), int(score_all))
    launch(topn_create_forward.fused_kernel, *inputs, *outputs, *flags, n0, a, d, n_max, cs)
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
    n_fixed: int | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients of query (B, a), angles (n0, a), table (n0, d), bias (B, d) and film (4, d)
    from those of x (B, n_max, d) and weight (B, n_max) (None where ``output_mask`` is False),
    without atomics when ``deterministic``; n int64 (B,) (unread when ``n_fixed`` is given),
    index the forward's. One kernel gives the per-set gradients; the per-point ones (table,
    angles) and the film gradient take one or two more."""
    with on_device(query.device):
        return _backward(
            grad_x,
            grad_weight,
            query,
            angles,
            table,
            bias,
            n,
            film,
            index,
            score_norm,
            output_mask,
            deterministic,
            n_fixed,
        )


def _backward(
    grad_x,
    grad_weight,
    query,
    angles,
    table,
    bias,
    n,
    film,
    index,
    score_norm,
    output_mask,
    deterministic,
    n_fixed,
):
    query, angles, table, bias, film, index = (
        t.contiguous() for t in (query, angles, table, bias, film, index)
    )
    batch, a = query.shape
    n0, d = table.shape
    n_max = index.shape[1]
    dtype, device = query.dtype, query.device
    ct = compute_dtype(dtype)
    is_f64, interpret = ct == torch.float64, interpreting()
    score_all = score_norm == "all"
    grad_x = grad_x.to(dtype).contiguous()
    grad_weight = grad_weight.to(dtype).contiguous()
    sizes, n_arg = _sizes_arg(n, n_fixed, index)
    single = resolve_paths(batch, n0, n_max, is_f64, device, interpret).backward == "single"

    def empty(*shape, dtype=ct):
        return torch.empty(shape, dtype=dtype, device=device)

    def zeros(*shape):
        return torch.zeros(shape, dtype=ct, device=device)

    want_query, want_angles, want_table, want_bias, want_film = output_mask
    g_query, g_bias = empty(batch, a, dtype=dtype), empty(batch, d, dtype=dtype)
    film_part = empty(batch, 4, d)  # each set's terms of the film gradient
    qn, m, dm, ds = empty(batch, a), empty(batch, n_max), empty(batch, n_max), empty(batch, n_max)
    if single:
        ds_dense, inv = empty(batch, n0), empty(batch, n0, dtype=torch.int32)
        launch = set_backward_launch(
            batch, n0, a, d, n_max, score_all, False, True, is_f64, interpret
        )
        inputs = (grad_x, grad_weight, query, angles, table, bias, film, index, sizes)
        outputs = (g_query, g_bias, film_part, qn, m, dm, ds, ds_dense, inv, ds, ds)
        launch(topn_create_backward.set_backward_kernel, *inputs, *outputs, n_arg, n0, a, d, n_max)
        g_table = empty(n0, d, dtype=dtype) if want_table else empty(1)
        g_angles = empty(n0, a, dtype=dtype) if want_angles else empty(1)
        g_film = empty(4, d, dtype=dtype) if want_film else empty(1)
        launch = point_dense_launch(
            batch, n0, a, d, want_table, want_angles, want_film, is_f64, interpret
        )
        inputs = (grad_x, film, angles, inv, m, ds_dense, qn, film_part)
        kernel = topn_create_backward.point_dense_kernel
        launch(kernel, *inputs, g_table, g_angles, g_film, batch, n0, a, d, n_max)
        grads = (g_query, g_angles, g_table, g_bias, g_film)
        return tuple(g if wanted else None for g, wanted in zip(grads, output_mask, strict=True))

    # Atomics sum grad table (and grad of the normalised angles when score_norm="selected")
    # into zeroed buffers; else each point's slots are gathered in order.
    gt_acc = zeros(n0, d) if not deterministic else empty(1)
    dan_acc = zeros(n0, a) if not deterministic and not score_all else empty(1)
    an, angles_sq = normalized_angles(angles, ct)
    ds_dense = empty(batch, n0) if score_all else empty(1)
    if batch > 0 and n_max > 0:
        launch = set_backward_launch(
            batch, n0, a, d, n_max, score_all, not deterministic, False, is_f64, interpret
        )
        inputs = (grad_x, grad_weight, query, an, table, bias, film, index, sizes)
        outputs = (g_query, g_bias, film_part, qn, m, dm, ds, ds_dense, index, gt_acc, dan_acc)
        launch(topn_create_backward.set_backward_kernel, *inputs, *outputs, n_arg, n0, a, d, n_max)
    else:  # no slot: every gradient is 0
        g_query.zero_(), g_bias.zero_(), film_part.zero_(), ds_dense.zero_()

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
