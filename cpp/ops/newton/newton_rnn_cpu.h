// CPU Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): forward (Newton iterations with the
// convergence check, damping and the sequential fallback, or plain sequential evaluation) and the
// backward at the solution, implementing the contract of cuda/common/api.h (NewtonRnnArgs and friends).
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "cuda/newton/newton_rnn.h"

namespace rk::newton {

// Channels of one work item of the diagonal cells (the dense cells' items are one head each).
constexpr int64_t kNewtonChannelChunk = 64;

void newtonRnnForwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnOutputs& o);
void newtonRnnBackwardCpu(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnGrads& g);

// The same, per instruction-set variant (newton_rnn_cpu_{fwd,bwd}.inc compiled once per variant).
#define RK_NEWTON_VARIANT_API(NS)                                                  \
  namespace NS {                                                                   \
  void forward(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnOutputs& o); \
  void backward(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnGrads& g);  \
  }
RK_FOR_EACH_ISA(RK_NEWTON_VARIANT_API)
#undef RK_NEWTON_VARIANT_API

}  // namespace rk::newton
