// Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): forward (Newton solves, the sequential
// fallback and mode sequential) and backward (implicit function theorem), for F32/F16/BF16 inputs
// with fp32 state and arithmetic: the launchers declared in newton/newton_rnn.h and the host
// planning here; the kernels by path in newton_cells.cuh (cells, parameters), newton_diag.cuh,
// newton_generic.cuh, newton_full_damped.cuh (DEER, ELK) and newton_backward.cuh.
//
// Cells. Every cell is written once per channel (cellForward / cellVjp): x[g] is the input part of
// gate g (wx + b; the GRU's n gate: wx alone), r[g] the recurrent part (rec; the GRU's n gate:
// rec + b_n). The vector-Jacobian product gives d/dx, d/dr and the direct d/dprev (not through rec);
// the per-channel S x S Jacobian block is assembled from it with the channel's own recurrent
// weights Rd[g] (the diagonal cells' R[g][n], the dense cells' R[g][head][j][j]), so the forward
// linearisation and the backward use the same derivatives.
//
// Diagonal cells (gru-diag, lstm-cifg-diag), plain Newton: one fused launch per solve
// (diagNewtonKernel). A block owns CW consecutive channels (CW = 4..32, lanes adjacent in a channel
// so that loads coalesce) of one batch row and the whole sequence, cut into NS = threads / CW time
// slices of L = ceil(T / NS) steps, one thread per (channel, slice). The trajectory lives in the
// output traj (global memory: at the benchmark sizes a row-channel's T x (wx, traj) is 64 KB, far
// above what a block can hold on chip). Each thread walks its slice sequentially, so every pass
// reads wx and traj once and writes traj once, coalesced over the CW channels. One pass per Newton
// step does everything: at step t it re-linearises f at the old iterate (old traj_{t-1} carried in
// a register), gets the new traj_t = f_old + J_old (new_{t-1} - old_{t-1}), evaluates f and J at
// the new iterate (the same wx_t), checks |f(new_{t-1}) - new_t| against the tolerance, and
// composes the new affine step (J, f - J new_{t-1}) into the slice's aggregate for the next step.
// Between passes the slices' aggregates go through shared memory: a thread composes the
// aggregates of the slices before its own onto h0 (common/scan.cuh AffineN: S = 1 scalars, S = 2
// 2x2 maps). The block stops as soon as all its elements pass the check (channels are independent)
// or after maxIters steps; it writes (iterations, converged, residual) to scratch, and the host
// reduces them per row (max / AND / max). Non-converged rows are then recomputed by the
// sequential kernel (thread per channel) when fallbackSequential.
//
// Dense cells (gru, lstm, elman; heads of headDim D), and damping (ELK) for any cell: a host loop
// of small kernels over the steps, with per-row state on the device (no host synchronisation
// inside the loop): evalDiagKernel / evalDenseKernel evaluate f and its derivatives at the current
// iterate for every (row, t, channel) in parallel and write the linearisation to scratch and
// per-block check results; the dense evaluation needs h_{t-1} @ R at every t, a batched fp32 FMA
// matrix product tiled through shared memory (32 positions x 32 channels x G gates per block);
// finalizeKernel reduces the checks per row and decides (converged, out of steps, or one more
// step). Then one of three steps:
//   * per-channel S x S Jacobians (diagonal cells with damping 0 never come here; dense cells with
//     fullJacobian false, quasi-DEER): scanStepKernel solves h_t = J_t h_{t-1} + c_t per (row,
//     channel) in parallel over time, with the fused kernels' slice layout and AffineN maps;
//   * damping > 0: dampedStepKernel, the Levenberg-Marquardt step: the minimiser of
//     sum_t |h_t - J_t h_{t-1} - c_t|^2 + lambda sum_t |h_t - h_t^(i)|^2, i.e. a Kalman filter forward
//     and a Rauch-Tung-Striebel smoother backward (process noise I, observation noise I / lambda),
//     sequential in time per (row, channel) (a parallel form needs the associative Kalman
//     elements, about 3x the work; not done). Damping with the full Jacobian is refused.
//   * dense cells with fullJacobian (DEER): the exact (S D) x (S D) Jacobian per head, S D <= 128.
//     The evaluation writes per (row, t, channel) the derivatives of the channel's outputs with
//     respect to its own previous states and to its G recurrent parts, and the residual r_t =
//     f(old_{t-1}) - old_t (FullCoef); J_t = those derivatives combined with R (buildJacobian) is
//     never stored whole (it would be M^2 floats per position). The step solves d_t = J_t d_{t-1} +
//     r_t for the update d = new - old (d_{-1} = 0, h0 is fixed) as a chunked scan over time:
//     fullChunkKernel, a block per (row, head, chunk of L steps), builds each J_t in shared memory
//     and composes the chunk's aggregate A = J_{t1-1} ... J_{t0} (an M x M matrix product per step)
//     and b (the chunk's solve from zero); fullCarryKernel, a block per (row, head), walks the
//     chunks, d = A d + b, for the state before each chunk; fullApplyKernel, a block per (row, head,
//     chunk), runs the chunk from that state (J_t d applied through R: G D FMAs per channel and
//     step, no matrix) and adds d to traj.
//     Precision of the chunk products. They run on the tensor cores (m16n8k8 tf32, common/mma.cuh)
//     with both operands split into a tf32 high part and a tf32 remainder, three products per
//     tile (a_hi b_hi + a_hi b_lo + a_lo b_hi): about 1e-7 relative, like fp32 FMA, at three times
//     the tensor work, still about twice the FMA rate (newtonRnn.fullTensorCores = 1 picks fp32
//     FMA). Plain tf32 (1e-3 per operand) would not stop Newton from reaching the exact answer: the
//     convergence check evaluates the exact f in fp32, and in this update form an error of the
//     linear solve is relative to the update d, not to the state, so an inexact step still
//     contracts the error (by about the solve's relative error per step instead of quadratically).
//     But a step would then differ from the exact Newton step by 1e-5 .. 1e-4 relative (measured on
//     the emulator test: 1e-5 to 2e-5 after one step from the one-step guess), iteration counts
//     could exceed exact Newton's near the tolerance, and the iterate after k steps would not be
//     the float64 Newton iterate to fp32 precision. The split keeps the step exact to fp32, so the
//     counts and iterates are those of exact Newton, for a cost that is small beside the rest of
//     a step (below).
// Mode sequential and the fallback for the dense cells: denseSequentialKernel, a block per (row,
// head) walking t, R in shared memory (padded rows) when it fits, else read through L1.
//
// Backward. At the solution the implicit function theorem gives lambda_t = dy_t + J_{t+1}^T
// lambda_{t+1}, which is the reverse-time adjoint of the sequential recurrence (BPTT) evaluated on
// traj. Diagonal cells: diagBackwardKernel, the same slice layout in reverse time: pass 1 composes
// the maps (J_{t+1}^T, dy_t) of each slice, the slices' aggregates are composed through shared
// memory, pass 2 runs the adjoint from the slice's start and takes the cell's VJP at each step
// (dwx per position; dR, db summed over the slice in registers, over the slices in shared memory,
// over rows and channel blocks by fp32 atomics into the zeroed outputs; dh0 = J_0^T lambda_0).
// Dense cells: denseBackwardKernel, a block per (row, head) in reverse time (exact adjoint through
// the full R), writing d rec to scratch; dR = sum_t h_{t-1}^T drec_t is a tiled reduction over
// (row, t) (denseGradRKernel) and db a column sum (gradBKernel).
//
// Bounds (H100/H200, fp32, 8 heads x 128 = 1024 channels, 3 Newton steps):
//   * diagNewtonKernel is bound by HBM traffic: the first pass reads wx (3 floats per element for
//     both diagonal cells) and writes the guess (S floats), each step pass reads wx and traj and
//     writes traj (3 + 2S floats), the outputs kernel reads traj and writes y (1 + 1). gru-diag at
//     batch 8, T 4096: 33.5 M elements x (4 + 3 x 5 + 2) floats x 4 B = 2.8 GB, about 0.85 ms at
//     3.35 TB/s (1024 x 1024 x 8: 0.21 ms; 1 x 16384 x 1024: 0.43 ms, where the 256 blocks of 4
//     channels reach half occupancy and latency limits more). The cross-slice composition is
//     O(NS) per thread per step and negligible.
//     Its time loops issue each step's loads where they are used (at 512 threads the kernel sits at
//     the 128-register budget, and holding the next step's loads in registers spills: LstmCifgDiag,
//     sm_80 and sm_90), and prefetch the wx and trajectory lines of the step two ahead into L2
//     (prefetchStepL2, no registers held), so that a warp's loads of each step wait on L2 rather
//     than HBM while two steps' lines are on their way.
//   * diagBackwardKernel: two passes, reading wx, traj, dy twice and writing dwx once
//     (2 x 5 + 3 floats), 1.75 GB at batch 8, T 4096: about 0.55 ms; fp32 atomics for dR, db are
//     one per (channel, block). Both passes issue each step's loads two steps ahead
//     (pipelinedSteps, newton_cells.cuh), as does diagSequentialKernel, so a warp keeps three steps
//     of loads in flight instead of one, so that the passes come nearer the HBM bound above (not
//     measured).
//   * The generic path: the dense evaluation reads wx, traj (twice) and writes the linearisation
//     (per-channel: S*S + S floats; full: S (S + G) + S, 5 for the gru), about 44 B per element for
//     the full gru, and does 2 G D FLOP per element on FMA units (~60 TFLOP/s fp32, not the bound
//     for D <= 64). scanStepKernel reads the linearisation twice and writes traj (gru: 20 B per
//     element, HBM-bound: 0.2 ms at batch 8, T 4096, 1024 channels); dampedStepKernel is
//     latency-bound (T sequential steps per thread). The dense sequential and backward kernels are
//     latency-bound per time step (one block per (row, head)).
//   * Full Jacobian, gru, hidden 1024, batch 8, fp32 (E = 8 T 1024 elements; L = 64 at these sizes):
//     evaluation ~44 B x E (HBM): 0.45 ms at T 4096, 0.11 ms at T 1024. fullChunkKernel: B H T MP^3
//     multiply-adds, three tf32 mma per 16 x 8 x 8 tile with both operands read from shared memory
//     (6 floats per lane per tile: shared-memory bound, ~170 useful MAC per clock per SM): heads of
//     32 (MP 32): 34 G MAC, about 0.85 ms at T 4096 plus ~0.2 ms building J_t (G R reads per
//     element of J) and reading the coefficients (20 B x E); heads of 16 (MP 16): 8.6 G MAC, but
//     latency-bound (a step is ~1 us of dependent loads, three barriers and a short mma chain, 16
//     resident blocks per SM): ~0.6 ms at T 4096. fullCarryKernel: B H blocks walking T / L chunks,
//     ~1 us per chunk: 0.07 ms. fullApplyKernel: 28 B x E (HBM): 0.3 ms at T 4096. A Newton step is
//     then about 1.9 ms (heads of 32) / 1.4 ms (heads of 16) at T 4096 and 0.5 / 0.4 ms at T 1024;
//     exact Newton needs ~3-5 steps plus the last evaluation on typical gru weights: expected
//     6-10 ms (heads of 32) and 5-7 ms (heads of 16) at T 4096, 1.5-3 ms at T 1024. For comparison
//     the sequential kernel takes ~T x 2 us: ~8 ms at T 4096, 2 ms at T 1024 (H100, not measured).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/api.h"
#include "newton/newton_rnn.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/scan.cuh"

