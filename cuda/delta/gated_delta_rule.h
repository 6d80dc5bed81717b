// Gated delta rule: the interface of cuda/delta/gated_delta_rule.cu and gated_delta_rule_chunked.cu.
// The contract between cpp/ (the CPU kernels and the binding) and cuda/ (the CUDA launchers).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// ---- gated delta rule, Gated DeltaNet (cuda/delta/gated_delta_rule.cu) ----
// Per value head hv (q / k head h = hv / (HV / H)) and position t of a sequence, with the state S
// stored K x V (S[i][j]):
//   q_t, k_t = q[t, h], k[t, h]; with l2norm each is first divided by sqrt(sum_i x_i^2 + 1e-6)
//   S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   S_{-1} = h0 (nullable: 0)
//   o_t = scale * S_t^T q_t
// q, k: dtype dt [batch, T, H, K]; v, o: dt [batch, T, HV, V]; g: fp32 [batch, T, HV] (log-space
// decay); beta: dt [batch, T, HV]; h0 and finalState: fp32 [nseq, HV, K, V].
// Sequences as for the selective scan (ScanSegment: row `batch`, positions [start, start+length));
// positions in no segment get o = 0 and zero gradients.
// Checkpoints: the state entering chunk c (of `chunk` positions) of segment s for head hv at
//   states[((chunkOffset + c) * HV + hv) * K * V + i * V + j],  c < ceil(length / chunk).
// Without the delta term (delta = false: linear attention's 'gated' and 'linear' rules with a
// scalar decay, cuda/attention/linear_attention.cu) the update is S_t = exp(g_t) S_{t-1} + k_t v_t^T:
// beta is not read (nullable) and dbeta not written (nullable); g is nullable (no decay: g = 0), and
// so is dg then. Only the chunked kernels (fp16 / bf16) take it.
// With a decay per key row (perKeyDecay: linear attention's per-key 'gated' and 'gated_delta' rules,
// GLA and KDA) g is fp32 [batch, T, HV, K] and exp(g_t) above is diag(exp(g_t)) applied to the rows
// of S (the delta term reads diag(exp(g_t)) S_{t-1} as well), and dg is fp32 [batch, T, HV, K]. Only
// the chunked kernels (fp16 / bf16, K <= gatedDeltaRuleChunkedPerKeyMaxK) take it.
struct GatedDeltaRuleArgs {
  DType dt = DType::F32;
  int64_t batch = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
  float scale = 1.0f;
  bool l2norm = false;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;
  int64_t chunk = 0;  // must equal gatedDeltaRuleChunk() for the CUDA calls
  int64_t totalChunks = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;  // nullable
  bool delta = true;
  bool perKeyDecay = false;
};
int64_t gatedDeltaRuleChunk();
// Writes o (every element), states (every element; nullable without the delta term: a forward no
// backward follows), finalState (nullable).
Status gatedDeltaRuleForward(const GatedDeltaRuleArgs& a, void* o, float* states, float* finalState);
struct GatedDeltaRuleGrads {
  const void* dO = nullptr;       // nullable (zeros), dt [batch, T, HV, V]
  const float* dFinal = nullptr;  // nullable (zeros), [nseq, HV, K, V]
  const float* states = nullptr;  // the forward pass's checkpoints
  // Outputs, written entirely: dq, dk dt [batch, T, H, K] (summed over the value heads of a q/k
  // head); dv dt [batch, T, HV, V]; dg fp32 [batch, T, HV]; dbeta dt [batch, T, HV]; dh0 nullable.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dg = nullptr;
  void* dbeta = nullptr;
  float* dh0 = nullptr;
};
Status gatedDeltaRuleBackward(const GatedDeltaRuleArgs& a, const GatedDeltaRuleGrads& g);
// Decode: `tokens` steps of the recurrence from state (fp32 [batch, HV, K, V]), which is overwritten
// with the state after the last token when updateState. q, k dt [batch, tokens, H, K]; v, o dt
// [batch, tokens, HV, V]; g fp32 and beta dt [batch, tokens, HV]. intermediate (nullable): the
// state after every token, fp32 [batch, tokens, HV, K, V].
struct GatedDeltaRuleStepArgs {
  DType dt = DType::F32;
  int64_t batch = 0, tokens = 1, H = 0, HV = 0, K = 0, V = 0;
  float scale = 1.0f;
  bool l2norm = false, updateState = true;
  float* state = nullptr;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  void* o = nullptr;
  float* intermediate = nullptr;
};
Status gatedDeltaRuleStep(const GatedDeltaRuleStepArgs& a);

}  // namespace rkcuda
