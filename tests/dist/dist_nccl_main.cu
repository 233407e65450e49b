// prefixkv_dist_nccl: the sharded compressor over NCCL, one process per GPU (scripts/multigpu-check.sh starts it).
//
//   prefixkv_dist_nccl --rank R --ranks N [--tp T] --id-file PATH [--bench] [--seed S]
//
// Process R of N uses GPU R (modulo the visible devices). Rank 0 writes an ncclUniqueId to PATH, the others wait for
// it; the world communicator is split into tensor-parallel groups of T ranks (default N) and pipeline groups of
// N / T ranks (world rank = pp_rank * T + tp_rank).
// * check (default): random models, every scorer, both granularities, every allocation, strided and paged caches:
//   every rank compresses its shard; its outputs and the bytes of its shard must equal the unsharded device
//   compressor run on the same GPU (bit for bit; for the window scorer, whose device rounding follows the size of
//   each call, the outputs must agree across the ranks). Prints one PASS/FAIL line per case; exit 1 on any failure.
// * --bench: a Llama-3-8B-like cache (32 layers, 8 kv heads, 32 q heads, head_dim 128, bf16, --batch 4, --tokens
//   4096, window scorer w = 32, prefix allocation, out of place so every step does the same work); per step: the
//   time with NCCL and with a loop-back communicator that moves nothing (the same kernels), their difference (the
//   communication cost), and the bytes exchanged.
// Keep NCCL_NVLS_ENABLE=0 in the environment (the script sets it).
#include <prefixkv/dist/compress_dist.cuh>
#include <prefixkv/dist/nccl.hpp>

#include "dist/dist_test_model.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#if !PREFIXKV_HAS_NCCL
#error "prefixkv_dist_nccl needs nccl.h"
#endif

namespace {

namespace pk = prefixkv;
using namespace dist_test;

#define CK(x)                                                                                   \
  do {                                                                                          \
    const cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_), \
                   pk::last_error().message);                                                   \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)
#define NK(x)                                                                                           \
  do {                                                                                                  \
    const ncclResult_t r_ = (x);                                                                        \
    if (r_ != ncclSuccess) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, ncclGetErrorString(r_));          \
      std::exit(2);                                                                                     \
    }                                                                                                   \
  } while (0)

