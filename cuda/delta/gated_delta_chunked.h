// The chunked (WY / UT transform) forward pass of the gated delta rule on tensor cores, called by
// the launchers of gated_delta.cu (cuda/delta/gated_delta_chunked.cu). Not part of the public
// contract in common/api.h: gatedDeltaForward picks this path or the per-token recurrence.
#pragma once
#include "common/api.h"

namespace rkcuda {

// Whether the chunked forward handles a.dt (the 16-bit storage types: their operands feed the
// m16n8k16 tensor-core products directly; fp32 stays on the recurrence, see the .cu header).
bool gatedDeltaChunkedSupports(DType dt);

// Same outputs as gatedDeltaForward for the positions inside the sequences: o, the checkpoints
// (every element), finalState (nullable). `a` has been checked by the caller; deviceSegments is
// the device copy of a packed sequence table (null without packing). Positions in no sequence are
// left to the caller.
Status gatedDeltaChunkedForward(const GatedDeltaArgs& a, const ScanSegment* deviceSegments, void* o,
                                float* states, float* finalState);

}  // namespace rkcuda
