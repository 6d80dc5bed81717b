// CPU test of the Newton-iteration parallel RNN kernels (cuda/newton/newton_rnn.cu, compiled
// unmodified) through the SIMT emulator in emu.h. The real launchers run on small problems and
// every output is compared with float64 references written here as plain loops:
//   * the sequential recurrence of every cell (gru-diag, lstm-cifg-diag, gru, lstm, elman) and its
//     backward through time (checked itself against finite differences of the forward);
//   * a float64 Newton iteration with the same per-channel S x S Jacobians and convergence rule,
//     plain and damped (the damped step solved independently, as the block-tridiagonal normal
//     equations of the regularised least-squares problem), and with the dense cells' exact
//     (S D) x (S D) Jacobian per head (DEER, solved sequentially in float64), whose iteration counts
//     must equal the kernels' wherever the decision is not within a factor 3 of the tolerance;
//   * newtonRnnForward: Newton results (traj, y, finalStates) equal the sequential reference; the
//     statistics (iterations, converged, residual, fellBack) are checked; a case that cannot
//     converge in the allowed steps falls back and returns the exact answer with fellBack = 1 (or
//     reports converged 0 without the fallback); mode sequential; every guess (zeros, one step,
//     provided); damping; batch 1 and 3, hidden 1, 33, 130, T 1, 7, 300; fp32 and bf16 inputs;
//     every channels-per-block / block-size choice of the fused kernels and of the per-channel
//     parallel step, and both placements of the dense cells' R (pinned through rkcuda::tunable);
//   * the full Jacobian (DEER) of gru, lstm, elman: both kinds of chunk product (split-tf32 tensor
//     cores, fp32 FMA), chunk lengths 1, 3, 4, 6, 13, T and the launcher's, chunk-kernel blocks of
//     32 to 256 threads, matrices of 16 to 80 padded rows; heads 1, 2, 3, headDim 1, 5, 9, 16, 20,
//     33, T 1 .. 130; the iterate after one or two steps equals the float64 DEER iterate (after one
//     step to 1e-6 relative, which tells the split products from plain tf32 ones); the fallback;
//     the launch log shows which step kernels ran;
//   * newtonRnnBackward against the float64 BPTT at the exact trajectory, dy / dFinal / dh0 on and off;
//   * arguments the launchers must refuse (among them damping with the full Jacobian, S D > 128,
//     bad chunk / product / block tunables).
// Outputs are poisoned (NaN) before each call, so anything left unwritten fails; sentinels around
// every output catch out-of-bounds writes; every stream-ordered allocation must be freed; every
// kernel instantiation of the tested combinations must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/newton_rnn_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "newton/newton_rnn.cu"
#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

// runtime.cu is not part of the emulator build; the launchers need its copies.
namespace rkcuda {
Status copyDeviceToHost(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return Status{};
}
Status copyDeviceToDevice(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return Status{};
}
Status synchronize() { return Status{}; }
}  // namespace rkcuda

namespace {

using rkcuda::DType;
using rkcuda::NewtonCell;
using rkcuda::NewtonGuess;

// Norm-wise tolerance of each dtype's results.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-4;
  else
    return 1e-2;  // bf16
}

double f32(double x) { return static_cast<float>(x); }

// ---- the model and its float64 references ----

int gatesOf(NewtonCell c) { return c == NewtonCell::Lstm ? 4 : c == NewtonCell::Elman ? 1 : 3; }
int statesOf(NewtonCell c) { return c == NewtonCell::Lstm || c == NewtonCell::LstmCifgDiag ? 2 : 1; }
bool isDiag(NewtonCell c) { return c == NewtonCell::GruDiag || c == NewtonCell::LstmCifgDiag; }
const char* cellName(NewtonCell c) {
  switch (c) {
    case NewtonCell::GruDiag:
      return "gru-diag";
    case NewtonCell::LstmCifgDiag:
      return "lstm-cifg-diag";
    case NewtonCell::Gru:
      return "gru";
    case NewtonCell::Lstm:
      return "lstm";
    default:
      return "elman";
  }
}

struct Model {
  NewtonCell cell = NewtonCell::GruDiag;
  int G = 3, S = 1;
  bool diag = true;
  int64_t B = 1, T = 1, H = 1, D = 1, N = 1;
  std::vector<double> wx, R, b, h0;  // h0 always present here (zeros when the call passes none)
  bool hasH0 = true;
};

double sig(double x) { return 1 / (1 + std::exp(-x)); }

// One channel: x[g] input part (wx + b; the GRU's n gate: wx), r[g] recurrent part (rec; n: rec + b_n).
void refStep(NewtonCell c, const double* x, const double* r, const double* prev, double* out) {
  switch (c) {
    case NewtonCell::GruDiag:
    case NewtonCell::Gru: {
      const double rg = sig(x[0] + r[0]), z = sig(x[1] + r[1]), n = std::tanh(x[2] + rg * r[2]);
      out[0] = (1 - z) * n + z * prev[0];
      return;
    }
    case NewtonCell::LstmCifgDiag: {
      const double f = sig(x[0] + r[0]), zt = std::tanh(x[1] + r[1]), o = sig(x[2] + r[2]);
      const double cc = f * prev[1] + (1 - f) * zt;
      out[0] = o * std::tanh(cc);
      out[1] = cc;
      return;
    }
    case NewtonCell::Lstm: {
      const double i = sig(x[0] + r[0]), f = sig(x[1] + r[1]), zt = std::tanh(x[2] + r[2]), o = sig(x[3] + r[3]);
      const double cc = f * prev[1] + i * zt;
      out[0] = o * std::tanh(cc);
      out[1] = cc;
      return;
    }
    default:
      out[0] = std::tanh(x[0] + r[0]);
  }
}

// Its VJP: gx = dL/dx, gr = dL/dr, gp = direct dL/dprev.
void refVjp(NewtonCell c, const double* x, const double* r, const double* prev, const double* g, double* gx, double* gr,
            double* gp) {
  switch (c) {
    case NewtonCell::GruDiag:
    case NewtonCell::Gru: {
      const double rg = sig(x[0] + r[0]), z = sig(x[1] + r[1]), n = std::tanh(x[2] + rg * r[2]);
      const double dn = g[0] * (1 - z), dz = g[0] * (prev[0] - n), dnp = dn * (1 - n * n);
      gx[2] = dnp;
      gr[2] = dnp * rg;
      gx[0] = gr[0] = dnp * r[2] * rg * (1 - rg);
      gx[1] = gr[1] = dz * z * (1 - z);
      gp[0] = g[0] * z;
      return;
    }
    case NewtonCell::LstmCifgDiag: {
      const double f = sig(x[0] + r[0]), zt = std::tanh(x[1] + r[1]), o = sig(x[2] + r[2]);
      const double cc = f * prev[1] + (1 - f) * zt, tc = std::tanh(cc);
      const double gc = g[1] + g[0] * o * (1 - tc * tc);
      gx[0] = gr[0] = gc * (prev[1] - zt) * f * (1 - f);
      gx[1] = gr[1] = gc * (1 - f) * (1 - zt * zt);
      gx[2] = gr[2] = g[0] * tc * o * (1 - o);
      gp[0] = 0;
      gp[1] = gc * f;
      return;
    }
    case NewtonCell::Lstm: {
      const double i = sig(x[0] + r[0]), f = sig(x[1] + r[1]), zt = std::tanh(x[2] + r[2]), o = sig(x[3] + r[3]);
      const double cc = f * prev[1] + i * zt, tc = std::tanh(cc);
      const double gc = g[1] + g[0] * o * (1 - tc * tc);
      gx[0] = gr[0] = gc * zt * i * (1 - i);
      gx[1] = gr[1] = gc * prev[1] * f * (1 - f);
      gx[2] = gr[2] = gc * i * (1 - zt * zt);
      gx[3] = gr[3] = g[0] * tc * o * (1 - o);
      gp[0] = 0;
      gp[1] = gc * f;
      return;
    }
    default: {
      const double h = std::tanh(x[0] + r[0]);
      gx[0] = gr[0] = g[0] * (1 - h * h);
      gp[0] = 0;
    }
  }
}

