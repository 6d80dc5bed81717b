// Causal depthwise 1-D convolution with carry state (cuda/conv/causal_conv1d.h): forward (final state,
// state window) and backward, either layout, packed sequences, for F32/F16/BF16 storage with fp32
// arithmetic.
//
// Elementwise over the positions: a thread takes one (batch row, channel, position) element in the
// order of x's layout (consecutive threads read consecutive addresses in both layouts) and finds the
// sequence holding the position (a binary search of the packed table). The input at local position u
// of sequence s is x (u >= 0) or the carry state (u < 0: state position L + u; zeros without h0).
//   forward:  y = act(bias + sum_j w_j x(u - (W - 1 - j) d)); the final state and window slots read
//             x / the carry state at their positions (a small kernel per (sequence, channel, slot)).
//   backward: dpre = dy * act'(pre) (pre recomputed) into an fp32 scratch in x's layout; then
//             dx(u) = sum_j w_j dpre(u + (W - 1 - j) d) (+ the final state's gradient on the last L
//             positions), and the same for the carry state's positions (u < 0); dweight and dbias
//             are sums over every position: one block per channel reduces them (no atomics).
// Positions in no sequence get y = 0 and dx = 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "conv/causal_conv1d.h"

namespace rkcuda {
namespace {

constexpr int64_t kMaxWidth = 64;

struct ConvParams : CausalConv1dArgs {
  const ScanSegment* table = nullptr;  // device table (packed); null: sequence s = row s, whole
  int64_t L = 0;
  // backward
  const void* dY = nullptr;
  const void* dFinal = nullptr;
  float* dpre = nullptr;  // fp32 scratch, x's layout

