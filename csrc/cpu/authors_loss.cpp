// The point terms of the authors' set VAE loss (topn_kernels/models/authors.py, authors_loss)
// in one op with one autograd node, written in C++ (docs/set_vae.md, "The native transformer
// layer"): for the reconstruction x (B, N, D) of the points y (B, N, D), both of sizes lengths,
//
//   reconstruction = sum_b matched(x_b, y_b)         (matched_sets, matched_distance.cpp)
//   repulsion      = sum_b 2 * repulsion(x_b)        (repulsion_sets, set_losses.cpp)
//   valency        = sum_b valency(x_b)              (valency_sets, set_losses.cpp)
//
// The three kernels return each set's value and its gradient with respect to x; the backward
// scales those by the upstream gradients and adds them. Three autograd nodes in Python, and the
// sums and products between them, become one node. Gradients reach x only (y is data).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "differentiable_once.h"

namespace topn_kernels {
namespace {

using at::Tensor;

// Outputs: the three sums (0-d, x's dtype), then, with_grad, the gradients of the three sums
// with respect to x ((B, N, D) each; (0,) without with_grad).
std::vector<Tensor> authors_point_terms_cpu(const Tensor& x, const Tensor& y,
                                            const Tensor& lengths, double min_dist,
                                            double neighbor_dist, int64_t max_valency,
                                            bool with_grad) {
  static const auto matched = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("topn_kernels::matched_sets", "")
                                  .typed<std::tuple<Tensor, Tensor, Tensor>(
                                      const Tensor&, const Tensor&, const Tensor&, bool)>();
  static const auto repulsion =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("topn_kernels::repulsion_sets", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, double,
                                            bool)>();
  static const auto valency =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("topn_kernels::valency_sets", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, double,
                                            int64_t, bool)>();
  const std::optional<Tensor> sizes(lengths);
  Tensor m_value, m_grad, r_value, r_grad, v_value, v_grad;
  std::tie(m_value, m_grad, std::ignore) = matched.call(x, y, lengths, with_grad);
  std::tie(r_value, r_grad) = repulsion.call(x, sizes, min_dist, with_grad);
  std::tie(v_value, v_grad) = valency.call(x, sizes, neighbor_dist, max_valency, with_grad);
  return {m_value.sum(), r_value.mul(2).sum(), v_value.sum(), m_grad, r_grad.mul_(2), v_grad};
}

class AuthorsPointTerms : public torch::autograd::Function<AuthorsPointTerms> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& x, const Tensor& y,
                                                const Tensor& lengths, double min_dist,
                                                double neighbor_dist, int64_t max_valency,
                                                bool with_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_point_terms", "")
                               .typed<decltype(authors_point_terms_cpu)>();
    std::vector<Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(x, y, lengths, min_dist, neighbor_dist, max_valency, with_grad);
    }
    ctx->save_for_backward({outs[3], outs[4], outs[5]});
    return {outs[0], outs[1], outs[2]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("authors_point_terms_autograd");
    const std::vector<Tensor> grads = ctx->get_saved_variables();
    Tensor grad_x;
    for (size_t i = 0; i < 3; ++i) {
      if (!grad_outputs[i].defined()) continue;
      TORCH_CHECK(grads[i].dim() == 3, "authors_point_terms_autograd: no saved gradient");
      grad_x = grad_x.defined() ? grad_x.add_(grads[i] * grad_outputs[i])
                                : grads[i] * grad_outputs[i];
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> authors_point_terms_autograd(
    const Tensor& x, const Tensor& y, const Tensor& lengths, double min_dist,
    double neighbor_dist, int64_t max_valency) {
  // the kernels' gradients only where a backward can follow (not under no_grad: forward runs
  // with grad mode off, so it is decided here)
  const bool with_grad = x.requires_grad() && at::GradMode::is_enabled();
  auto outs =
      AuthorsPointTerms::apply(x, y, lengths, min_dist, neighbor_dist, max_valency, with_grad);
  return {outs[0], outs[1], outs[2]};
}

// Below autograd (torch.inference_mode, or tensors that autograd does not see): the values.
std::tuple<Tensor, Tensor, Tensor> authors_point_terms_no_autograd(
    const Tensor& x, const Tensor& y, const Tensor& lengths, double min_dist,
    double neighbor_dist, int64_t max_valency) {
  auto outs = authors_point_terms_cpu(x, y, lengths, min_dist, neighbor_dist, max_valency, false);
  return {outs[0], outs[1], outs[2]};
}

// The loss's KL term and weighted total, after the point terms: with mu and log_var (B, L),
//
//   kl    = -0.5 * sum (1 + log_var - mu^2 - exp(log_var))     (summed in float64, then rounded)
//   total = ((rec + kl_w * kl) + rep_w * rep) + val_w * val      (in the dtype, in this order)
//
// as authors_loss writes them, in one op with one autograd node instead of about a dozen small
// ops and nodes. Backward, with g = grad_kl + kl_w * grad_total: grad_mu = g * mu,
// grad_log_var = g * 0.5 * (exp(log_var) - 1), and grad_total times 1, rep_w and val_w for rec,
// rep and val.
template <typename T>
T kl_sum(const T* mu, const T* log_var, int64_t count) {
  double acc = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double m = mu[i], v = log_var[i];
    acc += (1.0 + v) - m * m - std::exp(v);
  }
  return static_cast<T>(-0.5 * acc);
}

std::vector<Tensor> authors_kl_total_cpu(const Tensor& mu, const Tensor& log_var,
                                         const Tensor& rec, const Tensor& rep, const Tensor& val,
                                         double kl_weight, double repulsion_weight,
                                         double valency_weight) {
  TORCH_CHECK(mu.sizes() == log_var.sizes() && mu.scalar_type() == log_var.scalar_type() &&
                  (mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kDouble),
              "authors_kl_total: mu and log_var must be float32 or float64 tensors of one shape");
  for (const Tensor* t : {&rec, &rep, &val})
    TORCH_CHECK(t->dim() == 0 && t->scalar_type() == mu.scalar_type(),
                "authors_kl_total: rec, rep and val must be 0-d tensors of mu's dtype");
  const Tensor m = mu.contiguous(), v = log_var.contiguous();
  Tensor kl = at::empty({}, mu.options()), total = at::empty({}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "authors_kl_total", [&] {
    using T = scalar_t;
    const T k = kl_sum(m.const_data_ptr<T>(), v.const_data_ptr<T>(), m.numel());
    T t = rec.item<T>() + static_cast<T>(kl_weight) * k;
    t = t + static_cast<T>(repulsion_weight) * rep.item<T>();
    t = t + static_cast<T>(valency_weight) * val.item<T>();
    *kl.mutable_data_ptr<T>() = k;
    *total.mutable_data_ptr<T>() = t;
  });
  return {total, kl};
}

class AuthorsKlTotal : public torch::autograd::Function<AuthorsKlTotal> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& mu, const Tensor& log_var,
                                                const Tensor& rec, const Tensor& rep,
                                                const Tensor& val, double kl_weight,
                                                double repulsion_weight, double valency_weight) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_kl_total", "")
                               .typed<decltype(authors_kl_total_cpu)>();
    std::vector<Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(mu, log_var, rec, rep, val, kl_weight, repulsion_weight, valency_weight);
    }
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    ctx->save_for_backward({mu, log_var});
    ctx->saved_data["weights"] = std::vector<double>{kl_weight, repulsion_weight, valency_weight};
    return {outs[0], outs[1]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("authors_kl_total_autograd");
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    const std::vector<double> w = ctx->saved_data["weights"].toDoubleVector();
    const Tensor &g_total = grad_outputs[0], &g_kl = grad_outputs[1];  // undefined: unused
    const Tensor m = saved[0].contiguous(), v = saved[1].contiguous();
    Tensor g_mu = at::empty(saved[0].sizes(), m.options()), g_lv = at::empty_like(g_mu);
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "authors_kl_total_backward", [&] {
      using T = scalar_t;
      const T gt = g_total.defined() ? g_total.item<T>() : T(0);
      const T g = (g_kl.defined() ? g_kl.item<T>() : T(0)) + static_cast<T>(w[0]) * gt;
      const T *mp = m.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
      T *gm = g_mu.mutable_data_ptr<T>(), *gv = g_lv.mutable_data_ptr<T>();
      for (int64_t i = 0; i < m.numel(); ++i) {
        gm[i] = g * mp[i];
        gv[i] = g * (T(0.5) * (std::exp(vp[i]) - T(1)));
      }
    });
    torch::autograd::variable_list grads = {g_mu, g_lv, Tensor(), Tensor(), Tensor(),
                                            Tensor(), Tensor(), Tensor()};
    if (g_total.defined()) {  // the total's products by the weights, as `weight * term` gives
      grads[2] = g_total.clone();
      grads[3] = g_total * w[1];
      grads[4] = g_total * w[2];
    }
    return grads;
  }
};

