// Test helper shared by the host and GPU scorer tests: float values -> the scorer's storage type.
#pragma once

#include <prefixkv/core/numeric.hpp>

#include <type_traits>
#include <vector>

namespace score_test {

template <class T>
std::vector<T> to_storage(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>)
      o[i] = v[i];
    else
      o[i] = T::from_float(v[i]);
  }
  return o;
}

}  // namespace score_test
