// Plain C++ interface between cpp/ (N-API, compiled by the host compiler) and cuda/ (compiled by
// nvcc). Nothing here names a CUDA type, so cpp/ builds without the CUDA headers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace rkcuda {

// Element type of a tensor's storage. State and accumulation are always fp32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Result of every call into cuda/. code 0 means success; otherwise message holds the CUDA error
// string and outOfMemory tells the caller to raise ERR_OUT_OF_MEMORY instead of ERR_CUDA.
struct Status {
  int code = 0;
  bool outOfMemory = false;
  std::string message;
  bool ok() const { return code == 0; }
};

// ---- runtime (cuda/common/runtime.cu) ----
// Whether a usable device exists; when not, reason says why (no driver, no device, driver too old).
bool available(std::string* reason);
struct DeviceProps {
  std::string name;
  int major = 0, minor = 0;
  int multiProcessorCount = 0;
  size_t totalGlobalMem = 0;
  size_t l2CacheSize = 0;
  size_t sharedMemPerBlockOptin = 0;
  int memoryBusWidth = 0;       // bits
  int memoryClockRateKHz = 0;
  int driverVersion = 0, runtimeVersion = 0;
};
Status deviceProperties(DeviceProps* out);
Status deviceMalloc(void** ptr, size_t bytes);   // stream-ordered on the default stream
Status deviceFree(void* ptr);                    // stream-ordered on the default stream
Status copyHostToDevice(void* dst, const void* src, size_t bytes);
Status copyDeviceToHost(void* dst, const void* src, size_t bytes);  // synchronises
Status copyDeviceToDevice(void* dst, const void* src, size_t bytes);
Status synchronize();
// Convert n elements between dtypes on the device (either side may be F32/F16/BF16).
Status convert(DType from, const void* src, DType to, void* dst, int64_t n);
// Event timing for benchmarks: elapsed milliseconds of fn's launches, measured with CUDA events.
Status eventRecordStart(void** ev);
Status eventElapsedMs(void* startEv, float* ms);  // records a stop event, synchronises, destroys

// ---- linear scan (cuda/scan/linear_scan.cu) ----
// rows independent sequences of `length` elements each, row-major contiguous [rows, length].
// Forward:  h_t = a_t * h_{t-1} + b_t  (t ascending; descending when reverse), h_{-1} = h0[row]
//           (0 when h0 is null). h has the dtype of a and b; finalState (nullable) is fp32 [rows].
// Outputs must not overlap the [rows, length] inputs; h0 and finalState may be the same buffer
// (likewise gFinal and gh0 below). Fastest when length is a multiple of 16 bytes' worth of
// elements and the tensors are 16-byte aligned (otherwise a per-element path is used).
// Asynchronous on the default stream, like every kernel launch here.
Status linearScanForward(DType dt, const void* a, const void* b, const float* h0, void* h,
                         float* finalState, int64_t rows, int64_t length, bool reverse);
// Backward of the above; "first", "last" and "t+1" are in scan order (t descending when
// reverse). gh (nullable: treated as zeros) is dL/dh, gFinal (nullable) dL/dfinalState.
// With g_t = dL/dh_t in total (g_last = gh_last + gFinal, g_t = gh_t + a_{t+1} g_{t+1}):
//   gb_t = g_t,  ga_t = g_t * h_{t-1},  gh0 = a_first * g_first (nullable output).
// h is the forward output, h0 the forward initial state (nullable). ga, gb have dtype dt.
Status linearScanBackward(DType dt, const void* a, const void* h, const float* h0, const void* gh,
                          const float* gFinal, void* ga, void* gb, float* gh0, int64_t rows,
                          int64_t length, bool reverse);

}  // namespace rkcuda
