// The softmin rows of softmin.h, written once with at::vec::Vectorized; included by
// softmin_default.cpp and softmin_avx2.cpp, each compiled for its instruction set.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "softmin.h"

namespace topn_kernels {
namespace {  // internal linkage: each including file has its own build of these templates
namespace softmin_detail {

// max that is NaN when either is NaN (a NaN score makes the softmin NaN, as torch's)
template <typename T>
inline T max_nan(T a, T b) {
  return (std::isnan(a) || a > b) ? a : b;
}

template <typename T>
inline T lane_max(const at::vec::Vectorized<T>& v) {
  __at_align__ T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int l = 1; l < at::vec::Vectorized<T>::size(); ++l) m = max_nan(m, lanes[l]);
  return m;
}

template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  __at_align__ T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int l = 0; l < at::vec::Vectorized<T>::size(); ++l) s += lanes[l];
  return s;
}

// C(u_i, v_j) for the lanes j..j+W of one row; also returns the squared distance.
template <typename T>
inline at::vec::Vectorized<T> cost(const T* ui, const T* v_t, int64_t nv, int64_t j, int64_t dim,
                                  int p, at::vec::Vectorized<T>& d2) {
  using Vec = at::vec::Vectorized<T>;
  d2 = Vec(T(0));
  for (int64_t k = 0; k < dim; ++k) {
    const Vec diff = Vec(ui[k]) - Vec::loadu(v_t + k * nv + j);
    d2 = d2 + diff * diff;
  }
  return p == 2 ? d2 * Vec(T(0.5)) : d2.sqrt();
}

template <typename T>
inline T cost_scalar(const T* ui, const T* v_t, int64_t nv, int64_t j, int64_t dim, int p,
                     T& d2) {
  d2 = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const T diff = ui[k] - v_t[k * nv + j];
    d2 += diff * diff;
  }
  return p == 2 ? d2 * T(0.5) : std::sqrt(d2);
}

template <typename T>
void rows(const T* u, int64_t row_begin, int64_t row_end, const T* v_t, int64_t nv, const T* h,
          int64_t dim, int p, T eps, T* out, T* grad, T* scratch) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t full = nv - nv % W;
  const T inv = T(1) / eps;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* ui = u + i * dim;
    // pass 1: s_j = h_j - C_ij / eps, and their max (NaN-propagating)
    Vec vmax(-std::numeric_limits<T>::infinity());
    Vec d2;
    for (int64_t j = 0; j < full; j += W) {
      const Vec s = Vec::loadu(h + j) - cost(ui, v_t, nv, j, dim, p, d2) * Vec(inv);
      s.store(scratch + j);
      vmax = at::vec::maximum(vmax, s);
    }
    T mx = lane_max(vmax);
    for (int64_t j = full; j < nv; ++j) {
      T sq;
      const T s = h[j] - cost_scalar(ui, v_t, nv, j, dim, p, sq) * inv;
      scratch[j] = s;
      mx = max_nan(mx, s);
    }
    // pass 2: e_j = exp(s_j - max), kept for the gradient, and their sum
    Vec vsum(T(0));
    for (int64_t j = 0; j < full; j += W) {
      const Vec e = (Vec::loadu(scratch + j) - Vec(mx)).exp();
      e.store(scratch + j);
      vsum = vsum + e;
    }
    T sum = lane_sum(vsum);
    for (int64_t j = full; j < nv; ++j) {
      scratch[j] = std::exp(scratch[j] - mx);
      sum += scratch[j];
    }
    out[i] = -eps * (mx + std::log(sum));
    if (grad == nullptr) continue;

    // grad_i = sum_j w_j (u_i - v_j) / sum, with w_j = e_j for p=2 and e_j / |u_i - v_j|
    // (0 at u_i = v_j) for p=1, computed once per j before the loop over coordinates
    if (p == 1) {
      for (int64_t j = 0; j < full; j += W) {
        cost(ui, v_t, nv, j, dim, p, d2);
        const Vec dist = d2.sqrt();
        Vec::blendv(Vec::loadu(scratch + j) / dist, Vec(T(0)), d2 == Vec(T(0)))
            .store(scratch + j);
      }
      for (int64_t j = full; j < nv; ++j) {
        T sq;
        const T dist = cost_scalar(ui, v_t, nv, j, dim, 1, sq);
        scratch[j] = sq != 0 ? scratch[j] / dist : T(0);
      }
    }
    T* gi = grad + i * dim;
    for (int64_t k = 0; k < dim; ++k) {
      const T* vk = v_t + k * nv;
      Vec acc(T(0));
      T tail = 0;
      for (int64_t j = 0; j < full; j += W)
        acc = acc + Vec::loadu(scratch + j) * (Vec(ui[k]) - Vec::loadu(vk + j));
      for (int64_t j = full; j < nv; ++j) tail += scratch[j] * (ui[k] - vk[j]);
      gi[k] = (lane_sum(acc) + tail) / sum;
    }
  }
}

}  // namespace softmin_detail
}  // namespace
}  // namespace topn_kernels
