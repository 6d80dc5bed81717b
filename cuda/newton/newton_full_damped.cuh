// The Newton-iteration RNN, dense cells' full-Jacobian (DEER) step as a chunked scan over time, the
// damped (ELK) step, and the trajectory's start and outputs (cuda/newton/newton_rnn.cu). Uses the
// generic path's row and weight helpers.
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

// ---- dense cells, full Jacobian (DEER): the step as a chunked scan over time per (row, head) ----
//
// The step solves d_t = J_t d_{t-1} + r_t (d_{-1} = 0) for the update d = new - old of the iterate,
// with r_t = f(old_{t-1}) - old_t the residual, and adds it to traj: the same Newton step as
// h_t = J_t h_{t-1} + c_t, but errors of the solve scale with the update rather than with the state
// (see the header). Vectors of a head are state-major: index i * D + j is state i of channel j.
// fullChunkKernel: per (row, head, chunk) the aggregate of the chunk, A = J_{t1-1} ... J_{t0} and
// b = the chunk's solve from zero; fullCarryKernel: per (row, head) the states before each chunk,
// d = A d + b chunk after chunk; fullApplyKernel: per (row, head, chunk) the solve within the chunk
// from that state, added to traj.

// J_t of the head into sJ (MP x MP, row stride ld, zero outside M x M): element ((i, j), (s, k)) is
// [j == k] gp_is(j) + [s == 0] sum_g gr_ig(j) R[g][head][k][j]. sC holds the step's FullCoef [K][D].
template <NewtonCell C>
__device__ __forceinline__ void buildJacobian(const Params& p, int64_t head, const float* sC, float* sJ, int ld) {
  using F = FullCoef<C>;
  const int D = static_cast<int>(p.headDim), M = p.M, MP = p.MP;
  const float* Rh = p.R + head * static_cast<int64_t>(D) * D;
  const int64_t gStride = p.heads * static_cast<int64_t>(D) * D;
  for (int e = static_cast<int>(threadIdx.x); e < MP * MP; e += static_cast<int>(blockDim.x)) {
    const int r = e % MP, c = e / MP;  // consecutive threads: consecutive rows (coalesced R reads)
    float v = 0.0f;
    if (r < M && c < M) {
      const int i = r / D, j = r - i * D, s = c / D, k = c - s * D;
      if (j == k) v = sC[(i * F::W + s) * D + j];
      if (s == 0) {
#pragma unroll
        for (int g = 0; g < F::G; ++g)
          v = fmaf(sC[(i * F::W + F::S + g) * D + j], __ldg(Rh + g * gStride + k * D + j), v);
      }
    }
    sJ[r * ld + c] = v;
  }
}

// out = J a over MP x MP (row strides ldJ, ldA): fp32 FMA, a thread per output element in turn.
__device__ __forceinline__ void productFma(const float* sJ, int ldJ, const float* a, float* out, int ldA, int MP,
                                           int M) {
  for (int e = static_cast<int>(threadIdx.x); e < MP * MP; e += static_cast<int>(blockDim.x)) {
    const int r = e / MP, c = e - r * MP;
    float v = 0.0f;
    if (r < M && c < M) {
      for (int k = 0; k < M; ++k) v = fmaf(sJ[r * ldJ + k], a[k * ldA + c], v);
    }
    out[r * ldA + c] = v;
  }
}

