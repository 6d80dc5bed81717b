// The fused cells' persistent kernels (cuda/cells/fused_rnn.cu): one block per head and 16 batch rows,
// R on chip; with the parts they share with the multi-block kernels.
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

// ---- fragment-native row accesses ----
// A lane's four elements are two column pairs, (rowOf(0), 2t..2t+1) and (rowOf(2), 2t..2t+1) of its
// warp's 8 columns (t = lane % 4). Lanes t and t ^ 1 trade one pair (two shuffles), so that the
// lane with even t holds columns 2t..2t+3 of row rowOf(0) and the lane with odd t columns
// 2t-2..2t+1 of row rowOf(2): one 4-element (16-byte fp32, 8-byte 16-bit) access per lane where
// the element-wise form makes two. quadRow: which row (0: rowOf(0), 1: rowOf(2)); quadCol: the
// warp-local first column. Warp-collective.
__device__ __forceinline__ int quadRow() { return mma::lane() & 1; }
__device__ __forceinline__ int quadCol() { return 2 * (mma::lane() & 2); }
__device__ __forceinline__ void tradePairs(const float (&in)[4], float (&out)[4]) {
  const bool odd = (mma::lane() & 1) != 0;
  const float r0 = __shfl_xor_sync(0xffffffffu, odd ? in[0] : in[2], 1);
  const float r1 = __shfl_xor_sync(0xffffffffu, odd ? in[1] : in[3], 1);
  out[0] = odd ? r0 : in[0];
  out[1] = odd ? r1 : in[1];
  out[2] = odd ? in[2] : r0;
  out[3] = odd ? in[3] : r1;
}
template <class T> __device__ __forceinline__ bool quadAligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}
// Stores the lane's elements v[e] to rows rowAt(0) (row rowOf(0)) and rowAt(1) (row rowOf(2)), each
// the address of the warp's first column in that row, or null to skip the row; element-wise unless
// `quads` (every row address 4-element aligned).
template <class T, class RowAt>
__device__ __forceinline__ void storeLane(const float (&v)[4], bool quads, RowAt rowAt) {
  if (quads) {
    float q[4];
    tradePairs(v, q);  // (row, columns) of v swapped into the quad layout
    T* d = rowAt(quadRow());
    if (d == nullptr) return;
    d += quadCol();
    if constexpr (std::is_same<T, float>::value) {
      *reinterpret_cast<float4*>(d) = make_float4(q[0], q[1], q[2], q[3]);
    } else {
      *reinterpret_cast<uint2*>(d) = make_uint2(mma::pack<T>(q[0], q[1]), mma::pack<T>(q[2], q[3]));
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    T* d = rowAt(e >> 1);
    if (d != nullptr) storeScalar(d + 2 * (mma::lane() & 3) + (e & 1), v[e]);
  }
}
// The lane's elements v[e] from rows given as for storeLane (null rows: zeros).
template <class T, class RowAt> __device__ __forceinline__ void loadLane(float (&v)[4], bool quads, RowAt rowAt) {
  if (quads) {
    float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const T* s = rowAt(quadRow());
    if (s != nullptr) {
      s += quadCol();
      if constexpr (std::is_same<T, float>::value) {
        const float4 x = *reinterpret_cast<const float4*>(s);
        q[0] = x.x, q[1] = x.y, q[2] = x.z, q[3] = x.w;
      } else {
        const uint2 x = *reinterpret_cast<const uint2*>(s);
        q[0] = mma::unpackLo<T>(x.x), q[1] = mma::unpackHi<T>(x.x);
        q[2] = mma::unpackLo<T>(x.y), q[3] = mma::unpackHi<T>(x.y);
      }
    }
    tradePairs(q, v);  // the quad layout traded back: the same exchange
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const T* s = rowAt(e >> 1);
    v[e] = s != nullptr ? toFloat(s[2 * (mma::lane() & 3) + (e & 1)]) : 0.0f;
  }
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

// gS[e][0] += sum_q A_q B_q (warpProductEach's operands) for the lane's elements: the backward's
// recurrent product over the G gates as G independent accumulator chains, summed at the end.
template <class Op, int G, int S>
__device__ __forceinline__ void addGateChains(float (&gS)[4][S], const Op* a, int lda, int aStride, const Op* bt,
                                              int bStride, int ldb, int K) {
  float acc[G][4];
  zeroAcc(acc);
  warpProductEach<Op, G>(acc, a, lda, aStride, bt, bStride, ldb, K);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
#pragma unroll
    for (int q = 0; q < G; ++q) gS[e][0] += acc[q][e];
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
      v[e][s] = (b < p.batch && src != nullptr) ? src[((s * p.batch + b) * p.heads + hh) * p.headDim + j] : 0.0f;
    }
  }
}

