// The gated delta rule's chunked forward (cuda/delta/gated_delta_rule_chunked.cu): the per-chunk
// preparation (WY / UT transform) and the state pass with the outputs.
#pragma once

#include <cuda_runtime.h>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include "common/api.h"
#include "delta/gated_delta_rule.h"
#include "common/async_copy.cuh"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "delta/delta_params.cuh"
#include "delta/gated_delta_rule_chunked.h"

#include "delta/gated_delta_rule_chunked_common.cuh"

namespace rkcuda {
namespace deltachunked {
namespace {

// ============================== per-chunk preparation ==============================

// Stages a 64-row tile of 16-bit elements, `width` columns (a multiple of 8), into dst (row stride
// ldDst): element (r, c) from src[r * ldSrc + c] for r < n and c < cols, zero elsewhere. With
// `aligned` (src and ldSrc multiples of 16 bytes) by 16-byte cp.async copies that the caller commits
// and waits for; otherwise element by element, complete on return. The whole block calls.
template <class T>
__device__ __forceinline__ void stageTilePadded(T* dst, int ldDst, const T* src, int64_t ldSrc, int n, int cols,
                                                int width, bool aligned) {
  if (aligned) {
    const int per = width / 8;
    for (int e = static_cast<int>(threadIdx.x); e < kC * per; e += kThreads) {
      const int r = e / per, c = 8 * (e - r * per);
      const int elems = r < n && c < cols ? (cols - c < 8 ? cols - c : 8) : 0;
      copyAsync16(dst + r * ldDst + c, elems > 0 ? src + r * ldSrc + c : src, 2 * elems);
    }
  } else {
    const T zero = fromFloat<T>(0.0f);
    for (int e = static_cast<int>(threadIdx.x); e < kC * width; e += kThreads) {
      const int r = e / width, c = e - r * width;
      dst[r * ldDst + c] = r < n && c < cols ? src[r * ldSrc + c] : zero;
    }
  }
}

// The chunk's staging, shared by the preparation and the backward's gradient kernel (the whole
// block calls each). stageQK: q, k rows (storage type, zero past n and K, columns up to Kp) into
// sK, sQ (row stride p.ldk). chunkScalars: beta (1 without the delta term), the fp64 cumulative log decay sG, exp(sG)
// in sGam, and the inverse norms sRk, sRq (1 without l2norm), summed from the rows staged by stageQK when given (its
// copies landed: the first barrier here comes before they are read), else from global memory.
template <class T>
__device__ __forceinline__ void stageQK(const ChunkParams& p, int64_t rowBase, int64_t h, int n, T* sK, T* sQ) {
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const int K = static_cast<int>(p.K);
  const int64_t row0 = (rowBase * p.H + h) * p.K;
  // 16-byte copies where the rows are 16-byte aligned (K a multiple of 8), else element by element.
  const bool aligned =
      p.K % 8 == 0 && reinterpret_cast<uintptr_t>(qg) % 16 == 0 && reinterpret_cast<uintptr_t>(kg) % 16 == 0;
  stageTilePadded(sK, p.ldk, kg + row0, p.H * p.K, n, K, p.Kp, aligned);
  stageTilePadded(sQ, p.ldk, qg + row0, p.H * p.K, n, K, p.Kp, aligned);
  waitAsyncCopies();  // visible to the block after the caller's next barrier
}
template <class T>
__device__ __forceinline__ void chunkScalars(const ChunkParams& p, int64_t rowBase, int64_t h, int64_t hv, int n,
                                             double* sG, float* sGam, float* sBeta, float* sRk, float* sRq,
                                             const T* sK = nullptr, const T* sQ = nullptr) {
  const int K = static_cast<int>(p.K);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  if (tid < kC) {
    float gt = 0.0f, bt = 0.0f;
    if (tid < n) {
      const int64_t gi = (rowBase + tid) * p.HV + hv;
      gt = p.g != nullptr && !p.perKey ? p.g[gi] : 0.0f;  // per key: chunkKeyDecays
      bt = p.delta ? loadScalar(static_cast<const T*>(p.beta) + gi) : 1.0f;
    }
    sGam[tid] = gt;
    sBeta[tid] = bt;
  }
  __syncthreads();
  if (tid == 0) {
    double acc = 0.0;
    for (int r = 0; r < kC; ++r) {
      acc += static_cast<double>(sGam[r]);
      sG[r] = acc;
    }
  }
  for (int r = warp; r < kC; r += kWarps) {
    float kk = 0.0f, qq = 0.0f;
    if (r < n && p.l2norm) {
      const int64_t row = ((rowBase + r) * p.H + h) * p.K;
      const T* kr = sK != nullptr ? sK + r * p.ldk : kg + row;
      const T* qr = sQ != nullptr ? sQ + r * p.ldk : qg + row;
      for (int i = lane; i < K; i += 32) {
        const float kx = toFloat(kr[i]), qx = toFloat(qr[i]);
        kk = fmaf(kx, kx, kk);
        qq = fmaf(qx, qx, qq);
      }
    }
    kk = warpSum(kk);
    qq = warpSum(qq);
    if (lane == 0) {
      sRk[r] = p.l2norm ? 1.0f / sqrtf(kk + kL2Eps) : 1.0f;
      sRq[r] = p.l2norm ? 1.0f / sqrtf(qq + kL2Eps) : 1.0f;
    }
  }
  __syncthreads();
  if (tid < kC) sGam[tid] = fastExp(static_cast<float>(sG[tid]));
  __syncthreads();
}

// With a decay per key (p.perKey): sGk[r * Kp + i] = G_r[i], the cumulative sum of g over the chunk's
// rows 0..r (fp64, rounded to fp32; g = 0 past n and K). The per-key factors are exponentials of
// differences of these, each <= 0 where it is taken (as flash-linear-attention's chunk_gla, whose
// cumulative sums are fp32 too). The whole block calls; visible after its last barrier.
__device__ __forceinline__ void chunkKeyDecays(const ChunkParams& p, int64_t rowBase, int64_t hv, int n, float* sGk) {
  const int K = static_cast<int>(p.K), Kp = p.Kp;
  for (int e = static_cast<int>(threadIdx.x); e < kC * Kp; e += kThreads) {
    const int r = e / Kp, i = e - (e / Kp) * Kp;
    sGk[e] = r < n && i < K ? p.g[((rowBase + r) * p.HV + hv) * p.K + i] : 0.0f;
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < Kp; i += kThreads) {
    double acc = 0.0;
    for (int r = 0; r < kC; ++r) {
      acc += static_cast<double>(sGk[r * Kp + i]);
      sGk[r * Kp + i] = static_cast<float>(acc);
    }
  }
  __syncthreads();
}

// exp(G_t[i] - G_s[i]) from those cumulative decays (row stride Kp).
__device__ __forceinline__ float keyDecay(const float* sGk, int Kp, int t, int s, int i) {
  return fastExp(sGk[t * Kp + i] - sGk[s * Kp + i]);
}

// Dynamic shared memory of chunkPrepKernel: sK, then sQ, whose bytes later hold v's rows (64 x (Vp + 8));
// with a decay per key then sGk (64 x Kp fp32).
inline size_t prepSharedBytes(const ChunkParams& p, size_t elemBytes) {
  const size_t qOrV = static_cast<size_t>(kC) * std::max(p.ldk, p.Vp + 8) * elemBytes;
  const size_t keyDecays = p.perKey ? static_cast<size_t>(kC) * p.Kp * sizeof(float) : 0;
  return kC * sizeof(double) + 4 * kC * sizeof(float) + 2 * kC * kLdA * sizeof(float) +
         static_cast<size_t>(kC) * p.ldk * elemBytes + qOrV + keyDecays;
}

template <class T> __global__ void __launch_bounds__(kThreads) chunkPrepKernel(const ChunkParams p) {
  const int64_t gc = static_cast<int64_t>(blockIdx.x) / p.HV;
  const int64_t hv = static_cast<int64_t>(blockIdx.x) - gc * p.HV;
  const int64_t h = hv / p.group;
  const ScanSegment seg = segmentOfChunk(p, gc);
  const int64_t cs = (gc - seg.chunkOffset) * kC;
  const int n = static_cast<int>(seg.length - cs < kC ? seg.length - cs : kC);
  const int64_t rowBase = seg.batch * p.T + seg.start + cs;  // batch row * T + first position
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V), ld = p.ldk;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;

