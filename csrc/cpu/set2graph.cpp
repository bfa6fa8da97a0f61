// Set2Graph edge head on CPU (docs/operators.md, set2graph_logits): forward and backward of
//
//   out[b, i, j] = W2 relu(W1 cat(x_bi, x_bj) + b1) + b2     for i, j < lengths[b], else 0
//
// without the (B, n, n, h) pair activations. The first layer splits over the concatenation,
// W1 cat(x_i, x_j) + b1 = u_i + v_j with u = x W1a^T + b1 and v = x W1b^T (W1a = W1[:, :s],
// W1b = W1[:, s:]): two (B, n, h) products. The pairs are then visited tile by tile (4 rows i
// against vectors of columns j), relu(u_i + v_j) living in registers only:
//
//   forward   out_ij = W2 relu(u_i + v_j) + b2
//   backward  dh_ij = [u_i + v_j > 0] (W2^T g_ij)            (recomputed, g the upstream gradient)
//             grad_u_i = sum_j dh_ij, grad_v_j = sum_i dh_ij, grad_b2 = sum_ij g_ij,
//             grad_W2 = sum_ij g_ij relu(u_i + v_j)^T,
//             then grad_x_i = grad_u_i W1a + grad_v_i W1b, grad_W1a = sum_i grad_u_i x_i^T,
//             grad_W1b = sum_j grad_v_j x_j^T, grad_b1 = sum_i grad_u_i.
//
// Sets of a few points (n at most 1.5 vectors) would fill few lanes of a vector of columns: their
// backward runs pair by pair, vectorised over the hidden units instead, a whole set per call.
// The row-wise products (u, v, grad_x, grad_W1) are small blocked matrix products
// (set2graph_kernel.h, gemm).
//
// Padding is never read: rows past a set's length are neither converted nor projected (their
// u and v are zero), their pairs are not computed, and their gradient rows are written as 0.
//
// Determinism: no atomics; every sum runs over fixed blocks in a fixed order that depends on
// the shapes only, never on the number of threads:
//   - the forward writes each output element from one sum over p in increasing order;
//   - the backward of small sets runs tasks of whole sets; of large sets, tasks (set, chunk
//     of rows) (Chunks). A task owns grad_u of its rows (sums over the columns in order) and
//     writes its own partial sums of grad_v (over its rows), grad_W2 and grad_b2 (and, small
//     sets, of grad_W1 and grad_b1); those are then added in task order. Large sets sum
//     grad_W1 and grad_b1 over fixed blocks of real rows, then over the blocks in order.
// Memory beyond the output: u, v and their gradients ((B, n, h) each), and the partial sums of
// grad_v, at most kMaxPartialElements values.
// Accumulation in float (double for double inputs); outputs in the input dtype.
//
// Vectorised loops: set2graph_kernel.h, built here for the portable x86-64 instruction set,
// AVX2 and AVX-512F, the best one this CPU has chosen once per process
// (TOPN_KERNELS_PORTABLE=1 forces the portable one; TOPN_KERNELS_SET2GRAPH_ISA=default|avx2|
// avx512 caps the choice, to test each build on one machine). The builds may round sums over
// vector lanes in different orders, so their results can differ in the last bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "output_pool.h"

