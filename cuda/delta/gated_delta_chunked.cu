// Gated delta rule, chunked form (WY representation / UT transform) on tensor cores: the forward
// pass for fp16 / bf16 storage, fp32 state and accumulation. gatedDeltaForward (gated_delta.cu)
// calls it for those dtypes; fp32 storage stays on the per-token recurrence (below, "fp32").
//
// Algorithm. Per (sequence, value head), a chunk of C = 64 positions t = 0..n-1 (n < 64 for the
// last one) with state S_0 (K x V) entering it, a_t = exp(g_t), G_t = g_0 + ... + g_t (cumulative
// within the chunk), Gamma_ts = exp(G_t - G_s) (s <= t). Unrolling the recurrence of api.h,
//   S_t = a_t S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - a_t S_{t-1}^T k_t),
// gives S_t = exp(G_t) S_0 + sum_{s<=t} Gamma_ts k_s u_s^T, hence
//   (I + A) U' = diag(beta) (V - diag(exp(G)) K S_0),   A_ts = beta_t Gamma_ts k_t.k_s (s < t),
// so with Tm = (I + A)^-1 diag(beta), W = Tm (K * exp(G)), U = Tm V (rows scaled per position):
//   V' = U - W S_0                                            (the rows u_t)
//   O  = scale ((Q * exp(G)) S_0 + tril(Q K^T * Gamma) V')    (diagonal included)
//   S  = exp(G_{n-1}) S_0 + (K * exp(G_{n-1} - G))^T V'       (the state entering the next chunk)
// Every decay factor is an exponential of a difference of cumulative sums that is <= 0 for g <= 0
// (never exp(G_t) * exp(-G_s)), and the cumulative sums are kept in fp64 inside a chunk, so that
// g = -1e4 (G down to -6.4e5) neither overflows nor loses the small decays that follow it.
// Padding rows (t >= n) have k = q = v = beta = 0 and g = 0: their rows of Tm, W, U, V' are 0.
//
// Kernels.
//   chunkPrepKernel<T>  one block (4 warps) per (chunk, value head), all chunks in parallel: stages
//     the chunk's q, k in shared memory, L2 norms, fp64 cumulative decays; K K^T and Q K^T with
//     mma.sync (16 rows per warp, lower triangle only); A in fp32, Tm by column-wise forward
//     substitution (one thread per column, fp32); then W = Tm (K exp(G)) and U = Tm V with
//     mma.sync. Writes W, U, Qg = scale Q exp(G), Kd = K exp(G_{n-1} - G), P = scale tril(Q K^T
//     Gamma) (all of the storage type) and exp(G_{n-1}) (fp32) to scratch.
//   chunkStateKernel<T, NT> one block (4 warps) per (sequence, value head, tile of vt = 8 NT value
//     columns, vt = 16, 32 or 64: the widest that still fills the SMs),
//     sequential over the chunks: the fp32 state tile (K x vt) lives in shared memory; per chunk it
//     stores the checkpoint, then V' = U - W S, O = Qg S + P V', S = exp(G_{n-1}) S + Kd^T V', each
//     an mma.sync product (S and V' rounded to the storage type as operands, fp32 accumulation).
//
// fp32. tf32 operands (10-bit mantissa) put ~1e-3 relative errors in W, U, V' and the outputs, an
// order of magnitude above the fp32 tolerance (1e-4); 3xTF32 would triple every product and still
// needs the fp32 inverse. The per-token recurrence is exact in fp32, so fp32 storage stays there.
//
// Bounds (H100 / H200, bf16, K = V = 128; 64 positions per chunk):
//   prep (parallel over chunks x heads): ~4.2 MFLOP of mma per block (~1 % of the tensor-core
//     peak over the whole launch) and the serial forward substitution (~2k dependent FMAs for the
//     longest column, a few us per block); HBM traffic ~1.9 KB per (position, head): reads q, k, v
//     (0.8 KB), writes W, U, Qg, Kd, P (1.1 KB). Bound by HBM and the substitution latency:
//     ~0.15-0.25 ms for 4 x 4096 x 16 (4096 blocks, 3 per SM by shared memory), about the same for
//     8 x 2048 x 32 (2x the work, ~0.3-0.5 ms) and 1 x 32768 x 16 (~0.15-0.25 ms).
//   state (sequential over chunks): per chunk three dependent mma chains (V', then O, then S) of
//     ~K / 16 steps separated by barriers: latency bound, ~2-4 us per chunk whatever the tile
//     width; the tile width is picked so the blocks fill the SMs (4 x 4096 x 16: 64 chunks, 256
//     blocks of 32 columns, ~0.2-0.3 ms; 8 x 2048 x 32: 32 chunks, 512 blocks of 64 columns,
//     ~0.2-0.3 ms; 1 x 32768 x 16: 512 chunks in sequence, 128 blocks of 16 columns, ~1-2 ms).
//     Its rereads of the scratch (1.1 KB per position, head and tile) mostly hit L2.
//   Expected forward: ~0.4-0.6 ms (4, 4096, 16), ~0.6-0.9 ms (8, 2048, 32), ~1.2-2.2 ms
//   (1, 32768, 16), against 0.77 / 1.29 / 1.93 ms for flash-linear-attention's Triton kernels; the
//   long single sequence is bound by the chunk-to-chunk latency of the state pass. Scratch: ~1.1 KB
//   per (position, value head) of the storage type (600 MB at 1 x 32768 x 16).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "delta/gated_delta_chunked.h"

