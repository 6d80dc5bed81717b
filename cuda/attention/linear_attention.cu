// Linear attention, recurrent form (cuda/attention/linear_attention.h): forward (with the trailing
// state window, and the decode step through it) and backward (recomputing from checkpoints), every
// rule, one decay per head or per key row, grouped queries both ways, for F32/F16/BF16 storage with
// fp32 state and arithmetic.
//
// Work split (as the gated delta rule's recurrent kernels, cuda/delta/gated_delta_rule.cu). Given the
// inputs, column j of the K x V state evolves on its own:
//   Sd[:, j] = a_t .* S_{t-1}[:, j];  w_t[j] = beta_t (v_t[j] - k_t . Sd[:, j])  (delta rules; else v_t[j])
//   S_t[:, j] = Sd[:, j] + k_t w_t[j];  o_t[j] = scale q_t . S_t[:, j]  (per query head of the state)
// so a block takes one (sequence, state head) and a slice of its columns, and walks the positions.
// Each column is owned by a group of G lanes (a power of two up to 32): lane r of the group holds the
// rows i = r + G*m (m < KP) of that column in registers, with their decays a_i (one exp per row
// with a per-key decay, one per position otherwise). Per position one group reduction gives k.Sd
// and |k|^2 (the L2 norm, when on), and one per query head gives q.S_t and |q|^2. Decays are applied
// one position at a time (no cumulative sums, no divisions), so g = 0 and g = -1e4 stay exact.
//
// Checkpoints: every kChunk positions the forward pass stores the state entering that chunk.
//
// Backward. Per column the adjoint dS (of S_t) runs backwards:
//   dS += scale qn_g dO_g[j] (each query head g);  dqn_g += scale S_t dO_g[j]
//   dw = kn . dS;  dkn += dS w[j]
//   delta rules: dv[j] = beta dw, dbeta += dw (v[j] - u), du = -beta dw, dS += kn du, dkn += Sd du
//   otherwise:   dv[j] = dw
//   decay:       dg_i += dS_i Sd_i (summed over the rows for a scalar decay);  dS = a .* dS
// with qn, kn the (normalised) rows. For every position the block recomputes S_{t-1} from the chunk's
// checkpoint (no scratch memory; about kChunk / 2 times the forward's work). dq, dk, dg and dbeta sum
// over the columns (and the states that share a query or key head): they are added with global
// atomics to zeroed fp32 buffers; a last kernel takes dq and dk through the L2 norm (when on) and to
// the storage type, and dbeta is converted (fp32 storage: accumulated in place).
//
// This is the reference-quality path of the family (decode, short sequences, every rule and layout);
// the Gated DeltaNet layout with a scalar decay has the chunked tensor-core kernels of the gated
// delta rule (lib/ops/linearAttention.ts sends the delta rules there; the launchers below send the
// 'linear' and 'gated' rules of that layout there for fp16 / bf16, and its per-key 'gated' and
// 'gated_delta' rules, see choosePath).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "attention/linear_attention.h"
#include "common/api.h"
#include "common/check.cuh"
#include "common/columns.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/rows.cuh"
#include "delta/delta_params.cuh"
#include "delta/gated_delta_rule.h"
#include "delta/gated_delta_rule_chunked.h"

namespace rkcuda {
namespace {

using delta::kChunk;  // checkpoint spacing (linearAttentionChunk), the gated delta rule's
using delta::kMaxDim;
using delta::kMaxT;

// The kernels' parameters: the contract's arguments plus the launch layout (ColumnParams), the
// device sequence table and the outputs.
struct AttnParams : LinearAttentionArgs, ColumnParams {
  const ScanSegment* table = nullptr;  // device table (packed); null: sequence s = row s, whole
  int64_t uniformChunks = 0;
  int64_t Ho = 1;  // output heads, max(Hq, Hv)
  bool decays = false, corrects = false;
  void* o = nullptr;
  float* states = nullptr;
  float* finalState = nullptr;

