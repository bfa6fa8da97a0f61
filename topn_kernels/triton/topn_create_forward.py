"""Triton forward of topn_create (docs/operators.md, topn_create): per set, selection; per
output tile, FiLM.

``select_kernel`` (one program per set) scores the n0 reference points, selects the n_b best
and writes ``index`` and the weights in the compute dtype; ``film_kernel`` (one program per tile
of output rows and features) gathers the table rows and writes ``x``, ``mask`` and ``weight``.
Two launches (three with the normalisation of the angles): the selection has one program per
set, while x, by far the largest output, is written by as many programs as it takes to keep
the memory busy.

Selection: a radix select on integer keys. ``rank_key`` maps each score to an unsigned integer
whose order is the ranking (NaN first, -0 == +0); the threshold T = the key of the n_b-th best
point is built 4 bits at a time from the top, by counting the keys at or above 16 candidates
(8 passes for float32 keys, 16 for float64). The selection is the keys above T plus the first
(n_b - count above T) keys equal to T in index order (a cumulative sum): exactly the
reference's stable-sort order for ties. For ``sorted=True`` the selected keys are compacted in
index order and each one's slot is the count of selected keys ranking before it.

Why not ``tl.sort``/``tl.topk``: they sort power-of-two blocks of values, so the index has to be
packed into the value (no room beside a float64 key) and a runtime n_b needs the whole row
sorted; the radix select costs a fixed number of passes whatever n_b, each a compare and a sum.
Their relative speed on a GPU has not been measured yet (``bench/gpu_check.sh`` times the
kernels on a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import clamped_square_norm, div_rn, key_score, rank_key, sqrt_rn, to_output


@triton.jit
def _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N: tl.constexpr, IS_F64: tl.constexpr):
    """(offsets, keys) of the points start..start+BLOCK_N of one set, key 0 (below every
    real key) past n0. The score is ``sum_k qn_k * an_ik`` summed for k = 0..a-1 in order
    (reference ``_cosine_scores``)."""
    ct = tl.float64 if IS_F64 else tl.float32
    offs = start + tl.arange(0, BLOCK_N)
    valid = offs < n0
    s = tl.zeros([BLOCK_N], ct)
    for k in range(a):
        qk = tl.load(q_ptr + k).to(ct)
        if IS_F64:  # div_rn, inlined: a call per k is slow in the interpreter
            qk = qk / denom
        else:
            qk = tl.math.div_rn(qk, denom)
        s = s + qk * tl.load(an_ptr + k * n0 + offs, mask=valid, other=0.0)
    return offs, tl.where(valid, rank_key(s, IS_F64), 0)


@triton.jit
def select_kernel(
    query_ptr,  # (B, a) input dtype
    an_ptr,  # (a, n0) compute dtype: normalised angles, transposed
    sizes_ptr,  # (B,) int64
    index_ptr,  # (B, n_max) int64 out
    w_ptr,  # (B, n_max) compute dtype out: the weights
    ckey_ptr,  # (B, cs) key scratch (sorted only)
    cidx_ptr,  # (B, cs) int64 scratch (sorted only)
    n0,
    a,
    n_max,
    cs,  # min(n_max, n0)
    BLOCK_N: tl.constexpr,  # points per chunk (a power of two)
    ONE_CHUNK: tl.constexpr,  # n0 <= BLOCK_N: the keys are computed once, kept in registers
    BLOCK_R: tl.constexpr,  # slots per tile of the rank count and of the padding
    SORTED: tl.constexpr,
    SCORE_ALL: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One set: top-n_b selection, softmax weights; index -1 and weight 0 on padding."""
    ct = tl.float64 if IS_F64 else tl.float32
    kt = tl.uint64 if IS_F64 else tl.uint32
    key_bits: tl.constexpr = 64 if IS_F64 else 32
    b = tl.program_id(0).to(tl.int64)
    nb = tl.load(sizes_ptr + b)
    nb = tl.minimum(tl.maximum(nb, 0), tl.minimum(n0, n_max))  # never out of bounds
    q_ptr = query_ptr + b * a
    sq = tl.zeros([], ct)
    for k in range(a):  # in index order, as the reference
        v = tl.load(q_ptr + k).to(ct)
        sq = sq + v * v
    denom = sqrt_rn(clamped_square_norm(sq, IS_F64), IS_F64)

    # Each pass below loops over chunks of points; with ONE_CHUNK the loop runs once, on the
    # keys computed here.
    if ONE_CHUNK:
        offs0, keys0 = _score_keys(q_ptr, denom, an_ptr, n0, a, 0, BLOCK_N, IS_F64)

    # The best key gives the softmax's max (NaN when a score is NaN: NaN ranks first).
    kmax = tl.zeros([], kt)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            keys = keys0
        else:
            _, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, IS_F64)
        kmax = tl.maximum(kmax, tl.max(keys))
    mx = key_score(kmax, IS_F64)

    # Radix select: the largest T with at least nb keys >= T, built 4 bits at a time from the
    # top. Candidate v (0..15) puts digit v at this step's place; the counts of keys >= each
    # candidate fall as v grows, and the digit is the largest v whose count reaches nb (v = 0
    # always does). Keys past n0 are 0, below every candidate but the first v = 0.
    thr = tl.zeros([], kt)
    digits = tl.arange(0, 16).to(kt)
    for step in range(key_bits // 4):
        shift = key_bits - 4 - 4 * step
        cand = thr | (digits << shift)
        counts = tl.zeros([16], tl.int32)
        for start in range(0, n0, BLOCK_N):
            if ONE_CHUNK:
                keys = keys0
            else:
                _, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, IS_F64)
            counts += tl.sum((keys[None, :] >= cand[:, None]).to(tl.int32), 1)
        digit = tl.sum((counts >= nb).to(tl.int32), 0) - 1
        thr = thr | (digit.to(kt) << shift)

    # Keys above T are all selected; of the keys equal to T (equal scores), the first `need`
    # in index order: the reference's stable sort.
    above = tl.zeros([], tl.int32)
    total = tl.zeros([], ct)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            keys = keys0
        else:
            _, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, IS_F64)
        gt = keys > thr
        above += tl.sum(gt.to(tl.int32))
        e = tl.exp(key_score(keys, IS_F64) - mx)
        if SCORE_ALL:
            total += tl.sum(tl.where(keys != 0, e, 0.0))
        else:
            total += tl.sum(tl.where(gt, e, 0.0))
    need = nb - above
    if not SCORE_ALL:  # the softmax runs over the selected scores only
        total += need.to(ct) * tl.exp(key_score(thr, IS_F64) - mx)
    scale = nb.to(ct) if SCORE_ALL else 1.0

    # The selected points in index order: written out (sorted=False), or compacted for ranking.
    row = b * n_max
    eq_before = tl.zeros([], tl.int32)
    sel_before = tl.zeros([], tl.int32)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            offs, keys = offs0, keys0
        else:
            offs, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, IS_F64)
        eq = (keys == thr).to(tl.int32)  # thr is a real key (never 0) when nb >= 1
        sel = (keys > thr) | ((eq != 0) & (eq_before + tl.cumsum(eq, 0) - eq < need))
        sel_i = sel.to(tl.int32)
        pos = sel_before + tl.cumsum(sel_i, 0) - sel_i
        if SORTED:
            tl.store(ckey_ptr + b * cs + pos, keys, mask=sel)
            tl.store(cidx_ptr + b * cs + pos, offs.to(tl.int64), mask=sel)
        else:
            w = div_rn(tl.exp(key_score(keys, IS_F64) - mx), total, IS_F64) * scale
            tl.store(index_ptr + row + pos, offs.to(tl.int64), mask=sel)
            tl.store(w_ptr + row + pos, w, mask=sel)
        eq_before += tl.sum(eq)
        sel_before += tl.sum(sel_i)

    if SORTED:  # slot of a selected point = how many selected points rank before it
        tl.debug_barrier()  # the compacted keys are read by other threads
        for j0 in range(0, nb, BLOCK_R):
            rj = j0 + tl.arange(0, BLOCK_R)
            vj = rj < nb
            kj = tl.load(ckey_ptr + b * cs + rj, mask=vj, other=0)
            rank = tl.zeros([BLOCK_R], tl.int32)
            for l0 in range(0, nb, BLOCK_R):
                rl = l0 + tl.arange(0, BLOCK_R)
                kl = tl.load(ckey_ptr + b * cs + rl, mask=rl < nb, other=0)  # 0: never before
                before = (kl[None, :] > kj[:, None]) | (
                    (kl[None, :] == kj[:, None]) & (rl[None, :] < rj[:, None])
                )
                rank += tl.sum(before.to(tl.int32), 1)
            ij = tl.load(cidx_ptr + b * cs + rj, mask=vj, other=0)
            w = div_rn(tl.exp(key_score(kj, IS_F64) - mx), total, IS_F64) * scale
            tl.store(index_ptr + row + rank, ij, mask=vj)
            tl.store(w_ptr + row + rank, w, mask=vj)

    for j0 in range(nb, n_max, BLOCK_R):
        rj = j0 + tl.arange(0, BLOCK_R)
        vj = rj < n_max
        tl.store(index_ptr + row + rj, tl.full([BLOCK_R], -1, tl.int64), mask=vj)
        tl.store(w_ptr + row + rj, tl.zeros([BLOCK_R], ct), mask=vj)


