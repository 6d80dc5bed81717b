// Fused recurrent cells (FlashRNN style: Elman, LSTM, GRU, sLSTM with many small heads): the
// recurrent part of an RNN layer, forward and backward, for F32/F16/BF16 storage with fp32 state and
// arithmetic: kernels plus the launchers declared in common/api.h (the cell math is that of the
// float64 oracle tests/reference/fusedRnn.ts).
//
// Paths, per call (the forward and the backward choose independently: the saved tensors do not
// depend on the path):
//   persistent  one block per (head, tile of 16 batch rows) walks all T steps. R of the head stays in
//               shared memory for the whole sequence, the states stay in registers, and h_{t-1} is
//               exchanged through a double-buffered shared tile (one __syncthreads per step). Warp w
//               owns the 8 columns j = 8w..8w+7 of every gate, so the recurrent product leaves in each
//               lane all G pre-activations of its 4 (row, column) elements (the mma accumulator layout)
//               and the cell update runs in registers. Product: 16-bit inputs use mma.sync m16n8k16
//               (batch rows = M, gate columns = N, headDim = K, h_{t-1} rounded to the input dtype,
//               fp32 accumulation); fp32 inputs use fp32 FMA (tf32 is not accurate enough for fp32).
//               Runs when headDim % 8 == 0, 4 * headDim threads fit the cell's launch bound (which
//               keeps every kernel within its registers) and R plus the tiles fit in the opt-in
//               shared memory. With 227 KB per block (H100/H200), headDim up to:
//                                  Elman   LSTM   sLSTM   GRU
//                 bf16/fp16 fwd     192     160     128    176
//                 bf16/fp16 bwd     192     144     128    176
//                 fp32 fwd          192     112      96    128
//                 fp32 bwd          192      96      96    112
//               Every step also prefetches the inputs of a step kAhead steps on into L2, so that the
//               loads at the top of each step (issued before the product, overlapping it) hit L2.
//   multi-block the same persistent scheme for heads too large for one block (FlashRNN's way): a head's
//               gate columns are split over `splits` co-resident blocks (a group per head and tile of
//               16 batch rows), block c owning D / splits columns of every gate (at most 64: 256
//               threads) and their slice of R (backward: the rows of R that its slice of dh_{t-1} needs)
//               in shared memory for all T steps. After every step each block writes its part of h_t
//               (backward: of dpre_t, every gate) to a double-buffered exchange buffer in global memory,
//               the group passes a barrier, and every block copies the whole of it from L2 (cp.async.cg)
//               into shared memory for the next product. splits = the fewest that divide D / 8 and fit
//               in shared memory (tunable "fusedRnn.splits"); runs when headDim % 8 == 0 and the
//               groups fit in at most kMaxMultiLaunches cooperative launches (each launch holds as many
//               groups as are co-resident: occupancy x SM count). With 227 KB per block, every
//               headDim (multiple of 8) up to:
//                                  Elman   LSTM   sLSTM   GRU
//                 bf16/fp16 fwd     4096   2400    2400   2896    (LSTM 256: 4 blocks of 64 columns, 768: 24 of 32)
//                 bf16/fp16 bwd     4096   1200    1200   1600    (LSTM 256: 4 of 64, 768: 48 of 16)
//                 fp32 fwd          2416   1200    1200   1440
//                 fp32 bwd          2416    592     592    800
//               (the largest sizes with 8 columns per block: slow, as every warp still does the
//               G x headDim / 16 mma of its columns per step and every block copies the whole tile).
//               Barrier: chosen over a whole-grid barrier (cooperative groups' grid.sync), which would
//               make every head wait for all the others, and over thread-block clusters, which cannot
//               hold a 768-wide head's R (4.7 MB bf16 against 16 x 227 KB at most). It is a counter per
//               group in global memory (common/group_sync.cuh: __syncthreads, then thread 0 does a
//               __threadfence + atomicAdd release and spins on an ld.acquire.gpu, then __syncthreads);
//               the launch is cooperative (cudaLaunchCooperativeKernel), so the driver refuses rather
//               than hangs when the blocks could not all be resident. The exchange is read with
//               cp.async.cg (L2, never a stale L1 line). Two exchange buffers suffice: a block writes
//               buffer k again only after the barrier that follows every member's copy of it.
//   stepwise    any headDim (larger heads, or headDim not a multiple of 8): one kernel per step (and
//               per reverse step), all on the GPU. A block takes 8 batch rows and 16 channels j of a
//               head; its 128 threads split the k range 8 ways, stage h_{t-1} in shared memory and
//               read R (from L2) once per 8 rows; then each thread updates one (row, channel). The
//               states live in an fp32 scratch buffer between steps. Same results within rounding
//               (it keeps h_{t-1} in fp32 for the product).
// Default choice: persistent when it fits, else multi-block when it applies, else stepwise. The
// tunable "fusedRnn.path" (1 persistent, 2 stepwise, 3 multi-block) pins the choice; a pinned path
// that does not fit is refused. Supported: any batch (tiled; padding rows never reach an output),
// heads >= 1, headDim 1..4096, T < 2^30, lengths per row.
//
// Backward. A reverse-time persistent kernel (or the stepwise kernels) carries dL/dstates: per step
// it reads the saved pre-activations and previous states, runs the cell's backward in registers,
// writes dwx and the gradient of the recurrent pre-activations dpre (the GRU n gate's scaled by r)
// into an fp32 scratch [T, batch, G, H, D] and a shared tile, and takes the recurrent part of
// dh_{t-1} = sum_g dpre_g R_g^T with R^T on chip (bf16 operands for both 16-bit dtypes, for the
// range of gradients; fp32 FMA for fp32). Then dR = sum over t and batch of h_{t-1}^T dpre and db =
// sum of dpre are one reduction kernel over (gate, head, 64 x 64 tile, split of the t*batch rows)
// with tf32 mma for 16-bit dtypes (fp32 FMA for fp32), whose per-split partial sums a last kernel
// adds in a fixed order (deterministic).
//
// Bounds and expected times (H100/H200, batch 16, T 1024, bf16):
//   12 heads x 64: persistent, 12 blocks of 256 threads; per step each warp does 16 mma (4 gates x 4
//     k-steps) from shared memory plus the cell update and one barrier, about 1 us, latency bound:
//     forward ~1.2 ms, backward (reverse kernel ~1.5 ms + dR reduction of 6.4 GFLOP ~0.1 ms).
//   3 heads x 256 (R = 512 KB per head) and 1 x 768 (4.7 MB): multi-block, latency bound. A step
//     is: the exchange copy from L2 (~0.5 us: 8 KB per block at 256, 24 KB at 768; backward 32 /
//     96 KB), the warp's product from shared memory (G independent mma chains of D/16 steps: ~0.3 us
//     at 256, ~0.9 us at 768; backward the same in bf16), the cell update and the barrier (atomic
//     arrive at L2 and the acquire poll that sees the last arrival: ~1-1.5 us, the largest part).
//     3 x 256: 4 blocks of 64 columns per head (12 blocks; backward also 12), ~2-2.5 us per step:
//     forward ~2-2.5 ms (target 2.6), backward ~2.5-3 ms + dR reduction (26 GFLOP tf32, ~0.1 ms),
//     fwd+bwd ~5-6 ms (target 6.9).
//     1 x 768: forward 24 blocks of 32 columns (~3 us per step: ~3 ms, target 3.4); backward 48
//     blocks of 16 columns, whose 96 KB exchange copy per block and step (4.7 MB of L2 reads) and
//     48-step mma chains make ~4-5 us per step: ~4.5 ms + dR reduction (77 GFLOP tf32, ~0.5 ms),
//     fwd+bwd ~8-8.5 ms (target 8.9: tight). All of these are estimates from the latencies above.
//   The stepwise path (bound by the per-step launch latency and L2 reads of R once per 8 batch
//     rows: ~3-5 us per step at these sizes) remains for heads that are not a multiple of 8 or whose
//     blocks cannot be resident, e.g. fp32 LSTM backward at 768.
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