  double* sG = dynamicShared<double>();  // cumulative log decay
  float* sBeta = reinterpret_cast<float*>(sG + kC);
  float* sRk = sBeta + kC;  // 1 / |k| (1 without l2norm)
  float* sRq = sRk + kC;
  float* sGam = sRq + kC;      // g, then exp(G)
  float* sA = sGam + kC;       // A (strictly lower)
  float* sX = sA + kC * kLdA;  // Tm
  T* sK = reinterpret_cast<T*>(sX + kC * kLdA);
  T* sQ = sK + kC * ld;
  T* sV = sQ;  // v's rows (64 x ldv) once Qg is written
  const int ldv = p.Vp + 8;
  float* sGk = reinterpret_cast<float*>(sQ + kC * std::max(ld, ldv));  // per-key cumulative decays

  const T* vg = static_cast<const T*>(p.v);
  stageQK(p, rowBase, h, n, sK, sQ);
  chunkScalars<T>(p, rowBase, h, hv, n, sG, sGam, sBeta, sRk, sRq, sK, sQ);
  if (p.perKey) chunkKeyDecays(p, rowBase, hv, n, sGk);

  auto kn = [&](int r, int i) -> float { return i < K ? toFloat(sK[r * ld + i]) * sRk[r] : 0.0f; };
  auto qn = [&](int r, int i) -> float { return i < K ? toFloat(sQ[r * ld + i]) * sRq[r] : 0.0f; };
  auto decay = [&](int t, int s) -> float { return fastExp(static_cast<float>(sG[t] - sG[s])); };
  // Per key (1 with a scalar decay, whose factors decay and sGam carry; they are 1 with a per-key one):
  // exp(G_t[i] - G_s[i]) and exp(G_t[i]).
  const int Kp = p.Kp;
  auto keyRel = [&](int t, int s, int i) -> float { return p.perKey ? keyDecay(sGk, Kp, t, s, i) : 1.0f; };
  auto keyGam = [&](int r, int i) -> float { return p.perKey ? fastExp(sGk[r * Kp + i]) : sGam[r]; };

