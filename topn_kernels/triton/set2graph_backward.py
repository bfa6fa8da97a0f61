"""Triton backward of set2graph_logits (docs/operators.md, set2graph_logits): the pair tiles.

With g the upstream gradient, z_ij = u_i + v_j (recomputed, never stored) and the sums over the
pairs of real points of each set:

    dh_ij    = [z_ij > 0] (W2^T g_ij)
    grad_u_i = sum_j dh_ij,   grad_v_j = sum_i dh_ij
    grad_W2  = sum_ij g_ij relu(z_ij)^T,   grad_b2 = sum_ij g_ij

(the host code turns grad_u and grad_v into the gradients of x, W1 and b1 with per-point
matrix products). ``pairs_backward_kernel`` has two roles, chosen by the constexpr ``ROWS``:
with ROWS it owns a tile of rows i and sums over columns j (grad_u, and grad_W2, grad_b2 when
asked for); without, it owns a tile of columns j and sums over rows i (grad_v). Each program
covers one (set, owned tile, chunk of the other points): its sums over the chunk go to its own
slot of a partial-sum buffer, which the host code reduces with torch in a fixed order. No
atomics: the result does not depend on the order in which programs run (deterministic). The
price is that the rows and the columns each recompute dh (the native kernels keep partial sums
of grad_v instead, which would cost a (B, n / BLOCK_I, n, h) buffer here).

Per (owned tile, tile of other points, chunk of BLOCK_H hidden units) the program holds
z (BLOCK_A, BLOCK_O, BLOCK_H) in registers. ``g^T relu(z)`` is a ``tl.dot`` over the tile's
pairs when ``USE_DOT`` (at least 16 pairs and 16 hidden units), else a broadcast product summed
over the pairs, with ``input_precision="ieee"`` (never TF32). ``W2^T g`` is summed class by
class: k is usually a handful of classes, which a ``tl.dot`` would pad to 16, and, compiled
for sm_90, a ``tl.dot`` there (with the pairs' gradients held for both products) made the
tile spill registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .set2graph_forward import relu_keep_nan


@triton.jit
def pairs_backward_kernel(
    g_ptr,  # (B, n, n, k) upstream gradient, input dtype, any strides
    u_ptr,  # (B, n, h) compute dtype
    v_ptr,  # (B, n, h) compute dtype
    w2_ptr,  # (k, h) compute dtype
    lengths_ptr,  # (B,) int64, clamped to [0, n] here
    gh_ptr,  # (C, B, n, h) compute dtype out: per chunk, grad_u (ROWS) or grad_v (WANT_H)
    gw2_ptr,  # (C, B, T, k, h) compute dtype out: per program, grad_W2 terms (WANT_W2)
    gb2_ptr,  # (C, B, T, k) compute dtype out: per program, grad_b2 terms (WANT_B2)
    stride_gb,
    stride_gi,
    stride_gj,
    stride_gk,
    batch,
    n,
    h,
    k,
    chunk,  # other points per chunk, a multiple of BLOCK_O
    BLOCK_A: tl.constexpr,  # owned points per tile
    BLOCK_O: tl.constexpr,  # other points per tile
    BLOCK_H: tl.constexpr,  # hidden units per chunk
    BLOCK_K: tl.constexpr,  # >= k
    ROWS: tl.constexpr,  # owned points are rows i (else columns j)
    WANT_H: tl.constexpr,  # write the sums of dh (grad_u or grad_v)
    WANT_W2: tl.constexpr,  # write the grad_W2 terms (ROWS only)
    WANT_B2: tl.constexpr,  # write the grad_b2 terms (ROWS only)
    USE_DOT: tl.constexpr,  # tl.dot for the sums over the pairs of a tile
    IS_F64: tl.constexpr,
):
    """One (set, owned tile, chunk of other points); program ids run over the chunks first,
    then the owned tiles, then the sets (a one-dimensional grid). C = chunks, T = owned tiles.
    Every slot of the outputs is written, zeros where the program has no pair."""
    ct = tl.float64 if IS_F64 else tl.float32
    pairs: tl.constexpr = BLOCK_A * BLOCK_O
    pid = tl.program_id(0).to(tl.int64)
    chunks = tl.cdiv(n, chunk)
    tiles = tl.cdiv(n, BLOCK_A)
    c = pid % chunks
    t = (pid // chunks) % tiles
    b = pid // (chunks * tiles)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), n)

    a = t * BLOCK_A + tl.arange(0, BLOCK_A)
    real_a = a < length
    o_start = c * chunk
    # an owned tile past the set's length has no pair: skip the other points
    o_end = tl.where(t * BLOCK_A < length, tl.minimum(o_start + chunk, length), o_start)
    kk = tl.arange(0, BLOCK_K)
    valid_k = kk < k
    if ROWS:
        own_ptr, other_ptr = u_ptr, v_ptr
        stride_a, stride_o = stride_gi, stride_gj
    else:
        own_ptr, other_ptr = v_ptr, u_ptr
        stride_a, stride_o = stride_gj, stride_gi
    g_set = g_ptr + b * stride_gb
    g_own = g_set + a[:, None] * stride_a  # (BLOCK_A, 1)
    program_slot = (c * batch + b) * tiles + t

    if WANT_B2:
        gb2 = tl.zeros([BLOCK_K], ct)
        for o0 in range(o_start, o_end, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            pair = real_a[:, None] & (o < o_end)[None, :]
            g = tl.load(
                g_own[:, :, None] + o[None, :, None] * stride_o + kk[None, None, :] * stride_gk,
                mask=pair[:, :, None] & valid_k[None, None, :],
                other=0.0,
            ).to(ct)
            gb2 += tl.sum(tl.sum(g, axis=1), axis=0)
        tl.store(gb2_ptr + program_slot * k + kk, gb2, mask=valid_k)

    if WANT_H or WANT_W2:
        for h0 in range(0, h, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            valid_h = hh < h
            own = tl.load(
                own_ptr + (b * n + a)[:, None] * h + hh[None, :],
                mask=real_a[:, None] & valid_h[None, :],
                other=0.0,
            )  # (BLOCK_A, BLOCK_H)
            dh_sum = tl.zeros([BLOCK_A, BLOCK_H], ct)
            gw2 = tl.zeros([BLOCK_K, BLOCK_H], ct)
            for o0 in range(o_start, o_end, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                real_o = o < o_end
                other = tl.load(
                    other_ptr + (b * n + o)[:, None] * h + hh[None, :],
                    mask=real_o[:, None] & valid_h[None, :],
                    other=0.0,
                )  # (BLOCK_O, BLOCK_H)
                pair = real_a[:, None] & real_o[None, :]
                z = own[:, None, :] + other[None, :, :]  # (BLOCK_A, BLOCK_O, BLOCK_H)
                g_pairs = g_own + o[None, :] * stride_o  # (BLOCK_A, BLOCK_O)
                if WANT_H:
                    dz = tl.zeros([BLOCK_A, BLOCK_O, BLOCK_H], ct)
                    for cls in range(k):  # W2^T g, one class at a time
                        g_c = tl.load(g_pairs + cls * stride_gk, mask=pair, other=0.0).to(ct)
                        w_c = tl.load(w2_ptr + cls * h + hh, mask=valid_h, other=0.0)
                        dz += g_c[:, :, None] * w_c[None, None, :]
                    dh = tl.where(pair[:, :, None] & (z > 0), dz, 0.0)
                    dh_sum += tl.sum(dh, axis=1)
                if WANT_W2:
                    r = tl.where(pair[:, :, None], relu_keep_nan(z), 0.0)
                    r = tl.reshape(r, (pairs, BLOCK_H))
                    g = tl.load(
                        g_pairs[:, :, None] + kk[None, None, :] * stride_gk,
                        mask=pair[:, :, None] & valid_k[None, None, :],
                        other=0.0,
                    ).to(ct)
                    g = tl.reshape(g, (pairs, BLOCK_K))
                    if USE_DOT:
                        gw2 = tl.dot(tl.trans(g), r, gw2, input_precision="ieee")
                    else:
                        gw2 += tl.sum(g[:, :, None] * r[:, None, :], axis=0)
            if WANT_H:
                rows = (c * batch + b) * n + a
                tl.store(
                    gh_ptr + rows[:, None] * h + hh[None, :],
                    dh_sum,
                    mask=(a < n)[:, None] & valid_h[None, :],
                )
            if WANT_W2:
                tl.store(
                    gw2_ptr + (program_slot * k + kk)[:, None] * h + hh[None, :],
                    gw2,
                    mask=valid_k[:, None] & valid_h[None, :],
                )
