// CPU kernels of Mamba-2 (cuda/ssd/mamba2.h). Elementwise over rows (positions) and heads, the loops
// over the head dimension vectorised by the compiler; compiled once (no per-ISA variants: they move
// a few bytes per flop). Sums over rows (dA, dD, dtBias) go through fixed blocks of rows summed in
// order, so they give the same bits whatever the thread count.
#include "ops/ssd/mamba2_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "tensor/dtype.h"

namespace rk::ssd {
namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The effective time step of (row, h), and its derivative with respect to dt.
struct Step {
  float d, grad;
};
template <class S> Step timeStep(const Mamba2GateArgs& a, const S* dt, int64_t row, int64_t h) {
  float d = Storage<S>::load(dt[row * a.H + h]) + (a.dtBias ? a.dtBias[h] : 0.0f);
  float grad = 1.0f;
  if (a.dtSoftplus && d <= 20.0f) {
    grad = sigmoid(d);
    d = std::log1p(std::exp(d));
  }
  if (a.clamp) {
    if (!(d > a.dtMin && d < a.dtMax)) grad = 0.0f;
    d = std::min(std::max(d, a.dtMin), a.dtMax);
  }
  return {d, grad};
}

inline float skip(const Mamba2GateArgs& a, int64_t h, int64_t p) {
  return a.D ? a.D[a.dPerChannel ? h * a.P + p : h] : 0.0f;
}

// Rows per parallel range: about 16k elements.
int64_t rowGrain(const Mamba2GateArgs& a) { return grainFor(double(a.H * a.P), 1 << 14); }

// Rows per block of the sums over rows (fixed: the sums do not depend on the thread count).
constexpr int64_t kSumRows = 256;

}  // namespace

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
  dispatchDType(a.dt, [&](auto tag) {
    using S = decltype(tag);
    const S *x = static_cast<const S*>(a.x), *z = static_cast<const S*>(a.z), *os = static_cast<const S*>(o);
    S* out = static_cast<S*>(y);
    parallelFor(a.rows, rowGrain(a), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t h = 0; h < a.H; ++h) {
          const int64_t base = (r * a.H + h) * a.P;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t e = base + p;
            float yv = Storage<S>::load(os[e]) + skip(a, h, p) * Storage<S>::load(x[e]);
            if (z) {
              const float zv = Storage<S>::load(z[e]);
              yv *= zv * sigmoid(zv);
            }
            out[e] = Storage<S>::store(yv);
          }
        }
    });
  });
}

void mamba2FinishBackwardCpu(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz) {
  dispatchDType(a.dt, [&](auto tag) {
    using S = decltype(tag);
    const S *x = static_cast<const S*>(a.x), *z = static_cast<const S*>(a.z), *os = static_cast<const S*>(o),
            *dys = static_cast<const S*>(dy);
    S *dOs = static_cast<S*>(dO), *dzs = static_cast<S*>(dz);
    parallelFor(a.rows, rowGrain(a), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t h = 0; h < a.H; ++h) {
          const int64_t base = (r * a.H + h) * a.P;
          for (int64_t p = 0; p < a.P; ++p) {
            const int64_t e = base + p;
            const float yPre = Storage<S>::load(os[e]) + skip(a, h, p) * Storage<S>::load(x[e]);
            const float zv = Storage<S>::load(z[e]), s = sigmoid(zv), g = Storage<S>::load(dys[e]);
            dOs[e] = Storage<S>::store(g * zv * s);
            dzs[e] = Storage<S>::store(g * yPre * s * (1.0f + zv * (1.0f - s)));
          }
        }
    });
  });
}

