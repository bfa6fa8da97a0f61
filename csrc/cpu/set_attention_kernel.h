// The attention loops of set_attention.h, written once with at::vec::Vectorized; included by
// set_attention_default.cpp and set_attention_avx2.cpp, each compiled for its instruction set.
//
// Each pair's q, k, v (and the gradient g_a) are copied into small zero-padded blocks: rows of
// width dp (d rounded up to the vector width W) and, transposed, columns of length np (n rounded
// up to W). Every loop then runs over whole vectors, with no sum along a vector: the lanes of
// a score row (over j) or of an output row (over the d channels). The padding lanes hold 0, or
// -inf in the scores before the softmax, so they never reach a result.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "set_attention.h"

namespace topn_kernels {
namespace {  // internal linkage: each including file has its own build of these templates
namespace set_attention_detail {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kWidth = Vec<T>::size();

inline int64_t round_up(int64_t v, int64_t w) { return (v + w - 1) / w * w; }

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
  for (int64_t l = 1; l < kWidth<T>; ++l) m = std::max(m, lanes[l]);
  return m;
}

// out (len,) = sum_r w[r] * rows[r * len : (r + 1) * len] for r < count, len a multiple of W.
template <typename T>
inline void combine_rows(const T* w, int64_t w_stride, const T* rows, int64_t count, int64_t len,
                         T* out) {
  for (int64_t c = 0; c < len; c += kWidth<T>) {
    Vec<T> acc(T(0));
    for (int64_t r = 0; r < count; ++r)
      acc = acc + Vec<T>(w[r * w_stride]) * Vec<T>::loadu(rows + r * len + c);
    acc.store(out + c);
  }
}

// The blocks of one pair; buffers reused across the pairs of a task.
template <typename T>
struct Blocks {
  int64_t n, d, np, dp;
  std::vector<T> q, k, v, kt, vt, go, p, ds, row;

  explicit Blocks(const AttentionDims& s)
      : n(s.n), d(s.d), np(round_up(s.n, kWidth<T>)), dp(round_up(s.d, kWidth<T>)) {
    for (auto* b : {&q, &k, &v, &go}) b->assign(n * dp, T(0));
    for (auto* b : {&kt, &vt}) b->assign(d * np, T(0));
    for (auto* b : {&p, &ds}) b->assign(n * np, T(0));
    row.assign(np > dp ? np : dp, T(0));
  }

  // rows (n, dp) from n rows of width d at src with the given stride; optionally transposed
  // into cols (d, np)
  void load(const T* src, int64_t stride, std::vector<T>& rows, std::vector<T>* cols) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) {
        const T value = src[i * stride + c];
        rows[i * dp + c] = value;
        if (cols) (*cols)[c * np + i] = value;
      }
  }
};

template <typename T>
void forward(const T* qkv, T* probs, T* a, const AttentionDims& s, int64_t begin, int64_t end) {
  Blocks<T> blk(s);
  const int64_t n = s.n, d = s.d, np = blk.np, dp = blk.dp, stride = 3 * s.C;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const T* base = qkv + b * n * stride + h * d;
    blk.load(base, stride, blk.q, nullptr);
    blk.load(base + s.C, stride, blk.k, &blk.kt);
    blk.load(base + 2 * s.C, stride, blk.v, nullptr);
    T* p_out = probs + bh * n * n;
    T* score = blk.row.data();
    for (int64_t i = 0; i < n; ++i) {
      // scores over j, as columns: sum_c q_ic kt[c, :]
      combine_rows(blk.q.data() + i * dp, 1, blk.kt.data(), d, np, score);
      for (int64_t j = 0; j < np; ++j) score[j] = j < n ? score[j] * scale : neg_inf;
      Vec<T> top(neg_inf);
      for (int64_t j = 0; j < np; j += kWidth<T>) top = at::vec::maximum(top, Vec<T>::loadu(score + j));
      const Vec<T> m(lane_max(top));
      Vec<T> total(T(0));
      for (int64_t j = 0; j < np; j += kWidth<T>) {
        const Vec<T> e = (Vec<T>::loadu(score + j) - m).exp();
        e.store(score + j);
        total = total + e;
      }
      const Vec<T> inv(T(1) / lane_sum(total));
      T* pi = blk.p.data() + i * np;
      for (int64_t j = 0; j < np; j += kWidth<T>) (Vec<T>::loadu(score + j) * inv).store(pi + j);
      std::copy(pi, pi + n, p_out + i * n);
    }
    for (int64_t i = 0; i < n; ++i) {  // a_i = sum_j P_ij v_j
      combine_rows(blk.p.data() + i * np, 1, blk.v.data(), n, dp, blk.row.data());
      std::copy(blk.row.data(), blk.row.data() + d, a + (b * n + i) * s.C + h * d);
    }
  }
}

