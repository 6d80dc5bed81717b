// The gated delta rule's chunked tensor-core kernels (cuda/delta/gated_delta_rule_chunked.cu): sizes,
// tiles and the helpers both passes share.
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

namespace rkcuda {
namespace deltachunked {
namespace {

constexpr int kC = 64;         // chunk length (gatedDeltaRuleChunk)
constexpr int kThreads = 128;  // 4 warps, 16 chunk rows each
constexpr int kWarps = kThreads / 32;
constexpr int kLdA = kC + 1;  // fp32 64 x 64 matrices in shared memory
using delta::kL2Eps;
using delta::uniformSegment;

inline int roundUp16(int64_t x) { return static_cast<int>(ceilDiv(x, 16) * 16); }

struct ChunkParams : delta::DeltaInputs {
  int64_t nseq = 0;
  int Kp = 16;   // K rounded up to 16
  int Vp = 16;   // V rounded up to 16
  int ldk = 24;  // row stride (elements) of the staged q, k
  int vt = 32;   // value columns per state-pass block
  int vTiles = 1;
  // false: the rules without the delta term (S_t = exp(g_t) S_{t-1} + k_t v_t^T): Tm = I, U = V, no
  // W (V' = U), beta and dbeta not read or written, g nullable (0)
  bool delta = true;
  // true: g is [batch, T, HV, K], a decay per key row (the preparation's A, P, Qg, Kd and W take the
  // per-key factors, gammaLast and dGamL are per key row, the state passes decay row by row, the
  // gradient kernel takes the factors inside its intra-chunk products)
  bool perKey = false;
  // scratch, per (global chunk, value head): W, Qg, Kd [64 x K], U [64 x V], P [64 x 64], gammaLast
  void* W = nullptr;
  void* U = nullptr;
  void* Qg = nullptr;
  void* Kd = nullptr;
  void* P = nullptr;
  float* gammaLast = nullptr;  // exp(G_{n-1}): one per (chunk, value head), or Kp of them with perKey
  float* Xinv = nullptr;       // (I + A)^-1, fp32 [64 x 64] per (chunk, value head): backward only
  // backward
  const float* checkpoints = nullptr;
  const void* dO = nullptr;       // nullable (zeros)
  const float* dFinal = nullptr;  // nullable (zeros)
  float* dh0 = nullptr;           // nullable
  float* dStates = nullptr;       // dL/dS at the end of each chunk, fp32, the checkpoints' layout
  void* dVp = nullptr;            // dL/dV', [64 x V] per (chunk, value head)
  float* dGamL = nullptr;         // <S_0, dL/dS_end> per (chunk, value head), zeroed, summed over tiles
  void* dv = nullptr;
  float* dqAcc = nullptr;  // fp32 [batch, T, H, K], zeroed unless dqOut: gradients w.r.t. the normalised q, k
  float* dkAcc = nullptr;
  void* dqOut = nullptr;  // with one value head per q / k head: dq, dk themselves (the accumulators
  void* dkOut = nullptr;  // then scratch that the gradient kernel writes before it reads)
  float* dg = nullptr;
  float* dbetaAcc = nullptr;  // fp32 [batch, T, HV]
};

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

// The value tile of a state kernel's block (block = (sequence * HV + hv) * vTiles + tile): the value
// columns v0 .. v0 + vw - 1 (vw of p.vt valid) of head hv's state, at stateOff in the state arrays,
// and the block's sequence.
struct StateTile {
  ScanSegment seg;
  int64_t hv, stateOff;
  int v0, vw;
};
__device__ __forceinline__ StateTile stateTileOf(const ChunkParams& p) {
  StateTile st;
  const int64_t head = static_cast<int64_t>(blockIdx.x) / p.vTiles;
  const int tile = static_cast<int>(static_cast<int64_t>(blockIdx.x) - head * p.vTiles);
  const int64_t seq = head / p.HV;
  st.hv = head - (head / p.HV) * p.HV;
  st.seg = p.segments != nullptr ? p.segments[seq] : uniformSegment(p, seq);
  const int V = static_cast<int>(p.V);
  st.v0 = tile * p.vt;
  st.vw = V - st.v0 < p.vt ? V - st.v0 : p.vt;
  st.stateOff = (seq * p.HV + st.hv) * (p.K * p.V);
  return st;
}

// exp(G_{n-1}) for state row i of (chunk, value head) cb: one per chunk, or one per key row with perKey.
__device__ __forceinline__ float lastDecay(const ChunkParams& p, int64_t cb, int i) {
  return p.gammaLast[p.perKey ? cb * p.Kp + i : cb];
}

}  // namespace
}  // namespace deltachunked
}  // namespace rkcuda