  const int64_t cb = gc * p.HV + hv;
  T* P = static_cast<T*>(p.P) + cb * kC * kC;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  // A = beta_t Gamma_ts k_t.k_s (s < t) and P = scale Gamma_ts q_t.k_s (s <= t): the warp's 16 rows
  // against the column blocks of 8 that touch the lower triangle (warp-uniform), each A fragment
  // loaded once per k-step.
  // With a decay per key Gamma_ts is inside the sums (sum_i x_t[i] k_s[i] exp(G_t[i] - G_s[i])). The
  // blocks left of the warp's diagonal block take it with the warp's first row r0 as reference:
  // x_t[i] exp(G_t[i] - G_r0[i]) against k_s[i] exp(G_r0[i] - G_s[i]), both factors <= 1 (t >= r0 > s).
  // The diagonal block, where no such split is bounded, is summed exactly in fp32 below.
  if (p.perKey) {
    mma::FragC accA[kC / 8], accP[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      accA[j].zero();
      accP[j].zero();
    }
    for (int s = 0; s < kSteps && warp > 0; ++s) {
      const int k0 = 16 * s;
      mma::FragA16 ak{};
      if (p.delta)
        ak = mma::loadA16<T>([&](int rr, int kk) { return kn(r0 + rr, k0 + kk) * keyRel(r0 + rr, r0, k0 + kk); });
      const mma::FragA16 aq =
          mma::loadA16<T>([&](int rr, int kk) { return qn(r0 + rr, k0 + kk) * keyRel(r0 + rr, r0, k0 + kk); });
#pragma unroll
      for (int j = 0; j < kC / 8; ++j) {
        if (8 * j >= r0) continue;
        const mma::FragB16 b =
            mma::loadB16<T>([&](int kk, int nn) { return kn(8 * j + nn, k0 + kk) * keyRel(r0, 8 * j + nn, k0 + kk); });
        if (p.delta) mma::mma16816<T>(accA[j], ak, b);
        mma::mma16816<T>(accP[j], aq, b);
      }
    }
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      if (8 * j >= r0 && 8 * j < r0 + 16) continue;  // the diagonal block: below
      mma::storeC(accA[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sA[r * kLdA + col] = col < r0 ? sBeta[r] * val : 0.0f;
      });
      mma::storeC(accP[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        P[r * kC + col] = fromFloat<T>(col < r0 ? p.scale * val : 0.0f);
      });
    }
    for (int e = tid & 31; e < 256; e += 32) {
      const int r = r0 + e / 16, col = r0 + e % 16;
      float a = 0.0f, pq = 0.0f;
      if (col <= r) {
        for (int i = 0; i < K; ++i) {
          const float ks = kn(col, i) * keyRel(r, col, i);
          a = fmaf(kn(r, i), ks, a);
          pq = fmaf(qn(r, i), ks, pq);
        }
      }
      sA[r * kLdA + col] = col < r ? sBeta[r] * a : 0.0f;
      P[r * kC + col] = fromFloat<T>(p.scale * pq);
    }
  } else {
    mma::FragC accA[kC / 8], accP[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      accA[j].zero();
      accP[j].zero();
    }
    for (int s = 0; s < kSteps; ++s) {
      const int k0 = 16 * s;
      mma::FragA16 ak{};
      if (p.delta) ak = mma::loadA16<T>([&](int rr, int kk) { return kn(r0 + rr, k0 + kk); });
      const mma::FragA16 aq = mma::loadA16<T>([&](int rr, int kk) { return qn(r0 + rr, k0 + kk); });
#pragma unroll
      for (int j = 0; j < kC / 8; ++j) {
        if (8 * j > r0 + 15) continue;
        const mma::FragB16 b = mma::loadB16<T>([&](int kk, int nn) { return kn(8 * j + nn, k0 + kk); });
        if (p.delta) mma::mma16816<T>(accA[j], ak, b);
        mma::mma16816<T>(accP[j], aq, b);
      }
    }
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(accA[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sA[r * kLdA + col] = col < r ? sBeta[r] * decay(r, col) * val : 0.0f;
      });
      mma::storeC(accP[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        P[r * kC + col] = fromFloat<T>(col <= r ? p.scale * decay(r, col) * val : 0.0f);
      });
    }
  }
  __syncthreads();