// The same on the tensor cores: a warp per 16 x 8 output tile in turn, m16n8k8 tf32 with both
// operands split into tf32 high and low parts (three products, fp32-grade; common/mma.cuh).
__device__ __forceinline__ void productMma(const float* sJ, int ldJ, const float* a, float* out, int ldA, int MP) {
  const int warps = static_cast<int>(blockDim.x) >> 5, warp = static_cast<int>(threadIdx.x) >> 5;
  const int tilesN = MP / 8, tiles = (MP / 16) * tilesN;
  for (int tile = warp; tile < tiles; tile += warps) {
    const int r0 = (tile / tilesN) * 16, c0 = (tile % tilesN) * 8;
    mma::FragC acc;
    acc.zero();
    for (int k0 = 0; k0 < MP; k0 += 8) {
      auto jAt = [&](int r, int c) { return sJ[(r0 + r) * ldJ + k0 + c]; };
      auto aAt = [&](int k, int c) { return a[(k0 + k) * ldA + c0 + c]; };
      const mma::FragATf32 jHi = mma::loadATf32(jAt);
      const mma::FragATf32 jLo = mma::loadATf32([&](int r, int c) { return mma::tf32Rest(jAt(r, c)); });
      const mma::FragBTf32 aHi = mma::loadBTf32(aAt);
      const mma::FragBTf32 aLo = mma::loadBTf32([&](int k, int c) { return mma::tf32Rest(aAt(k, c)); });
      mma::mma1688tf32(acc, jLo, aHi);
      mma::mma1688tf32(acc, jHi, aLo);
      mma::mma1688tf32(acc, jHi, aHi);
    }
    mma::storeC(acc, [&](int r, int c, float v) { out[(r0 + r) * ldA + c0 + c] = v; });
  }
}

__host__ __device__ __forceinline__ int fullLdJ(int MP) { return MP + 4; }  // conflict-free A-fragment reads
__host__ __device__ __forceinline__ int fullLdA(int MP) { return MP + 8; }  // conflict-free B-fragment reads
__host__ __device__ __forceinline__ int fullCoefFloats(int K, int D) { return (K * D + 3) & ~3; }

// Dynamic shared memory: J [MP][ldJ], two aggregates [MP][ldA], the step's coefficients [K][D] and
// two offset vectors [MP].
template <NewtonCell C> __global__ void __launch_bounds__(256) fullChunkKernel(Params p) {
  using F = FullCoef<C>;
  const int D = static_cast<int>(p.headDim), M = p.M, MP = p.MP, ldJ = fullLdJ(MP), ldA = fullLdA(MP);
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  float* sJ = dynamicShared<float>();
  float* aCur = sJ + MP * ldJ;  // the aggregate so far, and the buffer for the next one
  float* aNext = aCur + MP * ldA;
  float* sC = aNext + MP * ldA;
  float* bCur = sC + fullCoefFloats(F::K, D);
  float* bNext = bCur + MP;
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / (p.heads * p.chunks);
  blk -= row * p.heads * p.chunks;
  const int64_t head = blk / p.chunks, c = blk - head * p.chunks;
  // The last chunk's aggregate is never used.
  if (c == p.chunks - 1 || rowDone(p, row)) return;
  const int64_t t0 = c * p.chunkLen, t1 = minI(p.T, t0 + p.chunkLen);
  for (int e = tid; e < MP * MP; e += nt) {
    const int r = e / MP, cc = e - r * MP;
    aCur[r * ldA + cc] = (r == cc && r < M) ? 1.0f : 0.0f;
  }
  for (int e = tid; e < MP; e += nt) bCur[e] = 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();  // the previous step is complete (its J, coefficients and results)
    for (int e = tid; e < F::K * D; e += nt) {
      const int q = e / D, j = e - q * D;
      sC[e] = p.jc[at4(row, t, q, head * D + j, p.T, F::K, p.N)];
    }
    __syncthreads();
    buildJacobian<C>(p, head, sC, sJ, ldJ);
    __syncthreads();
    if (p.tensorCores)
      productMma(sJ, ldJ, aCur, aNext, ldA, MP);
    else
      productFma(sJ, ldJ, aCur, aNext, ldA, MP, M);
    for (int i = tid; i < MP; i += nt) {
      float v = 0.0f;
      if (i < M) {
        v = sC[(F::S * F::W + i / D) * D + i % D];
        for (int k = 0; k < M; ++k) v = fmaf(sJ[i * ldJ + k], bCur[k], v);
      }
      bNext[i] = v;
    }
    float* sw = aCur;
    aCur = aNext;
    aNext = sw;
    sw = bCur;
    bCur = bNext;
    bNext = sw;
  }
  __syncthreads();
  float* out = p.agg + ((row * p.heads + head) * p.chunks + c) * (static_cast<int64_t>(M) * M + M);
  for (int e = tid; e < M * M; e += nt) {
    const int k = e / M, i = e - k * M;  // column-major: the carry pass reads columns
    out[e] = aCur[i * ldA + k];
  }
  for (int i = tid; i < M; i += nt) out[M * M + i] = bCur[i];
}

