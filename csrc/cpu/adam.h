// Adam's update of one run of elements of one parameter tensor, on CPU: the loop of the
// multi-tensor Adam op (csrc/cpu/adam.cpp). For each element, in the parameter's dtype T:
//
//   g = grad / scale          (only with a scale; the scaled g is stored back into grad)
//   g = -g                    (maximize)
//   g = g + param * wd        (weight_decay != 0)
//   m = m * beta1 + g * (1 - beta1)
//   v = v * beta2 + (g * g) * (1 - beta2)
//   param = param - (step_size * m) / (sqrt(v) / bias2_sqrt + eps)
//
// each operation rounded to T, in this order, with no fused multiply-add (the library is built
// with -ffp-contract=off): the same value in every vector lane and in the scalar tail, so the
// update does not depend on the CPU's vector width or the number of threads. The constants
// (computed in double from the step, then rounded to T) are those of PyTorch's fused Adam.
//
// adam_kernels<T>() picks, once, the build of the loop for this CPU: AVX2 (adam_avx2.cpp) where
// the CPU has it, else the portable build (adam_default.cpp); TOPN_KERNELS_PORTABLE=1 forces the
// portable one.
#pragma once

#include <cstdint>

namespace topn_kernels {

template <typename T>
struct AdamConstants {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps, weight_decay;
  bool maximize;
  const T* scale;  // nullptr: no gradient scale
};

template <typename T>
using AdamRunFn = void (*)(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count,
                           const AdamConstants<T>& c);

template <typename T>
struct AdamKernels {
  AdamRunFn<T> run;
};

template <typename T>
AdamKernels<T> adam_kernels();

namespace adam_default {
template <typename T>
void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count, const AdamConstants<T>& c);
}  // namespace adam_default

namespace adam_avx2 {
template <typename T>
void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count, const AdamConstants<T>& c);
}  // namespace adam_avx2

}  // namespace topn_kernels
