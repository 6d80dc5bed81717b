// Selective scan (Mamba-1): forward and backward (recomputing from checkpoints), for F32/F16/BF16
// storage with fp32 state and arithmetic: kernels plus the launchers declared in
// scan/selective_scan.h (the decode step is in selective_state_update.cu).
//
// Work split (forward and backward). A block takes W consecutive channels of one B/C group of one
// sequence, one warp per channel, and walks the sequence in tiles of 32*K positions: lane l of
// each warp owns the K consecutive positions [l*K, l*K + K) of the tile (K = 16 forward, 8
// backward). Per tile a warp loads its channel's u and delta (z, dy) once, keeps dt and dt*u in
// registers, then loops over the states n. For each n a lane forms its K affine steps
// x -> exp2(dt*A*log2e) * x + dt*u*B (one MUFU.EX2 per position and state), composes them
// sequentially, the warp scans the 32 lane aggregates with shuffles (common/scan.cuh), and each
// lane re-runs its K steps from its start state, adding C*x into y. So a (position, state) costs
// about five fp32 operations and one exp2, plus 1/K of a 5-level warp scan, and u, delta, z and y
// are read or written once. The state carried from one tile to the next is the checkpoint the
// forward pass must store anyway (see below): lane 31 writes it, the next tile reads it.
// Variable B and C rows are the same for every channel of a group: the block stages them, a few
// states at a time, in shared memory as fp32 (rows padded so that the lanes' 16-byte reads hit
// distinct banks). The next states' rows travel by cp.async while the current ones are computed,
// so staging holds no registers; one __syncthreads per batch of states. A constant B or C is one
// scalar per (channel, state). The next tile's u, delta (z, dy) are prefetched into L2.
// Occupancy: at most 128 registers per thread (168 for the fp32 backward kernel) and 45 KB of
// shared memory per block give 16 warps per SM (12); blocks of 8 warps forward, 4 backward (half
// that when the grid would be too small to fill the GPU). batch x dim / W blocks fill 132 SMs
// already at batch 1, dim 2048.
//
// Checkpoints. Every kChunk = 256 positions the forward pass stores the state entering that chunk,
// in the layout fixed by api.h (a lane whose first position starts a chunk writes it). The
// backward pass walks tiles of one chunk from the last to the first. Per state it recomputes the
// tile's forward states from the checkpoint (the same warp scan), then runs the adjoint
// g_t = C_t*dout_t + exp(dt_{t+1}*A) * g_{t+1} backwards in time with a reverse warp scan, carrying
// a_first*g_first to the previous tile in shared memory (dFinal enters at the end; what leaves the
// first tile is dh0). All gradients of a position then follow from x_{t-1}, x_t, g_t in registers:
//   du = D*dout + dt*sum_n g*B,  ddt = u*sum_n g*B + sum_n A*g*a*x_{t-1},  dA += dt*g*a*x_{t-1},
//   dB += g*dt*u,  dC += dout*x_t,  dz = dy*out*silu'(z),  with dout = dy*silu(z), a = exp(dt*A).
// Reductions. du, ddelta and dz are per position. dA, a constant dB / dC, dD and dDeltaBias are
// per channel: warp sums, then fp32 atomics (per tile and state, or per sequence). A variable
// dB / dC sums over the channels of a group: each warp writes its per-position contributions to
// shared memory, the block adds up its W channels and issues one fp32 atomic add per position (a
// 4-vector on sm_90) into a zeroed fp32 buffer: the output itself for F32, else scratch that is
// converted afterwards.
//
// Packed sequences get a device copy of the segment table; positions in no segment receive zeros
// from a small separate kernel. Positions past a sequence's end inside its last tile are identity
// steps (dt = 0, so exp2(0) = 1 exactly and dt*u*B = 0): states pass through them unchanged.
//
// Vector path: u, delta, z, y (du, ddelta, dz, dy) and variable B/C rows move in 16-byte vectors
// when the pointers are 16-byte aligned and the row starts at a multiple of a vector; otherwise,
// and for the partial vectors at a sequence's end, element by element.
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

// A tile row of B or C values in shared memory, padded with 4 floats after every 32 positions: the
// 16-byte reads of a quarter warp (8 lanes, each reading K = 8 or 16 consecutive positions) then
// cover all 32 banks once.
__host__ __device__ constexpr int paddedRow(int tile) { return tile + tile / 8; }
__device__ __forceinline__ int padIndex(int p) { return p + 4 * (p >> 5); }

