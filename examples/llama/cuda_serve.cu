// prefixkv-llama --serve on the GPU (`--device cuda`): the loop of serve_loop.hpp with the CUDA engine — the paged
// pool, block tables and lengths in device memory, the batched forward pass as kernels (cuda_forward.cuh), and the
// device compressor (`prefixkv::compress`) on per-layer block tables, in place.
#include "cuda_forward.cuh"
#include "serve_loop.hpp"

#include <prefixkv/compress/compress.cuh>

namespace prefixkv_llama {
namespace {

using gpu::dev_array;

class cuda_engine {
 public:
  ~cuda_engine() {
    if (st_) cudaStreamDestroy(st_);
  }

  bool init(const model& m, const serve_options& o, int slots, int max_blocks, std::string& err) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      return err = std::string("--serve --device cuda: no CUDA device is usable (") +
                   (e == cudaSuccess ? "0 devices" : cudaGetErrorString(e)) + ")",
             false;
    PKL_CUDA_TRY(cudaStreamCreateWithFlags(&st_, cudaStreamNonBlocking), err);
    if (!store_.upload(m, err)) return false;
    const model_ref& d = store_.m;
    o_ = o;
    slots_ = slots;
    max_blocks_ = max_blocks;
    const size_t pool = size_t(o.pool_pages) * o.page_size * d.kv_heads * d.hs;
    if (!k_.reserve(pool, err) || !v_.reserve(pool, err)) return false;
    PKL_CUDA_TRY(cudaMemset(k_.p, 0, sizeof(float) * pool), err);
    PKL_CUDA_TRY(cudaMemset(v_.p, 0, sizeof(float) * pool), err);
    const size_t tables = size_t(d.layers) * slots * max_blocks, lens = size_t(d.layers) * slots * d.kv_heads;
    if (!table_.reserve(tables, err) || !len_.reserve(lens, err) ||
        !stage_.reserve(size_t(d.layers) * o.max_prefill * max_blocks, err) ||
        !clen_.reserve(size_t(o.max_prefill), err) || !cout_.reserve(size_t(d.layers) * o.max_prefill * d.kv_heads + 1, err))
      return false;
    return true;
  }

  bool upload(const std::vector<int32_t>& tables, const std::vector<int32_t>* lengths, std::string& err) {
    PKL_CUDA_TRY(cudaMemcpyAsync(table_.p, tables.data(), sizeof(int32_t) * tables.size(), cudaMemcpyHostToDevice, st_),
                 err);
    if (lengths)
      PKL_CUDA_TRY(cudaMemcpyAsync(len_.p, lengths->data(), sizeof(int32_t) * lengths->size(), cudaMemcpyHostToDevice,
                                   st_),
                   err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);  // the loop changes its vectors right after
    return true;
  }

