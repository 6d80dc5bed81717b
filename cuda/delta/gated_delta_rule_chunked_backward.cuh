// The gated delta rule's chunked backward (cuda/delta/gated_delta_rule_chunked.cu).
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
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "delta/delta_params.cuh"
#include "delta/gated_delta_rule_chunked.h"

#include "delta/gated_delta_rule_chunked_forward.cuh"

namespace rkcuda {
namespace deltachunked {
namespace {

// ============================== backward ==============================

// acc[j] += A (16 rows, k-steps s0 <= s < s1 of 16) * B (column blocks jb + j, j < nb <= NB): a(rr, k)
// is element (row rr of the warp's tile, k), b(k, col) element (k, col) of B. Warp-collective; nb,
// s0, s1 warp-uniform.
template <class T, int NB, class AAt, class BAt>
__device__ __forceinline__ void warpMma(mma::FragC (&acc)[NB], int nb, int s0, int s1, int jb, AAt a, BAt b) {
  for (int s = s0; s < s1; ++s) {
    const mma::FragA16 fa = mma::loadA16<T>([&](int rr, int kk) { return a(rr, 16 * s + kk); });
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j < nb) {
        mma::mma16816<T>(acc[j], fa,
                         mma::loadB16<T>([&](int kk, int nn) { return b(16 * s + kk, 8 * (jb + j) + nn); }));
      }
    }
  }
}

// dst[r0 + g] += lo, dst[r0 + g + 8] += hi summed over the four lanes of each fragment row
// (lo, hi: this lane's part of the rows g and g + 8 of a C fragment). Warp-collective.
__device__ __forceinline__ void addRowSums(float* dst, int r0, float lo, float hi) {
  lo += __shfl_xor_sync(0xffffffffu, lo, 1);
  lo += __shfl_xor_sync(0xffffffffu, lo, 2);
  hi += __shfl_xor_sync(0xffffffffu, hi, 1);
  hi += __shfl_xor_sync(0xffffffffu, hi, 2);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if ((lane & 3) == 0) {
    atomicAdd(dst + r0 + (lane >> 2), lo);
    atomicAdd(dst + r0 + (lane >> 2) + 8, hi);
  }
}

// Reverse pass over the chunks, one block per (sequence, value head, tile of vt = 8 NT value
// columns): the fp32 tile of dS (the gradient of the state at the end of the current chunk) lives
// in shared memory, from dFinal down to dh0. Per chunk: stores dS (dStates) and adds <S_0, dS> to
// dGamL, then dV' = P^T dO + Kd dS (stored, storage type), dS <- exp(G_{n-1}) dS + Qg^T dO - W^T dV'.
// Shared memory as the forward's state pass (stateLayout): dS in fp32 and rounded to the storage
// type, -dV' rounded (so that W^T, not -W^T, is the A operand: the same products), and the chunk's
// P, Kd, Qg and W staged with cp.async, read with ldmatrix (.trans for P^T, Qg^T and W^T). P and
// Kd of the chunk before load during the dS update, Qg and W during the dV' product (one cp.async
// group each), so at the top of every chunk its P and Kd have landed and its Qg and W are in flight.
// dO is read per element from global memory.
template <class T, int NT> __global__ void __launch_bounds__(kThreads, 2) chunkBwdStateKernel(const ChunkParams p) {
  const StateTile tl = stateTileOf(p);
  const int K = static_cast<int>(p.K);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  const int64_t KV = p.K * p.V;

  const StateTiles<T> sm(p);
  const int ldS = sm.lay.ldS, ldH = sm.lay.ldH, ldT = sm.lay.ldT;

  const T* dO = static_cast<const T*>(p.dO);
  const int L = static_cast<int>(tl.seg.length);
  const int nChunks = (L + kC - 1) / kC;
  auto cbOf = [&](int c) { return (tl.seg.chunkOffset + c) * p.HV + tl.hv; };
  auto stagePKd = [&](int c) {
    if (c >= 0) {
      sm.stageP(cbOf(c), p);
      sm.stageRows(sm.Kd, p.Kd, cbOf(c), p);
    }
    commitAsyncCopies();
  };
  auto stageQgW = [&](int c) {
    if (c >= 0) {
      sm.stageRows(sm.Qg, p.Qg, cbOf(c), p);
      sm.stageRows(sm.W, p.W, cbOf(c), p);
    }
    commitAsyncCopies();
  };
  stagePKd(nChunks - 1);
  stageQgW(nChunks - 1);
  sm.loadState(p, tl, p.dFinal);
  waitAsyncCopyGroups<1>();  // P, Kd of the last chunk
  __syncthreads();

  for (int c = nChunks - 1; c >= 0; --c) {
    const int64_t cb = cbOf(c);
    const int n = L - c * kC < kC ? L - c * kC : kC;
    const int kRows = (n + 15) / 16;
    const int64_t rowBase = tl.seg.batch * p.T + tl.seg.start + static_cast<int64_t>(c) * kC;
    {
      float* dst = p.dStates + cb * KV;
      const float* ck = p.checkpoints + cb * KV;
      float part = 0.0f;
      for (int e = tid; e < K * tl.vw; e += kThreads) {
        const int i = e / tl.vw, j = e - (e / tl.vw) * tl.vw;
        const int64_t off = static_cast<int64_t>(i) * p.V + tl.v0 + j;
        const float d = sm.S[i * ldS + j];
        dst[off] = d;
        part = fmaf(ck[off], d, part);
      }
      part = warpSum(part);
      if (lane == 0) atomicAdd(p.dGamL + cb, part);
    }
    T* dVp = static_cast<T*>(p.dVp) + cb * kC * p.V;
    // B fragments of dO (columns 8 j.., rows 16 s..), per element.
    auto dOFrag = [&](int s, int j) {
      return mma::loadB16<T>([&](int kk, int nn) {
        const int r = 16 * s + kk, col = 8 * j + nn;
        return (dO != nullptr && r < n && col < tl.vw) ? toFloat(dO[((rowBase + r) * p.HV + tl.hv) * p.V + tl.v0 + col])
                                                       : 0.0f;
      });
    };

    // dV' = P^T dO + Kd dS (P^T upper triangular: k-steps from the diagonal block).
    {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      if (warp < kRows) {
        for (int s = warp; s < kRows; ++s) {
          const mma::FragA16 a = mma::ldmatrixA16T(sm.P + 16 * s * kLdP + r0, kLdP);  // (P^T) rows r0..
#pragma unroll
          for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, dOFrag(s, j));
        }
        for (int s = 0; s < kSteps; ++s) {
          const mma::FragA16 a = mma::ldmatrixA16(sm.Kd + r0 * ldT + 16 * s, ldT);
          mmaTileRows<T, NT>(acc, a, sm.Sh, ldH, s);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          sm.Vh[r * ldH + col] = fromFloat<T>(-val);
          if (col < tl.vw) dVp[r * p.V + tl.v0 + col] = fromFloat<T>(val);
        });
      }
    }
    waitAsyncCopyGroups<0>();  // Qg, W
    __syncthreads();
    stagePKd(c - 1);

