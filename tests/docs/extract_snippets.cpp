// Extracts the compiled snippets of Markdown pages into two translation units.
//
//   prefixkv_extract_snippets HOST_OUT.cpp DEVICE_OUT.cu PAGE.md...
//
// A snippet is a ```cpp fence whose previous line is `<!-- compiled: host -->` (goes into HOST_OUT, built with the
// C++ compiler against <prefixkv/prefixkv.hpp>) or `<!-- compiled: device -->` (goes into DEVICE_OUT, built with
// nvcc against <prefixkv/prefixkv.cuh>). Every snippet lands at namespace scope in `namespace api_snippets`,
// preceded by a #line directive, so a compile error names the page and line of the snippet. A marker without a
// fence after it, or a fence that never closes, is an error (exit 1).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char* const prelude_host =
    "#include <prefixkv/prefixkv.hpp>\n"
    "\n"
    "#include <algorithm>\n#include <cmath>\n#include <cstdint>\n#include <cstdio>\n#include <string>\n#include <vector>\n";
const char* const prelude_device =
    "#include <prefixkv/prefixkv.cuh>\n"
    "\n"
    "#include <cuda_runtime.h>\n\n#include <cstdint>\n#include <cstdio>\n#include <string>\n#include <vector>\n";

bool write_unit(const std::string& path, const char* prelude, const std::string& body, int count) {
  std::ofstream out(path, std::ios::binary);
  out << "// Generated from the docs by tests/docs/extract_snippets.cpp (" << count << " snippets). Do not edit.\n"
      << prelude << "\nnamespace api_snippets {\n"
      << body << "}  // namespace api_snippets\n";
  return bool(out);
}

// Appends the page's snippets to host / device; false (with a message) on a malformed page.
bool extract(const char* page, std::ostringstream& host, std::ostringstream& device, int& n_host, int& n_device) {
  std::ifstream in(page, std::ios::binary);
  if (!in) {
    std::cerr << "cannot read " << page << "\n";
    return false;
  }
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) {
    if (!l.empty() && l.back() == '\r') l.pop_back();
    lines.push_back(l);
  }
  for (size_t i = 0; i < lines.size(); ++i) {
    const bool is_host = lines[i] == "<!-- compiled: host -->";
    const bool is_device = lines[i] == "<!-- compiled: device -->";
    if (!is_host && !is_device) continue;
    if (i + 1 >= lines.size() || lines[i + 1] != "```cpp") {
      std::cerr << page << ":" << i + 1 << ": a compiled marker must be followed by a ```cpp fence\n";
      return false;
    }
    size_t j = i + 2;
    std::ostringstream body;
    body << "#line " << j + 1 << " \"" << page << "\"\n";
    for (; j < lines.size() && lines[j] != "```"; ++j) body << lines[j] << "\n";
    if (j >= lines.size()) {
      std::cerr << page << ":" << i + 2 << ": the ```cpp fence never closes\n";
      return false;
    }
    (is_host ? host : device) << body.str() << "\n";
    (is_host ? n_host : n_device) += 1;
    i = j;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: prefixkv_extract_snippets HOST_OUT.cpp DEVICE_OUT.cu PAGE.md...\n";
    return 2;
  }
  std::ostringstream host, device;
  int n_host = 0, n_device = 0;
  for (int a = 3; a < argc; ++a)
    if (!extract(argv[a], host, device, n_host, n_device)) return 1;
  if (n_host + n_device == 0) {
    std::cerr << "no compiled snippets found\n";
    return 1;
  }
  if (!write_unit(argv[1], prelude_host, host.str(), n_host) ||
      !write_unit(argv[2], prelude_device, device.str(), n_device)) {
    std::cerr << "cannot write the outputs\n";
    return 1;
  }
  return 0;
}
