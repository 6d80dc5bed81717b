// Causal depthwise 1-D convolution with carry state (ONNX CausalConvWithState, mamba's causal_conv1d):
// the interface of cuda/conv/causal_conv1d.cu, the contract between the binding
// (cpp/ops/conv/causal_conv1d_binding.cc) and the kernels (CPU: cpp/ops/conv/causal_conv1d_cpu.inc).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// Per channel c and position t of a sequence, with L = (W - 1) * dilation state positions before
// the sequence (the carry state, oldest first; zeros when h0 is null) and xx the state followed by x:
//   pre_t = bias[c] + sum_{j < W} weight[c][j] * xx[c][t - (W - 1 - j) * dilation]
//   y_t   = silu ? pre_t * sigmoid(pre_t) : pre_t
// The final state is the last L positions of xx.
// Layouts (channelsLast): x, y [batch, T, C] (else [batch, C, T]); h0, finalState, each window slot
// [nseq, L, C] (else [nseq, C, L]); weight [C, W]; bias [C] (nullable). All in dtype dt.
// Sequences as for the scans (ScanSegment over T); positions in no segment get y = 0 and zero
// gradients. Trailing states: slot j (of `window`) holds the state after position length - window + j
// of each sequence (zeros for positions before its first), at windowStates + j * (nseq * C * L).
struct CausalConv1dArgs {
  DType dt = DType::F32;
  int64_t batch = 0, C = 0, T = 0, W = 0, dilation = 1;
  bool channelsLast = false, silu = false;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* h0 = nullptr;
  int64_t window = 0;
  void* windowStates = nullptr;

  int64_t stateLen() const { return (W - 1) * dilation; }
};

struct CausalConv1dGrads {
  const void* dY = nullptr;      // nullable (zeros), as x
  const void* dFinal = nullptr;  // nullable (zeros), as h0
  // Outputs, written entirely: dx (as x), dweight (as weight), dbias (nullable, as bias), dh0
  // (nullable, as h0).
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* dh0 = nullptr;
};

// Writes y (every element), finalState (nullable) and a.windowStates (nullable; every slot).
Status causalConv1dForward(const CausalConv1dArgs& a, void* y, void* finalState);
Status causalConv1dBackward(const CausalConv1dArgs& a, const CausalConv1dGrads& g);

}  // namespace rkcuda
