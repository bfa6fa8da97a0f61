// The Adam loop (adam_kernel.h) for CPUs with AVX2: at::vec's AVX2 build (this file is compiled
// with -mavx2 -mfma, see CMakeLists.txt; -ffp-contract=off keeps every product rounded).
#include "adam_kernel.h"

TOPN_KERNELS_DEFINE_ADAM(adam_avx2)
