// Sinkhorn divergence on CPU (docs/operators.md), for packed ragged batches: geomloss's loop
// (log-domain, eps-scaling, symmetric averaged updates, debiasing), run set by set in C++.
//
// Inputs: the real points of every set one after the other, x (P, dim) and y (Q, dim), with
// offsets (B + 1,): set b is x[xo[b]:xo[b+1]] against y[yo[b]:yo[b+1]]. The eps schedule comes
// from Python (the same function as the KeOps backend's). The last step, at the final eps,
// gives the value S_b = <a, f_ba - f_aa> + <b, g_ab - g_bb> and, when asked, its gradient with
// the potentials held fixed (envelope theorem, as geomloss), as per-point vectors that the
// Python autograd scales by the upstream gradient of each set.
//
// Parallel over sets when there are many (each set's loop then runs on one thread), else over
// the rows of each softmin; every sum has a fixed order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "avx2_build.h"
#include "softmin.h"

namespace topn_kernels {

template <typename T>
SoftminKernels<T> softmin_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_avx2_builds()) return {&softmin_avx2::rows<T>};
#endif
  return {&softmin_default::rows<T>};
}

template SoftminKernels<float> softmin_kernels<float>();
template SoftminKernels<double> softmin_kernels<double>();

namespace {

using at::Tensor;

constexpr int64_t kRowsPerTask = 16;

template <typename T>
struct SetSinkhorn {
  SoftminKernels<T> kernels;
  int64_t dim;
  int p;
  bool debias;
  bool parallel_rows;  // parallel over the rows of each softmin (few, large sets)

  // out_i = softmin_j(h_j - C(u_i, v_j) / eps) for the nu rows of u (see softmin.h)
  void softmin(const T* u, int64_t nu, const T* v_t, int64_t nv, const T* h, T eps, T* out,
               T* grad, std::vector<T>& scratch) const {
    if (!parallel_rows) {
      kernels.rows(u, 0, nu, v_t, nv, h, dim, p, eps, out, grad, scratch.data());
      return;
    }
    at::parallel_for(0, nu, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<T> local(nv);
      kernels.rows(u, begin, end, v_t, nv, h, dim, p, eps, out, grad, local.data());
    });
  }

  // One set: x (n, dim), y (m, dim). Writes its value and, when gx/gy are given, the gradient
  // of the value with respect to each of its points.
  void run(const T* x, int64_t n, const T* y, int64_t m, const std::vector<double>& eps_list,
           T* value, T* gx, T* gy) const {
    std::vector<T> xt(dim * n), yt(dim * m), scratch(std::max(n, m));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < dim; ++k) xt[k * n + i] = x[i * dim + k];
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < dim; ++k) yt[k * m + j] = y[j * dim + k];
    const T a_log = -std::log(T(n)), b_log = -std::log(T(m));
    std::vector<T> f_ba(n), g_ab(m), f_aa(n), g_bb(m), ft_ba(n), gt_ab(m), ft_aa(n), gt_bb(m);
    std::vector<T> hx(n), hy(m), hxx(n), hyy(m);

    // h for a softmin over the points of a set, from its log-weight and potential at eps
    auto with_potential = [](T log_w, const std::vector<T>& pot, T eps, std::vector<T>& h) {
      for (size_t i = 0; i < h.size(); ++i) h[i] = log_w + pot[i] / eps;
    };
    auto halve_into = [](std::vector<T>& pot, const std::vector<T>& update) {
      for (size_t i = 0; i < pot.size(); ++i) pot[i] = (pot[i] + update[i]) / 2;
    };

    T eps = static_cast<T>(eps_list.front());
    std::fill(hx.begin(), hx.end(), a_log);
    std::fill(hy.begin(), hy.end(), b_log);
    softmin(x, n, yt.data(), m, hy.data(), eps, f_ba.data(), nullptr, scratch);
    softmin(y, m, xt.data(), n, hx.data(), eps, g_ab.data(), nullptr, scratch);
    softmin(x, n, xt.data(), n, hx.data(), eps, f_aa.data(), nullptr, scratch);
    softmin(y, m, yt.data(), m, hy.data(), eps, g_bb.data(), nullptr, scratch);
    for (const double e : eps_list) {
      eps = static_cast<T>(e);
      with_potential(b_log, g_ab, eps, hy);
      with_potential(a_log, f_ba, eps, hx);
      softmin(x, n, yt.data(), m, hy.data(), eps, ft_ba.data(), nullptr, scratch);
      softmin(y, m, xt.data(), n, hx.data(), eps, gt_ab.data(), nullptr, scratch);
      halve_into(f_ba, ft_ba);
      halve_into(g_ab, gt_ab);
      if (debias) {
        with_potential(a_log, f_aa, eps, hxx);
        with_potential(b_log, g_bb, eps, hyy);
        softmin(x, n, xt.data(), n, hxx.data(), eps, ft_aa.data(), nullptr, scratch);
        softmin(y, m, yt.data(), m, hyy.data(), eps, gt_bb.data(), nullptr, scratch);
        halve_into(f_aa, ft_aa);
        halve_into(g_bb, gt_bb);
      }
    }

    // The last extrapolation, at the final eps, from the potentials of the loop.
    std::vector<T> gxa(gx ? n * dim : 0), gyb(gy ? m * dim : 0);
    with_potential(b_log, g_ab, eps, hy);
    with_potential(a_log, f_ba, eps, hx);
    softmin(x, n, yt.data(), m, hy.data(), eps, ft_ba.data(), gx, scratch);
    softmin(y, m, xt.data(), n, hx.data(), eps, gt_ab.data(), gy, scratch);
    if (debias) {
      with_potential(a_log, f_aa, eps, hxx);
      with_potential(b_log, g_bb, eps, hyy);
      softmin(x, n, xt.data(), n, hxx.data(), eps, ft_aa.data(), gx ? gxa.data() : nullptr,
              scratch);
      softmin(y, m, yt.data(), m, hyy.data(), eps, gt_bb.data(), gy ? gyb.data() : nullptr,
              scratch);
    }
    T sx = 0, sy = 0;
    for (int64_t i = 0; i < n; ++i) sx += debias ? ft_ba[i] - ft_aa[i] : ft_ba[i];
    for (int64_t j = 0; j < m; ++j) sy += debias ? gt_ab[j] - gt_bb[j] : gt_ab[j];
    *value = sx / T(n) + sy / T(m);
    if (gx)
      for (int64_t i = 0; i < n * dim; ++i) gx[i] = (debias ? gx[i] - gxa[i] : gx[i]) / T(n);
    if (gy)
      for (int64_t j = 0; j < m * dim; ++j) gy[j] = (debias ? gy[j] - gyb[j] : gy[j]) / T(m);
  }
};

