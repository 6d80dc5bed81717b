// The selective scan's kernels (cuda/scan/selective_scan.cu): sizes, element runs, the staged B / C
// rows, the parameters and each block's share of the work, shared by the forward and the backward.
#pragma once

#include <cuda_runtime.h>
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "common/api.h"
#include "scan/selective_scan.h"
#include "common/async_copy.cuh"
#include "common/check.cuh"
#include "common/host.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/scan.cuh"

namespace rkcuda {
namespace {

using scan::Affine;

constexpr int kChunk = 256;  // checkpoint spacing (selectiveScanChunk)
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxDstate = kSelectiveScanMaxDstate;
constexpr int64_t kMaxSeqlen = int64_t{1} << 30;
constexpr int kFwdItems = 16;  // consecutive positions per lane, forward
constexpr int kBwdItems = 8;   // consecutive positions per lane, backward
constexpr int kFwdTile = 32 * kFwdItems;
constexpr int kBwdTile = 32 * kBwdItems;
static_assert(kFwdTile % kChunk == 0 && kChunk % kFwdItems == 0, "forward tiles start at checkpoints");
static_assert(kBwdTile % kChunk == 0, "backward tiles start at checkpoints");

// Blocks per SM to ask for: 16 warps per SM, i.e. at most 128 registers per thread. The fp32
// backward kernel (two 16-byte vectors per run of 8 positions) gets 12 warps, i.e. 168 registers.
constexpr int minBlocks(int warps) { return 16 / warps; }
template <class T> constexpr int bwdMinBlocks(int warps) { return (sizeof(T) == 4 ? 12 : 16) / warps; }
// States whose B/C rows are staged together in the forward pass (one block barrier per batch).
constexpr int kFwdStatesPerStage = 4;

template <class T> using Bits = std::conditional_t<sizeof(T) == 4, unsigned, unsigned short>;

__device__ __forceinline__ float component(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ---- element runs ----

// The G = kVecElems<T> elements at p as 16 raw bytes. Only the first `avail` of them are read (the
// rest are zero bits) unless vec (p 16-byte aligned) and all G are available.
template <class T> __device__ __forceinline__ uint4 loadRaw(const T* p, int64_t avail, bool vec) {
  constexpr int G = kVecElems<T>;
  if (vec && avail >= G) return load16(p);
  unsigned w[4] = {0u, 0u, 0u, 0u};
  const Bits<T>* q = reinterpret_cast<const Bits<T>*>(p);
#pragma unroll
  for (int j = 0; j < G; ++j) {
    if (j < avail) {
      const unsigned x = __ldg(q + j);
      if constexpr (sizeof(T) == 4) {
        w[j] = x;
      } else {
        w[j / 2] |= x << (16 * (j % 2));
      }
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// K consecutive elements at p as fp32; those at or past `avail` read as 0.
template <class T, int K>
__device__ __forceinline__ void loadRun(const T* p, int64_t avail, bool vec, float (&out)[K]) {
  constexpr int G = kVecElems<T>;
  static_assert(K % G == 0, "a run is whole vectors");
#pragma unroll
  for (int v = 0; v < K / G; ++v) {
    float e[G];
    unpack16<T>(loadRaw(p + v * G, avail - v * G, vec), e);
#pragma unroll
    for (int j = 0; j < G; ++j) out[v * G + j] = e[j];
  }
}

// Stores the first min(K, avail) of K values to p.
template <class T, int K>
__device__ __forceinline__ void storeRun(T* p, int64_t avail, bool vec, const float (&in)[K]) {
  constexpr int G = kVecElems<T>;
#pragma unroll
  for (int v = 0; v < K / G; ++v) {
    const int64_t left = avail - v * G;
    if (vec && left >= G) {
      float e[G];
#pragma unroll
      for (int j = 0; j < G; ++j) e[j] = in[v * G + j];
      store16(p + v * G, pack16<T>(e));
    } else {
#pragma unroll
      for (int j = 0; j < G; ++j) {
        if (j < left) storeScalar(p + v * G + j, in[v * G + j]);
      }
    }
  }
}

// ---- staged B / C rows ----

// A tile row of B or C values in shared memory, in the storage type, padded with 16 bytes after
// every 128: the 16-byte reads of a quarter warp (8 lanes, each reading K = 8 or 16 consecutive
// positions) then cover all 32 banks once.
__host__ __device__ constexpr int paddedRow(int tile) { return tile + tile / 8; }
template <class T> __device__ __forceinline__ int padIndex(int p) {
  constexpr int kPer = 128 / static_cast<int>(sizeof(T)), kPad = 16 / static_cast<int>(sizeof(T));
  return p + kPad * (p / kPer);
}

// Stages the variable B and/or C values of NT consecutive states over one tile of TILE positions
// into a shared buffer [2 arrays][NT][kRow] of the storage type, without holding them in registers:
// issue() starts this thread's share (cp.async of whole 16-byte vectors; pieces that cannot move as
// aligned vectors are loaded and stored at once), complete() waits for those copies. A
// __syncthreads after complete() publishes the buffer; readers convert to fp32 as they read
// (readStaged). Kept in the storage type, 16-bit B / C take half the shared memory and half the
// shared-memory traffic of fp32 rows, and need no conversion pass. Positions at or past the
// sequence's end read as zeros.
template <class T, int NT, int TILE, int THREADS> struct BCStage {
  static constexpr int G = kVecElems<T>;
  static constexpr int kVecsPerRow = TILE / G;
  static constexpr int kVecs = NT * kVecsPerRow;  // per array
  static constexpr int kRow = paddedRow(TILE);

  // rowB / rowC: the first state's row at the tile start, or null when that array is not staged;
  // rows are `stride` elements apart; `avail` positions remain in the sequence from the tile start.
  static __device__ __forceinline__ void issue(T* buffer, const T* rowB, const T* rowC, int64_t stride, int nCount,
                                               int64_t avail, bool vec) {
#pragma unroll
    for (int arr = 0; arr < 2; ++arr) {
      const T* base = arr == 0 ? rowB : rowC;
      if (base == nullptr) continue;
      for (int v = static_cast<int>(threadIdx.x); v < kVecs; v += THREADS) {
        const int j = v / kVecsPerRow;
        if (j >= nCount) continue;
        const int q = (v % kVecsPerRow) * G;
        const int64_t left = avail - q;
        T* dst = buffer + (arr * NT + j) * kRow + padIndex<T>(q);  // G divides the padding period
        if (vec) {
          const int bytes = static_cast<int>(left <= 0 ? 0 : left >= G ? G : left) * static_cast<int>(sizeof(T));
          const T* src = bytes > 0 ? base + j * stride + q : base;
          copyAsync16(dst, src, bytes);
        } else {
          *reinterpret_cast<uint4*>(dst) = loadRaw(base + j * stride + q, left, false);
        }
      }
    }
  }

  static __device__ __forceinline__ void complete() { waitAsyncCopies(); }
};

// K consecutive staged values (a lane's positions; src at a padded index, 16-byte aligned) as fp32.
template <class T, int K> __device__ __forceinline__ void readStaged(const T* src, float (&out)[K]) {
  constexpr int G = kVecElems<T>;
  static_assert(K % G == 0, "whole vectors");
#pragma unroll
  for (int v = 0; v < K / G; ++v) {
    float e[G];
    unpack16<T>(*reinterpret_cast<const uint4*>(src + v * G), e);
#pragma unroll
    for (int j = 0; j < G; ++j) out[v * G + j] = e[j];
  }
}

// ---- parameters and the block's share of the work ----

// The kernels' parameters: the contract's arguments plus the launch layout, the device sequence
// table and the outputs.
struct ScanParams : SelectiveScanArgs {
  int64_t channelsPerGroup = 0, blocksPerGroup = 0;
  int64_t uniformChunks = 0;           // chunks per sequence without packing
  const ScanSegment* table = nullptr;  // device table (packed input); null: sequence s = row s
  bool aligned = false;                // every [batch, dim, seqlen] and variable B/C tensor is 16-byte aligned
  // forward
  void* y = nullptr;
  float* states = nullptr;
  float* finalState = nullptr;
  // backward
  const float* checkpoints = nullptr;
  const void* dy = nullptr;
  const float* dFinal = nullptr;
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA = nullptr;
  float* dB = nullptr;  // fp32: [batch, groups, dstate, seqlen] when variable, else [dim, dstate]
  float* dC = nullptr;
  float* dD = nullptr;
  float* dDeltaBias = nullptr;
  float* dh0 = nullptr;
};

// What a block works on. Block b covers sequence s, group g and channels [d0, d0 + W) of the
// group: b = (s * groups + g) * blocksPerGroup + (d0 - g * channelsPerGroup) / W. Warps past the
// group's end are inactive: they take part in the block's barriers and staging only. Thread 0
// fills it in shared memory; the kernels re-read the fields where they need them rather than
// holding them in registers through the hot loops. Offsets are those of the block's first channel
// (warp w adds w rows).
struct BlockJob {
  int64_t rowOff;    // (batch row, d0, sequence start) in u, delta, z, y, dy, du, ddelta, dz
  int64_t bcOff;     // (batch row, group, state 0, sequence start) in a variable B / C (dB / dC)
  int64_t ckOff;     // d0's checkpoints: (chunkOffset * dim + d0 * nChunks) * dstate
  int64_t stateOff;  // d0 in h0, finalState, dFinal, dh0: (sequence * dim + d0) * dstate
  int d0;
  int length;   // positions in the sequence
  int nChunks;  // checkpoints of the sequence
  int activeWarps;
  bool vecBC;  // the variable B / C rows can move as 16-byte vectors
};

template <int W> __device__ __forceinline__ BlockJob blockJob(const ScanParams& p) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t perSeq = p.groups * p.blocksPerGroup;
  const int64_t seq = blk / perSeq;
  const int64_t rem = blk - seq * perSeq;
  const int64_t group = rem / p.blocksPerGroup;
  const int64_t first = (rem - group * p.blocksPerGroup) * W;  // within the group
  ScanSegment seg;
  if (p.table != nullptr) {
    seg = p.table[seq];
  } else {
    seg.batch = seq;
    seg.start = 0;
    seg.length = p.seqlen;
    seg.chunkOffset = seq * p.uniformChunks;
  }
  BlockJob job;
  job.d0 = static_cast<int>(group * p.channelsPerGroup + first);
  job.length = static_cast<int>(seg.length);
  job.nChunks = static_cast<int>((seg.length + kChunk - 1) / kChunk);
  const int64_t left = p.channelsPerGroup - first;
  job.activeWarps = static_cast<int>(left < W ? left : W);
  job.rowOff = (seg.batch * p.dim + job.d0) * p.seqlen + seg.start;
  job.bcOff = (seg.batch * p.groups + group) * p.dstate * p.seqlen + seg.start;
  job.ckOff = (seg.chunkOffset * p.dim + static_cast<int64_t>(job.d0) * job.nChunks) * p.dstate;
  job.stateOff = (seq * p.dim + job.d0) * p.dstate;
  job.vecBC = p.aligned && p.seqlen % 8 == 0 && seg.start % 8 == 0;  // 8: a vector of any dtype
  return job;
}

// A thread's place in its block: its lane, its warp (channel d0 + warp), and whether that warp has a
// channel (warps past the group's end take part in the barriers and the staging only).
struct BlockThread {
  int lane, warp;
  bool active;
};

// The start of both kernels: thread 0 fills the block's job into shared memory, which every thread
// reads after the barrier.
template <int W> __device__ __forceinline__ BlockThread startBlock(const ScanParams& p, BlockJob& job) {
  if (threadIdx.x == 0) job = blockJob<W>(p);
  __syncthreads();
  BlockThread t;
  t.lane = scan::laneId();
  t.warp = static_cast<int>(threadIdx.x) >> 5;
  t.active = t.warp < job.activeWarps;
  return t;
}

}  // namespace
}  // namespace rkcuda
