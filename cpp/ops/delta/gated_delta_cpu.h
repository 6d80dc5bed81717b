// CPU gated delta rule: forward, backward and the decode step, implementing the contract of
// cuda/common/api.h (GatedDeltaArgs and friends) with the CPU's own checkpoint spacing.
#pragma once
#include <cstdint>

#include "cuda/common/api.h"

namespace rk::delta {

// Checkpoint spacing (tokens): the forward pass saves the state entering every chunk of this many
// tokens; the backward pass recomputes one chunk's states at a time from there.
constexpr int64_t kGatedDeltaChunk = 64;

void gatedDeltaForwardCpu(const rkcuda::GatedDeltaArgs& a, void* o, float* states, float* finalState);
void gatedDeltaBackwardCpu(const rkcuda::GatedDeltaArgs& a, const rkcuda::GatedDeltaGrads& g);
void gatedDeltaStepCpu(const rkcuda::GatedDeltaStepArgs& a);

}  // namespace rk::delta
