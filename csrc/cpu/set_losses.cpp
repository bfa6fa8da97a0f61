// Chamfer distance, repulsion and valency penalties on CPU (docs/operators.md), for padded
// batches of many small sets: one call runs every set of the batch, in parallel over sets,
// and returns each set's value and, when asked, the gradient of that value with respect to
// the set's points. A set's value depends on its own points only, so the Python autograd
// (topn_kernels/native/set_losses.py) scales those gradients by the upstream gradient of each
// set, and a training step costs one pass over the pairs.
//
// Inputs: x (B, N, D) float32 or float64 and optional int64 lengths (B,), each in [0, N]:
// set b is x[b, :lengths[b]]; padding rows are never read, and their gradient is 0.
//
// Ties and NaN follow the dense reference (topn_kernels/reference.py): a nearest neighbour
// is the first one at the minimal distance, a NaN distance wins the minimum (torch.min
// propagates NaN), and a NaN distance between two points of a penalised set makes its value
// NaN. The gradient of a Euclidean distance is 0 where it is 0, as torch.linalg.vector_norm's.
// Sums run in double in a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace topn_kernels {
namespace {

using at::Tensor;

// About this many point pairs per parallel task: tiny batches stay on one thread.
constexpr int64_t kPairsPerTask = 1 << 15;

// x (n, dim) row-major -> (dim, n), so that the distance loops run over contiguous columns.
template <typename T>
void transpose(const T* x, int64_t n, int64_t dim, std::vector<T>& out) {
  out.resize(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < dim; ++k) out[k * n + i] = x[i * dim + k];
}

// d[j] for j in [begin, m): from point p (dim,) to the columns of qt (dim, m): squared
// Euclidean (kind 2), L1 (kind 1), or Euclidean (kind 0).
template <typename T>
void distances(const T* p, const T* qt, int64_t begin, int64_t m, int64_t dim, int kind, T* d) {
  for (int64_t j = begin; j < m; ++j) d[j] = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const T pk = p[k];
    const T* q = qt + k * m;
    if (kind == 1) {
      for (int64_t j = begin; j < m; ++j) d[j] += std::abs(pk - q[j]);
    } else {
      for (int64_t j = begin; j < m; ++j) d[j] += (pk - q[j]) * (pk - q[j]);
    }
  }
  if (kind == 0)
    for (int64_t j = begin; j < m; ++j) d[j] = std::sqrt(d[j]);
}

// Whether a distance d replaces the current minimum: smaller, or the first NaN.
template <typename T>
inline bool beats(T d, T best) {
  return d < best || (std::isnan(d) && !std::isnan(best));
}

template <typename T>
inline T sign(T v) {
  return static_cast<T>((v > 0) - (v < 0));
}

// g += scale * d/dp dist(p, q) and h -= the same: the gradient of one distance term with
// respect to its two points (kind as in `distances`; `dist` the distance itself).
template <typename T>
inline void add_pair_gradient(const T* p, const T* q, int64_t dim, int kind, T dist, T scale,
                              T* g, T* h) {
  if (kind == 0 && dist == 0) return;  // |p - q| at p = q: gradient 0
  for (int64_t k = 0; k < dim; ++k) {
    const T diff = p[k] - q[k];
    const T v = kind == 2 ? 2 * diff : kind == 1 ? sign(diff) : diff / dist;
    g[k] += scale * v;
    h[k] -= scale * v;
  }
}

// ---------------------------------------------------------------------------------------------
// Chamfer: per set, red_i d(x_i, NN_y(x_i)) [+ red_j d(y_j, NN_x(y_j))], red the mean or sum
// over the set's points, d squared Euclidean (norm 2) or L1 (norm 1); a point whose other set
// is empty contributes 0.
// ---------------------------------------------------------------------------------------------

template <typename T>
double chamfer_set(const T* x, int64_t n, const T* y, int64_t m, int64_t dim, int norm,
                   bool mean, bool single, T* gx, T* gy, std::vector<T>& yt, std::vector<T>& d,
                   std::vector<T>& col_best, std::vector<int64_t>& col_arg) {
  if (n == 0 || m == 0) return 0.0;  // every term has no neighbour: 0, gradient 0
  transpose(y, m, dim, yt);
  d.resize(m);
  col_best.assign(m, std::numeric_limits<T>::infinity());
  col_arg.assign(m, 0);
  const T x_scale = mean ? T(1) / T(n) : T(1), y_scale = mean ? T(1) / T(m) : T(1);
  double x_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    distances(xi, yt.data(), 0, m, dim, norm, d.data());
    T best = d[0];
    int64_t arg = 0;
    for (int64_t j = 1; j < m; ++j)
      if (beats(d[j], best)) best = d[j], arg = j;
    x_sum += static_cast<double>(best);
    if (gx) add_pair_gradient(xi, y + arg * dim, dim, norm, best, x_scale, gx + i * dim, gy + arg * dim);
    if (!single)
      for (int64_t j = 0; j < m; ++j)
        if (beats(d[j], col_best[j])) col_best[j] = d[j], col_arg[j] = i;
  }
  double value = x_sum * static_cast<double>(x_scale);
  if (single) return value;
  double y_sum = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    y_sum += static_cast<double>(col_best[j]);
    if (gy) {
      const int64_t i = col_arg[j];
      add_pair_gradient(y + j * dim, x + i * dim, dim, norm, col_best[j], y_scale, gy + j * dim,
                        gx + i * dim);
    }
  }
  return value + y_sum * static_cast<double>(y_scale);
}

