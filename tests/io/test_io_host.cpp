// .npy reader/writer: round trips, hand-built headers (v1/v2/v3, big endian, odd spacing), and malformed or
// hostile inputs (every truncation and many single-byte corruptions of a valid file must fail cleanly).
#include <doctest/doctest.h>

#include <prefixkv/io/json.hpp>
#include <prefixkv/io/npy.hpp>

#include "support/test_random.hpp"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace pk = prefixkv;
using namespace prefixkv_test;

namespace {

// A .npy image with a hand-written header dictionary.
std::vector<unsigned char> image(int version, const std::string& dict, const std::vector<unsigned char>& payload,
                                 bool pad = true) {
  std::string d = dict;
  const size_t pre = version == 1 ? 10 : 12;
  if (pad) {
    while ((pre + d.size() + 1) % 64) d += ' ';
    d += '\n';
  }
  std::vector<unsigned char> b = {0x93, 'N', 'U', 'M', 'P', 'Y', (unsigned char)version, 0};
  const size_t n = d.size();
  b.push_back(n & 0xFF);
  b.push_back((n >> 8) & 0xFF);
  if (version != 1) {
    b.push_back((n >> 16) & 0xFF);
    b.push_back((n >> 24) & 0xFF);
  }
  b.insert(b.end(), d.begin(), d.end());
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

template <class T>
std::vector<unsigned char> bytes_of(const std::vector<T>& v, bool big = false) {
  std::vector<unsigned char> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  if (big)
    for (size_t i = 0; i < v.size(); ++i)
      for (size_t k = 0; k < sizeof(T) / 2; ++k) std::swap(b[i * sizeof(T) + k], b[i * sizeof(T) + sizeof(T) - 1 - k]);
  return b;
}

}  // namespace

TEST_CASE("npy round trip: float32 and float64, ranks 0..3") {
  auto rng = make_rng(701);
  for (int rank = 0; rank <= 3; ++rank) {
    std::vector<int64_t> shape;
    size_t count = 1;
    for (int i = 0; i < rank; ++i) {
      shape.push_back(int64_t(rng() % 5));
      count *= size_t(shape.back());
    }
    const auto f = random_vector<float>(rng, count, -5, 5);
    const auto d = random_vector<double>(rng, count, -5, 5);
    std::vector<unsigned char> b;
    REQUIRE(pk::npy_encode(f.data(), shape.data(), rank, b) == cudaSuccess);
    CHECK((b.size() - f.size() * 4) % 64 == 0);  // header padded to 64 bytes
    pk::npy_array a;
    REQUIRE(pk::npy_parse(b.data(), b.size(), a) == cudaSuccess);
    CHECK(a.dtype == pk::npy_dtype::f32);
    CHECK(a.shape == shape);
    REQUIRE(a.data.size() == f.size());
    for (size_t i = 0; i < f.size(); ++i) CHECK(a.data[i] == double(f[i]));
    REQUIRE(pk::npy_encode(d.data(), shape.data(), rank, b) == cudaSuccess);
    REQUIRE(pk::npy_parse(b.data(), b.size(), a) == cudaSuccess);
    CHECK(a.dtype == pk::npy_dtype::f64);
    CHECK(a.data == d);
  }
  const std::string path = "test_io_roundtrip.npy";
  std::vector<float> x = {1, 2, 3, 4, 5, 6};
  const int64_t shape[2] = {2, 3};
  REQUIRE(pk::npy_save(path.c_str(), x.data(), shape, 2) == cudaSuccess);
  pk::npy_array a;
  REQUIRE(pk::npy_load(path.c_str(), a) == cudaSuccess);
  CHECK(a.shape == std::vector<int64_t>{2, 3});
  CHECK(a.data == std::vector<double>{1, 2, 3, 4, 5, 6});
  std::remove(path.c_str());
  CHECK(pk::npy_load("does/not/exist.npy", a) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::bad_file);
}

TEST_CASE("npy headers as numpy writes them: v1, v2, v3, big endian, odd spacing, 1-tuples") {
  const std::vector<float> v = {1.5f, -2.0f, 3.25f};
  struct item {
    int version;
    std::string dict;
    bool big;
  };
  for (const item& it : {item{1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", false},
                         item{2, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", false},
                         item{3, "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(3,)}", false},
                         item{1, "{'shape': (1, 3), 'fortran_order': False, 'descr': '>f4'}", true},
                         item{1, "{ 'descr' : '=f4' ,'fortran_order':False,'shape':( 3 , ) , }", false},
                         item{1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3L,), }", false}}) {
    INFO(it.dict);
    const auto b = image(it.version, it.dict, bytes_of(v, it.big));
    pk::npy_array a;
    REQUIRE(pk::npy_parse(b.data(), b.size(), a) == cudaSuccess);
    CHECK(a.data == std::vector<double>{1.5, -2.0, 3.25});
  }
  const std::vector<double> w = {0.1, 1e300};
  const auto b = image(1, "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }", bytes_of(w, true));
  pk::npy_array a;
  REQUIRE(pk::npy_parse(b.data(), b.size(), a) == cudaSuccess);
  CHECK(a.data == w);
}

TEST_CASE("npy: malformed headers are rejected with reason bad_file") {
  const auto payload = bytes_of(std::vector<float>{1, 2, 3, 4});
  for (const std::string& dict :
       {std::string("{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }"),
        std::string("{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }"),
        std::string("{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }"),
        std::string("{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,), }"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'extra': 1}"),
        std::string("{'descr': '<f4', 'fortran_order': False}"),
        std::string("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (4,)}"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (4,) x"),
        std::string("['descr', '<f4']"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }"),
        std::string("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }"),
        std::string("{'descr': '<f4', 'fortran_order': Fals, 'shape': (4,), }"),
        std::string("{'descr': '<f4\\x', 'fortran_order': False, 'shape': (4,), }")}) {
    INFO(dict);
    const auto b = image(1, dict, payload);
    pk::npy_array a;
    a.shape = {42};
    CHECK(pk::npy_parse(b.data(), b.size(), a) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::bad_file);
    CHECK(a.shape == std::vector<int64_t>{42});  // untouched on failure
  }
  // bad magic, bad version, header length past the end
  auto good = image(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", payload);
  pk::npy_array a;
  REQUIRE(pk::npy_parse(good.data(), good.size(), a) == cudaSuccess);
  auto b = good;
  b[1] = 'X';
  CHECK(pk::npy_parse(b.data(), b.size(), a) == cudaErrorInvalidValue);
  b = good;
  b[6] = 4;
  CHECK(pk::npy_parse(b.data(), b.size(), a) == cudaErrorInvalidValue);
  b = good;
  b[8] = 0xFF;
  b[9] = 0xFF;
  CHECK(pk::npy_parse(b.data(), b.size(), a) == cudaErrorInvalidValue);
  CHECK(pk::npy_parse(nullptr, 0, a) == cudaErrorInvalidValue);
}

TEST_CASE("npy: every truncation and random corruption of a valid file fails cleanly or parses consistently") {
  auto rng = make_rng(702);
  std::vector<float> x = random_vector<float>(rng, 24);
  const int64_t shape[2] = {4, 6};
  std::vector<unsigned char> good;
  REQUIRE(pk::npy_encode(x.data(), shape, 2, good) == cudaSuccess);
  for (size_t n = 0; n < good.size(); ++n) {
    pk::npy_array a;
    CHECK(pk::npy_parse(good.data(), n, a) == cudaErrorInvalidValue);
  }
  for (int rep = 0; rep < 3000; ++rep) {
    auto b = good;
    const size_t flips = 1 + rng() % 3;
    for (size_t k = 0; k < flips; ++k) b[rng() % 80] = static_cast<unsigned char>(rng());
    pk::npy_array a;
    if (pk::npy_parse(b.data(), b.size(), a) == cudaSuccess) {
      size_t count = 1;
      for (auto d : a.shape) count *= size_t(d);
      CHECK(a.data.size() == count);
    }
  }
}

TEST_CASE("json numbers: shortest round-trip text") {
  auto rng = make_rng(703);
  for (int i = 0; i < 1000; ++i) {
    const double d = std::ldexp(std::uniform_real_distribution<double>(-1, 1)(rng), int(rng() % 200) - 100);
    std::string s;
    pk::json_append_number(s, d);
    CHECK(std::strtod(s.c_str(), nullptr) == d);
    const float f = float(d);
    std::string t;
    pk::json_append_float(t, f);
    CHECK(std::strtof(t.c_str(), nullptr) == f);
  }
  std::string s;
  pk::json_append_number(s, 0.25);
  pk::json_append_float(s, 0.1f);
  CHECK(s == "0.250.1");
  std::vector<double> v;
  REQUIRE(pk::json_parse_number_array("[0, -1.5e2, 3E+1, 0.125]", 24, v) == cudaSuccess);
  CHECK(v == std::vector<double>{0, -150, 30, 0.125});
}
