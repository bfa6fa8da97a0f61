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

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) {
  m.impl("authors_point_terms_autograd", &authors_point_terms_autograd);
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("authors_point_terms", &authors_point_terms_cpu);
  m.impl("authors_point_terms_autograd", &authors_point_terms_no_autograd);
}

}  // namespace topn_kernels
