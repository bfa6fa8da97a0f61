// The 2-norm of many tensors together, sqrt(sum over all their elements of x^2), on CPU: the
// gradient norm that training steps clip by (topn_kernels/models/training.py), in one call
// instead of one norm per parameter tensor and a norm of those. Each tensor's sum of squares is
// accumulated in float64 by one task, in a fixed order (eight running sums over its elements,
// then their sum), and the tensors' sums are added in list order: the result does not depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "sum_of_squares.h"

namespace topn_kernels {
namespace {

using at::Tensor;

Tensor total_norm_cpu(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "total_norm: at least one tensor expected");
  const auto dtype = tensors[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "total_norm: tensors must be float32 or float64, got ", dtype);
  std::vector<Tensor> dense;
  dense.reserve(tensors.size());
  for (const Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu() && t.layout() == at::kStrided,
                "total_norm: tensors must be strided CPU tensors of one dtype");
    dense.push_back(t.contiguous());
  }
  double norm = 0.0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "total_norm", [&] {
    std::vector<const scalar_t*> data;
    std::vector<int64_t> sizes;
    for (const Tensor& t : dense) {
      data.push_back(t.const_data_ptr<scalar_t>());
      sizes.push_back(t.numel());
    }
    norm = norm_of_all(data, sizes);
  });
  return at::scalar_tensor(norm, tensors[0].options());
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) { m.impl("total_norm", &total_norm_cpu); }

}  // namespace topn_kernels
