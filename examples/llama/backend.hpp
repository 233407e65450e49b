// prefixkv-llama: the backend interface — the model's weights, its KV caches and the forward pass on one device,
// and the prefixkv compressor run on those caches. `cpu_backend.hpp` implements it on the host with
// `prefixkv::compress_host`; a CUDA backend implements the same interface with the device compressor
// (`prefixkv::compress`), so the command line, the sampling and the study stay the same.
//
// The caches: per layer, K and V of shape (kv_head, capacity, head_size); every (layer, kv head) has its own length,
// because the compressor may keep a different number of tokens per layer (layer granularity) or per kv head (head
// granularity). A new token is appended at the end of every (layer, kv head) and sees exactly the tokens kept there;
// its RoPE position is its position in the original sequence (the caller passes it), so decoding continues at
// prompt_len, prompt_len + 1, ... after compression.
#pragma once

#include "decode_upkeep.hpp"
#include "model.hpp"

#include <prefixkv/compress/compress.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace prefixkv_llama {

//! What a prefill records for the compressor's scorer.
struct prefill_record {
  bool attention = false;  //!< the attention probabilities P_l (1, q_head, T, T), causal (scorer `attention`)
  int window = 0;          //!< the post-RoPE queries of the last min(window, T) positions (scorer `window`)
};

//! One device's model, caches and forward pass. Not thread-safe; one sequence (batch 1).
class backend {
 public:
  virtual ~backend() = default;
  virtual const config& cfg() const = 0;
  //! "cpu" or "cuda".
  virtual const char* device() const = 0;
  //! Empty every cache (capacity: the model's seq_len).
  virtual void reset() = 0;
  //! Feed `tokens` (n >= 1) at positions 0 .. n-1 into empty caches, recording what `rec` asks for; `logits`
  //! receives the last position's logits. False with a one-line reason in `err`.
  virtual bool prefill(const int* tokens, int n, const prefill_record& rec, std::vector<float>& logits,
                       std::string& err) = 0;
  //! Feed one token at RoPE position `pos` over the current caches (appended to every layer and kv head).
  virtual bool step(int token, int pos, std::vector<float>& logits, std::string& err) = 0;
  //! Compress the caches with `plan` (made by `make_plan` for this model, batch 1), using what the last prefill
  //! recorded. Must follow `prefill` directly (the recorded inputs describe the prefilled caches).
  virtual bool compress(const prefixkv::compress_plan& plan, std::string& err) = 0;
  //! Tokens cached per (layer, kv head), layer-major: (n_layers * n_kv_heads).
  virtual std::vector<int32_t> lengths() const = 0;
  //! Keep a copy of the caches in slot 0 or 1 / bring it back (recorded scorer inputs are not touched).
  virtual void save(int slot) = 0;
  virtual void restore(int slot) = 0;
  //! Decode-time budget upkeep (decode_upkeep.hpp): from now on every `step` ends by bringing every cache back to
  //! its budget. Starts from the current caches (after `prefill` and `compress`); `prefill`, `reset` and `restore`
  //! stop it. False with a one-line reason (also on backends without upkeep).
  virtual bool begin_decode(const decode_options& o, std::string& err) {
    (void)o;
    err = std::string("decode upkeep is not available on the ") + device() + " backend";
    return false;
  }
  virtual void end_decode() {}

 protected:
  //! What `compress` needs from the last prefill: caches straight from it (every length `prompt_len`) and the
  //! recorded inputs of the plan's scorer. False with a one-line reason in `err`.
  static bool compress_ready(const prefixkv::compress_plan& plan, bool prefilled, const std::vector<int32_t>& lengths,
                             int prompt_len, bool has_attention, int window, std::string& err) {
    if (!prefilled) return err = "compress: the caches must come straight from a prefill", false;
    for (int32_t x : lengths)
      if (x != prompt_len) return err = "compress: the caches were already compressed", false;
    if (plan.cfg.scorer == prefixkv::scorer_kind::attention && !has_attention)
      return err = "compress: the prefill did not record attention probabilities", false;
    if (plan.cfg.scorer == prefixkv::scorer_kind::window && window == 0)
      return err = "compress: the prefill did not record window queries", false;
    return true;
  }
};

}  // namespace prefixkv_llama
