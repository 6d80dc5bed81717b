// Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): forward (Newton solves, the sequential
// fallback and mode sequential) and backward (implicit function theorem), for F32/F16/BF16 inputs
// with fp32 state and arithmetic: kernels plus the launchers declared in common/api.h.
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
//   * diagBackwardKernel: two passes, reading wx, traj, dy twice and writing dwx once
//     (2 x 5 + 3 floats), 1.75 GB at batch 8, T 4096: about 0.55 ms; fp32 atomics for dR, db are
//     one per (channel, block).
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

namespace rkcuda {
namespace {

constexpr int kMaxG = 4, kMaxS = 2;
constexpr int kFusedThreads = 512;  // largest block of the fused kernels (register budget 128)
constexpr int kMaxHeadDim = 1024;   // dense cells: a block per (row, head), a thread per channel
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTile = 32;       // dense evaluation / reduction tiles
constexpr int kMaxFullM = 128;  // full Jacobian: S * headDim at most (the block's matrices in shared memory)

__device__ __forceinline__ int64_t minI(int64_t a, int64_t b) { return a < b ? a : b; }

template <NewtonCell C> struct CellInfo;
template <> struct CellInfo<NewtonCell::GruDiag> {
  static constexpr int G = 3, S = 1;
  static constexpr bool diag = true;
};
template <> struct CellInfo<NewtonCell::LstmCifgDiag> {
  static constexpr int G = 3, S = 2;
  static constexpr bool diag = true;
};
template <> struct CellInfo<NewtonCell::Gru> {
  static constexpr int G = 3, S = 1;
  static constexpr bool diag = false;
};
template <> struct CellInfo<NewtonCell::Lstm> {
  static constexpr int G = 4, S = 2;
  static constexpr bool diag = false;
};
template <> struct CellInfo<NewtonCell::Elman> {
  static constexpr int G = 1, S = 1;
  static constexpr bool diag = false;
};

constexpr bool isGru(NewtonCell c) { return c == NewtonCell::GruDiag || c == NewtonCell::Gru; }

// The full-Jacobian linearisation of one channel at one step, K floats at [batch, T, K, N]: for each
// output state i the direct derivatives d out_i / d prev_s (s < S, at i * W + s) and the ones through
// the recurrent parts d out_i / d r_g (g < G, at i * W + S + g), then the residuals f_i - traj_i (at
// S * W + i). The head's (S D) x (S D) Jacobian follows with R (see buildJacobian).
template <NewtonCell C> struct FullCoef {
  static constexpr int S = CellInfo<C>::S, G = CellInfo<C>::G, W = S + G, K = S * W + S;
};

// ---- the cells, per channel ----

struct Act {
  float g[kMaxG];  // gate activations
  float tc;        // tanh(c) (LSTMs)
};

__device__ __forceinline__ float tanhAcc(float x) { return tanhf(x); }

template <NewtonCell C>
__device__ __forceinline__ void cellForward(const float (&x)[kMaxG], const float (&r)[kMaxG],
                                            const float (&prev)[kMaxS], Act& a, float (&out)[kMaxS]) {
  if constexpr (isGru(C)) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = sigmoid(x[1] + r[1]);
    a.g[2] = tanhAcc(fmaf(a.g[0], r[2], x[2]));
    out[0] = fmaf(a.g[1], prev[0] - a.g[2], a.g[2]);
  } else if constexpr (C == NewtonCell::LstmCifgDiag) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = tanhAcc(x[1] + r[1]);
    a.g[2] = sigmoid(x[2] + r[2]);
    const float c = fmaf(a.g[0], prev[1] - a.g[1], a.g[1]);
    a.tc = tanhAcc(c);
    out[0] = a.g[2] * a.tc;
    out[1] = c;
  } else if constexpr (C == NewtonCell::Lstm) {
    a.g[0] = sigmoid(x[0] + r[0]);
    a.g[1] = sigmoid(x[1] + r[1]);
    a.g[2] = tanhAcc(x[2] + r[2]);
    a.g[3] = sigmoid(x[3] + r[3]);
    const float c = fmaf(a.g[1], prev[1], a.g[0] * a.g[2]);
    a.tc = tanhAcc(c);
    out[0] = a.g[3] * a.tc;
    out[1] = c;
  } else {  // Elman
    a.g[0] = tanhAcc(x[0] + r[0]);
    out[0] = a.g[0];
  }
}

// Given gout = dL/d(states after the step): gx = dL/dx, gr = dL/dr, gp = the direct part of dL/dprev.
template <NewtonCell C>
__device__ __forceinline__ void cellVjp(const float (&r)[kMaxG], const float (&prev)[kMaxS], const Act& a,
                                        const float (&gout)[kMaxS], float (&gx)[kMaxG], float (&gr)[kMaxG],
                                        float (&gp)[kMaxS]) {
  if constexpr (isGru(C)) {
    const float rg = a.g[0], z = a.g[1], n = a.g[2], gh = gout[0];
    const float dnpre = gh * (1.0f - z) * (1.0f - n * n);
    const float dz = gh * (prev[0] - n) * z * (1.0f - z);
    const float dr = dnpre * r[2] * rg * (1.0f - rg);
    gx[0] = gr[0] = dr;
    gx[1] = gr[1] = dz;
    gx[2] = dnpre;
    gr[2] = dnpre * rg;
    gp[0] = gh * z;
  } else if constexpr (C == NewtonCell::LstmCifgDiag) {
    const float f = a.g[0], zt = a.g[1], o = a.g[2], tc = a.tc;
    const float gc = fmaf(gout[0] * o, 1.0f - tc * tc, gout[1]);
    gx[0] = gr[0] = gc * (prev[1] - zt) * f * (1.0f - f);
    gx[1] = gr[1] = gc * (1.0f - f) * (1.0f - zt * zt);
    gx[2] = gr[2] = gout[0] * tc * o * (1.0f - o);
    gp[0] = 0.0f;
    gp[1] = gc * f;
  } else if constexpr (C == NewtonCell::Lstm) {
    const float i = a.g[0], f = a.g[1], zt = a.g[2], o = a.g[3], tc = a.tc;
    const float gc = fmaf(gout[0] * o, 1.0f - tc * tc, gout[1]);
    gx[0] = gr[0] = gc * zt * i * (1.0f - i);
    gx[1] = gr[1] = gc * prev[1] * f * (1.0f - f);
    gx[2] = gr[2] = gc * i * (1.0f - zt * zt);
    gx[3] = gr[3] = gout[0] * tc * o * (1.0f - o);
    gp[0] = 0.0f;
    gp[1] = gc * f;
  } else {
    const float h = a.g[0];
    gx[0] = gr[0] = gout[0] * (1.0f - h * h);
    gp[0] = 0.0f;
  }
}

// The channel's S x S Jacobian block J[i][j] = d out_i / d prev_j, with Rd[g] the weight of the
// channel's own h_{t-1} in r[g] (rec depends on state 0 only).
template <NewtonCell C>
__device__ __forceinline__ void cellJacobian(const float (&r)[kMaxG], const float (&prev)[kMaxS], const Act& a,
                                             const float (&Rd)[kMaxG], float (&J)[kMaxS][kMaxS]) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float e[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) e[s] = s == i ? 1.0f : 0.0f;
    cellVjp<C>(r, prev, a, e, gx, gr, gp);
    float viaRec = 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) viaRec = fmaf(gr[g], Rd[g], viaRec);
#pragma unroll
    for (int j = 0; j < S; ++j) J[i][j] = j == 0 ? gp[0] + viaRec : gp[j];
  }
}

// ---- parameters ----

