// The one-hot valency classes that the authors' set VAE feeds its encoder
// (topn_kernels/models/authors.py, Encoder), for sets of equal size, on CPU, in one pass instead
// of a float64 copy, a distance matrix, masks and a one-hot of the plain model's tensor ops.
// x (B, n, d) float32 or float64; out (B, n, classes) in x's dtype, out[b, i, c] = 1 where
//
//   c = clamp(count_bi - 1, 0, classes - 1),   count_bi = #{j != i : |x_bi - x_bj| < dist},
//
// else 0. Each distance is sqrt(sum_k (x_bik - x_bjk)^2) in float64, summed over k in order: as
// torch.cdist(compute_mode="donot_use_mm_for_euclid_dist") computes it in float64 for point
// dimensions below its vector width (the model's 3), so the counts are those of
// topn_kernels.metrics.valency_counts (the op takes any d; its Python side, native/valency.py,
// takes d <= 3 only: from cdist's vector width on, cdist sums in another order). A NaN distance
// counts as no neighbour, as there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace topn_kernels {
namespace {

using at::Tensor;

Tensor valency_onehot_cpu(const Tensor& x_in, double neighbor_dist, int64_t classes) {
  TORCH_CHECK(x_in.dim() == 3, "valency_onehot: x must be (B, n, d), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "valency_onehot: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(classes >= 1, "valency_onehot: classes must be >= 1, got ", classes);
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  Tensor out = at::zeros({B, n, classes}, x.options());
  if (B == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "valency_onehot", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n * n * d));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* set = xp + b * n * d;
        for (int64_t i = 0; i < n; ++i) {
          int64_t count = 0;
          for (int64_t j = 0; j < n; ++j) {
            if (j == i) continue;
            double sum = 0;
            for (int64_t k = 0; k < d; ++k) {
              const double diff =
                  static_cast<double>(set[i * d + k]) - static_cast<double>(set[j * d + k]);
              sum += diff * diff;
            }
            count += std::sqrt(sum) < neighbor_dist;
          }
          const int64_t c = std::min(std::max<int64_t>(count - 1, 0), classes - 1);
          op[(b * n + i) * classes + c] = scalar_t(1);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) { m.impl("valency_onehot", &valency_onehot_cpu); }

}  // namespace topn_kernels
