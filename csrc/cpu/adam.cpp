// Adam's update of many parameter tensors in one call, on CPU: the step of the training
// programs' optimizer (topn_kernels/models/fused_adam.py, which keeps one AdamState per
// parameter group). PyTorch's fused Adam kernel runs once per tensor (its Python binding
// unpacks five lists, then each tensor's step is read and its elements split between the
// threads): for the set VAE's 120 small tensors about three times its arithmetic. An AdamState
// holds the parameters and their states once; a step reads the gradients from the parameters,
// computes every tensor's constants, then splits all the elements of all the tensors between
// the threads as one range, each element updated by the loop of adam.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "adam.h"
#include "avx2_build.h"
#include "sum_of_squares.h"

namespace topn_kernels {

template <typename T>
AdamKernels<T> adam_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_avx2_builds()) return {&adam_avx2::run<T>};
#endif
  return {&adam_default::run<T>};
}

template AdamKernels<float> adam_kernels<float>();
template AdamKernels<double> adam_kernels<double>();

namespace {

using at::Tensor;

constexpr int64_t kGrain = 16384;  // elements: below this a step stays on one thread

bool dense_like(const Tensor& t, const Tensor& param) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() &&
         t.scalar_type() == param.scalar_type() && t.is_contiguous() &&
         t.numel() == param.numel();
}