struct RnnParams {
  int64_t batch = 0, T = 0, H = 0, D = 0;
  int Dp = 16;  // D rounded up to 16 (the product's K padding)
  bool lastOnly = false;
  const int32_t* lengths = nullptr;  // device, nullable
  const void* wx = nullptr;
  const void* R = nullptr;
  const float* b = nullptr;
  const float* states0 = nullptr;
  // forward
  void* h = nullptr;
  float* finalStates = nullptr;
  float* savedStates = nullptr;
  float* savedPre = nullptr;
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
  return b >= p.batch ? 0 : p.lengths != nullptr ? static_cast<int64_t>(p.lengths[b]) : p.T;
}

// ============================== cell math ==============================

// a / b within 2 ulp, without the IEEE division's slow-path call (b below 2^126 in magnitude).
__device__ __forceinline__ float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
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

// ============================== the persistent kernels ==============================

// acc[q][e] += sum_{k < K} A_q(row_e, k) B_q(k, col_e) for the calling warp's 16 x 8 tile, with
// (row_e, col_e) the mma accumulator positions of this lane: A_q row-major at a (lda), the same A for
// every q (EACH false) or A_q at a + q * aStride (EACH true: NB independent accumulator chains where
// the k loop of one product per q would be one dependent chain); B_q given transposed (column n at
// bt + q * bStride + n * ldb, k contiguous); K a multiple of 16.
template <class Op, int NB, bool EACH>
__device__ __forceinline__ void warpProductOf(float (&acc)[NB][4], const Op* a, int lda, int aStride, const Op* bt,
                                              int bStride, int ldb, int K) {
  if constexpr (std::is_same<Op, float>::value) {
    const int g = mma::lane() >> 2, t = mma::lane() & 3;
    for (int k = 0; k < K; k += 4) {
      float4 x0, x1;
      if constexpr (!EACH) {
        x0 = *reinterpret_cast<const float4*>(a + g * lda + k);
        x1 = *reinterpret_cast<const float4*>(a + (g + 8) * lda + k);
      }
#pragma unroll
      for (int q = 0; q < NB; ++q) {
        if constexpr (EACH) {
          x0 = *reinterpret_cast<const float4*>(a + q * aStride + g * lda + k);
          x1 = *reinterpret_cast<const float4*>(a + q * aStride + (g + 8) * lda + k);
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float4 r = *reinterpret_cast<const float4*>(bt + q * bStride + (2 * t + c) * ldb + k);
          acc[q][c] = fmaf(x0.x, r.x, fmaf(x0.y, r.y, fmaf(x0.z, r.z, fmaf(x0.w, r.w, acc[q][c]))));
          acc[q][2 + c] = fmaf(x1.x, r.x, fmaf(x1.y, r.y, fmaf(x1.z, r.z, fmaf(x1.w, r.w, acc[q][2 + c]))));
        }
      }
    }
  } else {
    mma::FragC c[NB];
#pragma unroll
    for (int q = 0; q < NB; ++q) {
#pragma unroll
      for (int e = 0; e < 4; ++e) c[q].c[e] = acc[q][e];
    }
    for (int k = 0; k < K; k += 16) {
      mma::FragA16 fa;
      if constexpr (!EACH) fa = mma::loadA16Packed(a + k, lda);
#pragma unroll
      for (int q = 0; q < NB; ++q) {
        if constexpr (EACH) fa = mma::loadA16Packed(a + q * aStride + k, lda);
        mma::mma16816<Op>(c[q], fa, mma::loadB16PackedT(bt + q * bStride + k, ldb));
      }
    }
#pragma unroll
    for (int q = 0; q < NB; ++q) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[q][e] = c[q].c[e];
    }
  }
}
template <class Op, int NB>
__device__ __forceinline__ void warpProduct(float (&acc)[NB][4], const Op* a, int lda, const Op* bt, int bStride,
                                            int ldb, int K) {
  warpProductOf<Op, NB, false>(acc, a, lda, 0, bt, bStride, ldb, K);
}
template <class Op, int NB>
__device__ __forceinline__ void warpProductEach(float (&acc)[NB][4], const Op* a, int lda, int aStride, const Op* bt,
                                                int bStride, int ldb, int K) {
  warpProductOf<Op, NB, true>(acc, a, lda, aStride, bt, bStride, ldb, K);
}

template <class Op> __device__ __forceinline__ Op toOp(float x) { return fromFloat<Op>(x); }

// Element e (0..3) of a lane: row rowOf(e) of the block's 16, column colOf(warp, e) of the head.
__device__ __forceinline__ int rowOf(int e) { return (mma::lane() >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int colOf(int e) {
  return 8 * (static_cast<int>(threadIdx.x) >> 5) + 2 * (mma::lane() & 3) + (e & 1);
}

// ---- the parts common to the single-block and the multi-block persistent kernels ----
// A block takes the 16 batch rows row0.. and (multi-block) the columns j0.. of head hh (j0 = 0 for a
// single block); element e of a lane is row b = row0 + rowOf(e), column j = j0 + colOf(e).

template <int NB> __device__ __forceinline__ void zeroAcc(float (&acc)[NB][4]) {
#pragma unroll
  for (int q = 0; q < NB; ++q) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = 0.0f;
  }
}

// len[r]: the length of the lane's row rowOf(2 * r).
__device__ __forceinline__ void laneLengths(const RnnParams& p, int64_t row0, int64_t (&len)[2]) {
  for (int r = 0; r < 2; ++r) len[r] = lengthOf(p, row0 + rowOf(2 * r));
}

// v[e][s] = src[s][b][hh][j] (an fp32 [S, batch, H, D] tensor) of the lane's elements, zero for rows past
// the batch or a null src.
template <int S>
__device__ __forceinline__ void loadLaneStates(const float* src, const RnnParams& p, int64_t row0, int64_t hh, int j0,
                                               float (&v)[4][S]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int j = j0 + colOf(e);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      v[e][s] = (b < p.batch && src != nullptr) ? src[((s * p.batch + b) * p.H + hh) * p.D + j] : 0.0f;
    }
  }
}