struct Params {
  int64_t batch = 0, T = 0, H = 1, D = 1, N = 1;
  int maxIters = 0;
  float tolAbs = 0, tolRel = 0, damping = 0;
  int guess = 0;
  const float* guessTraj = nullptr;
  const void* wx = nullptr;
  const float* R = nullptr;
  const float* b = nullptr;
  const float* h0 = nullptr;
  float* traj = nullptr;
  // fused kernels
  int chan = 32;  // channels per block
  int64_t blocksPerRow = 1;
  int* blockStats = nullptr;  // 3 ints per block: iterations, converged, residual bits
  // row list (sequential kernels; null: every row)
  const int* rows = nullptr;
  // generic path
  float* jc = nullptr;               // [batch, T, S*S + S, N]: J row-major, then c (full: see FullCoef)
  bool full = false;                 // dense cells, full Jacobian: evaluation writes FullCoef, steps by chunks
  int64_t chunkLen = 1, chunks = 1;  // full Jacobian: time chunks of chunkLen steps per (row, head)
  int M = 1, MP = 16;                // full Jacobian: S * D and its multiple of 16
  int tensorCores = 1;               // full Jacobian: chunk products on tensor cores (split tf32), else fp32 FMA
  float* agg = nullptr;              // full Jacobian: [batch, H, chunks, M * M + M], A column-major then b
  float* carry = nullptr;            // full Jacobian: [batch, H, chunks, M], the state before each chunk
  float* kal = nullptr;              // [batch, T, S + S*S, N]: filtered mean and covariance
  float* partial = nullptr;          // 2 floats per evaluation block: all-ok flag, max residual
  int* rowState = nullptr;           // [4, batch]: iterations, done, converged, residual bits
  bool fromH0 = false;               // evaluation computes traj_t = f(h0, x_t) (the one-step guess)
  int ldR = 0;                       // dense kernels: row stride of R in shared memory (0: global)
  // backward
  const void* dy = nullptr;
  const float* dFinal = nullptr;
  void* dwx = nullptr;
  float* dR = nullptr;
  float* db = nullptr;
  float* dh0 = nullptr;
  float* drec = nullptr;  // dense: [batch, T, G, N]
};

// Index of traj / jc-like arrays: [batch, T, K, N].
__device__ __forceinline__ int64_t at4(int64_t row, int64_t t, int64_t k, int64_t n, int64_t T, int64_t K, int64_t N) {
  return ((row * T + t) * K + k) * N + n;
}

// A NaN-propagating max: a residual that is NaN must show.
__device__ __forceinline__ float maxNan(float a, float b) { return (a > b || a != a) ? a : b; }

// Per-channel constants: xb added to wx, rb added to rec (b_n for the GRU), Rd the own-channel weight.
template <NewtonCell C>
__device__ __forceinline__ void channelConsts(const Params& p, int64_t n, float (&xb)[kMaxG], float (&rb)[kMaxG],
                                              float (&Rd)[kMaxG]) {
  constexpr int G = CellInfo<C>::G;
  const int64_t head = n / p.D, j = n - head * p.D;
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    xb[g] = rb[g] = Rd[g] = 0.0f;
    if (g < G) {
      const float bias = __ldg(p.b + g * p.N + n);
      if (isGru(C) && g == 2)
        rb[g] = bias;
      else
        xb[g] = bias;
      Rd[g] = CellInfo<C>::diag ? __ldg(p.R + g * p.N + n) : __ldg(p.R + ((g * p.H + head) * p.D + j) * p.D + j);
    }
  }
}

template <NewtonCell C>
__device__ __forceinline__ void loadH0(const Params& p, int64_t row, int64_t n, float (&h)[kMaxS]) {
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    h[s] = (s < CellInfo<C>::S && p.h0 != nullptr) ? p.h0[(s * p.batch + row) * p.N + n] : 0.0f;
}

template <NewtonCell C, class T>
__device__ __forceinline__ void loadX(const Params& p, int64_t row, int64_t t, int64_t n, const float (&xb)[kMaxG],
                                      float (&x)[kMaxG]) {
  constexpr int G = CellInfo<C>::G;
  const T* wx = static_cast<const T*>(p.wx);
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) x[g] = g < G ? loadScalar<T>(wx + at4(row, t, g, n, p.T, G, p.N)) + xb[g] : 0.0f;
}

template <NewtonCell C>
__device__ __forceinline__ void loadTraj(const float* traj, const Params& p, int64_t row, int64_t t, int64_t n,
                                         float (&h)[kMaxS]) {
  constexpr int S = CellInfo<C>::S;
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) h[s] = s < S ? traj[at4(row, t, s, n, p.T, S, p.N)] : 0.0f;
}

// The state entering step t: h0v at t = 0, else traj_{t-1}.
template <NewtonCell C>
__device__ __forceinline__ void loadPrev(const Params& p, int64_t row, int64_t t, int64_t n, const float (&h0v)[kMaxS],
                                         float (&hp)[kMaxS]) {
  if (t == 0) {
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hp[s] = h0v[s];
  } else {
    loadTraj<C>(p.traj, p, row, t - 1, n, hp);
  }
}

template <NewtonCell C>
__device__ __forceinline__ void storeTraj(const Params& p, int64_t row, int64_t t, int64_t n, const float (&h)[kMaxS]) {
  constexpr int S = CellInfo<C>::S;
#pragma unroll
  for (int s = 0; s < S; ++s) p.traj[at4(row, t, s, n, p.T, S, p.N)] = h[s];
}

