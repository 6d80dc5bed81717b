// Mamba-2's vectorised CPU kernels, avx512 variant (see common/isa.h).
#include "common/isa.h"
#ifdef RK_X86_VARIANTS
#define RK_ISA_LEVEL 2
#include "ops/ssd/mamba2_scan_cpu.inc"
#endif
