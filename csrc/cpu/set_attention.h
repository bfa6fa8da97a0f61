// The attention of the native transformer layer (set_transformer.cpp), for the (set, head)
// pairs [begin, end) of a batch of B sets of n points, C = H d channels:
//
//   forward:  P = softmax(q k^T / sqrt(d)) per pair, a = P v
//   backward: dP = g_a v^T, dS = P * (dP - rowsum(P * dP)) / sqrt(d),
//             g_q = dS k, g_k = dS^T q, g_v = P^T g_a
//
// qkv (B n, 3C): the rows of q, k and v side by side; probs (B, H, n, n); a and g_a (B n, C);
// g_qkv (B n, 3C).
//
// set_attention_kernels<T>() picks, once, the build for this CPU: AVX2 (at::vec with Sleef's
// exp, set_attention_avx2.cpp) where the CPU has AVX2 and FMA, else a portable build
// (set_attention_default.cpp); TOPN_KERNELS_PORTABLE=1 forces the portable one.
#pragma once

#include <cstdint>

namespace topn_kernels {

struct AttentionDims {
  int64_t B, n, C, H, d;
};

// Elements of scratch one task needs (any build: blocks padded for vectors of up to 16 lanes).
// The caller allocates it, so that no standard-library template is compiled into both builds
// of the loops (the linker would keep one copy, possibly the AVX2 one, for both).
inline int64_t attention_scratch_size(const AttentionDims& s) {
  const int64_t np = (s.n + 15) / 16 * 16, dp = (s.d + 15) / 16 * 16;
  return 4 * s.n * dp + 2 * s.d * np + 2 * s.n * np + (np > dp ? np : dp);
}

template <typename T>
struct SetAttentionKernels {
  void (*forward)(const T* qkv, T* probs, T* a, const AttentionDims& s, int64_t begin,
                  int64_t end, T* scratch);
  void (*backward)(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s,
                   int64_t begin, int64_t end, T* scratch);
};

template <typename T>
SetAttentionKernels<T> set_attention_kernels();

#define TOPN_KERNELS_DECLARE_ATTENTION(ns)                                                     \
  namespace ns {                                                                               \
  template <typename T>                                                                        \
  void forward(const T* qkv, T* probs, T* a, const AttentionDims& s, int64_t begin,            \
               int64_t end, T* scratch);                                                       \
  template <typename T>                                                                        \
  void backward(const T* g_a, const T* qkv, const T* probs, T* g_qkv, const AttentionDims& s, \
                int64_t begin, int64_t end, T* scratch);                                       \
  }
TOPN_KERNELS_DECLARE_ATTENTION(set_attention_default)
TOPN_KERNELS_DECLARE_ATTENTION(set_attention_avx2)
#undef TOPN_KERNELS_DECLARE_ATTENTION

}  // namespace topn_kernels
