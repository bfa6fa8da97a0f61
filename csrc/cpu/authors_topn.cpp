// The Top-n creation of the authors' set VAE after its angle MLP (topn_kernels/models/authors.py,
// TopN), for sets of one size n, on CPU, in one op with one C++ autograd node instead of a dozen
// tensor ops and their nodes. With q (B, a) the angle MLP's output, angles (R, a), points (R, d)
// and the FiLM maps gamma and beta (Linear(1, d): weights (d, 1), biases (d,)), per set b:
//
//   qn = q_b / (|q_b| + 1e-5),   s_r = qn . angles_r,   p = softmax(s) over the R points,
//   sigma = the n largest p_r, in decreasing order (equal values by increasing r),
//   m_j = n p_{sigma_j},   x_bjc = (gamma_w_c m_j + gamma_b_c) points_{sigma_j c}
//                                   + (beta_w_c m_j + beta_b_c).
//
// The backward gives the gradients of q, angles, points and the four FiLM tensors: through the
// FiLM maps to m and the points, m to the selected probabilities (n dp), the softmax
// (ds_r = p_r (dp_r - sum_r' p_r' dp_r')), the scores to qn and the angles, and qn to q
// (dq = dqn / D - q (dqn . q) / (D^2 |q|), D = |q| + 1e-5, the second term 0 where q = 0, as
// the norm's backward). Sums in float64, each value rounded to the inputs' dtype where the
// module's ops round it (qn, the scores, p, m, the FiLM terms), so the ranking is the module's
// up to rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "differentiable_once.h"

namespace topn_kernels {
namespace {

using at::Tensor;

struct TopnDims {
  int64_t B, a, R, d, n;
};

// weights: angles (R, a), points (R, d), gamma_w (d, 1), gamma_b (d,), beta_w (d, 1), beta_b (d,)
TopnDims check(const Tensor& q, at::TensorList w, int64_t n, const char* name) {
  TORCH_CHECK(q.dim() == 2, name, ": q must be (B, a), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, name,
              ": q must be float32 or float64");
  TORCH_CHECK(w.size() == 6, name, ": 6 weights expected");
  TORCH_CHECK(w[0].dim() == 2, name, ": angles must be (R, a), got ", w[0].sizes());
  const int64_t B = q.size(0), a = q.size(1), R = w[0].size(0), d = w[1].dim() == 2 ? w[1].size(1) : -1;
  const std::vector<std::vector<int64_t>> shapes = {{R, a}, {R, d}, {d, 1}, {d}, {d, 1}, {d}};
  const char* names[] = {"angles", "points", "gamma_w", "gamma_b", "beta_w", "beta_b"};
  for (size_t i = 0; i < 6; ++i)
    TORCH_CHECK(w[i].sizes() == at::IntArrayRef(shapes[i]) &&
                    w[i].scalar_type() == q.scalar_type() && w[i].device() == q.device(),
                name, ": ", names[i], " must be ", at::IntArrayRef(shapes[i]),
                " of q's dtype and device, got ", w[i].sizes());
  TORCH_CHECK(n >= 1 && n <= R, name, ": n must be in [1, R=", R, "], got ", n);
  return {B, a, R, d, n};
}

// Outputs: x (B, n, d), then what the backward reads: qn (B, a), denom (B,) = |q| + 1e-5,
// probs (B, R), index (B, n) int64, m (B, n).
std::vector<Tensor> authors_topn_cpu(const Tensor& q_in, at::TensorList weights, int64_t n) {
  const TopnDims s = check(q_in, weights, n, "authors_topn");
  const Tensor q = q_in.contiguous();
  std::vector<Tensor> w;
  for (const Tensor& t : weights) w.push_back(t.contiguous());
  const auto opts = q.options();
  Tensor x = at::empty({s.B, n, s.d}, opts), qn = at::empty({s.B, s.a}, opts),
         denom = at::empty({s.B}, opts), probs = at::empty({s.B, s.R}, opts),
         index = at::empty({s.B, n}, opts.dtype(at::kLong)), m = at::empty({s.B, n}, opts);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "authors_topn", [&] {
    using T = scalar_t;
    const T *qp = q.const_data_ptr<T>(), *ang = w[0].const_data_ptr<T>(),
            *pts = w[1].const_data_ptr<T>(), *gw = w[2].const_data_ptr<T>(),
            *gb = w[3].const_data_ptr<T>(), *bw = w[4].const_data_ptr<T>(),
            *bb = w[5].const_data_ptr<T>();
    T *xp = x.mutable_data_ptr<T>(), *qnp = qn.mutable_data_ptr<T>(),
      *dp = denom.mutable_data_ptr<T>(), *pp = probs.mutable_data_ptr<T>(),
      *mp = m.mutable_data_ptr<T>();
    int64_t* ip = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, s.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.R * s.a + n * s.d)),
                     [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(s.R);
      for (int64_t b = begin; b < end; ++b) {
        const T* qb = qp + b * s.a;
        T* qnb = qnp + b * s.a;
        double sq = 0;
        for (int64_t k = 0; k < s.a; ++k) sq += static_cast<double>(qb[k]) * qb[k];
        const T den = static_cast<T>(std::sqrt(sq)) + T(1e-5);
        dp[b] = den;
        for (int64_t k = 0; k < s.a; ++k) qnb[k] = qb[k] / den;
        T* pb = pp + b * s.R;
        T top = -std::numeric_limits<T>::infinity();
        for (int64_t r = 0; r < s.R; ++r) {
          double acc = 0;
          for (int64_t k = 0; k < s.a; ++k) acc += static_cast<double>(qnb[k]) * ang[r * s.a + k];
          pb[r] = static_cast<T>(acc);
          top = std::max(top, pb[r]);
        }
        double total = 0;
        for (int64_t r = 0; r < s.R; ++r) {
          pb[r] = static_cast<T>(std::exp(static_cast<double>(pb[r]) - top));
          total += pb[r];
        }
        for (int64_t r = 0; r < s.R; ++r) pb[r] = static_cast<T>(pb[r] / total);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + n, order.end(),
                          [&](int64_t i, int64_t j) { return pb[i] > pb[j] || (pb[i] == pb[j] && i < j); });
        for (int64_t j = 0; j < n; ++j) {
          const int64_t r = order[j];
          ip[b * n + j] = r;
          const T mj = static_cast<T>(n) * pb[r];
          mp[b * n + j] = mj;
          T* xj = xp + (b * n + j) * s.d;
          for (int64_t c = 0; c < s.d; ++c)
            xj[c] = (mj * gw[c] + gb[c]) * pts[r * s.d + c] + (mj * bw[c] + bb[c]);
        }
      }
    });
  });
  return {x, qn, denom, probs, index, m};
}

