// Picks the instruction-set variant of the gated delta rule's CPU kernels per call (common/isa.h).
#include "ops/delta/gated_delta_rule_cpu.h"

namespace rk::delta {

void gatedDeltaForwardCpu(const rkcuda::GatedDeltaArgs& a, void* o, float* states, float* finalState) {
  RK_ISA_DISPATCH(delta, gatedDeltaForwardCpu, (a, o, states, finalState));
}

void gatedDeltaBackwardCpu(const rkcuda::GatedDeltaArgs& a, const rkcuda::GatedDeltaGrads& g) {
  RK_ISA_DISPATCH(delta, gatedDeltaBackwardCpu, (a, g));
}

void gatedDeltaStepCpu(const rkcuda::GatedDeltaStepArgs& a) { RK_ISA_DISPATCH(delta, gatedDeltaStepCpu, (a)); }

}  // namespace rk::delta
