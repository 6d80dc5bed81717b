// Gated delta rule (Gated DeltaNet), recurrent form: forward, backward (recomputing from
// checkpoints) and decode steps, for F32/F16/BF16 storage with fp32 state and arithmetic: kernels
// plus the launchers declared in common/api.h. gatedDeltaRuleForward and gatedDeltaRuleBackward send fp16 /
// bf16 storage to the chunked tensor-core form (gated_delta_rule_chunked.cu; the "gatedDeltaRule.forwardPath"
// and "gatedDeltaRule.backwardPath" tunables: 1 this recurrence, 2 chunked); the checkpoints are the
// same, so either backward consumes either forward's.
//
// Work split. Given (q, k, g, beta), column j of the K x V state evolves on its own:
//   S_t[:, j] = a_t S_{t-1}[:, j] + beta_t k_t (v_t[j] - a_t k_t . S_{t-1}[:, j]),   a_t = exp(g_t)
//   o_t[j]    = scale q_t . S_t[:, j] = scale (a_t q.S_{t-1}[:, j] + beta_t (q.k) w_t[j])
// so a block takes one (sequence, value head) and a slice of its columns, and walks the positions.
// Each column is owned by a group of G lanes (G a power of two up to 32): lane r of the group holds
// the rows i = r + G*m (m < KP, the rows per lane, a template parameter) of that column in
// registers. Per position a lane loads its rows of q and k and forms the partial sums of
// k.S, q.S, q.k, k.k and q.q; one group reduction (log2 G shuffle rounds, none when G = 1) gives
// all five, so the L2 norms (when on) cost nothing extra: k.S with the raw k times 1/|k| is the
// product with the normalised k. The decay of each position is applied on its own (one exp per
// position, no cumulative sums, no divisions), so g = 0 and g = -1e4 (exp(g) = 0) stay finite.
//
// Checkpoints. Every kChunk = 64 positions the forward pass stores the state entering that chunk in
// the layout fixed by api.h (each lane its own elements).
//
// Backward. Per column the adjoint dS = dL/dS_t runs backwards with the same (k, g, beta):
//   dS += scale q dO[j];  dw = beta k.dS;  dv[j] = dw;  dS_{t-1} = a (dS - k dw)
//   dbeta += w[j] k.dS,  dg += a (dS.S_{t-1} - dw u[j]),  u = k.S_{t-1},  w = v - a u
//   dk_i += beta dS_i w[j] - a S_{t-1,i} dw,  dq_i += scale S_{t,i} dO[j]
// The block walks the chunks of its sequence from the last to the first; for every position it
// recomputes S_{t-1} from the chunk's checkpoint (t - chunkStart forward steps in registers: no
// scratch memory, about kChunk / 2 times the forward pass's work), then takes the adjoint step.
// All the sums above need one group reduction per position (seven values). dq, dk (per row),
// dg and dbeta (per position) sum over the columns: the block accumulates them with shared-memory
// atomics over windows of kWindow positions, then adds each window to zeroed fp32 buffers with
// global atomics (several blocks of a head, and the HV / H value heads of a q / k head, meet
// there). A last kernel takes dq, dk through the L2 norm (when on) and converts them to the
// storage type; dbeta is converted by rkcuda::convert (fp32 storage: accumulated in place).
//
// Bounds. Recurrent: the work per position is O(K V) per head and sequential in t, so this is the
// reference-quality path (decode, short sequences, checking the chunked kernel); the backward pays
// the chunk recomputation on top. Registers: KP (8 or 16) floats of state, plus KP each of the
// adjoint, q and k in the backward (up to ~190 registers, one or two blocks per SM); K, V <= 256
// (G = 16 lanes per column at K = 256).
//
// Packed sequences get a device copy of the segment table; positions in no segment receive zeros
// (o, dq, dk, dv from a small kernel; dg, dbeta from their zeroed accumulators).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/api.h"
#include "delta/gated_delta_rule.h"
#include "common/check.cuh"
#include "common/columns.cuh"
#include "common/host.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/rows.cuh"
#include "delta/delta_params.cuh"
#include "delta/gated_delta_rule_chunked.h"

