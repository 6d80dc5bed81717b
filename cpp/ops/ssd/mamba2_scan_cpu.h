// CPU kernels of Mamba-2 (cuda/ssd/mamba2_scan.h): the elementwise time step and output gate around the
// scan (which runs on linear attention's kernels), the state transposes and the fused decode step.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/isa.h"
#include "common/parallel.h"
#include "cuda/ssd/mamba2_scan.h"
#include "common/dtype.h"

namespace rk::ssd {

using rkcuda::Mamba2GateArgs;
using rkcuda::Mamba2StepArgs;

// Rows per parallel range of the elementwise kernels: about 16k elements.
inline int64_t rowGrain(const Mamba2GateArgs& a) { return grainFor(double(a.H * a.P), 1 << 14); }

// The effective time step of (row, h) -- dt + dtBias, softplus (the value itself above 20), clamp --
// and its derivative with respect to dt (0 outside the clamp's open interval).
struct TimeStep {
  float d, grad;
};
template <class S> TimeStep timeStep(const Mamba2GateArgs& a, const S* dt, int64_t row, int64_t h) {
  float d = Storage<S>::load(dt[row * a.H + h]) + (a.dtBias ? a.dtBias[h] : 0.0f);
  float grad = 1.0f;
  if (a.dtSoftplus && d <= 20.0f) {
    grad = 1.0f / (1.0f + std::exp(-d));
    d = std::log1p(std::exp(d));
  }
  if (a.clamp) {
    if (!(d > a.dtMin && d < a.dtMax)) grad = 0.0f;
    d = std::min(std::max(d, a.dtMin), a.dtMax);
  }
  return {d, grad};
}

void mamba2PrepareCpu(const Mamba2GateArgs& a, float* g, void* v);
void mamba2FinishCpu(const Mamba2GateArgs& a, const void* o, void* y);
void mamba2FinishBackwardCpu(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz);
void mamba2PrepareBackwardCpu(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                              void* ddt, float* dA, float* dDtBias, float* dD);
void mamba2TransposeStatesCpu(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols);
void mamba2StepCpu(const Mamba2StepArgs& a, void* y);

// The output gate, the time step's backward and the decode step are vectorised per instruction-set
// variant (mamba2_scan_cpu.inc).
#define RK_SSD_VARIANT_API(NS)                                                                                      \
  namespace NS {                                                                                                    \
  void mamba2FinishCpu(const Mamba2GateArgs& a, const void* o, void* y);                                            \
  void mamba2FinishBackwardCpu(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz);         \
  void mamba2PrepareBackwardCpu(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx, \
                                void* ddt, float* dA, float* dDtBias, float* dD);                                   \
  void mamba2StepCpu(const Mamba2StepArgs& s, void* y);                                                             \
  }
RK_FOR_EACH_ISA(RK_SSD_VARIANT_API)
#undef RK_SSD_VARIANT_API

}  // namespace rk::ssd
