// A small SIMT emulator that runs the CUDA kernels of cuda/ on the CPU, so that their unmodified
// source can be tested without a GPU: a test driver includes this header first, then the .cu
// files, and compiles the whole as one C++17 translation unit with a host compiler (it defines
// the runtime functions below) against the CUDA toolkit headers. See linear_scan_test.cpp.
//
// Model. Blocks run one after another. Each CUDA thread of a block is a cooperative fiber
// (ucontext) with its own stack; a fiber runs until it reaches a collective operation (a warp
// shuffle, __syncwarp, __syncthreads), then the next fiber in thread order runs. So threads only
// interleave at collectives, which is exactly what kernels that communicate through shuffles and
// __syncthreads-separated shared memory may rely on. A collective that is never completed (a
// divergent barrier, a lane that exited early) is reported as a deadlock and aborts.
// Global memory is host memory. __shared__ variables become function statics: shared by all the
// blocks too, which is harmless as blocks do not overlap.
// Cooperative launches (rkcuda::launchCooperative) schedule the fibers of every block of the grid
// together, each block with its own __syncthreads barrier and its own dynamic shared memory, so that
// blocks may wait for one another (common/group_sync.cuh: atomicAdd on unsigned counts as progress,
// __nanosleep lets the other fibers run, and a wait that nobody can end is reported as a deadlock).
// A kernel launched that way must use dynamic shared memory only (the function statics would be
// shared by its concurrent blocks). The grid must fit smCount x blocksPerSm, as on a device.
//
// Seams with cuda/ (see cuda/common/launch.cuh): rkcuda::launch runs a grid here instead of
// `<<<...>>>`, and rkcuda::tunable returns the value a test pinned with emu::setTunable, so a test
// can force each configuration a launcher might choose. emu::launchLog records every launch.
//
// Supported: 1-D grids and blocks of a multiple of 32 threads (up to 1024), full-warp
// __shfl_sync / __shfl_up_sync / __shfl_down_sync / __shfl_xor_sync of 4-byte values, __syncwarp,
// __syncthreads, __ldg (which checks alignment), atomicAdd on float and unsigned (a plain add:
// threads run one at a time), __threadfence (nothing to do), __nanosleep (a yield), dynamic shared
// memory through rkcuda::dynamicShared (NaN-filled at every block start;
// a launch above 48 KiB fails unless rkcuda::allowDynamicShared raised the kernel's limit, as on a
// device; 227 KiB at most, also the answer to cudaDevAttrMaxSharedMemoryPerBlockOptin), and the few
// runtime calls that the launchers make
// (stream-ordered allocations are counted, so a test can check that every one is freed). Add what
// new kernels need, in the same style. Not modelled: data races (the interleaving is one fixed
// order), memory ordering.
//
// Compile with -fno-strict-aliasing: kernels read element storage as raw bits and 16-byte
// vectors, which nvcc allows and an optimising host compiler otherwise need not.
#pragma once

#define RK_CUDA_EMULATOR 1
// Before the CUDA headers: in host compilation they leave a defined __shared__ alone and do not
// define __launch_bounds__.
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>  // fmaf and the other math functions kernels call unqualified
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "common/api.h"
#include "common/check.cuh"

namespace emu {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what.c_str());
  std::abort();
}

// ---- fibers ----

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; touched lazily and reused across blocks

struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t context;
  uint3 tid;
  uint3 blockIndex;                // blockIdx of the fiber's block
  Barrier* syncBarrier = nullptr;  // its block's __syncthreads barrier
  unsigned warp = 0;               // its warp's index in Block::warps
  float4* shared = nullptr;        // its block's dynamic shared memory
  bool finished = false;
  unsigned exchanges = 0;  // warp exchanges done so far; its parity picks the slot buffer
};

struct Warp {
  Barrier barrier;
  uint32_t slots[2][32];  // double-buffered, so one barrier per exchange suffices
};

// The block being run (or, in a cooperative launch, every block of the grid).
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Barrier> barriers;  // one per block being run
  Fiber* current = nullptr;
  unsigned unfinished = 0;
  unsigned idleSwitches = 0;  // fiber switches since a fiber last arrived at a barrier or finished
  std::function<void()> body;
  ucontext_t launcher;  // where the launch waits until every fiber has finished
  uint3 blockIndex;     // of the first block being run
  dim3 blockDims, gridDims;
  std::vector<float4> dynamicShared;  // the launch's sharedBytes, rounded up to 16, per block being run
  size_t dynamicSharedBytes = 0;
};
inline Block block;

// Stacks, kept for the whole run (fiber i of every block uses stack i), each above an
// inaccessible page so that an overflow faults instead of corrupting a neighbour.
inline char* stackFor(size_t i) {
  static std::vector<char*> stacks;
  static const size_t guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p, guard, PROT_NONE) != 0) fail("cannot allocate a fiber stack");
    stacks.push_back(static_cast<char*>(p) + guard);
  }
  return stacks[i];
}

