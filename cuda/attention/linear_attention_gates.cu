// Linear attention's gate activations (cuda/attention/linear_attention.h): the effective decay of
// ONNX GatedDeltaNet's 'qwen' gate, g = -exp(aLog) * softplus(decay + dtBias), and the sigmoid of
// beta (or a beta shared by the heads, broadcast), forward and backward. Elementwise, one thread per
// element (grid-stride); the sums over positions for aLog and dtBias are global fp32 atomics into
// zeroed outputs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "attention/linear_attention.h"
#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"

namespace rkcuda {
namespace {

// softplus(x) = log(1 + e^x), without overflow for large x or loss for very negative x (the CPU's form).
__device__ __forceinline__ float gateSoftplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float gateSigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The head of element e of the gate tensor, and its index into dtBias.
__device__ __forceinline__ int64_t headOf(const LinearGateArgs& a, int64_t e) {
  return e / (a.perKey ? a.K : 1) % a.Hv;
}
__device__ __forceinline__ int64_t biasOf(const LinearGateArgs& a, int64_t e) {
  return a.dtBiasPerKey ? e % (a.Hv * a.K) : headOf(a, e);
}
__device__ __forceinline__ int64_t stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ __forceinline__ int64_t first() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }

__global__ void __launch_bounds__(256) gateForwardKernel(const LinearGateArgs a, int64_t n, float* g) {
  for (int64_t e = first(); e < n; e += stride()) {
    if (!a.qwen) {
      g[e] = a.decay[e];
      continue;
    }
    const float x = a.decay[e] + (a.dtBias != nullptr ? a.dtBias[biasOf(a, e)] : 0.0f);
    g[e] = -expf(a.aLog[headOf(a, e)]) * gateSoftplus(x);
  }
}

template <class T> __global__ void __launch_bounds__(256) betaForwardKernel(const LinearGateArgs a, T* beta) {
  const T* b = static_cast<const T*>(a.beta);
  for (int64_t e = first(); e < a.rows * a.Hv; e += stride()) {
    const float x = toFloat(b[a.betaHeads == 1 ? e / a.Hv : e]);
    beta[e] = fromFloat<T>(a.sigmoid ? gateSigmoid(x) : x);
  }
}

__global__ void __launch_bounds__(256) gateBackwardKernel(const LinearGateArgs a, int64_t n, const float* dg,
                                                          float* dDecay, float* daLog, float* dDtBias) {
  for (int64_t e = first(); e < n; e += stride()) {
    if (!a.qwen) {
      dDecay[e] = dg[e];
      continue;
    }
    const float x = a.decay[e] + (a.dtBias != nullptr ? a.dtBias[biasOf(a, e)] : 0.0f);
    const int64_t h = headOf(a, e);
    const float A = -expf(a.aLog[h]);
    const float d = dg[e] * A * gateSigmoid(x);
    dDecay[e] = d;
    if (daLog != nullptr) atomicAdd(daLog + h, dg[e] * A * gateSoftplus(x));
    if (dDtBias != nullptr) atomicAdd(dDtBias + biasOf(a, e), d);
  }
}

template <class T>
__global__ void __launch_bounds__(256) betaBackwardKernel(const LinearGateArgs a, const T* dbetaEff, T* dBeta) {
  const T* b = static_cast<const T*>(a.beta);
  const int64_t hb = a.betaHeads;
  for (int64_t e = first(); e < a.rows * hb; e += stride()) {
    const int64_t row = e / hb;
    const int64_t h0 = hb == 1 ? 0 : e % hb, h1 = hb == 1 ? a.Hv : h0 + 1;
    const float s = gateSigmoid(toFloat(b[e]));
    float sum = 0.0f;
    for (int64_t h = h0; h < h1; ++h) sum += toFloat(dbetaEff[row * a.Hv + h]);
    dBeta[e] = fromFloat<T>(a.sigmoid ? sum * s * (1.0f - s) : sum);
  }
}

unsigned blocksFor(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 4096)); }

Status checkGates(const LinearGateArgs& a, const std::string& fn) {
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return statusError(fn + ": unknown dtype");
  if (a.rows < 0 || a.Hv < 1 || a.K < 1) return statusError(fn + ": bad sizes");
  if (a.beta != nullptr && a.betaHeads != 1 && a.betaHeads != a.Hv)
    return statusError(fn + ": betaHeads must be 1 or Hv");
  if (a.decay != nullptr && a.qwen && a.aLog == nullptr) return statusError(fn + ": qwen gate without aLog");
  return Status{};
}

}  // namespace

Status linearAttentionGates(const LinearGateArgs& a, float* g, void* beta) {
  const std::string fn = "linearAttentionGates";
  RK_TRY(checkGates(a, fn));
  const int64_t n = a.rows * a.Hv * (a.perKey ? a.K : 1);
  if (a.decay != nullptr && n > 0) RK_TRY(launch(gateForwardKernel, blocksFor(n), 256, 0, a, n, g));
  if (a.beta == nullptr || a.rows * a.Hv == 0) return Status{};
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(betaForwardKernel<T>, blocksFor(a.rows * a.Hv), 256, 0, a, static_cast<T*>(beta));
  });
}

Status linearAttentionGatesBackward(const LinearGateArgs& a, const float* dg, const void* dbetaEff, float* dDecay,
                                    void* dBeta, float* daLog, float* dDtBias) {
  const std::string fn = "linearAttentionGatesBackward";
  RK_TRY(checkGates(a, fn));
  const int64_t n = a.rows * a.Hv * (a.perKey ? a.K : 1);
  if (a.decay != nullptr && dDecay != nullptr && n > 0) {
    RK_TRY(zeroFloats(daLog, a.qwen ? a.Hv : 0));
    RK_TRY(zeroFloats(dDtBias, a.qwen && a.dtBias != nullptr ? (a.dtBiasPerKey ? a.Hv * a.K : a.Hv) : 0));
    RK_TRY(launch(gateBackwardKernel, blocksFor(n), 256, 0, a, n, dg, dDecay, a.qwen ? daLog : nullptr,
                  a.qwen && a.dtBias != nullptr ? dDtBias : nullptr));
  }
  if (a.beta == nullptr || dBeta == nullptr || a.rows == 0) return Status{};
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return launch(betaBackwardKernel<T>, blocksFor(a.rows * a.betaHeads), 256, 0, a, static_cast<const T*>(dbetaEff),
                  static_cast<T*>(dBeta));
  });
}

}  // namespace rkcuda