namespace rkcuda {
namespace deltachunked {
namespace {

constexpr int kC = 64;           // chunk length (gatedDeltaChunk)
constexpr int kThreads = 128;    // 4 warps, 16 chunk rows each
constexpr int kWarps = kThreads / 32;
constexpr int kLdA = kC + 1;     // fp32 64 x 64 matrices in shared memory
constexpr float kL2Eps = 1e-6f;

inline int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int roundUp16(int64_t x) { return static_cast<int>(ceilDiv(x, 16) * 16); }

struct ChunkParams {
  int64_t T = 0, H = 0, HV = 0, K = 0, V = 0;
  int64_t group = 1;            // HV / H
  int64_t uniformChunks = 0;    // chunks per sequence without packing
  int64_t nseq = 0;
  int Kp = 16;                  // K rounded up to 16
  int Vp = 16;                  // V rounded up to 16
  int ldk = 24;                 // row stride (elements) of the staged q, k
  int vt = 32;                  // value columns per state-pass block
  int vTiles = 1;
  float scale = 1.0f;
  bool l2norm = false;
  const ScanSegment* segments = nullptr;  // device table (packed); null: sequence s = row s, whole
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;
  void* o = nullptr;
  float* states = nullptr;
  float* finalState = nullptr;
  // scratch, per (global chunk, value head): W, Qg, Kd [64 x K], U [64 x V], P [64 x 64], gammaLast
  void* W = nullptr;
  void* U = nullptr;
  void* Qg = nullptr;
  void* Kd = nullptr;
  void* P = nullptr;
  float* gammaLast = nullptr;
};

__device__ __forceinline__ ScanSegment uniformSegment(const ChunkParams& p, int64_t seq) {
  ScanSegment s;
  s.batch = seq;
  s.start = 0;
  s.length = p.T;
  s.chunkOffset = seq * p.uniformChunks;
  return s;
}

// The sequence holding global chunk gc: the last one whose chunkOffset is <= gc (sequences of
// length 0 share their offset with the next one, which is then the one found).
__device__ __forceinline__ ScanSegment segmentOfChunk(const ChunkParams& p, int64_t gc) {
  if (p.segments == nullptr) return uniformSegment(p, gc / p.uniformChunks);
  int64_t lo = 0, hi = p.nseq - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.segments[mid].chunkOffset <= gc) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return p.segments[lo];
}

// ============================== per-chunk preparation ==============================

// Dynamic shared memory of chunkPrepKernel.
inline size_t prepSharedBytes(const ChunkParams& p, size_t elemBytes) {
  return kC * sizeof(double) + 4 * kC * sizeof(float) + 2 * kC * kLdA * sizeof(float) +
         2 * static_cast<size_t>(kC) * p.ldk * elemBytes;
}

template <class T>
__global__ void __launch_bounds__(kThreads) chunkPrepKernel(const ChunkParams p) {
  const int64_t gc = static_cast<int64_t>(blockIdx.x) / p.HV;
  const int64_t hv = static_cast<int64_t>(blockIdx.x) - gc * p.HV;
  const int64_t h = hv / p.group;
  const ScanSegment seg = segmentOfChunk(p, gc);
  const int64_t cs = (gc - seg.chunkOffset) * kC;
  const int n = static_cast<int>(seg.length - cs < kC ? seg.length - cs : kC);
  const int64_t rowBase = seg.batch * p.T + seg.start + cs;  // batch row * T + first position
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V), ld = p.ldk;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;

