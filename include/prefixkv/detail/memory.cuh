//! \file prefixkv/detail/memory.cuh
//! Device memory helpers shared by the stages (private): asynchronous global -> shared copies (`cp.async`, sm_80).
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

#endif

}  // namespace detail
PREFIXKV_NAMESPACE_END
