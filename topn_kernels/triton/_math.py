"""Triton helpers shared by the topn_create kernels: set sizes, exactly rounded arithmetic,
ranking keys, rounding to the output dtype, and the normalisation of the reference angles.

Every helper takes ``IS_F64`` (constexpr): the compute dtype is float64 for float64 inputs and
float32 otherwise (docs/operators.md, Dtypes and precision). Calls of one jit function from another
are slow in the interpreter (it patches triton.language at each call), so the kernels call these
outside their inner loops. The forward kernels launch with ``enable_fp_fusion=False`` so that ``a *
b + c`` rounds twice, as the reference does, never as one fused multiply-add.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def set_size(sizes_ptr, n_fixed, b, n0, n_max):
    """n_b: ``n_fixed`` when >= 0, else ``sizes[b]``; clamped to [0, min(n0, n_max)], so that
    no kernel reads or writes out of bounds whatever the sizes."""
    if n_fixed >= 0:
        nb = tl.zeros([], tl.int64) + n_fixed
    else:
        nb = tl.load(sizes_ptr + b)
    return tl.minimum(tl.maximum(nb, 0), tl.minimum(n0, n_max))


@triton.jit
def div_rn(x, y, IS_F64: tl.constexpr):
    """x / y rounded to nearest (plain ``/`` on float32 is an approximate division on GPUs)."""
    if IS_F64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def sqrt_rn(x, IS_F64: tl.constexpr):
    """sqrt(x) rounded to nearest (``tl.sqrt`` on float32 is approximate on GPUs)."""
    if IS_F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def clamped_square_norm(sq, IS_F64: tl.constexpr):
    """``max(sq, 1e-24)`` propagating NaN, as ``Tensor.clamp_min`` in the reference."""
    eps2 = tl.full([], 1e-24, tl.float64 if IS_F64 else tl.float32)
    return tl.maximum(sq, eps2, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def rank_key(s, IS_F64: tl.constexpr):
    """Unsigned integer key of a score, increasing with the score, so that the largest keys
    rank first; NaN above every number (as ``torch.sort``), -0 == +0 (csrc/cpu/select.h, RankKey).
    uint32 keys for float32 scores, uint64 for float64."""
    if IS_F64:
        bits = s.to(tl.uint64, bitcast=True)
        bits = tl.where(bits == 0x8000000000000000, 0, bits)  # -0 -> +0
        bits = tl.where((bits & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000, 0x7FF8000000000000, bits)
        return tl.where((bits >> 63) != 0, ~bits, bits | 0x8000000000000000)
    else:
        bits = s.to(tl.uint32, bitcast=True)
        bits = tl.where(bits == 0x80000000, 0, bits)  # -0 -> +0
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)  # one NaN
        return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def key_score(key, IS_F64: tl.constexpr):
    """The score of a ``rank_key`` (NaN and zero in their canonical form)."""
    if IS_F64:
        bits = tl.where((key >> 63) != 0, key & 0x7FFFFFFFFFFFFFFF, ~key)
        return bits.to(tl.float64, bitcast=True)
    else:
        bits = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, ~key)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_output(x, ptr):
    """x (compute dtype) in the element type of ``ptr``, rounded to nearest even. bfloat16 is
    rounded with integer operations: Triton's interpreter truncates a float32 -> bfloat16 cast,
    while a GPU rounds it; this gives the GPU's result on both."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the sum may carry out)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def nan_max(x, axis):
    """Max along ``axis`` that is NaN when any entry is NaN (``tl.max`` skips NaN)."""
    has_nan = tl.max((x != x).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(tl.where(x != x, float("-inf"), x), axis))


@triton.jit
def normalize_angles_kernel(
    angles_ptr,  # (n0, a) input dtype
    out_ptr,  # (a, n0) compute dtype: the normalised angles, transposed
    sq_ptr,  # (n0,) compute dtype: the squared norms
    n0,
    a,
    BLOCK: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """``angles_i / sqrt(max(sum_k angles_ik^2, 1e-24))``, the squares summed for k = 0..a-1
    in order (reference ``_normalize``), for a block of rows; stored transposed so that the
    scores of consecutive points load contiguously."""
    ct = tl.float64 if IS_F64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n0
    sq = tl.zeros([BLOCK], ct)
    for k in range(a):
        v = tl.load(angles_ptr + rows * a + k, mask=valid, other=0.0).to(ct)
        sq = sq + v * v
    tl.store(sq_ptr + rows, sq, mask=valid)
    denom = sqrt_rn(clamped_square_norm(sq, IS_F64), IS_F64)
    for k in range(a):
        v = tl.load(angles_ptr + rows * a + k, mask=valid, other=0.0).to(ct)
        tl.store(out_ptr + k * n0 + rows, div_rn(v, denom, IS_F64), mask=valid)


@triton.jit
def normalize_backward(v, dv, sq, IS_F64: tl.constexpr):
    """Gradient of ``v / sqrt(max(sq, 1e-24))`` for rows v (R, A) with squared norms sq (R,)
    and upstream gradient dv (R, A): ``dv / |v| - v <dv, v> / |v|^3``, or ``dv / 1e-12``
    where the clamp is active."""
    eps2 = tl.full([], 1e-24, tl.float64 if IS_F64 else tl.float32)
    inv = 1.0 / tl.sqrt(tl.maximum(sq, eps2))
    dot = tl.sum(dv * v, axis=1)
    active = sq < eps2
    c = tl.where(active, 0.0, dot * inv * inv * inv)
    return dv * inv[:, None] - v * c[:, None]