namespace rkcuda {
namespace {

using delta::kChunk;
using delta::kMaxDim;
using delta::kMaxT;
constexpr int kWindow = 16;  // positions per shared-memory accumulation window (backward)

using delta::kL2Eps;

struct DeltaParams : delta::DeltaInputs, ColumnParams {
  float* intermediate = nullptr;  // decode
};

// What a thread works on (over the state heads; hk: the query and key head).
using Job = ColumnJob;

__device__ __forceinline__ Job jobOf(const DeltaParams& p) {
  Job jb;
  placeColumnJob(jb, p, p.HV, [&](Job& j) {
    j.hk = j.hv / p.group;
    j.seg = p.segments != nullptr ? p.segments[j.seq] : delta::uniformSegment(p, j.seq);
  });
  return jb;
}

// One forward step of position (bt = batch row * T + position) on this thread's column; returns
// o[j] (when withO, else 0).
template <class T, int KP>
__device__ __forceinline__ float forwardStep(const DeltaParams& p, const Job& jb, float (&S)[KP], int64_t bt,
                                             bool withO) {
  const int64_t qk = (bt * p.H + jb.hk) * p.K;
  const int64_t gi = bt * p.HV + jb.hv;
  const T* qp = static_cast<const T*>(p.q) + qk;
  const T* kp = static_cast<const T*>(p.k) + qk;
  float kv[KP];
  float kS = 0.0f, qS = 0.0f, qkd = 0.0f, kk = 0.0f, qq = 0.0f;
#pragma unroll
  for (int m = 0; m < KP; ++m) {
    const int i = jb.sub + p.G * m;
    const bool in = i < p.K;
    const float kx = in ? loadScalar(kp + i) : 0.0f;
    const float qx = (in && withO) ? loadScalar(qp + i) : 0.0f;
    kv[m] = kx;
    kS = fmaf(kx, S[m], kS);
    qS = fmaf(qx, S[m], qS);
    qkd = fmaf(qx, kx, qkd);
    kk = fmaf(kx, kx, kk);
    qq = fmaf(qx, qx, qq);
  }
  kS = groupSum(kS, p.G);
  kk = groupSum(kk, p.G);
  if (withO) {
    qS = groupSum(qS, p.G);
    qkd = groupSum(qkd, p.G);
    qq = groupSum(qq, p.G);
  }
  const float rk = p.l2norm ? 1.0f / sqrtf(kk + kL2Eps) : 1.0f;
  const float rq = p.l2norm ? 1.0f / sqrtf(qq + kL2Eps) : 1.0f;
  const float a = fastExp(p.g[gi]);
  const float beta = loadScalar(static_cast<const T*>(p.beta) + gi);
  const float vj = jb.active ? loadScalar(static_cast<const T*>(p.v) + gi * p.V + jb.j) : 0.0f;
  const float u = rk * kS;
  const float bw = beta * (vj - a * u);
  const float bwk = bw * rk;
#pragma unroll
  for (int m = 0; m < KP; ++m) S[m] = fmaf(a, S[m], kv[m] * bwk);
  return withO ? p.scale * rq * fmaf(a, qS, rk * qkd * bw) : 0.0f;
}

// ============================== forward / decode ==============================

template <class T, int KP> __global__ void __launch_bounds__(256) gatedDeltaRuleForwardKernel(const DeltaParams p) {
  const Job jb = jobOf(p);
  const int64_t KV = p.K * p.V;
  float S[KP];
  loadState(S, p.h0 != nullptr ? p.h0 + jb.stateOff : nullptr, p, jb);
  const int L = static_cast<int>(jb.seg.length);
  for (int t = 0; t < L; ++t) {
    if (p.states != nullptr && t % kChunk == 0) {
      storeState(S, p.states + ((jb.seg.chunkOffset + t / kChunk) * p.HV + jb.hv) * KV, p, jb);
    }
    const int64_t bt = jb.seg.batch * p.T + jb.seg.start + t;
    const float o = forwardStep<T, KP>(p, jb, S, bt, true);
    const int64_t gi = bt * p.HV + jb.hv;
    if (jb.active && jb.sub == 0) storeScalar(static_cast<T*>(p.o) + gi * p.V + jb.j, o);
    if (p.intermediate != nullptr) storeState(S, p.intermediate + gi * KV, p, jb);
  }
  if (p.finalState != nullptr) storeState(S, p.finalState + jb.stateOff, p, jb);
}

// ============================== backward ==============================

template <class T, int KP> __global__ void __launch_bounds__(256) gatedDeltaRuleBackwardKernel(const DeltaParams p) {
  __shared__ float shQ[kWindow][kMaxDim];
  __shared__ float shK[kWindow][kMaxDim];
  __shared__ float shG[kWindow];
  __shared__ float shB[kWindow];
  const Job jb = jobOf(p);
  const int tid = static_cast<int>(threadIdx.x);
  const int nThreads = static_cast<int>(blockDim.x);
  const int64_t KV = p.K * p.V;
  const int K = static_cast<int>(p.K);
  const int L = static_cast<int>(jb.seg.length);

  float dS[KP];
  loadState(dS, p.dFinal != nullptr ? p.dFinal + jb.stateOff : nullptr, p, jb);
  if (L == 0) {  // the whole block, before any barrier
    if (p.dh0 != nullptr) storeState(dS, p.dh0 + jb.stateOff, p, jb);
    return;
  }
  for (int e = tid; e < kWindow * kMaxDim; e += nThreads) {
    shQ[e / kMaxDim][e % kMaxDim] = 0.0f;
    shK[e / kMaxDim][e % kMaxDim] = 0.0f;
  }
  if (tid < kWindow) {
    shG[tid] = 0.0f;
    shB[tid] = 0.0f;
  }
  __syncthreads();

  const T* dO = static_cast<const T*>(p.dO);
  const int64_t rowBase = jb.seg.batch * p.T + jb.seg.start;
  const int nChunks = (L + kChunk - 1) / kChunk;
  for (int c = nChunks - 1; c >= 0; --c) {
    const int cs = c * kChunk;
    const int ce = L < cs + kChunk ? L : cs + kChunk;
    const float* ck = p.checkpoints + ((jb.seg.chunkOffset + c) * p.HV + jb.hv) * KV;
    for (int wEnd = ce; wEnd > cs;) {
      const int wStart = cs + ((wEnd - 1 - cs) / kWindow) * kWindow;
      for (int t = wEnd - 1; t >= wStart; --t) {
        // S_{t-1}, recomputed from the chunk's checkpoint.
        float S[KP];
        loadState(S, ck, p, jb);
        for (int tau = cs; tau < t; ++tau) forwardStep<T, KP>(p, jb, S, rowBase + tau, false);

        const int64_t bt = rowBase + t;
        const int64_t qk = (bt * p.H + jb.hk) * p.K;
        const int64_t gi = bt * p.HV + jb.hv;
        const T* qp = static_cast<const T*>(p.q) + qk;
        const T* kp = static_cast<const T*>(p.k) + qk;
        float qv[KP], kv[KP];
        float kk = 0.0f, qq = 0.0f, qkd = 0.0f, kS = 0.0f, qS = 0.0f, kD = 0.0f, dSS = 0.0f;
#pragma unroll
        for (int m = 0; m < KP; ++m) {
          const int i = jb.sub + p.G * m;
          const bool in = i < K;
          const float kx = in ? loadScalar(kp + i) : 0.0f;
          const float qx = in ? loadScalar(qp + i) : 0.0f;
          kv[m] = kx;
          qv[m] = qx;
          kk = fmaf(kx, kx, kk);
          qq = fmaf(qx, qx, qq);
          qkd = fmaf(qx, kx, qkd);
          kS = fmaf(kx, S[m], kS);
          qS = fmaf(qx, S[m], qS);
          kD = fmaf(kx, dS[m], kD);
          dSS = fmaf(dS[m], S[m], dSS);
        }
        kk = groupSum(kk, p.G);
        qq = groupSum(qq, p.G);
        qkd = groupSum(qkd, p.G);
        kS = groupSum(kS, p.G);
        qS = groupSum(qS, p.G);
        kD = groupSum(kD, p.G);
        dSS = groupSum(dSS, p.G);
        const float rk = p.l2norm ? 1.0f / sqrtf(kk + kL2Eps) : 1.0f;
        const float rq = p.l2norm ? 1.0f / sqrtf(qq + kL2Eps) : 1.0f;
        const float a = fastExp(p.g[gi]);
        const float beta = loadScalar(static_cast<const T*>(p.beta) + gi);
        const float vj = jb.active ? loadScalar(static_cast<const T*>(p.v) + gi * p.V + jb.j) : 0.0f;
        const float dOj = (jb.active && dO != nullptr) ? loadScalar(dO + gi * p.V + jb.j) : 0.0f;
        const float sdO = p.scale * dOj;
        const float u = rk * kS;  // k.S_{t-1}
        const float w = vj - a * u;
        const float sk = rk * (kD + sdO * rq * qkd);  // k.(dS + scale q dO)
        const float dw = beta * sk;
        const float bw = beta * w;
        const int slot = t - wStart;
        if (jb.active && jb.sub == 0) {
          storeScalar(static_cast<T*>(p.dv) + gi * p.V + jb.j, dw);
          atomicAdd(&shB[slot], w * sk);
          atomicAdd(&shG[slot], a * (dSS + sdO * rq * qS - dw * u));
        }
#pragma unroll
        for (int m = 0; m < KP; ++m) {
          const int i = jb.sub + p.G * m;
          const float kn = rk * kv[m];
          const float cur = fmaf(a, S[m], kn * bw);
          const float d = fmaf(sdO * rq, qv[m], dS[m]);
          if (jb.active && i < K) {
            atomicAdd(&shQ[slot][i], sdO * cur);
            atomicAdd(&shK[slot][i], bw * d - a * S[m] * dw);
          }
          dS[m] = a * fmaf(-kn, dw, d);
        }
      }
      // Add the window to the global accumulators and clear it.
      __syncthreads();
      const int n = wEnd - wStart;
      for (int e = tid; e < n * K; e += nThreads) {
        const int s = e / K, i = e - (e / K) * K;
        const int64_t off = ((rowBase + wStart + s) * p.H + jb.hk) * p.K + i;
        atomicAdd(p.dqAcc + off, shQ[s][i]);
        atomicAdd(p.dkAcc + off, shK[s][i]);
        shQ[s][i] = 0.0f;
        shK[s][i] = 0.0f;
      }
      if (tid < n) {
        const int64_t gi = (rowBase + wStart + tid) * p.HV + jb.hv;
        atomicAdd(p.dgAcc + gi, shG[tid]);
        atomicAdd(p.dbetaAcc + gi, shB[tid]);
        shG[tid] = 0.0f;
        shB[tid] = 0.0f;
      }
      __syncthreads();
      wEnd = wStart;
    }
  }
  if (p.dh0 != nullptr) storeState(dS, p.dh0 + jb.stateOff, p, jb);
}

// ============================== launch ==============================

Status checkDims(const std::string& fn, DType dt, int64_t batch, int64_t T, int64_t H, int64_t HV, int64_t K,
                 int64_t V) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16) return bad("unknown dtype");
  if (batch < 0 || T < 0) return bad("negative size");
  if (T > kMaxT) return bad("T above 2^30");
  if (H < 1 || HV < 1 || HV % H != 0) return bad("HV must be a positive multiple of H >= 1");
  if (K < 1 || K > kMaxDim || V < 1 || V > kMaxDim) return bad("K and V must be in 1..256");
  return Status{};
}

