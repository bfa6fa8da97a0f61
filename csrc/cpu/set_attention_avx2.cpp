// The attention loops (set_attention_kernel.h) for CPUs with AVX2 and FMA: at::vec's AVX2 build
// with Sleef's exp (this file is compiled with -mavx2 -mfma, see CMakeLists.txt).
#include "set_attention_kernel.h"

TOPN_KERNELS_DEFINE_ATTENTION(set_attention_avx2)
