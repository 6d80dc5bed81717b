// Mamba-2 (SSD) around linear attention's scan (cuda/ssd/mamba2_scan.h): the gate and the output before
// and after the scan, forward and backward, the transposes between the two state layouts, and the
// fused decode step, for F32/F16/BF16 storage with fp32 arithmetic and state.
//
// The effective time step of a (row, head) is d = dt + dtBias[h], through softplus (dtSoftplus; the
// value itself above 20) and the clamp to [dtMin, dtMax] (clamp); its derivative with respect to dt
// is softplus' (sigmoid below the cut-off, 1 above) times the clamp's (1 strictly inside the limits,
// else 0). Every kernel recomputes d where it needs it (one load of dt, cached for the P channels).
//   * mamba2Prepare, mamba2Finish, mamba2FinishBackward: elementwise, one thread per (row, head,
//     channel) element (grid-stride); g is written by the thread of channel 0.
//   * mamba2PrepareBackward: a block takes one head and a span of rows (rowsPerSplit, a tunable),
//     one warp per row, the lanes over the channels p (lane + 32 j). dd = sum_p dv x + dg A is a warp
//     sum; dx, ddt are written at once; the sums over rows (dA, dDtBias, dD) stay in the lanes'
//     registers across the block's rows, are reduced over the block through shared memory and added
//     with one fp32 atomic per block and output element into outputs zeroed first (a per-channel dD
//     past the first 256 channels: one atomic per row and channel). dD without D stays zero, as on
//     the CPU; dDtBias is the sum of ddt wherever it is given.
//   * mamba2TransposeStates: 32 x 32 tiles through shared memory (both sides coalesced), a block
//     per tile (grid-stride over tiles).
//   * mamba2Step: a channel (batch, head, p) owns row p of its head's P x N state; its N states are
//     spread over a group of lanes (SPL per lane, n = lane + j * lanes, coalesced over n) and stay in
//     registers across the T tokens; y is a shuffle sum over the group. The channels of a warp share
//     their head (and so dt, B and C, broadcast loads) unless the head ends inside the warp.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "ssd/mamba2_scan.h"

namespace rkcuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRegChannels = 256;                 // mamba2PrepareBackward: channels whose dD sums stay in registers
constexpr int kLaneChannels = kRegChannels / 32;  // ... per lane
constexpr int64_t kMaxN = 256;                    // mamba2Step's states per channel
constexpr int kStepThreads = 128;
constexpr int kTile = 32;

__device__ __forceinline__ int64_t stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ __forceinline__ int64_t first() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }

// The effective time step of head h from the raw dt, and its derivative with respect to dt.
struct TimeStep {
  float d, grad;
};
__device__ __forceinline__ TimeStep timeStep(const Mamba2GateArgs& a, float raw, int64_t h) {
  const float pre = raw + (a.dtBias != nullptr ? a.dtBias[h] : 0.0f);
  TimeStep s{pre, 1.0f};
  if (a.dtSoftplus) {
    s.d = softplus(pre);
    s.grad = softplusGrad(pre);
  }
  if (a.clamp) {
    if (!(s.d > a.dtMin && s.d < a.dtMax)) s.grad = 0.0f;
    s.d = fminf(fmaxf(s.d, a.dtMin), a.dtMax);
  }
  return s;
}

// D of channel p of head h (0 without D).
__device__ __forceinline__ float skipOf(const Mamba2GateArgs& a, int64_t h, int64_t p) {
  return a.D != nullptr ? a.D[a.dPerChannel ? h * a.P + p : h] : 0.0f;
}

// ============================== elementwise ==============================

template <class T> __global__ void __launch_bounds__(kThreads) prepareKernel(const Mamba2GateArgs a, float* g, T* v) {
  const T* x = static_cast<const T*>(a.x);
  const T* dtIn = static_cast<const T*>(a.dtIn);
  for (int64_t e = first(); e < a.rows * a.H * a.P; e += stride()) {
    const int64_t rh = e / a.P, h = rh % a.H;
    const float d = timeStep(a, loadScalar(dtIn + rh), h).d;
    v[e] = fromFloat<T>(d * loadScalar(x + e));
    if (e % a.P == 0) g[rh] = d * a.A[h];
  }
}

