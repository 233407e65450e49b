//! \file prefixkv/io/npy.hpp
//! A small, defensive NumPy `.npy` reader and writer (float32 / float64, C order, format versions 1, 2 and 3).
//!
//! The reader treats its input as untrusted: every length, the header dictionary, the shape product (overflow)
//! and the payload size are checked, and every failure is returned as `cudaErrorInvalidValue` with
//! `reason::bad_file` (never an exception, never a read outside the buffer).
//!
//! \code
//! prefixkv::npy_array a;
//! if (prefixkv::npy_load("scores.npy", a) != cudaSuccess) puts(prefixkv::last_error().message);
//! // a.shape = {segments, tokens}; a.data holds the values (as double, exact for both dtypes)
//! std::vector<float> x = {1, 2, 3, 4, 5, 6};
//! int64_t shape[2] = {2, 3};
//! auto e = prefixkv::npy_save("out.npy", x.data(), shape, 2);
//! \endcode
#pragma once

#include "../core/error.hpp"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Element type of a `.npy` payload.
enum class npy_dtype : int { f32 = 0, f64 = 1 };

//! A decoded array: shape and values (converted to double, which is exact for float32 and float64).
struct npy_array {
  npy_dtype dtype = npy_dtype::f32;
  std::vector<int64_t> shape;
  std::vector<double> data;
  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  int64_t size() const { return static_cast<int64_t>(data.size()); }
};

namespace detail {

inline cudaError_t npy_bad(const char* msg) noexcept { return fail(reason::bad_file, msg); }

// Minimal tokenizer over the header dictionary text [p, end).
struct npy_header_parser {
  const char* p;
  const char* end;
  void skip_ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }
  bool eat(char c) {
    skip_ws();
    if (p < end && *p == c) {
      ++p;
      return true;
    }
    return false;
  }
  // A Python string literal with ' or " quotes and no escapes.
  bool string(std::string& out) {
    skip_ws();
    if (p >= end || (*p != '\'' && *p != '"')) return false;
    const char q = *p++;
    const char* s = p;
    while (p < end && *p != q) {
      if (*p == '\\' || static_cast<unsigned char>(*p) < 0x20) return false;
      ++p;
    }
    if (p >= end) return false;
    out.assign(s, p);
    ++p;
    return out.size() <= 64;
  }
  bool word(const char* w) {
    skip_ws();
    const size_t n = std::strlen(w);
    if (static_cast<size_t>(end - p) >= n && std::memcmp(p, w, n) == 0) {
      p += n;
      return true;
    }
    return false;
  }
  // Non-negative decimal integer (optionally with a trailing L, as old Python 2 numpy wrote), <= 2^62.
  bool integer(int64_t& v) {
    skip_ws();
    if (p >= end || *p < '0' || *p > '9') return false;
    v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
      if (v > (int64_t(1) << 62) / 10) return false;
      v = v * 10 + (*p - '0');
      ++p;
    }
    if (p < end && *p == 'L') ++p;
    return true;
  }
};

inline cudaError_t npy_parse_header(const char* h, size_t n, npy_dtype& dtype, bool& big_endian,
                                    std::vector<int64_t>& shape) {
  npy_header_parser ps{h, h + n};
  bool have_descr = false, have_order = false, have_shape = false;
  if (!ps.eat('{')) return npy_bad("npy: header is not a dictionary");
  for (;;) {
    if (ps.eat('}')) break;
    std::string key;
    if (!ps.string(key)) return npy_bad("npy: bad header key");
    if (!ps.eat(':')) return npy_bad("npy: missing ':' in header");
    if (key == "descr") {
      std::string d;
      if (have_descr || !ps.string(d)) return npy_bad("npy: bad 'descr'");
      if (d.size() != 3 || (d[0] != '<' && d[0] != '>' && d[0] != '=') || d[1] != 'f' || (d[2] != '4' && d[2] != '8'))
        return npy_bad("npy: dtype must be float32 or float64 ('<f4', '<f8', '>f4', '>f8')");
      dtype = d[2] == '4' ? npy_dtype::f32 : npy_dtype::f64;
      big_endian = d[0] == '>';
      have_descr = true;
    } else if (key == "fortran_order") {
      if (have_order) return npy_bad("npy: repeated 'fortran_order'");
      if (ps.word("True")) return npy_bad("npy: Fortran-order arrays are not supported (C order only)");
      if (!ps.word("False")) return npy_bad("npy: bad 'fortran_order'");
      have_order = true;
    } else if (key == "shape") {
      if (have_shape || !ps.eat('(')) return npy_bad("npy: bad 'shape'");
      shape.clear();
      for (;;) {
        if (ps.eat(')')) break;
        int64_t v;
        if (!ps.integer(v)) return npy_bad("npy: bad dimension in 'shape'");
        if (shape.size() >= 32) return npy_bad("npy: too many dimensions");
        shape.push_back(v);
        if (ps.eat(',')) continue;
        if (ps.eat(')')) break;
        return npy_bad("npy: bad 'shape' tuple");
      }
      have_shape = true;
    } else {
      return npy_bad("npy: unknown header key");
    }
    if (ps.eat(',')) continue;
    if (ps.eat('}')) break;
    return npy_bad("npy: bad header dictionary");
  }
  ps.skip_ws();
  if (ps.p != ps.end) return npy_bad("npy: trailing bytes after the header dictionary");
  if (!have_descr || !have_order || !have_shape) return npy_bad("npy: header lacks descr, fortran_order or shape");
  return cudaSuccess;
}