// Stages the variable B and/or C values of NT consecutive states over one tile of TILE positions
// into a shared buffer [2 arrays][NT][kRow] as fp32, without holding them in registers:
// issue() starts this thread's share (cp.async of whole vectors: straight into the buffer for fp32,
// into this thread's own slots of a raw buffer for 16-bit storage; pieces that cannot move as
// aligned vectors are loaded, converted and stored at once), complete() waits for those copies
// and converts this thread's raw slots. A __syncthreads after complete() publishes the buffer.
// Positions at or past the sequence's end read as zeros.
template <class T, int NT, int TILE, int THREADS> struct BCStage {
  static constexpr int G = kVecElems<T>;
  static constexpr int kVecsPerRow = TILE / G;
  static constexpr int kVecs = NT * kVecsPerRow;  // per array
  static constexpr int kRow = paddedRow(TILE);
  static constexpr bool kConvert = sizeof(T) != 4;
  static constexpr int kRawSlots = kConvert ? 2 * kVecs : 1;  // raw buffer size in 16-byte slots

  // rowB / rowC: the first state's row at the tile start, or null when that array is not staged;
  // rows are `stride` elements apart; `avail` positions remain in the sequence from the tile start.
  static __device__ __forceinline__ void issue(float* buffer, uint4* raw, const T* rowB, const T* rowC, int64_t stride,
                                               int nCount, int64_t avail, bool vec) {
#pragma unroll
    for (int arr = 0; arr < 2; ++arr) {
      const T* base = arr == 0 ? rowB : rowC;
      if (base == nullptr) continue;
      for (int v = static_cast<int>(threadIdx.x); v < kVecs; v += THREADS) {
        const int j = v / kVecsPerRow;
        if (j >= nCount) continue;
        const int q = (v % kVecsPerRow) * G;
        const int64_t left = avail - q;
        float* dst = buffer + (arr * NT + j) * kRow + padIndex(q);  // G divides 32: no pad inside
        if (vec) {
          const int bytes = static_cast<int>(left <= 0 ? 0 : left >= G ? G : left) * static_cast<int>(sizeof(T));
          const T* src = bytes > 0 ? base + j * stride + q : base;
          copyAsync16(kConvert ? static_cast<void*>(raw + arr * kVecs + v) : static_cast<void*>(dst), src, bytes);
        } else {
          float e[G];
          unpack16<T>(loadRaw(base + j * stride + q, left, false), e);
          writeFloats(dst, e);
        }
      }
    }
  }

  static __device__ __forceinline__ void complete(float* buffer, const uint4* raw, bool hasB, bool hasC, int nCount,
                                                  bool vec) {
    waitAsyncCopies();
    if constexpr (kConvert) {
      if (!vec) return;
#pragma unroll
      for (int arr = 0; arr < 2; ++arr) {
        if (!(arr == 0 ? hasB : hasC)) continue;
        for (int v = static_cast<int>(threadIdx.x); v < kVecs; v += THREADS) {
          const int j = v / kVecsPerRow;
          if (j >= nCount) continue;
          const int q = (v % kVecsPerRow) * G;
          float e[G];
          unpack16<T>(raw[arr * kVecs + v], e);
          writeFloats(buffer + (arr * NT + j) * kRow + padIndex(q), e);
        }
      }
    }
  }

  static __device__ __forceinline__ void writeFloats(float* dst, const float (&e)[G]) {
#pragma unroll
    for (int h = 0; h < G / 4; ++h) {
      *reinterpret_cast<float4*>(dst + 4 * h) = make_float4(e[4 * h], e[4 * h + 1], e[4 * h + 2], e[4 * h + 3]);
    }
  }
};

// ---- parameters and the block's share of the work ----

