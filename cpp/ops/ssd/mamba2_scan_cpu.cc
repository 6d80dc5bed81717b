// CPU kernels of Mamba-2 (cuda/ssd/mamba2_scan.h): the time step's forward and the state transposes,
// compiled once (elementwise, a few bytes per flop; the loops vectorised by the compiler); the rest
// per instruction-set variant in mamba2_scan_cpu.inc, picked here per call.
#include "ops/ssd/mamba2_scan_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "common/dtype.h"

namespace rk::ssd {

void mamba2PrepareCpu(const Mamba2GateArgs& a, float* g, void* v) {
  dispatchDType(a.dt, [&](auto tag) {
    using S = decltype(tag);
    const S* x = static_cast<const S*>(a.x);
    const S* dt = static_cast<const S*>(a.dtIn);
    S* out = static_cast<S*>(v);
    parallelFor(a.rows, rowGrain(a), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t h = 0; h < a.H; ++h) {
          const float d = timeStep(a, dt, r, h).d;
          g[r * a.H + h] = d * a.A[h];
          const int64_t base = (r * a.H + h) * a.P;
          for (int64_t p = 0; p < a.P; ++p) out[base + p] = Storage<S>::store(d * Storage<S>::load(x[base + p]));
        }
    });
  });
}

void mamba2FinishCpu(const Mamba2GateArgs& a, const void* o, void* y) {
  RK_ISA_DISPATCH(ssd, mamba2FinishCpu, (a, o, y));
}

void mamba2FinishBackwardCpu(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz) {
  RK_ISA_DISPATCH(ssd, mamba2FinishBackwardCpu, (a, o, dy, dO, dz));
}

void mamba2PrepareBackwardCpu(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                              void* ddt, float* dA, float* dDtBias, float* dD) {
  RK_ISA_DISPATCH(ssd, mamba2PrepareBackwardCpu, (a, dO, dv, dg, dx, ddt, dA, dDtBias, dD));
}

void mamba2TransposeStatesCpu(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols) {
  parallelFor(count, grainFor(double(rows * cols), 1 << 15), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* s = src + m * rows * cols;
      float* d = dst + m * rows * cols;
      // Tiles of 8 x 8 keep both sides' lines in cache.
      for (int64_t r0 = 0; r0 < rows; r0 += 8)
        for (int64_t c0 = 0; c0 < cols; c0 += 8)
          for (int64_t r = r0; r < std::min(rows, r0 + 8); ++r)
            for (int64_t c = c0; c < std::min(cols, c0 + 8); ++c) d[c * rows + r] = s[r * cols + c];
    }
  });
}

void mamba2StepCpu(const Mamba2StepArgs& s, void* y) { RK_ISA_DISPATCH(ssd, mamba2StepCpu, (s, y)); }

}  // namespace rk::ssd
