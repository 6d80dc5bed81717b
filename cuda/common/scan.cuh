// Reusable parallel scan of first-order linear recurrences h -> a*h + b, in fp32.
//
// An element is an affine map (a, b). Scanning a sequence of maps yields, at each position, the
// composition of all maps up to it; applied to the initial state, that gives the state there.
// Composition is associative but not commutative:
//     (a1, b1) then (a2, b2)  =  (a1*a2, a2*b1 + b2),       identity = (1, 0).
//
// Building blocks (all lanes of the warps involved must take part; blocks are 1-D):
//   * thread level:  threadReduce / threadApply over ITEMS contiguous items held in registers;
//   * warp level:    warpInclusiveScan (__shfl_up_sync, log2(32) steps), warpExclusiveFromInclusive (from an inclusive
//   result);
//                    warpInclusiveScanReverse / warpExclusiveFromInclusiveReverse, the same in
//                    decreasing lane order (__shfl_down_sync), for recurrences run backwards in time;
//   * block level:   BlockScan<THREADS> (THREADS a multiple of 32, up to 1024): per-warp totals
//                    go through shared memory, one __syncthreads per call, with an optional
//                    carry callback so that a long sequence can be walked in block-sized chunks;
//   * striped chunks: stripedChunkStarts, for the register layout used by the linear-scan
//                    kernels, where each lane holds V groups of contiguous items and the groups of
//                    a warp are 32 lanes apart (so that loads stay fully coalesced);
//   * coupled states: AffineN<S>, the same maps on S states with an S x S matrix (identityN,
//                    compose, apply), for recurrences whose states feed each other.
// Tails: give positions past the end the identity element; they then leave states unchanged
// (fmaf(1, h, 0) == h in value; -0 becomes +0), so a state read after them is the state after the last real item.
#pragma once
#include <cuda_runtime.h>

namespace rkcuda {
namespace scan {

constexpr unsigned kFullMask = 0xffffffffu;

// The affine map h -> a*h + b.
struct Affine {
  float a;
  float b;
};

__device__ __forceinline__ Affine identity() { return Affine{1.0f, 0.0f}; }

// first, then second.
__device__ __forceinline__ Affine compose(const Affine& first, const Affine& second) {
  return Affine{first.a * second.a, fmaf(second.a, first.b, second.b)};
}

// f(h) = a*h + b.
__device__ __forceinline__ float apply(const Affine& f, float h) { return fmaf(f.a, h, f.b); }

// ---- thread level ----

// Composition of ITEMS contiguous items (a[0], b[0]) then ... then (a[ITEMS-1], b[ITEMS-1]).
template <int ITEMS> __device__ __forceinline__ Affine threadReduce(const float (&a)[ITEMS], const float (&b)[ITEMS]) {
  Affine acc{a[0], b[0]};
#pragma unroll
  for (int i = 1; i < ITEMS; ++i) {
    acc.a *= a[i];
    acc.b = fmaf(a[i], acc.b, b[i]);
  }
  return acc;
}

// Runs the items sequentially from state h, overwriting b[i] with the state after item i. Returns the
// state after the last item.
template <int ITEMS> __device__ __forceinline__ float threadApply(const float (&a)[ITEMS], float (&b)[ITEMS], float h) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    h = fmaf(a[i], h, b[i]);
    b[i] = h;
  }
  return h;
}

// ---- warp level ----

__device__ __forceinline__ int laneId() { return static_cast<int>(threadIdx.x) & 31; }

__device__ __forceinline__ Affine shflIdx(const Affine& x, int srcLane, int width = 32) {
  return Affine{__shfl_sync(kFullMask, x.a, srcLane, width), __shfl_sync(kFullMask, x.b, srcLane, width)};
}

// Inclusive scan across groups of WIDTH consecutive lanes (WIDTH a power of two up to 32; all 32
// lanes must call): lane i of a group gets x_0 then ... then x_i of its group.
template <int WIDTH = 32> __device__ __forceinline__ Affine warpInclusiveScan(Affine x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two <= 32");
  const int lane = laneId() & (WIDTH - 1);
#pragma unroll
  for (int d = 1; d < WIDTH; d <<= 1) {
    const float pa = __shfl_up_sync(kFullMask, x.a, d, WIDTH);
    const float pb = __shfl_up_sync(kFullMask, x.b, d, WIDTH);
    if (lane >= d) x = compose(Affine{pa, pb}, x);
  }
  return x;
}

// Exclusive counterpart, from an inclusive result: lane i gets x_0 then ... then x_{i-1}
// (identity for the first lane of each group).
template <int WIDTH = 32> __device__ __forceinline__ Affine warpExclusiveFromInclusive(const Affine& inclusive) {
  const int lane = laneId() & (WIDTH - 1);
  const float pa = __shfl_up_sync(kFullMask, inclusive.a, 1, WIDTH);
  const float pb = __shfl_up_sync(kFullMask, inclusive.b, 1, WIDTH);
  return lane == 0 ? identity() : Affine{pa, pb};
}

