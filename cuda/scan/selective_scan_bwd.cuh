// The selective scan's backward kernel (cuda/scan/selective_scan.cu), recomputing from the
// checkpoints.
#pragma once

#include "scan/selective_scan_common.cuh"

namespace rkcuda {
namespace {

// ============================== backward ==============================

template <class T, int W>
__global__ void __launch_bounds__(32 * W, bwdMinBlocks<T>(W)) selectiveScanBackwardKernel(const ScanParams p) {
  constexpr int K = kBwdItems, TILE = kBwdTile, THREADS = 32 * W;
  constexpr int G = kVecElems<T>;
  using Stage = BCStage<T, 1, TILE, THREADS>;
  constexpr int kRow = Stage::kRow;
  __shared__ __align__(16) T bc[2][2][kRow];           // [buffer][B, C][position]
  __shared__ __align__(16) float part[2][W][2][kRow];  // [buffer][warp][dB, dC][position]
  __shared__ float gcarry[W][kMaxDstate];              // adjoint entering the tile from its end
  __shared__ BlockJob job;
  const BlockThread me = startBlock<W>(p, job);
  const int N = static_cast<int>(p.dstate);
  const int L = job.length;
  if (me.active) {
    const int64_t off = job.stateOff + static_cast<int64_t>(me.warp) * N;
    for (int n = me.lane; n < N; n += 32) {
      const float g = p.dFinal != nullptr ? p.dFinal[off + n] : 0.0f;
      if (L > 0) {
        gcarry[me.warp][n] = g;
      } else if (p.dh0 != nullptr) {
        p.dh0[off + n] = g;  // an empty sequence: dh0 = dFinal
      }
    }
  }
  if (L == 0) return;  // the whole block, before any further barrier

  // Unit i = (tile nTiles - 1 - i / N, state i % N): tiles from the last, states in order.
  const int nTiles = (L + TILE - 1) / TILE;
  const int nUnits = nTiles * N;
  const bool staged = p.variableB || p.variableC;
  auto unitPos = [&](int unit) { return (nTiles - 1 - unit / N) * TILE; };
  auto issue = [&](int unit) {
    const int pos0 = unitPos(unit);
    const int64_t off = job.bcOff + static_cast<int64_t>(unit % N) * p.seqlen + pos0;
    Stage::issue(&bc[unit & 1][0][0], p.variableB ? static_cast<const T*>(p.B) + off : nullptr,
                 p.variableC ? static_cast<const T*>(p.C) + off : nullptr, p.seqlen, 1, L - pos0, job.vecBC);
  };
  // Adds the block's variable dB / dC contributions of a finished unit to the fp32 targets (laid
  // out like B / C): each thread sums 4 consecutive positions over the active warps.
  auto flush = [&](int unit) {
    const int pos0 = unitPos(unit);
    const int64_t off = job.bcOff + static_cast<int64_t>(unit % N) * p.seqlen + pos0;
    constexpr int kQuads = TILE / 4;
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kQuads; i += THREADS) {
      const int arr = i / kQuads;
      if (!(arr == 0 ? p.variableB : p.variableC)) continue;
      const int qq = (i % kQuads) * 4;
      const int left = L - pos0 - qq;
      if (left <= 0) continue;
      float4 s = *reinterpret_cast<const float4*>(&part[unit & 1][0][arr][padIndex<float>(qq)]);
      for (int w = 1; w < job.activeWarps; ++w) {
        const float4 t = *reinterpret_cast<const float4*>(&part[unit & 1][w][arr][padIndex<float>(qq)]);
        s.x += t.x;
        s.y += t.y;
        s.z += t.z;
        s.w += t.w;
      }
      float* dst = (arr == 0 ? p.dB : p.dC) + off + qq;
      if (left >= 4 && isAligned16(dst)) {
        atomicAddFloat4(dst, s);
      } else {
        atomicAdd(dst, s.x);
        if (left > 1) atomicAdd(dst + 1, s.y);
        if (left > 2) atomicAdd(dst + 2, s.z);
        if (left > 3) atomicAdd(dst + 3, s.w);
      }
    }
  };
  if (staged) {
    issue(0);
    Stage::complete();
  }
  __syncthreads();

