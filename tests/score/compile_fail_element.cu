// Must NOT compile: the device window scorer with CUDA's own __nv_bfloat16 instead of prefixkv::bf16 (view the buffer
// through reinterpret_cast<const prefixkv::bf16*>). The test (score_element_static_assert_cuda) passes when the
// compiler prints the static_assert's message.
#include <prefixkv/score/score.cuh>

#include <cuda_bf16.h>

cudaError_t score(const __nv_bfloat16* q, const __nv_bfloat16* k, float* scores) {
  size_t bytes = 0;
  auto qv = prefixkv::make_kv_view_bhsd<const __nv_bfloat16>(q, 1, 4, 8, 64);
  auto kv = prefixkv::make_kv_view_bhsd<const __nv_bfloat16>(k, 1, 1, 128, 64);
  return prefixkv::window_attention(nullptr, bytes, qv, kv, prefixkv::lse_view{}, {}, prefixkv::segment_grid{1, 1, 1}, 0,
                                    prefixkv::make_uniform_segments(1, 128), scores);
}
