"""Triton forward of set2graph_logits (docs/operators.md, set2graph_logits): the pair tiles.

The first layer splits over the concatenation, ``W1 cat(x_i, x_j) + b1 = u_i + v_j`` with
``u = x W1a^T + b1`` and ``v = x W1b^T`` (B, n, h), computed by the host code
(``set2graph_launch.py``) before this kernel runs. ``pairs_forward_kernel`` then gives one
program a tile of BLOCK_I rows i by BLOCK_J columns j of one set, and walks the hidden units in
chunks of BLOCK_H:

    r = relu(u_i + v_j)            (BLOCK_I, BLOCK_J, BLOCK_H), registers only
    acc += r @ W2[:, chunk]^T      (BLOCK_I * BLOCK_J pairs, classes)

so that the (B, n, n, h) pair activations are never stored and the registers a program holds
do not grow with h. The chunk product is a ``tl.dot`` (``input_precision="ieee"``: float32 stays
float32, never TF32) when the tile allows it (``USE_DOT``: at least 16 pairs and 16 hidden
units per chunk), else a broadcast product summed over the chunk, which suits small tiles and
the interpreter alike. ``out_ij = acc + b2`` on the pairs of real points, 0 on every other pair.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import to_output


@triton.jit
def relu_keep_nan(z):
    """``torch.relu``: max(z, 0), NaN kept (``tl.maximum`` would drop it on a GPU)."""
    return tl.where(z < 0, 0.0, z)


@triton.jit
def pairs_forward_kernel(
    u_ptr,  # (B, n, h) compute dtype: x_i W1a^T + b1 (read on real rows only)
    v_ptr,  # (B, n, h) compute dtype: x_j W1b^T (read on real rows only)
    w2_ptr,  # (k, h) compute dtype
    b2_ptr,  # (k,) compute dtype
    lengths_ptr,  # (B,) int64, clamped to [0, n] here
    out_ptr,  # (B, n, n, k) input dtype out
    n,
    h,
    k,
    BLOCK_I: tl.constexpr,  # rows i of a tile
    BLOCK_J: tl.constexpr,  # columns j of a tile
    BLOCK_H: tl.constexpr,  # hidden units per chunk
    BLOCK_K: tl.constexpr,  # >= k: every class in one tile
    USE_DOT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One (set, row tile, column tile) of ``out``; program ids run over the column tiles
    first, then the row tiles, then the sets (a one-dimensional grid)."""
    ct = tl.float64 if IS_F64 else tl.float32
    pairs: tl.constexpr = BLOCK_I * BLOCK_J
    pid = tl.program_id(0).to(tl.int64)
    tiles_j = tl.cdiv(n, BLOCK_J)
    tiles_i = tl.cdiv(n, BLOCK_I)
    tj = pid % tiles_j
    ti = (pid // tiles_j) % tiles_i
    b = pid // (tiles_j * tiles_i)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), n)

    i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    real_i = i < length
    real_j = j < length
    kk = tl.arange(0, BLOCK_K)
    valid_k = kk < k
    u_rows = u_ptr + (b * n + i)[:, None] * h
    v_rows = v_ptr + (b * n + j)[:, None] * h

    acc = tl.zeros([pairs, BLOCK_K], ct)
    # a tile without a pair of real points skips the hidden units: its output is 0
    h_end = tl.where((ti * BLOCK_I < length) & (tj * BLOCK_J < length), h, 0)
    for h0 in range(0, h_end, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        valid_h = hh < h
        u = tl.load(u_rows + hh[None, :], mask=real_i[:, None] & valid_h[None, :], other=0.0)
        v = tl.load(v_rows + hh[None, :], mask=real_j[:, None] & valid_h[None, :], other=0.0)
        r = relu_keep_nan(u[:, None, :] + v[None, :, :])  # (BLOCK_I, BLOCK_J, BLOCK_H)
        r = tl.reshape(r, (pairs, BLOCK_H))
        w2t = tl.load(
            w2_ptr + kk[None, :] * h + hh[:, None],
            mask=valid_h[:, None] & valid_k[None, :],
            other=0.0,
        )  # (BLOCK_H, BLOCK_K): W2[:, chunk]^T
        if USE_DOT:
            acc = tl.dot(r, w2t, acc, input_precision="ieee")
        else:
            acc += tl.sum(r[:, :, None] * w2t[None, :, :], axis=1)

    # pair p of the tile is (i, j) = (p // BLOCK_J, p % BLOCK_J), as the reshape above
    p = tl.arange(0, pairs)
    pi = ti * BLOCK_I + p // BLOCK_J
    pj = tj * BLOCK_J + p % BLOCK_J
    real = (pi < length) & (pj < length)
    b2 = tl.load(b2_ptr + kk, mask=valid_k, other=0.0)
    out = tl.where(real[:, None], acc + b2[None, :], 0.0)
    offsets = ((b * n + pi) * n + pj)[:, None] * k + kk[None, :]
    inside = ((pi < n) & (pj < n))[:, None] & valid_k[None, :]
    tl.store(out_ptr + offsets, to_output(out, out_ptr), mask=inside)
