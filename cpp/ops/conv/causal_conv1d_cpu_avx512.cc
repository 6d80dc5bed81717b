// The causal convolution's CPU kernels, avx512 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 2
#include "ops/conv/causal_conv1d_cpu.inc"
#endif