inline cudaError_t npy_parse_impl(const unsigned char* b, size_t size, npy_array& out) {
  static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (b == nullptr && size > 0) return fail(reason::null_pointer, "npy: null buffer");
  if (size < 10 || std::memcmp(b, magic, 6) != 0) return npy_bad("npy: not a .npy file (bad magic)");
  const unsigned major = b[6];
  size_t pos, hlen;
  if (major == 1) {
    hlen = size_t(b[8]) | (size_t(b[9]) << 8);
    pos = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) return npy_bad("npy: truncated header");
    hlen = size_t(b[8]) | (size_t(b[9]) << 8) | (size_t(b[10]) << 16) | (size_t(b[11]) << 24);
    pos = 12;
  } else {
    return npy_bad("npy: unsupported format version");
  }
  if (hlen > size - pos) return npy_bad("npy: header length exceeds the file");
  npy_dtype dtype = npy_dtype::f32;
  bool big = false;
  std::vector<int64_t> shape;
  PREFIXKV_TRY(npy_parse_header(reinterpret_cast<const char*>(b + pos), hlen, dtype, big, shape));
  pos += hlen;
  const size_t item = dtype == npy_dtype::f32 ? 4 : 8;
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d != 0 && count > (uint64_t(1) << 62) / uint64_t(d)) return npy_bad("npy: shape product overflows");
    count *= uint64_t(d);
  }
  const size_t avail = size - pos;
  if (count > avail / item || count * item != avail) return npy_bad("npy: payload size does not match the shape");
  npy_array a;
  a.dtype = dtype;
  a.shape = shape;
  a.data.resize(static_cast<size_t>(count));
  const unsigned char* src = b + pos;
  for (size_t i = 0; i < count; ++i) {
    unsigned char tmp[8];
    for (size_t k = 0; k < item; ++k) tmp[k] = big ? src[i * item + item - 1 - k] : src[i * item + k];
    if (item == 4) {
      float f;
      std::memcpy(&f, tmp, 4);
      a.data[i] = f;
    } else {
      double d;
      std::memcpy(&d, tmp, 8);
      a.data[i] = d;
    }
  }
  out = std::move(a);
  return cudaSuccess;
}

}  // namespace detail

//! Decode a `.npy` image held in memory. `out` is replaced only on success.
[[nodiscard]] inline cudaError_t npy_parse(const void* bytes, size_t size, npy_array& out) noexcept {
  try {
    return detail::npy_parse_impl(static_cast<const unsigned char*>(bytes), size, out);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "npy: out of memory", cudaErrorMemoryAllocation);
  }
}

//! Default cap of `read_file_bytes` (and so of `npy_load` and `profile_load`): 1 GiB.
inline constexpr size_t read_file_default_limit = size_t(1) << 30;

