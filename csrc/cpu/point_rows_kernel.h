// The loops of point_rows.h, written once with at::vec::Vectorized; included by
// point_rows_default.cpp and point_rows_avx2.cpp, each compiled for its instruction set. Every
// loop over a row's elements runs whole vectors, then the same operations on the scalar tail;
// a row's sums run in 16 lanes (16 / W vectors of width W), so they are the same in every build.
// Only plain loops and at::vec below (no standard-library template: it would be compiled into
// both builds and the linker would keep one copy, possibly the AVX2 one, for both).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "point_rows.h"

namespace topn_kernels {
namespace {  // internal linkage: each including file has its own build of these functions
namespace point_rows_detail {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kLanes = 16;

template <typename T>
constexpr int64_t kWidth = Vec<T>::size();

template <typename T>
constexpr int64_t kVecs = kLanes / kWidth<T>;
static_assert(kLanes % kWidth<float> == 0 && kLanes % kWidth<double> == 0, "16 lanes");

template <typename T>
inline void zero(T* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) v[i] = T(0);
}

// The 16 lanes of acc, then the tail elements added to lanes 0, 1, ..., summed as a tree (lane
// l + lane l + 8, then + 4, + 2, + 1).
template <typename T>
inline T lanes_sum(const Vec<T>* acc, const T* tail, int64_t tail_count) {
  __at_align__ T lanes[kLanes];
  for (int64_t v = 0; v < kVecs<T>; ++v) acc[v].store(lanes + v * kWidth<T>);
  for (int64_t t = 0; t < tail_count; ++t) lanes[t] += tail[t];
  for (int64_t half = kLanes / 2; half > 0; half /= 2)
    for (int64_t l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  return lanes[0];
}

template <typename T>
void layer_norm(const T* x, const T* w, const T* b, double eps, int64_t C, int64_t begin,
                int64_t end, T* out, T* mean, T* rstd) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>, K = kVecs<T>;
  const int64_t full = C / kLanes * kLanes, vec_end = C / W * W;
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = x + i * C;
    T* yr = out + i * C;
    V acc[K];
    T tail[kLanes];
    for (int64_t v = 0; v < K; ++v) acc[v] = V(T(0));
    for (int64_t j = 0; j < full; j += kLanes)
      for (int64_t v = 0; v < K; ++v) acc[v] = acc[v] + V::loadu(xr + j + v * W);
    for (int64_t j = full; j < C; ++j) tail[j - full] = xr[j];
    const T m = lanes_sum(acc, tail, C - full) / static_cast<T>(C);
    const V mv(m);
    for (int64_t v = 0; v < K; ++v) acc[v] = V(T(0));
    for (int64_t j = 0; j < full; j += kLanes)
      for (int64_t v = 0; v < K; ++v) {
        const V d = V::loadu(xr + j + v * W) - mv;
        acc[v] = acc[v] + d * d;
      }
    for (int64_t j = full; j < C; ++j) tail[j - full] = (xr[j] - m) * (xr[j] - m);
    const T var = lanes_sum(acc, tail, C - full) / static_cast<T>(C);
    const T r = T(1) / std::sqrt(var + static_cast<T>(eps));
    const V rv(r);
    int64_t j = 0;
    for (; j < vec_end; j += W)
      ((V::loadu(xr + j) - mv) * rv * V::loadu(w + j) + V::loadu(b + j)).store(yr + j);
    for (; j < C; ++j) yr[j] = (xr[j] - m) * r * w[j] + b[j];
    mean[i] = m;
    rstd[i] = r;
  }
}

// The chunk [chunk * kChunkRows, ...) of M rows: its last row + 1.
inline int64_t chunk_end(int64_t chunk, int64_t M) {
  const int64_t last = (chunk + 1) * kChunkRows;
  return last < M ? last : M;
}

template <typename T>
inline void store_part(const T* sums, int64_t count, double* part) {
  for (int64_t j = 0; j < count; ++j) part[j] = static_cast<double>(sums[j]);
}

template <typename T>
void layer_norm_backward(const T* g, const T* x, const T* mean, const T* rstd, const T* w,
                         int64_t M, int64_t C, int64_t begin, int64_t end, T* gx, double* part,
                         T* scratch) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>, K = kVecs<T>;
  const int64_t full = C / kLanes * kLanes, vec_end = C / W * W;
  T *sum_gxh = scratch, *sum_g = scratch + C, *sum_gx = scratch + 2 * C;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    zero(scratch, 3 * C);
    for (int64_t i = chunk * kChunkRows; i < chunk_end(chunk, M); ++i) {
      const T *gr = g + i * C, *xr = x + i * C;
      const T m = mean[i], r = rstd[i];
      const V mv(m), rv(r);
      V dot[K], sum[K];
      T dot_tail[kLanes], sum_tail[kLanes];
      for (int64_t v = 0; v < K; ++v) dot[v] = sum[v] = V(T(0));
      for (int64_t j = 0; j < full; j += kLanes)
        for (int64_t v = 0; v < K; ++v) {
          const int64_t k = j + v * W;
          const V gw = V::loadu(gr + k) * V::loadu(w + k);
          dot[v] = dot[v] + gw * ((V::loadu(xr + k) - mv) * rv);
          sum[v] = sum[v] + gw;
        }
      for (int64_t j = full; j < C; ++j) {
        const T gw = gr[j] * w[j];
        dot_tail[j - full] = gw * ((xr[j] - m) * r);
        sum_tail[j - full] = gw;
      }
      const T dot_mean = lanes_sum(dot, dot_tail, C - full) / static_cast<T>(C);
      const T sum_mean = lanes_sum(sum, sum_tail, C - full) / static_cast<T>(C);
      const V dot_mean_v(dot_mean), sum_mean_v(sum_mean);
      T* gxr = gx + i * C;
      int64_t j = 0;
      for (; j < vec_end; j += W) {
        const V gj = V::loadu(gr + j), xh = (V::loadu(xr + j) - mv) * rv;
        const V d = (gj * V::loadu(w + j) - sum_mean_v - xh * dot_mean_v) * rv;
        d.store(gxr + j);
        (V::loadu(sum_gxh + j) + gj * xh).store(sum_gxh + j);
        (V::loadu(sum_g + j) + gj).store(sum_g + j);
        (V::loadu(sum_gx + j) + d).store(sum_gx + j);
      }
      for (; j < C; ++j) {
        const T xh = (xr[j] - m) * r;
        const T d = (gr[j] * w[j] - sum_mean - xh * dot_mean) * r;
        gxr[j] = d;
        sum_gxh[j] += gr[j] * xh;
        sum_g[j] += gr[j];
        sum_gx[j] += d;
      }
    }
    store_part(scratch, 3 * C, part + chunk * 3 * C);
  }
}