Status checkArgs(const GatedDeltaRuleArgs& a, const std::string& fn, std::vector<int64_t>* gaps) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  RK_TRY(checkDims(fn, a.dt, a.batch, a.T, a.H, a.HV, a.K, a.V));
  if (a.chunk != kChunk) return bad("chunk must be gatedDeltaRuleChunk() = " + std::to_string(kChunk));
  RK_TRY(checkSequences(a.segments, a.nseq, a.batch, a.T, a.packed, kChunk, a.totalChunks, fn, gaps));
  if (a.batch * a.T > 0 &&
      (a.q == nullptr || a.k == nullptr || a.v == nullptr || (a.delta && (a.g == nullptr || a.beta == nullptr)))) {
    return bad("null input");
  }
  if (!a.delta && !gatedDeltaRuleChunkedSupports(a.dt))
    return bad("the rules without the delta term: fp16 or bf16 only");
  if (a.perKeyDecay && (!gatedDeltaRuleChunkedSupports(a.dt) || a.K > gatedDeltaRuleChunkedPerKeyMaxK ||
                        (a.batch * a.T > 0 && a.g == nullptr)))
    return bad("a decay per key: fp16 or bf16, K <= " + std::to_string(gatedDeltaRuleChunkedPerKeyMaxK) +
               " and g given");
  return Status{};
}

