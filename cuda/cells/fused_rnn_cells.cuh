// The fused cells' CUDA kernels (cuda/cells/fused_rnn.cu): the kernels' parameters, the row and
// length helpers and the cell math (gates, states, their derivatives), shared by every path.
#pragma once

#include <cuda_runtime.h>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>
#include "common/api.h"
#include "cells/fused_rnn.h"
#include "common/async_copy.cuh"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/group_sync.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"

namespace rkcuda {
namespace {

constexpr int kRows = 16;  // batch rows per persistent block (the mma M dimension)
constexpr int kMaxPersistentDim = 256;
constexpr int kMultiThreads = 256;    // threads of a multi-block persistent block at most (4 per column: 64 columns)
constexpr int kMaxMultiLaunches = 8;  // sequential launches (groups of batch tiles) the launcher accepts by default
constexpr int kAhead = 4;             // steps ahead that the persistent kernels prefetch their inputs into L2
constexpr int kStepRows = 8;          // batch rows per stepwise block
constexpr int kStepCols = 16;         // channels per stepwise block
constexpr int kKGroups = 8;           // groups of the k range per stepwise block
constexpr int kStepThreads = kStepCols * kKGroups;  // = kStepRows * kStepCols: one cell update each
constexpr int kStepChunk = 256;                     // h_{t-1} columns staged at a time by a stepwise block
static_assert(kStepThreads == kStepRows * kStepCols, "a stepwise thread per (row, channel) of the tile");
constexpr int kRedTile = 64;   // dR reduction: output tile (i and j)
constexpr int kRedChunk = 32;  // dR reduction: t*batch rows staged at a time
constexpr int64_t kMaxT = int64_t{1} << 30;

constexpr int gatesOf(int cell) { return cellGates(static_cast<CellKind>(cell)); }
constexpr int statesOf(int cell) { return cellStates(static_cast<CellKind>(cell)); }
constexpr int kElman = static_cast<int>(CellKind::Elman), kLstm = static_cast<int>(CellKind::Lstm),
              kGru = static_cast<int>(CellKind::Gru), kSlstm = static_cast<int>(CellKind::Slstm);
// Threads (4 per channel) the persistent kernels of a cell are compiled for: about enough for the
// largest headDim whose R fits in shared memory (fp32 R takes twice the room), so that the registers
// suffice (80 to 128 per thread).
constexpr int maxThreadsOf(int cell, bool f32) {
  return cell == kSlstm ? (f32 ? 384 : 512)
         : f32          ? (cell == kElman ? 768 : 512)
                        : (cell == kElman || cell == kGru ? 768 : 640);
}

// Operand types of the recurrent products: the input dtype forward, bf16 backward (16-bit inputs).
template <class T> struct Operands {
  using Fwd = T;
  using Bwd = __nv_bfloat16;
};
template <> struct Operands<float> {
  using Fwd = float;
  using Bwd = float;
};
template <class Op> constexpr int padOf() { return std::is_same<Op, float>::value ? 4 : 8; }

// The kernels' parameters: the contract's arguments and forward outputs, plus the device copy of the
// lengths, the product's padding, the backward's inputs and outputs and the multi-block state.
struct RnnParams : FusedRnnArgs, FusedRnnOutputs {
  int Dp = 16;                             // headDim rounded up to 16 (the product's K padding)
  const int32_t* deviceLengths = nullptr;  // device copy of lengths (nullable); the kernels read this
  bool inputTile = false;                  // persistent forward: each step's inputs through a shared tile (cp.async)
  // backward
  const float* cSavedStates = nullptr;
  const float* cSavedPre = nullptr;
  const void* dh = nullptr;
  const float* dFinal = nullptr;
  float* gr = nullptr;  // scratch [T, batch, G, H, D]: dL/d(recurrent pre-activation)
  void* dwx = nullptr;
  float* dStates0 = nullptr;
  // multi-block persistent kernels
  int splits = 1;            // blocks per head (each takes D / splits columns)
  int64_t group0 = 0;        // first (batch tile, head) group of the launch: tile * H + head
  void* xchg = nullptr;      // exchange buffers, [2][groups of the launch][16][D] (backward [16][G][D])
  unsigned* sync = nullptr;  // barrier counters, one per group of the launch, zero at the start
};

__device__ __forceinline__ int64_t lengthOf(const RnnParams& p, int64_t b) {
  return b >= p.batch ? 0 : p.deviceLengths != nullptr ? static_cast<int64_t>(p.deviceLengths[b]) : p.T;
}

// ============================== cell math ==============================

// a / b within 2 ulp, without the IEEE division's slow-path call (b below 2^126 in magnitude).
__device__ __forceinline__ float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#elif defined(RK_CUDA_EMULATOR)
  return emu::deviceNumerics() ? emu::divApprox(a, b) : a / b;
#else
  return a / b;
#endif
}
// 1 / (1 + e^-x); exactly 0 where e^-x overflows the division's range.
__device__ __forceinline__ float sigm(float x) {
  const float d = 1.0f + expf(-x);
  return d < 1e37f ? div(1.0f, d) : 0.0f;
}
__device__ __forceinline__ float logSigmoid(float x) { return x >= 0.0f ? -log1pf(expf(-x)) : x - log1pf(expf(x)); }

// One step of one channel. pre[g] = wx_g + b_g + rec_g, except the GRU's n gate: pre[2] = rec_n + b_n
// (the part r scales) and wxn = wx_n. st: the states, updated in place.
template <int CELL>
__device__ __forceinline__ void cellForward(const float (&pre)[gatesOf(CELL)], float wxn, float (&st)[statesOf(CELL)]) {
  if constexpr (CELL == kElman) {
    st[0] = tanhf(pre[0]);
  } else if constexpr (CELL == kLstm) {
    const float ig = sigm(pre[0]), fg = sigm(pre[1]), zt = tanhf(pre[2]), og = sigm(pre[3]);
    const float c = fg * st[1] + ig * zt;
    st[0] = og * tanhf(c);
    st[1] = c;
  } else if constexpr (CELL == kGru) {
    const float rg = sigm(pre[0]), zg = sigm(pre[1]);
    const float nn = tanhf(wxn + rg * pre[2]);
    st[0] = (1.0f - zg) * nn + zg * st[0];
  } else {
    const float it = pre[0], u = logSigmoid(pre[1]) + st[3];
    const float zt = tanhf(pre[2]), og = sigm(pre[3]);
    const float m = (st[2] == 0.0f || it >= u) ? it : u;
    const float ip = expf(it - m), fp = u > m ? 1.0f : expf(u - m);
    const float c = fp * st[1] + ip * zt, n = fp * st[2] + ip;
    st[0] = og * div(c, n);
    st[1] = c;
    st[2] = n;
    st[3] = m;
  }
}

// Backward of cellForward. g: dL/d(states after the step) in, the direct part of dL/d(states before
// the step) out (the recurrent part is added by the caller). gx: dL/dwx_g; gr: dL/d(recurrent
// pre-activation) (equal to gx except for the GRU's n gate, where it is scaled by r).
template <int CELL>
__device__ __forceinline__ void cellBackward(const float (&pre)[gatesOf(CELL)], float wxn,
                                             const float (&prev)[statesOf(CELL)], float (&g)[statesOf(CELL)],
                                             float (&gx)[gatesOf(CELL)], float (&gr)[gatesOf(CELL)]) {
  if constexpr (CELL == kElman) {
    const float h = tanhf(pre[0]);
    gx[0] = gr[0] = g[0] * (1.0f - h * h);
    g[0] = 0.0f;
  } else if constexpr (CELL == kLstm) {
    const float ig = sigm(pre[0]), fg = sigm(pre[1]), zt = tanhf(pre[2]), og = sigm(pre[3]);
    const float c = fg * prev[1] + ig * zt, tc = tanhf(c);
    const float gc = g[1] + g[0] * og * (1.0f - tc * tc);
    gx[0] = gr[0] = gc * zt * ig * (1.0f - ig);
    gx[1] = gr[1] = gc * prev[1] * fg * (1.0f - fg);
    gx[2] = gr[2] = gc * ig * (1.0f - zt * zt);
    gx[3] = gr[3] = g[0] * tc * og * (1.0f - og);
    g[0] = 0.0f;
    g[1] = gc * fg;
  } else if constexpr (CELL == kGru) {
    const float rg = sigm(pre[0]), zg = sigm(pre[1]);
    const float nn = tanhf(wxn + rg * pre[2]);
    const float ga = g[0] * (1.0f - zg) * (1.0f - nn * nn);
    gx[0] = gr[0] = ga * pre[2] * rg * (1.0f - rg);
    gx[1] = gr[1] = g[0] * (prev[0] - nn) * zg * (1.0f - zg);
    gx[2] = ga;
    gr[2] = ga * rg;
    g[0] = g[0] * zg;
  } else {
    const float it = pre[0], fpre = pre[1], u = logSigmoid(fpre) + prev[3];
    const float zt = tanhf(pre[2]), og = sigm(pre[3]);
    const bool iBranch = prev[2] == 0.0f || it >= u;
    const float m = iBranch ? it : u;
    const bool fClamped = u > m;
    const float ip = expf(it - m), fp = fClamped ? 1.0f : expf(u - m);
    const float c = fp * prev[1] + ip * zt, n = fp * prev[2] + ip;
    const float rn = div(1.0f, n);
    const float gc = g[1] + g[0] * og * rn;
    const float gn = g[2] - g[0] * og * c * rn * rn;
    const float gfp = gc * prev[1] + gn * prev[2], gip = gc * zt + gn;
    const float gfu = fClamped ? 0.0f : gfp * fp;
    const float gm = g[3] - gfu - gip * ip;
    float gi = gip * ip, gu = gfu;
    if (iBranch)
      gi += gm;
    else
      gu += gm;
    gx[0] = gr[0] = gi;
    gx[1] = gr[1] = gu * sigm(-fpre);
    gx[2] = gr[2] = gc * ip * (1.0f - zt * zt);
    gx[3] = gr[3] = g[0] * (c * rn) * og * (1.0f - og);
    g[0] = 0.0f;
    g[1] = gc * fp;
    g[2] = gn * fp;
    g[3] = gu;
  }
}

}  // namespace
}  // namespace rkcuda
