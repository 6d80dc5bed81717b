// The fused cells' CPU forward pass, base variant, fp16 and bf16 storage (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#define RK_CELLS_16BIT 1
#include "ops/cells/fused_rnn_cpu_fwd.inc"
