// The causal convolution's CPU kernels, base variant (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/conv/causal_conv1d_cpu.inc"
