// The Newton-iteration RNN, the generic path (cuda/newton/newton_rnn.cu): dense cells' sequential
// evaluation, and the Newton iteration's linearisation and its scan step.
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
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/scan.cuh"

#include "newton/newton_cells.cuh"

namespace rkcuda {
namespace {

// ---- dense cells: sequential evaluation, a block per (row, head) ----

// R of one head in shared memory (rows padded to ldR) when p.ldR > 0, else read from global.
__device__ __forceinline__ const float* headWeights(const Params& p, int G, int64_t head, float* smem, int& ld,
                                                    int64_t& gStride) {
  const int D = static_cast<int>(p.headDim);
  if (p.ldR > 0) {
    for (int64_t e = threadIdx.x; e < static_cast<int64_t>(G) * D * D; e += blockDim.x) {
      const int64_t g = e / (static_cast<int64_t>(D) * D), rem = e - g * D * D, i = rem / D, j = rem - i * D;
      smem[(g * D + i) * p.ldR + j] = __ldg(p.R + ((g * p.heads + head) * D + i) * D + j);
    }
    ld = p.ldR;
    gStride = static_cast<int64_t>(D) * p.ldR;
    return smem;
  }
  ld = D;
  gStride = p.heads * static_cast<int64_t>(D) * D;
  return p.R + head * static_cast<int64_t>(D) * D;
}

template <NewtonCell C, class T> __global__ void denseSequentialKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.headDim);
  const int64_t k = static_cast<int64_t>(blockIdx.x) / p.heads, head = static_cast<int64_t>(blockIdx.x) % p.heads;
  const int64_t row = p.rows != nullptr ? p.rows[k] : k;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  float* sh = smem;  // h_{t-1}, D floats
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + ((D + 3) & ~3), ld, gs);
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h);
  if (active) sh[j] = h[0];
  __syncthreads();
  for (int64_t t = 0; t < p.T; ++t) {
    float out[kMaxS];
    if (active) {
      float x[kMaxG], r[kMaxG];
      loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) r[g] = rb[g];
      for (int i = 0; i < D; ++i) {
        const float hi = sh[i];
#pragma unroll
        for (int g = 0; g < G; ++g) r[g] = fmaf(hi, Rh[g * gs + static_cast<int64_t>(i) * ld + j], r[g]);
      }
      Act a;
      cellForward<C>(x, r, h, a, out);
      storeTraj<C>(p, row, t, n, out);
#pragma unroll
      for (int s = 0; s < S; ++s) h[s] = out[s];
    }
    __syncthreads();
    if (active) sh[j] = h[0];
    __syncthreads();
  }
}

// ---- the generic Newton path (dense cells, damping) ----

// Writes the linearisation of f at the current iterate (or, with fromH0, the one-step guess) for one
// element, given the input and recurrent parts, and folds its check into ok / res.
template <NewtonCell C>
__device__ __forceinline__ void evalElement(const Params& p, int64_t row, int64_t t, int64_t n, const float (&x)[kMaxG],
                                            const float (&r)[kMaxG], const float (&Rd)[kMaxG], const float (&hp)[kMaxS],
                                            bool& ok, float& res) {
  constexpr int S = CellInfo<C>::S, K = S * S + S;
  Act a;
  float out[kMaxS];
  cellForward<C>(x, r, hp, a, out);
  if (p.fromH0) {
    storeTraj<C>(p, row, t, n, out);
    return;
  }
  float J[kMaxS][kMaxS], cur[kMaxS];
  loadTraj<C>(p.traj, p, row, t, n, cur);
  if (p.full) {
    using F = FullCoef<C>;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      checkElem(p, out[i], cur[i], ok, res);
      float e[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) e[s] = s == i ? 1.0f : 0.0f;
      cellVjp<C>(r, hp, a, e, gx, gr, gp);
#pragma unroll
      for (int s = 0; s < S; ++s) p.jc[at4(row, t, i * F::W + s, n, p.T, F::K, p.N)] = gp[s];
#pragma unroll
      for (int g = 0; g < F::G; ++g) p.jc[at4(row, t, i * F::W + S + g, n, p.T, F::K, p.N)] = gr[g];
      p.jc[at4(row, t, S * F::W + i, n, p.T, F::K, p.N)] = out[i] - cur[i];
    }
    return;
  }
  cellJacobian<C>(r, hp, a, Rd, J);
