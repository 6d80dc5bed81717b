// CPU Newton-iteration parallel nonlinear RNN. Work items are (batch row, unit): a unit is a chunk of
// kNewtonChannelChunk channels for the diagonal cells (whose channels are independent) and one head
// for the dense cells (whose heads are independent). Each item runs its own Newton iteration until
// every one of its elements passes the check; a row's statistics are then reduced over its items
// (iterations and residual: the largest; converged: all), which is exactly the row-wise lock-step
// iteration of the contract (see forward() for how items that stop early catch up). Rows that
// did not converge are recomputed by sequential evaluation when the fallback is on.
//
// Per item and step t, with prev = traj_{t-1} (h0 at t = 0), the cell gives F_t = f(prev, x_t) and
// per channel the coefficients K[q] of its exact derivative, in terms of u_g = d rec_g (the change
// of the recurrent part of gate g; rec_n includes b_n for the GRU):
//   elman   dh = K0 u_a
//   gru     dh = K3 dh_{t-1} + K0 u_r + K1 u_z + K2 u_n                    (K3 = z)
//   lstm    dc = K4 dc_{t-1} + K0 u_i + K1 u_f + K2 u_z;  dh = K3 u_o + K5 dc   (K4 = f)
//   cifg    dc = K3 dc_{t-1} + K0 u_f + K1 u_z;           dh = K2 u_o + K4 dc   (K3 = f)
// i.e. K[g] for each gate g, then K[G] = the direct coefficient, K[G + 1] = dh/dc (lstm-like cells).
// The full Jacobian applies this with u_g = dh_{t-1} @ R_g (a D x D matrix-vector product per gate);
// the per-channel Jacobians with u_g = diag(R_g) dh_{t-1}. A Newton step solves, in place of the
// residuals r_t = F_t - traj_t, d_t = J_t d_{t-1} + r_t (d_{-1} = 0), sequentially in time (the fast
// form on a CPU), and adds d to traj. With damping lambda > 0 (per-channel Jacobians only) d instead
// minimises sum_t |d_t - J_t d_{t-1} - r_t|^2 + lambda |d_t|^2: per channel the block-tridiagonal
// normal equations (S x S blocks) by block elimination forward in time and substitution backward.
//
// Backward: lambda_t = dL/dstate_t gathers dy_t and J_{t+1}^T lambda_{t+1}, the transposed exact
// Jacobian at the solution, i.e. backpropagation through the sequential recurrence evaluated at traj;
// the same sweep gives dwx, dR, db and dh0.
#include "ops/newton/newton_rnn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/isa.h"
#include "tensor/parallel.h"

// The kernels (newton_rnn_kernel.inc, every function of it) are compiled for baseline x86-64, AVX2
// and AVX-512 (GCC) and picked at run time.
#if defined(RK_X86_MULTIVERSION) && !defined(__clang__)
#define RK_NEWTON_MULTIVERSION 1
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace rk::newton {

using rkcuda::NewtonCell;
using rkcuda::NewtonGuess;
using rkcuda::NewtonRnnArgs;
using rkcuda::NewtonRnnGrads;
using rkcuda::NewtonRnnOutputs;

namespace base {
#include "ops/newton/newton_rnn_kernel.inc"
}  // namespace base

#ifdef RK_NEWTON_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "ops/newton/newton_rnn_kernel.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#include "ops/newton/newton_rnn_kernel.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

void newtonRnnForwardCpu(const NewtonRnnArgs& a, const NewtonRnnOutputs& o) {
#ifdef RK_NEWTON_MULTIVERSION
  if (isa() == Isa::Avx512) return avx512::forward(a, o);
  if (isa() == Isa::Avx2) return avx2::forward(a, o);
#endif
  base::forward(a, o);
}

void newtonRnnBackwardCpu(const NewtonRnnArgs& a, const NewtonRnnGrads& g) {
#ifdef RK_NEWTON_MULTIVERSION
  if (isa() == Isa::Avx512) return avx512::backward(a, g);
  if (isa() == Isa::Avx2) return avx2::backward(a, g);
#endif
  base::backward(a, g);
}

}  // namespace rk::newton