namespace detail {
inline bool file_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

//! `read_file_bytes` with an optional early check: `first` (when not 0) is the byte the first non-whitespace byte
//! of the file must be, so that a stream of anything else is refused at its first chunk.
inline cudaError_t read_file_bytes_impl(const char* path, std::vector<unsigned char>& out, size_t max_bytes,
                                        char first, const char* first_message) noexcept {
  if (path == nullptr) return fail(reason::null_pointer, "read_file: path is null");
  std::FILE* f = std::fopen(path, "rb");
  if (!f) return fail(reason::bad_file, "read_file: cannot open the file");
  cudaError_t e = cudaSuccess;
  try {
    std::vector<unsigned char> buf;
    unsigned char chunk[1 << 16];
    size_t got;
    bool seen = first == 0;
    while ((got = std::fread(chunk, 1, sizeof(chunk), f)) > 0) {
      for (size_t i = 0; !seen && i < got; ++i)
        if (!file_ws(chunk[i])) {
          if (chunk[i] != static_cast<unsigned char>(first)) {
            e = fail(reason::bad_file, first_message);
            break;
          }
          seen = true;
        }
      if (e != cudaSuccess) break;
      if (got > max_bytes - buf.size()) {
        e = fail(reason::capacity_exceeded, "read_file: the file is larger than the read limit");
        break;
      }
      buf.insert(buf.end(), chunk, chunk + got);
    }
    if (e == cudaSuccess && std::ferror(f) != 0) e = fail(reason::bad_file, "read_file: read error");
    if (e == cudaSuccess) out.swap(buf);
  } catch (...) {
    e = fail(reason::capacity_exceeded, "read_file: out of memory", cudaErrorMemoryAllocation);
  }
  std::fclose(f);
  return e;
}
}  // namespace detail

//! Read a whole file into memory (for the parsers), at most `max_bytes` bytes: a longer file (or an endless
//! stream such as /dev/zero) is `reason::capacity_exceeded` once `max_bytes` are exceeded. `out` is replaced
//! only on success.
[[nodiscard]] inline cudaError_t read_file_bytes(const char* path, std::vector<unsigned char>& out,
                                                 size_t max_bytes = read_file_default_limit) noexcept {
  return detail::read_file_bytes_impl(path, out, max_bytes, 0, "");
}

namespace detail {
// Read exactly n bytes appended to buf (false on a short read). Grows the buffer chunk by chunk, so a header
// announcing more than the file holds costs no more memory than the file.
inline bool npy_read_exact(std::FILE* f, std::vector<unsigned char>& buf, size_t n) {
  while (n > 0) {
    const size_t step = n < (size_t(1) << 20) ? n : (size_t(1) << 20);
    const size_t at = buf.size();
    buf.resize(at + step);
    const size_t got = std::fread(buf.data() + at, 1, step, f);
    if (got != step) {
      buf.resize(at + got);
      return false;
    }
    n -= step;
  }
  return true;
}

inline cudaError_t npy_load_impl(std::FILE* f, npy_array& out, size_t max_bytes) {
  // Read the fixed prefix and the header first, then exactly the payload the header announces (plus one byte to
  // detect trailing data): memory and reading time stay bounded by the real file, an endless stream
  // (/dev/zero) is refused at its first bytes, and a header announcing more than `max_bytes` is refused unread.
  std::vector<unsigned char> buf;
  if (!npy_read_exact(f, buf, 10)) return npy_bad("npy: not a .npy file (too short)");
  static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (std::memcmp(buf.data(), magic, 6) != 0) return npy_bad("npy: not a .npy file (bad magic)");
  size_t hlen = size_t(buf[8]) | (size_t(buf[9]) << 8);
  if (buf[6] == 2 || buf[6] == 3) {
    if (!npy_read_exact(f, buf, 2)) return npy_bad("npy: truncated header");
    hlen |= (size_t(buf[10]) << 16) | (size_t(buf[11]) << 24);
  } else if (buf[6] != 1) {
    return npy_bad("npy: unsupported format version");
  }
  if (hlen > (size_t(1) << 20)) return npy_bad("npy: header longer than 1 MiB");
  const size_t pos = buf.size();
  if (!npy_read_exact(f, buf, hlen)) return npy_bad("npy: header length exceeds the file");
  npy_dtype dtype = npy_dtype::f32;
  bool big = false;
  std::vector<int64_t> shape;
  PREFIXKV_TRY(npy_parse_header(reinterpret_cast<const char*>(buf.data() + pos), hlen, dtype, big, shape));
  const uint64_t item = dtype == npy_dtype::f32 ? 4 : 8;
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d != 0 && count > (uint64_t(1) << 62) / uint64_t(d)) return npy_bad("npy: shape product overflows");
    count *= uint64_t(d);
  }
  if (count > (uint64_t(1) << 62) / item) return npy_bad("npy: shape product overflows");
  const uint64_t payload = count * item;
  if (payload > max_bytes || buf.size() > max_bytes - payload)
    return fail(reason::capacity_exceeded, "npy: the array is larger than the read limit");
  if (!npy_read_exact(f, buf, static_cast<size_t>(payload))) return npy_bad("npy: payload size does not match the shape");
  unsigned char extra = 0;
  if (std::fread(&extra, 1, 1, f) == 1) return npy_bad("npy: payload size does not match the shape");
  if (std::ferror(f) != 0) return fail(reason::bad_file, "npy: read error");
  return npy_parse_impl(buf.data(), buf.size(), out);
}
}  // namespace detail

