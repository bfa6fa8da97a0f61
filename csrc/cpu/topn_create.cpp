// Top-n creation on CPU (DESIGN 3.1): forward and backward.
//
// Forward: one pass per set scores the n0 reference angles, selects the n_b best
// (partial selection, then a sort of the survivors only), computes their weights and
// writes each output row once. Sets run in parallel with at::parallel_for.
//
// Backward: phase 1 runs per set (query, bias, weight and score gradients, FiLM partial
// sums per fixed block of sets); phase 2 runs per reference point and gathers the
// table/angle gradients from the sets that selected it, through a CSR list built in
// (set, slot) order. No atomics: every sum has a fixed order whatever the thread count,
// so forward and backward are deterministic.
//
// Accumulation in float (double for double inputs); outputs in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace topn_kernels {
namespace {

using at::Tensor;

constexpr double kNormEps = 1e-12;     // torch.nn.functional.normalize's eps
constexpr int64_t kSetsPerBlock = 16;  // FiLM partial sums: fixed blocks, fixed reduction order

bool is_score_norm_all(c10::string_view score_norm) {
  TORCH_CHECK(score_norm == "selected" || score_norm == "all",
              "topn_create: score_norm must be 'selected' or 'all', got '", score_norm, "'");
  return score_norm == "all";
}

// The ranking of DESIGN 3.1: larger score first, NaN above every number (as torch.sort),
// equal scores by increasing index. A strict total order, so the selection is unique.
template <typename acc_t>
inline bool ranks_before(acc_t si, int64_t i, acc_t sj, int64_t j) {
  const bool nan_i = std::isnan(si), nan_j = std::isnan(sj);
  if (nan_i != nan_j) return nan_i;
  if (!nan_i && si != sj) return si > sj;
  return i < j;
}

// NaN-propagating max, so that a NaN score gives NaN weights (as torch.softmax).
template <typename acc_t>
inline acc_t max_nan(acc_t x, acc_t y) {
  return (std::isnan(x) || x > y) ? x : y;
}

// out = v / max(||v||, eps), as torch.nn.functional.normalize; returns ||v||.
template <typename scalar_t, typename acc_t>
inline acc_t normalize(const scalar_t* v, int64_t a, acc_t* out) {
  acc_t sq = 0;
  for (int64_t k = 0; k < a; ++k) {
    const acc_t x = static_cast<acc_t>(v[k]);
    sq += x * x;
  }
  const acc_t norm = std::sqrt(sq);
  const acc_t denom = max_nan(norm, static_cast<acc_t>(kNormEps));
  for (int64_t k = 0; k < a; ++k) out[k] = static_cast<acc_t>(v[k]) / denom;
  return norm;
}

// Gradient of normalize at v (whose norm is `norm`) for the upstream gradient g.
template <typename scalar_t, typename acc_t>
inline void normalize_backward(const scalar_t* v, acc_t norm, const acc_t* g, int64_t a,
                               scalar_t* out) {
  if (norm < static_cast<acc_t>(kNormEps)) {  // the clamp is active: out = v / eps
    for (int64_t k = 0; k < a; ++k) out[k] = static_cast<scalar_t>(g[k] / kNormEps);
    return;
  }
  acc_t dot = 0;
  for (int64_t k = 0; k < a; ++k) dot += g[k] * static_cast<acc_t>(v[k]);
  const acc_t inv = acc_t(1) / norm;
  const acc_t c = dot * inv * inv * inv;
  for (int64_t k = 0; k < a; ++k)
    out[k] = static_cast<scalar_t>(g[k] * inv - static_cast<acc_t>(v[k]) * c);
}

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t a) {
  acc_t s = 0;
  for (int64_t k = 0; k < a; ++k) s += x[k] * y[k];
  return s;
}

// Max and sum of exp(s - max) over s[idx[j]], j < count (idx == nullptr: s[j]).
template <typename acc_t>
inline std::pair<acc_t, acc_t> softmax_stats(const acc_t* s, const int64_t* idx, int64_t count) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < count; ++j) mx = max_nan(mx, s[idx ? idx[j] : j]);
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) sum += std::exp(s[idx ? idx[j] : j] - mx);
  return {mx, sum};
}

