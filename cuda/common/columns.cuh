// Helpers of the recurrent kernels whose K x V state is split by columns (cuda/delta/gated_delta.cu,
// cuda/attention/linear_attention.cu): each column is owned by a group of G consecutive lanes (G a
// power of two up to 32), lane r of the group holding the rows i = r + G*m (m < KP) of its column in
// registers. P is the kernel's parameters (K, V, G); J the thread's job (sub: its lane in the group,
// j: its column, active: j < V).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace rkcuda {

// Sum over the G consecutive lanes of a column group (every lane of the warp calls, G uniform).
__device__ __forceinline__ float groupSum(float x, int G) {
  for (int m = G >> 1; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// S[m] <-> state element (row sub + G*m, column j) at base (a K x V array; null reads as zeros).
template <int KP, class P, class J>
__device__ __forceinline__ void loadState(float (&S)[KP], const float* base, const P& p, const J& jb) {
#pragma unroll
  for (int m = 0; m < KP; ++m) {
    const int i = jb.sub + p.G * m;
    S[m] = (base != nullptr && jb.active && i < p.K) ? base[static_cast<int64_t>(i) * p.V + jb.j] : 0.0f;
  }
}
template <int KP, class P, class J>
__device__ __forceinline__ void storeState(const float (&S)[KP], float* base, const P& p, const J& jb) {
  if (!jb.active) return;
#pragma unroll
  for (int m = 0; m < KP; ++m) {
    const int i = jb.sub + p.G * m;
    if (i < p.K) base[static_cast<int64_t>(i) * p.V + jb.j] = S[m];
  }
}

}  // namespace rkcuda
