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
  int memoryBusWidth = 0;  // bits
  int memoryClockRateKHz = 0;
  int driverVersion = 0, runtimeVersion = 0;
};
Status deviceProperties(DeviceProps* out);
Status deviceMalloc(void** ptr, size_t bytes);  // stream-ordered on the default stream
Status deviceFree(void* ptr);                   // stream-ordered on the default stream
Status copyHostToDevice(void* dst, const void* src, size_t bytes);
Status copyDeviceToHost(void* dst, const void* src, size_t bytes);  // synchronises
Status copyDeviceToDevice(void* dst, const void* src, size_t bytes);
Status synchronize();
// Convert n elements between dtypes on the device (either side may be F32/F16/BF16).
Status convert(DType from, const void* src, DType to, void* dst, int64_t n);
// Event timing for benchmarks: elapsed milliseconds of fn's launches, measured with CUDA events.
Status eventRecordStart(void** ev);
Status eventElapsedMs(void* startEv, float* ms);  // records a stop event, synchronises, destroys
// Completion of the work queued so far (for the Promise form of the calls): eventRecord marks it on
// the default stream; eventWait blocks the calling thread until it is done, then destroys the event.
Status eventRecord(void** ev);
Status eventWait(void* ev);

// ---- sequences of a batch (the scans and the delta rule) ----
// Where sequence s of a (possibly packed) batch lives: row `batch` of the tensors, positions
// [start, start + length); chunkOffset counts the checkpoint chunks of the sequences before it (see
// the ops' headers, e.g. cuda/scan/selective_scan.h).
struct ScanSegment {
  int64_t batch = 0, start = 0, length = 0, chunkOffset = 0;
};

// Each op's contract (its argument structs and entry points) is in its own header:
// cuda/scan/linear_scan.h, cuda/scan/selective_scan.h, cuda/delta/gated_delta_rule.h,
// cuda/cells/fused_rnn.h, cuda/newton/newton_rnn.h.

}  // namespace rkcuda