// Forward: Rt[g][jl][i] = R[g][hh][i][j0 + jl] for the block's Dc columns, zero for D <= i < ld, and
// bs[g][jl] = b[g][hh][j0 + jl].
template <class T, class Op, int G>
__device__ __forceinline__ void loadForwardWeights(const RnnParams& p, int64_t hh, int j0, int Dc, int ld, Op* Rt,
                                                   float* bs) {
  const int64_t H = p.H, D = p.D;
  const int Di = static_cast<int>(D);
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const T* R = static_cast<const T*>(p.R);
  for (int e = tid; e < G * Di * Dc; e += nthreads) {
    const int g = e / (Di * Dc), i = (e / Dc) % Di, jl = e % Dc;
    Rt[(g * Dc + jl) * ld + i] = toOp<Op>(toFloat(R[((g * H + hh) * D + i) * D + j0 + jl]));
  }
  for (int e = tid; e < G * Dc * (ld - Di); e += nthreads) {
    const int r = e / (ld - Di), i = Di + e % (ld - Di);
    Rt[r * ld + i] = toOp<Op>(0.0f);
  }
  for (int e = tid; e < G * Dc; e += nthreads) bs[e] = p.b[((e / Dc) * H + hh) * D + j0 + e % Dc];
}

// Forward: the input part xin[e][g] of step t (zero past a row's length), then the inputs of step
// t + kAhead into L2 (one lane per row and 8 columns).
template <class T, int G>
__device__ __forceinline__ void loadForwardInputs(const RnnParams& p, const T* wx, int64_t t, int64_t row0, int64_t hh,
                                                  int j0, const int64_t (&len)[2], float (&xin)[4][G]) {
  const int64_t H = p.H, D = p.D, L = p.T;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const bool active = t < len[e >> 1];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xin[e][g] = active ? toFloat(wx[(((b * L + t) * G + g) * H + hh) * D + j0 + colOf(e)]) : 0.0f;
    }
  }
  if ((mma::lane() & 3) == 0) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t b = row0 + rowOf(2 * r);
      if (t + kAhead < len[r]) {
#pragma unroll
        for (int g = 0; g < G; ++g) prefetchL2(wx + (((b * L + t + kAhead) * G + g) * H + hh) * D + j0 + 8 * warp);
      }
    }
  }
}

// Forward: the cell update of step t from the recurrent products acc (bias at bs[g * bsStride + colOf(e)]),
// h_t of the lane's elements to hNext[rowOf(e) * ldNext + j], and the outputs and saved tensors.
template <class T, class Op, int CELL>
__device__ __forceinline__ void forwardUpdate(const RnnParams& p, T* hOut, int64_t t, int64_t row0, int64_t hh, int j0,
                                              const float* bs, int bsStride, const float (&acc)[gatesOf(CELL)][4],
                                              const float (&xin)[4][gatesOf(CELL)], const int64_t (&len)[2],
                                              float (&st)[4][statesOf(CELL)], Op* hNext, int ldNext) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int jl = colOf(e), j = j0 + jl;
    const bool active = t < len[e >> 1];
    float pre[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float bg = bs[g * bsStride + jl];
      pre[g] = (CELL == kGru && g == 2) ? acc[g][e] + bg : xin[e][g] + bg + acc[g][e];
    }
    if (active) cellForward<CELL>(pre, xin[e][G - 1], st[e]);
    hNext[rowOf(e) * ldNext + j] = toOp<Op>(st[e][0]);
    if (b < batch) {
      if (!p.lastOnly) storeScalar(hOut + ((b * L + t) * H + hh) * D + j, active ? st[e][0] : 0.0f);
      if (p.savedStates != nullptr) {
#pragma unroll
        for (int s = 0; s < S; ++s) p.savedStates[(((t * S + s) * batch + b) * H + hh) * D + j] = st[e][s];
#pragma unroll
        for (int g = 0; g < G; ++g) p.savedPre[(((t * batch + b) * G + g) * H + hh) * D + j] = active ? pre[g] : 0.0f;
      }
    }
  }
}

// Forward: h (returnLastOnly) and finalStates from the last states.
template <class T, int S>
__device__ __forceinline__ void forwardFinish(const RnnParams& p, T* hOut, int64_t row0, int64_t hh, int j0,
                                              const float (&st)[4][S]) {
  const int64_t H = p.H, D = p.D, batch = p.batch;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int j = j0 + colOf(e);
    if (b >= batch) continue;
    if (p.lastOnly) storeScalar(hOut + (b * H + hh) * D + j, st[e][0]);
    if (p.finalStates != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) p.finalStates[((s * batch + b) * H + hh) * D + j] = st[e][s];
    }
  }
}

// Backward: Rs[g][il][j] = R[g][hh][j0 + il][j] for the block's Dc rows, zero for D <= j < ld.
template <class T, class Op, int G>
__device__ __forceinline__ void loadBackwardWeights(const RnnParams& p, int64_t hh, int j0, int Dc, int ld, Op* Rs) {
  const int64_t H = p.H, D = p.D;
  const int Di = static_cast<int>(D);
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const T* R = static_cast<const T*>(p.R);
  for (int e = tid; e < G * Dc * ld; e += nthreads) {
    const int r = e / ld, j = e % ld;
    Rs[e] = toOp<Op>(j < Di ? toFloat(R[(((r / Dc) * H + hh) * D + j0 + r % Dc) * D + j]) : 0.0f);
  }
}

// Backward: the lengths of the lane's rows, and gS = dFinal (zero where null) plus dh on h with
// returnLastOnly.
template <class T, int S>
__device__ __forceinline__ void loadBackwardInit(const RnnParams& p, const T* dh, int64_t row0, int64_t hh, int j0,
                                                 int64_t (&len)[2], float (&gS)[4][S]) {
  laneLengths(p, row0, len);
  loadLaneStates<S>(p.dFinal, p, row0, hh, j0, gS);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    if (b < p.batch && p.lastOnly && dh != nullptr) gS[e][0] += toFloat(dh[(b * p.H + hh) * p.D + j0 + colOf(e)]);
  }
}

// Backward: the saved values of step t (pre-activations, previous states, dh, the GRU's wx_n; zero past
// a row's length), then those of step t - kAhead into L2 (one lane per row and 8 columns).
template <class T, int CELL>
__device__ __forceinline__ void loadBackwardStep(const RnnParams& p, const T* wx, const T* dh, int64_t t, int64_t row0,
                                                 int64_t hh, int j0, const int64_t (&len)[2],
                                                 float (&pre)[4][gatesOf(CELL)], float (&prev)[4][statesOf(CELL)],
                                                 float (&dhv)[4], float (&wxn)[4]) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int j = j0 + colOf(e);
    const bool active = t < len[e >> 1];
#pragma unroll
    for (int g = 0; g < G; ++g) pre[e][g] = active ? p.cSavedPre[(((t * batch + b) * G + g) * H + hh) * D + j] : 0.0f;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      prev[e][s] = !active                ? 0.0f
                   : t > 0                ? p.cSavedStates[((((t - 1) * S + s) * batch + b) * H + hh) * D + j]
                   : p.states0 != nullptr ? p.states0[((s * batch + b) * H + hh) * D + j]
                                          : 0.0f;
    }
    dhv[e] = (active && !p.lastOnly && dh != nullptr) ? toFloat(dh[((b * L + t) * H + hh) * D + j]) : 0.0f;
    wxn[e] = (CELL == kGru && active) ? toFloat(wx[(((b * L + t) * G + G - 1) * H + hh) * D + j]) : 0.0f;
  }
  const int64_t tp = t - kAhead;
  if ((mma::lane() & 3) == 0 && tp >= 0) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t b = row0 + rowOf(2 * r);
      if (tp >= len[r]) continue;
      const int64_t c = hh * D + j0 + 8 * warp;
