// The fused cells' stepwise kernels (cuda/cells/fused_rnn.cu): one launch per step, for heads no
// persistent path holds.
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

#include "cells/fused_rnn_cells.cuh"

namespace rkcuda {
namespace {

// ============================== the stepwise kernels ==============================

// The per-step product of a stepwise block, whose kStepThreads threads are kStepCols columns times
// kKGroups groups of k: group kg takes k = kg, kg + kKGroups, ... of every staged chunk, then the groups'
// partial sums are added in a fixed order. Leaves in sums[g][r][c] (shared memory) the sum over k < D
// of src(r, g, k) W[g][k][j0 + c] for the block's kStepRows rows r, with src(r, g, k) =
// x[r * rowStride + g * gStride + k] (zero for rows r >= rowsValid; all zero when x is null) and W[g]
// at w + g * wGateStride, row-major D x D (fp32 or the input dtype).
template <int G, class W>
__device__ __forceinline__ void stepProduct(float (&sums)[4][kKGroups][kStepRows][kStepCols], const float* x,
                                            int64_t rowStride, int64_t gStride, int rowsValid, const W* w,
                                            int64_t wGateStride, int64_t D, int64_t j0) {
  __shared__ float xs[kStepRows][kStepChunk];
  const int tid = static_cast<int>(threadIdx.x), kg = tid / kStepCols, c = tid % kStepCols;
  const int64_t j = j0 + c;
  float acc[G][kStepRows];
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int r = 0; r < kStepRows; ++r) acc[g][r] = 0.0f;
  }
  if (x != nullptr) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      for (int64_t k0 = 0; k0 < D; k0 += kStepChunk) {
        const int kn = static_cast<int>(D - k0 < kStepChunk ? D - k0 : kStepChunk);
        for (int e = tid; e < kStepRows * kStepChunk; e += kStepThreads) {
          const int r = e / kStepChunk, k = e % kStepChunk;
          xs[r][k] = (r < rowsValid && k < kn) ? x[r * rowStride + g * gStride + k0 + k] : 0.0f;
        }
        __syncthreads();
        if (j < D) {
          const W* wp = w + g * wGateStride + k0 * D + j;
#pragma unroll 4
          for (int k = kg; k < kn; k += kKGroups) {
            const float wv = toFloat(wp[k * D]);
#pragma unroll
            for (int r = 0; r < kStepRows; ++r) acc[g][r] = fmaf(xs[r][k], wv, acc[g][r]);
          }
        }
        __syncthreads();
      }
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int r = 0; r < kStepRows; ++r) sums[g][kg][r][c] = acc[g][r];
  }
  __syncthreads();
  for (int e = tid; e < G * kStepRows * kStepCols; e += kStepThreads) {
    const int g = e / (kStepRows * kStepCols), r = (e / kStepCols) % kStepRows, cc = e % kStepCols;
    float v = sums[g][0][r][cc];
    for (int k = 1; k < kKGroups; ++k) v += sums[g][k][r][cc];
    sums[g][0][r][cc] = v;
  }
  __syncthreads();
}

// A stepwise block's tile: head hh, kStepCols channels j0.., kStepRows batch rows row0.. (rowsValid of
// them in the batch); the thread's (row r, channel c) of the tile, j = j0 + c.
struct StepTile {
  int64_t hh, j0, row0, j;
  int rowsValid, r, c;
};
__device__ __forceinline__ StepTile stepTileOf(const RnnParams& p) {
  const unsigned colBlocks = static_cast<unsigned>(ceilDiv(p.headDim, kStepCols)), blk = blockIdx.x;
  const unsigned Hu = static_cast<unsigned>(p.heads);
  StepTile s;
  s.hh = blk % Hu;
  s.j0 = static_cast<int64_t>((blk / Hu) % colBlocks) * kStepCols;
  s.row0 = static_cast<int64_t>(blk / Hu / colBlocks) * kStepRows;
  s.rowsValid = static_cast<int>(p.batch - s.row0 < kStepRows ? p.batch - s.row0 : kStepRows);
  s.r = static_cast<int>(threadIdx.x) / kStepCols;
  s.c = static_cast<int>(threadIdx.x) % kStepCols;
  s.j = s.j0 + s.c;
  return s;
}