template <typename T>
void mask_sum(T* g, const T* u, int64_t M, int64_t C, int64_t begin, int64_t end, double* part,
              T* scratch) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t vec_end = C / W * W;
  const V zero_v(T(0));
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    zero(scratch, C);
    for (int64_t i = chunk * kChunkRows; i < chunk_end(chunk, M); ++i) {
      T* gr = g + i * C;
      const T* ur = u + i * C;
      int64_t j = 0;
      for (; j < vec_end; j += W) {
        // 0 where u <= 0 (threshold_backward's rule), g elsewhere (NaN where g is NaN)
        const V v = V::blendv(V::loadu(gr + j), zero_v, V::loadu(ur + j) <= zero_v);
        v.store(gr + j);
        (V::loadu(scratch + j) + v).store(scratch + j);
      }
      for (; j < C; ++j) {
        const T v = ur[j] <= T(0) ? T(0) : gr[j];
        gr[j] = v;
        scratch[j] += v;
      }
    }
    store_part(scratch, C, part + chunk * C);
  }
}

template <typename T>
void column_sum(const T* x, int64_t M, int64_t C, int64_t begin, int64_t end, double* part,
                T* scratch) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t vec_end = C / W * W;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    zero(scratch, C);
    for (int64_t i = chunk * kChunkRows; i < chunk_end(chunk, M); ++i) {
      const T* xr = x + i * C;
      int64_t j = 0;
      for (; j < vec_end; j += W) (V::loadu(scratch + j) + V::loadu(xr + j)).store(scratch + j);
      for (; j < C; ++j) scratch[j] += xr[j];
    }
    store_part(scratch, C, part + chunk * C);
  }
}

// The batch norm's per-chunk column sums: kind 0, sum_i (x_ij - mean_j)^2 (C per chunk); kind
// 1, sum_i g_ij and sum_i g_ij (x_ij - mean_j) (2C per chunk: g's sums, then the products').
template <typename T>
void centred_sums(const T* g, const T* x, const T* mean, int64_t M, int64_t C, int64_t begin,
                  int64_t end, double* part, T* scratch) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t vec_end = C / W * W, k = g == nullptr ? 1 : 2;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    zero(scratch, k * C);
    T *first = scratch, *second = scratch + C;
    for (int64_t i = chunk * kChunkRows; i < chunk_end(chunk, M); ++i) {
      const T* xr = x + i * C;
      int64_t j = 0;
      if (g == nullptr) {
        for (; j < vec_end; j += W) {
          const V d = V::loadu(xr + j) - V::loadu(mean + j);
          (V::loadu(first + j) + d * d).store(first + j);
        }
        for (; j < C; ++j) first[j] += (xr[j] - mean[j]) * (xr[j] - mean[j]);
      } else {
        const T* gr = g + i * C;
        for (; j < vec_end; j += W) {
          const V gj = V::loadu(gr + j), d = V::loadu(xr + j) - V::loadu(mean + j);
          (V::loadu(first + j) + gj).store(first + j);
          (V::loadu(second + j) + gj * d).store(second + j);
        }
        for (; j < C; ++j) {
          first[j] += gr[j];
          second[j] += gr[j] * (xr[j] - mean[j]);
        }
      }
    }
    store_part(scratch, k * C, part + chunk * k * C);
  }
}

