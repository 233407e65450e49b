// prefixkv-llama --serve: the loop (see serve.hpp), written once over an engine that owns the pool's memory and runs
// the batched forward pass and the compressor: `host_engine` (serve_host.hpp, plain C++, `--device cpu`) or the CUDA
// engine (cuda_serve.cu, `--device cuda`). The loop keeps the bookkeeping on the host — the free pages, every
// request's reservation, the block tables (layer, slot, block) and the lengths (layer, slot, kv head) — and hands the
// engine copies of the tables and lengths when they change; the engine's forward pass grows the lengths itself
// exactly as the loop's mirror does.
//
// Engine interface:
//   bool init(const model& m, const serve_options& o, int slots, int max_blocks, std::string& err);
//   bool upload(const std::vector<int32_t>& tables, const std::vector<int32_t>* lengths, std::string& err);
//   bool forward(const std::vector<int>& cols, int n, int k, int rec_batch, int p_tokens, std::vector<float>& logits,
//                std::string& err);
//       cols: the columns token, pos, seq, off, cnt, rec of n tokens (batch_forward.hpp), then k token indices whose
//       logits are wanted (k rows of logits come back); rec_batch > 0: record the attention probabilities of the
//       tokens with rec >= 0 in a zeroed P (layers, rec_batch, q_heads, p_tokens, p_tokens)
//   bool compress(const prefixkv::compress_plan& plan, const std::vector<int32_t>& stage_tables,
//                 const std::vector<int32_t>& lengths, int b0, int rb, int tm, std::vector<int32_t>& out,
//                 std::string& err);
//       compress the nb = lengths.size() sequences whose block tables are stage_tables (layer, nb, max_blocks) in
//       place, with P's sequences [b0, b0 + nb) (P as recorded by the last forward: rb sequences of tm tokens);
//       out: the new lengths (layers, nb[, kv heads]) then the chain's status word
#pragma once

#include "batch_forward.hpp"
#include "serve.hpp"

#include <algorithm>
#include <chrono>
#include <tuple>