bool step_counter(const Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.numel() == 1 &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

void bump(Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

double read(const Tensor& step) {
  return step.scalar_type() == at::kFloat ? static_cast<double>(*step.const_data_ptr<float>())
                                          : *step.const_data_ptr<double>();
}

void increment(Tensor& step) {  // as step.add_(1) in the step's dtype
  if (step.scalar_type() == at::kFloat)
    *step.mutable_data_ptr<float>() += 1.0f;
  else
    *step.mutable_data_ptr<double>() += 1.0;
}

// The parameters of one parameter group and their Adam states: parameter i's first and second
// moments exp_avgs[i], exp_avg_sqs[i] and its step count steps[i] (one element, float32 or
// float64), the tensors of the optimizer's state (updated in place; the object keeps
// references, so a state replaced in the optimizer needs a new AdamState).
struct AdamState : torch::CustomClassHolder {
  std::vector<Tensor> params, exp_avgs, exp_avg_sqs, steps;

  AdamState(std::vector<Tensor> params_, std::vector<Tensor> exp_avgs_,
            std::vector<Tensor> exp_avg_sqs_, std::vector<Tensor> steps_)
      : params(std::move(params_)),
        exp_avgs(std::move(exp_avgs_)),
        exp_avg_sqs(std::move(exp_avg_sqs_)),
        steps(std::move(steps_)) {
    const size_t count = params.size();
    TORCH_CHECK(exp_avgs.size() == count && exp_avg_sqs.size() == count && steps.size() == count,
                "AdamState: params, exp_avgs, exp_avg_sqs and steps must have one entry per "
                "parameter");
  }

  // Whether step() can update every parameter now: each one a contiguous float32 or float64
  // CPU tensor of the first one's dtype, with a dense gradient and states of its dtype and
  // size, and grad_scale (if given) a one-element float32 CPU tensor. Read at every step: the
  // gradients are new tensors at every step, and a parameter's data may be replaced.
  bool ready(const std::optional<Tensor>& grad_scale) const {
    if (grad_scale.has_value() && !(grad_scale->defined() && grad_scale->device().is_cpu() &&
                                    grad_scale->layout() == at::kStrided &&
                                    grad_scale->scalar_type() == at::kFloat &&
                                    grad_scale->numel() == 1))
      return false;
    if (params.empty()) return true;
    const auto dtype = params[0].scalar_type();
    if (dtype != at::kFloat && dtype != at::kDouble) return false;
    for (size_t i = 0; i < params.size(); ++i) {
      const Tensor& p = params[i];
      if (!(p.defined() && p.scalar_type() == dtype && p.layout() == at::kStrided &&
            p.device().is_cpu() && p.is_contiguous() && dense_like(p.grad(), p) &&
            dense_like(exp_avgs[i], p) && dense_like(exp_avg_sqs[i], p) &&
            step_counter(steps[i])))
        return false;
    }
    return true;
  }

  // Adds 1 to every step count and updates every parameter and its moments (adam.h), each
  // gradient divided by grad_scale first (and stored so) where one is given; PyTorch's fused
  // Adam without amsgrad. Returns false, changing nothing, where ready() is false.
  bool step(double lr, double beta1, double beta2, double weight_decay, double eps,
            bool maximize, std::optional<Tensor> grad_scale) {
    if (!ready(grad_scale)) return false;
    update(lr, beta1, beta2, weight_decay, eps, maximize, grad_scale);
    return true;
  }

  // The gradient-norm clipping of train_step (clip_grad_norm_'s factor) folded into the step:
  // the 2-norm of all the gradients (total_norm.cpp's sums in its order: the same bits), then
  // the grad_scale max((norm + 1e-6) / max_norm, 1) made by the tensor ops train_step uses,
  // then step() with it. For float32 parameters (the fused kernels' scale is float32); returns
  // false, changing nothing, where ready() is false or the parameters are not float32.
  bool step_clipped(double lr, double beta1, double beta2, double weight_decay, double eps,
                    bool maximize, double max_norm) {
    if (params.empty() || params[0].scalar_type() != at::kFloat || !ready(std::nullopt))
      return false;
    const int64_t count = static_cast<int64_t>(params.size());
    std::vector<const float*> grads(count);
    std::vector<int64_t> sizes(count);
    for (int64_t i = 0; i < count; ++i) {
      grads[i] = params[i].grad().const_data_ptr<float>();
      sizes[i] = params[i].numel();
    }
    const Tensor norm = at::scalar_tensor(norm_of_all(grads, sizes), params[0].options());
    const Tensor scale = at::clamp(at::div(at::add(norm, 1e-6), max_norm), 1.0, std::nullopt);
    update(lr, beta1, beta2, weight_decay, eps, maximize, scale);
    return true;
  }

 private:
  // step() once ready() holds.
  void update(double lr, double beta1, double beta2, double weight_decay, double eps,
              bool maximize, const std::optional<Tensor>& grad_scale) {
    const size_t count = params.size();
    if (count == 0) return;
    std::vector<int64_t> offsets(count + 1, 0);
    for (size_t i = 0; i < count; ++i) offsets[i + 1] = offsets[i] + params[i].numel();
    const float* scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "AdamState.step", [&] {
      using T = scalar_t;
      const T scale_value = scale == nullptr ? T(1) : static_cast<T>(*scale);
      std::vector<AdamConstants<T>> constants(count);
      std::vector<T*> p(count), g(count), m(count), v(count);
      for (size_t i = 0; i < count; ++i) {
        increment(steps[i]);
        // as PyTorch's fused Adam: the step as an integer, the corrections in double
        const double t = static_cast<double>(static_cast<int64_t>(read(steps[i])));
        const double bias1 = 1 - std::pow(beta1, t), bias2 = 1 - std::pow(beta2, t);
        constants[i] = {T(beta1),     T(1 - beta1),        T(beta2),        T(1 - beta2),
                        T(lr / bias1), T(std::sqrt(bias2)), T(eps),          T(weight_decay),
                        maximize,     scale == nullptr ? nullptr : &scale_value};
        p[i] = params[i].mutable_data_ptr<T>();
        g[i] = params[i].grad().mutable_data_ptr<T>();
        m[i] = exp_avgs[i].mutable_data_ptr<T>();
        v[i] = exp_avg_sqs[i].mutable_data_ptr<T>();
      }
      // in place, as an in-place op would be: a graph that saved one of these tensors and is
      // run again after the step raises autograd's error instead of using the new values
      for (size_t i = 0; i < count; ++i) {
        Tensor grad = params[i].grad();
        for (Tensor* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i], &steps[i]}) bump(*t);
        if (scale != nullptr && *scale != 1.0f) bump(grad);
      }
      const auto kernels = adam_kernels<T>();
      at::parallel_for(0, offsets[count], kGrain, [&](int64_t begin, int64_t end) {
        size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
        for (int64_t at = begin; at < end; ++i) {
          const int64_t from = at - offsets[i], to = std::min(end, offsets[i + 1]) - offsets[i];
          kernels.run(p[i] + from, g[i] + from, m[i] + from, v[i] + from, to - from,
                      constants[i]);
          at = offsets[i] + to;
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(topn_kernels, m) {
  m.class_<AdamState>("AdamState")
      .def(torch::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>>())
      .def("ready", &AdamState::ready)
      .def("step", &AdamState::step)
      .def("step_clipped", &AdamState::step_clipped);
}

}  // namespace topn_kernels
