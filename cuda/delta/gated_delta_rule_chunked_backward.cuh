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
#include "common/rows.cuh"
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
// dGamL, then dV' = P^T dO + Kd dS (stored, storage type), dS <- exp(G_{n-1}) dS + Qg^T dO - W^T dV'
// (no W term without the delta term).
// Shared memory as the forward's state pass (stateLayout): dS in fp32 and rounded to the storage
// type, -dV' rounded (so that W^T, not -W^T, is the A operand: the same products), the chunk's
// P, Kd, Qg and W staged with cp.async, read with ldmatrix (.trans for P^T, Qg^T and W^T), and dO's
// value tile in two buffers (chunks of even and odd index), read with ldmatrix as the B operand of
// both products. P, Kd and dO of the chunk before load during the dS update, Qg and W during the dV'
// product (one cp.async group each), so at the top of every chunk its P, Kd and dO have landed and
// its Qg and W are in flight. dO's rows are copied 16 bytes at a time when they are 16-byte aligned
// (V a multiple of 8), else element by element at the same point.
template <class T, int NT> __global__ void __launch_bounds__(kThreads, 2) chunkBwdStateKernel(const ChunkParams p) {
  const StateTile tl = stateTileOf(p);
  const int K = static_cast<int>(p.K);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  const int64_t KV = p.K * p.V;

  const StateTiles<T> sm(p, true);
  const int ldS = sm.lay.ldS, ldH = sm.lay.ldH, ldT = sm.lay.ldT;

  const T* dO = static_cast<const T*>(p.dO);
  const bool dOAsync = p.V % 8 == 0 && reinterpret_cast<uintptr_t>(dO) % 16 == 0;
  const int L = static_cast<int>(tl.seg.length);
  const int nChunks = (L + kC - 1) / kC;
  auto cbOf = [&](int c) { return (tl.seg.chunkOffset + c) * p.HV + tl.hv; };
  auto dOTile = [&](int c) { return sm.dO + (c & 1) * kC * ldH; };
  auto rowBaseOf = [&](int c) { return tl.seg.batch * p.T + tl.seg.start + static_cast<int64_t>(c) * kC; };
  auto stagePKd = [&](int c) {
    if (c >= 0) {
      sm.stageP(cbOf(c), p);
      sm.stageRows(sm.Kd, p.Kd, cbOf(c), p);
      if (dO != nullptr) {
        const int n = L - c * kC < kC ? L - c * kC : kC;
        stageTilePadded(dOTile(c), ldH, dO + (rowBaseOf(c) * p.HV + tl.hv) * p.V + tl.v0, p.HV * p.V, n, tl.vw, p.vt,
                        dOAsync);
      }
    }
    commitAsyncCopies();
  };
  auto stageQgW = [&](int c) {
    if (c >= 0) {
      sm.stageRows(sm.Qg, p.Qg, cbOf(c), p);
      if (p.delta) sm.stageRows(sm.W, p.W, cbOf(c), p);
    }
    commitAsyncCopies();
  };
  if (dO == nullptr) {
    for (int e = tid; e < 2 * kC * ldH; e += kThreads) sm.dO[e] = fromFloat<T>(0.0f);
  }
  stagePKd(nChunks - 1);
  stageQgW(nChunks - 1);
  sm.loadState(p, tl, p.dFinal);
  waitAsyncCopyGroups<1>();  // P, Kd, dO of the last chunk
  __syncthreads();

  for (int c = nChunks - 1; c >= 0; --c) {
    const int64_t cb = cbOf(c);
    const int n = L - c * kC < kC ? L - c * kC : kC;
    const int kRows = (n + 15) / 16;
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
      if (!p.perKey) {
        part = warpSum(part);
        if (lane == 0) atomicAdd(p.dGamL + cb, part);
      } else {  // per key row: <S_0[i, :], dS[i, :]> over the tile's columns, a warp per row
        for (int i = warp; i < K; i += kWarps) {
          float row = 0.0f;
          for (int j = lane; j < tl.vw; j += 32)
            row = fmaf(ck[static_cast<int64_t>(i) * p.V + tl.v0 + j], sm.S[i * ldS + j], row);
          row = warpSum(row);
          if (lane == 0) atomicAdd(p.dGamL + cb * p.Kp + i, row);
        }
      }
    }
    T* dVp = static_cast<T*>(p.dVp) + cb * kC * p.V;
    const T* dOt = dOTile(c);  // dO (rows of the chunk, columns of the tile; zeros past n and vw)

    // dV' = P^T dO + Kd dS (P^T upper triangular: k-steps from the diagonal block).
    {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      if (warp < kRows) {
        for (int s = warp; s < kRows; ++s) {
          const mma::FragA16 a = mma::ldmatrixA16T(sm.P + 16 * s * kLdP + r0, kLdP);  // (P^T) rows r0..
          mmaTileRows<T, NT>(acc, a, dOt, ldH, s);
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
    for (int m = warp; m < kSteps; m += kWarps) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j] = mma::loadC(
            [&](int rr, int cc) { return lastDecay(p, cb, 16 * m + rr) * sm.S[(16 * m + rr) * ldS + 8 * j + cc]; });
      }
      for (int s = 0; s < kRows; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16T(sm.Qg + 16 * s * ldT + 16 * m, ldT);  // (Qg^T) rows 16 m..
        mmaTileRows<T, NT>(acc, a, dOt, ldH, s);
      }
      for (int s = 0; p.delta && s < kRows; ++s) {
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
    waitAsyncCopyGroups<0>();  // P, Kd, dO of the chunk before
    __syncthreads();
    stageQgW(c - 1);
  }
  waitAsyncCopies();  // nothing is in flight past the first chunk (its groups are empty)
  if (p.dh0 != nullptr) storeTile(p.dh0 + tl.stateOff, sm.S, K, tl.vw, ldS, p.V, tl.v0);
}

constexpr int kKt = 32;         // K columns per step of the gradient kernel's column loops
constexpr int kLdSl = kKt + 8;  // 16-bit slices of 32 columns: dW, a column slice of S_0, q and k

// The gradient kernel's shared memory, in bytes from the start (all 16-byte aligned). Regions
// that no phase needs at the same time share their bytes:
//   r1: dV' (64 x ldv, storage type) until the column steps are done, then dP (fp32 64 x kLdA);
//   r2: a 32-column slice of S_0 (Kp x kLdSl) while V' is formed, then dTm (fp32 64 x kLdA)
//       followed by dW (64 x kLdSl);
//   r3: W (64 x ldk) and v (64 x ldv) while V', dv and dTm are formed; then, per column step,
//       rows of S_0 and dS (32 x ldv each) and the step's columns of q and k (64 x kLdSl each);
//       after the column steps, q and k (64 x ldk each);
//   vp: U, then V' (64 x ldv);
//   gk: with a decay per key, the cumulative decays (fp32 64 x Kp) and the sums towards G_{n-1} (Kp).
struct GradLayout {
  int ldv;
  size_t x, r1, r2, dw, r3, vp, gk, bytes;
};
__host__ __device__ inline GradLayout gradLayout(int Kp, int Vp, int ldk, size_t elem, bool perKey) {
  auto up16 = [](size_t b) { return (b + 15) / 16 * 16; };
  auto mx = [](size_t a, size_t b) { return a > b ? a : b; };
  GradLayout m;
  m.ldv = Vp + 8;
  const size_t fmat = static_cast<size_t>(kC) * kLdA * sizeof(float);
  const size_t tileK = static_cast<size_t>(kC) * ldk * elem, tileV = static_cast<size_t>(kC) * m.ldv * elem;
  const size_t slice = static_cast<size_t>(kC) * kLdSl * elem;
  size_t off = kC * sizeof(double) + 7 * kC * sizeof(float);
  m.x = off;
  off += up16(fmat);
  m.r1 = off;
  off += up16(mx(fmat, tileV));
  m.r2 = off;
  m.dw = off + up16(fmat);
  off += mx(up16(fmat) + slice, static_cast<size_t>(Kp) * kLdSl * elem);
  m.r3 = off;
  off += mx(mx(2 * tileK, tileK + tileV), tileV + 2 * slice);
  m.vp = off;
  off += up16(tileV);
  m.gk = off;
  if (perKey) off += static_cast<size_t>(kC + 1) * Kp * sizeof(float);
  m.bytes = off;
  return m;
}

inline size_t gradSharedBytes(const ChunkParams& p, size_t elemBytes) {
  return gradLayout(p.Kp, p.Vp, p.ldk, elemBytes, p.perKey).bytes;
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
// Every mma operand that lives in global memory is staged in shared memory first (gradLayout) and
// read with ldmatrix: W, U, dV' and v with 16-byte cp.async copies at the start (element by
// element where rows are not 16-byte aligned); S_0 and dS rounded to the storage type, a slice at
// a time (32 value columns of S_0 for V', 32 key rows of S_0 and dS per column step), as coalesced
// loads. A warp's dO rows (the A operand of dQg and dP) are read once into registers (VS: the
// fragments per row block, 8 for V <= 128, 16 above). The products and their roundings are those
// of per-element operand loads.
template <class T, int VS, bool Delta>
__global__ void __launch_bounds__(kThreads) chunkGradKernel(const ChunkParams p) {
  const int64_t gc = static_cast<int64_t>(blockIdx.x) / p.HV;
  const int64_t hv = static_cast<int64_t>(blockIdx.x) - gc * p.HV;
  const int64_t h = hv / p.group;
  const ScanSegment seg = segmentOfChunk(p, gc);
  const int64_t cs = (gc - seg.chunkOffset) * kC;
  const int n = static_cast<int>(seg.length - cs < kC ? seg.length - cs : kC);
  const int64_t rowBase = seg.batch * p.T + seg.start + cs;
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V), ld = p.ldk;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16, vSteps = p.Vp / 16;
  const int64_t cb = gc * p.HV + hv;
  const int64_t KV = p.K * p.V;

  const GradLayout lay = gradLayout(p.Kp, p.Vp, p.ldk, sizeof(T), p.perKey);
  const int ldv = lay.ldv;
  unsigned char* smem = dynamicShared<unsigned char>();
  double* sG = reinterpret_cast<double*>(smem);
  float* sBeta = reinterpret_cast<float*>(sG + kC);
  float* sRk = sBeta + kC;
  float* sRq = sRk + kC;
  float* sGam = sRq + kC;                                // exp(G)
  float* sDG = sGam + kC;                                // dL/dG
  float* sDB = sDG + kC;                                 // dL/dbeta
  float* sF = sDB + kC;                                  // sum_i dKd_ti Kd_ti
  float* sX = reinterpret_cast<float*>(smem + lay.x);    // X = (I + A)^-1
  T* sDV = reinterpret_cast<T*>(smem + lay.r1);          // dV'
  float* sDP = reinterpret_cast<float*>(smem + lay.r1);  // dP, then Ep (after the column steps)
  T* sS0c = reinterpret_cast<T*>(smem + lay.r2);         // S_0, 32 value columns (Kp x kLdSl)
  float* sDT = reinterpret_cast<float*>(smem + lay.r2);  // dTm, then dX, Y = dX X^T, dA, E
  T* sDW = reinterpret_cast<T*>(smem + lay.dw);          // dW, 64 x kKt per column step
  T* sW = reinterpret_cast<T*>(smem + lay.r3);           // W (64 x ldk), then v (64 x ldv)
  T* sV = sW + kC * ld;
  T* sS0r = reinterpret_cast<T*>(smem + lay.r3);  // per column step: rows of S_0 and dS (32 x ldv),
  T* sdSr = sS0r + 32 * ldv;                      // the step's columns of k and q (64 x kLdSl)
  T* sKs = sdSr + 32 * ldv;
  T* sQs = sKs + kC * kLdSl;
  T* sK = reinterpret_cast<T*>(smem + lay.r3);  // q, k after the column steps (64 x ldk)
  T* sQ = sK + kC * ld;
  T* sVp = reinterpret_cast<T*>(smem + lay.vp);  // U, then V'
  // A decay per key: G_t[i] and the sums towards G_{n-1}[i].
  const bool perKey = p.perKey;
  const int Kp = p.Kp;
  float* sGk = reinterpret_cast<float*>(smem + lay.gk);
  float* sFk = sGk + kC * Kp;
  auto keyRel = [&](int t, int s, int i) -> float { return keyDecay(sGk, Kp, t, s, i); };
  float* dgk = perKey ? p.dg + (rowBase * p.HV + hv) * p.K : nullptr;  // dG, then dg: [64][HV][K] rows
  auto dgAt = [&](int r, int i) -> float& { return dgk[static_cast<int64_t>(r) * p.HV * p.K + i]; };

  const T* vg = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dO);
  const T* W = Delta ? static_cast<const T*>(p.W) + cb * kC * p.Kp : nullptr;
  const T* U = static_cast<const T*>(p.U) + cb * kC * p.V;
  const T* dVp = static_cast<const T*>(p.dVp) + cb * kC * p.V;
  const float* S0 = p.checkpoints + cb * KV;
  const float* dS = p.dStates + cb * KV;
  {
    const bool rowsV = p.V % 8 == 0;  // rows of V elements 16-byte aligned (scratch: 256-byte aligned)
    if constexpr (Delta) stageTilePadded(sW, ld, W, p.Kp, kC, p.Kp, p.Kp, true);
    stageTilePadded(sVp, ldv, U, p.V, kC, V, p.Vp, rowsV);
    stageTilePadded(sDV, ldv, dVp, p.V, kC, V, p.Vp, rowsV);
    stageTilePadded(sV, ldv, vg + (rowBase * p.HV + hv) * p.V, p.HV * p.V, n, V, p.Vp,
                    rowsV && reinterpret_cast<uintptr_t>(vg) % 16 == 0);
    commitAsyncCopies();
  }
  const float* Xg = p.Xinv + cb * kC * kC;
  for (int e = tid; e < kC * kC; e += kThreads) sX[(e / kC) * kLdA + (e % kC)] = Xg[e];
  if (tid < kC) {
    sDG[tid] = 0.0f;
    sDB[tid] = 0.0f;
    sF[tid] = 0.0f;
  }
  chunkScalars<T>(p, rowBase, h, hv, n, sG, sGam, sBeta, sRk, sRq);
  if (perKey) {
    for (int i = tid; i < Kp; i += kThreads) sFk[i] = 0.0f;
    chunkKeyDecays(p, rowBase, hv, n, sGk);
  }
  // This warp's rows of dO, the A fragments of dQg = dO S_0^T and dP = dO V'^T.
  mma::FragA16 fdO[VS];
#pragma unroll
  for (int s = 0; s < VS; ++s) {
    fdO[s] = mma::loadA16<T>([&](int rr, int kk) {
      const int r = r0 + rr, col = 16 * s + kk;
      return (dO != nullptr && r < n && col < V) ? toFloat(dO[((rowBase + r) * p.HV + hv) * p.V + col]) : 0.0f;
    });
  }
  waitAsyncCopies();

  auto decay = [&](int t, int s) -> float { return fastExp(static_cast<float>(sG[t] - sG[s])); };
  const double GL = sG[n - 1];
  // dq, dk into the fp32 accumulators: atomics where value heads share a q / k head; with one value
  // head per q / k head (p.dqOut set) this block owns its rows, which the column steps write first
  // and the products after them add to, and it finishes them through the L2 norm itself.
  const bool ownsQK = p.dqOut != nullptr;
  auto addQK = [&](float* acc, int64_t off, float v, bool first) {
    if (!ownsQK) {
      atomicAdd(acc + off, v);
    } else if (first) {
      acc[off] = v;
    } else {
      acc[off] += v;
    }
  };
  auto tmT = [&](int rr, int s) -> float { return sX[s * kLdA + r0 + rr] * sBeta[r0 + rr]; };  // Tm^T
  constexpr int NB = 4;
  // acc[j] (j < nb, even) += Tm^T B for the warp's rows: B's column blocks j from a staged 64-row
  // 16-bit tile b (row stride ldb; Tm^T upper triangular: k-steps from the diagonal block).
  auto addTmT = [&](mma::FragC(&acc)[NB], int nb, const T* b, int ldb) {
    for (int s = warp; s < kC / 16; ++s) {
      const mma::FragA16 a = mma::loadA16<T>([&](int rr, int kk) { return tmT(rr, 16 * s + kk); });
      mmaTileRows<T, NB>(acc, a, b, ldb, s, nb);
    }
  };

  // V' = U - W S_0 (stored as T); dv = Tm^T dV'. 32 value columns at a time, S_0's slice staged.
  for (int jb = 0; jb < p.Vp / 8; jb += NB) {
    const int nb = p.Vp / 8 - jb < NB ? p.Vp / 8 - jb : NB;  // even: Vp is a multiple of 16
    __syncthreads();                                         // the slice before is read
    for (int e = tid; Delta && e < p.Kp * kKt; e += kThreads) {
      const int i = e / kKt, c = e - i * kKt, col = 8 * jb + c;
      sS0c[i * kLdSl + c] = fromFloat<T>((i < K && col < V) ? S0[static_cast<int64_t>(i) * p.V + col] : 0.0f);
    }
    __syncthreads();
    mma::FragC acc[NB], accV[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) acc[j].zero(), accV[j].zero();
    for (int s = 0; Delta && s < kSteps; ++s) {  // V' = U without the delta term
      mmaTileRows<T, NB>(acc, mma::ldmatrixA16(sW + r0 * ld + 16 * s, ld), sS0c, kLdSl, s, nb);
    }
    addTmT(accV, nb, sDV + 8 * jb, ldv);  // dv = Tm^T dV' (this step's columns)
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * (jb + j) + cc;
        sVp[r * ldv + col] = fromFloat<T>(toFloat(sVp[r * ldv + col]) - val);  // U there until now
      });
      mma::storeC(accV[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * (jb + j) + cc;
        if (r < n && col < V) storeScalar(static_cast<T*>(p.dv) + ((rowBase + r) * p.HV + hv) * p.V + col, val);
      });
    }
  }
  __syncthreads();  // S_0's slice read: r2 becomes dTm
  // dTm = dV' V^T (lower triangle kept). Without the delta term Tm = I is no function of the inputs:
  // dTm, dW and what follows from them (d(K exp(G)), dbeta, dA, E) are not formed.
  if constexpr (Delta) {
    mma::FragC acc[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
    for (int s = 0; s < vSteps; ++s) {
      const mma::FragA16 a = mma::ldmatrixA16(sDV + r0 * ldv + 16 * s, ldv);
#pragma unroll
      for (int j = 0; j < kC / 8; j += 2) {
        mma::FragB16 b0, b1;
        mma::ldmatrixB16x2T(sV + 8 * j * ldv + 16 * s, ldv, b0, b1);
        mma::mma16816<T>(acc[j], a, b0);
        mma::mma16816<T>(acc[j + 1], a, b1);
      }
    }
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sDT[r * kLdA + col] = col <= r ? val : 0.0f;
      });
    }
  }

  // Column steps of kKt over K: dQg, dKd, dW, then dTm += dW (K exp(G))^T and d(K exp(G)) = Tm^T dW.
  auto kns = [&](int r, int i) -> float { return toFloat(sKs[r * kLdSl + i]) * sRk[r]; };  // step columns
  auto qns = [&](int r, int i) -> float { return toFloat(sQs[r * kLdSl + i]) * sRq[r]; };
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  for (int kt = 0; kt < p.Kp; kt += kKt) {
    const int nb = (p.Kp - kt) / 8 < NB ? (p.Kp - kt) / 8 : NB;  // even: Kp is a multiple of 16
    const int jb = kt / 8;
    __syncthreads();  // r3 (W and v, or the step before's slices) and dW are read
    for (int e = tid; e < 32 * p.Vp; e += kThreads) {
      const int i = e / p.Vp, col = e - i * p.Vp, row = kt + i;
      const bool in = row < K && col < V;
      const int64_t off = static_cast<int64_t>(row) * p.V + col;
      sS0r[i * ldv + col] = fromFloat<T>(in ? S0[off] : 0.0f);
      sdSr[i * ldv + col] = fromFloat<T>(in ? dS[off] : 0.0f);
    }
    for (int e = tid; e < kC * kKt; e += kThreads) {
      const int r = e / kKt, c = e - r * kKt, i = kt + c;
      const bool in = r < n && i < K;
      const int64_t off = ((rowBase + r) * p.H + h) * p.K + i;
      sKs[r * kLdSl + c] = in ? kg[off] : fromFloat<T>(0.0f);
      sQs[r * kLdSl + c] = in ? qg[off] : fromFloat<T>(0.0f);
    }
    __syncthreads();
    mma::FragC aQ[NB], aK[NB], aW[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) aQ[j].zero(), aK[j].zero(), aW[j].zero();
#pragma unroll
    for (int s = 0; s < VS; ++s) {
      if (s >= vSteps) continue;
      const mma::FragA16 aV = mma::ldmatrixA16(sDV + r0 * ldv + 16 * s, ldv);
      const mma::FragA16 aP = mma::ldmatrixA16(sVp + r0 * ldv + 16 * s, ldv);
#pragma unroll
      for (int j = 0; j < NB; j += 2) {
        if (j >= nb) continue;
        mma::FragB16 b0, b1;
        mma::ldmatrixB16x2T(sS0r + 8 * j * ldv + 16 * s, ldv, b0, b1);  // S_0^T
        mma::mma16816<T>(aQ[j], fdO[s], b0);
        mma::mma16816<T>(aQ[j + 1], fdO[s], b1);
        if constexpr (Delta) {
          mma::mma16816<T>(aW[j], aV, b0);
          mma::mma16816<T>(aW[j + 1], aV, b1);
        }
        mma::ldmatrixB16x2T(sdSr + 8 * j * ldv + 16 * s, ldv, b0, b1);  // dS^T
        mma::mma16816<T>(aK[j], aP, b0);
        mma::mma16816<T>(aK[j + 1], aP, b1);
      }
    }
    float gLo = 0.0f, gHi = 0.0f, fLo = 0.0f, fHi = 0.0f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(aQ[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, c = 8 * j + cc, i = kt + c;
        if (r >= n || i >= K) return;
        const float f = p.scale * (perKey ? fastExp(sGk[r * Kp + i]) : sGam[r]);
        addQK(p.dqAcc, ((rowBase + r) * p.H + h) * p.K + i, val * f, true);
        const float x = val * f * qns(r, c);
        if (perKey)
          dgAt(r, i) = x;  // the first term of dG[r][i]
        else if (rr < 8)
          gLo += x;
        else
          gHi += x;
      });
      mma::storeC(aK[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, c = 8 * j + cc, i = kt + c;
        const float kdr = perKey ? keyRel(n - 1, r, i) : fastExp(static_cast<float>(GL - sG[r]));
        const float x = r < n && i < K ? val * kdr * kns(r, c) : 0.0f;
        if (perKey) {
          if (r < n && i < K) {
            dgAt(r, i) -= x;
            atomicAdd(sFk + i, x);
          }
        } else if (rr < 8) {
          fLo += x;
        } else {
          fHi += x;
        }
      });
      if constexpr (Delta) {
        mma::storeC(aW[j],
                    [&](int rr, int cc, float val) { sDW[(r0 + rr) * kLdSl + 8 * j + cc] = fromFloat<T>(-val); });
      }
    }
    addRowSums(sDG, r0, gLo, gHi);
    addRowSums(sF, r0, fLo, fHi);
    __syncthreads();
    if constexpr (Delta) {
      mma::FragC acc[kC / 8];
#pragma unroll
      for (int j = 0; j < kC / 8; ++j)
        acc[j] = mma::loadC([&](int rr, int cc) { return sDT[(r0 + rr) * kLdA + 8 * j + cc]; });
      for (int s = 0; s < nb / 2; ++s) {
        const mma::FragA16 a = mma::ldmatrixA16(sDW + r0 * kLdSl + 16 * s, kLdSl);
#pragma unroll
        for (int j = 0; j < kC / 8; ++j) {
          if (j >= 2 * warp + 2) continue;
          mma::mma16816<T>(acc[j], a, mma::loadB16<T>([&](int kk, int nn) {
                             const int i = 16 * s + kk, t = 8 * j + nn;
                             return kns(t, i) * (perKey ? fastExp(sGk[t * Kp + kt + i]) : sGam[t]);
                           }));
        }
      }
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
    if constexpr (Delta) addTmT(aG, nb, sDW, kLdSl);  // d(K exp(G)) = Tm^T dW
    gLo = gHi = 0.0f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      const mma::FragC kd = aK[j];
      mma::storeC(aG[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, c = 8 * j + cc, i = kt + c;
        if (r >= n || i >= K) return;
        // this lane's element (rr, cc) of aK[j]
        const float dkd = kd.c[(rr >= 8 ? 2 : 0) + (cc & 1)];
        const float gam = perKey ? fastExp(sGk[r * Kp + i]) : sGam[r];
        const float d = val * gam + dkd * (perKey ? keyRel(n - 1, r, i) : fastExp(static_cast<float>(GL - sG[r])));
        addQK(p.dkAcc, ((rowBase + r) * p.H + h) * p.K + i, d, true);
        const float x = val * gam * kns(r, c);
        if (perKey) {
          dgAt(r, i) += x;
          return;
        }
        if (rr < 8)
          gLo += x;
        else
          gHi += x;
      });
    }
    addRowSums(sDG, r0, gLo, gHi);
  }
  __syncthreads();  // dV' and the last step's slices are read: r1 becomes dP, r3 q and k

  // dP = tril(dO V'^T); q and k staged for the products that follow.
  {
    mma::FragC acc[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) acc[j].zero();
#pragma unroll
    for (int s = 0; s < VS; ++s) {
      if (s >= vSteps) continue;
#pragma unroll
      for (int j = 0; j < kC / 8; j += 2) {
        if (j >= 2 * warp + 2) continue;
        mma::FragB16 b0, b1;
        mma::ldmatrixB16x2T(sVp + 8 * j * ldv + 16 * s, ldv, b0, b1);
        mma::mma16816<T>(acc[j], fdO[s], b0);
        mma::mma16816<T>(acc[j + 1], fdO[s], b1);
      }
    }
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      mma::storeC(acc[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, col = 8 * j + cc;
        sDP[r * kLdA + col] = col <= r ? val : 0.0f;
      });
    }
  }
  stageQK(p, rowBase, h, n, sK, sQ);
  __syncthreads();
  auto kn = [&](int r, int i) -> float { return i < K ? toFloat(sK[r * ld + i]) * sRk[r] : 0.0f; };
  auto qn = [&](int r, int i) -> float { return i < K ? toFloat(sQ[r * ld + i]) * sRq[r] : 0.0f; };

  // dbeta from Tm = X diag(beta); dX = dTm diag(beta) (column c: thread c).
  if (Delta && tid < kC) {
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
  if constexpr (Delta) {
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
  // log-decay gradients; each lane rewrites only its own elements of sDT and sDP. (With a decay per
  // key, Gamma is inside the sums: the products below take it, and the log-decay gradients follow
  // from theirs.)
  if (!perKey) {
    mma::FragC accA[kC / 8], accP[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) accA[j].zero(), accP[j].zero();
    auto kT = [&](int i, int s) { return kn(s, i); };
    if constexpr (Delta) {
      warpMma<T>(
          accA, 2 * warp + 2, 0, kSteps, 0, [&](int rr, int i) { return kn(r0 + rr, i); }, kT);
    }
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
        if (Delta && s < t && t < n) {
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

  // With a decay per key: dq_t[i] += sum_{s<=t} scale dP_ts k_s[i] exp(G_t[i] - G_s[i]) and dk_s[i] +=
  // sum_{t>=s} scale dP_ts q_t[i] exp(G_t[i] - G_s[i]). Left of the warp's diagonal block (rows
  // s < r0) the factor splits at r0, below it (rows t > r0 + 15) at r0 + 15, both parts <= 1 (as in
  // the forward's preparation), on tensor cores; the diagonal block is summed in fp32. Their terms of
  // dG: q_t[i] dq_t[i] from G_t, -k_s[i] dk_s[i] from G_s.
  for (int jb = 0; perKey && jb < p.Kp / 8; jb += NB) {
    const int nb = p.Kp / 8 - jb < NB ? p.Kp / 8 - jb : NB;
    const int rEnd = r0 + 15;
    mma::FragC aQ[NB], aK[NB];
    // aQ = sum_{s < r0} M_ts (x_s[i] exp(G_r0[i] - G_s[i])) for the warp's rows t; aK = sum_{t > rEnd}
    // N_ts (y_t[i] exp(G_t[i] - G_rEnd[i])) for the warp's rows s (m(t, s) = M_ts, nm(t, s) = N_ts).
    auto offDiagonal = [&](auto m, auto x, auto nm, auto y) {
#pragma unroll
      for (int j = 0; j < NB; ++j) aQ[j].zero(), aK[j].zero();
      warpMma<T>(
          aQ, nb, 0, warp, jb, [&](int rr, int s) { return m(r0 + rr, s); },
          [&](int s, int i) { return x(s, i) * keyRel(r0, s, i); });
      warpMma<T>(
          aK, nb, warp + 1, kC / 16, jb, [&](int rr, int t) { return nm(t, r0 + rr); },
          [&](int t, int i) { return y(t, i) * keyRel(t, rEnd, i); });
    };
    // Element (t, i) of aQ finished with the diagonal block's terms (s = r0 .. t), and (s, i) of aK
    // (t = s .. rEnd); M and N are zero above their diagonals.
    auto rowOfQ = [&](auto m, auto x, int t, int i, float val) {
      float d = val * keyRel(t, r0, i);
      for (int s = r0; s <= t; ++s) d = fmaf(m(t, s), x(s, i) * keyRel(t, s, i), d);
      return d;
    };
    auto rowOfK = [&](auto nm, auto y, int s, int i, float val) {
      float d = val * keyRel(rEnd, s, i);
      for (int t = s; t <= rEnd; ++t) d = fmaf(nm(t, s), y(t, i) * keyRel(t, s, i), d);
      return d;
    };
    // put(rr, row, i, value) for the elements of acc inside the chunk and K.
    auto eachInside = [&](mma::FragC(&acc)[NB], auto put) {
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        if (j >= nb) continue;
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, i = 8 * (jb + j) + cc;
          if (r < n && i < K) put(rr, r, i, val);
        });
      }
    };
    auto dPs = [&](int t, int s) { return p.scale * sDP[t * kLdA + s]; };
    offDiagonal(dPs, kn, dPs, qn);
    eachInside(aQ, [&](int, int r, int i, float val) {
      const float d = rowOfQ(dPs, kn, r, i, val);
      addQK(p.dqAcc, ((rowBase + r) * p.H + h) * p.K + i, d, false);
      dgAt(r, i) += qn(r, i) * d;
    });
    eachInside(aK, [&](int, int s, int i, float val) {
      const float d = rowOfK(dPs, qn, s, i, val);
      addQK(p.dkAcc, ((rowBase + s) * p.H + h) * p.K + i, d, false);
      dgAt(s, i) -= kn(s, i) * d;
    });
    // The delta term: A_ts = beta_t sum_i k_t[i] k_s[i] exp(G_t[i] - G_s[i]) (s < t), with dA in sDT:
    // Y_t[i] = sum_s dA_ts k_s[i] exp(..): dk_t += beta_t Y_t, dbeta_t += k_t . Y_t, dG_t += beta_t k_t Y_t;
    // Z_s[i] = sum_t beta_t dA_ts k_t[i] exp(..): dk_s += Z_s, dG_s -= k_s Z_s.
    if constexpr (Delta) {
      auto dA = [&](int t, int s) { return sDT[t * kLdA + s]; };
      auto dAb = [&](int t, int s) { return sBeta[t] * sDT[t * kLdA + s]; };
      offDiagonal(dA, kn, dAb, kn);  // Y, Z
      float bLo = 0.0f, bHi = 0.0f;
      eachInside(aQ, [&](int rr, int r, int i, float val) {
        const float y = rowOfQ(dA, kn, r, i, val);
        addQK(p.dkAcc, ((rowBase + r) * p.H + h) * p.K + i, sBeta[r] * y, false);
        const float ky = kn(r, i) * y;
        dgAt(r, i) += sBeta[r] * ky;
        if (rr < 8)
          bLo += ky;
        else
          bHi += ky;
      });
      eachInside(aK, [&](int, int s, int i, float val) {
        const float z = rowOfK(dAb, kn, s, i, val);
        addQK(p.dkAcc, ((rowBase + s) * p.H + h) * p.K + i, z, false);
        dgAt(s, i) -= kn(s, i) * z;
      });
      addRowSums(sDB, r0, bLo, bHi);
    }
  }
  // dq += Ep K;  dk += E K + E^T K + Ep^T Q.
  for (int jb = 0; !perKey && jb < p.Kp / 8; jb += NB) {
    const int nb = p.Kp / 8 - jb < NB ? p.Kp / 8 - jb : NB;
    mma::FragC aQ[NB], aK[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) aQ[j].zero(), aK[j].zero();
    warpMma<T>(
        aQ, nb, 0, warp + 1, jb, [&](int rr, int s) { return sDP[(r0 + rr) * kLdA + s]; }, kn);
    if constexpr (Delta) {
      warpMma<T>(
          aK, nb, 0, warp + 1, jb, [&](int rr, int s) { return sDT[(r0 + rr) * kLdA + s]; }, kn);
      warpMma<T>(
          aK, nb, warp, kC / 16, jb, [&](int rr, int s) { return sDT[s * kLdA + r0 + rr]; }, kn);
    }
    warpMma<T>(
        aK, nb, warp, kC / 16, jb, [&](int rr, int s) { return sDP[s * kLdA + r0 + rr]; }, qn);
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j >= nb) continue;
      mma::storeC(aQ[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r < n && i < K) addQK(p.dqAcc, ((rowBase + r) * p.H + h) * p.K + i, val, false);
      });
      mma::storeC(aK[j], [&](int rr, int cc, float val) {
        const int r = r0 + rr, i = 8 * (jb + j) + cc;
        if (r < n && i < K) addQK(p.dkAcc, ((rowBase + r) * p.H + h) * p.K + i, val, false);
      });
    }
  }

  if (ownsQK) {  // dq, dk of the warp's rows through the L2 norm (the warp wrote every element of them)
    __syncwarp();
    for (int r = r0; r < r0 + 16 && r < n; ++r) {
      const int64_t row = ((rowBase + r) * p.H + h) * p.K;
      l2normBackwardRow(qg + row, p.dqAcc + row, static_cast<T*>(p.dqOut) + row, K, p.l2norm);
      l2normBackwardRow(kg + row, p.dkAcc + row, static_cast<T*>(p.dkOut) + row, K, p.l2norm);
    }
  }

  // dG: the Kd scalings exp(G_{n-1} - G_t) and exp(G_{n-1}); dg = reverse cumulative sum of dG.
  if (perKey) {  // per key column: dG is in dg's rows (written by this block), summed in place
    __syncthreads();
    for (int i = tid; i < K; i += kThreads) {
      double acc = static_cast<double>(sFk[i]) +
                   static_cast<double>(p.dGamL[cb * Kp + i]) * static_cast<double>(fastExp(sGk[(n - 1) * Kp + i]));
      for (int t = n - 1; t >= 0; --t) {
        acc += static_cast<double>(dgAt(t, i));
        dgAt(t, i) = static_cast<float>(acc);
      }
    }
    if constexpr (Delta) {
      for (int t = tid; t < n; t += kThreads) p.dbetaAcc[(rowBase + t) * p.HV + hv] = sDB[t];
    }
  } else if (tid == 0) {
    double fsum = 0.0;
    for (int t = 0; t < n; ++t) fsum += sF[t];
    double acc = fsum + static_cast<double>(p.dGamL[cb]) * sGam[n - 1];
    for (int t = n - 1; t >= 0; --t) {
      acc += static_cast<double>(sDG[t]) - sF[t];
      const int64_t gi = (rowBase + t) * p.HV + hv;
      if (p.dg != nullptr) p.dg[gi] = static_cast<float>(acc);
      if constexpr (Delta) p.dbetaAcc[gi] = sDB[t];
    }
  }
}

}  // namespace
}  // namespace deltachunked
}  // namespace rkcuda
