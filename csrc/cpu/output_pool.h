// Reuse of large CPU output buffers (see output_pool.cpp).
#pragma once

#include <ATen/ATen.h>

namespace topn_kernels {

// Like at::empty, but tensors of at least 1 MiB take their memory from a pool that keeps the
// blocks of freed tensors for the next call of the same size.
at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether t's memory is a pool block that was used before: its pages are resident, so writes
// can stream past the caches (streaming stores into fresh pages, which the kernel zeroes at
// first touch, are slower than plain stores).
bool is_recycled_block(const at::Tensor& t);

// Bytes held by the pool for reuse (not owned by any tensor).
int64_t pool_cached_bytes();

// Returns every cached block to the system.
void pool_empty_cache();

// Sets the most bytes the pool keeps for reuse (0: none); returns the previous limit.
int64_t pool_set_limit(int64_t bytes);

}  // namespace topn_kernels
