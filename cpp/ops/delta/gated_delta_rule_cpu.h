// CPU gated delta rule: forward, backward and the decode step, implementing the contract of
// cuda/common/api.h (GatedDeltaRuleArgs and friends) with the CPU's own checkpoint spacing.
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "cuda/delta/gated_delta_rule.h"

namespace rk::delta {

// Checkpoint spacing (tokens): the forward pass saves the state entering every chunk of this many
// tokens, then (in the same `states` buffer) the delta-rule correction r = v - e S^T k of every token,
// fp32 [batch, T, HV, V]; the backward pass rebuilds one chunk's states at a time from there.
constexpr int64_t kGatedDeltaRuleChunk = 64;

void gatedDeltaRuleForwardCpu(const rkcuda::GatedDeltaRuleArgs& a, void* o, float* states, float* finalState);
void gatedDeltaRuleBackwardCpu(const rkcuda::GatedDeltaRuleArgs& a, const rkcuda::GatedDeltaRuleGrads& g);
void gatedDeltaRuleStepCpu(const rkcuda::GatedDeltaRuleStepArgs& a);

// The same, per instruction-set variant (gated_delta_rule_cpu_{fwd,bwd}.inc compiled once per variant).
#define RK_DELTA_VARIANT_API(NS)                                                                                 \
  namespace NS {                                                                                                 \
  void gatedDeltaRuleForwardCpu(const rkcuda::GatedDeltaRuleArgs& a, void* o, float* states, float* finalState); \
  void gatedDeltaRuleBackwardCpu(const rkcuda::GatedDeltaRuleArgs& a, const rkcuda::GatedDeltaRuleGrads& g);     \
  void gatedDeltaRuleStepCpu(const rkcuda::GatedDeltaRuleStepArgs& a);                                           \
  }
RK_FOR_EACH_ISA(RK_DELTA_VARIANT_API)
#undef RK_DELTA_VARIANT_API

}  // namespace rk::delta