namespace prefixkv_llama {
namespace serve_detail {

//! Index of the largest of n logits (the lowest index on ties), as `argmax` in runtime.hpp.
inline int argmax_row(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

//! An admitted request.
struct live {
  int id = -1, slot = -1, prompt = 0, steps = 0, reserved = 0;
  int pending = -1;  // token to feed at the next decode step (-1: none, finished)
};

template <class Engine>
class server {
 public:
  server(Engine& e, const model& m, const std::vector<serve_request>& reqs,
         const std::vector<std::vector<int>>& prompts, const serve_options& opt, std::vector<serve_result>& results,
         serve_summary& sum)
      : e_(e), m_(m), reqs_(reqs), prompts_(prompts), o_(opt), res_(results), sum_(sum), pool_(opt.pool_pages) {}

  bool run(std::string& err) {
    if (!setup(err)) return false;
    const auto t0 = std::chrono::steady_clock::now();
    auto now = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
    size_t next = 0;
    int iteration = 0;
    while (next < reqs_.size() || !active_.empty()) {
      // 1. admission, in arrival order, while the reservations fit
      std::vector<int> admitted;
      int64_t tokens = 0;
      while (next < reqs_.size() && int(admitted.size()) < o_.max_prefill &&
             int(active_.size()) < o_.max_active) {
        const int id = int(next);
        const int T = int(prompts_[id].size());
        std::string why;
        int need = 0;
        if (!admissible(id, need, why)) {
          res_[id].error = why;
          ++next;
          continue;
        }
        if (!admitted.empty() && tokens + T > o_.max_prefill_tokens) break;
        if (!pool_.reserve(need)) break;  // wait for pages
        admitted.push_back(id);
        tokens += T;
        ++next;
        live r;
        r.id = id;
        r.prompt = T;
        r.steps = std::min(reqs_[id].steps, m_.cfg.seq_len);  // as the command line caps --steps
        r.reserved = need;
        r.slot = free_slots_.back();
        free_slots_.pop_back();
        res_[id].admitted = iteration;
        active_.push_back(r);
      }
      if (!admitted.empty() && !prefill(admitted, iteration, err)) return false;
      // 2. one decode step for every active request
      if (!decode(iteration, err)) return false;
      // 3. the pool over time
      serve_sample smp;
      smp.iteration = iteration;
      smp.active = int(active_.size());
      smp.pages_in_use = pool_.in_use();
      smp.pages_reserved = pool_.reserved();
      smp.seconds = now();
      sum_.timeline.push_back(smp);
      sum_.peak_active = std::max(sum_.peak_active, smp.active);
      sum_.peak_pages = std::max(sum_.peak_pages, smp.pages_in_use);
      // 4. finished requests give their pages back
      retire();
      ++iteration;
    }
    sum_.seconds = now();
    sum_.iterations = iteration;
    sum_.pages_in_use_end = pool_.in_use();
    sum_.pages_reserved_end = pool_.reserved();
    sum_.pool_pages = pool_.capacity();
    sum_.requests = int(reqs_.size());
    for (size_t i = 0; i < reqs_.size(); ++i) {
      if (!res_[i].error.empty()) {
        ++sum_.refused;
        continue;
      }
      ++sum_.completed;
      sum_.prompt_tokens += int64_t(prompts_[i].size());
      sum_.generated_tokens += int64_t(res_[i].tokens.size());
    }
    return true;
  }

 private:
  // ---- set-up ----------------------------------------------------------------------------------------------------
  bool setup(std::string& err) {
    const config& c = m_.cfg;
    if (prompts_.size() != reqs_.size()) return err = "serve: one prompt per request", false;
    if (o_.pool_pages < 1) return err = "--pool-pages must be >= 1", false;
    if (o_.page_size < 1 || o_.max_active < 1 || o_.max_prefill < 1 || o_.max_prefill_tokens < 1)
      return err = "--serve: the page size, --max-active, --max-prefill and --max-prefill-tokens must be >= 1", false;
    if (int64_t(o_.pool_pages) * o_.page_size * c.n_kv_heads * c.head_size() > (int64_t(1) << 36) ||
        int64_t(c.n_layers) * o_.max_active * pages_for(c.seq_len, o_.page_size) > (int64_t(1) << 28))
      return err = "--serve: the pool or the block tables are too large", false;
    for (const serve_request& r : reqs_)
      if (compresses(r.pol) && r.pol.method != method_kind::streaming && r.pol.scorer != scorer_name::attention)
        return err = "--serve: the window and key-norm scorers read K through one block table shared by the layers; "
                     "serving keeps a block table per (layer, request), so use --scorer attention",
               false;
    L_ = c.n_layers, Hk_ = c.n_kv_heads;
    max_blocks_ = pages_for(c.seq_len, o_.page_size);
    slots_ = o_.max_active;
    table_.assign(size_t(L_) * slots_ * max_blocks_, -1);
    held_.assign(size_t(L_) * slots_, 0);
    len_.assign(size_t(L_) * slots_ * Hk_, 0);
    for (int s = slots_ - 1; s >= 0; --s) free_slots_.push_back(s);
    res_.assign(reqs_.size(), serve_result{});
    sum_ = serve_summary{};
    if (!e_.init(m_, o_, slots_, max_blocks_, err)) return false;
    return upload(true, err);
  }

  bool upload(bool lengths, std::string& err) {
    table_dirty_ = false;
    return e_.upload(table_, lengths ? &len_ : nullptr, err);
  }

  //! Can request `id` ever run? `need`: its worst-case pages (every layer full, every step generated).
  bool admissible(int id, int& need, std::string& why) {
    const config& c = m_.cfg;
    const int T = int(prompts_[id].size());
    const serve_request& r = reqs_[id];
    if (T < 1 || T > c.seq_len) {
      why = "the prompt has " + std::to_string(T) + " tokens, the context " + std::to_string(c.seq_len);
      return false;
    }
    if (compresses(r.pol)) {  // the budget must be feasible (what the compressor's prologue checks)
      prefixkv::compress_plan plan;
      std::string e;
      if (!make_policy_plan(r.pol, c, plan, e, o_.max_prefill, o_.pool_pages, o_.page_size)) return why = e, false;
      int64_t counts[prefixkv::compact_max_layers];
      const prefixkv::reason rb =
          prefixkv::detail::sequence_budgets(plan, [&](int64_t, int64_t) { return int64_t(T); }, counts);
      if (rb != prefixkv::reason::none) return why = prefixkv::detail::compress_message(rb), false;
    }
    need = serve_reservation(L_, Hk_, T, serve_appends(T, std::min(r.steps, c.seq_len), c.seq_len), o_.page_size,
                             r.pol);
    if (need > pool_.capacity()) {
      why = "needs " + std::to_string(need) + " pages, the pool has " + std::to_string(pool_.capacity());
      return false;
    }
    return true;
  }

  live* find(int id) {
    for (live& r : active_)
      if (r.id == id) return &r;
    return nullptr;
  }
  int32_t& table_at(int l, int slot, int blk) { return table_[(size_t(l) * slots_ + slot) * max_blocks_ + blk]; }
  int& held_at(int l, int slot) { return held_[size_t(l) * slots_ + slot]; }
  int32_t& len_at(int l, int slot, int h) { return len_[(size_t(l) * slots_ + slot) * Hk_ + h]; }
  int layer_len(int l, int slot) {
    int32_t mx = 0;
    for (int h = 0; h < Hk_; ++h) mx = std::max(mx, len_at(l, slot, h));
    return mx;
  }
  //! Layer l of `slot` holds pages for `tokens` tokens (grows only).
  bool hold(int l, int slot, int64_t tokens, std::string& err) {
    const int want = pages_for(tokens, o_.page_size);
    for (int& h = held_at(l, slot); h < want; ++h) {
      const int p = pool_.alloc();
      if (p < 0) return err = "serve: the pool ran out of pages within a reservation", false;
      table_at(l, slot, h) = p;
      table_dirty_ = true;
    }
    return true;
  }
  //! Layer l of `slot` keeps pages for `tokens` tokens and returns the rest to the pool.
  void shrink(int l, int slot, int64_t tokens) {
    const int keep = pages_for(tokens, o_.page_size);
    for (int& h = held_at(l, slot); h > keep; --h) {
      pool_.release(table_at(l, slot, h - 1));
      table_at(l, slot, h - 1) = -1;
      table_dirty_ = true;
    }
  }

  //! The first token of a request (from its prefill's logits) or the next one (from a decode step), as `generate`:
  //! stop at BOS / EOS (not kept), keep the token, stop after `steps` tokens or at the end of the context.
  void advance(live& r, int tok, int iteration) {
    serve_result& out = res_[r.id];
    const int i = int(out.tokens.size());
    r.pending = -1;
    if (tok == 1 || tok == 2) return finish(r, iteration);
    out.tokens.push_back(tok);
    if (i + 1 == r.steps || r.prompt + i >= m_.cfg.seq_len) return finish(r, iteration);
    r.pending = tok;
  }
  void finish(live& r, int iteration) {
    r.pending = -1;
    res_[r.id].finished = iteration;
  }

  // ---- prefill + compression ---------------------------------------------------------------------------------------
  bool prefill(std::vector<int> ids, int iteration, std::string& err) {
    const config& c = m_.cfg;
    // requests that record attention probabilities first, then grouped by policy (one compressor call per group)
    auto key = [&](int id) {
      const policy& p = reqs_[id].pol;
      return std::make_tuple(record_for(p).attention ? 0 : 1, compresses(p) ? 0 : 1, int(p.method), p.evict_ratio,
                             int(p.scorer), p.sinks, p.recent, p.window);
    };
    std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return key(a) < key(b); });
    const int B = int(ids.size());
    int rb = 0, tm = 0, n = 0;
    for (int id : ids) {
      const int T = int(prompts_[id].size());
      if (record_for(reqs_[id].pol).attention) {
        ++rb;
        tm = std::max(tm, T);
      }
      n += T;
    }
    // pages for the prompts, empty lengths
    for (int id : ids) {
      const live& r = *find(id);
      for (int l = 0; l < L_; ++l) {
        if (!hold(l, r.slot, r.prompt, err)) return false;
        for (int h = 0; h < Hk_; ++h) len_at(l, r.slot, h) = 0;
      }
    }
    if (!upload(true, err)) return false;
    // one ragged batch: token, pos, seq, off, cnt, rec columns, then the logit rows (every prompt's last token)
    std::vector<int> cols(6 * size_t(n) + B);
    int at = 0;
    for (int b = 0; b < B; ++b) {
      const live& r = *find(ids[b]);
      const std::vector<int>& toks = prompts_[ids[b]];
      for (int t = 0; t < r.prompt; ++t, ++at) {
        cols[at] = toks[t];
        cols[n + at] = t;
        cols[2 * n + at] = r.slot;
        cols[3 * n + at] = t;
        cols[4 * n + at] = r.prompt;
        cols[5 * n + at] = b < rb ? b : -1;
      }
      cols[6 * size_t(n) + b] = at - 1;
    }
    if (!e_.forward(cols, n, B, rb, tm, logits_, err)) return false;
    for (int id : ids) {
      const live& r = *find(id);
      for (int l = 0; l < L_; ++l)
        for (int h = 0; h < Hk_; ++h) len_at(l, r.slot, h) = r.prompt;
    }
    // compress every group of requests that share a policy, with one call
    for (int b0 = 0; b0 < B;) {
      int b1 = b0 + 1;
      while (b1 < B && same_policy(reqs_[ids[b1]].pol, reqs_[ids[b0]].pol)) ++b1;
      if (compresses(reqs_[ids[b0]].pol) && !compress_group(ids, b0, b1, tm, rb, err)) return false;
      b0 = b1;
    }
    if (!upload(true, err)) return false;
    // first tokens, from the prefill's logits
    for (int b = 0; b < B; ++b) {
      live& r = *find(ids[b]);
      res_[r.id].kept.resize(size_t(L_) * Hk_);
      for (int l = 0; l < L_; ++l)
        for (int h = 0; h < Hk_; ++h) res_[r.id].kept[size_t(l) * Hk_ + h] = len_at(l, r.slot, h);
      if (r.steps <= 0) {
        finish(r, iteration);
        continue;
      }
      advance(r, argmax_row(logits_.data() + size_t(b) * c.vocab_size, c.vocab_size), iteration);
    }
    return true;
  }

