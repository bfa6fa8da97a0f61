// The attention loops (set_attention_kernel.h) for any CPU: at::vec's portable build.
#include "set_attention_kernel.h"

TOPN_KERNELS_DEFINE_ATTENTION(set_attention_default)
