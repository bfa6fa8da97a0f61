// One transformer encoder layer on a batch of small equal-size sets, forward and backward, on
// CPU (docs/set_vae.md, "The native transformer layer"): the layer of
// torch.nn.TransformerEncoderLayer with batch_first=True, norm_first=False, ReLU and no dropout,
//
//   qkv = x Wi^T + bi                      (B n, 3C)
//   a   = per set and head: softmax(q k^T / sqrt(C / H)) v      (B n, C)
//   s1  = x + (a Wo^T + bo),   h1 = LayerNorm1(s1)
//   u   = relu(h1 W1^T + b1),  s2 = h1 + (u W2^T + b2),   out = LayerNorm2(s2)
//
// The matrix products are ATen's; the layer norms (and the bias gradients, column sums taken in
// the passes that make them) are this library's loops (point_rows.h); the attention of every
// (set, head) pair is a loop here, in parallel over the pairs: with sets of a few dozen points
// and heads of width 16, ATen's attention kernels cost far more than the arithmetic. One call does the whole layer, so a
// training step pays one dispatch and one autograd node per layer instead of about sixty.
//
// The forward returns the intermediates the backward reads (topn_kernels/native/
// set_transformer.py saves them). The attention's and the norms' sums run in a fixed order,
// whatever the number of threads; ATen's matrix products may split theirs by thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "avx2_build.h"
#include "differentiable_once.h"
#include "inplace_activation.h"
#include "point_batch_norm.h"
#include "point_rows.h"
#include "set_attention.h"

namespace topn_kernels {

template <typename T>
SetAttentionKernels<T> set_attention_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_avx2_builds())
    return {&set_attention_avx2::forward<T>, &set_attention_avx2::backward<T>};
#endif
  return {&set_attention_default::forward<T>, &set_attention_default::backward<T>};
}

template SetAttentionKernels<float> set_attention_kernels<float>();
template SetAttentionKernels<double> set_attention_kernels<double>();

namespace {

using at::Tensor;

using Dims = AttentionDims;

// About this many multiply-adds per parallel task of the attention.
constexpr int64_t kWorkPerTask = 1 << 14;

int64_t grain(const Dims& s) { return std::max<int64_t>(1, kWorkPerTask / (s.n * s.n * s.d)); }

void check_weight(const Tensor& w, std::vector<int64_t> shape, const char* name,
                  const Tensor& x) {
  TORCH_CHECK(w.sizes() == at::IntArrayRef(shape), "set_transformer_layer: ", name,
              " must have shape ", at::IntArrayRef(shape), ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "set_transformer_layer: ", name, " must have x's dtype and device");
}

Dims check_inputs(const Tensor& x, int64_t heads, const std::vector<Tensor>& w) {
  TORCH_CHECK(x.dim() == 3, "set_transformer_layer: x must be (B, n, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "set_transformer_layer: x must be float32 or float64");
  const int64_t C = x.size(2);
  TORCH_CHECK(heads > 0 && C % heads == 0, "set_transformer_layer: heads=", heads,
              " must divide the channels, ", C);
  TORCH_CHECK(w.size() == 12, "set_transformer_layer: 12 weights expected");
  const int64_t F = w[6].dim() == 2 ? w[6].size(0) : -1;
  const std::vector<std::vector<int64_t>> shapes = {
      {3 * C, C}, {3 * C}, {C, C}, {C}, {C}, {C}, {F, C}, {F}, {C, F}, {C}, {C}, {C}};
  const char* names[] = {"in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                         "norm1_weight",   "norm1_bias",   "linear1_weight",  "linear1_bias",
                         "linear2_weight", "linear2_bias", "norm2_weight",    "norm2_bias"};
  for (size_t i = 0; i < w.size(); ++i) check_weight(w[i], shapes[i], names[i], x);
  return {x.size(0), x.size(1), C, heads, C / heads};
}

// Outputs: out (B, n, C), then what the backward reads: qkv (B n, 3C), probs (B, H, n, n),
// a (B n, C), s1 (B n, C), mean1 and rstd1 (B n, 1), h1 (B n, C), u (B n, F), s2 (B n, C),
// mean2 and rstd2 (B n, 1).
std::vector<Tensor> set_transformer_layer_cpu(const Tensor& x_in, at::TensorList weights,
                                              int64_t heads, double eps) {
  const std::vector<Tensor> w(weights.begin(), weights.end());
  const Dims s = check_inputs(x_in, heads, w);
  const Tensor x = x_in.contiguous().view({s.B * s.n, s.C});
  const Tensor qkv = at::addmm(w[1], x, w[0].t());
  Tensor probs = at::empty({s.B, s.H, s.n, s.n}, x.options());
  Tensor a = at::empty({s.B * s.n, s.C}, x.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "set_transformer_layer", [&] {
      const scalar_t* qkv_p = qkv.const_data_ptr<scalar_t>();
      scalar_t *probs_p = probs.mutable_data_ptr<scalar_t>(), *a_p = a.mutable_data_ptr<scalar_t>();
      const auto kernels = set_attention_kernels<scalar_t>();
      at::parallel_for(0, s.B * s.H, grain(s), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(attention_scratch_size(s));
        kernels.forward(qkv_p, probs_p, a_p, s, begin, end, scratch.data());
      });
    });
  }
  // the residual sums accumulate their products in place (s = x + b, then s += a W^T): no
  // broadcast copy of the bias into a fresh output and no extra pass for the residual
  Tensor s1 = at::add(x, w[3]).addmm_(a, w[2].t());
  auto [h1, mean1, rstd1] = layer_norm_rows(s1, w[4], w[5], eps);
  Tensor u = at::mm(h1, w[6].t());
  add_bias_relu_(u, w[7]);
  Tensor s2 = at::add(h1, w[9]).addmm_(u, w[8].t());
  auto [out, mean2, rstd2] = layer_norm_rows(s2, w[10], w[11], eps);
  return {out.view({s.B, s.n, s.C}), qkv, probs, a, s1, mean1, rstd1, h1, u, s2, mean2, rstd2};
}

