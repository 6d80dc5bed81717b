// Mamba-2 (SSD): the interface of cuda/ssd/mamba2_scan.cu, the contract between the binding
// (cpp/ops/ssd/mamba2_scan_binding.cc) and the kernels (CPU: cpp/ops/ssd/mamba2_scan_cpu.cc; CUDA: mamba2_scan.cu).
//
// The scan runs on linear attention's kernels (cuda/attention/linear_attention.h, rule Gated): per
// head h of a sequence, with d_t the effective time step and the state S (P x N) of the reference,
//   d_t = dt_t + dtBias[h];  d_t = softplus(d_t) (dtSoftplus; d_t when d_t > 20);
//   d_t = min(max(d_t, dtMin), dtMax)   (clamp)
//   S_t = exp(d_t A[h]) S_{t-1} + d_t x_t B_t^T,    y_t = S_t C_t + D x_t,    y_t *= silu(z_t)
// is gated linear attention with q = C, k = B (their G groups as query and key heads), v = d x,
// g = d A (one log-space decay per head), scale 1, and its state S^T (N x P). The kernels here are
// the elementwise parts around it (the gate and the output), the transposes between the two state
// layouts, and the fused decode step.
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// x, z, o, y, v dt [rows, H, P]; dt dt [rows, H]; A fp32 [H]; dtBias fp32 [H] (nullable); D fp32 [H]
// or [H, P] (dPerChannel; nullable); z nullable. rows = batch * T.
struct Mamba2GateArgs {
  DType dt = DType::F32;
  int64_t rows = 0, H = 0, P = 0;
  bool dtSoftplus = false, clamp = false, dPerChannel = false;
  float dtMin = 0.0f, dtMax = 0.0f;  // used when clamp
  // Rows at or past validRows lie in no sequence (a packed batch's positions after its last
  // sequence): mamba2Finish, mamba2FinishBackward and mamba2PrepareBackward write zeros there and add
  // nothing from them to the sums. Negative: every row is in a sequence.
  int64_t validRows = -1;
  int64_t liveRows() const { return validRows < 0 || validRows > rows ? rows : validRows; }
  const void* x = nullptr;
  const void* dtIn = nullptr;
  const float* A = nullptr;
  const float* dtBias = nullptr;
  const float* D = nullptr;
  const void* z = nullptr;
};

// g fp32 [rows, H] = d * A[h]; v dt [rows, H, P] = d * x (both written in full).
Status mamba2Prepare(const Mamba2GateArgs& a, float* g, void* v);
// y dt [rows, H, P] = (o + D x) * silu(z) (D and z where given; written in full).
Status mamba2Finish(const Mamba2GateArgs& a, const void* o, void* y);
// From dy: dO dt = dy * silu(z) (the gradient of o, and of y before the gate) and dz dt (both [rows,
// H, P], written in full). Needs z.
Status mamba2FinishBackward(const Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz);
// From dO (the gradient of y before the gate), dv (dt) and dg (fp32) of the scan: dx, ddt (dt, written
// in full), dA fp32 [H], dDtBias fp32 [H] (nullable), dD fp32 like D (nullable). dD and dx's D term
// need dO; the sums over rows are accumulated in fp32 or better.
Status mamba2PrepareBackward(const Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                             void* ddt, float* dA, float* dDtBias, float* dD);

// dst[m][c][r] = src[m][r][c] for every m < count (fp32 rows x cols matrices): between the reference's
// state layout [.., H, P, N] and the scan's [.., H, N, P].
Status mamba2TransposeStates(const float* src, float* dst, int64_t count, int64_t rows, int64_t cols);

// The decode step: T tokens of every sequence of the batch through the recurrence above, the state
// (fp32 [batch, H, P, N], the reference's layout) read and, with `update`, written back in place.
// x, z, y dt [batch, T, H, P]; dtIn dt [batch, T, H]; B, C dt [batch, T, G, N] (head h reads group
// h / (H / G)); intermediate fp32 [batch, T, H, P, N] (nullable): the state after every token.
struct Mamba2StepArgs {
  Mamba2GateArgs gate;  // rows = batch * T
  int64_t batch = 0, T = 0, G = 0, N = 0;
  const void* B = nullptr;
  const void* C = nullptr;
  float* state = nullptr;
  bool update = true;
  float* intermediate = nullptr;
};
Status mamba2Step(const Mamba2StepArgs& a, void* y);

}  // namespace rkcuda
