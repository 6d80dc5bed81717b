// Mamba-2's vectorised CPU kernels, base variant (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/ssd/mamba2_scan_cpu.inc"