// Gradients of x (B, n, C) and of the 12 weights, in the order of the forward's weights, from
// the gradient of out and the forward's inputs and saved outputs.
std::vector<Tensor> set_transformer_layer_backward_cpu(const Tensor& grad_out, const Tensor& x_in,
                                                       at::TensorList weights, int64_t heads,
                                                       at::TensorList saved) {
  const std::vector<Tensor> w(weights.begin(), weights.end());
  const Dims s = check_inputs(x_in, heads, w);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes() && grad_out.scalar_type() == x_in.scalar_type(),
              "set_transformer_layer_backward: grad_out must have x's shape and dtype");
  TORCH_CHECK(saved.size() == 11, "set_transformer_layer_backward: 11 saved tensors expected");
  const int64_t M = s.B * s.n, F = w[6].size(0);
  const std::vector<std::vector<int64_t>> shapes = {
      {M, 3 * s.C}, {s.B, s.H, s.n, s.n}, {M, s.C}, {M, s.C}, {M, 1}, {M, 1},
      {M, s.C},     {M, F},               {M, s.C}, {M, 1},   {M, 1}};
  std::vector<Tensor> kept;  // contiguous, checked: the attention reads qkv and probs raw
  for (size_t i = 0; i < saved.size(); ++i) {
    TORCH_CHECK(saved[i].sizes() == at::IntArrayRef(shapes[i]) &&
                    saved[i].scalar_type() == x_in.scalar_type(),
                "set_transformer_layer_backward: saved[", i, "] must have shape ",
                at::IntArrayRef(shapes[i]), " and x's dtype, got ", saved[i].sizes());
    kept.push_back(saved[i].contiguous());
  }
  const Tensor &qkv = kept[0], &probs = kept[1], &a = kept[2], &s1 = kept[3];
  const Tensor &mean1 = kept[4], &rstd1 = kept[5], &h1 = kept[6], &u = kept[7];
  const Tensor &s2 = kept[8], &mean2 = kept[9], &rstd2 = kept[10];
  const Tensor x = x_in.contiguous().view({M, s.C});
  const Tensor g = grad_out.contiguous().view({M, s.C});
  // each bias gradient is the column sum of a gradient, taken in the pass that makes it
  auto [g_s2, g_norm2_w, g_norm2_b, g_lin2_b] =
      layer_norm_rows_backward(g, s2, mean2, rstd2, w[10]);
  const Tensor g_lin2_w = g_s2.t().mm(u);
  Tensor g_pre = g_s2.mm(w[8]);
  const Tensor g_lin1_b = mask_by_positive_sum_(g_pre, u);  // the ReLU's backward, in place
  const Tensor g_lin1_w = g_pre.t().mm(h1);
  const Tensor g_h1 = g_s2.addmm_(g_pre, w[6]);  // g_s2 is read no more
  auto [g_s1, g_norm1_w, g_norm1_b, g_out_b] =
      layer_norm_rows_backward(g_h1, s1, mean1, rstd1, w[4]);
  const Tensor g_out_w = g_s1.t().mm(a);
  const Tensor g_a = g_s1.mm(w[2]);
  Tensor g_qkv = at::empty({s.B * s.n, 3 * s.C}, x.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "set_transformer_layer_backward", [&] {
      const scalar_t *g_a_p = g_a.const_data_ptr<scalar_t>(),
                     *qkv_p = qkv.const_data_ptr<scalar_t>(),
                     *probs_p = probs.const_data_ptr<scalar_t>();
      scalar_t* g_qkv_p = g_qkv.mutable_data_ptr<scalar_t>();
      const auto kernels = set_attention_kernels<scalar_t>();
      at::parallel_for(0, s.B * s.H, grain(s), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(attention_scratch_size(s));
        kernels.backward(g_a_p, qkv_p, probs_p, g_qkv_p, s, begin, end, scratch.data());
      });
    });
  }
  const Tensor g_in_w = g_qkv.t().mm(x), g_in_b = column_sums(g_qkv);
  const Tensor g_x = g_s1.addmm_(g_qkv, w[0]).view({s.B, s.n, s.C});  // g_s1 is read no more
  return {g_x,       g_in_w,    g_in_b,   g_out_w,  g_out_b,   g_norm1_w, g_norm1_b,
          g_lin1_w,  g_lin1_b,  g_lin2_w, g_lin2_b, g_norm2_w, g_norm2_b};
}

