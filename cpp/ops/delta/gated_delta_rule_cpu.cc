// Picks the instruction-set variant of the gated delta rule's CPU kernels per call (common/isa.h).
#include "ops/delta/gated_delta_rule_cpu.h"

namespace rk::delta {

void gatedDeltaRuleForwardCpu(const rkcuda::GatedDeltaRuleArgs& a, void* o, float* states, float* finalState) {
  RK_ISA_DISPATCH(delta, gatedDeltaRuleForwardCpu, (a, o, states, finalState));
}

void gatedDeltaRuleBackwardCpu(const rkcuda::GatedDeltaRuleArgs& a, const rkcuda::GatedDeltaRuleGrads& g) {
  RK_ISA_DISPATCH(delta, gatedDeltaRuleBackwardCpu, (a, g));
}

void gatedDeltaRuleStepCpu(const rkcuda::GatedDeltaRuleStepArgs& a) {
  RK_ISA_DISPATCH(delta, gatedDeltaRuleStepCpu, (a));
}

}  // namespace rk::delta
