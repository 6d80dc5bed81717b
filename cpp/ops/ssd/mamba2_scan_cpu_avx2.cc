// Mamba-2's vectorised CPU kernels, avx2 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 1
#include "ops/ssd/mamba2_scan_cpu.inc"
#endif