  __device__ int64_t xAt(int64_t b, int64_t c, int64_t t) const {
    return channelsLast ? (b * T + t) * C + c : (b * C + c) * T + t;
  }
  __device__ int64_t stateAt(int64_t s, int64_t c, int64_t p) const {
    return channelsLast ? (s * L + p) * C + c : (s * C + c) * L + p;
  }
  // The (sequence, channel, state position) of element e of a [nseq, C, L] / [nseq, L, C] state.
  __device__ void stateElement(int64_t e, int64_t* s, int64_t* c, int64_t* q) const {
    *c = channelsLast ? e % C : e / L % C;
    *q = channelsLast ? e / C % L : e % L;
    *s = e / (C * L);
  }
  __device__ void element(int64_t e, int64_t* b, int64_t* c, int64_t* t) const {
    if (channelsLast) {
      *c = e % C;
      *t = e / C % T;
      *b = e / (C * T);
    } else {
      *t = e % T;
      *c = e / T % C;
      *b = e / (C * T);
    }
  }
  // The sequence holding position t of row b, or -1.
  __device__ int64_t sequenceOf(int64_t b, int64_t t, ScanSegment* seg) const {
    if (table == nullptr) {
      *seg = ScanSegment{b, 0, T, 0};
      return b;
    }
    int64_t lo = 0, hi = nseq - 1, found = -1;
    while (lo <= hi) {
      const int64_t mid = (lo + hi) / 2;
      if (table[mid].start <= t) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    // Empty sequences share their start with the next one: take the last whose range holds t.
    if (found < 0 || t >= table[found].start + table[found].length) return -1;
    *seg = table[found];
    return found;
  }
};

template <class T>
__device__ __forceinline__ float inputAt(const ConvParams& p, const ScanSegment& sg, int64_t s, int64_t c, int64_t u) {
  if (u >= 0) return loadScalar(static_cast<const T*>(p.x) + p.xAt(sg.batch, c, sg.start + u));
  return p.h0 != nullptr ? loadScalar(static_cast<const T*>(p.h0) + p.stateAt(s, c, p.L + u)) : 0.0f;
}

template <class T>
__device__ __forceinline__ float preAt(const ConvParams& p, const ScanSegment& sg, int64_t s, int64_t c, int64_t u) {
  float acc = p.bias != nullptr ? loadScalar(static_cast<const T*>(p.bias) + c) : 0.0f;
  const T* w = static_cast<const T*>(p.weight) + c * p.W;
  for (int64_t j = 0; j < p.W; ++j)
    acc = fmaf(loadScalar(w + j), inputAt<T>(p, sg, s, c, u - (p.W - 1 - j) * p.dilation), acc);
  return acc;
}

__device__ __forceinline__ int64_t gridStart() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t gridStep() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <class T> __global__ void __launch_bounds__(256) convForwardKernel(const ConvParams p, T* y) {
  const int64_t n = p.batch * p.C * p.T;
  for (int64_t e = gridStart(); e < n; e += gridStep()) {
    int64_t b, c, t;
    p.element(e, &b, &c, &t);
    ScanSegment sg;
    const int64_t s = p.sequenceOf(b, t, &sg);
    if (s < 0) {
      y[e] = fromFloat<T>(0.0f);
      continue;
    }
    const float pre = preAt<T>(p, sg, s, c, t - sg.start);
    y[e] = fromFloat<T>(p.silu ? silu(pre) : pre);
  }
}

// The final state (slot -1) and the window slots: element (slot, sequence, channel, state position).
template <class T> __global__ void __launch_bounds__(256) convStatesKernel(const ConvParams p, T* fin) {
  const int64_t per = p.nseq * p.C * p.L, slots = 1 + (p.windowStates != nullptr ? p.window : 0);
  const ScanSegment* tab = p.table;
  for (int64_t e = gridStart(); e < slots * per; e += gridStep()) {
    const int64_t slot = e / per - 1;
    int64_t s, c, q;
    p.stateElement(e % per, &s, &c, &q);
    const ScanSegment sg = tab != nullptr ? tab[s] : ScanSegment{s, 0, p.T, 0};
    // The slot ends at local position last (the final state: the sequence's last).
    const int64_t last = slot < 0 ? sg.length - 1 : sg.length - p.window + slot;
    T* dst = slot < 0 ? fin : static_cast<T*>(p.windowStates) + slot * per;
    if (dst == nullptr) continue;
    const float v = slot >= 0 && last < 0 ? 0.0f : inputAt<T>(p, sg, s, c, last + 1 - p.L + q);
    dst[p.stateAt(s, c, q)] = fromFloat<T>(v);
  }
}

template <class T> __global__ void __launch_bounds__(256) convDpreKernel(const ConvParams p) {
  const int64_t n = p.batch * p.C * p.T;
  const T* dY = static_cast<const T*>(p.dY);
  for (int64_t e = gridStart(); e < n; e += gridStep()) {
    int64_t b, c, t;
    p.element(e, &b, &c, &t);
    ScanSegment sg;
    const int64_t s = p.sequenceOf(b, t, &sg);
    float d = 0.0f;
    if (s >= 0 && dY != nullptr) {
      d = loadScalar(dY + e);
      if (p.silu) d *= siluGrad(preAt<T>(p, sg, s, c, t - sg.start));
    }
    p.dpre[e] = d;
  }
}

// The gradient at local position u (x for u >= 0, the carry state for u < 0) of sequence s.
template <class T>
__device__ __forceinline__ float inputGrad(const ConvParams& p, const ScanSegment& sg, int64_t s, int64_t c,
                                           int64_t u) {
  const T* w = static_cast<const T*>(p.weight) + c * p.W;
  float acc = 0.0f;
  for (int64_t j = 0; j < p.W; ++j) {
    const int64_t v = u + (p.W - 1 - j) * p.dilation;
    if (v >= 0 && v < sg.length) acc = fmaf(loadScalar(w + j), p.dpre[p.xAt(sg.batch, c, sg.start + v)], acc);
  }
  // The final state holds local positions [length - L, length).
  const int64_t q = u - (sg.length - p.L);
  if (p.dFinal != nullptr && q >= 0 && q < p.L) acc += loadScalar(static_cast<const T*>(p.dFinal) + p.stateAt(s, c, q));
  return acc;
}

template <class T> __global__ void __launch_bounds__(256) convDxKernel(const ConvParams p, T* dx, T* dh0) {
  const int64_t n = p.batch * p.C * p.T;
  for (int64_t e = gridStart(); e < n; e += gridStep()) {
    int64_t b, c, t;
    p.element(e, &b, &c, &t);
    ScanSegment sg;
    const int64_t s = p.sequenceOf(b, t, &sg);
    dx[e] = fromFloat<T>(s < 0 ? 0.0f : inputGrad<T>(p, sg, s, c, t - sg.start));
  }
  if (dh0 == nullptr) return;
  const int64_t ns = p.nseq * p.C * p.L;
  for (int64_t e = gridStart(); e < ns; e += gridStep()) {
    int64_t s, c, q;
    p.stateElement(e, &s, &c, &q);
    const ScanSegment sg = p.table != nullptr ? p.table[s] : ScanSegment{s, 0, p.T, 0};
    dh0[e] = fromFloat<T>(inputGrad<T>(p, sg, s, c, q - p.L));
  }
}

// dweight[c][j] = sum dpre(u) x(u - (W - 1 - j) d), dbias[c] = sum dpre(u), over every position of every
// sequence: one block per channel, a block reduction per sum.
template <class T> __global__ void __launch_bounds__(256) convWeightGradKernel(const ConvParams p, T* dw, T* db) {
  __shared__ float partial[kMaxWidth + 1][8];
  const int64_t c = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  float acc[kMaxWidth + 1];
  for (int64_t j = 0; j <= p.W; ++j) acc[j] = 0.0f;
  for (int64_t s = 0; s < p.nseq; ++s) {
    const ScanSegment sg = p.table != nullptr ? p.table[s] : ScanSegment{s, 0, p.T, 0};
    for (int64_t u = threadIdx.x; u < sg.length; u += blockDim.x) {
      const float d = p.dpre[p.xAt(sg.batch, c, sg.start + u)];
      for (int64_t j = 0; j < p.W; ++j)
        acc[j] = fmaf(d, inputAt<T>(p, sg, s, c, u - (p.W - 1 - j) * p.dilation), acc[j]);
      acc[p.W] += d;
    }
  }
  for (int64_t j = 0; j <= p.W; ++j) {
    const float v = warpSum(acc[j]);
    if (lane == 0) partial[j][warp] = v;
  }
  __syncthreads();
  if (static_cast<int64_t>(threadIdx.x) <= p.W) {
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += partial[threadIdx.x][w];
    if (static_cast<int64_t>(threadIdx.x) < p.W)
      dw[c * p.W + threadIdx.x] = fromFloat<T>(sum);
    else if (db != nullptr)
      db[c] = fromFloat<T>(sum);
  }
}

unsigned blocksFor(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 65535)); }

Status checkConv(const CausalConv1dArgs& a, const std::string& fn, std::vector<int64_t>* gaps) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.batch < 0 || a.T < 0 || a.C < 1) return bad("bad sizes");
  if (a.W < 2 || a.W > kMaxWidth) return bad("width must be 2-64");
  if (a.dilation < 1) return bad("dilation must be positive");
  if (a.window < 0 || a.window > 8) return bad("window must be 0-8");
  // The sequence table counts "chunks" of one position (the binding builds it so).
  int64_t positions = 0;
  for (int64_t s = 0; a.segments != nullptr && s < a.nseq; ++s) positions += a.segments[s].length;
  RK_TRY(checkSequences(a.segments, a.nseq, a.batch, a.T, a.packed, 1, positions, fn, gaps));
  if (a.batch * a.T > 0 && (a.x == nullptr || a.weight == nullptr)) return bad("null input");
  return Status{};
}

}  // namespace

