// Picks the instruction-set variant of the selective scan's CPU kernels per call (common/isa.h).
#include "ops/scan/selective_scan_cpu.h"

namespace rk::scan {

void selectiveScanForwardCpu(const rkcuda::SelectiveScanArgs& a, void* y, float* states, float* finalState) {
  RK_ISA_DISPATCH(scan, selectiveScanForwardCpu, (a, y, states, finalState));
}

void selectiveScanBackwardCpu(const rkcuda::SelectiveScanArgs& a, const rkcuda::SelectiveScanGrads& g) {
  RK_ISA_DISPATCH(scan, selectiveScanBackwardCpu, (a, g));
}

void selectiveStateUpdateCpu(const rkcuda::SelectiveStateUpdateArgs& a) {
  RK_ISA_DISPATCH(scan, selectiveStateUpdateCpu, (a));
}

}  // namespace rk::scan