template <class T> __global__ void __launch_bounds__(kThreads) finishKernel(const Mamba2GateArgs a, const T* o, T* y) {
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  for (int64_t e = first(); e < a.rows * a.H * a.P; e += stride()) {
    const int64_t p = e % a.P, h = e / a.P % a.H;
    if (e / (a.H * a.P) >= a.validRows) {  // in no sequence
      y[e] = fromFloat<T>(0.0f);
      continue;
    }
    float v = loadScalar(o + e);
    if (a.D != nullptr) v = fmaf(skipOf(a, h, p), loadScalar(x + e), v);
    if (z != nullptr) v *= silu(loadScalar(z + e));
    y[e] = fromFloat<T>(v);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    finishBackwardKernel(const Mamba2GateArgs a, const T* o, const T* dy, T* dO, T* dz) {
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  for (int64_t e = first(); e < a.rows * a.H * a.P; e += stride()) {
    const int64_t p = e % a.P, h = e / a.P % a.H;
    if (e / (a.H * a.P) >= a.validRows) {  // in no sequence
      dO[e] = dz[e] = fromFloat<T>(0.0f);
      continue;
    }
    float pre = loadScalar(o + e);
    if (a.D != nullptr) pre = fmaf(skipOf(a, h, p), loadScalar(x + e), pre);
    const float zv = loadScalar(z + e), g = loadScalar(dy + e);
    dO[e] = fromFloat<T>(g * silu(zv));
    dz[e] = fromFloat<T>(g * pre * siluGrad(zv));
  }
}

// ============================== prepare backward ==============================

// Channel p of row rh (head h, time step d): writes dx, returns dv x for dd, and adds dO x to *sumD.
template <class T>
__device__ __forceinline__ float channelGrad(const Mamba2GateArgs& a, const T* dO, const T* dv, T* dx, int64_t rh,
                                             int64_t h, int64_t p, float d, float* sumD) {
  const int64_t e = rh * a.P + p;
  const float xv = loadScalar(static_cast<const T*>(a.x) + e), g = loadScalar(dv + e);
  float dxv = g * d;
  if (dO != nullptr) {
    const float go = loadScalar(dO + e);
    dxv = fmaf(skipOf(a, h, p), go, dxv);
    *sumD = fmaf(go, xv, *sumD);
  }
  dx[e] = fromFloat<T>(dxv);
  return g * xv;
}

// The gradients of mamba2Prepare (and of D's term of mamba2Finish): block = (row span, head). dO is
// null without D. Channels past the first 256 (kLaneChannels per lane) add their dD at once.
template <class T>
__global__ void __launch_bounds__(kThreads)
    prepareBackwardKernel(const Mamba2GateArgs a, int64_t rowsPerSplit, const T* dO, const T* dv, const float* dg,
                          T* dx, T* ddt, float* dA, float* dDtBias, float* dD) {
  __shared__ float partD[kWarps][kRegChannels];  // per-channel dD of each warp
  __shared__ float partS[kWarps][3];             // dA, dDtBias, per-head dD of each warp
  const T* dtIn = static_cast<const T*>(a.dtIn);
  const int64_t h = blockIdx.x % a.H, split = blockIdx.x / a.H;
  const int64_t r1 = (split + 1) * rowsPerSplit < a.rows ? (split + 1) * rowsPerSplit : a.rows;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const bool perChannel = dO != nullptr && dD != nullptr && a.dPerChannel;
  const float Ah = a.A[h];
  float accD[kLaneChannels];
#pragma unroll
  for (int j = 0; j < kLaneChannels; ++j) accD[j] = 0.0f;
  float accA = 0.0f, accBias = 0.0f, headD = 0.0f;
  for (int64_t row = split * rowsPerSplit + warp; row < r1; row += kWarps) {
    const int64_t rh = row * a.H + h;
    if (row >= a.validRows) {  // in no sequence: zero gradients, nothing summed
      for (int64_t p = lane; p < a.P; p += 32) dx[rh * a.P + p] = fromFloat<T>(0.0f);
      if (lane == 0) ddt[rh] = fromFloat<T>(0.0f);
      continue;
    }
    const TimeStep s = timeStep(a, loadScalar(dtIn + rh), h);
    float dd = 0.0f;
#pragma unroll
    for (int j = 0; j < kLaneChannels; ++j) {
      const int64_t p = lane + 32 * j;
      if (p < a.P) dd += channelGrad(a, dO, dv, dx, rh, h, p, s.d, &accD[j]);
    }
    for (int64_t p = kRegChannels + lane; p < a.P; p += 32) {
      float sumD = 0.0f;
      dd += channelGrad(a, dO, dv, dx, rh, h, p, s.d, &sumD);
      if (perChannel)
        atomicAdd(dD + h * a.P + p, sumD);
      else
        headD += sumD;
    }
    const float dgv = dg[rh];
    dd = fmaf(dgv, Ah, warpSum(dd));
    const float ddtv = dd * s.grad;
    accA = fmaf(dgv, s.d, accA);
    accBias += ddtv;
    if (lane == 0) ddt[rh] = fromFloat<T>(ddtv);
  }
  // The block's sums: accA and accBias are the same in every lane of a warp.
#pragma unroll
  for (int j = 0; j < kLaneChannels; ++j) {
    headD += accD[j];
    if (lane + 32 * j < a.P) partD[warp][lane + 32 * j] = accD[j];
  }
  headD = warpSum(headD);
  if (lane == 0) {
    partS[warp][0] = accA;
    partS[warp][1] = accBias;
    partS[warp][2] = headD;
  }
  __syncthreads();
  const int t = static_cast<int>(threadIdx.x);
  if (t < 2 || (t == 2 && dO != nullptr && dD != nullptr && !a.dPerChannel)) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += partS[w][t];
    float* out = t == 0 ? dA + h : t == 1 ? (dDtBias != nullptr ? dDtBias + h : nullptr) : dD + h;
    if (out != nullptr) atomicAdd(out, sum);
  }
  if (perChannel && t < a.P && t < kRegChannels) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += partD[w][t];
    atomicAdd(dD + h * a.P + t, sum);
  }
}

