// The Newton-iteration RNN's backward kernels (cuda/newton/newton_rnn.cu): the reverse-time adjoint
// of the diagonal and the dense cells. Uses the generic path's row and weight helpers.
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

#include "newton/newton_generic.cuh"

namespace rkcuda {
namespace {

// ---- backward ----

// Diagonal cells: the reverse-time adjoint in slices (see the header). Same thread layout as the
// fused forward kernel.
template <NewtonCell C, class T> __global__ void __launch_bounds__(kFusedThreads) diagBackwardKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  __shared__ float sAcc[2 * kMaxG][kFusedThreads];
  const SliceThread th = sliceThread(p);
  const T* dy = static_cast<const T*>(p.dy);
  T* dwx = static_cast<T*>(p.dwx);

  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) xb[g] = rb[g] = Rd[g] = 0.0f;
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) h0v[s] = 0.0f;
  if (th.active) {
    channelConsts<C>(p, th.n, xb, rb, Rd);
    loadH0<C>(p, th.row, th.n, h0v);
  }
  // dL/dtraj_t from the outputs: dy on the h state, dFinal at the last step.
  auto direct = [&](int64_t t, float(&g)[kMaxS]) {
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) g[s] = 0.0f;
    if (dy != nullptr) g[0] = loadScalar<T>(dy + (th.row * p.T + t) * p.N + th.n);
    if (t == p.T - 1 && p.dFinal != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) g[s] += p.dFinal[(s * p.batch + th.row) * p.N + th.n];
    }
  };
  // J_u^T at step u (prev = traj_{u-1}).
  auto jacAt = [&](int64_t u, float(&J)[kMaxS][kMaxS]) {
    float x[kMaxG], hp[kMaxS], f[kMaxS];
    loadX<C, T>(p, th.row, u, th.n, xb, x);
    loadPrev<C>(p, th.row, u, th.n, h0v, hp);
    linDiag<C>(x, Rd, rb, hp, f, J);
  };

  // Pass 1: the slice's composed map lambda_{t0} = A lambda_{t1} + b, maps applied from t1-1 down.
  Map agg = scan::identityN<S>();
  // Step t's loads: dL/dtraj_t from the outputs, and the inputs of step t + 1 (its Jacobian).
  struct Pass1Loads {
    float g[kMaxS], x[kMaxG], hp[kMaxS];
  };
  auto pass1Load = [&](int64_t t, Pass1Loads& l) {
    direct(t, l.g);
    if (t + 1 < p.T) {
      loadX<C, T>(p, th.row, t + 1, th.n, xb, l.x);
      loadPrev<C>(p, th.row, t + 1, th.n, h0v, l.hp);
    }
  };
  if (th.work) {
    pipelinedSteps<Pass1Loads>(th.t1 - 1, th.t1 - th.t0, -1, pass1Load, [&](int64_t t, const Pass1Loads& l) {
      Map m;
      float J[kMaxS][kMaxS];
      if (t + 1 < p.T) {
        float f[kMaxS];
        linDiag<C>(l.x, Rd, rb, l.hp, f, J);
      } else {
#pragma unroll
        for (int i = 0; i < kMaxS; ++i)
#pragma unroll
          for (int jj = 0; jj < kMaxS; ++jj) J[i][jj] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < S; ++i) {
#pragma unroll
        for (int jj = 0; jj < S; ++jj) m.a[i][jj] = J[jj][i];
        m.b[i] = l.g[i];
      }
      agg = scan::compose(agg, m);
    });
  }
  sAgg[th.tid] = agg;
  __syncthreads();
  // lambda_{t1}: the later slices' maps applied to lambda_T = 0, from the last slice down.
  float lam[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) lam[s] = 0.0f;
  if (th.work) {
    for (int w = th.NS - 1; w > th.slice; --w) {
      float cur[S], nx[S];
#pragma unroll
      for (int s = 0; s < S; ++s) cur[s] = lam[s];
      scan::apply(sAgg[w * th.CW + th.lc], cur, nx);
#pragma unroll
      for (int s = 0; s < S; ++s) lam[s] = nx[s];
    }
  }
  // Pass 2: down = J_{t+1}^T lambda_{t+1}; lambda_t = direct + down; the VJP of step t.
  float accR[kMaxG], accB[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) accR[g] = accB[g] = 0.0f;
  if (th.work) {
    float down[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) down[s] = 0.0f;
    if (th.t1 < p.T) {
      float J[kMaxS][kMaxS];
      jacAt(th.t1, J);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < S; ++k) v = fmaf(J[k][i], lam[k], v);
        down[i] = v;
      }
    }
    struct Pass2Loads {
      float g[kMaxS], x[kMaxG], hp[kMaxS];
    };
    auto pass2Load = [&](int64_t t, Pass2Loads& l) {
      direct(t, l.g);
      loadX<C, T>(p, th.row, t, th.n, xb, l.x);
      loadPrev<C>(p, th.row, t, th.n, h0v, l.hp);
    };
    pipelinedSteps<Pass2Loads>(th.t1 - 1, th.t1 - th.t0, -1, pass2Load, [&](int64_t t, const Pass2Loads& l) {
      const float(&x)[kMaxG] = l.x;
      const float(&hp)[kMaxS] = l.hp;
      float g[kMaxS], r[kMaxG], out[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] = l.g[s] + down[s];
#pragma unroll
      for (int k = 0; k < kMaxG; ++k) r[k] = fmaf(Rd[k], hp[0], rb[k]);
      Act a;
      cellForward<C>(x, r, hp, a, out);
      cellVjp<C>(r, hp, a, g, gx, gr, gp);
      float viaRec = 0.0f;
#pragma unroll
      for (int k = 0; k < G; ++k) {
        storeScalar<T>(dwx + at4(th.row, t, k, th.n, p.T, G, p.N), gx[k]);
        accR[k] = fmaf(gr[k], hp[0], accR[k]);
        accB[k] += gr[k];
        viaRec = fmaf(gr[k], Rd[k], viaRec);
      }
      down[0] = gp[0] + viaRec;
#pragma unroll
      for (int s = 1; s < kMaxS; ++s) down[s] = gp[s];
    });
    if (th.t0 == 0 && p.dh0 != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) p.dh0[(s * p.batch + th.row) * p.N + th.n] = down[s];
    }
  }
  // dR, db: sum over the slices in shared memory, then one atomic per (channel, gate) and block.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    sAcc[g][th.tid] = accR[g];
    sAcc[kMaxG + g][th.tid] = accB[g];
  }
  __syncthreads();
  if (th.slice == 0 && th.active) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float sr = 0.0f, sb = 0.0f;
      for (int w = 0; w < th.NS; ++w) {
        sr += sAcc[g][w * th.CW + th.lc];
        sb += sAcc[kMaxG + g][w * th.CW + th.lc];
      }
      atomicAdd(p.dR + g * p.N + th.n, sr);
      atomicAdd(p.db + g * p.N + th.n, sb);
    }
  }
}