  float dDSum = 0.0f, dBiasSum = 0.0f;  // this lane's share of dD and dDeltaBias
  for (int ti = 0; ti < nTiles; ++ti) {
    const int tile = nTiles - 1 - ti;
    const int q = tile * TILE + me.lane * K;
    const int avail = L - q;
    // Per position: dt, dt*u, dout = dy*silu(z), and sums over the states of g*B, A*g*a*x_{t-1}
    // and C*x (the latter for dz).
    float dt[K], dtu[K], dout[K], sumGB[K], sumAW[K], out[K];
    float dtRest = 0.0f;  // dt summed over this lane's positions 1..K-1
    if (me.active) {
      const int d = job.d0 + me.warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(me.warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
      if (p.dy != nullptr) {
        loadRun(static_cast<const T*>(p.dy) + rowOff + q, avail, vec, dout);
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) dout[k] = 0.0f;
      }
      if (p.z != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
#pragma unroll
        for (int k = 0; k < K; ++k) dout[k] *= silu(zv[k]);
      }
      if (tile > 0) {  // the next tile's inputs (the one before in time)
        const int64_t prev = rowOff + q - TILE;
        prefetchL2(static_cast<const T*>(p.u) + prev);
        prefetchL2(static_cast<const T*>(p.delta) + prev);
        if (p.dy != nullptr) prefetchL2(static_cast<const T*>(p.dy) + prev);
        if (p.z != nullptr) prefetchL2(static_cast<const T*>(p.z) + prev);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float pre = dv[k] + bias;
        const float t = p.deltaSoftplus ? softplus(pre) : pre;
        dt[k] = k < avail ? t : 0.0f;
        dtu[k] = dt[k] * uv[k];
        sumGB[k] = 0.0f;
        sumAW[k] = 0.0f;
        out[k] = 0.0f;
        if (k > 0) dtRest += dt[k];
      }
    }

    for (int n = 0; n < N; ++n) {
      const int unit = ti * N + n;
      const bool more = staged && unit + 1 < nUnits;
      if (more) issue(unit + 1);
      if (me.active) {
        const int d = job.d0 + me.warp;
        const float A2 = __ldg(p.A + static_cast<int64_t>(d) * N + n) * kLog2e;
        // B at this lane's positions (read twice from shared memory rather than held throughout).
        const T* bSrc = &bc[unit & 1][0][padIndex<T>(me.lane * K)];
        const float bConst =
            p.variableB ? 0.0f : __ldg(static_cast<const float*>(p.B) + static_cast<int64_t>(d) * N + n);
        auto loadB = [&](float(&bv)[K]) {
          if (p.variableB) {
            readStaged<T, K>(bSrc, bv);
          } else {
#pragma unroll
            for (int k = 0; k < K; ++k) bv[k] = bConst;
          }
        };

        // Forward states of the tile from the checkpoint: xs[k] = x at position k, x0 = before.
        float a[K], xs[K];
        float h = 0.0f;
        {
          float bv[K];
          loadB(bv);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            a[k] = fastExp2(dt[k] * A2);
            xs[k] = dtu[k] * bv[k];
            h = fmaf(a[k], h, xs[k]);
          }
        }
        const float* ck = p.checkpoints + job.ckOff + static_cast<int64_t>(me.warp) * job.nChunks * N;
        const float checkpoint = ck[tile * (TILE / kChunk) * N + n];  // x entering the tile
        const Affine incl = scan::warpInclusiveScan<32>(Affine{fastExp2((dt[0] + dtRest) * A2), h});
        const float x0 = scan::apply(scan::warpExclusiveFromInclusive<32>(incl), checkpoint);
        {
          float x = x0;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            x = fmaf(a[k], x, xs[k]);
            xs[k] = x;
          }
        }

        // Adjoint, backwards: g_k = alpha_k * g_{k+1} + C_k * dout_k, alpha_k = a_{k+1}; after this
        // lane's last position comes the next lane's first a (lane 31: the carry includes it).
        float g[K];
        if (p.variableC) {
          readStaged<T, K>(&bc[unit & 1][1][padIndex<T>(me.lane * K)], g);
        } else {
          const float t = __ldg(static_cast<const float*>(p.C) + static_cast<int64_t>(d) * N + n);
#pragma unroll
          for (int k = 0; k < K; ++k) g[k] = t;
        }
        if (p.z != nullptr) {
#pragma unroll
          for (int k = 0; k < K; ++k) out[k] = fmaf(g[k], xs[k], out[k]);
        }
        const float aNext = __shfl_down_sync(scan::kFullMask, a[0], 1);
        const float alphaLast = me.lane == 31 ? 1.0f : aNext;
        float hr = 0.0f;
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          g[k] *= dout[k];
          hr = fmaf(k == K - 1 ? alphaLast : a[k + 1 < K ? k + 1 : 0], hr, g[k]);
        }
        const Affine inclR = scan::warpInclusiveScanReverse<32>(Affine{fastExp2(dtRest * A2) * alphaLast, hr});
        {
          float gg = scan::apply(scan::warpExclusiveFromInclusiveReverse<32>(inclR), gcarry[me.warp][n]);
#pragma unroll
          for (int k = K - 1; k >= 0; --k) {
            gg = fmaf(k == K - 1 ? alphaLast : a[k + 1 < K ? k + 1 : 0], gg, g[k]);
            g[k] = gg;
          }
        }