struct ScanParams {
  int64_t dim = 0, seqlen = 0, dstate = 0, groups = 1, channelsPerGroup = 0, blocksPerGroup = 0;
  int64_t uniformChunks = 0;              // chunks per sequence without packing
  const ScanSegment* segments = nullptr;  // device table (packed input); null: sequence s = row s
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const void* z = nullptr;
  const float* deltaBias = nullptr;
  const float* h0 = nullptr;
  bool variableB = false, variableC = false, softplus = false;
  bool aligned = false;  // every [batch, dim, seqlen] and variable B/C tensor is 16-byte aligned
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
  if (p.segments != nullptr) {
    seg = p.segments[seq];
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

// ============================== forward ==============================

template <class T, int W>
__global__ void __launch_bounds__(32 * W, minBlocks(W)) selectiveScanForwardKernel(const ScanParams p) {
  constexpr int K = kFwdItems, TILE = kFwdTile, NT = kFwdStatesPerStage, THREADS = 32 * W;
  constexpr int G = kVecElems<T>;
  using Stage = BCStage<T, NT, TILE, THREADS>;
  __shared__ __align__(16) float bc[2][2][NT][Stage::kRow];  // [buffer][B, C][state][position]
  __shared__ uint4 raw[Stage::kRawSlots];
  __shared__ BlockJob job;
  if (threadIdx.x == 0) job = blockJob<W>(p);
  __syncthreads();

  const int lane = scan::laneId();
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const bool active = warp < job.activeWarps;
  const int N = static_cast<int>(p.dstate);
  const int L = job.length;
  if (L == 0) {  // the whole block, before any further barrier
    if (active && p.finalState != nullptr) {
      const int64_t off = job.stateOff + static_cast<int64_t>(warp) * N;
      for (int n = lane; n < N; n += 32) p.finalState[off + n] = p.h0 != nullptr ? p.h0[off + n] : 0.0f;
    }
    return;
  }

  // Staging unit i = (tile i / upt, states [(i % upt) * NT, + NT)).
  const int nTiles = (L + TILE - 1) / TILE;
  const int upt = (N + NT - 1) / NT;
  const int nUnits = nTiles * upt;
  const bool staged = p.variableB || p.variableC;
  auto unitStates = [&](int unit) {
    const int n0 = (unit % upt) * NT;
    return N - n0 < NT ? N - n0 : NT;
  };
  auto issue = [&](int unit) {
    const int pos0 = (unit / upt) * TILE;
    const int64_t off = job.bcOff + static_cast<int64_t>((unit % upt) * NT) * p.seqlen + pos0;
    Stage::issue(&bc[unit & 1][0][0][0], raw, p.variableB ? static_cast<const T*>(p.B) + off : nullptr,
                 p.variableC ? static_cast<const T*>(p.C) + off : nullptr, p.seqlen, unitStates(unit), L - pos0,
                 job.vecBC);
  };
  auto complete = [&](int unit) {
    Stage::complete(&bc[unit & 1][0][0][0], raw, p.variableB, p.variableC, unitStates(unit), job.vecBC);
  };
  if (staged) {
    issue(0);
    complete(0);
  }
  __syncthreads();

  for (int tile = 0; tile < nTiles; ++tile) {
    const int q = tile * TILE + lane * K;  // this lane's first position
    const int avail = L - q;
    float dt[K], dtu[K], y[K];
    float dtSum = 0.0f;
    if (active) {
      const int d = job.d0 + warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      const float Dd = p.D != nullptr ? p.D[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
      if (p.z != nullptr && avail > 0) prefetchL2(static_cast<const T*>(p.z) + rowOff + q);
      if (avail > TILE) {  // the next tile's inputs
        prefetchL2(static_cast<const T*>(p.u) + rowOff + q + TILE);
        prefetchL2(static_cast<const T*>(p.delta) + rowOff + q + TILE);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float pre = dv[k] + bias;
        const float t = p.softplus ? softplus(pre) : pre;
        dt[k] = k < avail ? t : 0.0f;
        dtu[k] = dt[k] * uv[k];
        y[k] = Dd * uv[k];
        dtSum += dt[k];
      }
    }

    for (int su = 0; su < upt; ++su) {
      const int unit = tile * upt + su;
      const bool more = staged && unit + 1 < nUnits;
      if (more) issue(unit + 1);
      if (active) {
        const int d = job.d0 + warp;
        const int nChunks = job.nChunks;
        // This channel's checkpoints [c][n]. The entry at a tile start doubles as the carry
        // between tiles: lane 31 writes it at the end of the previous tile, the barriers publish it.
        float* ck = p.states + job.ckOff + static_cast<int64_t>(warp) * nChunks * N;
        const int64_t stateOff = job.stateOff + static_cast<int64_t>(warp) * N;
        const int tileCk = tile * (TILE / kChunk);  // the chunk starting the tile
        const int n0 = su * NT;
        const int nCount = N - n0 < NT ? N - n0 : NT;
#pragma unroll 1
        for (int j = 0; j < nCount; ++j) {
          const int n = n0 + j;
          const float before = tile > 0 ? ck[tileCk * N + n] : p.h0 != nullptr ? p.h0[stateOff + n] : 0.0f;
          const float A2 = __ldg(p.A + static_cast<int64_t>(d) * N + n) * kLog2e;
          float a[K], b[K];
          if (p.variableB) {
            const float* src = &bc[unit & 1][0][j][padIndex(lane * K)];
#pragma unroll
            for (int v = 0; v < K / 4; ++v) {
              const float4 bv = *reinterpret_cast<const float4*>(src + 4 * v);
#pragma unroll
              for (int e = 0; e < 4; ++e) b[4 * v + e] = dtu[4 * v + e] * component(bv, e);
            }
          } else {
            const float bv = __ldg(static_cast<const float*>(p.B) + static_cast<int64_t>(d) * N + n);
#pragma unroll
            for (int k = 0; k < K; ++k) b[k] = dtu[k] * bv;
          }
          float h = 0.0f;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            a[k] = fastExp2(dt[k] * A2);
            h = fmaf(a[k], h, b[k]);
          }
          const Affine incl = scan::warpInclusiveScan<32>(Affine{fastExp2(dtSum * A2), h});
          float x = scan::apply(scan::warpExclusiveFromInclusive<32>(incl), before);  // before this lane
          // Checkpoints inside the tile (at its start only for the first tile; later ones are the
          // previous tile's end).
          if ((lane * K) % kChunk == 0 && (lane > 0 || tile == 0) && q / kChunk < nChunks) {
            ck[(q / kChunk) * N + n] = x;
          }
          if (p.variableC) {
            const float* src = &bc[unit & 1][1][j][padIndex(lane * K)];
#pragma unroll
            for (int v = 0; v < K / 4; ++v) {
              const float4 cv = *reinterpret_cast<const float4*>(src + 4 * v);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int k = 4 * v + e;
                x = fmaf(a[k], x, b[k]);
                y[k] = fmaf(component(cv, e), x, y[k]);
              }
            }
          } else {
            const float cv = __ldg(static_cast<const float*>(p.C) + static_cast<int64_t>(d) * N + n);
#pragma unroll
            for (int k = 0; k < K; ++k) {
              x = fmaf(a[k], x, b[k]);
              y[k] = fmaf(cv, x, y[k]);
            }
          }
          // Lane 31 ends the tile (positions past the sequence's end are identity steps): the next
          // tile's carry, or the final state.
          if (lane == 31) {
            if (tile + 1 < nTiles) {
              ck[(tileCk + TILE / kChunk) * N + n] = x;
            } else if (p.finalState != nullptr) {
              p.finalState[stateOff + n] = x;
            }
          }
        }
      }
      if (more) complete(unit + 1);
      __syncthreads();
    }

    if (active) {
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      if (p.z != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
#pragma unroll
        for (int k = 0; k < K; ++k) y[k] *= silu(zv[k]);
      }
      storeRun(static_cast<T*>(p.y) + rowOff + q, avail, vec, y);
    }
  }
}

// ============================== backward ==============================

template <class T, int W>
__global__ void __launch_bounds__(32 * W, bwdMinBlocks<T>(W)) selectiveScanBackwardKernel(const ScanParams p) {
  constexpr int K = kBwdItems, TILE = kBwdTile, THREADS = 32 * W;
  constexpr int G = kVecElems<T>;
  using Stage = BCStage<T, 1, TILE, THREADS>;
  constexpr int kRow = Stage::kRow;
  __shared__ __align__(16) float bc[2][2][kRow];  // [buffer][B, C][position]
  __shared__ uint4 raw[Stage::kRawSlots];
  __shared__ __align__(16) float part[2][W][2][kRow];  // [buffer][warp][dB, dC][position]
  __shared__ float gcarry[W][kMaxDstate];              // adjoint entering the tile from its end
  __shared__ BlockJob job;
  if (threadIdx.x == 0) job = blockJob<W>(p);
  __syncthreads();

  const int lane = scan::laneId();
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const bool active = warp < job.activeWarps;
  const int N = static_cast<int>(p.dstate);
  const int L = job.length;
  if (active) {
    const int64_t off = job.stateOff + static_cast<int64_t>(warp) * N;
    for (int n = lane; n < N; n += 32) {
      const float g = p.dFinal != nullptr ? p.dFinal[off + n] : 0.0f;
      if (L > 0) {
        gcarry[warp][n] = g;
      } else if (p.dh0 != nullptr) {
        p.dh0[off + n] = g;  // an empty sequence: dh0 = dFinal
      }
    }
  }
  if (L == 0) return;  // the whole block, before any further barrier

  // Unit i = (tile nTiles - 1 - i / N, state i % N): tiles from the last, states in order.
  const int nTiles = (L + TILE - 1) / TILE;
  const int nUnits = nTiles * N;
  const bool staged = p.variableB || p.variableC;
  auto unitPos = [&](int unit) { return (nTiles - 1 - unit / N) * TILE; };
  auto issue = [&](int unit) {
    const int pos0 = unitPos(unit);
    const int64_t off = job.bcOff + static_cast<int64_t>(unit % N) * p.seqlen + pos0;
    Stage::issue(&bc[unit & 1][0][0], raw, p.variableB ? static_cast<const T*>(p.B) + off : nullptr,
                 p.variableC ? static_cast<const T*>(p.C) + off : nullptr, p.seqlen, 1, L - pos0, job.vecBC);
  };
  auto complete = [&](int unit) { Stage::complete(&bc[unit & 1][0][0], raw, p.variableB, p.variableC, 1, job.vecBC); };
  // Adds the block's variable dB / dC contributions of a finished unit to the fp32 targets (laid
  // out like B / C): each thread sums 4 consecutive positions over the active warps.
  auto flush = [&](int unit) {
    const int pos0 = unitPos(unit);
    const int64_t off = job.bcOff + static_cast<int64_t>(unit % N) * p.seqlen + pos0;
    constexpr int kQuads = TILE / 4;
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kQuads; i += THREADS) {
      const int arr = i / kQuads;
      if (!(arr == 0 ? p.variableB : p.variableC)) continue;
      const int qq = (i % kQuads) * 4;
      const int left = L - pos0 - qq;
      if (left <= 0) continue;
      float4 s = *reinterpret_cast<const float4*>(&part[unit & 1][0][arr][padIndex(qq)]);
      for (int w = 1; w < job.activeWarps; ++w) {
        const float4 t = *reinterpret_cast<const float4*>(&part[unit & 1][w][arr][padIndex(qq)]);
        s.x += t.x;
        s.y += t.y;
        s.z += t.z;
        s.w += t.w;
      }
      float* dst = (arr == 0 ? p.dB : p.dC) + off + qq;
      if (left >= 4 && isAligned16(dst)) {
        atomicAddFloat4(dst, s);
      } else {
        atomicAdd(dst, s.x);
        if (left > 1) atomicAdd(dst + 1, s.y);
        if (left > 2) atomicAdd(dst + 2, s.z);
        if (left > 3) atomicAdd(dst + 3, s.w);
      }
    }
  };
  if (staged) {
    issue(0);
    complete(0);
  }
  __syncthreads();

