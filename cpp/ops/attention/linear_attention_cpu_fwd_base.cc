// The linear attention's CPU forward pass, base variant (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/attention/linear_attention_cpu_fwd.inc"
