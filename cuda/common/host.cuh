// Host-side helpers shared by the launchers: stream-ordered scratch memory, device attributes, and
// the sequence table of a (possibly packed) batch, checked and copied to the device.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/api.h"
#include "common/check.cuh"

namespace rkcuda {

// Stream-ordered device memory, freed (stream-ordered) when it goes out of scope.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, 0);
  }
  Status allocate(size_t bytes) {
    RK_CUDA_TRY(cudaMallocAsync(&ptr_, bytes, 0));
    return Status{};
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

// An attribute of the current device.
inline Status deviceAttribute(cudaDeviceAttr attr, int* value) {
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  RK_CUDA_TRY(cudaDeviceGetAttribute(value, attr, dev));
  return Status{};
}

inline Status zeroFloats(float* p, int64_t n) {
  if (p != nullptr && n > 0) RK_CUDA_TRY(cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(float), 0));
  return Status{};
}

// Checks a sequence table against the contract of api.h (so that no kernel can go out of bounds):
// without packing, nseq == batch and sequence s is row s, whole; packed, batch is 1 and the
// sequences lie in order in row 0 without overlapping. chunkOffset and totalChunks must count chunks
// of `chunk` positions. Appends the (start, length) ranges of positions in no sequence to *gaps.
inline Status checkSequences(const ScanSegment* segments, int64_t nseq, int64_t batch, int64_t length, bool packed,
                             int64_t chunk, int64_t totalChunks, const std::string& fn, std::vector<int64_t>* gaps) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (nseq < 0) return bad("negative nseq");
  if (nseq > 0 && segments == nullptr) return bad("null sequence table");
  if (packed) {
    if (batch != 1) return bad("packed sequences need batch 1");
  } else if (nseq != batch) {
    return bad("nseq must equal batch without packing");
  }
  int64_t chunks = 0, covered = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    const ScanSegment& seg = segments[s];
    if (seg.length < 0 || seg.start < 0 || seg.start > length || seg.length > length - seg.start)
      return bad("sequence " + std::to_string(s) + " is out of range");
    if (packed) {
      if (seg.batch != 0) return bad("packed sequences live in row 0");
      if (seg.start < covered) return bad("packed sequences must be in order and not overlap");
      if (seg.start > covered) gaps->insert(gaps->end(), {covered, seg.start - covered});
      covered = seg.start + seg.length;
    } else if (seg.batch != s || seg.start != 0 || seg.length != length) {
      return bad("without packing, sequence s must be row s, whole");
    }
    if (seg.chunkOffset != chunks) return bad("sequence " + std::to_string(s) + " has the wrong chunkOffset");
    chunks += (seg.length + chunk - 1) / chunk;
  }
  if (packed && covered < length) gaps->insert(gaps->end(), {covered, length - covered});
  if (totalChunks != chunks) return bad("totalChunks does not match the sequences");
  return Status{};
}

// Device copy of a packed sequence table followed by its gap list (both null without packing).
inline Status uploadSequences(const ScanSegment* table, int64_t nseq, bool packed, const std::vector<int64_t>& gaps,
                              DeviceBuffer* buffer, const ScanSegment** segments, const int64_t** gapList) {
  *segments = nullptr;
  *gapList = nullptr;
  if (!packed || (nseq == 0 && gaps.empty())) return Status{};
  static_assert(sizeof(ScanSegment) == 4 * sizeof(int64_t), "ScanSegment is four int64");
  std::vector<int64_t> host(static_cast<size_t>(nseq) * 4 + gaps.size());
  for (int64_t s = 0; s < nseq; ++s) {
    const ScanSegment& seg = table[s];
    host[4 * s] = seg.batch;
    host[4 * s + 1] = seg.start;
    host[4 * s + 2] = seg.length;
    host[4 * s + 3] = seg.chunkOffset;
  }
  std::copy(gaps.begin(), gaps.end(), host.begin() + 4 * nseq);
  const size_t bytes = host.size() * sizeof(int64_t);
  RK_TRY(buffer->allocate(bytes));
  RK_CUDA_TRY(cudaMemcpyAsync(buffer->get(), host.data(), bytes, cudaMemcpyHostToDevice, 0));
  int64_t* base = static_cast<int64_t*>(buffer->get());
  *segments = reinterpret_cast<const ScanSegment*>(base);
  *gapList = base + 4 * nseq;
  return Status{};
}

}  // namespace rkcuda