// Reverse order: the sequence runs from the last lane of each group of WIDTH lanes down to its
// first. Lane i gets x_{WIDTH-1} then ... then x_i (the maps of the higher lanes are applied first).
template <int WIDTH = 32> __device__ __forceinline__ Affine warpInclusiveScanReverse(Affine x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two <= 32");
  const int lane = laneId() & (WIDTH - 1);
#pragma unroll
  for (int d = 1; d < WIDTH; d <<= 1) {
    const float pa = __shfl_down_sync(kFullMask, x.a, d, WIDTH);
    const float pb = __shfl_down_sync(kFullMask, x.b, d, WIDTH);
    if (lane + d < WIDTH) x = compose(Affine{pa, pb}, x);
  }
  return x;
}

// Exclusive counterpart: lane i gets x_{WIDTH-1} then ... then x_{i+1} (identity for the last lane of
// each group).
template <int WIDTH = 32> __device__ __forceinline__ Affine warpExclusiveFromInclusiveReverse(const Affine& inclusive) {
  const int lane = laneId() & (WIDTH - 1);
  const float pa = __shfl_down_sync(kFullMask, inclusive.a, 1, WIDTH);
  const float pb = __shfl_down_sync(kFullMask, inclusive.b, 1, WIDTH);
  return lane == WIDTH - 1 ? identity() : Affine{pa, pb};
}

// ---- block level ----

// Running carry for walking a long sequence chunk by chunk: holds the state h at the end of the
// previous chunk (h0 before the first). Called with a chunk's aggregate, it returns the chunk's
// prefix as the constant map (0, h) (so prefix-composed results have b == the state there) and
// moves h past the chunk.
struct StateCarry {
  float h;
  __device__ __forceinline__ Affine operator()(const Affine& chunkAggregate) {
    const Affine prefix{0.0f, h};
    h = apply(chunkAggregate, h);
    return prefix;
  }
};

// Scan across the THREADS threads of a 1-D block (threadIdx.x order). Every thread must make the
// same sequence of calls. Shared storage is double-buffered so each call needs a single
// __syncthreads; do not reuse the TempStorage for anything else while the BlockScan is in use.
template <int THREADS> class BlockScan {
 public:
  static_assert(THREADS % 32 == 0 && THREADS >= 32 && THREADS <= 1024, "THREADS: 32..1024, multiple of 32");
  static constexpr int kWarps = THREADS / 32;

  struct TempStorage {
    Affine warpTotals[2][kWarps];
  };

  __device__ __forceinline__ explicit BlockScan(TempStorage& storage) : storage_(storage), phase_(0) {}

  // Each warp passes its aggregate (read from lane 31 only). Returns, in every lane, the composition
  // of the aggregates of the lower-numbered warps (identity for warp 0), and sets blockAggregate to
  // the composition of all warps' aggregates (identical in every thread).
  __device__ __forceinline__ Affine warpPrefix(const Affine& warpAggregate, Affine& blockAggregate) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int lane = laneId();
    Affine* totals = storage_.warpTotals[phase_];
    phase_ ^= 1;
    if (lane == 31) totals[warp] = warpAggregate;
    __syncthreads();
    if constexpr (kWarps == 1) {
      blockAggregate = totals[0];
      return identity();
    } else if constexpr (kWarps <= 8) {
      // Few warps: every thread composes the totals in order (broadcast reads, no conflicts).
      Affine prefix = identity();
      Affine running = totals[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        if (w == warp) prefix = running;
        running = compose(running, totals[w]);
      }
      blockAggregate = running;
      return prefix;
    } else {
      // Many warps: each warp scans the totals itself (no second barrier needed).
      const Affine t = lane < kWarps ? totals[lane] : identity();
      const Affine incl = warpInclusiveScan<32>(t);
      blockAggregate = shflIdx(incl, kWarps - 1);
      const Affine before = shflIdx(incl, (warp + 31) & 31);
      return warp == 0 ? identity() : before;
    }
  }

  // Inclusive scan of one element per thread; blockAggregate receives the whole block's composition.
  __device__ __forceinline__ Affine inclusiveScan(const Affine& x, Affine& blockAggregate) {
    const Affine incl = warpInclusiveScan<32>(x);
    const Affine prefix = warpPrefix(incl, blockAggregate);
    return compose(prefix, incl);
  }

  // Exclusive scan of one element per thread (identity for thread 0).
  __device__ __forceinline__ Affine exclusiveScan(const Affine& x, Affine& blockAggregate) {
    const Affine incl = warpInclusiveScan<32>(x);
    const Affine prefix = warpPrefix(incl, blockAggregate);
    return compose(prefix, warpExclusiveFromInclusive<32>(incl));
  }

  // With a carry callback: carry(blockAggregate) is called by every thread with the same aggregate,
  // must return the same prefix (what precedes this chunk) in every thread, and updates itself for
  // the next chunk (see StateCarry). The result includes that prefix.
  template <class Carry> __device__ __forceinline__ Affine inclusiveScan(const Affine& x, Carry& carry) {
    Affine aggregate;
    const Affine incl = inclusiveScan(x, aggregate);
    return compose(carry(aggregate), incl);
  }
  template <class Carry> __device__ __forceinline__ Affine exclusiveScan(const Affine& x, Carry& carry) {
    Affine aggregate;
    const Affine excl = exclusiveScan(x, aggregate);
    return compose(carry(aggregate), excl);
  }

 private:
  TempStorage& storage_;
  int phase_;
};