// Gradients of q and the 6 weights (in their order) from the gradient of x and the forward's
// inputs and saved outputs (qn, denom, probs, index, m).
std::vector<Tensor> authors_topn_backward_cpu(const Tensor& grad_x, const Tensor& q_in,
                                              at::TensorList weights, int64_t n,
                                              at::TensorList saved) {
  const TopnDims s = check(q_in, weights, n, "authors_topn_backward");
  TORCH_CHECK(grad_x.sizes() == at::IntArrayRef({s.B, n, s.d}) &&
                  grad_x.scalar_type() == q_in.scalar_type(),
              "authors_topn_backward: grad_x must be (B, n, d) of q's dtype");
  TORCH_CHECK(saved.size() == 5, "authors_topn_backward: 5 saved tensors expected");
  const std::vector<std::vector<int64_t>> shapes = {{s.B, s.a}, {s.B}, {s.B, s.R}, {s.B, n}, {s.B, n}};
  for (size_t i = 0; i < 5; ++i)
    TORCH_CHECK(saved[i].sizes() == at::IntArrayRef(shapes[i]) &&
                    saved[i].scalar_type() == (i == 3 ? at::kLong : q_in.scalar_type()),
                "authors_topn_backward: saved[", i, "] must have shape ",
                at::IntArrayRef(shapes[i]));
  const Tensor q = q_in.contiguous(), g = grad_x.contiguous();
  std::vector<Tensor> w, sv;
  for (const Tensor& t : weights) w.push_back(t.contiguous());
  for (const Tensor& t : saved) sv.push_back(t.contiguous());
  if (sv[3].numel() > 0) {  // the backward indexes the points and probabilities with it
    const int64_t lo = sv[3].min().item<int64_t>(), hi = sv[3].max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < s.R, "authors_topn_backward: saved[3] (the index) must be in [0, R=",
                s.R, "), got [", lo, ", ", hi, "]");
  }
  std::vector<Tensor> grads = {at::empty_like(q)};
  for (const Tensor& t : w) grads.push_back(at::empty_like(t));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "authors_topn_backward", [&] {
    using T = scalar_t;
    const T *qp = q.const_data_ptr<T>(), *ang = w[0].const_data_ptr<T>(),
            *pts = w[1].const_data_ptr<T>(), *gw = w[2].const_data_ptr<T>(),
            *gb = w[3].const_data_ptr<T>(), *bw = w[4].const_data_ptr<T>(),
            *gp = g.const_data_ptr<T>(), *qnp = sv[0].const_data_ptr<T>(),
            *dp = sv[1].const_data_ptr<T>(), *pp = sv[2].const_data_ptr<T>(),
            *mp = sv[4].const_data_ptr<T>();
    const int64_t* ip = sv[3].const_data_ptr<int64_t>();
    std::vector<double> g_ang(s.R * s.a, 0.0), g_pts(s.R * s.d, 0.0), g_gw(s.d, 0.0),
        g_gb(s.d, 0.0), g_bw(s.d, 0.0), g_bb(s.d, 0.0), dprob(s.R), ds(s.R), dqn(s.a);
    T* gq = grads[0].mutable_data_ptr<T>();
    for (int64_t b = 0; b < s.B; ++b) {
      std::fill(dprob.begin(), dprob.end(), 0.0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = ip[b * n + j];
        const double mj = mp[b * n + j];
        const T* gj = gp + (b * n + j) * s.d;
        double dm = 0;
        for (int64_t c = 0; c < s.d; ++c) {
          const double gc = gj[c], pc = pts[r * s.d + c];
          g_pts[r * s.d + c] += gc * (mj * gw[c] + gb[c]);
          g_gw[c] += gc * pc * mj;
          g_gb[c] += gc * pc;
          g_bw[c] += gc * mj;
          g_bb[c] += gc;
          dm += gc * (gw[c] * pc + bw[c]);
        }
        dprob[r] += static_cast<double>(n) * dm;
      }
      const T* pb = pp + b * s.R;
      double dot = 0;
      for (int64_t r = 0; r < s.R; ++r) dot += pb[r] * dprob[r];
      for (int64_t r = 0; r < s.R; ++r) ds[r] = pb[r] * (dprob[r] - dot);
      const T* qnb = qnp + b * s.a;
      std::fill(dqn.begin(), dqn.end(), 0.0);
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t k = 0; k < s.a; ++k) {
          dqn[k] += ds[r] * ang[r * s.a + k];
          g_ang[r * s.a + k] += ds[r] * qnb[k];
        }
      const T* qb = qp + b * s.a;
      const double den = dp[b];
      double proj = 0, sq = 0;
      for (int64_t k = 0; k < s.a; ++k) proj += dqn[k] * qb[k], sq += static_cast<double>(qb[k]) * qb[k];
      const bool zero = sq == 0;
      for (int64_t k = 0; k < s.a; ++k)
        gq[b * s.a + k] = static_cast<T>(
            dqn[k] / den - (zero ? 0.0 : qb[k] * proj / (den * den * std::sqrt(sq))));
    }
    auto store = [](const std::vector<double>& src, Tensor& dst) {
      T* out = dst.mutable_data_ptr<T>();
      for (size_t i = 0; i < src.size(); ++i) out[i] = static_cast<T>(src[i]);
    };
    store(g_ang, grads[1]);
    store(g_pts, grads[2]);
    store(g_gw, grads[3]);
    store(g_gb, grads[4]);
    store(g_bw, grads[5]);
    store(g_bb, grads[6]);
  });
  return grads;
}

