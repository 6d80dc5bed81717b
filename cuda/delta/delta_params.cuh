// What the recurrent (gated_delta_rule.cu) and chunked (gated_delta_rule_chunked.cu) forms of the gated delta
// rule share: the sizes, inputs and forward outputs of their kernel parameters, and the sequence of
// an unpacked batch row.
#pragma once
#include <cstdint>

#include "common/api.h"
#include "delta/gated_delta_rule.h"

namespace rkcuda {
namespace delta {

constexpr float kL2Eps = 1e-6f;
// Sizes the gated delta rule and the linear-attention family (cuda/attention/linear_attention.cu)
// share: the linear rules with a scalar decay run on the chunked kernels from linear attention's
// launchers, so the checkpoint spacing must be one.
constexpr int kChunk = 64;    // checkpoint spacing (gatedDeltaRuleChunk, linearAttentionChunk)
constexpr int kMaxDim = 256;  // K and V
constexpr int64_t kMaxT = int64_t{1} << 30;

struct DeltaInputs {
  int64_t T = 0, H = 0, HV = 0, K = 0, V = 0;
  int64_t group = 1;          // HV / H
  int64_t uniformChunks = 0;  // chunks per sequence without packing
  float scale = 1.0f;
  bool l2norm = false;
  const ScanSegment* segments = nullptr;  // device table (packed); null: sequence s = row s, whole
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;
  void* o = nullptr;
  float* states = nullptr;
  float* finalState = nullptr;
};

// Sizes and inputs of `a` (T positions, initial state h0); uniformChunks is left to the caller.
template <class A> inline void setInputs(DeltaInputs& p, const A& a, int64_t T, const float* h0) {
  p.T = T, p.H = a.H, p.HV = a.HV, p.K = a.K, p.V = a.V;
  p.group = a.HV / a.H;
  p.scale = a.scale;
  p.l2norm = a.l2norm;
  p.q = a.q, p.k = a.k, p.v = a.v, p.g = a.g, p.beta = a.beta, p.h0 = h0;
}

// Sequence seq without packing: batch row seq, whole.
__host__ __device__ __forceinline__ ScanSegment uniformSegment(const DeltaInputs& p, int64_t seq) {
  ScanSegment s;
  s.batch = seq;
  s.start = 0;
  s.length = p.T;
  s.chunkOffset = seq * p.uniformChunks;
  return s;
}

}  // namespace delta
}  // namespace rkcuda