  // Qg = scale Q exp(G), Kd = K exp(G_{n-1} - G) (padding rows: 0); then q's bytes take v's rows
  // (cp.async, landing during the inverse), the B operand of U = Tm V.
  T* Qg = static_cast<T*>(p.Qg) + cb * kC * p.Kp;
  T* Kd = static_cast<T*>(p.Kd) + cb * kC * p.Kp;
  for (int e = tid; e < kC * p.Kp; e += kThreads) {
    const int r = e / p.Kp, i = e - (e / p.Kp) * p.Kp;
    const int rk = r < n ? r : n - 1;
    Qg[e] = fromFloat<T>(p.scale * qn(r, i) * keyGam(r, i));
    Kd[e] = fromFloat<T>(kn(r, i) * decay(n - 1, rk) * keyRel(n - 1, rk, i));
  }
  __syncthreads();
  stageTilePadded(sV, ldv, vg + (rowBase * p.HV + hv) * p.V, p.HV * p.V, n, V, p.Vp,
                  p.V % 8 == 0 && reinterpret_cast<uintptr_t>(vg) % 16 == 0);
  commitAsyncCopies();

  // Tm = (I + A)^-1 diag(beta), by blocks of 16: X = (I + A)^-1 is unit lower triangular with the
  // diagonal blocks D_I = (I + A_II)^-1 and, block row by block row (I = 1, 2, 3),
  //   X_IJ = -D_I sum_{J <= L < I} A_IL X_LJ   (J < I).
  // Warp w inverts D_w (lane c < 16 solves column c by forward substitution, in registers); each
  // block row's sums and products with D_I are spread over the whole block. A's block row I, once
  // summed, holds the sums. Then X is kept for the backward and its columns scaled by beta.
  // Without the delta term A = 0: X = I.
  if (!p.delta) {
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, c = e - i * kC;
      sX[i * kLdA + c] = i == c ? 1.0f : 0.0f;
    }
    __syncthreads();
  } else {
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, c = e - i * kC;
      if (c / 16 > i / 16) sX[i * kLdA + c] = 0.0f;
    }
    const int lane = tid & 31, d0 = 16 * warp;
    if (lane < 16) {
      float x[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < i; ++j) acc = fmaf(sA[(d0 + i) * kLdA + d0 + j], x[j], acc);
        x[i] = i < lane ? 0.0f : i == lane ? 1.0f : -acc;
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) sX[(d0 + i) * kLdA + d0 + lane] = x[i];
    }
    __syncthreads();
    for (int I = 1; I < kC / 16; ++I) {
      float sum[kC / 16 - 1][2];
#pragma unroll
      for (int q = 0; q < 2 * (kC / 16 - 1); ++q) {
        const int e = tid + kThreads * q, J = e / 256, r = (e / 16) % 16, c = e % 16;
        float acc = 0.0f;
        if (J < I) {
          for (int l = 16 * J; l < 16 * I; ++l) acc = fmaf(sA[(16 * I + r) * kLdA + l], sX[l * kLdA + 16 * J + c], acc);
        }
        sum[q / 2][q % 2] = acc;
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < 2 * (kC / 16 - 1); ++q) {
        const int e = tid + kThreads * q, J = e / 256, r = (e / 16) % 16, c = e % 16;
        if (J < I) sA[(16 * I + r) * kLdA + 16 * J + c] = sum[q / 2][q % 2];
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < 2 * (kC / 16 - 1); ++q) {
        const int e = tid + kThreads * q, J = e / 256, r = (e / 16) % 16, c = e % 16;
        if (J < I) {
          float acc = 0.0f;
          for (int m = 0; m <= r; ++m) {
            acc = fmaf(sX[(16 * I + r) * kLdA + 16 * I + m], sA[(16 * I + m) * kLdA + 16 * J + c], acc);
          }
          sX[(16 * I + r) * kLdA + 16 * J + c] = -acc;
        }
      }
      __syncthreads();
    }
  }
  {
    float* X = p.Xinv != nullptr ? p.Xinv + (gc * p.HV + hv) * kC * kC : nullptr;
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, c = e - i * kC;
      if (X != nullptr) X[e] = sX[i * kLdA + c];  // the backward keeps (I + A)^-1 itself
      if (i >= c) sX[i * kLdA + c] *= sBeta[c];
    }
  }
  waitAsyncCopies();  // v's rows
  __syncthreads();

  // W = Tm (K exp(G)), U = Tm V: rows r0..r0+15, Tm lower triangular (k-steps up to the diagonal).
  // W, Qg and Kd have rows of Kp elements (zeros past K), so that the state pass can stage them
  // with 16-byte copies.
  T* W = p.delta ? static_cast<T*>(p.W) + cb * kC * p.Kp : nullptr;  // no W without the delta term
  T* U = static_cast<T*>(p.U) + cb * kC * p.V;
  auto tmFrag = [&](int s) {
    return mma::loadA16<T>([&](int rr, int kk) { return sX[(r0 + rr) * kLdA + 16 * s + kk]; });
  };
  for (int j = 0; W != nullptr && j < p.Kp / 8; ++j) {
    mma::FragC acc;
    acc.zero();
    for (int s = 0; s <= warp; ++s) {
      const mma::FragB16 b = mma::loadB16<T>([&](int kk, int nn) {
        const int r = 16 * s + kk;
        return kn(r, 8 * j + nn) * keyGam(r, 8 * j + nn);
      });
      mma::mma16816<T>(acc, tmFrag(s), b);
    }
    mma::storeC(acc, [&](int rr, int cc, float val) { W[(r0 + rr) * p.Kp + 8 * j + cc] = fromFloat<T>(val); });
  }
  for (int j = 0; j < p.Vp / 8; j += 2) {  // two column blocks per ldmatrix of v's staged rows
    mma::FragC acc[2];
    acc[0].zero(), acc[1].zero();
    for (int s = 0; s <= warp; ++s) {
      const mma::FragA16 a = tmFrag(s);
      mma::FragB16 b0, b1;
      mma::ldmatrixB16x2(sV + 16 * s * ldv + 8 * j, ldv, b0, b1);
      mma::mma16816<T>(acc[0], a, b0);
      mma::mma16816<T>(acc[1], a, b1);
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      mma::storeC(acc[h2], [&](int rr, int cc, float val) {
        const int col = 8 * (j + h2) + cc;
        if (col < V) U[(r0 + rr) * p.V + col] = fromFloat<T>(val);
      });
    }
  }

  if (!p.perKey && tid == 0) p.gammaLast[cb] = sGam[n - 1];
  for (int i = tid; p.perKey && i < Kp; i += kThreads) p.gammaLast[cb * Kp + i] = keyGam(n - 1, i);
}