  float dDSum = 0.0f, dBiasSum = 0.0f;  // this lane's share of dD and dDeltaBias
  for (int ti = 0; ti < nTiles; ++ti) {
    const int tile = nTiles - 1 - ti;
    const int q = tile * TILE + lane * K;
    const int avail = L - q;
    // Per position: dt, dt*u, dout = dy*silu(z), and sums over the states of g*B, A*g*a*x_{t-1}
    // and C*x (the latter for dz).
    float dt[K], dtu[K], dout[K], sumGB[K], sumAW[K], out[K];
    float dtRest = 0.0f;  // dt summed over this lane's positions 1..K-1
    if (active) {
      const int d = job.d0 + warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
      if (p.dy != nullptr) {
        loadRun(static_cast<const T*>(p.dy) + rowOff + q, avail, vec, dout);
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) dout[k] = 0.0f;
      }
      if (p.z != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
#pragma unroll
        for (int k = 0; k < K; ++k) dout[k] *= silu(zv[k]);
      }
      if (tile > 0) {  // the next tile's inputs (the one before in time)
        const int64_t prev = rowOff + q - TILE;
        prefetchL2(static_cast<const T*>(p.u) + prev);
        prefetchL2(static_cast<const T*>(p.delta) + prev);
        if (p.dy != nullptr) prefetchL2(static_cast<const T*>(p.dy) + prev);
        if (p.z != nullptr) prefetchL2(static_cast<const T*>(p.z) + prev);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float pre = dv[k] + bias;
        const float t = p.softplus ? softplus(pre) : pre;
        dt[k] = k < avail ? t : 0.0f;
        dtu[k] = dt[k] * uv[k];
        sumGB[k] = 0.0f;
        sumAW[k] = 0.0f;
        out[k] = 0.0f;
        if (k > 0) dtRest += dt[k];
      }
    }

