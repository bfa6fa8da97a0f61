// The drivers of the per-point loops (point_rows.h): checks, outputs, the split of rows or
// chunks between the threads, and the chunks' column sums added up in order.
#include "point_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include <torch/library.h>

#include "avx2_build.h"

namespace topn_kernels {

template <typename T>
PointRowsKernels<T> point_rows_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_avx2_builds())
    return {&point_rows_avx2::layer_norm<T>, &point_rows_avx2::layer_norm_backward<T>,
            &point_rows_avx2::mask_sum<T>, &point_rows_avx2::column_sum<T>,
            &point_rows_avx2::centred_sums<T>, &point_rows_avx2::batch_norm_apply<T>};
#endif
  return {&point_rows_default::layer_norm<T>, &point_rows_default::layer_norm_backward<T>,
          &point_rows_default::mask_sum<T>, &point_rows_default::column_sum<T>,
          &point_rows_default::centred_sums<T>, &point_rows_default::batch_norm_apply<T>};
}

template PointRowsKernels<float> point_rows_kernels<float>();
template PointRowsKernels<double> point_rows_kernels<double>();

namespace {

using at::Tensor;

constexpr int64_t kElementsPerTask = 8192;  // below this a loop stays on one thread

void check_rows(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x must be a contiguous (M, C) float32 or float64 CPU tensor");
}

void check_like(const Tensor& t, const Tensor& x, at::IntArrayRef shape, const char* op,
                const char* name) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
              op, ": ", name, " must have shape ", shape, " and x's dtype");
}

int64_t chunks_of(int64_t M) { return (M + kChunkRows - 1) / kChunkRows; }

int64_t chunk_grain(int64_t C) {
  return std::max<int64_t>(1, kElementsPerTask / (kChunkRows * std::max<int64_t>(1, C)));
}

int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, C));
}

// The chunks' sums of `kernel` (kernel(begin, end, part, scratch) writes k C sums a chunk),
// column j summed over the chunks in order, for j < k C.
template <typename T, typename Kernel>
std::vector<double> chunk_sums(int64_t M, int64_t C, int64_t k, const Kernel& kernel) {
  const int64_t chunks = chunks_of(M);
  std::vector<double> part(chunks * k * C);
  at::parallel_for(0, chunks, chunk_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(k * C);
    kernel(begin, end, part.data(), scratch.data());
  });
  std::vector<double> total(k * C, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < k * C; ++j) total[j] += part[c * k * C + j];
  return total;
}

// Entries [t C, t C + C) of `total` as a (C,) tensor of type T.
template <typename T>
Tensor column_tensor(const std::vector<double>& total, int64_t t, int64_t C,
                     const at::TensorOptions& options) {
  Tensor s = at::empty({C}, options);
  T* sp = s.mutable_data_ptr<T>();
  for (int64_t j = 0; j < C; ++j) sp[j] = static_cast<T>(total[t * C + j]);
  return s;
}

void check_per_channel(std::initializer_list<const Tensor*> tensors, const Tensor& x,
                       const char* op) {
  for (const Tensor* t : tensors) {
    check_like(*t, x, {x.size(1)}, op, "a per-channel tensor");
    TORCH_CHECK(t->is_contiguous(), op, ": per-channel tensors must be contiguous");
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_rows(const Tensor& x, const Tensor& w,
                                                   const Tensor& b, double eps) {
  check_rows(x, "layer_norm_rows");
  const int64_t M = x.size(0), C = x.size(1);
  check_like(w, x, {C}, "layer_norm_rows", "w");
  check_like(b, x, {C}, "layer_norm_rows", "b");
  Tensor out = at::empty_like(x), mean = at::empty({M, 1}, x.options()),
         rstd = at::empty({M, 1}, x.options());
  const Tensor wc = w.contiguous(), bc = b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_rows", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    const T *xp = x.const_data_ptr<T>(), *wp = wc.const_data_ptr<T>(), *bp = bc.const_data_ptr<T>();
    T *op = out.mutable_data_ptr<T>(), *mp = mean.mutable_data_ptr<T>(),
      *rp = rstd.mutable_data_ptr<T>();
    at::parallel_for(0, M, row_grain(C), [&](int64_t begin, int64_t end) {
      kernels.layer_norm(xp, wp, bp, eps, C, begin, end, op, mp, rp);
    });
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_rows_backward(const Tensor& g,
                                                                    const Tensor& x,
                                                                    const Tensor& mean,
                                                                    const Tensor& rstd,
                                                                    const Tensor& w) {
  check_rows(x, "layer_norm_rows_backward");
  const int64_t M = x.size(0), C = x.size(1);
  check_like(g, x, {M, C}, "layer_norm_rows_backward", "g");
  check_like(mean, x, {M, 1}, "layer_norm_rows_backward", "mean");
  check_like(rstd, x, {M, 1}, "layer_norm_rows_backward", "rstd");
  check_like(w, x, {C}, "layer_norm_rows_backward", "w");
  const Tensor gc = g.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous(),
               wc = w.contiguous();
  Tensor gx = at::empty_like(x), grad_w, grad_b, gx_sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_rows_backward", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    const T *gp = gc.const_data_ptr<T>(), *xp = x.const_data_ptr<T>(),
            *mp = mc.const_data_ptr<T>(), *rp = rc.const_data_ptr<T>(),
            *wp = wc.const_data_ptr<T>();
    T* gxp = gx.mutable_data_ptr<T>();
    const std::vector<double> total = chunk_sums<T>(M, C, 3, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.layer_norm_backward(gp, xp, mp, rp, wp, M, C, s, e, gxp, p, t);
    });
    grad_w = column_tensor<T>(total, 0, C, x.options());
    grad_b = column_tensor<T>(total, 1, C, x.options());
    gx_sums = column_tensor<T>(total, 2, C, x.options());
  });
  return {gx, grad_w, grad_b, gx_sums};
}