// ---------------------------------------------------------------------------------------------
// Repulsion: per set, sum_{i<j} relu(min_dist - |x_i - x_j|).
// ---------------------------------------------------------------------------------------------

template <typename T>
double repulsion_set(const T* x, int64_t n, int64_t dim, T min_dist, T* gx, std::vector<T>& xt,
                     std::vector<T>& d) {
  transpose(x, n, dim, xt);
  d.resize(n);
  double value = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    distances(x + i * dim, xt.data(), i + 1, n, dim, 0, d.data());
    for (int64_t j = i + 1; j < n; ++j) {
      if (d[j] >= min_dist) continue;  // relu(...) = 0 (NaN goes on: the value is NaN)
      value += static_cast<double>(min_dist - d[j]);
      if (gx) add_pair_gradient(x + i * dim, x + j * dim, dim, 0, d[j], T(-1), gx + i * dim, gx + j * dim);
    }
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Valency: per set of at least 2 points, sum_i relu(s_i0 - r) + sum_{k >= V} relu(r - s_ik),
// s_i the distances from x_i to the other points in increasing order.
// ---------------------------------------------------------------------------------------------

template <typename T>
double valency_set(const T* x, int64_t n, int64_t dim, T r, int64_t max_valency, T* gx,
                   std::vector<T>& xt, std::vector<T>& d, std::vector<std::pair<T, int64_t>>& close) {
  if (n < 2) return 0.0;
  transpose(x, n, dim, xt);
  d.resize(n);
  double value = 0.0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    distances(xi, xt.data(), 0, n, dim, 0, d.data());
    // the nearest other point: s_i0
    int64_t arg = i == 0 ? 1 : 0;
    for (int64_t j = arg + 1; j < n; ++j)
      if (j != i && beats(d[j], d[arg])) arg = j;
    nan = nan || std::isnan(d[arg]);
    if (d[arg] > r) {
      value += static_cast<double>(d[arg] - r);
      if (gx) add_pair_gradient(xi, x + arg * dim, dim, 0, d[arg], T(1), gx + i * dim, gx + arg * dim);
    }
    // the others closer than r, past the V nearest (ordered by distance, then index): their
    // order among themselves does not matter, so a partition suffices
    close.clear();
    for (int64_t j = 0; j < n; ++j)
      if (j != i && d[j] < r) close.emplace_back(d[j], j);
    if (static_cast<int64_t>(close.size()) <= max_valency) continue;
    std::nth_element(close.begin(), close.begin() + max_valency, close.end());
    for (size_t k = static_cast<size_t>(max_valency); k < close.size(); ++k) {
      const auto [dist, j] = close[k];
      value += static_cast<double>(r - dist);
      if (gx) add_pair_gradient(xi, x + j * dim, dim, 0, dist, T(-1), gx + i * dim, gx + j * dim);
    }
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : value;
}

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

Tensor checked_points(const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be (B, N, D), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64");
  return x.contiguous();
}

// The lengths as a contiguous int64 (B,) tensor with values in [0, rows]; undefined for none.
Tensor checked_lengths(const c10::optional<Tensor>& lengths, int64_t batch, int64_t rows,
                       const char* op, const char* name) {
  if (!lengths.has_value() || !lengths->defined()) return Tensor();
  const Tensor l = lengths->contiguous();
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 &&
                  l.size(0) == batch,
              op, ": ", name, " must be an int64 CPU tensor (", batch, ",)");
  const int64_t* v = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(v[b] >= 0 && v[b] <= rows, op, ": ", name, "[", b, "] = ", v[b],
                      " is outside [0, ", rows, "]");
  return l;
}

int64_t size_of(const Tensor& lengths, int64_t b, int64_t rows) {
  return lengths.defined() ? lengths.data_ptr<int64_t>()[b] : rows;
}

int64_t grain(int64_t pairs_per_set) {
  return std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(1, pairs_per_set));
}