// Diagonal cells: f(hp, x) and its Jacobian.
template <NewtonCell C>
__device__ __forceinline__ void linDiag(const float (&x)[kMaxG], const float (&Rd)[kMaxG], const float (&rb)[kMaxG],
                                        const float (&hp)[kMaxS], float (&out)[kMaxS], float (&J)[kMaxS][kMaxS]) {
  float r[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
  Act a;
  cellForward<C>(x, r, hp, a, out);
  cellJacobian<C>(r, hp, a, Rd, J);
}

template <NewtonCell C>
__device__ __forceinline__ void fwdDiag(const float (&x)[kMaxG], const float (&Rd)[kMaxG], const float (&rb)[kMaxG],
                                        const float (&hp)[kMaxS], float (&out)[kMaxS]) {
  float r[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
  Act a;
  cellForward<C>(x, r, hp, a, out);
}

// The convergence test of one element: |f - traj| <= tolAbs + tolRel |traj| (NaN fails).
__device__ __forceinline__ void checkElem(const Params& p, float f, float cur, bool& ok, float& res) {
  const float d = fabsf(f - cur);
  ok = ok && (d <= fmaf(p.tolRel, fabsf(cur), p.tolAbs));
  res = maxNan(res, d);
}

template <int S>
__device__ __forceinline__ scan::AffineN<S> stepMap(const float (&J)[kMaxS][kMaxS], const float (&f)[kMaxS],
                                                    const float (&hp)[kMaxS]) {
  scan::AffineN<S> m;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float c = f[i];
#pragma unroll
    for (int j = 0; j < S; ++j) {
      m.a[i][j] = J[i][j];
      c = fmaf(-J[i][j], hp[j], c);
    }
    m.b[i] = c;
  }
  return m;
}

// Block-wide AND of ok and max of res (every thread of the block calls; all get the results).
__device__ __forceinline__ void blockCheck(bool ok, float res, int* sOk, float* sRes, bool& allOk, float& maxRes) {
  int o = ok ? 1 : 0;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    o &= __shfl_xor_sync(kFullMask, o, m);
    res = maxNan(res, __shfl_xor_sync(kFullMask, res, m));
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  if (lane == 0) {
    sOk[warp] = o;
    sRes[warp] = res;
  }
  __syncthreads();
  allOk = true;
  maxRes = 0.0f;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  for (int w = 0; w < warps; ++w) {
    allOk = allOk && sOk[w] != 0;
    maxRes = maxNan(maxRes, sRes[w]);
  }
}

// ---- diagonal cells: the fused Newton solve ----

template <NewtonCell C, class T> __global__ void __launch_bounds__(kFusedThreads) diagNewtonKernel(Params p) {
  constexpr int S = CellInfo<C>::S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  __shared__ float sBound[kMaxS][kFusedThreads];
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  const int tid = static_cast<int>(threadIdx.x), CW = p.chan, NS = static_cast<int>(blockDim.x) / CW;
  const int lc = tid % CW, slice = tid / CW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * CW + lc;
  const bool active = n < p.N;
  const int64_t L = ceilDiv(p.T, NS);
  const int64_t t0 = minI(p.T, slice * L), t1 = minI(p.T, t0 + L);
  const bool work = active && t0 < t1;

  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
  if (active) {
    channelConsts<C>(p, n, xb, rb, Rd);
    loadH0<C>(p, row, n, h0v);
  } else {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) xb[g] = rb[g] = Rd[g] = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) h0v[s] = 0.0f;
  }
  // The guess at position t (not past the slice's own loads).
  auto guessAt = [&](int64_t t, float(&g)[kMaxS]) {
    if (p.guess == static_cast<int>(NewtonGuess::Provided)) {
      loadTraj<C>(p.guessTraj, p, row, t, n, g);
    } else if (p.guess == static_cast<int>(NewtonGuess::OneStep)) {
      float x[kMaxG];
      loadX<C, T>(p, row, t, n, xb, x);
      fwdDiag<C>(x, Rd, rb, h0v, g);
    } else {
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] = 0.0f;
    }
  };

  // Pass 0: the guess, its check and its linearisation.
  Map agg = scan::identityN<S>();
  bool ok = true;
  float res = 0.0f;
  float hPrev[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) hPrev[s] = h0v[s];
  if (work) {
    if (t0 > 0) guessAt(t0 - 1, hPrev);
    for (int64_t t = t0; t < t1; ++t) {
      float x[kMaxG], cur[kMaxS], f[kMaxS], J[kMaxS][kMaxS];
      guessAt(t, cur);
      loadX<C, T>(p, row, t, n, xb, x);
      linDiag<C>(x, Rd, rb, hPrev, f, J);
#pragma unroll
      for (int s = 0; s < S; ++s) checkElem(p, f[s], cur[s], ok, res);
      storeTraj<C>(p, row, t, n, cur);
      agg = scan::compose(agg, stepMap<S>(J, f, hPrev));
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) hPrev[s] = cur[s];
    }
  }

  int iters = 0;
  for (;;) {
    sAgg[tid] = agg;
#pragma unroll
    for (int s = 0; s < S; ++s) sBound[s][tid] = hPrev[s];
    bool allOk;
    float blockRes;
    blockCheck(ok, res, sOk, sRes, allOk, blockRes);  // includes the barrier publishing sAgg, sBound
    const bool stop = allOk || iters >= p.maxIters;
    float hNew[kMaxS], hOld[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hNew[s] = hOld[s] = h0v[s];
    if (!stop && work) {
      for (int w = 0; w < slice; ++w) {
        float nx[S], cur[S];
#pragma unroll
        for (int s = 0; s < S; ++s) cur[s] = hNew[s];
        scan::apply(sAgg[w * CW + lc], cur, nx);
#pragma unroll
        for (int s = 0; s < S; ++s) hNew[s] = nx[s];
      }
      if (slice > 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) hOld[s] = sBound[s][(slice - 1) * CW + lc];
      }
    }
    __syncthreads();
    if (stop) {
      if (tid == 0) {
        int* st = p.blockStats + 3 * static_cast<int64_t>(blockIdx.x);
        st[0] = iters;
        st[1] = allOk ? 1 : 0;
        st[2] = static_cast<int>(__float_as_uint(blockRes));
      }
      return;
    }
    ++iters;
    // One Newton step and the check of its result.
    agg = scan::identityN<S>();
    ok = true;
    res = 0.0f;
    if (work) {
      for (int64_t t = t0; t < t1; ++t) {
        float x[kMaxG], old[kMaxS], fo[kMaxS], Jo[kMaxS][kMaxS], nw[kMaxS], fn[kMaxS], Jn[kMaxS][kMaxS];
        loadX<C, T>(p, row, t, n, xb, x);
        loadTraj<C>(p.traj, p, row, t, n, old);
        linDiag<C>(x, Rd, rb, hOld, fo, Jo);
#pragma unroll
        for (int i = 0; i < kMaxS; ++i) {
          float v = fo[i];
#pragma unroll
          for (int j = 0; j < S; ++j) v = fmaf(Jo[i][j], hNew[j] - hOld[j], v);
          nw[i] = v;
        }
        linDiag<C>(x, Rd, rb, hNew, fn, Jn);
#pragma unroll
        for (int s = 0; s < S; ++s) checkElem(p, fn[s], nw[s], ok, res);
        storeTraj<C>(p, row, t, n, nw);
        agg = scan::compose(agg, stepMap<S>(Jn, fn, hNew));
#pragma unroll
        for (int s = 0; s < kMaxS; ++s) {
          hOld[s] = old[s];
          hNew[s] = nw[s];
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) hPrev[s] = hNew[s];
  }
}

// ---- diagonal cells: sequential evaluation (mode sequential and the fallback) ----

template <NewtonCell C, class T> __global__ void diagSequentialKernel(Params p) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t row = p.rows != nullptr ? p.rows[k] : k;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h);
  for (int64_t t = 0; t < p.T; ++t) {
    float x[kMaxG], out[kMaxS];
    loadX<C, T>(p, row, t, n, xb, x);
    fwdDiag<C>(x, Rd, rb, h, out);
    storeTraj<C>(p, row, t, n, out);
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) h[s] = out[s];
  }
}

// ---- dense cells: sequential evaluation, a block per (row, head) ----

// R of one head in shared memory (rows padded to ldR) when p.ldR > 0, else read from global.
__device__ __forceinline__ const float* headWeights(const Params& p, int G, int64_t head, float* smem, int& ld,
                                                    int64_t& gStride) {
  const int D = static_cast<int>(p.D);
  if (p.ldR > 0) {
    for (int64_t e = threadIdx.x; e < static_cast<int64_t>(G) * D * D; e += blockDim.x) {
      const int64_t g = e / (static_cast<int64_t>(D) * D), rem = e - g * D * D, i = rem / D, j = rem - i * D;
      smem[(g * D + i) * p.ldR + j] = __ldg(p.R + ((g * p.H + head) * D + i) * D + j);
    }
    ld = p.ldR;
    gStride = static_cast<int64_t>(D) * p.ldR;
    return smem;
  }
  ld = D;
  gStride = p.H * static_cast<int64_t>(D) * D;
  return p.R + head * static_cast<int64_t>(D) * D;
}

template <NewtonCell C, class T> __global__ void denseSequentialKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.D);
  const int64_t k = static_cast<int64_t>(blockIdx.x) / p.H, head = static_cast<int64_t>(blockIdx.x) % p.H;
  const int64_t row = p.rows != nullptr ? p.rows[k] : k;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  float* sh = smem;  // h_{t-1}, D floats
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + ((D + 3) & ~3), ld, gs);
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h);
  if (active) sh[j] = h[0];
  __syncthreads();
  for (int64_t t = 0; t < p.T; ++t) {
    float out[kMaxS];
    if (active) {
      float x[kMaxG], r[kMaxG];
      loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) r[g] = rb[g];
      for (int i = 0; i < D; ++i) {
        const float hi = sh[i];
#pragma unroll
        for (int g = 0; g < G; ++g) r[g] = fmaf(hi, Rh[g * gs + static_cast<int64_t>(i) * ld + j], r[g]);
      }
      Act a;
      cellForward<C>(x, r, h, a, out);
      storeTraj<C>(p, row, t, n, out);
#pragma unroll
      for (int s = 0; s < S; ++s) h[s] = out[s];
    }
    __syncthreads();
    if (active) sh[j] = h[0];
    __syncthreads();
  }
}

// ---- the generic Newton path (dense cells, damping) ----

// Writes the linearisation of f at the current iterate (or, with fromH0, the one-step guess) for one
// element, given the input and recurrent parts, and folds its check into ok / res.
template <NewtonCell C>
__device__ __forceinline__ void evalElement(const Params& p, int64_t row, int64_t t, int64_t n, const float (&x)[kMaxG],
                                            const float (&r)[kMaxG], const float (&Rd)[kMaxG], const float (&hp)[kMaxS],
                                            bool& ok, float& res) {
  constexpr int S = CellInfo<C>::S, K = S * S + S;
  Act a;
  float out[kMaxS];
  cellForward<C>(x, r, hp, a, out);
  if (p.fromH0) {
    storeTraj<C>(p, row, t, n, out);
    return;
  }
  float J[kMaxS][kMaxS], cur[kMaxS];
  loadTraj<C>(p.traj, p, row, t, n, cur);
  if (p.full) {
    using F = FullCoef<C>;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      checkElem(p, out[i], cur[i], ok, res);
      float e[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) e[s] = s == i ? 1.0f : 0.0f;
      cellVjp<C>(r, hp, a, e, gx, gr, gp);
#pragma unroll
      for (int s = 0; s < S; ++s) p.jc[at4(row, t, i * F::W + s, n, p.T, F::K, p.N)] = gp[s];
#pragma unroll
      for (int g = 0; g < F::G; ++g) p.jc[at4(row, t, i * F::W + S + g, n, p.T, F::K, p.N)] = gr[g];
      p.jc[at4(row, t, S * F::W + i, n, p.T, F::K, p.N)] = out[i] - cur[i];
    }
    return;
  }
  cellJacobian<C>(r, hp, a, Rd, J);
