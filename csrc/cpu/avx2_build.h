// Whether to run the AVX2 + FMA builds of the native loops (softmin_avx2.cpp,
// set_attention_avx2.cpp): the CPU has both, and TOPN_KERNELS_PORTABLE=1 does not force the
// portable builds (to test them on an AVX2 machine). Read once per process.
#pragma once

#include <cstdlib>
#include <string>

namespace topn_kernels {

inline bool use_avx2_builds() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = [] {
    const char* portable = std::getenv("TOPN_KERNELS_PORTABLE");
    const bool forced = portable != nullptr && std::string(portable) == "1";
    return !forced && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace topn_kernels
