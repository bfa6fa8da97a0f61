// Top-n creation on CPU (docs/operators.md, topn_create): forward and backward.
//
// Forward, one pass per set (sets in parallel): cosine scores against the normalised
// reference angles, selection of the n_b best (select.h: O(n0), then a sort of the survivors
// only), softmax weights, and each output row written once; outputs from the size of the L2
// cache up, in memory recycled by the output pool, are written with streaming stores, past
// the caches.
//
// Backward, no atomics and a fixed order for every sum, so it is deterministic whatever the
// thread count. Writing g for the upstream gradient of x, m for the weights and
// h = table[sigma] + bias:
//   grad_bias_b  = gamma_w * P1_b + gamma_b * P0_b,  P1_b = sum_j g_bj m_bj, P0_b = sum_j g_bj
//   grad_table_i = gamma_w * S1_i + gamma_b * S0_i,  S1_i, S0_i the same sums over the slots
//                  (b, j) that selected point i
//   grad_film    = sums of P1, P0, bias * P1, bias * P0, table * S1, table * S0
// Phase 1 runs per set (fixed blocks of sets): P1, P0, the weight and score gradients and the
// query gradient. Phase 2 runs per reference point (fixed blocks of points): S1, S0 and the
// angle gradient, summed over the slots that selected the point in (set, slot) order.
//
// Accumulation in float (double for double inputs); outputs in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "output_pool.h"
#include "select.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#include <unistd.h>
#endif

namespace topn_kernels {
namespace {

using at::Tensor;

constexpr double kNormEps2 = 1e-24;    // torch.nn.functional.normalize's eps, squared
constexpr int64_t kSetsPerBlock = 16;  // fixed blocks: the order of every sum over sets
constexpr int64_t kRowsPerBlock = 16;  // the same over reference points
constexpr int kLanes = 8;              // independent partial sums of a dot product

// TOPN_KERNELS_PORTABLE=1: score one point at a time, with no loop the compiler vectorises
// (the portable scoring path, tested against the blocked one).
bool portable_build() {
  static const bool portable = [] {
    const char* env = std::getenv("TOPN_KERNELS_PORTABLE");
    return env != nullptr && std::string(env) == "1";
  }();
  return portable;
}

bool is_score_norm_all(c10::string_view score_norm) {
  TORCH_CHECK(score_norm == "selected" || score_norm == "all",
              "topn_create: score_norm must be 'selected' or 'all', got '", score_norm, "'");
  return score_norm == "all";
}

// NaN-propagating max, so that a NaN score gives NaN weights (as torch.softmax).
template <typename acc_t>
inline acc_t max_nan(acc_t x, acc_t y) {
  return (std::isnan(x) || x > y) ? x : y;
}

// out = v / sqrt(max(sum_k v_k^2, eps^2)): torch.nn.functional.normalize, summed in index order
// as the reference (_normalize). Returns sum_k v_k^2.
template <typename scalar_t, typename acc_t>
inline acc_t normalize(const scalar_t* v, int64_t a, acc_t* out) {
  acc_t sq = 0;
  for (int64_t k = 0; k < a; ++k) {
    const acc_t x = static_cast<acc_t>(v[k]);
    sq += x * x;
  }
  const acc_t denom = std::sqrt(max_nan(sq, static_cast<acc_t>(kNormEps2)));
  for (int64_t k = 0; k < a; ++k) out[k] = static_cast<acc_t>(v[k]) / denom;
  return sq;
}

// Gradient of normalize at v (whose squared norm is sq) for the upstream gradient g.
template <typename scalar_t, typename acc_t>
inline void normalize_backward(const scalar_t* v, acc_t sq, const acc_t* g, int64_t a,
                               scalar_t* out) {
  const acc_t eps2 = static_cast<acc_t>(kNormEps2);
  if (sq < eps2) {  // the clamp is active: out = v / eps
    const acc_t denom = std::sqrt(eps2);
    for (int64_t k = 0; k < a; ++k) out[k] = static_cast<scalar_t>(g[k] / denom);
    return;
  }
  const acc_t norm = std::sqrt(sq);
  acc_t dot = 0;
  for (int64_t k = 0; k < a; ++k) dot += g[k] * static_cast<acc_t>(v[k]);
  const acc_t inv = acc_t(1) / norm;
  const acc_t c = dot * inv * inv * inv;
  for (int64_t k = 0; k < a; ++k)
    out[k] = static_cast<scalar_t>(g[k] * inv - static_cast<acc_t>(v[k]) * c);
}

// The reference angles of one call, normalised once: transposed (a, n0) so that the scores
// of a set vectorise over points, and their squared norms for the backward.
template <typename acc_t>
struct NormalizedAngles {
  std::vector<acc_t> t;
  std::vector<acc_t> sq_norms;
  int64_t n0, a;

