// Small kernels with one planted bug each, and the same kernels without it: the emulator's checks
// (checks.h) must report every bug and pass every fixed kernel. `planted_bugs <case>` runs one case
// (`planted_bugs list` names them); tests/cuda-emulator.test.ts builds this with the checks and
// runs each case both ways. A case prints "ran <case>"; the checks then print their summary.
#include "emu.h"  // first: the emulator

#include "common/async_copy.cuh"
#include "common/group_sync.cuh"
#include "common/launch.cuh"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 64;

// Every thread writes its slot, then reads its neighbour's: needs a barrier between.
__global__ void neighbourKernel(float* out, bool barrier) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  slots[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % kThreads];
}

// Reads the neighbour's slot, then overwrites its own for a second round: the write must wait
// until every reader is done (write after read).
__global__ void reuseKernel(float* out, bool barrier) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  slots[t] = static_cast<float>(t);
  __syncthreads();
  float v = slots[(t + 1) % kThreads];
  if (barrier) __syncthreads();
  slots[t] = v * 2;
  __syncthreads();
  out[t] = slots[(t + 1) % kThreads];
}

// Lanes exchange through shared memory inside one warp: the lockstep of a warp orders nothing,
// only __syncwarp (or a shuffle) does.
__global__ void warpExchangeKernel(float* out, bool syncwarp) {
  __shared__ float slots[32];
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 32) {
    slots[lane] = static_cast<float>(lane);
    if (syncwarp) __syncwarp();
    out[lane] = slots[lane ^ 1];
  }
}

// Every lane reads a shared value, a shuffle follows, then lane 0 overwrites the value: the
// shuffle's data dependence is no memory ordering (RK_EMU_STRICT_WARP=1), a __syncwarp is.
__global__ void shuffleOrderKernel(float* out, bool syncwarp) {
  __shared__ float carry[1];
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) carry[0] = 1.0f;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = carry[0] + static_cast<float>(lane);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    if (syncwarp) __syncwarp();
    if (lane == 0) carry[0] = v;
    out[lane] = v;
  }
}

// Dynamic shared memory of kThreads floats; the buggy form indexes one past its end.
__global__ void dynamicSharedKernel(float* out, int shift) {
  float* slots = rkcuda::dynamicShared<float>();
  const int t = threadIdx.x;
  slots[t + shift] = 1.0f;
  __syncthreads();
  out[t] = slots[t];
}

// Reads element t + shift of a device array of kThreads floats.
__global__ void globalReadKernel(const float* in, float* out, int shift) { out[threadIdx.x] = in[threadIdx.x + shift]; }

// A 16-byte load from in + offset floats.
__global__ void vectorLoadKernel(const float* in, float* out, int offset) {
  const float4 v = *reinterpret_cast<const float4*>(in + offset + 4 * threadIdx.x);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// Reads shared memory that only some threads wrote (initWrites) or that all of them wrote.
__global__ void sharedInitKernel(float* out, bool allWrite) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  if (allWrite || t % 2 == 0) slots[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = slots[kThreads - 1 - t];
}

// Reads scratch device memory that was (or was not) written before.
__global__ void fillKernel(float* scratch) { scratch[threadIdx.x] = static_cast<float>(threadIdx.x); }
__global__ void copyKernel(const float* scratch, float* out) { out[threadIdx.x] = scratch[threadIdx.x]; }

// Stages kThreads floats with cp.async; the data may be read only after the wait and a barrier.
__global__ void asyncCopyKernel(const float* in, float* out, bool wait) {
  __shared__ __align__(16) float tile[kThreads];
  const int t = threadIdx.x;
  if (t < kThreads / 4) rkcuda::copyAsync16(tile + 4 * t, in + 4 * t, 16);
  if (wait) rkcuda::waitAsyncCopies();
  __syncthreads();
  out[t] = tile[kThreads - 1 - t];
  if (!wait) rkcuda::waitAsyncCopies();
}

// A __syncthreads that only half the block reaches.
__global__ void partialBarrierKernel(float* out, bool everyone) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  slots[t] = static_cast<float>(t);
  if (everyone || t < kThreads / 2) __syncthreads();
  out[t] = slots[t];
}

// A shuffle whose mask leaves out the calling lane.
__global__ void shuffleMaskKernel(float* out, bool full) {
  const int lane = threadIdx.x % 32;
  const unsigned mask = full ? 0xffffffffu : ~(1u << lane);
  out[threadIdx.x] = __shfl_sync(mask, static_cast<float>(lane), (lane + 1) % 32);
}

// Half of each warp returns before a full-warp shuffle.
__global__ void exitedLanesKernel(float* out, bool stay) {
  const int lane = threadIdx.x % 32;
  if (!stay && lane < 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(lane), 1);
}