    // dS = exp(G_{n-1}) dS + Qg^T dO - W^T dV': warp w owns the state rows 16 m.. for m = w, w + 4, ...
    const float gl = p.gammaLast[cb];
    for (int m = warp; m < kSteps; m += kWarps) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j] = mma::loadC([&](int rr, int cc) { return gl * sm.S[(16 * m + rr) * ldS + 8 * j + cc]; });
      }
      for (int s = 0; s < kRows; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16T(sm.Qg + 16 * s * ldT + 16 * m, ldT);  // (Qg^T) rows 16 m..
#pragma unroll
        for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, dOFrag(s, j));
      }
      for (int s = 0; s < kRows; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16T(sm.W + 16 * s * ldT + 16 * m, ldT);  // (W^T) rows 16 m..
        mmaTileRows<T, NT>(acc, a, sm.Vh, ldH, s);                                    // B = -dV'
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          sm.S[(16 * m + rr) * ldS + 8 * j + cc] = val;
          sm.Sh[(16 * m + rr) * ldH + 8 * j + cc] = fromFloat<T>(val);
        });
      }
    }
    waitAsyncCopyGroups<0>();  // P, Kd of the chunk before
    __syncthreads();
    stageQgW(c - 1);
  }
  waitAsyncCopies();  // nothing is in flight past the first chunk (its groups are empty)
  if (p.dh0 != nullptr) storeTile(p.dh0 + tl.stateOff, sm.S, K, tl.vw, ldS, p.V, tl.v0);
}