#pragma unroll
      for (int g = 0; g < G; ++g) prefetchL2(p.cSavedPre + ((tp * batch + b) * G + g) * H * D + c);
      if (tp > 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) prefetchL2(p.cSavedStates + (((tp - 1) * S + s) * batch + b) * H * D + c);
      }
      if (!p.lastOnly && dh != nullptr) prefetchL2(dh + (b * L + tp) * H * D + c);
      if (CELL == kGru) prefetchL2(wx + ((b * L + tp) * G + G - 1) * H * D + c);
    }
  }
}

// Backward: the cell backward of step t (gS: dL/d(states after the step) in, before the step out, less
// the recurrent part), dpre of gate g of the lane's elements to aNext[rowOf(e) * rowStride + g * gStride + j],
// and gr and dwx.
template <class T, class Op, int CELL>
__device__ __forceinline__ void backwardUpdate(const RnnParams& p, T* dwx, int64_t t, int64_t row0, int64_t hh, int j0,
                                               const int64_t (&len)[2], const float (&pre)[4][gatesOf(CELL)],
                                               const float (&prev)[4][statesOf(CELL)], const float (&dhv)[4],
                                               const float (&wxn)[4], float (&gS)[4][statesOf(CELL)], Op* aNext,
                                               int rowStride, int gStride) {
  constexpr int G = gatesOf(CELL);
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int j = j0 + colOf(e);
    const bool active = t < len[e >> 1];
    float gx[G], gr[G];
#pragma unroll
    for (int g = 0; g < G; ++g) gx[g] = gr[g] = 0.0f;
    if (active) {
      gS[e][0] += dhv[e];
      cellBackward<CELL>(pre[e], wxn[e], prev[e], gS[e], gx, gr);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) aNext[rowOf(e) * rowStride + g * gStride + j] = toOp<Op>(gr[g]);
    if (b < batch) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int64_t o = (((t * batch + b) * G + g) * H + hh) * D + j;
        p.gr[o] = gr[g];
        storeScalar(dwx + (((b * L + t) * G + g) * H + hh) * D + j, gx[g]);
      }
    }
  }
}

// Backward: dStates0 from the gradients of the states before step 0.
template <int S>
__device__ __forceinline__ void storeDStates0(const RnnParams& p, int64_t row0, int64_t hh, int j0,
                                              const float (&gS)[4][S]) {
  if (p.dStates0 == nullptr) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    if (b >= p.batch) continue;
#pragma unroll
    for (int s = 0; s < S; ++s) p.dStates0[((s * p.batch + b) * p.H + hh) * p.D + j0 + colOf(e)] = gS[e][s];
  }
}

// ============================== the persistent kernels ==============================

template <class T, int CELL>
__global__ void __launch_bounds__(maxThreadsOf(CELL, std::is_same<T, float>::value))
    fusedRnnForwardKernel(RnnParams p) {
  using Op = typename Operands<T>::Fwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.H, L = p.T;
  const int64_t hh = blockIdx.x % static_cast<unsigned>(H);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(H)) * kRows;
  const int Di = static_cast<int>(p.D), ld = p.Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rt = dynamicShared<Op>();  // [G][D][ld]: Rt[g][j][i] = R[g][hh][i][j], zero for i >= D
  Op* hA = Rt + G * Di * ld;     // [2][16][ld]: h_{t-1} of the block's rows, zero past column D
  float* bs = reinterpret_cast<float*>(hA + 2 * kRows * ld);  // [G][D]: b of the head
  loadForwardWeights<T, Op, G>(p, hh, 0, Di, ld, Rt, bs);
  for (int e = tid; e < 2 * kRows * ld; e += nthreads) hA[e] = toOp<Op>(0.0f);
  __syncthreads();

  float st[4][S];
  int64_t len[2];
  laneLengths(p, row0, len);
  loadLaneStates<S>(p.states0, p, row0, hh, 0, st);
#pragma unroll
  for (int e = 0; e < 4; ++e) hA[rowOf(e) * ld + colOf(e)] = toOp<Op>(st[e][0]);
  __syncthreads();

  const T* wx = static_cast<const T*>(p.wx);
  T* hOut = static_cast<T*>(p.h);
  for (int64_t t = 0; t < L; ++t) {
    const int cur = static_cast<int>(t & 1);
    // This step's input part first, so that the loads overlap the product.
    float xin[4][G];
    loadForwardInputs<T, G>(p, wx, t, row0, hh, 0, len, xin);
    float acc[G][4];
    zeroAcc(acc);
    warpProduct<Op, G>(acc, hA + cur * kRows * ld, ld, Rt + warp * 8 * ld, Di * ld, ld, p.Dp);
    forwardUpdate<T, Op, CELL>(p, hOut, t, row0, hh, 0, bs, Di, acc, xin, len, st, hA + (cur ^ 1) * kRows * ld, ld);
    __syncthreads();
  }
  forwardFinish<T, S>(p, hOut, row0, hh, 0, st);
}

template <class T, int CELL>
__global__ void __launch_bounds__(maxThreadsOf(CELL, std::is_same<T, float>::value))
    fusedRnnBackwardKernel(RnnParams p) {
  using Op = typename Operands<T>::Bwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.H, L = p.T;
  const int64_t hh = blockIdx.x % static_cast<unsigned>(H);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(H)) * kRows;
  const int Di = static_cast<int>(p.D), Dp = p.Dp, ld = Dp + padOf<Op>(), lda = G * Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rs = dynamicShared<Op>();  // [G][D][ld]: Rs[g][i][j] = R[g][hh][i][j], zero for j >= D
  Op* dA = Rs + G * Di * ld;     // [2][16][lda]: dpre of the block's rows, gate g at columns g*Dp..
  loadBackwardWeights<T, Op, G>(p, hh, 0, Di, ld, Rs);
  for (int e = tid; e < 2 * kRows * lda; e += nthreads) dA[e] = toOp<Op>(0.0f);
  __syncthreads();

  const T* wx = static_cast<const T*>(p.wx);
  const T* dh = static_cast<const T*>(p.dh);
  T* dwx = static_cast<T*>(p.dwx);
  float gS[4][S];
  int64_t len[2];
  loadBackwardInit<T, S>(p, dh, row0, hh, 0, len, gS);

  // gS[.][0] += sum_g dpre_g (a) R_g^T for the warp's rows i.
  auto gatesProduct = [&](const Op* a) {
    float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
    for (int g = 0; g < G; ++g) warpProduct<Op, 1>(acc, a + g * Dp, lda, Rs + (g * Di + warp * 8) * ld, 0, ld, Dp);
#pragma unroll
    for (int e = 0; e < 4; ++e) gS[e][0] += acc[0][e];
  };
  for (int64_t t = L - 1; t >= 0; --t) {
    // This step's saved values first, so that the loads overlap the product.
    float pre[4][G], prev[4][S], dhv[4], wxn[4];
    loadBackwardStep<T, CELL>(p, wx, dh, t, row0, hh, 0, len, pre, prev, dhv, wxn);
    // The recurrent part of dL/dh_t, from step t + 1's dpre.
    if (t < L - 1) gatesProduct(dA + static_cast<int>((t + 1) & 1) * kRows * lda);
    backwardUpdate<T, Op, CELL>(p, dwx, t, row0, hh, 0, len, pre, prev, dhv, wxn, gS,
                                dA + static_cast<int>(t & 1) * kRows * lda, lda, Dp);
    __syncthreads();
  }
  if (L > 0) gatesProduct(dA);
  storeDStates0<S>(p, row0, hh, 0, gS);
}

