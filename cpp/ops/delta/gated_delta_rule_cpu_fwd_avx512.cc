// The gated delta rule's CPU forward pass and decode step, avx512 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 2
#include "ops/delta/gated_delta_rule_cpu_fwd.inc"
#endif
