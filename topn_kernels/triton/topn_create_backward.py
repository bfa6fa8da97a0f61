"""Triton backward of topn_create (docs/operators.md, topn_create).

With g the upstream gradient of x, m the weights, h = table[sigma] + bias and
dm_bj = grad_weight_bj + sum_k g_bjk (h_bjk gamma_w_k + beta_w_k):
- grad_bias_b = gamma_w * P1_b + gamma_b * P0_b with P1_b = sum_j g_bj m_bj, P0_b = sum_j g_bj;
- grad_table_i = sum over the slots (b, j) that selected i of g_bj (m_bj gamma_w + gamma_b);
- grad_film = (sum g m h, sum g h, sum P1, sum P0);
- score gradients: "selected": ds_bj = m_bj (dm_bj - <m_b, dm_b>) at the selected points;
  "all": ds_bi = p_bi (dp_bi - <m_b, dm_b>) at every point, p = softmax(s_b), dp = n_b dm at
  the selected points; then grad qn_b = sum_i ds_bi an_i, grad an_i = sum_b ds_bi qn_b, and
  the gradient of the normalisation.

``set_backward_kernel`` (one program per set) does everything that is a sum over one set's
slots. What is a sum over sets for one reference point (grad_table; grad_angles when
score_norm="selected") takes one of three routes (``topn_create_launch.py`` picks one):

- split, atomics: scattered with ``tl.atomic_add(sem="relaxed")`` from the same kernel into
  zeroed buffers;
- split, deterministic (``torch.are_deterministic_algorithms_enabled()``): gathered in a fixed
  order by ``point_gather_kernel`` from the slots sorted by point;
- single (small shapes, deterministic, two launches in all): ``set_backward_kernel`` with
  ``DENSE_OUT`` writes its set's row of two dense (B, n0) maps, each program filling its own
  row first (no zeroing launch): the score gradient of every point (0 where none) and the slot
  that selected each point (-1 where none); ``point_dense_kernel`` then sums, for each point,
  over the sets in order, and one more program of it sums the film terms of the sets. The
  normalisation of the angles is folded into both kernels (``NORM_ANGLES``: they read the
  angles themselves).

With score_norm="all" every point has a score gradient in every set: ``angles_finish_kernel``
(split) or ``point_dense_kernel`` (single) sums the dense (B, n0) ds in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import nan_max, normalize_backward, set_size, to_output


@triton.jit
def _angle_rows(an_ptr, pts, ok, ka, va, n0, a, NORM_ANGLES: tl.constexpr, IS_F64: tl.constexpr):
    """The normalised angles of the points ``pts`` (R, A_BLOCK), 0 where not ``ok``: read from
    the normalised angles transposed (a, n0), or (NORM_ANGLES) normalised here from the angles
    (n0, a)."""
    tile = ok[:, None] & va[None, :]
    if NORM_ANGLES:
        ct = tl.float64 if IS_F64 else tl.float32
        v = tl.load(an_ptr + pts[:, None] * a + ka[None, :], mask=tile, other=0.0).to(ct)
        inv = 1.0 / tl.sqrt(tl.maximum(tl.sum(v * v, 1), 1e-24))
        return v * inv[:, None]
    else:
        return tl.load(an_ptr + ka[None, :] * n0 + pts[:, None], mask=tile, other=0.0)


@triton.jit(do_not_specialize=["n_fixed"])
def set_backward_kernel(
    gx_ptr,  # (B, n_max, d) upstream gradient of x
    gw_ptr,  # (B, n_max) upstream gradient of weight
    query_ptr,  # (B, a)
    an_ptr,  # (a, n0) normalised angles, transposed, compute dtype; NORM_ANGLES: angles (n0, a)
    table_ptr,  # (n0, d)
    bias_ptr,  # (B, d)
    film_ptr,  # (4, d)
    index_ptr,  # (B, n_max) int64
    sizes_ptr,  # (B,) int64
    gq_ptr,  # (B, a) out: grad query
    gb_ptr,  # (B, d) out: grad bias
    film_part_ptr,  # (B, 4, d) compute dtype out: this set's terms of grad film
    qn_ptr,  # (B, a) compute dtype out: normalised queries
    m_ptr,  # (B, n_max) compute dtype out: weights (recomputed in the compute dtype)
    dm_ptr,  # (B, n_max) compute dtype out: weight gradients
    ds_ptr,  # (B, n_max) compute dtype out: score gradients of the slots (selected, gather)
    ds_dense_ptr,  # (B, n0) compute dtype out: score gradients of every point (all, DENSE_OUT)
    inv_ptr,  # (B, n0) int32 out: the slot that selected each point, or -1 (DENSE_OUT)
    gt_acc_ptr,  # (n0, d) compute dtype, zeroed: grad table (ATOMIC)
    dan_acc_ptr,  # (n0, a) compute dtype, zeroed: grad of the normalised angles (ATOMIC, selected)
    n_fixed,  # every set's size, or -1: read sizes
    n0,
    a,
    d,
    n_max,
    A_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= d: a slot's whole row in one tile
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCORE_ALL: tl.constexpr,
    ATOMIC: tl.constexpr,
    DENSE_OUT: tl.constexpr,  # the dense maps of point_dense_kernel (never with ATOMIC)
    NORM_ANGLES: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One set: grad query, grad bias, the set's film terms, its weights and their gradients,
    and its share of the per-point gradients (atomics, slot buffers or dense maps)."""
    ct = tl.float64 if IS_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    nb = set_size(sizes_ptr, n_fixed, b, n0, n_max)
    ka = tl.arange(0, A_BLOCK)
    va = ka < a
    q = tl.load(query_ptr + b * a + ka, mask=va, other=0.0).to(ct)
    q_sq = tl.sum(q * q, 0)
    qn = q / tl.sqrt(tl.maximum(q_sq, 1e-24))
    tl.store(qn_ptr + b * a + ka, qn, mask=va)
    cols = tl.arange(0, BLOCK_D)
    vd = cols < d
    gamma_w = tl.load(film_ptr + cols, mask=vd, other=0.0).to(ct)
    gamma_b = tl.load(film_ptr + d + cols, mask=vd, other=0.0).to(ct)
    beta_w = tl.load(film_ptr + 2 * d + cols, mask=vd, other=0.0).to(ct)
    bias = tl.load(bias_ptr + b * d + cols, mask=vd, other=0.0).to(ct)
    row = b * n_max

    # Softmax max and normaliser: over the selected scores, or over all n0 with the
    # p-weighted sum of the angles (online, rescaled as the max grows).
    mx = tl.full([], float("-inf"), ct)
    total = tl.zeros([], ct)
    p_an = tl.zeros([A_BLOCK], ct)
    if SCORE_ALL:
        for i0 in range(0, n0, BLOCK_N):
            pts = i0 + tl.arange(0, BLOCK_N)
            vp = pts < n0
            an = _angle_rows(an_ptr, pts, vp, ka, va, n0, a, NORM_ANGLES, IS_F64)
            s = tl.where(vp, tl.sum(an * qn[None, :], 1), float("-inf"))
            new = tl.maximum(mx, nan_max(s, 0), propagate_nan=tl.PropagateNan.ALL)
            e = tl.exp(s - new)
            rescale = tl.exp(mx - new)
            total = total * rescale + tl.sum(e, 0)
            p_an = p_an * rescale + tl.sum(e[:, None] * an, 0)
            mx = new
        p_an = p_an / total
        scale = nb.to(ct)
    else:
        for j0 in range(0, nb, BLOCK_J):
            slots = j0 + tl.arange(0, BLOCK_J)
            sig = tl.load(index_ptr + row + slots, mask=slots < nb, other=-1)
            ok = (sig >= 0) & (sig < n0)
            an = _angle_rows(an_ptr, sig, ok, ka, va, n0, a, NORM_ANGLES, IS_F64)
            s = tl.where(ok, tl.sum(an * qn[None, :], 1), float("-inf"))
            new = tl.maximum(mx, nan_max(s, 0), propagate_nan=tl.PropagateNan.ALL)
            total = total * tl.exp(mx - new) + tl.sum(tl.exp(s - new), 0)
            mx = new
        scale = tl.full([], 1.0, ct)

    # Per slot: m, dm; per set: P1, P0, the film terms, <m, dm>, sum m dm an, sum m an.
    p1 = tl.zeros([BLOCK_D], ct)
    p0 = tl.zeros([BLOCK_D], ct)
    f1 = tl.zeros([BLOCK_D], ct)
    f0 = tl.zeros([BLOCK_D], ct)
    mdm = tl.zeros([], ct)
    u = tl.zeros([A_BLOCK], ct)
    m_an = tl.zeros([A_BLOCK], ct)
    for j0 in range(0, nb, BLOCK_J):
        slots = j0 + tl.arange(0, BLOCK_J)
        sig = tl.load(index_ptr + row + slots, mask=slots < nb, other=-1)
        ok = (sig >= 0) & (sig < n0)
        an = _angle_rows(an_ptr, sig, ok, ka, va, n0, a, NORM_ANGLES, IS_F64)
        s = tl.sum(an * qn[None, :], 1)
        m = tl.where(ok, tl.exp(s - mx) / total * scale, 0.0)
        tile = ok[:, None] & vd[None, :]
        g = tl.load(gx_ptr + (row + slots)[:, None] * d + cols[None, :], mask=tile, other=0.0)
        g = g.to(ct)
        t = tl.load(table_ptr + sig[:, None] * d + cols[None, :], mask=tile, other=0.0).to(ct)
        h = t + bias[None, :]
        dm = tl.load(gw_ptr + row + slots, mask=ok, other=0.0).to(ct)
        dm += tl.sum(g * (h * gamma_w[None, :] + beta_w[None, :]), 1)
        gm = g * m[:, None]
        p1 += tl.sum(gm, 0)
        p0 += tl.sum(g, 0)
        f1 += tl.sum(gm * h, 0)
        f0 += tl.sum(g * h, 0)
        mdm += tl.sum(m * dm, 0)
        u += tl.sum((m * dm)[:, None] * an, 0)
        m_an += tl.sum(m[:, None] * an, 0)
        if ATOMIC:
            grad_t = g * (m[:, None] * gamma_w[None, :] + gamma_b[None, :])
            tl.atomic_add(
                gt_acc_ptr + sig[:, None] * d + cols[None, :], grad_t, mask=tile, sem="relaxed"
            )
        tl.store(m_ptr + row + slots, m, mask=slots < nb)
        tl.store(dm_ptr + row + slots, dm, mask=slots < nb)

    tl.store(gb_ptr + b * d + cols, to_output(gamma_w * p1 + gamma_b * p0, gb_ptr), mask=vd)
    part = film_part_ptr + b * 4 * d + cols
    tl.store(part, f1, mask=vd)
    tl.store(part + d, f0, mask=vd)
    tl.store(part + 2 * d, p1, mask=vd)
    tl.store(part + 3 * d, p0, mask=vd)
    # A softmax over one point has no gradient: 0 exactly, as in the reference, where the
    # difference below, with its product fused into an fma, keeps that product's rounding
    # error (times 0 rather than 0: a NaN or inf still gives NaN, as in the reference)
    if SCORE_ALL:  # sum_i ds_i an_i = sum_j m_j dm_j an_j - <m, dm> sum_i p_i an_i
        dqn = u - mdm * p_an
        dqn = tl.where(n0 > 1, dqn, dqn * 0.0)
    else:  # sum_j m_j (dm_j - <m, dm>) an_j
        dqn = u - mdm * m_an
        dqn = tl.where(nb > 1, dqn, dqn * 0.0)
    gq = normalize_backward(q[None, :], dqn[None, :], q_sq + tl.zeros([1], ct), IS_F64)
    tl.store(gq_ptr + b * a + ka[None, :], to_output(gq, gq_ptr), mask=va[None, :])

    tl.debug_barrier()  # m and dm are read back by other threads
    if SCORE_ALL or DENSE_OUT:  # the set's row of the dense maps, filled whole first
        for i0 in range(0, n0, BLOCK_N):
            pts = i0 + tl.arange(0, BLOCK_N)
            vp = pts < n0
            if SCORE_ALL:
                an = _angle_rows(an_ptr, pts, vp, ka, va, n0, a, NORM_ANGLES, IS_F64)
                p = tl.exp(tl.sum(an * qn[None, :], 1) - mx) / total
                tl.store(ds_dense_ptr + b * n0 + pts, -p * mdm, mask=vp)
            else:
                tl.store(ds_dense_ptr + b * n0 + pts, tl.zeros([BLOCK_N], ct), mask=vp)
            if DENSE_OUT:
                tl.store(inv_ptr + b * n0 + pts, tl.full([BLOCK_N], -1, tl.int32), mask=vp)
        tl.debug_barrier()
        # at the selected points (all distinct): + m_j dm_j (all) or m_j (dm_j - <m, dm>)
        for j0 in range(0, nb, BLOCK_J):
            slots = j0 + tl.arange(0, BLOCK_J)
            sig = tl.load(index_ptr + row + slots, mask=slots < nb, other=-1)
            ok = (sig >= 0) & (sig < n0)
            m = tl.load(m_ptr + row + slots, mask=ok, other=0.0)
            dm = tl.load(dm_ptr + row + slots, mask=ok, other=0.0)
            ds = tl.load(ds_dense_ptr + b * n0 + sig, mask=ok, other=0.0)
            if SCORE_ALL:
                tl.store(ds_dense_ptr + b * n0 + sig, ds + m * dm, mask=ok)
            else:
                tl.store(ds_dense_ptr + b * n0 + sig, ds + m * (dm - mdm), mask=ok)
            if DENSE_OUT:
                tl.store(inv_ptr + b * n0 + sig, slots.to(tl.int32), mask=ok)
    else:
        for j0 in range(0, nb, BLOCK_J):
            slots = j0 + tl.arange(0, BLOCK_J)
            sig = tl.load(index_ptr + row + slots, mask=slots < nb, other=-1)
            ok = (sig >= 0) & (sig < n0)
            m = tl.load(m_ptr + row + slots, mask=ok, other=0.0)
            ds = m * (tl.load(dm_ptr + row + slots, mask=ok, other=0.0) - mdm)
            if ATOMIC:
                dan = ds[:, None] * qn[None, :]
                tl.atomic_add(
                    dan_acc_ptr + sig[:, None] * a + ka[None, :],
                    dan,
                    mask=ok[:, None] & va[None, :],
                    sem="relaxed",
                )
            else:
                tl.store(ds_ptr + row + slots, ds, mask=slots < nb)