#include "newton/newton_backward.cuh"
#include "newton/newton_cells.cuh"
#include "newton/newton_diag.cuh"
#include "newton/newton_full_damped.cuh"
#include "newton/newton_generic.cuh"

namespace rkcuda {
namespace {

// ---- host side ----

Status smCount(int* count) {
  int dev = 0;
  RK_CUDA_TRY(cudaGetDevice(&dev));
  RK_CUDA_TRY(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, dev));
  return Status{};
}

// Every launch here is a 1-D grid: refuse problems whose grids would not fit.
Status gridFits(double blocks, const std::string& fn) {
  if (blocks > 2147483647.0) return statusError(fn + ": problem too large for one launch");
  return Status{};
}

int gatesOf(NewtonCell c) { return c == NewtonCell::Lstm ? 4 : c == NewtonCell::Elman ? 1 : 3; }
int statesOf(NewtonCell c) { return c == NewtonCell::Lstm || c == NewtonCell::LstmCifgDiag ? 2 : 1; }
bool diagCell(NewtonCell c) { return c == NewtonCell::GruDiag || c == NewtonCell::LstmCifgDiag; }

Status checkArgs(const NewtonRnnArgs& a, const std::string& fn) {
  auto bad = [&](const std::string& what) { return statusError(fn + ": " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  const int cell = static_cast<int>(a.cell);
  if (cell < 0 || cell > 4) return bad("unknown cell");
  if (a.batch < 0 || a.T < 0) return bad("negative batch or T");
  if (a.heads < 1 || a.headDim < 1) return bad("heads and headDim must be at least 1");
  if (a.batch > (int64_t{1} << 31) || a.T > (int64_t{1} << 31) || a.heads > (int64_t{1} << 31) ||
      a.headDim > (int64_t{1} << 31) || a.heads * a.headDim > (int64_t{1} << 31))
    return bad("sizes too large");
  if (!diagCell(a.cell) && a.headDim > kMaxHeadDim)
    return bad("headDim above " + std::to_string(kMaxHeadDim) + " for a dense cell");
  if (a.maxIters < 0) return bad("negative maxIters");
  if (!std::isfinite(a.tolAbs) || !std::isfinite(a.tolRel) || a.tolAbs < 0 || a.tolRel < 0)
    return bad("tolerances must be finite and non-negative");
  if (!std::isfinite(a.damping) || a.damping < 0) return bad("damping must be finite and non-negative");
  const int guess = static_cast<int>(a.guess);
  if (guess < 0 || guess > 2) return bad("unknown guess");
  const int64_t elems = a.batch * a.T;
  if (a.R == nullptr || a.b == nullptr) return bad("null R or b");
  if (elems > 0 && a.wx == nullptr) return bad("null wx");
  if (elems > 0 && a.guess == NewtonGuess::Provided && !a.sequential && a.guessTraj == nullptr)
    return bad("null guessTraj");
  // The largest grids: one thread per element of traj / y / jc (256 per block), the dense
  // evaluation's (row, 32 positions, head, 32 channels) tiles, a block per (row, 4 channels).
  const int64_t N = a.heads * a.headDim, S = statesOf(a.cell);
  const double B = static_cast<double>(a.batch);
  RK_TRY(gridFits(std::ceil(static_cast<double>(elems) * static_cast<double>(N) * (S * S + S + 1) / 256.0), fn));
  RK_TRY(gridFits(B * std::ceil(a.T / 32.0) * static_cast<double>(a.heads) * std::ceil(a.headDim / 32.0), fn));
  RK_TRY(gridFits(B * std::ceil(N / 4.0), fn));
  return Status{};
}

Params baseParams(const NewtonRnnArgs& a) {
  Params p;
  static_cast<NewtonRnnArgs&>(p) = a;
  p.N = a.heads * a.headDim;
  return p;
}

template <class F> Status dispatchCell(NewtonCell c, F&& f) {
  switch (c) {
    case NewtonCell::GruDiag:
      return f(std::integral_constant<NewtonCell, NewtonCell::GruDiag>{});
    case NewtonCell::LstmCifgDiag:
      return f(std::integral_constant<NewtonCell, NewtonCell::LstmCifgDiag>{});
    case NewtonCell::Gru:
      return f(std::integral_constant<NewtonCell, NewtonCell::Gru>{});
    case NewtonCell::Lstm:
      return f(std::integral_constant<NewtonCell, NewtonCell::Lstm>{});
    case NewtonCell::Elman:
      return f(std::integral_constant<NewtonCell, NewtonCell::Elman>{});
  }
  return statusError("unknown cell");
}

// Channels per block and threads of the fused kernels (tunable): enough blocks to cover the SMs
// twice when possible, and slices of at least about 16 steps.
Status fusedShape(const Params& p, const char* what, int* chan, int* threads) {
  int sms = 132;
  RK_TRY(smCount(&sms));
  int cw = 32;
  while (cw > 4 && p.batch * ceilDiv(p.N, cw) < 2 * sms) cw >>= 1;
  cw = tunable((std::string(what) + ".channelsPerBlock").c_str(), cw);
  if (cw != 4 && cw != 8 && cw != 16 && cw != 32) return statusError(std::string(what) + ": bad channels per block");
  int slices = 1;
  while (slices * cw < kFusedThreads && slices * 32 <= p.T) slices <<= 1;
  int nt = std::max(32, slices * cw);
  nt = tunable((std::string(what) + ".blockThreads").c_str(), nt);
  if (nt < 32 || nt > kFusedThreads || nt % 32 != 0 || nt % cw != 0)
    return statusError(std::string(what) + ": bad block size");
  *chan = cw;
  *threads = nt;
  return Status{};
}

// Dense kernels' R placement: shared memory (padded rows) when G D (D + 1) floats fit, else global.
Status denseWeights(const NewtonRnnArgs& a, int extraFloats, size_t* bytes, int* ld) {
  const int G = gatesOf(a.cell), D = static_cast<int>(a.headDim);
  const size_t rBytes = static_cast<size_t>(G) * D * (D + 1) * sizeof(float);
  const size_t base = static_cast<size_t>(extraFloats) * sizeof(float);
  const bool fits = base + rBytes <= 160 * 1024;
  const int choice = tunable("newtonRnn.denseSharedR", fits ? 2 : 1);
  if (choice != 1 && choice != 2) return statusError("newtonRnn: bad denseSharedR");
  if (choice == 2 && !fits) return statusError("newtonRnn: R of a head does not fit in shared memory");
  *ld = choice == 2 ? D + 1 : 0;
  *bytes = base + (choice == 2 ? rBytes : 0);
  return Status{};
}

template <class T, NewtonCell C>
Status runSequential(const NewtonRnnArgs& a, Params p, const std::vector<int>& rows, bool all) {
  const int64_t count = all ? a.batch : static_cast<int64_t>(rows.size());
  if (count == 0 || a.T == 0) return Status{};
  DeviceBuffer rowBuf;
  p.rows = nullptr;
  if (!all) {
    RK_TRY(rowBuf.allocate(rows.size() * sizeof(int)));
    RK_CUDA_TRY(cudaMemcpyAsync(rowBuf.get(), rows.data(), rows.size() * sizeof(int), cudaMemcpyHostToDevice, 0));
    p.rows = static_cast<const int*>(rowBuf.get());
  }
  if constexpr (CellInfo<C>::diag) {
    p.blocksPerRow = ceilDiv(p.N, 128);
    return launch(diagSequentialKernel<C, T>, static_cast<unsigned>(count * p.blocksPerRow), 128, 0, p);
  } else {
    const int D = static_cast<int>(a.headDim);
    size_t bytes = 0;
    RK_TRY(denseWeights(a, (D + 3) & ~3, &bytes, &p.ldR));
    if (bytes > 48 * 1024) RK_TRY(allowDynamicShared(denseSequentialKernel<C, T>, bytes));
    const unsigned threads = static_cast<unsigned>(ceilDiv(D, 32) * 32);
    return launch(denseSequentialKernel<C, T>, static_cast<unsigned>(count * a.heads), threads, bytes, p);
  }
}

struct RowStats {
  std::vector<int> iterations, converged;
  std::vector<float> residual;
};

// The fused solve of the diagonal cells.
template <class T, NewtonCell C> Status runFused(const NewtonRnnArgs& a, Params p, RowStats* st) {
  int cw, nt;
  RK_TRY(fusedShape(p, "newtonRnn", &cw, &nt));
  p.chan = cw;
  p.blocksPerRow = ceilDiv(p.N, cw);
  const int64_t blocks = a.batch * p.blocksPerRow;
  DeviceBuffer stats;
  RK_TRY(stats.allocate(static_cast<size_t>(blocks) * 3 * sizeof(int)));
  p.blockStats = static_cast<int*>(stats.get());
  RK_TRY(launch(diagNewtonKernel<C, T>, static_cast<unsigned>(blocks), static_cast<unsigned>(nt), 0, p));
  std::vector<int> host(static_cast<size_t>(blocks) * 3);
  RK_TRY(copyDeviceToHost(host.data(), stats.get(), host.size() * sizeof(int)));
  for (int64_t r = 0; r < a.batch; ++r) {
    int it = 0, conv = 1;
    float res = 0.0f;
    for (int64_t k = 0; k < p.blocksPerRow; ++k) {
      const int* s = &host[3 * (r * p.blocksPerRow + k)];
      float v;
      std::memcpy(&v, &s[2], sizeof v);
      it = std::max(it, s[0]);
      conv = conv && s[1];
      res = (v > res || std::isnan(v)) ? v : res;
    }
    st->iterations[r] = it;
    st->converged[r] = conv;
    st->residual[r] = res;
  }
  return Status{};
}

// The full-Jacobian step's shape: chunk length (tunable newtonRnn.fullChunk: enough (row, head,
// chunk) blocks to fill the SMs four times, chunks of 8 to 64 steps), the chunk products' units
// (newtonRnn.fullTensorCores: 2 tensor cores, 1 fp32 FMA) and the chunk kernel's block size
// (newtonRnn.fullThreads) and shared memory.
template <NewtonCell C> Status fullPlan(const NewtonRnnArgs& a, Params* p, unsigned* threads, size_t* bytes) {
  const int D = static_cast<int>(a.headDim), M = CellInfo<C>::S * D, MP = (M + 15) / 16 * 16;
  int sms = 132;
  RK_TRY(smCount(&sms));
  int64_t L = 64;
  while (L > 8 && a.batch * a.heads * ceilDiv(a.T, L) < 4 * sms) L >>= 1;
  L = tunable("newtonRnn.fullChunk", static_cast<int>(L));
  if (L < 1) return statusError("newtonRnn: bad full-Jacobian chunk length");
  const int tc = tunable("newtonRnn.fullTensorCores", 2);
  if (tc != 1 && tc != 2) return statusError("newtonRnn: bad fullTensorCores");
  const int nt = tunable("newtonRnn.fullThreads", MP <= 32 ? 128 : 256);
  if (nt < 32 || nt > 256 || nt % 32 != 0) return statusError("newtonRnn: bad full-Jacobian block size");
  p->M = M;
  p->MP = MP;
  p->chunkLen = L;
  p->chunks = ceilDiv(a.T, L);
  RK_TRY(gridFits(static_cast<double>(a.batch) * static_cast<double>(a.heads) * static_cast<double>(p->chunks),
                  "newtonRnnForward"));
  p->tensorCores = tc == 2 ? 1 : 0;
  *threads = static_cast<unsigned>(nt);
  *bytes = static_cast<size_t>(MP * fullLdJ(MP) + 2 * MP * fullLdA(MP) + fullCoefFloats(FullCoef<C>::K, D) + 2 * MP) *
           sizeof(float);
  if (*bytes > 48 * 1024) RK_TRY(allowDynamicShared(fullChunkKernel<C>, *bytes));
  return Status{};
}

// The host loop of the generic path (dense cells, with the per-channel or the full Jacobian; damping).
template <class T, NewtonCell C> Status runGeneric(const NewtonRnnArgs& a, Params p, RowStats* st) {
  constexpr int S = CellInfo<C>::S, G = CellInfo<C>::G;
  const int64_t elems = a.batch * a.T * p.N;
  p.full = !CellInfo<C>::diag && a.fullJacobian;
  const int K = p.full ? FullCoef<C>::K : S * S + S;
  DeviceBuffer jcBuf, kalBuf, partBuf, stateBuf, aggBuf, carryBuf;
  unsigned chunkThreads = 128;
  size_t chunkBytes = 0, applyBytes = 0;
  if constexpr (!CellInfo<C>::diag) {
    if (p.full) RK_TRY(fullPlan<C>(a, &p, &chunkThreads, &chunkBytes));
  }
  RK_TRY(jcBuf.allocate(static_cast<size_t>(elems) * K * sizeof(float)));
  p.jc = static_cast<float*>(jcBuf.get());
  if constexpr (!CellInfo<C>::diag) {
    if (p.full) {
      const int64_t blocks = a.batch * a.heads * p.chunks;
      RK_TRY(aggBuf.allocate(static_cast<size_t>(blocks) * (static_cast<size_t>(p.M) * p.M + p.M) * sizeof(float)));
      RK_TRY(carryBuf.allocate(static_cast<size_t>(blocks) * p.M * sizeof(float)));
      p.agg = static_cast<float*>(aggBuf.get());
      p.carry = static_cast<float*>(carryBuf.get());
      RK_TRY(denseWeights(a, (static_cast<int>(a.headDim) + 3) & ~3, &applyBytes, &p.ldR));
      if (applyBytes > 48 * 1024) RK_TRY(allowDynamicShared(fullApplyKernel<C>, applyBytes));
    }
  }
  if (a.damping > 0) {
    RK_TRY(kalBuf.allocate(static_cast<size_t>(elems) * (S + S * S) * sizeof(float)));
    p.kal = static_cast<float*>(kalBuf.get());
  }
  RK_TRY(stateBuf.allocate(static_cast<size_t>(a.batch) * 4 * sizeof(int)));
  p.rowState = static_cast<int*>(stateBuf.get());
  RK_CUDA_TRY(cudaMemsetAsync(p.rowState, 0, static_cast<size_t>(a.batch) * 4 * sizeof(int), 0));
  // Evaluation blocks per row.
  int64_t evalPerRow;
  unsigned evalThreads;
  if constexpr (CellInfo<C>::diag) {
    evalThreads = 256;
    evalPerRow = ceilDiv(a.T * p.N, 256);
  } else {
    evalThreads = 256;
    evalPerRow = ceilDiv(a.T, kTile) * a.heads * ceilDiv(a.headDim, kTile);
  }
  RK_TRY(partBuf.allocate(static_cast<size_t>(a.batch * evalPerRow) * 2 * sizeof(float)));
  p.partial = static_cast<float*>(partBuf.get());
  auto evaluate = [&](bool fromH0) -> Status {
    Params q = p;
    q.fromH0 = fromH0;
    q.blocksPerRow = evalPerRow;
    if constexpr (CellInfo<C>::diag) {
      return launch(evalDiagKernel<C, T>, static_cast<unsigned>(a.batch * evalPerRow), evalThreads, 0, q);
    } else {
      return launch(evalDenseKernel<C, T>, static_cast<unsigned>(a.batch * evalPerRow), evalThreads, 0, q);
    }
  };
  Params sp = p;  // the per-channel steps
  int stepThreads = 128;
  if (a.damping > 0) {
    sp.blocksPerRow = ceilDiv(p.N, 128);
  } else if (!p.full) {
    int cw;
    RK_TRY(fusedShape(p, "newtonRnnStep", &cw, &stepThreads));
    sp.chan = cw;
    sp.blocksPerRow = ceilDiv(p.N, cw);
  }
  // The guess.
  if (a.guess == NewtonGuess::OneStep) {
    RK_TRY(evaluate(true));
  } else {
    const int64_t total = elems * S;
    Params q = p;
    q.guessTraj = a.guess == NewtonGuess::Provided ? a.guessTraj : nullptr;
    RK_TRY(launch(guessKernel, static_cast<unsigned>(ceilDiv(total, 256)), 256, 0, q, total));
  }
  Params fp = p;
  fp.blocksPerRow = evalPerRow;
  for (int k = 0; k <= a.maxIters; ++k) {
    RK_TRY(evaluate(false));
    RK_TRY(launch(finalizeKernel, static_cast<unsigned>(a.batch), 256, 0, fp));
    if (k == a.maxIters) break;
    if (a.damping > 0) {
      RK_TRY(launch(dampedStepKernel<C>, static_cast<unsigned>(a.batch * sp.blocksPerRow), 128, 0, sp));
    } else if (p.full) {
      if constexpr (!CellInfo<C>::diag) {
        const unsigned blocks = static_cast<unsigned>(a.batch * a.heads * p.chunks);
        RK_TRY(launch(fullChunkKernel<C>, blocks, chunkThreads, chunkBytes, p));
        RK_TRY(launch(fullCarryKernel, static_cast<unsigned>(a.batch * a.heads),
                      static_cast<unsigned>(ceilDiv(p.M, 32) * 32), 0, p));
        RK_TRY(launch(fullApplyKernel<C>, blocks, static_cast<unsigned>(ceilDiv(a.headDim, 32) * 32), applyBytes, p));
      }
    } else {
      RK_TRY(launch(scanStepKernel<C>, static_cast<unsigned>(a.batch * sp.blocksPerRow),
                    static_cast<unsigned>(stepThreads), 0, sp));
    }
  }
  (void)G;
  std::vector<int> host(static_cast<size_t>(a.batch) * 4);
  RK_TRY(copyDeviceToHost(host.data(), p.rowState, host.size() * sizeof(int)));
  for (int64_t r = 0; r < a.batch; ++r) {
    st->iterations[r] = host[r];
    st->converged[r] = host[2 * a.batch + r];
    std::memcpy(&st->residual[r], &host[3 * a.batch + r], sizeof(float));
  }
  return Status{};
}

}  // namespace

Status newtonRnnForward(const NewtonRnnArgs& a, const NewtonRnnOutputs& o) {
  const std::string fn = "newtonRnnForward";
  RK_TRY(checkArgs(a, fn));
  const int64_t N = a.heads * a.headDim;
  const int S = statesOf(a.cell);
  if (a.batch * a.T > 0 && (o.traj == nullptr || o.y == nullptr)) return statusError(fn + ": null traj or y");
  if (!diagCell(a.cell) && a.fullJacobian && !a.sequential) {
    if (a.damping > 0) {
      return statusError(fn +
                         ": damping with the full Jacobian of the dense cells is not implemented on CUDA; use "
                         "the per-channel Jacobian (fullJacobian false) for damped steps");
    }
    if (S * a.headDim > kMaxFullM) {
      return statusError(fn + ": the full Jacobian needs states x headDim <= " + std::to_string(kMaxFullM) + ", got " +
                         std::to_string(S * a.headDim) + "; use the per-channel Jacobian (fullJacobian false)");
    }
  }
  RowStats st;
  st.iterations.assign(static_cast<size_t>(a.batch), 0);
  st.converged.assign(static_cast<size_t>(a.batch), 1);
  st.residual.assign(static_cast<size_t>(a.batch), 0.0f);
  std::vector<uint8_t> fellBack(static_cast<size_t>(a.batch), 0);
  RK_TRY(dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell, [&](auto cellTag) -> Status {
      constexpr NewtonCell C = decltype(cellTag)::value;
      Params p = baseParams(a);
      p.traj = o.traj;
      if (a.batch > 0 && a.T > 0) {
        if (a.sequential) {
          RK_TRY((runSequential<T, C>(a, p, {}, true)));
        } else {
          bool fused = false;
          if constexpr (CellInfo<C>::diag) {
            if (a.damping == 0.0f) {
              RK_TRY((runFused<T, C>(a, p, &st)));
              fused = true;
            }
          }
          if (!fused) RK_TRY((runGeneric<T, C>(a, p, &st)));
          std::vector<int> rows;
          for (int64_t r = 0; r < a.batch; ++r)
            if (!st.converged[r]) rows.push_back(static_cast<int>(r));
          if (a.fallbackSequential && !rows.empty()) {
            RK_TRY((runSequential<T, C>(a, p, rows, false)));
            for (int r : rows) fellBack[r] = 1;
          }
        }
      }
      const int64_t total = a.batch * a.T * N + (o.finalStates != nullptr ? S * a.batch * N : 0);
      if (total > 0) {
        RK_TRY(launch(outputsKernel<T>, static_cast<unsigned>(ceilDiv(total, 256)), 256, 0,
                      static_cast<const float*>(o.traj), static_cast<T*>(o.y), o.finalStates, a.h0, a.batch, a.T, S,
                      N));
      }
      return Status{};
    });
  }));
  for (int64_t r = 0; r < a.batch; ++r) {
    if (o.iterations != nullptr) o.iterations[r] = st.iterations[r];
    if (o.residual != nullptr) o.residual[r] = st.residual[r];
    if (o.converged != nullptr) o.converged[r] = static_cast<uint8_t>(st.converged[r] ? 1 : 0);
    if (o.fellBack != nullptr) o.fellBack[r] = fellBack[r];
  }
  if (o.iterations != nullptr || o.residual != nullptr || o.converged != nullptr || o.fellBack != nullptr) {
    RK_TRY(synchronize());
  }
  return Status{};
}

