// The chunked (WY / UT transform) forward and backward passes of the gated delta rule on tensor
// cores, called by the launchers of gated_delta_rule.cu (cuda/delta/gated_delta_rule_chunked.cu). Not part of
// the public contract in common/api.h: gatedDeltaRuleForward and gatedDeltaRuleBackward pick this path or
// the per-token recurrence.
#pragma once
#include "common/api.h"
#include "delta/gated_delta_rule.h"

namespace rkcuda {

// Whether the chunked forward handles a.dt (the 16-bit storage types: their operands feed the
// m16n8k16 tensor-core products directly; fp32 stays on the recurrence, see the .cu header).
bool gatedDeltaRuleChunkedSupports(DType dt);
// The largest K the chunked kernels take with a decay per key (their cumulative decays, 64 x K fp32,
// sit in the preparation's and the gradient kernel's shared memory beside what they stage).
constexpr int64_t gatedDeltaRuleChunkedPerKeyMaxK = 128;

// Same outputs as gatedDeltaRuleForward for the positions inside the sequences: o, the checkpoints
// (every element), finalState (nullable). `a` has been checked by the caller; deviceSegments is
// the device copy of a packed sequence table (null without packing). Positions in no sequence are
// left to the caller.
Status gatedDeltaRuleChunkedForward(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments, void* o,
                                    float* states, float* finalState);

// fp32 accumulators of the backward: dq, dk [batch, T, H, K] receive the gradients with respect to
// the normalised q, k, which the caller takes through the L2 norm, and must be zeroed by the caller;
// except with one value head per q / k head (gatedDeltaRuleChunkedFinishesQK), where the chunked
// backward uses them as scratch and writes g.dq, g.dk itself (at the positions inside the
// sequences). dbeta [batch, T, HV] is written at the positions inside the sequences.
bool gatedDeltaRuleChunkedFinishesQK(const GatedDeltaRuleArgs& a);
struct ChunkedGradAccumulators {
  float* dq = nullptr;
  float* dk = nullptr;
  float* dbeta = nullptr;
};

// The chunked backward: dv and dg (at the positions inside the sequences), dh0 (nullable) as
// gatedDeltaRuleBackward, dq, dk, dbeta into `acc`, from the forward's checkpoints g.states.
Status gatedDeltaRuleChunkedBackward(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments,
                                     const GatedDeltaRuleGrads& g, const ChunkedGradAccumulators& acc);

}  // namespace rkcuda
