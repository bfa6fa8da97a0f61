// The Adam loop (adam_kernel.h) for any CPU: at::vec's portable build.
#include "adam_kernel.h"

TOPN_KERNELS_DEFINE_ADAM(adam_default)