using Mat = std::vector<double>;  // row-major square matrices

// State s of channel n in a trajectory [T][S][N] of one row.
struct RowTraj {
  int64_t T, S, N;
  std::vector<double> v;
  double& at(int64_t t, int64_t s, int64_t n) { return v[(t * S + s) * N + n]; }
  double at(int64_t t, int64_t s, int64_t n) const { return v[(t * S + s) * N + n]; }
};

double Rdiag(const Model& m, int g, int64_t n) {
  if (m.diag) return m.R[g * m.N + n];
  const int64_t h = n / m.D, j = n % m.D;
  return m.R[((g * m.H + h) * m.D + j) * m.D + j];
}

// x and r of every channel of row b at step t with previous states prev (S x N).
void gatesAt(const Model& m, int64_t b, int64_t t, const std::vector<double>& prev, std::vector<double>& x,
             std::vector<double>& r) {
  x.assign(m.G * m.N, 0.0);
  r.assign(m.G * m.N, 0.0);
  const bool gru = m.cell == NewtonCell::GruDiag || m.cell == NewtonCell::Gru;
  for (int g = 0; g < m.G; ++g) {
    for (int64_t n = 0; n < m.N; ++n) {
      double rec = 0;
      if (m.diag) {
        rec = m.R[g * m.N + n] * prev[n];
      } else {
        const int64_t h = n / m.D, j = n % m.D;
        for (int64_t i = 0; i < m.D; ++i) rec += prev[h * m.D + i] * m.R[((g * m.H + h) * m.D + i) * m.D + j];
      }
      const double bias = m.b[g * m.N + n], w = m.wx[((b * m.T + t) * m.G + g) * m.N + n];
      if (gru && g == 2) {
        x[g * m.N + n] = w;
        r[g * m.N + n] = rec + bias;
      } else {
        x[g * m.N + n] = w + bias;
        r[g * m.N + n] = rec;
      }
    }
  }
}

std::vector<double> h0Of(const Model& m, int64_t b) {
  std::vector<double> p(m.S * m.N);
  for (int s = 0; s < m.S; ++s)
    for (int64_t n = 0; n < m.N; ++n) p[s * m.N + n] = m.h0[(s * m.B + b) * m.N + n];
  return p;
}

// f(prev, x_t) for every channel of row b: out (S x N), and the per-channel S x S Jacobian blocks J[n][i][j].
void evalStep(const Model& m, int64_t b, int64_t t, const std::vector<double>& prev, std::vector<double>& out,
              std::vector<double>* J) {
  std::vector<double> x, r;
  gatesAt(m, b, t, prev, x, r);
  out.assign(m.S * m.N, 0.0);
  if (J) J->assign(m.N * m.S * m.S, 0.0);
  for (int64_t n = 0; n < m.N; ++n) {
    double xs[4], rs[4], ps[2], os[2];
    for (int g = 0; g < m.G; ++g) xs[g] = x[g * m.N + n], rs[g] = r[g * m.N + n];
    for (int s = 0; s < m.S; ++s) ps[s] = prev[s * m.N + n];
    refStep(m.cell, xs, rs, ps, os);
    for (int s = 0; s < m.S; ++s) out[s * m.N + n] = os[s];
    if (J) {
      for (int i = 0; i < m.S; ++i) {
        double e[2] = {0, 0}, gx[4], gr[4], gp[2];
        e[i] = 1;
        refVjp(m.cell, xs, rs, ps, e, gx, gr, gp);
        double via = 0;
        for (int g = 0; g < m.G; ++g) via += gr[g] * Rdiag(m, g, n);
        for (int j = 0; j < m.S; ++j) (*J)[(n * m.S + i) * m.S + j] = gp[j] + (j == 0 ? via : 0);
      }
    }
  }
}

// The exact Jacobian of row b's step t at prev, per head: H matrices of (S D) x (S D), state-major
// (index i * D + j: state i of channel j), element ((i, j), (s, k)) = d out_i(j) / d prev_s(k).
std::vector<Mat> fullJacobians(const Model& m, int64_t b, int64_t t, const std::vector<double>& prev) {
  std::vector<double> x, r;
  gatesAt(m, b, t, prev, x, r);
  const int64_t D = m.D, M = m.S * D;
  std::vector<Mat> J(m.H, Mat(M * M, 0.0));
  for (int64_t h = 0; h < m.H; ++h) {
    for (int64_t j = 0; j < D; ++j) {
      const int64_t n = h * D + j;
      double xs[4], rs[4], ps[2];
      for (int g = 0; g < m.G; ++g) xs[g] = x[g * m.N + n], rs[g] = r[g * m.N + n];
      for (int s = 0; s < m.S; ++s) ps[s] = prev[s * m.N + n];
      for (int i = 0; i < m.S; ++i) {
        double e[2] = {0, 0}, gx[4], gr[4], gp[2];
        e[i] = 1;
        refVjp(m.cell, xs, rs, ps, e, gx, gr, gp);
        for (int s = 0; s < m.S; ++s) J[h][(i * D + j) * M + s * D + j] += gp[s];
        for (int64_t k = 0; k < D; ++k) {
          double v = 0;
          for (int g = 0; g < m.G; ++g) v += gr[g] * m.R[((g * m.H + h) * D + k) * D + j];
          J[h][(i * D + j) * M + k] += v;
        }
      }
    }
  }
  return J;
}

RowTraj sequential(const Model& m, int64_t b) {
  RowTraj tr{m.T, m.S, m.N, std::vector<double>(m.T * m.S * m.N)};
  std::vector<double> prev = h0Of(m, b), out;
  for (int64_t t = 0; t < m.T; ++t) {
    evalStep(m, b, t, prev, out, nullptr);
    std::copy(out.begin(), out.end(), tr.v.begin() + t * m.S * m.N);
    prev = out;
  }
  return tr;
}

std::vector<double> stateAt(const Model& m, const RowTraj& tr, int64_t b, int64_t t) {
  if (t < 0) return h0Of(m, b);
  return std::vector<double>(tr.v.begin() + t * m.S * m.N, tr.v.begin() + (t + 1) * m.S * m.N);
}

// Small dense linear algebra on S x S blocks (row-major vectors).
Mat mmul(const Mat& a, const Mat& b, int S) {
  Mat c(S * S, 0.0);
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j)
      for (int k = 0; k < S; ++k) c[i * S + j] += a[i * S + k] * b[k * S + j];
  return c;
}
Mat mT(const Mat& a, int S) {
  Mat c(S * S);
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j) c[i * S + j] = a[j * S + i];
  return c;
}
Mat minv(const Mat& a, int S) {
  if (S == 1) return {1 / a[0]};
  const double det = a[0] * a[3] - a[1] * a[2];
  return {a[3] / det, -a[1] / det, -a[2] / det, a[0] / det};
}
std::vector<double> mvec(const Mat& a, const std::vector<double>& v, int S) {
  std::vector<double> r(S, 0.0);
  for (int i = 0; i < S; ++i)
    for (int k = 0; k < S; ++k) r[i] += a[i * S + k] * v[k];
  return r;
}

struct NewtonResult {
  int iterations = 0;
  bool converged = false;
  bool clear = true;  // every decision was further than a factor 3 from the tolerance
  RowTraj traj;
};