#pragma unroll
  for (int i = 0; i < S; ++i) {
    checkElem(p, out[i], cur[i], ok, res);
    float c = out[i];
#pragma unroll
    for (int jj = 0; jj < S; ++jj) {
      p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)] = J[i][jj];
      c = fmaf(-J[i][jj], hp[jj], c);
    }
    p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)] = c;
  }
}

__device__ __forceinline__ bool rowDone(const Params& p, int64_t row) { return p.rowState[p.batch + row] != 0; }

__device__ __forceinline__ void writePartial(const Params& p, bool ok, float res) {
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  bool allOk;
  float maxRes;
  blockCheck(ok, res, sOk, sRes, allOk, maxRes);
  if (threadIdx.x == 0) {
    p.partial[2 * static_cast<int64_t>(blockIdx.x)] = allOk ? 1.0f : 0.0f;
    p.partial[2 * static_cast<int64_t>(blockIdx.x) + 1] = maxRes;
  }
}

// Diagonal cells: one element per thread; blocksPerRow blocks of 256 per row.
template <NewtonCell C, class T> __global__ void evalDiagKernel(Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  if (rowDone(p, row)) return;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  bool ok = true;
  float res = 0.0f;
  if (e < p.T * p.N) {
    const int64_t t = e / p.N, n = e - t * p.N;
    float xb[kMaxG], rb[kMaxG], Rd[kMaxG], hp[kMaxS], x[kMaxG], r[kMaxG];
    channelConsts<C>(p, n, xb, rb, Rd);
    if (t == 0 || p.fromH0)
      loadH0<C>(p, row, n, hp);
    else
      loadTraj<C>(p.traj, p, row, t - 1, n, hp);
    loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) r[g] = fmaf(Rd[g], hp[0], rb[g]);
    evalElement<C>(p, row, t, n, x, r, Rd, hp, ok, res);
  }
  writePartial(p, ok, res);
}

// Dense cells: a block of 256 threads per (row, 32 positions, head, 32 channels); rec = h_{t-1} @ R
// through shared-memory tiles of 32 inputs; warp w takes positions 4w .. 4w+3, lane = channel.
template <NewtonCell C, class T> __global__ void __launch_bounds__(256) evalDenseKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  __shared__ float sH[kTile][kTile + 1];
  __shared__ float sR[G][kTile][kTile];
  const int64_t tTiles = ceilDiv(p.T, kTile), jTiles = ceilDiv(p.D, kTile);
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / p.blocksPerRow;
  if (rowDone(p, row)) return;
  blk -= row * p.blocksPerRow;
  const int64_t tt = blk / (p.H * jTiles);
  blk -= tt * p.H * jTiles;
  const int64_t head = blk / jTiles, jt = blk - head * jTiles;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t j = jt * kTile + lane, n = head * p.D + j;
  float acc[4][kMaxG];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) acc[q][g] = 0.0f;
  for (int64_t i0 = 0; i0 < p.D; i0 += kTile) {
    // h_{t-1} for the tile's 32 positions and inputs i0 .. i0+31; R[g][head][i][j] for the tile.
    for (int e = tid; e < kTile * kTile; e += 256) {
      const int q = e / kTile, ii = e % kTile;
      const int64_t t = tt * kTile + q, i = i0 + ii;
      float v = 0.0f;
      if (t < p.T && i < p.D) {
        const int64_t ni = head * p.D + i;
        if (t == 0 || p.fromH0)
          v = p.h0 != nullptr ? p.h0[row * p.N + ni] : 0.0f;
        else
          v = p.traj[at4(row, t - 1, 0, ni, p.T, S, p.N)];
      }
      sH[q][ii] = v;
    }
    for (int e = tid; e < G * kTile * kTile; e += 256) {
      const int g = e / (kTile * kTile), ii = (e / kTile) % kTile, jj = e % kTile;
      const int64_t i = i0 + ii, jc = jt * kTile + jj;
      sR[g][ii][jj] = (i < p.D && jc < p.D) ? __ldg(p.R + ((g * p.H + head) * p.D + i) * p.D + jc) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int ii = 0; ii < kTile; ++ii) {
      float rv[G];
#pragma unroll
      for (int g = 0; g < G; ++g) rv[g] = sR[g][ii][lane];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float hv = sH[warp * 4 + q][ii];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[q][g] = fmaf(hv, rv[g], acc[q][g]);
      }
    }
    __syncthreads();
  }
  bool ok = true;
  float res = 0.0f;
  if (j < p.D) {
    float xb[kMaxG], rb[kMaxG], Rd[kMaxG];
    channelConsts<C>(p, n, xb, rb, Rd);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t t = tt * kTile + warp * 4 + q;
      if (t < p.T) {
        float x[kMaxG], r[kMaxG], hp[kMaxS];
        if (t == 0 || p.fromH0)
          loadH0<C>(p, row, n, hp);
        else
          loadTraj<C>(p.traj, p, row, t - 1, n, hp);
        loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) r[g] = acc[q][g] + rb[g];
        evalElement<C>(p, row, t, n, x, r, Rd, hp, ok, res);
      }
    }
  }
  writePartial(p, ok, res);
}

// Per row: the check's verdict. Converged rows and rows out of steps are done; the others take a step.
__global__ void finalizeKernel(Params p) {
  const int64_t row = blockIdx.x;
  if (rowDone(p, row)) return;
  bool ok = true;
  float res = 0.0f;
  for (int64_t k = threadIdx.x; k < p.blocksPerRow; k += blockDim.x) {
    const int64_t blk = row * p.blocksPerRow + k;
    ok = ok && p.partial[2 * blk] != 0.0f;
    res = maxNan(res, p.partial[2 * blk + 1]);
  }
  __shared__ int sOk[32];
  __shared__ float sRes[32];
  bool allOk;
  float maxRes;
  blockCheck(ok, res, sOk, sRes, allOk, maxRes);
  if (threadIdx.x == 0) {
    int* it = p.rowState + row;
    int* done = p.rowState + p.batch + row;
    int* conv = p.rowState + 2 * p.batch + row;
    p.rowState[3 * p.batch + row] = static_cast<int>(__float_as_uint(maxRes));
    if (allOk) {
      *conv = 1;
      *done = 1;
    } else if (*it >= p.maxIters) {
      *done = 1;
    } else {
      *it += 1;
    }
  }
}

// The plain Newton step with the per-channel Jacobians: h_t = J_t h_{t-1} + c_t per (row, channel),
// parallel in time. Same layout as the fused kernels: a block owns CW channels of one row, NS =
// threads / CW time slices of L = ceil(T / NS) steps, a thread per (channel, slice). Pass 1 composes
// the slice's maps (common/scan.cuh AffineN); the aggregates meet in shared memory, where each
// thread composes those of the slices before its own onto h0; pass 2 applies the maps from there.
template <NewtonCell C> __global__ void __launch_bounds__(kFusedThreads) scanStepKernel(Params p) {
  constexpr int S = CellInfo<C>::S, K = S * S + S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  const int tid = static_cast<int>(threadIdx.x), CW = p.chan, NS = static_cast<int>(blockDim.x) / CW;
  const int lc = tid % CW, slice = tid / CW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  if (rowDone(p, row)) return;  // the whole block
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * CW + lc;
  const int64_t L = ceilDiv(p.T, NS);
  const int64_t t0 = minI(p.T, slice * L), t1 = minI(p.T, t0 + L);
  const bool work = n < p.N && t0 < t1;
  auto mapAt = [&](int64_t t) {
    Map m;
#pragma unroll
    for (int i = 0; i < S; ++i) {
#pragma unroll
      for (int jj = 0; jj < S; ++jj) m.a[i][jj] = p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)];
      m.b[i] = p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)];
    }
    return m;
  };
  Map agg = scan::identityN<S>();
  if (work) {
    for (int64_t t = t0; t < t1; ++t) agg = scan::compose(agg, mapAt(t));
  }
  sAgg[tid] = agg;
  __syncthreads();
  if (!work) return;
  float h[S], h0v[kMaxS];
  loadH0<C>(p, row, n, h0v);
