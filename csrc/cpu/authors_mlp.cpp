// The released code's two-map MLP of the authors' set VAE (topn_kernels/models/authors.py,
// AuthorsMLP with layers <= 2), optionally followed by a ReLU and a batch norm over the points,
// forward and backward, on CPU (docs/set_vae.md, "The native transformer layer"):
//
//   a   = x W1^T + b1                                  (M = B n rows, width W)
//   h0  = a                        modulation 0
//         a + (y W2^T + b2)        modulation 1 ("+")
//         a * s + t,  s = sigmoid(y W2^T + b2), t = y W3^T + b3      modulation 2 ("film")
//   r   = relu(h0),  h = r (+ x where residual_start),  p = relu(h) where residual_start, else r
//   out = p Wf^T + bf (+ h where residual_end)
//   and with a norm: BatchNorm(relu(out)) over the M rows (running statistics updated in
//   training, as ATen's batch norm updates them).
//
// x is (B, n, Din); y is (B, ny, K) with ny = n (one row per point) or 1 (one row per set, added
// to every point of its set). The products are ATen's, each step in the module's order, so that
// the values are the module's up to the products' rounding; one call and one autograd node
// (written in C++) replace the module's dozen calls and nodes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "differentiable_once.h"
#include "inplace_activation.h"
#include "point_batch_norm.h"

namespace topn_kernels {
namespace {

using at::Tensor;

struct MlpDims {
  int64_t B, n, ny, din, k, width, dout;
};

// The tensors of `inputs`, in order: x, y (modulation > 0), W1, b1, then W2, b2 (modulation >
// 0), W3, b3 (modulation 2), Wf, bf, then the norm's weight and bias (with a norm).
struct MlpInputs {
  Tensor x, y, w1, b1, w2, b2, w3, b3, wf, bf, norm_weight, norm_bias;
};

MlpInputs unpack(at::TensorList inputs, int64_t modulation, bool norm) {
  TORCH_CHECK(modulation >= 0 && modulation <= 2, "authors_mlp: modulation must be 0, 1 or 2");
  const size_t expected = 5 + (modulation > 0 ? 3 : 0) + (modulation == 2 ? 2 : 0) + (norm ? 2 : 0);
  TORCH_CHECK(inputs.size() == expected, "authors_mlp: ", expected, " tensors expected, got ",
              inputs.size());
  MlpInputs t;
  size_t i = 0;
  t.x = inputs[i++];
  if (modulation > 0) t.y = inputs[i++];
  t.w1 = inputs[i++];
  t.b1 = inputs[i++];
  if (modulation > 0) t.w2 = inputs[i++], t.b2 = inputs[i++];
  if (modulation == 2) t.w3 = inputs[i++], t.b3 = inputs[i++];
  t.wf = inputs[i++];
  t.bf = inputs[i++];
  if (norm) t.norm_weight = inputs[i++], t.norm_bias = inputs[i++];
  return t;
}

void check_tensor(const Tensor& t, std::vector<int64_t> shape, const char* name, const Tensor& x) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "authors_mlp: ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "authors_mlp: ",
              name, " must have x's dtype and device");
}