  __host__ __device__ int64_t queriesPerState() const { return Hq >= Hv ? Hq / Hv : 1; }
  // Query head and output head of query g of state hv.
  __host__ __device__ int64_t queryHead(int64_t hv, int64_t g) const {
    return Hq >= Hv ? hv * (Hq / Hv) + g : hv / (Hv / Hq);
  }
  __host__ __device__ int64_t outputHead(int64_t hv, int64_t g) const { return Hq >= Hv ? hv * (Hq / Hv) + g : hv; }
};

// What a thread works on (over the state heads; hk: the key head).
using Job = ColumnJob;

__device__ __forceinline__ Job jobOf(const AttnParams& p) {
  Job jb;
  placeColumnJob(jb, p, p.Hv, [&](Job& j) {
    j.hk = j.hv / (p.Hv / p.Hk);
    if (p.table != nullptr) {
      j.seg = p.table[j.seq];
    } else {
      j.seg.batch = j.seq;
      j.seg.start = 0;
      j.seg.length = p.T;
      j.seg.chunkOffset = j.seq * p.uniformChunks;
    }
  });
  return jb;
}

// One position's inputs of this thread's rows: the (normalised) key kn, the decays a, and
// u = kn . (a .* S_{t-1}) (group-reduced), v[j], beta, w[j].
template <int KP> struct Token {
  float kn[KP], a[KP];
  float u = 0.0f, v = 0.0f, beta = 1.0f, w = 0.0f;
};

template <class T, int KP>
__device__ __forceinline__ void loadToken(const AttnParams& p, const Job& jb, const float (&S)[KP], int64_t bt,
                                          Token<KP>& tk) {
  const T* kp = static_cast<const T*>(p.k) + (bt * p.Hk + jb.hk) * p.K;
  const int64_t gi = bt * p.Hv + jb.hv;
  const float aHead = p.decays && !p.perKeyDecay ? fastExp(p.g[gi]) : 1.0f;
  float kk = 0.0f, kS = 0.0f;
#pragma unroll
  for (int m = 0; m < KP; ++m) {
    const int i = jb.sub + p.G * m;
    const bool in = i < p.K;
    const float kx = in ? loadScalar(kp + i) : 0.0f;
    const float a = p.decays && p.perKeyDecay ? (in ? fastExp(p.g[gi * p.K + i]) : 1.0f) : aHead;
    tk.kn[m] = kx;
    tk.a[m] = a;
    kk = fmaf(kx, kx, kk);
    kS = fmaf(kx, a * S[m], kS);
  }
  kk = groupSum(kk, p.G);
  kS = groupSum(kS, p.G);
  const float rk = p.l2norm ? 1.0f / sqrtf(kk + kRowsL2Eps) : 1.0f;
#pragma unroll
  for (int m = 0; m < KP; ++m) tk.kn[m] *= rk;
  tk.u = rk * kS;
  tk.v = jb.active ? loadScalar(static_cast<const T*>(p.v) + gi * p.V + jb.j) : 0.0f;
  tk.beta = p.corrects ? loadScalar(static_cast<const T*>(p.beta) + gi) : 1.0f;
  tk.w = p.corrects ? tk.beta * (tk.v - tk.u) : tk.v;
}

// S_{t-1} -> S_t for one position.
template <class T, int KP>
__device__ __forceinline__ void step(const AttnParams& p, const Job& jb, float (&S)[KP], int64_t bt) {
  Token<KP> tk;
  loadToken<T, KP>(p, jb, S, bt, tk);
#pragma unroll
  for (int m = 0; m < KP; ++m) S[m] = fmaf(tk.a[m], S[m], tk.kn[m] * tk.w);
}

// The normalised query row (this thread's rows) of query head hq at bt, and its inverse norm.
template <class T, int KP>
__device__ __forceinline__ void loadQuery(const AttnParams& p, const Job& jb, int64_t bt, int64_t hq, float (&qn)[KP]) {
  const T* qp = static_cast<const T*>(p.q) + (bt * p.Hq + hq) * p.K;
  float qq = 0.0f;
#pragma unroll
  for (int m = 0; m < KP; ++m) {
    const int i = jb.sub + p.G * m;
    qn[m] = i < p.K ? loadScalar(qp + i) : 0.0f;
    qq = fmaf(qn[m], qn[m], qq);
  }
  if (!p.l2norm) return;
  const float rq = 1.0f / sqrtf(groupSum(qq, p.G) + kRowsL2Eps);
#pragma unroll
  for (int m = 0; m < KP; ++m) qn[m] *= rq;
}

// ============================== forward / decode ==============================

template <class T, int KP> __global__ void __launch_bounds__(256) linearAttentionForwardKernel(const AttnParams p) {
  const Job jb = jobOf(p);
  const int64_t KV = p.K * p.V;
  float S[KP];
  loadState(S, p.h0 != nullptr ? p.h0 + jb.stateOff : nullptr, p, jb);
  const int64_t L = jb.seg.length;
  const int64_t nq = p.queriesPerState();
  for (int64_t t = 0; t < L; ++t) {
    if (p.states != nullptr && t % kChunk == 0)
      storeState(S, p.states + ((jb.seg.chunkOffset + t / kChunk) * p.Hv + jb.hv) * KV, p, jb);
    const int64_t bt = jb.seg.batch * p.T + jb.seg.start + t;
    step<T, KP>(p, jb, S, bt);
    for (int64_t g = 0; g < nq; ++g) {
      float qn[KP];
      loadQuery<T, KP>(p, jb, bt, p.queryHead(jb.hv, g), qn);
      float qS = 0.0f;
#pragma unroll
      for (int m = 0; m < KP; ++m) qS = fmaf(qn[m], S[m], qS);
      qS = groupSum(qS, p.G);
      if (jb.active && jb.sub == 0)
        storeScalar(static_cast<T*>(p.o) + (bt * p.Ho + p.outputHead(jb.hv, g)) * p.V + jb.j, p.scale * qS);
    }
    const int64_t slot = t - (L - p.window);
    if (p.windowStates != nullptr && slot >= 0)
      storeState(S, p.windowStates + slot * p.windowSlotStride + jb.seq * p.windowSeqStride + jb.hv * KV, p, jb);
  }
  if (p.finalState != nullptr) storeState(S, p.finalState + jb.stateOff, p, jb);
}

// ============================== backward ==============================

template <class T, int KP> __global__ void __launch_bounds__(256) linearAttentionBackwardKernel(const AttnParams p) {
  const Job jb = jobOf(p);
  const int64_t KV = p.K * p.V;
  const int K = static_cast<int>(p.K);
  const int64_t L = jb.seg.length;
  const int64_t nq = p.queriesPerState();
  const T* dO = static_cast<const T*>(p.dO);
  float dS[KP];
  loadState(dS, p.dFinal != nullptr ? p.dFinal + jb.stateOff : nullptr, p, jb);
  const int64_t rowBase = jb.seg.batch * p.T + jb.seg.start;
  const int64_t nChunks = (L + kChunk - 1) / kChunk;
  for (int64_t c = nChunks - 1; c >= 0; --c) {
    const int64_t cs = c * kChunk;
    const int64_t ce = L < cs + kChunk ? L : cs + kChunk;
    const float* ck = p.checkpoints + ((jb.seg.chunkOffset + c) * p.Hv + jb.hv) * KV;
    for (int64_t t = ce - 1; t >= cs; --t) {
      // S_{t-1}, recomputed from the chunk's checkpoint.
      float S[KP];
      loadState(S, ck, p, jb);
      for (int64_t tau = cs; tau < t; ++tau) step<T, KP>(p, jb, S, rowBase + tau);
      const int64_t bt = rowBase + t;
      const int64_t gi = bt * p.Hv + jb.hv;
      Token<KP> tk;
      loadToken<T, KP>(p, jb, S, bt, tk);
      float Sd[KP], St[KP], dkn[KP];
#pragma unroll
      for (int m = 0; m < KP; ++m) {
        Sd[m] = tk.a[m] * S[m];
        St[m] = fmaf(tk.kn[m], tk.w, Sd[m]);
        dkn[m] = 0.0f;
      }
      // The outputs' terms.
      for (int64_t g = 0; g < nq; ++g) {
        const int64_t hq = p.queryHead(jb.hv, g);
        float qn[KP];
        loadQuery<T, KP>(p, jb, bt, hq, qn);
        const float sdO = (jb.active && dO != nullptr)
                              ? p.scale * loadScalar(dO + (bt * p.Ho + p.outputHead(jb.hv, g)) * p.V + jb.j)
                              : 0.0f;
#pragma unroll
        for (int m = 0; m < KP; ++m) {
          const int i = jb.sub + p.G * m;
          dS[m] = fmaf(qn[m], sdO, dS[m]);
          if (jb.active && i < K && sdO != 0.0f) atomicAdd(p.dqAcc + (bt * p.Hq + hq) * p.K + i, St[m] * sdO);
        }
      }
      float dw = 0.0f;
#pragma unroll
      for (int m = 0; m < KP; ++m) {
        dw = fmaf(tk.kn[m], dS[m], dw);
        dkn[m] = dS[m] * tk.w;
      }
      dw = groupSum(dw, p.G);
      float du = 0.0f;
      if (p.corrects) {
        du = -tk.beta * dw;
        if (jb.active && jb.sub == 0) {
          storeScalar(static_cast<T*>(p.dv) + gi * p.V + jb.j, tk.beta * dw);
          atomicAdd(p.dbetaAcc + gi, dw * (tk.v - tk.u));
        }
#pragma unroll
        for (int m = 0; m < KP; ++m) {
          dS[m] = fmaf(tk.kn[m], du, dS[m]);
          dkn[m] = fmaf(Sd[m], du, dkn[m]);
        }
      } else if (jb.active && jb.sub == 0) {
        storeScalar(static_cast<T*>(p.dv) + gi * p.V + jb.j, dw);
      }
      float dgHead = 0.0f;
#pragma unroll
      for (int m = 0; m < KP; ++m) {
        const int i = jb.sub + p.G * m;
        const bool mine = jb.active && i < K;
        if (p.decays) {
          const float dgi = dS[m] * Sd[m];
          if (p.perKeyDecay) {
            if (mine) atomicAdd(p.dgAcc + gi * p.K + i, dgi);
          } else {
            dgHead += mine ? dgi : 0.0f;
          }
        }
        if (mine) atomicAdd(p.dkAcc + (bt * p.Hk + jb.hk) * p.K + i, dkn[m]);
        dS[m] *= tk.a[m];
      }
      if (p.decays && !p.perKeyDecay) {
        dgHead = groupSum(dgHead, p.G);
        if (jb.active && jb.sub == 0) atomicAdd(p.dgAcc + gi, dgHead);
      }
    }
  }
  if (p.dh0 != nullptr) storeState(dS, p.dh0 + jb.stateOff, p, jb);
}

// ============================== launch ==============================

Status checkArgs(const LinearAttentionArgs& a, const std::string& fn, std::vector<int64_t>* gaps) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.batch < 0 || a.T < 0) return bad("negative size");
  if (a.T > kMaxT) return bad("T above 2^30");
  if (a.Hq < 1 || a.Hk < 1 || a.Hv < 1 || a.Hv % a.Hk != 0 || (a.Hq >= a.Hv ? a.Hq % a.Hv : a.Hv % a.Hq) != 0)
    return bad("Hk must divide Hv, and Hq divide or be a multiple of Hv");
  if (a.K < 1 || a.K > kMaxDim || a.V < 1 || a.V > kMaxDim) return bad("K and V must be in 1..256");
  if (static_cast<int>(a.rule) < 0 || static_cast<int>(a.rule) > 3) return bad("unknown rule");
  if (a.window < 0 || a.window > 8) return bad("window must be 0-8");
  if (a.chunk != kChunk) return bad("chunk must be linearAttentionChunk() = " + std::to_string(kChunk));
  RK_TRY(checkSequences(a.segments, a.nseq, a.batch, a.T, a.packed, kChunk, a.totalChunks, fn, gaps));
  if (a.batch * a.T > 0) {
    if (a.q == nullptr || a.k == nullptr || a.v == nullptr) return bad("null input");
    if (ruleDecays(a.rule) && a.g == nullptr) return bad("null decay");
    if (ruleCorrects(a.rule) && a.beta == nullptr) return bad("null beta");
  }
  return Status{};
}

