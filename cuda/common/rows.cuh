// Row kernels shared by the launchers of the ops with L2-normalised rows and packed sequences: the
// gradient through the L2 normalisation of rows (fp32 in, the storage type out), and the zeroing of
// the positions in no sequence.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/api.h"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"

namespace rkcuda {

constexpr float kRowsL2Eps = 1e-6f;  // rows are divided by sqrt(sum x^2 + kRowsL2Eps)

// dx for a row of K: dy (fp32) taken through x / sqrt(|x|^2 + eps) when l2norm, stored as T. The
// whole warp calls, each lane taking the elements lane, lane + 32, ...
template <class T>
__device__ __forceinline__ void l2normBackwardRow(const T* xr, const float* dr, T* out, int K, bool l2norm) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float rn = 1.0f, yd = 0.0f;
  if (l2norm) {
    float ss = 0.0f, xd = 0.0f;
    for (int i = lane; i < K; i += 32) {
      const float xi = loadScalar(xr + i);
      ss = fmaf(xi, xi, ss);
      xd = fmaf(xi, dr[i], xd);
    }
    ss = warpSum(ss);
    xd = warpSum(xd);
    rn = 1.0f / sqrtf(ss + kRowsL2Eps);
    yd = xd * rn;  // y.dy
  }
  for (int i = lane; i < K; i += 32) {
    const float d = l2norm ? (dr[i] - loadScalar(xr + i) * rn * yd) * rn : dr[i];
    storeScalar(out + i, d);
  }
}

// l2normBackwardRow over `rows` rows of K, one warp per row.
template <class T>
__global__ void __launch_bounds__(256)
    l2normBackwardKernel(const T* x, const float* dy, T* dx, int64_t rows, int K, bool l2norm) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); r < rows; r += warps) {
    l2normBackwardRow(x + r * K, dy + r * K, dx + r * K, K, l2norm);
  }
}

// Zeros the elements [start * width, (start + length) * width) of p for each (start, length) gap.
template <class T>
__global__ void __launch_bounds__(128) zeroGapsKernel(T* p, int64_t width, const int64_t* gaps, int64_t nGaps) {
  const T zero = fromFloat<T>(0.0f);
  for (int64_t gi = blockIdx.x; gi < nGaps; gi += gridDim.x) {
    const int64_t start = gaps[2 * gi] * width, n = gaps[2 * gi + 1] * width;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) p[start + e] = zero;
  }
}

template <class T> Status launchZeroGaps(void* p, int64_t width, const int64_t* gaps, int64_t nGaps) {
  if (nGaps == 0 || width == 0 || p == nullptr) return Status{};
  const unsigned blocks = static_cast<unsigned>(nGaps < 4096 ? nGaps : 4096);
  return launch(zeroGapsKernel<T>, blocks, 128, 0, static_cast<T*>(p), width, gaps, nGaps);
}

}  // namespace rkcuda
