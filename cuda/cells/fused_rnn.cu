// Fused recurrent cells (FlashRNN style: Elman, LSTM, GRU, sLSTM with many small heads): the
// recurrent part of an RNN layer, forward and backward, for F32/F16/BF16 storage with fp32 state and
// arithmetic: the launchers declared in cells/fused_rnn.h, path planning and launches here; the
// kernels one file per path (fused_rnn_persistent.cuh, fused_rnn_multiblock.cuh,
// fused_rnn_stepwise.cuh, fused_rnn_weight_grads.cuh for dR and db), the cell math in
// fused_rnn_cells.cuh (that of the float64 oracle tests/reference/fusedRnn.ts).
//
// Paths, per call (the forward and the backward choose independently: the saved tensors do not
// depend on the path):
//   persistent  one block per (head, tile of 16 batch rows) walks all T steps. R of the head stays in
//               shared memory for the whole sequence, the states stay in registers, and h_{t-1} is
//               exchanged through a double-buffered shared tile (one __syncthreads per step). Warp w
//               owns the 8 columns j = 8w..8w+7 of every gate, so the recurrent product leaves in each
//               lane all G pre-activations of its 4 (row, column) elements (the mma accumulator layout)
//               and the cell update runs in registers. Product: 16-bit inputs use mma.sync m16n8k16
//               (batch rows = M, gate columns = N, headDim = K, h_{t-1} rounded to the input dtype,
//               fp32 accumulation); fp32 inputs use fp32 FMA (tf32 is not accurate enough for fp32).
//               Runs when headDim % 8 == 0, 4 * headDim threads fit the cell's launch bound (which
//               keeps every kernel within its registers) and R plus the tiles fit in the opt-in
//               shared memory. With 227 KB per block (H100/H200), headDim up to:
//                                  Elman   LSTM   sLSTM   GRU
//                 bf16/fp16 fwd     192     160     128    176
//                 bf16/fp16 bwd     192     144     128    176
//                 fp32 fwd          192     112      96    128
//                 fp32 bwd          192      96      96    112
//               Every step also prefetches the inputs of a step kAhead steps on into L2. The forward
//               stages each step's inputs (16 rows x G gates x the block's columns) with 16-byte
//               cp.async copies into a double-buffered shared tile, the next step's loading during
//               this step's product, where the tile still fits beside R (multi-block: and keeps the
//               blocks per SM) and wx's rows are 16-byte aligned; else the lanes load them at the top
//               of the step from L2. The lanes' per-step rows of the saved
//               tensors, h, gr and dwx (and the backward's saved values) are read and written in
//               fragment-native quads: lanes t and t ^ 1 trade one column pair by shuffles, so that
//               each lane makes one 4-element (16-byte fp32) access per row where it made two (where
//               the rows are 4-element aligned; else element-wise). The backward's recurrent product
//               dh = sum_g dpre_g R_g^T runs as G independent mma chains, summed at the end.
//   multi-block the same persistent scheme for heads too large for one block (FlashRNN's way): a head's
//               gate columns are split over `splits` co-resident blocks (a group per head and tile of
//               16 batch rows), block c owning D / splits columns of every gate (at most 64: 256
//               threads) and their slice of R (backward: the rows of R that its slice of dh_{t-1} needs)
//               in shared memory for all T steps. After every step each block writes its part of h_t
//               (backward: of dpre_t, every gate) to a double-buffered exchange buffer in global memory,
//               the group passes a barrier, and every block copies the whole of it from L2 (cp.async.cg)
//               into shared memory for the next product. splits = the fewest that divide D / 8 and fit
//               in shared memory (tunable "fusedRnn.splits"); runs when headDim % 8 == 0 and the
//               groups fit in at most kMaxMultiLaunches cooperative launches (each launch holds as many
//               groups as are co-resident: occupancy x SM count). With 227 KB per block, every
//               headDim (multiple of 8) up to:
//                                  Elman   LSTM   sLSTM   GRU
//                 bf16/fp16 fwd     4096   2400    2400   2896    (LSTM 256: 4 blocks of 64 columns, 768: 24 of 32)
//                 bf16/fp16 bwd     4096   1200    1200   1600    (LSTM 256: 4 of 64, 768: 48 of 16)
//                 fp32 fwd          2416   1200    1200   1440
//                 fp32 bwd          2416    592     592    800
//               (the largest sizes with 8 columns per block: slow, as every warp still does the
//               G x headDim / 16 mma of its columns per step and every block copies the whole tile).
//               Barrier: chosen over a whole-grid barrier (cooperative groups' grid.sync), which would
//               make every head wait for all the others, and over thread-block clusters, which cannot
//               hold a 768-wide head's R (4.7 MB bf16 against 16 x 227 KB at most). It is a counter per
//               group in global memory (common/group_sync.cuh: __syncthreads, then thread 0 does a
//               __threadfence + atomicAdd release and spins on an ld.acquire.gpu, then __syncthreads);
//               the launch is cooperative (cudaLaunchCooperativeKernel), so the driver refuses rather
//               than hangs when the blocks could not all be resident. The exchange is read with
//               cp.async.cg (L2, never a stale L1 line). Two exchange buffers suffice: a block writes
//               buffer k again only after the barrier that follows every member's copy of it.
//   stepwise    any headDim (larger heads, or headDim not a multiple of 8): one kernel per step (and
//               per reverse step), all on the GPU. A block takes 8 batch rows and 16 channels j of a
//               head; its 128 threads split the k range 8 ways, stage h_{t-1} in shared memory and
//               read R (from L2) once per 8 rows; then each thread updates one (row, channel). The
//               states live in an fp32 scratch buffer between steps. Same results within rounding
//               (it keeps h_{t-1} in fp32 for the product).
// Default choice: persistent when it fits, else multi-block when it applies, else stepwise. The
// tunable "fusedRnn.path" (1 persistent, 2 stepwise, 3 multi-block) pins the choice; a pinned path
// that does not fit is refused. Supported: any batch (tiled; padding rows never reach an output),
// heads >= 1, headDim 1..4096, T < 2^30, lengths per row.
//
// Backward. A reverse-time persistent kernel (or the stepwise kernels) carries dL/dstates: per step
// it reads the saved pre-activations and previous states, runs the cell's backward in registers,
// writes dwx and the gradient of the recurrent pre-activations dpre (the GRU n gate's scaled by r)
// into an fp32 scratch [T, batch, G, H, D] and a shared tile, and takes the recurrent part of
// dh_{t-1} = sum_g dpre_g R_g^T with R^T on chip (bf16 operands for both 16-bit dtypes, for the
// range of gradients; fp32 FMA for fp32). Then dR = sum over t and batch of h_{t-1}^T dpre and db =
// sum of dpre are one reduction kernel over (gate, head, 64 x 64 tile, split of the t*batch rows)
// with tf32 mma for 16-bit dtypes (fp32 FMA for fp32), whose per-split partial sums a last kernel
// adds in a fixed order (deterministic).
//
// Bounds and expected times (H100/H200, batch 16, T 1024, bf16):
//   12 heads x 64: persistent, 12 blocks of 256 threads; per step each warp does 16 mma (4 gates x 4
//     k-steps) from shared memory plus the cell update and one barrier, about 1 us, latency bound:
//     forward ~1.2 ms, backward (reverse kernel ~1.5 ms + dR reduction of 6.4 GFLOP ~0.1 ms). With
//     the staged input tile, the quad accesses (per lane and step in the LSTM forward: no input
//     loads from global memory (4 quad loads unstaged; was 16 scalar ones) and 7 quad stores (was
//     28 scalar); backward 7 quad loads and 8 quad stores, was 28 and 32) and the backward's 4
//     independent chains (was one chain of 16 dependent mma), ~0.7-0.8 us per step forward, ~1-1.2
//     backward: forward ~0.8 ms, backward ~1.1-1.3 ms (estimates).
//   3 heads x 256 (R = 512 KB per head) and 1 x 768 (4.7 MB): multi-block, latency bound. A step
//     is: the exchange copy from L2 (~0.5 us: 8 KB per block at 256, 24 KB at 768; backward 32 /
//     96 KB), the warp's product from shared memory (G independent mma chains of D/16 steps: ~0.3 us
//     at 256, ~0.9 us at 768; backward the same in bf16), the cell update and the barrier (atomic
//     arrive at L2 and the acquire poll that sees the last arrival: ~1-1.5 us, the largest part).
//     3 x 256: 4 blocks of 64 columns per head (12 blocks; backward also 12), ~2-2.5 us per step:
//     forward ~2-2.5 ms (target 2.6), backward ~2.5-3 ms + dR reduction (26 GFLOP tf32, ~0.1 ms),
//     fwd+bwd ~5-6 ms (target 6.9).
//     1 x 768: forward 24 blocks of 32 columns (~3 us per step: ~3 ms, target 3.4); backward 48
//     blocks of 16 columns, whose 96 KB exchange copy per block and step (4.7 MB of L2 reads) and
//     48-step mma chains make ~4-5 us per step: ~4.5 ms + dR reduction (77 GFLOP tf32, ~0.5 ms),
//     fwd+bwd ~8-8.5 ms (target 8.9: tight). All of these are estimates from the latencies above.
//   The stepwise path (bound by the per-step launch latency and L2 reads of R once per 8 batch
//     rows: ~3-5 us per step at these sizes) remains for heads that are not a multiple of 8 or whose
//     blocks cannot be resident, e.g. fp32 LSTM backward at 768.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common/api.h"
#include "cells/fused_rnn.h"
#include "common/async_copy.cuh"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/group_sync.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"