Status newtonRnnBackward(const NewtonRnnArgs& a, const NewtonRnnGrads& g) {
  const std::string fn = "newtonRnnBackward";
  RK_TRY(checkArgs(a, fn));
  const int64_t N = a.heads * a.headDim;
  const int G = gatesOf(a.cell), S = statesOf(a.cell);
  const int64_t elems = a.batch * a.T;
  if (g.dR == nullptr || g.db == nullptr) return statusError(fn + ": null dR or db");
  if (elems > 0 && (g.traj == nullptr || g.dwx == nullptr)) return statusError(fn + ": null traj or dwx");
  const int64_t rSize = diagCell(a.cell) ? G * N : G * a.heads * a.headDim * a.headDim;
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    return dispatchCell(a.cell, [&](auto cellTag) -> Status {
      constexpr NewtonCell C = decltype(cellTag)::value;
      Params p = baseParams(a);
      p.traj = const_cast<float*>(g.traj);
      p.dy = g.dy;
      p.dFinal = g.dFinal;
      p.dwx = g.dwx;
      p.dR = g.dR;
      p.db = g.db;
      p.dh0 = g.dh0;
      if (elems == 0) {
        RK_TRY(zeroFloats(g.dR, rSize));
        RK_TRY(zeroFloats(g.db, G * N));
        if (g.dh0 != nullptr) {
          if (g.dFinal != nullptr)
            RK_TRY(copyDeviceToDevice(g.dh0, g.dFinal, S * a.batch * N * sizeof(float)));
          else
            RK_TRY(zeroFloats(g.dh0, S * a.batch * N));
        }
        return Status{};
      }
      if constexpr (CellInfo<C>::diag) {
        RK_TRY(zeroFloats(g.dR, rSize));
        RK_TRY(zeroFloats(g.db, G * N));
        int cw, nt;
        RK_TRY(fusedShape(p, "newtonRnnBackward", &cw, &nt));
        p.chan = cw;
        p.blocksPerRow = ceilDiv(N, cw);
        return launch(diagBackwardKernel<C, T>, static_cast<unsigned>(a.batch * p.blocksPerRow),
                      static_cast<unsigned>(nt), 0, p);
      } else {
        DeviceBuffer drec;
        RK_TRY(drec.allocate(static_cast<size_t>(elems) * G * N * sizeof(float)));
        p.drec = static_cast<float*>(drec.get());
        const int D = static_cast<int>(a.headDim), Dp = (D + 3) & ~3;
        size_t bytes = 0;
        RK_TRY(denseWeights(a, Dp + G * Dp, &bytes, &p.ldR));
        if (bytes > 48 * 1024) RK_TRY(allowDynamicShared(denseBackwardKernel<C, T>, bytes));
        RK_TRY(launch(denseBackwardKernel<C, T>, static_cast<unsigned>(a.batch * a.heads),
                      static_cast<unsigned>(ceilDiv(D, 32) * 32), bytes, p));
        const int64_t tiles = ceilDiv(a.headDim, kTile);
        RK_TRY(launch(denseGradRKernel, static_cast<unsigned>(G * a.heads * tiles * tiles), 256, 0, p, G, S));
        return launch(gradBKernel, static_cast<unsigned>(ceilDiv(G * N, 256)), 256, 0, p, G);
      }
    });
  });
}

}  // namespace rkcuda
