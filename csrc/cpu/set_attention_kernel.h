// The attention loops of set_attention.h, written once with at::vec::Vectorized; included by
// set_attention_default.cpp and set_attention_avx2.cpp, each compiled for its instruction set.
//
// Each pair's k (forward) or v (backward) is copied, transposed, into a small zero-padded block
// of columns of length np (n rounded up to the vector width W); its other rows (q, v, and the
// gradient g_a) are read in place where the head width d is a multiple of W, else copied into
// zero-padded rows of width dp (d rounded up to W). Every loop then runs over whole vectors, with no sum along a vector: the lanes of
// a score row (over j) or of an output row (over the d channels). The padding lanes hold 0, or
// -inf in the scores before the softmax, so they never reach a result.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "set_attention.h"

namespace topn_kernels {
namespace {  // internal linkage: each including file has its own build of these functions
namespace set_attention_detail {

// Only plain loops and at::vec below (no std:: algorithm or container): a template of the
// standard library would be compiled into both builds and the linker would keep one copy.

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kWidth = Vec<T>::size();
static_assert(kWidth<float> <= 16 && kWidth<double> <= 16, "attention_scratch_size pads to 16");

inline int64_t round_up(int64_t v, int64_t w) { return (v + w - 1) / w * w; }

template <typename T>
inline void copy(const T* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = src[i];
}

template <typename T>
inline T lane_sum(const Vec<T>& v) {
  __at_align__ T lanes[kWidth<T>];
  v.store(lanes);
  T s = 0;
  for (int64_t l = 0; l < kWidth<T>; ++l) s += lanes[l];
  return s;
}

template <typename T>
inline T lane_max(const Vec<T>& v) {
  __at_align__ T lanes[kWidth<T>];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t l = 1; l < kWidth<T>; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// out (len,) = sum_r w[r * w_stride] * rows[r * row_stride : r * row_stride + len] for
// r < count, len a multiple of W (row_stride defaults to len: packed rows).
template <typename T>
inline void combine_rows(const T* w, int64_t w_stride, const T* rows, int64_t count, int64_t len,
                         T* out, int64_t row_stride = -1) {
  if (row_stride < 0) row_stride = len;
  for (int64_t c = 0; c < len; c += kWidth<T>) {
    Vec<T> acc(T(0));
    for (int64_t r = 0; r < count; ++r)
      acc = acc + Vec<T>(w[r * w_stride]) * Vec<T>::loadu(rows + r * row_stride + c);
    acc.store(out + c);
  }
}

// Rows of a pair read in place (where the head width d is a multiple of W, so that whole vectors
// cover a row) or from a packed, zero-padded copy: the first row and the row stride.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride;
};

// The blocks of one pair, carved out of the caller's scratch (attention_scratch_size) and
// zeroed once per task: only the first n rows and d columns are ever written, so the padding
// stays 0 from pair to pair.
template <typename T>
struct Blocks {
  int64_t n, d, np, dp;
  T *q, *k, *go, *kt, *vt, *v, *p, *ds, *row;

  Blocks(const AttentionDims& s, T* scratch)
      : n(s.n), d(s.d), np(round_up(s.n, kWidth<T>)), dp(round_up(s.d, kWidth<T>)) {
    T* next = scratch;
    for (T** b : {&q, &k, &v, &go}) *b = next, next += n * dp;
    for (T** b : {&kt, &vt}) *b = next, next += d * np;
    for (T** b : {&p, &ds}) *b = next, next += n * np;
    row = next;
    next += np > dp ? np : dp;
    for (T* z = scratch; z < next; ++z) *z = T(0);
  }

  // rows (n, dp) and/or cols (d, np) from n rows of width d at src with the given stride
  void load(const T* src, int64_t stride, T* rows, T* cols) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) {
        const T value = src[i * stride + c];
        if (rows) rows[i * dp + c] = value;
        if (cols) cols[c * np + i] = value;
      }
  }
};

template <typename T>
void forward(const T* qkv, T* probs, T* a, const AttentionDims& s, int64_t begin, int64_t end,
             T* scratch) {
  Blocks<T> blk(s, scratch);
  const int64_t n = s.n, d = s.d, np = blk.np, dp = blk.dp, stride = 3 * s.C;
  const bool direct = d == dp;  // rows read and written in place, no packed copies
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const T* base = qkv + b * n * stride + h * d;
    Rows<T> q{base, stride}, v{base + 2 * s.C, stride};
    if (!direct) {
      blk.load(base, stride, blk.q, nullptr);
      blk.load(base + 2 * s.C, stride, blk.v, nullptr);
      q = {blk.q, dp}, v = {blk.v, dp};
    }
    blk.load(base + s.C, stride, nullptr, blk.kt);
    T* p_out = probs + bh * n * n;
    T* score = blk.row;
    for (int64_t i = 0; i < n; ++i) {
      // the scores of row i over j, as columns: sum_c q_ic kt[c, :]
      combine_rows(q.data + i * q.stride, 1, blk.kt, d, np, score);
      for (int64_t j = 0; j < np; ++j) score[j] = j < n ? score[j] * scale : neg_inf;
      Vec<T> top(neg_inf);
      for (int64_t j = 0; j < np; j += kWidth<T>)
        top = at::vec::maximum(top, Vec<T>::loadu(score + j));
      const Vec<T> m(lane_max(top));
      Vec<T> total(T(0));
      for (int64_t j = 0; j < np; j += kWidth<T>) {
        const Vec<T> e = (Vec<T>::loadu(score + j) - m).exp();
        e.store(score + j);
        total = total + e;
      }
      const Vec<T> inv(T(1) / lane_sum(total));
      T* pi = blk.p + i * np;
      for (int64_t j = 0; j < np; j += kWidth<T>) (Vec<T>::loadu(score + j) * inv).store(pi + j);
      copy(pi, n, p_out + i * n);
    }
    for (int64_t i = 0; i < n; ++i) {  // a_i = sum_j P_ij v_j
      T* a_i = a + (b * n + i) * s.C + h * d;
      combine_rows(blk.p + i * np, 1, v.data, n, dp, direct ? a_i : blk.row, v.stride);
      if (!direct) copy(blk.row, d, a_i);
    }
  }
}