// ============================== transposes ==============================

// dst[m][c][r] = src[m][r][c]: a block per 32 x 32 tile, through shared memory.
__global__ void __launch_bounds__(kThreads)
    transposeKernel(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t tilesR = ceilDiv(rows, kTile), tilesC = ceilDiv(cols, kTile), tiles = count * tilesR * tilesC;
  const int tx = static_cast<int>(threadIdx.x) % kTile, ty = static_cast<int>(threadIdx.x) / kTile;
  constexpr int kRowsPerPass = kThreads / kTile;
  for (int64_t k = blockIdx.x; k < tiles; k += gridDim.x) {
    const int64_t m = k / (tilesR * tilesC), r0 = k / tilesC % tilesR * kTile, c0 = k % tilesC * kTile;
    const float* s = src + m * rows * cols;
    float* d = dst + m * rows * cols;
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      if (r0 + i < rows && c0 + tx < cols) tile[i][tx] = s[(r0 + i) * cols + c0 + tx];
    }
    __syncthreads();
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      if (c0 + i < cols && r0 + tx < rows) d[(c0 + i) * rows + r0 + tx] = tile[tx][i];
    }
    __syncthreads();
  }
}

// ============================== decode ==============================

// The call's arguments, plus how many lanes share a channel (a power of two up to 32).
struct StepParams : Mamba2StepArgs {
  int lanesPerChannel = 32;
};

// Lane i of a channel's group holds the states n = i + j * lanesPerChannel, j < SPL.
template <class T, int SPL> __global__ void __launch_bounds__(kStepThreads) stepKernel(const StepParams p, T* y) {
  const Mamba2GateArgs& a = p.gate;
  const int lpc = p.lanesPerChannel;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int sub = lane & (lpc - 1);
  const int64_t warpGlobal = static_cast<int64_t>(blockIdx.x) * (kStepThreads / 32) + (threadIdx.x >> 5);
  const int64_t channel = warpGlobal * (32 / lpc) + lane / lpc;
  const bool active = channel < p.batch * a.H * a.P;
  const int64_t ch = active ? channel : 0;
  const int64_t c = ch % a.P, h = ch / a.P % a.H, b = ch / (a.H * a.P);
  const int64_t group = h / (a.H / p.G);
  const int N = static_cast<int>(p.N);
  const T* x = static_cast<const T*>(a.x);
  const T* dtIn = static_cast<const T*>(a.dtIn);
  const T* z = static_cast<const T*>(a.z);
  const T* B = static_cast<const T*>(p.B);
  const T* C = static_cast<const T*>(p.C);

  float* stateRow = p.state + ch * N;
  float S[SPL];
#pragma unroll
  for (int j = 0; j < SPL; ++j) {
    const int n = sub + j * lpc;
    S[j] = active && n < N ? stateRow[n] : 0.0f;  // an idle lane must not read a state that another updates
  }
  const float A2 = a.A[h] * kLog2e;
  const float Dc = skipOf(a, h, c);
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t bt = b * p.T + t;
    const float d = timeStep(a, loadScalar(dtIn + bt * a.H + h), h).d;
    const float decay = fastExp2(d * A2);
    const int64_t e = (bt * a.H + h) * a.P + c;  // this channel's element of x, z, y
    const float xv = loadScalar(x + e);
    const float dxv = d * xv;
    const T* Bt = B + (bt * p.G + group) * N;
    const T* Ct = C + (bt * p.G + group) * N;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int n = sub + j * lpc;
      if (n < N) {
        S[j] = fmaf(decay, S[j], dxv * loadScalar(Bt + n));
        acc = fmaf(loadScalar(Ct + n), S[j], acc);
        if (p.intermediate != nullptr && active) p.intermediate[e * N + n] = S[j];
      }
    }
    for (int m = lpc / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (active && sub == 0) {
      float yv = fmaf(Dc, xv, acc);
      if (z != nullptr) yv *= silu(loadScalar(z + e));
      storeScalar(y + e, yv);
    }
  }
  if (active && p.update) {
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int n = sub + j * lpc;
      if (n < N) stateRow[n] = S[j];
    }
  }
}

