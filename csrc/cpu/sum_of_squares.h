// The sum of squares of a tensor's elements in float64, in a fixed order (eight running sums
// over the elements, then their sum): the per-tensor term of the gradient norm, shared by
// total_norm.cpp and the clipped Adam step (adam.cpp), so that both give the same bits.
#pragma once

#include <cstdint>

namespace topn_kernels {

template <typename T>
double sum_of_squares(const T* p, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const double v = static_cast<double>(p[i + k]);
      acc[k] += v * v;
    }
  for (; i < n; ++i) {
    const double v = static_cast<double>(p[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace topn_kernels
