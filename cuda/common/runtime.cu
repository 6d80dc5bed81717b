// Runtime services for cuda/: device detection, properties, stream-ordered allocation on the
// default stream, copies, dtype conversion and event timing (the runtime half of common/api.h).
// The CUDA runtime is linked statically, so this must load, and available() must answer false,
// on a machine without an NVIDIA driver; nothing here prints or aborts.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>

#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"

namespace rkcuda {
namespace {

std::string versionString(int v) {  // 12040 -> "12.4"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string errorText(cudaError_t err) { return statusFromCuda(err).message; }

// Element-wise dtype conversion, grid-stride over n elements.
template <class S, class D>
__global__ void __launch_bounds__(256) convertKernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = fromFloat<D>(toFloat(src[i]));
  }
}

}  // namespace

bool available(std::string* reason) {
  auto fail = [&](const std::string& why) {
    if (reason != nullptr) *reason = why;
    cudaGetLastError();  // leave no error behind for later calls
    return false;
  };
  int driverVersion = 0;
  const cudaError_t derr = cudaDriverGetVersion(&driverVersion);
  if (derr != cudaSuccess || driverVersion == 0) return fail("no NVIDIA driver found");
  int runtimeVersion = 0;
  cudaRuntimeGetVersion(&runtimeVersion);
  const std::string tooOld = "driver too old (driver supports CUDA " + versionString(driverVersion) +
                             ", runtime needs " + versionString(runtimeVersion) + ")";
  // Within one major version a newer runtime may run on an older driver (minor version
  // compatibility), so only a lower major version is refused outright.
  if (driverVersion / 1000 < runtimeVersion / 1000) return fail(tooOld);

  int count = 0;
  const cudaError_t cerr = cudaGetDeviceCount(&count);
  if (cerr == cudaErrorNoDevice || (cerr == cudaSuccess && count == 0)) return fail("no CUDA device found");
  if (cerr == cudaErrorInsufficientDriver) return fail(tooOld);
  if (cerr != cudaSuccess) return fail(errorText(cerr));

  // The kernels are built for particular architectures: check that one of them can run here.
  cudaFuncAttributes attr;
  const cudaError_t ferr = cudaFuncGetAttributes(&attr, convertKernel<float, float>);
  if (ferr == cudaErrorNoKernelImageForDevice || ferr == cudaErrorInvalidDeviceFunction) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return fail("this build has no kernels for the GPU's compute capability " + std::to_string(major) + "." +
                std::to_string(minor));
  }
  if (ferr == cudaErrorInsufficientDriver) return fail(tooOld);
  if (ferr != cudaSuccess) return fail(errorText(ferr));
  if (reason != nullptr) reason->clear();
  return true;
}

Status deviceProperties(DeviceProps* out) {
  if (out == nullptr) return statusError("deviceProperties: null output");
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  cudaDeviceProp p;
  RK_CUDA_TRY(cudaGetDeviceProperties(&p, dev));
  out->name = p.name;
  out->major = p.major;
  out->minor = p.minor;
  out->multiProcessorCount = p.multiProcessorCount;
  out->totalGlobalMem = p.totalGlobalMem;
  out->l2CacheSize = static_cast<size_t>(p.l2CacheSize);
  out->sharedMemPerBlockOptin = p.sharedMemPerBlockOptin;
  out->memoryBusWidth = p.memoryBusWidth;
  // cudaDeviceProp lost memoryClockRate in CUDA 13; the attribute remains.
  int clockKHz = 0;
  RK_CUDA_TRY(cudaDeviceGetAttribute(&clockKHz, cudaDevAttrMemoryClockRate, dev));
  out->memoryClockRateKHz = clockKHz;
  RK_CUDA_TRY(cudaDriverGetVersion(&out->driverVersion));
  RK_CUDA_TRY(cudaRuntimeGetVersion(&out->runtimeVersion));
  return Status{};
}

// RK_CUDA_TUNE, read once: "name=value" pairs separated by commas, kept for the pinnable names.
int pinnedPath(const char* name) {
  static const std::map<std::string, int> pins = [] {
    std::map<std::string, int> out;
    const char* env = std::getenv("RK_CUDA_TUNE");
    const std::string all = env ? env : "";
    for (size_t at = 0; at < all.size();) {
      const size_t end = std::min(all.find(',', at), all.size());
      const std::string item = all.substr(at, end - at);
      const size_t eq = item.find('=');
      at = end + 1;
      if (eq == std::string::npos) continue;
      const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
      if (key != "fusedRnn.path" && key != "gatedDeltaRule.forwardPath" && key != "gatedDeltaRule.backwardPath")
        continue;
      char* stop = nullptr;
      const long v = std::strtol(value.c_str(), &stop, 10);
      if (!value.empty() && *stop == '\0' && v >= 0 && v <= 16) out[key] = static_cast<int>(v);
    }
    return out;
  }();
  const auto it = pins.find(name);
  return it == pins.end() ? -1 : it->second;
}