// One block of the authors' set VAE: out = x + BatchNorm(relu(layer(x))), the batch norm over
// the B n points (module BatchNorm1d with affine weights and running statistics: in training,
// batch statistics, and running_mean and running_var updated in place with `momentum`; in eval,
// the running statistics). The batch norm and its backward are point_batch_norm.h's in
// training, ATen's in eval, as the module calls them.
// Outputs: out (B, n, C), then what the backward reads: r = relu(layer(x)) (B n, C), the batch
// norm's save_mean and save_invstd (C,), and the layer's 11 intermediates.
std::vector<Tensor> set_block_cpu(const Tensor& x, at::TensorList weights, int64_t heads,
                                  double eps, const Tensor& norm_weight, const Tensor& norm_bias,
                                  Tensor& running_mean, Tensor& running_var, bool training,
                                  double momentum, double norm_eps) {
  TORCH_CHECK(x.dim() == 3, "set_block: x must be (B, n, C), got ", x.sizes());
  const int64_t C = x.size(2);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&norm_weight, &norm_bias,
                                                              &running_mean, &running_var})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device(),
                "set_block: the batch norm's weight, bias and running statistics must be (", C,
                ",) tensors of x's dtype and device");
  std::vector<Tensor> layer = set_transformer_layer_cpu(x, weights, heads, eps);
  const Tensor r = layer[0].view({-1, C}).relu();
  auto [normed, save_mean, save_invstd] = point_batch_norm(
      r, norm_weight, norm_bias, running_mean, running_var, training, momentum, norm_eps);
  std::vector<Tensor> out = {normed.view(x.sizes()).add_(x), r, save_mean, save_invstd};
  out.insert(out.end(), layer.begin() + 1, layer.end());
  return out;
}

