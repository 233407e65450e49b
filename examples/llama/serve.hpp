// prefixkv-llama --serve: many requests over one paged KV pool, compressed in place after their prefill.
//
// Requests (one JSON object a line: {"prompt": TEXT, "steps": N, "method": M, "evict_ratio": R}; every field but
// the prompt optional, defaults from the command line) arrive in file order. Every loop iteration
//   1. admits requests, in order, while the pages they may need fit the pool (a request reserves the most pages it
//      may ever hold: its prompt's pages in every layer during the prefill, and a bound of its compressed cache plus
//      every token it may generate, see `serve_reservation`; nothing is ever preempted, so an admitted request never
//      waits for a page), at most --max-prefill of them per iteration;
//   2. prefills the admitted requests together as one ragged batch (recording the attention probabilities their
//      scorer needs), and compresses the pages of every group of them that shares a policy with one call of the
//      device compressor (all layers, in place, per-layer block tables); each layer then returns the pages past its
//      kept tokens to the pool, and the request's reservation shrinks to its compressed worst case;
//   3. decodes every active request by one token (one batch);
//   4. finished requests (BOS / EOS, their step count, or the end of the context) return all their pages.
// The pool: pages of `page_size` tokens (NHD: (page, slot, kv_head, head_dim)), K and V, one pool shared by all
// layers; block tables per (layer, request), since every layer keeps its own number of tokens after compression.
//
// Every request generates exactly the tokens `prefixkv-llama --prompt ...` generates alone (greedy, same policy,
// contiguous caches): the batched kernels compute each token from its own sequence only, in the order of the
// single-sequence path, and the compressor keeps the same tokens of a sequence whatever batch it is in.
//
// This header is plain C++ (request parsing, the pool's bookkeeping, the report). The loop (serve_loop.hpp) runs on
// the host (serve_host.hpp, `--device cpu`) or on the GPU (cuda_serve.cu, `--device cuda`).
#pragma once

#include "model.hpp"
#include "policy.hpp"

#include <prefixkv/io/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace prefixkv_llama {

//! One request.
struct serve_request {
  std::string prompt;
  int steps = 64;
  policy pol;
};

//! Loop limits.
struct serve_options {
  int pool_pages = 0;         //!< pages in the pool (shared by the layers, K and V together)
  int page_size = 16;         //!< tokens per page
  int max_active = 256;       //!< requests decoding together at most
  int max_prefill = 8;        //!< requests admitted (prefilled together) per iteration at most
  int max_prefill_tokens = 4096;  //!< prompt tokens prefilled together at most (one request always fits)
};

//! What happened to one request.
struct serve_result {
  std::vector<int> tokens;     //!< generated tokens (greedy)
  std::vector<int32_t> kept;   //!< tokens cached per (layer, kv head) right after compression
  std::string error;           //!< non-empty: the request was refused (too long, budget infeasible, never fits)
  int admitted = -1, finished = -1;  //!< loop iterations
};

//! One sample of the pool over time (one per loop iteration).
struct serve_sample {
  int iteration = 0, active = 0, pages_in_use = 0, pages_reserved = 0;
  double seconds = 0.0;
};

struct serve_summary {
  int requests = 0, completed = 0, refused = 0, peak_active = 0, pool_pages = 0, peak_pages = 0;
  int iterations = 0, pages_in_use_end = 0, pages_reserved_end = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double seconds = 0.0;
  std::vector<serve_sample> timeline;
  double tokens_per_s() const { return seconds > 0 ? double(generated_tokens) / seconds : 0.0; }
};

// ---- requests --------------------------------------------------------------------------------------------------

