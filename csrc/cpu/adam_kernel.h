// The Adam loop of adam.h, written once with at::vec::Vectorized; included by adam_default.cpp
// and adam_avx2.cpp, each compiled for its instruction set. The tail is the same operations on
// a partial vector (loadu/store with a count), so every element takes one code path.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "adam.h"

namespace topn_kernels {
namespace {  // internal linkage: each including file has its own build of this template
namespace adam_detail {

template <typename T>
void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count, const AdamConstants<T>& c) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec beta1(c.beta1), one_minus_beta1(c.one_minus_beta1), beta2(c.beta2),
      one_minus_beta2(c.one_minus_beta2), step_size(c.step_size), bias2_sqrt(c.bias2_sqrt),
      eps(c.eps), weight_decay(c.weight_decay);
  // a scale of 1 leaves every gradient as it is (g / 1 == g): no division and no store
  const bool scaled = c.scale != nullptr && *c.scale != T(1), decay = c.weight_decay != T(0);
  const Vec scale(scaled ? *c.scale : T(1));
  for (int64_t i = 0; i < count; i += W) {
    const int64_t w = count - i < W ? count - i : W;
    Vec p = Vec::loadu(param + i, w), g = Vec::loadu(grad + i, w);
    if (scaled) {
      g = g / scale;
      g.store(grad + i, w);
    }
    if (c.maximize) g = g * Vec(T(-1));  // as PyTorch's kernel: -0 for a +0 gradient
    if (decay) g = g + p * weight_decay;
    const Vec m = Vec::loadu(exp_avg + i, w) * beta1 + g * one_minus_beta1;
    const Vec v = Vec::loadu(exp_avg_sq + i, w) * beta2 + g * g * one_minus_beta2;
    m.store(exp_avg + i, w);
    v.store(exp_avg_sq + i, w);
    p = p - step_size * m / (v.sqrt() / bias2_sqrt + eps);
    p.store(param + i, w);
  }
}

}  // namespace adam_detail
}  // namespace
}  // namespace topn_kernels

// The explicit instantiations of one build, in namespace topn_kernels::NS.
#define TOPN_KERNELS_DEFINE_ADAM(NS)                                                           \
  namespace topn_kernels::NS {                                                                \
  template <typename T>                                                                       \
  void run(T* param, T* grad, T* exp_avg, T* exp_avg_sq, int64_t count,                       \
           const AdamConstants<T>& c) {                                                       \
    adam_detail::run<T>(param, grad, exp_avg, exp_avg_sq, count, c);                          \
  }                                                                                           \
  template void run<float>(float*, float*, float*, float*, int64_t,                           \
                           const AdamConstants<float>&);                                      \
  template void run<double>(double*, double*, double*, double*, int64_t,                      \
                            const AdamConstants<double>&);                                    \
  }
