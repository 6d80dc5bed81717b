// The fused cells' CPU forward pass, base variant, fp32 storage (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/cells/fused_rnn_cpu_fwd.inc"
