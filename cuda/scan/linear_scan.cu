// Linear scan h_t = a_t * h_{t-1} + b_t over independent rows (forward and backward), for
// F32/F16/BF16 storage with fp32 state: kernels plus the launchers declared in common/api.h.
//
// Work split. A row is walked by WARPS warps (1 warp per row and 4 rows per block when there are
// many rows; 2, 4 or 8 warps sharing a row, one row per block, when there are few), in chunks of
// CHUNK = WARPS * 32 * V * G positions, where G = 16 / sizeof(T) is the number of elements in a
// 16-byte vector and V the number of vectors per thread per array. Within a chunk the layout is
// the "striped" one of scan.cuh: warp w owns a contiguous segment, and lane l's group k holds the G
// contiguous positions k*32*G + l*G (+ segment start), so each group index k is one fully coalesced
// 512-byte access per warp. Each thread reduces its groups sequentially, the warp scans them with
// shuffles, warps of a row combine through shared memory (scan::BlockScan), and the carry (the
// state at the end of the previous chunk) is a single float. The next chunk is loaded into a second
// register buffer while the current one is computed.
//
// Directions. "Scan order" position q runs 0..L-1; memory index = q (ascending) or L-1-q
// (DESC). A reverse forward scan is DESC; the backward pass runs opposite to its forward scan.
//
// Aliasing: the [rows, length] outputs must not overlap the inputs. The per-row fp32 vectors may:
// h0 and finalState (gFinal and gh0) can be one buffer, since each row's value is read before
// the same row's result is written.
//
// Vector path: whole rows are walked with 16-byte loads/stores when every pointer is 16-byte
// aligned and L % G == 0 (then every row start and every group is aligned, in both directions, and
// a group is either entirely inside the row or entirely past its end). Otherwise the same kernels
// run with per-element loads (the VEC = false instantiations).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/api.h"
#include "scan/linear_scan.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/scan.cuh"

