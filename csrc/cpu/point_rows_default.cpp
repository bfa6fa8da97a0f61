// The per-point loops (point_rows_kernel.h) for any CPU.
#include "point_rows_kernel.h"

TOPN_KERNELS_DEFINE_POINT_ROWS(point_rows_default)