// Per (row, head), a thread per state element: the state before each chunk, chunk after chunk.
__global__ void __launch_bounds__(kMaxFullM) fullCarryKernel(Params p) {
  __shared__ float sd[2][kMaxFullM];
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.heads, head = static_cast<int64_t>(blockIdx.x) % p.heads;
  if (rowDone(p, row)) return;
  const int M = p.M, i = static_cast<int>(threadIdx.x);
  const int64_t stride = static_cast<int64_t>(M) * M + M;
  const float* agg = p.agg + (row * p.heads + head) * p.chunks * stride;
  float* carry = p.carry + (row * p.heads + head) * p.chunks * M;
  if (i < M) sd[0][i] = 0.0f;
  __syncthreads();
  int cur = 0;
  for (int64_t c = 0; c + 1 < p.chunks; ++c) {
    if (i < M) {
      const float* a = agg + c * stride;
      float v = a[M * M + i];
      for (int k = 0; k < M; ++k) v = fmaf(a[k * M + i], sd[cur][k], v);
      sd[cur ^ 1][i] = v;
      carry[(c + 1) * M + i] = v;
    }
    cur ^= 1;
    __syncthreads();
  }
}

// Per (row, head, chunk), a thread per channel: d_t = J_t d_{t-1} + r_t from the chunk's carried
// state, applied through R directly (J_t d = gp d + gr (R^T d_h)), traj_t += d_t. R of the head in
// shared memory (padded rows) when it fits, as for the sequential kernel.
template <NewtonCell C> __global__ void fullApplyKernel(Params p) {
  using F = FullCoef<C>;
  constexpr int G = F::G, S = F::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.headDim);
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / (p.heads * p.chunks);
  blk -= row * p.heads * p.chunks;
  const int64_t head = blk / p.chunks, c = blk - head * p.chunks;
  if (rowDone(p, row)) return;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  float* sd = smem;  // d_h of the previous step, D floats
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + ((D + 3) & ~3), ld, gs);
  const int64_t t0 = c * p.chunkLen, t1 = minI(p.T, t0 + p.chunkLen);
  float d[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    d[s] = (c > 0 && s < S && active) ? p.carry[((row * p.heads + head) * p.chunks + c) * p.M + s * D + j] : 0.0f;
  if (active) sd[j] = d[0];
  __syncthreads();
  for (int64_t t = t0; t < t1; ++t) {
    float nd[kMaxS];
    if (active) {
      float rec[kMaxG];
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) rec[g] = 0.0f;
      for (int k = 0; k < D; ++k) {
        const float dk = sd[k];
#pragma unroll
        for (int g = 0; g < G; ++g) rec[g] = fmaf(dk, Rh[g * gs + static_cast<int64_t>(k) * ld + j], rec[g]);
      }
#pragma unroll
      for (int i = 0; i < S; ++i) {
        float v = p.jc[at4(row, t, S * F::W + i, n, p.T, F::K, p.N)];
#pragma unroll
        for (int s = 0; s < S; ++s) v = fmaf(p.jc[at4(row, t, i * F::W + s, n, p.T, F::K, p.N)], d[s], v);
#pragma unroll
        for (int g = 0; g < G; ++g) v = fmaf(p.jc[at4(row, t, i * F::W + S + g, n, p.T, F::K, p.N)], rec[g], v);
        nd[i] = v;
        p.traj[at4(row, t, i, n, p.T, S, p.N)] += v;
      }
    }
    __syncthreads();
    if (active) {
#pragma unroll
      for (int s = 0; s < S; ++s) d[s] = nd[s];
      sd[j] = d[0];
    }
    __syncthreads();
  }
}