#include "cells/fused_rnn_cells.cuh"
#include "cells/fused_rnn_multiblock.cuh"
#include "cells/fused_rnn_persistent.cuh"
#include "cells/fused_rnn_stepwise.cuh"
#include "cells/fused_rnn_weight_grads.cuh"

namespace rkcuda {
namespace {

// ============================== launch ==============================

Status checkArgs(const FusedRnnArgs& a, const std::string& fn) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.cell != CellKind::Elman && a.cell != CellKind::Lstm && a.cell != CellKind::Gru && a.cell != CellKind::Slstm) {
    return bad("unknown cell");
  }
  if (a.batch < 0 || a.T < 0) return bad("negative size");
  if (a.T > kMaxT) return bad("T above 2^30");
  if (a.heads < 1 || a.headDim < 1) return bad("heads and headDim must be at least 1");
  if (a.headDim > 4096) return bad("headDim above 4096");
  if (a.batch > 0 && a.lengths != nullptr) {
    for (int64_t b = 0; b < a.batch; ++b) {
      if (a.lengths[b] < 0 || a.lengths[b] > a.T) {
        return bad("lengths[" + std::to_string(b) + "] = " + std::to_string(a.lengths[b]) + " is outside [0, T]");
      }
    }
  }
  if (a.batch > 0 && ((a.T > 0 && a.wx == nullptr) || a.R == nullptr || a.b == nullptr)) return bad("null input");
  return Status{};
}