// ============================== the multi-block persistent kernels ==============================

// A head too large for one block: its gate columns are split over `splits` co-resident blocks (a
// group, one per head and tile of 16 batch rows). Block c owns the Dc = D / splits columns
// j0 = c * Dc .. j0 + Dc - 1 of every gate and keeps their slice of R in shared memory for all T steps;
// warp w owns the 8 columns j0 + 8w.. as in the single-block kernels. After each step every block
// writes its part of h_t (backward: of dpre_t, every gate) to a double-buffered exchange buffer in
// global memory, the group passes a barrier (common/group_sync.cuh), and every block copies the whole
// of it from L2 (cp.async.cg) into shared memory for the next step's product. Two buffers suffice:
// a block overwrites buffer k only after the barrier that follows every member's copy of it.
// Shared memory only through dynamicShared (the blocks run concurrently).
struct MultiGroup {
  int64_t hh, row0, grp;
  int j0, Dc;
};
__device__ __forceinline__ MultiGroup multiGroupOf(const RnnParams& p) {
  const unsigned splits = static_cast<unsigned>(p.splits), blk = blockIdx.x;
  MultiGroup m;
  m.grp = blk / splits;
  m.hh = (p.group0 + m.grp) % p.H;
  m.row0 = (p.group0 + m.grp) / p.H * kRows;
  m.Dc = static_cast<int>(p.D) / p.splits;
  m.j0 = static_cast<int>(blk % splits) * m.Dc;
  return m;
}

// dst[r * ldDst + seg * ldSeg + k] = src[(r * segs + seg) * n + k] for the 16 rows, segs segments
// and k < n (n a multiple of 16 bytes of Op), through L2; then the whole block waits.
template <class Op>
__device__ __forceinline__ void copyExchange(Op* dst, int ldDst, int ldSeg, const Op* src, int segs, int n) {
  constexpr int per = 16 / static_cast<int>(sizeof(Op));
  const int chunks = n / per, total = kRows * segs * chunks;
  for (int e = static_cast<int>(threadIdx.x); e < total; e += static_cast<int>(blockDim.x)) {
    const int k = (e % chunks) * per, rs = e / chunks, seg = rs % segs, r = rs / segs;
    copyAsync16(dst + r * ldDst + seg * ldSeg + k, src + static_cast<int64_t>(rs) * n + k, 16);
  }
  waitAsyncCopies();
  __syncthreads();
}

template <class T, int CELL>
__global__ void __launch_bounds__(kMultiThreads, 1) fusedRnnForwardMultiKernel(RnnParams p) {
  using Op = typename Operands<T>::Fwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
  const MultiGroup m = multiGroupOf(p);
  const int64_t hh = m.hh, row0 = m.row0;
  const int Di = static_cast<int>(D), Dc = m.Dc, j0 = m.j0, ld = p.Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rt = dynamicShared<Op>();  // [G][Dc][ld]: Rt[g][jl][i] = R[g][hh][i][j0 + jl], zero for i >= D
  Op* hA = Rt + G * Dc * ld;     // [16][ld]: h_{t-1} of the block's rows, all D columns, zero past D
  float* bs = reinterpret_cast<float*>(hA + kRows * ld);  // [G][Dc]: b of the block's columns
  loadForwardWeights<T, Op, G>(p, hh, j0, Dc, ld, Rt, bs);
  for (int e = tid; e < kRows * ld; e += nthreads) {
    const int64_t b = row0 + e / ld;
    const int i = e % ld;
    hA[e] = toOp<Op>((i < Di && b < batch && p.states0 != nullptr) ? p.states0[(b * H + hh) * D + i] : 0.0f);
  }
  __syncthreads();

  float st[4][S];
  int64_t len[2];
  laneLengths(p, row0, len);
  loadLaneStates<S>(p.states0, p, row0, hh, j0, st);

  const T* wx = static_cast<const T*>(p.wx);
  T* hOut = static_cast<T*>(p.h);
  const int64_t bufStride = static_cast<int64_t>(gridDim.x / static_cast<unsigned>(p.splits)) * kRows * Di;
  Op* xg = static_cast<Op*>(p.xchg) + m.grp * kRows * Di;  // buffer k at xg + k * bufStride: [16][D]
  unsigned* counter = p.sync + m.grp;
  unsigned passed = 0;
  for (int64_t t = 0; t < L; ++t) {
    // This step's input part first, so that the loads overlap the exchange and the product.
    float xin[4][G];
    loadForwardInputs<T, G>(p, wx, t, row0, hh, j0, len, xin);
    if (t > 0) copyExchange<Op>(hA, ld, 0, xg + ((t - 1) & 1) * bufStride, 1, Di);
    float acc[G][4];
    zeroAcc(acc);
    warpProduct<Op, G>(acc, hA, ld, Rt + warp * 8 * ld, Dc * ld, ld, p.Dp);
    forwardUpdate<T, Op, CELL>(p, hOut, t, row0, hh, j0, bs, Dc, acc, xin, len, st, xg + (t & 1) * bufStride, Di);
    if (t + 1 < L) groupBarrier(counter, static_cast<unsigned>(p.splits), &passed);
  }
  forwardFinish<T, S>(p, hOut, row0, hh, j0, st);
}

