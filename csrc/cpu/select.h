// Top-n selection of one set (docs/operators.md, Ranking) on CPU.
//
// The ranking is "larger score first, NaN above every number (as torch.sort), equal scores by
// increasing index". RankKey turns (score, index) into one unsigned integer whose ascending
// order is that ranking, so comparisons are plain integer compares.
//
// select_top finds the n_b best of n0 scores in about O(n0): scores are cosines, so buckets of
// the value (1 - s) order them coarsely. A histogram finds the bucket that holds the n_b-th
// best score, a counting sort places the keys bucket by bucket, and only keys that share a
// bucket are compared (a few per bucket, as there are about n0 / 2 buckets).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace topn_kernels {

template <typename acc_t>
struct RankKey;

template <>
struct RankKey<float> {
  using type = uint64_t;  // descending score in the high 32 bits, index in the low 32
  static type make(float s, int64_t i) {
    s = s != s ? std::numeric_limits<float>::quiet_NaN() : s + 0.0f;  // one NaN; -0 == +0
    uint32_t bits;
    std::memcpy(&bits, &s, sizeof(bits));
    // Flip the magnitude bits of negatives and the sign bit of everything: ascending order.
    const uint32_t ascending = bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
    return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(i);
  }
  static int64_t index(type key) { return static_cast<int64_t>(key & 0xffffffffu); }
};

template <>
struct RankKey<double> {
  using type = unsigned __int128;
  static type make(double s, int64_t i) {
    s = s != s ? std::numeric_limits<double>::quiet_NaN() : s + 0.0;
    uint64_t bits;
    std::memcpy(&bits, &s, sizeof(bits));
    const uint64_t ascending =
        bits ^ (static_cast<uint64_t>(static_cast<int64_t>(bits) >> 63) | (uint64_t(1) << 63));
    return (static_cast<type>(~ascending) << 64) | static_cast<uint64_t>(i);
  }
  static int64_t index(type key) { return static_cast<int64_t>(static_cast<uint64_t>(key)); }
};

// Per-thread scratch of select_top for sets of n0 points.
template <typename acc_t>
struct SelectScratch {
  std::vector<int32_t> bucket;                     // (n0) bucket of each point
  std::vector<int64_t> count;                      // (buckets + 1) histogram, then positions
  std::vector<typename RankKey<acc_t>::type> keys;  // (n0) keys, bucket by bucket
  std::vector<uint8_t> chosen;                     // (n0) marks, for the order by index

  explicit SelectScratch(int64_t n0)
      : bucket(n0), count(num_buckets(n0) + 1), keys(n0), chosen(n0, 0) {}

  // A power of two in [16, 4096], about n0 / 2: a few points per bucket.
  static int64_t num_buckets(int64_t n0) {
    int64_t k = 16;
    while (k < 4096 && 2 * k < n0) k *= 2;
    return k;
  }
};

// Sorts a short run of keys: insertion sort, std::sort past 16.
template <typename Key>
inline void sort_run(Key* first, Key* last) {
  if (last - first > 16) {
    std::sort(first, last);
    return;
  }
  for (Key* p = first + 1; p < last; ++p) {
    const Key v = *p;
    Key* q = p;
    for (; q > first && *(q - 1) > v; --q) *q = *(q - 1);
    *q = v;
  }
}

// order[0..nb) = indices of the nb best of the n0 scores s: by rank if sorted, else by
// increasing index. 1 <= nb <= n0.
template <typename acc_t>
void select_top(const acc_t* s, int64_t n0, int64_t nb, bool sorted, SelectScratch<acc_t>& w,
                int64_t* order) {
  using Traits = RankKey<acc_t>;
  const int32_t nbuckets = static_cast<int32_t>(w.count.size() - 1);
  const acc_t half = static_cast<acc_t>(nbuckets) / 2;
  int64_t* count = w.count.data();
  auto* keys = w.keys.data();

  // 1. Bucket 0 holds the best scores (and NaN); the bucket never decreases as s decreases.
  const acc_t top = static_cast<acc_t>(nbuckets - 1);
  int32_t* bucket = w.bucket.data();
  for (int64_t i = 0; i < n0; ++i) {  // branch-free: vectorises
    acc_t v = (acc_t(1) - s[i]) * half;
    v = v > 0 ? v : acc_t(0);  // NaN -> 0
    v = v < top ? v : top;
    bucket[i] = static_cast<int32_t>(v);
  }
  std::fill_n(count, nbuckets, 0);
  for (int64_t i = 0; i < n0; ++i) ++count[bucket[i]];
  // 2. The edge bucket holds the nb-th best score; `head` points lie in buckets <= edge.
  int32_t edge = 0;
  int64_t above = 0;
  while (above + count[edge] < nb) above += count[edge++];
  const int64_t head = above + count[edge];

  // 3. Counting sort of the keys by bucket (index order within a bucket); the points of
  //    worse buckets all go to one tail bucket, edge + 1.
  for (int64_t c = 0, pos = 0; c <= edge; ++c) {
    const int64_t n = count[c];
    count[c] = pos;
    pos += n;
  }
  count[edge + 1] = head;
  for (int64_t i = 0; i < n0; ++i) {
    const int32_t b = std::min(bucket[i], edge + 1);
    keys[count[b]++] = Traits::make(s[i], i);
  }  // now bucket c spans [count[c - 1], count[c])

  // 4. Rank order inside the buckets that matter: all of them by score; by index, only the
  //    edge bucket, to split its best (nb - above) keys from the rest.
  if (sorted) {
    for (int32_t c = 0; c <= edge; ++c) sort_run(keys + (c ? count[c - 1] : 0), keys + count[c]);
    for (int64_t j = 0; j < nb; ++j) order[j] = Traits::index(keys[j]);
    return;
  }
  if (nb < head) std::nth_element(keys + above, keys + nb, keys + head);
  for (int64_t j = 0; j < nb; ++j) w.chosen[Traits::index(keys[j])] = 1;
  for (int64_t i = 0, j = 0; i < n0; ++i) {
    order[j] = i;
    j += w.chosen[i];
    w.chosen[i] = 0;
  }
}

}  // namespace topn_kernels
