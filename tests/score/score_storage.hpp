// Test helpers shared by the host and GPU scorer tests: float values -> the scorer's storage type, paged copies of a
// logical K, and random per-row lengths.
#pragma once

#include <prefixkv/core/numeric.hpp>
#include <prefixkv/core/views.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

namespace score_test {

template <class T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return T::from_float(v);
}

template <class T>
std::vector<T> to_storage(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = from_float<T>(v[i]);
  return o;
}

//! A paged copy of a logical K (batch, head, cap, dim): pages of `page_size` slots in NHD or HND order, sequence b's
//! block j on page table[b * max_blocks + j] (a random permutation of the pool), two spare pages and the slots past
//! `cap` filled with `fill` (NaN: any read of them shows up as a non-finite flag or a wrong score).
template <class T>
struct paged_copy {
  std::vector<T> pool;
  std::vector<int32_t> table;
  int64_t num_pages = 0, page_size = 1, heads = 0, dim = 0, batch = 0, max_blocks = 0;
  bool hnd = false;
  prefixkv::paged_kv_view<const T> view(const T* pool_ptr, const int32_t* table_ptr) const {
    return prefixkv::make_paged_kv_view<const T>(pool_ptr, hnd ? prefixkv::page_layout::hnd : prefixkv::page_layout::nhd,
                                                 num_pages, page_size, heads, dim, table_ptr, batch, max_blocks);
  }
  prefixkv::paged_kv_view<const T> host_view() const { return view(pool.data(), table.data()); }
  //! Blocks of sequence b from `first` on get page ids outside the pool (`bad`, e.g. -1 or num_pages): nothing may
  //! read them.
  void break_blocks_from(int64_t b, int64_t first, int32_t bad) {
    for (int64_t j = first; j < max_blocks; ++j) table[size_t(b * max_blocks + j)] = bad;
  }
};

template <class T, class F>
paged_copy<T> make_paged_copy(std::mt19937_64& rng, int64_t batch, int64_t heads, int64_t cap, int64_t dim,
                              int64_t page_size, bool hnd, F&& value, T fill) {
  paged_copy<T> c;
  c.page_size = page_size;
  c.heads = heads;
  c.dim = dim;
  c.batch = batch;
  c.hnd = hnd;
  c.max_blocks = (cap + page_size - 1) / page_size;
  c.num_pages = batch * c.max_blocks + 2;
  std::vector<int32_t> perm(size_t(c.num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.table.assign(perm.begin(), perm.begin() + batch * c.max_blocks);
  c.pool.assign(size_t(c.num_pages * page_size * heads * dim), fill);
  const auto v = c.host_view();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < cap; ++t)
        for (int64_t d = 0; d < dim; ++d) c.pool[size_t(v.offset(b, h, t, d))] = value(b, h, t, d);
  return c;
}

}  // namespace score_test