// Two co-resident blocks: block 0 writes data and raises a flag; block 1 waits for the flag and
// reads the data. The flag's update must be a release (a fence before it).
__global__ void flagKernel(float* data, unsigned* flag, float* out, bool fenced) {
  const int t = threadIdx.x;
  if (blockIdx.x == 0) {
    data[t] = static_cast<float>(t);
    __syncthreads();
    if (t == 0) {
      if (fenced) __threadfence();
      atomicAdd(flag, 1u);
    }
  } else {
    if (t == 0) {
      while (rkcuda::loadAcquireGpu(flag) == 0) __nanosleep(32);
      __threadfence();
    }
    __syncthreads();
    out[t] = data[t];
  }
}

// ---- the cases ----

// Device arrays of one case, freed at its end.
struct Device {
  std::vector<void*> live;
  template <class T> T* alloc(size_t n) {
    void* p = nullptr;
    if (cudaMallocAsync(&p, n * sizeof(T), nullptr) != cudaSuccess) emu::fail("allocation");
    live.push_back(p);
    return static_cast<T*>(p);
  }
  const float* zeros(size_t n) {  // an input
    float* p = alloc<float>(n);
    cudaMemsetAsync(p, 0, n * sizeof(float), nullptr);
    return p;
  }
  float* out() { return alloc<float>(kThreads); }  // an output of one value per thread
  ~Device() {
    for (void* p : live) cudaFreeAsync(p, nullptr);
  }
};

void expectOk(rkcuda::Status st) {
  if (!st.ok()) emu::fail("launch failed: " + st.message);
}

// One block of kThreads threads.
template <class... KArgs, class... Args> void oneBlock(void (*kernel)(KArgs...), size_t sharedBytes, Args... args) {
  expectOk(rkcuda::launch(kernel, 1, kThreads, sharedBytes, args...));
}

using Case = void (*)(bool fixed);
struct Named {
  const char* name;
  Case run;
};

const Named kCases[] = {
    {"missing-barrier",
     [](bool fixed) {
       Device d;
       oneBlock(neighbourKernel, 0, d.out(), fixed);
     }},
    {"write-after-read",
     [](bool fixed) {
       Device d;
       oneBlock(reuseKernel, 0, d.out(), fixed);
     }},
    {"warp-without-syncwarp",
     [](bool fixed) {
       Device d;
       oneBlock(warpExchangeKernel, 0, d.out(), fixed);
     }},
    {"shuffle-as-ordering",
     [](bool fixed) {
       Device d;
       oneBlock(shuffleOrderKernel, 0, d.out(), fixed);
     }},
    {"dynamic-shared-off-by-one",
     [](bool fixed) {
       Device d;
       oneBlock(dynamicSharedKernel, kThreads * sizeof(float), d.out(), fixed ? 0 : 1);
     }},
    {"global-off-by-one",
     [](bool fixed) {
       Device d;
       oneBlock(globalReadKernel, 0, d.zeros(kThreads), d.out(), fixed ? 0 : 1);
     }},
    {"misaligned-vector-load",
     [](bool fixed) {
       Device d;
       oneBlock(vectorLoadKernel, 0, d.zeros(4 * kThreads + 4), d.out(), fixed ? 0 : 1);
     }},
    {"uninitialised-shared",
     [](bool fixed) {
       Device d;
       oneBlock(sharedInitKernel, 0, d.out(), fixed);
     }},
    {"uninitialised-global",
     [](bool fixed) {
       Device d;
       float* scratch = d.alloc<float>(kThreads);
       if (fixed) oneBlock(fillKernel, 0, scratch);
       oneBlock(copyKernel, 0, static_cast<const float*>(scratch), d.out());
     }},
    {"cp-async-read-before-wait",
     [](bool fixed) {
       Device d;
       oneBlock(asyncCopyKernel, 0, d.zeros(kThreads), d.out(), fixed);
     }},
    {"partial-barrier",
     [](bool fixed) {
       Device d;
       oneBlock(partialBarrierKernel, 0, d.out(), fixed);
     }},
    {"shuffle-mask-without-caller",
     [](bool fixed) {
       Device d;
       oneBlock(shuffleMaskKernel, 0, d.out(), fixed);
     }},
    {"shuffle-with-exited-lanes",
     [](bool fixed) {
       Device d;
       oneBlock(exitedLanesKernel, 0, d.out(), fixed);
     }},
    {"flag-without-fence",
     [](bool fixed) {
       Device d;
       float* data = d.alloc<float>(kThreads);
       unsigned* flag = d.alloc<unsigned>(1);
       cudaMemsetAsync(flag, 0, sizeof(unsigned), nullptr);
       expectOk(rkcuda::launchCooperative(flagKernel, 2, kThreads, 0, data, flag, d.out(), fixed));
     }},
};

}  // namespace

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  if (arg == "list") {
    for (const Named& c : kCases) std::printf("%s\n", c.name);
    return 0;
  }
  const bool fixed = arg.size() > 6 && arg.compare(arg.size() - 6, 6, "-fixed") == 0;
  const std::string name = fixed ? arg.substr(0, arg.size() - 6) : arg;
  for (const Named& c : kCases) {
    if (name != c.name) continue;
    c.run(fixed);
    std::printf("ran %s\n", arg.c_str());
    return 0;
  }
  std::fprintf(stderr, "usage: planted_bugs list | <case>[-fixed]\n");
  return 2;
}