namespace topn_kernels {

namespace set2graph_default {
#define S2G_VBYTES 16
#define S2G_FWD_ROWS 2
#define S2G_BWD_GROUPS 2
#define S2G_SMALL_VECTORS 2
#include "set2graph_kernel.h"
#undef S2G_VBYTES
#undef S2G_FWD_ROWS
#undef S2G_BWD_GROUPS
#undef S2G_SMALL_VECTORS
}  // namespace set2graph_default

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S2G_X86_BUILDS 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace set2graph_avx2 {
#define S2G_VBYTES 32
#define S2G_FWD_ROWS 2
#define S2G_BWD_GROUPS 2
#define S2G_SMALL_VECTORS 1
#include "set2graph_kernel.h"
#undef S2G_VBYTES
#undef S2G_FWD_ROWS
#undef S2G_BWD_GROUPS
#undef S2G_SMALL_VECTORS
}  // namespace set2graph_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace set2graph_avx512 {
#define S2G_VBYTES 64
#define S2G_FWD_ROWS 4
#define S2G_BWD_GROUPS 4
#define S2G_SMALL_VECTORS 2
#include "set2graph_kernel.h"
#undef S2G_VBYTES
#undef S2G_FWD_ROWS
#undef S2G_BWD_GROUPS
#undef S2G_SMALL_VECTORS
}  // namespace set2graph_avx512
#pragma GCC pop_options
#endif

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// The build of the vectorised loops for this CPU
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Kernels {
  int64_t lanes;  // W: values per vector
  void (*gemm)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t);
  void (*forward_rows)(const T*, int64_t, const T*, int64_t, int64_t, const T*, const T*,
                       int64_t, T*, int64_t);
  void (*backward_rows)(const T*, int64_t, const T*, int64_t, int64_t, const T*, int64_t,
                        const T*, int64_t, T*, T*, T*);
  void (*small_backward)(const T*, const T*, int64_t, int64_t, const T*, int64_t, const T*, T*,
                         T*, T*);
};

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa chosen_isa() {
  static const Isa isa = [] {
    const char* portable = std::getenv("TOPN_KERNELS_PORTABLE");
    if (portable != nullptr && std::string(portable) == "1") return Isa::kDefault;
    Isa cap = Isa::kAvx512;
    if (const char* env = std::getenv("TOPN_KERNELS_SET2GRAPH_ISA")) {
      const std::string value(env);
      TORCH_CHECK_VALUE(value == "default" || value == "avx2" || value == "avx512",
                        "TOPN_KERNELS_SET2GRAPH_ISA must be default, avx2 or avx512, got '",
                        value, "'");
      cap = value == "default" ? Isa::kDefault : value == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    }
#if defined(S2G_X86_BUILDS)
    if (cap >= Isa::kAvx512 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (cap >= Isa::kAvx2 && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

#define S2G_KERNELS(ns)                                                                    \
  Kernels<T> {                                                                             \
    ns::lanes<T>(), &ns::gemm<T>, &ns::forward_rows<T>, &ns::backward_rows<T>,             \
        &ns::small_backward<T>                                                             \
  }

template <typename T>
Kernels<T> kernels() {
#if defined(S2G_X86_BUILDS)
  switch (chosen_isa()) {
    case Isa::kAvx512: return S2G_KERNELS(set2graph_avx512);
    case Isa::kAvx2: return S2G_KERNELS(set2graph_avx2);
    default: break;
  }
#endif
  return S2G_KERNELS(set2graph_default);
}

#undef S2G_KERNELS

// ---------------------------------------------------------------------------------------------
// Shapes, buffers, weights and the projections u, v
// ---------------------------------------------------------------------------------------------

constexpr int64_t kRowBlock = 4;            // rows of one pair tile (the kernels' 4)
constexpr int64_t kProjectRows = 16;        // rows per task of the row-wise products
constexpr int64_t kWeightGradRows = 256;    // real rows per block of the sums of grad_W1, b1
constexpr int64_t kMinBackwardTasks = 64;   // (set, chunk of rows) units wanted, large sets
constexpr int64_t kTaskPairs = 1024;        // pairs per backward task, small sets
constexpr int64_t kMaxPartialElements = int64_t(16) << 20;  // bound of the grad_v partials
constexpr int64_t kGrainWork = int64_t(1) << 18;  // multiply-adds worth a thread (~0.1 ms)
constexpr int64_t kReduceAdds = int64_t(1) << 22;  // vectorised additions worth a thread

// at::parallel_for's grain for tasks of about `work` multiply-adds each: a loop too small to
// pay for waking threads runs on the calling one. (Tasks are fixed by the shapes: the grain
// changes which thread runs a task, never its result.)
int64_t grain(int64_t work) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work));
}

struct Dims {
  int64_t B, n, s, h, k;
  int64_t W = 0;       // values per vector
  int64_t nI = 0;      // rows of u per set: n rounded up to kRowBlock
  int64_t G = 0;       // blocks of W columns per set: ceil(n / W)
  int64_t hp = 0;      // h rounded up to W: the row length of u, v and their gradients
  bool small = false;  // backward vectorised over hidden units (sets of a few points)

  void complete(int64_t lanes) {
    W = lanes;
    nI = (n + kRowBlock - 1) / kRowBlock * kRowBlock;
    G = (n + W - 1) / W;
    hp = (h + W - 1) / W * W;
    small = n <= W + W / 2;
  }
};

// Scratch memory. Blocks of 1 MiB and more come from the output pool (csrc/cpu/output_pool.cpp),
// which keeps them for the next call of the same size: no fresh pages to fault in at every
// training step.
template <typename T>
struct Buffer {
  Tensor tensor;
  T* ptr = nullptr;
  explicit Buffer(int64_t count) {
    if (count <= 0) return;
    tensor = empty_pooled({count}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    ptr = tensor.data_ptr<T>();
  }
  T* data() const { return ptr; }
};

template <typename T>
struct Weights {
  std::vector<T> w1t;  // (s, 2h): w1t[q][p] = W1[p][q], w1t[q][h + p] = W1[p][s + q]
  std::vector<T> w1s;  // (2h, s): row p = W1[p][:s], row h + p = W1[p][s:]
  std::vector<T> b1, w2, b2;
  std::vector<T> w2p;  // (k, hp): W2 with rows padded by zeros to hp
};

template <typename scalar_t, typename T>
Weights<T> convert_weights(const Tensor& weight1, const Tensor& bias1, const Tensor& weight2,
                           const Tensor& bias2, const Dims& d) {
  Weights<T> w;
  const scalar_t* w1 = weight1.data_ptr<scalar_t>();
  w.w1t.resize(d.s * 2 * d.h);
  w.w1s.resize(2 * d.h * d.s);
  for (int64_t p = 0; p < d.h; ++p)
    for (int64_t q = 0; q < d.s; ++q) {
      const T a = static_cast<T>(w1[p * 2 * d.s + q]);
      const T b = static_cast<T>(w1[p * 2 * d.s + d.s + q]);
      w.w1t[q * 2 * d.h + p] = a;
      w.w1t[q * 2 * d.h + d.h + p] = b;
      w.w1s[p * d.s + q] = a;
      w.w1s[(d.h + p) * d.s + q] = b;
    }
  auto to_acc = [](const Tensor& t) {
    const scalar_t* p = t.data_ptr<scalar_t>();
    std::vector<T> out(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<T>(p[i]);
    return out;
  };
  w.b1 = to_acc(bias1);
  w.w2 = to_acc(weight2);
  w.b2 = to_acc(bias2);
  w.w2p.assign(d.k * d.hp, T(0));
  for (int64_t c = 0; c < d.k; ++c)
    std::copy(w.w2.begin() + c * d.h, w.w2.begin() + (c + 1) * d.h, w.w2p.begin() + c * d.hp);
  return w;
}

// (set, first row) of every block of kProjectRows real rows.
std::vector<std::pair<int64_t, int64_t>> row_tasks(const int64_t* len, int64_t B) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < len[b]; i += kProjectRows) tasks.emplace_back(b, i);
  return tasks;
}

// Per-thread scratch of the row-wise products: kProjectRows rows of x and of [u, v].
template <typename T>
struct RowScratch {
  std::vector<T> a, c;
  explicit RowScratch(const Dims& d) : a(kProjectRows * d.s), c(kProjectRows * 2 * d.h) {}
};

// Rows [i0, i0 + rows) (rows <= kProjectRows) of one set, xs its (n, s) points:
// u_i = W1a x_i + b1 into u (rows of hp values, zero past h), v_i = W1b x_i into vb (the set's
// column blocks, vb[((i / W) * h + p) * W + i % W]) and/or vrow (rows of hp, zero past h).
template <typename scalar_t, typename T>
void project_rows(const scalar_t* xs, int64_t i0, int64_t rows, const Dims& d,
                  const Weights<T>& w, const Kernels<T>& kern, RowScratch<T>& scratch, T* u,
                  T* vb, T* vrow) {
  const int64_t s = d.s, h = d.h, hp = d.hp, W = d.W;
  T* a = scratch.a.data();
  T* c = scratch.c.data();
  for (int64_t e = 0; e < rows * s; ++e) a[e] = static_cast<T>(xs[i0 * s + e]);
  kern.gemm(a, s, rows, w.w1t.data(), 2 * h, s, 2 * h, c, 2 * h);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const T* cr = c + r * 2 * h;
    T* ur = u + i * hp;
    for (int64_t p = 0; p < h; ++p) ur[p] = cr[p] + w.b1[p];
    std::fill(ur + h, ur + hp, T(0));
    if (vb != nullptr) {
      T* vr = vb + (i / W) * h * W + i % W;
      for (int64_t p = 0; p < h; ++p) vr[p * W] = cr[h + p];
    }
    if (vrow != nullptr) {
      T* vr = vrow + i * hp;
      std::copy(cr + h, cr + 2 * h, vr);
      std::fill(vr + h, vr + hp, T(0));
    }
  }
}