// ============================== launch ==============================

unsigned blocksFor(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>(ceilDiv(n, kThreads), 1, 4096)); }

Status checkGate(const Mamba2GateArgs& a, const std::string& fn) {
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return statusError(fn + ": unknown dtype");
  if (a.rows < 0 || a.H < 1 || a.P < 1) return statusError(fn + ": bad sizes");
  return Status{};
}

// x, dt and A: the inputs of the time step and of v.
Status checkTimeStepInputs(const Mamba2GateArgs& a, const std::string& fn) {
  if (a.rows > 0 && (a.x == nullptr || a.dtIn == nullptr || a.A == nullptr)) return statusError(fn + ": null input");
  return Status{};
}

// The arguments with validRows in [0, rows] (the kernels compare rows with it directly).
Mamba2GateArgs withLiveRows(const Mamba2GateArgs& a) {
  Mamba2GateArgs k = a;
  k.validRows = a.liveRows();
  return k;
}

}  // namespace

Status mamba2Prepare(const Mamba2GateArgs& a, float* g, void* v) {
  const std::string fn = "mamba2Prepare";
  RK_TRY(checkGate(a, fn));
  RK_TRY(checkTimeStepInputs(a, fn));
  if (a.rows == 0) return Status{};
  if (g == nullptr || v == nullptr) return statusError(fn + ": null output");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(prepareKernel<T>, blocksFor(a.rows * a.H * a.P), kThreads, 0, a, g, static_cast<T*>(v));
  });
}

Status mamba2Finish(const Mamba2GateArgs& a, const void* o, void* y) {
  const std::string fn = "mamba2Finish";
  RK_TRY(checkGate(a, fn));
  if (a.rows == 0) return Status{};
  if (o == nullptr || (a.D != nullptr && a.x == nullptr)) return statusError(fn + ": null input");
  if (y == nullptr) return statusError(fn + ": null output");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(finishKernel<T>, blocksFor(a.rows * a.H * a.P), kThreads, 0, withLiveRows(a),
                  static_cast<const T*>(o), static_cast<T*>(y));
  });
}

Status mamba2FinishBackward(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz) {
  const std::string fn = "mamba2FinishBackward";
  RK_TRY(checkGate(a, fn));
  if (a.rows == 0) return Status{};
  if (a.z == nullptr) return statusError(fn + ": needs z");
  if (o == nullptr || dy == nullptr || (a.D != nullptr && a.x == nullptr)) return statusError(fn + ": null input");
  if (dO == nullptr || dz == nullptr) return statusError(fn + ": null output");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(finishBackwardKernel<T>, blocksFor(a.rows * a.H * a.P), kThreads, 0, withLiveRows(a),
                  static_cast<const T*>(o), static_cast<const T*>(dy), static_cast<T*>(dO), static_cast<T*>(dz));
  });
}

