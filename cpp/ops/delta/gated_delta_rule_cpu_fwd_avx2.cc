// The gated delta rule's CPU forward pass and decode step, avx2 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 1
#include "ops/delta/gated_delta_rule_cpu_fwd.inc"
#endif