// Rows [begin, end) of the batch norm: without g, out_ij = (x_ij - mean_j) a_j + c_j (the
// forward: a = invstd w, c = b); with g, out_ij = (g_ij - c_j - (x_ij - mean_j) k_j) a_j (the
// backward: c = sum_i g / M, k = invstd^2 sum_i g (x - mean) / M, a = invstd w).
template <typename T>
void batch_norm_apply(const T* g, const T* x, const T* mean, const T* a, const T* c, const T* k,
                      int64_t C, int64_t begin, int64_t end, T* out) {
  using V = Vec<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t vec_end = C / W * W;
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = x + i * C;
    T* orow = out + i * C;
    int64_t j = 0;
    if (g == nullptr) {
      for (; j < vec_end; j += W)
        ((V::loadu(xr + j) - V::loadu(mean + j)) * V::loadu(a + j) + V::loadu(c + j))
            .store(orow + j);
      for (; j < C; ++j) orow[j] = (xr[j] - mean[j]) * a[j] + c[j];
    } else {
      const T* gr = g + i * C;
      for (; j < vec_end; j += W) {
        const V d = V::loadu(xr + j) - V::loadu(mean + j);
        ((V::loadu(gr + j) - V::loadu(c + j) - d * V::loadu(k + j)) * V::loadu(a + j))
            .store(orow + j);
      }
      for (; j < C; ++j) orow[j] = (gr[j] - c[j] - (xr[j] - mean[j]) * k[j]) * a[j];
    }
  }
}

}  // namespace point_rows_detail
}  // namespace
}  // namespace topn_kernels

// The explicit instantiations of one build, in namespace topn_kernels::NS.
#define TOPN_KERNELS_DEFINE_POINT_ROWS_T(T)                                                    \
  template void layer_norm<T>(const T*, const T*, const T*, double, int64_t, int64_t, int64_t, \
                              T*, T*, T*);                                                     \
  template void layer_norm_backward<T>(const T*, const T*, const T*, const T*, const T*,       \
                                       int64_t, int64_t, int64_t, int64_t, T*, double*, T*);   \
  template void mask_sum<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double*, T*);    \
  template void column_sum<T>(const T*, int64_t, int64_t, int64_t, int64_t, double*, T*);     \
  template void centred_sums<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t,       \
                                int64_t, double*, T*);                                         \
  template void batch_norm_apply<T>(const T*, const T*, const T*, const T*, const T*,          \
                                    const T*, int64_t, int64_t, int64_t, T*);

#define TOPN_KERNELS_DEFINE_POINT_ROWS(NS)                                                     \
  namespace topn_kernels::NS {                                                                \
  template <typename T>                                                                       \
  void layer_norm(const T* x, const T* w, const T* b, double eps, int64_t C, int64_t begin,   \
                  int64_t end, T* out, T* mean, T* rstd) {                                    \
    point_rows_detail::layer_norm<T>(x, w, b, eps, C, begin, end, out, mean, rstd);           \
  }                                                                                           \
  template <typename T>                                                                       \
  void layer_norm_backward(const T* g, const T* x, const T* mean, const T* rstd, const T* w,  \
                           int64_t M, int64_t C, int64_t begin, int64_t end, T* gx,           \
                           double* part, T* scratch) {                                        \
    point_rows_detail::layer_norm_backward<T>(g, x, mean, rstd, w, M, C, begin, end, gx, part, \
                                              scratch);                                       \
  }                                                                                           \
  template <typename T>                                                                       \
  void mask_sum(T* g, const T* u, int64_t M, int64_t C, int64_t begin, int64_t end,           \
                double* part, T* scratch) {                                                   \
    point_rows_detail::mask_sum<T>(g, u, M, C, begin, end, part, scratch);                    \
  }                                                                                           \
  template <typename T>                                                                       \
  void column_sum(const T* x, int64_t M, int64_t C, int64_t begin, int64_t end, double* part, \
                  T* scratch) {                                                               \
    point_rows_detail::column_sum<T>(x, M, C, begin, end, part, scratch);                     \
  }                                                                                           \
  template <typename T>                                                                       \
  void centred_sums(const T* g, const T* x, const T* mean, int64_t M, int64_t C,              \
                    int64_t begin, int64_t end, double* part, T* scratch) {                   \
    point_rows_detail::centred_sums<T>(g, x, mean, M, C, begin, end, part, scratch);          \
  }                                                                                           \
  template <typename T>                                                                       \
  void batch_norm_apply(const T* g, const T* x, const T* mean, const T* a, const T* c,        \
                        const T* k, int64_t C, int64_t begin, int64_t end, T* out) {          \
    point_rows_detail::batch_norm_apply<T>(g, x, mean, a, c, k, C, begin, end, out);          \
  }                                                                                           \
  TOPN_KERNELS_DEFINE_POINT_ROWS_T(float)                                                     \
  TOPN_KERNELS_DEFINE_POINT_ROWS_T(double)                                                    \
  }
