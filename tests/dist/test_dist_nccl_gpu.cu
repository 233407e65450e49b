// The compressor's CUDA backend through the NCCL adapter on one GPU: a communicator of one rank (ncclCommInitRank
// with nranks = 1) as both the tensor- and the pipeline-parallel group. Every NCCL call of the protocol runs; the
// result equals the plain single-GPU compressor bit for bit, for every scorer (the window scorer included: one rank
// scores the whole model), as a plain launch and as a CUDA graph.
#include <prefixkv/dist/nccl.hpp>

#include "dist/dist_gpu_util.cuh"

#if PREFIXKV_HAS_NCCL

namespace {

using namespace dist_test;
using prefixkv_test::make_rng;

struct nccl_one {
  ncclComm_t comm = nullptr;
  nccl_one() {
    ncclUniqueId id;
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    REQUIRE(ncclCommInitRank(&comm, 1, id, 0) == ncclSuccess);
  }
  ~nccl_one() {
    if (comm) ncclCommDestroy(comm);
  }
};

template <class T>
void check_nccl_case(std::mt19937_64& rng, const pk::nccl_comm& nc, const policy& pol, shape s, bool graph) {
  s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
  std::vector<double> profile;
  const pk::compress_config cfg = make_config(s, pol, rng, profile);
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  const model<T> full = random_model<T>(s, rng);
  const int64_t problems = pol.alloc == pk::allocation::prefix ? s.B : s.B * s.L;
  device_model<T> whole(full, s.L, s.Hs, problems);
  const result ref = run_unsharded(whole, plan, pol);
  REQUIRE(ref.e == cudaSuccess);
  pk::nccl_comm c = nc;
  pk::compress_shard sh;
  sh.tp = pk::make_communicator(c);
  sh.pp = pk::make_communicator(c);
  device_model<T> d(full, s.L, s.Hs, problems);
  d.poison();
  size_t bytes = 0;
  REQUIRE(d.with_args(pol, [&](auto& a) { return pk::compress(nullptr, bytes, plan, a, sh); }) == cudaSuccess);
  device_buffer<unsigned char> temp(bytes);
  cudaStream_t stream;
  PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaError_t e = cudaSuccess;
  if (!graph) {
    e = d.with_args(pol, [&](auto& a) { return pk::compress(temp.get(), bytes, plan, a, sh, stream); });
  } else {
    cudaGraph_t g;
    PKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    e = d.with_args(pol, [&](auto& a) { return pk::compress(temp.get(), bytes, plan, a, sh, stream); });
    PKV_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
    cudaGraphExec_t exec;
    PKV_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
    PKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    PKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
    PKV_CUDA_CHECK(cudaGraphDestroy(g));
  }
  REQUIRE(e == cudaSuccess);
  PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  PKV_CUDA_CHECK(cudaStreamDestroy(stream));
  const result got = d.download(e);
  INFO(pol.name() << (graph ? ", graph" : ", plain"));
  CHECK(got.same_outputs(ref));
  CHECK(got.k == ref.k);
  CHECK(got.v == ref.v);
  CHECK(got.dk == ref.dk);
  CHECK(got.dv == ref.dv);
}

}  // namespace

TEST_CASE("NCCL, one rank: sharded compress == plain compress (every scorer, plain launch and CUDA graph)") {
  nccl_one one;
  pk::nccl_comm nc;
  REQUIRE(pk::make_nccl_comm(one.comm, nc) == cudaSuccess);
  CHECK(nc.rank() == 0);
  CHECK(nc.size() == 1);
  auto rng = make_rng(0xDCC1);
  for (int sc = 0; sc < 5; ++sc)
    for (int gr = 0; gr < 2; ++gr) {
      policy pol;
      pol.scorer = pk::scorer_kind(sc);
      pol.gran = pk::granularity(gr);
      pol.alloc = (sc + gr) % 2 ? pk::allocation::prefix : pk::allocation::pyramid;
      pol.in_place = sc != 3;
      pol.lse = gr == 1;
      shape s;
      s.L = 3;
      s.H = 2;
      s.G = 2;
      s.B = 2;
      s.T = 70;
      s.D = 64;
      s.W = 6;
      s.page = sc == 2 ? 16 : 0;
      check_nccl_case<pk::bf16>(rng, nc, pol, s, false);
      check_nccl_case<pk::bf16>(rng, nc, pol, s, true);
    }
}

TEST_CASE("NCCL adapter: a null communicator is rejected with a reason") {
  pk::nccl_comm nc;
  CHECK(pk::make_nccl_comm(nullptr, nc) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
}

#else

TEST_CASE("NCCL adapter: not built (nccl.h not found)") { MESSAGE("nccl.h was not found: the NCCL tests are not built"); }

#endif
