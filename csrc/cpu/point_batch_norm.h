// Batch norm over the points (rows) of x (M, C), in training mode, on CPU: what the fused set
// blocks (set_transformer.cpp) and stems (authors_mlp.cpp) call instead of ATen's
// native_batch_norm and native_batch_norm_backward (whose channels-last kernels cost 15-20 us a
// call each way at a few points and 30-40 us at a thousand, several times the arithmetic). Eval
// mode, and inputs the loops do not take, keep ATen's. The same outputs up to rounding: per
// channel c, over the M rows,
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
// the column sums over the rows in chunks of 16 (in x's dtype within a chunk, then the chunks in
// order in float64: point_rows.h), the same whatever the number of threads and the CPU's vector
// width; the per-channel constants in float64, the per-element steps in x's dtype. save_mean and
// save_invstd are ATen's, so either backward takes either forward's.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

#include "point_rows.h"

namespace topn_kernels {
namespace point_batch_norm_detail {

inline bool takes(const at::Tensor& x, bool training,
                  std::initializer_list<const at::Tensor*> per_channel) {
  if (!training || x.dim() != 2 || !x.is_contiguous() || !x.device().is_cpu() ||
      x.size(0) < 2 || !(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble))
    return false;
  for (const at::Tensor* t : per_channel)
    if (!t->defined() || t->dim() != 1 || t->size(0) != x.size(1) || !t->is_contiguous() ||
        t->scalar_type() != x.scalar_type() || !t->device().is_cpu())
      return false;
  return true;
}

}  // namespace point_batch_norm_detail

// at::native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> point_batch_norm(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    at::Tensor& running_mean, at::Tensor& running_var, bool training, double momentum,
    double eps) {
  if (!point_batch_norm_detail::takes(x, training,
                                      {&weight, &bias, &running_mean, &running_var}))
    return at::native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                 eps);
  return batch_norm_rows(x, weight, bias, running_mean, running_var, momentum, eps);
}

// at::native_batch_norm_backward(grad_out, x, weight, running_mean, running_var, save_mean,
// save_invstd, training, eps, {true, true, true}).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> point_batch_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps) {
  if (!point_batch_norm_detail::takes(x, training, {&weight, &save_mean, &save_invstd}) ||
      !grad_out.is_contiguous() || grad_out.sizes() != x.sizes() ||
      grad_out.scalar_type() != x.scalar_type())
    return at::native_batch_norm_backward(grad_out, x, weight, running_mean, running_var,
                                          save_mean, save_invstd, training, eps,
                                          {true, true, true});
  return batch_norm_rows_backward(grad_out, x, weight, save_mean, save_invstd);
}

}  // namespace topn_kernels