// Dense cells: exact BPTT per (row, head) in reverse time; d rec to scratch for dR and db.
template <NewtonCell C, class T> __global__ void denseBackwardKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.headDim);
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.heads, head = static_cast<int64_t>(blockIdx.x) % p.heads;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  const int Dp = (D + 3) & ~3;
  float* sh = smem;        // h_{t-1}
  float* sdr = smem + Dp;  // d rec, [G][D]
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + Dp + G * Dp, ld, gs);
  const T* dy = static_cast<const T*>(p.dy);
  T* dwx = static_cast<T*>(p.dwx);
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h0v);
  float down[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    down[s] = (s < S && p.dFinal != nullptr && active) ? p.dFinal[(s * p.batch + row) * p.N + n] : 0.0f;
  for (int64_t t = p.T - 1; t >= 0; --t) {
    float hp[kMaxS];
    loadPrev<C>(p, row, t, n, h0v, hp);
    __syncthreads();
    if (active) sh[j] = hp[0];
    __syncthreads();
    float gp[kMaxS];
    if (active) {
      float x[kMaxG], r[kMaxG], g[kMaxS], out[kMaxS], gx[kMaxG], gr[kMaxG];
      loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
      for (int k = 0; k < kMaxG; ++k) r[k] = rb[k];
      for (int i = 0; i < D; ++i) {
        const float hi = sh[i];
#pragma unroll
        for (int k = 0; k < G; ++k) r[k] = fmaf(hi, Rh[k * gs + static_cast<int64_t>(i) * ld + j], r[k]);
      }
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] = down[s];
      if (dy != nullptr) g[0] += loadScalar<T>(dy + (row * p.T + t) * p.N + n);
      Act a;
      cellForward<C>(x, r, hp, a, out);
      cellVjp<C>(r, hp, a, g, gx, gr, gp);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        storeScalar<T>(dwx + at4(row, t, k, n, p.T, G, p.N), gx[k]);
        p.drec[at4(row, t, k, n, p.T, G, p.N)] = gr[k];
        sdr[k * Dp + j] = gr[k];
      }
    }
    __syncthreads();
    if (active) {
      // d h_{t-1}[j] = direct + sum_g sum_k R[g][j][k] drec[g][k].
      float v = gp[0];
      for (int k = 0; k < D; ++k) {
#pragma unroll
        for (int g = 0; g < G; ++g) v = fmaf(Rh[g * gs + static_cast<int64_t>(j) * ld + k], sdr[g * Dp + k], v);
      }
      down[0] = v;
#pragma unroll
      for (int s = 1; s < kMaxS; ++s) down[s] = gp[s];
    }
  }
  if (active && p.dh0 != nullptr) {
#pragma unroll
    for (int s = 0; s < S; ++s) p.dh0[(s * p.batch + row) * p.N + n] = down[s];
  }
}