// Float64 Newton on row b with the per-channel Jacobians, the kernels' rule and guesses.
// With full (dense cells, lambda 0): the exact (S D) x (S D) Jacobian per head (DEER).
NewtonResult refNewton(const Model& m, int64_t b, int maxIters, double tolAbs, double tolRel, double lambda,
                       NewtonGuess guess, const std::vector<double>* provided, bool full = false) {
  const int S = m.S;
  NewtonResult res;
  res.traj = RowTraj{m.T, S, m.N, std::vector<double>(m.T * S * m.N, 0.0)};
  RowTraj& tr = res.traj;
  if (guess == NewtonGuess::Provided) {
    std::copy(provided->begin() + b * m.T * S * m.N, provided->begin() + (b + 1) * m.T * S * m.N, tr.v.begin());
  } else if (guess == NewtonGuess::OneStep) {
    std::vector<double> out;
    for (int64_t t = 0; t < m.T; ++t) {
      evalStep(m, b, t, h0Of(m, b), out, nullptr);
      std::copy(out.begin(), out.end(), tr.v.begin() + t * S * m.N);
    }
  }
  for (int k = 0;; ++k) {
    std::vector<std::vector<double>> J(m.T), c(m.T);
    double worst = 0;
    for (int64_t t = 0; t < m.T; ++t) {
      const std::vector<double> prev = stateAt(m, tr, b, t - 1);
      std::vector<double> f;
      evalStep(m, b, t, prev, f, &J[t]);
      c[t].assign(S * m.N, 0.0);
      for (int64_t n = 0; n < m.N; ++n) {
        for (int i = 0; i < S; ++i) {
          const double cur = tr.at(t, i, n);
          const double thr = tolAbs + tolRel * std::fabs(cur);
          worst = std::max(worst, std::fabs(f[i * m.N + n] - cur) / thr);
          double ci = f[i * m.N + n];
          for (int j = 0; j < S; ++j) ci -= J[t][(n * S + i) * S + j] * prev[j * m.N + n];
          c[t][i * m.N + n] = ci;
        }
      }
    }
    if (worst > 1.0 / 3 && worst < 3) res.clear = false;
    if (worst <= 1) {
      res.converged = true;
      return res;
    }
    if (k == maxIters) return res;
    ++res.iterations;
    if (full) {
      // h_t = J_t h_{t-1} + f_t - J_t prev_t per head, with the full Jacobians.
      const int64_t D = m.D, M = S * D;
      std::vector<std::vector<Mat>> JF(m.T);
      std::vector<std::vector<double>> f(m.T);
      for (int64_t t = 0; t < m.T; ++t) {
        const std::vector<double> prev = stateAt(m, tr, b, t - 1);
        evalStep(m, b, t, prev, f[t], nullptr);
        JF[t] = fullJacobians(m, b, t, prev);
        // Keep f - J prev in f[t] (state-major per head is [S][N] split by head below).
        for (int64_t h = 0; h < m.H; ++h) {
          for (int64_t r = 0; r < M; ++r) {
            double v = 0;
            for (int64_t q = 0; q < M; ++q) v += JF[t][h][r * M + q] * prev[(q / D) * m.N + h * D + q % D];
            f[t][(r / D) * m.N + h * D + r % D] -= v;
          }
        }
      }
      std::vector<double> hv = h0Of(m, b), nv(S * m.N);
      for (int64_t t = 0; t < m.T; ++t) {
        for (int64_t h = 0; h < m.H; ++h) {
          for (int64_t r = 0; r < M; ++r) {
            double v = f[t][(r / D) * m.N + h * D + r % D];
            for (int64_t q = 0; q < M; ++q) v += JF[t][h][r * M + q] * hv[(q / D) * m.N + h * D + q % D];
            nv[(r / D) * m.N + h * D + r % D] = v;
          }
        }
        hv = nv;
        std::copy(hv.begin(), hv.end(), tr.v.begin() + t * S * m.N);
      }
      continue;
    }
    for (int64_t n = 0; n < m.N; ++n) {
      auto Jn = [&](int64_t t) { return Mat(J[t].begin() + n * S * S, J[t].begin() + (n + 1) * S * S); };
      auto cn = [&](int64_t t) {
        std::vector<double> v(S);
        for (int i = 0; i < S; ++i) v[i] = c[t][i * m.N + n];
        return v;
      };
      if (lambda == 0) {
        std::vector<double> h(S);
        for (int i = 0; i < S; ++i) h[i] = m.h0[(i * m.B + b) * m.N + n];
        for (int64_t t = 0; t < m.T; ++t) {
          std::vector<double> nh = mvec(Jn(t), h, S);
          for (int i = 0; i < S; ++i) tr.at(t, i, n) = nh[i] + cn(t)[i];
          for (int i = 0; i < S; ++i) h[i] = tr.at(t, i, n);
        }
      } else {
        // Normal equations: A_t h_{t-1} + M_t h_t + B_t h_{t+1} = r_t with
        // M_t = (1 + lambda) I + J_{t+1}^T J_{t+1}, A_t = -J_t, B_t = -J_{t+1}^T,
        // r_t = c_t - J_{t+1}^T c_{t+1} + lambda o_t (+ J_0 h0 at t = 0). Block Thomas algorithm.
        const int64_t T = m.T;
        std::vector<Mat> Mp(T);
        std::vector<std::vector<double>> rp(T);
        std::vector<double> h0v(S);
        for (int i = 0; i < S; ++i) h0v[i] = m.h0[(i * m.B + b) * m.N + n];
        for (int64_t t = 0; t < T; ++t) {
          Mat M(S * S, 0.0);
          for (int i = 0; i < S; ++i) M[i * S + i] = 1 + lambda;
          std::vector<double> r = cn(t);
          for (int i = 0; i < S; ++i) r[i] += lambda * tr.at(t, i, n);
          if (t == 0) {
            const std::vector<double> jh = mvec(Jn(0), h0v, S);
            for (int i = 0; i < S; ++i) r[i] += jh[i];
          }
          if (t + 1 < T) {
            const Mat Jt1 = Jn(t + 1), JtT = mT(Jt1, S), JTJ = mmul(JtT, Jt1, S);
            for (int e = 0; e < S * S; ++e) M[e] += JTJ[e];
            const std::vector<double> jc = mvec(JtT, cn(t + 1), S);
            for (int i = 0; i < S; ++i) r[i] -= jc[i];
          }
          if (t > 0) {
            // Eliminate h_{t-1}: M -= A_t Mp_{t-1}^-1 B_{t-1}, r -= A_t Mp_{t-1}^-1 rp_{t-1}.
            const Mat A = Jn(t);             // -A_t
            const Mat Bprev = mT(Jn(t), S);  // -B_{t-1} = J_t^T
            const Mat Minv = minv(Mp[t - 1], S);
            const Mat AM = mmul(A, Minv, S);
            const Mat corr = mmul(AM, Bprev, S);
            for (int e = 0; e < S * S; ++e) M[e] -= corr[e];
            const std::vector<double> rc = mvec(AM, rp[t - 1], S);
            for (int i = 0; i < S; ++i) r[i] += rc[i];
          }
          Mp[t] = M;
          rp[t] = r;
        }
        std::vector<double> next(S, 0.0);
        for (int64_t t = T - 1; t >= 0; --t) {
          std::vector<double> r = rp[t];
          if (t + 1 < T) {
            const std::vector<double> bn = mvec(mT(Jn(t + 1), S), next, S);
            for (int i = 0; i < S; ++i) r[i] += bn[i];
          }
          next = mvec(minv(Mp[t], S), r, S);
          for (int i = 0; i < S; ++i) tr.at(t, i, n) = next[i];
        }
      }
    }
  }
}

struct Grads {
  std::vector<double> dwx, dR, db, dh0;
};