#pragma unroll
  for (int s = 0; s < S; ++s) h[s] = h0v[s];
  for (int w = 0; w < slice; ++w) {
    float nx[S];
    scan::apply(sAgg[w * CW + lc], h, nx);
#pragma unroll
    for (int s = 0; s < S; ++s) h[s] = nx[s];
  }
  for (int64_t t = t0; t < t1; ++t) {
    float nx[S], out[kMaxS];
    scan::apply(mapAt(t), h, nx);
#pragma unroll
    for (int s = 0; s < S; ++s) h[s] = out[s] = nx[s];
    storeTraj<C>(p, row, t, n, out);
  }
}

// ---- dense cells, full Jacobian (DEER): the step as a chunked scan over time per (row, head) ----
//
// The step solves d_t = J_t d_{t-1} + r_t (d_{-1} = 0) for the update d = new - old of the iterate,
// with r_t = f(old_{t-1}) - old_t the residual, and adds it to traj: the same Newton step as
// h_t = J_t h_{t-1} + c_t, but errors of the solve scale with the update rather than with the state
// (see the header). Vectors of a head are state-major: index i * D + j is state i of channel j.
// fullChunkKernel: per (row, head, chunk) the aggregate of the chunk, A = J_{t1-1} ... J_{t0} and
// b = the chunk's solve from zero; fullCarryKernel: per (row, head) the states before each chunk,
// d = A d + b chunk after chunk; fullApplyKernel: per (row, head, chunk) the solve within the chunk
// from that state, added to traj.

// J_t of the head into sJ (MP x MP, row stride ld, zero outside M x M): element ((i, j), (s, k)) is
// [j == k] gp_is(j) + [s == 0] sum_g gr_ig(j) R[g][head][k][j]. sC holds the step's FullCoef [K][D].
template <NewtonCell C>
__device__ __forceinline__ void buildJacobian(const Params& p, int64_t head, const float* sC, float* sJ, int ld) {
  using F = FullCoef<C>;
  const int D = static_cast<int>(p.D), M = p.M, MP = p.MP;
  const float* Rh = p.R + head * static_cast<int64_t>(D) * D;
  const int64_t gStride = p.H * static_cast<int64_t>(D) * D;
  for (int e = static_cast<int>(threadIdx.x); e < MP * MP; e += static_cast<int>(blockDim.x)) {
    const int r = e % MP, c = e / MP;  // consecutive threads: consecutive rows (coalesced R reads)
    float v = 0.0f;
    if (r < M && c < M) {
      const int i = r / D, j = r - i * D, s = c / D, k = c - s * D;
      if (j == k) v = sC[(i * F::W + s) * D + j];
      if (s == 0) {
#pragma unroll
        for (int g = 0; g < F::G; ++g)
          v = fmaf(sC[(i * F::W + F::S + g) * D + j], __ldg(Rh + g * gStride + k * D + j), v);
      }
    }
    sJ[r * ld + c] = v;
  }
}

// out = J a over MP x MP (row strides ldJ, ldA): fp32 FMA, a thread per output element in turn.
__device__ __forceinline__ void productFma(const float* sJ, int ldJ, const float* a, float* out, int ldA, int MP,
                                           int M) {
  for (int e = static_cast<int>(threadIdx.x); e < MP * MP; e += static_cast<int>(blockDim.x)) {
    const int r = e / MP, c = e - r * MP;
    float v = 0.0f;
    if (r < M && c < M) {
      for (int k = 0; k < M; ++k) v = fmaf(sJ[r * ldJ + k], a[k * ldA + c], v);
    }
    out[r * ldA + c] = v;
  }
}

// The same on the tensor cores: a warp per 16 x 8 output tile in turn, m16n8k8 tf32 with both
// operands split into tf32 high and low parts (three products, fp32-grade; common/mma.cuh).
__device__ __forceinline__ void productMma(const float* sJ, int ldJ, const float* a, float* out, int ldA, int MP) {
  const int warps = static_cast<int>(blockDim.x) >> 5, warp = static_cast<int>(threadIdx.x) >> 5;
  const int tilesN = MP / 8, tiles = (MP / 16) * tilesN;
  for (int tile = warp; tile < tiles; tile += warps) {
    const int r0 = (tile / tilesN) * 16, c0 = (tile % tilesN) * 8;
    mma::FragC acc;
    acc.zero();
    for (int k0 = 0; k0 < MP; k0 += 8) {
      auto jAt = [&](int r, int c) { return sJ[(r0 + r) * ldJ + k0 + c]; };
      auto aAt = [&](int k, int c) { return a[(k0 + k) * ldA + c0 + c]; };
      const mma::FragATf32 jHi = mma::loadATf32(jAt);
      const mma::FragATf32 jLo = mma::loadATf32([&](int r, int c) { return mma::tf32Rest(jAt(r, c)); });
      const mma::FragBTf32 aHi = mma::loadBTf32(aAt);
      const mma::FragBTf32 aLo = mma::loadBTf32([&](int k, int c) { return mma::tf32Rest(aAt(k, c)); });
      mma::mma1688tf32(acc, jLo, aHi);
      mma::mma1688tf32(acc, jHi, aLo);
      mma::mma1688tf32(acc, jHi, aHi);
    }
    mma::storeC(acc, [&](int r, int c, float v) { out[(r0 + r) * ldA + c0 + c] = v; });
  }
}

__host__ __device__ __forceinline__ int fullLdJ(int MP) { return MP + 4; }  // conflict-free A-fragment reads
__host__ __device__ __forceinline__ int fullLdA(int MP) { return MP + 8; }  // conflict-free B-fragment reads
__host__ __device__ __forceinline__ int fullCoefFloats(int K, int D) { return (K * D + 3) & ~3; }

// Dynamic shared memory: J [MP][ldJ], two aggregates [MP][ldA], the step's coefficients [K][D] and
// two offset vectors [MP].
template <NewtonCell C> __global__ void __launch_bounds__(256) fullChunkKernel(Params p) {
  using F = FullCoef<C>;
  const int D = static_cast<int>(p.D), M = p.M, MP = p.MP, ldJ = fullLdJ(MP), ldA = fullLdA(MP);
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  float* sJ = dynamicShared<float>();
  float* aCur = sJ + MP * ldJ;  // the aggregate so far, and the buffer for the next one
  float* aNext = aCur + MP * ldA;
  float* sC = aNext + MP * ldA;
  float* bCur = sC + fullCoefFloats(F::K, D);
  float* bNext = bCur + MP;
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / (p.H * p.chunks);
  blk -= row * p.H * p.chunks;
  const int64_t head = blk / p.chunks, c = blk - head * p.chunks;
  // The last chunk's aggregate is never used.
  if (c == p.chunks - 1 || rowDone(p, row)) return;
  const int64_t t0 = c * p.chunkLen, t1 = minI(p.T, t0 + p.chunkLen);
  for (int e = tid; e < MP * MP; e += nt) {
    const int r = e / MP, cc = e - r * MP;
    aCur[r * ldA + cc] = (r == cc && r < M) ? 1.0f : 0.0f;
  }
  for (int e = tid; e < MP; e += nt) bCur[e] = 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();  // the previous step is complete (its J, coefficients and results)
    for (int e = tid; e < F::K * D; e += nt) {
      const int q = e / D, j = e - q * D;
      sC[e] = p.jc[at4(row, t, q, head * D + j, p.T, F::K, p.N)];
    }
    __syncthreads();
    buildJacobian<C>(p, head, sC, sJ, ldJ);
    __syncthreads();
    if (p.tensorCores)
      productMma(sJ, ldJ, aCur, aNext, ldA, MP);
    else
      productFma(sJ, ldJ, aCur, aNext, ldA, MP, M);
    for (int i = tid; i < MP; i += nt) {
      float v = 0.0f;
      if (i < M) {
        v = sC[(F::S * F::W + i / D) * D + i % D];
        for (int k = 0; k < M; ++k) v = fmaf(sJ[i * ldJ + k], bCur[k], v);
      }
      bNext[i] = v;
    }
    float* sw = aCur;
    aCur = aNext;
    aNext = sw;
    sw = bCur;
    bCur = bNext;
    bNext = sw;
  }
  __syncthreads();
  float* out = p.agg + ((row * p.H + head) * p.chunks + c) * (static_cast<int64_t>(M) * M + M);
  for (int e = tid; e < M * M; e += nt) {
    const int k = e / M, i = e - k * M;  // column-major: the carry pass reads columns
    out[e] = aCur[i * ldA + k];
  }
  for (int i = tid; i < M; i += nt) out[M * M + i] = bCur[i];
}

