// The vectorised loops of the Set2Graph edge head (csrc/cpu/set2graph.cpp), written once and
// included by set2graph.cpp several times, once per instruction set, each inside its own
// namespace and `#pragma GCC target` region (portable x86-64 / SSE2, AVX2, AVX-512F). The
// includer defines S2G_VBYTES, the width of one vector in bytes, S2G_FWD_ROWS, the rows of
// one forward micro-tile, S2G_BWD_GROUPS, the most vectors of columns of one backward
// micro-tile, and S2G_SMALL_VECTORS, the vectors of hidden units of one small-set tile, and
// includes <algorithm>, <cstddef>, <cstdint>, <cstring> and <utility> first.
//
// Vectors are GCC vector extensions of S2G_VBYTES bytes: every lane runs the same scalar
// operations in the same order (no fused multiply-add: the library is built with
// -ffp-contract=off), so a lane's result never depends on where it sits in a vector, and the
// scalar tails round as the vector lanes do. Every sum has a fixed order; which thread runs a
// call never changes its result.
//
// No include guard: this file is meant to be included once per instruction set.

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(S2G_VBYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(S2G_VBYTES)));
};

template <typename T>
constexpr int lanes() {
  return S2G_VBYTES / static_cast<int>(sizeof(T));
}

template <typename T, typename V = typename Vec<T>::type>
inline __attribute__((always_inline)) V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, typename V = typename Vec<T>::type>
inline __attribute__((always_inline)) void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T, std::size_t... I>
inline __attribute__((always_inline)) V splat_lanes(T s, std::index_sequence<I...>) {
  return V{(static_cast<void>(I), s)...};
}

// (s, s, ..., s): a broadcast
template <typename T, typename V = typename Vec<T>::type>
inline __attribute__((always_inline)) V splat(T s) {
  return splat_lanes<V>(s, std::make_index_sequence<lanes<T>()>());
}

// ---------------------------------------------------------------------------------------------
// Small matrix products: C[m][c] = sum_k A[m][k] * B[k][c], k in increasing order from 0.
// ---------------------------------------------------------------------------------------------