void mamba2PrepareBackwardCpu(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                              void* ddt, float* dA, float* dDtBias, float* dD) {
  const int64_t blocks = (a.rows + kSumRows - 1) / kSumRows;
  const int64_t dWidth = a.dPerChannel ? a.H * a.P : a.H;
  const bool wantD = a.D && dD && dO;
  // Per block of rows: the partial sums of dA, dDtBias and dD (H, H and dWidth of them).
  const int64_t width = 2 * a.H + (wantD ? dWidth : 0);
  std::vector<double> partial(size_t(blocks * width), 0.0);
  dispatchDType(a.dt, [&](auto tag) {
    using S = decltype(tag);
    const S *x = static_cast<const S*>(a.x), *dt = static_cast<const S*>(a.dtIn), *dOs = static_cast<const S*>(dO),
            *dvs = static_cast<const S*>(dv);
    S *dxs = static_cast<S*>(dx), *ddts = static_cast<S*>(ddt);
    parallelFor(blocks, grainFor(double(kSumRows * a.H * a.P), 1 << 14), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* sums = partial.data() + b * width;
        for (int64_t r = b * kSumRows; r < std::min(a.rows, (b + 1) * kSumRows); ++r)
          for (int64_t h = 0; h < a.H; ++h) {
            const Step st = timeStep(a, dt, r, h);
            const int64_t base = (r * a.H + h) * a.P;
            float dd = dg[r * a.H + h] * a.A[h];
            for (int64_t p = 0; p < a.P; ++p) {
              const int64_t e = base + p;
              const float xv = Storage<S>::load(x[e]), dvv = Storage<S>::load(dvs[e]);
              dd += dvv * xv;
              float dxv = dvv * st.d;
              if (a.D && dOs) {
                const float dOv = Storage<S>::load(dOs[e]);
                dxv += skip(a, h, p) * dOv;
                if (wantD) sums[2 * a.H + (a.dPerChannel ? h * a.P + p : h)] += double(dOv) * xv;
              }
              dxs[e] = Storage<S>::store(dxv);
            }
            const float ddtv = dd * st.grad;
            ddts[r * a.H + h] = Storage<S>::store(ddtv);
            sums[h] += double(dg[r * a.H + h]) * st.d;
            sums[a.H + h] += ddtv;
          }
      }
    });
  });
  std::vector<double> total(size_t(width), 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[size_t(i)] += partial[size_t(b * width + i)];
  for (int64_t h = 0; h < a.H; ++h) dA[h] = float(total[size_t(h)]);
  if (dDtBias)
    for (int64_t h = 0; h < a.H; ++h) dDtBias[h] = float(total[size_t(a.H + h)]);
  if (wantD)
    for (int64_t i = 0; i < dWidth; ++i) dD[i] = float(total[size_t(2 * a.H + i)]);
  else if (dD)
    std::fill(dD, dD + dWidth, 0.0f);
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

void mamba2StepCpu(const Mamba2StepArgs& s, void* y) {
  const Mamba2GateArgs& a = s.gate;
  const int64_t N = s.N, P = a.P, H = a.H, T = s.T, per = H / s.G;
  dispatchDType(a.dt, [&](auto tag) {
    using S = decltype(tag);
    const S *x = static_cast<const S*>(a.x), *dt = static_cast<const S*>(a.dtIn), *z = static_cast<const S*>(a.z),
            *B = static_cast<const S*>(s.B), *C = static_cast<const S*>(s.C);
    S* out = static_cast<S*>(y);
    // One (batch, head) state of P x N per item: T tokens through it in order.
    parallelFor(s.batch * H, grainFor(double(T * P * N), 1 << 14), [&](int64_t i0, int64_t i1) {
      std::vector<float> state(static_cast<size_t>(P * N)), bt(static_cast<size_t>(N)), ct(static_cast<size_t>(N));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H, grp = h / per;
        float* home = s.state + i * P * N;
        std::copy(home, home + P * N, state.begin());
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = b * T + t;
          const Step st = timeStep(a, dt, row, h);
          const float decay = std::exp(st.d * a.A[h]);
          const int64_t bc = (row * s.G + grp) * N;
          for (int64_t n = 0; n < N; ++n) {
            bt[size_t(n)] = Storage<S>::load(B[bc + n]);
            ct[size_t(n)] = Storage<S>::load(C[bc + n]);
          }
          const int64_t base = (row * H + h) * P;
          for (int64_t p = 0; p < P; ++p) {
            const float xv = Storage<S>::load(x[base + p]), dx = st.d * xv;
            float* srow = state.data() + p * N;
            float acc = 0.0f;
            for (int64_t n = 0; n < N; ++n) {
              srow[n] = decay * srow[n] + dx * bt[size_t(n)];
              acc += srow[n] * ct[size_t(n)];
            }
            float yv = acc + skip(a, h, p) * xv;
            if (z) {
              const float zv = Storage<S>::load(z[base + p]);
              yv *= zv * sigmoid(zv);
            }
            out[base + p] = Storage<S>::store(yv);
          }
          if (s.intermediate) std::copy(state.begin(), state.end(), s.intermediate + (row * H + h) * P * N);
        }
        if (s.update) std::copy(state.begin(), state.end(), home);
      }
    });
  });
}

}  // namespace rk::ssd
