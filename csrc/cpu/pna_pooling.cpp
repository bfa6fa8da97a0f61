// Principal neighbourhood aggregation of the authors' set VAE (topn_kernels/models/authors.py,
// PNAPooling) over equal-size sets on CPU, forward and backward, in one pass per (set, channel)
// instead of a dozen tensor ops. x (B, n, C), n >= 2; scales (3,) in x's dtype; out (B, C, 4, 3)
// flattened to (B, 12 C):
//
//   out[b, c, 0, s] = sum_i x_bic * scales[s]          out[b, c, 1, s] = max_i x_bic * scales[s]
//   out[b, c, 2, s] = mean_i x_bic * scales[s]
//   out[b, c, 3, s] = sqrt(var_bc * scales[s]^2 + 1e-12),  var = sum_i (x_bic - mean)^2 / (n - 1)
//
// (the plain model's reductions, with its two-pass variance). Sums run over i in order, in
// float64 for float32 inputs; the products with the scales, the variance's scaling and the
// root in x's dtype, as the module's tensor ops do. The backward gives the sum's and the mean's
// gradient to every point, the max's in equal parts to the points at the maximum (as amax's
// backward does), and the standard deviation's through the variance,
// d var / d x_i = 2 (x_i - mean) / (n - 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "differentiable_once.h"

namespace topn_kernels {
namespace {

using at::Tensor;

void check(const Tensor& x, const Tensor& scales, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 2, name, ": x must be (B, n, C) with n >= 2, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": x must be float32 or float64");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == 3 && scales.scalar_type() == x.scalar_type(),
              name, ": scales must be (3,) of x's dtype");
}

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;

// mean, max, count of the maximum and unbiased variance of column c of one set
template <typename T>
void column_stats(const T* x, int64_t n, int64_t C, T& sum, T& mean, T& top, int64_t& ties,
                  T& var) {
  Acc<T> total = 0;
  top = x[0];
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i * C];
    total += v;
    top = v > top || std::isnan(v) ? v : top;
  }
  sum = static_cast<T>(total);
  mean = static_cast<T>(total / static_cast<Acc<T>>(n));
  Acc<T> squares = 0;
  ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i * C];
    const T centred = v - mean;
    squares += static_cast<Acc<T>>(centred) * centred;
    ties += v == top;
  }
  var = static_cast<T>(squares / static_cast<Acc<T>>(n - 1));
}

Tensor pna_pool_cpu(const Tensor& x_in, const Tensor& scales_in) {
  check(x_in, scales_in, "pna_pool");
  const Tensor x = x_in.contiguous(), scales = scales_in.contiguous();
  const int64_t B = x.size(0), n = x.size(1), C = x.size(2);
  Tensor out = at::empty({B, 12 * C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pna_pool", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* sp = scales.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        T sum, mean, top, var;
        int64_t ties;
        column_stats(xp + b * n * C + c, n, C, sum, mean, top, ties, var);
        T* o = op + bc * 12;
        for (int s = 0; s < 3; ++s) {
          const T scale = sp[s];
          o[s] = sum * scale;
          o[3 + s] = top * scale;
          o[6 + s] = mean * scale;
          o[9 + s] = std::sqrt(var * (scale * scale) + static_cast<T>(1e-12));
        }
      }
    });
  });
  return out;
}

Tensor pna_pool_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& out_in,
                             const Tensor& scales_in) {
  check(x_in, scales_in, "pna_pool_backward");
  const int64_t B = x_in.size(0), n = x_in.size(1), C = x_in.size(2);
  for (const Tensor* t : {&grad_out_in, &out_in})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == 12 * C &&
                    t->scalar_type() == x_in.scalar_type(),
                "pna_pool_backward: grad_out and out must be (B, 12 C) of x's dtype");
  const Tensor x = x_in.contiguous(), scales = scales_in.contiguous();
  const Tensor g = grad_out_in.contiguous(), out = out_in.contiguous();
  Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pna_pool_backward", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *sp = scales.const_data_ptr<T>();
    const T *gp = g.const_data_ptr<T>(), *op = out.const_data_ptr<T>();
    T* gx = grad_x.mutable_data_ptr<T>();
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const T* gi = gp + bc * 12;
        const T* o = op + bc * 12;
        T g_sum = 0, g_max = 0, g_mean = 0, g_var = 0;
        for (int s = 0; s < 3; ++s) {
          const T scale = sp[s];
          g_sum += gi[s] * scale;
          g_max += gi[3 + s] * scale;
          g_mean += gi[6 + s] * scale;
          g_var += gi[9 + s] * (scale * scale) / (2 * o[9 + s]);
        }
        const T* xc = xp + b * n * C + c;
        T* gc = gx + b * n * C + c;
        T sum, mean, top, var;
        int64_t ties;
        column_stats(xc, n, C, sum, mean, top, ties, var);
        const T to_each = g_sum + g_mean / static_cast<T>(n), to_max = g_max / static_cast<T>(ties);
        const T to_centred = 2 * g_var / static_cast<T>(n - 1);
        for (int64_t i = 0; i < n; ++i) {
          const T v = xc[i * C];
          gc[i * C] = to_each + (v == top ? to_max : T(0)) + to_centred * (v - mean);
        }
      }
    });
  });
  return grad_x;
}

// The pooling with its autograd in C++ (topn_kernels::pna_pool_autograd): the same forward and
// backward ops, called through the dispatcher (fake tensors reach their fake kernels), with one
// C++ autograd node instead of a Python autograd.Function (about 50 us a call forward and
// backward). Gradients reach x (the scalers are constants); differentiable once.
class PnaPoolFunction : public torch::autograd::Function<PnaPoolFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        const Tensor& scales) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::pna_pool", "")
                               .typed<decltype(pna_pool_cpu)>();
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, scales);
    }
    ctx->save_for_backward({x, out, scales});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("pna_pool_autograd");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::pna_pool_backward", "")
                               .typed<decltype(pna_pool_backward_cpu)>();
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return {Tensor(), Tensor()};
    return {op.call(grad_outputs[0], saved[0], saved[1], saved[2]), Tensor()};
  }
};

Tensor pna_pool_autograd(const Tensor& x, const Tensor& scales) {
  return PnaPoolFunction::apply(x, scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) { m.impl("pna_pool_autograd", &pna_pool_autograd); }

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("pna_pool", &pna_pool_cpu);
  m.impl("pna_pool_backward", &pna_pool_backward_cpu);
  m.impl("pna_pool_autograd", &pna_pool_cpu);  // below autograd: the values
}

}  // namespace topn_kernels
