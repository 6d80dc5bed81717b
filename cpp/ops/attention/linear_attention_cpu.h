// CPU linear attention (cuda/attention/linear_attention.h): the per-token recurrence of every rule,
// scalar or per-key decay, grouped queries both ways (the gated delta rule's layout without the delta
// term on its kernels: linear_attention_cpu.cc); and the gate activations (ONNX GatedDeltaNet's
// 'qwen' gate and sigmoid beta) that produce the effective decay and update rate from raw inputs.
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "cuda/attention/linear_attention.h"

namespace rk::attention {

// Checkpoint spacing (tokens): the forward pass keeps the state entering every chunk of this many
// tokens (fp32 [totalChunks, Hv, K, V]); the backward pass recomputes one chunk's states from there.
constexpr int64_t kLinearAttentionChunk = 64;

// Writes o (every element), states (nullable), finalState (nullable) and a.windowStates (nullable).
// finalState may be a.h0 (a decode step's state updated in place).
void linearAttentionForwardCpu(const rkcuda::LinearAttentionArgs& a, void* o, float* states, float* finalState);
void linearAttentionBackwardCpu(const rkcuda::LinearAttentionArgs& a, const rkcuda::LinearAttentionGrads& g);

// The gate activations (rkcuda::LinearGateArgs).
using rkcuda::LinearGateArgs;
void linearGatesForwardCpu(const LinearGateArgs& a, float* g, void* beta);
// From the gradients of the effective g (fp32) and beta (dt [rows, Hv]): those of decay, b (dt
// [rows, betaHeads]), aLog [Hv] and dtBias (nullable outputs where the input is absent).
void linearGatesBackwardCpu(const LinearGateArgs& a, const float* dg, const void* dbetaEff, float* dDecay, void* dBeta,
                            float* daLog, float* dDtBias);

#define RK_ATTENTION_VARIANT_API(NS)                                                                               \
  namespace NS {                                                                                                   \
  void linearAttentionForwardCpu(const rkcuda::LinearAttentionArgs& a, void* o, float* states, float* finalState); \
  void linearAttentionBackwardCpu(const rkcuda::LinearAttentionArgs& a, const rkcuda::LinearAttentionGrads& g);    \
  }
RK_FOR_EACH_ISA(RK_ATTENTION_VARIANT_API)
#undef RK_ATTENTION_VARIANT_API

}  // namespace rk::attention