// ============================== state pass and output ==============================

__host__ __device__ inline int stateLd(int vt) { return vt + 4; }

// The state passes (this one and the backward's, chunkBwdStateKernel) keep in shared memory the
// fp32 state tile (Kp x ldS); the state and V' rounded to the storage type (Kp and 64 rows of ldH),
// the B operands of their products, read with ldmatrix; and the chunk's W, Qg, Kd (64 x ldT each)
// and P (64 x kLdP), staged with cp.async; the forward also U's value tile (64 x ldH), the backward
// two buffers of dO's (64 x ldH each). The 16-bit rows are padded by 16 bytes, so that the eight rows one ldmatrix
// reads fall in distinct banks. Offsets in bytes from the start of the dynamic shared memory (all 16-byte aligned).
constexpr int kLdP = kC + 8;
struct StateLayout {
  int ldS, ldH, ldT;
  size_t sh, v, w, qg, kd, pm, dO, bytes;
};
__host__ __device__ inline StateLayout stateLayout(int Kp, int vt, size_t elem, bool backward) {
  StateLayout m;
  m.ldS = stateLd(vt);
  m.ldH = vt + 8;
  m.ldT = Kp + 8;
  size_t off = static_cast<size_t>(Kp) * m.ldS * sizeof(float);
  m.sh = off;
  off += static_cast<size_t>(Kp) * m.ldH * elem;
  m.v = off;
  off += static_cast<size_t>(kC) * m.ldH * elem;
  m.w = off;
  off += static_cast<size_t>(kC) * m.ldT * elem;
  m.qg = off;
  off += static_cast<size_t>(kC) * m.ldT * elem;
  m.kd = off;
  off += static_cast<size_t>(kC) * m.ldT * elem;
  m.pm = off;
  off += static_cast<size_t>(kC) * kLdP * elem;
  m.dO = off;  // the forward's U tile (64 x ldH) or the backward's two dO tiles
  off += (backward ? 2 : 1) * static_cast<size_t>(kC) * m.ldH * elem;
  m.bytes = off;
  return m;
}

