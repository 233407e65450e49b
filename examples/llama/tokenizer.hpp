// prefixkv-llama: the llama2.c tokenizer (a sentencepiece BPE vocabulary with scores and byte fallback).
//
// File format (little-endian): int32 max_token_length, then for each of the model's vocab_size tokens a float32
// merge score, an int32 byte length (0 .. max_token_length) and the bytes. `load` checks every length against the
// maximum and the bytes left in the file, every score (finite), and that nothing follows the last token.
//
// Encoding (`encode`) follows llama2.c: optionally BOS (id 1); optionally a dummy space token " " in front of
// non-empty text; every UTF-8 code point becomes its token when the vocabulary has it, else one byte-fallback token
// per byte (id = byte + 3, "<0x00>" .. "<0xFF>"); then, repeatedly, the adjacent pair whose concatenation is a
// token with the highest score (the leftmost one on ties) is merged, until no pair merges.
// Decoding (`piece`): a token's text, with "<0xXX>" turned into that byte and the leading space dropped right
// after BOS.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace prefixkv_llama {

class tokenizer {
 public:
  static constexpr int bos = 1;
  static constexpr int eos = 2;
  static constexpr int byte_offset = 3;  //!< id of "<0x00>"

  //! Load a tokenizer for a model with `vocab_size` tokens. False with a one-line reason in `err`.
  bool load(const std::string& path, int vocab_size, std::string& err) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return err = "cannot open the tokenizer " + path, false;
    std::vector<unsigned char> bytes;
    unsigned char buf[4096];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) {
      bytes.insert(bytes.end(), buf, buf + got);
      if (bytes.size() > (size_t(1) << 30)) break;
    }
    const bool read_error = std::ferror(f) != 0;
    std::fclose(f);
    auto bad = [&](const std::string& why) {
      err = "malformed tokenizer " + path + ": " + why;
      return false;
    };
    if (read_error) return bad("read error");
    if (bytes.size() > (size_t(1) << 30)) return bad("larger than 1 GiB");
    if (vocab_size < byte_offset + 256) return bad("the model's vocabulary is too small for byte fallback");
    size_t at = 0;
    auto read4 = [&](void* out) {
      if (bytes.size() - at < 4) return false;
      std::memcpy(out, bytes.data() + at, 4);
      at += 4;
      return true;
    };
    int32_t max_len = 0;
    if (!read4(&max_len)) return bad("shorter than its 4-byte header");
    if (max_len <= 0 || max_len > 65536) return bad("max_token_length " + std::to_string(max_len) + " out of range");
    std::vector<std::string> vocab(static_cast<size_t>(vocab_size));
    std::vector<float> scores(static_cast<size_t>(vocab_size));
    for (int i = 0; i < vocab_size; ++i) {
      float score = 0;
      int32_t len = 0;
      if (!read4(&score) || !read4(&len))
        return bad("token " + std::to_string(i) + " of " + std::to_string(vocab_size) + " is missing");
      if (!std::isfinite(score)) return bad("token " + std::to_string(i) + " has a non-finite score");
      if (len < 0 || len > max_len)
        return bad("token " + std::to_string(i) + " has length " + std::to_string(len) + " (max_token_length " +
                   std::to_string(max_len) + ")");
      if (bytes.size() - at < size_t(len)) return bad("token " + std::to_string(i) + " runs past the end of the file");
      vocab[i].assign(reinterpret_cast<const char*>(bytes.data() + at), size_t(len));
      scores[i] = score;
      at += size_t(len);
    }
    if (at != bytes.size()) return bad(std::to_string(bytes.size() - at) + " bytes after the last token");
    std::unordered_map<std::string, int> ids;
    for (int i = vocab_size - 1; i >= 0; --i) ids[vocab[i]] = i;  // lowest id wins on duplicates
    vocab_.swap(vocab);
    scores_.swap(scores);
    ids_.swap(ids);
    return true;
  }

  int size() const { return static_cast<int>(vocab_.size()); }
  const std::string& text(int id) const { return vocab_[static_cast<size_t>(id)]; }

  //! Token ids of `s` (see the file comment). `dummy_space` applies to non-empty text only.
  std::vector<int> encode(const std::string& s, bool add_bos, bool dummy_space) const {
    std::vector<int> t;
    if (add_bos) t.push_back(bos);
    if (dummy_space && !s.empty()) {
      const int sp = id_of(" ");
      if (sp >= 0)
        t.push_back(sp);
      else
        t.push_back(byte_offset + ' ');
    }
    for (size_t i = 0; i < s.size();) {
      // one code point: a lead byte and up to three continuation bytes (10xxxxxx)
      size_t j = i + 1;
      while (j < s.size() && j - i < 4 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) ++j;
      const int id = id_of(s.substr(i, j - i));
      if (id >= 0) {
        t.push_back(id);
      } else {
        for (size_t k = i; k < j; ++k) t.push_back(byte_offset + static_cast<unsigned char>(s[k]));
      }
      i = j;
    }
    // merges, best score first (leftmost on ties), over every token (BOS and the dummy space included, as in
    // llama2.c); O(n^2) is fine for prompts of a few hundred tokens
    std::string pair;
    for (;;) {
      float best = -INFINITY;
      int best_id = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < t.size(); ++i) {
        pair = vocab_[t[i]];
        pair += vocab_[t[i + 1]];
        const int id = id_of(pair);
        if (id >= 0 && scores_[id] > best) {
          best = scores_[id];
          best_id = id;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      t[best_at] = best_id;
      t.erase(t.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    return t;
  }

  //! Text of `token` following `prev` (leading space dropped after BOS; "<0xXX>" decoded to the byte).
  std::string piece(int prev, int token) const {
    std::string s = vocab_[static_cast<size_t>(token)];
    if (prev == bos && !s.empty() && s[0] == ' ') s.erase(0, 1);
    unsigned byte = 0;
    char tail = 0;
    if (s.size() == 6 && std::sscanf(s.c_str(), "<0x%02X>%c", &byte, &tail) == 1) s = std::string(1, char(byte));
    return s;
  }

  //! Text of a token list that follows `prev`.
  std::string decode(int prev, const std::vector<int>& tokens) const {
    std::string s;
    for (int t : tokens) {
      s += piece(prev, t);
      prev = t;
    }
    return s;
  }

 private:
  int id_of(const std::string& s) const {
    auto it = ids_.find(s);
    return it == ids_.end() ? -1 : it->second;
  }
  std::vector<std::string> vocab_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
};

}  // namespace prefixkv_llama