namespace serve_detail {

inline void skip_ws(const std::string& s, size_t& i) {
  while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) ++i;
}
inline void put_utf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}
inline bool hex4(const std::string& s, size_t i, uint32_t& v) {
  if (i + 4 > s.size()) return false;
  v = 0;
  for (size_t k = i; k < i + 4; ++k) {
    const char c = s[k];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
    else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
    else return false;
  }
  return true;
}
//! A JSON string at s[i] == '"'; escapes decoded (\uXXXX with surrogate pairs to UTF-8).
inline bool parse_string(const std::string& s, size_t& i, std::string& out) {
  if (i >= s.size() || s[i] != '"') return false;
  ++i;
  out.clear();
  while (i < s.size()) {
    const char c = s[i++];
    if (c == '"') return true;
    if (static_cast<unsigned char>(c) < 0x20) return false;
    if (c != '\\') {
      out += c;
      continue;
    }
    if (i >= s.size()) return false;
    const char e = s[i++];
    switch (e) {
      case '"': out += '"'; break;
      case '\\': out += '\\'; break;
      case '/': out += '/'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'u': {
        uint32_t c1 = 0;
        if (!hex4(s, i, c1)) return false;
        i += 4;
        if (c1 >= 0xD800 && c1 < 0xDC00) {
          uint32_t c2 = 0;
          if (i + 1 >= s.size() || s[i] != '\\' || s[i + 1] != 'u' || !hex4(s, i + 2, c2) || c2 < 0xDC00 || c2 >= 0xE000)
            return false;
          i += 6;
          c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
        } else if (c1 >= 0xDC00 && c1 < 0xE000) {
          return false;
        }
        put_utf8(out, c1);
        break;
      }
      default: return false;
    }
  }
  return false;
}
//! A JSON number at s[i] (strict grammar, finite as a double).
inline bool parse_number(const std::string& s, size_t& i, double& v) {
  const size_t n = prefixkv::detail::json_number_length(s.data() + i, s.data() + s.size());
  if (n == 0) return false;
  std::vector<double> one;
  const std::string text = "[" + s.substr(i, n) + "]";
  if (prefixkv::json_parse_number_array(text.data(), text.size(), one) != cudaSuccess || one.size() != 1) return false;
  v = one[0];
  i += n;
  return true;
}

}  // namespace serve_detail

//! Parse a requests file (JSON Lines; blank lines skipped). Keys: "prompt" (string, required), "steps" (integer >= 0),
//! "method" (a method name), "evict_ratio" (in [0, 1)); unknown keys are refused. `base` gives every other policy
//! field and the defaults. False with a one-line reason (naming the line) on malformed input.
inline bool parse_requests(const std::string& text, const policy& base, int default_steps,
                           std::vector<serve_request>& out, std::string& err) {
  using namespace serve_detail;
  std::vector<serve_request> reqs;
  size_t start = 0;
  int line_no = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    ++line_no;
    size_t i = 0;
    skip_ws(line, i);
    if (i == line.size()) continue;
    auto bad = [&](const std::string& why) {
      err = "requests line " + std::to_string(line_no) + ": " + why;
      return false;
    };
    if (line[i] != '{') return bad("expected a JSON object");
    ++i;
    serve_request r;
    r.pol = base;
    r.steps = default_steps;
    bool has_prompt = false, first = true;
    for (;;) {
      skip_ws(line, i);
      if (i < line.size() && line[i] == '}' && first) {
        ++i;
        break;
      }
      std::string key;
      if (!parse_string(line, i, key)) return bad("expected a key string");
      skip_ws(line, i);
      if (i >= line.size() || line[i] != ':') return bad("expected ':' after \"" + key + "\"");
      ++i;
      skip_ws(line, i);
      if (key == "prompt" || key == "method") {
        std::string v;
        if (!parse_string(line, i, v)) return bad("\"" + key + "\" must be a string");
        if (key == "prompt") {
          r.prompt = v;
          has_prompt = true;
        } else if (!parse_method(v, r.pol.method)) {
          return bad("unknown method '" + v + "'");
        }
      } else if (key == "steps" || key == "evict_ratio") {
        double v = 0;
        if (!parse_number(line, i, v)) return bad("\"" + key + "\" must be a number");
        if (key == "steps") {
          if (v < 0 || v > (1 << 20) || v != double(int(v))) return bad("\"steps\" must be an integer in [0, 2^20]");
          r.steps = int(v);
        } else {
          if (!(v >= 0.0 && v < 1.0)) return bad("\"evict_ratio\" must be in [0, 1)");
          r.pol.evict_ratio = v;
        }
      } else {
        return bad("unknown key \"" + key + "\" (prompt, steps, method, evict_ratio)");
      }
      first = false;
      skip_ws(line, i);
      if (i < line.size() && line[i] == ',') {
        ++i;
        continue;
      }
      if (i < line.size() && line[i] == '}') {
        ++i;
        break;
      }
      return bad("expected ',' or '}'");
    }
    skip_ws(line, i);
    if (i != line.size()) return bad("text after the object");
    if (!has_prompt) return bad("\"prompt\" is missing");
    if (r.pol.method == method_kind::profile) return bad("method profile is not served (no profile per request)");
    reqs.push_back(std::move(r));
  }
  if (reqs.empty()) return err = "the requests file holds no request", false;
  out.swap(reqs);
  return true;
}

