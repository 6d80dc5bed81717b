// The selective scan's forward kernel (cuda/scan/selective_scan.cu).
#pragma once

#include "scan/selective_scan_common.cuh"

namespace rkcuda {
namespace {

// ============================== forward ==============================

template <class T, int W>
__global__ void __launch_bounds__(32 * W, minBlocks(W)) selectiveScanForwardKernel(const ScanParams p) {
  constexpr int K = kFwdItems, TILE = kFwdTile, NT = kFwdStatesPerStage, THREADS = 32 * W;
  constexpr int G = kVecElems<T>;
  using Stage = BCStage<T, NT, TILE, THREADS>;
  __shared__ __align__(16) T bc[2][2][NT][Stage::kRow];  // [buffer][B, C][state][position]
  __shared__ BlockJob job;
  const BlockThread me = startBlock<W>(p, job);
  const int N = static_cast<int>(p.dstate);
  const int L = job.length;
  if (L == 0) {  // the whole block, before any further barrier
    if (me.active && p.finalState != nullptr) {
      const int64_t off = job.stateOff + static_cast<int64_t>(me.warp) * N;
      for (int n = me.lane; n < N; n += 32) p.finalState[off + n] = p.h0 != nullptr ? p.h0[off + n] : 0.0f;
    }
    return;
  }

  // Staging unit i = (tile i / upt, states [(i % upt) * NT, + NT)).
  const int nTiles = (L + TILE - 1) / TILE;
  const int upt = (N + NT - 1) / NT;
  const int nUnits = nTiles * upt;
  const bool staged = p.variableB || p.variableC;
  auto unitStates = [&](int unit) {
    const int n0 = (unit % upt) * NT;
    return N - n0 < NT ? N - n0 : NT;
  };
  auto issue = [&](int unit) {
    const int pos0 = (unit / upt) * TILE;
    const int64_t off = job.bcOff + static_cast<int64_t>((unit % upt) * NT) * p.seqlen + pos0;
    Stage::issue(&bc[unit & 1][0][0][0], p.variableB ? static_cast<const T*>(p.B) + off : nullptr,
                 p.variableC ? static_cast<const T*>(p.C) + off : nullptr, p.seqlen, unitStates(unit), L - pos0,
                 job.vecBC);
  };
  if (staged) {
    issue(0);
    Stage::complete();
  }
  __syncthreads();

  for (int tile = 0; tile < nTiles; ++tile) {
    const int q = tile * TILE + me.lane * K;  // this lane's first position
    const int avail = L - q;
    float dt[K], dtu[K], y[K];
    float dtSum = 0.0f;
    if (me.active) {
      const int d = job.d0 + me.warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(me.warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      const float Dd = p.D != nullptr ? p.D[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
      if (p.z != nullptr && avail > 0) prefetchL2(static_cast<const T*>(p.z) + rowOff + q);
      if (avail > TILE) {  // the next tile's inputs
        prefetchL2(static_cast<const T*>(p.u) + rowOff + q + TILE);
        prefetchL2(static_cast<const T*>(p.delta) + rowOff + q + TILE);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float pre = dv[k] + bias;
        const float t = p.deltaSoftplus ? softplus(pre) : pre;
        dt[k] = k < avail ? t : 0.0f;
        dtu[k] = dt[k] * uv[k];
        y[k] = Dd * uv[k];
        dtSum += dt[k];
      }
    }

    for (int su = 0; su < upt; ++su) {
      const int unit = tile * upt + su;
      const bool more = staged && unit + 1 < nUnits;
      if (more) issue(unit + 1);
      if (me.active) {
        const int d = job.d0 + me.warp;
        const int nChunks = job.nChunks;
        // This channel's checkpoints [c][n]. The entry at a tile start doubles as the carry
        // between tiles: lane 31 writes it at the end of the previous tile, the barriers publish it.
        float* ck = p.states + job.ckOff + static_cast<int64_t>(me.warp) * nChunks * N;
        const int64_t stateOff = job.stateOff + static_cast<int64_t>(me.warp) * N;
        const int tileCk = tile * (TILE / kChunk);  // the chunk starting the tile
        const int n0 = su * NT;
        const int nCount = N - n0 < NT ? N - n0 : NT;
#pragma unroll 1
        for (int j = 0; j < nCount; ++j) {
          const int n = n0 + j;
          const float before = tile > 0 ? ck[tileCk * N + n] : p.h0 != nullptr ? p.h0[stateOff + n] : 0.0f;
          const float A2 = __ldg(p.A + static_cast<int64_t>(d) * N + n) * kLog2e;
          float a[K], b[K];
          if (p.variableB) {
            float bv[K];
            readStaged<T, K>(&bc[unit & 1][0][j][padIndex<T>(me.lane * K)], bv);
#pragma unroll
            for (int k = 0; k < K; ++k) b[k] = dtu[k] * bv[k];
          } else {
            const float bv = __ldg(static_cast<const float*>(p.B) + static_cast<int64_t>(d) * N + n);
#pragma unroll
            for (int k = 0; k < K; ++k) b[k] = dtu[k] * bv;
          }
          float h = 0.0f;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            a[k] = fastExp2(dt[k] * A2);
            h = fmaf(a[k], h, b[k]);
          }
          const Affine incl = scan::warpInclusiveScan<32>(Affine{fastExp2(dtSum * A2), h});
          float x = scan::apply(scan::warpExclusiveFromInclusive<32>(incl), before);  // before this lane
          // Checkpoints inside the tile (at its start only for the first tile; later ones are the
          // previous tile's end).
          if ((me.lane * K) % kChunk == 0 && (me.lane > 0 || tile == 0) && q / kChunk < nChunks) {
            ck[(q / kChunk) * N + n] = x;
          }
          if (p.variableC) {
            float cv[K];
            readStaged<T, K>(&bc[unit & 1][1][j][padIndex<T>(me.lane * K)], cv);
#pragma unroll
            for (int k = 0; k < K; ++k) {
              x = fmaf(a[k], x, b[k]);
              y[k] = fmaf(cv[k], x, y[k]);
            }
          } else {
            const float cv = __ldg(static_cast<const float*>(p.C) + static_cast<int64_t>(d) * N + n);
#pragma unroll
            for (int k = 0; k < K; ++k) {
              x = fmaf(a[k], x, b[k]);
              y[k] = fmaf(cv, x, y[k]);
            }
          }
          // Lane 31 ends the tile (positions past the sequence's end are identity steps): the next
          // tile's carry, or the final state.
          if (me.lane == 31) {
            if (tile + 1 < nTiles) {
              ck[(tileCk + TILE / kChunk) * N + n] = x;
            } else if (p.finalState != nullptr) {
              p.finalState[stateOff + n] = x;
            }
          }
        }
      }
      if (more) Stage::complete();  // unit + 1 staged
      __syncthreads();
    }

    if (me.active) {
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(me.warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      if (p.z != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
#pragma unroll
        for (int k = 0; k < K; ++k) y[k] *= silu(zv[k]);
      }
      storeRun(static_cast<T*>(p.y) + rowOff + q, avail, vec, y);
    }
  }
}

}  // namespace
}  // namespace rkcuda