template <class T> Status launchForward(const std::string& fn, const DeltaParams& p, int64_t heads) {
  return launchColumns(fn, "gatedDeltaRule", p, heads,
                       [](auto kp) { return gatedDeltaRuleForwardKernel<T, decltype(kp)::value>; });
}

template <class T> Status launchBackward(const std::string& fn, const DeltaParams& p, int64_t heads) {
  return launchColumns(fn, "gatedDeltaRule", p, heads,
                       [](auto kp) { return gatedDeltaRuleBackwardKernel<T, decltype(kp)::value>; });
}

// Device copy of the sequence table (packed input) followed by the gap list.
Status uploadTable(const GatedDeltaRuleArgs& a, const std::vector<int64_t>& gaps, DeviceBuffer* buffer,
                   const ScanSegment** segments, const int64_t** gapList) {
  return uploadSequences(a.segments, a.nseq, a.packed, gaps, buffer, segments, gapList);
}

DeltaParams baseParams(const GatedDeltaRuleArgs& a) {
  DeltaParams p;
  delta::setInputs(p, a, a.T, a.h0);
  p.uniformChunks = ceilDiv(a.T, kChunk);
  return p;
}

}  // namespace

int64_t gatedDeltaRuleChunk() { return kChunk; }

Status gatedDeltaRuleForward(const GatedDeltaRuleArgs& a, void* o, float* states, float* finalState) {
  const std::string fn = "gatedDeltaRuleForward";
  std::vector<int64_t> gaps;
  RK_TRY(checkArgs(a, fn, &gaps));
  if (a.batch * a.T > 0 && o == nullptr) return statusError(fn + ": null o");
  if (a.totalChunks > 0 && states == nullptr && a.delta && !a.perKeyDecay) return statusError(fn + ": null states");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    DeltaParams p = baseParams(a);
    p.o = o;
    p.states = states;
    p.finalState = finalState;
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadTable(a, gaps, &table, &p.segments, &gapList));
    // 1: the per-token recurrence, 2: the chunked tensor-core form (gated_delta_rule_chunked.cu).
    const int path = tunable("gatedDeltaRule.forwardPath", gatedDeltaRuleChunkedSupports(a.dt) ? 2 : 1);
    if ((path != 1 || !a.delta || a.perKeyDecay) && (path != 2 || !gatedDeltaRuleChunkedSupports(a.dt))) {
      return statusError(fn + ": unsupported forward path " + std::to_string(path));
    }
    if (a.nseq > 0 && path == 2) RK_TRY(gatedDeltaRuleChunkedForward(a, p.segments, o, states, finalState));
    if (a.nseq > 0 && path == 1) RK_TRY(launchForward<T>(fn, p, a.nseq * a.HV));
    return launchZeroGaps<T>(o, a.HV * a.V, gapList, static_cast<int64_t>(gaps.size() / 2));
  });
}