std::tuple<Tensor, Tensor> authors_kl_total_autograd(const Tensor& mu, const Tensor& log_var,
                                                     const Tensor& rec, const Tensor& rep,
                                                     const Tensor& val, double kl_weight,
                                                     double repulsion_weight,
                                                     double valency_weight) {
  auto outs = AuthorsKlTotal::apply(mu, log_var, rec, rep, val, kl_weight, repulsion_weight,
                                    valency_weight);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> authors_kl_total_no_autograd(const Tensor& mu, const Tensor& log_var,
                                                        const Tensor& rec, const Tensor& rep,
                                                        const Tensor& val, double kl_weight,
                                                        double repulsion_weight,
                                                        double valency_weight) {
  auto outs = authors_kl_total_cpu(mu, log_var, rec, rep, val, kl_weight, repulsion_weight,
                                   valency_weight);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) {
  m.impl("authors_point_terms_autograd", &authors_point_terms_autograd);
  m.impl("authors_kl_total_autograd", &authors_kl_total_autograd);
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("authors_point_terms", &authors_point_terms_cpu);
  m.impl("authors_point_terms_autograd", &authors_point_terms_no_autograd);
  m.impl("authors_kl_total", &authors_kl_total_cpu);
  m.impl("authors_kl_total_autograd", &authors_kl_total_no_autograd);
}

}  // namespace topn_kernels
