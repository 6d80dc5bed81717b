// CPU Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): forward (Newton iterations with the
// convergence check, damping and the sequential fallback, or plain sequential evaluation) and the
// backward at the solution, implementing the contract of cuda/common/api.h (NewtonRnnArgs and friends).
#pragma once
#include <cstdint>

#include "cuda/common/api.h"

namespace rk::newton {

// Channels of one work item of the diagonal cells (the dense cells' items are one head each).
constexpr int64_t kNewtonChannelChunk = 64;

void newtonRnnForwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnOutputs& o);
void newtonRnnBackwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnGrads& g);

}  // namespace rk::newton
