"""Triton forward of topn_create (docs/operators.md, topn_create): per set, selection; then FiLM.

Two ways to write the outputs (``topn_create_launch.py`` picks one, or is told to):

- split: ``select_kernel`` (one program per set) scores the n0 reference points, selects the
  n_b best and writes ``index`` and the weights in the compute dtype; ``film_kernel`` (one
  program per tile of output rows and features) gathers the table rows and writes ``x``,
  ``mask`` and ``weight``. x, by far the largest output, is then written by as many programs as
  it takes to keep the memory busy, whatever the number of sets.
- fused: ``fused_kernel`` (one program per set) selects, then writes its own set's rows, so
  that the selection of one set hides under the stores of the others (many sets). With
  ``NORM_ANGLES`` it also normalises the angles itself: the whole forward is then one launch
  (the single-launch path, for small reference sets).

Every kernel takes the set sizes as a tensor (``sizes_ptr``) or, when every set has the same
size, as the integer ``n_fixed`` (>= 0; -1: read the tensor), and clamps each n_b to
[0, min(n0, n_max)].

The 2-D tiles of comparisons are counted in float32 (exact: fewer than 2^24 per tile): summed
as integers, LLVM narrows the 0/1 terms to 4-bit lanes packed through local memory, which
ptxas then spills.

Selection (``_select_set``), two methods with the same result (the ranking of
docs/operators.md, "Ranking"):

- radix: ``rank_key`` maps each score to an unsigned integer whose order is the ranking (NaN
  first, -0 == +0); the threshold T = the key of the n_b-th best point is built 4 bits at a
  time from the top, by counting the keys at or above 16 candidates (8 passes for float32
  keys, 16 for float64). The selection is the keys above T plus the first (n_b - count above
  T) keys equal to T in index order (a cumulative sum). For ``sorted=True`` the selected keys
  are compacted in index order and each one's slot is the count of selected keys ranking
  before it (tiles of pairs, through a scratch buffer). Any n0 (chunks of ``BLOCK_N`` points
  scored again at every pass), any compute dtype.
- sort: each float32 key is packed with its index into one 64-bit key,
  ``rank_key << 32 | (2^32 - 1 - index)``: distinct keys whose descending order is the ranking,
  ties by increasing index included. ``tl.topk`` (``tl.sort`` when ``TOP_K == BLOCK_N``) of
  the set's keys gives the selection best first, with no scratch buffer and no pass per digit;
  ``sorted=False`` keeps the keys at or above the n_b-th and compacts them in index order.
  Float32 compute dtype (float32/16, bfloat16 inputs) and one block of points only (the
  whole set sorted in registers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import (
    clamped_square_norm,
    div_rn,
    key_score,
    rank_key,
    set_size,
    sqrt_rn,
    to_output,
)


@triton.jit
def _score_keys(
    q_ptr,
    denom,
    an_ptr,
    n0,
    a,
    start,
    BLOCK_N: tl.constexpr,
    NORM_ANGLES: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """(offsets, keys) of the points start..start+BLOCK_N of one set, key 0 (below every
    real key) past n0. The score is ``sum_k qn_k * an_ik`` summed for k = 0..a-1 in order
    (reference ``_cosine_scores``). ``an_ptr``: the normalised angles, transposed (a, n0); with
    NORM_ANGLES the raw angles (n0, a), normalised here exactly as normalize_angles_kernel
    does (same operations, same rounding)."""
    ct = tl.float64 if IS_F64 else tl.float32
    offs = start + tl.arange(0, BLOCK_N)
    valid = offs < n0
    if NORM_ANGLES:
        sq_an = tl.zeros([BLOCK_N], ct)
        for k in range(a):
            v = tl.load(an_ptr + offs * a + k, mask=valid, other=0.0).to(ct)
            sq_an = sq_an + v * v
        an_denom = sqrt_rn(clamped_square_norm(sq_an, IS_F64), IS_F64)
    s = tl.zeros([BLOCK_N], ct)
    for k in range(a):
        qk = tl.load(q_ptr + k).to(ct)
        if IS_F64:  # div_rn, inlined: a call per k is slow in the interpreter
            qk = qk / denom
        else:
            qk = tl.math.div_rn(qk, denom)
        if NORM_ANGLES:
            v = tl.load(an_ptr + offs * a + k, mask=valid, other=0.0).to(ct)
            if IS_F64:
                ank = v / an_denom
            else:
                ank = tl.math.div_rn(v, an_denom)
        else:
            ank = tl.load(an_ptr + k * n0 + offs, mask=valid, other=0.0)
        s = s + qk * ank
    return offs, tl.where(valid, rank_key(s, IS_F64), 0)


@triton.jit
def _select_radix(
    q_ptr,
    denom,
    an_ptr,
    nb,
    row,
    scratch,
    n0,
    a,
    index_ptr,
    w_ptr,
    ckey_ptr,
    cidx_ptr,
    sorted_flag,
    score_all,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM_ANGLES: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Radix selection of one set: writes index and w at row..row+nb."""
    ct = tl.float64 if IS_F64 else tl.float32
    kt = tl.uint64 if IS_F64 else tl.uint32
    key_bits: tl.constexpr = 64 if IS_F64 else 32
    # Each pass below loops over chunks of points; with ONE_CHUNK the loop runs once, on the
    # keys computed here.
    if ONE_CHUNK:
        offs0, keys0 = _score_keys(q_ptr, denom, an_ptr, n0, a, 0, BLOCK_N, NORM_ANGLES, IS_F64)

    # The best key gives the softmax's max (NaN when a score is NaN: NaN ranks first).
    kmax = tl.zeros([], kt)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            keys = keys0
        else:
            _, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, NORM_ANGLES, IS_F64)
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
                _, keys = _score_keys(
                    q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, NORM_ANGLES, IS_F64
                )
            at_least = tl.where(keys[None, :] >= cand[:, None], 1.0, 0.0)  # exact: < 2^24
            counts += tl.sum(at_least, 1).to(tl.int32)
        digit = tl.sum(tl.where(counts >= nb, 1, 0), 0) - 1
        thr = thr | (digit.to(kt) << shift)

    # Keys above T are all selected; of the keys equal to T (equal scores), the first `need`
    # in index order: the reference's stable sort.
    above = tl.zeros([], tl.int32)
    total = tl.zeros([], ct)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            keys = keys0
        else:
            _, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, NORM_ANGLES, IS_F64)
        gt = keys > thr
        above += tl.sum(tl.where(gt, 1, 0))
        e = tl.exp(key_score(keys, IS_F64) - mx)
        total += tl.sum(tl.where(tl.where(score_all != 0, keys != 0, gt), e, 0.0))
    need = nb - above
    # score_norm="selected": the softmax runs over the selected scores only
    at_thr = need.to(ct) * tl.exp(key_score(thr, IS_F64) - mx)
    total += tl.where(score_all != 0, 0.0, at_thr)
    scale = tl.where(score_all != 0, nb.to(ct), 1.0)

    # The selected points in index order: written out (sorted=False), or compacted for ranking.
    eq_before = tl.zeros([], tl.int32)
    sel_before = tl.zeros([], tl.int32)
    for start in range(0, n0, BLOCK_N):
        if ONE_CHUNK:
            offs, keys = offs0, keys0
        else:
            offs, keys = _score_keys(
                q_ptr, denom, an_ptr, n0, a, start, BLOCK_N, NORM_ANGLES, IS_F64
            )
        eq = tl.where(keys == thr, 1, 0)  # thr is a real key (never 0) when nb >= 1
        sel = (keys > thr) | ((eq != 0) & (eq_before + tl.cumsum(eq, 0) - eq < need))
        sel_i = tl.where(sel, 1, 0)
        pos = sel_before + tl.cumsum(sel_i, 0) - sel_i
        if sorted_flag:
            tl.store(ckey_ptr + scratch + pos, keys, mask=sel)
            tl.store(cidx_ptr + scratch + pos, offs.to(tl.int64), mask=sel)
        else:
            w = div_rn(tl.exp(key_score(keys, IS_F64) - mx), total, IS_F64) * scale
            tl.store(index_ptr + row + pos, offs.to(tl.int64), mask=sel)
            tl.store(w_ptr + row + pos, w, mask=sel)
        eq_before += tl.sum(eq)
        sel_before += tl.sum(sel_i)

    if sorted_flag:  # slot of a selected point = how many selected points rank before it
        tl.debug_barrier()  # the compacted keys are read by other threads
        for j0 in range(0, nb, BLOCK_R):
            rj = j0 + tl.arange(0, BLOCK_R)
            vj = rj < nb
            kj = tl.load(ckey_ptr + scratch + rj, mask=vj, other=0)
            rank = tl.zeros([BLOCK_R], tl.int32)
            for l0 in range(0, nb, BLOCK_R):
                rl = l0 + tl.arange(0, BLOCK_R)
                kl = tl.load(ckey_ptr + scratch + rl, mask=rl < nb, other=0)  # 0: never before
                before = (kl[None, :] > kj[:, None]) | (
                    (kl[None, :] == kj[:, None]) & (rl[None, :] < rj[:, None])
                )
                rank += tl.sum(tl.where(before, 1.0, 0.0), 1).to(tl.int32)
            ij = tl.load(cidx_ptr + scratch + rj, mask=vj, other=0)
            w = div_rn(tl.exp(key_score(kj, IS_F64) - mx), total, IS_F64) * scale
            tl.store(index_ptr + row + rank, ij, mask=vj)
            tl.store(w_ptr + row + rank, w, mask=vj)