AttnParams paramsOf(const LinearAttentionArgs& a) {
  AttnParams p;
  static_cast<LinearAttentionArgs&>(p) = a;
  p.segments = nullptr;  // host memory: the kernels read `table`
  p.uniformChunks = ceilDiv(a.T, kChunk);
  p.Ho = a.outHeads();
  p.decays = ruleDecays(a.rule);
  p.corrects = ruleCorrects(a.rule);
  return p;
}

// The gated delta rule's layout without its delta term (onGatedDeltaRuleKernels) runs for fp16 / bf16
// on its chunked tensor-core kernels (delta = false, cuda/delta/gated_delta_rule_chunked.cu). So does
// that layout's rules with a decay per key ('gated' and 'gated_delta': GLA, KDA) for
// K <= gatedDeltaRuleChunkedPerKeyMaxK. Tunable as linearAttention.path: 1 per token, 2 chunked (where it applies).
Status choosePath(const LinearAttentionArgs& a, const float* finalState, const std::string& fn, bool* chunked) {
  const bool perKey = a.perKeyDecay && ruleDecays(a.rule) && a.K <= gatedDeltaRuleChunkedPerKeyMaxK &&
                      inGatedDeltaRuleLayout(a, finalState);
  const bool fits = (onGatedDeltaRuleKernels(a, finalState) || perKey) && gatedDeltaRuleChunkedSupports(a.dt);
  const int path = tunable("linearAttention.path", fits ? 2 : 1);
  if (path != 1 && (path != 2 || !fits)) return statusError(fn + ": unsupported path " + std::to_string(path));
  *chunked = path == 2;
  return Status{};
}