RnnParams baseParams(const FusedRnnArgs& a) {
  RnnParams p;
  static_cast<FusedRnnArgs&>(p) = a;
  p.lengths = nullptr;  // host memory: the kernels read `deviceLengths`
  p.Dp = static_cast<int>(ceilDiv(a.headDim, 16) * 16);
  return p;
}

Status uploadLengths(const FusedRnnArgs& a, DeviceBuffer* buffer, const int32_t** out) {
  *out = nullptr;
  if (a.lengths == nullptr || a.batch == 0) return Status{};
  const size_t bytes = static_cast<size_t>(a.batch) * sizeof(int32_t);
  RK_TRY(buffer->allocate(bytes));
  RK_CUDA_TRY(cudaMemcpyAsync(buffer->get(), a.lengths, bytes, cudaMemcpyHostToDevice, 0));
  *out = static_cast<const int32_t*>(buffer->get());
  return Status{};
}

// Calls f(std::integral_constant<int, cell>{}).
template <class F> Status dispatchCell(CellKind c, F&& f) {
  switch (c) {
    case CellKind::Elman:
      return f(std::integral_constant<int, kElman>{});
    case CellKind::Lstm:
      return f(std::integral_constant<int, kLstm>{});
    case CellKind::Gru:
      return f(std::integral_constant<int, kGru>{});
    case CellKind::Slstm:
      return f(std::integral_constant<int, kSlstm>{});
  }
  return statusError("unknown cell");
}

// Shared memory of the persistent kernel (forward or backward), 0 when it does not apply.
template <class Op> size_t persistentShared(int cell, int64_t D, bool backward, bool f32) {
  const int G = gatesOf(cell);
  if (D % 8 != 0 || D > kMaxPersistentDim || 4 * D > maxThreadsOf(cell, f32)) return 0;
  const int64_t Dp = ceilDiv(D, 16) * 16, pad = padOf<Op>();
  const int64_t tile = backward ? G * Dp + pad : Dp + pad;
  const int64_t bias = backward ? 0 : G * D * static_cast<int64_t>(sizeof(float));
  return static_cast<size_t>((G * D * (Dp + pad) + 2 * kRows * tile) * static_cast<int64_t>(sizeof(Op)) + bias);
}