    for (int n = 0; n < N; ++n) {
      const int unit = ti * N + n;
      const bool more = staged && unit + 1 < nUnits;
      if (more) issue(unit + 1);
      if (active) {
        const int d = job.d0 + warp;
        const float A2 = __ldg(p.A + static_cast<int64_t>(d) * N + n) * kLog2e;
        // B at this lane's positions (read twice from shared memory rather than held throughout).
        const float* bSrc = &bc[unit & 1][0][padIndex(lane * K)];
        const float bConst =
            p.variableB ? 0.0f : __ldg(static_cast<const float*>(p.B) + static_cast<int64_t>(d) * N + n);
        auto loadB = [&](float(&bv)[K]) {
          if (p.variableB) {
#pragma unroll
            for (int v = 0; v < K / 4; ++v) {
              const float4 t = *reinterpret_cast<const float4*>(bSrc + 4 * v);
#pragma unroll
              for (int e = 0; e < 4; ++e) bv[4 * v + e] = component(t, e);
            }
          } else {
#pragma unroll
            for (int k = 0; k < K; ++k) bv[k] = bConst;
          }
        };

        // Forward states of the tile from the checkpoint: xs[k] = x at position k, x0 = before.
        float a[K], xs[K];
        float h = 0.0f;
        {
          float bv[K];
          loadB(bv);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            a[k] = fastExp2(dt[k] * A2);
            xs[k] = dtu[k] * bv[k];
            h = fmaf(a[k], h, xs[k]);
          }
        }
        const float* ck = p.checkpoints + job.ckOff + static_cast<int64_t>(warp) * job.nChunks * N;
        const float checkpoint = ck[tile * (TILE / kChunk) * N + n];  // x entering the tile
        const Affine incl = scan::warpInclusiveScan<32>(Affine{fastExp2((dt[0] + dtRest) * A2), h});
        const float x0 = scan::apply(scan::warpExclusiveFromInclusive<32>(incl), checkpoint);
        {
          float x = x0;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            x = fmaf(a[k], x, xs[k]);
            xs[k] = x;
          }
        }

