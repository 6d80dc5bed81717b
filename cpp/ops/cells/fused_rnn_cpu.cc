// Picks the instruction-set variant of the fused cells' CPU kernels per call (common/isa.h).
#include "ops/cells/fused_rnn_cpu.h"

#include "common/dtype.h"

namespace rk::cells {

void fusedRnnForwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o) {
  dispatchDType(a.dt, [&](auto tag) {
    using St = decltype(tag);
    RK_ISA_DISPATCH(cells, fusedRnnForwardAs<St>, (a, o));
  });
}

void fusedRnnBackwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g) {
  dispatchDType(a.dt, [&](auto tag) {
    using St = decltype(tag);
    RK_ISA_DISPATCH(cells, fusedRnnBackwardAs<St>, (a, g));
  });
}

}  // namespace rk::cells