// The forward's staged input tile of a block that takes Dc columns: two steps of 16 rows x G gates.
template <class Op> size_t inputTileBytes(int cell, int64_t Dc) {
  return 2 * static_cast<size_t>(kRows * gatesOf(cell) * Dc) * sizeof(Op);
}

// Shared memory of a multi-block persistent block (forward or backward) that takes Dc columns.
template <class Op> size_t multiShared(int cell, int64_t D, int64_t Dc, bool backward) {
  const int64_t G = gatesOf(cell), Dp = ceilDiv(D, 16) * 16, pad = padOf<Op>(), ld = Dp + pad;
  const int64_t tile = backward ? G * Dp + pad : ld;
  const int64_t bias = backward ? 0 : G * Dc * static_cast<int64_t>(sizeof(float));
  return static_cast<size_t>((G * Dc * ld + kRows * tile) * static_cast<int64_t>(sizeof(Op)) + bias);
}

// How the multi-block path runs a problem: blocks per head, their shared memory, and how many
// (batch tile, head) groups one cooperative launch can hold (all its blocks resident at once).
struct MultiPlan {
  int splits = 0;
  size_t shared = 0;
  bool inputTile = false;  // forward: the staged input tile, where it costs no residency
  int64_t groupsPerLaunch = 0;
  std::string why;  // empty when the path applies
};

// The fewest blocks per head (splits dividing D / 8, at most 64 columns each) whose slices fit in
// shared memory, or the value pinned by the tunable "fusedRnn.splits"; then the occupancy of that
// block times the SM count bounds the groups per launch.
template <class Op, class... KArgs>
Status planMulti(void (*kernel)(KArgs...), int cell, int64_t D, bool backward, int optin, MultiPlan* plan) {
  *plan = MultiPlan{};
  if (D % 8 != 0) {
    plan->why = "headDim " + std::to_string(D) + " is not a multiple of 8";
    return Status{};
  }
  auto usable = [&](int64_t c) {
    return c >= 1 && (D / 8) % c == 0 && 4 * (D / c) <= kMultiThreads &&
           multiShared<Op>(cell, D, D / c, backward) <= static_cast<size_t>(optin);
  };
  int64_t chosen = 0;
  for (int64_t c = 1; c <= D / 8 && chosen == 0; ++c) {
    if (usable(c)) chosen = c;
  }
  const int64_t splits = tunable("fusedRnn.splits", static_cast<int>(chosen));
  if (splits == 0 || !usable(splits)) {
    plan->why = "headDim " + std::to_string(D) +
                (splits == 0 ? " fits no split" : " in " + std::to_string(splits) + " blocks does not fit") +
                " over blocks of the multi-block kernel";
    return Status{};
  }
  int cooperative = 0;
  RK_TRY(deviceAttribute(cudaDevAttrCooperativeLaunch, &cooperative));
  if (cooperative == 0) {
    plan->why = "the device does not support cooperative launches";
    return Status{};
  }
  plan->splits = static_cast<int>(splits);
  plan->shared = multiShared<Op>(cell, D, D / splits, backward);
  RK_TRY(allowDynamicShared(kernel, plan->shared));
  int sms = 0, perSm = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMultiProcessorCount, &sms));
  RK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&perSm, reinterpret_cast<const void*>(kernel),
                                                                     static_cast<int>(4 * (D / splits)), plan->shared,
                                                                     cudaOccupancyDefault));
  if (!backward) {  // the forward's staged input tile, where it fits and keeps the blocks per SM
    const size_t tile = inputTileBytes<Op>(cell, D / splits);
    int withTile = 0;
    if (plan->shared + tile <= static_cast<size_t>(optin)) {
      RK_TRY(allowDynamicShared(kernel, plan->shared + tile));
      RK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
          &withTile, reinterpret_cast<const void*>(kernel), static_cast<int>(4 * (D / splits)), plan->shared + tile,
          cudaOccupancyDefault));
    }
    if (withTile == perSm) plan->shared += tile, plan->inputTile = true;
  }
  plan->groupsPerLaunch = static_cast<int64_t>(sms) * perSm / splits;
  if (plan->groupsPerLaunch < 1) plan->why = "the blocks of one head cannot all be resident";
  return Status{};
}