@triton.jit
def _select_sort(
    q_ptr,
    denom,
    an_ptr,
    nb,
    row,
    n0,
    a,
    index_ptr,
    w_ptr,
    sorted_flag,
    score_all,
    BLOCK_N: tl.constexpr,
    TOP_K: tl.constexpr,
    NORM_ANGLES: tl.constexpr,
):
    """Selection of one set by sorting packed 64-bit keys (float32 scores, n0 <= BLOCK_N,
    nb <= TOP_K): writes index and w at row..row+nb."""
    offs, keys = _score_keys(q_ptr, denom, an_ptr, n0, a, 0, BLOCK_N, NORM_ANGLES, False)
    # low word 2^32 - 1 - index: of two equal scores, the smaller index has the larger key
    low = (~offs).to(tl.uint32, bitcast=True).to(tl.uint64)
    packed = tl.where(offs < n0, (keys.to(tl.uint64) << 32) | low, 0)
    if TOP_K == BLOCK_N:
        top = tl.sort(packed, descending=True)
    else:
        top = tl.topk(packed, TOP_K)
    rank = tl.arange(0, TOP_K)
    sel = rank < nb
    mx = key_score(tl.max(keys), False)  # NaN when a score is NaN: NaN ranks first
    e_top = tl.exp(key_score((top >> 32).to(tl.uint32), False) - mx)
    total_all = tl.sum(tl.where(keys != 0, tl.exp(key_score(keys, False) - mx), 0.0))
    total = tl.where(score_all != 0, total_all, tl.sum(tl.where(sel, e_top, 0.0)))
    scale = tl.where(score_all != 0, nb.to(tl.float32), 1.0)
    if sorted_flag:
        index = (~(top & 0xFFFFFFFF).to(tl.uint32)).to(tl.int64)
        tl.store(index_ptr + row + rank, index, mask=sel)
        tl.store(w_ptr + row + rank, tl.math.div_rn(e_top, total) * scale, mask=sel)
    else:  # the keys at or above the nb-th best, in index order
        # (nb = 0: thr = 2^64 - 1, above every key: a NaN key is 0xFFC00000 << 32 | low)
        thr = tl.min(tl.where(sel, top, ~tl.zeros([TOP_K], tl.uint64)))
        chosen = packed >= thr
        chosen_i = tl.where(chosen, 1, 0)
        pos = tl.cumsum(chosen_i, 0) - chosen_i
        w = tl.math.div_rn(tl.exp(key_score(keys, False) - mx), total) * scale
        tl.store(index_ptr + row + pos, offs.to(tl.int64), mask=chosen)
        tl.store(w_ptr + row + pos, w, mask=chosen)


