// Picks the instruction-set variant of the fused cells' CPU kernels per call (common/isa.h).
#include "ops/cells/fused_rnn_cpu.h"

namespace rk::cells {

void fusedRnnForwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o) {
  RK_ISA_DISPATCH(cells, fusedRnnForwardCpu, (a, o));
}

void fusedRnnBackwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g) {
  RK_ISA_DISPATCH(cells, fusedRnnBackwardCpu, (a, g));
}

}  // namespace rk::cells