Tensor mask_by_positive_sum_(Tensor& g, const Tensor& u) {
  check_rows(g, "mask_by_positive_sum_");
  const int64_t M = g.size(0), C = g.size(1);
  check_like(u, g, {M, C}, "mask_by_positive_sum_", "u");
  TORCH_CHECK(u.is_contiguous(), "mask_by_positive_sum_: u must be contiguous");
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mask_by_positive_sum_", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    T* gp = g.mutable_data_ptr<T>();
    const T* up = u.const_data_ptr<T>();
    const std::vector<double> total = chunk_sums<T>(M, C, 1, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.mask_sum(gp, up, M, C, s, e, p, t);
    });
    sums = column_tensor<T>(total, 0, C, g.options());
  });
  return sums;
}

Tensor column_sums(const Tensor& x) {
  check_rows(x, "column_sums");
  const int64_t M = x.size(0), C = x.size(1);
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_sums", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    const T* xp = x.const_data_ptr<T>();
    const std::vector<double> total = chunk_sums<T>(M, C, 1, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.column_sum(xp, M, C, s, e, p, t);
    });
    sums = column_tensor<T>(total, 0, C, x.options());
  });
  return sums;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_rows(const Tensor& x, const Tensor& w,
                                                   const Tensor& b, Tensor& running_mean,
                                                   Tensor& running_var, double momentum,
                                                   double eps) {
  check_rows(x, "batch_norm_rows");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(M >= 2, "batch_norm_rows: at least 2 rows expected");
  check_per_channel({&w, &b, &running_mean, &running_var}, x, "batch_norm_rows");
  Tensor out = at::empty_like(x), save_mean = at::empty({C}, x.options()),
         save_invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_rows", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    const T *xp = x.const_data_ptr<T>(), *wp = w.const_data_ptr<T>(), *bp = b.const_data_ptr<T>();
    T *mp = save_mean.mutable_data_ptr<T>(), *ip = save_invstd.mutable_data_ptr<T>(),
      *rm = running_mean.mutable_data_ptr<T>(), *rv = running_var.mutable_data_ptr<T>();
    const std::vector<double> sum = chunk_sums<T>(M, C, 1, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.column_sum(xp, M, C, s, e, p, t);
    });
    for (int64_t c = 0; c < C; ++c) mp[c] = static_cast<T>(sum[c] / static_cast<double>(M));
    const std::vector<double> sq = chunk_sums<T>(M, C, 1, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.centred_sums(nullptr, xp, mp, M, C, s, e, p, t);
    });
    std::vector<T> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const double mean = sum[c] / static_cast<double>(M);
      const double invstd = 1.0 / std::sqrt(sq[c] / static_cast<double>(M) + eps);
      ip[c] = static_cast<T>(invstd);
      scale[c] = static_cast<T>(invstd * static_cast<double>(wp[c]));
      rm[c] = static_cast<T>(momentum * mean + (1 - momentum) * static_cast<double>(rm[c]));
      rv[c] = static_cast<T>(momentum * (sq[c] / static_cast<double>(M - 1)) +
                             (1 - momentum) * static_cast<double>(rv[c]));
    }
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, M, row_grain(C), [&](int64_t begin, int64_t end) {
      kernels.batch_norm_apply(nullptr, xp, mp, scale.data(), bp, nullptr, C, begin, end, op);
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_rows_backward(const Tensor& g, const Tensor& x,
                                                            const Tensor& w,
                                                            const Tensor& save_mean,
                                                            const Tensor& save_invstd) {
  check_rows(x, "batch_norm_rows_backward");
  const int64_t M = x.size(0), C = x.size(1);
  check_like(g, x, {M, C}, "batch_norm_rows_backward", "g");
  TORCH_CHECK(g.is_contiguous(), "batch_norm_rows_backward: g must be contiguous");
  check_per_channel({&w, &save_mean, &save_invstd}, x, "batch_norm_rows_backward");
  Tensor grad_x = at::empty_like(x), grad_w = at::empty({C}, x.options()),
         grad_b = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_rows_backward", [&] {
    using T = scalar_t;
    const auto kernels = point_rows_kernels<T>();
    const T *gp = g.const_data_ptr<T>(), *xp = x.const_data_ptr<T>(),
            *wp = w.const_data_ptr<T>(), *mp = save_mean.const_data_ptr<T>(),
            *ip = save_invstd.const_data_ptr<T>();
    const std::vector<double> sums = chunk_sums<T>(M, C, 2, [&](int64_t s, int64_t e, double* p, T* t) {
      kernels.centred_sums(gp, xp, mp, M, C, s, e, p, t);
    });
    std::vector<T> a(C), c(C), k(C);
    T *gw = grad_w.mutable_data_ptr<T>(), *gb = grad_b.mutable_data_ptr<T>();
    for (int64_t j = 0; j < C; ++j) {
      const double is = static_cast<double>(ip[j]), sum_g = sums[j], dot = sums[C + j];
      gw[j] = static_cast<T>(dot * is);
      gb[j] = static_cast<T>(sum_g);
      k[j] = static_cast<T>(dot * is * is / static_cast<double>(M));
      c[j] = static_cast<T>(sum_g / static_cast<double>(M));
      a[j] = static_cast<T>(is * static_cast<double>(wp[j]));
    }
    T* gx = grad_x.mutable_data_ptr<T>();
    at::parallel_for(0, M, row_grain(C), [&](int64_t begin, int64_t end) {
      kernels.batch_norm_apply(gp, xp, mp, a.data(), c.data(), k.data(), C, begin, end, gx);
    });
  });
  return {grad_x, grad_w, grad_b};
}