// Per (row, head), a thread per state element: the state before each chunk, chunk after chunk.
__global__ void __launch_bounds__(kMaxFullM) fullCarryKernel(Params p) {
  __shared__ float sd[2][kMaxFullM];
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.H, head = static_cast<int64_t>(blockIdx.x) % p.H;
  if (rowDone(p, row)) return;
  const int M = p.M, i = static_cast<int>(threadIdx.x);
  const int64_t stride = static_cast<int64_t>(M) * M + M;
  const float* agg = p.agg + (row * p.H + head) * p.chunks * stride;
  float* carry = p.carry + (row * p.H + head) * p.chunks * M;
  if (i < M) sd[0][i] = 0.0f;
  __syncthreads();
  int cur = 0;
  for (int64_t c = 0; c + 1 < p.chunks; ++c) {
    if (i < M) {
      const float* a = agg + c * stride;
      float v = a[M * M + i];
      for (int k = 0; k < M; ++k) v = fmaf(a[k * M + i], sd[cur][k], v);
      sd[cur ^ 1][i] = v;
      carry[(c + 1) * M + i] = v;
    }
    cur ^= 1;
    __syncthreads();
  }
}

// Per (row, head, chunk), a thread per channel: d_t = J_t d_{t-1} + r_t from the chunk's carried
// state, applied through R directly (J_t d = gp d + gr (R^T d_h)), traj_t += d_t. R of the head in
// shared memory (padded rows) when it fits, as for the sequential kernel.
template <NewtonCell C> __global__ void fullApplyKernel(Params p) {
  using F = FullCoef<C>;
  constexpr int G = F::G, S = F::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.D);
  int64_t blk = static_cast<int64_t>(blockIdx.x);
  const int64_t row = blk / (p.H * p.chunks);
  blk -= row * p.H * p.chunks;
  const int64_t head = blk / p.chunks, c = blk - head * p.chunks;
  if (rowDone(p, row)) return;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  float* sd = smem;  // d_h of the previous step, D floats
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + ((D + 3) & ~3), ld, gs);
  const int64_t t0 = c * p.chunkLen, t1 = minI(p.T, t0 + p.chunkLen);
  float d[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    d[s] = (c > 0 && s < S && active) ? p.carry[((row * p.H + head) * p.chunks + c) * p.M + s * D + j] : 0.0f;
  if (active) sd[j] = d[0];
  __syncthreads();
  for (int64_t t = t0; t < t1; ++t) {
    float nd[kMaxS];
    if (active) {
      float rec[kMaxG];
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) rec[g] = 0.0f;
      for (int k = 0; k < D; ++k) {
        const float dk = sd[k];
#pragma unroll
        for (int g = 0; g < G; ++g) rec[g] = fmaf(dk, Rh[g * gs + static_cast<int64_t>(k) * ld + j], rec[g]);
      }
#pragma unroll
      for (int i = 0; i < S; ++i) {
        float v = p.jc[at4(row, t, S * F::W + i, n, p.T, F::K, p.N)];
#pragma unroll
        for (int s = 0; s < S; ++s) v = fmaf(p.jc[at4(row, t, i * F::W + s, n, p.T, F::K, p.N)], d[s], v);
#pragma unroll
        for (int g = 0; g < G; ++g) v = fmaf(p.jc[at4(row, t, i * F::W + S + g, n, p.T, F::K, p.N)], rec[g], v);
        nd[i] = v;
        p.traj[at4(row, t, i, n, p.T, S, p.N)] += v;
      }
    }
    __syncthreads();
    if (active) {
#pragma unroll
      for (int s = 0; s < S; ++s) d[s] = nd[s];
      sd[j] = d[0];
    }
    __syncthreads();
  }
}

// Small S x S helpers for the damped step (S <= 2).
template <int S>
__device__ __forceinline__ void matInverse(const float (&a)[kMaxS][kMaxS], float (&inv)[kMaxS][kMaxS]) {
  if constexpr (S == 1) {
    inv[0][0] = 1.0f / a[0][0];
  } else {
    const float rdet = 1.0f / (a[0][0] * a[1][1] - a[0][1] * a[1][0]);
    inv[0][0] = a[1][1] * rdet;
    inv[0][1] = -a[0][1] * rdet;
    inv[1][0] = -a[1][0] * rdet;
    inv[1][1] = a[0][0] * rdet;
  }
}
// c = a b, or a b^T with BT.
template <int S, bool BT = false>
__device__ __forceinline__ void matMul(const float (&a)[kMaxS][kMaxS], const float (&b)[kMaxS][kMaxS],
                                       float (&c)[kMaxS][kMaxS]) {
#pragma unroll
  for (int i = 0; i < S; ++i)
#pragma unroll
    for (int j = 0; j < S; ++j) {
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k < S; ++k) v = fmaf(a[i][k], BT ? b[j][k] : b[k][j], v);
      c[i][j] = v;
    }
}

// The Levenberg-Marquardt (ELK) step per (row, channel): Kalman filter forward (means and
// covariances to scratch), Rauch-Tung-Striebel smoother backward (into traj).
template <NewtonCell C> __global__ void dampedStepKernel(Params p) {
  constexpr int S = CellInfo<C>::S, K = S * S + S, KK = S + S * S;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * blockDim.x + threadIdx.x;
  if (n >= p.N || rowDone(p, row)) return;
  const float obsVar = 1.0f / p.damping;
  auto loadJc = [&](int64_t t, float(&J)[kMaxS][kMaxS], float(&c)[kMaxS]) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
#pragma unroll
      for (int jj = 0; jj < S; ++jj) J[i][jj] = p.jc[at4(row, t, i * S + jj, n, p.T, K, p.N)];
      c[i] = p.jc[at4(row, t, S * S + i, n, p.T, K, p.N)];
    }
  };
  // Prediction: mp = J m + c, Pp = J P J^T + I.
  auto predict = [&](const float(&J)[kMaxS][kMaxS], const float(&c)[kMaxS], const float(&m)[kMaxS],
                     const float(&P)[kMaxS][kMaxS], float(&mp)[kMaxS], float(&Pp)[kMaxS][kMaxS]) {
    float JP[kMaxS][kMaxS];
    matMul<S>(J, P, JP);
    matMul<S, true>(JP, J, Pp);
#pragma unroll
    for (int i = 0; i < S; ++i) {
      Pp[i][i] += 1.0f;
      float v = c[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(J[i][jj], m[jj], v);
      mp[i] = v;
    }
  };
  float m[kMaxS], P[kMaxS][kMaxS];
  loadH0<C>(p, row, n, m);
#pragma unroll
  for (int i = 0; i < kMaxS; ++i)
#pragma unroll
    for (int jj = 0; jj < kMaxS; ++jj) P[i][jj] = 0.0f;
  for (int64_t t = 0; t < p.T; ++t) {
    float J[kMaxS][kMaxS], c[kMaxS], mp[kMaxS], Pp[kMaxS][kMaxS], obs[kMaxS];
    loadJc(t, J, c);
    predict(J, c, m, P, mp, Pp);
    loadTraj<C>(p.traj, p, row, t, n, obs);
    // Gain K = Pp (Pp + I / lambda)^-1; m = mp + K (obs - mp); P = (I - K) Pp.
    float Sm[kMaxS][kMaxS], Si[kMaxS][kMaxS], Kg[kMaxS][kMaxS], KP[kMaxS][kMaxS];
#pragma unroll
    for (int i = 0; i < S; ++i)
#pragma unroll
      for (int jj = 0; jj < S; ++jj) Sm[i][jj] = Pp[i][jj] + (i == jj ? obsVar : 0.0f);
    matInverse<S>(Sm, Si);
    matMul<S>(Pp, Si, Kg);
    matMul<S>(Kg, Pp, KP);
#pragma unroll
    for (int i = 0; i < S; ++i) {
      float v = mp[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(Kg[i][jj], obs[jj] - mp[jj], v);
      m[i] = v;
#pragma unroll
      for (int jj = 0; jj < S; ++jj) P[i][jj] = Pp[i][jj] - KP[i][jj];
    }
#pragma unroll
    for (int i = 0; i < S; ++i) {
      p.kal[at4(row, t, i, n, p.T, KK, p.N)] = m[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) p.kal[at4(row, t, S + i * S + jj, n, p.T, KK, p.N)] = P[i][jj];
    }
  }
  // Smoother: ms_t = m_t + P_t J_{t+1}^T Pp_{t+1}^-1 (ms_{t+1} - mp_{t+1}).
  float ms[kMaxS];
#pragma unroll
  for (int i = 0; i < kMaxS; ++i) ms[i] = m[i];
  if (p.T > 0) storeTraj<C>(p, row, p.T - 1, n, ms);
  for (int64_t t = p.T - 2; t >= 0; --t) {
    float mt[kMaxS], Pt[kMaxS][kMaxS], J[kMaxS][kMaxS], c[kMaxS], mp[kMaxS], Pp[kMaxS][kMaxS];
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) {
      mt[i] = i < S ? p.kal[at4(row, t, i, n, p.T, KK, p.N)] : 0.0f;
#pragma unroll
      for (int jj = 0; jj < kMaxS; ++jj)
        Pt[i][jj] = (i < S && jj < S) ? p.kal[at4(row, t, S + i * S + jj, n, p.T, KK, p.N)] : 0.0f;
    }
    loadJc(t + 1, J, c);
    predict(J, c, mt, Pt, mp, Pp);
    float PJt[kMaxS][kMaxS], Pi[kMaxS][kMaxS], Gm[kMaxS][kMaxS];
    matMul<S, true>(Pt, J, PJt);
    matInverse<S>(Pp, Pi);
    matMul<S>(PJt, Pi, Gm);
    float nw[kMaxS];
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) {
      float v = mt[i];
#pragma unroll
      for (int jj = 0; jj < S; ++jj) v = fmaf(Gm[i][jj], ms[jj] - mp[jj], v);
      nw[i] = i < S ? v : 0.0f;
    }
    storeTraj<C>(p, row, t, n, nw);
#pragma unroll
    for (int i = 0; i < kMaxS; ++i) ms[i] = nw[i];
  }
}

