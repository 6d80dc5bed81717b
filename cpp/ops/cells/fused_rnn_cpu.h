// CPU fused recurrent cells (LSTM, GRU, sLSTM, Elman with block-diagonal recurrent weights):
// forward and backward, implementing the contract of cuda/common/api.h (FusedRnnArgs and friends),
// saved states and pre-activations included, so either device's backward can follow either forward.
#pragma once
#include "common/isa.h"
#include "cuda/cells/fused_rnn.h"

namespace rk::cells {

void fusedRnnForwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o);
void fusedRnnBackwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g);

// The same, per instruction-set variant and storage type (fused_rnn_cpu_fwd.inc and _bwd.inc compiled
// once per variant for fp32 and once for the 16-bit types).
#define RK_CELLS_VARIANT_API(NS)                                                                                  \
  namespace NS {                                                                                                  \
  template <typename St> void fusedRnnForwardAs(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o); \
  template <typename St> void fusedRnnBackwardAs(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g);  \
  }
RK_FOR_EACH_ISA(RK_CELLS_VARIANT_API)
#undef RK_CELLS_VARIANT_API

}  // namespace rk::cells
