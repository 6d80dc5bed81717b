// Picks the instruction-set variant of the causal convolution's CPU kernels per call (common/isa.h).
#include "ops/conv/causal_conv1d_cpu.h"

namespace rk::conv {

void causalConv1dForwardCpu(const rkcuda::CausalConv1dArgs& a, void* y, void* finalState) {
  RK_ISA_DISPATCH(conv, causalConv1dForwardCpu, (a, y, finalState));
}

void causalConv1dBackwardCpu(const rkcuda::CausalConv1dArgs& a, const rkcuda::CausalConv1dGrads& g) {
  RK_ISA_DISPATCH(conv, causalConv1dBackwardCpu, (a, g));
}

}  // namespace rk::conv
