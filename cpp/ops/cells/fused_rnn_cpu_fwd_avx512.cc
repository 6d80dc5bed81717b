// The fused cells' CPU forward pass, avx512 variant, fp32 storage (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 2
#include "ops/cells/fused_rnn_cpu_fwd.inc"
#endif
