// The Adam loop (adam_kernel.h) for any CPU: at::vec's portable build.
#include "adam_kernel.h"

namespace topn_kernels::adam_default {

template <typename T>
void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count, const AdamConstants<T>& c) {
  adam_detail::run<T>(param, grad, exp_avg, exp_avg_sq, count, c);
}

template void run<float>(float*, float*, float*, float*, int64_t, const AdamConstants<float>&);
template void run<double>(double*, double*, double*, double*, int64_t,
                          const AdamConstants<double>&);

}  // namespace topn_kernels::adam_default