template <typename T>
void backward(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s,
              int64_t begin, int64_t end) {
  Blocks<T> blk(s);
  const int64_t n = s.n, d = s.d, np = blk.np, dp = blk.dp, stride = 3 * s.C;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const T* base = qkv + b * n * stride + h * d;
    blk.load(base, stride, blk.q, nullptr);
    blk.load(base + s.C, stride, blk.k, nullptr);
    blk.load(base + 2 * s.C, stride, blk.v, &blk.vt);
    blk.load(g_a + b * n * s.C + h * d, s.C, blk.go, nullptr);
    const T* p_in = probs + bh * n * n;
    for (int64_t i = 0; i < n; ++i) {
      T* pi = blk.p.data() + i * np;
      std::copy(p_in + i * n, p_in + (i + 1) * n, pi);
      T* dsi = blk.ds.data() + i * np;
      combine_rows(blk.go.data() + i * dp, 1, blk.vt.data(), d, np, dsi);  // dP_i
      Vec<T> weighted(T(0));
      for (int64_t j = 0; j < np; j += kWidth<T>)
        weighted = weighted + Vec<T>::loadu(pi + j) * Vec<T>::loadu(dsi + j);
      const Vec<T> w(lane_sum(weighted)), sc(scale);
      for (int64_t j = 0; j < np; j += kWidth<T>)
        (Vec<T>::loadu(pi + j) * (Vec<T>::loadu(dsi + j) - w) * sc).store(dsi + j);
    }
    T* g = g_qkv + b * n * stride + h * d;
    T* out = blk.row.data();
    for (int64_t i = 0; i < n; ++i) {
      T* gi = g + i * stride;
      combine_rows(blk.ds.data() + i * np, 1, blk.k.data(), n, dp, out);  // g_q_i
      std::copy(out, out + d, gi);
      combine_rows(blk.ds.data() + i, np, blk.q.data(), n, dp, out);  // g_k_i = sum_r dS_ri q_r
      std::copy(out, out + d, gi + s.C);
      combine_rows(blk.p.data() + i, np, blk.go.data(), n, dp, out);  // g_v_i = sum_r P_ri go_r
      std::copy(out, out + d, gi + 2 * s.C);
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
               int64_t end) {                                                                  \
    set_attention_detail::forward<T>(qkv, probs, a, s, begin, end);                            \
  }                                                                                            \
  template <typename T>                                                                        \
  void backward(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s, \
                int64_t begin, int64_t end) {                                                  \
    set_attention_detail::backward<T>(g_a, qkv, probs, g_qkv, s, begin, end);                  \
  }                                                                                            \
  template void forward<float>(const float*, float*, float*, const AttentionDims&, int64_t,    \
                               int64_t);                                                       \
  template void forward<double>(const double*, double*, double*, const AttentionDims&,         \
                                int64_t, int64_t);                                             \
  template void backward<float>(const float*, const float*, const float*, float*,              \
                                const AttentionDims&, int64_t, int64_t);                       \
  template void backward<double>(const double*, const double*, const double*, double*,         \
                                 const AttentionDims&, int64_t, int64_t);                      \
  }