@triton.jit
def _select_set(
    query_ptr,
    an_ptr,
    b,
    nb,
    n0,
    a,
    n_max,
    cs,
    index_ptr,
    w_ptr,
    ckey_ptr,
    cidx_ptr,
    sorted_flag,
    score_all,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TOP_K: tl.constexpr,
    USE_SORT: tl.constexpr,
    NORM_ANGLES: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Set b: top-n_b selection and softmax weights, written to index[b] and w[b] (compute
    dtype); index -1 and weight 0 on padding (slots nb..n_max-1). ``sorted_flag``,
    ``score_all``: the options sorted=True and score_norm="all" (ints, 0 or 1: run-time
    branches, so that they do not multiply the compiled variants)."""
    ct = tl.float64 if IS_F64 else tl.float32
    q_ptr = query_ptr + b * a
    sq = tl.zeros([], ct)
    for k in range(a):  # in index order, as the reference
        v = tl.load(q_ptr + k).to(ct)
        sq = sq + v * v
    denom = sqrt_rn(clamped_square_norm(sq, IS_F64), IS_F64)
    row = b * n_max
    if USE_SORT:
        _select_sort(
            q_ptr,
            denom,
            an_ptr,
            nb,
            row,
            n0,
            a,
            index_ptr,
            w_ptr,
            sorted_flag,
            score_all,
            BLOCK_N,
            TOP_K,
            NORM_ANGLES,
        )
    else:
        _select_radix(
            q_ptr,
            denom,
            an_ptr,
            nb,
            row,
            b * cs,
            n0,
            a,
            index_ptr,
            w_ptr,
            ckey_ptr,
            cidx_ptr,
            sorted_flag,
            score_all,
            BLOCK_N,
            ONE_CHUNK,
            BLOCK_R,
            NORM_ANGLES,
            IS_F64,
        )
    for j0 in range(nb, n_max, BLOCK_R):
        rj = j0 + tl.arange(0, BLOCK_R)
        vj = rj < n_max
        tl.store(index_ptr + row + rj, tl.full([BLOCK_R], -1, tl.int64), mask=vj)
        tl.store(w_ptr + row + rj, tl.zeros([BLOCK_R], ct), mask=vj)


@triton.jit(do_not_specialize=["n_fixed", "sorted_flag", "score_all", "cs"])
def select_kernel(
    query_ptr,  # (B, a) input dtype
    an_ptr,  # (a, n0) compute dtype: normalised angles, transposed
    sizes_ptr,  # (B,) int64, read when n_fixed < 0
    index_ptr,  # (B, n_max) int64 out
    w_ptr,  # (B, n_max) compute dtype out: the weights
    ckey_ptr,  # (B, cs) key scratch (radix, sorted only)
    cidx_ptr,  # (B, cs) int64 scratch (radix, sorted only)
    n_fixed,  # every set's size, or -1
    sorted_flag,  # 1: sorted=True
    score_all,  # 1: score_norm="all"
    n0,
    a,
    n_max,
    cs,  # min(n_max, n0)
    BLOCK_N: tl.constexpr,  # points per chunk (a power of two)
    ONE_CHUNK: tl.constexpr,  # n0 <= BLOCK_N: the keys are computed once, kept in registers
    BLOCK_R: tl.constexpr,  # slots per tile of the rank count and of the padding
    TOP_K: tl.constexpr,  # sort: power of two >= min(n_max, n0)
    USE_SORT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One set: top-n_b selection, softmax weights; index -1 and weight 0 on padding."""
    b = tl.program_id(0).to(tl.int64)
    nb = set_size(sizes_ptr, n_fixed, b, n0, n_max)
    _select_set(
        query_ptr,
        an_ptr,
        b,
        nb,
        n0,
        a,
        n_max,
        cs,
        index_ptr,
        w_ptr,
        ckey_ptr,
        cidx_ptr,
        sorted_flag,
        score_all,
        BLOCK_N,
        ONE_CHUNK,
        BLOCK_R,
        TOP_K,
        USE_SORT,
        False,
        IS_F64,
    )


@triton.jit
def _film(t, bias, m, gw, gb, bw, bb, real):
    """x = (t + bias) * (m gamma_w + gamma_b) + (m beta_w + beta_b) on a tile (rows, d),
    0 on rows that are not real."""
    h = t + bias
    mm = m[:, None]
    x = h * (mm * gw[None, :] + gb[None, :]) + (mm * bw[None, :] + bb[None, :])
    return tl.where(real[:, None], x, 0.0)


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
    x = _film(t, bias.to(ct), m, gw, gb, bw, bb, real)
    out_mask = vr[:, None] & vd[None, :]
    tl.store(x_ptr + r[:, None] * d + cols[None, :], to_output(x, x_ptr), mask=out_mask)


@triton.jit(do_not_specialize=["n_fixed", "sorted_flag", "score_all", "cs"])
def fused_kernel(
    query_ptr,  # (B, a) input dtype
    an_ptr,  # (a, n0) normalised angles, transposed; NORM_ANGLES: the angles (n0, a)
    table_ptr,  # (n0, d) input dtype
    bias_ptr,  # (B, d)
    film_ptr,  # (4, d)
    sizes_ptr,  # (B,) int64, read when n_fixed < 0
    x_ptr,  # (B, n_max, d) out
    mask_ptr,  # (B, n_max) bool out
    weight_ptr,  # (B, n_max) out (input dtype), written when WRITE_WEIGHT
    index_ptr,  # (B, n_max) int64 out
    w_ptr,  # (B, n_max) compute dtype: the weights (the weight output when WRITE_WEIGHT is off)
    ckey_ptr,  # (B, cs) key scratch (radix, sorted only)
    cidx_ptr,  # (B, cs) int64 scratch (radix, sorted only)
    n_fixed,  # every set's size, or -1
    sorted_flag,  # 1: sorted=True
    score_all,  # 1: score_norm="all"
    n0,
    a,
    d,
    n_max,
    cs,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TOP_K: tl.constexpr,
    USE_SORT: tl.constexpr,
    NORM_ANGLES: tl.constexpr,
    BLOCK_FR: tl.constexpr,  # rows per tile of x
    BLOCK_D: tl.constexpr,  # features per tile of x
    WRITE_WEIGHT: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One set: the selection of select_kernel, then the set's rows of x, mask and weight as
    film_kernel writes them (same operations, same values)."""
    ct = tl.float64 if IS_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    nb = set_size(sizes_ptr, n_fixed, b, n0, n_max)
    _select_set(
        query_ptr,
        an_ptr,
        b,
        nb,
        n0,
        a,
        n_max,
        cs,
        index_ptr,
        w_ptr,
        ckey_ptr,
        cidx_ptr,
        sorted_flag,
        score_all,
        BLOCK_N,
        ONE_CHUNK,
        BLOCK_R,
        TOP_K,
        USE_SORT,
        NORM_ANGLES,
        IS_F64,
    )
    tl.debug_barrier()  # index and w are read back by other threads
    row = b * n_max
    for r0 in range(0, n_max, BLOCK_FR):
        j = r0 + tl.arange(0, BLOCK_FR)
        vj = j < n_max
        idx = tl.load(index_ptr + row + j, mask=vj, other=-1)
        m = tl.load(w_ptr + row + j, mask=vj, other=0.0)
        real = (idx >= 0) & (idx < n0)
        tl.store(mask_ptr + row + j, real, mask=vj)
        if WRITE_WEIGHT:
            tl.store(weight_ptr + row + j, to_output(m, weight_ptr), mask=vj)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            vd = cols < d
            load_mask = real[:, None] & vd[None, :]
            t = tl.load(table_ptr + idx[:, None] * d + cols[None, :], mask=load_mask, other=0.0)
            bias = tl.load(bias_ptr + b * d + cols, mask=vd, other=0.0).to(ct)
            gw = tl.load(film_ptr + cols, mask=vd, other=0.0).to(ct)
            gb = tl.load(film_ptr + d + cols, mask=vd, other=0.0).to(ct)
            bw = tl.load(film_ptr + 2 * d + cols, mask=vd, other=0.0).to(ct)
            bb = tl.load(film_ptr + 3 * d + cols, mask=vd, other=0.0).to(ct)
            x = _film(t.to(ct), bias[None, :], m, gw, gb, bw, bb, real)
            out = x_ptr + (row + j)[:, None] * d + cols[None, :]
            tl.store(out, to_output(x, x_ptr), mask=vj[:, None] & vd[None, :])
