// Small device math shared by the kernel families: a fast base-2 exponential (one MUFU.EX2),
// softplus, sigmoid / SiLU and the derivative of SiLU, warp-wide sums, and fp32 atomic adds of
// 4-vectors. Host compilation (the CPU emulator in tests/cuda-emulator) gets plain libm versions of
// the hardware approximations, or models of their error in its device-numerics mode.
#pragma once
#include <cuda_runtime.h>

#include <math.h>

namespace rkcuda {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x through the hardware approximation (ex2.approx.ftz: relative error about 2^-22, subnormal
// results flushed to zero). 2^0 is exactly 1.
__device__ __forceinline__ float fastExp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#elif defined(RK_CUDA_EMULATOR)
  return emu::deviceNumerics() ? emu::ex2Approx(x) : exp2f(x);
#else
  return exp2f(x);
#endif
}

// e^x as 2^(x log2 e).
__device__ __forceinline__ float fastExp(float x) { return fastExp2(x * kLog2e); }

// log(1 + e^x), with the cut-off of Mamba's reference: x itself above 20.
__device__ __forceinline__ float softplus(float x) { return x <= 20.0f ? log1pf(fastExp(x)) : x; }

// d softplus / dx: sigmoid(x) below the cut-off, 1 above it.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + fastExp(-x)); }
__device__ __forceinline__ float softplusGrad(float x) { return x <= 20.0f ? sigmoid(x) : 1.0f; }

// SiLU x * sigmoid(x) and its derivative sigmoid(x) * (1 + x * (1 - sigmoid(x))).
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
__device__ __forceinline__ float siluGrad(float x) {
  const float s = sigmoid(x);
  return s * fmaf(x, 1.0f - s, 1.0f);
}

// Sum over groups of WIDTH consecutive lanes (a power of two up to 32; all 32 lanes must call);
// every lane of a group gets its group's sum.
template <int WIDTH = 32> __device__ __forceinline__ float warpSum(float v) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two <= 32");
#pragma unroll
  for (int m = WIDTH / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m, WIDTH);
  return v;
}

// Atomic p[i] += v.i for the four floats at p (16-byte aligned, global memory): one vector
// reduction on sm_90 and later, four scalar ones before.
__device__ __forceinline__ void atomicAddFloat4(float* p, const float4& v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

}  // namespace rkcuda