// BPTT of L = sum dy * y + sum dFinal * finalStates at the exact trajectory.
Grads refBackward(const Model& m, const std::vector<RowTraj>& trajs, const std::vector<double>& dy,
                  const std::vector<double>& dFinal) {
  Grads g;
  g.dwx.assign(m.B * m.T * m.G * m.N, 0.0);
  g.dR.assign(m.R.size(), 0.0);
  g.db.assign(m.b.size(), 0.0);
  g.dh0.assign(m.S * m.B * m.N, 0.0);
  for (int64_t b = 0; b < m.B; ++b) {
    std::vector<double> down(m.S * m.N, 0.0);
    for (int s = 0; s < m.S; ++s)
      for (int64_t n = 0; n < m.N; ++n) down[s * m.N + n] = dFinal.empty() ? 0 : dFinal[(s * m.B + b) * m.N + n];
    for (int64_t t = m.T - 1; t >= 0; --t) {
      const std::vector<double> prev = stateAt(m, trajs[b], b, t - 1);
      std::vector<double> x, r;
      gatesAt(m, b, t, prev, x, r);
      std::vector<double> gr(m.G * m.N), nd(m.S * m.N, 0.0);
      for (int64_t n = 0; n < m.N; ++n) {
        double xs[4], rs[4], ps[2], gs[2], gx[4], grs[4], gp[2];
        for (int q = 0; q < m.G; ++q) xs[q] = x[q * m.N + n], rs[q] = r[q * m.N + n];
        for (int s = 0; s < m.S; ++s) ps[s] = prev[s * m.N + n], gs[s] = down[s * m.N + n];
        if (!dy.empty()) gs[0] += dy[(b * m.T + t) * m.N + n];
        refVjp(m.cell, xs, rs, ps, gs, gx, grs, gp);
        for (int q = 0; q < m.G; ++q) {
          g.dwx[((b * m.T + t) * m.G + q) * m.N + n] = gx[q];
          gr[q * m.N + n] = grs[q];
          g.db[q * m.N + n] += grs[q];
        }
        for (int s = 0; s < m.S; ++s) nd[s * m.N + n] = gp[s];
      }
      for (int q = 0; q < m.G; ++q) {
        for (int64_t n = 0; n < m.N; ++n) {
          if (m.diag) {
            g.dR[q * m.N + n] += gr[q * m.N + n] * prev[n];
            nd[n] += gr[q * m.N + n] * m.R[q * m.N + n];
          } else {
            const int64_t h = n / m.D, j = n % m.D;
            for (int64_t i = 0; i < m.D; ++i) {
              g.dR[((q * m.H + h) * m.D + i) * m.D + j] += prev[h * m.D + i] * gr[q * m.N + n];
              nd[h * m.D + i] += m.R[((q * m.H + h) * m.D + i) * m.D + j] * gr[q * m.N + n];
            }
          }
        }
      }
      down = nd;
    }
    for (int s = 0; s < m.S; ++s)
      for (int64_t n = 0; n < m.N; ++n) g.dh0[(s * m.B + b) * m.N + n] = down[s * m.N + n];
  }
  return g;
}

Model makeModel(NewtonCell cell, int64_t B, int64_t T, int64_t H, int64_t D, double rScale, std::mt19937& rng,
                bool bf16) {
  std::uniform_real_distribution<double> U(-1, 1);
  Model m;
  m.cell = cell;
  m.G = gatesOf(cell);
  m.S = statesOf(cell);
  m.diag = isDiag(cell);
  m.B = B, m.T = T, m.H = H, m.D = D, m.N = H * D;
  auto rnd = [&](double s) { return bf16 ? roundTo<__nv_bfloat16>(s * U(rng)) : f32(s * U(rng)); };
  m.wx.resize(B * T * m.G * m.N);
  for (double& e : m.wx) e = rnd(1.0);
  m.R.resize(m.diag ? m.G * m.N : m.G * H * D * D);
  for (double& e : m.R) e = f32(rScale * (m.diag ? 1.0 : 1.0 / std::sqrt(static_cast<double>(D))) * U(rng));
  m.b.resize(m.G * m.N);
  for (double& e : m.b) e = f32(0.3 * U(rng));
  m.h0.resize(m.S * B * m.N);
  for (double& e : m.h0) e = f32(0.5 * U(rng));
  return m;
}

void checkReferenceGradients(std::mt19937& rng) {
  for (NewtonCell cell :
       {NewtonCell::GruDiag, NewtonCell::LstmCifgDiag, NewtonCell::Gru, NewtonCell::Lstm, NewtonCell::Elman}) {
    context = std::string("reference gradients ") + cellName(cell);
    Model m = makeModel(cell, 2, 4, 2, 3, 1.0, rng, false);
    std::uniform_real_distribution<double> U(-1, 1);
    std::vector<double> dy(m.B * m.T * m.N), dF(m.S * m.B * m.N);
    for (double& e : dy) e = U(rng);
    for (double& e : dF) e = U(rng);
    auto loss = [&](const Model& mm) {
      double L = 0;
      for (int64_t b = 0; b < mm.B; ++b) {
        const RowTraj tr = sequential(mm, b);
        for (int64_t t = 0; t < mm.T; ++t)
          for (int64_t n = 0; n < mm.N; ++n) L += dy[(b * mm.T + t) * mm.N + n] * tr.at(t, 0, n);
        for (int s = 0; s < mm.S; ++s)
          for (int64_t n = 0; n < mm.N; ++n) L += dF[(s * mm.B + b) * mm.N + n] * tr.at(mm.T - 1, s, n);
      }
      return L;
    };
    std::vector<RowTraj> trajs;
    for (int64_t b = 0; b < m.B; ++b) trajs.push_back(sequential(m, b));
    const Grads g = refBackward(m, trajs, dy, dF);
    // Every (1 + n / 17)-th element of each.
    const auto every = [](const std::vector<double>& grad) { return 1 + grad.size() / 17; };
    probeGradient(m, &Model::wx, g.dwx, "wx", loss, every(g.dwx));
    probeGradient(m, &Model::R, g.dR, "R", loss, every(g.dR));
    probeGradient(m, &Model::b, g.db, "b", loss, every(g.db));
    probeGradient(m, &Model::h0, g.dh0, "h0", loss, every(g.dh0));
  }
}

long itersCompared = 0, iteratesCompared = 0;

// ---- forward cases ----

struct Case {
  NewtonCell cell = NewtonCell::GruDiag;
  int64_t B = 1, T = 1, H = 1, D = 1;
  double rScale = 0.8;
  int maxIters = 50;
  double tolAbs = 1e-5, tolRel = 1e-5, lambda = 0;
  NewtonGuess guess = NewtonGuess::Zeros;
  bool sequential = false, fallback = true, hasH0 = true, hasFinal = true, fullJacobian = false;
  int chan = 0, threads = 0, sharedR = 0;          // tunables (0: the launcher's choice)
  int stepChan = 0, stepThreads = 0;               // the per-channel parallel step's block shape
  int fullChunk = 0, fullTC = 0, fullThreads = 0;  // full Jacobian: chunk length, 1 FMA / 2 tensor cores, block
  bool expectFallback = false;                     // some row must fall back (a non-converging case)
  bool compareIterate = false;                     // non-converged rows (no fallback) must equal the float64 iterate
  double iterateTol = 0;                           // its relative tolerance (0: as for the results)
};

std::string describe(const Case& c, const char* dt) {
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "%s %s B %lld T %lld H %lld D %lld rScale %g maxIters %d lambda %g guess %d seq %d fallback %d h0 %d "
                "chan %d threads %d sharedR %d "
                "step %d/%d full %d chunk %d tc %d threads %d",
                dt, cellName(c.cell), (long long)c.B, (long long)c.T, (long long)c.H, (long long)c.D, c.rScale,
                c.maxIters, c.lambda, static_cast<int>(c.guess), c.sequential, c.fallback, c.hasH0, c.chan, c.threads,
                c.sharedR, c.stepChan, c.stepThreads, c.fullJacobian, c.fullChunk, c.fullTC, c.fullThreads);
  return buf;
}

