// A pool of large CPU blocks for operator outputs.
//
// glibc serves allocations above 32 MiB with fresh mmap()ed pages, and the kernel zeroes every
// page at its first touch: writing a new 134 MB output costs ~5x writing into memory that was
// used before. A training loop allocates the same output sizes every step, so the pool keeps
// freed blocks (exact size, rounded to 2 MiB) for the next allocation, as CUDA's caching
// allocator does. New blocks are 2 MiB aligned and advised as transparent huge pages. With a
// limit of 0 the pool is off and outputs come from at::empty.
//
// TOPN_KERNELS_CPU_CACHE_MB bounds what the pool keeps (default 2048; 0 keeps nothing);
// topn_kernels.native.set_cache_limit changes the bound and empty_cache() returns the cached
// blocks to the system.
#include "output_pool.h"

#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

// Under AddressSanitizer (make sanitize), the bytes of a block past its tensor and the blocks
// the pool keeps are off limits, so that overflows into them and use after free are reported.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POOL_POISON(ptr, size) ASAN_POISON_MEMORY_REGION(ptr, size)
#define POOL_UNPOISON(ptr, size) ASAN_UNPOISON_MEMORY_REGION(ptr, size)
#else
#define POOL_POISON(ptr, size) ((void)(ptr), (void)(size))
#define POOL_UNPOISON(ptr, size) ((void)(ptr), (void)(size))
#endif

namespace topn_kernels {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;
constexpr size_t kBlockAlign = size_t(2) << 20;

size_t cache_limit_from_env() {
  const char* env = std::getenv("TOPN_KERNELS_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "TOPN_KERNELS_CPU_CACHE_MB must be a non-negative integer, got '", env, "'");
  // a larger bound than bytes can count means no bound (not a shift that wraps around)
  return size_t(std::min<long long>(mb, INT64_MAX >> 20)) << 20;
}

struct Block {
  void* ptr;
  size_t size;
  bool recycled;  // taken from the free list (pages already touched)
};

class PooledAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    void* ptr = take(size);
    const bool recycled = ptr != nullptr;
    if (!recycled) ptr = fresh(size);
    POOL_UNPOISON(ptr, nbytes);
    POOL_POISON(static_cast<char*>(ptr) + nbytes, size - nbytes);
    return {ptr, new Block{ptr, size, recycled}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  static bool is_recycled(const c10::DataPtr& data) {
    return data.get_deleter() == &release && static_cast<Block*>(data.get_context())->recycled;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void empty_cache() {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) {
        POOL_UNPOISON(p, size);
        std::free(p);
      }
    free_.clear();
    cached_ = 0;
  }

  bool enabled() const { return limit_.load() > 0; }

  size_t set_limit(size_t bytes) {
    const size_t previous = limit_.exchange(bytes);
    if (bytes < previous) empty_cache();
    return previous;
  }

  static PooledAllocator& instance() {
    // Never destroyed: tensors alive at exit still return their blocks to it.
    static PooledAllocator* pool = new PooledAllocator();
    return *pool;
  }

 private:
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().give_back(block->ptr, block->size);
    delete block;
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* ptr = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    return ptr;
  }

  void* fresh(size_t size) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kBlockAlign, size) != 0) {
      empty_cache();  // give the cached blocks back, then try once more
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&ptr, kBlockAlign, size) == 0,
                       "topn_kernels: failed to allocate ", size, " bytes");
    }
    // Huge pages make the writes faster, though their first touch can stall on memory
    // compaction: the pool keeps the block, so that cost is paid once.
    madvise(ptr, size, MADV_HUGEPAGE);  // advice: failure is harmless
    return ptr;
  }

  void give_back(void* ptr, size_t size) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (cached_ + size <= limit_.load()) {
        POOL_POISON(ptr, size);
        free_[size].push_back(ptr);
        cached_ += size;
        return;
      }
    }
    POOL_UNPOISON(ptr, size);
    std::free(ptr);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  std::atomic<size_t> limit_{cache_limit_from_env()};
};

}  // namespace

at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (static_cast<size_t>(nbytes) < kMinPooledBytes || !PooledAllocator::instance().enabled())
    return at::empty(sizes, options);
  at::Tensor t = at::detail::empty_generic(sizes, &PooledAllocator::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()),
                                           std::nullopt);
  // As at::empty does: torch.utils.deterministic.fill_uninitialized_memory (with deterministic
  // algorithms on) fills new memory with NaN, so that a kernel that leaves an element unwritten
  // is seen in tests. A recycled block holds its last owner's values otherwise.
  const auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory())
    at::native::fill_empty_deterministic_(t);
  return t;
}

bool is_recycled_block(const at::Tensor& t) {
  return t.has_storage() && PooledAllocator::is_recycled(t.storage().data_ptr());
}

int64_t pool_cached_bytes() { return PooledAllocator::instance().cached_bytes(); }

void pool_empty_cache() { PooledAllocator::instance().empty_cache(); }

int64_t pool_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "the cache limit must be >= 0 bytes, got ", bytes);
  return static_cast<int64_t>(PooledAllocator::instance().set_limit(static_cast<size_t>(bytes)));
}

}  // namespace topn_kernels
