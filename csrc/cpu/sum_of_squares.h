// The 2-norm of many tensors together, in float64 and a fixed order: each tensor's sum of
// squares (eight running sums over its elements, then their sum), in parallel over the tensors,
// then those sums in order. Shared by total_norm.cpp and the clipped Adam step (adam.cpp), so
// that both give the same bits.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

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

// sqrt of the sum over i of sum_of_squares(data[i], sizes[i]).
template <typename T>
double norm_of_all(const std::vector<const T*>& data, const std::vector<int64_t>& sizes) {
  const int64_t count = static_cast<int64_t>(data.size());
  std::vector<double> sums(count, 0.0);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sums[i] = sum_of_squares(data[i], sizes[i]);
  });
  double total = 0.0;
  for (const double s : sums) total += s;
  return std::sqrt(total);
}

}  // namespace topn_kernels
