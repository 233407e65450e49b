//! \file prefixkv/detail/memory.cuh
//! Device memory helpers shared by the stages (private): asynchronous global -> shared copies (`cp.async`, sm_80),
//! shared-memory barriers (`mbarrier`) and bulk copies completing on them (sm_90; the sm_90 helpers compile to
//! nothing for older targets, callers dispatch on the architecture).
#pragma once

#include "../core/config.hpp"

#include <cstdint>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

#if defined(__CUDACC__)
//! Shared-window address of a generic pointer into shared memory.
PREFIXKV_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

//! 16-byte global -> shared copy (L2 only); `valid == false` zero-fills the destination without reading `src`.
PREFIXKV_DEVICE void cp_async16(uint32_t dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
PREFIXKV_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
//! Waits until at most N of this thread's committed groups are pending (their shared-memory writes are then
//! visible to this thread; a barrier makes them visible to the block).
template <int N>
PREFIXKV_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

//! Arrival on mbarrier `bar` once all of this thread's earlier cp.async copies have landed (`.noinc`: the arrival
//! counts against the barrier's expected count, so include the copying threads in it).
PREFIXKV_DEVICE void cp_async_mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
#endif
}

//! mbarrier (64-bit word in shared memory at shared-window address `bar`): `count` arrivals complete a phase.
PREFIXKV_DEVICE void mbar_init(uint32_t bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  (void)bar, (void)count;
#endif
}
//! Makes initialised mbarriers visible to the other threads and to the asynchronous (bulk-copy) unit; follow it
//! with a block barrier.
PREFIXKV_DEVICE void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
//! One arrival (release semantics: this thread's earlier memory accesses happen before the phase completes).
PREFIXKV_DEVICE void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
#endif
}
//! One arrival that also announces `bytes` of bulk-copy data the phase must receive before it completes.
PREFIXKV_DEVICE void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  (void)bar, (void)bytes;
#endif
}
//! Waits (acquire) until the phase of parity `parity` has completed.
PREFIXKV_DEVICE void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#else
  (void)bar, (void)parity;
#endif
}
//! Bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory by the
//! asynchronous copy unit; completion is counted on mbarrier `bar` (announce the bytes with mbar_arrive_expect_tx).
PREFIXKV_DEVICE void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
#endif
}

#endif

}  // namespace detail
PREFIXKV_NAMESPACE_END