namespace rkcuda {
namespace {

using scan::Affine;

// Vectors (groups) per thread per array and chunk: 16 items per thread in the forward pass (two
// arrays), 8 in the backward pass (three arrays); both double-buffered, within 128 registers.
template <class T> constexpr int kFwdGroups = 16 / kVecElems<T>;
template <class T> constexpr int kBwdGroups = 8 / kVecElems<T>;
// Rows per block (one warp each) in the WARPS == 1 configuration.
constexpr int kRowsPerBlock1 = 4;

constexpr int blockThreads(int warps) { return warps == 1 ? 32 * kRowsPerBlock1 : 32 * warps; }
// Resident blocks per SM to ask for: at least 16 warps (at most 128 registers per thread) on the
// vector path; at least 12 on the per-element fallback, which needs a few more registers to stay
// clear of local memory.
constexpr int minBlocksPerSm(int warps, bool vec) {
  const int warpsPerBlock = blockThreads(warps) / 32;
  const int targetWarps = vec ? 16 : 12;
  return (targetWarps + warpsPerBlock - 1) / warpsPerBlock;
}

template <class T, int V, int WARPS> struct Layout {
  static constexpr int G = kVecElems<T>;            // positions per group (one 16-byte vector)
  static constexpr int GROUP_SPAN = 32 * G;         // positions covered by group index k in a warp
  static constexpr int WARP_SPAN = V * GROUP_SPAN;  // positions per warp per chunk
  static constexpr int CHUNK = WARPS * WARP_SPAN;   // positions per row per chunk
};

// Memory index of scan position q.
template <bool DESC> __device__ __forceinline__ int64_t memIndex(int64_t q, int64_t L) { return DESC ? L - 1 - q : q; }

// Raw storage of one group (G positions) of one array: 16 bytes in four registers, converted to
// fp32 only when used, so that a prefetched chunk does not stall on its loads. Vector path: the
// bytes as they sit in memory (lowest address first). Scalar path: the elements in scan order.
using Raw = uint4;

// Raw bit pattern of one element (for the scalar path).
template <class T> using Bits = std::conditional_t<sizeof(T) == 4, unsigned, unsigned short>;

// Loads positions q0 .. q0+G-1 (scan order) of a row; positions >= L get the matching element of
// `fill` (a splat16 vector). Vector path: q0 is a multiple of G and L % G == 0, so the group is
// entirely inside or entirely past the end.
template <bool DESC, bool VEC, class T>
__device__ __forceinline__ Raw loadGroup(const T* row, int64_t q0, int64_t L, const Raw& fill) {
  constexpr int G = kVecElems<T>;
  if constexpr (VEC) {
    return q0 < L ? load16(row + (DESC ? L - q0 - G : q0)) : fill;
  } else {
    const int64_t remaining = L - q0;  // positions of this group inside the row (may be <= 0)
    unsigned w[4] = {fill.x, fill.y, fill.z, fill.w};
    if (remaining > 0) {
      // Element j of the group sits at first + j (ascending) or first - j (descending).
      const Bits<T>* first = reinterpret_cast<const Bits<T>*>(row) + memIndex<DESC>(q0, L);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        if (j < remaining) {
          const unsigned x = __ldg(DESC ? first - j : first + j);
          if constexpr (sizeof(T) == 4) {
            w[j] = x;
          } else if (j % 2 == 0) {
            w[j / 2] = (w[j / 2] & 0xffff0000u) | x;
          } else {
            w[j / 2] = (w[j / 2] & 0x0000ffffu) | (x << 16);
          }
        }
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Raw group -> fp32 values in scan order.
template <bool DESC, bool VEC, class T>
__device__ __forceinline__ void groupToFloat(const Raw& g, float (&out)[kVecElems<T>]) {
  constexpr int G = kVecElems<T>;
  constexpr bool kReversed = DESC && VEC;  // memory order is the reverse of scan order
  float e[G];
  unpack16<T>(g, e);
#pragma unroll
  for (int j = 0; j < G; ++j) out[j] = e[kReversed ? G - 1 - j : j];
}

// Stores fp32 values (scan order) to positions q0 .. q0+G-1 of a row, skipping positions >= L.
template <bool DESC, bool VEC, class T>
__device__ __forceinline__ void storeGroup(T* row, int64_t q0, int64_t L, const float (&in)[kVecElems<T>]) {
  constexpr int G = kVecElems<T>;
  if constexpr (VEC) {
    if (q0 < L) {
      float mem[G];
#pragma unroll
      for (int e = 0; e < G; ++e) mem[e] = in[DESC ? G - 1 - e : e];
      store16(row + (DESC ? L - q0 - G : q0), pack16<T>(mem));
    }
  } else {
    const int64_t remaining = L - q0;
    if (remaining > 0) {
      T* first = row + memIndex<DESC>(q0, L);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        if (j < remaining) storeScalar(DESC ? first - j : first + j, in[j]);
      }
    }
  }
}

// Which thread holds scan position L-1 in the last chunk: its warp within the row, its lane and
// its group index. After running its group it holds the state at L-1 exactly (the positions after
// L-1 in that group are identity items).
struct LastOwner {
  int warp, lane, group;
};
template <class Lay> __device__ __forceinline__ LastOwner lastOwner(int64_t L) {
  const int64_t lastChunk = (L - 1) / Lay::CHUNK;
  const int off = static_cast<int>((L - 1) - lastChunk * Lay::CHUNK);
  const int inWarp = off % Lay::WARP_SPAN;
  return LastOwner{off / Lay::WARP_SPAN, (inWarp % Lay::GROUP_SPAN) / Lay::G, inWarp / Lay::GROUP_SPAN};
}

// A thread's place in both kernels, the same for every row it walks: its lane, its warp within the
// row, its row within the block, the number of chunks of a row, the position of its group 0
// relative to a chunk's start, and which of its groups holds scan position L-1 in the last chunk
// (-1 when none does, or when the kernel has no per-row result there: wantLast false).
struct ThreadPlace {
  int lane, warpInRow, rowInBlock;
  int64_t nChunks;
  int myLastGroup, threadOff;
};
template <class Lay, int WARPS> __device__ __forceinline__ ThreadPlace threadPlace(int64_t L, bool wantLast) {
  ThreadPlace p;
  p.lane = scan::laneId();
  const int warpInBlock = static_cast<int>(threadIdx.x) >> 5;
  p.warpInRow = WARPS == 1 ? 0 : warpInBlock;
  p.rowInBlock = WARPS == 1 ? warpInBlock : 0;
  p.nChunks = (L + Lay::CHUNK - 1) / Lay::CHUNK;
  const LastOwner owner = lastOwner<Lay>(L);
  p.myLastGroup = (wantLast && p.warpInRow == owner.warp && p.lane == owner.lane) ? owner.group : -1;
  p.threadOff = p.warpInRow * Lay::WARP_SPAN + p.lane * Lay::G;
  return p;
}

// Runs body(row) for each row of this thread: blocks of RPB rows, grid-stride. With one warp per row
// a warp whose row is past the end skips it (there is no block-wide barrier when WARPS == 1).
template <int WARPS, class Body> __device__ __forceinline__ void forEachRow(int64_t rows, int rowInBlock, Body&& body) {
  constexpr int RPB = WARPS == 1 ? kRowsPerBlock1 : 1;
  for (int64_t rowBase = static_cast<int64_t>(blockIdx.x) * RPB; rowBase < rows;
       rowBase += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = rowBase + rowInBlock;
    if (WARPS == 1 && row >= rows) continue;
    body(row);
  }
}

// Walks a row's chunks with two register buffers: chunk c+1 is in flight while chunk c is computed.
template <class Frag, class Load, class Process>
__device__ __forceinline__ void forEachChunk(int64_t nChunks, Load& load, Process& process) {
  Frag f0, f1;
  load(f0, 0);
  for (int64_t c = 0; c < nChunks; c += 2) {
    if (c + 1 < nChunks) load(f1, c + 1);
    process(f0, c);
    if (c + 1 < nChunks) {
      if (c + 2 < nChunks) load(f0, c + 2);
      process(f1, c + 1);
    }
  }
}

// ============================== forward ==============================

template <int V> struct FwdFrag {
  Raw a[V];
  Raw b[V];
};

template <class T, int V, int WARPS, bool DESC, bool VEC>
__global__ void __launch_bounds__(blockThreads(WARPS), minBlocksPerSm(WARPS, VEC))
    linearScanForwardKernel(const T* __restrict__ a, const T* __restrict__ b, const float* h0, T* __restrict__ h,
                            float* finalState, int64_t rows, int64_t L) {
  using Lay = Layout<T, V, WARPS>;
  constexpr int G = Lay::G;
  using BlockScanT = scan::BlockScan<32 * WARPS>;
  __shared__ typename BlockScanT::TempStorage scanStorage;
  BlockScanT blockScan(scanStorage);
  const ThreadPlace me = threadPlace<Lay, WARPS>(L, finalState != nullptr);
  const Raw one = splat16<T>(1.0f);
  const Raw zero = splat16<T>(0.0f);

  forEachRow<WARPS>(rows, me.rowInBlock, [&](int64_t row) {
    const T* aRow = a + row * L;
    const T* bRow = b + row * L;
    T* hRow = h + row * L;
    float carry = h0 != nullptr ? h0[row] : 0.0f;

    auto load = [&](FwdFrag<V>& f, int64_t c) {
      const int64_t q = c * Lay::CHUNK + me.threadOff;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        f.a[k] = loadGroup<DESC, VEC>(aRow, q + k * Lay::GROUP_SPAN, L, one);
        f.b[k] = loadGroup<DESC, VEC>(bRow, q + k * Lay::GROUP_SPAN, L, zero);
      }
    };

    auto process = [&](const FwdFrag<V>& f, int64_t c) {
      float av[V][G], bv[V][G];
      Affine part[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        groupToFloat<DESC, VEC, T>(f.a[k], av[k]);
        groupToFloat<DESC, VEC, T>(f.b[k], bv[k]);
        part[k] = scan::threadReduce<G>(av[k], bv[k]);
      }
      float start[V];
      scan::stripedChunkStarts<V, WARPS>(part, carry, start, &blockScan);
      const int64_t q = c * Lay::CHUNK + me.threadOff;
      const bool lastChunk = (c == me.nChunks - 1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float end = scan::threadApply<G>(av[k], bv[k], start[k]);  // bv[k] now holds h
        storeGroup<DESC, VEC>(hRow, q + k * Lay::GROUP_SPAN, L, bv[k]);
        if (lastChunk && k == me.myLastGroup) finalState[row] = end;
      }
    };

    forEachChunk<FwdFrag<V>>(me.nChunks, load, process);
  });
}

// ============================== backward ==============================
//
// In the backward kernel, scan order q runs opposite to the forward scan (q = 0 is the forward's
// last step). In that order:
//   g_q = c_q * g_{q-1} + gh_q,  g_{-1} = gFinal,  c_q = a_{q-1} (c_0 = 1)
//   gb_q = g_q,  ga_q = g_q * h_{q+1} (h_L = h0),  gh0 = a_{L-1} * g_{L-1}.
// The neighbours a_{q-1} and h_{q+1} of a thread's groups come from adjacent lanes by a rotating
// shuffle; at warp-segment edges they are scalar loads (aBefore by lane 31, hAfter by lane 0).

template <int V> struct BwdFrag {
  Raw a[V];
  Raw h[V];
  Raw g[V];          // incoming gradient gh
  unsigned aBefore;  // lane 31: bits of a at the position before this warp's segment (1 if none)
  unsigned hAfter;   // lane 0: bits of h at the position after this warp's segment (if inside the row)
};

template <class T, int V, int WARPS, bool DESC, bool VEC>
__global__ void __launch_bounds__(blockThreads(WARPS), minBlocksPerSm(WARPS, VEC))
    linearScanBackwardKernel(const T* __restrict__ a, const T* __restrict__ h, const float* h0,
                             const T* __restrict__ gh, const float* gFinal, T* __restrict__ ga, T* __restrict__ gb,
                             float* gh0, int64_t rows, int64_t L) {
  using Lay = Layout<T, V, WARPS>;
  constexpr int G = Lay::G;
  using BlockScanT = scan::BlockScan<32 * WARPS>;
  __shared__ typename BlockScanT::TempStorage scanStorage;
  BlockScanT blockScan(scanStorage);
  const ThreadPlace me = threadPlace<Lay, WARPS>(L, gh0 != nullptr);
  const Raw one = splat16<T>(1.0f);
  const Raw zero = splat16<T>(0.0f);
  const bool hasGh = gh != nullptr;

  forEachRow<WARPS>(rows, me.rowInBlock, [&](int64_t row) {
    const T* aRow = a + row * L;
    const T* hRow = h + row * L;
    const T* ghRow = hasGh ? gh + row * L : nullptr;
    T* gaRow = ga + row * L;
    T* gbRow = gb + row * L;
    // Position L stands for h0 (ga_{L-1} = g_{L-1} * h0). It is substituted in fp32 after the
    // loads (h0 is fp32 and must not be rounded to T); later positions are never used.
    const float h0v = h0 != nullptr ? h0[row] : 0.0f;
    float carry = gFinal != nullptr ? gFinal[row] : 0.0f;

    auto load = [&](BwdFrag<V>& f, int64_t c) {
      const int64_t q = c * Lay::CHUNK + me.threadOff;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t q0 = q + k * Lay::GROUP_SPAN;
        f.a[k] = loadGroup<DESC, VEC>(aRow, q0, L, one);
        f.h[k] = loadGroup<DESC, VEC>(hRow, q0, L, zero);
        f.g[k] = hasGh ? loadGroup<DESC, VEC>(ghRow, q0, L, zero) : zero;
      }
      const int64_t segStart = c * Lay::CHUNK + me.warpInRow * Lay::WARP_SPAN;
      f.aBefore = one.x;  // the low element of a splat is the scalar's bits
      f.hAfter = 0;       // past the end: process() uses h0 instead
      if (me.lane == 31) {
        const int64_t qb = segStart - 1;
        if (qb >= 0 && qb < L) f.aBefore = __ldg(reinterpret_cast<const Bits<T>*>(aRow) + memIndex<DESC>(qb, L));
      } else if (me.lane == 0) {
        const int64_t qa = segStart + Lay::WARP_SPAN;
        if (qa < L) f.hAfter = __ldg(reinterpret_cast<const Bits<T>*>(hRow) + memIndex<DESC>(qa, L));
      }
    };

    auto process = [&](const BwdFrag<V>& f, int64_t c) {
      float av[V][G], hv[V][G], gv[V][G];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        groupToFloat<DESC, VEC, T>(f.a[k], av[k]);
        groupToFloat<DESC, VEC, T>(f.h[k], hv[k]);
        groupToFloat<DESC, VEC, T>(f.g[k], gv[k]);
      }
      const int64_t q = c * Lay::CHUNK + me.threadOff;
      const int64_t segEnd = c * Lay::CHUNK + (me.warpInRow + 1) * Lay::WARP_SPAN;  // position after the segment
      const float aBefore = bitsToFloat<T>(f.aBefore);
      const float hAfter = segEnd < L ? bitsToFloat<T>(f.hAfter) : h0v;

      // cv[k][j] = coefficient of position (group start + j) = a at the position before it;
      // hn[k] = h at the position after the group's last one.
      float cv[V][G], hn[V];
      Affine part[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t q0 = q + k * Lay::GROUP_SPAN;
        const int64_t remaining = L - q0;  // positions of this group inside the row (may be <= 0)
        // h at positions past the end (only position L is ever used): h0, exactly. Done for all
        // groups before the shuffles below, which read the neighbouring group's first h.
#pragma unroll
        for (int j = 0; j < G; ++j) {
          if (!(VEC ? remaining > 0 : remaining > j)) hv[k][j] = h0v;
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t q0 = q + k * Lay::GROUP_SPAN;
        const int64_t remaining = L - q0;
        // Lane l receives lane l-1's last a of group k; lane 0 receives, from lane 31, the a just
        // before its group: lane 31's last a of group k-1, or aBefore for k == 0.
        const float aSend = me.lane == 31 ? (k == 0 ? aBefore : av[k > 0 ? k - 1 : 0][G - 1]) : av[k][G - 1];
        const float aPrev = __shfl_sync(scan::kFullMask, aSend, (me.lane + 31) & 31);
        // Lane l receives lane l+1's first h of group k; lane 31 receives, from lane 0, the h just
        // after its group: lane 0's first h of group k+1, or hAfter for k == V-1.
        const float hSend = me.lane == 0 ? (k == V - 1 ? hAfter : hv[k < V - 1 ? k + 1 : 0][0]) : hv[k][0];
        hn[k] = __shfl_sync(scan::kFullMask, hSend, (me.lane + 1) & 31);

        // Positions past the end must be identity items (1, 0); gh is already 0 there. Vector path:
        // the group is all in or all out and av is 1 when out, so only j == 0 needs a check. Scalar
        // path: the position right after the row's last one still sees the real a_{L-1}.
        cv[k][0] = remaining > 0 ? aPrev : 1.0f;
#pragma unroll
        for (int j = 1; j < G; ++j) cv[k][j] = (VEC || remaining > j) ? av[k][j - 1] : 1.0f;
        part[k] = scan::threadReduce<G>(cv[k], gv[k]);
      }

      float start[V];
      scan::stripedChunkStarts<V, WARPS>(part, carry, start, &blockScan);
      const bool lastChunk = (c == me.nChunks - 1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float gaOut[G];
        float g = start[k];
#pragma unroll
        for (int j = 0; j < G; ++j) {
          g = fmaf(cv[k][j], g, gv[k][j]);
          gv[k][j] = g;  // gb
          gaOut[j] = g * (j + 1 < G ? hv[k][j + 1 < G ? j + 1 : 0] : hn[k]);
        }
        const int64_t q0 = q + k * Lay::GROUP_SPAN;
        storeGroup<DESC, VEC>(gbRow, q0, L, gv[k]);
        storeGroup<DESC, VEC>(gaRow, q0, L, gaOut);
        if (lastChunk && k == me.myLastGroup) {
          // g now holds g_{L-1}; position L-1 in this order is the forward's first step.
          gh0[row] = loadScalar(aRow + memIndex<DESC>(L - 1, L)) * g;
        }
      }
    };

    forEachChunk<BwdFrag<V>>(me.nChunks, load, process);
  });
}

// ============================== launch ==============================

// Warps per row: as many (up to 8) as keep all rows resident in one wave, so that few long rows
// still fill the GPU; 1 when rows alone fill it. residentWarpsPerSm comes from the occupancy of
// the WARPS == 1 kernel. Tests on the CPU emulator pin the choice (see tunable).
inline int chooseWarpsPerRow(int64_t rows, int smCount, int residentWarpsPerSm) {
  const int64_t capacity = static_cast<int64_t>(smCount) * residentWarpsPerSm;
  int warps = 1;
  while (warps < 8 && rows * (warps * 2) <= capacity) warps *= 2;
  return tunable("linearScan.warpsPerRow", warps);
}

template <class Kernel> int residentWarpsPerSm(Kernel kernel, int threads) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0) != cudaSuccess || blocks <= 0) {
    cudaGetLastError();  // clear; fall back to a typical value
    return 16;
  }
  return blocks * (threads / 32);
}