//! Load a `.npy` file whose size is at most `max_bytes` bytes (`reason::capacity_exceeded` otherwise, found from
//! the header before the payload is read). Reads only what the header announces, plus one byte.
[[nodiscard]] inline cudaError_t npy_load(const char* path, npy_array& out,
                                          size_t max_bytes = read_file_default_limit) noexcept {
  if (path == nullptr) return detail::fail(reason::null_pointer, "npy: path is null");
  std::FILE* f = std::fopen(path, "rb");
  if (!f) return detail::fail(reason::bad_file, "npy: cannot open the file");
  cudaError_t e = cudaSuccess;
  try {
    e = detail::npy_load_impl(f, out, max_bytes);
  } catch (...) {
    e = detail::fail(reason::capacity_exceeded, "npy: out of memory", cudaErrorMemoryAllocation);
  }
  std::fclose(f);
  return e;
}

namespace detail {
template <class T>
inline cudaError_t npy_encode_impl(const T* data, const int64_t* shape, int rank, std::vector<unsigned char>& out) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double");
  if (rank < 0 || rank > 32 || (rank > 0 && shape == nullptr))
    return fail(reason::bad_parameter, "npy: bad rank or null shape");
  uint64_t count = 1;
  std::string dict = std::string("{'descr': '<f") + (sizeof(T) == 4 ? "4" : "8") + "', 'fortran_order': False, 'shape': (";
  for (int i = 0; i < rank; ++i) {
    if (shape[i] < 0) return fail(reason::negative_extent, "npy: negative dimension");
    if (shape[i] != 0 && count > ((uint64_t(1) << 62) / sizeof(T)) / uint64_t(shape[i]))
      return fail(reason::bad_parameter, "npy: shape too large (more than 2^62 payload bytes)");
    count *= uint64_t(shape[i]);
    dict += std::to_string(shape[i]);
    if (rank == 1 || i + 1 < rank) dict += ", ";
  }
  if (rank == 1) dict.resize(dict.size() - 1);  // "(5,)"
  dict += "), }";
  if (count > 0 && data == nullptr) return fail(reason::null_pointer, "npy: data is null");
  size_t total = 10 + dict.size() + 1;
  const size_t pad = (64 - total % 64) % 64;
  dict.append(pad, ' ');
  dict += '\n';
  std::vector<unsigned char> b;
  b.reserve(10 + dict.size() + count * sizeof(T));
  const unsigned char head[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  b.insert(b.end(), head, head + 8);
  if (dict.size() > 65535) return fail(reason::bad_parameter, "npy: header too long");
  b.push_back(static_cast<unsigned char>(dict.size() & 0xFF));
  b.push_back(static_cast<unsigned char>(dict.size() >> 8));
  b.insert(b.end(), dict.begin(), dict.end());
  const unsigned char* src = reinterpret_cast<const unsigned char*>(data);
  b.insert(b.end(), src, src + count * sizeof(T));  // little-endian host assumed (x86-64, aarch64)
  out.swap(b);
  return cudaSuccess;
}
}  // namespace detail

//! Encode an array as a version-1 `.npy` image ('<f4' or '<f8', C order). `shape` has `rank` entries.
template <class T>
[[nodiscard]] inline cudaError_t npy_encode(const T* data, const int64_t* shape, int rank,
                                            std::vector<unsigned char>& out) noexcept {
  try {
    return detail::npy_encode_impl(data, shape, rank, out);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "npy: out of memory", cudaErrorMemoryAllocation);
  }
}

//! Write an array to a `.npy` file.
template <class T>
[[nodiscard]] inline cudaError_t npy_save(const char* path, const T* data, const int64_t* shape, int rank) noexcept {
  std::vector<unsigned char> b;
  PREFIXKV_TRY(npy_encode(data, shape, rank, b));
  if (path == nullptr) return detail::fail(reason::null_pointer, "npy: path is null");
  std::FILE* f = std::fopen(path, "wb");
  if (!f) return detail::fail(reason::bad_file, "npy: cannot create the file");
  const bool ok = std::fwrite(b.data(), 1, b.size(), f) == b.size();
  if (std::fclose(f) != 0 || !ok) return detail::fail(reason::bad_file, "npy: write error");
  return cudaSuccess;
}

PREFIXKV_NAMESPACE_END