template <typename T>
void backward(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s,
              int64_t begin, int64_t end, T* scratch) {
  Blocks<T> blk(s, scratch);
  const int64_t n = s.n, d = s.d, np = blk.np, dp = blk.dp, stride = 3 * s.C;
  const bool direct = d == dp;  // rows read and written in place, no packed copies
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const T* base = qkv + b * n * stride + h * d;
    const T* go_base = g_a + b * n * s.C + h * d;
    Rows<T> q{base, stride}, k{base + s.C, stride}, go{go_base, s.C};
    if (!direct) {
      blk.load(base, stride, blk.q, nullptr);
      blk.load(base + s.C, stride, blk.k, nullptr);
      blk.load(go_base, s.C, blk.go, nullptr);
      q = {blk.q, dp}, k = {blk.k, dp}, go = {blk.go, dp};
    }
    blk.load(base + 2 * s.C, stride, nullptr, blk.vt);
    const T* p_in = probs + bh * n * n;
    for (int64_t i = 0; i < n; ++i) {
      T* pi = blk.p + i * np;
      copy(p_in + i * n, n, pi);
      T* dsi = blk.ds + i * np;
      combine_rows(go.data + i * go.stride, 1, blk.vt, d, np, dsi);  // dP_i
      Vec<T> weighted(T(0));
      for (int64_t j = 0; j < np; j += kWidth<T>)
        weighted = weighted + Vec<T>::loadu(pi + j) * Vec<T>::loadu(dsi + j);
      const Vec<T> w(lane_sum(weighted)), sc(scale);
      for (int64_t j = 0; j < np; j += kWidth<T>)
        (Vec<T>::loadu(pi + j) * (Vec<T>::loadu(dsi + j) - w) * sc).store(dsi + j);
    }
    T* g = g_qkv + b * n * stride + h * d;
    for (int64_t i = 0; i < n; ++i) {
      T* gi = g + i * stride;
      T* out[3] = {gi, gi + s.C, gi + 2 * s.C};
      if (!direct) out[0] = out[1] = out[2] = blk.row;
      combine_rows(blk.ds + i * np, 1, k.data, n, dp, out[0], k.stride);  // g_q_i = sum_j dS_ij k_j
      if (!direct) copy(blk.row, d, gi);
      combine_rows(blk.ds + i, np, q.data, n, dp, out[1], q.stride);  // g_k_i = sum_r dS_ri q_r
      if (!direct) copy(blk.row, d, gi + s.C);
      combine_rows(blk.p + i, np, go.data, n, dp, out[2], go.stride);  // g_v_i = sum_r P_ri go_r
      if (!direct) copy(blk.row, d, gi + 2 * s.C);
    }
  }
}

}  // namespace set_attention_detail
}  // namespace
}  // namespace topn_kernels

// The explicit instantiations of one build, in namespace topn_kernels::NS.
#define TOPN_KERNELS_DEFINE_ATTENTION(NS)                                                       \
  namespace topn_kernels::NS {                                                                 \
  template <typename T>                                                                        \
  void forward(const T* qkv, T* probs, T* a, const AttentionDims& s, int64_t begin,            \
               int64_t end, T* scratch) {                                                      \
    set_attention_detail::forward<T>(qkv, probs, a, s, begin, end, scratch);                   \
  }                                                                                            \
  template <typename T>                                                                        \
  void backward(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s, \
                int64_t begin, int64_t end, T* scratch) {                                      \
    set_attention_detail::backward<T>(g_a, qkv, probs, g_qkv, s, begin, end, scratch);         \
  }                                                                                            \
  template void forward<float>(const float*, float*, float*, const AttentionDims&, int64_t,    \
                               int64_t, float*);                                               \
  template void forward<double>(const double*, double*, double*, const AttentionDims&,         \
                                int64_t, int64_t, double*);                                    \
  template void backward<float>(const float*, const float*, const float*, float*,              \
                                const AttentionDims&, int64_t, int64_t, float*);               \
  template void backward<double>(const double*, const double*, const double*, double*,         \
                                 const AttentionDims&, int64_t, int64_t, double*);             \
  }
