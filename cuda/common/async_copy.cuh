// Moving data ahead of its use without holding it in registers:
//   * copyAsync16 / waitAsyncCopies: asynchronous 16-byte copies from global to shared memory
//     (cp.async, sm_80 and later), for staging tiles. waitAsyncCopies waits until every copy this
//     thread started has landed; the data is then visible to this thread, and to the rest of the
//     block after a __syncthreads that follows the wait;
//   * commitAsyncCopies / waitAsyncCopyGroups<N>: the copies issued since the last commit form a
//     group (cp.async.commit_group); the wait returns when at most the N most recently committed
//     groups are still in flight (cp.async.wait_group N), so a kernel can wait for the tile it
//     needs now while the next ones keep loading;
//   * prefetchL2: a hint that brings a global memory line into L2, so that a later load of it does
//     not wait for DRAM.
// Host compilation: the CPU emulator (tests/cuda-emulator) defers each copy to the wait, as a device
// may; other host code copies at once. Hints are ignored.
#pragma once
#include <cuda_runtime.h>

#include <cstring>

namespace rkcuda {

// Copies the first srcBytes (0..16) bytes at src to dst and zero-fills the rest of the 16 bytes.
// dst (shared memory) and src (global memory) must be 16-byte aligned; src must be a valid address
// even when srcBytes is 0 (nothing is read then). The global data goes through L2 only.
__device__ __forceinline__ void copyAsync16(void* dst, const void* src, int srcBytes) {
#if defined(__CUDA_ARCH__)
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src), "r"(srcBytes) : "memory");
#elif defined(RK_CUDA_EMULATOR)
  emu::copyAsync16(dst, src, srcBytes);
#else
  unsigned char buffer[16] = {};
  if (srcBytes > 0) std::memcpy(buffer, src, static_cast<size_t>(srcBytes < 16 ? srcBytes : 16));
  std::memcpy(dst, buffer, 16);
#endif
}

__device__ __forceinline__ void waitAsyncCopies() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(RK_CUDA_EMULATOR)
  emu::waitAsyncCopies();
#endif
}

__device__ __forceinline__ void commitAsyncCopies() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(RK_CUDA_EMULATOR)
  emu::commitAsyncCopies();
#endif
}

template <int N> __device__ __forceinline__ void waitAsyncCopyGroups() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(RK_CUDA_EMULATOR)
  emu::waitAsyncCopyGroups(N);
#endif
}

// p must point into a global memory allocation.
__device__ __forceinline__ void prefetchL2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
  (void)p;
#endif
}

}  // namespace rkcuda