#pragma unroll
  for (int i = 0; i < S; ++i) {
    checkElem(p, out[i], cur[i], ok, res);
    float c = out[i];
#pragma unroll
    for (int jj = 0; jj < S; ++jj) {
      p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)] = J[i][jj];
      c = fmaf(-J[i][jj], hp[jj], c);
    }
    p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)] = c;
  }
}

__device__ __forceinline__ bool rowDone(const Params& p, int64_t row) { return p.rowState[p.batch + row] != 0; }

__device__ __forceinline__ void writePartial(const Params& p, bool ok, float res) {
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  bool allOk;
  float maxRes;
  blockCheck(ok, res, sOk, sRes, allOk, maxRes);
  if (threadIdx.x == 0) {
    p.partial[2 * static_cast<int64_t>(blockIdx.x)] = allOk ? 1.0f : 0.0f;
    p.partial[2 * static_cast<int64_t>(blockIdx.x) + 1] = maxRes;
  }
}

// Diagonal cells: one element per thread; blocksPerRow blocks of 256 per row.
template <NewtonCell C, class T> __global__ void evalDiagKernel(Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  if (rowDone(p, row)) return;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  bool ok = true;
  float res = 0.0f;
  if (e < p.T * p.N) {
    const int64_t t = e / p.N, n = e - t * p.N;
    float xb[kMaxG], rb[kMaxG], Rd[kMaxG], hp[kMaxS], x[kMaxG], r[kMaxG];
    channelConsts<C>(p, n, xb, rb, Rd);
    if (t == 0 || p.fromH0)
      loadH0<C>(p, row, n, hp);
    else
      loadTraj<C>(p.traj, p, row, t - 1, n, hp);
    loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
    evalElement<C>(p, row, t, n, x, r, Rd, hp, ok, res);
  }
  writePartial(p, ok, res);
}

// Dense cells: a block of 256 threads per (row, 32 positions, head, 32 channels); rec = h_{t-1} @ R
// through shared-memory tiles of 32 inputs; warp w takes positions 4w .. 4w+3, lane = channel.
template <NewtonCell C, class T> __global__ void __launch_bounds__(256) evalDenseKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  __shared__ float sH[kTile][kTile + 1];
  __shared__ float sR[G][kTile][kTile];
  const int64_t tTiles = ceilDiv(p.T, kTile), jTiles = ceilDiv(p.headDim, kTile);
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / p.blocksPerRow;
  if (rowDone(p, row)) return;
  blk -= row * p.blocksPerRow;
  const int64_t tt = blk / (p.heads * jTiles);
  blk -= tt * p.heads * jTiles;
  const int64_t head = blk / jTiles, jt = blk - head * jTiles;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t j = jt * kTile + lane, n = head * p.headDim + j;
  float acc[4][kMaxG];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) acc[q][g] = 0.0f;
  for (int64_t i0 = 0; i0 < p.headDim; i0 += kTile) {
    // h_{t-1} for the tile's 32 positions and inputs i0 .. i0+31; R[g][head][i][j] for the tile.
    for (int e = tid; e < kTile * kTile; e += 256) {
      const int q = e / kTile, ii = e % kTile;
      const int64_t t = tt * kTile + q, i = i0 + ii;
      float v = 0.0f;
      if (t < p.T && i < p.headDim) {
        const int64_t ni = head * p.headDim + i;
        if (t == 0 || p.fromH0)
          v = p.h0 != nullptr ? p.h0[row * p.N + ni] : 0.0f;
        else
          v = p.traj[at4(row, t - 1, 0, ni, p.T, S, p.N)];
      }
      sH[q][ii] = v;
    }
    for (int e = tid; e < G * kTile * kTile; e += 256) {
      const int g = e / (kTile * kTile), ii = (e / kTile) % kTile, jj = e % kTile;
      const int64_t i = i0 + ii, jc = jt * kTile + jj;
      sR[g][ii][jj] = (i < p.headDim && jc < p.headDim)
                          ? __ldg(p.R + ((g * p.heads + head) * p.headDim + i) * p.headDim + jc)
                          : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int ii = 0; ii < kTile; ++ii) {
      float rv[G];
#pragma unroll
      for (int g = 0; g < G; ++g) rv[g] = sR[g][ii][lane];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float hv = sH[warp * 4 + q][ii];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[q][g] = fmaf(hv, rv[g], acc[q][g]);
      }
    }
    __syncthreads();
  }
  bool ok = true;
  float res = 0.0f;
  if (j < p.headDim) {
    float xb[kMaxG], rb[kMaxG], Rd[kMaxG];
    channelConsts<C>(p, n, xb, rb, Rd);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t t = tt * kTile + warp * 4 + q;
      if (t < p.T) {
        float x[kMaxG], r[kMaxG], hp[kMaxS];
        if (t == 0 || p.fromH0)
          loadH0<C>(p, row, n, hp);
        else
          loadTraj<C>(p.traj, p, row, t - 1, n, hp);
        loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) r[g] = acc[q][g] + rb[g];
        evalElement<C>(p, row, t, n, x, r, Rd, hp, ok, res);
      }
    }
  }
  writePartial(p, ok, res);
}