std::tuple<Tensor, Tensor, Tensor> chamfer_sets_cpu(const Tensor& x_, const Tensor& y_,
                                                    const c10::optional<Tensor>& x_lengths,
                                                    const c10::optional<Tensor>& y_lengths,
                                                    int64_t norm, bool mean,
                                                    bool single_directional, bool with_grad) {
  const Tensor x = checked_points(x_, "chamfer_sets", "x");
  const Tensor y = checked_points(y_, "chamfer_sets", "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "chamfer_sets: x and y must have one dtype");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(2) == x.size(2),
              "chamfer_sets: y must be (B, M, D) with the B and D of x");
  TORCH_CHECK(norm == 1 || norm == 2, "chamfer_sets: norm must be 1 or 2");
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  const Tensor xl = checked_lengths(x_lengths, B, N, "chamfer_sets", "x_lengths");
  const Tensor yl = checked_lengths(y_lengths, B, M, "chamfer_sets", "y_lengths");
  Tensor value = at::empty({B}, x.options());
  Tensor grad_x = with_grad ? at::zeros_like(x) : at::empty({0}, x.options());
  Tensor grad_y = with_grad ? at::zeros_like(y) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chamfer_sets_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *yp = y.data_ptr<T>();
    T* out = value.data_ptr<T>();
    at::parallel_for(0, B, grain(N * M), [&](int64_t begin, int64_t end) {
      std::vector<T> yt, d, col_best;
      std::vector<int64_t> col_arg;
      for (int64_t b = begin; b < end; ++b) {
        T* gx = with_grad ? grad_x.data_ptr<T>() + b * N * D : nullptr;
        T* gy = with_grad ? grad_y.data_ptr<T>() + b * M * D : nullptr;
        out[b] = static_cast<T>(chamfer_set<T>(xp + b * N * D, size_of(xl, b, N),
                                               yp + b * M * D, size_of(yl, b, M), D,
                                               static_cast<int>(norm), mean, single_directional,
                                               gx, gy, yt, d, col_best, col_arg));
      }
    });
  });
  return {value, grad_x, grad_y};
}

// Scratch of one thread for the penalties of its sets.
template <typename T>
struct PenaltyScratch {
  std::vector<T> xt, d;
  std::vector<std::pair<T, int64_t>> close;  // valency only
};

// The value (B,) and, with_grad, the gradient (B, N, D) of a penalty of every set of x:
// penalty(points, n, dim, grad or nullptr, scratch) -> the set's value, for T float and double.
template <typename Penalty>
std::tuple<Tensor, Tensor> penalty_sets(const char* op, const Tensor& x_,
                                        const c10::optional<Tensor>& lengths, bool with_grad,
                                        const Penalty& penalty) {
  const Tensor x = checked_points(x_, op, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const Tensor l = checked_lengths(lengths, B, N, op, "lengths");
  Tensor value = at::empty({B}, x.options());
  Tensor grad_x = with_grad ? at::zeros_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "penalty_sets", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* out = value.data_ptr<T>();
    at::parallel_for(0, B, grain(N * N), [&](int64_t begin, int64_t end) {
      PenaltyScratch<T> scratch;
      for (int64_t b = begin; b < end; ++b) {
        T* gx = with_grad ? grad_x.data_ptr<T>() + b * N * D : nullptr;
        out[b] = static_cast<T>(penalty(xp + b * N * D, size_of(l, b, N), D, gx, scratch));
      }
    });
  });
  return {value, grad_x};
}

std::tuple<Tensor, Tensor> repulsion_sets_cpu(const Tensor& x,
                                              const c10::optional<Tensor>& lengths,
                                              double min_dist, bool with_grad) {
  TORCH_CHECK(std::isfinite(min_dist) && min_dist > 0,
              "repulsion_sets: min_dist must be finite and > 0, got ", min_dist);
  return penalty_sets("repulsion_sets", x, lengths, with_grad,
                      [&](const auto* points, int64_t n, int64_t dim, auto* gx, auto& s) {
                        using T = std::remove_pointer_t<decltype(gx)>;
                        return repulsion_set<T>(points, n, dim, static_cast<T>(min_dist), gx,
                                                s.xt, s.d);
                      });
}

std::tuple<Tensor, Tensor> valency_sets_cpu(const Tensor& x,
                                            const c10::optional<Tensor>& lengths,
                                            double neighbor_dist, int64_t max_valency,
                                            bool with_grad) {
  TORCH_CHECK(max_valency >= 0, "valency_sets: max_valency must be >= 0");
  TORCH_CHECK(std::isfinite(neighbor_dist) && neighbor_dist > 0,
              "valency_sets: neighbor_dist must be finite and > 0, got ", neighbor_dist);
  return penalty_sets("valency_sets", x, lengths, with_grad,
                      [&](const auto* points, int64_t n, int64_t dim, auto* gx, auto& s) {
                        using T = std::remove_pointer_t<decltype(gx)>;
                        return valency_set<T>(points, n, dim, static_cast<T>(neighbor_dist),
                                              max_valency, gx, s.xt, s.d, s.close);
                      });
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("chamfer_sets", &chamfer_sets_cpu);
  m.impl("repulsion_sets", &repulsion_sets_cpu);
  m.impl("valency_sets", &valency_sets_cpu);
}

}  // namespace topn_kernels