// 1: persistent (shared memory bytes in *shared), 2: stepwise, 3: multi-block persistent (*multi).
template <class Op, class... KArgs>
Status choosePath(const std::string& fn, int cell, int64_t D, int64_t groups, bool backward, bool f32,
                  void (*multiKernel)(KArgs...), int* path, size_t* shared, MultiPlan* multi) {
  int optin = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  *shared = persistentShared<Op>(cell, D, backward, f32);
  const bool fits = *shared > 0 && *shared <= static_cast<size_t>(optin);
  const int pinned = tunable("fusedRnn.path", 0);
  multi->why = "not planned";
  if (!fits || pinned == 3) RK_TRY(planMulti<Op>(multiKernel, cell, D, backward, optin, multi));
  const bool multiFits = multi->why.empty() && ceilDiv(groups, multi->groupsPerLaunch) <= kMaxMultiLaunches;
  *path = pinned != 0 ? pinned : fits ? 1 : multiFits ? 3 : 2;
  if (*path < 1 || *path > 3) return statusError(fn + ": unknown path " + std::to_string(*path));
  if (*path == 1 && !fits)
    return statusError(fn + ": headDim " + std::to_string(D) + " does not fit the persistent kernel");
  if (*path == 3 && !multi->why.empty()) return statusError(fn + ": multi-block path: " + multi->why);
  return Status{};
}

// A cooperative launch the device refused because its blocks cannot all be resident now (another
// process, or MPS, holds SMs): the launchers then take the stepwise path, which recomputes every
// output (whatever groups the multi-block launches had already done).
inline bool refusedCooperative(const Status& st) {
  return st.code == static_cast<int>(cudaErrorCooperativeLaunchTooLarge);
}

// Runs a multi-block kernel over every (batch tile, head) group, as many groups per cooperative
// launch as can be resident, with its exchange buffers (elements of Op per group) and counters.
template <class Op, class... KArgs>
Status launchMulti(void (*kernel)(KArgs...), const MultiPlan& plan, RnnParams p, int64_t xchgPerGroup) {
  const int64_t groups = p.heads * ceilDiv(p.batch, kRows), perLaunch = std::min(groups, plan.groupsPerLaunch);
  const size_t counterBytes =
      static_cast<size_t>(ceilDiv(perLaunch * static_cast<int64_t>(sizeof(unsigned)), 256) * 256);
  DeviceBuffer scratch;  // the counters, then two exchange buffers
  RK_TRY(scratch.allocate(counterBytes + static_cast<size_t>(2 * perLaunch * xchgPerGroup) * sizeof(Op)));
  p.splits = plan.splits;
  p.inputTile = plan.inputTile;
  p.sync = static_cast<unsigned*>(scratch.get());
  p.xchg = static_cast<unsigned char*>(scratch.get()) + counterBytes;
  for (int64_t g0 = 0; g0 < groups; g0 += perLaunch) {
    const int64_t n = std::min(perLaunch, groups - g0);
    RK_CUDA_TRY(cudaMemsetAsync(p.sync, 0, static_cast<size_t>(n) * sizeof(unsigned), 0));
    p.group0 = g0;
    RK_TRY(launchCooperative(kernel, static_cast<unsigned>(n * plan.splits),
                             static_cast<unsigned>(4 * (p.headDim / plan.splits)), plan.shared, p));
  }
  return Status{};
}

unsigned gridFor(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceilDiv(n, 256), 4096)));
}

Status blocksFor(const std::string& fn, int64_t blocks, unsigned* grid) {
  if (blocks > INT_MAX) return statusError(fn + ": too many blocks for one launch");
  *grid = static_cast<unsigned>(blocks);
  return Status{};
}

// Runs a persistent kernel: one block of 4 * headDim threads per (batch tile, head).
template <class... KArgs>
Status launchPersistent(const std::string& fn, void (*kernel)(KArgs...), const FusedRnnArgs& a, size_t shared,
                        const RnnParams& p) {
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.batch, kRows), &grid));
  RK_TRY(allowDynamicShared(kernel, shared));
  return launch(kernel, grid, static_cast<unsigned>(4 * a.headDim), shared, p);
}

