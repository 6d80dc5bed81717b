// The Newton-iteration RNN's CUDA kernels (cuda/newton/newton_rnn.cu): the cells per channel, the
// kernels' parameters and the helpers every path shares.
#pragma once

#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#include "common/api.h"
#include "newton/newton_rnn.h"
#include "common/async_copy.cuh"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/scan.cuh"

namespace rkcuda {
namespace {

constexpr int kMaxG = 4, kMaxS = 2;
constexpr int kFusedThreads = 512;  // largest block of the fused kernels (register budget 128)
constexpr int kMaxHeadDim = 1024;   // dense cells: a block per (row, head), a thread per channel
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTile = 32;       // dense evaluation / reduction tiles
constexpr int kMaxFullM = 128;  // full Jacobian: S * headDim at most (the block's matrices in shared memory)

__device__ __forceinline__ int64_t minI(int64_t a, int64_t b) { return a < b ? a : b; }

template <NewtonCell C> struct CellInfo;
template <> struct CellInfo<NewtonCell::GruDiag> {
  static constexpr int G = 3, S = 1;
  static constexpr bool diag = true;
};
template <> struct CellInfo<NewtonCell::LstmCifgDiag> {
  static constexpr int G = 3, S = 2;
  static constexpr bool diag = true;
};
template <> struct CellInfo<NewtonCell::Gru> {
  static constexpr int G = 3, S = 1;
  static constexpr bool diag = false;
};
template <> struct CellInfo<NewtonCell::Lstm> {
  static constexpr int G = 4, S = 2;
  static constexpr bool diag = false;
};
template <> struct CellInfo<NewtonCell::Elman> {
  static constexpr int G = 1, S = 1;
  static constexpr bool diag = false;
};

constexpr bool isGru(NewtonCell c) { return c == NewtonCell::GruDiag || c == NewtonCell::Gru; }

// The full-Jacobian linearisation of one channel at one step, K floats at [batch, T, K, N]: for each
// output state i the direct derivatives d out_i / d prev_s (s < S, at i * W + s) and the ones through
// the recurrent parts d out_i / d r_g (g < G, at i * W + S + g), then the residuals f_i - traj_i (at
// S * W + i). The head's (S D) x (S D) Jacobian follows with R (see buildJacobian).
template <NewtonCell C> struct FullCoef {
  static constexpr int S = CellInfo<C>::S, G = CellInfo<C>::G, W = S + G, K = S * W + S;
};

// ---- the cells, per channel ----

struct Act {
  float g[kMaxG];  // gate activations
  float tc;        // tanh(c) (LSTMs)
};

__device__ __forceinline__ float tanhAcc(float x) { return tanhf(x); }

template <NewtonCell C>
__device__ __forceinline__ void cellForward(const float (&x)[kMaxG], const float (&r)[kMaxG],
                                            const float (&prev)[kMaxS], Act& a, float (&out)[kMaxS]) {
  if constexpr (isGru(C)) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = sigmoid(x[1] + r[1]);
    a.g[2] = tanhAcc(fmaf(a.g[0], r[2], x[2]));
    out[0] = fmaf(a.g[1], prev[0] - a.g[2], a.g[2]);
  } else if constexpr (C == NewtonCell::LstmCifgDiag) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = tanhAcc(x[1] + r[1]);
    a.g[2] = sigmoid(x[2] + r[2]);
    const float c = fmaf(a.g[0], prev[1] - a.g[1], a.g[1]);
    a.tc = tanhAcc(c);
    out[0] = a.g[2] * a.tc;
    out[1] = c;
  } else if constexpr (C == NewtonCell::Lstm) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = sigmoid(x[1] + r[1]);
    a.g[2] = tanhAcc(x[2] + r[2]);
    a.g[3] = sigmoid(x[3] + r[3]);
    const float c = fmaf(a.g[1], prev[1], a.g[0] * a.g[2]);
    a.tc = tanhAcc(c);
    out[0] = a.g[3] * a.tc;
    out[1] = c;
  } else {  // Elman
    a.g[0] = tanhAcc(x[0] + r[0]);
    out[0] = a.g[0];
  }
}

