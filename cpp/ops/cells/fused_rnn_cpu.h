// CPU fused recurrent cells (LSTM, GRU, sLSTM, Elman with block-diagonal recurrent weights):
// forward and backward, implementing the contract of cuda/common/api.h (FusedRnnArgs and friends),
// saved states and pre-activations included, so either device's backward can follow either forward.
#pragma once
#include "cuda/common/api.h"

namespace rk::cells {

void fusedRnnForwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o);
void fusedRnnBackwardCpu(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g);

}  // namespace rk::cells
