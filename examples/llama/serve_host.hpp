// prefixkv-llama --serve on the host (`--device cpu`): the loop of serve_loop.hpp over a paged pool in host memory,
// the batched forward pass of batch_forward.hpp run as loops, and the host compressor (`prefixkv::compress_host`)
// on per-layer block tables. The same loop runs on the GPU with the CUDA engine (cuda_serve.cu); both generate the
// same tokens as every request run alone.
#pragma once

#include "batch_forward.hpp"
#include "serve_loop.hpp"

#include <prefixkv/compress/compress.hpp>

namespace prefixkv_llama {

//! The host engine (see serve_loop.hpp for the interface).
class host_engine {
 public:
  bool init(const model& m, const serve_options& o, int slots, int max_blocks, std::string& err) {
    (void)err;
    mr_ = model_ref::shape_of(m);
    mr_.bind_weights(m, m.w.data.data());
    rope_ = rope_table(mr_.hs, mr_.seq_len);
    mr_.rope_cos = rope_.cos.data();
    mr_.rope_sin = rope_.sin.data();
    o_ = o;
    slots_ = slots;
    max_blocks_ = max_blocks;
    const size_t pool = size_t(o.pool_pages) * o.page_size * mr_.kv_heads * mr_.hs;
    k_.assign(pool, 0.f);
    v_.assign(pool, 0.f);
    return true;
  }
  bool upload(const std::vector<int32_t>& tables, const std::vector<int32_t>* lengths, std::string&) {
    table_ = tables;
    if (lengths) len_ = *lengths;
    return true;
  }
  bool forward(const std::vector<int>& cols, int n, int k, int rec_batch, int p_tokens, std::vector<float>& logits,
               std::string&) {
    batch_args a;
    a.n = n;
    a.token = cols.data(), a.pos = cols.data() + n, a.seq = cols.data() + 2 * n, a.off = cols.data() + 3 * n;
    a.cnt = cols.data() + 4 * n, a.rec = cols.data() + 5 * n;
    a.len = len_.data();
    a.slots = slots_;
    if (rec_batch > 0) {
      P_.assign(size_t(mr_.layers) * rec_batch * mr_.heads * size_t(p_tokens) * size_t(p_tokens), 0.f);
      a.P = P_.data();
      a.rec_batch = rec_batch;
      a.p_tokens = p_tokens;
    }
    forward_host(mr_, cache(), a, fb_, cols.data() + 6 * size_t(n), k);
    logits.assign(fb_.logits.begin(), fb_.logits.begin() + size_t(k) * mr_.vocab);
    return true;
  }
  bool compress(const prefixkv::compress_plan& plan, const std::vector<int32_t>& stage,
                const std::vector<int32_t>& lens, int b0, int rb, int tm, std::vector<int32_t>& out,
                std::string& err) {
    namespace pk = prefixkv;
    const int L = mr_.layers, Hq = mr_.heads, nb = int(lens.size());
    std::vector<pk::paged_kv_view<float>> kv(static_cast<size_t>(L)), vv(static_cast<size_t>(L));
    std::vector<pk::kv_view<const float>> pv;
    for (int l = 0; l < L; ++l) {
      const int32_t* t = stage.data() + size_t(l) * nb * max_blocks_;
      kv[l] = pk::make_paged_kv_view(k_.data(), pk::page_layout::nhd, o_.pool_pages, o_.page_size, mr_.kv_heads,
                                     mr_.hs, t, nb, max_blocks_);
      vv[l] = pk::make_paged_kv_view(v_.data(), pk::page_layout::nhd, o_.pool_pages, o_.page_size, mr_.kv_heads,
                                     mr_.hs, t, nb, max_blocks_);
    }
    pk::compress_args<pk::paged_kv_layers<float>, float> a;
    a.cache = pk::paged_kv_layers<float>{kv.data(), vv.data(), nullptr, nullptr, L};
    a.lengths = lens.data();
    if (plan.cfg.scorer == pk::scorer_kind::attention) {
      pv.resize(static_cast<size_t>(L));
      for (int l = 0; l < L; ++l)
        pv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(P_.data()) + (size_t(l) * rb + b0) * Hq * size_t(tm) * tm,
                                      nb, Hq, tm, tm);
      a.attention = pv.data();
    }
    const int64_t segs = plan.segments(nb);
    out.assign(size_t(segs) + 1, -1);
    a.out.lengths = out.data();
    a.out.status = out.data() + segs;
    if (pk::compress_host(plan, a) != cudaSuccess && out[size_t(segs)] <= 0)
      return err = pk::last_error().message, false;  // not a chain failure: the call itself was refused
    return true;
  }

 private:
  paged_kv cache() {
    paged_kv c;
    c.k = k_.data(), c.v = v_.data(), c.table = table_.data(), c.slots = slots_, c.max_blocks = max_blocks_;
    c.page_size = o_.page_size, c.kv_heads = mr_.kv_heads, c.hs = mr_.hs;
    return c;
  }
  model_ref mr_;
  rope_table rope_;
  serve_options o_;
  int slots_ = 0, max_blocks_ = 0;
  std::vector<float> k_, v_, P_;
  std::vector<int32_t> table_, len_;
  host_forward_buffers fb_;
};

//! Serve on the host (see serve.hpp).
inline bool serve_host(const model& m, const std::vector<serve_request>& reqs,
                       const std::vector<std::vector<int>>& prompts, const serve_options& opt,
                       std::vector<serve_result>& results, serve_summary& summary, std::string& err) {
  host_engine e;
  return serve_with(e, m, reqs, prompts, opt, results, summary, err);
}

}  // namespace prefixkv_llama
