// A minimal consumer: a host-only program using the public API (views + validation).
#include <prefixkv/prefixkv.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> keys(1 * 8 * 16 * 64);
  auto k = prefixkv::make_kv_view_bhsd(keys.data(), 1, 8, 16, 64);
  if (prefixkv::validate(k) != cudaSuccess) {
    std::fprintf(stderr, "unexpected: %s\n", prefixkv::last_error().message);
    return 1;
  }
  k.stride_token = 1;  // overlapping rows must be rejected
  if (prefixkv::validate(k) != cudaErrorInvalidValue) return 1;
  std::printf("consumer ok: prefixkv %d (%s)\n", PREFIXKV_VERSION, prefixkv::last_error().message);
  return 0;
}
