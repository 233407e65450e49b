// prefixkv quick start, CUDA backend: the same compression as quickstart.cpp on the GPU — one call on a stream,
// no host synchronisation inside, every intermediate in one workspace allocated once.
#include <prefixkv/prefixkv.cuh>
#include <prefixkv/compress/compress.cuh>

#include <cstdio>
#include <vector>

#define CHECK_CUDA(x)                                                                       \
  do {                                                                                      \
    const cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s: %s (%s)\n", #x, cudaGetErrorString(e_), prefixkv::last_error().message); \
      return 1;                                                                             \
    }                                                                                       \
  } while (0)

__global__ void fill(prefixkv::bf16* x, size_t n, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = prefixkv::bf16::from_float(scale * float((i * 2654435761u) % 1000) / 1000.0f);
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return std::puts("no CUDA device: nothing to do"), 0;
  const int64_t L = 4, Hq = 8, H = 2, D = 64, B = 2, T = 1024;  // a batch of 2 sequences, up to 1024 tokens
  const size_t per_layer = size_t(B) * H * T * D;
  prefixkv::bf16 *d_k, *d_v, *d_p;
  int32_t *d_tokens, *d_len, *d_status;
  CHECK_CUDA(cudaMalloc(&d_k, per_layer * L * 2));
  CHECK_CUDA(cudaMalloc(&d_v, per_layer * L * 2));
  CHECK_CUDA(cudaMalloc(&d_p, size_t(L) * B * Hq * T * T * 2));
  CHECK_CUDA(cudaMalloc(&d_tokens, B * 4));
  CHECK_CUDA(cudaMalloc(&d_len, L * B * 4));
  CHECK_CUDA(cudaMalloc(&d_status, 4));
  fill<<<1024, 256>>>(d_k, per_layer * L, 1.0f);
  fill<<<1024, 256>>>(d_v, per_layer * L, 1.0f);
  fill<<<1024, 256>>>(d_p, size_t(L) * B * Hq * T * T, 0.01f);
  const int32_t tokens[B] = {1024, 700};  // a ragged batch: each sequence gets its own budget
  CHECK_CUDA(cudaMemcpy(d_tokens, tokens, sizeof tokens, cudaMemcpyHostToDevice));
  std::vector<prefixkv::kv_view<prefixkv::bf16>> kv, vv;
  std::vector<prefixkv::kv_view<const prefixkv::bf16>> pv;
  for (int64_t l = 0; l < L; ++l) {
    kv.push_back(prefixkv::make_kv_view_bhsd(d_k + l * per_layer, B, H, T, D));
    vv.push_back(prefixkv::make_kv_view_bhsd(d_v + l * per_layer, B, H, T, D));
    pv.push_back(prefixkv::make_kv_view_bhsd<const prefixkv::bf16>(d_p + size_t(l) * B * Hq * T * T, B, Hq, T, T));
  }
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  // [quickstart-cuda]
  prefixkv::compress_config cfg;  // the model, the largest call and the policy, once
  cfg.layers = L, cfg.q_heads = Hq, cfg.kv_heads = H, cfg.head_dim = D, cfg.max_batch = B, cfg.max_tokens = T;
  cfg.scorer = prefixkv::scorer_kind::attention;
  cfg.evict_ratio = 0.5;
  prefixkv::compress_plan plan;
  CHECK_CUDA(prefixkv::make_plan(cfg, plan));

  prefixkv::compress_args<prefixkv::kv_layers<prefixkv::bf16>> args;  // device pointers; host arrays of views
  args.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
  args.lengths = d_tokens;    // (batch) tokens per sequence, on the device
  args.attention = pv.data();
  args.out.lengths = d_len;   // (layers, batch) tokens after the call
  args.out.status = d_status; // 0, or the reason bad input stopped the chain (then nothing moved)
  size_t bytes = 0;
  CHECK_CUDA(prefixkv::compress(nullptr, bytes, plan, args));          // workspace size, from the plan
  void* d_temp;
  CHECK_CUDA(cudaMalloc(&d_temp, bytes));                                 // once, reused by every call
  CHECK_CUDA(prefixkv::compress(d_temp, bytes, plan, args, stream));    // enqueue; capturable in a graph
  // [quickstart-cuda]

  std::vector<int32_t> len(L * B);
  int32_t status = -1;
  CHECK_CUDA(cudaMemcpyAsync(len.data(), d_len, len.size() * 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaMemcpyAsync(&status, d_status, 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::printf("status %d (%s); tokens kept per (layer, sequence):", status,
              prefixkv::to_string(static_cast<prefixkv::reason>(status)));
  for (int32_t n : len) std::printf(" %d", n);
  std::printf("\nworkspace: %.1f MB for a cache of %.1f MB\n", bytes / 1e6, 2.0 * per_layer * L * 2 / 1e6);
  cudaFree(d_temp);
  cudaFree(d_k);
  cudaFree(d_v);
  cudaFree(d_p);
  cudaFree(d_tokens);
  cudaFree(d_len);
  cudaFree(d_status);
  cudaStreamDestroy(stream);
  return status == 0 ? 0 : 1;
}