inline Status smCount(int* count) {
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  RK_CUDA_TRY(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, dev));
  return Status{};
}

inline unsigned gridFor(int64_t rows, int warps) {
  const int64_t rowsPerBlock = warps == 1 ? kRowsPerBlock1 : 1;
  const int64_t blocks = (rows + rowsPerBlock - 1) / rowsPerBlock;
  return static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);  // kernels loop over the rest
}

// Launches launchWith(std::integral_constant<int, WARPS>{}) with the warps per row chosen for the
// rows (chooseWarpsPerRow: 1, 2, 4 or 8), from the occupancy of the kernel's WARPS == 1 instance.
template <class Kernel, class Launch> Status withWarpsPerRow(int64_t rows, Kernel oneWarpKernel, Launch&& launchWith) {
  // Asked at every call (a host-side computation of a few microseconds): a cached answer would be the
  // first device's for every later one.
  const int resident = residentWarpsPerSm(oneWarpKernel, blockThreads(1));
  int sms = 0;
  RK_TRY(smCount(&sms));
  switch (chooseWarpsPerRow(rows, sms, resident)) {
    case 1:
      return launchWith(std::integral_constant<int, 1>{});
    case 2:
      return launchWith(std::integral_constant<int, 2>{});
    case 4:
      return launchWith(std::integral_constant<int, 4>{});
    default:
      return launchWith(std::integral_constant<int, 8>{});
  }
}