  bool compress_group(const std::vector<int>& ids, int b0, int b1, int tm, int rb, std::string& err) {
    const config& c = m_.cfg;
    const policy& pol = reqs_[ids[b0]].pol;
    const int nb = b1 - b0;
    prefixkv::compress_plan plan;
    if (!make_policy_plan(pol, c, plan, err, o_.max_prefill, o_.pool_pages, o_.page_size)) return false;
    if (plan.cfg.scorer == prefixkv::scorer_kind::attention && b1 > rb)
      return err = "serve: a request without recorded attention in a compressed group", false;
    // the group's block tables per layer (batch nb) and its prompt lengths
    std::vector<int32_t> stage(size_t(L_) * nb * max_blocks_), lens(static_cast<size_t>(nb));
    for (int l = 0; l < L_; ++l)
      for (int b = 0; b < nb; ++b) {
        const live& r = *find(ids[b0 + b]);
        for (int k = 0; k < max_blocks_; ++k) stage[(size_t(l) * nb + b) * max_blocks_ + k] = table_at(l, r.slot, k);
        lens[b] = r.prompt;
      }
    std::vector<int32_t> out;
    if (!e_.compress(plan, stage, lens, b0, rb, tm, out, err)) return false;
    const int64_t segs = plan.segments(nb);
    if (int64_t(out.size()) != segs + 1) return err = "serve: the engine returned the wrong number of lengths", false;
    if (out[size_t(segs)] != 0)
      return err = std::string("serve: ") +
                   prefixkv::detail::compress_message(static_cast<prefixkv::reason>(out[size_t(segs)])),
             false;
    // new lengths; every layer returns the pages past its kept tokens; the reservation shrinks
    const int H = int(plan.seg_heads);
    for (int b = 0; b < nb; ++b) {
      live& r = *find(ids[b0 + b]);
      std::vector<int32_t> per_layer(static_cast<size_t>(L_));
      for (int l = 0; l < L_; ++l) {
        for (int h = 0; h < Hk_; ++h) len_at(l, r.slot, h) = out[(size_t(l) * nb + b) * H + (H > 1 ? h : 0)];
        per_layer[l] = layer_len(l, r.slot);
        shrink(l, r.slot, per_layer[l]);
      }
      const int need = serve_pages_needed(per_layer, serve_appends(r.prompt, r.steps, c.seq_len), o_.page_size);
      if (need > r.reserved) return err = "serve: a compressed cache needs more pages than its reservation", false;
      pool_.unreserve(r.reserved - need);
      r.reserved = need;
    }
    return true;
  }