template <typename T, int MR, int PV>
inline __attribute__((always_inline)) void gemm_block(const T* A, int64_t lda, const T* B,
                                                      int64_t ldb, int64_t K, T* C,
                                                      int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int W = lanes<T>();
  V acc[MR][PV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < PV; ++v) acc[m][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[PV];
    for (int v = 0; v < PV; ++v) b[v] = load(B + k * ldb + v * W);
    for (int m = 0; m < MR; ++m) {
      const V a = splat(A[m * lda + k]);
      for (int v = 0; v < PV; ++v) acc[m][v] = acc[m][v] + a * b[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < PV; ++v) store(C + m * ldc + v * W, acc[m][v]);
}

template <typename T, int MR>
void gemm_rows(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t K, int64_t N, T* C,
               int64_t ldc) {
  constexpr int W = lanes<T>();
  constexpr int PV = 4;
  int64_t c = 0;
  for (; c + PV * W <= N; c += PV * W) gemm_block<T, MR, PV>(A, lda, B + c, ldb, K, C + c, ldc);
  for (; c + W <= N; c += W) gemm_block<T, MR, 1>(A, lda, B + c, ldb, K, C + c, ldc);
  for (; c < N; ++c)
    for (int m = 0; m < MR; ++m) {
      T acc = 0;
      for (int64_t k = 0; k < K; ++k) acc = acc + A[m * lda + k] * B[k * ldb + c];
      C[m * ldc + c] = acc;
    }
}

// C (M x N, leading dim ldc) = A (M x K, lda) @ B (K x N, ldb).
template <typename T>
void gemm(const T* A, int64_t lda, int64_t M, const T* B, int64_t ldb, int64_t K, int64_t N,
          T* C, int64_t ldc) {
  constexpr int MR = 4;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_rows<T, MR>(A + m * lda, lda, B, ldb, K, N, C + m * ldc, ldc);
  for (; m < M; ++m) gemm_rows<T, 1>(A + m * lda, lda, B, ldb, K, N, C + m * ldc, ldc);
}

// ---------------------------------------------------------------------------------------------
// Pair tiles, vectorised over the columns j (sets of more than a few vectors of points). One
// set: u holds u_i = W1a x_i + b1 in rows of ldu >= h values, 4 rows from the tile's first
// (zero rows past the set); vb holds v_j = W1b x_j in blocks of W columns:
// vb[(grp * h + p) * W + lane] is v_{grp * W + lane}[p] (zero columns past the set).
// ---------------------------------------------------------------------------------------------

// relu that keeps NaN (as torch.relu): 0 where z < 0, z otherwise. That is x86's
// max(0, z), which returns its second operand when either is NaN (or both are zeros).
template <typename V>
inline __attribute__((always_inline)) V relu(V z) {
  const V zero{};
#if defined(__x86_64__) && S2G_VBYTES == 64
  if constexpr (sizeof(z[0]) == 4)
    return __builtin_ia32_maxps512_mask(zero, z, zero, static_cast<unsigned short>(-1), 4);
  else
    return __builtin_ia32_maxpd512_mask(zero, z, zero, static_cast<unsigned char>(-1), 4);
#elif defined(__x86_64__) && S2G_VBYTES == 32
  if constexpr (sizeof(z[0]) == 4)
    return __builtin_ia32_maxps256(zero, z);
  else
    return __builtin_ia32_maxpd256(zero, z);
#elif defined(__x86_64__) && S2G_VBYTES == 16
  if constexpr (sizeof(z[0]) == 4)
    return __builtin_ia32_maxps(zero, z);
  else
    return __builtin_ia32_maxpd(zero, z);
#else
  return z < zero ? zero : z;
#endif
}

// out[ti][grp lane][c] = b2[c] + sum_p W2[c][p] relu(u_ti[p] + v_j[p]) for TI rows, one group
// of W columns, KC classes from c0; written to tile[(ti * ldt + j) * k + c] for j in the group.
template <typename T, int TI, int KC>
void forward_tile(const T* u, int64_t ldu, const T* vb_grp, int64_t h, const T* W2, const T* b2,
                  int64_t c0, int64_t k, T* tile, int64_t ldt, int64_t j0, int64_t ncols) {
  using V = typename Vec<T>::type;
  constexpr int W = lanes<T>();
  V acc[TI][KC];
  for (int ti = 0; ti < TI; ++ti)
    for (int c = 0; c < KC; ++c) acc[ti][c] = V{};
  for (int64_t p = 0; p < h; ++p) {
    const V vv = load(vb_grp + p * W);
    V w[KC];
    for (int c = 0; c < KC; ++c) w[c] = splat(W2[(c0 + c) * h + p]);
    for (int ti = 0; ti < TI; ++ti) {
      const V r = relu(splat(u[ti * ldu + p]) + vv);
      for (int c = 0; c < KC; ++c) acc[ti][c] = acc[ti][c] + w[c] * r;
    }
  }
  for (int ti = 0; ti < TI; ++ti)
    for (int c = 0; c < KC; ++c) {
      const V o = acc[ti][c] + splat(b2[c0 + c]);
      for (int l = 0; l < W && l < ncols; ++l) tile[(ti * ldt + j0 + l) * k + c0 + c] = o[l];
    }
}

template <typename T, int KC>
void forward_rows_kc(const T* u, int64_t ldu, const T* vb, int64_t h, int64_t ncols,
                     const T* W2, const T* b2, int64_t c0, int64_t k, T* tile, int64_t ldt) {
  constexpr int W = lanes<T>();
  constexpr int TI = S2G_FWD_ROWS;
  static_assert(4 % TI == 0, "4 rows must split into micro-tiles");
  for (int64_t j0 = 0; j0 < ncols; j0 += W) {
    const T* vb_grp = vb + (j0 / W) * h * W;
    for (int t = 0; t < 4; t += TI)
      forward_tile<T, TI, KC>(u + t * ldu, ldu, vb_grp, h, W2, b2, c0, k, tile + t * ldt * k,
                              ldt, j0, ncols - j0);
  }
}

// The forward of 4 rows against the first ncols columns of one set:
// tile[(ti * ldt + j) * k + c] for ti < 4, j < ncols, c < k.
template <typename T>
void forward_rows(const T* u, int64_t ldu, const T* vb, int64_t h, int64_t ncols, const T* W2,
                  const T* b2, int64_t k, T* tile, int64_t ldt) {
  for (int64_t c0 = 0; c0 < k; c0 += 4) {
    switch (std::min<int64_t>(4, k - c0)) {
      case 1: forward_rows_kc<T, 1>(u, ldu, vb, h, ncols, W2, b2, c0, k, tile, ldt); break;
      case 2: forward_rows_kc<T, 2>(u, ldu, vb, h, ncols, W2, b2, c0, k, tile, ldt); break;
      case 3: forward_rows_kc<T, 3>(u, ldu, vb, h, ncols, W2, b2, c0, k, tile, ldt); break;
      default: forward_rows_kc<T, 4>(u, ldu, vb, h, ncols, W2, b2, c0, k, tile, ldt); break;
    }
  }
}

// Backward of 4 rows x NG groups of W columns, KC classes from c0. g[(c * 4 + ti) * ldg + j]
// is the upstream gradient of class c at (row ti, column j) (zero past the set). With
// dh = [u_i + v_j > 0] * sum_c W2[c] g_ijc, accumulates
//   gu_lanes[(ti * h + p) * W + lane]  += sum over the tile's columns j = lane (mod W) of dh_ij[p]
//   gvb[(grp * h + p) * W + lane]      += sum over the 4 rows of dh_ij[p]
//   gw2_lanes[(c * h + p) * W + lane]  += sum over the tile's pairs, j = lane (mod W), of
//                                         g_ijc relu(u_i + v_j)[p]
// each in a fixed order (rows, then groups).
template <typename T, int NG, int KC>
void backward_tile(const T* u, int64_t ldu, const T* vb_grp, int64_t h, const T* g, int64_t ldg,
                   int64_t j0, const T* W2, int64_t c0, T* gu_lanes, T* gvb_grp, T* gw2_lanes) {
  using V = typename Vec<T>::type;
  constexpr int W = lanes<T>();
  const V zero{};
  for (int64_t p = 0; p < h; ++p) {
    V w[KC], vv[NG], gv[NG], gw[KC];
    for (int c = 0; c < KC; ++c) {
      w[c] = splat(W2[(c0 + c) * h + p]);
      gw[c] = V{};
    }
    for (int q = 0; q < NG; ++q) {
      vv[q] = load(vb_grp + (q * h + p) * W);
      gv[q] = V{};
    }
    for (int ti = 0; ti < 4; ++ti) {
      const V uu = splat(u[ti * ldu + p]);
      V gsum{};
      for (int q = 0; q < NG; ++q) {
        const V r = relu(uu + vv[q]);
        V gc[KC];
        for (int c = 0; c < KC; ++c) gc[c] = load(g + ((c0 + c) * 4 + ti) * ldg + j0 + q * W);
        V dh = w[0] * gc[0];
        for (int c = 1; c < KC; ++c) dh = dh + w[c] * gc[c];
        dh = r > zero ? dh : zero;
        gsum = gsum + dh;
        gv[q] = gv[q] + dh;
        for (int c = 0; c < KC; ++c) gw[c] = gw[c] + gc[c] * r;
      }
      T* gl = gu_lanes + (ti * h + p) * W;
      store(gl, load(gl) + gsum);
    }
    for (int q = 0; q < NG; ++q) {
      T* gvl = gvb_grp + (q * h + p) * W;
      store(gvl, load(gvl) + gv[q]);
    }
    for (int c = 0; c < KC; ++c) {
      T* gwl = gw2_lanes + ((c0 + c) * h + p) * W;
      store(gwl, load(gwl) + gw[c]);
    }
  }
}

template <typename T, int NG>
void backward_group_kc(const T* u, int64_t ldu, const T* vb_grp, int64_t h, const T* g,
                       int64_t ldg, int64_t j0, const T* W2, int64_t k, T* gu_lanes, T* gvb_grp,
                       T* gw2_lanes) {
  for (int64_t c0 = 0; c0 < k; c0 += 4) {
    switch (std::min<int64_t>(4, k - c0)) {
      case 1:
        backward_tile<T, NG, 1>(u, ldu, vb_grp, h, g, ldg, j0, W2, c0, gu_lanes, gvb_grp,
                                gw2_lanes);
        break;
      case 2:
        backward_tile<T, NG, 2>(u, ldu, vb_grp, h, g, ldg, j0, W2, c0, gu_lanes, gvb_grp,
                                gw2_lanes);
        break;
      case 3:
        backward_tile<T, NG, 3>(u, ldu, vb_grp, h, g, ldg, j0, W2, c0, gu_lanes, gvb_grp,
                                gw2_lanes);
        break;
      default:
        backward_tile<T, NG, 4>(u, ldu, vb_grp, h, g, ldg, j0, W2, c0, gu_lanes, gvb_grp,
                                gw2_lanes);
        break;
    }
  }
}

// The backward of 4 rows against the first ncols columns of one set (see backward_tile);
// columns in tiles of S2G_BWD_GROUPS groups of W, the last tile with the groups left.
template <typename T>
void backward_rows(const T* u, int64_t ldu, const T* vb, int64_t h, int64_t ncols, const T* g,
                   int64_t ldg, const T* W2, int64_t k, T* gu_lanes, T* gvb, T* gw2_lanes) {
  constexpr int W = lanes<T>();
  constexpr int NG = S2G_BWD_GROUPS;
  static_assert(NG == 1 || NG == 2 || NG == 4, "1, 2 or 4 groups per tile");
  const int64_t groups = (ncols + W - 1) / W;
  for (int64_t q0 = 0; q0 < groups; q0 += NG) {
    const int64_t off = q0 * h * W, j0 = q0 * W;
    switch (std::min<int64_t>(NG, groups - q0)) {
      case 1:
        backward_group_kc<T, 1>(u, ldu, vb + off, h, g, ldg, j0, W2, k, gu_lanes, gvb + off,
                                gw2_lanes);
        break;
#if S2G_BWD_GROUPS >= 2
      case 2:
        backward_group_kc<T, 2>(u, ldu, vb + off, h, g, ldg, j0, W2, k, gu_lanes, gvb + off,
                                gw2_lanes);
        break;
#endif
#if S2G_BWD_GROUPS >= 4
      case 3:
        backward_group_kc<T, 3>(u, ldu, vb + off, h, g, ldg, j0, W2, k, gu_lanes, gvb + off,
                                gw2_lanes);
        break;
      case 4:
        backward_group_kc<T, 4>(u, ldu, vb + off, h, g, ldg, j0, W2, k, gu_lanes, gvb + off,
                                gw2_lanes);
        break;
#endif
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small sets: the backward vectorised over the hidden units p instead (a set of a few points
// would fill few lanes of a vector of columns). u, v (L x hp) rows u_i, v_j with hp = h rounded
// up to W (zero past h); W2p (k x hp), zero past h; g (L x L x k) the set's upstream gradient.
// ---------------------------------------------------------------------------------------------

// Row i, PC vectors of hidden units from p0, KC classes from c0:
//   gu_i[p] (= if assign, else +=) sum_j dh_ij[p]        (j in increasing order)
//   gv[j][p] += dh_ij[p]
//   gw2[c][p] += sum_j g_ijc relu(u_i + v_j)[p]           (j in increasing order)
template <typename T, int PC, int KC>
void small_tile(const T* ui, const T* v, int64_t hp, int64_t L, const T* gi, int64_t k,
                const T* W2p, int64_t c0, int64_t p0, T* gui, bool assign, T* gv, T* gw2) {
  using V = typename Vec<T>::type;
  constexpr int W = lanes<T>();
  const V zero{};
  V uu[PC], w[KC][PC], gu[PC], gw[KC][PC];
  for (int q = 0; q < PC; ++q) {
    uu[q] = load(ui + p0 + q * W);
    gu[q] = V{};
    for (int c = 0; c < KC; ++c) {
      w[c][q] = load(W2p + (c0 + c) * hp + p0 + q * W);
      gw[c][q] = load(gw2 + (c0 + c) * hp + p0 + q * W);
    }
  }
  for (int64_t j = 0; j < L; ++j) {
    V gc[KC];
    for (int c = 0; c < KC; ++c) gc[c] = splat(gi[j * k + c0 + c]);
    for (int q = 0; q < PC; ++q) {
      const V r = relu(uu[q] + load(v + j * hp + p0 + q * W));
      V dh = w[0][q] * gc[0];
      for (int c = 1; c < KC; ++c) dh = dh + w[c][q] * gc[c];
      dh = r > zero ? dh : zero;
      gu[q] = gu[q] + dh;
      T* gvj = gv + j * hp + p0 + q * W;
      store(gvj, load(gvj) + dh);
      for (int c = 0; c < KC; ++c) gw[c][q] = gw[c][q] + gc[c] * r;
    }
  }
  for (int q = 0; q < PC; ++q) {
    T* o = gui + p0 + q * W;
    store(o, assign ? gu[q] : load(o) + gu[q]);
    for (int c = 0; c < KC; ++c) store(gw2 + (c0 + c) * hp + p0 + q * W, gw[c][q]);
  }
}

template <typename T, int KC>
void small_row_kc(const T* ui, const T* v, int64_t hp, int64_t L, const T* gi, int64_t k,
                  const T* W2p, int64_t c0, T* gui, T* gv, T* gw2) {
  constexpr int W = lanes<T>();
  constexpr int PC = S2G_SMALL_VECTORS;
  int64_t p0 = 0;
  for (; p0 + PC * W <= hp; p0 += PC * W)
    small_tile<T, PC, KC>(ui, v, hp, L, gi, k, W2p, c0, p0, gui, c0 == 0, gv, gw2);
  for (; p0 < hp; p0 += W)
    small_tile<T, 1, KC>(ui, v, hp, L, gi, k, W2p, c0, p0, gui, c0 == 0, gv, gw2);
}

// The backward of one small set: gu (L x hp) written, gv (L x hp) and gw2 (k x hp) accumulated
// (the caller zeroes gv first).
template <typename T>
void small_backward(const T* u, const T* v, int64_t hp, int64_t L, const T* g, int64_t k,
                    const T* W2p, T* gu, T* gv, T* gw2) {
  for (int64_t i = 0; i < L; ++i) {
    const T* ui = u + i * hp;
    const T* gi = g + i * L * k;
    T* gui = gu + i * hp;
    if (k == 0) std::fill(gui, gui + hp, T(0));
    for (int64_t c0 = 0; c0 < k; c0 += 4) {
      switch (std::min<int64_t>(4, k - c0)) {
        case 1: small_row_kc<T, 1>(ui, v, hp, L, gi, k, W2p, c0, gui, gv, gw2); break;
        case 2: small_row_kc<T, 2>(ui, v, hp, L, gi, k, W2p, c0, gui, gv, gw2); break;
        case 3: small_row_kc<T, 3>(ui, v, hp, L, gi, k, W2p, c0, gui, gv, gw2); break;
        default: small_row_kc<T, 4>(ui, v, hp, L, gi, k, W2p, c0, gui, gv, gw2); break;
      }
    }
  }
}