inline Fiber* nextUnfinished(Fiber* from) {
  Fiber* f = from;
  do {
    f = f + 1 == block.fibers.data() + block.fibers.size() ? block.fibers.data() : f + 1;
  } while (f->finished && f != from);
  return f->finished ? nullptr : f;
}

// Lets the other fibers run (the next unfinished one in thread order resumes).
inline void yield() {
  // A whole round of switches in which nobody arrived anywhere: everyone is waiting for good.
  if (++block.idleSwitches > block.unfinished + 1) {
    fail("deadlock in block " + std::to_string(block.current->blockIndex.x) +
         ": a barrier or warp collective that not every thread reaches");
  }
  Fiber* from = block.current;
  Fiber* to = nextUnfinished(from);
  if (to == from) return;
  block.current = to;
  swapcontext(&from->context, &to->context);
}

inline void arriveAndWait(Barrier& b) {
  block.idleSwitches = 0;
  const unsigned generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline void fiberMain() {
  block.body();
  Fiber* self = block.current;
  self->finished = true;
  --block.unfinished;
  block.idleSwitches = 0;
  Fiber* to = nextUnfinished(self);
  block.current = to;
  setcontext(to != nullptr ? &to->context : &block.launcher);
}

// Runs blocks first .. first + count - 1 together (count 1 but for cooperative launches).
inline void runBlocks(unsigned first, unsigned count) {
  const unsigned threads = block.blockDims.x;
  const size_t sharedPerBlock = (block.dynamicSharedBytes + 15) / 16;
  block.blockIndex = make_uint3(first, 0, 0);
  block.fibers.assign(static_cast<size_t>(count) * threads, Fiber{});
  block.warps.assign(static_cast<size_t>(count) * threads / 32, Warp{});
  for (Warp& w : block.warps) w.barrier.expected = 32;
  block.barriers.assign(count, Barrier{});
  for (Barrier& b : block.barriers) b.expected = threads;
  block.dynamicShared.assign(count * sharedPerBlock, float4{});
  for (unsigned t = 0; t < count * threads; ++t) {
    Fiber& f = block.fibers[t];
    f.tid = make_uint3(t % threads, 0, 0);
    f.blockIndex = make_uint3(first + t / threads, 0, 0);
    f.syncBarrier = &block.barriers[t / threads];
    f.warp = t / 32;
    f.shared = block.dynamicShared.data() + (t / threads) * sharedPerBlock;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stackFor(t);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiberMain, 0);
  }
  std::memset(block.dynamicShared.data(), 0xff, block.dynamicShared.size() * sizeof(float4));
  block.unfinished = count * threads;
  block.idleSwitches = 0;
  block.current = &block.fibers[0];
  swapcontext(&block.launcher, &block.current->context);
}

// ---- what tests can set and inspect ----

struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
};
inline std::vector<LaunchRecord> launchLog;

inline std::map<std::string, int>& tunings() {
  static std::map<std::string, int> values;
  return values;
}
// Pins rkcuda::tunable(name, ...) to value; 0 restores the launcher's own choice.
inline void setTunable(const std::string& name, int value) {
  if (value == 0) {
    tunings().erase(name);
  } else {
    tunings()[name] = value;
  }
}

template <class Kernel> const void* kernelId(Kernel* kernel) { return reinterpret_cast<const void*>(kernel); }

// Dynamic shared memory limits raised by rkcuda::allowDynamicShared, per kernel.
inline std::map<const void*, size_t> dynamicSharedLimits;
constexpr size_t kDefaultDynamicShared = 48 * 1024, kMaxDynamicShared = 227 * 1024;

inline int smCount = 132;    // cudaDevAttrMultiProcessorCount
inline int blocksPerSm = 4;  // the answer to every occupancy query

// Stream-ordered allocations (cudaMallocAsync) not yet freed, and how many were made in all.
inline std::map<void*, size_t> liveAllocations;
inline long allocationCount = 0;

}  // namespace emu

// ---- built-in variables and device functions ----

#define threadIdx (::emu::block.current->tid)
#define blockIdx (::emu::block.current->blockIndex)
#define blockDim (::emu::block.blockDims)
#define gridDim (::emu::block.gridDims)

inline void __syncthreads() { emu::arriveAndWait(*emu::block.current->syncBarrier); }

namespace emu {
// Every lane of the current fiber's warp publishes value. Lanes form segments of `width`; returns
// the value of lane source(i) of this lane's segment, i being this lane's index in it, or this
// lane's own value when source returns -1.
template <class T, class Source> T warpExchange(unsigned mask, T value, int width, Source source) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "shuffles of 4-byte values only");
  if (mask != 0xffffffffu) fail("only full-warp shuffle masks are emulated");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
  Fiber& self = *block.current;
  Warp& warp = block.warps[self.warp];
  const int lane = static_cast<int>(self.tid.x % 32);
  uint32_t* slots = warp.slots[self.exchanges++ & 1];
  std::memcpy(&slots[lane], &value, sizeof value);
  arriveAndWait(warp.barrier);
  const int segment = lane & ~(width - 1);
  const int src = source(lane - segment);
  if (src >= 0) std::memcpy(&value, &slots[segment + src], sizeof value);
  return value;
}
}  // namespace emu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("only full-warp __syncwarp is emulated");
  emu::arriveAndWait(emu::block.warps[emu::block.current->warp].barrier);
}