template <class T, bool DESC, bool VEC>
Status forwardFor(const T* a, const T* b, const float* h0, T* h, float* finalState, int64_t rows, int64_t L) {
  return withWarpsPerRow(rows, linearScanForwardKernel<T, kFwdGroups<T>, 1, DESC, VEC>, [&](auto warps) {
    return launch(linearScanForwardKernel<T, kFwdGroups<T>, decltype(warps)::value, DESC, VEC>, gridFor(rows, warps),
                  blockThreads(warps), 0, a, b, h0, h, finalState, rows, L);
  });
}

template <class T, bool DESC, bool VEC>
Status backwardFor(const T* a, const T* h, const float* h0, const T* gh, const float* gFinal, T* ga, T* gb, float* gh0,
                   int64_t rows, int64_t L) {
  return withWarpsPerRow(rows, linearScanBackwardKernel<T, kBwdGroups<T>, 1, DESC, VEC>, [&](auto warps) {
    return launch(linearScanBackwardKernel<T, kBwdGroups<T>, decltype(warps)::value, DESC, VEC>, gridFor(rows, warps),
                  blockThreads(warps), 0, a, h, h0, gh, gFinal, ga, gb, gh0, rows, L);
  });
}

// dst[0..rows) = src[0..rows) (device fp32), or zeros when src is null.
Status copyOrZero(float* dst, const float* src, int64_t rows) {
  const size_t bytes = static_cast<size_t>(rows) * sizeof(float);
  if (src != nullptr) {
    RK_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
  } else {
    RK_CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, 0));
  }
  return Status{};
}

}  // namespace