template <class T, int CELL>
Status launchForward(const std::string& fn, const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  constexpr int S = statesOf(CELL);
  RnnParams p = baseParams(a);
  static_cast<FusedRnnOutputs&>(p) = o;
  DeviceBuffer lens;
  RK_TRY(uploadLengths(a, &lens, &p.deviceLengths));
  int path = 0;
  size_t shared = 0;
  MultiPlan multi;
  using Op = typename Operands<T>::Fwd;
  RK_TRY(choosePath<Op>(fn, CELL, a.headDim, a.heads * ceilDiv(a.batch, kRows), false, std::is_same<T, float>::value,
                        fusedRnnForwardMultiKernel<T, CELL>, &path, &shared, &multi));
  if (path == 3) {
    const Status st = launchMulti<Op>(fusedRnnForwardMultiKernel<T, CELL>, multi, p, kRows * a.headDim);
    if (!refusedCooperative(st)) return st;
  }
  if (path == 1) {
    // Each step's inputs through a double-buffered shared tile where it still fits.
    int optin = 0;
    RK_TRY(deviceAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
    const size_t tile = inputTileBytes<T>(CELL, a.headDim);
    if (shared + tile <= static_cast<size_t>(optin)) p.inputTile = true, shared += tile;
    return launchPersistent(fn, fusedRnnForwardKernel<T, CELL>, a, shared, p);
  }
  const int64_t SE = a.batch * a.heads * a.headDim;
  DeviceBuffer scratch;  // h twice (ping-pong), then the states 1..S-1 at their slots
  RK_TRY(scratch.allocate(static_cast<size_t>((S + 1) * SE) * sizeof(float)));
  float* hBuf[2] = {static_cast<float*>(scratch.get()), static_cast<float*>(scratch.get()) + SE};
  float* st = static_cast<float*>(scratch.get()) + SE;  // slot s at st + s * SE, s >= 1
  RK_TRY(launch(initStatesKernel, gridFor(S * SE), 256, 0, a.states0, hBuf[0], st, static_cast<int64_t>(S), SE));
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.headDim, kStepCols) * ceilDiv(a.batch, kStepRows), &grid));
  for (int64_t t = 0; t < a.T; ++t) {
    RK_TRY(launch(fusedRnnForwardStepKernel<T, CELL>, grid, kStepThreads, 0, p, t, hBuf[t & 1], hBuf[(t + 1) & 1], st));
  }
  return launch(finishForwardKernel<T>, gridFor(SE), 256, 0, hBuf[a.T & 1], st, o.finalStates,
                a.returnLastOnly ? static_cast<T*>(o.h) : nullptr, static_cast<int64_t>(S), SE);
}

