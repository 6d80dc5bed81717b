// The Newton RNN's CPU forward pass, avx512 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 2
#include "ops/newton/newton_rnn_cpu_fwd.inc"
#endif