void setTunables(const Case& c) {
  emu::setTunable("newtonRnn.channelsPerBlock", c.chan);
  emu::setTunable("newtonRnn.blockThreads", c.threads);
  emu::setTunable("newtonRnnBackward.channelsPerBlock", c.chan);
  emu::setTunable("newtonRnnBackward.blockThreads", c.threads);
  emu::setTunable("newtonRnn.denseSharedR", c.sharedR);
  emu::setTunable("newtonRnnStep.channelsPerBlock", c.stepChan);
  emu::setTunable("newtonRnnStep.blockThreads", c.stepThreads);
  emu::setTunable("newtonRnn.fullChunk", c.fullChunk);
  emu::setTunable("newtonRnn.fullTensorCores", c.fullTC);
  emu::setTunable("newtonRnn.fullThreads", c.fullThreads);
}

// Which step kernels a launch log holds.
struct StepsRan {
  bool full = false, perChannel = false, damped = false;
};
StepsRan stepsIn(const std::vector<emu::LaunchRecord>& log) {
  using rkcuda::NewtonCell;
  const std::set<const void*> full = {emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Gru>),
                                      emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Lstm>),
                                      emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Elman>),
                                      emu::kernelId(rkcuda::fullCarryKernel),
                                      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Gru>),
                                      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Lstm>),
                                      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Elman>)};
  const std::set<const void*> perChannel = {emu::kernelId(rkcuda::scanStepKernel<NewtonCell::GruDiag>),
                                            emu::kernelId(rkcuda::scanStepKernel<NewtonCell::LstmCifgDiag>),
                                            emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Gru>),
                                            emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Lstm>),
                                            emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Elman>)};
  const std::set<const void*> damped = {emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::GruDiag>),
                                        emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::LstmCifgDiag>),
                                        emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::Gru>),
                                        emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::Lstm>),
                                        emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::Elman>)};
  StepsRan r;
  for (const auto& l : log) {
    r.full = r.full || full.count(l.kernel) > 0;
    r.perChannel = r.perChannel || perChannel.count(l.kernel) > 0;
    r.damped = r.damped || damped.count(l.kernel) > 0;
  }
  return r;
}

template <class T> void runForward(const Case& c, std::mt19937& rng) {
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  context = describe(c, Elem<T>::name);
  setTunables(c);
  Model m = makeModel(c.cell, c.B, c.T, c.H, c.D, c.rScale, rng, bf16);
  if (!c.hasH0) std::fill(m.h0.begin(), m.h0.end(), 0.0);
  const int64_t N = m.N, S = m.S, elems = c.B * c.T * S * N;
  std::uniform_real_distribution<double> U(-1, 1);
  std::vector<double> provided(elems);
  for (double& e : provided) e = f32(0.3 * U(rng));

  Buf<T> wx(m.wx.size()), y(c.B * c.T * N);
  Buf<float> R(m.R.size()), b(m.b.size()), h0(m.h0.size()), traj(elems), fin(S * c.B * N), guess(elems);
  wx.set(m.wx);
  R.set(m.R);
  b.set(m.b);
  h0.set(m.h0);
  guess.set(provided);
  traj.poison();
  y.poison();
  fin.poison();
  std::vector<int32_t> iters(c.B, -7);
  std::vector<float> resid(c.B, -7.0f);
  std::vector<uint8_t> conv(c.B, 9), fell(c.B, 9);

  rkcuda::NewtonRnnArgs a;
  a.dt = Elem<T>::dtype;
  a.cell = c.cell;
  a.batch = c.B, a.T = c.T, a.heads = c.H, a.headDim = c.D;
  a.fullJacobian = c.fullJacobian;
  a.sequential = c.sequential;
  a.fallbackSequential = c.fallback;
  a.maxIters = c.maxIters;
  a.tolAbs = static_cast<float>(c.tolAbs), a.tolRel = static_cast<float>(c.tolRel),
  a.damping = static_cast<float>(c.lambda);
  a.guess = c.guess;
  a.guessTraj = c.guess == NewtonGuess::Provided ? guess.data : nullptr;
  a.wx = wx.data, a.R = R.data, a.b = b.data, a.h0 = c.hasH0 ? h0.data : nullptr;
  rkcuda::NewtonRnnOutputs o;
  o.traj = traj.data, o.y = y.data, o.finalStates = c.hasFinal ? fin.data : nullptr;
  o.iterations = iters.data(), o.residual = resid.data(), o.converged = conv.data(), o.fellBack = fell.data();
  const rkcuda::Status st = rkcuda::newtonRnnForward(a, o);
  check(st.ok(), "newtonRnnForward failed: " + st.message);
  const StepsRan ran = stepsIn(emu::launchLog);
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
  if (!st.ok()) return;

  // The exact answer, the float64 Newton iteration, and the rows whose trajectory must be exact.
  std::vector<double> want(elems), wantY(c.B * c.T * N), wantFin(S * c.B * N);
  const double tolT = tolerance<float>() * (1 + std::sqrt(static_cast<double>(c.T)) / 4);
  bool anyFell = false;
  std::vector<char> usable(c.B, 1);
  for (int64_t r = 0; r < c.B; ++r) {
    const RowTraj ex = sequential(m, r);
    std::copy(ex.v.begin(), ex.v.end(), want.begin() + r * c.T * S * N);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t n = 0; n < N; ++n) wantY[(r * c.T + t) * N + n] = ex.at(t, 0, n);
    for (int s = 0; s < S; ++s)
      for (int64_t n = 0; n < N; ++n)
        wantFin[(s * c.B + r) * N + n] = c.T > 0 ? ex.at(c.T - 1, s, n) : m.h0[(s * c.B + r) * N + n];
    const std::string rs = " row " + std::to_string(r);
    if (c.sequential) {
      check(iters[r] == 0 && conv[r] == 1 && resid[r] == 0.0f && fell[r] == 0, "sequential statistics" + rs, iters[r],
            0);
      continue;
    }
    const NewtonResult nr = refNewton(m, r, c.maxIters, c.tolAbs, c.tolRel, c.lambda, c.guess, &provided,
                                      c.fullJacobian && !isDiag(c.cell));
    if (nr.clear) {
      ++itersCompared;
      check(iters[r] == nr.iterations, "iterations" + rs, iters[r], nr.iterations);
      check((conv[r] != 0) == nr.converged, "converged" + rs, conv[r], nr.converged);
    }
    check(iters[r] >= 0 && iters[r] <= c.maxIters, "iterations in range" + rs, iters[r], c.maxIters);
    check(conv[r] <= 1 && fell[r] <= 1, "flags are 0 or 1" + rs, conv[r], fell[r]);
    check(std::isfinite(resid[r]) || !conv[r], "residual finite when converged" + rs, resid[r], 0);
    if (conv[r]) {
      check(fell[r] == 0, "converged rows do not fall back" + rs, fell[r], 0);
      // The residual is that of the returned iterate, within the tolerance's absolute part scale.
      double maxAbs = 0;
      for (int64_t e = 0; e < c.T * S * N; ++e) maxAbs = std::max(maxAbs, std::fabs(want[r * c.T * S * N + e]));
      check(resid[r] >= 0 && resid[r] <= c.tolAbs + c.tolRel * maxAbs + 1e-6, "residual within tolerance" + rs,
            resid[r], c.tolAbs);
    } else {
      check(fell[r] == (c.fallback ? 1 : 0), "fellBack of a non-converged row" + rs, fell[r], c.fallback);
      check(resid[r] > 0 || std::isnan(resid[r]), "residual of a non-converged row" + rs, resid[r], 0);
      if (fell[r]) anyFell = true;
      if (!c.fallback) usable[r] = 0;
      if (c.compareIterate && !c.fallback) {
        std::vector<double> got(traj.data + r * c.T * S * N, traj.data + (r + 1) * c.T * S * N);
        compare("last Newton iterate" + rs, got, nr.traj.v, c.iterateTol > 0 ? c.iterateTol : tolT);
        ++iteratesCompared;
      }
    }
  }
  // The launch log: the step kernels of the chosen path ran (when a step was taken), and no other.
  if (!c.sequential) {
    int most = 0;
    for (int64_t r = 0; r < c.B; ++r) most = std::max(most, static_cast<int>(iters[r]));
    const bool dense = !isDiag(c.cell), full = dense && c.fullJacobian && c.lambda == 0;
    const bool perChannel = dense && !full && c.lambda == 0;
    check(ran.full == (full && most > 0), "full-Jacobian step kernels ran", ran.full, full && most > 0);
    check(ran.perChannel == (perChannel && most > 0), "per-channel step kernel ran", ran.perChannel,
          perChannel && most > 0);
    check(ran.damped == (c.lambda > 0 && most > 0), "damped step kernel ran", ran.damped, c.lambda > 0 && most > 0);
  }
  if (c.expectFallback) check(anyFell || !c.fallback, "a non-converging case fell back", anyFell, 1);
  if (c.expectFallback && !c.fallback) {
    bool anyNot = false;
    for (int64_t r = 0; r < c.B; ++r) anyNot = anyNot || !conv[r];
    check(anyNot, "a non-converging case reports converged 0", anyNot, 1);
  }
  // Usable rows equal the sequential answer; all rows are written.
  std::vector<double> gotT = traj.get(), gotY = y.get(), gotF = fin.get();
  std::vector<double> gT, wT, gY, wY;
  for (int64_t r = 0; r < c.B; ++r) {
    if (!usable[r]) continue;
    gT.insert(gT.end(), gotT.begin() + r * c.T * S * N, gotT.begin() + (r + 1) * c.T * S * N);
    wT.insert(wT.end(), want.begin() + r * c.T * S * N, want.begin() + (r + 1) * c.T * S * N);
    gY.insert(gY.end(), gotY.begin() + r * c.T * N, gotY.begin() + (r + 1) * c.T * N);
    wY.insert(wY.end(), wantY.begin() + r * c.T * N, wantY.begin() + (r + 1) * c.T * N);
  }
  compare("traj", gT, wT, tolT);
  check(traj.guardsIntact(), "traj: write outside the array");
  compare("y", gY, wY, std::max(tolT, tolerance<T>()));
  check(y.guardsIntact(), "y: write outside the array");
  if (c.hasFinal) {
    bool all = true;
    for (int64_t r = 0; r < c.B; ++r) all = all && usable[r];
    if (all) checkOutput("finalStates", fin, wantFin, tolT);
  }
}