MlpDims check(const MlpInputs& t, int64_t modulation, bool residual_start, bool residual_end,
              at::TensorList running) {
  const Tensor& x = t.x;
  TORCH_CHECK(x.dim() == 3, "authors_mlp: x must be (B, n, Din), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "authors_mlp: x must be float32 or float64");
  TORCH_CHECK(t.w1.dim() == 2 && t.wf.dim() == 2, "authors_mlp: W1 and Wf must be matrices");
  MlpDims d{x.size(0), x.size(1), 1, x.size(2), 0, t.w1.size(0), t.wf.size(0)};
  check_tensor(t.w1, {d.width, d.din}, "W1", x);
  check_tensor(t.b1, {d.width}, "b1", x);
  check_tensor(t.wf, {d.dout, d.width}, "Wf", x);
  check_tensor(t.bf, {d.dout}, "bf", x);
  if (modulation > 0) {
    TORCH_CHECK(t.y.dim() == 3 && t.y.size(0) == d.B && (t.y.size(1) == d.n || t.y.size(1) == 1),
                "authors_mlp: y must be (B, n, K) or (B, 1, K) for x ", x.sizes(), ", got ",
                t.y.sizes());
    TORCH_CHECK(t.y.scalar_type() == x.scalar_type() && t.y.device() == x.device(),
                "authors_mlp: y must have x's dtype and device");
    d.ny = t.y.size(1);
    d.k = t.y.size(2);
    check_tensor(t.w2, {d.width, d.k}, "W2", x);
    check_tensor(t.b2, {d.width}, "b2", x);
    if (modulation == 2) {
      check_tensor(t.w3, {d.width, d.k}, "W3", x);
      check_tensor(t.b3, {d.width}, "b3", x);
    }
  }
  TORCH_CHECK(!residual_start || d.din == d.width,
              "authors_mlp: residual_start needs Din == the width");
  TORCH_CHECK(!residual_end || d.dout == d.width,
              "authors_mlp: residual_end needs Dout == the width");
  TORCH_CHECK(running.empty() || running.size() == 2,
              "authors_mlp: running must be [] or [running_mean, running_var]");
  if (t.norm_weight.defined()) {
    TORCH_CHECK(running.size() == 2, "authors_mlp: a norm needs its running statistics");
    for (const Tensor* s : {&t.norm_weight, &t.norm_bias, &running[0], &running[1]})
      check_tensor(*s, {d.dout}, "the norm's weight, bias and running statistics", x);
  }
  return d;
}

// (B ny, W) broadcast over the n points of each set of v (B n, W): the per-set sum of v's rows
// where ny == 1, v itself where ny == n.
Tensor reduce_to_cond_rows(const Tensor& v, const MlpDims& d) {
  return d.ny == d.n ? v : v.view({d.B, d.n, d.width}).sum(1);
}

// Broadcast multiply/add views: (B, ny, W) against (B, n, W).
Tensor per_set(const Tensor& c, const MlpDims& d) { return c.view({d.B, d.ny, d.width}); }

// Outputs: out (B, n, Dout), then what the backward reads: r (M, W), p (M, W, or (0,) when
// p is r), a and s (M, W and B ny, W; (0,) unless film), o = relu(out) (M, Dout, or (0,)
// without a norm), the norm's save_mean and save_invstd ((0,) without a norm).
std::vector<Tensor> authors_mlp_cpu(at::TensorList inputs, int64_t modulation,
                                    bool residual_start, bool residual_end,
                                    at::TensorList running, bool training, double momentum,
                                    double norm_eps) {
  const bool norm = !running.empty();
  const MlpInputs t = unpack(inputs, modulation, norm);
  const MlpDims d = check(t, modulation, residual_start, residual_end, running);
  const int64_t M = d.B * d.n;
  const Tensor x = t.x.contiguous().view({M, d.din});
  Tensor h0 = at::addmm(t.b1, x, t.w1.t());
  const auto none = [&] { return at::empty({0}, x.options()); };  // one each: no aliases
  Tensor a = none(), s = none();
  if (modulation > 0) {
    const Tensor y = t.y.contiguous().view({d.B * d.ny, d.k});
    Tensor c = at::addmm(t.b2, y, t.w2.t());
    if (modulation == 1) {
      h0.view({d.B, d.n, d.width}).add_(per_set(c, d));
    } else {
      a = h0;
      s = c.sigmoid_();
      const Tensor shift = at::addmm(t.b3, y, t.w3.t());
      h0 = at::mul(a.view({d.B, d.n, d.width}), per_set(s, d))
               .add_(per_set(shift, d))
               .view({M, d.width});
    }
  }
  const Tensor r = h0.relu_();
  const Tensor h = residual_start ? at::add(r, x) : r;
  const Tensor p = residual_start ? h.relu() : r;
  Tensor out = at::addmm(t.bf, p, t.wf.t());
  if (residual_end) out.add_(h);
  Tensor o = none(), save_mean = none(), save_invstd = none();
  if (norm) {
    o = out.relu_();
    Tensor mean = running[0], var = running[1];
    std::tie(out, save_mean, save_invstd) = point_batch_norm(
        o, t.norm_weight, t.norm_bias, mean, var, training, momentum, norm_eps);
  }
  return {out.view({d.B, d.n, d.dout}), r, residual_start ? p : none(), a, s, o, save_mean,
          save_invstd};
}

// The gradients of `inputs`' tensors, in their order (empty, (0,), for x or y where not asked
// for), from the gradient of out, the forward's inputs and `saved` (its outputs after out).
std::vector<Tensor> authors_mlp_backward_cpu(const Tensor& grad_out, at::TensorList inputs,
                                             int64_t modulation, bool residual_start,
                                             bool residual_end, at::TensorList running,
                                             bool training, double norm_eps,
                                             at::TensorList saved, bool x_grad, bool y_grad) {
  const bool norm = !running.empty();
  const MlpInputs t = unpack(inputs, modulation, norm);
  const MlpDims d = check(t, modulation, residual_start, residual_end, running);
  const int64_t M = d.B * d.n;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({d.B, d.n, d.dout}) &&
                  grad_out.scalar_type() == t.x.scalar_type(),
              "authors_mlp_backward: grad_out must be (B, n, Dout) of x's dtype");
  TORCH_CHECK(saved.size() == 7, "authors_mlp_backward: 7 saved tensors expected");
  const std::vector<std::vector<int64_t>> shapes = {
      {M, d.width},
      {residual_start ? M : 0, d.width},
      {modulation == 2 ? M : 0, d.width},
      {modulation == 2 ? d.B * d.ny : 0, d.width},
      {norm ? M : 0, d.dout},
      {norm && training ? d.dout : 0},
      {norm && training ? d.dout : 0}};
  std::vector<Tensor> kept;  // contiguous, checked: the in-place masks read them raw
  for (size_t i = 0; i < saved.size(); ++i) {
    const bool empty = shapes[i][0] == 0;
    TORCH_CHECK(empty ? saved[i].numel() == 0
                      : saved[i].sizes() == at::IntArrayRef(shapes[i]) &&
                            saved[i].scalar_type() == t.x.scalar_type(),
                "authors_mlp_backward: saved[", i, "] must have shape ",
                at::IntArrayRef(shapes[i]), " and x's dtype, got ", saved[i].sizes());
    kept.push_back(empty ? saved[i] : saved[i].contiguous());
  }
  const Tensor &r = kept[0], &o = kept[4];
  const Tensor& p = residual_start ? kept[1] : r;
  const Tensor x = t.x.contiguous().view({M, d.din});
  Tensor g = grad_out.contiguous().view({M, d.dout});
  Tensor g_norm_w, g_norm_b;
  if (norm) {
    std::tie(g, g_norm_w, g_norm_b) =
        point_batch_norm_backward(g, o, t.norm_weight, running[0], running[1], kept[5], kept[6],
                                  training, norm_eps);
    mask_by_positive_(g, o);  // the ReLU before the norm
  }
  const Tensor g_wf = g.t().mm(p), g_bf = g.sum(0);
  Tensor g_h = g.mm(t.wf);  // the gradient of p, then of h
  if (residual_start) mask_by_positive_(g_h, p);  // p = relu(h)
  if (residual_end) g_h.add_(g);
  // the gradient of h0: h's, through the ReLU (a copy where h's also reaches x)
  Tensor g_h0 = residual_start && x_grad ? g_h.clone() : g_h;
  mask_by_positive_(g_h0, r);
  Tensor g_a = g_h0, g_y, g_w2, g_b2, g_w3, g_b3;
  if (modulation > 0) {
    const Tensor y = t.y.contiguous().view({d.B * d.ny, d.k});
    Tensor g_c;
    if (modulation == 1) {
      g_c = reduce_to_cond_rows(g_h0, d);
    } else {
      const Tensor& a = kept[2];
      const Tensor& s = kept[3];
      const Tensor g_shift = reduce_to_cond_rows(g_h0, d);
      const Tensor g_s = reduce_to_cond_rows(at::mul(g_h0, a), d);
      g_c = at::sigmoid_backward(g_s, s);
      g_a = at::mul(g_h0.view({d.B, d.n, d.width}), per_set(s, d)).view({M, d.width});
      g_w3 = g_shift.t().mm(y);
      g_b3 = g_shift.sum(0);
      if (y_grad) g_y = g_shift.mm(t.w3);
    }
    g_w2 = g_c.t().mm(y);
    g_b2 = g_c.sum(0);
    if (y_grad) g_y = g_y.defined() ? g_y.addmm_(g_c, t.w2) : g_c.mm(t.w2);
    if (g_y.defined()) g_y = g_y.view({d.B, d.ny, d.k});
  }
  const Tensor g_w1 = g_a.t().mm(x), g_b1 = g_a.sum(0);
  Tensor g_x;
  if (x_grad) {
    g_x = residual_start ? g_h.addmm_(g_a, t.w1) : g_a.mm(t.w1);
    g_x = g_x.view({d.B, d.n, d.din});
  }
  std::vector<Tensor> grads = {g_x.defined() ? g_x : at::empty({0}, x.options())};
  if (modulation > 0) grads.push_back(g_y.defined() ? g_y : at::empty({0}, x.options()));
  grads.push_back(g_w1);
  grads.push_back(g_b1);
  if (modulation > 0) grads.push_back(g_w2), grads.push_back(g_b2);
  if (modulation == 2) grads.push_back(g_w3), grads.push_back(g_b3);
  grads.push_back(g_wf);
  grads.push_back(g_bf);
  if (norm) grads.push_back(g_norm_w), grads.push_back(g_norm_b);
  return grads;
}

