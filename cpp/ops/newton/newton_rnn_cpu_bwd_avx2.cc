// The Newton RNN's CPU backward pass, avx2 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 1
#include "ops/newton/newton_rnn_cpu_bwd.inc"
#endif