// Given gout = dL/d(states after the step): gx = dL/dx, gr = dL/dr, gp = the direct part of dL/dprev.
template <NewtonCell C>
__device__ __forceinline__ void cellVjp(const float (&r)[kMaxG], const float (&prev)[kMaxS], const Act& a,
                                        const float (&gout)[kMaxS], float (&gx)[kMaxG], float (&gr)[kMaxG],
                                        float (&gp)[kMaxS]) {
  if constexpr (isGru(C)) {
    const float rg = a.g[0], z = a.g[1], n = a.g[2], gh = gout[0];
    const float dnpre = gh * (1.0f - z) * (1.0f - n * n);
    const float dz = gh * (prev[0] - n) * z * (1.0f - z);
    const float dr = dnpre * r[2] * rg * (1.0f - rg);
    gx[0] = gr[0] = dr;
    gx[1] = gr[1] = dz;
    gx[2] = dnpre;
    gr[2] = dnpre * rg;
    gp[0] = gh * z;
  } else if constexpr (C == NewtonCell::LstmCifgDiag) {
    const float f = a.g[0], zt = a.g[1], o = a.g[2], tc = a.tc;
    const float gc = fmaf(gout[0] * o, 1.0f - tc * tc, gout[1]);
    gx[0] = gr[0] = gc * (prev[1] - zt) * f * (1.0f - f);
    gx[1] = gr[1] = gc * (1.0f - f) * (1.0f - zt * zt);
    gx[2] = gr[2] = gout[0] * tc * o * (1.0f - o);
    gp[0] = 0.0f;
    gp[1] = gc * f;
  } else if constexpr (C == NewtonCell::Lstm) {
    const float i = a.g[0], f = a.g[1], zt = a.g[2], o = a.g[3], tc = a.tc;
    const float gc = fmaf(gout[0] * o, 1.0f - tc * tc, gout[1]);
    gx[0] = gr[0] = gc * zt * i * (1.0f - i);
    gx[1] = gr[1] = gc * prev[1] * f * (1.0f - f);
    gx[2] = gr[2] = gc * i * (1.0f - zt * zt);
    gx[3] = gr[3] = gout[0] * tc * o * (1.0f - o);
    gp[0] = 0.0f;
    gp[1] = gc * f;
  } else {
    const float h = a.g[0];
    gx[0] = gr[0] = gout[0] * (1.0f - h * h);
    gp[0] = 0.0f;
  }
}

// The channel's S x S Jacobian block J[i][j] = d out_i / d prev_j, with Rd[g] the weight of the
// channel's own h_{t-1} in r[g] (rec depends on state 0 only).
template <NewtonCell C>
__device__ __forceinline__ void cellJacobian(const float (&r)[kMaxG], const float (&prev)[kMaxS], const Act& a,
                                             const float (&Rd)[kMaxG], float (&J)[kMaxS][kMaxS]) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float e[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) e[s] = s == i ? 1.0f : 0.0f;
    cellVjp<C>(r, prev, a, e, gx, gr, gp);
    float viaRec = 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) viaRec = fmaf(gr[g], Rd[g], viaRec);
#pragma unroll
    for (int j = 0; j < S; ++j) J[i][j] = j == 0 ? gp[0] + viaRec : gp[j];
  }
}

// ---- parameters ----

// The kernels' parameters: the contract's arguments plus the channel count, the solution and the
// layouts, scratch and gradients of the paths.
struct Params : NewtonRnnArgs {
  int64_t N = 1;  // heads * headDim
  float* traj = nullptr;
  // fused kernels
  int chan = 32;  // channels per block
  int64_t blocksPerRow = 1;
  int* blockStats = nullptr;  // 3 ints per block: iterations, converged, residual bits
  // row list (sequential kernels; null: every row)
  const int* rows = nullptr;
  // generic path
  float* jc = nullptr;               // [batch, T, S*S + S, N]: J row-major, then c (full: see FullCoef)
  bool full = false;                 // dense cells, full Jacobian: evaluation writes FullCoef, steps by chunks
  int64_t chunkLen = 1, chunks = 1;  // full Jacobian: time chunks of chunkLen steps per (row, head)
  int M = 1, MP = 16;                // full Jacobian: S * D and its multiple of 16
  int tensorCores = 1;               // full Jacobian: chunk products on tensor cores (split tf32), else fp32 FMA
  float* agg = nullptr;              // full Jacobian: [batch, H, chunks, M * M + M], A column-major then b
  float* carry = nullptr;            // full Jacobian: [batch, H, chunks, M], the state before each chunk
  float* kal = nullptr;              // [batch, T, S + S*S, N]: filtered mean and covariance
  float* partial = nullptr;          // 2 floats per evaluation block: all-ok flag, max residual
  int* rowState = nullptr;           // [4, batch]: iterations, done, converged, residual bits
  bool fromH0 = false;               // evaluation computes traj_t = f(h0, x_t) (the one-step guess)
  int ldR = 0;                       // dense kernels: row stride of R in shared memory (0: global)
  // backward
  const void* dy = nullptr;
  const float* dFinal = nullptr;
  void* dwx = nullptr;
  float* dR = nullptr;
  float* db = nullptr;
  float* dh0 = nullptr;
  float* drec = nullptr;  // dense: [batch, T, G, N]
};