Status causalConv1dForward(const CausalConv1dArgs& a, void* y, void* finalState) {
  const std::string fn = "causalConv1dForward";
  std::vector<int64_t> gaps;
  RK_TRY(checkConv(a, fn, &gaps));
  if (a.batch * a.T > 0 && y == nullptr) return statusError(fn + ": null y");
  if (a.window > 0 && a.windowStates == nullptr) return statusError(fn + ": null windowStates");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    ConvParams p;
    static_cast<CausalConv1dArgs&>(p) = a;
    p.segments = nullptr;  // host memory: the kernels read `table`
    p.L = a.stateLen();
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadSequences(a.segments, a.nseq, a.packed, gaps, &table, &p.table, &gapList));
    const int64_t n = a.batch * a.C * a.T;
    if (n > 0) RK_TRY(launch(convForwardKernel<T>, blocksFor(n), 256, 0, p, static_cast<T*>(y)));
    const int64_t states = (1 + a.window) * a.nseq * a.C * p.L;
    if (states > 0 && (finalState != nullptr || a.window > 0))
      RK_TRY(launch(convStatesKernel<T>, blocksFor(states), 256, 0, p, static_cast<T*>(finalState)));
    return Status{};
  });
}

Status causalConv1dBackward(const CausalConv1dArgs& a, const CausalConv1dGrads& g) {
  const std::string fn = "causalConv1dBackward";
  std::vector<int64_t> gaps;
  RK_TRY(checkConv(a, fn, &gaps));
  if (a.batch * a.T > 0 && (g.dx == nullptr || g.dweight == nullptr)) return statusError(fn + ": null gradient output");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    ConvParams p;
    static_cast<CausalConv1dArgs&>(p) = a;
    p.segments = nullptr;
    p.L = a.stateLen();
    p.dY = g.dY;
    p.dFinal = g.dFinal;
    DeviceBuffer table, scratch;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadSequences(a.segments, a.nseq, a.packed, gaps, &table, &p.table, &gapList));
    const int64_t n = a.batch * a.C * a.T;
    RK_TRY(scratch.allocate(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float)));
    p.dpre = static_cast<float*>(scratch.get());
    if (n > 0) RK_TRY(launch(convDpreKernel<T>, blocksFor(n), 256, 0, p));
    const int64_t work = std::max(n, a.nseq * a.C * p.L);
    if (work > 0)
      RK_TRY(launch(convDxKernel<T>, blocksFor(work), 256, 0, p, static_cast<T*>(g.dx), static_cast<T*>(g.dh0)));
    return launch(convWeightGradKernel<T>, static_cast<unsigned>(a.C), 256, 0, p, static_cast<T*>(g.dweight),
                  static_cast<T*>(g.dbias));
  });
}

}  // namespace rkcuda