// Once per device: its default memory pool keeps freed memory for the next allocation instead of
// returning it to the driver at every synchronisation (a release threshold of 0, the default, makes
// each call after a sync map its outputs and scratch afresh). cudaMemPoolTrimTo or process exit
// give it back.
static Status keepPoolMemory() {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices || done[dev].load(std::memory_order_acquire)) return Status{};
  cudaMemPool_t pool = nullptr;
  RK_CUDA_TRY(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t threshold = UINT64_MAX;
  RK_CUDA_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  done[dev].store(true, std::memory_order_release);
  return Status{};
}

Status deviceMalloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return statusError("deviceMalloc: null output");
  *ptr = nullptr;
  if (bytes == 0) return Status{};
  RK_TRY(keepPoolMemory());
  void* p = nullptr;
  RK_CUDA_TRY(cudaMallocAsync(&p, bytes, 0));
  *ptr = p;
  return Status{};
}

Status deviceFree(void* ptr) {
  if (ptr == nullptr) return Status{};
  RK_CUDA_TRY(cudaFreeAsync(ptr, 0));
  return Status{};
}

Status copyHostToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status{};
  RK_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return Status{};
}

Status copyDeviceToHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status{};
  RK_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  return Status{};
}

Status copyDeviceToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status{};
  RK_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
  return Status{};
}

Status synchronize() {
  RK_CUDA_TRY(cudaDeviceSynchronize());
  return Status{};
}

Status convert(DType from, const void* src, DType to, void* dst, int64_t n) {
  if (n < 0) return statusError("convert: negative size");
  if (n == 0) return Status{};
  if (from == to) {
    RK_CUDA_TRY(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * dtypeSize(from), cudaMemcpyDeviceToDevice, 0));
    return Status{};
  }
  return dispatchDType(from, [&](auto fromTag) -> Status {
    using S = typename decltype(fromTag)::type;
    return dispatchDType(to, [&](auto toTag) -> Status {
      using D = typename decltype(toTag)::type;
      constexpr int kThreads = 256;
      const int64_t wanted = (n + kThreads - 1) / kThreads;
      const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);  // then grid-stride
      return launch(convertKernel<S, D>, blocks, kThreads, 0, static_cast<const S*>(src), static_cast<D*>(dst), n);
    });
  });
}

Status eventRecordStart(void** ev) {
  if (ev == nullptr) return statusError("eventRecordStart: null output");
  *ev = nullptr;
  cudaEvent_t start = nullptr;
  RK_CUDA_TRY(cudaEventCreate(&start));
  const cudaError_t err = cudaEventRecord(start, 0);
  if (err != cudaSuccess) {
    cudaEventDestroy(start);
    return statusFromCuda(err);
  }
  *ev = start;
  return Status{};
}

Status eventRecord(void** ev) {
  if (ev == nullptr) return statusError("eventRecord: null output");
  *ev = nullptr;
  cudaEvent_t e = nullptr;
  RK_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  const cudaError_t err = cudaEventRecord(e, 0);
  if (err != cudaSuccess) {
    cudaEventDestroy(e);
    return statusFromCuda(err);
  }
  *ev = e;
  return Status{};
}

Status eventWait(void* ev) {
  if (ev == nullptr) return statusError("eventWait: null event");
  cudaEvent_t e = static_cast<cudaEvent_t>(ev);
  const cudaError_t err = cudaEventSynchronize(e);
  cudaEventDestroy(e);
  return err == cudaSuccess ? Status{} : statusFromCuda(err);
}

Status eventElapsedMs(void* startEv, float* ms) {
  if (startEv == nullptr) return statusError("eventElapsedMs: null start event");
  cudaEvent_t start = static_cast<cudaEvent_t>(startEv);
  cudaEvent_t stop = nullptr;
  cudaError_t err = cudaEventCreate(&stop);
  if (err == cudaSuccess) err = cudaEventRecord(stop, 0);
  if (err == cudaSuccess) err = cudaEventSynchronize(stop);
  float elapsed = 0.0f;
  if (err == cudaSuccess) err = cudaEventElapsedTime(&elapsed, start, stop);
  if (stop != nullptr) cudaEventDestroy(stop);
  cudaEventDestroy(start);
  if (err != cudaSuccess) return statusFromCuda(err);
  if (ms != nullptr) *ms = elapsed;
  return Status{};
}

}  // namespace rkcuda