        // Adjoint, backwards: g_k = alpha_k * g_{k+1} + C_k * dout_k, alpha_k = a_{k+1}; after this
        // lane's last position comes the next lane's first a (lane 31: the carry includes it).
        float g[K];
        if (p.variableC) {
          const float* src = &bc[unit & 1][1][padIndex(lane * K)];
#pragma unroll
          for (int v = 0; v < K / 4; ++v) {
            const float4 t = *reinterpret_cast<const float4*>(src + 4 * v);
#pragma unroll
            for (int e = 0; e < 4; ++e) g[4 * v + e] = component(t, e);
          }
        } else {
          const float t = __ldg(static_cast<const float*>(p.C) + static_cast<int64_t>(d) * N + n);
#pragma unroll
          for (int k = 0; k < K; ++k) g[k] = t;
        }
        if (p.z != nullptr) {
#pragma unroll
          for (int k = 0; k < K; ++k) out[k] = fmaf(g[k], xs[k], out[k]);
        }
        const float aNext = __shfl_down_sync(scan::kFullMask, a[0], 1);
        const float alphaLast = lane == 31 ? 1.0f : aNext;
        float hr = 0.0f;
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          g[k] *= dout[k];
          hr = fmaf(k == K - 1 ? alphaLast : a[k + 1 < K ? k + 1 : 0], hr, g[k]);
        }
        const Affine inclR = scan::warpInclusiveScanReverse<32>(Affine{fastExp2(dtRest * A2) * alphaLast, hr});
        {
          float gg = scan::apply(scan::warpExclusiveFromInclusiveReverse<32>(inclR), gcarry[warp][n]);
#pragma unroll
          for (int k = K - 1; k >= 0; --k) {
            gg = fmaf(k == K - 1 ? alphaLast : a[k + 1 < K ? k + 1 : 0], gg, g[k]);
            g[k] = gg;
          }
        }

        // Gradients. bv becomes this channel's dB contribution, xs (after its last use) its dC one.
        float dASum = 0.0f, dBSum = 0.0f, dCSum = 0.0f;
        float bv[K];
        loadB(bv);
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          const float xPrev = k == 0 ? x0 : xs[k > 0 ? k - 1 : 0];
          const float w = g[k] * a[k] * xPrev;
          sumAW[k] = fmaf(A2, w, sumAW[k]);  // times ln 2 at the end
          dASum = fmaf(dt[k], w, dASum);
          sumGB[k] = fmaf(g[k], bv[k], sumGB[k]);
          bv[k] = g[k] * dtu[k];
          xs[k] = dout[k] * xs[k];
          dBSum += bv[k];
          dCSum += xs[k];
        }
        if (p.variableB) {
          float* dst = &part[unit & 1][warp][0][padIndex(lane * K)];
#pragma unroll
          for (int v = 0; v < K / 4; ++v) {
            *reinterpret_cast<float4*>(dst + 4 * v) =
                make_float4(bv[4 * v], bv[4 * v + 1], bv[4 * v + 2], bv[4 * v + 3]);
          }
        }
        if (p.variableC) {
          float* dst = &part[unit & 1][warp][1][padIndex(lane * K)];
#pragma unroll
          for (int v = 0; v < K / 4; ++v) {
            *reinterpret_cast<float4*>(dst + 4 * v) =
                make_float4(xs[4 * v], xs[4 * v + 1], xs[4 * v + 2], xs[4 * v + 3]);
          }
        }
        const int64_t param = static_cast<int64_t>(d) * N + n;
        dASum = warpSum(dASum);
        if (lane == 0) atomicAdd(p.dA + param, dASum);
        if (!p.variableB) {
          dBSum = warpSum(dBSum);
          if (lane == 0) atomicAdd(p.dB + param, dBSum);
        }
        if (!p.variableC) {
          dCSum = warpSum(dCSum);
          if (lane == 0) atomicAdd(p.dC + param, dCSum);
        }
        if (lane == 0) gcarry[warp][n] = a[0] * g[0];  // into the previous tile (dh0 after the first)
      }
      if (unit > 0 && staged) flush(unit - 1);  // the previous unit's contributions are complete
      if (more) complete(unit + 1);
      __syncthreads();
    }

    if (active) {
      const int d = job.d0 + warp;
      const int64_t rowOff = job.rowOff + static_cast<int64_t>(warp) * p.seqlen;
      const bool vec = p.aligned && rowOff % G == 0;
      const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
      const float Dd = p.D != nullptr ? p.D[d] : 0.0f;
      float uv[K], dv[K];
      loadRun(static_cast<const T*>(p.u) + rowOff + q, avail, vec, uv);
      loadRun(static_cast<const T*>(p.delta) + rowOff + q, avail, vec, dv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float ddt = fmaf(uv[k], sumGB[k], sumAW[k] * kLn2);
        if (p.softplus) ddt *= softplusGrad(dv[k] + bias);
        sumGB[k] = fmaf(Dd, dout[k], dt[k] * sumGB[k]);  // du
        sumAW[k] = ddt;                                  // ddelta
        out[k] = fmaf(Dd, uv[k], out[k]);                // y before the gate
        if (k < avail) {
          dDSum = fmaf(dout[k], uv[k], dDSum);
          dBiasSum += ddt;
        }
      }
      storeRun(static_cast<T*>(p.du) + rowOff + q, avail, vec, sumGB);
      storeRun(static_cast<T*>(p.ddelta) + rowOff + q, avail, vec, sumAW);
      if (p.dz != nullptr) {
        float zv[K];
        loadRun(static_cast<const T*>(p.z) + rowOff + q, avail, vec, zv);
        if (p.dy != nullptr) {
          loadRun(static_cast<const T*>(p.dy) + rowOff + q, avail, vec, dv);
        } else {
#pragma unroll
          for (int k = 0; k < K; ++k) dv[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < K; ++k) dv[k] *= out[k] * siluGrad(zv[k]);
        storeRun(static_cast<T*>(p.dz) + rowOff + q, avail, vec, dv);
      }
    }
  }
  if (staged) flush(nUnits - 1);

  if (active) {
    const int d = job.d0 + warp;
    if (p.dh0 != nullptr) {
      const int64_t off = job.stateOff + static_cast<int64_t>(warp) * N;
      for (int n = lane; n < N; n += 32) p.dh0[off + n] = gcarry[warp][n];
    }
    if (p.dD != nullptr) {
      dDSum = warpSum(dDSum);
      if (lane == 0) atomicAdd(p.dD + d, dDSum);
    }
    if (p.dDeltaBias != nullptr) {
      dBiasSum = warpSum(dBiasSum);
      if (lane == 0) atomicAdd(p.dDeltaBias + d, dBiasSum);
    }
  }
}

// ============================== positions in no sequence ==============================

// Zeroes the positions [start, start + length) of every row of up to three [rows, seqlen] tensors,
// for each (start, length) pair of `gaps`. One block per (row, gap), grid-stride beyond the grid.
template <class T>
__global__ void __launch_bounds__(128)
    zeroGapsKernel(T* o0, T* o1, T* o2, int64_t rows, int64_t seqlen, const int64_t* gaps, int64_t nGaps) {
  const T zero = fromFloat<T>(0.0f);
  for (int64_t item = blockIdx.x; item < rows * nGaps; item += gridDim.x) {
    const int64_t row = item / nGaps;
    const int64_t gi = item - row * nGaps;
    const int64_t start = gaps[2 * gi], length = gaps[2 * gi + 1];
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      const int64_t off = row * seqlen + start + t;
      if (o0 != nullptr) o0[off] = zero;
      if (o1 != nullptr) o1[off] = zero;
      if (o2 != nullptr) o2[off] = zero;
    }
  }
}