// ---- the pool's bookkeeping ------------------------------------------------------------------------------------

//! Free pages (the lowest id first) and reservations: a request reserves the most pages it may ever hold; the pages
//! it holds are always within its reservation, so an admitted request never waits for a page.
class page_pool {
 public:
  explicit page_pool(int pages = 0) : capacity_(pages) {
    for (int p = pages - 1; p >= 0; --p) free_.push_back(p);
  }
  int capacity() const { return capacity_; }
  int free_pages() const { return int(free_.size()); }
  int in_use() const { return capacity_ - int(free_.size()); }
  int reserved() const { return reserved_; }
  bool can_reserve(int n) const { return n >= 0 && reserved_ + n <= capacity_; }
  bool reserve(int n) {
    if (!can_reserve(n)) return false;
    reserved_ += n;
    return true;
  }
  void unreserve(int n) { reserved_ -= n; }
  //! A free page, or -1.
  int alloc() {
    if (free_.empty()) return -1;
    const int p = free_.back();
    free_.pop_back();
    return p;
  }
  void release(int page) { free_.push_back(page); }

 private:
  int capacity_ = 0, reserved_ = 0;
  std::vector<int> free_;
};

//! Pages of `tokens` tokens.
inline int pages_for(int64_t tokens, int page_size) { return int((tokens + page_size - 1) / page_size); }

//! Decode steps (tokens fed back) a request of `prompt` tokens may run: the first token comes from the prefill,
//! each later one from a step, and a step needs a position inside the context (as `generate`).
inline int serve_appends(int prompt, int steps, int seq_len) {
  if (steps <= 0) return 0;
  return std::max(0, std::min(steps - 1, seq_len - prompt));
}

//! The most pages a request may hold from now on: every layer's cached tokens `len[l]` (the most over its kv
//! heads) plus `appends` more, in pages.
inline int serve_pages_needed(const std::vector<int32_t>& len_per_layer, int appends, int page_size) {
  int n = 0;
  for (int32_t x : len_per_layer) n += pages_for(int64_t(x) + appends, page_size);
  return n;
}

//! Pages a request reserves when it is admitted: the most it may ever hold. Its prefill holds every layer's prompt
//! (`layers` x pages of `prompt` tokens); from then on it holds its cache plus the `appends` tokens it may generate.
//! Without compression that is every layer's prompt plus the appends. With compression the cache is not known before
//! the compressor runs, but its total is: an evict ratio r evicts rint(r N) of the N tokens of the sequence's
//! segments (N = layers x prompt, times kv_heads with head granularity), so the layers keep K <= min(layers x prompt,
//! N - rint(r N)) tokens between them (the most over kv heads per layer, summed), and their pages after compression
//! are at most floor((K + layers x (appends + page_size - 1)) / page_size). The loop shrinks the reservation to the
//! exact count once the compressor has run.
inline int serve_reservation(int layers, int kv_heads, int prompt, int appends, int page_size, const policy& p) {
  const int full = layers * pages_for(int64_t(prompt) + appends, page_size);
  if (!compresses(p)) return full;
  const int64_t heads = per_head(p.method) ? kv_heads : 1;
  const int64_t n = int64_t(layers) * heads * prompt;
  const int64_t evicted = static_cast<int64_t>(std::rint(p.evict_ratio * static_cast<double>(n)));
  const int64_t kept = std::min<int64_t>(int64_t(layers) * prompt, n - std::min(evicted, n));
  const int64_t after = (kept + int64_t(layers) * (appends + page_size - 1)) / page_size;
  return std::max(layers * pages_for(prompt, page_size), int(std::min<int64_t>(full, after)));
}