  // ---- decode ------------------------------------------------------------------------------------------------------
  bool decode(int iteration, std::string& err) {
    const config& c = m_.cfg;
    std::vector<live*> batch;
    for (live& r : active_)
      if (r.pending >= 0) batch.push_back(&r);
    if (batch.empty()) return true;
    const int n = int(batch.size());
    for (live* r : batch)
      for (int l = 0; l < L_; ++l)
        if (!hold(l, r->slot, int64_t(layer_len(l, r->slot)) + 1, err)) return false;
    if (table_dirty_ && !upload(false, err)) return false;
    std::vector<int> cols(6 * size_t(n) + n);
    for (int i = 0; i < n; ++i) {
      const live& r = *batch[i];
      cols[i] = r.pending;
      cols[n + i] = r.prompt + int(res_[r.id].tokens.size()) - 1;  // generate's position of the fed token
      cols[2 * n + i] = r.slot;
      cols[3 * n + i] = 0;
      cols[4 * n + i] = 1;
      cols[5 * n + i] = -1;
      cols[6 * size_t(n) + i] = i;
    }
    if (!e_.forward(cols, n, n, 0, 0, logits_, err)) return false;
    for (int i = 0; i < n; ++i) {
      live& r = *batch[i];
      for (int l = 0; l < L_; ++l)
        for (int h = 0; h < Hk_; ++h) ++len_at(l, r.slot, h);  // as the engine's forward pass did
      advance(r, argmax_row(logits_.data() + size_t(i) * c.vocab_size, c.vocab_size), iteration);
    }
    return true;
  }