// ---- striped chunks ----
//
// Layout: a chunk of a sequence is split among WARPS warps, warp w taking the contiguous segment
// [w*32*V*G, (w+1)*32*V*G). Within a warp segment, group k (0 <= k < V) of lane l covers the G
// contiguous positions starting at k*32*G + l*G. So for each k the warp reads 32*G contiguous
// elements (one coalesced access), while each thread still owns contiguous runs to reduce
// sequentially.
//
// Given part[k] = the composition of this thread's group k, computes start[k] = the state just
// before that group, from `carry` = the state before the chunk, and advances carry to the state
// after the chunk. WARPS == 1: each warp is its own sequence (no shared memory, no barrier,
// bs unused, may be null). WARPS > 1: the block's WARPS warps share the chunk; bs must be a
// BlockScan<32*WARPS> on that block and every thread of the block must call.
template <int V, int WARPS>
__device__ __forceinline__ void stripedChunkStarts(const Affine (&part)[V], float& carry, float (&start)[V],
                                                   BlockScan<32 * WARPS>* bs) {
  const int lane = laneId();
  Affine incl[V];
#pragma unroll
  for (int k = 0; k < V; ++k) incl[k] = warpInclusiveScan<32>(part[k]);

  float s;  // state before group k of lane 0
  if constexpr (WARPS == 1) {
    s = carry;
  } else {
    Affine warpAggregate = incl[0];  // meaningful in lane 31
#pragma unroll
    for (int k = 1; k < V; ++k) warpAggregate = compose(warpAggregate, incl[k]);
    Affine chunkAggregate;
    const Affine before = bs->warpPrefix(warpAggregate, chunkAggregate);
    s = apply(before, carry);
    carry = apply(chunkAggregate, carry);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float end = apply(incl[k], s);  // state after this lane's group k
    const float prevEnd = __shfl_up_sync(kFullMask, end, 1);
    start[k] = lane == 0 ? s : prevEnd;
    s = __shfl_sync(kFullMask, end, 31);
  }
  if constexpr (WARPS == 1) carry = s;
}

// ---- coupled states ----
//
// The map h -> A h + b on S coupled states (A an S x S matrix), for recurrences whose states
// feed each other (S = 2: an LSTM channel's (h, c)). Composition as above, with matrix products:
//     (A1, b1) then (A2, b2)  =  (A2 A1, A2 b1 + b2),       identity = (I, 0).
template <int S> struct AffineN {
  float a[S][S];
  float b[S];
};

template <int S> __device__ __forceinline__ AffineN<S> identityN() {
  AffineN<S> r;
#pragma unroll
  for (int i = 0; i < S; ++i) {
#pragma unroll
    for (int j = 0; j < S; ++j) r.a[i][j] = i == j ? 1.0f : 0.0f;
    r.b[i] = 0.0f;
  }
  return r;
}

// first, then second.
template <int S> __device__ __forceinline__ AffineN<S> compose(const AffineN<S>& first, const AffineN<S>& second) {
  AffineN<S> r;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float bi = second.b[i];
#pragma unroll
    for (int k = 0; k < S; ++k) bi = fmaf(second.a[i][k], first.b[k], bi);
    r.b[i] = bi;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      float aij = 0.0f;
#pragma unroll
      for (int k = 0; k < S; ++k) aij = fmaf(second.a[i][k], first.a[k][j], aij);
      r.a[i][j] = aij;
    }
  }
  return r;
}

// out = A h + b (out may not alias h).
template <int S> __device__ __forceinline__ void apply(const AffineN<S>& f, const float (&h)[S], float (&out)[S]) {
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float v = f.b[i];
#pragma unroll
    for (int k = 0; k < S; ++k) v = fmaf(f.a[i][k], h[k], v);
    out[i] = v;
  }
}

}  // namespace scan
}  // namespace rkcuda
