// The gated delta rule's CPU backward pass, base variant (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/delta/gated_delta_rule_cpu_bwd.inc"