// Index of traj / jc-like arrays: [batch, T, K, N].
__device__ __forceinline__ int64_t at4(int64_t row, int64_t t, int64_t k, int64_t n, int64_t T, int64_t K, int64_t N) {
  return ((row * T + t) * K + k) * N + n;
}

// The thread layout of the fused diagonal kernels: a block holds CW = p.chan consecutive channels of
// one row in NS = blockDim / CW time slices of L steps; thread tid has channel n (lc in the block)
// over the steps [t0, t1) of its slice. active: n < N; work: active and the slice is not empty.
struct SliceThread {
  int tid, CW, NS, lc, slice;
  int64_t row, n;
  bool active;
  int64_t L, t0, t1;
  bool work;
};
__device__ __forceinline__ SliceThread sliceThread(const Params& p) {
  SliceThread s;
  s.tid = static_cast<int>(threadIdx.x), s.CW = p.chan, s.NS = static_cast<int>(blockDim.x) / s.CW;
  s.lc = s.tid % s.CW, s.slice = s.tid / s.CW;
  s.row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  s.n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * s.CW + s.lc;
  s.active = s.n < p.N;
  s.L = ceilDiv(p.T, s.NS);
  s.t0 = minI(p.T, s.slice * s.L), s.t1 = minI(p.T, s.t0 + s.L);
  s.work = s.active && s.t0 < s.t1;
  return s;
}

// A NaN-propagating max: a residual that is NaN must show.
__device__ __forceinline__ float maxNan(float a, float b) { return (a > b || a != a) ? a : b; }

// Per-channel constants: xb added to wx, rb added to rec (b_n for the GRU), Rd the own-channel weight.
template <NewtonCell C>
__device__ __forceinline__ void channelConsts(const Params& p, int64_t n, float (&xb)[kMaxG], float (&rb)[kMaxG],
                                              float (&Rd)[kMaxG]) {
  constexpr int G = CellInfo<C>::G;
  const int64_t head = n / p.headDim, j = n - head * p.headDim;
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    xb[g] = rb[g] = Rd[g] = 0.0f;
    if (g < G) {
      const float bias = __ldg(p.b + g * p.N + n);
      if (isGru(C) && g == 2)
        rb[g] = bias;
      else
        xb[g] = bias;
      Rd[g] = CellInfo<C>::diag ? __ldg(p.R + g * p.N + n)
                                : __ldg(p.R + ((g * p.heads + head) * p.headDim + j) * p.headDim + j);
    }
  }
}

template <NewtonCell C>
__device__ __forceinline__ void loadH0(const Params& p, int64_t row, int64_t n, float (&h)[kMaxS]) {
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    h[s] = (s < CellInfo<C>::S && p.h0 != nullptr) ? p.h0[(s * p.batch + row) * p.N + n] : 0.0f;
}

template <NewtonCell C, class T>
__device__ __forceinline__ void loadX(const Params& p, int64_t row, int64_t t, int64_t n, const float (&xb)[kMaxG],
                                      float (&x)[kMaxG]) {
  constexpr int G = CellInfo<C>::G;
  const T* wx = static_cast<const T*>(p.wx);
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) x[g] = g < G ? loadScalar<T>(wx + at4(row, t, g, n, p.T, G, p.N)) + xb[g] : 0.0f;
}

template <NewtonCell C>
__device__ __forceinline__ void loadTraj(const float* traj, const Params& p, int64_t row, int64_t t, int64_t n,
                                         float (&h)[kMaxS]) {
  constexpr int S = CellInfo<C>::S;
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) h[s] = s < S ? traj[at4(row, t, s, n, p.T, S, p.N)] : 0.0f;
}

// The state entering step t: h0v at t = 0, else traj_{t-1}.
template <NewtonCell C>
__device__ __forceinline__ void loadPrev(const Params& p, int64_t row, int64_t t, int64_t n, const float (&h0v)[kMaxS],
                                         float (&hp)[kMaxS]) {
  if (t == 0) {
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hp[s] = h0v[s];
  } else {
    loadTraj<C>(p.traj, p, row, t - 1, n, hp);
  }
}