// The zeros that the pair tiles read past a set of L points: u rows up to the end of the last
// block of kRowBlock rows, and the columns of vb's last block past L.
template <typename T>
void zero_past_set(int64_t L, const Dims& d, T* u, T* vb) {
  const int64_t end_row = std::min(d.nI, (L + kRowBlock - 1) / kRowBlock * kRowBlock);
  std::fill(u + L * d.hp, u + end_row * d.hp, T(0));
  if (vb == nullptr || L % d.W == 0) return;
  T* last = vb + (L / d.W) * d.h * d.W;  // the block holding column L
  for (int64_t p = 0; p < d.h; ++p) std::fill(last + p * d.W + L % d.W, last + (p + 1) * d.W, T(0));
}

// u (B, nI, hp) and v of every set (vb (B, G, h, W) and/or vrow (B, n, hp)), parallel over
// blocks of kProjectRows rows. Padding rows of x are not read.
template <typename scalar_t, typename T>
void project(const scalar_t* x, const int64_t* len, const Dims& d, const Weights<T>& w,
             const Kernels<T>& kern, T* u, T* vb, T* vrow) {
  const auto tasks = row_tasks(len, d.B);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, ntasks, grain(kProjectRows * d.s * 2 * d.h), [&](int64_t begin,
                                                                       int64_t end) {
    RowScratch<T> scratch(d);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, i0] = tasks[t];
      const int64_t L = len[b], rows = std::min(kProjectRows, L - i0);
      T* ub = u + b * d.nI * d.hp;
      T* vbb = vb == nullptr ? nullptr : vb + b * d.G * d.h * d.W;
      project_rows(x + b * d.n * d.s, i0, rows, d, w, kern, scratch, ub,
                   vbb, vrow == nullptr ? nullptr : vrow + b * d.n * d.hp);
      if (i0 + rows == L) zero_past_set(L, d, ub, vbb);  // the set's last block
    }
  });
}

Dims check_and_dims(const Tensor& x, const Tensor& weight1, const Tensor& bias1,
                    const Tensor& weight2, const Tensor& bias2, const Tensor& lengths,
                    const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, n, s), got ", x.sizes());
  const int64_t B = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == 2 * s, op, ": weight1 must be (h, ",
              2 * s, "), got ", weight1.sizes());
  const int64_t h = weight1.size(0);
  TORCH_CHECK(bias1.dim() == 1 && bias1.size(0) == h, op, ": bias1 must be (", h, ",)");
  TORCH_CHECK(weight2.dim() == 2 && weight2.size(1) == h, op, ": weight2 must be (k, ", h,
              "), got ", weight2.sizes());
  const int64_t k = weight2.size(0);
  TORCH_CHECK(bias2.dim() == 1 && bias2.size(0) == k, op, ": bias2 must be (", k, ",)");
  for (const Tensor* t : {&weight1, &bias1, &weight2, &bias2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op,
                ": all float inputs must share one dtype");
  for (const Tensor* t : {&x, &weight1, &bias1, &weight2, &bias2, &lengths})
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU kernel): inputs must be CPU tensors");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong,
              op, ": lengths must be an int64 tensor of shape (", B, ",)");
  // The Python API leaves this value check to the kernel (no extra pass, no sync): a
  // ValueError with the message of topn_kernels/ops/_checks.py.
  const Tensor len = lengths.contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= n, "lengths must be in [0, the padded set size=", n,
                      "], got ", l[b]);
  return {B, n, s, h, k};
}

