// Per-point (row) loops of the native transformer layer (set_transformer.cpp) over x (M, C)
// contiguous: its two layer norms, forward and backward, and the column sums of its backward
// (bias gradients), each fused into the pass that makes the summed rows:
//
//   layer norm:  mean_i = sum_j x_ij / C,  var_i = sum_j (x_ij - mean_i)^2 / C,
//                rstd_i = 1 / sqrt(var_i + eps),  out_ij = (x_ij - mean_i) rstd_i w_j + b_j
//   backward:    xh_ij = (x_ij - mean_i) rstd_i,  gw_ij = g_ij w_j,
//                gx_ij = (gw_ij - sum_j gw_ij / C - xh_ij sum_j gw_ij xh_ij / C) rstd_i,
//                grad_w_j = sum_i g_ij xh_ij,  grad_b_j = sum_i g_ij,  and sum_i gx_ij
//   mask_sum:    g_ij = 0 where u_ij <= 0 (ReLU's backward), and sum_i g_ij
//   column_sum:  sum_i x_ij
//
// Every sum has a fixed order, whatever the CPU's vector width and the number of threads: a row's
// sums over j in 16 running lanes (element j in lane j mod 16), then the lanes added as a tree
// (l + 8, + 4, + 2, + 1), in T (as ATen's layer norm, which sums in T too); a column's sums over
// i in chunks of kChunkRows rows, in order within a chunk in T, then the chunks in order in
// double. mean and rstd are saved (M, 1), as ATen's layer norm saves them.
//
// point_rows_kernels<T>() picks, once, the build for this CPU: AVX2 (point_rows_avx2.cpp) where
// the CPU has AVX2 and FMA, else the portable build (point_rows_default.cpp);
// TOPN_KERNELS_PORTABLE=1 forces the portable one. The drivers (point_rows.cpp) split the rows
// between the threads and add up the chunks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace topn_kernels {

constexpr int64_t kChunkRows = 16;

template <typename T>
struct PointRowsKernels {
  // rows [begin, end): out, mean, rstd
  void (*layer_norm)(const T* x, const T* w, const T* b, double eps, int64_t C, int64_t begin,
                     int64_t end, T* out, T* mean, T* rstd);
  // chunks [begin, end) of kChunkRows rows (the last one may be short): gx, and each chunk's
  // sums of g xh, g and gx in part[chunk * 3C : chunk * 3C + 3C]; scratch: 3C elements
  void (*layer_norm_backward)(const T* g, const T* x, const T* mean, const T* rstd, const T* w,
                              int64_t M, int64_t C, int64_t begin, int64_t end, T* gx,
                              double* part, T* scratch);
  // chunks [begin, end): g masked in place, each chunk's column sums in part[chunk * C : ...]
  void (*mask_sum)(T* g, const T* u, int64_t M, int64_t C, int64_t begin, int64_t end,
                   double* part, T* scratch);
  // chunks [begin, end): each chunk's column sums of x in part[chunk * C : ...]
  void (*column_sum)(const T* x, int64_t M, int64_t C, int64_t begin, int64_t end, double* part,
                     T* scratch);
  // chunks [begin, end): sums of (x - mean)^2 (g null; C a chunk), or of g and g (x - mean)
  // (2C a chunk); scratch: 2C elements
  void (*centred_sums)(const T* g, const T* x, const T* mean, int64_t M, int64_t C,
                       int64_t begin, int64_t end, double* part, T* scratch);
  // rows [begin, end): (x - mean) a + c (g null), or (g - c - (x - mean) k) a
  void (*batch_norm_apply)(const T* g, const T* x, const T* mean, const T* a, const T* c,
                           const T* k, int64_t C, int64_t begin, int64_t end, T* out);
};

template <typename T>
PointRowsKernels<T> point_rows_kernels();

#define TOPN_KERNELS_DECLARE_POINT_ROWS(ns)                                                     \
  namespace ns {                                                                                \
  template <typename T>                                                                         \
  void layer_norm(const T* x, const T* w, const T* b, double eps, int64_t C, int64_t begin,     \
                  int64_t end, T* out, T* mean, T* rstd);                                       \
  template <typename T>                                                                         \
  void layer_norm_backward(const T* g, const T* x, const T* mean, const T* rstd, const T* w,    \
                           int64_t M, int64_t C, int64_t begin, int64_t end, T* gx,             \
                           double* part, T* scratch);                                           \
  template <typename T>                                                                         \
  void mask_sum(T* g, const T* u, int64_t M, int64_t C, int64_t begin, int64_t end,             \
                double* part, T* scratch);                                                      \
  template <typename T>                                                                         \
  void column_sum(const T* x, int64_t M, int64_t C, int64_t begin, int64_t end, double* part,   \
                  T* scratch);                                                                  \
  template <typename T>                                                                         \
  void centred_sums(const T* g, const T* x, const T* mean, int64_t M, int64_t C, int64_t begin, \
                    int64_t end, double* part, T* scratch);                                     \
  template <typename T>                                                                         \
  void batch_norm_apply(const T* g, const T* x, const T* mean, const T* a, const T* c,          \
                        const T* k, int64_t C, int64_t begin, int64_t end, T* out);             \
  }
TOPN_KERNELS_DECLARE_POINT_ROWS(point_rows_default)
TOPN_KERNELS_DECLARE_POINT_ROWS(point_rows_avx2)
#undef TOPN_KERNELS_DECLARE_POINT_ROWS

// The drivers, on float32/float64 CPU tensors (point_rows.cpp).

// at::native_layer_norm(x, {C}, w, b, eps) for x (M, C): out (M, C), mean and rstd (M, 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows(const at::Tensor& x,
                                                               const at::Tensor& w,
                                                               const at::Tensor& b, double eps);

// The layer norm's backward from g (M, C): grad_x, grad_w, grad_b, and grad_x's column sums (C,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& w);

// g = (u > 0) ? g : 0 in place (g, u (M, C) contiguous); returns g's column sums (C,).
at::Tensor mask_by_positive_sum_(at::Tensor& g, const at::Tensor& u);

// x.sum(0) for x (M, C) contiguous.
at::Tensor column_sums(const at::Tensor& x);

// Batch norm over the M >= 2 rows of x (M, C) in training (point_batch_norm.h has the
// formulas): at::native_batch_norm(x, w, b, running_mean, running_var, true, momentum, eps),
// the per-channel tensors contiguous (C,) of x's dtype: out, save_mean, save_invstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows(const at::Tensor& x,
                                                               const at::Tensor& w,
                                                               const at::Tensor& b,
                                                               at::Tensor& running_mean,
                                                               at::Tensor& running_var,
                                                               double momentum, double eps);

// Its backward from g (M, C) contiguous: grad_x, grad_w, grad_b.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows_backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& save_mean,
    const at::Tensor& save_invstd);

}  // namespace topn_kernels
