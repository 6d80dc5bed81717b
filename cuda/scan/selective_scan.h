// Selective scan (Mamba-1): the interface of cuda/scan/selective_scan.cu and, for the decode step,
// cuda/scan/selective_state_update.cu.
// The contract between cpp/ (the CPU kernels and the binding) and cuda/ (the CUDA launchers).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// The largest dstate the CUDA kernels take (the CPU kernels take any).
constexpr int kSelectiveScanMaxDstate = 256;

// ---- selective scan, Mamba-1 (cuda/scan/selective_scan.cu) ----
// Per channel d of dim and state n of dstate, over the positions t of one sequence:
//   dt_t    = delta_t + deltaBias[d]                      (deltaBias nullable: 0)
//   dt_t    = dt_t <= 20 ? log1p(exp(dt_t)) : dt_t         (only when deltaSoftplus)
//   x_t[n]  = exp(dt_t * A[d,n]) * x_{t-1}[n] + dt_t * B_t[n] * u_t,   x_{-1} = h0 (nullable: 0)
//   y_t     = (sum_n x_t[n] * C_t[n] + D[d] * u_t) * (z ? z_t * sigmoid(z_t) : 1)   (D nullable: 0)
// u, delta, z, y are [batch, dim, seqlen] of dtype dt. A is fp32 [dim, dstate]. B (likewise C) is
// either constant, fp32 [dim, dstate], or variable, dtype dt [batch, groups, dstate, seqlen], where
// channel d reads group d / (dim / groups). D and deltaBias are fp32 [dim]; states are fp32.
//
// Sequences. segments[s] (a host array of nseq entries) says where sequence s lives: row `batch`
// of the tensors, positions [start, start + length). Without packing, nseq == batch and segment s
// is (s, 0, seqlen). Packed (varlen) input has batch == 1 and one segment per sequence, in order,
// not overlapping; length may be 0. The state restarts at each segment (from h0[s]); positions in no
// segment get y = 0 and zero gradients. h0 and finalState are fp32 [nseq, dim, dstate].
//
// Checkpoints. The forward pass saves, for every segment s, channel d and chunk c of `chunk` steps
// (c < nChunks(s) = ceil(length / chunk)), the state entering that chunk (x_{start + c*chunk - 1},
// which is h0 or 0 for c = 0) at
//   states[((chunkOffset * dim + d * nChunks(s) + c) * dstate + n]
// where chunkOffset = sum of nChunks over the segments before s; states has
// sum_s nChunks(s) * dim * dstate floats. The backward pass recomputes each chunk from there.
struct SelectiveScanArgs {
  DType dt = DType::F32;
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 1;
  bool variableB = false, variableC = false, deltaSoftplus = false;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;                    // segments came from cuSeqlens (else the uniform layout)
  int64_t chunk = 0;                      // must equal selectiveScanChunk() for the CUDA calls
  int64_t totalChunks = 0;
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;          // nullable
  const void* z = nullptr;           // nullable
  const float* deltaBias = nullptr;  // nullable
  const float* h0 = nullptr;         // nullable
};
// Checkpoint spacing (steps) used by the CUDA kernels.
int64_t selectiveScanChunk();
// Writes y (every element), states (every element) and finalState (nullable, [nseq, dim, dstate]).
Status selectiveScanForward(const SelectiveScanArgs& a, void* y, float* states, float* finalState);
struct SelectiveScanGrads {
  const void* dy = nullptr;       // nullable (zeros), dtype dt, [batch, dim, seqlen]
  const float* dFinal = nullptr;  // nullable (zeros), [nseq, dim, dstate]
  const float* states = nullptr;  // the forward pass's checkpoints
  // Outputs, each written entirely (zeros where nothing flows). du, ddelta, dz have dtype dt.
  void* du = nullptr;
  void* ddelta = nullptr;
  float* dA = nullptr;          // [dim, dstate]
  void* dB = nullptr;           // like B: variable -> dtype dt [batch, groups, dstate, seqlen]; constant -> fp32
  void* dC = nullptr;           // like C
  float* dD = nullptr;          // [dim], non-null exactly when D is
  void* dz = nullptr;           // non-null exactly when z is
  float* dDeltaBias = nullptr;  // [dim], non-null exactly when deltaBias is
  float* dh0 = nullptr;         // nullable (not wanted), [nseq, dim, dstate]
};
Status selectiveScanBackward(const SelectiveScanArgs& a, const SelectiveScanGrads& g);

// One or a few decode steps of the same recurrence from a given state, for generation:
// x, delta, z, y are dtype dt [batch, dim, tokens]; B and C dtype dt [batch, groups, dstate, tokens];
// A fp32 [dim, dstate]; D, deltaBias fp32 [dim] (nullable), z nullable. state is fp32
// [batch, dim, dstate]: read as x_{-1}, and overwritten with the state after the last token when
// updateState. intermediate (nullable) receives the state after every token, fp32
// [batch, tokens, dim, dstate].
struct SelectiveStateUpdateArgs {
  DType dt = DType::F32;
  int64_t batch = 0, dim = 0, dstate = 0, groups = 1, tokens = 1;
  bool deltaSoftplus = false, updateState = true;
  float* state = nullptr;
  const void* x = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const void* z = nullptr;
  const float* deltaBias = nullptr;
  void* y = nullptr;
  float* intermediate = nullptr;
};
Status selectiveStateUpdate(const SelectiveStateUpdateArgs& a);  // cuda/scan/selective_state_update.cu

}  // namespace rkcuda
