// Batch norm over the points of small batches, in training mode, on CPU: what the fused set
// blocks (set_transformer.cpp) and stems (authors_mlp.cpp) call instead of ATen's
// native_batch_norm and native_batch_norm_backward where x is (M, C) with M C <= kSmallPoints.
// There ATen's kernels cost about 10 us a call each way whatever the size (their setup and
// threading), several times the arithmetic; larger inputs, eval mode, and anything else keep
// ATen's. The same outputs up to rounding: per channel c, over the M rows,
//
//   mean_c = sum_i x_ic / M,   var_c = sum_i (x_ic - mean_c)^2 / M,   invstd_c = 1/sqrt(var_c + eps)
//   out_ic = (x_ic - mean_c) invstd_c w_c + b_c
//   running_mean_c <- momentum mean_c + (1 - momentum) running_mean_c
//   running_var_c  <- momentum var_c M/(M - 1) + (1 - momentum) running_var_c
//
// and the backward, with g the gradient of out and xh_ic = (x_ic - mean_c) invstd_c,
//
//   grad_b_c = sum_i g_ic,   grad_w_c = sum_i g_ic xh_ic,
//   grad_x_ic = (g_ic - grad_b_c / M - xh_ic grad_w_c / M) invstd_c w_c,
//
// every sum in float64 over the rows in order (ATen's accumulation type on CPU), each output
// rounded once to x's dtype; save_mean and save_invstd as ATen's, so either backward takes
// either forward's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace topn_kernels {
namespace point_batch_norm_detail {

constexpr int64_t kSmallPoints = 8192;  // M C: up to 128 points of 64 channels

inline bool small_training(const at::Tensor& x, bool training,
                           std::initializer_list<const at::Tensor*> per_channel) {
  if (!training || x.dim() != 2 || !x.is_contiguous() || x.size(0) < 2 ||
      x.numel() > kSmallPoints || !(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble))
    return false;
  for (const at::Tensor* t : per_channel)
    if (!t->defined() || t->dim() != 1 || t->size(0) != x.size(1) || !t->is_contiguous() ||
        t->scalar_type() != x.scalar_type())
      return false;
  return true;
}

}  // namespace point_batch_norm_detail

// at::native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> point_batch_norm(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
    double eps) {
  using namespace point_batch_norm_detail;
  if (!small_training(x, training, {&weight, &bias, &running_mean, &running_var}))
    return at::native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                 eps);
  const int64_t M = x.size(0), C = x.size(1);
  at::Tensor out = at::empty_like(x), save_mean = at::empty({C}, x.options()),
             save_invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "point_batch_norm", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *w = weight.const_data_ptr<T>(),
            *b = bias.const_data_ptr<T>();
    T *op = out.mutable_data_ptr<T>(), *rm = running_mean.mutable_data_ptr<T>(),
      *rv = running_var.mutable_data_ptr<T>();
    std::vector<double> mean(C, 0.0), sq(C, 0.0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<double>(xp[i * C + c]);
    for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<double>(M);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(xp[i * C + c]) - mean[c];
        sq[c] += d * d;
      }
    std::vector<double> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(sq[c] / static_cast<double>(M) + eps);
      save_mean.mutable_data_ptr<T>()[c] = static_cast<T>(mean[c]);
      save_invstd.mutable_data_ptr<T>()[c] = static_cast<T>(invstd);
      scale[c] = invstd * static_cast<double>(w[c]);
      rm[c] = static_cast<T>(momentum * mean[c] + (1 - momentum) * static_cast<double>(rm[c]));
      rv[c] = static_cast<T>(momentum * (sq[c] / static_cast<double>(M - 1)) +
                             (1 - momentum) * static_cast<double>(rv[c]));
    }
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c)
        op[i * C + c] = static_cast<T>((static_cast<double>(xp[i * C + c]) - mean[c]) * scale[c] +
                                       static_cast<double>(b[c]));
  });
  return {out, save_mean, save_invstd};
}

// at::native_batch_norm_backward(grad_out, x, weight, running_mean, running_var, save_mean,
// save_invstd, training, eps, {true, true, true}).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> point_batch_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps) {
  using namespace point_batch_norm_detail;
  if (!small_training(x, training, {&weight, &save_mean, &save_invstd}) ||
      !grad_out.is_contiguous() || grad_out.sizes() != x.sizes() ||
      grad_out.scalar_type() != x.scalar_type())
    return at::native_batch_norm_backward(grad_out, x, weight, running_mean, running_var,
                                          save_mean, save_invstd, training, eps,
                                          {true, true, true});
  const int64_t M = x.size(0), C = x.size(1);
  at::Tensor grad_x = at::empty_like(x), grad_w = at::empty({C}, x.options()),
             grad_b = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "point_batch_norm_backward", [&] {
    using T = scalar_t;
    const T *g = grad_out.const_data_ptr<T>(), *xp = x.const_data_ptr<T>(),
            *w = weight.const_data_ptr<T>(), *mean = save_mean.const_data_ptr<T>(),
            *invstd = save_invstd.const_data_ptr<T>();
    std::vector<double> sum_g(C, 0.0), dot(C, 0.0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const double gi = static_cast<double>(g[i * C + c]);
        sum_g[c] += gi;
        dot[c] += gi * (static_cast<double>(xp[i * C + c]) - static_cast<double>(mean[c]));
      }
    std::vector<double> k(C), shift(C), scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const double is = static_cast<double>(invstd[c]);
      grad_w.mutable_data_ptr<T>()[c] = static_cast<T>(dot[c] * is);
      grad_b.mutable_data_ptr<T>()[c] = static_cast<T>(sum_g[c]);
      k[c] = dot[c] * is * is / static_cast<double>(M);
      shift[c] = sum_g[c] / static_cast<double>(M);
      scale[c] = is * static_cast<double>(w[c]);
    }
    T* gx = grad_x.mutable_data_ptr<T>();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const double xc = static_cast<double>(xp[i * C + c]) - static_cast<double>(mean[c]);
        gx[i * C + c] =
            static_cast<T>((static_cast<double>(g[i * C + c]) - shift[c] - xc * k[c]) * scale[c]);
      }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace topn_kernels