        // Gradients. bv becomes this channel's dB contribution, xs (after its last use) its dC one.
        float dASum = 0.0f, dBSum = 0.0f, dCSum = 0.0f;
        float bv[K];
        loadB(bv);
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          const float xPrev = k == 0 ? x0 : xs[k > 0 ? k - 1 : 0];
          const float w = g[k] * a[k] * xPrev;
          sumAW[k] = fmaf(A2, w, sumAW[k]);  // times ln 2 at the end
          dASum = fmaf(dt[k], w, dASum);
          sumGB[k] = fmaf(g[k], bv[k], sumGB[k]);
          bv[k] = g[k] * dtu[k];
          xs[k] = dout[k] * xs[k];
          dBSum += bv[k];
          dCSum += xs[k];
        }
        if (p.variableB) {
          float* dst = &part[unit & 1][me.warp][0][padIndex<float>(me.lane * K)];
#pragma unroll
          for (int v = 0; v < K / 4; ++v) {
            *reinterpret_cast<float4*>(dst + 4 * v) =
                make_float4(bv[4 * v], bv[4 * v + 1], bv[4 * v + 2], bv[4 * v + 3]);
          }
        }
        if (p.variableC) {
          float* dst = &part[unit & 1][me.warp][1][padIndex<float>(me.lane * K)];
#pragma unroll
          for (int v = 0; v < K / 4; ++v) {
            *reinterpret_cast<float4*>(dst + 4 * v) =
                make_float4(xs[4 * v], xs[4 * v + 1], xs[4 * v + 2], xs[4 * v + 3]);
          }
        }
        const int64_t param = static_cast<int64_t>(d) * N + n;
        dASum = warpSum(dASum);
        if (me.lane == 0) atomicAdd(p.dA + param, dASum);
        if (!p.variableB) {
          dBSum = warpSum(dBSum);
          if (me.lane == 0) atomicAdd(p.dB + param, dBSum);
        }
        if (!p.variableC) {
          dCSum = warpSum(dCSum);
          if (me.lane == 0) atomicAdd(p.dC + param, dCSum);
        }
        // Every lane read gcarry[warp][n] above; a shuffle's data dependence is no memory ordering.
        __syncwarp();
        if (me.lane == 0) gcarry[me.warp][n] = a[0] * g[0];  // into the previous tile (dh0 after the first)
      }
      if (unit > 0 && staged) flush(unit - 1);  // the previous unit's contributions are complete
      if (more) Stage::complete();              // unit + 1 staged
      __syncthreads();
    }

    if (me.active) {
      const int d = job.d0 + me.warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(me.warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      const float Dd = p.D != nullptr ? p.D[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float ddt = fmaf(uv[k], sumGB[k], sumAW[k] * kLn2);
        if (p.deltaSoftplus) ddt *= softplusGrad(dv[k] + bias);
        sumGB[k] = fmaf(Dd, dout[k], dt[k] * sumGB[k]);  // du
        sumAW[k] = ddt;                                  // ddelta
        out[k] = fmaf(Dd, uv[k], out[k]);                // y before the gate
        if (k < avail) {
          dDSum = fmaf(dout[k], uv[k], dDSum);
          dBiasSum += ddt;
        }
      }
      storeRun(static_cast<T*>(p.du) + rowOff + q, avail, vec, sumGB);
      storeRun(static_cast<T*>(p.ddelta) + rowOff + q, avail, vec, sumAW);
      if (p.dz != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
        if (p.dy != nullptr) {
          loadRun(static_cast<const T*>(p.dy) + rowOff + q, avail, vec, dv);
        } else {
#pragma unroll
          for (int k = 0; k < K; ++k) dv[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < K; ++k) dv[k] *= out[k] * siluGrad(zv[k]);
        storeRun(static_cast<T*>(p.dz) + rowOff + q, avail, vec, dv);
      }
    }
  }
  if (staged) flush(nUnits - 1);

  if (me.active) {
    const int d = job.d0 + me.warp;
    if (p.dh0 != nullptr) {
      const int64_t off = job.stateOff + static_cast<int64_t>(me.warp) * N;
      for (int n = me.lane; n < N; n += 32) p.dh0[off + n] = gcarry[me.warp][n];
    }
    if (p.dD != nullptr) {
      dDSum = warpSum(dDSum);
      if (me.lane == 0) atomicAdd(p.dD + d, dDSum);
    }
    if (p.dDeltaBias != nullptr) {
      dBiasSum = warpSum(dBiasSum);
      if (me.lane == 0) atomicAdd(p.dDeltaBias + d, dBiasSum);
    }
  }
}

}  // namespace
}  // namespace rkcuda