// Block = (head, tile of kStepRows rows, tile of kStepCols channels); thread = one (row, channel) of
// the tile for the cell update. hPrev / hNext: fp32 [batch, H, D]; st: fp32 [S, batch, H, D], the
// states 1..S-1 (slot 0 unused), updated in place.
template <class T, int CELL>
__global__ void __launch_bounds__(kStepThreads)
    fusedRnnForwardStepKernel(RnnParams p, int64_t t, const float* hPrev, float* hNext, float* st) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  __shared__ float sums[4][kKGroups][kStepRows][kStepCols];
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  const StepTile tile = stepTileOf(p);
  const int64_t hh = tile.hh, row0 = tile.row0, j = tile.j;
  const int r = tile.r, c = tile.c;
  stepProduct<G>(sums, hPrev + (row0 * H + hh) * D, H * D, 0, tile.rowsValid, static_cast<const T*>(p.R) + hh * D * D,
                 H * D * D, D, tile.j0);
  if (j >= D || r >= tile.rowsValid) return;
  const T* wx = static_cast<const T*>(p.wx);
  const int64_t b = row0 + r, o = (b * H + hh) * D + j;
  const bool active = t < lengthOf(p, b);
  float sv[S], pre[G], wxn = 0.0f;
  sv[0] = hPrev[o];
#pragma unroll
  for (int k = 1; k < S; ++k) sv[k] = st[k * batch * H * D + o];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float x = active ? toFloat(wx[(((b * L + t) * G + g) * H + hh) * D + j]) : 0.0f;
    const float bg = p.b[(g * H + hh) * D + j];
    const float rec = sums[g][0][r][c];
    pre[g] = (CELL == kGru && g == 2) ? rec + bg : x + bg + rec;
    if (g == G - 1) wxn = x;
  }
  if (active) cellForward<CELL>(pre, wxn, sv);
  hNext[o] = sv[0];
#pragma unroll
  for (int k = 1; k < S; ++k) st[k * batch * H * D + o] = sv[k];
  if (!p.returnLastOnly) storeScalar(static_cast<T*>(p.h) + ((b * L + t) * H + hh) * D + j, active ? sv[0] : 0.0f);
  if (p.savedStates != nullptr) {
#pragma unroll
    for (int k = 0; k < S; ++k) p.savedStates[(((t * S + k) * batch + b) * H + hh) * D + j] = sv[k];
#pragma unroll
    for (int g = 0; g < G; ++g) p.savedPre[(((t * batch + b) * G + g) * H + hh) * D + j] = active ? pre[g] : 0.0f;
  }
}

// Reverse step t (or, with t = -1, the final pass that writes dStates0) for the stepwise path. gS: fp32
// [S, batch, H, D], dL/d(states after step t), updated in place; Rt: fp32 [G, H, D, D], Rt[g][hh][j][i] =
// R[g][hh][i][j]. Adds the recurrent part from step t + 1's dpre (p.gr at t + 1) first.
template <class T, int CELL>
__global__ void __launch_bounds__(kStepThreads)
    fusedRnnBackwardStepKernel(RnnParams p, int64_t t, const float* Rt, float* gS) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  __shared__ float sums[4][kKGroups][kStepRows][kStepCols];
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  const StepTile tile = stepTileOf(p);
  const int64_t hh = tile.hh, row0 = tile.row0, j = tile.j;
  const int r = tile.r, c = tile.c;
  const float* next = t + 1 < L ? p.gr + (((t + 1) * batch + row0) * G * H + hh) * D : nullptr;
  stepProduct<G>(sums, next, G * H * D, H * D, tile.rowsValid, Rt + hh * D * D, H * D * D, D, tile.j0);
  if (j >= D || r >= tile.rowsValid) return;
  const T* wx = static_cast<const T*>(p.wx);
  const T* dh = static_cast<const T*>(p.dh);
  const int64_t SE = batch * H * D;
  const int64_t b = row0 + r, o = (b * H + hh) * D + j;
  float g[S];
#pragma unroll
  for (int s = 0; s < S; ++s) g[s] = gS[s * SE + o];
