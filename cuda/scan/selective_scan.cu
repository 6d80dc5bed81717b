// Selective scan (Mamba-1): forward and backward (recomputing from checkpoints), for F32/F16/BF16
// storage with fp32 state and arithmetic: the launchers declared in scan/selective_scan.h and the
// kernel for positions in no sequence here; the forward kernel in selective_scan_fwd.cuh, the
// backward in selective_scan_bwd.cuh, what they share in selective_scan_common.cuh (the decode step
// is in selective_state_update.cu).
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
// states at a time, in shared memory in the storage type (rows padded so that the lanes' 16-byte
// reads hit distinct banks; each lane converts its values to fp32 as it reads them). The next
// states' rows travel by cp.async straight into the buffer while the current ones are computed, so
// staging holds no registers; one __syncthreads per batch of states. For fp16 / bf16 that is half
// the shared memory and half the shared-memory traffic of fp32 rows, and no conversion pass (they
// were landed in a raw buffer, then converted to fp32 rows by every thread before the barrier:
// 12 bytes of shared traffic per staged value and position, now 4). A constant B or C is one
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

#include "scan/selective_scan_bwd.cuh"
#include "scan/selective_scan_common.cuh"
#include "scan/selective_scan_fwd.cuh"

namespace rkcuda {
namespace {

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
  static_cast<SelectiveScanArgs&>(p) = a;
  p.segments = nullptr;  // host memory: the kernels read `table`
  p.channelsPerGroup = a.dim / a.groups;
  p.uniformChunks = (a.seqlen + kChunk - 1) / kChunk;
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

// Launches kernelFor(std::integral_constant<int, W>{}) with W = LARGE or SMALL channels (warps) per
// block, as chooseWarps picks (tunable `name`), over the grid for W.
template <int LARGE, int SMALL, class KernelFor>
Status launchWarps(const char* name, const char* fn, ScanParams p, int64_t nseq, int wave, KernelFor kernelFor) {
  const int warps = chooseWarps(name, p, nseq, LARGE, SMALL, wave);
  auto go = [&](auto w) -> Status {
    unsigned grid = 0;
    RK_TRY(gridFor(p, nseq, w, &grid));
    return launch(kernelFor(w), grid, 32 * w, 0, p);
  };
  if (warps == LARGE) return go(std::integral_constant<int, LARGE>{});
  if (warps == SMALL) return go(std::integral_constant<int, SMALL>{});
  return statusError(std::string(fn) + ": unsupported warps per block " + std::to_string(warps));
}

template <class T> Status launchForward(const ScanParams& p, int64_t nseq) {
  return launchWarps<8, 4>("selectiveScan.forwardWarps", "selectiveScanForward", p, nseq, 2,
                           [](auto w) { return selectiveScanForwardKernel<T, decltype(w)::value>; });
}

template <class T> Status launchBackward(const ScanParams& p, int64_t nseq) {
  return launchWarps<4, 2>("selectiveScan.backwardWarps", "selectiveScanBackward", p, nseq, 3,
                           [](auto w) { return selectiveScanBackwardKernel<T, decltype(w)::value>; });
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
    RK_TRY(uploadTable(a, gaps, &table, &p.table, &gapList));
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
    RK_TRY(uploadTable(a, gaps, &table, &p.table, &gapList));
    if (a.nseq > 0) RK_TRY(launchBackward<T>(p, a.nseq));
    RK_TRY(launchZeroGaps<T>(static_cast<T*>(g.du), static_cast<T*>(g.ddelta), static_cast<T*>(p.dz), a.dim, a.seqlen,
                             gapList, static_cast<int64_t>(gaps.size() / 2)));
    if (a.variableB && !f32) RK_TRY(convert(DType::F32, p.dB, a.dt, g.dB, bcElems));
    if (a.variableC && !f32) RK_TRY(convert(DType::F32, p.dC, a.dt, g.dC, bcElems));
    return Status{};
  });
}

}  // namespace rkcuda
