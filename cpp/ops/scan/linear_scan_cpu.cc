// Picks the instruction-set variant of the linear scan's CPU kernels per call (common/isa.h).
#include "ops/scan/linear_scan_cpu.h"

namespace rk::scan {

void linearScanForwardCpu(DType dt, const void* a, const void* b, const float* h0, void* h, float* finalState,
                          const LinearScanShape& s) {
  RK_ISA_DISPATCH(scan, linearScanForwardCpu, (dt, a, b, h0, h, finalState, s));
}

void linearScanBackwardCpu(DType dt, const void* a, const void* h, const float* h0, const void* gh, const float* gFinal,
                           void* ga, void* gb, float* gh0, const LinearScanShape& s) {
  RK_ISA_DISPATCH(scan, linearScanBackwardCpu, (dt, a, h, h0, gh, gFinal, ga, gb, gh0, s));
}

}  // namespace rk::scan
