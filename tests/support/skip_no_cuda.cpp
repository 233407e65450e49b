// Stands in for a GPU test when prefixkv was configured without a CUDA compiler: reports "skipped" to ctest.
#include <cstdio>
int main(int argc, char** argv) {
  std::printf("SKIPPED: %s was not built (no CUDA compiler at configure time)\n", argc > 1 ? argv[1] : "GPU test");
  return 77;
}