// Per row: the check's verdict. Converged rows and rows out of steps are done; the others take a step.
__global__ void finalizeKernel(Params p) {
  const int64_t row = blockIdx.x;
  if (rowDone(p, row)) return;
  bool ok = true;
  float res = 0.0f;
  for (int64_t k = threadIdx.x; k < p.blocksPerRow; k += blockDim.x) {
    const int64_t blk = row * p.blocksPerRow + k;
    ok = ok && p.partial[2 * blk] != 0.0f;
    res = maxNan(res, p.partial[2 * blk + 1]);
  }
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  bool allOk;
  float maxRes;
  blockCheck(ok, res, sOk, sRes, allOk, maxRes);
  if (threadIdx.x == 0) {
    int* it = p.rowState + row;
    int* done = p.rowState + p.batch + row;
    int* conv = p.rowState + 2 * p.batch + row;
    p.rowState[3 * p.batch + row] = static_cast<int>(__float_as_uint(maxRes));
    if (allOk) {
      *conv = 1;
      *done = 1;
    } else if (*it >= p.maxIters) {
      *done = 1;
    } else {
      *it += 1;
    }
  }
}

// The plain Newton step with the per-channel Jacobians: h_t = J_t h_{t-1} + c_t per (row, channel),
// parallel in time. Same layout as the fused kernels: a block owns CW channels of one row, NS =
// threads / CW time slices of L = ceil(T / NS) steps, a thread per (channel, slice). Pass 1 composes
// the slice's maps (common/scan.cuh AffineN); the aggregates meet in shared memory, where each
// thread composes those of the slices before its own onto h0; pass 2 applies the maps from there.
template <NewtonCell C> __global__ void __launch_bounds__(kFusedThreads) scanStepKernel(Params p) {
  constexpr int S = CellInfo<C>::S, K = S * S + S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  const int tid = static_cast<int>(threadIdx.x), CW = p.chan, NS = static_cast<int>(blockDim.x) / CW;
  const int lc = tid % CW, slice = tid / CW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  if (rowDone(p, row)) return;  // the whole block
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * CW + lc;
  const int64_t L = ceilDiv(p.T, NS);
  const int64_t t0 = minI(p.T, slice * L), t1 = minI(p.T, t0 + L);
  const bool work = n < p.N && t0 < t1;
  auto mapAt = [&](int64_t t) {
    Map m;
#pragma unroll
    for (int i = 0; i < S; ++i) {
#pragma unroll
      for (int jj = 0; jj < S; ++jj) m.a[i][jj] = p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)];
      m.b[i] = p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)];
    }
    return m;
  };
  Map agg = scan::identityN<S>();
  if (work) {
    for (int64_t t = t0; t < t1; ++t) agg = scan::compose(agg, mapAt(t));
  }
  sAgg[tid] = agg;
  __syncthreads();
  if (!work) return;
  float h[S], h0v[kMaxS];
  loadH0<C>(p, row, n, h0v);
#pragma unroll
  for (int s = 0; s < S; ++s) h[s] = h0v[s];
  for (int w = 0; w < slice; ++w) {
    float nx[S];
    scan::apply(sAgg[w * CW + lc], h, nx);
#pragma unroll
    for (int s = 0; s < S; ++s) h[s] = nx[s];
  }
  for (int64_t t = t0; t < t1; ++t) {
    float nx[S], out[kMaxS];
    scan::apply(mapAt(t), h, nx);
#pragma unroll
    for (int s = 0; s < S; ++s) h[s] = out[s] = nx[s];
    storeTraj<C>(p, row, t, n, out);
  }
}

}  // namespace
}  // namespace rkcuda