// dst[i * V + v0 + j] = sS[i * ldS + j] over the valid K x vw part of a state tile (the whole block).
__device__ __forceinline__ void storeTile(float* dst, const float* sS, int K, int vw, int ldS, int64_t V, int v0) {
  for (int e = static_cast<int>(threadIdx.x); e < K * vw; e += kThreads) {
    const int i = e / vw, j = e - (e / vw) * vw;
    dst[static_cast<int64_t>(i) * V + v0 + j] = sS[i * ldS + j];
  }
}

// The state passes' shared-memory tiles (stateLayout) and the loads both passes make into them.
template <class T> struct StateTiles {
  StateLayout lay;
  float* S;        // Kp x ldS: the state tile (or its adjoint's), fp32
  T* Sh;           // Kp x ldH: the same, storage type
  T* Vh;           // 64 x ldH: V' (or -dV') of the current chunk, storage type
  T *W, *Qg, *Kd;  // 64 x ldT each: the chunk's scratch tiles
  T* P;            // 64 x kLdP
  T* dO;           // backward: 2 x 64 x ldH, dO's value tile of chunks of even and odd index
  T* U;            // forward: 64 x ldH, U's value tile of the current chunk (the same bytes)
  __device__ StateTiles(const ChunkParams& p, bool backward) : lay(stateLayout(p.Kp, p.vt, sizeof(T), backward)) {
    unsigned char* smem = dynamicShared<unsigned char>();
    S = reinterpret_cast<float*>(smem);
    Sh = reinterpret_cast<T*>(smem + lay.sh);
    Vh = reinterpret_cast<T*>(smem + lay.v);
    W = reinterpret_cast<T*>(smem + lay.w);
    Qg = reinterpret_cast<T*>(smem + lay.qg);
    Kd = reinterpret_cast<T*>(smem + lay.kd);
    P = reinterpret_cast<T*>(smem + lay.pm);
    dO = reinterpret_cast<T*>(smem + lay.dO);
    U = dO;
  }
  // S and Sh from the value tile of a K x V row-major state (null: zeros). The whole block calls.
  __device__ void loadState(const ChunkParams& p, const StateTile& tl, const float* src) const {
    const int K = static_cast<int>(p.K);
    for (int e = static_cast<int>(threadIdx.x); e < p.Kp * lay.ldS; e += kThreads) {
      const int i = e / lay.ldS, j = e - (e / lay.ldS) * lay.ldS;
      const float x =
          (src != nullptr && i < K && j < tl.vw) ? src[tl.stateOff + static_cast<int64_t>(i) * p.V + tl.v0 + j] : 0.0f;
      S[e] = x;
      Sh[i * lay.ldH + j] = fromFloat<T>(x);  // ldH > ldS
    }
  }
  // Issues the copies of one of W, Qg, Kd (dst, from the scratch array src) of (chunk, value head) cb.
  __device__ void stageRows(T* dst, const void* src, int64_t cb, const ChunkParams& p) const {
    stageTilePadded(dst, lay.ldT, static_cast<const T*>(src) + cb * kC * p.Kp, p.Kp, kC, p.Kp, p.Kp, true);
  }
  __device__ void stageP(int64_t cb, const ChunkParams& p) const {
    stageTilePadded(P, kLdP, static_cast<const T*>(p.P) + cb * kC * kC, kC, kC, kC, kC, true);
  }
};