// The guess for the generic path (zeros or a copy of the provided one; the one-step guess goes
// through the evaluation kernels with fromH0). Thread per element of traj.
__global__ void guessKernel(Params p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  p.traj[e] = p.guessTraj != nullptr ? p.guessTraj[e] : 0.0f;
}

// y (the h state of traj) and finalStates.
template <class T>
__global__ void outputsKernel(const float* traj, T* y, float* finalStates, const float* h0, int64_t batch, int64_t T_,
                              int S, int64_t N) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t ny = batch * T_ * N;
  if (e < ny) {
    const int64_t bt = e / N, n = e - bt * N;
    storeScalar<T>(y + e, traj[(bt * S) * N + n]);
  } else if (finalStates != nullptr && e < ny + S * batch * N) {
    const int64_t f = e - ny;
    const int64_t s = f / (batch * N), rem = f - s * batch * N, row = rem / N, n = rem - row * N;
    finalStates[f] = T_ > 0 ? traj[((row * T_ + T_ - 1) * S + s) * N + n] : (h0 != nullptr ? h0[f] : 0.0f);
  }
}

// ---- backward ----

// Diagonal cells: the reverse-time adjoint in slices (see the header). Same thread layout as the
// fused forward kernel.
template <NewtonCell C, class T> __global__ void __launch_bounds__(kFusedThreads) diagBackwardKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  using Map = scan::AffineN<S>;
  __shared__ Map sAgg[kFusedThreads];
  __shared__ float sAcc[2 * kMaxG][kFusedThreads];
  const int tid = static_cast<int>(threadIdx.x), CW = p.chan, NS = static_cast<int>(blockDim.x) / CW;
  const int lc = tid % CW, slice = tid / CW;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.blocksPerRow;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) % p.blocksPerRow) * CW + lc;
  const bool active = n < p.N;
  const int64_t L = ceilDiv(p.T, NS);
  const int64_t t0 = minI(p.T, slice * L), t1 = minI(p.T, t0 + L);
  const bool work = active && t0 < t1;
  const T* dy = static_cast<const T*>(p.dy);
  T* dwx = static_cast<T*>(p.dwx);

  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) xb[g] = rb[g] = Rd[g] = 0.0f;
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) h0v[s] = 0.0f;
  if (active) {
    channelConsts<C>(p, n, xb, rb, Rd);
    loadH0<C>(p, row, n, h0v);
  }
  // dL/dtraj_t from the outputs: dy on the h state, dFinal at the last step.
  auto direct = [&](int64_t t, float(&g)[kMaxS]) {
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) g[s] = 0.0f;
    if (dy != nullptr) g[0] = loadScalar<T>(dy + (row * p.T + t) * p.N + n);
    if (t == p.T - 1 && p.dFinal != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) g[s] += p.dFinal[(s * p.batch + row) * p.N + n];
    }
  };
  // J_u^T at step u (prev = traj_{u-1}).
  auto jacAt = [&](int64_t u, float(&J)[kMaxS][kMaxS]) {
    float x[kMaxG], hp[kMaxS], f[kMaxS];
    loadX<C, T>(p, row, u, n, xb, x);
    loadPrev<C>(p, row, u, n, h0v, hp);
    linDiag<C>(x, Rd, rb, hp, f, J);
  };

  // Pass 1: the slice's composed map lambda_{t0} = A lambda_{t1} + b, maps applied from t1-1 down.
  Map agg = scan::identityN<S>();
  if (work) {
    for (int64_t t = t1 - 1; t >= t0; --t) {
      Map m;
      float g[kMaxS];
      direct(t, g);
      float J[kMaxS][kMaxS];
      if (t + 1 < p.T) {
        jacAt(t + 1, J);
      } else {
#pragma unroll
        for (int i = 0; i < kMaxS; ++i)
#pragma unroll
          for (int jj = 0; jj < kMaxS; ++jj) J[i][jj] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < S; ++i) {
#pragma unroll
        for (int jj = 0; jj < S; ++jj) m.a[i][jj] = J[jj][i];
        m.b[i] = g[i];
      }
      agg = scan::compose(agg, m);
    }
  }
  sAgg[tid] = agg;
  __syncthreads();
  // lambda_{t1}: the later slices' maps applied to lambda_T = 0, from the last slice down.
  float lam[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s) lam[s] = 0.0f;
  if (work) {
    for (int w = NS - 1; w > slice; --w) {
      float cur[S], nx[S];
#pragma unroll
      for (int s = 0; s < S; ++s) cur[s] = lam[s];
      scan::apply(sAgg[w * CW + lc], cur, nx);
#pragma unroll
      for (int s = 0; s < S; ++s) lam[s] = nx[s];
    }
  }
  // Pass 2: down = J_{t+1}^T lambda_{t+1}; lambda_t = direct + down; the VJP of step t.
  float accR[kMaxG], accB[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) accR[g] = accB[g] = 0.0f;
  if (work) {
    float down[kMaxS];
#pragma unroll
    for (int s = 0; s < kMaxS; ++s) down[s] = 0.0f;
    if (t1 < p.T) {
      float J[kMaxS][kMaxS];
      jacAt(t1, J);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < S; ++k) v = fmaf(J[k][i], lam[k], v);
        down[i] = v;
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      float g[kMaxS], x[kMaxG], hp[kMaxS], r[kMaxG], out[kMaxS], gx[kMaxG], gr[kMaxG], gp[kMaxS];
      direct(t, g);
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] += down[s];
      loadX<C, T>(p, row, t, n, xb, x);
      loadPrev<C>(p, row, t, n, h0v, hp);