// Small S x S helpers for the damped step (S <= 2).
template <int S>
__device__ __forceinline__ void matInverse(const float (&a)[kMaxS][kMaxS], float (&inv)[kMaxS][kMaxS]) {
  if constexpr (S == 1) {
    inv[0][0] = 1.0f / a[0][0];
  } else {
    const float rdet = 1.0f / (a[0][0] * a[1][1] - a[0][1] * a[1][0]);
    inv[0][0] = a[1][1] * rdet;
    inv[0][1] = -a[0][1] * rdet;
    inv[1][0] = -a[1][0] * rdet;
    inv[1][1] = a[0][0] * rdet;
  }
}
// c = a b, or a b^T with BT.
template <int S, bool BT = false>
__device__ __forceinline__ void matMul(const float (&a)[kMaxS][kMaxS], const float (&b)[kMaxS][kMaxS],
                                       float (&c)[kMaxS][kMaxS]) {
#pragma unroll
  for (int i = 0; i < S; ++i)
#pragma unroll
    for (int j = 0; j < S; ++j) {
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k < S; ++k) v = fmaf(a[i][k], BT ? b[j][k] : b[k][j], v);
      c[i][j] = v;
    }
}

// The Levenberg-Marquardt (ELK) step per (row, channel): Kalman filter forward (means and
// covariances to scratch), Rauch-Tung-Striebel smoother backward (into traj).
template <NewtonCell C> __global__ void dampedStepKernel(Params p) {
  constexpr int S = CellInfo<C>::S, K = S * S + S, KK = S + S * S;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  if (n >= p.N || rowDone(p, row)) return;
  const float obsVar = 1.0f / p.damping;
  auto loadJc = [&](int64_t t, float(&J)[kMaxS][kMaxS], float(&c)[kMaxS]) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
#pragma unroll
      for (int jj = 0; jj < S; ++jj) J[i][jj] = p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)];
      c[i] = p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)];
    }
  };
  // Prediction: mp = J m + c, Pp = J P J^T + I.
  auto predict = [&](const float(&J)[kMaxS][kMaxS], const float(&c)[kMaxS], const float(&m)[kMaxS],
                     const float(&P)[kMaxS][kMaxS], float(&mp)[kMaxS], float(&Pp)[kMaxS][kMaxS]) {
    float JP[kMaxS][kMaxS];
    matMul<S>(J, P, JP);
    matMul<S, true>(JP, J, Pp);
#pragma unroll
    for (int i = 0; i < S; ++i) {
      Pp[i][i] += 1.0f;
      float v = c[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(J[i][jj], m[jj], v);
      mp[i] = v;
    }
  };
  float m[kMaxS], P[kMaxS][kMaxS];
  loadH0<C>(p, row, n, m);
#pragma unroll
  for (int i = 0; i < kMaxS; ++i)
#pragma unroll
    for (int jj = 0; jj < kMaxS; ++jj) P[i][jj] = 0.0f;
  for (int64_t t = 0; t < p.T; ++t) {
    float J[kMaxS][kMaxS], c[kMaxS], mp[kMaxS], Pp[kMaxS][kMaxS], obs[kMaxS];
    loadJc(t, J, c);
    predict(J, c, m, P, mp, Pp);
    loadTraj<C>(p.traj, p, row, t, n, obs);
    // Gain K = Pp (Pp + I / lambda)^-1; m = mp + K (obs - mp); P = (I - K) Pp.
    float Sm[kMaxS][kMaxS], Si[kMaxS][kMaxS], Kg[kMaxS][kMaxS], KP[kMaxS][kMaxS];
#pragma unroll
    for (int i = 0; i < S; ++i)
#pragma unroll
      for (int jj = 0; jj < S; ++jj) Sm[i][jj] = Pp[i][jj] + (i == jj ? obsVar : 0.0f);
    matInverse<S>(Sm, Si);
    matMul<S>(Pp, Si, Kg);
    matMul<S>(Kg, Pp, KP);
#pragma unroll
    for (int i = 0; i < S; ++i) {
      float v = mp[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(Kg[i][jj], obs[jj] - mp[jj], v);
      m[i] = v;
#pragma unroll
      for (int jj = 0; jj < S; ++jj) P[i][jj] = Pp[i][jj] - KP[i][jj];
    }
#pragma unroll
    for (int i = 0; i < S; ++i) {
      p.kal[at4(row, t, i, n, p.T, KK, p.N)] = m[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) p.kal[at4(row, t, S + i * S + jj, n, p.T, KK, p.N)] = P[i][jj];
    }
  }
  // Smoother: ms_t = m_t + P_t J_{t+1}^T Pp_{t+1}^-1 (ms_{t+1} - mp_{t+1}).
  float ms[kMaxS];
#pragma unroll
  for (int i = 0; i < kMaxS; ++i) ms[i] = m[i];
  if (p.T > 0) storeTraj<C>(p, row, p.T - 1, n, ms);
  for (int64_t t = p.T - 2; t >= 0; --t) {
    float mt[kMaxS], Pt[kMaxS][kMaxS], J[kMaxS][kMaxS], c[kMaxS], mp[kMaxS], Pp[kMaxS][kMaxS];
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) {
      mt[i] = i < S ? p.kal[at4(row, t, i, n, p.T, KK, p.N)] : 0.0f;
#pragma unroll
      for (int jj = 0; jj < kMaxS; ++jj)
        Pt[i][jj] = (i < S && jj < S) ? p.kal[at4(row, t, S + i * S + jj, n, p.T, KK, p.N)] : 0.0f;
    }
    loadJc(t + 1, J, c);
    predict(J, c, mt, Pt, mp, Pp);
    float PJt[kMaxS][kMaxS], Pi[kMaxS][kMaxS], Gm[kMaxS][kMaxS];
    matMul<S, true>(Pt, J, PJt);
    matInverse<S>(Pp, Pi);
    matMul<S>(PJt, Pi, Gm);
    float nw[kMaxS];
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) {
      float v = mt[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(Gm[i][jj], ms[jj] - mp[jj], v);
      nw[i] = i < S ? v : 0.0f;
    }
    storeTraj<C>(p, row, t, n, nw);
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) ms[i] = nw[i];
  }
}

// The guess for the generic path (zeros or a copy of the provided one; the one-step guess goes
// through the evaluation kernels with fromH0). Thread per element of traj.
__global__ void guessKernel(Params p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  p.traj[e] = p.guessTraj != nullptr ? p.guessTraj[e] : 0.0f;
}

// y (the h state of traj) and finalStates.
template <class T>
__global__ void outputsKernel(const float* traj, T* y, float* finalStates, const float* h0, int64_t batch, int64_t T_,
                              int S, int64_t N) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t ny = batch * T_ * N;
  if (e < ny) {
    const int64_t bt = e / N, n = e - bt * N;
    storeScalar<T>(y + e, traj[(bt * S) * N + n]);
  } else if (finalStates != nullptr && e < ny + S * batch * N) {
    const int64_t f = e - ny;
    const int64_t s = f / (batch * N), rem = f - s * batch * N, row = rem / N, n = rem - row * N;
    finalStates[f] = T_ > 0 ? traj[((row * T_ + T_ - 1) * S + s) * N + n] : (h0 != nullptr ? h0[f] : 0.0f);
  }
}

}  // namespace
}  // namespace rkcuda
