// Linear attention (the ONNX LinearAttention family): the interface of cuda/attention/linear_attention.cu,
// the contract between the binding (cpp/ops/attention/linear_attention_binding.cc) and the kernels
// (CPU: cpp/ops/attention/linear_attention_cpu_{fwd,bwd}.inc; CUDA: linear_attention.cu).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"
#include "../delta/gated_delta_rule.h"

namespace rkcuda {

// Per state head hv (Hv of them) and position t of a sequence, with the state S stored K x V
// (S[i][j]), a_t = exp(g_t) (a K-vector: g per key row, or one scalar broadcast over the rows):
//   Sd    = diag(a_t) S_{t-1}                                 (the rules without decay: Sd = S_{t-1})
//   w_t   = beta_t (v_t - Sd^T k_t)   (delta rules)  or  v_t  (linear, gated)
//   S_t   = Sd + k_t w_t^T,            S_{-1} = h0 (nullable: 0)
//   o_t   = scale * S_t^T q_t          for each query head that reads state hv
// Heads: k head of hv = hv / (Hv / Hk) (Hk divides Hv). Queries: when Hq >= Hv (grouped queries,
// Hv divides Hq) state hv serves query heads hv * (Hq / Hv) + g, g < Hq / Hv, and output head = query
// head; when Hq < Hv (Hq divides Hv) state hv reads query head hv / (Hv / Hq) and output head = hv.
// So o has Ho = max(Hq, Hv) heads.
// q dt [batch, T, Hq, K]; k dt [batch, T, Hk, K]; v dt [batch, T, Hv, V]; o dt [batch, T, Ho, V];
// g fp32 [batch, T, Hv] or [batch, T, Hv, K] (perKeyDecay), log-space, null for the rules without
// decay; beta dt [batch, T, Hv], null for the rules without the delta term; h0, finalState fp32
// [nseq, Hv, K, V]. With l2norm q and k rows are first divided by sqrt(sum x^2 + 1e-6).
// Sequences as for the selective scan (ScanSegment); positions in no segment get o = 0 and zero
// gradients.
enum class LinearRule : int32_t { Linear = 0, Gated = 1, Delta = 2, GatedDeltaRule = 3 };
inline bool ruleDecays(LinearRule r) { return r == LinearRule::Gated || r == LinearRule::GatedDeltaRule; }
inline bool ruleCorrects(LinearRule r) { return r == LinearRule::Delta || r == LinearRule::GatedDeltaRule; }

struct LinearAttentionArgs {
  DType dt = DType::F32;
  LinearRule rule = LinearRule::GatedDeltaRule;
  int64_t batch = 0, T = 0, Hq = 0, Hk = 0, Hv = 0, K = 0, V = 0;
  bool perKeyDecay = false, l2norm = false;
  float scale = 1.0f;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;
  int64_t chunk = 0, totalChunks = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;
  // Trailing states (forward only): for each sequence the states after its last `window` tokens,
  // the state after token length - window + j at windowStates + j * windowSlotStride +
  // s * windowSeqStride + hv * K * V (slots for tokens before the sequence's first are zeros).
  int64_t window = 0;
  float* windowStates = nullptr;
  int64_t windowSlotStride = 0, windowSeqStride = 0;