// Forward: Rt[g][jl][i] = R[g][hh][i][j0 + jl] for the block's Dc columns, zero for D <= i < ld, and
// bs[g][jl] = b[g][hh][j0 + jl].
template <class T, class Op, int G>
__device__ __forceinline__ void loadForwardWeights(const RnnParams& p, int64_t hh, int j0, int Dc, int ld, Op* Rt,
                                                   float* bs) {
  const int64_t H = p.heads, D = p.headDim;
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

// Forward: the inputs of step t + kAhead into L2 (one lane per row and 8 columns).
template <class T, int G>
__device__ __forceinline__ void prefetchForwardInputs(const RnnParams& p, const T* wx, int64_t t, int64_t row0,
                                                      int64_t hh, int j0, const int64_t (&len)[2]) {
  const int64_t H = p.heads, D = p.headDim, L = p.T;
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

// Forward: the input part xin[e][g] of step t (zero past a row's length; fragment-native loads),
// then the inputs of step t + kAhead into L2 (one lane per row and 8 columns).
template <class T, int G>
__device__ __forceinline__ void loadForwardInputs(const RnnParams& p, const T* wx, int64_t t, int64_t row0, int64_t hh,
                                                  int j0, const int64_t (&len)[2], float (&xin)[4][G]) {
  const int64_t H = p.heads, D = p.headDim, L = p.T;
  const int c0 = j0 + 8 * (static_cast<int>(threadIdx.x) >> 5);  // the warp's first column
  const bool quads = quadAligned(wx);                            // D is a multiple of 8
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float x[4];
    loadLane<T>(x, quads, [&](int r) -> const T* {
      const int64_t b = row0 + rowOf(2 * r);
      return t < len[r] ? wx + (((b * L + t) * G + g) * H + hh) * D + c0 : nullptr;
    });
#pragma unroll
    for (int e = 0; e < 4; ++e) xin[e][g] = x[e];
  }
  prefetchForwardInputs<T, G>(p, wx, t, row0, hh, j0, len);
}

// Forward, staged inputs: issues the 16-byte cp.async copies of step t's input rows
// wx[b][t][g][hh][j0 .. j0 + Dc - 1] of the block's 16 rows into tile ([16][G][Dc] of T; zeros for
// rows past their length) and commits them as one group. The whole block calls; rows 16-byte
// aligned (inputRowsAligned).
template <class T, int G>
__device__ __forceinline__ void stageInputTile(const RnnParams& p, const T* wx, int64_t t, int64_t row0, int64_t hh,
                                               int j0, int Dc, T* tile) {
  const int64_t H = p.heads, D = p.headDim, L = p.T;
  constexpr int per = 16 / static_cast<int>(sizeof(T));
  const int chunks = Dc / per;
  for (int e = static_cast<int>(threadIdx.x); e < kRows * G * chunks; e += static_cast<int>(blockDim.x)) {
    const int c = e % chunks, rg = e / chunks, g = rg % G, r = rg / G;
    const int64_t b = row0 + r;
    const bool active = t < lengthOf(p, b);
    const T* src = active ? wx + (((b * L + t) * G + g) * H + hh) * D + j0 + c * per : wx;
    copyAsync16(tile + (r * G + g) * Dc + c * per, src, active ? 16 : 0);
  }
  commitAsyncCopies();
}
// Whether the forward can stage its inputs: rows of wx (from column j0) 16-byte aligned.
__device__ __forceinline__ bool inputRowsAligned(const RnnParams& p, int j0, size_t elem) {
  return reinterpret_cast<uintptr_t>(p.wx) % 16 == 0 && (p.headDim * static_cast<int64_t>(elem)) % 16 == 0 &&
         (j0 * elem) % 16 == 0;
}
// Forward, staged inputs at step t: issues step t + 1's copies into the other buffer of xTile
// ([2][16][G][Dc]; the caller waits for them before the barrier that ends the step), prefetches step
// t + kAhead into L2, and reads the lane's inputs xin[e][g] of step t from its buffer.
template <class T, int G>
__device__ __forceinline__ void stagedStepInputs(const RnnParams& p, const T* wx, int64_t t, int64_t row0, int64_t hh,
                                                 int j0, int Dc, const int64_t (&len)[2], T* xTile,
                                                 float (&xin)[4][G]) {
  const int64_t cur = t & 1, tile = static_cast<int64_t>(kRows) * G * Dc;
  if (t + 1 < p.T) stageInputTile<T, G>(p, wx, t + 1, row0, hh, j0, Dc, xTile + (cur ^ 1) * tile);
  prefetchForwardInputs<T, G>(p, wx, t, row0, hh, j0, len);
  const T* x = xTile + cur * tile;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
#pragma unroll
    for (int g = 0; g < G; ++g) xin[e][g] = toFloat(x[(rowOf(e) * G + g) * Dc + colOf(e)]);
  }
}