  template <typename scalar_t>
  NormalizedAngles(const scalar_t* angles, int64_t n0_, int64_t a_)
      : t(n0_ * a_), sq_norms(n0_), n0(n0_), a(a_) {
    at::parallel_for(0, n0, 1024, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(a);
      for (int64_t i = begin; i < end; ++i) {
        sq_norms[i] = normalize(angles + i * a, a, row.data());
        for (int64_t k = 0; k < a; ++k) t[k * n0 + i] = row[k];
      }
    });
  }

  // s[i] = <qn, an_i> for every point, summed over k in order: blocks of kLanes points whose
  // partial sums stay in registers over the k loop (one pass over s), or, in the portable
  // build, one point at a time. Both round every score the same way.
  void scores(const acc_t* qn, acc_t* s) const {
    const acc_t* t0 = t.data();
    int64_t i = 0;
    if (portable_build())
      for (; i < n0; ++i) s[i] = score(qn, i);
    for (; i + kLanes <= n0; i += kLanes) {
      acc_t acc[kLanes] = {};
      for (int64_t k = 0; k < a; ++k) {
        const acc_t q = qn[k];
        const acc_t* __restrict__ col = t0 + k * n0 + i;
        for (int l = 0; l < kLanes; ++l) acc[l] += q * col[l];
      }
      for (int l = 0; l < kLanes; ++l) s[i + l] = acc[l];
    }
    for (; i < n0; ++i) s[i] = score(qn, i);
  }

  // The same score for one point, bit for bit.
  acc_t score(const acc_t* qn, int64_t i) const {
    acc_t s = 0;
    for (int64_t k = 0; k < a; ++k) s += qn[k] * t[k * n0 + i];
    return s;
  }

  // out += w * an_i
  void add_scaled(int64_t i, acc_t w, acc_t* out) const {
    for (int64_t k = 0; k < a; ++k) out[k] += w * t[k * n0 + i];
  }
};

// p = softmax(v) over count values, NaN-propagating as torch.softmax.
template <typename acc_t>
inline void softmax(const acc_t* v, int64_t count, acc_t* p) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < count; ++i) mx = max_nan(mx, v[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    p[i] = std::exp(v[i] - mx);
    sum += p[i];
  }
  for (int64_t i = 0; i < count; ++i) p[i] /= sum;
}

