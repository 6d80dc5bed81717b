// CPU causal depthwise 1-D convolution with carry state (cuda/conv/causal_conv1d.h), forward and
// backward.
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "cuda/conv/causal_conv1d.h"

namespace rk::conv {

// Writes y (every element) and finalState (nullable) and a.windowStates (nullable).
void causalConv1dForwardCpu(const rkcuda::CausalConv1dArgs& a, void* y, void* finalState);
void causalConv1dBackwardCpu(const rkcuda::CausalConv1dArgs& a, const rkcuda::CausalConv1dGrads& g);

#define RK_CONV_VARIANT_API(NS)                                                                        \
  namespace NS {                                                                                       \
  void causalConv1dForwardCpu(const rkcuda::CausalConv1dArgs& a, void* y, void* finalState);           \
  void causalConv1dBackwardCpu(const rkcuda::CausalConv1dArgs& a, const rkcuda::CausalConv1dGrads& g); \
  }
RK_FOR_EACH_ISA(RK_CONV_VARIANT_API)
#undef RK_CONV_VARIANT_API

}  // namespace rk::conv
