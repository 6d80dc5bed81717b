// Fused recurrent cells: the interface of cuda/cells/fused_rnn.cu.
// The contract between cpp/ (the CPU kernels and the binding) and cuda/ (the CUDA launchers).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// ---- fused recurrent cells, FlashRNN style (cuda/cells/fused_rnn.cu) ----
// The recurrent part of an RNN layer (the input projection is done outside), many small heads with
// block-diagonal recurrent weights. G gates, S states per cell (state 0 is always h):
//   cell   G  S  gates (order)  states (order)
//   elman  1  1  (a)            (h)            h_t = tanh(pre_a)
//   lstm   4  2  (i, f, z, o)   (h, c)         c_t = sig(pre_f) c + sig(pre_i) tanh(pre_z), h_t = sig(pre_o) tanh(c_t)
//   gru    3  1  (r, z, n)      (h)            n = tanh(wx_n + sig(pre_r) (rec_n + b_n)), h_t = (1 - z) n + z h_{t-1}
//   slstm  4  4  (i, f, z, o)   (h, c, n, m)   exponential gating with normaliser and stabiliser
// with rec_g[j] = sum_i h_{t-1}[i] R[g][head][i][j] and pre_g = wx_g + b_g + rec_g. The exact
// definitions (sLSTM's log-sigmoid forget gate and empty-state stabiliser reset included) are those
// of the float64 oracle, tests/reference/fusedRnn.ts, which is the specification.
// Layouts (D = headDim, H = heads): wx dt [batch, T, G, H, D]; R dt [G, H, D, D]; b fp32 [G, H, D];
// states0 (nullable: zeros) and finalStates fp32 [S, batch, H, D]; h dt [batch, T, H, D], or
// [batch, H, D] (the final h) when returnLastOnly.
// lengths (nullable: T for every row; host memory, batch entries in [0, T]): steps t >= lengths[b]
// leave the state unchanged and give h = 0 and zero gradients.
enum class CellKind : int { Elman = 0, Lstm = 1, Gru = 2, Slstm = 3 };
constexpr int cellGates(CellKind c) { return c == CellKind::Elman ? 1 : c == CellKind::Gru ? 3 : 4; }
constexpr int cellStates(CellKind c) { return c == CellKind::Lstm ? 2 : c == CellKind::Slstm ? 4 : 1; }
// The cells' names, in CellKind order: the one definition of the table lib/ops/fusedRnn.ts reads
// (through the addon's fusedRnnCells()).
constexpr const char* kCellNames[] = {"elman", "lstm", "gru", "slstm"};
struct FusedRnnArgs {
  DType dt = DType::F32;
  CellKind cell = CellKind::Lstm;
  int64_t batch = 0, T = 0, heads = 0, headDim = 0;
  bool returnLastOnly = false;
  const int32_t* lengths = nullptr;  // host, nullable
  const void* wx = nullptr;
  const void* R = nullptr;
  const float* b = nullptr;
  const float* states0 = nullptr;  // nullable
};
// What the backward pass needs, written by a training forward (both null for inference):
//   savedStates fp32 [T, S, batch, H, D]: the states after step t (unchanged copies past a row's length);
//   savedPre    fp32 [T, batch, G, H, D]: pre_g at step t; for the GRU's n gate, rec_n + b_n (the part
//               that the r gate scales); zeros past a row's length.
struct FusedRnnOutputs {
  void* h = nullptr;             // every element written
  float* finalStates = nullptr;  // nullable
  float* savedStates = nullptr;  // nullable (inference)
  float* savedPre = nullptr;     // non-null exactly when savedStates is
};
Status fusedRnnForward(const FusedRnnArgs& a, const FusedRnnOutputs& o);
struct FusedRnnGrads {
  const void* dh = nullptr;       // nullable (zeros), dt, h's shape (with returnLastOnly: [batch, H, D])
  const float* dFinal = nullptr;  // nullable (zeros), [S, batch, H, D]
  const float* savedStates = nullptr;
  const float* savedPre = nullptr;
  // Outputs, each written entirely: dwx dt like wx; dR dt like R; db fp32 like b; dStates0 nullable.
  void* dwx = nullptr;
  void* dR = nullptr;
  float* db = nullptr;
  float* dStates0 = nullptr;
};
Status fusedRnnBackward(const FusedRnnArgs& a, const FusedRnnGrads& g);

}  // namespace rkcuda
