#include <doctest/doctest.h>

#include <prefixkv/prefixkv.hpp>

#include <cstring>
#include <set>
#include <string>
#include <vector>

TEST_CASE("error slot records the last rejection per thread and is cleared on demand") {
  prefixkv::clear_last_error();
  CHECK(prefixkv::last_error().why == prefixkv::reason::none);
  const cudaError_t e = prefixkv::detail::fail(prefixkv::reason::bad_parameter, "ratio must be in [0, 1)");
  CHECK(e == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().code == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == prefixkv::reason::bad_parameter);
  CHECK(std::string(prefixkv::last_error().message) == "ratio must be in [0, 1)");
  prefixkv::clear_last_error();
  CHECK(prefixkv::last_error().why == prefixkv::reason::none);
  CHECK(std::string(prefixkv::last_error().message).empty());
}

TEST_CASE("every reason has its own name") {
  std::set<std::string> names;
  for (int r = 0; r <= static_cast<int>(prefixkv::reason::bad_file); ++r)
    names.insert(prefixkv::to_string(static_cast<prefixkv::reason>(r)));
  CHECK(names.size() == static_cast<size_t>(prefixkv::reason::bad_file) + 1);
  CHECK(names.count("unknown") == 0);
}

TEST_CASE("workspace layout: size query, 256-byte aligned pieces, too-small and misaligned buffers") {
  prefixkv::workspace_layout<3> ws;
  ws.reserve<float>(0, 10);   // 40 bytes -> 256
  ws.reserve<double>(1, 0);   // empty
  ws.reserve<int>(2, 100);    // 400 bytes -> 512
  CHECK(ws.bytes() == 768);

  alignas(256) static unsigned char buf[1024];
  REQUIRE(ws.map(buf, sizeof(buf)) == cudaSuccess);
  CHECK(ws.get<float>(0) == reinterpret_cast<float*>(buf));
  CHECK(ws.get<double>(1) == nullptr);
  CHECK(ws.get<int>(2) == reinterpret_cast<int*>(buf + 256));
  for (int i = 0; i < 3; ++i)
    if (ws.get<char>(i)) CHECK(reinterpret_cast<uintptr_t>(ws.get<char>(i)) % 256 == 0);

  CHECK(ws.map(buf, 767) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == prefixkv::reason::workspace_too_small);
  CHECK(ws.map(buf + 16, 1000) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == prefixkv::reason::misaligned);
  CHECK(ws.map(nullptr, 1000) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == prefixkv::reason::null_pointer);

  prefixkv::workspace_layout<1> empty;
  CHECK(empty.bytes() == prefixkv::workspace_alignment);  // never a zero-byte request
}

namespace {
cudaError_t chained(bool fail_first, int& reached) {
  PREFIXKV_TRY(fail_first ? prefixkv::detail::fail(prefixkv::reason::out_of_range, "first") : cudaSuccess);
  reached = 1;
  return cudaSuccess;
}
}  // namespace

TEST_CASE("PREFIXKV_TRY returns early on error") {
  int reached = 0;
  CHECK(chained(true, reached) == cudaErrorInvalidValue);
  CHECK(reached == 0);
  CHECK(chained(false, reached) == cudaSuccess);
  CHECK(reached == 1);
}
