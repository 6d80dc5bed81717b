// Helpers of the recurrent kernels whose K x V state is split by columns (cuda/delta/gated_delta_rule.cu,
// cuda/attention/linear_attention.cu): each column is owned by a group of G consecutive lanes (G a
// power of two up to 32), lane r of the group holding the rows i = r + G*m (m < KP) of its column in
// registers. P is the kernel's parameters (K, V, G, cols, blocksPerHead); J the thread's job (sub:
// its lane in the group, j: its column, active: j < V). Both kernels place their threads with
// placeColumnJob (ColumnJob); the launchers share the column split (columnLayout) and its launch
// (launchColumns).
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/api.h"
#include "common/check.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"

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

// What both kernels' parameters add to their inputs: the column split (columnLayout) and the
// backward's inputs, scratch and outputs.
struct ColumnParams {
  int64_t blocksPerHead = 1;
  int G = 1;     // lanes per column
  int cols = 1;  // columns per block
  // backward
  const float* checkpoints = nullptr;
  const void* dO = nullptr;
  const float* dFinal = nullptr;
  void* dv = nullptr;
  float* dqAcc = nullptr;
  float* dkAcc = nullptr;
  float* dgAcc = nullptr;
  float* dbetaAcc = nullptr;
  float* dh0 = nullptr;
};

// What a thread works on: block = (sequence * heads + hv) * blocksPerHead + column block, heads being
// the state heads per sequence; hk is the key head of state head hv (the kernels fill it, and seg).
struct ColumnJob {
  ScanSegment seg;
  int64_t seq, hv, hk;
  int64_t stateOff;  // (seq * heads + hv) * K * V
  int j;             // this thread's column
  int sub;           // lane within the column's group
  bool active;       // j < V
};

// Fills the job of this thread; sequence(jb) fills jb.hk and jb.seg once jb.seq and jb.hv are known.
template <class P, class Sequence>
__device__ __forceinline__ void placeColumnJob(ColumnJob& jb, const P& p, int64_t heads, Sequence&& sequence) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t head = blk / p.blocksPerHead;
  const int64_t cb = blk - head * p.blocksPerHead;
  jb.seq = head / heads;
  jb.hv = head - jb.seq * heads;
  sequence(jb);
  jb.stateOff = (jb.seq * heads + jb.hv) * p.K * p.V;
  const int tid = static_cast<int>(threadIdx.x);
  jb.sub = tid % p.G;
  jb.j = static_cast<int>(cb * p.cols) + tid / p.G;
  jb.active = jb.j < p.V;
}

// Rows per lane (8 or 16) and threads per block (64, 128 or 256), tunable as <prefix>.rowsPerLane and
// <prefix>.blockThreads, and the derived column split of `heads` heads into p.G, p.cols and
// p.blocksPerHead.
template <class P>
Status columnLayout(const std::string& fn, const std::string& prefix, P& p, int64_t heads, int* rowsPerLane,
                    unsigned* grid, unsigned* threads) {
  const int chosenRows = p.K <= 64 ? 8 : 16;
  const int kp = tunable((prefix + ".rowsPerLane").c_str(), chosenRows);
  if (kp != 8 && kp != 16) return statusError(fn + ": unsupported rows per lane " + std::to_string(kp));
  const int nt = tunable((prefix + ".blockThreads").c_str(), 128);
  if (nt != 64 && nt != 128 && nt != 256) return statusError(fn + ": unsupported block size " + std::to_string(nt));
  int G = 1;
  while (G * kp < p.K) G *= 2;
  if (G > 32) return statusError(fn + ": K too large for the rows per lane");
  p.G = G;
  p.cols = nt / G;
  p.blocksPerHead = ceilDiv(p.V, p.cols);
  const int64_t blocks = heads * p.blocksPerHead;
  if (blocks > INT_MAX) return statusError(fn + ": too many heads for one launch");
  *rowsPerLane = kp;
  *grid = static_cast<unsigned>(blocks);
  *threads = static_cast<unsigned>(nt);
  return Status{};
}

// Launches kernelFor(std::integral_constant<int, KP>{}) over `heads` heads with the layout of
// columnLayout (KP its rows per lane), p as the kernel's one argument; nothing when there are none.
template <class P, class KernelFor>
Status launchColumns(const std::string& fn, const std::string& prefix, P p, int64_t heads, KernelFor kernelFor) {
  int kp = 0;
  unsigned grid = 0, threads = 0;
  RK_TRY(columnLayout(fn, prefix, p, heads, &kp, &grid, &threads));
  if (grid == 0) return Status{};
  if (kp == 8) return launch(kernelFor(std::integral_constant<int, 8>{}), grid, threads, 0, p);
  return launch(kernelFor(std::integral_constant<int, 16>{}), grid, threads, 0, p);
}

}  // namespace rkcuda