// ---- backward cases ----

template <class T> void runBackward(const Case& c, bool hasDy, bool hasDFinal, bool hasDh0, std::mt19937& rng) {
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  context = describe(c, Elem<T>::name) + " backward dy " + std::to_string(hasDy) + " dFinal " +
            std::to_string(hasDFinal) + " dh0 " + std::to_string(hasDh0);
  setTunables(c);
  Model m = makeModel(c.cell, c.B, c.T, c.H, c.D, c.rScale, rng, bf16);
  if (!c.hasH0) std::fill(m.h0.begin(), m.h0.end(), 0.0);
  const int64_t N = m.N, S = m.S, elems = c.B * c.T * S * N;
  std::uniform_real_distribution<double> U(-1, 1);
  std::vector<double> dy, dF;
  if (hasDy) {
    dy.resize(c.B * c.T * N);
    for (double& e : dy) e = bf16 ? roundTo<__nv_bfloat16>(U(rng)) : f32(U(rng));
  }
  if (hasDFinal) {
    dF.resize(S * c.B * N);
    for (double& e : dF) e = f32(U(rng));
  }
  std::vector<RowTraj> trajs;
  std::vector<double> trajAll(elems);
  for (int64_t r = 0; r < c.B; ++r) {
    RowTraj tr = sequential(m, r);
    for (double& e : tr.v) e = f32(e);  // the forward's solution as stored
    std::copy(tr.v.begin(), tr.v.end(), trajAll.begin() + r * c.T * S * N);
    trajs.push_back(tr);
  }
  const Grads want = refBackward(m, trajs, dy, dF);

  Buf<T> wx(m.wx.size()), dyB(std::max<size_t>(dy.size(), 1)), dwx(m.wx.size());
  Buf<float> R(m.R.size()), b(m.b.size()), h0(m.h0.size()), traj(elems), dFB(std::max<size_t>(dF.size(), 1)),
      dR(m.R.size()), db(m.b.size()), dh0(S * c.B * N);
  wx.set(m.wx);
  R.set(m.R);
  b.set(m.b);
  h0.set(m.h0);
  traj.set(trajAll);
  if (!dy.empty()) dyB.set(dy);
  if (!dF.empty()) dFB.set(dF);
  dwx.poison();
  dR.poison();
  db.poison();
  dh0.poison();
  rkcuda::NewtonRnnArgs a;
  a.dt = Elem<T>::dtype;
  a.cell = c.cell;
  a.batch = c.B, a.T = c.T, a.heads = c.H, a.headDim = c.D;
  a.fullJacobian = c.fullJacobian;
  a.maxIters = c.maxIters;
  a.wx = wx.data, a.R = R.data, a.b = b.data, a.h0 = c.hasH0 ? h0.data : nullptr;
  rkcuda::NewtonRnnGrads g;
  g.dy = hasDy ? dyB.data : nullptr;
  g.dFinal = hasDFinal ? dFB.data : nullptr;
  g.traj = traj.data;
  g.dwx = dwx.data, g.dR = dR.data, g.db = db.data, g.dh0 = hasDh0 ? dh0.data : nullptr;
  const rkcuda::Status st = rkcuda::newtonRnnBackward(a, g);
  check(st.ok(), "newtonRnnBackward failed: " + st.message);
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed (backward)");
  if (!st.ok()) return;
  const double tol = bf16 ? 1e-2 : 1e-4 * (1 + std::sqrt(static_cast<double>(c.T)) / 4);
  checkOutput("dwx", dwx, want.dwx, tol);
  checkOutput("dR", dR, want.dR, tol);
  checkOutput("db", db, want.db, tol);
  if (hasDh0)
    checkOutput("dh0", dh0, want.dh0, tol);
  else
    check(dh0.guardsIntact(), "dh0 written when not wanted");
}

