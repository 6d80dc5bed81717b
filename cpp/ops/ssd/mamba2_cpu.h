// CPU kernels of Mamba-2 (cuda/ssd/mamba2.h): the elementwise gate and output around the scan (which
// runs on linear attention's kernels), the state transposes and the fused decode step.
#pragma once
#include <cstdint>

#include "cuda/ssd/mamba2.h"

namespace rk::ssd {

using rkcuda::Mamba2GateArgs;
using rkcuda::Mamba2StepArgs;

void mamba2PrepareCpu(const Mamba2GateArgs& a, float* g, void* v);
void mamba2FinishCpu(const Mamba2GateArgs& a, const void* o, void* y);
void mamba2FinishBackwardCpu(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz);
void mamba2PrepareBackwardCpu(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                              void* ddt, float* dA, float* dDtBias, float* dD);
void mamba2TransposeStatesCpu(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols);
void mamba2StepCpu(const Mamba2StepArgs& a, void* y);

}  // namespace rk::ssd
