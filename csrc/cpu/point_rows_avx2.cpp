// The per-point loops (point_rows_kernel.h) for CPUs with AVX2 and FMA (this file is compiled
// with -mavx2 -mfma, see CMakeLists.txt; no fused multiply-add is formed: -ffp-contract=off).
#include "point_rows_kernel.h"

TOPN_KERNELS_DEFINE_POINT_ROWS(point_rows_avx2)