#pragma unroll
  for (int k = 0; k < G; ++k) g[0] += sums[k][0][r][c];
  if (t < 0) {
    if (p.dStates0 != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) p.dStates0[s * SE + o] = g[s];
    }
    return;
  }
  const bool active = t < lengthOf(p, b);
  float gx[G], gr[G];
#pragma unroll
  for (int k = 0; k < G; ++k) gx[k] = gr[k] = 0.0f;
  if (active) {
    float pre[G], prev[S];
#pragma unroll
    for (int k = 0; k < G; ++k) pre[k] = p.cSavedPre[(((t * batch + b) * G + k) * H + hh) * D + j];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      prev[s] = t > 0                  ? p.cSavedStates[((((t - 1) * S + s) * batch + b) * H + hh) * D + j]
                : p.states0 != nullptr ? p.states0[s * SE + o]
                                       : 0.0f;
    }
    if (!p.returnLastOnly && dh != nullptr) g[0] += toFloat(dh[((b * L + t) * H + hh) * D + j]);
    const float wxn = CELL == kGru ? toFloat(wx[(((b * L + t) * G + G - 1) * H + hh) * D + j]) : 0.0f;
    cellBackward<CELL>(pre, wxn, prev, g, gx, gr);
  }
#pragma unroll
  for (int s = 0; s < S; ++s) gS[s * SE + o] = g[s];
#pragma unroll
  for (int k = 0; k < G; ++k) {
    p.gr[(((t * batch + b) * G + k) * H + hh) * D + j] = gr[k];
    storeScalar(static_cast<T*>(p.dwx) + (((b * L + t) * G + k) * H + hh) * D + j, gx[k]);
  }
}

// Stepwise forward set-up: h (hA) and the other states (st) from states0 or zeros.
__global__ void __launch_bounds__(256)
    initStatesKernel(const float* states0, float* hA, float* st, int64_t S, int64_t SE) {
  for (int64_t e = blockIdx.x * int64_t{256} + threadIdx.x; e < S * SE; e += int64_t{gridDim.x} * 256) {
    const float v = states0 != nullptr ? states0[e] : 0.0f;
    if (e < SE)
      hA[e] = v;
    else
      st[e] = v;
  }
}

// Stepwise forward finish: finalStates and (returnLastOnly) h from the last states.
template <class T>
__global__ void __launch_bounds__(256)
    finishForwardKernel(const float* hLast, const float* st, float* finalStates, T* h, int64_t S, int64_t SE) {
  for (int64_t e = blockIdx.x * int64_t{256} + threadIdx.x; e < SE; e += int64_t{gridDim.x} * 256) {
    if (h != nullptr) storeScalar(h + e, hLast[e]);
    if (finalStates != nullptr) {
      for (int64_t s = 0; s < S; ++s) finalStates[s * SE + e] = s == 0 ? hLast[e] : st[s * SE + e];
    }
  }
}

// Stepwise backward set-up: gS = dFinal (or 0), plus dh on h with returnLastOnly.
template <class T>
__global__ void __launch_bounds__(256)
    initGradKernel(const float* dFinal, const T* dhLast, float* gS, int64_t S, int64_t SE) {
  for (int64_t e = blockIdx.x * int64_t{256} + threadIdx.x; e < S * SE; e += int64_t{gridDim.x} * 256) {
    float v = dFinal != nullptr ? dFinal[e] : 0.0f;
    if (e < SE && dhLast != nullptr) v += toFloat(dhLast[e]);
    gS[e] = v;
  }
}

// Rt[g][hh][j][i] = R[g][hh][i][j] in fp32 (stepwise backward).
template <class T>
__global__ void __launch_bounds__(256) transposeRKernel(const T* R, float* Rt, int64_t mats, int64_t D) {
  for (int64_t e = blockIdx.x * int64_t{256} + threadIdx.x; e < mats * D * D; e += int64_t{gridDim.x} * 256) {
    const int64_t m = e / (D * D), i = (e / D) % D, j = e % D;
    Rt[(m * D + j) * D + i] = toFloat(R[e]);
  }
}

}  // namespace
}  // namespace rkcuda