template <class T> Status launchForward(const std::string& fn, const AttnParams& p) {
  return launchColumns(fn, "linearAttention", p, p.nseq * p.Hv,
                       [](auto kp) { return linearAttentionForwardKernel<T, decltype(kp)::value>; });
}

template <class T> Status launchBackward(const std::string& fn, const AttnParams& p) {
  return launchColumns(fn, "linearAttention", p, p.nseq * p.Hv,
                       [](auto kp) { return linearAttentionBackwardKernel<T, decltype(kp)::value>; });
}

}  // namespace

int64_t linearAttentionChunk() { return kChunk; }

Status linearAttentionForward(const LinearAttentionArgs& a, void* o, float* states, float* finalState) {
  const std::string fn = "linearAttentionForward";
  std::vector<int64_t> gaps;
  RK_TRY(checkArgs(a, fn, &gaps));
  if (a.batch * a.T > 0 && o == nullptr) return statusError(fn + ": null o");
  if (a.window > 0 && a.windowStates == nullptr) return statusError(fn + ": null windowStates");
  bool chunked = false;
  RK_TRY(choosePath(a, finalState, fn, &chunked));
  if (chunked) return gatedDeltaRuleForward(gatedDeltaRuleArgsOf(a), o, states, finalState);
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    AttnParams p = paramsOf(a);
    p.o = o;
    p.states = states;
    p.finalState = finalState;
    // Window slots before a sequence's first position stay zero.
    if (a.window > 0 && a.nseq > 0) {
      const int64_t span = (a.window - 1) * a.windowSlotStride + (a.nseq - 1) * a.windowSeqStride + a.Hv * a.K * a.V;
      RK_TRY(zeroFloats(a.windowStates, span));
    }
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadSequences(a.segments, a.nseq, a.packed, gaps, &table, &p.table, &gapList));
    if (a.nseq > 0) RK_TRY(launchForward<T>(fn, p));
    return launchZeroGaps<T>(o, a.outHeads() * a.V, gapList, static_cast<int64_t>(gaps.size() / 2));
  });
}