  bool forward(const std::vector<int>& cols, int n, int k, int rec_batch, int p_tokens, std::vector<float>& logits,
               std::string& err) {
    const model_ref& d = store_.m;
    if (!batch_.reserve(cols.size(), err)) return false;
    int* b = batch_.p;
    PKL_CUDA_TRY(cudaMemcpyAsync(b, cols.data(), sizeof(int) * cols.size(), cudaMemcpyHostToDevice, st_), err);
    batch_args a;
    a.n = n;
    a.token = b, a.pos = b + n, a.seq = b + 2 * n, a.off = b + 3 * n, a.cnt = b + 4 * n, a.rec = b + 5 * n;
    a.len = len_.p;
    a.slots = slots_;
    if (rec_batch > 0) {
      const size_t p = size_t(d.layers) * rec_batch * d.heads * size_t(p_tokens) * size_t(p_tokens);
      if (!P_.reserve(p, err)) return false;
      PKL_CUDA_TRY(cudaMemsetAsync(P_.p, 0, sizeof(float) * p, st_), err);
      a.P = P_.p;
      a.rec_batch = rec_batch;
      a.p_tokens = p_tokens;
    }
    paged_kv c;
    c.k = k_.p, c.v = v_.p, c.table = table_.p, c.slots = slots_, c.max_blocks = max_blocks_;
    c.page_size = o_.page_size, c.kv_heads = d.kv_heads, c.hs = d.hs;
    if (!gpu::forward(d, c, a, fb_, b + 6 * size_t(n), k, st_, err)) return false;
    logits.resize(size_t(k) * d.vocab);
    PKL_CUDA_TRY(cudaMemcpyAsync(logits.data(), fb_.logits.p, sizeof(float) * logits.size(), cudaMemcpyDeviceToHost, st_),
                 err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    return true;
  }

  bool compress(const prefixkv::compress_plan& plan, const std::vector<int32_t>& stage,
                const std::vector<int32_t>& lens, int b0, int rb, int tm, std::vector<int32_t>& out,
                std::string& err) {
    namespace pk = prefixkv;
    const model_ref& d = store_.m;
    const int L = d.layers, Hq = d.heads, nb = int(lens.size());
    PKL_CUDA_TRY(cudaMemcpyAsync(stage_.p, stage.data(), sizeof(int32_t) * stage.size(), cudaMemcpyHostToDevice, st_),
                 err);
    PKL_CUDA_TRY(cudaMemcpyAsync(clen_.p, lens.data(), sizeof(int32_t) * lens.size(), cudaMemcpyHostToDevice, st_), err);
    std::vector<pk::paged_kv_view<float>> kv(static_cast<size_t>(L)), vv(static_cast<size_t>(L));
    std::vector<pk::kv_view<const float>> pv;
    for (int l = 0; l < L; ++l) {
      const int32_t* t = stage_.p + size_t(l) * nb * max_blocks_;
      kv[l] = pk::make_paged_kv_view(k_.p, pk::page_layout::nhd, o_.pool_pages, o_.page_size, d.kv_heads, d.hs, t, nb,
                                     max_blocks_);
      vv[l] = pk::make_paged_kv_view(v_.p, pk::page_layout::nhd, o_.pool_pages, o_.page_size, d.kv_heads, d.hs, t, nb,
                                     max_blocks_);
    }
    pk::compress_args<pk::paged_kv_layers<float>, float> a;
    a.cache = pk::paged_kv_layers<float>{kv.data(), vv.data(), nullptr, nullptr, L};
    a.lengths = clen_.p;
    if (plan.cfg.scorer == pk::scorer_kind::attention) {
      pv.resize(static_cast<size_t>(L));
      for (int l = 0; l < L; ++l)
        pv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(P_.p) + (size_t(l) * rb + b0) * Hq * size_t(tm) * tm, nb,
                                      Hq, tm, tm);
      a.attention = pv.data();
    }
    const int64_t segs = plan.segments(nb);
    a.out.lengths = cout_.p;
    a.out.status = cout_.p + segs;
    size_t bytes = 0;
    if (pk::compress(nullptr, bytes, plan, a, st_) != cudaSuccess) return err = pk::last_error().message, false;
    if (!ws_.reserve(bytes, err)) return false;
    if (pk::compress(ws_.p, bytes, plan, a, st_) != cudaSuccess) return err = pk::last_error().message, false;
    out.assign(size_t(segs) + 1, -1);
    PKL_CUDA_TRY(cudaMemcpyAsync(out.data(), cout_.p, sizeof(int32_t) * out.size(), cudaMemcpyDeviceToHost, st_), err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    return true;
  }

 private:
  cudaStream_t st_ = nullptr;
  gpu::dev_model_store store_;
  gpu::forward_buffers fb_;
  serve_options o_;
  int slots_ = 0, max_blocks_ = 0;
  dev_array<float> k_, v_, P_;
  dev_array<int32_t> table_, len_, stage_, clen_, cout_;
  dev_array<int> batch_;
  dev_array<unsigned char> ws_;
};

}  // namespace

bool serve_cuda(const model& m, const std::vector<serve_request>& reqs, const std::vector<std::vector<int>>& prompts,
                const serve_options& opt, std::vector<serve_result>& results, serve_summary& summary,
                std::string& err) {
  cuda_engine e;
  return serve_with(e, m, reqs, prompts, opt, results, summary, err);
}

}  // namespace prefixkv_llama