  int64_t outHeads() const { return Hq >= Hv ? Hq : Hv; }
};

// The rules without the delta term ('linear', 'gated') with one decay per head, a key head per query
// head, Hv a multiple of Hq and no state window are the gated delta rule's layout without its delta
// term (GatedDeltaRuleArgs::delta = false), whose kernels write the same checkpoints: the CPU
// launchers send such calls there, and the CUDA launchers for fp16 / bf16 (its chunked kernels). A
// decode step that updates its state in place (finalState == h0) stays on this family's kernels.
// (On CUDA the per-key 'gated' and 'gated_delta' rules in that layout take the chunked kernels too:
// linear_attention.cu's choosePath.)
inline bool inGatedDeltaRuleLayout(const LinearAttentionArgs& a, const float* finalState) {
  return a.Hk == a.Hq && a.Hv % a.Hq == 0 && a.window == 0 && (finalState == nullptr || finalState != a.h0);
}
inline bool onGatedDeltaRuleKernels(const LinearAttentionArgs& a, const float* finalState) {
  return !ruleCorrects(a.rule) && !a.perKeyDecay && inGatedDeltaRuleLayout(a, finalState);
}
inline GatedDeltaRuleArgs gatedDeltaRuleArgsOf(const LinearAttentionArgs& a) {
  GatedDeltaRuleArgs d;
  d.dt = a.dt, d.batch = a.batch, d.T = a.T, d.H = a.Hq, d.HV = a.Hv, d.K = a.K, d.V = a.V;
  d.scale = a.scale, d.l2norm = a.l2norm;
  d.nseq = a.nseq, d.segments = a.segments, d.packed = a.packed, d.chunk = a.chunk, d.totalChunks = a.totalChunks;
  d.delta = ruleCorrects(a.rule);
  d.perKeyDecay = a.perKeyDecay;
  d.q = a.q, d.k = a.k, d.v = a.v, d.g = ruleDecays(a.rule) ? a.g : nullptr, d.beta = d.delta ? a.beta : nullptr;
  d.h0 = a.h0;
  return d;
}

// Checkpoints: the state entering chunk c (of `chunk` positions) of segment s for head hv at
//   states[((chunkOffset + c) * Hv + hv) * K * V + i * V + j],  c < ceil(length / chunk).
struct LinearAttentionGrads {
  const void* dO = nullptr;       // nullable (zeros), dt [batch, T, Ho, V]
  const float* dFinal = nullptr;  // nullable (zeros), [nseq, Hv, K, V]
  const float* states = nullptr;  // the forward pass's checkpoints
  // Outputs, written entirely: dq dt (as q), dk dt (as k; summed over the states a k head serves),
  // dv dt (as v), dg fp32 (as g; null without decay), dbeta dt (as beta; null without the delta
  // term), dh0 fp32 (nullable).
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dg = nullptr;
  void* dbeta = nullptr;
  float* dh0 = nullptr;
};

inline GatedDeltaRuleGrads gatedDeltaRuleGradsOf(const LinearAttentionArgs& a, const LinearAttentionGrads& g) {
  GatedDeltaRuleGrads d;
  d.dO = g.dO, d.dFinal = g.dFinal, d.states = g.states;
  d.dq = g.dq, d.dk = g.dk, d.dv = g.dv, d.dg = ruleDecays(a.rule) ? g.dg : nullptr;
  d.dbeta = ruleCorrects(a.rule) ? g.dbeta : nullptr, d.dh0 = g.dh0;
  return d;
}

// The gate activations (cuda/attention/linear_attention_gates.cu; CPU: linear_attention_cpu.cc), per
// element of [rows, Hv] (or [rows, Hv, K] with perKey):
//   qwen:    g = -exp(aLog[h]) * softplus(decay + dtBias[h (, i)])    (dtBias nullable: 0), else g = decay
//   sigmoid: beta = 1 / (1 + exp(-b)), else beta = b; b is [rows, betaHeads] (betaHeads Hv or 1,
//            broadcast over the heads).
struct LinearGateArgs {
  DType dt = DType::F32;  // of beta
  int64_t rows = 0, Hv = 0, K = 0, betaHeads = 0;
  bool perKey = false, qwen = false, sigmoid = false, dtBiasPerKey = false;
  const float* decay = nullptr;  // null: no decay
  const void* beta = nullptr;    // null: no beta
  const float* aLog = nullptr;
  const float* dtBias = nullptr;
};
// Writes g (fp32, as decay) and beta (dt [rows, Hv]) where their inputs are given.
Status linearAttentionGates(const LinearGateArgs& a, float* g, void* beta);
// From the gradients of the effective g (fp32) and beta (dt [rows, Hv]): those of decay, b (dt
// [rows, betaHeads]), aLog [Hv] and dtBias (null outputs where the input is absent).
Status linearAttentionGatesBackward(const LinearGateArgs& a, const float* dg, const void* dbetaEff, float* dDecay,
                                    void* dBeta, float* daLog, float* dDtBias);

int64_t linearAttentionChunk();
// Writes o (every element), states (nullable: a forward no backward follows), finalState (nullable;
// may be a.h0, a decode step's state updated in place) and a.windowStates (nullable; every slot).
Status linearAttentionForward(const LinearAttentionArgs& a, void* o, float* states, float* finalState);
Status linearAttentionBackward(const LinearAttentionArgs& a, const LinearAttentionGrads& g);

}  // namespace rkcuda