#pragma unroll
      for (int k = 0; k < kMaxG; ++k) r[k] = fmaf(Rd[k], hp[0], rb[k]);
      Act a;
      cellForward<C>(x, r, hp, a, out);
      cellVjp<C>(r, hp, a, g, gx, gr, gp);
      float viaRec = 0.0f;
#pragma unroll
      for (int k = 0; k < G; ++k) {
        storeScalar<T>(dwx + at4(row, t, k, n, p.T, G, p.N), gx[k]);
        accR[k] = fmaf(gr[k], hp[0], accR[k]);
        accB[k] += gr[k];
        viaRec = fmaf(gr[k], Rd[k], viaRec);
      }
      down[0] = gp[0] + viaRec;
#pragma unroll
      for (int s = 1; s < kMaxS; ++s) down[s] = gp[s];
    }
    if (t0 == 0 && p.dh0 != nullptr) {
#pragma unroll
      for (int s = 0; s < S; ++s) p.dh0[(s * p.batch + row) * p.N + n] = down[s];
    }
  }
  // dR, db: sum over the slices in shared memory, then one atomic per (channel, gate) and block.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    sAcc[g][tid] = accR[g];
    sAcc[kMaxG + g][tid] = accB[g];
  }
  __syncthreads();
  if (slice == 0 && active) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float sr = 0.0f, sb = 0.0f;
      for (int w = 0; w < NS; ++w) {
        sr += sAcc[g][w * CW + lc];
        sb += sAcc[kMaxG + g][w * CW + lc];
      }
      atomicAdd(p.dR + g * p.N + n, sr);
      atomicAdd(p.db + g * p.N + n, sb);
    }
  }
}

// Dense cells: exact BPTT per (row, head) in reverse time; d rec to scratch for dR and db.
template <NewtonCell C, class T> __global__ void denseBackwardKernel(Params p) {
  constexpr int G = CellInfo<C>::G, S = CellInfo<C>::S;
  float* smem = dynamicShared<float>();
  const int D = static_cast<int>(p.D);
  const int64_t row = static_cast<int64_t>(blockIdx.x) / p.H, head = static_cast<int64_t>(blockIdx.x) % p.H;
  const int j = static_cast<int>(threadIdx.x);
  const bool active = j < D;
  const int64_t n = head * D + (active ? j : 0);
  const int Dp = (D + 3) & ~3;
  float* sh = smem;        // h_{t-1}
  float* sdr = smem + Dp;  // d rec, [G][D]
  int ld;
  int64_t gs;
  const float* Rh = headWeights(p, G, head, smem + Dp + G * Dp, ld, gs);
  const T* dy = static_cast<const T*>(p.dy);
  T* dwx = static_cast<T*>(p.dwx);
  float xb[kMaxG], rb[kMaxG], Rd[kMaxG], h0v[kMaxS];
  channelConsts<C>(p, n, xb, rb, Rd);
  loadH0<C>(p, row, n, h0v);
  float down[kMaxS];
#pragma unroll
  for (int s = 0; s < kMaxS; ++s)
    down[s] = (s < S && p.dFinal != nullptr && active) ? p.dFinal[(s * p.batch + row) * p.N + n] : 0.0f;
  for (int64_t t = p.T - 1; t >= 0; --t) {
    float hp[kMaxS];
    loadPrev<C>(p, row, t, n, h0v, hp);
    __syncthreads();
    if (active) sh[j] = hp[0];
    __syncthreads();
    float gp[kMaxS];
    if (active) {
      float x[kMaxG], r[kMaxG], g[kMaxS], out[kMaxS], gx[kMaxG], gr[kMaxG];
      loadX<C, T>(p, row, t, n, xb, x);
#pragma unroll
      for (int k = 0; k < kMaxG; ++k) r[k] = rb[k];
      for (int i = 0; i < D; ++i) {
        const float hi = sh[i];
#pragma unroll
        for (int k = 0; k < G; ++k) r[k] = fmaf(hi, Rh[k * gs + static_cast<int64_t>(i) * ld + j], r[k]);
      }
#pragma unroll
      for (int s = 0; s < kMaxS; ++s) g[s] = down[s];
      if (dy != nullptr) g[0] += loadScalar<T>(dy + (row * p.T + t) * p.N + n);
      Act a;
      cellForward<C>(x, r, hp, a, out);
      cellVjp<C>(r, hp, a, g, gx, gr, gp);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        storeScalar<T>(dwx + at4(row, t, k, n, p.T, G, p.N), gx[k]);
        p.drec[at4(row, t, k, n, p.T, G, p.N)] = gr[k];
        sdr[k * Dp + j] = gr[k];
      }
    }
    __syncthreads();
    if (active) {
      // d h_{t-1}[j] = direct + sum_g sum_k R[g][j][k] drec[g][k].
      float v = gp[0];
      for (int k = 0; k < D; ++k) {
#pragma unroll
        for (int g = 0; g < G; ++g) v = fmaf(Rh[g * gs + static_cast<int64_t>(j) * ld + k], sdr[g * Dp + k], v);
      }
      down[0] = v;
#pragma unroll
      for (int s = 1; s < kMaxS; ++s) down[s] = gp[s];
    }
  }
  if (active && p.dh0 != nullptr) {
#pragma unroll
    for (int s = 0; s < S; ++s) p.dh0[(s * p.batch + row) * p.N + n] = down[s];
  }
}

// dR[g][head][i][j] = sum over (row, t) of h_{t-1}[head, i] drec[row, t, g, head, j]: a block of 256
// threads per (g, head, 32 x 32 tile), each thread 4 outputs (rows i, lane j).
__global__ void __launch_bounds__(256) denseGradRKernel(Params p, int G, int S) {
  __shared__ float sA[kTile][kTile + 1];
  __shared__ float sB[kTile][kTile + 1];
  const int64_t tiles = ceilDiv(p.D, kTile);
  int64_t blk = blockIdx.x;
  const int64_t g = blk / (p.H * tiles * tiles);
  blk -= g * p.H * tiles * tiles;
  const int64_t head = blk / (tiles * tiles);
  blk -= head * tiles * tiles;
  const int64_t it = blk / tiles, jt = blk - it * tiles;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t BT = p.batch * p.T;
  for (int64_t k0 = 0; k0 < BT; k0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += 256) {
      const int q = e / kTile, c = e % kTile;
      const int64_t bt = k0 + q;
      float a = 0.0f, bv = 0.0f;
      if (bt < BT) {
        const int64_t row = bt / p.T, t = bt - row * p.T;
        const int64_t i = it * kTile + c, jj = jt * kTile + c;
        if (i < p.D) {
          const int64_t ni = head * p.D + i;
          a = t == 0 ? (p.h0 != nullptr ? p.h0[row * p.N + ni] : 0.0f) : p.traj[((bt - 1) * S) * p.N + ni];
        }
        if (jj < p.D) bv = p.drec[(bt * G + g) * p.N + head * p.D + jj];
      }
      sA[q][c] = a;
      sB[q][c] = bv;
    }
    __syncthreads();
#pragma unroll 4
    for (int q = 0; q < kTile; ++q) {
      const float bv = sB[q][lane];
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[m] = fmaf(sA[q][warp * 4 + m], bv, acc[m]);
    }
    __syncthreads();
  }
  const int64_t j = jt * kTile + lane;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t i = it * kTile + warp * 4 + m;
    if (i < p.D && j < p.D) p.dR[((g * p.H + head) * p.D + i) * p.D + j] = acc[m];
  }
}

// db[g][n] = sum over (row, t) of drec[row, t, g, n].
__global__ void gradBKernel(Params p, int G) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= G * p.N) return;
  float s = 0.0f;
  for (int64_t bt = 0; bt < p.batch * p.T; ++bt) s += p.drec[bt * G * p.N + e];
  p.db[e] = s;
}

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
  p.batch = a.batch;
  p.T = a.T;
  p.H = a.heads;
  p.D = a.headDim;
  p.N = a.heads * a.headDim;
  p.maxIters = a.maxIters;
  p.tolAbs = a.tolAbs;
  p.tolRel = a.tolRel;
  p.damping = a.damping;
  p.guess = static_cast<int>(a.guess);
  p.guessTraj = a.guessTraj;
  p.wx = a.wx;
  p.R = a.R;
  p.b = a.b;
  p.h0 = a.h0;
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