// Reverse time. Block c owns the channels j0.. of the cell backward and the rows i = j0.. of
// dh_{t-1} = sum_g dpre_g R_g^T, for which it keeps R[g][hh][i][:] of its rows; the exchange holds
// dpre_t of every gate and column ([16][G][D] per group, in the backward operand type).
template <class T, int CELL>
__global__ void __launch_bounds__(kMultiThreads, 1) fusedRnnBackwardMultiKernel(RnnParams p) {
  using Op = typename Operands<T>::Bwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t L = p.T;
  const MultiGroup m = multiGroupOf(p);
  const int64_t hh = m.hh, row0 = m.row0;
  const int Di = static_cast<int>(p.D), Dc = m.Dc, j0 = m.j0, Dp = p.Dp, ld = Dp + padOf<Op>();
  const int lda = G * Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rs = dynamicShared<Op>();  // [G][Dc][ld]: Rs[g][il][j] = R[g][hh][j0 + il][j], zero for j >= D
  Op* dA = Rs + G * Dc * ld;     // [16][lda]: dpre of step t + 1, gate g at columns g*Dp.., zero past D
  loadBackwardWeights<T, Op, G>(p, hh, j0, Dc, ld, Rs);
  for (int e = tid; e < kRows * lda; e += nthreads) dA[e] = toOp<Op>(0.0f);
  __syncthreads();

  const T* wx = static_cast<const T*>(p.wx);
  const T* dh = static_cast<const T*>(p.dh);
  T* dwx = static_cast<T*>(p.dwx);
  float gS[4][S];
  int64_t len[2];
  loadBackwardInit<T, S>(p, dh, row0, hh, j0, len, gS);

  // gS[.][0] += sum_g dpre_g (dA) R_g^T for the warp's rows i, one accumulator chain per gate.
  auto gatesProduct = [&]() {
    float acc[G][4];
    zeroAcc(acc);
    warpProductEach<Op, G>(acc, dA, lda, Dp, Rs + warp * 8 * ld, Dc * ld, ld, Dp);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int q = 0; q < G; ++q) gS[e][0] += acc[q][e];
    }
  };
  const int64_t bufStride = static_cast<int64_t>(gridDim.x / static_cast<unsigned>(p.splits)) * kRows * G * Di;
  Op* xg = static_cast<Op*>(p.xchg) + m.grp * kRows * G * Di;  // buffer k at xg + k * bufStride: [16][G][D]
  unsigned* counter = p.sync + m.grp;
  unsigned passed = 0;
  for (int64_t t = L - 1; t >= 0; --t) {
    // This step's saved values first, so that the loads overlap the exchange and the product.
    float pre[4][G], prev[4][S], dhv[4], wxn[4];
    loadBackwardStep<T, CELL>(p, wx, dh, t, row0, hh, j0, len, pre, prev, dhv, wxn);
    if (t < L - 1) {  // the recurrent part of dL/dh_t, from step t + 1's dpre
      copyExchange<Op>(dA, lda, Dp, xg + ((t + 1) & 1) * bufStride, G, Di);
      gatesProduct();
    }
    backwardUpdate<T, Op, CELL>(p, dwx, t, row0, hh, j0, len, pre, prev, dhv, wxn, gS, xg + (t & 1) * bufStride, G * Di,
                                Di);
    groupBarrier(counter, static_cast<unsigned>(p.splits), &passed);
  }
  if (L > 0) {
    copyExchange<Op>(dA, lda, Dp, xg, G, Di);
    gatesProduct();
  }
  storeDStates0<S>(p, row0, hh, j0, gS);
}

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
  const unsigned colBlocks = static_cast<unsigned>(ceilDiv(p.D, kStepCols)), blk = blockIdx.x;
  const unsigned Hu = static_cast<unsigned>(p.H);
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
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
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
  if (!p.lastOnly) storeScalar(static_cast<T*>(p.h) + ((b * L + t) * H + hh) * D + j, active ? sv[0] : 0.0f);
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
  const int64_t H = p.H, D = p.D, L = p.T, batch = p.batch;
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
    if (!p.lastOnly && dh != nullptr) g[0] += toFloat(dh[((b * L + t) * H + hh) * D + j]);
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

// ============================== dR and db ==============================

// Block = (split, gate*head matrix, i tile, j tile); partial sums over its share of the t*batch rows n:
//   partR[split][mat][i][j] = sum_n h_{t-1}[n][i] gr[n][mat][j],  partB[split][mat][j] = sum_n gr[n][mat][j]
// (partB written by the blocks of i tile 0). 16-bit dtypes: tf32 mma; fp32: FMA.
template <bool TF32>
__global__ void __launch_bounds__(256)
    reduceGradKernel(RnnParams p, int S, int G, int64_t splits, int64_t rowsPerSplit, float* partR, float* partB) {
  __shared__ __align__(16) float hs[kRedChunk][kRedTile + 4];
  __shared__ __align__(16) float gs[kRedChunk][kRedTile + 4];
  const int64_t H = p.H, D = p.D, batch = p.batch, N = p.T * p.batch, mats = G * H;
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

// ============================== launch ==============================

Status checkArgs(const FusedRnnArgs& a, const std::string& fn) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.cell != CellKind::Elman && a.cell != CellKind::Lstm && a.cell != CellKind::Gru && a.cell != CellKind::Slstm) {
    return bad("unknown cell");
  }
  if (a.batch < 0 || a.T < 0) return bad("negative size");
  if (a.T > kMaxT) return bad("T above 2^30");
  if (a.heads < 1 || a.headDim < 1) return bad("heads and headDim must be at least 1");
  if (a.headDim > 4096) return bad("headDim above 4096");
  if (a.batch > 0 && a.lengths != nullptr) {
    for (int64_t b = 0; b < a.batch; ++b) {
      if (a.lengths[b] < 0 || a.lengths[b] > a.T) {
        return bad("lengths[" + std::to_string(b) + "] = " + std::to_string(a.lengths[b]) + " is outside [0, T]");
      }
    }
  }
  if (a.batch > 0 && ((a.T > 0 && a.wx == nullptr) || a.R == nullptr || a.b == nullptr)) return bad("null input");
  return Status{};
}

RnnParams baseParams(const FusedRnnArgs& a) {
  RnnParams p;
  p.batch = a.batch;
  p.T = a.T;
  p.H = a.heads;
  p.D = a.headDim;
  p.Dp = static_cast<int>(ceilDiv(a.headDim, 16) * 16);
  p.lastOnly = a.returnLastOnly;
  p.wx = a.wx;
  p.R = a.R;
  p.b = a.b;
  p.states0 = a.states0;
  return p;
}

Status uploadLengths(const FusedRnnArgs& a, DeviceBuffer* buffer, const int32_t** out) {
  *out = nullptr;
  if (a.lengths == nullptr || a.batch == 0) return Status{};
  const size_t bytes = static_cast<size_t>(a.batch) * sizeof(int32_t);
  RK_TRY(buffer->allocate(bytes));
  RK_CUDA_TRY(cudaMemcpyAsync(buffer->get(), a.lengths, bytes, cudaMemcpyHostToDevice, 0));
  *out = static_cast<const int32_t*>(buffer->get());
  return Status{};
}

// Calls f(std::integral_constant<int, cell>{}).
template <class F> Status dispatchCell(CellKind c, F&& f) {
  switch (c) {
    case CellKind::Elman:
      return f(std::integral_constant<int, kElman>{});
    case CellKind::Lstm:
      return f(std::integral_constant<int, kLstm>{});
    case CellKind::Gru:
      return f(std::integral_constant<int, kGru>{});
    case CellKind::Slstm:
      return f(std::integral_constant<int, kSlstm>{});
  }
  return statusError("unknown cell");
}

Status deviceAttribute(cudaDeviceAttr attr, int* value) {
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  RK_CUDA_TRY(cudaDeviceGetAttribute(value, attr, dev));
  return Status{};
}

// Shared memory of the persistent kernel (forward or backward), 0 when it does not apply.
template <class Op> size_t persistentShared(int cell, int64_t D, bool backward, bool f32) {
  const int G = gatesOf(cell);
  if (D % 8 != 0 || D > kMaxPersistentDim || 4 * D > maxThreadsOf(cell, f32)) return 0;
  const int64_t Dp = ceilDiv(D, 16) * 16, pad = padOf<Op>();
  const int64_t tile = backward ? G * Dp + pad : Dp + pad;
  const int64_t bias = backward ? 0 : G * D * static_cast<int64_t>(sizeof(float));
  return static_cast<size_t>((G * D * (Dp + pad) + 2 * kRows * tile) * static_cast<int64_t>(sizeof(Op)) + bias);
}

// Shared memory of a multi-block persistent block (forward or backward) that takes Dc columns.
template <class Op> size_t multiShared(int cell, int64_t D, int64_t Dc, bool backward) {
  const int64_t G = gatesOf(cell), Dp = ceilDiv(D, 16) * 16, pad = padOf<Op>(), ld = Dp + pad;
  const int64_t tile = backward ? G * Dp + pad : ld;
  const int64_t bias = backward ? 0 : G * Dc * static_cast<int64_t>(sizeof(float));
  return static_cast<size_t>((G * Dc * ld + kRows * tile) * static_cast<int64_t>(sizeof(Op)) + bias);
}