// The op with its autograd in C++ (topn_kernels::authors_topn_autograd): the forward and
// backward ops above through the dispatcher (fake tensors reach their fake kernels), one node,
// differentiable once. Inputs: q, then the 6 weights.
class AuthorsTopnFunction : public torch::autograd::Function<AuthorsTopnFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                        at::TensorList weights, int64_t n) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_topn", "")
                               .typed<decltype(authors_topn_cpu)>();
    std::vector<Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(q, weights, n);
    }
    std::vector<Tensor> keep = {q};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), outs.begin() + 1, outs.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["n"] = n;
    return outs[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    check_differentiable_once("authors_topn_autograd");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("topn_kernels::authors_topn_backward", "")
                               .typed<decltype(authors_topn_backward_cpu)>();
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["n"].toInt();
    if (!grad_outputs[0].defined()) return torch::autograd::variable_list(8);  // q, 6, n
    const std::vector<Tensor> weights(saved.begin() + 1, saved.begin() + 7);
    const std::vector<Tensor> rest(saved.begin() + 7, saved.end());
    std::vector<Tensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = op.call(grad_outputs[0], saved[0], weights, n, rest);
    }
    // one gradient per input: q, the weights (a list: one per element), n
    torch::autograd::variable_list out = {grads[0]};
    out.insert(out.end(), grads.begin() + 1, grads.end());
    out.push_back(Tensor());
    return out;
  }
};

Tensor authors_topn_autograd(const Tensor& q, at::TensorList weights, int64_t n) {
  return AuthorsTopnFunction::apply(q, weights, n);
}

Tensor authors_topn_no_autograd(const Tensor& q, at::TensorList weights, int64_t n) {
  return authors_topn_cpu(q, weights, n)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, Autograd, m) {
  m.impl("authors_topn_autograd", &authors_topn_autograd);
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("authors_topn", &authors_topn_cpu);
  m.impl("authors_topn_backward", &authors_topn_backward_cpu);
  m.impl("authors_topn_autograd", &authors_topn_no_autograd);
}

}  // namespace topn_kernels