Status linearScanForward(DType dt, const void* a, const void* b, const float* h0, void* h, float* finalState,
                         int64_t rows, int64_t length, bool reverse) {
  if (rows < 0 || length < 0) return statusError("linearScanForward: negative size");
  if (rows == 0) return Status{};
  if (length == 0) return finalState != nullptr ? copyOrZero(finalState, h0, rows) : Status{};
  if (a == nullptr || b == nullptr || h == nullptr) return statusError("linearScanForward: null tensor");
  return dispatchDType(dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* ph = static_cast<T*>(h);
    const bool vec = length % kVecElems<T> == 0 && isAligned16(a) && isAligned16(b) && isAligned16(h);
    if (!reverse) {
      return vec ? forwardFor<T, false, true>(pa, pb, h0, ph, finalState, rows, length)
                 : forwardFor<T, false, false>(pa, pb, h0, ph, finalState, rows, length);
    }
    return vec ? forwardFor<T, true, true>(pa, pb, h0, ph, finalState, rows, length)
               : forwardFor<T, true, false>(pa, pb, h0, ph, finalState, rows, length);
  });
}

Status linearScanBackward(DType dt, const void* a, const void* h, const float* h0, const void* gh, const float* gFinal,
                          void* ga, void* gb, float* gh0, int64_t rows, int64_t length, bool reverse) {
  if (rows < 0 || length < 0) return statusError("linearScanBackward: negative size");
  if (rows == 0) return Status{};
  if (length == 0) return gh0 != nullptr ? copyOrZero(gh0, gFinal, rows) : Status{};
  if (a == nullptr || h == nullptr || ga == nullptr || gb == nullptr) {
    return statusError("linearScanBackward: null tensor");
  }
  return dispatchDType(dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* ph = static_cast<const T*>(h);
    const T* pgh = static_cast<const T*>(gh);
    T* pga = static_cast<T*>(ga);
    T* pgb = static_cast<T*>(gb);
    const bool vec = length % kVecElems<T> == 0 && isAligned16(a) && isAligned16(h) &&
                     (gh == nullptr || isAligned16(gh)) && isAligned16(ga) && isAligned16(gb);
    // The backward scan runs opposite to the forward one: descending memory for a forward scan.
    if (!reverse) {
      return vec ? backwardFor<T, true, true>(pa, ph, h0, pgh, gFinal, pga, pgb, gh0, rows, length)
                 : backwardFor<T, true, false>(pa, ph, h0, pgh, gFinal, pga, pgb, gh0, rows, length);
    }
    return vec ? backwardFor<T, false, true>(pa, ph, h0, pgh, gFinal, pga, pgb, gh0, rows, length)
               : backwardFor<T, false, false>(pa, ph, h0, pgh, gFinal, pga, pgb, gh0, rows, length);
  });
}

}  // namespace rkcuda