template <class T, int CELL>
Status launchBackward(const std::string& fn, const FusedRnnArgs& a, const FusedRnnGrads& g) {
  constexpr int G = gatesOf(CELL), S = statesOf(CELL);
  RnnParams p = baseParams(a);
  p.cSavedStates = g.savedStates;
  p.cSavedPre = g.savedPre;
  p.dh = g.dh;
  p.dFinal = g.dFinal;
  p.dwx = g.dwx;
  p.dStates0 = g.dStates0;
  DeviceBuffer lens;
  RK_TRY(uploadLengths(a, &lens, &p.deviceLengths));
  const int64_t SE = a.batch * a.heads * a.headDim, N = a.T * a.batch, mats = G * a.heads;
  const int64_t DD = a.headDim * a.headDim;
  DeviceBuffer grBuf;
  if (N > 0) {
    RK_TRY(grBuf.allocate(static_cast<size_t>(N * G * a.heads * a.headDim) * sizeof(float)));
    p.gr = static_cast<float*>(grBuf.get());
  }
  int path = 0;
  size_t shared = 0;
  MultiPlan multi;
  using Op = typename Operands<T>::Bwd;
  RK_TRY(choosePath<Op>(fn, CELL, a.headDim, a.heads * ceilDiv(a.batch, kRows), true, std::is_same<T, float>::value,
                        fusedRnnBackwardMultiKernel<T, CELL>, &path, &shared, &multi));
  if (path == 3 && a.batch > 0) {
    const Status st = launchMulti<Op>(fusedRnnBackwardMultiKernel<T, CELL>, multi, p, kRows * G * a.headDim);
    if (refusedCooperative(st)) {
      path = 2;
    } else {
      RK_TRY(st);
    }
  }
  if (a.batch == 0 || path == 3) {
    // Nothing flows (dR and db are zeros, below), or the multi-block kernels did it.
  } else if (path == 1) {
    RK_TRY(launchPersistent(fn, fusedRnnBackwardKernel<T, CELL>, a, shared, p));
  } else {
    DeviceBuffer scratch;  // gS [S, batch, H, D], then R transposed in fp32
    RK_TRY(scratch.allocate(static_cast<size_t>(S * SE + mats * DD) * sizeof(float)));
    float* gS = static_cast<float*>(scratch.get());
    float* Rt = gS + S * SE;
    RK_TRY(launch(initGradKernel<T>, gridFor(S * SE), 256, 0, g.dFinal,
                  a.returnLastOnly ? static_cast<const T*>(g.dh) : nullptr, gS, static_cast<int64_t>(S), SE));
    RK_TRY(launch(transposeRKernel<T>, gridFor(mats * DD), 256, 0, static_cast<const T*>(a.R), Rt, mats, a.headDim));
    unsigned grid = 0;
    RK_TRY(blocksFor(fn, a.heads * ceilDiv(a.headDim, kStepCols) * ceilDiv(a.batch, kStepRows), &grid));
    for (int64_t t = a.T - 1; t >= -1; --t) {
      RK_TRY(
          launch(fusedRnnBackwardStepKernel<T, CELL>, grid, kStepThreads, 0, p, t, static_cast<const float*>(Rt), gS));
    }
  }
  // dR and db.
  int sms = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMultiProcessorCount, &sms));
  const int64_t tiles = ceilDiv(a.headDim, kRedTile), base = mats * tiles * tiles;
  const int64_t maxSplits = std::max<int64_t>(1, ceilDiv(N, 4 * kRedChunk));
  const int64_t chosen = std::min<int64_t>(maxSplits, std::max<int64_t>(1, ceilDiv(2 * sms, base)));
  const int64_t splits = tunable("fusedRnn.reduceSplits", static_cast<int>(std::min<int64_t>(chosen, 1024)));
  if (splits < 1) return statusError(fn + ": split count below 1");
  const int64_t rowsPerSplit = std::max<int64_t>(1, ceilDiv(N, splits));
  DeviceBuffer part;
  RK_TRY(part.allocate(static_cast<size_t>(splits * (mats * DD + mats * a.headDim)) * sizeof(float)));
  float* partR = static_cast<float*>(part.get());
  float* partB = partR + splits * mats * DD;
  unsigned grid = 0;
  RK_TRY(blocksFor(fn, base * splits, &grid));
  if (std::is_same<T, float>::value) {
    RK_TRY(launch(reduceGradKernel<false>, grid, 256, 0, p, S, G, splits, rowsPerSplit, partR, partB));
  } else {
    RK_TRY(launch(reduceGradKernel<true>, grid, 256, 0, p, S, G, splits, rowsPerSplit, partR, partB));
  }
  return launch(finishGradKernel<T>, gridFor(mats * DD + mats * a.headDim), 256, 0, static_cast<const float*>(partR),
                static_cast<const float*>(partB), splits, mats * DD, mats * a.headDim, static_cast<T*>(g.dR), g.db);
}

}  // namespace

Status fusedRnnForward(const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  const std::string fn = "fusedRnnForward";
  RK_TRY(checkArgs(a, fn));
  if ((o.savedStates == nullptr) != (o.savedPre == nullptr)) {
    return statusError(fn + ": savedStates and savedPre go together");
  }
  if (a.batch == 0) return Status{};
  if (o.h == nullptr && (a.returnLastOnly || a.T > 0)) return statusError(fn + ": null h");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell, [&](auto cell) -> Status { return launchForward<T, decltype(cell)::value>(fn, a, o); });
  });
}

Status fusedRnnBackward(const FusedRnnArgs& a, const FusedRnnGrads& g) {
  const std::string fn = "fusedRnnBackward";
  RK_TRY(checkArgs(a, fn));
  if (g.dR == nullptr || g.db == nullptr) return statusError(fn + ": null dR or db");
  if (a.batch > 0 && a.T > 0 && (g.dwx == nullptr || g.savedStates == nullptr || g.savedPre == nullptr)) {
    return statusError(fn + ": null dwx or saved tensors");
  }
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell,
                        [&](auto cell) -> Status { return launchBackward<T, decltype(cell)::value>(fn, a, g); });
  });
}

}  // namespace rkcuda
