"""Host side of the Triton set2graph_logits: tile sizes, forward and backward.

``forward`` and ``backward`` are the kernels that the op ``topn_kernels::set2graph_logits``
(``topn_kernels/ops/set2graph_op.py``, shared with the native backend) runs for
``backend="triton"``. They take validated, consistent inputs: one float dtype and device,
``lengths`` int64 (B,) in [0, n] in eager mode (under ``torch.compile`` the kernels clamp them
rather than read out of bounds).

The work around the pair kernels (``set2graph_forward.py``, ``set2graph_backward.py``) is
per point and done with torch: the padding rows of x are replaced by 0 before anything reads
them (``torch.where``: their content, NaN and inf included, never reaches a value), the
projections ``u = x W1a^T + b1`` and ``v = x W1b^T`` (B, n, h), and, backward, the reductions
of the kernels' partial sums (fixed order) and ``grad_x = grad_u W1a + grad_v W1b``,
``grad_W1 = [grad_u^T x, grad_v^T x]``, ``grad_b1 = sum grad_u``. These products are torch
matmuls, so they follow torch's float32 matmul precision setting (TF32 when it is allowed),
as the reference's do; the pair kernels compute in float32 (float64 for float64 inputs).

Tile sizes (``tiles``): in the interpreter, few large programs (each costs Python time); on a
GPU, tiles whose registers stay bounded whatever h (hidden units in chunks of BLOCK_H), and,
backward, enough programs to fill the GPU (the other points split into chunks, each with its
own partial sums). The GPU sizes are a first choice checked for registers and spills by
compiling for sm_90 on a CPU, not yet tuned on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from .._ragged import compute_dtype, lengths_mask
from . import set2graph_backward, set2graph_forward

# Backward programs wanted on a GPU (a few per streaming multiprocessor), and the most chunks
# the other points are split into for it (each chunk adds a (B, n, h) partial sum).
BACKWARD_PROGRAMS = 1024
MAX_CHUNKS = 16


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class Launch:
    """A kernel's grid, constexprs and compile options (the interpreter ignores the options).
    Fused multiply-adds are allowed: nothing here is compared bit for bit with the reference."""

    grid: tuple[int, ...]
    meta: dict  # constexprs
    num_warps: int = 4
    num_stages: int = 3  # software pipelining of the loads of a loop

    def __call__(self, kernel, *args) -> None:
        kernel[self.grid](
            *args,
            **self.meta,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            enable_fp_fusion=True,
        )


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the pair kernels.

    ``block_a`` owned points (rows i in the forward and the row role of the backward, columns
    j in its column role), ``block_o`` other points, ``block_h`` hidden units per chunk;
    ``chunks``: backward, how many chunks the other points are split into at most."""

    block_a: int
    block_o: int
    block_h: int
    chunks: int = 1
    num_warps: int = 4

    @property
    def use_dot(self) -> bool:
        """tl.dot for the products over hidden units and over pairs: both at least 16."""
        return self.block_a * self.block_o >= 16 and self.block_h >= 16


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def tiles(
    batch: int, n: int, h: int, k: int, is_f64: bool, interpret: bool, backward: bool
) -> Tiles:
    """The :class:`Tiles` of a shape."""
    if interpret:
        block = min(_pow2(n), 64)
        return Tiles(block, block, min(_pow2(h), 64))
    # GPU: the 3-D tiles (points, points, hidden units) of z (and, backward, of dz) and the
    # (pairs, classes) tiles of the output or its gradient in the registers of 4 warps: at most
    # 4096 values of a (pairs, classes) tile (2048 in float64), at least 16 pairs (tl.dot)
    pairs = (2048 if is_f64 else 4096) // _pow2(k)
    block_a = min(16, _pow2(n))
    block_o = min(16 if backward or is_f64 else 32, _pow2(n), max(1, pairs // block_a))
    block_o = max(block_o, 16 // block_a)
    if not backward:
        return Tiles(block_a, block_o, 16)
    owned = triton.cdiv(n, block_a)
    other = triton.cdiv(n, block_o)
    chunks = max(1, min(MAX_CHUNKS, other, triton.cdiv(BACKWARD_PROGRAMS, max(1, batch * owned))))
    return Tiles(block_a, block_o, 16, chunks=chunks)


def forward_launch(batch: int, n: int, h: int, k: int, is_f64: bool, interpret: bool) -> Launch:
    t = tiles(batch, n, h, k, is_f64, interpret, backward=False)
    grid = (batch * triton.cdiv(n, t.block_a) * triton.cdiv(n, t.block_o),)
    meta = {
        "BLOCK_I": t.block_a,
        "BLOCK_J": t.block_o,
        "BLOCK_H": t.block_h,
        "BLOCK_K": _pow2(k),
        "USE_DOT": t.use_dot,
        "IS_F64": is_f64,
    }
    return Launch(grid, meta, num_warps=t.num_warps)


def backward_launch(
    batch: int,
    n: int,
    h: int,
    k: int,
    rows: bool,
    want_h: bool,
    want_w2: bool,
    want_b2: bool,
    is_f64: bool,
    interpret: bool,
) -> tuple[Launch, int, int]:
    """(launch, chunk, chunks): the other points of a set split into ``chunks`` chunks of
    ``chunk`` points (a multiple of the tile)."""
    t = tiles(batch, n, h, k, is_f64, interpret, backward=True)
    owned = triton.cdiv(n, t.block_a)
    other = triton.cdiv(n, t.block_o)
    chunk = triton.cdiv(other, max(1, min(t.chunks, other))) * t.block_o
    chunks = triton.cdiv(n, chunk)
    meta = {
        "BLOCK_A": t.block_a,
        "BLOCK_O": t.block_o,
        "BLOCK_H": t.block_h,
        "BLOCK_K": _pow2(k),
        "ROWS": rows,
        "WANT_H": want_h,
        "WANT_W2": want_w2,
        "WANT_B2": want_b2,
        "USE_DOT": t.use_dot,
        "IS_F64": is_f64,
    }
    # deeper pipelining of the loads of the upstream gradient spills registers on sm_90
    stages = 2 if _pow2(k) <= 8 else 1
    launch = Launch((batch * owned * chunks,), meta, num_warps=t.num_warps, num_stages=stages)
    return launch, chunk, chunks


def _device(device: torch.device):
    """The CUDA device of the tensors, current while kernels launch (nothing on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _real_points(x: Tensor, lengths: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """(mask (B, n) bool, x in the compute dtype with padding rows 0)."""
    mask = lengths_mask(lengths, x.shape[1])
    return mask, torch.where(mask[..., None], x, 0).to(ct)


def _project(xc: Tensor, weight1: Tensor, bias1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u, v, weight1 in the compute dtype): u = x W1a^T + b1, v = x W1b^T, (B, n, h)
    contiguous, from xc (B, n, s) in the compute dtype."""
    s = xc.shape[2]
    w1 = weight1.to(xc.dtype)
    u = torch.matmul(xc, w1[:, :s].T) + bias1.to(xc.dtype)
    v = torch.matmul(xc, w1[:, s:].T)
    return u.contiguous(), v.contiguous(), w1


def forward(
    x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, lengths: Tensor
) -> Tensor:
    """out (B, n, n, k) in x's dtype (docs/operators.md, set2graph_logits)."""
    batch, n, _ = x.shape
    h, k = weight1.shape[0], weight2.shape[0]
    out = torch.empty((batch, n, n, k), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    ct = compute_dtype(x.dtype)
    with _device(x.device):
        lengths = lengths.to(torch.int64).contiguous()
        _, xc = _real_points(x, lengths, ct)
        u, v, _ = _project(xc, weight1, bias1)
        w2, b2 = weight2.to(ct).contiguous(), bias2.to(ct).contiguous()
        launch = forward_launch(batch, n, h, k, ct == torch.float64, interpreting())
        launch(set2graph_forward.pairs_forward_kernel, u, v, w2, b2, lengths, out, n, h, k)
    return out


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    lengths: Tensor,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of x, weight1, bias1, weight2 and bias2 (None where ``output_mask`` is
    False), in x's dtype, deterministic (no atomics). ``grad_out`` is read with its strides."""
    want_x, want_w1, want_b1, want_w2, want_b2 = (bool(w) for w in output_mask)
    batch, n, s = x.shape
    h, k = weight1.shape[0], weight2.shape[0]
    dtype, device = x.dtype, x.device
    ct = compute_dtype(dtype)
    need_u = want_x or want_w1 or want_b1  # sums of dh over columns
    need_v = want_x or want_w1  # sums of dh over rows
    if batch * n == 0 or k == 0:  # no pair, or an empty output: every gradient is 0
        inputs = (x, weight1, bias1, weight2, bias2)
        grads = (torch.zeros(t.shape, dtype=dtype, device=device) for t in inputs)
        return tuple(g if w else None for g, w in zip(grads, output_mask, strict=True))

    is_f64, interpret = ct == torch.float64, interpreting()
    with _device(device):
        lengths = lengths.to(torch.int64).contiguous()
        mask, xc = _real_points(x, lengths, ct)
        u, v, w1 = _project(xc, weight1, bias1)
        w2 = weight2.to(ct).contiguous()
        g = grad_out if grad_out.dtype == dtype else grad_out.to(dtype)
        if g.stride(3) * k >= 2**31:  # the kernel offsets classes by c * stride in int32
            g = g.contiguous()
        strides = (g.stride(0), g.stride(1), g.stride(2), g.stride(3))

        def run(rows: bool, want_h: bool, want_w2: bool, want_b2: bool):
            launch, chunk, chunks = backward_launch(
                batch, n, h, k, rows, want_h, want_w2, want_b2, is_f64, interpret
            )
            owned = triton.cdiv(n, launch.meta["BLOCK_A"])
            unused = torch.empty(1, dtype=ct, device=device)
            gh = torch.empty((chunks, batch, n, h), dtype=ct, device=device) if want_h else unused
            gw2 = torch.empty((chunks, batch, owned, k, h), dtype=ct, device=device)
            gb2 = torch.empty((chunks, batch, owned, k), dtype=ct, device=device)
            gw2, gb2 = (gw2 if want_w2 else unused), (gb2 if want_b2 else unused)
            kernel = set2graph_backward.pairs_backward_kernel
            inputs = (g, u, v, w2, lengths)
            launch(kernel, *inputs, gh, gw2, gb2, *strides, batch, n, h, k, chunk)
            # partial sums, added in a fixed order
            return (
                gh.sum(0) if want_h else None,
                gw2.sum((0, 1, 2)) if want_w2 else None,
                gb2.sum((0, 1, 2)) if want_b2 else None,
            )

        grad_u = grad_v = grad_w2 = grad_b2 = None
        if need_u or want_w2 or want_b2:
            grad_u, grad_w2, grad_b2 = run(True, need_u, want_w2, want_b2)
        if need_v:
            grad_v, _, _ = run(False, True, False, False)

        grad_x = grad_w1 = grad_b1 = None
        if want_x:
            grad_x = torch.matmul(grad_u, w1[:, :s]) + torch.matmul(grad_v, w1[:, s:])
            grad_x = torch.where(mask[..., None], grad_x, 0).to(dtype)
        if want_w1:
            points = xc.reshape(batch * n, s)
            grad_w1a = grad_u.reshape(batch * n, h).T @ points
            grad_w1b = grad_v.reshape(batch * n, h).T @ points
            grad_w1 = torch.cat([grad_w1a, grad_w1b], dim=1).to(dtype)
        if want_b1:
            grad_b1 = grad_u.sum((0, 1)).to(dtype)
        if want_w2:
            grad_w2 = grad_w2.to(dtype)
        if want_b2:
            grad_b2 = grad_b2.to(dtype)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
