// The softmin of the Sinkhorn loop, on CPU, for rows of one set:
//
//   out_i = -eps * log sum_j exp(h_j - C(u_i, v_j) / eps),   C(u, v) = |u - v|^p / p  (p = 1, 2)
//
// and, when grad is given, grad_i = sum_j P_ij dC(u_i, v_j)/du_i with P_ij = softmax_j(...),
// the gradient of out_i with respect to u_i with h held fixed (geomloss's envelope gradient).
// u (nu, dim) row-major, v_t (dim, nv) transposed so that the inner loop over j vectorises.
//
// softmin_kernels<T>() picks, once, the build of the loop for this CPU: AVX2 + FMA
// (at::vec with Sleef's exp, softmin_avx2.cpp) where the CPU has them, else a portable build
// (softmin_default.cpp); TOPN_KERNELS_PORTABLE=1 forces the portable one.
#pragma once

#include <cstdint>

namespace topn_kernels {

template <typename T>
using SoftminRowsFn = void (*)(const T* u, int64_t row_begin, int64_t row_end, const T* v_t,
                               int64_t nv, const T* h, int64_t dim, int p, T eps, T* out,
                               T* grad, T* scratch);

template <typename T>
struct SoftminKernels {
  SoftminRowsFn<T> rows;  // scratch: nv values per calling thread
};

template <typename T>
SoftminKernels<T> softmin_kernels();

namespace softmin_default {
template <typename T>
void rows(const T* u, int64_t row_begin, int64_t row_end, const T* v_t, int64_t nv, const T* h,
          int64_t dim, int p, T eps, T* out, T* grad, T* scratch);
}  // namespace softmin_default

namespace softmin_avx2 {
template <typename T>
void rows(const T* u, int64_t row_begin, int64_t row_end, const T* v_t, int64_t nv, const T* h,
          int64_t dim, int p, T eps, T* out, T* grad, T* scratch);
}  // namespace softmin_avx2

}  // namespace topn_kernels