Status mamba2PrepareBackward(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                             void* ddt, float* dA, float* dDtBias, float* dD) {
  const std::string fn = "mamba2PrepareBackward";
  RK_TRY(checkGate(a, fn));
  if (dA == nullptr) return statusError(fn + ": null dA");
  RK_TRY(checkTimeStepInputs(a, fn));
  if (a.rows > 0 && (dv == nullptr || dg == nullptr || (a.D != nullptr && dO == nullptr)))
    return statusError(fn + ": null gradient input");
  if (a.rows > 0 && (dx == nullptr || ddt == nullptr)) return statusError(fn + ": null output");
  // Sums over the rows: zero first (also when there are no rows).
  RK_TRY(zeroFloats(dA, a.H));
  RK_TRY(zeroFloats(dDtBias, a.H));
  RK_TRY(zeroFloats(dD, a.dPerChannel ? a.H * a.P : a.H));  // zeros without D (as the CPU kernel)
  if (a.rows == 0) return Status{};
  // Rows per block: enough that the per-block atomics are few, few enough to fill the device.
  const int64_t chosen = std::clamp<int64_t>(ceilDiv(a.rows * a.H, 1024), 64, INT_MAX);
  const int64_t rowsPerSplit = tunable("mamba2PrepareBackward.rowsPerSplit", static_cast<int>(chosen));
  if (rowsPerSplit < 1) return statusError(fn + ": unsupported rows per block " + std::to_string(rowsPerSplit));
  const int64_t blocks = ceilDiv(a.rows, rowsPerSplit) * a.H;
  if (blocks > INT_MAX) return statusError(fn + ": too many heads x rows for one launch");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(prepareBackwardKernel<T>, static_cast<unsigned>(blocks), kThreads, 0, withLiveRows(a), rowsPerSplit,
                  static_cast<const T*>(a.D != nullptr ? dO : nullptr), static_cast<const T*>(dv), dg,
                  static_cast<T*>(dx), static_cast<T*>(ddt), dA, dDtBias, a.D != nullptr ? dD : nullptr);
  });
}

Status mamba2TransposeStates(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols) {
  const std::string fn = "mamba2TransposeStates";
  if (count < 0 || rows < 0 || cols < 0) return statusError(fn + ": bad sizes");
  const int64_t tiles = count * ceilDiv(rows, kTile) * ceilDiv(cols, kTile);
  if (tiles == 0) return Status{};
  if (src == nullptr || dst == nullptr) return statusError(fn + ": null array");
  if (src == dst) return statusError(fn + ": src and dst must be different arrays");
  return launch(transposeKernel, static_cast<unsigned>(std::min<int64_t>(tiles, 65535)), kThreads, 0, src, dst, count,
                rows, cols);
}

Status mamba2Step(const Mamba2StepArgs& a, void* y) {
  const std::string fn = "mamba2Step";
  const Mamba2GateArgs& g = a.gate;
  RK_TRY(checkGate(g, fn));
  if (a.batch < 0 || a.T < 0) return statusError(fn + ": bad sizes");
  if (g.rows != a.batch * a.T) return statusError(fn + ": gate.rows must be batch * T");
  if (a.N < 1 || a.N > kMaxN) return statusError(fn + ": N must be in 1..256");
  if (a.G < 1 || g.H % a.G != 0) return statusError(fn + ": H must be a positive multiple of G");
  if (a.batch == 0 || a.T == 0) return Status{};
  if (g.x == nullptr || g.dtIn == nullptr || g.A == nullptr || a.B == nullptr || a.C == nullptr)
    return statusError(fn + ": null input");
  if (a.state == nullptr) return statusError(fn + ": null state");
  if (y == nullptr) return statusError(fn + ": null output");
  // States per lane: the fewest that fit a channel in one warp.
  int chosen = 1;
  while (chosen * 32 < a.N) chosen *= 2;
  const int perLane = tunable("mamba2Step.statesPerLane", chosen);
  if ((perLane != 1 && perLane != 2 && perLane != 4 && perLane != 8) || perLane * 32 < a.N)
    return statusError(fn + ": unsupported states per lane " + std::to_string(perLane));
  StepParams p;
  static_cast<Mamba2StepArgs&>(p) = a;
  int lanes = 1;
  while (lanes * perLane < a.N) lanes *= 2;
  p.lanesPerChannel = lanes;
  const int64_t channelsPerBlock = (kStepThreads / 32) * (32 / lanes);
  const int64_t blocks = ceilDiv(a.batch * g.H * g.P, channelsPerBlock);
  if (blocks > INT_MAX) return statusError(fn + ": too many channels for one launch");
  return dispatchDType(g.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    const unsigned grid = static_cast<unsigned>(blocks);
    T* out = static_cast<T*>(y);
    switch (perLane) {
      case 1:
        return launch(stepKernel<T, 1>, grid, kStepThreads, 0, p, out);
      case 2:
        return launch(stepKernel<T, 2>, grid, kStepThreads, 0, p, out);
      case 4:
        return launch(stepKernel<T, 4>, grid, kStepThreads, 0, p, out);
      default:
        return launch(stepKernel<T, 8>, grid, kStepThreads, 0, p, out);
    }
  });
}

}  // namespace rkcuda