void check_offsets(const Tensor& offsets, const Tensor& points, const char* name) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong,
              "sinkhorn: ", name, "_offsets must be int64 (B + 1,)");
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t count = offsets.size(0);
  TORCH_CHECK(count >= 1 && o[0] == 0 && o[count - 1] == points.size(0),
              "sinkhorn: ", name, "_offsets must run from 0 to the number of points");
  for (int64_t b = 0; b + 1 < count; ++b)
    TORCH_CHECK_VALUE(o[b + 1] > o[b], "sinkhorn: every set needs at least one point (", name,
                      " set ", b, " is empty)");
}

std::tuple<Tensor, Tensor, Tensor> sinkhorn_cpu(const Tensor& x_, const Tensor& y_,
                                                const Tensor& x_offsets_,
                                                const Tensor& y_offsets_,
                                                at::ArrayRef<double> eps_list, int64_t p,
                                                bool debias, bool with_grad) {
  TORCH_CHECK(x_.dim() == 2 && y_.dim() == 2 && x_.size(1) == y_.size(1),
              "sinkhorn: x and y must be (P, dim) and (Q, dim)");
  TORCH_CHECK(x_.scalar_type() == y_.scalar_type() &&
                  (x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble),
              "sinkhorn: x and y must be both float32 or both float64");
  TORCH_CHECK(x_.device().is_cpu() && y_.device().is_cpu(), "sinkhorn: CPU tensors only");
  TORCH_CHECK(p == 1 || p == 2, "sinkhorn: p must be 1 or 2");
  TORCH_CHECK(!eps_list.empty(), "sinkhorn: empty eps schedule");
  // every eps a normal, finite number of the kernel's type (the Python side checks blur**p)
  const bool single = x_.scalar_type() == at::kFloat;
  const double tiny = single ? FLT_MIN : DBL_MIN, huge = single ? FLT_MAX : DBL_MAX;
  for (const double e : eps_list)
    TORCH_CHECK(e >= tiny && e <= huge, "sinkhorn: every eps must be a normal, finite number > 0 "
                                        "of the points' dtype, got ", e);
  const Tensor x = x_.contiguous(), y = y_.contiguous();
  const Tensor xo = x_offsets_.contiguous(), yo = y_offsets_.contiguous();
  check_offsets(xo, x, "x");
  check_offsets(yo, y, "y");
  TORCH_CHECK(xo.size(0) == yo.size(0), "sinkhorn: x and y must have as many sets");
  const int64_t B = xo.size(0) - 1, dim = x.size(1);

  Tensor value = at::empty({B}, x.options());
  Tensor grad_x = at::empty({with_grad ? x.size(0) : 0, dim}, x.options());
  Tensor grad_y = at::empty({with_grad ? y.size(0) : 0, dim}, y.options());
  const std::vector<double> schedule(eps_list.begin(), eps_list.end());
  const bool per_set = B >= 4 * at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_cpu", [&] {
    const SetSinkhorn<scalar_t> solver{softmin_kernels<scalar_t>(), dim, static_cast<int>(p),
                                       debias, !per_set};
    const int64_t *xof = xo.data_ptr<int64_t>(), *yof = yo.data_ptr<int64_t>();
    auto one_set = [&](int64_t b) {
      solver.run(x.data_ptr<scalar_t>() + xof[b] * dim, xof[b + 1] - xof[b],
                 y.data_ptr<scalar_t>() + yof[b] * dim, yof[b + 1] - yof[b], schedule,
                 value.data_ptr<scalar_t>() + b,
                 with_grad ? grad_x.data_ptr<scalar_t>() + xof[b] * dim : nullptr,
                 with_grad ? grad_y.data_ptr<scalar_t>() + yof[b] * dim : nullptr);
    };
    if (per_set) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) one_set(b);
      });
    } else {
      for (int64_t b = 0; b < B; ++b) one_set(b);
    }
  });
  return {value, grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) { m.impl("sinkhorn", &sinkhorn_cpu); }

}  // namespace topn_kernels