namespace {

std::vector<Tensor> point_layer_norm_op(const Tensor& x, const Tensor& w, const Tensor& b,
                                        double eps) {
  auto [out, mean, rstd] = layer_norm_rows(x, w, b, eps);
  return {out, mean, rstd};
}

std::vector<Tensor> point_layer_norm_backward_op(const Tensor& g, const Tensor& x,
                                                 const Tensor& mean, const Tensor& rstd,
                                                 const Tensor& w) {
  auto [gx, gw, gb, gx_sum] = layer_norm_rows_backward(g, x, mean, rstd, w);
  return {gx, gw, gb, gx_sum};
}

std::vector<Tensor> point_batch_norm_op(const Tensor& x, const Tensor& w, const Tensor& b,
                                        Tensor& running_mean, Tensor& running_var,
                                        double momentum, double eps) {
  auto [out, mean, invstd] = batch_norm_rows(x, w, b, running_mean, running_var, momentum, eps);
  return {out, mean, invstd};
}

std::vector<Tensor> point_batch_norm_backward_op(const Tensor& g, const Tensor& x,
                                                 const Tensor& w, const Tensor& mean,
                                                 const Tensor& invstd) {
  auto [gx, gw, gb] = batch_norm_rows_backward(g, x, w, mean, invstd);
  return {gx, gw, gb};
}

std::vector<Tensor> point_relu_backward_sum_op(const Tensor& grad, const Tensor& u) {
  Tensor masked = grad.contiguous().clone();
  Tensor sums = mask_by_positive_sum_(masked, u.contiguous());
  return {masked, sums};
}

Tensor point_column_sums_op(const Tensor& x) { return column_sums(x.contiguous()); }

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("point_layer_norm", &point_layer_norm_op);
  m.impl("point_layer_norm_backward", &point_layer_norm_backward_op);
  m.impl("point_batch_norm", &point_batch_norm_op);
  m.impl("point_batch_norm_backward", &point_batch_norm_backward_op);
  m.impl("point_relu_backward_sum", &point_relu_backward_sum_op);
  m.impl("point_column_sums", &point_column_sums_op);
}

}  // namespace topn_kernels