// Sets per task where whole sets are tasks (small sets): about kTaskPairs pairs each.
int64_t sets_per_task(const Dims& d) {
  return std::max<int64_t>(1, kTaskPairs / std::max<int64_t>(1, d.n * d.n));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Rows [i0, i0 + 4) of set b's output (the rows below n): the pairs of real rows from the
// tile (tile[(ti * n + j) * k + c]), zeros elsewhere.
template <typename scalar_t, typename T>
void write_rows(scalar_t* out, const Dims& d, int64_t b, int64_t i0, int64_t L, const T* tile) {
  const int64_t n = d.n, k = d.k;
  for (int64_t ti = 0; ti < kRowBlock && i0 + ti < n; ++ti) {
    const int64_t i = i0 + ti;
    scalar_t* row = out + (b * n + i) * n * k;
    int64_t real = 0;
    if (i < L) {
      real = L * k;
      const T* tr = tile + ti * n * k;
      for (int64_t e = 0; e < real; ++e) row[e] = static_cast<scalar_t>(tr[e]);
    }
    std::fill(row + real, row + n * k, scalar_t(0));
  }
}

template <typename scalar_t>
void forward_kernel(const Tensor& x, const Tensor& weight1, const Tensor& bias1,
                    const Tensor& weight2, const Tensor& bias2, const int64_t* len, Dims d,
                    Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const Kernels<T> kern = kernels<T>();
  d.complete(kern.lanes);
  const Weights<T> w = convert_weights<scalar_t, T>(weight1, bias1, weight2, bias2, d);
  const int64_t n = d.n, h = d.h, hp = d.hp, k = d.k, blocks = d.nI / kRowBlock;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();

  if (d.small) {  // whole sets per task: one parallel loop, set by set in each task
    const int64_t per_task = sets_per_task(d), tasks = (d.B + per_task - 1) / per_task;
    at::parallel_for(0, tasks, grain(per_task * n * n * h * k), [&](int64_t begin, int64_t end) {
      RowScratch<T> scratch(d);
      std::vector<T> u(d.nI * hp), vb(d.G * h * d.W), tile(kRowBlock * n * k);
      for (int64_t b = begin * per_task; b < std::min(d.B, end * per_task); ++b) {
        const int64_t L = len[b];
        for (int64_t i0 = 0; i0 < L; i0 += kProjectRows)
          project_rows(xp + b * n * d.s, i0, std::min(kProjectRows, L - i0), d, w, kern,
                       scratch, u.data(), vb.data(), static_cast<T*>(nullptr));
        zero_past_set(L, d, u.data(), vb.data());
        for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
          if (i0 < L)
            kern.forward_rows(u.data() + i0 * hp, hp, vb.data(), h, L, w.w2.data(),
                              w.b2.data(), k, tile.data(), n);
          write_rows(o, d, b, i0, L, tile.data());
        }
      }
    });
    return;
  }

  const Buffer<T> u(d.B * d.nI * hp), vb(d.B * d.G * h * d.W);
  project<scalar_t, T>(xp, len, d, w, kern, u.data(), vb.data(), nullptr);
  at::parallel_for(0, d.B * blocks, grain(kRowBlock * n * h * k), [&](int64_t begin, int64_t end) {
    std::vector<T> tile(kRowBlock * n * k);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, i0 = (t % blocks) * kRowBlock, L = len[b];
      if (i0 < L)
        kern.forward_rows(u.data() + (b * d.nI + i0) * hp, hp, vb.data() + b * d.G * h * d.W, h,
                          L, w.w2.data(), w.b2.data(), k, tile.data(), n);
      write_rows(o, d, b, i0, L, tile.data());
    }
  });
}

