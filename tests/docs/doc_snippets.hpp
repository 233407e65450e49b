// Declarations of the snippets of docs/api.md and docs/integration.md that the drivers call (the definitions are
// extracted from the pages at build time, see extract_snippets.cpp).
#pragma once

#include <prefixkv/prefixkv.hpp>

#include <random>
#include <string>
#include <vector>

namespace api_snippets {
bool explain(const prefixkv::kv_view<float>& k);
void three_layouts(prefixkv::bf16* hf, prefixkv::bf16* bshd, prefixkv::bf16* pool, const int32_t* block_table);
prefixkv::segments ragged_rows(std::vector<int64_t>& offsets);
cudaError_t solve_batch_host(const prefixkv::curve_set& curves, int64_t P, int64_t L, std::vector<int64_t>& keep,
                             std::vector<float>& threshold);
cudaError_t compress_host(const std::vector<prefixkv::kv_view<const float>>& probs,
                          const std::vector<prefixkv::kv_view<float>>& k,
                          const std::vector<prefixkv::kv_view<float>>& v, double evict_ratio,
                          std::vector<int32_t>& lengths);
cudaError_t calibrate_and_apply(const std::vector<std::vector<int64_t>>& sample_keep,
                                const std::vector<int64_t>& sample_tokens, int64_t prompt_tokens,
                                std::string& json, std::vector<int64_t>& keep);
struct next_token_place {
  int64_t position;
  int64_t row;
  int64_t slot;
};
next_token_place place_generated_token(int64_t prompt_tokens, int64_t generated, int64_t layer_length,
                                       const int32_t* block_table_row, int64_t page_size);
prefixkv::kv_view<prefixkv::f16> k_view(prefixkv::f16* k, int64_t n_ctx, int64_t n_head_kv, int64_t head_dim,
                                         int64_t n_tokens);
prefixkv::kv_view<prefixkv::f16> v_view_transposed(prefixkv::f16* v, int64_t n_ctx, int64_t n_head_kv,
                                                   int64_t head_dim, int64_t n_tokens);
}  // namespace api_snippets

// A small random model state for the pipeline snippets: one sequence, L layers, attention probabilities
// (1, Hq, T, T) with causal rows summing to 1, and K / V caches (1, Hkv, T, D).
struct doc_case {
  int64_t L = 3, Hq = 4, Hkv = 2, T = 50, D = 8;
  std::vector<std::vector<float>> p, k, v;
  template <class Rng>
  explicit doc_case(Rng& rng) {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    p.resize(size_t(L));
    k.resize(size_t(L));
    v.resize(size_t(L));
    for (int64_t l = 0; l < L; ++l) {
      auto& P = p[size_t(l)];
      P.assign(size_t(Hq * T * T), 0.0f);
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t q = 0; q < T; ++q) {
          float* row = P.data() + (h * T + q) * T;
          float sum = 0.0f;
          for (int64_t t = 0; t <= q; ++t) sum += row[t] = u(rng) * u(rng) * u(rng);
          for (int64_t t = 0; t <= q; ++t) row[t] /= sum;
        }
      k[size_t(l)].resize(size_t(Hkv * T * D));
      v[size_t(l)].resize(size_t(Hkv * T * D));
      for (auto& x : k[size_t(l)]) x = u(rng) - 0.5f;
      for (auto& x : v[size_t(l)]) x = u(rng) - 0.5f;
    }
  }
};
