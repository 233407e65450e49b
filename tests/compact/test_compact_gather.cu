// Out-of-place gather: device == host twin, byte for byte, over every layout pair, row sizes, fractions.
#include "compact_test_util.cuh"

using namespace compact_test;

TEST_CASE("gather: every layout pair, head_dim 64/80/128/256, bf16-sized rows") {
  auto rng = make_rng(501);
  const int64_t dims[] = {64, 80, 128, 256};
  int n = 0;
  for (layout s : all_layouts)
    for (layout d : all_layouts) {
      case_cfg c;
      c.src = s;
      c.dst = d;
      c.g.D = dims[n % 4];
      c.g.T = 33 + int64_t(rng() % 20);
      c.g.page = (n % 3 == 0) ? 5 : 16;
      c.frac = n % 6;
      ++n;
      run_gather_case<uint16_t>(c, rng);
    }
}

TEST_CASE("gather: kept fractions 0, 1 token, 10%, 50%, 100%, ragged") {
  auto rng = make_rng(502);
  for (int frac = 0; frac < 6; ++frac)
    for (auto pair : {std::pair<layout, layout>{layout::bhsd, layout::bshd}, {layout::nhd, layout::bhsd},
                      {layout::bshd, layout::hnd}}) {
      case_cfg c;
      c.src = pair.first;
      c.dst = pair.second;
      c.g.L = 3;
      c.g.B = 3;
      c.g.H = 2;
      c.g.T = 50;
      c.g.D = 128;
      c.frac = frac;
      run_gather_case<uint16_t>(c, rng);
    }
}

TEST_CASE("gather: odd and narrow rows (3 and 6 bytes), fp8/int8, fp32, misaligned bases") {
  auto rng = make_rng(503);
  for (int rep = 0; rep < 5; ++rep) {
    case_cfg c;
    c.src = all_layouts[rng() % 5];
    c.dst = all_layouts[rng() % 5];
    c.g.T = 29 + int64_t(rng() % 30);
    c.g.page = 1 + int64_t(rng() % 9);
    c.frac = 5;
    c.g.misalign = rep % 2;
    c.dst_misalign = (rep / 2) % 2;
    c.g.D = 3;
    run_gather_case<uint8_t>(c, rng);   // 3-byte rows
    run_gather_case<uint16_t>(c, rng);  // 6-byte rows
    c.g.D = 128;
    run_gather_case<uint8_t>(c, rng);   // fp8 / int8 rows of 128 bytes
    c.g.D = 80;
    run_gather_case<float>(c, rng);     // fp32
  }
}

TEST_CASE("gather: head-wise lists, scales moving with their rows, unordered indices") {
  auto rng = make_rng(504);
  for (int rep = 0; rep < 8; ++rep) {
    case_cfg c;
    c.src = all_layouts[rng() % 5];
    c.dst = all_layouts[rng() % 5];
    c.g.H = 1 + int64_t(rng() % 4);
    c.g.T = 40;
    c.g.D = rep % 2 ? 64 : 80;
    c.headwise = rep % 2 == 0;
    c.g.scales = c.headwise ? 2 : 1 + int(rep % 4 == 1);
    c.shuffled = rep >= 4;
    c.frac = 5;
    run_gather_case<uint16_t>(c, rng);
  }
}

TEST_CASE("gather: longer caches split in chunks, many layers") {
  auto rng = make_rng(505);
  case_cfg c;
  c.src = layout::hnd;
  c.dst = layout::bhsd;
  c.g.L = 5;
  c.g.B = 3;
  c.g.H = 3;
  c.g.T = 700;
  c.g.D = 128;
  c.frac = 5;
  run_gather_case<uint16_t>(c, rng);
  c.src = layout::bshd;
  c.dst = layout::nhd;
  c.g.L = 40;
  c.g.B = 1;
  c.g.H = 1;
  c.g.T = 300;
  c.g.D = 64;
  run_gather_case<uint16_t>(c, rng);
}
