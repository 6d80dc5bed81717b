// The fused cells' multi-block persistent kernels (cuda/cells/fused_rnn.cu): a head too large for one
// block split over co-resident blocks.
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

#include "cells/fused_rnn_persistent.cuh"

namespace rkcuda {
namespace {

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
  m.hh = (p.group0 + m.grp) % p.heads;
  m.row0 = (p.group0 + m.grp) / p.heads * kRows;
  m.Dc = static_cast<int>(p.headDim) / p.splits;
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
  const int64_t H = p.heads, D = p.headDim, L = p.T, batch = p.batch;
  const MultiGroup m = multiGroupOf(p);
  const int64_t hh = m.hh, row0 = m.row0;
  const int Di = static_cast<int>(D), Dc = m.Dc, j0 = m.j0, ld = p.Dp + padOf<Op>();
  const int nthreads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  Op* Rt = dynamicShared<Op>();  // [G][Dc][ld]: Rt[g][jl][i] = R[g][hh][i][j0 + jl], zero for i >= D
  Op* hA = Rt + G * Dc * ld;     // [16][ld]: h_{t-1} of the block's rows, all D columns, zero past D
  float* bs = reinterpret_cast<float*>(hA + kRows * ld);  // [G][Dc]: b of the block's columns
  // With p.inputTile: [2][16][G][Dc] of T, the inputs of steps of even and odd t (16-byte aligned:
  // the sizes before it are multiples of 16 bytes).
  T* xTile = reinterpret_cast<T*>(bs + G * Dc);
  const T* wx = static_cast<const T*>(p.wx);
  const bool staged = p.inputTile && inputRowsAligned(p, j0, sizeof(T));
  if (staged && L > 0) stageInputTile<T, G>(p, wx, 0, row0, hh, j0, Dc, xTile);
  loadForwardWeights<T, Op, G>(p, hh, j0, Dc, ld, Rt, bs);
  for (int e = tid; e < kRows * ld; e += nthreads) {
    const int64_t b = row0 + e / ld;
    const int i = e % ld;
    hA[e] = toOp<Op>((i < Di && b < batch && p.states0 != nullptr) ? p.states0[(b * H + hh) * D + i] : 0.0f);
  }
  if (staged) waitAsyncCopies();  // step 0's inputs (visible after the barrier)
  __syncthreads();

  float st[4][S];
  int64_t len[2];
  laneLengths(p, row0, len);
  loadLaneStates<S>(p.states0, p, row0, hh, j0, st);

  T* hOut = static_cast<T*>(p.h);
  const int64_t bufStride = static_cast<int64_t>(gridDim.x / static_cast<unsigned>(p.splits)) * kRows * Di;
  Op* xg = static_cast<Op*>(p.xchg) + m.grp * kRows * Di;  // buffer k at xg + k * bufStride: [16][D]
  unsigned* counter = p.sync + m.grp;
  unsigned passed = 0;
  for (int64_t t = 0; t < L; ++t) {
    // This step's input part first, so that the loads overlap the exchange and the product; staged,
    // the next step's inputs load into the other buffer (issued after the exchange copy, which
    // waits for its own copies) during this step's product and land before the barrier ending it.
    float xin[4][G];
    if (!staged) loadForwardInputs<T, G>(p, wx, t, row0, hh, j0, len, xin);
    if (t > 0) copyExchange<Op>(hA, ld, 0, xg + ((t - 1) & 1) * bufStride, 1, Di);
    if (staged) stagedStepInputs<T, G>(p, wx, t, row0, hh, j0, Dc, len, xTile, xin);
    float acc[G][4];
    zeroAcc(acc);
    warpProduct<Op, G>(acc, hA, ld, Rt + warp * 8 * ld, Dc * ld, ld, p.Dp);
    forwardUpdate<T, Op, CELL>(p, hOut, t, row0, hh, j0, bs, Dc, acc, xin, len, st, xg + (t & 1) * bufStride, Di);
    if (staged) waitAsyncCopies();
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
  const int Di = static_cast<int>(p.headDim), Dc = m.Dc, j0 = m.j0, Dp = p.Dp, ld = Dp + padOf<Op>();
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
  auto gatesProduct = [&]() { addGateChains<Op, G>(gS, dA, lda, Dp, Rs + warp * 8 * ld, Dc * ld, ld, Dp); };
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

}  // namespace
}  // namespace rkcuda