// Forward: the cell update of step t from the recurrent products acc (bias at bs[g * bsStride + colOf(e)]),
// h_t of the lane's elements to hNext[rowOf(e) * ldNext + j], and the outputs and saved tensors
// (fragment-native stores).
template <class T, class Op, int CELL>
__device__ __forceinline__ void forwardUpdate(const RnnParams& p, T* hOut, int64_t t, int64_t row0, int64_t hh, int j0,
                                              const float* bs, int bsStride, const float (&acc)[gatesOf(CELL)][4],
                                              const float (&xin)[4][gatesOf(CELL)], const int64_t (&len)[2],
                                              float (&st)[4][statesOf(CELL)], Op* hNext, int ldNext) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  float hv[4], pre[G][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int jl = colOf(e), j = j0 + jl;
    const bool active = t < len[e >> 1];
    float pe[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float bg = bs[g * bsStride + jl];
      pe[g] = (CELL == kGru && g == 2) ? acc[g][e] + bg : xin[e][g] + bg + acc[g][e];
    }
    if (active) cellForward<CELL>(pe, xin[e][G - 1], st[e]);
    hNext[rowOf(e) * ldNext + j] = toOp<Op>(st[e][0]);
    hv[e] = active ? st[e][0] : 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) pre[g][e] = active ? pe[g] : 0.0f;
  }
  const int c0 = j0 + 8 * (static_cast<int>(threadIdx.x) >> 5);  // the warp's first column
  auto rowIn = [&](int r) { return row0 + rowOf(2 * r) < batch; };
  if (!p.returnLastOnly) {
    storeLane<T>(hv, quadAligned(hOut), [&](int r) -> T* {
      return rowIn(r) ? hOut + (((row0 + rowOf(2 * r)) * L + t) * H + hh) * D + c0 : nullptr;
    });
  }
  if (p.savedStates != nullptr) {
    const bool qs = quadAligned(p.savedStates) && quadAligned(p.savedPre);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const float v[4] = {st[0][s], st[1][s], st[2][s], st[3][s]};
      storeLane<float>(v, qs, [&](int r) -> float* {
        return rowIn(r) ? p.savedStates + (((t * S + s) * batch + row0 + rowOf(2 * r)) * H + hh) * D + c0 : nullptr;
      });
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      storeLane<float>(pre[g], qs, [&](int r) -> float* {
        return rowIn(r) ? p.savedPre + (((t * batch + row0 + rowOf(2 * r)) * G + g) * H + hh) * D + c0 : nullptr;
      });
    }
  }
}

// Forward: h (returnLastOnly) and finalStates from the last states.
template <class T, int S>
__device__ __forceinline__ void forwardFinish(const RnnParams& p, T* hOut, int64_t row0, int64_t hh, int j0,
                                              const float (&st)[4][S]) {
  const int64_t H = p.heads, D = p.headDim, batch = p.batch;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t b = row0 + rowOf(e);
    const int j = j0 + colOf(e);
    if (b >= batch) continue;
    if (p.returnLastOnly) storeScalar(hOut + (b * H + hh) * D + j, st[e][0]);
    if (p.finalStates != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) p.finalStates[((s * batch + b) * H + hh) * D + j] = st[e][s];
    }
  }
}

// Backward: Rs[g][il][j] = R[g][hh][j0 + il][j] for the block's Dc rows, zero for D <= j < ld.
template <class T, class Op, int G>
__device__ __forceinline__ void loadBackwardWeights(const RnnParams& p, int64_t hh, int j0, int Dc, int ld, Op* Rs) {
  const int64_t H = p.heads, D = p.headDim;
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
    if (b < p.batch && p.returnLastOnly && dh != nullptr)
      gS[e][0] += toFloat(dh[(b * p.heads + hh) * p.headDim + j0 + colOf(e)]);
  }
}