constexpr int kKt = 32;  // K columns per step of the gradient kernel's column loops
constexpr int kLdW = kKt + 4;

inline size_t gradSharedBytes(const ChunkParams& p, size_t elemBytes) {
  return kC * sizeof(double) + 7 * kC * sizeof(float) + 3 * kC * kLdA * sizeof(float) + kC * kLdW * sizeof(float) +
         static_cast<size_t>(kC) * (2 * p.ldk + p.Vp + 8) * elemBytes;
}

// Per (chunk, value head), all chunks in parallel, from the chunk's checkpoint S_0, the gradient
// dS of the state at its end (dStates), dV' and the preparation's scratch:
//   V' = U - W S_0;  dv = Tm^T dV';  dP = tril(dO V'^T);  dQg = dO S_0^T;  dKd = V' dS^T;
//   dW = -dV' S_0^T;  dTm = dV' V^T + dW (K exp(G))^T;  d(K exp(G)) = Tm^T dW;
//   Tm = X diag(beta), X = (I + A)^-1:  dbeta += colsum(dTm * X),  dA = -X^T (dTm diag(beta)) X^T;
//   A_ts = beta_t Gamma_ts k_t.k_s, P_ts = scale Gamma_ts q_t.k_s: dk, dq, dbeta and the
//   log-decay gradients dlogGamma_ts = dA_ts A_ts + dP_ts P_ts (+ to G_t, - to G_s);
//   dG from the row scalings exp(G_t) (Qg, K exp(G)), exp(G_{n-1} - G_t) (Kd) and exp(G_{n-1});
//   dg_t = sum_{t' >= t} dG_t' (within the chunk).
// dq, dk (w.r.t. the normalised q, k) are added to fp32 accumulators (value heads of a q / k head
// meet there); dv, dg and dbeta (fp32) are written.
template <class T> __global__ void __launch_bounds__(kThreads) chunkGradKernel(const ChunkParams p) {
  const int64_t gc = static_cast<int64_t>(blockIdx.x) / p.HV;
  const int64_t hv = static_cast<int64_t>(blockIdx.x) - gc * p.HV;
  const int64_t h = hv / p.group;
  const ScanSegment seg = segmentOfChunk(p, gc);
  const int64_t cs = (gc - seg.chunkOffset) * kC;
  const int n = static_cast<int>(seg.length - cs < kC ? seg.length - cs : kC);
  const int64_t rowBase = seg.batch * p.T + seg.start + cs;
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V), ld = p.ldk, ldv = p.Vp + 8;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16, vSteps = p.Vp / 16;
  const int64_t cb = gc * p.HV + hv;
  const int64_t KV = p.K * p.V;

  double* sG = dynamicShared<double>();
  float* sBeta = reinterpret_cast<float*>(sG + kC);
  float* sRk = sBeta + kC;
  float* sRq = sRk + kC;
  float* sGam = sRq + kC;        // exp(G)
  float* sDG = sGam + kC;        // dL/dG
  float* sDB = sDG + kC;         // dL/dbeta
  float* sF = sDB + kC;          // sum_i dKd_ti Kd_ti
  float* sX = sF + kC;           // X = (I + A)^-1
  float* sDT = sX + kC * kLdA;   // dTm, then dX, Y = dX X^T, dA, E
  float* sDP = sDT + kC * kLdA;  // dP, then Ep
  float* sDW = sDP + kC * kLdA;  // dW, 64 x kKt per column step
  T* sK = reinterpret_cast<T*>(sDW + kC * kLdW);
  T* sQ = sK + kC * ld;
  T* sVp = sQ + kC * ld;  // V', 64 x ldv

  const T* vg = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dO);
  const float* Xg = p.Xinv + cb * kC * kC;
  for (int e = tid; e < kC * kC; e += kThreads) sX[(e / kC) * kLdA + (e % kC)] = Xg[e];
  if (tid < kC) {
    sDG[tid] = 0.0f;
    sDB[tid] = 0.0f;
    sF[tid] = 0.0f;
  }
  stageChunk(p, rowBase, h, hv, n, sK, sQ, sG, sGam, sBeta, sRk, sRq);

  auto kn = [&](int r, int i) -> float { return i < K ? toFloat(sK[r * ld + i]) * sRk[r] : 0.0f; };
  auto qn = [&](int r, int i) -> float { return i < K ? toFloat(sQ[r * ld + i]) * sRq[r] : 0.0f; };
  auto decay = [&](int t, int s) -> float { return fastExp(static_cast<float>(sG[t] - sG[s])); };
  const double GL = sG[n - 1];
  const T* W = static_cast<const T*>(p.W) + cb * kC * p.Kp;
  const T* U = static_cast<const T*>(p.U) + cb * kC * p.V;
  const T* dVp = static_cast<const T*>(p.dVp) + cb * kC * p.V;
  const float* S0 = p.checkpoints + cb * KV;
  const float* dS = p.dStates + cb * KV;
  auto dOrow = [&](int rr, int col) -> float {
    const int r = r0 + rr;
    return (dO != nullptr && r < n && col < V) ? toFloat(dO[((rowBase + r) * p.HV + hv) * p.V + col]) : 0.0f;
  };
  auto dVrow = [&](int rr, int col) -> float { return col < V ? toFloat(dVp[(r0 + rr) * p.V + col]) : 0.0f; };
  auto tmT = [&](int rr, int s) -> float { return sX[s * kLdA + r0 + rr] * sBeta[r0 + rr]; };  // Tm^T
  constexpr int NB = 4;

  // V' = U - W S_0 (stored as T); dv = Tm^T dV'; dTm = dV' V^T (lower triangle kept).
  for (int jb = 0; jb < p.Vp / 8; jb += NB) {
    const int nb = p.Vp / 8 - jb < NB ? p.Vp / 8 - jb : NB;
    mma::FragC acc[NB], accV[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) acc[j].zero(), accV[j].zero();
    warpMma<T>(
        acc, nb, 0, kSteps, jb, [&](int rr, int i) { return i < K ? toFloat(W[(r0 + rr) * p.Kp + i]) : 0.0f; },
        [&](int i, int col) { return (i < K && col < V) ? S0[static_cast<int64_t>(i) * p.V + col] : 0.0f; });
    warpMma<T>(accV, nb, warp, kC / 16, jb, tmT,
               [&](int s, int col) { return col < V ? toFloat(dVp[s * p.V + col]) : 0.0f; });
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * (jb + j) + cc;
        const float u = col < V ? toFloat(U[r * p.V + col]) : 0.0f;
        sVp[r * ldv + col] = fromFloat<T>(u - val);
      });
      mma::storeC(accV[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * (jb + j) + cc;
        if (r < n && col < V) storeScalar(static_cast<T*>(p.dv) + ((rowBase + r) * p.HV + hv) * p.V + col, val);
      });
    }
  }
  {
    mma::FragC acc[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
    warpMma<T>(acc, kC / 8, 0, vSteps, 0, dVrow, [&](int col, int s) {
      return (s < n && col < V) ? loadScalar(vg + ((rowBase + s) * p.HV + hv) * p.V + col) : 0.0f;
    });
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sDT[r * kLdA + col] = col <= r ? val : 0.0f;
      });
    }
  }
  __syncthreads();

  // dP = tril(dO V'^T).
  {
    mma::FragC acc[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
    warpMma<T>(acc, 2 * warp + 2, 0, vSteps, 0, dOrow, [&](int col, int s) { return toFloat(sVp[s * ldv + col]); });
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sDP[r * kLdA + col] = col <= r ? val : 0.0f;
      });
    }
  }

  // Column steps of kKt over K: dQg, dKd, dW, then dTm += dW (K exp(G))^T and d(K exp(G)) = Tm^T dW.
  for (int kt = 0; kt < p.Kp; kt += kKt) {
    const int nb = (p.Kp - kt) / 8 < NB ? (p.Kp - kt) / 8 : NB;
    const int jb = kt / 8;
    mma::FragC aQ[NB], aK[NB], aW[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) aQ[j].zero(), aK[j].zero(), aW[j].zero();
    auto s0T = [&](int col, int i) { return (i < K && col < V) ? S0[static_cast<int64_t>(i) * p.V + col] : 0.0f; };
    warpMma<T>(aQ, nb, 0, vSteps, jb, dOrow, s0T);
    warpMma<T>(aW, nb, 0, vSteps, jb, dVrow, s0T);
    warpMma<T>(
        aK, nb, 0, vSteps, jb, [&](int rr, int col) { return toFloat(sVp[(r0 + rr) * ldv + col]); },
        [&](int col, int i) { return (i < K && col < V) ? dS[static_cast<int64_t>(i) * p.V + col] : 0.0f; });
    float gLo = 0.0f, gHi = 0.0f, fLo = 0.0f, fHi = 0.0f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(aQ[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r >= n || i >= K) return;
        const float f = p.scale * sGam[r];
        atomicAdd(p.dqAcc + ((rowBase + r) * p.H + h) * p.K + i, val * f);
        const float x = val * f * qn(r, i);
        if (rr < 8)
          gLo += x;
        else
          gHi += x;
      });
      mma::storeC(aK[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        const float x = r < n ? val * fastExp(static_cast<float>(GL - sG[r])) * kn(r, i) : 0.0f;
        if (rr < 8)
          fLo += x;
        else
          fHi += x;
      });
      mma::storeC(aW[j], [&](int rr, int cc, float val) { sDW[(r0 + rr) * kLdW + 8 * j + cc] = -val; });
    }
    addRowSums(sDG, r0, gLo, gHi);
    addRowSums(sF, r0, fLo, fHi);
    __syncthreads();
    {
      mma::FragC acc[kC / 8];
#pragma unroll
      for (int j = 0; j < kC / 8; ++j)
        acc[j] = mma::loadC([&](int rr, int cc) { return sDT[(r0 + rr) * kLdA + 8 * j + cc]; });
      warpMma<T>(
          acc, 2 * warp + 2, 0, nb / 2, 0, [&](int rr, int i) { return sDW[(r0 + rr) * kLdW + i]; },
          [&](int i, int s) { return kn(s, kt + i) * sGam[s]; });
#pragma unroll
      for (int j = 0; j < kC / 8; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          sDT[r * kLdA + col] = col <= r ? val : 0.0f;
        });
      }
    }
    mma::FragC aG[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) aG[j].zero();
    warpMma<T>(aG, nb, warp, kC / 16, 0, tmT, [&](int s, int i) { return sDW[s * kLdW + i]; });
    gLo = gHi = 0.0f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      const mma::FragC kd = aK[j];
      mma::storeC(aG[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r >= n || i >= K) return;
        // this lane's element (rr, cc) of aK[j]
        const float dkd = kd.c[(rr >= 8 ? 2 : 0) + (cc & 1)];
        const float d = val * sGam[r] + dkd * fastExp(static_cast<float>(GL - sG[r]));
        atomicAdd(p.dkAcc + ((rowBase + r) * p.H + h) * p.K + i, d);
        const float x = val * sGam[r] * kn(r, i);
        if (rr < 8)
          gLo += x;
        else
          gHi += x;
      });
    }
    addRowSums(sDG, r0, gLo, gHi);
    __syncthreads();
  }

  // dbeta from Tm = X diag(beta); dX = dTm diag(beta) (column c: thread c).
  if (tid < kC) {
    const int c = tid;
    float acc = 0.0f;
    const float b = sBeta[c];
    for (int i = c; i < kC; ++i) {
      const float d = sDT[i * kLdA + c];
      acc = fmaf(d, sX[i * kLdA + c], acc);
      sDT[i * kLdA + c] = d * b;
    }
    atomicAdd(sDB + c, acc);
  }
  __syncthreads();
  // Y = dX X^T (dX, X lower triangular), then dA = -X^T Y (strictly lower part).
  {
    mma::FragC acc[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
    warpMma<T>(
        acc, kC / 8, 0, warp + 1, 0, [&](int rr, int k) { return sDT[(r0 + rr) * kLdA + k]; },
        [&](int k, int j) { return sX[j * kLdA + k]; });
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) { sDT[(r0 + rr) * kLdA + 8 * j + cc] = val; });
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
    warpMma<T>(
        acc, 2 * warp + 2, warp, kC / 16, 0, [&](int rr, int i) { return sX[i * kLdA + r0 + rr]; },
        [&](int i, int b) { return sDT[i * kLdA + b]; });
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sDT[r * kLdA + col] = col < r ? -val : 0.0f;
      });
    }
  }
  // K K^T and Q K^T again (fp32 accumulation): E = dA beta Gamma, Ep = dP scale Gamma, and the
  // log-decay gradients; each lane rewrites only its own elements of sDT and sDP.
  {
    mma::FragC accA[kC / 8], accP[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) accA[j].zero(), accP[j].zero();
    auto kT = [&](int i, int s) { return kn(s, i); };
    warpMma<T>(
        accA, 2 * warp + 2, 0, kSteps, 0, [&](int rr, int i) { return kn(r0 + rr, i); }, kT);
    warpMma<T>(
        accP, 2 * warp + 2, 0, kSteps, 0, [&](int rr, int i) { return qn(r0 + rr, i); }, kT);
    float gLo = 0.0f, gHi = 0.0f, bLo = 0.0f, bHi = 0.0f;
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      if (j >= 2 * warp + 2) continue;
      const mma::FragC kq = accP[j];
      mma::storeC(accA[j], [&](int rr, int s, float kk) {
        const int t = r0 + rr;
        s += 8 * j;
        const float qk = kq.c[(rr >= 8 ? 2 : 0) + (s & 1)];
        float gsum = 0.0f;
        if (s < t && t < n) {
          const float gts = decay(t, s);
          const float dA = sDT[t * kLdA + s];
          const float E = dA * sBeta[t] * gts;
          const float F = E * kk;
          if (rr < 8)
            bLo += dA * gts * kk;
          else
            bHi += dA * gts * kk;
          gsum += F;
          sDT[t * kLdA + s] = E;
        }
        if (s <= t && t < n) {
          const float Ep = sDP[t * kLdA + s] * p.scale * decay(t, s);
          gsum += Ep * qk;
          sDP[t * kLdA + s] = Ep;
        }
        if (rr < 8)
          gLo += gsum;
        else
          gHi += gsum;
        if (gsum != 0.0f) atomicAdd(sDG + s, -gsum);
      });
    }
    addRowSums(sDG, r0, gLo, gHi);
    addRowSums(sDB, r0, bLo, bHi);
  }
  __syncthreads();

  // dq += Ep K;  dk += E K + E^T K + Ep^T Q.
  for (int jb = 0; jb < p.Kp / 8; jb += NB) {
    const int nb = p.Kp / 8 - jb < NB ? p.Kp / 8 - jb : NB;
    mma::FragC aQ[NB], aK[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) aQ[j].zero(), aK[j].zero();
    warpMma<T>(
        aQ, nb, 0, warp + 1, jb, [&](int rr, int s) { return sDP[(r0 + rr) * kLdA + s]; }, kn);
    warpMma<T>(
        aK, nb, 0, warp + 1, jb, [&](int rr, int s) { return sDT[(r0 + rr) * kLdA + s]; }, kn);
    warpMma<T>(
        aK, nb, warp, kC / 16, jb, [&](int rr, int s) { return sDT[s * kLdA + r0 + rr]; }, kn);
    warpMma<T>(
        aK, nb, warp, kC / 16, jb, [&](int rr, int s) { return sDP[s * kLdA + r0 + rr]; }, qn);
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(aQ[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r < n && i < K) atomicAdd(p.dqAcc + ((rowBase + r) * p.H + h) * p.K + i, val);
      });
      mma::storeC(aK[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r < n && i < K) atomicAdd(p.dkAcc + ((rowBase + r) * p.H + h) * p.K + i, val);
      });
    }
  }

  // dG: the Kd scalings exp(G_{n-1} - G_t) and exp(G_{n-1}); dg = reverse cumulative sum of dG.
  if (tid == 0) {
    double fsum = 0.0;
    for (int t = 0; t < n; ++t) fsum += sF[t];
    double acc = fsum + static_cast<double>(p.dGamL[cb]) * sGam[n - 1];
    for (int t = n - 1; t >= 0; --t) {
      acc += static_cast<double>(sDG[t]) - sF[t];
      const int64_t gi = (rowBase + t) * p.HV + hv;
      p.dg[gi] = static_cast<float>(acc);
      p.dbetaAcc[gi] = sDB[t];
    }
  }
}

}  // namespace
}  // namespace deltachunked
}  // namespace rkcuda
