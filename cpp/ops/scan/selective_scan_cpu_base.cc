// The selective scan's CPU kernels, base variant (see common/isa.h).
#include "common/isa.h"

#define RK_ISA_LEVEL 0
#include "ops/scan/selective_scan_cpu.inc"
