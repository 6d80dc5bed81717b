// Kernel launches and launcher tuning choices, in one place so that tests can run the kernels on
// the CPU: tests/cuda-emulator compiles the .cu files with a host compiler, defines
// RK_CUDA_EMULATOR, and supplies its own rkcuda::launch and rkcuda::tunable with the same
// signatures. In the real build both are the plain operations below. The same goes for
// dynamicShared and allowDynamicShared (dynamic shared memory), and launchCooperative.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>

#include "common/api.h"
#include "common/check.cuh"

namespace rkcuda {

// ceil(a / b) for sizes (b > 0): grid and tile counts, on the host and in kernels.
__host__ __device__ constexpr int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef RK_CUDA_EMULATOR

// kernel<<<grid, block, sharedBytes, default stream>>>(args...), each argument converted to the
// kernel's parameter type; returns the launch check (see checkLaunch).
template <class... KArgs, class... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  kernel<<<grid, block, sharedBytes, 0>>>(static_cast<KArgs>(args)...);
  return checkLaunch();
}

// Like launch, as a cooperative launch: every block of the grid is resident at once (or the launch
// fails with cudaErrorCooperativeLaunchTooLarge instead of hanging), so that the blocks may wait for
// one another (common/group_sync.cuh). The emulator runs all the blocks' threads together.
template <class... KArgs, class... Args>
Status launchCooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launchCooperative: wrong number of kernel arguments");
  std::tuple<KArgs...> values(static_cast<KArgs>(args)...);
  return std::apply(
      [&](auto&... v) {
        void* pointers[] = {static_cast<void*>(&v)...};
        const cudaError_t err =
            cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers, sharedBytes, 0);
        if (err != cudaSuccess) cudaGetLastError();  // not reported again by a later launch check
        return statusFromCuda(err);
      },
      values);
}

// The path a launcher was told to take by RK_CUDA_TUNE ("fusedRnn.path=3,gatedDeltaRule.forwardPath=1"),
// or -1. Only the path choices whose launchers refuse a path that does not fit can be pinned
// (fusedRnn.path, gatedDeltaRule.forwardPath, gatedDeltaRule.backwardPath); anything else in the variable is
// ignored. For verification on a device: npm run gpu:verify compares the paths' results.
int pinnedPath(const char* name);

// A launcher's heuristic choice (name identifies it, e.g. "linearScan.warpsPerRow"). Returns
// `chosen` unless RK_CUDA_TUNE pins it (pinnedPath); the emulator's version lets a test pin any
// value so that every configuration runs.
inline int tunable(const char* name, int chosen) {
  const int pinned = pinnedPath(name);
  return pinned >= 0 ? pinned : chosen;
}

// The running block's dynamic shared memory (the launch's sharedBytes), 16-byte aligned, as T*.
template <class T> __device__ __forceinline__ T* dynamicShared() {
  extern __shared__ __align__(16) unsigned char rkDynamicShared[];
  return reinterpret_cast<T*>(rkDynamicShared);
}

// Lets kernel launch with up to `bytes` of dynamic shared memory; needed above 48 KiB (the opt-in
// limit is DeviceProps::sharedMemPerBlockOptin).
template <class... KArgs> Status allowDynamicShared(void (*kernel)(KArgs...), size_t bytes) {
  return statusFromCuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

#endif  // RK_CUDA_EMULATOR

}  // namespace rkcuda