Tensor set2graph_logits_cpu(const Tensor& x_, const Tensor& weight1_, const Tensor& bias1_,
                            const Tensor& weight2_, const Tensor& bias2_, const Tensor& lengths_) {
  const Dims d =
      check_and_dims(x_, weight1_, bias1_, weight2_, bias2_, lengths_, "set2graph_logits");
  const Tensor x = x_.contiguous(), weight1 = weight1_.contiguous(), bias1 = bias1_.contiguous(),
               weight2 = weight2_.contiguous(), bias2 = bias2_.contiguous(),
               lengths = lengths_.contiguous();
  Tensor out = empty_pooled({d.B, d.n, d.n, d.k}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "set2graph_logits_cpu", [&] {
                                    forward_kernel<scalar_t>(x, weight1, bias1, weight2, bias2,
                                                             lengths.data_ptr<int64_t>(), d, out);
                                  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

struct Wanted {
  bool x, weight1, bias1, weight2, bias2;
  bool pairs() const { return x || weight1 || bias1 || weight2; }  // the pair loop
  bool first_layer() const { return x || weight1 || bias1; }
};

struct Grads {
  Tensor x, weight1, bias1, weight2, bias2;
};

// The upstream gradient, read where it lies (any strides, the input dtype).
template <typename scalar_t>
struct Upstream {
  const scalar_t* p;
  int64_t s0, s1, s2, s3;
  explicit Upstream(const Tensor& g)
      : p(g.data_ptr<scalar_t>()),
        s0(g.stride(0)),
        s1(g.stride(1)),
        s2(g.stride(2)),
        s3(g.stride(3)) {}
  const scalar_t* row(int64_t b, int64_t i) const { return p + b * s0 + i * s1; }
};

// Per-task partial sums of the weight gradients, added in task order at the end.
template <typename T>
struct WeightPartials {
  int64_t tasks, k, h, s;
  bool has_w1, has_b1;            // partial sums of grad_W1, grad_b1 kept here
  std::vector<T> w2, b2, w1, b1;  // (tasks, k, h), (tasks, k), (tasks, 2h, s), (tasks, h)
  WeightPartials(int64_t tasks_, const Dims& d, const Wanted& want, bool with_w1)
      : tasks(tasks_),
        k(d.k),
        h(d.h),
        s(d.s),
        has_w1(with_w1 && want.weight1),
        has_b1(with_w1 && want.bias1),
        w2(want.weight2 ? tasks_ * d.k * d.h : 0),
        b2(tasks_ * d.k),
        w1(has_w1 ? tasks_ * 2 * d.h * d.s : 0),
        b1(has_b1 ? tasks_ * d.h : 0) {}

  // sum over the tasks, in task order, of n values per task -> out[where(e)] (scalar_t);
  // vectorised over the values, on the calling thread unless there are many
  template <typename scalar_t>
  static void reduce(const std::vector<T>& part, int64_t tasks, int64_t n, scalar_t* out,
                     const std::function<int64_t(int64_t)>& where) {
    const int64_t cols = std::max<int64_t>(1, kReduceAdds / std::max<int64_t>(1, tasks));
    at::parallel_for(0, n, cols, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(end - begin, T(0));
      for (int64_t t = 0; t < tasks; ++t) {
        const T* row = part.data() + t * n;
        for (int64_t e = begin; e < end; ++e) acc[e - begin] += row[e];
      }
      for (int64_t e = begin; e < end; ++e) out[where(e)] = static_cast<scalar_t>(acc[e - begin]);
    });
  }

  template <typename scalar_t>
  void write(Grads& out, const Wanted& want) const {
    auto same = [](int64_t e) { return e; };
    if (want.bias2) reduce(b2, tasks, k, out.bias2.data_ptr<scalar_t>(), same);
    if (want.weight2) reduce(w2, tasks, k * h, out.weight2.data_ptr<scalar_t>(), same);
    if (has_b1) reduce(b1, tasks, h, out.bias1.data_ptr<scalar_t>(), same);
    if (has_w1) {  // rows p of [grad_W1a; grad_W1b] (2h, s) -> weight1 (h, 2s)
      const int64_t hh = h, ss = s;
      reduce(w1, tasks, 2 * h * s, out.weight1.data_ptr<scalar_t>(), [hh, ss](int64_t e) {
        const int64_t row = e / ss, q = e % ss;
        return (row % hh) * 2 * ss + (row / hh) * ss + q;
      });
    }
  }
};

// Small sets, whole sets per task (sets_per_task of them), each set through every step in one
// parallel loop: its projections, its pairs (vectorised over hidden units), then its rows of
// grad_x and its terms of grad_W1, grad_b1 (added to the task's partial sums set by set).
template <typename scalar_t>
void backward_small_sets(const Tensor& grad_out, const scalar_t* xp, const int64_t* len,
                         const Dims& d, const Wanted& want,
                         const Kernels<at::opmath_type<scalar_t>>& kern,
                         const Weights<at::opmath_type<scalar_t>>& w, Grads& out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = d.n, s = d.s, h = d.h, hp = d.hp, k = d.k;
  const int64_t per_task = sets_per_task(d), tasks = (d.B + per_task - 1) / per_task;
  const Upstream<scalar_t> g(grad_out);
  WeightPartials<T> part(tasks, d, want, true);
  scalar_t* gx = want.x ? out.x.data_ptr<scalar_t>() : nullptr;
  const int64_t work = 2 * per_task * n * n * h * std::max<int64_t>(k, 1);
  at::parallel_for(0, tasks, grain(work), [&](int64_t begin, int64_t end) {
    RowScratch<T> scratch(d);
    std::vector<T> u(d.nI * hp), v(n * hp), gu(n * hp), gv(n * hp), gbuf(n * n * k),
        gw2(k * hp), guv(n * 2 * h), gxs(n * s), at_(2 * h * n), xr(n * s), w1c(2 * h * s);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(gw2.begin(), gw2.end(), T(0));
      T* gb2 = part.b2.data() + t * k;
      T* gw1 = part.has_w1 ? part.w1.data() + t * 2 * h * s : nullptr;
      T* gb1 = part.has_b1 ? part.b1.data() + t * h : nullptr;
      std::fill(gb2, gb2 + k, T(0));
      if (gw1 != nullptr) std::fill(gw1, gw1 + 2 * h * s, T(0));
      if (gb1 != nullptr) std::fill(gb1, gb1 + h, T(0));
      for (int64_t b = t * per_task; b < std::min(d.B, (t + 1) * per_task); ++b) {
        const int64_t L = len[b];
        const scalar_t* xs = xp + b * n * s;
        if (gx != nullptr) std::fill(gx + (b * n + L) * s, gx + (b + 1) * n * s, scalar_t(0));
        // g (L x L x k); grad_b2 summed in (i, j, c) order
        for (int64_t i = 0; i < L; ++i) {
          const scalar_t* gi = g.row(b, i);
          for (int64_t j = 0; j < L; ++j)
            for (int64_t c = 0; c < k; ++c) {
              const T value = static_cast<T>(gi[j * g.s2 + c * g.s3]);
              gbuf[(i * L + j) * k + c] = value;
              gb2[c] += value;
            }
        }
        if (!want.pairs() || L == 0) continue;
        for (int64_t i0 = 0; i0 < L; i0 += kProjectRows)
          project_rows(xs, i0, std::min(kProjectRows, L - i0), d, w, kern, scratch, u.data(),
                       static_cast<T*>(nullptr), v.data());
        std::fill(gv.begin(), gv.begin() + L * hp, T(0));
        kern.small_backward(u.data(), v.data(), hp, L, gbuf.data(), k, w.w2p.data(), gu.data(),
                            gv.data(), gw2.data());
        if (!want.first_layer()) continue;
        for (int64_t i = 0; i < L; ++i) {  // [grad_u_i, grad_v_i]
          std::copy(gu.begin() + i * hp, gu.begin() + i * hp + h, guv.begin() + i * 2 * h);
          std::copy(gv.begin() + i * hp, gv.begin() + i * hp + h, guv.begin() + i * 2 * h + h);
        }
        if (gx != nullptr) {  // grad_x_i = [grad_u_i, grad_v_i] @ [W1a; W1b]
          kern.gemm(guv.data(), 2 * h, L, w.w1s.data(), s, 2 * h, s, gxs.data(), s);
          for (int64_t e = 0; e < L * s; ++e) gx[b * n * s + e] = static_cast<scalar_t>(gxs[e]);
        }
        if (gb1 != nullptr)
          for (int64_t i = 0; i < L; ++i)
            for (int64_t p = 0; p < h; ++p) gb1[p] += guv[i * 2 * h + p];
        if (gw1 != nullptr) {  // [grad_u; grad_v]^T x of the set, added to the task's sum
          for (int64_t i = 0; i < L; ++i)
            for (int64_t p = 0; p < 2 * h; ++p) at_[p * L + i] = guv[i * 2 * h + p];
          for (int64_t e = 0; e < L * s; ++e) xr[e] = static_cast<T>(xs[e]);
          kern.gemm(at_.data(), L, 2 * h, xr.data(), s, L, s, w1c.data(), s);
          for (int64_t e = 0; e < 2 * h * s; ++e) gw1[e] += w1c[e];
        }
      }
      if (want.weight2)
        for (int64_t c = 0; c < k; ++c)
          std::copy(gw2.begin() + c * hp, gw2.begin() + c * hp + h,
                    part.w2.begin() + (t * k + c) * h);
    }
  });
  part.template write<scalar_t>(out, want);
}

// How the pair loop of large sets is cut into tasks; a function of the shapes only, so that no
// sum depends on the number of threads: a task is (set, chunk of CI rows), enough of them to
// share among threads, with a bound on the memory of the grad_v partial sums (one per task).
struct Chunks {
  int64_t chunks, CI, tasks;

  explicit Chunks(const Dims& d) {
    const int64_t row_blocks = std::max<int64_t>(1, d.nI / kRowBlock);
    const int64_t per_chunk = std::max<int64_t>(1, d.B * d.G * d.h * d.W);
    chunks = (kMinBackwardTasks + d.B - 1) / std::max<int64_t>(1, d.B);
    chunks = std::min({chunks, row_blocks, kMaxPartialElements / per_chunk});
    chunks = std::max<int64_t>(1, chunks);
    CI = (row_blocks + chunks - 1) / chunks * kRowBlock;
    chunks = (row_blocks * kRowBlock + CI - 1) / CI;
    tasks = d.B * chunks;
  }
};

// Large sets: the projections of every set, the pair loop in tasks of (set, chunk of rows)
// (vectorised over columns), then grad_v from the chunks' partial sums, grad_x, and grad_W1,
// grad_b1 over fixed blocks of kWeightGradRows real rows.
template <typename scalar_t>
void backward_large_sets(const Tensor& grad_out, const scalar_t* xp, const int64_t* len,
                         const Dims& d, const Wanted& want,
                         const Kernels<at::opmath_type<scalar_t>>& kern,
                         const Weights<at::opmath_type<scalar_t>>& w, Grads& out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = d.B, n = d.n, s = d.s, h = d.h, hp = d.hp, k = d.k, W = d.W;
  const bool pairs = want.pairs();
  const Chunks part(d);
  const int64_t gv_part_size = d.G * h * W, ldg = d.G * W;
  const Buffer<T> u(pairs ? B * d.nI * hp : 0), vb(pairs ? B * d.G * h * W : 0),
      gu(pairs ? B * n * hp : 0), gv(pairs ? B * n * hp : 0),
      gv_part(pairs ? part.tasks * gv_part_size : 0);
  if (pairs) project<scalar_t, T>(xp, len, d, w, kern, u.data(), vb.data(), nullptr);
  WeightPartials<T> wpart(part.tasks, d, want, false);
  const Upstream<scalar_t> g(grad_out);

  const int64_t task_work = 2 * part.CI * n * h * std::max<int64_t>(k, 1);
  at::parallel_for(0, part.tasks, grain(task_work), [&](int64_t begin, int64_t end) {
    std::vector<T> gbuf(k * kRowBlock * ldg), gu_lanes(kRowBlock * h * W), gw2_lanes(k * h * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / part.chunks, L = len[b];
      const int64_t r0 = (t % part.chunks) * part.CI, r1 = std::min(r0 + part.CI, L);
      const int64_t groups = (L + W - 1) / W;
      T* gb2 = wpart.b2.data() + t * k;
      std::fill(gb2, gb2 + k, T(0));
      std::fill(gw2_lanes.begin(), gw2_lanes.end(), T(0));
      T* gvp = pairs ? gv_part.data() + t * gv_part_size : nullptr;
      if (pairs) std::fill(gvp, gvp + groups * h * W, T(0));
      for (int64_t i0 = r0; i0 < r1; i0 += kRowBlock) {
        // g of 4 rows, class-major: gbuf[(c * 4 + ti) * ldg + j], 0 past the chunk and the
        // set; grad_b2 summed over the task's pairs in (i, j, c) order
        for (int64_t ti = 0; ti < kRowBlock; ++ti) {
          const int64_t i = i0 + ti, real = i < r1 ? L : 0;
          T* dst = gbuf.data() + ti * ldg;
          const scalar_t* src = g.row(b, i);
          for (int64_t j = 0; j < real; ++j)
            for (int64_t c = 0; c < k; ++c) {
              const T value = static_cast<T>(src[j * g.s2 + c * g.s3]);
              dst[c * kRowBlock * ldg + j] = value;
              gb2[c] += value;
            }
          for (int64_t c = 0; c < k; ++c)
            std::fill(dst + c * kRowBlock * ldg + real, dst + c * kRowBlock * ldg + groups * W,
                      T(0));
        }
        if (!pairs) continue;
        std::fill(gu_lanes.begin(), gu_lanes.end(), T(0));
        kern.backward_rows(u.data() + (b * d.nI + i0) * hp, hp, vb.data() + b * d.G * h * W, h,
                           L, gbuf.data(), ldg, w.w2.data(), k, gu_lanes.data(), gvp,
                           gw2_lanes.data());
        for (int64_t ti = 0; ti < kRowBlock && i0 + ti < r1; ++ti) {
          T* gur = gu.data() + (b * n + i0 + ti) * hp;
          for (int64_t p = 0; p < h; ++p) {
            const T* lanes = gu_lanes.data() + (ti * h + p) * W;
            T acc = 0;
            for (int64_t l = 0; l < W; ++l) acc += lanes[l];
            gur[p] = acc;
          }
        }
      }
      if (!want.weight2) continue;
      for (int64_t e = 0; e < k * h; ++e) {
        const T* lanes = gw2_lanes.data() + e * W;
        T acc = 0;
        for (int64_t l = 0; l < W; ++l) acc += lanes[l];
        wpart.w2[t * k * h + e] = acc;
      }
    }
  });
  wpart.template write<scalar_t>(out, want);
  if (!want.first_layer()) return;

  // grad_v on real rows: the set's chunk partials in chunk order.
  at::parallel_for(0, B, grain(n * h * part.chunks), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = len[b], used = L > 0 ? (L + part.CI - 1) / part.CI : 0;
      for (int64_t j = 0; j < L; ++j) {
        T* gvr = gv.data() + (b * n + j) * hp;
        for (int64_t ch = 0; ch < used; ++ch) {
          const T* src =
              gv_part.data() + (b * part.chunks + ch) * gv_part_size + (j / W) * h * W + j % W;
          if (ch == 0)
            for (int64_t p = 0; p < h; ++p) gvr[p] = src[p * W];
          else
            for (int64_t p = 0; p < h; ++p) gvr[p] += src[p * W];
        }
      }
    }
  });

  if (want.x) {  // grad_x_i = [grad_u_i, grad_v_i] @ [W1a; W1b], 0 on padding rows
    scalar_t* gx = out.x.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      std::fill(gx + (b * n + len[b]) * s, gx + (b + 1) * n * s, scalar_t(0));
    const auto rtasks = row_tasks(len, B);
    const int64_t ntasks = static_cast<int64_t>(rtasks.size()), work = kProjectRows * 2 * h * s;
    at::parallel_for(0, ntasks, grain(work), [&](int64_t begin, int64_t end) {
      std::vector<T> a(kProjectRows * 2 * h), c(kProjectRows * s);
      for (int64_t t = begin; t < end; ++t) {
        const auto [b, i0] = rtasks[t];
        const int64_t rows = std::min(kProjectRows, len[b] - i0);
        for (int64_t r = 0; r < rows; ++r) {
          const T* gur = gu.data() + (b * n + i0 + r) * hp;
          const T* gvr = gv.data() + (b * n + i0 + r) * hp;
          std::copy(gur, gur + h, a.begin() + r * 2 * h);
          std::copy(gvr, gvr + h, a.begin() + r * 2 * h + h);
        }
        kern.gemm(a.data(), 2 * h, rows, w.w1s.data(), s, 2 * h, s, c.data(), s);
        scalar_t* dst = gx + (b * n + i0) * s;
        for (int64_t e = 0; e < rows * s; ++e) dst[e] = static_cast<scalar_t>(c[e]);
      }
    });
  }
  if (!want.weight1 && !want.bias1) return;

  // grad_W1 = [grad_u; grad_v]^T x and grad_b1 = sum grad_u over blocks of kWeightGradRows real
  // rows (the sets one after the other), then over the blocks in order.
  std::vector<int64_t> offsets(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) offsets[b + 1] = offsets[b] + len[b];
  const int64_t real = offsets[B], wblocks = (real + kWeightGradRows - 1) / kWeightGradRows;
  WeightPartials<T> rows_part(wblocks, d, {false, want.weight1, want.bias1, false, false}, true);
  const int64_t block_work = kWeightGradRows * 2 * h * s;
  at::parallel_for(0, wblocks, grain(block_work), [&](int64_t begin, int64_t end) {
    std::vector<T> at_(2 * h * kWeightGradRows), xr(kWeightGradRows * s);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t f0 = blk * kWeightGradRows, rows = std::min(kWeightGradRows, real - f0);
      int64_t b = std::upper_bound(offsets.begin(), offsets.end(), f0) - offsets.begin() - 1;
      T* gb1 = want.bias1 ? rows_part.b1.data() + blk * h : nullptr;
      if (gb1 != nullptr) std::fill(gb1, gb1 + h, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        while (f0 + r >= offsets[b + 1]) ++b;
        const int64_t i = f0 + r - offsets[b];
        const T* gur = gu.data() + (b * n + i) * hp;
        const T* gvr = gv.data() + (b * n + i) * hp;
        if (gb1 != nullptr)
          for (int64_t p = 0; p < h; ++p) gb1[p] += gur[p];
        if (!want.weight1) continue;
        for (int64_t p = 0; p < h; ++p) {
          at_[p * rows + r] = gur[p];
          at_[(h + p) * rows + r] = gvr[p];
        }
        const scalar_t* xs = xp + (b * n + i) * s;
        for (int64_t q = 0; q < s; ++q) xr[r * s + q] = static_cast<T>(xs[q]);
      }
      if (want.weight1)
        kern.gemm(at_.data(), rows, 2 * h, xr.data(), s, rows, s,
                  rows_part.w1.data() + blk * 2 * h * s, s);
    }
  });
  rows_part.template write<scalar_t>(out, {false, want.weight1, want.bias1, false, false});
}

