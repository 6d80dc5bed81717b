// Picks the instruction-set variant of the Newton RNN's CPU kernels per call (common/isa.h).
#include "ops/newton/newton_rnn_cpu.h"

namespace rk::newton {

void newtonRnnForwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnOutputs& o) {
  RK_ISA_DISPATCH(newton, forward, (a, o));
}

void newtonRnnBackwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnGrads& g) {
  RK_ISA_DISPATCH(newton, backward, (a, g));
}

}  // namespace rk::newton
