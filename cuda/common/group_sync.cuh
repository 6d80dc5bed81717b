// A barrier among several co-resident blocks of one launch (a "group", e.g. the blocks that share
// one recurrent head), for persistent kernels whose blocks exchange data through global memory
// (L2) at every step. The kernel must be launched with rkcuda::launchCooperative (launch.cuh), which
// fails instead of hanging when the blocks cannot all be resident at once.
//
// Protocol: one unsigned counter per group in global memory, zero before the launch; every block
// of the group adds 1 at each barrier and waits until the counter reaches (barriers passed so far)
// x members. The counter only grows (wrapping at 2^32, which the signed difference below absorbs:
// no block is ever more than one barrier ahead of another), so no reset and no generation flag are
// needed.
// Memory ordering (PTX memory model): __syncthreads orders the block's earlier writes before
// thread 0's fence; __threadfence (fence.sc.gpu) followed by the relaxed atomicAdd is a release at
// GPU scope; the ld.acquire.gpu that observes the last arrival, followed by another fence and
// __syncthreads, makes every member's pre-barrier writes visible to every thread of the block after
// the barrier. Data written before the barrier by other blocks should be read through L2 (cp.async
// .cg, ld.global.cg), never through a possibly stale L1 line.
//
// Host compilation: the CPU emulator (tests/cuda-emulator) models the acquire load, and __nanosleep
// lets the other blocks' threads run; other host code reads a volatile.
#pragma once
#include <cuda_runtime.h>

namespace rkcuda {

__device__ __forceinline__ unsigned loadAcquireGpu(const unsigned* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#elif defined(RK_CUDA_EMULATOR)
  return emu::loadAcquire(p);
#else
  return *const_cast<const volatile unsigned*>(p);
#endif
}

// Every thread of every member block calls this with the same *passed (the barriers this block has
// passed, 0 at the start), which it advances. members: blocks in the group.
__device__ __forceinline__ void groupBarrier(unsigned* counter, unsigned members, unsigned* passed) {
  __syncthreads();
  *passed += 1u;
  if (threadIdx.x == 0) {
    const unsigned target = *passed * members;
    __threadfence();
    atomicAdd(counter, 1u);
    while (static_cast<int>(target - loadAcquireGpu(counter)) > 0) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

}  // namespace rkcuda