// How the multi-block path runs a problem: blocks per head, their shared memory, and how many
// (batch tile, head) groups one cooperative launch can hold (all its blocks resident at once).
struct MultiPlan {
  int splits = 0;
  size_t shared = 0;
  int64_t groupsPerLaunch = 0;
  std::string why;  // empty when the path applies
};

// The fewest blocks per head (splits dividing D / 8, at most 64 columns each) whose slices fit in
// shared memory, or the value pinned by the tunable "fusedRnn.splits"; then the occupancy of that
// block times the SM count bounds the groups per launch.
template <class Op, class... KArgs>
Status planMulti(void (*kernel)(KArgs...), int cell, int64_t D, bool backward, int optin, MultiPlan* plan) {
  *plan = MultiPlan{};
  if (D % 8 != 0) {
    plan->why = "headDim " + std::to_string(D) + " is not a multiple of 8";
    return Status{};
  }
  auto usable = [&](int64_t c) {
    return c >= 1 && (D / 8) % c == 0 && 4 * (D / c) <= kMultiThreads &&
           multiShared<Op>(cell, D, D / c, backward) <= static_cast<size_t>(optin);
  };
  int64_t chosen = 0;
  for (int64_t c = 1; c <= D / 8 && chosen == 0; ++c) {
    if (usable(c)) chosen = c;
  }
  const int64_t splits = tunable("fusedRnn.splits", static_cast<int>(chosen));
  if (splits == 0 || !usable(splits)) {
    plan->why = "headDim " + std::to_string(D) +
                (splits == 0 ? " fits no split" : " in " + std::to_string(splits) + " blocks does not fit") +
                " over blocks of the multi-block kernel";
    return Status{};
  }
  int cooperative = 0;
  RK_TRY(deviceAttribute(cudaDevAttrCooperativeLaunch, &cooperative));
  if (cooperative == 0) {
    plan->why = "the device does not support cooperative launches";
    return Status{};
  }
  plan->splits = static_cast<int>(splits);
  plan->shared = multiShared<Op>(cell, D, D / splits, backward);
  RK_TRY(allowDynamicShared(kernel, plan->shared));
  int sms = 0, perSm = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMultiProcessorCount, &sms));
  RK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&perSm, reinterpret_cast<const void*>(kernel),
                                                                     static_cast<int>(4 * (D / splits)), plan->shared,
                                                                     cudaOccupancyDefault));
  plan->groupsPerLaunch = static_cast<int64_t>(sms) * perSm / splits;
  if (plan->groupsPerLaunch < 1) plan->why = "the blocks of one head cannot all be resident";
  return Status{};
}

// 1: persistent (shared memory bytes in *shared), 2: stepwise, 3: multi-block persistent (*multi).
template <class Op, class... KArgs>
Status choosePath(const std::string& fn, int cell, int64_t D, int64_t groups, bool backward, bool f32,
                  void (*multiKernel)(KArgs...), int* path, size_t* shared, MultiPlan* multi) {
  int optin = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  *shared = persistentShared<Op>(cell, D, backward, f32);
  const bool fits = *shared > 0 && *shared <= static_cast<size_t>(optin);
  const int pinned = tunable("fusedRnn.path", 0);
  multi->why = "not planned";
  if (!fits || pinned == 3) RK_TRY(planMulti<Op>(multiKernel, cell, D, backward, optin, multi));
  const bool multiFits = multi->why.empty() && ceilDiv(groups, multi->groupsPerLaunch) <= kMaxMultiLaunches;
  *path = pinned != 0 ? pinned : fits ? 1 : multiFits ? 3 : 2;
  if (*path < 1 || *path > 3) return statusError(fn + ": unknown path " + std::to_string(*path));
  if (*path == 1 && !fits)
    return statusError(fn + ": headDim " + std::to_string(D) + " does not fit the persistent kernel");
  if (*path == 3 && !multi->why.empty()) return statusError(fn + ": multi-block path: " + multi->why);
  return Status{};
}

// Runs a multi-block kernel over every (batch tile, head) group, as many groups per cooperative
// launch as can be resident, with its exchange buffers (elements of Op per group) and counters.
template <class Op, class... KArgs>
Status launchMulti(void (*kernel)(KArgs...), const MultiPlan& plan, RnnParams p, int64_t xchgPerGroup) {
  const int64_t groups = p.H * ceilDiv(p.batch, kRows), perLaunch = std::min(groups, plan.groupsPerLaunch);
  const size_t counterBytes =
      static_cast<size_t>(ceilDiv(perLaunch * static_cast<int64_t>(sizeof(unsigned)), 256) * 256);
  DeviceBuffer scratch;  // the counters, then two exchange buffers
  RK_TRY(scratch.allocate(counterBytes + static_cast<size_t>(2 * perLaunch * xchgPerGroup) * sizeof(Op)));
  p.splits = plan.splits;
  p.sync = static_cast<unsigned*>(scratch.get());
  p.xchg = static_cast<unsigned char*>(scratch.get()) + counterBytes;
  for (int64_t g0 = 0; g0 < groups; g0 += perLaunch) {
    const int64_t n = std::min(perLaunch, groups - g0);
    RK_CUDA_TRY(cudaMemsetAsync(p.sync, 0, static_cast<size_t>(n) * sizeof(unsigned), 0));
    p.group0 = g0;
    RK_TRY(launchCooperative(kernel, static_cast<unsigned>(n * plan.splits),
                             static_cast<unsigned>(4 * (p.D / plan.splits)), plan.shared, p));
  }
  return Status{};
}

unsigned gridFor(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceilDiv(n, 256), 4096)));
}

Status blocksFor(const std::string& fn, int64_t blocks, unsigned* grid) {
  if (blocks > INT_MAX) return statusError(fn + ": too many blocks for one launch");
  *grid = static_cast<unsigned>(blocks);
  return Status{};
}

// Runs a persistent kernel: one block of 4 * headDim threads per (batch tile, head).
template <class... KArgs>
Status launchPersistent(const std::string& fn, void (*kernel)(KArgs...), const FusedRnnArgs& a, size_t shared,
                        const RnnParams& p) {
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.batch, kRows), &grid));
  RK_TRY(allowDynamicShared(kernel, shared));
  return launch(kernel, grid, static_cast<unsigned>(4 * a.headDim), shared, p);
}

