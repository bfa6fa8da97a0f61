// Matched distance of padded batches of equal-size sets on CPU (topn_kernels.metrics.
// matched_distance, docs/set_vae.md "Metrics"): for set b of n = lengths[b] points, the optimal
// one-to-one assignment of x[b, :n] to y[b, :n] under the Euclidean distance, and the mean
// distance of the matched pairs,
//
//   value[b] = min over permutations P of (1/n) sum_i |x_i - y_P(i)|.
//
// Distances are computed in float64 from the differences (no |x|^2 + |y|^2 - 2 x.y expansion),
// as the reference does; the assignment is the Hungarian algorithm in its shortest augmenting
// path form with row and column potentials (O(n^3), exact up to float64 rounding of the
// potentials), one set per task. With with_grad, the gradient of each set's value with respect
// to its points: (x_i - y_j) / (n |x_i - y_j|) at x_i for each matched pair (i, j), its negative
// at y_j, 0 for coincident points and on padding. A set with a non-finite distance gets NaN and
// zero gradients; a set of 0 points gets NaN (0 / 0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace topn_kernels {
namespace {

using at::Tensor;

struct Scratch {
  std::vector<double> cost, u, v, min_slack;
  std::vector<int64_t> row_of, way;
  std::vector<char> used;
};

// Fills s.row_of[1..n] (1-based) with the row matched to each column, minimising the sum of
// cost (n x n, row-major).
void assign(const double* cost, int64_t n, Scratch& s) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  s.u.assign(n + 1, 0.0);
  s.v.assign(n + 1, 0.0);
  s.row_of.assign(n + 1, 0);
  s.way.assign(n + 1, 0);
  for (int64_t i = 1; i <= n; ++i) {
    s.row_of[0] = i;
    int64_t j0 = 0;
    s.min_slack.assign(n + 1, inf);
    s.used.assign(n + 1, 0);
    do {
      s.used[j0] = 1;
      const int64_t i0 = s.row_of[j0];
      double delta = inf;
      int64_t j1 = 0;
      for (int64_t j = 1; j <= n; ++j) {
        if (s.used[j]) continue;
        const double slack = cost[(i0 - 1) * n + (j - 1)] - s.u[i0] - s.v[j];
        if (slack < s.min_slack[j]) {
          s.min_slack[j] = slack;
          s.way[j] = j0;
        }
        if (s.min_slack[j] < delta) {
          delta = s.min_slack[j];
          j1 = j;
        }
      }
      for (int64_t j = 0; j <= n; ++j) {
        if (s.used[j]) {
          s.u[s.row_of[j]] += delta;
          s.v[j] -= delta;
        } else {
          s.min_slack[j] -= delta;
        }
      }
      j0 = j1;
    } while (s.row_of[j0] != 0);
    do {  // flip the augmenting path
      const int64_t j1 = s.way[j0];
      s.row_of[j0] = s.row_of[j1];
      j0 = j1;
    } while (j0 != 0);
  }
}

template <typename T>
double matched_set(const T* x, const T* y, int64_t n, int64_t D, T* gx, T* gy, Scratch& s) {
  s.cost.resize(n * n);
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sq = 0.0;
      for (int64_t k = 0; k < D; ++k) {
        const double diff = static_cast<double>(x[i * D + k]) - static_cast<double>(y[j * D + k]);
        sq += diff * diff;
      }
      const double dist = std::sqrt(sq);
      finite = finite && std::isfinite(dist);
      s.cost[i * n + j] = dist;
    }
  }
  if (!finite || n == 0) return std::numeric_limits<double>::quiet_NaN();
  assign(s.cost.data(), n, s);
  std::vector<int64_t>& col_of = s.way;  // reused: the column matched to each row (0-based)
  for (int64_t j = 1; j <= n; ++j) col_of[s.row_of[j] - 1] = j - 1;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += s.cost[i * n + col_of[i]];
  if (gx != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = col_of[i];
      const double dist = s.cost[i * n + j];
      for (int64_t k = 0; k < D; ++k) {
        const double diff = static_cast<double>(x[i * D + k]) - static_cast<double>(y[j * D + k]);
        const double g = dist > 0 ? diff / dist / static_cast<double>(n) : 0.0;
        gx[i * D + k] = static_cast<T>(g);
        gy[j * D + k] = static_cast<T>(-g);
      }
    }
  }
  return total / static_cast<double>(n);
}

std::tuple<Tensor, Tensor, Tensor> matched_sets_cpu(const Tensor& x_in, const Tensor& y_in,
                                                    const Tensor& lengths_in, bool with_grad) {
  TORCH_CHECK(x_in.dim() == 3 && y_in.dim() == 3, "matched_sets: x and y must be (B, N, D)");
  TORCH_CHECK(x_in.scalar_type() == y_in.scalar_type(),
              "matched_sets: x and y must have the same dtype");
  TORCH_CHECK(x_in.size(0) == y_in.size(0) && x_in.size(2) == y_in.size(2),
              "matched_sets: x and y must have the same number of sets and dimension");
  TORCH_CHECK(lengths_in.dim() == 1 && lengths_in.size(0) == x_in.size(0),
              "matched_sets: lengths must be (B,)");
  const Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  const int64_t* l = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(l[b] >= 0 && l[b] <= N && l[b] <= M, "matched_sets: lengths[", b, "] = ", l[b],
                " outside [0, ", std::min(N, M), "]");
  Tensor value = at::empty({B}, x.options());
  Tensor grad_x = with_grad ? at::zeros_like(x) : at::empty({0}, x.options());
  Tensor grad_y = with_grad ? at::zeros_like(y) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matched_sets", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    T* out = value.mutable_data_ptr<T>();
    T* gxp = with_grad ? grad_x.mutable_data_ptr<T>() : nullptr;
    T* gyp = with_grad ? grad_y.mutable_data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N * N * N));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        T* gx = gxp ? gxp + b * N * D : nullptr;
        T* gy = gyp ? gyp + b * M * D : nullptr;
        const double v = matched_set<T>(xp + b * N * D, yp + b * M * D, l[b], D, gx, gy, scratch);
        out[b] = static_cast<T>(v);
      }
    });
  });
  return {value, grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) { m.impl("matched_sets", &matched_sets_cpu); }

}  // namespace topn_kernels