// acc[j] += a B_j for the first nb (even, default all NT) of the NT column blocks (NT even) of rows
// 16 s .. 16 s + 15 of a 16-bit tile (row stride ld): B read with ldmatrix, two column blocks per
// instruction.
template <class T, int NT>
__device__ __forceinline__ void mmaTileRows(mma::FragC (&acc)[NT], const mma::FragA16& a, const T* tile, int ld, int s,
                                            int nb = NT) {
#pragma unroll
  for (int j = 0; j < NT; j += 2) {
    if (j >= nb) continue;
    mma::FragB16 b0, b1;
    mma::ldmatrixB16x2(tile + 16 * s * ld + 8 * j, ld, b0, b1);
    mma::mma16816<T>(acc[j], a, b0);
    mma::mma16816<T>(acc[j + 1], a, b1);
  }
}

// NT = vt / 8: the column blocks of the value tile.
// Per chunk c, three products, each a barrier apart, while chunk c + 1's tiles load into the
// buffers the previous product has released (one cp.async group each, committed in this order):
//   V' = U - W S          then W, U(c + 1) issued    (waits for Qg(c), P(c))
//   O = Qg S + P V'       then Qg, P(c + 1)          (waits for Kd(c))
//   S = exp(G) S + Kd^T V' then Kd(c + 1)            (waits for W(c + 1))
// so at the top of every chunk its W and U have landed and its Qg, P and Kd are the two groups in
// flight. (U's value tile is copied element by element at the same point where its rows are not
// 16-byte aligned, V not a multiple of 8.)
template <class T, int NT> __global__ void __launch_bounds__(kThreads, 2) chunkStateKernel(const ChunkParams p) {
  const StateTile tl = stateTileOf(p);
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  const int64_t KV = p.K * p.V;

  const StateTiles<T> sm(p, false);
  const int ldS = sm.lay.ldS, ldH = sm.lay.ldH, ldT = sm.lay.ldT;

  T* o = static_cast<T*>(p.o);
  const int L = static_cast<int>(tl.seg.length);
  const int nChunks = (L + kC - 1) / kC;
  auto cbOf = [&](int c) { return (tl.seg.chunkOffset + c) * p.HV + tl.hv; };
  const bool uAsync = p.V % 8 == 0;  // U's rows (scratch, 256-byte aligned) 16-byte aligned
  auto stageW = [&](int c) {
    if (c < nChunks) {
      if (p.delta) sm.stageRows(sm.W, p.W, cbOf(c), p);
      const int n = L - c * kC < kC ? L - c * kC : kC;
      stageTilePadded(sm.U, ldH, static_cast<const T*>(p.U) + cbOf(c) * kC * p.V + tl.v0, p.V, n, tl.vw, p.vt, uAsync);
    }
    commitAsyncCopies();
  };
  auto stageQgP = [&](int c) {
    if (c < nChunks) {
      sm.stageRows(sm.Qg, p.Qg, cbOf(c), p);
      sm.stageP(cbOf(c), p);
    }
    commitAsyncCopies();
  };
  auto stageKd = [&](int c) {
    if (c < nChunks) sm.stageRows(sm.Kd, p.Kd, cbOf(c), p);
    commitAsyncCopies();
  };
  stageW(0);
  stageQgP(0);
  stageKd(0);
  sm.loadState(p, tl, p.h0);
  waitAsyncCopyGroups<2>();  // W(0)
  __syncthreads();

  for (int c = 0; c < nChunks; ++c) {
    const int64_t cb = cbOf(c);
    const int n = L - c * kC < kC ? L - c * kC : kC;
    const int kRows = (n + 15) / 16;  // 16-row steps that hold positions
    const int64_t rowBase = tl.seg.batch * p.T + tl.seg.start + static_cast<int64_t>(c) * kC;
    if (p.states != nullptr) storeTile(p.states + cb * KV, sm.S, K, tl.vw, ldS, p.V, tl.v0);

    // V' = U - W S: each fragment of W is loaded once and used for the NT column blocks (V' = U
    // without the delta term).
    {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      if (p.delta && warp < kRows) {
        for (int s = 0; s < kSteps; ++s) {
          const mma::FragA16 a = mma::ldmatrixA16(sm.W + r0 * ldT + 16 * s, ldT);
          mmaTileRows<T, NT>(acc, a, sm.Sh, ldH, s);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          const float u = toFloat(sm.U[r * ldH + col]);  // zero past n and vw
          sm.Vh[r * ldH + col] = fromFloat<T>(u - val);
        });
      }
    }
    waitAsyncCopyGroups<1>();  // Qg(c), P(c)
    __syncthreads();
    stageW(c + 1);

    // O = Qg S + P V' (P lower triangular: k-steps up to the diagonal block).
    if (warp < kRows) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      for (int s = 0; s < kSteps; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16(sm.Qg + r0 * ldT + 16 * s, ldT);
        mmaTileRows<T, NT>(acc, a, sm.Sh, ldH, s);
      }
      for (int s = 0; s <= warp; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16(sm.P + r0 * kLdP + 16 * s, kLdP);
        mmaTileRows<T, NT>(acc, a, sm.Vh, ldH, s);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          if (r < n && col < tl.vw) o[((rowBase + r) * p.HV + tl.hv) * p.V + tl.v0 + col] = fromFloat<T>(val);
        });
      }
    }
    waitAsyncCopyGroups<1>();  // Kd(c)
    __syncthreads();
    stageQgP(c + 1);

    // S = exp(G_{n-1}) S + Kd^T V': warp w owns the state rows 16 m.. for m = w, w + 4, ...
    for (int m = warp; m < kSteps; m += kWarps) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j] = mma::loadC(
            [&](int rr, int cc) { return lastDecay(p, cb, 16 * m + rr) * sm.S[(16 * m + rr) * ldS + 8 * j + cc]; });
      }
      for (int s = 0; s < kRows; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16T(sm.Kd + 16 * s * ldT + 16 * m, ldT);  // (Kd^T) rows 16 m..
        mmaTileRows<T, NT>(acc, a, sm.Vh, ldH, s);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          sm.S[(16 * m + rr) * ldS + 8 * j + cc] = val;
          sm.Sh[(16 * m + rr) * ldH + 8 * j + cc] = fromFloat<T>(val);
        });
      }
    }
    waitAsyncCopyGroups<1>();  // W(c + 1)
    __syncthreads();
    stageKd(c + 1);
  }
  waitAsyncCopies();  // nothing is in flight past the last chunk (its groups are empty)
  if (p.finalState != nullptr) storeTile(p.finalState + tl.stateOff, sm.S, K, tl.vw, ldS, p.V, tl.v0);
}

}  // namespace
}  // namespace deltachunked
}  // namespace rkcuda