void checkRefusals() {
  context = "refusals";
  Buf<float> dummy(64);
  auto base = [&] {
    rkcuda::NewtonRnnArgs a;
    a.cell = NewtonCell::GruDiag;
    a.batch = 1, a.T = 2, a.heads = 1, a.headDim = 4;
    a.maxIters = 3;
    a.wx = dummy.data, a.R = dummy.data, a.b = dummy.data;
    return a;
  };
  auto refused = [&](const char* what, const rkcuda::NewtonRnnArgs& a) {
    const size_t before = emu::launchLog.size();
    rkcuda::NewtonRnnOutputs o;
    o.traj = dummy.data, o.y = dummy.data;
    check(!rkcuda::newtonRnnForward(a, o).ok(), std::string("forward accepts ") + what);
    rkcuda::NewtonRnnGrads g;
    g.traj = dummy.data, g.dwx = dummy.data, g.dR = dummy.data, g.db = dummy.data;
    if (std::string(what).find("full Jacobian") == std::string::npos &&
        std::string(what).find("step ") == std::string::npos)
      check(!rkcuda::newtonRnnBackward(a, g).ok(), std::string("backward accepts ") + what);
    check(emu::launchLog.size() == before, std::string("launched with ") + what);
  };
  auto a = base();
  a.headDim = 0;
  refused("headDim 0", a);
  a = base();
  a.heads = 0;
  refused("heads 0", a);
  a = base();
  a.T = -1;
  refused("T -1", a);
  a = base();
  a.maxIters = -1;
  refused("maxIters -1", a);
  a = base();
  a.tolAbs = NAN;
  refused("tolAbs NaN", a);
  a = base();
  a.tolRel = -1;
  refused("tolRel -1", a);
  a = base();
  a.damping = INFINITY;
  refused("damping inf", a);
  a = base();
  a.cell = static_cast<NewtonCell>(7);
  refused("cell 7", a);
  a = base();
  a.guess = NewtonGuess::Provided;
  a.guessTraj = nullptr;
  refused("a provided guess without guessTraj", a);
  a = base();
  a.wx = nullptr;
  refused("null wx", a);
  a = base();
  a.cell = NewtonCell::Lstm;
  a.headDim = 1025;
  refused("dense headDim 1025", a);
  a = base();
  a.cell = NewtonCell::Gru;
  a.fullJacobian = true;
  a.damping = 0.5;
  refused("damping with the full Jacobian", a);
  a = base();
  a.cell = NewtonCell::Lstm;
  a.fullJacobian = true;
  a.headDim = 65;
  refused("a full Jacobian of 130 states", a);
  a = base();
  a.cell = NewtonCell::Elman;
  a.fullJacobian = true;
  a.headDim = 129;
  refused("a full Jacobian of 129 states", a);
  a = base();
  a.cell = NewtonCell::Gru;
  a.fullJacobian = true;
  emu::setTunable("newtonRnn.fullChunk", -2);
  refused("full Jacobian: chunk length -2", a);
  emu::setTunable("newtonRnn.fullChunk", 0);
  emu::setTunable("newtonRnn.fullTensorCores", 3);
  refused("full Jacobian: product kind 3", a);
  emu::setTunable("newtonRnn.fullTensorCores", 0);
  {
    auto big = base();
    big.cell = NewtonCell::Gru, big.fullJacobian = true, big.batch = int64_t{1} << 16, big.heads = 1 << 10,
    big.headDim = 1;
    big.T = 64;
    emu::setTunable("newtonRnn.fullChunk", 1);
    refused("full Jacobian: more (row, head, chunk) blocks than a grid holds", big);
    emu::setTunable("newtonRnn.fullChunk", 0);
  }
  emu::setTunable("newtonRnn.fullThreads", 48);
  refused("full Jacobian: 48 threads", a);
  emu::setTunable("newtonRnn.fullThreads", 0);
  a = base();
  a.cell = NewtonCell::Lstm;
  a.fullJacobian = false;
  emu::setTunable("newtonRnnStep.channelsPerBlock", 12);
  refused("step channels per block 12", a);
  emu::setTunable("newtonRnnStep.channelsPerBlock", 0);
  a = base();
  a.batch = int64_t{1} << 30;
  a.T = int64_t{1} << 20;
  refused("a grid too large", a);
  emu::setTunable("newtonRnn.channelsPerBlock", 5);
  a = base();
  {
    rkcuda::NewtonRnnOutputs o;
    o.traj = dummy.data, o.y = dummy.data;
    check(!rkcuda::newtonRnnForward(a, o).ok(), "forward accepts 5 channels per block");
  }
  emu::setTunable("newtonRnn.channelsPerBlock", 0);
  emu::launchLog.clear();
  check(emu::liveAllocations.empty(), "refusals leak");
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20261207);
  checkReferenceGradients(rng);
  checkRefusals();
  using C = Case;
  const NewtonCell diagCells[] = {NewtonCell::GruDiag, NewtonCell::LstmCifgDiag};
  const NewtonCell denseCells[] = {NewtonCell::Gru, NewtonCell::Lstm, NewtonCell::Elman};
  // Diagonal cells: the fused solve in every configuration, the guesses, the sizes.
  for (NewtonCell cell : diagCells) {
    for (int chan : {4, 8, 16, 32}) {
      for (int threads : {32, 128, 512}) {
        if (threads % chan != 0) continue;
        C c;
        c.cell = cell, c.B = 3, c.T = 300, c.H = 1, c.D = 33, c.chan = chan, c.threads = threads;
        runForward<float>(c, rng);
      }
    }
    for (NewtonGuess gs : {NewtonGuess::Zeros, NewtonGuess::OneStep, NewtonGuess::Provided}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 7, c.H = 2, c.D = 65, c.guess = gs;
      runForward<float>(c, rng);
      c.B = 1, c.T = 1, c.H = 1, c.D = 1, c.hasH0 = false;
      runForward<float>(c, rng);
    }
    {
      C c;
      c.cell = cell, c.B = 1, c.T = 300, c.H = 2, c.D = 65, c.hasFinal = false;
      runForward<__nv_bfloat16>(c, rng);
      c.B = 3, c.T = 7, c.D = 33, c.guess = NewtonGuess::OneStep, c.hasFinal = true;
      runForward<__nv_bfloat16>(c, rng);
    }
    // Not converging within the allowed steps: fallback on and off; maxIters 0; mode sequential.
    for (bool fb : {true, false}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 300, c.D = 33, c.rScale = 6, c.maxIters = 2, c.fallback = fb,
      c.expectFallback = true;
      runForward<float>(c, rng);
    }
    {
      C c;
      c.cell = cell, c.B = 3, c.T = 7, c.D = 33, c.maxIters = 0, c.expectFallback = true;
      runForward<float>(c, rng);
      c.sequential = true, c.maxIters = 5;
      c.expectFallback = false;
      runForward<float>(c, rng);
      c.T = 300, c.B = 1;
      runForward<__nv_bfloat16>(c, rng);
    }
    // Damping (the generic path).
    for (double lambda : {0.3, 2.0}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 7, c.D = 33, c.lambda = lambda, c.maxIters = 60;
      runForward<float>(c, rng);
    }
    {
      C c;
      c.cell = cell, c.B = 1, c.T = 300, c.D = 5, c.lambda = 0.5, c.maxIters = 80;
      runForward<float>(c, rng);
    }
  }
  // Dense cells: quasi-DEER, damping, sequential, R placements.
  for (NewtonCell cell : denseCells) {
    for (int sharedR : {1, 2}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 7, c.H = 2, c.D = 33, c.rScale = 0.5, c.sharedR = sharedR;
      runForward<float>(c, rng);
      c.sequential = true;
      runForward<float>(c, rng);
      c.sequential = false, c.B = 1, c.T = 40, c.H = 3, c.D = 5, c.guess = NewtonGuess::OneStep;
      runForward<__nv_bfloat16>(c, rng);
    }
    {
      C c;
      c.cell = cell, c.B = 3, c.T = 1, c.H = 1, c.D = 1, c.guess = NewtonGuess::Provided, c.hasH0 = false;
      runForward<float>(c, rng);
      c.B = 1, c.T = 300, c.H = 1, c.D = 7, c.guess = NewtonGuess::Zeros, c.hasH0 = true, c.maxIters = 3, c.rScale = 2,
      c.expectFallback = true;
      runForward<float>(c, rng);
      c.B = 3, c.T = 7, c.H = 1, c.D = 33, c.lambda = 0.5, c.maxIters = 80, c.rScale = 0.5, c.expectFallback = false;
      runForward<float>(c, rng);
    }
  }
  // Per-channel step (quasi-DEER) in every block shape.
  for (NewtonCell cell : denseCells) {
    for (int chan : {4, 32}) {
      for (int threads : {32, 512}) {
        C c;
        c.cell = cell, c.B = 2, c.T = 130, c.H = 1, c.D = 33, c.rScale = 0.5, c.stepChan = chan,
        c.stepThreads = threads;
        runForward<float>(c, rng);
      }
    }
  }
  // Full Jacobian (DEER) for the dense cells: both product kinds, chunk lengths (one step, a few
  // steps, one chunk for everything, the launcher's), block sizes, R placements, guesses, sizes.
  for (NewtonCell cell : denseCells) {
    for (int tc : {1, 2}) {
      for (int chunk : {1, 3, 0}) {
        C c;
        c.cell = cell, c.fullJacobian = true, c.fullTC = tc, c.fullChunk = chunk;
        c.B = 3, c.T = 7, c.H = tc == 2 ? 2 : 3, c.D = 5, c.rScale = 0.8, c.maxIters = 20;
        runForward<float>(c, rng);
      }
      // Matrices of 48 and 80 rows (two and five 16-row tiles), small blocks.
      C c;
      c.cell = cell, c.fullJacobian = true, c.fullTC = tc, c.maxIters = 20;
      c.B = 1, c.T = tc == 2 ? 12 : 20, c.H = 1, c.D = tc == 2 && cell == NewtonCell::Lstm ? 20 : 33;
      c.fullChunk = tc == 2 ? 4 : 6, c.fullThreads = tc == 2 ? 64 : 32, c.guess = NewtonGuess::OneStep;
      runForward<float>(c, rng);
      c.B = 3, c.T = 1, c.H = 1, c.D = 1, c.fullChunk = 0, c.fullThreads = 0, c.guess = NewtonGuess::Provided,
      c.hasH0 = false;
      runForward<float>(c, rng);
      if (tc == 1) {
        c.B = 1, c.T = 30, c.H = 2, c.D = 16, c.guess = NewtonGuess::OneStep, c.hasH0 = true, c.fullChunk = 13;
        runForward<__nv_bfloat16>(c, rng);
      }
    }
    for (int sharedR : {1, 2}) {
      C c;
      c.cell = cell, c.fullJacobian = true, c.fullTC = 1, c.sharedR = sharedR, c.maxIters = 20;
      c.B = sharedR == 1 ? 1 : 3, c.T = 130, c.H = sharedR == 1 ? 3 : 1, c.D = 33, c.rScale = 0.8;
      runForward<float>(c, rng);
      c.fullChunk = 130, c.B = 1, c.H = 1, c.D = 16;
      runForward<float>(c, rng);
    }
    {
      // Not converging in one step: the fallback, and without it converged 0.
      for (bool fb : {true, false}) {
        C c;
        c.cell = cell, c.fullJacobian = true, c.fullTC = 1, c.B = 3, c.T = 60, c.H = 1, c.D = 9, c.rScale = 1.5,
        c.maxIters = 1;
        c.fallback = fb, c.expectFallback = true;
        runForward<float>(c, rng);
      }
    }
  }
  // Steps themselves: the iterate after maxIters steps (tolerance 0: never converged, no fallback)
  // equals the float64 Newton iterate, plain and damped, for every cell.
  for (NewtonCell cell :
       {NewtonCell::GruDiag, NewtonCell::LstmCifgDiag, NewtonCell::Gru, NewtonCell::Lstm, NewtonCell::Elman}) {
    for (double lambda : {0.0, 0.5}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 300, c.H = 1, c.D = isDiag(cell) ? 33 : 9, c.rScale = 0.8, c.maxIters = 2;
      c.tolAbs = 0, c.tolRel = 0, c.lambda = lambda, c.fallback = false, c.compareIterate = true;
      c.guess = NewtonGuess::OneStep;
      runForward<float>(c, rng);
    }
    if (!isDiag(cell)) {
      for (int tc : {1, 2}) {
        for (int k : {1, 2}) {
          if (tc == 2 && k == 2) continue;
          C c;
          c.cell = cell, c.fullJacobian = true, c.fullTC = tc, c.rScale = 0.8, c.maxIters = k;
          c.B = 3, c.T = tc == 2 ? 48 : 130, c.H = tc == 2 ? 2 : 3, c.D = tc == 2 ? 5 : 9,
          c.fullChunk = tc == 2 ? 8 : 0;
          c.tolAbs = 0, c.tolRel = 0, c.fallback = false, c.compareIterate = true, c.guess = NewtonGuess::OneStep;
          // The first step from the one-step guess is a large update carried across many chunks: its
          // iterate shows the chunk products' precision (about 1e-7 relative on both kinds; with plain
          // tf32 operands it is 1e-5 to 2e-5 for gru and lstm).
          if (k == 1) c.fullChunk = 4, c.rScale = 1.2, c.iterateTol = 1e-6;
          runForward<float>(c, rng);
        }
      }
    }
  }
  // Backward: every cell, fused configurations for the diagonal ones, R placements for the dense.
  for (NewtonCell cell : diagCells) {
    for (int chan : {4, 32}) {
      for (int threads : {32, 512}) {
        C c;
        c.cell = cell, c.B = 3, c.T = 300, c.D = 33, c.chan = chan, c.threads = threads;
        runBackward<float>(c, true, true, true, rng);
      }
    }
    C c;
    c.cell = cell, c.B = 1, c.T = 1, c.D = 1;
    runBackward<float>(c, true, false, true, rng);
    c.B = 3, c.T = 7, c.H = 2, c.D = 65, c.hasH0 = false;
    runBackward<float>(c, false, true, false, rng);
    runBackward<__nv_bfloat16>(c, true, true, true, rng);
    c.T = 0;
    runBackward<float>(c, true, true, true, rng);
  }
  for (NewtonCell cell : denseCells) {
    for (int sharedR : {1, 2}) {
      C c;
      c.cell = cell, c.B = 3, c.T = 7, c.H = 2, c.D = 33, c.sharedR = sharedR;
      runBackward<float>(c, true, true, true, rng);
    }
    C c;
    c.cell = cell, c.B = 1, c.T = 40, c.H = 3, c.D = 5, c.hasH0 = false;
    runBackward<__nv_bfloat16>(c, true, false, false, rng);
    c.T = 1, c.D = 1, c.H = 1;
    runBackward<float>(c, false, true, true, rng);
  }
  setTunables(Case{});
  // Every kernel of the tested combinations ran.
  const void* expected[] = {
      emu::kernelId(rkcuda::diagNewtonKernel<NewtonCell::GruDiag, float>),
      emu::kernelId(rkcuda::diagNewtonKernel<NewtonCell::LstmCifgDiag, __nv_bfloat16>),
      emu::kernelId(rkcuda::diagSequentialKernel<NewtonCell::GruDiag, float>),
      emu::kernelId(rkcuda::diagSequentialKernel<NewtonCell::LstmCifgDiag, __nv_bfloat16>),
      emu::kernelId(rkcuda::denseSequentialKernel<NewtonCell::Lstm, float>),
      emu::kernelId(rkcuda::evalDiagKernel<NewtonCell::GruDiag, float>),
      emu::kernelId(rkcuda::evalDenseKernel<NewtonCell::Gru, __nv_bfloat16>),
      emu::kernelId(rkcuda::evalDenseKernel<NewtonCell::Elman, float>),
      emu::kernelId(rkcuda::finalizeKernel),
      emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Gru>),
      emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Lstm>),
      emu::kernelId(rkcuda::scanStepKernel<NewtonCell::Elman>),
      emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Gru>),
      emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Lstm>),
      emu::kernelId(rkcuda::fullChunkKernel<NewtonCell::Elman>),
      emu::kernelId(rkcuda::fullCarryKernel),
      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Gru>),
      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Lstm>),
      emu::kernelId(rkcuda::fullApplyKernel<NewtonCell::Elman>),
      emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::LstmCifgDiag>),
      emu::kernelId(rkcuda::dampedStepKernel<NewtonCell::Gru>),
      emu::kernelId(rkcuda::guessKernel),
      emu::kernelId(rkcuda::outputsKernel<__nv_bfloat16>),
      emu::kernelId(rkcuda::diagBackwardKernel<NewtonCell::LstmCifgDiag, float>),
      emu::kernelId(rkcuda::denseBackwardKernel<NewtonCell::Lstm, __nv_bfloat16>),
      emu::kernelId(rkcuda::denseGradRKernel),
      emu::kernelId(rkcuda::gradBKernel),
  };
  context = "coverage";
  for (const void* k : expected) check(launched.count(k) == 1, "a kernel never ran");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "newton rnn on the CUDA emulator: %ld iteration counts and %ld iterates compared; %ld checks, %ld failures (%.1f "
      "s)\n",
      itersCompared, iteratesCompared, checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