// A time loop whose loads are issued two steps before their use. The loops are latency bound: a
// step's loads (inputs, the trajectory) do not depend on the step before, but issued where they are
// used a thread waits for each step's loads in turn. load(t, slot) fills step t's slot (registers:
// Slot is a struct of small arrays indexed by constants); body(t, slot) runs step t. The steps are
// first, first + dir, ... (count of them; dir = 1 or -1). A load of step t + 2 dir runs before the
// body of step t, so it may read what that body has not yet written (the trajectory at t + 2 dir,
// before step t + 2 dir stores it).
template <class Slot, class Load, class Body>
__device__ __forceinline__ void pipelinedSteps(int64_t first, int64_t count, int dir, Load load, Body body) {
  Slot a{}, b{};
  if (count > 0) load(first, a);
  if (count > 1) load(first + dir, b);
  for (int64_t i = 0; i < count; ++i) {
    const Slot cur = a;
    a = b;
    if (i + 2 < count) load(first + (i + 2) * dir, b);
    body(first + i * dir, cur);
  }
}

// Hints that step t's wx (and, with traj, its trajectory) of channel n come into L2. The fused
// kernel's time loops call it two steps ahead: holding those loads in registers instead spills at
// its register budget, and a prefetch holds none.
template <NewtonCell C, class T>
__device__ __forceinline__ void prefetchStepL2(const Params& p, const float* traj, int64_t row, int64_t t, int64_t n) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  const T* wx = static_cast<const T*>(p.wx);
#pragma unroll
  for (int g = 0; g < G; ++g) prefetchL2(wx + at4(row, t, g, n, p.T, G, p.N));
  if (traj != nullptr) {
#pragma unroll
    for (int s = 0; s < S; ++s) prefetchL2(traj + at4(row, t, s, n, p.T, S, p.N));
  }
}

template <NewtonCell C>
__device__ __forceinline__ void storeTraj(const Params& p, int64_t row, int64_t t, int64_t n, const float (&h)[kMaxS]) {
  constexpr int S = CellInfo<C>::S;
#pragma unroll
  for (int s = 0; s < S; ++s) p.traj[at4(row, t, s, n, p.T, S, p.N)] = h[s];
}

// Diagonal cells: f(hp, x) and its Jacobian.
template <NewtonCell C>
__device__ __forceinline__ void linDiag(const float (&x)[kMaxG], const float (&Rd)[kMaxG], const float (&rb)[kMaxG],
                                        const float (&hp)[kMaxS], float (&out)[kMaxS], float (&J)[kMaxS][kMaxS]) {
  float r[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
  Act a;
  cellForward<C>(x, r, hp, a, out);
  cellJacobian<C>(r, hp, a, Rd, J);
}

template <NewtonCell C>
__device__ __forceinline__ void fwdDiag(const float (&x)[kMaxG], const float (&Rd)[kMaxG], const float (&rb)[kMaxG],
                                        const float (&hp)[kMaxS], float (&out)[kMaxS]) {
  float r[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
  Act a;
  cellForward<C>(x, r, hp, a, out);
}

// The convergence test of one element: |f - traj| <= tolAbs + tolRel |traj| (NaN fails).
__device__ __forceinline__ void checkElem(const Params& p, float f, float cur, bool& ok, float& res) {
  const float d = fabsf(f - cur);
  ok = ok && (d <= fmaf(p.tolRel, fabsf(cur), p.tolAbs));
  res = maxNan(res, d);
}

template <int S>
__device__ __forceinline__ scan::AffineN<S> stepMap(const float (&J)[kMaxS][kMaxS], const float (&f)[kMaxS],
                                                    const float (&hp)[kMaxS]) {
  scan::AffineN<S> m;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float c = f[i];
#pragma unroll
    for (int j = 0; j < S; ++j) {
      m.a[i][j] = J[i][j];
      c = fmaf(-J[i][j], hp[j], c);
    }
    m.b[i] = c;
  }
  return m;
}

// Block-wide AND of ok and max of res (every thread of the block calls; all get the results).
__device__ __forceinline__ void blockCheck(bool ok, float res, int* sOk, float* sRes, bool& allOk, float& maxRes) {
  int o = ok ? 1 : 0;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    o &= __shfl_xor_sync(kFullMask, o, m);
    res = maxNan(res, __shfl_xor_sync(kFullMask, res, m));
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  if (lane == 0) {
    sOk[warp] = o;
    sRes[warp] = res;
  }
  __syncthreads();
  allOk = true;
  maxRes = 0.0f;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  for (int w = 0; w < warps; ++w) {
    allOk = allOk && sOk[w] != 0;
    maxRes = maxNan(maxRes, sRes[w]);
  }
}

}  // namespace
}  // namespace rkcuda