Status gatedDeltaRuleBackward(const GatedDeltaRuleArgs& a, const GatedDeltaRuleGrads& g) {
  const std::string fn = "gatedDeltaRuleBackward";
  std::vector<int64_t> gaps;
  RK_TRY(checkArgs(a, fn, &gaps));
  const int64_t BT = a.batch * a.T;
  if (BT > 0 && (g.dq == nullptr || g.dk == nullptr || g.dv == nullptr ||
                 (a.delta && (g.dg == nullptr || g.dbeta == nullptr)) || (a.g != nullptr && g.dg == nullptr))) {
    return statusError(fn + ": null gradient output");
  }
  if (a.totalChunks > 0 && g.states == nullptr) return statusError(fn + ": null checkpoints");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    // 1: the per-token recurrence, 2: the chunked tensor-core form (gated_delta_rule_chunked.cu).
    const int path = tunable("gatedDeltaRule.backwardPath", gatedDeltaRuleChunkedSupports(a.dt) ? 2 : 1);
    if ((path != 1 || !a.delta || a.perKeyDecay) && (path != 2 || !gatedDeltaRuleChunkedSupports(a.dt))) {
      return statusError(fn + ": unsupported backward path " + std::to_string(path));
    }
    DeltaParams p = baseParams(a);
    p.checkpoints = g.states;
    p.dO = g.dO;
    p.dFinal = g.dFinal;
    p.dv = g.dv;
    p.dh0 = g.dh0;
    const int64_t qkElems = BT * a.H * a.K, headElems = BT * a.HV;
    const bool f32 = a.dt == DType::F32;
    // fp32 accumulators: dq, dk (taken through the L2 norm and converted at the end), dbeta (in
    // place for fp32 storage; none without the delta term), dg (the output itself, if any).
    // The chunked backward finishes dq, dk itself with one value head per q / k head.
    const bool finished = path == 2 && gatedDeltaRuleChunkedFinishesQK(a);
    const int64_t betaElems = a.delta && !f32 ? headElems : 0;
    DeviceBuffer acc;
    if (BT > 0) {
      const int64_t floats = 2 * qkElems + betaElems;
      RK_TRY(acc.allocate(static_cast<size_t>(floats) * sizeof(float)));
      float* base = static_cast<float*>(acc.get());
      p.dqAcc = base;
      p.dkAcc = base + qkElems;
      p.dbetaAcc = !a.delta ? nullptr : f32 ? static_cast<float*>(g.dbeta) : base + 2 * qkElems;
      p.dgAcc = g.dg;
      const int64_t from = finished ? 2 * qkElems : 0;
      RK_TRY(zeroFloats(base + from, floats - from));
      if (p.dgAcc != nullptr) RK_TRY(zeroFloats(p.dgAcc, headElems * (a.perKeyDecay ? a.K : 1)));
      if (f32 && a.delta) RK_TRY(zeroFloats(p.dbetaAcc, headElems));
    }
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadTable(a, gaps, &table, &p.segments, &gapList));
    if (a.nseq > 0 && path == 2) {
      ChunkedGradAccumulators chunkedAcc;
      chunkedAcc.dq = p.dqAcc, chunkedAcc.dk = p.dkAcc, chunkedAcc.dbeta = p.dbetaAcc;
      RK_TRY(gatedDeltaRuleChunkedBackward(a, p.segments, g, chunkedAcc));
    }
    if (a.nseq > 0 && path == 1) RK_TRY(launchBackward<T>(fn, p, a.nseq * a.HV));
    if (BT > 0 && !finished) {
      const int64_t rows = BT * a.H;
      const int64_t blocks = std::min<int64_t>(ceilDiv(rows, 8), 65535);
      RK_TRY(launch(l2normBackwardKernel<T>, static_cast<unsigned>(blocks), 256, 0, static_cast<const T*>(a.q),
                    static_cast<const float*>(p.dqAcc), static_cast<T*>(g.dq), rows, static_cast<int>(a.K), a.l2norm));
      RK_TRY(launch(l2normBackwardKernel<T>, static_cast<unsigned>(blocks), 256, 0, static_cast<const T*>(a.k),
                    static_cast<const float*>(p.dkAcc), static_cast<T*>(g.dk), rows, static_cast<int>(a.K), a.l2norm));
    }
    if (betaElems > 0) RK_TRY(convert(DType::F32, p.dbetaAcc, a.dt, g.dbeta, headElems));
    const int64_t nGaps = static_cast<int64_t>(gaps.size() / 2);
    RK_TRY(launchZeroGaps<T>(g.dq, a.H * a.K, gapList, nGaps));
    RK_TRY(launchZeroGaps<T>(g.dk, a.H * a.K, gapList, nGaps));
    return launchZeroGaps<T>(g.dv, a.HV * a.V, gapList, nGaps);
  });
}

Status gatedDeltaRuleStep(const GatedDeltaRuleStepArgs& a) {
  const std::string fn = "gatedDeltaRuleStep";
  RK_TRY(checkDims(fn, a.dt, a.batch, a.tokens, a.H, a.HV, a.K, a.V));
  if (a.batch == 0 || a.tokens == 0) return Status{};
  if (a.state == nullptr || a.q == nullptr || a.k == nullptr || a.v == nullptr || a.g == nullptr || a.beta == nullptr ||
      a.o == nullptr) {
    return statusError(fn + ": null tensor");
  }
  DeltaParams p;
  delta::setInputs(p, a, a.tokens, a.state);
  p.o = a.o;
  p.finalState = a.updateState ? a.state : nullptr;
  p.intermediate = a.intermediate;
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launchForward<T>(fn, p, a.batch * a.HV);
  });
}

}  // namespace rkcuda