template <class T>
struct dbuf {
  T* p = nullptr;
  size_t n = 0;
  dbuf() = default;
  explicit dbuf(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit dbuf(const std::vector<T>& h) : dbuf(h.size()) {
    if (n) CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());  // a pageable copy may return before its DMA lands; the collectives run on a
                                  // non-blocking stream
  }
  dbuf(dbuf&& o) noexcept : p(std::exchange(o.p, nullptr)), n(std::exchange(o.n, 0)) {}
  dbuf& operator=(dbuf&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    return *this;
  }
  ~dbuf() {
    if (p) cudaFree(p);
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <class T>
std::vector<unsigned char> raw(const std::vector<T>& x) {
  std::vector<unsigned char> b(x.size() * sizeof(T));
  if (!x.empty()) std::memcpy(b.data(), x.data(), b.size());
  return b;
}

struct policy {
  pk::scorer_kind scorer = pk::scorer_kind::recency;
  pk::granularity gran = pk::granularity::layer;
  pk::allocation alloc = pk::allocation::prefix;
  bool in_place = true;
};

//! Fills a buffer with values in [lo, hi) from a hash of (seed, index) (the benchmark's data, made on the GPU).
template <class T>
__global__ void fill_kernel(T* x, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = lo + (hi - lo) * float(z >> 40) * (1.0f / 16777216.0f);
    if constexpr (std::is_same_v<T, float>) x[i] = u;
    else x[i] = T::from_float(u);
  }
}

//! A model (whole or shard) on this GPU with its views and output buffers (sized for the whole model).
template <class T>
struct dmodel {
  shape s;
  dbuf<T> k, v, dk, dv, p, q;
  dbuf<float> scores, thr;
  dbuf<int32_t> table, lengths, len, cu, pages, status;
  int64_t stride = 0;
  size_t per = 0;
  std::vector<pk::kv_view<T>> ks, vs, dks, dvs;
  std::vector<pk::paged_kv_view<T>> kp, vp, dkp, dvp;
  std::vector<pk::kv_view<const T>> pv, qv;
  dmodel(const shape& sh, int64_t L, int64_t Hs, int64_t problems)
      : s(sh), stride(sh.T + 3) {
    const int64_t Hq = s.H * s.G;
    per = size_t(s.page ? s.num_pages() * s.page * s.H * s.D : s.B * s.H * s.T * s.D);
    for (auto* x : {&k, &v, &dk, &dv}) *x = dbuf<T>(per * size_t(s.L));
    p = dbuf<T>(size_t(s.L * s.B * Hq * s.Q * s.T));
    q = dbuf<T>(size_t(s.L * s.B * Hq * s.W * s.D));
    scores = dbuf<float>(size_t(s.L * s.B * s.Hs * stride));
    thr = dbuf<float>(size_t(problems));
    table = dbuf<int32_t>(size_t(std::max<int64_t>(s.B * s.max_blocks(), 1)));
    lengths = dbuf<int32_t>(size_t(s.per_segment_lengths ? L * s.B * Hs : s.B));  // the whole model's lengths
    len = dbuf<int32_t>(size_t(L * s.B * Hs));
    cu = dbuf<int32_t>(size_t(L * (s.B * Hs + 1)));
    pages = dbuf<int32_t>(size_t(s.B));
    status = dbuf<int32_t>(1);
    for (int64_t l = 0; l < s.L; ++l) {
      if (!s.page) {
        ks.push_back(pk::make_kv_view_bhsd(k.p + l * per, s.B, s.H, s.T, s.D));
        vs.push_back(pk::make_kv_view_bhsd(v.p + l * per, s.B, s.H, s.T, s.D));
        dks.push_back(pk::make_kv_view_bhsd(dk.p + l * per, s.B, s.H, s.T, s.D));
        dvs.push_back(pk::make_kv_view_bhsd(dv.p + l * per, s.B, s.H, s.T, s.D));
      } else {
        auto mk = [&](dbuf<T>& x) {
          return pk::make_paged_kv_view(x.p + l * per, pk::page_layout::nhd, s.num_pages(), s.page, s.H, s.D, table.p,
                                        s.B, s.max_blocks());
        };
        kp.push_back(mk(k));
        vp.push_back(mk(v));
        dkp.push_back(mk(dk));
        dvp.push_back(mk(dv));
      }
      pv.push_back(pk::make_kv_view_bhsd<const T>(p.p + l * s.B * Hq * s.Q * s.T, s.B, Hq, s.Q, s.T));
      qv.push_back(pk::make_kv_view_bhsd<const T>(q.p + l * s.B * Hq * s.W * s.D, s.B, Hq, s.W, s.D));
    }
  }
  //! The data of host model m (same shape).
  void upload(const model<T>& m) {
    auto up = [](auto& d, const auto& h) {
      if (h.size() > d.n) {
        std::fprintf(stderr, "upload: %zu elements into a buffer of %zu\n", h.size(), d.n);
        std::exit(2);
      }
      if (!h.empty()) CK(cudaMemcpy(d.p, h.data(), h.size() * sizeof(h[0]), cudaMemcpyHostToDevice));
    };
    up(k, m.k);
    up(v, m.v);
    up(dk, m.dk);
    up(dv, m.dv);
    up(p, m.p);
    up(q, m.q);
    up(scores, m.scores);
    up(table, m.table);
    up(lengths, m.lengths);
    stride = m.score_stride;
    CK(cudaDeviceSynchronize());
  }
  //! Random data made on the GPU; every sequence holds T tokens (strided caches).
  void fill(uint64_t seed) {
    fill_kernel<<<1024, 256>>>(k.p, k.n, seed + 1, -1.0f, 1.0f);
    fill_kernel<<<1024, 256>>>(v.p, v.n, seed + 2, -1.0f, 1.0f);
    fill_kernel<<<1024, 256>>>(q.p, q.n, seed + 3, -2.0f, 2.0f);
    fill_kernel<<<1024, 256>>>(p.p, p.n, seed + 4, 0.0f, 1.0f);
    fill_kernel<<<1024, 256>>>(scores.p, scores.n, seed + 5, 0.0f, 1.0f);
    CK(cudaGetLastError());
    std::vector<int32_t> l(lengths.n, int32_t(s.T));
    CK(cudaMemcpy(lengths.p, l.data(), l.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
  }
  template <class F>
  cudaError_t with_args(F&& f) {
    pk::compress_outputs out{len.p, cu.p, s.page ? pages.p : nullptr, thr.p, status.p};
    auto go = [&](auto cache, auto dst) {
      pk::compress_args<decltype(cache), T, decltype(dst)> a;
      a.cache = cache;
      a.dst = dst;
      a.lengths = lengths.p;
      a.lengths_per_segment = s.per_segment_lengths;
      a.attention = pv.data();
      a.queries = qv.data();
      a.scores = scores.p;
      a.score_stride = stride;
      a.out = out;
      return f(a);
    };
    if (s.page)
      return go(pk::paged_kv_layers<T>{kp.data(), vp.data(), nullptr, nullptr, s.L},
                pk::paged_kv_layers<T>{dkp.data(), dvp.data(), nullptr, nullptr, s.L});
    return go(pk::kv_layers<T>{ks.data(), vs.data(), nullptr, nullptr, s.L},
              pk::kv_layers<T>{dks.data(), dvs.data(), nullptr, nullptr, s.L});
  }
  //! Outputs as bytes (lengths, cu_seqlens, pages, thresholds, status).
  std::vector<unsigned char> outputs() const {
    std::vector<unsigned char> o;
    for (const auto& x : {raw(len.get()), raw(cu.get()), raw(s.page ? pages.get() : std::vector<int32_t>{}),
                          raw(thr.get()), raw(status.get())})
      o.insert(o.end(), x.begin(), x.end());
    return o;
  }
};

//! A communicator that moves nothing (every rank keeps its own data): the benchmark's baseline.
struct loopback {
  static constexpr pk::comm_memory memory = pk::comm_memory::device;
  int r = 0, n = 1;
  int rank() const { return r; }
  int size() const { return n; }
  cudaError_t all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
    char* dst = static_cast<char*>(recv) + size_t(r) * bytes;
    return send == dst || bytes == 0 ? cudaSuccess : cudaMemcpyAsync(dst, send, bytes, cudaMemcpyDeviceToDevice, stream);
  }
  cudaError_t all_reduce_sum(const int64_t* send, int64_t* recv, size_t count, cudaStream_t stream) {
    return send == recv || count == 0 ? cudaSuccess
                                      : cudaMemcpyAsync(recv, send, count * sizeof(int64_t), cudaMemcpyDeviceToDevice, stream);
  }
};

struct world {
  int rank = 0, ranks = 1, tp = 1, pp = 1, tp_rank = 0, pp_rank = 0;
  ncclComm_t all = nullptr, tpc = nullptr, ppc = nullptr;
  pk::nccl_comm ntp, npp;
  pk::compress_shard shard(int64_t l0, int64_t lc) {
    pk::compress_shard sh;
    if (tp > 1) sh.tp = pk::make_communicator(ntp);
    if (pp > 1) sh.pp = pk::make_communicator(npp);
    sh.layer_begin = l0;
    sh.layer_count = lc;
    return sh;
  }
  //! Whether every rank passes (an all-reduce of the failures).
  bool all_ok(bool ok, cudaStream_t stream) {
    int64_t* d;
    CK(cudaMalloc(&d, sizeof(int64_t)));
    const int64_t bad = ok ? 0 : 1;
    CK(cudaMemcpy(d, &bad, sizeof(bad), cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
    NK(ncclAllReduce(d, d, 1, ncclInt64, ncclSum, all, stream));
    int64_t sum = 0;
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpy(&sum, d, sizeof(sum), cudaMemcpyDeviceToHost));
    CK(cudaFree(d));
    return sum == 0;
  }
  //! Whether `bytes` is the same on every rank (all-gather and compare).
  bool same_everywhere(const std::vector<unsigned char>& bytes, cudaStream_t stream) {
    dbuf<unsigned char> mine(bytes), allb(bytes.size() * size_t(ranks));
    NK(ncclAllGather(mine.p, allb.p, bytes.size(), ncclUint8, all, stream));
    CK(cudaStreamSynchronize(stream));
    const std::vector<unsigned char> h = allb.get();
    for (int r = 0; r < ranks; ++r)
      if (std::memcmp(h.data() + size_t(r) * bytes.size(), bytes.data(), bytes.size()) != 0) return false;
    return true;
  }
};

//! Layer partition of the pipeline: as even as possible, the first stages one layer longer.
std::vector<int64_t> stages_of(int64_t L, int pp) {
  std::vector<int64_t> b = {0};
  for (int i = 0; i < pp; ++i) b.push_back(b.back() + L / pp + (i < L % pp ? 1 : 0));
  return b;
}

template <class T>
bool check_case(world& w, const shape& s0, const policy& pol, uint64_t seed, cudaStream_t stream) {
  shape s = s0;
  s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
  std::mt19937_64 rng(seed);
  pk::compress_config c;
  c.layers = s.L;
  c.q_heads = s.H * s.G;
  c.kv_heads = s.H;
  c.head_dim = s.D;
  c.max_batch = s.B;
  c.max_tokens = s.T;
  c.max_window = s.W;
  c.max_pages = s.num_pages();
  c.page_size = s.page;
  c.scorer = pol.scorer;
  c.gran = pol.gran;
  c.alloc = pol.alloc;
  c.in_place = pol.in_place;
  c.evict_ratio = 0.5;
  std::vector<double> profile(size_t(s.L));
  for (size_t i = 0; i < profile.size(); ++i) profile[i] = 0.2 + 0.6 * double(i % 5) / 5.0;
  c.profile = profile.data();
  pk::compress_plan plan;
  CK(pk::make_plan(c, plan));
  const model<T> full = random_model<T>(s, rng);  // the same on every rank: same seed, same generator
  const int64_t problems = pol.alloc == pk::allocation::prefix ? s.B : s.B * s.L;
  const std::vector<int64_t> st = stages_of(s.L, w.pp);
  const int64_t l0 = st[size_t(w.pp_rank)], lc = st[size_t(w.pp_rank) + 1] - l0, hc = s.H / w.tp;
  // the unsharded reference on this GPU
  dmodel<T> whole(full.s, s.L, s.Hs, problems);
  whole.upload(full);
  size_t bytes = 0;
  CK(whole.with_args([&](auto& a) { return pk::compress(nullptr, bytes, plan, a); }));
  dbuf<unsigned char> t0(bytes);
  CK(whole.with_args([&](auto& a) { return pk::compress(t0.p, bytes, plan, a, stream); }));
  CK(cudaStreamSynchronize(stream));
  model<T> after = full;
  {
    const auto k = whole.k.get(), v = whole.v.get(), dk = whole.dk.get(), dv = whole.dv.get();
    after.k = k;
    after.v = v;
    after.dk = dk;
    after.dv = dv;
  }
  const model<T> want = make_shard(after, l0, lc, w.tp_rank * hc, hc);
  // this rank's shard
  const model<T> mine = make_shard(full, l0, lc, w.tp_rank * hc, hc);
  dmodel<T> d(mine.s, s.L, s.Hs, problems);
  d.upload(mine);
  const pk::compress_shard sh = w.shard(l0, lc);
  size_t b2 = 0;
  CK(d.with_args([&](auto& a) { return pk::compress(nullptr, b2, plan, a, sh); }));
  dbuf<unsigned char> t1(b2);
  CK(d.with_args([&](auto& a) { return pk::compress(t1.p, b2, plan, a, sh, stream); }));
  CK(cudaStreamSynchronize(stream));
  const bool exact = pol.scorer != pk::scorer_kind::window;
  bool ok = w.same_everywhere(d.outputs(), stream);
  if (exact) {
    ok = ok && d.outputs() == whole.outputs();
    ok = ok && raw(d.k.get()) == raw(want.k) && raw(d.v.get()) == raw(want.v);
    ok = ok && raw(d.dk.get()) == raw(want.dk) && raw(d.dv.get()) == raw(want.dv);
  }
  const bool all = w.all_ok(ok, stream);
  if (w.rank == 0)
    std::printf("%s tp=%d pp=%d scorer=%d gran=%d alloc=%d %s%s %s\n", all ? "PASS" : "FAIL", w.tp, w.pp,
                int(pol.scorer), int(pol.gran), int(pol.alloc), s.page ? "paged" : "strided",
                pol.in_place ? "" : " gather", exact ? "(== unsharded)" : "(ranks agree)");
  return all;
}

template <class T>
void bench(world& w, int64_t B, int64_t tokens, pk::granularity gran, cudaStream_t stream) {
  shape s;
  s.L = 32;
  s.H = 8;
  s.G = 4;
  s.D = 128;
  s.B = B;
  s.T = tokens;
  s.W = 32;
  s.Q = 1;
  s.Hs = gran == pk::granularity::head ? s.H : 1;
  pk::compress_config c;
  c.layers = s.L;
  c.q_heads = s.H * s.G;
  c.kv_heads = s.H;
  c.head_dim = s.D;
  c.max_batch = s.B;
  c.max_tokens = s.T;
  c.max_window = s.W;
  c.scorer = pk::scorer_kind::window;
  c.gran = gran;
  c.in_place = false;
  c.evict_ratio = 0.5;
  pk::compress_plan plan;
  CK(pk::make_plan(c, plan));
  const std::vector<int64_t> st = stages_of(s.L, w.pp);
  const int64_t l0 = st[size_t(w.pp_rank)], lc = st[size_t(w.pp_rank) + 1] - l0, hc = s.H / w.tp;
  // this rank's shard only, generated here (the whole model is never built)
  shape ss = s;
  ss.L = lc;
  ss.H = hc;
  ss.Hs = gran == pk::granularity::head ? hc : 1;
  dmodel<T> d(ss, s.L, s.Hs, s.B);
  d.fill(1000 * uint64_t(w.rank + 1));
  loopback lb{w.rank, w.ranks};
  pk::compress_shard real = w.shard(l0, lc), none = real;
  if (w.tp > 1) none.tp = pk::make_communicator(lb);
  if (w.pp > 1) none.pp = pk::make_communicator(lb);
  size_t bytes = 0;
  CK(d.with_args([&](auto& a) { return pk::compress(nullptr, bytes, plan, a, real); }));
  dbuf<unsigned char> t(bytes);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto time = [&](const pk::compress_shard& sh, int iters) {
    for (int i = 0; i < 3; ++i) CK(d.with_args([&](auto& a) { return pk::compress(t.p, bytes, plan, a, sh, stream); }));
    w.all_ok(true, stream);  // line the ranks up
    CK(cudaEventRecord(e0, stream));
    for (int i = 0; i < iters; ++i)
      CK(d.with_args([&](auto& a) { return pk::compress(t.p, bytes, plan, a, sh, stream); }));
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return double(ms) / iters;
  };
  const double with_nccl = time(real, 20), local = time(none, 20), again = time(real, 20);
  pk::compress_traffic tr;
  CK(pk::compress_exchange(plan, real, s.B, tr));
  if (w.rank == 0)
    std::printf("BENCH tp=%d pp=%d window w=32 %s B=%lld T=%lld (32 layers, 8 kv heads, bf16): step %.3f ms (again "
                "%.3f), same kernels without communication %.3f ms, communication +%.3f ms/step; %d collectives, "
                "%lld bytes per rank (head rows %lld, histograms 4 x %lld, tally %lld, records %lld)\n",
                w.tp, w.pp, gran == pk::granularity::head ? "head" : "layer", (long long)s.B, (long long)s.T,
                with_nccl, again, local, std::min(with_nccl, again) - local, tr.collectives, (long long)tr.total(),
                (long long)tr.head_rows, (long long)tr.histogram, (long long)tr.tally, (long long)tr.records);
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
}

}  // namespace

int main(int argc, char** argv) {
  world w;
  std::string id_file;
  bool do_bench = false;
  uint64_t seed = 1;
  int64_t batch = 4, tokens = 4096;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--rank") w.rank = std::atoi(next().c_str());
    else if (a == "--ranks") w.ranks = std::atoi(next().c_str());
    else if (a == "--tp") w.tp = std::atoi(next().c_str());
    else if (a == "--id-file") id_file = next();
    else if (a == "--bench") do_bench = true;
    else if (a == "--seed") seed = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--batch") batch = std::atoll(next().c_str());
    else if (a == "--tokens") tokens = std::atoll(next().c_str());
    else {
      std::fprintf(stderr, "usage: %s --rank R --ranks N [--tp T] --id-file PATH [--bench [--batch B] [--tokens T]] [--seed S]\n", argv[0]);
      return 2;
    }
  }
  bool tp_given = false;
  for (int i = 1; i < argc; ++i) tp_given = tp_given || std::string(argv[i]) == "--tp";
  if (!tp_given) w.tp = w.ranks;
  if (w.ranks < 1 || w.tp < 1 || w.ranks % w.tp != 0 || w.rank < 0 || w.rank >= w.ranks || id_file.empty()) {
    std::fprintf(stderr, "bad --rank / --ranks / --tp / --id-file\n");
    return 2;
  }
  w.pp = w.ranks / w.tp;
  w.tp_rank = w.rank % w.tp;
  w.pp_rank = w.rank / w.tp;
  int devices = 0;
  CK(cudaGetDeviceCount(&devices));
  CK(cudaSetDevice(w.rank % devices));
  ncclUniqueId id;
  if (w.rank == 0) {
    NK(ncclGetUniqueId(&id));
    const std::string tmp = id_file + ".tmp";
    std::ofstream(tmp, std::ios::binary).write(reinterpret_cast<const char*>(&id), sizeof(id));
    std::rename(tmp.c_str(), id_file.c_str());
  } else {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    for (;;) {
      std::ifstream f(id_file, std::ios::binary);
      if (f && f.read(reinterpret_cast<char*>(&id), sizeof(id)) && f.gcount() == sizeof(id)) break;
      if (std::chrono::steady_clock::now() > until) {
        std::fprintf(stderr, "rank %d: no ncclUniqueId in %s after 120 s\n", w.rank, id_file.c_str());
        return 2;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  NK(ncclCommInitRank(&w.all, w.ranks, id, w.rank));
  if (w.tp > 1) {
    NK(ncclCommSplit(w.all, w.pp_rank, w.tp_rank, &w.tpc, nullptr));
    CK(pk::make_nccl_comm(w.tpc, w.ntp));
  }
  if (w.pp > 1) {
    NK(ncclCommSplit(w.all, w.tp_rank, w.pp_rank, &w.ppc, nullptr));
    CK(pk::make_nccl_comm(w.ppc, w.npp));
  }
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int failures = 0;
  if (do_bench) {
    bench<pk::bf16>(w, batch, tokens, pk::granularity::layer, stream);
    bench<pk::bf16>(w, batch, tokens, pk::granularity::head, stream);
  } else {
    const pk::scorer_kind scorers[] = {pk::scorer_kind::attention, pk::scorer_kind::window, pk::scorer_kind::key_norm,
                                       pk::scorer_kind::recency, pk::scorer_kind::scores};
    uint64_t n = 0;
    for (pk::scorer_kind sc : scorers)
      for (int gr = 0; gr < 2; ++gr)
        for (int al = 0; al < 4; ++al) {
          policy pol;
          pol.scorer = sc;
          pol.gran = pk::granularity(gr);
          pol.alloc = pk::allocation(al);
          pol.in_place = al != 3;
          if (sc == pk::scorer_kind::attention && pol.gran == pk::granularity::layer && w.tp > 1) continue;
          shape s;
          s.L = 2 * w.pp + 1;
          s.H = 2 * w.tp;
          s.G = 2;
          s.B = 3;
          s.T = 150;
          s.D = 64;
          s.W = 8;
          s.page = al == 2 ? 16 : 0;
          s.per_segment_lengths = al == 1;
          failures += check_case<pk::bf16>(w, s, pol, seed * 1000 + n++, stream) ? 0 : 1;
        }
    if (w.rank == 0) std::printf("%s: %d failing cases\n", failures ? "FAILED" : "PASSED", failures);
  }
  CK(cudaStreamDestroy(stream));
  if (w.tpc) ncclCommDestroy(w.tpc);
  if (w.ppc) ncclCommDestroy(w.ppc);
  ncclCommDestroy(w.all);
  return failures ? 1 : 0;
}
