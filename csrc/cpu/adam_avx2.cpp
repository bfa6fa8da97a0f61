// The Adam loop (adam_kernel.h) for CPUs with AVX2: at::vec's AVX2 build (this file is compiled
// with -mavx2 -mfma, see CMakeLists.txt; -ffp-contract=off keeps every product rounded).
#include "adam_kernel.h"

namespace topn_kernels::adam_avx2 {

template <typename T>
void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count, const AdamConstants<T>& c) {
  adam_detail::run<T>(param, grad, exp_avg, exp_avg_sq, count, c);
}

template void run<float>(float*, float*, float*, float*, int64_t, const AdamConstants<float>&);
template void run<double>(double*, double*, double*, double*, int64_t,
                          const AdamConstants<double>&);

}  // namespace topn_kernels::adam_avx2