template <class T, int CELL>
Status launchForward(const std::string& fn, const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  constexpr int S = statesOf(CELL);
  RnnParams p = baseParams(a);
  p.h = o.h;
  p.finalStates = o.finalStates;
  p.savedStates = o.savedStates;
  p.savedPre = o.savedPre;
  DeviceBuffer lens;
  RK_TRY(uploadLengths(a, &lens, &p.lengths));
  int path = 0;
  size_t shared = 0;
  MultiPlan multi;
  using Op = typename Operands<T>::Fwd;
  RK_TRY(choosePath<Op>(fn, CELL, a.headDim, a.heads * ceilDiv(a.batch, kRows), false, std::is_same<T, float>::value,
                        fusedRnnForwardMultiKernel<T, CELL>, &path, &shared, &multi));
  if (path == 3) return launchMulti<Op>(fusedRnnForwardMultiKernel<T, CELL>, multi, p, kRows * a.headDim);
  if (path == 1) return launchPersistent(fn, fusedRnnForwardKernel<T, CELL>, a, shared, p);
  const int64_t SE = a.batch * a.heads * a.headDim;
  DeviceBuffer scratch;  // h twice (ping-pong), then the states 1..S-1 at their slots
  RK_TRY(scratch.allocate(static_cast<size_t>((S + 1) * SE) * sizeof(float)));
  float* hBuf[2] = {static_cast<float*>(scratch.get()), static_cast<float*>(scratch.get()) + SE};
  float* st = static_cast<float*>(scratch.get()) + SE;  // slot s at st + s * SE, s >= 1
  RK_TRY(launch(initStatesKernel, gridFor(S * SE), 256, 0, a.states0, hBuf[0], st, static_cast<int64_t>(S), SE));
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.headDim, kStepCols) * ceilDiv(a.batch, kStepRows), &grid));
  for (int64_t t = 0; t < a.T; ++t) {
    RK_TRY(launch(fusedRnnForwardStepKernel<T, CELL>, grid, kStepThreads, 0, p, t, hBuf[t & 1], hBuf[(t + 1) & 1], st));
  }
  return launch(finishForwardKernel<T>, gridFor(SE), 256, 0, hBuf[a.T & 1], st, o.finalStates,
                a.returnLastOnly ? static_cast<T*>(o.h) : nullptr, static_cast<int64_t>(S), SE);
}

template <class T, int CELL>
Status launchBackward(const std::string& fn, const FusedRnnArgs& a, const FusedRnnGrads& g) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  RnnParams p = baseParams(a);
  p.cSavedStates = g.savedStates;
  p.cSavedPre = g.savedPre;
  p.dh = g.dh;
  p.dFinal = g.dFinal;
  p.dwx = g.dwx;
  p.dStates0 = g.dStates0;
  DeviceBuffer lens;
  RK_TRY(uploadLengths(a, &lens, &p.lengths));
  const int64_t SE = a.batch * a.heads * a.headDim, N = a.T * a.batch, mats = G * a.heads;
  const int64_t DD = a.headDim * a.headDim;
  DeviceBuffer grBuf;
  if (N > 0) {
    RK_TRY(grBuf.allocate(static_cast<size_t>(N * G * a.heads * a.headDim) * sizeof(float)));
    p.gr = static_cast<float*>(grBuf.get());
  }
  int path = 0;
  size_t shared = 0;
  MultiPlan multi;
  using Op = typename Operands<T>::Bwd;
  RK_TRY(choosePath<Op>(fn, CELL, a.headDim, a.heads * ceilDiv(a.batch, kRows), true, std::is_same<T, float>::value,
                        fusedRnnBackwardMultiKernel<T, CELL>, &path, &shared, &multi));
  if (a.batch == 0) {
    // Nothing flows: dR and db are zeros (below).
  } else if (path == 3) {
    RK_TRY(launchMulti<Op>(fusedRnnBackwardMultiKernel<T, CELL>, multi, p, kRows * G * a.headDim));
  } else if (path == 1) {
    RK_TRY(launchPersistent(fn, fusedRnnBackwardKernel<T, CELL>, a, shared, p));
  } else {
    DeviceBuffer scratch;  // gS [S, batch, H, D], then R transposed in fp32
    RK_TRY(scratch.allocate(static_cast<size_t>(S * SE + mats * DD) * sizeof(float)));
    float* gS = static_cast<float*>(scratch.get());
    float* Rt = gS + S * SE;
    RK_TRY(launch(initGradKernel<T>, gridFor(S * SE), 256, 0, g.dFinal,
                  a.returnLastOnly ? static_cast<const T*>(g.dh) : nullptr, gS, static_cast<int64_t>(S), SE));
    RK_TRY(launch(transposeRKernel<T>, gridFor(mats * DD), 256, 0, static_cast<const T*>(a.R), Rt, mats, a.headDim));
    unsigned grid = 0;
    RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.headDim, kStepCols) * ceilDiv(a.batch, kStepRows), &grid));
    for (int64_t t = a.T - 1; t >= -1; --t) {
      RK_TRY(
          launch(fusedRnnBackwardStepKernel<T, CELL>, grid, kStepThreads, 0, p, t, static_cast<const float*>(Rt), gS));
    }
  }
  // dR and db.
  int sms = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMultiProcessorCount, &sms));
  const int64_t tiles = ceilDiv(a.headDim, kRedTile), base = mats * tiles * tiles;
  const int64_t maxSplits = std::max<int64_t>(1, ceilDiv(N, 4 * kRedChunk));
  const int64_t chosen = std::min<int64_t>(maxSplits, std::max<int64_t>(1, ceilDiv(2 * sms, base)));
  const int64_t splits = tunable("fusedRnn.reduceSplits", static_cast<int>(std::min<int64_t>(chosen, 1024)));
  if (splits < 1) return statusError(fn + ": split count below 1");
  const int64_t rowsPerSplit = std::max<int64_t>(1, ceilDiv(N, splits));
  DeviceBuffer part;
  RK_TRY(part.allocate(static_cast<size_t>(splits * (mats * DD + mats * a.headDim)) * sizeof(float)));
  float* partR = static_cast<float*>(part.get());
  float* partB = partR + splits * mats * DD;
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, base * splits, &grid));
  if (std::is_same<T, float>::value) {
    RK_TRY(launch(reduceGradKernel<false>, grid, 256, 0, p, S, G, splits, rowsPerSplit, partR, partB));
  } else {
    RK_TRY(launch(reduceGradKernel<true>, grid, 256, 0, p, S, G, splits, rowsPerSplit, partR, partB));
  }
  return launch(finishGradKernel<T>, gridFor(mats * DD + mats * a.headDim), 256, 0, static_cast<const float*>(partR),
                static_cast<const float*>(partB), splits, mats * DD, mats * a.headDim, static_cast<T*>(g.dR), g.db);
}

}  // namespace

Status fusedRnnForward(const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  const std::string fn = "fusedRnnForward";
  RK_TRY(checkArgs(a, fn));
  if ((o.savedStates == nullptr) != (o.savedPre == nullptr)) {
    return statusError(fn + ": savedStates and savedPre go together");
  }
  if (a.batch == 0) return Status{};
  if (o.h == nullptr && (a.returnLastOnly || a.T > 0)) return statusError(fn + ": null h");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell, [&](auto cell) -> Status { return launchForward<T, decltype(cell)::value>(fn, a, o); });
  });
}

Status fusedRnnBackward(const FusedRnnArgs& a, const FusedRnnGrads& g) {
  const std::string fn = "fusedRnnBackward";
  RK_TRY(checkArgs(a, fn));
  if (g.dR == nullptr || g.db == nullptr) return statusError(fn + ": null dR or db");
  if (a.batch > 0 && a.T > 0 && (g.dwx == nullptr || g.savedStates == nullptr || g.savedPre == nullptr)) {
    return statusError(fn + ": null dwx or saved tensors");
  }
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell,
                        [&](auto cell) -> Status { return launchBackward<T, decltype(cell)::value>(fn, a, g); });
  });
}

}  // namespace rkcuda