// Weights m_j of the selected points sig[0..nb) (docs/operators.md, topn_create, step 3). "all": s holds the n0
// scores and p receives their softmax; "selected": s holds the nb selected scores.
template <typename acc_t>
inline void selection_weights(const acc_t* s, const int64_t* sig, int64_t nb, int64_t n0,
                              bool score_all, acc_t* p, acc_t* m) {
  if (score_all) {
    softmax(s, n0, p);
    for (int64_t j = 0; j < nb; ++j) m[j] = acc_t(nb) * p[sig[j]];
  } else {
    softmax(s, nb, m);
  }
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> to_acc(const Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  return std::vector<at::opmath_type<scalar_t>>(p, p + t.numel());
}

void check_inputs(const Tensor& query, const Tensor& angles, const Tensor& table,
                  const Tensor& bias, const Tensor& film) {
  TORCH_CHECK(query.dim() == 2 && angles.dim() == 2 && table.dim() == 2 && bias.dim() == 2 &&
                  film.dim() == 2,
              "topn_create: query, angles, table, bias, film must be 2-D");
  const int64_t B = query.size(0), a = query.size(1), n0 = angles.size(0), d = table.size(1);
  TORCH_CHECK(angles.size(1) == a, "topn_create: angles must be (n0, ", a, ")");
  TORCH_CHECK(table.size(0) == n0, "topn_create: table must be (", n0, ", d)");
  TORCH_CHECK(n0 < (int64_t(1) << 32), "topn_create: n0 must be below 2^32");
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

// x = (t + b) * (m gw + gb) + (m bw + bb) for one output row of d features.
template <typename scalar_t, typename acc_t>
inline void film_row(const scalar_t* __restrict__ t, const scalar_t* __restrict__ b, acc_t m,
                     const acc_t* __restrict__ film, scalar_t* __restrict__ x, int64_t d,
                     bool /*stream*/) {
  const acc_t *gw = film, *gb = gw + d, *bw = gb + d, *bb = bw + d;
  for (int64_t k = 0; k < d; ++k) {
    const acc_t h = static_cast<acc_t>(t[k]) + static_cast<acc_t>(b[k]);
    x[k] = static_cast<scalar_t>(h * (m * gw[k] + gb[k]) + (m * bw[k] + bb[k]));
  }
}

#if defined(__SSE2__)
// float rows may go past the caches: the same arithmetic, with non-temporal stores.
template <>
inline void film_row<float, float>(const float* __restrict__ t, const float* __restrict__ b,
                                   float m, const float* __restrict__ film,
                                   float* __restrict__ x, int64_t d, bool stream) {
  const float *gw = film, *gb = gw + d, *bw = gb + d, *bb = bw + d;
  int64_t k = 0;
  if (stream) {
    for (; k < d && (reinterpret_cast<uintptr_t>(x + k) & 15) != 0; ++k)
      x[k] = (t[k] + b[k]) * (m * gw[k] + gb[k]) + (m * bw[k] + bb[k]);
    const __m128 mv = _mm_set1_ps(m);
    for (; k + 4 <= d; k += 4) {
      const __m128 h = _mm_add_ps(_mm_loadu_ps(t + k), _mm_loadu_ps(b + k));
      const __m128 g = _mm_add_ps(_mm_mul_ps(mv, _mm_loadu_ps(gw + k)), _mm_loadu_ps(gb + k));
      const __m128 c = _mm_add_ps(_mm_mul_ps(mv, _mm_loadu_ps(bw + k)), _mm_loadu_ps(bb + k));
      _mm_stream_ps(x + k, _mm_add_ps(_mm_mul_ps(h, g), c));
    }
  }
  for (; k < d; ++k) x[k] = (t[k] + b[k]) * (m * gw[k] + gb[k]) + (m * bw[k] + bb[k]);
}
#endif

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * int64_t(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

// Whether an output of this many bytes should bypass the caches: from the size of the L2
// cache (a larger output would evict it anyway, taking with it what the caller's next steps
// need), or from TOPN_KERNELS_STREAM_MIN_BYTES when it is set. (Only for memory the pool
// recycles: streaming into fresh pages is slower than plain stores.)
bool stream_output(int64_t nbytes) {
#if defined(__SSE2__)
  if (const char* env = std::getenv("TOPN_KERNELS_STREAM_MIN_BYTES"); env && *env)
    return nbytes >= std::strtoll(env, nullptr, 10);
  static const int64_t threshold = [] {
    const long cache = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return cache > 0 ? int64_t(cache) : int64_t(1) << 20;
  }();
  return nbytes >= threshold;
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_kernel(const Tensor& query, const Tensor& angles, const Tensor& table,
                    const Tensor& bias, const int64_t* nn, const Tensor& film, int64_t n_max,
                    bool score_all, bool sorted, Tensor& x, Tensor& mask, Tensor& index,
                    Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), a = query.size(1), n0 = angles.size(0), d = table.size(1);
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* bia = bias.data_ptr<scalar_t>();
  scalar_t* xo = x.data_ptr<scalar_t>();
  bool* mo = mask.data_ptr<bool>();
  int64_t* io = index.data_ptr<int64_t>();
  scalar_t* wo = weight.data_ptr<scalar_t>();

  const NormalizedAngles<acc_t> an(angles.data_ptr<scalar_t>(), n0, a);
  const std::vector<acc_t> fl = to_acc<scalar_t>(film);
  const bool stream = is_recycled_block(x) && stream_output(x.nbytes());

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qn(a), s(n0), work(n0), m(std::min(n_max, n0));
    std::vector<int64_t> order(n0 + 1);  // select_top may write one past nb
    SelectScratch<acc_t> scratch(n0);
    for (int64_t b = begin; b < end; ++b) {
      normalize(q + b * a, a, qn.data());
      an.scores(qn.data(), s.data());
      const int64_t nb = nn[b];
      select_top(s.data(), n0, nb, sorted, scratch, order.data());
      if (!score_all)  // the softmax runs over the selected scores, in slot order
        for (int64_t j = 0; j < nb; ++j) work[j] = s[order[j]];
      selection_weights(score_all ? s.data() : work.data(), order.data(), nb, n0, score_all,
                        work.data(), m.data());

      const scalar_t* brow = bia + b * d;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t slot = b * n_max + j;
        if (j + 4 < nb) prefetch_row(tab + order[j + 4] * d, d);  // rows come in random order
        film_row(tab + order[j] * d, brow, m[j], fl.data(), xo + slot * d, d, stream);
        mo[slot] = true;
        io[slot] = order[j];
        wo[slot] = static_cast<scalar_t>(m[j]);
      }
      const int64_t pad = n_max - nb;
      std::fill_n(xo + (b * n_max + nb) * d, pad * d, scalar_t(0));
      std::fill_n(mo + b * n_max + nb, pad, false);
      std::fill_n(io + b * n_max + nb, pad, int64_t(-1));
      std::fill_n(wo + b * n_max + nb, pad, scalar_t(0));
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // streaming stores are visible before the task ends
#endif
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topn_create_cpu(
    const Tensor& query_, const Tensor& angles_, const Tensor& table_, const Tensor& bias_,
    const Tensor& n_, const Tensor& film_, int64_t n_max, c10::string_view score_norm,
    bool sorted, int64_t n_fixed) {
  const bool score_all = is_score_norm_all(score_norm);
  const Tensor query = query_.contiguous(), angles = angles_.contiguous(),
               table = table_.contiguous(), bias = bias_.contiguous(), film = film_.contiguous();
  check_inputs(query, angles, table, bias, film);
  const int64_t B = query.size(0), n0 = angles.size(0), d = table.size(1);
  TORCH_CHECK(n_fixed >= 0 || (n_.dim() == 1 && n_.size(0) == B && n_.scalar_type() == at::kLong),
              "topn_create: n must be an int64 tensor of shape (", B, ",)");
  TORCH_CHECK(n_max >= 0, "topn_create: n_max must be >= 0");
  // n_fixed >= 0: every set has that size, and n is not read
  const Tensor n = n_fixed >= 0 ? Tensor() : n_.contiguous();
  const std::vector<int64_t> fixed(n_fixed >= 0 ? B : 0, n_fixed);
  const int64_t* nn = n_fixed >= 0 ? fixed.data() : n.data_ptr<int64_t>();
  // The Python API leaves these value checks to the kernel (no extra pass, no sync): they
  // raise ValueError, with the messages of topn_kernels/ops/_checks.py.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(nn[b] >= 1 && nn[b] <= n0, "n must be in [1, n0=", n0, "], got ", nn[b]);
    TORCH_CHECK_VALUE(nn[b] <= n_max, "n must be in [1, n_max=", n_max, "], got ", nn[b]);
  }

  Tensor x = empty_pooled({B, n_max, d}, query.options());
  Tensor mask = at::empty({B, n_max}, query.options().dtype(at::kBool));
  Tensor index = at::empty({B, n_max}, query.options().dtype(at::kLong));
  Tensor weight = at::empty({B, n_max}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "topn_create_cpu", [&] {
                                    forward_kernel<scalar_t>(query, angles, table, bias, nn, film,
                                                             n_max, score_all, sorted, x, mask,
                                                             index, weight);
                                  });
  return {x, mask, index, weight};
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// sum_k g[k] * ((t[k] + b[k]) * gw[k] + bw[k]) with kLanes independent partial sums, added
// in a fixed order.
template <typename scalar_t, typename acc_t>
inline acc_t weight_gradient(const scalar_t* __restrict__ g, const scalar_t* __restrict__ t,
                             const scalar_t* __restrict__ b, const acc_t* __restrict__ gw,
                             const acc_t* __restrict__ bw, int64_t d) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t h = static_cast<acc_t>(t[k + l]) + static_cast<acc_t>(b[k + l]);
      lanes[l] += static_cast<acc_t>(g[k + l]) * (h * gw[k + l] + bw[k + l]);
    }
  for (int l = 0; k < d; ++k, ++l) {
    const acc_t h = static_cast<acc_t>(t[k]) + static_cast<acc_t>(b[k]);
    lanes[l] += static_cast<acc_t>(g[k]) * (h * gw[k] + bw[k]);
  }
  acc_t sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// s1 += g * w, s0 += g
template <typename scalar_t, typename acc_t>
inline void accumulate_rows(const scalar_t* __restrict__ g, acc_t w, acc_t* __restrict__ s1,
                            acc_t* __restrict__ s0, int64_t d) {
  for (int64_t k = 0; k < d; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    s1[k] += gk * w;
    s0[k] += gk;
  }
}

// The gradients a backward computes (the op's output_mask): the others are left undefined,
// and the work that only they need is skipped.
struct Wanted {
  bool query, angles, table, bias, film;
  bool scores() const { return query || angles; }  // gradients through the weights
  bool set_sums() const { return bias || film; }   // P1, P0
  bool point_sums() const { return table || film; }  // S1, S0
};

template <typename scalar_t>
scalar_t* data_or_null(Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void backward_kernel(const Tensor& grad_x, const Tensor& grad_weight, const Tensor& query,
                     const Tensor& angles, const Tensor& table, const Tensor& bias,
                     const Tensor& film, const Tensor& index, const std::vector<int64_t>& nsel,
                     bool score_all, Wanted want, Tensor& g_query, Tensor& g_angles,
                     Tensor& g_table, Tensor& g_bias, Tensor& g_film) {
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
  scalar_t* gq = data_or_null<scalar_t>(g_query);
  scalar_t* gbi = data_or_null<scalar_t>(g_bias);
  scalar_t* gt = data_or_null<scalar_t>(g_table);
  scalar_t* ga = data_or_null<scalar_t>(g_angles);

  const NormalizedAngles<acc_t> an(ang, n0, a);
  const std::vector<acc_t> fl = to_acc<scalar_t>(film);
  const acc_t *gw = fl.data(), *gb = gw + d, *bw = gb + d;

  // What phase 2 reads from phase 1: weights m and score gradients ds of the selected slots
  // (B, n_max) and the normalised queries (B, a). With score_norm="all" the score gradient
  // reaches every reference point, so ds is dense (B, n0).
  std::vector<acc_t> m_all(B * n_max), ds_sel(score_all ? 0 : B * n_max),
      ds_dense(score_all ? B * n0 : 0), qn_all(B * a);
  // FiLM partial sums: per block of sets (gamma_w, gamma_b, beta_w, beta_b) and per block of
  // reference points (gamma_w, gamma_b).
  const int64_t set_blocks = (B + kSetsPerBlock - 1) / kSetsPerBlock;
  int64_t row_blocks = (n0 + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> film_sets(set_blocks * 4 * d, 0), film_rows(row_blocks * 2 * d, 0);

  // Phase 1: per set.
  at::parallel_for(0, set_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> s(score_all ? n0 : n_max), prob(score_all ? n0 : 0), dm(n_max), dqn(a),
        p1(d), p0(d);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* fp = film_sets.data() + blk * 4 * d;
      const int64_t b_end = std::min(B, (blk + 1) * kSetsPerBlock);
      for (int64_t b = blk * kSetsPerBlock; b < b_end; ++b) {
        const int64_t nb = nsel[b];
        const int64_t* sig = idx + b * n_max;
        acc_t* qn = qn_all.data() + b * a;
        const acc_t q_sq = normalize(q + b * a, a, qn);
        acc_t* m = m_all.data() + b * n_max;
        // Recompute the weights in acc_t (the stored weight is rounded to the input dtype).
        if (score_all) {
          an.scores(qn, s.data());
        } else {
          for (int64_t j = 0; j < nb; ++j) s[j] = an.score(qn, sig[j]);
        }
        selection_weights(s.data(), sig, nb, n0, score_all, prob.data(), m);

        const scalar_t* brow = bia + b * d;
        if (want.set_sums()) {
          std::fill(p1.begin(), p1.end(), acc_t(0));
          std::fill(p0.begin(), p0.end(), acc_t(0));
          for (int64_t j = 0; j < nb; ++j)
            accumulate_rows(gx + (b * n_max + j) * d, m[j], p1.data(), p0.data(), d);
          for (int64_t k = 0; k < d; ++k) {
            if (gbi) gbi[b * d + k] = static_cast<scalar_t>(gw[k] * p1[k] + gb[k] * p0[k]);
            const acc_t bk = static_cast<acc_t>(brow[k]);
            fp[k] += bk * p1[k];
            fp[d + k] += bk * p0[k];
            fp[2 * d + k] += p1[k];
            fp[3 * d + k] += p0[k];
          }
        }
        if (!want.scores()) continue;

        for (int64_t j = 0; j < nb; ++j) {
          const int64_t slot = b * n_max + j;
          dm[j] = static_cast<acc_t>(gwt[slot]) +
                  weight_gradient(gx + slot * d, tab + sig[j] * d, brow, gw, bw, d);
        }

        // Softmax backward, then the score gradient to the normalised query.
        std::fill(dqn.begin(), dqn.end(), acc_t(0));
        acc_t mdm = 0;  // <m, dm>; with "all", <p, dp> = sum_j m_j dm_j too
        for (int64_t j = 0; j < nb; ++j) mdm += m[j] * dm[j];
        if (score_all) {
          // m_j = nb p[sig_j], p = softmax(s): ds_i = p_i (dp_i - <p, dp>), dp = nb dm at sig.
          acc_t* ds = ds_dense.data() + b * n0;
          for (int64_t i = 0; i < n0; ++i) ds[i] = -prob[i] * mdm;
          for (int64_t j = 0; j < nb; ++j) ds[sig[j]] += m[j] * dm[j];
          for (int64_t i = 0; i < n0; ++i) an.add_scaled(i, ds[i], dqn.data());
        } else {
          acc_t* ds = ds_sel.data() + b * n_max;
          for (int64_t j = 0; j < nb; ++j) {
            ds[j] = m[j] * (dm[j] - mdm);
            an.add_scaled(sig[j], ds[j], dqn.data());
          }
        }
        if (gq) normalize_backward(q + b * a, q_sq, dqn.data(), a, gq + b * a);
      }
    }
  });

  // Phase 2: per reference point. Each task owns whole blocks of points and scans the slots in
  // (set, slot) order, so every sum runs in that order whichever task computes it, and the
  // rows of grad_x a task reads come in increasing address order.
  if (!(want.point_sums() || want.angles)) row_blocks = 0;
  at::parallel_for(0, row_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    const int64_t i_begin = block_begin * kRowsPerBlock;
    const int64_t i_end = std::min(n0, block_end * kRowsPerBlock);
    const int64_t rows = i_end - i_begin;
    std::vector<acc_t> s1(rows * d, 0), s0(rows * d, 0), dan(rows * a, 0);
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* qn = qn_all.data() + b * a;
      for (int64_t j = 0; j < nsel[b]; ++j) {
        const int64_t slot = b * n_max + j, r = idx[slot] - i_begin;
        if (r < 0 || r >= rows) continue;
        if (want.point_sums())
          accumulate_rows(gx + slot * d, m_all[slot], s1.data() + r * d, s0.data() + r * d, d);
        if (want.angles && !score_all)
          for (int64_t k = 0; k < a; ++k) dan[r * a + k] += ds_sel[slot] * qn[k];
      }
    }
    for (int64_t i = i_begin; i < i_end; ++i) {
      const int64_t r = i - i_begin;
      acc_t* dan_i = dan.data() + r * a;
      if (want.angles && score_all) {
        for (int64_t b = 0; b < B; ++b) {
          const acc_t dsi = ds_dense[b * n0 + i];
          const acc_t* qn = qn_all.data() + b * a;
          for (int64_t k = 0; k < a; ++k) dan_i[k] += dsi * qn[k];
        }
      }
      const acc_t* s1_i = s1.data() + r * d;
      const acc_t* s0_i = s0.data() + r * d;
      if (gt)
        for (int64_t k = 0; k < d; ++k)
          gt[i * d + k] = static_cast<scalar_t>(gw[k] * s1_i[k] + gb[k] * s0_i[k]);
      if (ga) normalize_backward(ang + i * a, an.sq_norms[i], dan_i, a, ga + i * a);
    }
    if (!want.film) return;
    // Film contributions t_i * S1_i, t_i * S0_i, summed per fixed block of points.
    for (int64_t i = i_begin; i < i_end; ++i) {
      acc_t* fp = film_rows.data() + (i / kRowsPerBlock) * 2 * d;
      const acc_t* s1_i = s1.data() + (i - i_begin) * d;
      const acc_t* s0_i = s0.data() + (i - i_begin) * d;
      const scalar_t* trow = tab + i * d;
      for (int64_t k = 0; k < d; ++k) {
        const acc_t tk = static_cast<acc_t>(trow[k]);
        fp[k] += tk * s1_i[k];
        fp[d + k] += tk * s0_i[k];
      }
    }
  });

  // FiLM: the block partial sums, in block order.
  if (!want.film) return;
  std::vector<acc_t> total(4 * d, 0);
  for (int64_t blk = 0; blk < set_blocks; ++blk)
    for (int64_t k = 0; k < 4 * d; ++k) total[k] += film_sets[blk * 4 * d + k];
  for (int64_t blk = 0; blk < row_blocks; ++blk)
    for (int64_t k = 0; k < 2 * d; ++k) total[k] += film_rows[blk * 2 * d + k];
  scalar_t* gf = g_film.data_ptr<scalar_t>();
  for (int64_t k = 0; k < 4 * d; ++k) gf[k] = static_cast<scalar_t>(total[k]);
}

using OptionalTensor = std::optional<Tensor>;

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor>
topn_create_backward_cpu(const Tensor& grad_x_, const Tensor& grad_weight_, const Tensor& query_,
                         const Tensor& angles_, const Tensor& table_, const Tensor& bias_,
                         const Tensor& film_, const Tensor& index_, c10::string_view score_norm,
                         std::array<bool, 5> output_mask) {
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
  TORCH_CHECK(at::isFloatingType(grad_x_.scalar_type()) &&
                  at::isFloatingType(grad_weight_.scalar_type()),
              "topn_create_backward: grad_x and grad_weight must be floating-point tensors");
  const Tensor index = index_.contiguous();
  const Tensor grad_x = grad_x_.to(query.scalar_type()).contiguous();
  const Tensor grad_weight = grad_weight_.to(query.scalar_type()).contiguous();

  // Selected slots of set b: the prefix of valid indices; the forward pads the rest with -1.
  std::vector<int64_t> nsel(B, 0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t j = 0;
    while (j < n_max && idx[b * n_max + j] >= 0) {
      TORCH_CHECK(idx[b * n_max + j] < n0, "topn_create_backward: index out of range");
      ++j;
    }
    nsel[b] = j;
    for (; j < n_max; ++j)
      TORCH_CHECK(idx[b * n_max + j] == -1,
                  "topn_create_backward: index must hold each set's selection, then -1 only");
  }

  const Wanted want{output_mask[0], output_mask[1], output_mask[2], output_mask[3],
                    output_mask[4]};
  auto empty_if = [](bool wanted, const Tensor& like) {
    return wanted ? at::empty_like(like) : Tensor();
  };
  Tensor g_query = empty_if(want.query, query), g_angles = empty_if(want.angles, angles),
         g_table = empty_if(want.table, table), g_bias = empty_if(want.bias, bias),
         g_film = empty_if(want.film, film);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "topn_create_backward_cpu", [&] {
        backward_kernel<scalar_t>(grad_x, grad_weight, query, angles, table, bias, film, index,
                                  nsel, score_all, want, g_query, g_angles, g_table, g_bias,
                                  g_film);
      });
  auto optional = [](const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; };
  return {optional(g_query), optional(g_angles), optional(g_table), optional(g_bias),
          optional(g_film)};
}

}  // namespace

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("_topn_create_cpu", &topn_create_cpu);
  m.impl("_topn_create_backward_cpu", &topn_create_backward_cpu);
}

}  // namespace topn_kernels
