// The softmin rows (softmin_kernel.h) for CPUs with AVX2 and FMA: at::vec's AVX2 build with
// Sleef's exp (this file is compiled with -mavx2 -mfma, see CMakeLists.txt).
#include "softmin_kernel.h"

namespace topn_kernels::softmin_avx2 {

template <typename T>
void rows(const T* u, int64_t row_begin, int64_t row_end, const T* v_t, int64_t nv, const T* h,
          int64_t dim, int p, T eps, T* out, T* grad, T* scratch) {
  softmin_detail::rows<T>(u, row_begin, row_end, v_t, nv, h, dim, p, eps, out, grad, scratch);
}

template void rows<float>(const float*, int64_t, int64_t, const float*, int64_t, const float*,
                          int64_t, int, float, float*, float*, float*);
template void rows<double>(const double*, int64_t, int64_t, const double*, int64_t,
                           const double*, int64_t, int, double, double*, double*, double*);

}  // namespace topn_kernels::softmin_avx2
