// CPU selective scan (Mamba-1): forward, backward and the decode step, implementing the contract of
// cuda/common/api.h (SelectiveScanArgs and friends) with the CPU's own checkpoint spacing.
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "cuda/scan/selective_scan.h"

namespace rk::scan {

// Checkpoint spacing (steps) of the CPU kernels: the forward pass saves the state entering every
// chunk of this many steps, and the backward pass recomputes one chunk at a time from there.
constexpr int64_t kSelectiveChunk = 64;

void selectiveScanForwardCpu(const rkcuda::SelectiveScanArgs& a, void* y, float* states, float* finalState);
void selectiveScanBackwardCpu(const rkcuda::SelectiveScanArgs& a, const rkcuda::SelectiveScanGrads& g);
void selectiveStateUpdateCpu(const rkcuda::SelectiveStateUpdateArgs& a);

// The same, per instruction-set variant (selective_scan_cpu.inc compiled once per variant).
#define RK_SCAN_VARIANT_API(NS)                                                                                \
  namespace NS {                                                                                               \
  void selectiveScanForwardCpu(const rkcuda::SelectiveScanArgs& a, void* y, float* states, float* finalState); \
  void selectiveScanBackwardCpu(const rkcuda::SelectiveScanArgs& a, const rkcuda::SelectiveScanGrads& g);      \
  void selectiveStateUpdateCpu(const rkcuda::SelectiveStateUpdateArgs& a);                                     \
  }
RK_FOR_EACH_ISA(RK_SCAN_VARIANT_API)
#undef RK_SCAN_VARIANT_API

}  // namespace rk::scan
