// Newton-iteration parallel RNN: the interface of cuda/newton/newton_rnn.cu.
// The contract between cpp/ (the CPU kernels and the binding) and cuda/ (the CUDA launchers).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// ---- Newton-iteration parallel nonlinear RNN, DEER / ParaRNN (cuda/newton/newton_rnn.cu) ----
// Solves h_t = f(h_{t-1}, x_t) for every t of every batch row at once: from a guess of the whole
// trajectory, each Newton step linearises f around it, h_t = J_t h_{t-1} + c_t, and solves that
// linear recurrence with a parallel scan over time.
// Cells, with N = heads * headDim channels (index head * D + j), G gates, S states:
//   gru-diag        G 3 (r, z, n)  S 1 (h)     the fused cells' GRU with rec_g[j] = R[g][j] h_{t-1}[j]
//   lstm-cifg-diag  G 3 (f, z, o)  S 2 (h, c)  rec_g[j] = R[g][j] h_{t-1}[j]; f = sig(pre_f),
//                                              c_t = f c_{t-1} + (1 - f) tanh(pre_z), h_t = sig(pre_o) tanh(c_t)
//   gru, lstm, elman                           exactly the fused cells above (R [G, H, D, D])
// pre_g = wx_g + b_g + rec_g (GRU n gate: wx_n + r (rec_n + b_n)).
// Layouts: wx dt [batch, T, G, N]; R fp32, [G, N] (diagonal cells) or [G, H, D, D]; b fp32 [G, N];
// h0 (nullable: zeros) and finalStates fp32 [S, batch, N]; the trajectory traj (and a provided
// guess) fp32 [batch, T, S, N]; y dt [batch, T, N] = the h state of traj.
// Jacobian: the diagonal cells always use their exact per-channel S x S blocks. The dense cells use
// the exact (S*D) x (S*D) block per head when fullJacobian (DEER), else only the S x S blocks
// linking the states of the same channel (quasi-DEER: more iterations, far less work).
// Convergence, per batch row: every element satisfies |f(traj_{t-1}, x_t) - traj_t| <=
// tolAbs + tolRel * |traj_t|. The check runs before each Newton step; iterations counts the steps
// taken (0 when the guess already satisfies it). residual is max |f(traj_{t-1}, x_t) - traj_t| of
// the last Newton iterate. A row that has not converged after maxIters steps is, when
// fallbackSequential, recomputed exactly by sequential evaluation (fellBack = 1); otherwise its
// trajectory is left as the last iterate and the caller must not use it (the op raises an error).
// damping lambda >= 0: Levenberg-Marquardt-regularised steps (ELK); 0 is plain Newton.
// sequential: skip Newton and evaluate sequentially (iterations 0, converged 1, residual 0).
enum class NewtonCell : int { GruDiag = 0, LstmCifgDiag = 1, Gru = 2, Lstm = 3, Elman = 4 };
// Per NewtonCell, in order: its name, gates G, states S and whether its Jacobian is per channel. The
// one definition of the table lib/ops/newtonRnn.ts reads (through the addon's newtonRnnCells()).
struct NewtonCellInfo {
  const char* name;
  int gates, states;
  bool diagonal;
};
constexpr NewtonCellInfo kNewtonCells[] = {{"gru-diag", 3, 1, true},
                                           {"lstm-cifg-diag", 3, 2, true},
                                           {"gru", 3, 1, false},
                                           {"lstm", 4, 2, false},
                                           {"elman", 1, 1, false}};
enum class NewtonGuess : int { Zeros = 0, OneStep = 1, Provided = 2 };  // OneStep: traj_t = f(h0, x_t)
struct NewtonRnnArgs {
  DType dt = DType::F32;
  NewtonCell cell = NewtonCell::GruDiag;
  int64_t batch = 0, T = 0, heads = 1, headDim = 0;
  bool fullJacobian = true;
  bool sequential = false;
  bool fallbackSequential = true;
  int maxIters = 0;
  float tolAbs = 0.0f, tolRel = 0.0f, damping = 0.0f;
  NewtonGuess guess = NewtonGuess::Zeros;
  const float* guessTraj = nullptr;  // fp32 [batch, T, S, N] when guess == Provided
  const void* wx = nullptr;
  const float* R = nullptr;
  const float* b = nullptr;
  const float* h0 = nullptr;  // nullable
};
struct NewtonRnnOutputs {
  float* traj = nullptr;         // every element written
  void* y = nullptr;             // every element written
  float* finalStates = nullptr;  // nullable
  // Per-row statistics, host memory, batch entries each (the CUDA call synchronises to fill them).
  int32_t* iterations = nullptr;
  float* residual = nullptr;
  uint8_t* converged = nullptr;
  uint8_t* fellBack = nullptr;
};
Status newtonRnnForward(const NewtonRnnArgs& a, const NewtonRnnOutputs& o);
// Backward by the implicit function theorem at the solution traj: one reverse-time linear recurrence
// with the transposed exact Jacobians (lambda_t = dy_t + J_{t+1}^T lambda_{t+1}), then the parameter
// gradients. No backpropagation through the iterations.
struct NewtonRnnGrads {
  const void* dy = nullptr;       // nullable (zeros), dt [batch, T, N]
  const float* dFinal = nullptr;  // nullable (zeros), [S, batch, N]
  const float* traj = nullptr;    // the forward solution
  // Outputs, each written entirely: dwx dt like wx; dR, db fp32 like R, b; dh0 nullable.
  void* dwx = nullptr;
  float* dR = nullptr;
  float* db = nullptr;
  float* dh0 = nullptr;
};
Status newtonRnnBackward(const NewtonRnnArgs& a, const NewtonRnnGrads& g);

}  // namespace rkcuda