  //! Finished requests return their pages, their reservation and their slot.
  void retire() {
    for (size_t i = 0; i < active_.size();) {
      live& r = active_[i];
      if (r.pending >= 0) {
        ++i;
        continue;
      }
      for (int l = 0; l < L_; ++l) {
        shrink(l, r.slot, 0);
        for (int h = 0; h < Hk_; ++h) len_at(l, r.slot, h) = 0;
      }
      pool_.unreserve(r.reserved);
      free_slots_.push_back(r.slot);
      active_.erase(active_.begin() + std::ptrdiff_t(i));
    }
  }

  Engine& e_;
  const model& m_;
  const std::vector<serve_request>& reqs_;
  const std::vector<std::vector<int>>& prompts_;
  const serve_options o_;
  std::vector<serve_result>& res_;
  serve_summary& sum_;
  page_pool pool_;
  int L_ = 0, Hk_ = 0, max_blocks_ = 0, slots_ = 0;
  std::vector<int32_t> table_, len_;  // (layer, slot, block) page ids (-1: none); (layer, slot, kv head) lengths
  std::vector<int> held_;             // (layer, slot) pages held
  bool table_dirty_ = true;
  std::vector<int> free_slots_;
  std::vector<live> active_;
  std::vector<float> logits_;
};

}  // namespace serve_detail

//! Run the loop on `engine` (see the file comment).
template <class Engine>
bool serve_with(Engine& engine, const model& m, const std::vector<serve_request>& reqs,
                const std::vector<std::vector<int>>& prompts, const serve_options& opt,
                std::vector<serve_result>& results, serve_summary& summary, std::string& err) {
  serve_detail::server<Engine> s(engine, m, reqs, prompts, opt, results, summary);
  return s.run(err);
}

}  // namespace prefixkv_llama
