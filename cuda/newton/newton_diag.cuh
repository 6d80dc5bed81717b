// The Newton-iteration RNN, diagonal cells (cuda/newton/newton_rnn.cu): the fused Newton solve and
// sequential evaluation (mode sequential and the fallback).
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

#include "newton/newton_cells.cuh"

namespace rkcuda {
namespace {

// ---- diagonal cells: the fused Newton solve ----

template <NewtonCell C, class T> __global__ void __launch_bounds__(kFusedThreads) diagNewtonKernel(Params p) {
  constexpr int S = CellInfo<C>::S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  __shared__ float sBound[kMaxS][kFusedThreads];
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  const SliceThread th = sliceThread(p);

  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
  if (th.active) {
    channelConsts<C>(p, th.n, xb, rb, Rd);
    loadH0<C>(p, th.row, th.n, h0v);
  } else {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) xb[g] = rb[g] = Rd[g] = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) h0v[s] = 0.0f;
  }
  // The guess at position t (not past the slice's own loads).
  auto guessAt = [&](int64_t t, float(&g)[kMaxS]) {
    if (p.guess == NewtonGuess::Provided) {
      loadTraj<C>(p.guessTraj, p, th.row, t, th.n, g);
    } else if (p.guess == NewtonGuess::OneStep) {
      float x[kMaxG];
      loadX<C, T>(p, th.row, t, th.n, xb, x);
      fwdDiag<C>(x, Rd, rb, h0v, g);
    } else {
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] = 0.0f;
    }
  };

  // Pass 0: the guess, its check and its linearisation.
  Map agg = scan::identityN<S>();
  bool ok = true;
  float res = 0.0f;
  float hPrev[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) hPrev[s] = h0v[s];
  if (th.work) {
    if (th.t0 > 0) guessAt(th.t0 - 1, hPrev);
    for (int64_t t = th.t0; t < th.t1; ++t) {
      if (t + 2 < th.t1) {
        prefetchStepL2<C, T>(p, p.guess == NewtonGuess::Provided ? p.guessTraj : nullptr, th.row, t + 2, th.n);
      }
      float x[kMaxG], cur[kMaxS], f[kMaxS], J[kMaxS][kMaxS];
      guessAt(t, cur);
      loadX<C, T>(p, th.row, t, th.n, xb, x);
      linDiag<C>(x, Rd, rb, hPrev, f, J);
#pragma unroll
      for (int s = 0; s < S; ++s) checkElem(p, f[s], cur[s], ok, res);
      storeTraj<C>(p, th.row, t, th.n, cur);
      agg = scan::compose(agg, stepMap<S>(J, f, hPrev));
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) hPrev[s] = cur[s];
    }
  }

  int iters = 0;
  for (;;) {
    sAgg[th.tid] = agg;
#pragma unroll
    for (int s = 0; s < S; ++s) sBound[s][th.tid] = hPrev[s];
    bool allOk;
    float blockRes;
    blockCheck(ok, res, sOk, sRes, allOk, blockRes);  // includes the barrier publishing sAgg, sBound
    const bool stop = allOk || iters >= p.maxIters;
    float hNew[kMaxS], hOld[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hNew[s] = hOld[s] = h0v[s];
    if (!stop && th.work) {
      for (int w = 0; w < th.slice; ++w) {
        float nx[S], cur[S];
#pragma unroll
        for (int s = 0; s < S; ++s) cur[s] = hNew[s];
        scan::apply(sAgg[w * th.CW + th.lc], cur, nx);
#pragma unroll
        for (int s = 0; s < S; ++s) hNew[s] = nx[s];
      }
      if (th.slice > 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) hOld[s] = sBound[s][(th.slice - 1) * th.CW + th.lc];
      }
    }
    __syncthreads();
    if (stop) {
      if (th.tid == 0) {
        int* st = p.blockStats + 3 * static_cast<int64_t>(blockIdx.x);
        st[0] = iters;
        st[1] = allOk ? 1 : 0;
        st[2] = static_cast<int>(__float_as_uint(blockRes));
      }
      return;
    }
    ++iters;
    // One Newton step and the check of its result.
    agg = scan::identityN<S>();
    ok = true;
    res = 0.0f;
    if (th.work) {
      for (int64_t t = th.t0; t < th.t1; ++t) {
        if (t + 2 < th.t1) prefetchStepL2<C, T>(p, p.traj, th.row, t + 2, th.n);
        float x[kMaxG], old[kMaxS], fo[kMaxS], Jo[kMaxS][kMaxS], nw[kMaxS], fn[kMaxS], Jn[kMaxS][kMaxS];
        loadX<C, T>(p, th.row, t, th.n, xb, x);
        loadTraj<C>(p.traj, p, th.row, t, th.n, old);
        linDiag<C>(x, Rd, rb, hOld, fo, Jo);
#pragma unroll
        for (int i = 0; i < kMaxS; ++i) {
          float v = fo[i];
#pragma unroll
          for (int j = 0; j < S; ++j) v = fmaf(Jo[i][j], hNew[j] - hOld[j], v);
          nw[i] = v;
        }
        linDiag<C>(x, Rd, rb, hNew, fn, Jn);
#pragma unroll
        for (int s = 0; s < S; ++s) checkElem(p, fn[s], nw[s], ok, res);
        storeTraj<C>(p, th.row, t, th.n, nw);
        agg = scan::compose(agg, stepMap<S>(Jn, fn, hNew));
#pragma unroll
        for (int s = 0; s < kMaxS; ++s) {
          hOld[s] = old[s];
          hNew[s] = nw[s];
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hPrev[s] = hNew[s];
  }
}

// ---- diagonal cells: sequential evaluation (mode sequential and the fallback) ----

template <NewtonCell C, class T> __global__ void diagSequentialKernel(Params p) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t row = p.rows != nullptr ? p.rows[k] : k;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h);
  struct Loads {
    float x[kMaxG];
  };
  pipelinedSteps<Loads>(
      0, p.T, 1, [&](int64_t t, Loads& l) { loadX<C, T>(p, row, t, n, xb, l.x); },
      [&](int64_t t, const Loads& l) {
        float out[kMaxS];
        fwdDiag<C>(l.x, Rd, rb, h, out);
        storeTraj<C>(p, row, t, n, out);
#pragma unroll
        for (int s = 0; s < kMaxS; ++s) h[s] = out[s];
      });
}

}  // namespace
}  // namespace rkcuda
