// The fused cells' weight gradients (cuda/cells/fused_rnn.cu): dR and db summed over the steps and
// batch rows.
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

// ============================== dR and db ==============================

// Block = (split, gate*head matrix, i tile, j tile); partial sums over its share of the t*batch rows n:
//   partR[split][mat][i][j] = sum_n h_{t-1}[n][i] gr[n][mat][j],  partB[split][mat][j] = sum_n gr[n][mat][j]
// (partB written by the blocks of i tile 0). 16-bit dtypes: tf32 mma; fp32: FMA.
template <bool TF32>
__global__ void __launch_bounds__(256)
    reduceGradKernel(RnnParams p, int S, int G, int64_t splits, int64_t rowsPerSplit, float* partR, float* partB) {
  __shared__ __align__(16) float hs[kRedChunk][kRedTile + 4];
  __shared__ __align__(16) float gs[kRedChunk][kRedTile + 4];
  const int64_t H = p.heads, D = p.headDim, batch = p.batch, N = p.T * p.batch, mats = G * H;
  const int64_t tiles = ceilDiv(D, kRedTile);
  unsigned blk = blockIdx.x;
  const int64_t tj = blk % static_cast<unsigned>(tiles);
  blk /= static_cast<unsigned>(tiles);
  const int64_t ti = blk % static_cast<unsigned>(tiles);
  blk /= static_cast<unsigned>(tiles);
  const int64_t mat = blk % static_cast<unsigned>(mats), split = blk / static_cast<unsigned>(mats);
  const bool narrow = N < INT_MAX;  // 32-bit divisions below
  const int64_t hh = mat % H, i0 = ti * kRedTile, j0 = tj * kRedTile;
  const int64_t n0 = split * rowsPerSplit, n1 = n0 + rowsPerSplit < N ? n0 + rowsPerSplit : N;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;
  const int mt = warp >> 1, ntBase = (warp & 1) * 4;  // rows i: mt*16.., columns j: (ntBase+q)*8..
  float acc[4][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = 0.0f;
  }
  float dbAcc = 0.0f;
  for (int64_t nc = n0; nc < n1; nc += kRedChunk) {
    for (int e = tid; e < kRedChunk * kRedTile; e += 256) {
      const int r = e / kRedTile, c = e % kRedTile;
      const int64_t n = nc + r;
      const int64_t t =
          narrow ? static_cast<int64_t>(static_cast<unsigned>(n) / static_cast<unsigned>(batch)) : n / batch;
      const int64_t b = n - t * batch;
      float hv = 0.0f, gv = 0.0f;
      if (n < n1) {
        if (i0 + c < D) {
          hv = t > 0                  ? p.cSavedStates[(((t - 1) * S * batch + b) * H + hh) * D + i0 + c]
               : p.states0 != nullptr ? p.states0[(b * H + hh) * D + i0 + c]
                                      : 0.0f;
        }
        if (j0 + c < D) gv = p.gr[(n * mats + mat) * D + j0 + c];
      }
      hs[r][c] = hv;
      gs[r][c] = gv;
    }
    __syncthreads();
    if constexpr (TF32) {
      for (int k0 = 0; k0 < kRedChunk; k0 += 8) {
        const mma::FragATf32 fa = mma::loadATf32([&](int r, int c) { return hs[k0 + c][mt * 16 + r]; });
        for (int q = 0; q < 4; ++q) {
          const int nb = (ntBase + q) * 8;
          const mma::FragBTf32 fb = mma::loadBTf32([&](int k, int n) { return gs[k0 + k][nb + n]; });
          mma::FragC c;
          for (int e = 0; e < 4; ++e) c.c[e] = acc[q][e];
          mma::mma1688tf32(c, fa, fb);
          for (int e = 0; e < 4; ++e) acc[q][e] = c.c[e];
        }
      }
    } else {
      const int g = mma::lane() >> 2, tq = mma::lane() & 3;
      for (int k = 0; k < kRedChunk; ++k) {
        const float a0 = hs[k][mt * 16 + g], a1 = hs[k][mt * 16 + g + 8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int nb = (ntBase + q) * 8 + 2 * tq;
          const float b0 = gs[k][nb], b1 = gs[k][nb + 1];
          acc[q][0] = fmaf(a0, b0, acc[q][0]);
          acc[q][1] = fmaf(a0, b1, acc[q][1]);
          acc[q][2] = fmaf(a1, b0, acc[q][2]);
          acc[q][3] = fmaf(a1, b1, acc[q][3]);
        }
      }
    }
    if (ti == 0 && tid < kRedTile) {
      for (int r = 0; r < kRedChunk; ++r) dbAcc += gs[r][tid];
    }
    __syncthreads();
  }
  float* out = partR + (split * mats + mat) * D * D;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    mma::storeC(mma::FragC{{acc[q][0], acc[q][1], acc[q][2], acc[q][3]}}, [&](int r, int c, float v) {
      const int64_t i = i0 + mt * 16 + r, j = j0 + (ntBase + q) * 8 + c;
      if (i < D && j < D) out[i * D + j] = v;
    });
  }
  if (ti == 0 && tid < kRedTile && j0 + tid < D) partB[(split * mats + mat) * D + j0 + tid] = dbAcc;
}

// dR (dtype T) and db (fp32): the partial sums of every split added in order.
template <class T>
__global__ void __launch_bounds__(256)
    finishGradKernel(const float* partR, const float* partB, int64_t splits, int64_t nR, int64_t nB, T* dR, float* db) {
  for (int64_t e = blockIdx.x * int64_t{256} + threadIdx.x; e < nR + nB; e += int64_t{gridDim.x} * 256) {
    float s = 0.0f;
    if (e < nR) {
      for (int64_t k = 0; k < splits; ++k) s += partR[k * nR + e];
      storeScalar(dR + e, s);
    } else {
      for (int64_t k = 0; k < splits; ++k) s += partB[k * nB + e - nR];
      db[e - nR] = s;
    }
  }
}

}  // namespace
}  // namespace rkcuda