  double* sG = dynamicShared<double>();       // cumulative log decay
  float* sBeta = reinterpret_cast<float*>(sG + kC);
  float* sRk = sBeta + kC;                    // 1 / |k| (1 without l2norm)
  float* sRq = sRk + kC;
  float* sGam = sRq + kC;                     // g, then exp(G)
  float* sA = sGam + kC;                      // A (strictly lower)
  float* sX = sA + kC * kLdA;                 // Tm
  T* sK = reinterpret_cast<T*>(sX + kC * kLdA);
  T* sQ = sK + kC * ld;

  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const T zero = fromFloat<T>(0.0f);
  for (int e = tid; e < kC * ld; e += kThreads) {
    const int r = e / ld, i = e - (e / ld) * ld;
    T kx = zero, qx = zero;
    if (r < n && i < K) {
      const int64_t off = ((rowBase + r) * p.H + h) * p.K + i;
      kx = kg[off];
      qx = qg[off];
    }
    sK[e] = kx;
    sQ[e] = qx;
  }
  if (tid < kC) {
    float gt = 0.0f, bt = 0.0f;
    if (tid < n) {
      const int64_t gi = (rowBase + tid) * p.HV + hv;
      gt = p.g[gi];
      bt = loadScalar(static_cast<const T*>(p.beta) + gi);
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
    for (int i = lane; i < K; i += 32) {
      const float kx = toFloat(sK[r * ld + i]), qx = toFloat(sQ[r * ld + i]);
      kk = fmaf(kx, kx, kk);
      qq = fmaf(qx, qx, qq);
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

  auto kn = [&](int r, int i) -> float { return i < K ? toFloat(sK[r * ld + i]) * sRk[r] : 0.0f; };
  auto qn = [&](int r, int i) -> float { return i < K ? toFloat(sQ[r * ld + i]) * sRq[r] : 0.0f; };
  auto decay = [&](int t, int s) -> float { return fastExp(static_cast<float>(sG[t] - sG[s])); };

  const int64_t cb = gc * p.HV + hv;
  T* P = static_cast<T*>(p.P) + cb * kC * kC;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  // A = beta_t Gamma_ts k_t.k_s (s < t) and P = scale Gamma_ts q_t.k_s (s <= t): the warp's 16 rows
  // against the column blocks of 8 that touch the lower triangle (warp-uniform), each A fragment
  // loaded once per k-step.
  {
    mma::FragC accA[kC / 8], accP[kC / 8];
#pragma unroll
    for (int j = 0; j < kC / 8; ++j) {
      accA[j].zero();
      accP[j].zero();
    }
    for (int s = 0; s < kSteps; ++s) {
      const int k0 = 16 * s;
      const mma::FragA16 ak = mma::loadA16<T>([&](int rr, int kk) { return kn(r0 + rr, k0 + kk); });
      const mma::FragA16 aq = mma::loadA16<T>([&](int rr, int kk) { return qn(r0 + rr, k0 + kk); });
#pragma unroll
      for (int j = 0; j < kC / 8; ++j) {
        if (8 * j > r0 + 15) continue;
        const mma::FragB16 b = mma::loadB16<T>([&](int kk, int nn) { return kn(8 * j + nn, k0 + kk); });
        mma::mma16816<T>(accA[j], ak, b);
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

  // Tm = (I + A)^-1 diag(beta): thread c solves column c by forward substitution, then scales it
  // by beta_c. Each thread reads only its own column of sX (and all of A).
  if (tid < kC) {
    const int c = tid;
    for (int i = 0; i < c; ++i) sX[i * kLdA + c] = 0.0f;
    sX[c * kLdA + c] = 1.0f;
    for (int i = c + 1; i < kC; ++i) {
      float acc = 0.0f;
      for (int j = c; j < i; ++j) acc = fmaf(sA[i * kLdA + j], sX[j * kLdA + c], acc);
      sX[i * kLdA + c] = -acc;
    }
    const float b = sBeta[c];
    for (int i = c; i < kC; ++i) sX[i * kLdA + c] *= b;
  }
  __syncthreads();

  // W = Tm (K exp(G)), U = Tm V: rows r0..r0+15, Tm lower triangular (k-steps up to the diagonal).
  T* W = static_cast<T*>(p.W) + cb * kC * p.K;
  T* U = static_cast<T*>(p.U) + cb * kC * p.V;
  auto tmFrag = [&](int s) {
    return mma::loadA16<T>([&](int rr, int kk) { return sX[(r0 + rr) * kLdA + 16 * s + kk]; });
  };
  for (int j = 0; j < p.Kp / 8; ++j) {
    mma::FragC acc;
    acc.zero();
    for (int s = 0; s <= warp; ++s) {
      const mma::FragB16 b = mma::loadB16<T>([&](int kk, int nn) {
        const int r = 16 * s + kk;
        return kn(r, 8 * j + nn) * sGam[r];
      });
      mma::mma16816<T>(acc, tmFrag(s), b);
    }
    mma::storeC(acc, [&](int rr, int cc, float val) {
      const int i = 8 * j + cc;
      if (i < K) W[(r0 + rr) * p.K + i] = fromFloat<T>(val);
    });
  }
  for (int j = 0; j < p.Vp / 8; ++j) {
    mma::FragC acc;
    acc.zero();
    for (int s = 0; s <= warp; ++s) {
      const mma::FragB16 b = mma::loadB16<T>([&](int kk, int nn) {
        const int r = 16 * s + kk, col = 8 * j + nn;
        return (r < n && col < V) ? loadScalar(vg + ((rowBase + r) * p.HV + hv) * p.V + col) : 0.0f;
      });
      mma::mma16816<T>(acc, tmFrag(s), b);
    }
    mma::storeC(acc, [&](int rr, int cc, float val) {
      const int col = 8 * j + cc;
      if (col < V) U[(r0 + rr) * p.V + col] = fromFloat<T>(val);
    });
  }

  // Qg = scale Q exp(G), Kd = K exp(G_{n-1} - G) (padding rows: 0).
  T* Qg = static_cast<T*>(p.Qg) + cb * kC * p.K;
  T* Kd = static_cast<T*>(p.Kd) + cb * kC * p.K;
  for (int e = tid; e < kC * K; e += kThreads) {
    const int r = e / K, i = e - (e / K) * K;
    Qg[e] = fromFloat<T>(p.scale * qn(r, i) * sGam[r]);
    Kd[e] = fromFloat<T>(kn(r, i) * decay(n - 1, r < n ? r : n - 1));
  }
  if (tid == 0) p.gammaLast[cb] = sGam[n - 1];
}

// ============================== state pass and output ==============================

__host__ __device__ inline int stateLd(int vt) { return vt + 4; }
inline size_t stateSharedBytes(const ChunkParams& p) {
  return static_cast<size_t>(p.Kp + kC) * stateLd(p.vt) * sizeof(float);
}

// NT = vt / 8: the column blocks of the value tile.
template <class T, int NT>
__global__ void __launch_bounds__(kThreads, 2) chunkStateKernel(const ChunkParams p) {
  const int64_t head = static_cast<int64_t>(blockIdx.x) / p.vTiles;
  const int tile = static_cast<int>(static_cast<int64_t>(blockIdx.x) - head * p.vTiles);
  const int64_t seq = head / p.HV, hv = head - (head / p.HV) * p.HV;
  const ScanSegment seg = p.segments != nullptr ? p.segments[seq] : uniformSegment(p, seq);
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V);
  const int v0 = tile * p.vt;
  const int vw = V - v0 < p.vt ? V - v0 : p.vt;  // valid columns of this tile
  const int ldS = stateLd(p.vt);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5;
  const int r0 = 16 * warp;
  const int kSteps = p.Kp / 16;
  const int64_t KV = p.K * p.V;

  float* sS = dynamicShared<float>();  // Kp x ldS: the state tile, fp32
  float* sV = sS + p.Kp * ldS;         // 64 x ldS: V' of the current chunk
  const int64_t stateOff = (seq * p.HV + hv) * KV;
  for (int e = tid; e < p.Kp * ldS; e += kThreads) {
    const int i = e / ldS, j = e - (e / ldS) * ldS;
    sS[e] = (p.h0 != nullptr && i < K && j < vw) ? p.h0[stateOff + static_cast<int64_t>(i) * p.V + v0 + j] : 0.0f;
  }
  __syncthreads();

  T* o = static_cast<T*>(p.o);
  const int L = static_cast<int>(seg.length);
  const int nChunks = (L + kC - 1) / kC;
  for (int c = 0; c < nChunks; ++c) {
    const int64_t gc = seg.chunkOffset + c;
    const int64_t cb = gc * p.HV + hv;
    const int n = L - c * kC < kC ? L - c * kC : kC;
    const int kRows = (n + 15) / 16;  // 16-row steps that hold positions
    const int64_t rowBase = seg.batch * p.T + seg.start + static_cast<int64_t>(c) * kC;
    float* ck = p.states + cb * KV;
    for (int e = tid; e < K * vw; e += kThreads) {
      const int i = e / vw, j = e - (e / vw) * vw;
      ck[static_cast<int64_t>(i) * p.V + v0 + j] = sS[i * ldS + j];
    }
    const T* W = static_cast<const T*>(p.W) + cb * kC * p.K;
    const T* U = static_cast<const T*>(p.U) + cb * kC * p.V;
    const T* Qg = static_cast<const T*>(p.Qg) + cb * kC * p.K;
    const T* Kd = static_cast<const T*>(p.Kd) + cb * kC * p.K;
    const T* P = static_cast<const T*>(p.P) + cb * kC * kC;
    auto sFrag = [&](int s, int j) {
      return mma::loadB16<T>([&](int kk, int nn) { return sS[(16 * s + kk) * ldS + 8 * j + nn]; });
    };
    auto vFrag = [&](int s, int j) {
      return mma::loadB16<T>([&](int kk, int nn) { return sV[(16 * s + kk) * ldS + 8 * j + nn]; });
    };
    auto rowFrag = [&](const T* X, int s) {  // rows r0.., columns 16 s.. of a 64 x K array
      return mma::loadA16<T>([&](int rr, int kk) {
        const int i = 16 * s + kk;
        return i < K ? toFloat(X[(r0 + rr) * p.K + i]) : 0.0f;
      });
    };

    // V' = U - W S: each fragment of W is loaded once and used for the NT column blocks.
    {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      if (warp < kRows) {
        for (int s = 0; s < kSteps; ++s) {
          const mma::FragA16 a = rowFrag(W, s);
#pragma unroll
          for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, sFrag(s, j));
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          const float u = (r < n && col < vw) ? toFloat(U[r * p.V + v0 + col]) : 0.0f;
          sV[r * ldS + col] = u - val;
        });
      }
    }
    __syncthreads();

    // O = Qg S + P V' (P lower triangular: k-steps up to the diagonal block).
    if (warp < kRows) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j].zero();
      for (int s = 0; s < kSteps; ++s) {
        const mma::FragA16 a = rowFrag(Qg, s);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, sFrag(s, j));
      }
      for (int s = 0; s <= warp; ++s) {
        const mma::FragA16 a =
            mma::loadA16<T>([&](int rr, int kk) { return toFloat(P[(r0 + rr) * kC + 16 * s + kk]); });
#pragma unroll
        for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, vFrag(s, j));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) {
          const int r = r0 + rr, col = 8 * j + cc;
          if (r < n && col < vw) o[((rowBase + r) * p.HV + hv) * p.V + v0 + col] = fromFloat<T>(val);
        });
      }
    }
    __syncthreads();

    // S = exp(G_{n-1}) S + Kd^T V': warp w owns the state rows 16 m.. for m = w, w + 4, ...
    const float gl = p.gammaLast[cb];
    for (int m = warp; m < kSteps; m += kWarps) {
      mma::FragC acc[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j] = mma::loadC([&](int rr, int cc) { return gl * sS[(16 * m + rr) * ldS + 8 * j + cc]; });
      }
      for (int s = 0; s < kRows; ++s) {
        const mma::FragA16 a = mma::loadA16<T>([&](int rr, int kk) {
          const int i = 16 * m + rr;
          return i < K ? toFloat(Kd[(16 * s + kk) * p.K + i]) : 0.0f;
        });
#pragma unroll
        for (int j = 0; j < NT; ++j) mma::mma16816<T>(acc[j], a, vFrag(s, j));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma::storeC(acc[j], [&](int rr, int cc, float val) { sS[(16 * m + rr) * ldS + 8 * j + cc] = val; });
      }
    }
    __syncthreads();
  }
  if (p.finalState != nullptr) {
    for (int e = tid; e < K * vw; e += kThreads) {
      const int i = e / vw, j = e - (e / vw) * vw;
      p.finalState[stateOff + static_cast<int64_t>(i) * p.V + v0 + j] = sS[i * ldS + j];
    }
  }
}