// Gradients of x, of the layer's 12 weights and of the batch norm's weight and bias, from the
// gradient of out and the forward's inputs and `saved` (its outputs after out).
std::vector<Tensor> set_block_backward_cpu(const Tensor& grad_out, const Tensor& x,
                                           at::TensorList weights, int64_t heads,
                                           const Tensor& norm_weight, const Tensor& running_mean,
                                           const Tensor& running_var, bool training,
                                           double norm_eps, at::TensorList saved) {
  TORCH_CHECK(saved.size() == 14, "set_block_backward: 14 saved tensors expected");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "set_block_backward: grad_out must have x's shape and dtype");
  const int64_t C = x.size(2);
  const Tensor r = saved[0].contiguous();  // read raw by the ReLU's backward
  TORCH_CHECK(r.dim() == 2 && r.size(0) == x.size(0) * x.size(1) && r.size(1) == C &&
                  r.scalar_type() == x.scalar_type(),
              "set_block_backward: saved[0] must be (B n, C) of x's dtype");
  const Tensor g = grad_out.contiguous();
  auto [g_r, g_norm_w, g_norm_b] =
      point_batch_norm_backward(g.view({-1, C}), r, norm_weight, running_mean, running_var,
                                saved[1], saved[2], training, norm_eps);
  mask_by_positive_(g_r, r);  // the ReLU's backward, in place on the fresh gradient
  const Tensor g_layer = g_r.view(x.sizes());
  std::vector<Tensor> grads = set_transformer_layer_backward_cpu(
      g_layer, x, weights, heads, at::TensorList(saved).slice(3));
  grads[0].add_(g);
  grads.push_back(g_norm_w);
  grads.push_back(g_norm_b);
  return grads;
}

// The block with its autograd in C++ (topn_kernels::set_block_autograd): the same forward and
// backward ops, called through the dispatcher (so fake tensors reach their fake kernels), with
// one C++ autograd node instead of a Python autograd.Function, whose forward and backward cost
// about 50 us a call in Python. Inputs: x, then the layer's 12 weights and the batch norm's
// weight and bias (`weights`, 14), then the constants; the backward refuses to record a graph
// (differentiable once).
class SetBlockFunction : public torch::autograd::Function<SetBlockFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        at::TensorList weights, int64_t heads, double eps,
                        const Tensor& running_mean, const Tensor& running_var, bool training,
                        double momentum, double norm_eps) {
    TORCH_CHECK(weights.size() == 14, "set_block_autograd: 14 weights expected");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::set_block", "")
                               .typed<decltype(set_block_cpu)>();
    std::vector<Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      Tensor mean = running_mean, var = running_var;
      outs = op.call(x, weights.slice(0, 12), heads, eps, weights[12], weights[13], mean, var,
                     training, momentum, norm_eps);
    }
    // the running statistics were updated in place without a version bump, as ATen's own batch
    // norm updates them: several training-mode calls of one block may precede their backwards
    std::vector<Tensor> keep = {x, running_mean, running_var};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), outs.begin() + 1, outs.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["training"] = training;
    ctx->saved_data["norm_eps"] = norm_eps;
    return outs[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("set_block_autograd");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::set_block_backward", "")
                               .typed<decltype(set_block_backward_cpu)>();
    const std::vector<Tensor> s = ctx->get_saved_variables();
    const at::TensorList all(s);
    std::vector<Tensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = op.call(grad_outputs[0], s[0], all.slice(3, 12), ctx->saved_data["heads"].toInt(),
                      s[15], s[1], s[2], ctx->saved_data["training"].toBool(),
                      ctx->saved_data["norm_eps"].toDouble(), all.slice(17));
    }
    torch::autograd::variable_list result(grads.begin(), grads.end());  // x, then 14 weights
    result.resize(1 + 14 + 7);  // heads, eps, running_mean, running_var, training, momentum, norm_eps
    return result;
  }
};

Tensor set_block_autograd(const Tensor& x, at::TensorList weights, int64_t heads, double eps,
                          Tensor& running_mean, Tensor& running_var, bool training,
                          double momentum, double norm_eps) {
  return SetBlockFunction::apply(x, weights, heads, eps, running_mean, running_var, training,
                                 momentum, norm_eps);
}

// Below autograd (torch.inference_mode, or tensors that autograd does not see): the forward op.
Tensor set_block_no_autograd(const Tensor& x, at::TensorList weights, int64_t heads, double eps,
                             Tensor& running_mean, Tensor& running_var, bool training,
                             double momentum, double norm_eps) {
  TORCH_CHECK(weights.size() == 14, "set_block_autograd: 14 weights expected");
  return set_block_cpu(x, weights.slice(0, 12), heads, eps, weights[12], weights[13],
                       running_mean, running_var, training, momentum, norm_eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) {
  m.impl("set_block_autograd", &set_block_autograd);
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("set_transformer_layer", &set_transformer_layer_cpu);
  m.impl("set_transformer_layer_backward", &set_transformer_layer_backward_cpu);
  m.impl("set_block", &set_block_cpu);
  m.impl("set_block_backward", &set_block_backward_cpu);
  m.impl("set_block_autograd", &set_block_no_autograd);
}

}  // namespace topn_kernels