// The MLP with its autograd in C++ (topn_kernels::authors_mlp_autograd): one node, which calls
// the forward and backward ops through the dispatcher; differentiable once.
class AuthorsMlpFunction : public torch::autograd::Function<AuthorsMlpFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                        int64_t modulation, bool residual_start, bool residual_end,
                        at::TensorList running, bool training, double momentum,
                        double norm_eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_mlp", "")
                               .typed<decltype(authors_mlp_cpu)>();
    std::vector<Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(inputs, modulation, residual_start, residual_end, running, training,
                     momentum, norm_eps);
    }
    std::vector<Tensor> keep(inputs.begin(), inputs.end());
    keep.insert(keep.end(), running.begin(), running.end());
    keep.insert(keep.end(), outs.begin() + 1, outs.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["counts"] = std::vector<int64_t>{static_cast<int64_t>(inputs.size()),
                                                     static_cast<int64_t>(running.size())};
    ctx->saved_data["modulation"] = modulation;
    ctx->saved_data["residual_start"] = residual_start;
    ctx->saved_data["residual_end"] = residual_end;
    ctx->saved_data["training"] = training;
    ctx->saved_data["norm_eps"] = norm_eps;
    return outs[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("authors_mlp_autograd");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_mlp_backward", "")
                               .typed<decltype(authors_mlp_backward_cpu)>();
    const std::vector<Tensor> s = ctx->get_saved_variables();
    const at::TensorList all(s);
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const int64_t modulation = ctx->saved_data["modulation"].toInt();
    std::vector<Tensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = op.call(grad_outputs[0], all.slice(0, counts[0]), modulation,
                      ctx->saved_data["residual_start"].toBool(),
                      ctx->saved_data["residual_end"].toBool(), all.slice(counts[0], counts[1]),
                      ctx->saved_data["training"].toBool(),
                      ctx->saved_data["norm_eps"].toDouble(), all.slice(counts[0] + counts[1]),
                      ctx->needs_input_grad(0), modulation > 0 && ctx->needs_input_grad(1));
    }
    torch::autograd::variable_list result(grads.begin(), grads.end());
    if (!ctx->needs_input_grad(0)) result[0] = Tensor();
    if (modulation > 0 && !ctx->needs_input_grad(1)) result[1] = Tensor();
    // modulation, residual_start, residual_end, the running statistics, training, momentum,
    // norm_eps
    result.resize(result.size() + 3 + counts[1] + 3);
    return result;
  }
};

Tensor authors_mlp_autograd(at::TensorList inputs, int64_t modulation, bool residual_start,
                            bool residual_end, at::TensorList running, bool training,
                            double momentum, double norm_eps) {
  return AuthorsMlpFunction::apply(inputs, modulation, residual_start, residual_end, running,
                                   training, momentum, norm_eps);
}

// Below autograd (torch.inference_mode, or tensors that autograd does not see): the forward op.
Tensor authors_mlp_no_autograd(at::TensorList inputs, int64_t modulation, bool residual_start,
                               bool residual_end, at::TensorList running, bool training,
                               double momentum, double norm_eps) {
  return authors_mlp_cpu(inputs, modulation, residual_start, residual_end, running, training,
                         momentum, norm_eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) {
  m.impl("authors_mlp_autograd", &authors_mlp_autograd);
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("authors_mlp", &authors_mlp_cpu);
  m.impl("authors_mlp_backward", &authors_mlp_backward_cpu);
  m.impl("authors_mlp_autograd", &authors_mlp_no_autograd);
}

}  // namespace topn_kernels