Status linearAttentionBackward(const LinearAttentionArgs& a, const LinearAttentionGrads& g) {
  const std::string fn = "linearAttentionBackward";
  std::vector<int64_t> gaps;
  RK_TRY(checkArgs(a, fn, &gaps));
  const int64_t BT = a.batch * a.T;
  if (BT > 0 && (g.dq == nullptr || g.dk == nullptr || g.dv == nullptr))
    return statusError(fn + ": null gradient output");
  if (BT > 0 && ruleDecays(a.rule) && g.dg == nullptr) return statusError(fn + ": null gradient of decay");
  if (BT > 0 && ruleCorrects(a.rule) && g.dbeta == nullptr) return statusError(fn + ": null gradient of beta");
  if (a.totalChunks > 0 && g.states == nullptr) return statusError(fn + ": null checkpoints");
  bool chunked = false;
  RK_TRY(choosePath(a, nullptr, fn, &chunked));
  if (chunked) return gatedDeltaRuleBackward(gatedDeltaRuleArgsOf(a), gatedDeltaRuleGradsOf(a, g));
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    AttnParams p = paramsOf(a);
    p.checkpoints = g.states;
    p.dO = g.dO;
    p.dFinal = g.dFinal;
    p.dv = g.dv;
    p.dh0 = g.dh0;
    const int64_t qElems = BT * a.Hq * a.K, kElems = BT * a.Hk * a.K, headElems = BT * a.Hv;
    const int64_t gElems = ruleDecays(a.rule) ? headElems * (a.perKeyDecay ? a.K : 1) : 0;
    const bool betaInPlace = a.dt == DType::F32;
    const int64_t betaAcc = ruleCorrects(a.rule) && !betaInPlace ? headElems : 0;
    DeviceBuffer acc;
    if (BT > 0) {
      const int64_t floats = qElems + kElems + betaAcc;
      RK_TRY(acc.allocate(static_cast<size_t>(floats) * sizeof(float)));
      float* base = static_cast<float*>(acc.get());
      p.dqAcc = base;
      p.dkAcc = base + qElems;
      p.dbetaAcc =
          ruleCorrects(a.rule) ? (betaInPlace ? static_cast<float*>(g.dbeta) : base + qElems + kElems) : nullptr;
      p.dgAcc = g.dg;
      RK_TRY(zeroFloats(base, floats));
      RK_TRY(zeroFloats(p.dgAcc, gElems));
      if (ruleCorrects(a.rule) && betaInPlace) RK_TRY(zeroFloats(p.dbetaAcc, headElems));
    }
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadSequences(a.segments, a.nseq, a.packed, gaps, &table, &p.table, &gapList));
    if (a.nseq > 0) RK_TRY(launchBackward<T>(fn, p));
    if (BT > 0) {
      for (const auto& [x, dy, dx, heads] :
           {std::make_tuple(a.q, p.dqAcc, g.dq, a.Hq), std::make_tuple(a.k, p.dkAcc, g.dk, a.Hk)}) {
        const int64_t rows = BT * heads;
        const int64_t blocks = std::min<int64_t>(ceilDiv(rows, 8), 65535);
        RK_TRY(launch(l2normBackwardKernel<T>, static_cast<unsigned>(blocks), 256, 0, static_cast<const T*>(x),
                      static_cast<const float*>(dy), static_cast<T*>(dx), rows, static_cast<int>(a.K), a.l2norm));
      }
      if (betaAcc > 0) RK_TRY(convert(DType::F32, p.dbetaAcc, a.dt, g.dbeta, headElems));
    }
    // Positions in no sequence: zero gradients, whatever their inputs (a non-finite q or k row there
    // would otherwise reach dq, dk through the L2 normalisation's backward).
    const int64_t nGaps = static_cast<int64_t>(gaps.size() / 2);
    RK_TRY(launchZeroGaps<T>(g.dq, a.Hq * a.K, gapList, nGaps));
    RK_TRY(launchZeroGaps<T>(g.dk, a.Hk * a.K, gapList, nGaps));
    return launchZeroGaps<T>(g.dv, a.Hv * a.V, gapList, nGaps);
  });
}

}  // namespace rkcuda