@triton.jit
def film_kernel(
    table_ptr,  # (n0, d) input dtype
    bias_ptr,  # (B, d)
    film_ptr,  # (4, d)
    index_ptr,  # (B, n_max) int64
    w_ptr,  # (B, n_max) compute dtype
    x_ptr,  # (B, n_max, d) out
    mask_ptr,  # (B, n_max) bool out
    weight_ptr,  # (B, n_max) out (input dtype), written when WRITE_WEIGHT
    rows,  # B * n_max
    n_max,
    n0,
    d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """x = (table[index] + bias) * (m gamma_w + gamma_b) + (m beta_w + beta_b) on a tile of
    rows and features; padding rows (index -1) are 0."""
    ct = tl.float64 if IS_F64 else tl.float32
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    vr = r < rows
    idx = tl.load(index_ptr + r, mask=vr, other=-1)
    m = tl.load(w_ptr + r, mask=vr, other=0.0)
    real = (idx >= 0) & (idx < n0)
    if tl.program_id(1) == 0:
        tl.store(mask_ptr + r, real, mask=vr)
        if WRITE_WEIGHT:
            tl.store(weight_ptr + r, to_output(m, weight_ptr), mask=vr)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vd = cols < d
    load_mask = real[:, None] & vd[None, :]
    t = tl.load(table_ptr + idx[:, None] * d + cols[None, :], mask=load_mask, other=0.0).to(ct)
    bias = tl.load(bias_ptr + (r // n_max)[:, None] * d + cols[None, :], mask=load_mask, other=0.0)
    gw = tl.load(film_ptr + cols, mask=vd, other=0.0).to(ct)
    gb = tl.load(film_ptr + d + cols, mask=vd, other=0.0).to(ct)
    bw = tl.load(film_ptr + 2 * d + cols, mask=vd, other=0.0).to(ct)
    bb = tl.load(film_ptr + 3 * d + cols, mask=vd, other=0.0).to(ct)
    h = t + bias.to(ct)
    mm = m[:, None]
    x = h * (mm * gw[None, :] + gb[None, :]) + (mm * bw[None, :] + bb[None, :])
    x = tl.where(real[:, None], x, 0.0)
    out_mask = vr[:, None] & vd[None, :]
    tl.store(x_ptr + r[:, None] * d + cols[None, :], to_output(x, x_ptr), mask=out_mask)