// Backward: the saved values of step t (pre-activations, previous states, dh, the GRU's wx_n; zero past
// a row's length; fragment-native loads), then those of step t - kAhead into L2 (one lane per row and
// 8 columns).
template <class T, int CELL>
__device__ __forceinline__ void loadBackwardStep(const RnnParams& p, const T* wx, const T* dh, int64_t t, int64_t row0,
                                                 int64_t hh, int j0, const int64_t (&len)[2],
                                                 float (&pre)[4][gatesOf(CELL)], float (&prev)[4][statesOf(CELL)],
                                                 float (&dhv)[4], float (&wxn)[4]) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  const int c0 = j0 + 8 * (static_cast<int>(threadIdx.x) >> 5);  // the warp's first column
  auto bOf = [&](int r) { return row0 + rowOf(2 * r); };
  const bool qs =
      quadAligned(p.cSavedPre) && quadAligned(p.cSavedStates) && (p.states0 == nullptr || quadAligned(p.states0));
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float v[4];
    loadLane<float>(v, qs, [&](int r) -> const float* {
      return t < len[r] ? p.cSavedPre + (((t * batch + bOf(r)) * G + g) * H + hh) * D + c0 : nullptr;
    });
#pragma unroll
    for (int e = 0; e < 4; ++e) pre[e][g] = v[e];
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    float v[4];
    loadLane<float>(v, qs, [&](int r) -> const float* {
      if (t >= len[r]) return nullptr;
      if (t > 0) return p.cSavedStates + ((((t - 1) * S + s) * batch + bOf(r)) * H + hh) * D + c0;
      return p.states0 != nullptr ? p.states0 + ((s * batch + bOf(r)) * H + hh) * D + c0 : nullptr;
    });
#pragma unroll
    for (int e = 0; e < 4; ++e) prev[e][s] = v[e];
  }
  loadLane<T>(dhv, quadAligned(dh), [&](int r) -> const T* {
    return (t < len[r] && !p.returnLastOnly && dh != nullptr) ? dh + ((bOf(r) * L + t) * H + hh) * D + c0 : nullptr;
  });
  loadLane<T>(wxn, quadAligned(wx), [&](int r) -> const T* {
    return (CELL == kGru && t < len[r]) ? wx + (((bOf(r) * L + t) * G + G - 1) * H + hh) * D + c0 : nullptr;
  });
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
      if (!p.returnLastOnly && dh != nullptr) prefetchL2(dh + (b * L + tp) * H * D + c);
      if (CELL == kGru) prefetchL2(wx + ((b * L + tp) * G + G - 1) * H * D + c);
    }
  }
}

// Backward: the cell backward of step t (gS: dL/d(states after the step) in, before the step out, less
// the recurrent part), dpre of gate g of the lane's elements to aNext[rowOf(e) * rowStride + g * gStride + j],
// and gr and dwx (fragment-native stores).
template <class T, class Op, int CELL>
__device__ __forceinline__ void backwardUpdate(const RnnParams& p, T* dwx, int64_t t, int64_t row0, int64_t hh, int j0,
                                               const int64_t (&len)[2], const float (&pre)[4][gatesOf(CELL)],
                                               const float (&prev)[4][statesOf(CELL)], const float (&dhv)[4],
                                               const float (&wxn)[4], float (&gS)[4][statesOf(CELL)], Op* aNext,
                                               int rowStride, int gStride) {
  constexpr int G = gatesOf(CELL);
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  float gxv[G][4], grv[G][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
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
    for (int g = 0; g < G; ++g) {
      aNext[rowOf(e) * rowStride + g * gStride + j] = toOp<Op>(gr[g]);
      gxv[g][e] = gx[g];
      grv[g][e] = gr[g];
    }
  }
  const int c0 = j0 + 8 * (static_cast<int>(threadIdx.x) >> 5);  // the warp's first column
  auto bOf = [&](int r) { return row0 + rowOf(2 * r); };
  const bool qr = quadAligned(p.gr), qx = quadAligned(dwx);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    storeLane<float>(grv[g], qr, [&](int r) -> float* {
      return bOf(r) < batch ? p.gr + (((t * batch + bOf(r)) * G + g) * H + hh) * D + c0 : nullptr;
    });
    storeLane<T>(gxv[g], qx, [&](int r) -> T* {
      return bOf(r) < batch ? dwx + (((bOf(r) * L + t) * G + g) * H + hh) * D + c0 : nullptr;
    });
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
    for (int s = 0; s < S; ++s) p.dStates0[((s * p.batch + b) * p.heads + hh) * p.headDim + j0 + colOf(e)] = gS[e][s];
  }
}

// ============================== the persistent kernels ==============================

