// In-place ReLU steps shared by the native layers (set_transformer.cpp, authors_mlp.cpp): the
// bias and ReLU of a product in one pass, and ReLU's backward as a mask on a fresh gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace topn_kernels {

// u = relu(u + bias) in place, u (M, F) contiguous, bias (F,): one pass instead of a broadcast
// copy of the bias, the product on top and a pass for the ReLU. NaN stays NaN, as in relu.
inline void add_bias_relu_(at::Tensor& u, const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(u.is_contiguous() && bias.numel() == u.size(1));
  const int64_t M = u.size(0), F = u.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "add_bias_relu_", [&] {
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    const at::Tensor b = bias.contiguous();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, F)),
                    [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = up + i * F;
        for (int64_t j = 0; j < F; ++j) {
          const scalar_t v = row[j] + bp[j];
          row[j] = v < 0 ? scalar_t(0) : v;
        }
      }
    });
  });
}

// g = (u > 0) ? g : 0 in place (threshold_backward's rule: 0 where u <= 0), g and u (M, F)
// contiguous.
inline void mask_by_positive_(at::Tensor& g, const at::Tensor& u) {
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && u.is_contiguous() && g.sizes() == u.sizes());
  const int64_t M = g.size(0), F = g.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mask_by_positive_", [&] {
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    at::parallel_for(0, M * F, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) gp[i] = up[i] <= 0 ? scalar_t(0) : gp[i];
    });
  });
}

}  // namespace topn_kernels