// Normalised reference angles (n0, a) and their norms, shared by all sets.
template <typename scalar_t, typename acc_t>
void normalize_rows(const scalar_t* v, int64_t rows, int64_t a, acc_t* out, acc_t* norms) {
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) norms[i] = normalize(v + i * a, a, out + i * a);
  });
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> film_rows(const Tensor& film) {
  const scalar_t* f = film.data_ptr<scalar_t>();
  return std::vector<at::opmath_type<scalar_t>>(f, f + film.numel());
}

void check_inputs(const Tensor& query, const Tensor& angles, const Tensor& table,
                  const Tensor& bias, const Tensor& film) {
  TORCH_CHECK(query.dim() == 2 && angles.dim() == 2 && table.dim() == 2 && bias.dim() == 2 &&
                  film.dim() == 2,
              "topn_create: query, angles, table, bias, film must be 2-D");
  const int64_t B = query.size(0), a = query.size(1), n0 = angles.size(0), d = table.size(1);
  TORCH_CHECK(angles.size(1) == a, "topn_create: angles must be (n0, ", a, ")");
  TORCH_CHECK(table.size(0) == n0, "topn_create: table must be (", n0, ", d)");
  TORCH_CHECK(bias.size(0) == B && bias.size(1) == d, "topn_create: bias must be (", B, ", ", d,
              ")");
  TORCH_CHECK(film.size(0) == 4 && film.size(1) == d, "topn_create: film must be (4, ", d, ")");
  for (const Tensor* t : {&angles, &table, &bias, &film})
    TORCH_CHECK(t->scalar_type() == query.scalar_type(),
                "topn_create: all float inputs must share one dtype");
  for (const Tensor* t : {&query, &angles, &table, &bias, &film})
    TORCH_CHECK(t->device().is_cpu(), "topn_create (CPU kernel): inputs must be CPU tensors");
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
void forward_kernel(const Tensor& query, const Tensor& angles, const Tensor& table,
                    const Tensor& bias, const Tensor& n, const Tensor& film, int64_t n_max,
                    bool score_all, bool sorted, Tensor& x, Tensor& mask, Tensor& index,
                    Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), a = query.size(1), n0 = angles.size(0), d = table.size(1);
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* bia = bias.data_ptr<scalar_t>();
  const int64_t* nn = n.data_ptr<int64_t>();
  scalar_t* xo = x.data_ptr<scalar_t>();
  bool* mo = mask.data_ptr<bool>();
  int64_t* io = index.data_ptr<int64_t>();
  scalar_t* wo = weight.data_ptr<scalar_t>();

  std::vector<acc_t> an(n0 * a), an_norm(n0);
  normalize_rows(angles.data_ptr<scalar_t>(), n0, a, an.data(), an_norm.data());
  const std::vector<acc_t> fl = film_rows<scalar_t>(film);
  const acc_t *gw = fl.data(), *gb = gw + d, *bw = gb + d, *bb = bw + d;

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qn(a), s(n0), m(std::min(n_max, n0));
    std::vector<int64_t> order(n0);
    for (int64_t b = begin; b < end; ++b) {
      normalize(q + b * a, a, qn.data());
      for (int64_t i = 0; i < n0; ++i) s[i] = dot(qn.data(), an.data() + i * a, a);

      const int64_t nb = nn[b];
      std::iota(order.begin(), order.end(), int64_t(0));
      auto before = [&](int64_t i, int64_t j) { return ranks_before(s[i], i, s[j], j); };
      if (nb < n0) std::nth_element(order.begin(), order.begin() + nb, order.end(), before);
      if (sorted) {
        std::sort(order.begin(), order.begin() + nb, before);
      } else {
        std::sort(order.begin(), order.begin() + nb);
      }

      if (score_all) {
        const auto [mx, sum] = softmax_stats(s.data(), nullptr, n0);
        for (int64_t j = 0; j < nb; ++j) m[j] = std::exp(s[order[j]] - mx) / sum * acc_t(nb);
      } else {
        const auto [mx, sum] = softmax_stats(s.data(), order.data(), nb);
        for (int64_t j = 0; j < nb; ++j) m[j] = std::exp(s[order[j]] - mx) / sum;
      }

      const scalar_t* brow = bia + b * d;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t slot = b * n_max + j;
        const scalar_t* trow = tab + order[j] * d;
        scalar_t* xrow = xo + slot * d;
        const acc_t mj = m[j];
        for (int64_t k = 0; k < d; ++k) {
          const acc_t h = static_cast<acc_t>(trow[k]) + static_cast<acc_t>(brow[k]);
          xrow[k] = static_cast<scalar_t>(h * (mj * gw[k] + gb[k]) + (mj * bw[k] + bb[k]));
        }
        mo[slot] = true;
        io[slot] = order[j];
        wo[slot] = static_cast<scalar_t>(mj);
      }
      const int64_t pad = n_max - nb;
      std::fill_n(xo + (b * n_max + nb) * d, pad * d, scalar_t(0));
      std::fill_n(mo + b * n_max + nb, pad, false);
      std::fill_n(io + b * n_max + nb, pad, int64_t(-1));
      std::fill_n(wo + b * n_max + nb, pad, scalar_t(0));
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topn_create_cpu(
    const Tensor& query_, const Tensor& angles_, const Tensor& table_, const Tensor& bias_,
    const Tensor& n_, const Tensor& film_, int64_t n_max, c10::string_view score_norm,
    bool sorted) {
  const bool score_all = is_score_norm_all(score_norm);
  const Tensor query = query_.contiguous(), angles = angles_.contiguous(),
               table = table_.contiguous(), bias = bias_.contiguous(), film = film_.contiguous();
  check_inputs(query, angles, table, bias, film);
  const int64_t B = query.size(0), n0 = angles.size(0), d = table.size(1);
  TORCH_CHECK(n_.dim() == 1 && n_.size(0) == B && n_.scalar_type() == at::kLong,
              "topn_create: n must be an int64 tensor of shape (", B, ",)");
  TORCH_CHECK(n_max >= 0, "topn_create: n_max must be >= 0");
  const Tensor n = n_.contiguous();
  const int64_t* nn = n.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(nn[b] >= 1 && nn[b] <= n0 && nn[b] <= n_max, "topn_create: n[", b, "] = ", nn[b],
                " is outside [1, min(n0=", n0, ", n_max=", n_max, ")]");

  Tensor x = at::empty({B, n_max, d}, query.options());
  Tensor mask = at::empty({B, n_max}, query.options().dtype(at::kBool));
  Tensor index = at::empty({B, n_max}, query.options().dtype(at::kLong));
  Tensor weight = at::empty({B, n_max}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "topn_create_cpu", [&] {
                                    forward_kernel<scalar_t>(query, angles, table, bias, n, film,
                                                             n_max, score_all, sorted, x, mask,
                                                             index, weight);
                                  });
  return {x, mask, index, weight};
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
void backward_kernel(const Tensor& grad_x, const Tensor& grad_weight, const Tensor& query,
                     const Tensor& angles, const Tensor& table, const Tensor& bias,
                     const Tensor& film, const Tensor& index, const std::vector<int64_t>& nsel,
                     bool score_all, Tensor& g_query, Tensor& g_angles, Tensor& g_table,
                     Tensor& g_bias, Tensor& g_film) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), a = query.size(1), n0 = angles.size(0), d = table.size(1);
  const int64_t n_max = index.size(1);
  const scalar_t* gx = grad_x.data_ptr<scalar_t>();
  const scalar_t* gwt = grad_weight.data_ptr<scalar_t>();
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* ang = angles.data_ptr<scalar_t>();
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* bia = bias.data_ptr<scalar_t>();
  const int64_t* idx = index.data_ptr<int64_t>();

  std::vector<acc_t> an(n0 * a), an_norm(n0);
  normalize_rows(ang, n0, a, an.data(), an_norm.data());
  const std::vector<acc_t> fl = film_rows<scalar_t>(film);
  const acc_t *gw = fl.data(), *gb = gw + d, *bw = gb + d, *bb = bw + d;

  // Per-set results that phase 2 reads: weights m and score gradients ds of the selected
  // slots (B, n_max), the normalised queries (B, a); with score_norm="all" the score
  // gradient reaches every reference point, so ds is dense (B, n0).
  std::vector<acc_t> m_all(B * n_max, 0), ds_sel(score_all ? 0 : B * n_max, 0),
      ds_dense(score_all ? B * n0 : 0, 0), qn_all(B * a);
  const int64_t n_blocks = (B + kSetsPerBlock - 1) / kSetsPerBlock;
  std::vector<acc_t> film_part(n_blocks * 4 * d, 0);

  // Phase 1: per set.
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> s(score_all ? n0 : n_max), dm(n_max), dqn(a), gbias(d);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* fp = film_part.data() + blk * 4 * d;
      const int64_t b_end = std::min(B, (blk + 1) * kSetsPerBlock);
      for (int64_t b = blk * kSetsPerBlock; b < b_end; ++b) {
        const int64_t nb = nsel[b];
        const int64_t* sig = idx + b * n_max;
        acc_t* qn = qn_all.data() + b * a;
        const acc_t qnorm = normalize(q + b * a, a, qn);
        acc_t* m = m_all.data() + b * n_max;

        // Recompute the weights in acc_t (the stored weight is rounded to the input dtype).
        acc_t mx, sum;
        if (score_all) {
          for (int64_t i = 0; i < n0; ++i) s[i] = dot(qn, an.data() + i * a, a);
          std::tie(mx, sum) = softmax_stats(s.data(), nullptr, n0);
          for (int64_t j = 0; j < nb; ++j) m[j] = std::exp(s[sig[j]] - mx) / sum * acc_t(nb);
        } else {
          for (int64_t j = 0; j < nb; ++j) s[j] = dot(qn, an.data() + sig[j] * a, a);
          std::tie(mx, sum) = softmax_stats(s.data(), nullptr, nb);
          for (int64_t j = 0; j < nb; ++j) m[j] = std::exp(s[j] - mx) / sum;
        }

        // x = h * (m gw + gb) + (m bw + bb), h = table[sig] + bias.
        const scalar_t* brow = bia + b * d;
        scalar_t* gbrow = g_bias.data_ptr<scalar_t>() + b * d;
        std::fill(gbias.begin(), gbias.end(), acc_t(0));
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t slot = b * n_max + j;
          const scalar_t* grow = gx + slot * d;
          const scalar_t* trow = tab + sig[j] * d;
          const acc_t mj = m[j];
          acc_t dmj = static_cast<acc_t>(gwt[slot]);
          for (int64_t k = 0; k < d; ++k) {
            const acc_t g = static_cast<acc_t>(grow[k]);
            const acc_t h = static_cast<acc_t>(trow[k]) + static_cast<acc_t>(brow[k]);
            dmj += g * (h * gw[k] + bw[k]);
            gbias[k] += g * (mj * gw[k] + gb[k]);
            fp[k] += g * h * mj;
            fp[d + k] += g * h;
            fp[2 * d + k] += g * mj;
            fp[3 * d + k] += g;
          }
          dm[j] = dmj;
        }
        for (int64_t k = 0; k < d; ++k) gbrow[k] = static_cast<scalar_t>(gbias[k]);

        // Softmax backward, then the score gradient to the normalised query.
        std::fill(dqn.begin(), dqn.end(), acc_t(0));
        if (score_all) {
          // m_j = nb * p[sig_j], p = softmax(s): ds_i = p_i (dp_i - <p, dp>), dp = nb * dm at sig.
          acc_t pdp = 0;  // <p, dp> = sum_j m_j dm_j
          for (int64_t j = 0; j < nb; ++j) pdp += m[j] * dm[j];
          acc_t* ds = ds_dense.data() + b * n0;
          for (int64_t i = 0; i < n0; ++i) ds[i] = -(std::exp(s[i] - mx) / sum) * pdp;
          for (int64_t j = 0; j < nb; ++j) ds[sig[j]] += m[j] * dm[j];
          for (int64_t i = 0; i < n0; ++i) {
            const acc_t* ai = an.data() + i * a;
            for (int64_t k = 0; k < a; ++k) dqn[k] += ds[i] * ai[k];
          }
        } else {
          acc_t mdm = 0;
          for (int64_t j = 0; j < nb; ++j) mdm += m[j] * dm[j];
          acc_t* ds = ds_sel.data() + b * n_max;
          for (int64_t j = 0; j < nb; ++j) {
            ds[j] = m[j] * (dm[j] - mdm);
            const acc_t* ai = an.data() + sig[j] * a;
            for (int64_t k = 0; k < a; ++k) dqn[k] += ds[j] * ai[k];
          }
        }
        normalize_backward(q + b * a, qnorm, dqn.data(), a, g_query.data_ptr<scalar_t>() + b * a);
      }
    }
  });

  // FiLM: block partials summed in block order.
  {
    std::vector<acc_t> total(4 * d, 0);
    for (int64_t blk = 0; blk < n_blocks; ++blk)
      for (int64_t k = 0; k < 4 * d; ++k) total[k] += film_part[blk * 4 * d + k];
    scalar_t* gf = g_film.data_ptr<scalar_t>();
    for (int64_t k = 0; k < 4 * d; ++k) gf[k] = static_cast<scalar_t>(total[k]);
  }

  // Phase 2: per reference point, over the (set, slot) pairs that selected it, in order.
  std::vector<int64_t> row_ptr(n0 + 1, 0), slots(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nsel[b]; ++j) ++row_ptr[idx[b * n_max + j] + 1];
  std::partial_sum(row_ptr.begin(), row_ptr.end(), row_ptr.begin());
  slots.resize(row_ptr[n0]);
  {
    std::vector<int64_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nsel[b]; ++j) slots[fill[idx[b * n_max + j]]++] = b * n_max + j;
  }

  scalar_t* gt = g_table.data_ptr<scalar_t>();
  scalar_t* ga = g_angles.data_ptr<scalar_t>();
  at::parallel_for(0, n0, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d), dan(a);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(dan.begin(), dan.end(), acc_t(0));
      for (int64_t e = row_ptr[i]; e < row_ptr[i + 1]; ++e) {
        const int64_t slot = slots[e];
        const scalar_t* grow = gx + slot * d;
        const acc_t mj = m_all[slot];
        for (int64_t k = 0; k < d; ++k)
          acc[k] += static_cast<acc_t>(grow[k]) * (mj * gw[k] + gb[k]);
        if (!score_all) {
          const acc_t* qn = qn_all.data() + (slot / n_max) * a;
          for (int64_t k = 0; k < a; ++k) dan[k] += ds_sel[slot] * qn[k];
        }
      }
      if (score_all) {
        for (int64_t b = 0; b < B; ++b) {
          const acc_t dsi = ds_dense[b * n0 + i];
          const acc_t* qn = qn_all.data() + b * a;
          for (int64_t k = 0; k < a; ++k) dan[k] += dsi * qn[k];
        }
      }
      for (int64_t k = 0; k < d; ++k) gt[i * d + k] = static_cast<scalar_t>(acc[k]);
      normalize_backward(ang + i * a, an_norm[i], dan.data(), a, ga + i * a);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topn_create_backward_cpu(
    const Tensor& grad_x_, const Tensor& grad_weight_, const Tensor& query_,
    const Tensor& angles_, const Tensor& table_, const Tensor& bias_, const Tensor& film_,
    const Tensor& index_, c10::string_view score_norm) {
  const bool score_all = is_score_norm_all(score_norm);
  const Tensor query = query_.contiguous(), angles = angles_.contiguous(),
               table = table_.contiguous(), bias = bias_.contiguous(), film = film_.contiguous();
  check_inputs(query, angles, table, bias, film);
  const int64_t B = query.size(0), n0 = angles.size(0), d = table.size(1);
  TORCH_CHECK(index_.dim() == 2 && index_.size(0) == B && index_.scalar_type() == at::kLong,
              "topn_create_backward: index must be an int64 tensor of shape (", B, ", n_max)");
  const int64_t n_max = index_.size(1);
  TORCH_CHECK(grad_x_.sizes() == at::IntArrayRef({B, n_max, d}) &&
                  grad_weight_.sizes() == at::IntArrayRef({B, n_max}),
              "topn_create_backward: grad_x must be (B, n_max, d) and grad_weight (B, n_max)");
  const Tensor index = index_.contiguous();
  const Tensor grad_x = grad_x_.to(query.scalar_type()).contiguous();
  const Tensor grad_weight = grad_weight_.to(query.scalar_type()).contiguous();

  // Selected slots of set b: the prefix of valid indices (the forward pads with -1).
  std::vector<int64_t> nsel(B, 0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t j = 0;
    while (j < n_max && idx[b * n_max + j] >= 0) {
      TORCH_CHECK(idx[b * n_max + j] < n0, "topn_create_backward: index out of range");
      ++j;
    }
    nsel[b] = j;
  }

  Tensor g_query = at::empty_like(query), g_angles = at::empty_like(angles),
         g_table = at::empty_like(table), g_bias = at::empty_like(bias),
         g_film = at::empty_like(film);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "topn_create_backward_cpu", [&] {
                                    backward_kernel<scalar_t>(
                                        grad_x, grad_weight, query, angles, table, bias, film,
                                        index, nsel, score_all, g_query, g_angles, g_table,
                                        g_bias, g_film);
                                  });
  return {g_query, g_angles, g_table, g_bias, g_film};
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("topn_create", &topn_create_cpu);
  m.impl("topn_create_backward", &topn_create_backward_cpu);
}

}  // namespace topn_kernels