// ============================== launch ==============================

inline Status smCount(int* count) {
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  RK_CUDA_TRY(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, dev));
  return Status{};
}

// Checks the sizes and the sequence table of a call (so that no kernel can go out of bounds) and
// lists the (start, length) ranges of positions in no sequence (packed input only).
Status checkScanArgs(const SelectiveScanArgs& a, const std::string& fn, std::vector<int64_t>* gaps) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.batch < 0 || a.dim < 0 || a.seqlen < 0) return bad("negative size");
  // Positions within a sequence and channel numbers are 32-bit in the kernels.
  if (a.seqlen > kMaxSeqlen || a.dim > INT_MAX) return bad("seqlen above 2^30 or dim above 2^31 - 1");
  if (a.dstate < 1 || a.dstate > kMaxDstate) return bad("dstate must be in 1..256");
  if (a.groups < 1 || a.dim % a.groups != 0) return bad("dim must be a positive multiple of groups");
  if (a.chunk != kChunk) return bad("chunk must be selectiveScanChunk() = " + std::to_string(kChunk));
  RK_TRY(checkSequences(a.segments, a.nseq, a.batch, a.seqlen, a.packed, kChunk, a.totalChunks, fn, gaps));
  if (a.dim > 0 && a.nseq > 0 && a.seqlen > 0 &&
      (a.u == nullptr || a.delta == nullptr || a.A == nullptr || a.B == nullptr || a.C == nullptr)) {
    return bad("null input");
  }
  return Status{};
}

ScanParams baseParams(const SelectiveScanArgs& a) {
  ScanParams p;
  p.dim = a.dim;
  p.seqlen = a.seqlen;
  p.dstate = a.dstate;
  p.groups = a.groups;
  p.channelsPerGroup = a.dim / a.groups;
  p.uniformChunks = (a.seqlen + kChunk - 1) / kChunk;
  p.u = a.u;
  p.delta = a.delta;
  p.A = a.A;
  p.B = a.B;
  p.C = a.C;
  p.D = a.D;
  p.z = a.z;
  p.deltaBias = a.deltaBias;
  p.h0 = a.h0;
  p.variableB = a.variableB;
  p.variableC = a.variableC;
  p.softplus = a.deltaSoftplus;
  return p;
}

bool allAligned(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs) {
    if (q != nullptr && !isAligned16(q)) return false;
  }
  return true;
}

// Device copy of the sequence table (packed input), followed by the gap list; both null without
// packing.
Status uploadTable(const SelectiveScanArgs& a, const std::vector<int64_t>& gaps, DeviceBuffer* buffer,
                   const ScanSegment** segments, const int64_t** gapList) {
  return uploadSequences(a.segments, a.nseq, a.packed, gaps, buffer, segments, gapList);
}

template <class T>
Status launchZeroGaps(T* o0, T* o1, T* o2, int64_t rows, int64_t seqlen, const int64_t* gaps, int64_t nGaps) {
  if (nGaps == 0 || rows == 0) return Status{};
  const int64_t items = rows * nGaps;
  const unsigned blocks = static_cast<unsigned>(items < 65535 ? items : 65535);
  return launch(zeroGapsKernel<T>, blocks, 128, 0, o0, o1, o2, rows, seqlen, gaps, nGaps);
}

// Grid for W channels per block; fails when the grid would not fit.
Status gridFor(ScanParams& p, int64_t nseq, int warps, unsigned* grid) {
  p.blocksPerGroup = ceilDiv(p.channelsPerGroup, warps);
  const int64_t blocks = nseq * p.groups * p.blocksPerGroup;
  if (blocks > INT_MAX) return statusError("selective scan: too many sequences x channels for one launch");
  *grid = static_cast<unsigned>(blocks);
  return Status{};
}

// Channels per block: the larger choice unless that leaves fewer than `wave` blocks per SM.
int chooseWarps(const char* name, const ScanParams& p, int64_t nseq, int large, int small, int wave) {
  int sms = 0;
  if (!smCount(&sms).ok() || sms <= 0) sms = 132;
  const int64_t blocksLarge = nseq * p.groups * ceilDiv(p.channelsPerGroup, large);
  return tunable(name, blocksLarge >= static_cast<int64_t>(wave) * sms ? large : small);
}

template <class T> Status launchForward(ScanParams p, int64_t nseq) {
  const int warps = chooseWarps("selectiveScan.forwardWarps", p, nseq, 8, 4, 2);
  unsigned grid = 0;
  switch (warps) {
    case 4:
      RK_TRY(gridFor(p, nseq, 4, &grid));
      return launch(selectiveScanForwardKernel<T, 4>, grid, 32 * 4, 0, p);
    case 8:
      RK_TRY(gridFor(p, nseq, 8, &grid));
      return launch(selectiveScanForwardKernel<T, 8>, grid, 32 * 8, 0, p);
    default:
      return statusError("selectiveScanForward: unsupported warps per block " + std::to_string(warps));
  }
}

template <class T> Status launchBackward(ScanParams p, int64_t nseq) {
  const int warps = chooseWarps("selectiveScan.backwardWarps", p, nseq, 4, 2, 3);
  unsigned grid = 0;
  switch (warps) {
    case 2:
      RK_TRY(gridFor(p, nseq, 2, &grid));
      return launch(selectiveScanBackwardKernel<T, 2>, grid, 32 * 2, 0, p);
    case 4:
      RK_TRY(gridFor(p, nseq, 4, &grid));
      return launch(selectiveScanBackwardKernel<T, 4>, grid, 32 * 4, 0, p);
    default:
      return statusError("selectiveScanBackward: unsupported warps per block " + std::to_string(warps));
  }
}

}  // namespace

