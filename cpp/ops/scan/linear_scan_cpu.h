// CPU linear scan, h_t = a_t * h_{t-1} + b_t, over rows of a [rows, length] array, fp32 state:
// forward and backward, per instruction-set variant (linear_scan_cpu.inc, compiled once per variant;
// linear_scan_cpu.cc picks one per call).
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "common/dtype.h"

namespace rk::scan {

struct LinearScanShape {
  int64_t rows = 0, length = 0;
  bool reverse = false;
};

// a, b, h, gh, ga, gb: [rows, length] of dtype dt; h0, finalState, gFinal, gh0: [rows] fp32 (each
// optional but a, b, h, ga, gb).
void linearScanForwardCpu(DType dt, const void* a, const void* b, const float* h0, void* h, float* finalState,
                          const LinearScanShape& s);
void linearScanBackwardCpu(DType dt, const void* a, const void* h, const float* h0, const void* gh, const float* gFinal,
                           void* ga, void* gb, float* gh0, const LinearScanShape& s);

#define RK_LINEAR_SCAN_VARIANT_API(NS)                                                                           \
  namespace NS {                                                                                                 \
  void linearScanForwardCpu(DType dt, const void* a, const void* b, const float* h0, void* h, float* finalState, \
                            const LinearScanShape& s);                                                           \
  void linearScanBackwardCpu(DType dt, const void* a, const void* h, const float* h0, const void* gh,            \
                             const float* gFinal, void* ga, void* gb, float* gh0, const LinearScanShape& s);     \
  }
RK_FOR_EACH_ISA(RK_LINEAR_SCAN_VARIANT_API)
#undef RK_LINEAR_SCAN_VARIANT_API

}  // namespace rk::scan