// dR[g][head][i][j] = sum over (row, t) of h_{t-1}[head, i] drec[row, t, g, head, j]: a block of 256
// threads per (g, head, 32 x 32 tile), each thread 4 outputs (rows i, lane j).
__global__ void __launch_bounds__(256) denseGradRKernel(Params p, int G, int S) {
  __shared__ float sA[kTile][kTile + 1];
  __shared__ float sB[kTile][kTile + 1];
  const int64_t tiles = ceilDiv(p.headDim, kTile);
  int64_t blk = blockIdx.x;
  const int64_t g = blk / (p.heads * tiles * tiles);
  blk -= g * p.heads * tiles * tiles;
  const int64_t head = blk / (tiles * tiles);
  blk -= head * tiles * tiles;
  const int64_t it = blk / tiles, jt = blk - it * tiles;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t BT = p.batch * p.T;
  for (int64_t k0 = 0; k0 < BT; k0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += 256) {
      const int q = e / kTile, c = e % kTile;
      const int64_t bt = k0 + q;
      float a = 0.0f, bv = 0.0f;
      if (bt < BT) {
        const int64_t row = bt / p.T, t = bt - row * p.T;
        const int64_t i = it * kTile + c, jj = jt * kTile + c;
        if (i < p.headDim) {
          const int64_t ni = head * p.headDim + i;
          a = t == 0 ? (p.h0 != nullptr ? p.h0[row * p.N + ni] : 0.0f) : p.traj[((bt - 1) * S) * p.N + ni];
        }
        if (jj < p.headDim) bv = p.drec[(bt * G + g) * p.N + head * p.headDim + jj];
      }
      sA[q][c] = a;
      sB[q][c] = bv;
    }
    __syncthreads();
#pragma unroll 4
    for (int q = 0; q < kTile; ++q) {
      const float bv = sB[q][lane];
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[m] = fmaf(sA[q][warp * 4 + m], bv, acc[m]);
    }
    __syncthreads();
  }
  const int64_t j = jt * kTile + lane;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t i = it * kTile + warp * 4 + m;
    if (i < p.headDim && j < p.headDim) p.dR[((g * p.heads + head) * p.headDim + i) * p.headDim + j] = acc[m];
  }
}

// db[g][n] = sum over (row, t) of drec[row, t, g, n].
__global__ void gradBKernel(Params p, int G) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= G * p.N) return;
  float s = 0.0f;
  for (int64_t bt = 0; bt < p.batch * p.T; ++bt) s += p.drec[bt * G * p.N + e];
  p.db[e] = s;
}

}  // namespace
}  // namespace rkcuda