template <class T, int CELL>
__global__ void __launch_bounds__(maxThreadsOf(CELL, std::is_same<T, float>::value))
    fusedRnnForwardKernel(RnnParams p) {
  using Op = typename Operands<T>::Fwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.heads, L = p.T;
  const int64_t hh = blockIdx.x % static_cast<unsigned>(H);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(H)) * kRows;
  const int Di = static_cast<int>(p.headDim), ld = p.Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rt = dynamicShared<Op>();  // [G][D][ld]: Rt[g][j][i] = R[g][hh][i][j], zero for i >= D
  Op* hA = Rt + G * Di * ld;     // [2][16][ld]: h_{t-1} of the block's rows, zero past column D
  float* bs = reinterpret_cast<float*>(hA + 2 * kRows * ld);  // [G][D]: b of the head
  // With p.inputTile: [2][16][G][D] of T, the inputs of steps of even and odd t (16-byte aligned:
  // the sizes before it are multiples of 16 bytes).
  T* xTile = reinterpret_cast<T*>(bs + G * Di);
  const T* wx = static_cast<const T*>(p.wx);
  const bool staged = p.inputTile && inputRowsAligned(p, 0, sizeof(T));
  if (staged && L > 0) stageInputTile<T, G>(p, wx, 0, row0, hh, 0, Di, xTile);
  loadForwardWeights<T, Op, G>(p, hh, 0, Di, ld, Rt, bs);
  for (int e = tid; e < 2 * kRows * ld; e += nthreads) hA[e] = toOp<Op>(0.0f);
  __syncthreads();

  float st[4][S];
  int64_t len[2];
  laneLengths(p, row0, len);
  loadLaneStates<S>(p.states0, p, row0, hh, 0, st);
#pragma unroll
  for (int e = 0; e < 4; ++e) hA[rowOf(e) * ld + colOf(e)] = toOp<Op>(st[e][0]);
  if (staged) waitAsyncCopies();  // step 0's inputs (visible after the barrier)
  __syncthreads();

  T* hOut = static_cast<T*>(p.h);
  for (int64_t t = 0; t < L; ++t) {
    const int cur = static_cast<int>(t & 1);
    // This step's input part first, so that the loads overlap the product; staged, the next step's
    // inputs load into the other buffer (last read in the step before, behind the barrier) during
    // this step's product and land before the barrier that ends it.
    float xin[4][G];
    if (staged) {
      stagedStepInputs<T, G>(p, wx, t, row0, hh, 0, Di, len, xTile, xin);
    } else {
      loadForwardInputs<T, G>(p, wx, t, row0, hh, 0, len, xin);
    }
    float acc[G][4];
    zeroAcc(acc);
    warpProduct<Op, G>(acc, hA + cur * kRows * ld, ld, Rt + warp * 8 * ld, Di * ld, ld, p.Dp);
    forwardUpdate<T, Op, CELL>(p, hOut, t, row0, hh, 0, bs, Di, acc, xin, len, st, hA + (cur ^ 1) * kRows * ld, ld);
    if (staged) waitAsyncCopies();
    __syncthreads();
  }
  forwardFinish<T, S>(p, hOut, row0, hh, 0, st);
}

template <class T, int CELL>
__global__ void __launch_bounds__(maxThreadsOf(CELL, std::is_same<T, float>::value))
    fusedRnnBackwardKernel(RnnParams p) {
  using Op = typename Operands<T>::Bwd;
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  const int64_t H = p.heads, L = p.T;
  const int64_t hh = blockIdx.x % static_cast<unsigned>(H);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(H)) * kRows;
  const int Di = static_cast<int>(p.headDim), Dp = p.Dp, ld = Dp + padOf<Op>(), lda = G * Dp + padOf<Op>();
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

  // gS[.][0] += sum_g dpre_g (a) R_g^T for the warp's rows i. With mma: one accumulator chain per
  // gate (G independent chains of Dp / 16 products instead of one of G Dp / 16), summed at the end;
  // with fp32 FMA (short-latency steps) and for the sLSTM (at its register budget: the chains'
  // accumulators would spill) one chain.
  auto gatesProduct = [&](const Op* a) {
    if constexpr (std::is_same<Op, float>::value || CELL == kSlstm) {
      float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
      for (int g = 0; g < G; ++g) warpProduct<Op, 1>(acc, a + g * Dp, lda, Rs + (g * Di + warp * 8) * ld, 0, ld, Dp);
#pragma unroll
      for (int e = 0; e < 4; ++e) gS[e][0] += acc[0][e];
    } else {
      addGateChains<Op, G>(gS, a, lda, Dp, Rs + warp * 8 * ld, Di * ld, ld, Dp);
    }
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

}  // namespace
}  // namespace rkcuda