@triton.jit
def point_gather_kernel(
    gx_ptr,  # (B, n_max, d)
    film_ptr,  # (4, d)
    angles_ptr,  # (n0, a)
    angles_sq_ptr,  # (n0,) compute dtype: squared norms of the angles
    order_ptr,  # (B * n_max,) int64: slots sorted by the point they selected (stable)
    starts_ptr,  # (n0 + 1,) int64: point i's slots are order[starts[i]:starts[i + 1]]
    m_ptr,  # (B, n_max) compute dtype
    ds_ptr,  # (B, n_max) compute dtype
    qn_ptr,  # (B, a) compute dtype
    gt_ptr,  # (n0, d) out: grad table
    ga_ptr,  # (n0, a) out: grad angles (when ANGLES)
    a,
    d,
    n_max,
    A_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= d
    BLOCK_S: tl.constexpr,
    ANGLES: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """One reference point: its table (and angle) gradient summed over the slots that selected
    it, in slot order: deterministic, no atomics."""
    ct = tl.float64 if IS_F64 else tl.float32
    i = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + i)
    end = tl.load(starts_ptr + i + 1)
    cols = tl.arange(0, BLOCK_D)
    vd = cols < d
    ka = tl.arange(0, A_BLOCK)
    va = ka < a
    s1 = tl.zeros([BLOCK_D], ct)
    s0 = tl.zeros([BLOCK_D], ct)
    dan = tl.zeros([A_BLOCK], ct)
    for r0 in range(start, end, BLOCK_S):
        r = r0 + tl.arange(0, BLOCK_S)
        vr = r < end
        slot = tl.load(order_ptr + r, mask=vr, other=0)
        g = tl.load(
            gx_ptr + slot[:, None] * d + cols[None, :], mask=vr[:, None] & vd[None, :], other=0.0
        )
        g = g.to(ct)
        m = tl.load(m_ptr + slot, mask=vr, other=0.0)
        s1 += tl.sum(g * m[:, None], 0)
        s0 += tl.sum(g, 0)
        if ANGLES:
            ds = tl.load(ds_ptr + slot, mask=vr, other=0.0)
            qn = tl.load(
                qn_ptr + (slot // n_max)[:, None] * a + ka[None, :],
                mask=vr[:, None] & va[None, :],
                other=0.0,
            )
            dan += tl.sum(ds[:, None] * qn, 0)
    gamma_w = tl.load(film_ptr + cols, mask=vd, other=0.0).to(ct)
    gamma_b = tl.load(film_ptr + d + cols, mask=vd, other=0.0).to(ct)
    tl.store(gt_ptr + i * d + cols, to_output(gamma_w * s1 + gamma_b * s0, gt_ptr), mask=vd)
    if ANGLES:
        v = tl.load(angles_ptr + i * a + ka, mask=va, other=0.0).to(ct)
        sq = tl.load(angles_sq_ptr + i + tl.zeros([1], tl.int64))
        ga = normalize_backward(v[None, :], dan[None, :], sq, IS_F64)
        tl.store(ga_ptr + i * a + ka[None, :], to_output(ga, ga_ptr), mask=va[None, :])


@triton.jit
def angles_finish_kernel(
    angles_ptr,  # (n0, a)
    angles_sq_ptr,  # (n0,) compute dtype
    dan_ptr,  # (n0, a) compute dtype: grad of the normalised angles (not DENSE)
    ds_dense_ptr,  # (B, n0) compute dtype: score gradients (DENSE)
    qn_ptr,  # (B, a) compute dtype (DENSE)
    ga_ptr,  # (n0, a) out: grad angles
    batch,
    n0,
    a,
    A_BLOCK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DENSE: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """grad angles of a block of points: from the scattered grad of the normalised angles, or
    (DENSE) as sum_b ds_bi qn_b over every set, in set order."""
    ct = tl.float64 if IS_F64 else tl.float32
    pts = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    vp = pts < n0
    ka = tl.arange(0, A_BLOCK)
    va = ka < a
    tile = vp[:, None] & va[None, :]
    if DENSE:
        dan = tl.zeros([BLOCK_I, A_BLOCK], ct)
        for b0 in range(0, batch, BLOCK_B):
            sets = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            vb = sets < batch
            ds = tl.load(
                ds_dense_ptr + sets[:, None] * n0 + pts[None, :],
                mask=vb[:, None] & vp[None, :],
                other=0.0,
            )
            qn = tl.load(
                qn_ptr + sets[:, None] * a + ka[None, :], mask=vb[:, None] & va[None, :], other=0.0
            )
            dan += tl.sum(ds[:, :, None] * qn[:, None, :], 0)
    else:
        dan = tl.load(dan_ptr + pts[:, None] * a + ka[None, :], mask=tile, other=0.0)
    v = tl.load(angles_ptr + pts[:, None] * a + ka[None, :], mask=tile, other=0.0).to(ct)
    sq = tl.load(angles_sq_ptr + pts, mask=vp, other=1.0)
    ga = normalize_backward(v, dan, sq, IS_F64)
    tl.store(ga_ptr + pts[:, None] * a + ka[None, :], to_output(ga, ga_ptr), mask=tile)


@triton.jit
def point_dense_kernel(
    gx_ptr,  # (B, n_max, d) upstream gradient of x
    film_ptr,  # (4, d)
    angles_ptr,  # (n0, a)
    inv_ptr,  # (B, n0) int32: the slot of set b that selected point i, or -1
    m_ptr,  # (B, n_max) compute dtype: weights
    ds_dense_ptr,  # (B, n0) compute dtype: score gradients of every point
    qn_ptr,  # (B, a) compute dtype: normalised queries
    film_part_ptr,  # (B, 4, d) compute dtype: each set's terms of grad film
    gt_ptr,  # (n0, d) out: grad table (TABLE)
    ga_ptr,  # (n0, a) out: grad angles (ANGLES)
    gf_ptr,  # (4, d) out: grad film (FILM)
    batch,
    n0,
    a,
    d,
    n_max,
    A_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= d
    BLOCK_B: tl.constexpr,  # sets per tile
    BLOCK_F: tl.constexpr,  # film terms per tile
    TABLE: tl.constexpr,
    ANGLES: tl.constexpr,
    FILM: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Programs 0..n0-1: point i's table and angle gradients, summed over the sets in order
    (the sets that selected it, for the table); program n0: grad film, the sets' terms summed
    in order. Deterministic, no atomics."""
    ct = tl.float64 if IS_F64 else tl.float32
    i = tl.program_id(0).to(tl.int64)
    if i < n0:
        cols = tl.arange(0, BLOCK_D)
        vd = cols < d
        ka = tl.arange(0, A_BLOCK)
        va = ka < a
        s1 = tl.zeros([BLOCK_D], ct)
        s0 = tl.zeros([BLOCK_D], ct)
        dan = tl.zeros([A_BLOCK], ct)
        for b0 in range(0, batch, BLOCK_B):
            sets = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            vb = sets < batch
            if TABLE:
                slot = tl.load(inv_ptr + sets * n0 + i, mask=vb, other=-1)
                hit = slot >= 0
                flat = sets * n_max + slot
                tile = hit[:, None] & vd[None, :]
                g = tl.load(gx_ptr + flat[:, None] * d + cols[None, :], mask=tile, other=0.0)
                g = g.to(ct)
                m = tl.load(m_ptr + flat, mask=hit, other=0.0)
                s1 += tl.sum(g * m[:, None], 0)
                s0 += tl.sum(g, 0)
            if ANGLES:
                ds = tl.load(ds_dense_ptr + sets * n0 + i, mask=vb, other=0.0)
                qn = tl.load(
                    qn_ptr + sets[:, None] * a + ka[None, :],
                    mask=vb[:, None] & va[None, :],
                    other=0.0,
                )
                dan += tl.sum(ds[:, None] * qn, 0)
        if TABLE:
            gamma_w = tl.load(film_ptr + cols, mask=vd, other=0.0).to(ct)
            gamma_b = tl.load(film_ptr + d + cols, mask=vd, other=0.0).to(ct)
            grad = gamma_w * s1 + gamma_b * s0
            tl.store(gt_ptr + i * d + cols, to_output(grad, gt_ptr), mask=vd)
        if ANGLES:
            v = tl.load(angles_ptr + i * a + ka, mask=va, other=0.0).to(ct)
            sq = tl.sum(v * v, 0) + tl.zeros([1], ct)
            ga = normalize_backward(v[None, :], dan[None, :], sq, IS_F64)
            tl.store(ga_ptr + i * a + ka[None, :], to_output(ga, ga_ptr), mask=va[None, :])
    else:
        if FILM:
            for f0 in range(0, 4 * d, BLOCK_F):
                f = f0 + tl.arange(0, BLOCK_F)
                vf = f < 4 * d
                acc = tl.zeros([BLOCK_F], ct)
                for b0 in range(0, batch, BLOCK_B):
                    sets = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                    part = tl.load(
                        film_part_ptr + sets[:, None] * (4 * d) + f[None, :],
                        mask=(sets < batch)[:, None] & vf[None, :],
                        other=0.0,
                    )
                    acc += tl.sum(part, 0)
                tl.store(gf_ptr + f, to_output(acc, gf_ptr), mask=vf)