// ============================== launch ==============================

template <class T>
Status launchChunked(const GatedDeltaArgs& a, const ScanSegment* deviceSegments, void* o, float* states,
                     float* finalState) {
  const std::string fn = "gatedDeltaForward (chunked)";
  ChunkParams p;
  p.T = a.T, p.H = a.H, p.HV = a.HV, p.K = a.K, p.V = a.V;
  p.group = a.HV / a.H;
  p.uniformChunks = ceilDiv(a.T, kC);
  p.nseq = a.nseq;
  p.Kp = roundUp16(a.K);
  p.Vp = roundUp16(a.V);
  p.ldk = p.Kp + 8;
  p.scale = a.scale;
  p.l2norm = a.l2norm;
  p.segments = deviceSegments;
  p.q = a.q, p.k = a.k, p.v = a.v, p.g = a.g, p.beta = a.beta, p.h0 = a.h0;
  p.o = o, p.states = states, p.finalState = finalState;

  // Value tile of the state pass (the sequential part, latency bound): the widest of 64, 32, 16
  // columns that still gives at least one block per SM.
  int sms = 132;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t heads = a.nseq * a.HV;
  int chosenVt = 64;
  while (chosenVt > 16 && heads * ceilDiv(a.V, chosenVt) < sms) chosenVt /= 2;
  p.vt = tunable("gatedDeltaChunked.valueTile", chosenVt);
  if (p.vt != 16 && p.vt != 32 && p.vt != 64) {
    return statusError(fn + ": unsupported value tile " + std::to_string(p.vt));
  }
  p.vTiles = static_cast<int>(ceilDiv(a.V, p.vt));

  const int64_t cbs = a.totalChunks * a.HV;  // (chunk, value head) pairs
  if (cbs > INT_MAX || heads * p.vTiles > INT_MAX) return statusError(fn + ": too many chunks for one launch");
  DeviceBuffer scratch;
  if (cbs > 0) {
    const int64_t perChunkK = cbs * kC * a.K, perChunkV = cbs * kC * a.V, perP = cbs * kC * kC;
    auto aligned = [](int64_t elems) { return (elems * static_cast<int64_t>(sizeof(T)) + 255) / 256 * 256; };
    const int64_t bytes = 3 * aligned(perChunkK) + aligned(perChunkV) + aligned(perP) +
                          (cbs * static_cast<int64_t>(sizeof(float)) + 255) / 256 * 256;
    RK_TRY(scratch.allocate(static_cast<size_t>(bytes)));
    char* base = static_cast<char*>(scratch.get());
    p.W = base;
    base += aligned(perChunkK);
    p.Qg = base;
    base += aligned(perChunkK);
    p.Kd = base;
    base += aligned(perChunkK);
    p.U = base;
    base += aligned(perChunkV);
    p.P = base;
    base += aligned(perP);
    p.gammaLast = reinterpret_cast<float*>(base);

    const size_t prepBytes = prepSharedBytes(p, sizeof(T));
    RK_TRY(allowDynamicShared(chunkPrepKernel<T>, prepBytes));
    RK_TRY(launch(chunkPrepKernel<T>, static_cast<unsigned>(cbs), kThreads, prepBytes, p));
  }
  if (heads == 0) return Status{};
  const size_t stateBytes = stateSharedBytes(p);
  const unsigned blocks = static_cast<unsigned>(heads * p.vTiles);
  if (p.vt == 16) {
    RK_TRY(allowDynamicShared(chunkStateKernel<T, 2>, stateBytes));
    return launch(chunkStateKernel<T, 2>, blocks, kThreads, stateBytes, p);
  }
  if (p.vt == 32) {
    RK_TRY(allowDynamicShared(chunkStateKernel<T, 4>, stateBytes));
    return launch(chunkStateKernel<T, 4>, blocks, kThreads, stateBytes, p);
  }
  RK_TRY(allowDynamicShared(chunkStateKernel<T, 8>, stateBytes));
  return launch(chunkStateKernel<T, 8>, blocks, kThreads, stateBytes, p);
}

}  // namespace
}  // namespace deltachunked

bool gatedDeltaChunkedSupports(DType dt) { return dt == DType::F16 || dt == DType::BF16; }

Status gatedDeltaChunkedForward(const GatedDeltaArgs& a, const ScanSegment* deviceSegments, void* o,
                                float* states, float* finalState) {
  switch (a.dt) {
    case DType::F16: return deltachunked::launchChunked<__half>(a, deviceSegments, o, states, finalState);
    case DType::BF16: return deltachunked::launchChunked<__nv_bfloat16>(a, deviceSegments, o, states, finalState);
    default: return statusError("gatedDeltaForward (chunked): fp16 or bf16 storage only");
  }
}

}  // namespace rkcuda