//! The policy key requests are grouped by (one compressor call per group).
inline bool same_policy(const policy& a, const policy& b) {
  return a.method == b.method && a.scorer == b.scorer && a.evict_ratio == b.evict_ratio && a.sinks == b.sinks &&
         a.recent == b.recent && a.window == b.window && a.profile == b.profile;
}

// ---- the report ----------------------------------------------------------------------------------------------------

//! The summary as one JSON object (the timeline included).
inline std::string summary_json(const serve_summary& s) {
  using namespace prefixkv;
  std::string j = "{\"summary\": {\"requests\": ";
  json_append_int(j, s.requests);
  j += ", \"completed\": ";
  json_append_int(j, s.completed);
  j += ", \"refused\": ";
  json_append_int(j, s.refused);
  j += ", \"pool_pages\": ";
  json_append_int(j, s.pool_pages);
  j += ", \"peak_active\": ";
  json_append_int(j, s.peak_active);
  j += ", \"peak_pages\": ";
  json_append_int(j, s.peak_pages);
  j += ", \"prompt_tokens\": ";
  json_append_int(j, s.prompt_tokens);
  j += ", \"generated_tokens\": ";
  json_append_int(j, s.generated_tokens);
  j += ", \"seconds\": ";
  json_append_number(j, s.seconds);
  j += ", \"tokens_per_s\": ";
  json_append_number(j, s.tokens_per_s());
  j += ", \"iterations\": ";
  json_append_int(j, s.iterations);
  j += ", \"pages_in_use_end\": ";
  json_append_int(j, s.pages_in_use_end);
  j += ", \"pages_reserved_end\": ";
  json_append_int(j, s.pages_reserved_end);
  j += ", \"timeline\": {\"iteration\": [";
  for (size_t i = 0; i < s.timeline.size(); ++i) {
    if (i) j += ", ";
    json_append_int(j, s.timeline[i].iteration);
  }
  j += "], \"active\": [";
  for (size_t i = 0; i < s.timeline.size(); ++i) {
    if (i) j += ", ";
    json_append_int(j, s.timeline[i].active);
  }
  j += "], \"pages_in_use\": [";
  for (size_t i = 0; i < s.timeline.size(); ++i) {
    if (i) j += ", ";
    json_append_int(j, s.timeline[i].pages_in_use);
  }
  j += "], \"pages_reserved\": [";
  for (size_t i = 0; i < s.timeline.size(); ++i) {
    if (i) j += ", ";
    json_append_int(j, s.timeline[i].pages_reserved);
  }
  j += "], \"seconds\": [";
  for (size_t i = 0; i < s.timeline.size(); ++i) {
    if (i) j += ", ";
    json_append_number(j, s.timeline[i].seconds);
  }
  j += "]}}}";
  return j;
}

//! A string as a JSON string literal.
inline std::string json_quote(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\r': o += "\\r"; break;
      case '\t': o += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          o += buf;
        } else {
          o += char(c);
        }
    }
  }
  return o + "\"";
}

//! Run the loop on the GPU (cuda_serve.cu; builds with CUDA only; `serve_host` in serve_host.hpp runs it on the
//! host). `prompts`: the requests' encoded prompts. False with a one-line reason when the loop cannot run (no device,
//! out of memory, bad options); refused requests are reported in their result instead.
bool serve_cuda(const model& m, const std::vector<serve_request>& reqs, const std::vector<std::vector<int>>& prompts,
                const serve_options& opt, std::vector<serve_result>& results, serve_summary& summary,
                std::string& err);

}  // namespace prefixkv_llama