template <typename scalar_t>
void backward_kernel(const Tensor& grad_out, const Tensor& x, const Tensor& weight1,
                     const Tensor& bias1, const Tensor& weight2, const Tensor& bias2,
                     const int64_t* len, Dims d, Wanted want, Grads& out) {
  using T = at::opmath_type<scalar_t>;
  const Kernels<T> kern = kernels<T>();
  d.complete(kern.lanes);
  const Weights<T> w = convert_weights<scalar_t, T>(weight1, bias1, weight2, bias2, d);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  if (d.small)
    backward_small_sets<scalar_t>(grad_out, xp, len, d, want, kern, w, out);
  else
    backward_large_sets<scalar_t>(grad_out, xp, len, d, want, kern, w, out);
}

using OptionalTensor = std::optional<Tensor>;

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor>
set2graph_logits_backward_cpu(const Tensor& grad_out_, const Tensor& x_, const Tensor& weight1_,
                              const Tensor& bias1_, const Tensor& weight2_, const Tensor& bias2_,
                              const Tensor& lengths_, std::array<bool, 5> output_mask) {
  const Dims d = check_and_dims(x_, weight1_, bias1_, weight2_, bias2_, lengths_,
                                "set2graph_logits_backward");
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({d.B, d.n, d.n, d.k}),
              "set2graph_logits_backward: grad_out must be (B, n, n, k) = (", d.B, ", ", d.n,
              ", ", d.n, ", ", d.k, "), got ", grad_out_.sizes());
  TORCH_CHECK(grad_out_.device().is_cpu(),
              "set2graph_logits_backward (CPU kernel): grad_out must be a CPU tensor");
  const Tensor x = x_.contiguous(), weight1 = weight1_.contiguous(), bias1 = bias1_.contiguous(),
               weight2 = weight2_.contiguous(), bias2 = bias2_.contiguous(),
               lengths = lengths_.contiguous();
  // Any strides (an expanded gradient is read as it is); only another dtype is converted.
  const Tensor grad_out =
      grad_out_.scalar_type() == x.scalar_type() ? grad_out_ : grad_out_.to(x.scalar_type());
  const Wanted want{output_mask[0], output_mask[1], output_mask[2], output_mask[3],
                    output_mask[4]};
  auto empty_if = [](bool wanted, const Tensor& like) {
    return wanted ? at::empty_like(like, at::MemoryFormat::Contiguous) : Tensor();
  };
  Grads grads{empty_if(want.x, x), empty_if(want.weight1, weight1), empty_if(want.bias1, bias1),
              empty_if(want.weight2, weight2), empty_if(want.bias2, bias2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "set2graph_logits_backward_cpu", [&] {
                                    backward_kernel<scalar_t>(grad_out, x, weight1, bias1,
                                                              weight2, bias2,
                                                              lengths.data_ptr<int64_t>(), d,
                                                              want, grads);
                                  });
  auto optional = [](const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; };
  return {optional(grads.x), optional(grads.weight1), optional(grads.bias1),
          optional(grads.weight2), optional(grads.bias2)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(topn_kernels, m) {
  // CPU kernels of the op topn_kernels::set2graph_logits, which
  // topn_kernels/ops/set2graph_op.py defines with its fake kernel and autograd
  // (docs/operators.md, set2graph_logits): plain kernels, called by that op only. x (B, n, s),
  // weight1 (h, 2s), bias1 (h,), weight2 (k, h), bias2 (k,), lengths (B,) int64 in [0, n];
  // out (B, n, n, k).
  m.def(
      "_set2graph_logits_cpu(Tensor x, Tensor weight1, Tensor bias1, Tensor weight2, "
      "Tensor bias2, Tensor lengths) -> Tensor");
  // Gradients of x, weight1, bias1, weight2, bias2 (None where output_mask is False) from the
  // upstream gradient of out.
  m.def(
      "_set2graph_logits_backward_cpu(Tensor grad_out, Tensor x, Tensor weight1, Tensor bias1, "
      "Tensor weight2, Tensor bias2, Tensor lengths, bool[5] output_mask) -> (Tensor? grad_x, "
      "Tensor? grad_weight1, Tensor? grad_bias1, Tensor? grad_weight2, Tensor? grad_bias2)");
}

TORCH_LIBRARY_IMPL(topn_kernels, CPU, m) {
  m.impl("_set2graph_logits_cpu", &set2graph_logits_cpu);
  m.impl("_set2graph_logits_backward_cpu", &set2graph_logits_backward_cpu);
}

}  // namespace topn_kernels