template <class T> T __shfl_sync(unsigned mask, T value, int srcLane, int width = 32) {
  return emu::warpExchange(mask, value, width, [&](int) { return srcLane & (width - 1); });
}

template <class T> T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int d = static_cast<int>(delta);
  return emu::warpExchange(mask, value, width, [&](int i) { return i >= d ? i - d : -1; });
}

template <class T> T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int d = static_cast<int>(delta);
  return emu::warpExchange(mask, value, width, [&](int i) { return i + d < width ? i + d : -1; });
}

template <class T> T __shfl_xor_sync(unsigned mask, T value, int laneMask, int width = 32) {
  return emu::warpExchange(mask, value, width, [&](int i) { return (i ^ laneMask) & (width - 1); });
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

// A counter update: progress for the deadlock detection (another block may be waiting for it).
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  emu::block.idleSwitches = 0;
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() {}

// A thread that waits for another block: lets the other fibers run.
inline void __nanosleep(unsigned) { emu::yield(); }

template <class T> T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fail("misaligned __ldg");
  return *p;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---- runtime: the calls the launchers make (host memory stands for device memory) ----

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = static_cast<int>(emu::kMaxDynamicShared);
    return cudaSuccess;
  }
  if (attr == cudaDevAttrCooperativeLaunch) {
    *value = 1;
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMultiProcessorCount) {
    emu::fail("cudaDeviceGetAttribute(" + std::to_string(static_cast<int>(attr)) + ") is not emulated");
  }
  *value = emu::smCount;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = emu::blocksPerSm;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "error in the CUDA emulator"; }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  // Uninitialised like device memory: filled with a pattern that reads as NaN in every dtype.
  void* p = std::malloc(bytes > 0 ? bytes : 1);
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(p, 0xff, bytes);
  emu::liveAllocations[p] = bytes;
  ++emu::allocationCount;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  if (ptr == nullptr) return cudaSuccess;
  if (emu::liveAllocations.erase(ptr) == 0) emu::fail("cudaFreeAsync of a pointer not from cudaMallocAsync");
  std::free(ptr);
  return cudaSuccess;
}
}

// ---- the seams of cuda/common/launch.cuh ----

namespace rkcuda {

// The checks of a launch; sets up the emulator's launch state when they pass.
template <class... KArgs> Status prepareLaunch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes) {
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    return statusError("emulator: grid and block must be 1-D and non-empty");
  }
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024) {
    return statusError("emulator: block size must be a multiple of 32, at most 1024");
  }
  {
    const auto it = emu::dynamicSharedLimits.find(emu::kernelId(kernel));
    const size_t limit = it != emu::dynamicSharedLimits.end() ? it->second : emu::kDefaultDynamicShared;
    if (sharedBytes > limit) {
      return statusError("emulator: " + std::to_string(sharedBytes) +
                         " bytes of dynamic shared memory, over the kernel's limit of " + std::to_string(limit) +
                         " (see allowDynamicShared)");
    }
  }
  emu::block.dynamicSharedBytes = sharedBytes;
  emu::launchLog.push_back(emu::LaunchRecord{emu::kernelId(kernel), grid, block});
  emu::block.gridDims = grid;
  emu::block.blockDims = block;
  return Status{};
}

template <class... KArgs, class... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  if (Status st = prepareLaunch(kernel, grid, block, sharedBytes); !st.ok()) return st;
  emu::block.body = [&] { kernel(static_cast<KArgs>(args)...); };
  for (unsigned b = 0; b < grid.x; ++b) emu::runBlocks(b, 1);
  emu::block.body = nullptr;
  return Status{};
}

// Every block's threads at once; refused, as on a device, when the grid exceeds what can be resident.
template <class... KArgs, class... Args>
Status launchCooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launchCooperative: wrong number of kernel arguments");
  if (static_cast<int64_t>(grid.x) > static_cast<int64_t>(emu::smCount) * emu::blocksPerSm) {
    return statusError("emulator: cooperative launch of " + std::to_string(grid.x) +
                       " blocks, more than can be resident");
  }
  if (Status st = prepareLaunch(kernel, grid, block, sharedBytes); !st.ok()) return st;
  emu::block.body = [&] { kernel(static_cast<KArgs>(args)...); };
  emu::runBlocks(0, grid.x);
  emu::block.body = nullptr;
  return Status{};
}

template <class T> T* dynamicShared() { return reinterpret_cast<T*>(emu::block.current->shared); }

template <class... KArgs> Status allowDynamicShared(void (*kernel)(KArgs...), size_t bytes) {
  if (bytes > emu::kMaxDynamicShared) return statusError("emulator: more dynamic shared memory than a device allows");
  emu::dynamicSharedLimits[emu::kernelId(kernel)] = bytes;
  return Status{};
}

inline int tunable(const char* name, int chosen) {
  const auto it = emu::tunings().find(name);
  return it != emu::tunings().end() ? it->second : chosen;
}

}  // namespace rkcuda