int64_t selectiveScanChunk() { return kChunk; }

Status selectiveScanForward(const SelectiveScanArgs& a, void* y, float* states, float* finalState) {
  std::vector<int64_t> gaps;
  RK_TRY(checkScanArgs(a, "selectiveScanForward", &gaps));
  if (a.dim == 0) return Status{};
  if (a.batch * a.seqlen > 0 && y == nullptr) return statusError("selectiveScanForward: null y");
  if (a.totalChunks > 0 && states == nullptr) return statusError("selectiveScanForward: null states");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    ScanParams p = baseParams(a);
    p.y = y;
    p.states = states;
    p.finalState = finalState;
    p.aligned = allAligned({a.u, a.delta, a.z, y, a.variableB ? a.B : nullptr, a.variableC ? a.C : nullptr});
    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadTable(a, gaps, &table, &p.segments, &gapList));
    if (a.nseq > 0) RK_TRY(launchForward<T>(p, a.nseq));
    return launchZeroGaps<T>(static_cast<T*>(y), nullptr, nullptr, a.dim, a.seqlen, gapList,
                             static_cast<int64_t>(gaps.size() / 2));
  });
}

Status selectiveScanBackward(const SelectiveScanArgs& a, const SelectiveScanGrads& g) {
  std::vector<int64_t> gaps;
  RK_TRY(checkScanArgs(a, "selectiveScanBackward", &gaps));
  if (a.dim == 0) return Status{};
  auto bad = [](const char* what) { return statusError(std::string("selectiveScanBackward: ") + what); };
  const int64_t elements = a.batch * a.dim * a.seqlen;
  if (elements > 0 && (g.du == nullptr || g.ddelta == nullptr)) return bad("null du or ddelta");
  if (g.dA == nullptr || g.dB == nullptr || g.dC == nullptr) return bad("null dA, dB or dC");
  if ((a.D != nullptr) != (g.dD != nullptr)) return bad("dD must be given exactly when D is");
  if (elements > 0 && (a.z != nullptr) != (g.dz != nullptr)) return bad("dz must be given exactly when z is");
  if ((a.deltaBias != nullptr) != (g.dDeltaBias != nullptr))
    return bad("dDeltaBias must be given exactly when deltaBias is");
  if (a.totalChunks > 0 && g.states == nullptr) return bad("null checkpoints");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    ScanParams p = baseParams(a);
    p.checkpoints = g.states;
    p.dy = g.dy;
    p.dFinal = g.dFinal;
    p.du = g.du;
    p.ddelta = g.ddelta;
    p.dz = a.z != nullptr ? g.dz : nullptr;
    p.dA = g.dA;
    p.dD = g.dD;
    p.dDeltaBias = g.dDeltaBias;
    p.dh0 = g.dh0;
    p.aligned = allAligned(
        {a.u, a.delta, a.z, g.dy, g.du, g.ddelta, p.dz, a.variableB ? a.B : nullptr, a.variableC ? a.C : nullptr});

    // Accumulated outputs start at zero; a variable dB / dC of a 16-bit dtype is summed in fp32
    // scratch first.
    const int64_t params = a.dim * a.dstate;
    const int64_t bcElems = a.batch * a.groups * a.dstate * a.seqlen;
    const bool f32 = a.dt == DType::F32;
    DeviceBuffer scratchB, scratchC;
    auto target = [&](bool variable, void* out, DeviceBuffer* scratch, float** dst) -> Status {
      if (!variable || f32) {
        *dst = static_cast<float*>(out);
        return zeroFloats(*dst, variable ? bcElems : params);
      }
      if (bcElems == 0) return Status{};
      RK_TRY(scratch->allocate(static_cast<size_t>(bcElems) * sizeof(float)));
      *dst = static_cast<float*>(scratch->get());
      return zeroFloats(*dst, bcElems);
    };
    RK_TRY(target(a.variableB, g.dB, &scratchB, &p.dB));
    RK_TRY(target(a.variableC, g.dC, &scratchC, &p.dC));
    RK_TRY(zeroFloats(g.dA, params));
    RK_TRY(zeroFloats(g.dD, a.dim));
    RK_TRY(zeroFloats(g.dDeltaBias, a.dim));

    DeviceBuffer table;
    const int64_t* gapList = nullptr;
    RK_TRY(uploadTable(a, gaps, &table, &p.segments, &gapList));
    if (a.nseq > 0) RK_TRY(launchBackward<T>(p, a.nseq));
    RK_TRY(launchZeroGaps<T>(static_cast<T*>(g.du), static_cast<T*>(g.ddelta), static_cast<T*>(p.dz), a.dim, a.seqlen,
                             gapList, static_cast<int64_t>(gaps.size() / 2)));
    if (a.variableB && !f32) RK_TRY(convert(DType::F32, p.dB, a.dt, g.dB, bcElems));
    if (a.variableC && !f32) RK_TRY(convert(DType::F32, p.dC, a.dt, g.dC, bcElems));
    return Status{};
  });
}

}  // namespace rkcuda
