// Must NOT compile: a scorer host twin instantiated with an element type the scorers do not read. The test
// (score_element_static_assert_host) passes when the compiler prints the static_assert's message.
#include <prefixkv/score/score.hpp>

int main() {
  const double keys[8] = {};
  auto k = prefixkv::make_kv_view_bhsd<const double>(keys, 1, 1, 4, 2);
  float out[4];
  return int(prefixkv::key_norm_host(k, {}, prefixkv::segment_grid{1, 1, 1}, 0, prefixkv::make_uniform_segments(1, 4), out));
}
