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
#include "tensor/parallel.h"

namespace rk::newton {
namespace {

using rkcuda::NewtonCell;
using rkcuda::NewtonGuess;
using rkcuda::NewtonRnnArgs;
using rkcuda::NewtonRnnGrads;
using rkcuda::NewtonRnnOutputs;

// exp(x) without a library call, so that the per-channel loops vectorise: 2^round(y) built in the
// exponent bits times a degree-7 Taylor polynomial of 2^f, |f| <= 1/2, y = x log2(e) (relative error
// near 1e-7); 0 below 2^-126, inf from 2^128.
__attribute__((always_inline)) inline float expf_(float x) {
  float y = x * 1.44269504088896340736f;
  y = y < -127.0f ? -127.0f : (y > 128.0f ? 128.0f : y);
  const float r = (y + 12582912.0f) - 12582912.0f;
  const float f = (y - r) * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (int32_t(r) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y <= -126.0f ? 0.0f : p * scale;
}
__attribute__((always_inline)) inline float sigmoidf(float x) { return 1.0f / (1.0f + expf_(-x)); }
// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|).
__attribute__((always_inline)) inline float tanhf_(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float e = expf_(-2.0f * ax);
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// dR += hp * dr, dhp += rd * dr (per channel).
inline void accumulateDiag(int64_t C, const float* __restrict hp, const float* __restrict rd,
                           const float* __restrict dr, float* __restrict dR, float* __restrict dhp) {
  for (int64_t c = 0; c < C; ++c) {
    dR[c] += hp[c] * dr[c];
    dhp[c] += rd[c] * dr[c];
  }
}
// y += a x.
inline void axpy(int64_t n, float a, const float* __restrict x, float* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}
// sum_j a[j] b[j] in 8 independent partial sums (so that it vectorises without reassociation).
inline float dotf(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  float tail = 0.0f;
  for (; j < n; ++j) tail += a[j] * b[j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

struct Layout {
  NewtonCell cell;
  int64_t batch, T, H, D, N, G, S;
  bool diag;      // a diagonal cell (R is [G, N])
  bool full;      // the dense per-head Jacobian
  bool gru;       // gru or gru-diag (b_n inside the r-gated term)
  int oGate;      // the output gate of the lstm-like cells (-1 otherwise)
  int64_t perRow; // units per row
  int64_t K;      // coefficients per channel: G + 2
};

Layout layoutOf(const NewtonRnnArgs& a) {
  Layout L{};
  L.cell = a.cell;
  L.batch = a.batch;
  L.T = a.T;
  L.H = a.heads;
  L.D = a.headDim;
  L.N = a.heads * a.headDim;
  switch (a.cell) {
    case NewtonCell::GruDiag: L.G = 3; L.S = 1; break;
    case NewtonCell::LstmCifgDiag: L.G = 3; L.S = 2; break;
    case NewtonCell::Gru: L.G = 3; L.S = 1; break;
    case NewtonCell::Lstm: L.G = 4; L.S = 2; break;
    case NewtonCell::Elman: L.G = 1; L.S = 1; break;
  }
  L.diag = a.cell == NewtonCell::GruDiag || a.cell == NewtonCell::LstmCifgDiag;
  L.full = !L.diag && a.fullJacobian;
  L.gru = a.cell == NewtonCell::GruDiag || a.cell == NewtonCell::Gru;
  L.oGate = a.cell == NewtonCell::Lstm ? 3 : a.cell == NewtonCell::LstmCifgDiag ? 2 : -1;
  L.perRow = L.diag ? (L.N + kNewtonChannelChunk - 1) / kNewtonChannelChunk : L.H;
  L.K = L.G + 2;
  return L;
}

struct Unit {
  int64_t b, c0, C, head;
};
Unit unitOf(const Layout& L, int64_t item) {
  const int64_t b = item / L.perRow, u = item % L.perRow;
  if (L.diag) {
    const int64_t c0 = u * kNewtonChannelChunk;
    return {b, c0, std::min(kNewtonChannelChunk, L.N - c0), -1};
  }
  return {b, u * L.D, L.D, u};
}

// Scratch of one item, sized once per thread for the largest unit.
struct Work {
  std::vector<float> X, Rd, bn, h0, rec, u, K, r, zeros, lamH, lamC, dhp, drec;
  std::vector<double> Jb, Pinv, y;
  void size(const Layout& L, bool newton, bool damped) {
    const size_t C = size_t(L.diag ? std::min(kNewtonChannelChunk, L.N) : L.D), T = size_t(L.T);
    const size_t G = size_t(L.G), S = size_t(L.S);
    X.resize(T * G * C);
    Rd.resize(G * C);
    bn.resize(C);
    h0.resize(S * C);
    rec.resize(G * C);
    u.resize(G * C);
    zeros.assign(C, 0.0f);
    lamH.resize(C);
    lamC.resize(C);
    dhp.resize(C);
    drec.resize(G * C);
    if (newton) {
      K.resize(T * size_t(L.K) * C);
      r.resize(T * S * C);
    }
    if (damped) {
      Jb.resize(T * S * S);
      Pinv.resize(T * S * S);
      y.resize(T * S);
    }
  }
};

template <typename W> struct Kernel {
  const NewtonRnnArgs& a;
  const Layout& L;
  const W* wx;
  float* trajOut = nullptr;  // the forward's trajectory

  Kernel(const NewtonRnnArgs& args, const Layout& lay) : a(args), L(lay), wx(static_cast<const W*>(args.wx)) {}

  // Pointer to state s of time t (t >= 0) of unit un in a [batch, T, S, N] array.
  float* at(float* traj, const Unit& un, int64_t t, int64_t s) const {
    return traj + ((un.b * L.T + t) * L.S + s) * L.N + un.c0;
  }
  const float* at(const float* traj, const Unit& un, int64_t t, int64_t s) const {
    return traj + ((un.b * L.T + t) * L.S + s) * L.N + un.c0;
  }
  const float* denseR(int64_t g, int64_t head) const { return a.R + (g * L.H + head) * L.D * L.D; }

  // X[t][g][c] = wx (+ b, except the GRU's n gate); the diagonal recurrent weights; b_n; h0.
  void load(const Unit& un, Work& w) const {
    const int64_t C = un.C, G = L.G;
    for (int64_t t = 0; t < L.T; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        const W* src = wx + ((un.b * L.T + t) * G + g) * L.N + un.c0;
        const float* bias = a.b + g * L.N + un.c0;
        float* dst = w.X.data() + (t * G + g) * C;
        const bool inside = L.gru && g == 2;
        for (int64_t c = 0; c < C; ++c) dst[c] = Storage<W>::load(src[c]) + (inside ? 0.0f : bias[c]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        w.Rd[g * C + c] = L.diag ? a.R[g * L.N + un.c0 + c] : denseR(g, un.head)[c * L.D + c];
      }
    }
    for (int64_t c = 0; c < C; ++c) w.bn[c] = L.gru ? a.b[2 * L.N + un.c0 + c] : 0.0f;
    for (int64_t s = 0; s < L.S; ++s) {
      for (int64_t c = 0; c < C; ++c) w.h0[s * C + c] = a.h0 ? a.h0[(s * L.batch + un.b) * L.N + un.c0 + c] : 0.0f;
    }
  }

  // u[g][j] = (v @ R_g)[j] for the dense cells (full), diag(R_g) v otherwise.
  void recurrent(const Unit& un, const Work& w, const float* v, bool fullProduct, float* u) const {
    const int64_t C = un.C;
    if (!fullProduct) {
      for (int64_t g = 0; g < L.G; ++g) {
        const float* rd = w.Rd.data() + g * C;
        for (int64_t c = 0; c < C; ++c) u[g * C + c] = rd[c] * v[c];
      }
      return;
    }
    const int64_t D = L.D;
    for (int64_t g = 0; g < L.G; ++g) {
      const float* R = denseR(g, un.head);
      float* ug = u + g * D;
      std::fill(ug, ug + D, 0.0f);
      for (int64_t k = 0; k < D; ++k) {
        axpy(D, v[k], R + k * D, ug);
      }
    }
  }

  // The recurrent parts of the gates at step t from h_{t-1} = hp (b_n added to the GRU's n gate).
  void recOf(const Unit& un, Work& w, const float* hp) const {
    recurrent(un, w, hp, !L.diag, w.rec.data());
    if (L.gru) {
      float* rn = w.rec.data() + 2 * un.C;
      for (int64_t c = 0; c < un.C; ++c) rn[c] += w.bn[c];
    }
  }

  // One step of the cell from (hp, cp) with w.rec already computed: writes h, c (lstm-like) and, when
  // Kt is not null, the derivative coefficients [K][C].
  void cell(const Unit& un, const Work& w, int64_t t, const float* hp, const float* cp, float* h, float* cOut,
            float* Kt) const {
    if (Kt) cellT<true>(un, w, t, hp, cp, h, cOut, Kt);
    else cellT<false>(un, w, t, hp, cp, h, cOut, nullptr);
  }
  // The pointers never overlap (restrict lets the per-channel loops vectorise).
  template <bool WK>
  void cellT(const Unit& un, const Work& w, int64_t t, const float* __restrict hp, const float* __restrict cp,
             float* __restrict h, float* __restrict cOut, float* __restrict Kt) const {
    const int64_t C = un.C, G = L.G;
    const float* __restrict x = w.X.data() + t * G * C;
    const float* __restrict rc = w.rec.data();
    switch (L.cell) {
      case NewtonCell::Elman:
        for (int64_t c = 0; c < C; ++c) {
          const float v = tanhf_(x[c] + rc[c]);
          h[c] = v;
          if constexpr (WK) { Kt[c] = 1.0f - v * v; Kt[C + c] = 0.0f; Kt[2 * C + c] = 0.0f; }
        }
        break;
      case NewtonCell::Gru:
      case NewtonCell::GruDiag:
        for (int64_t c = 0; c < C; ++c) {
          const float r = sigmoidf(x[c] + rc[c]), z = sigmoidf(x[C + c] + rc[C + c]);
          const float n = tanhf_(x[2 * C + c] + r * rc[2 * C + c]);
          h[c] = (1.0f - z) * n + z * hp[c];
          if constexpr (WK) {
            const float dn = (1.0f - z) * (1.0f - n * n);
            Kt[c] = dn * rc[2 * C + c] * r * (1.0f - r);
            Kt[C + c] = (hp[c] - n) * z * (1.0f - z);
            Kt[2 * C + c] = dn * r;
            Kt[3 * C + c] = z;
            Kt[4 * C + c] = 0.0f;
          }
        }
        break;
      case NewtonCell::Lstm:
        for (int64_t c = 0; c < C; ++c) {
          const float ig = sigmoidf(x[c] + rc[c]), fg = sigmoidf(x[C + c] + rc[C + c]);
          const float zz = tanhf_(x[2 * C + c] + rc[2 * C + c]), og = sigmoidf(x[3 * C + c] + rc[3 * C + c]);
          const float cn = fg * cp[c] + ig * zz, tc = tanhf_(cn);
          h[c] = og * tc;
          cOut[c] = cn;
          if constexpr (WK) {
            Kt[c] = zz * ig * (1.0f - ig);
            Kt[C + c] = cp[c] * fg * (1.0f - fg);
            Kt[2 * C + c] = ig * (1.0f - zz * zz);
            Kt[3 * C + c] = tc * og * (1.0f - og);
            Kt[4 * C + c] = fg;
            Kt[5 * C + c] = og * (1.0f - tc * tc);
          }
        }
        break;
      case NewtonCell::LstmCifgDiag:
        for (int64_t c = 0; c < C; ++c) {
          const float fg = sigmoidf(x[c] + rc[c]), zz = tanhf_(x[C + c] + rc[C + c]);
          const float og = sigmoidf(x[2 * C + c] + rc[2 * C + c]);
          const float cn = fg * cp[c] + (1.0f - fg) * zz, tc = tanhf_(cn);
          h[c] = og * tc;
          cOut[c] = cn;
          if constexpr (WK) {
            Kt[c] = (cp[c] - zz) * fg * (1.0f - fg);
            Kt[C + c] = (1.0f - fg) * (1.0f - zz * zz);
            Kt[2 * C + c] = tc * og * (1.0f - og);
            Kt[3 * C + c] = fg;
            Kt[4 * C + c] = og * (1.0f - tc * tc);
          }
        }
        break;
    }
  }

  // outH/outC += J_t d_{t-1}, from the coefficients Kt, u = d rec of dh_{t-1} and dc_{t-1}.
  void applyJ(int64_t C, const float* Kt, const float* u, const float* dcp, float* outH, float* outC) const {
    const int64_t G = L.G;
    if (L.S == 1) {
      for (int64_t c = 0; c < C; ++c) {
        float s = 0.0f;
        for (int64_t g = 0; g < G; ++g) s += Kt[g * C + c] * u[g * C + c];
        outH[c] += s;
      }
      if (L.cell != NewtonCell::Elman) {
        // The GRU's direct term z dh_{t-1}: u of gate 0 is not dh_{t-1}, so the caller passes it as dcp.
        for (int64_t c = 0; c < C; ++c) outH[c] += Kt[G * C + c] * dcp[c];
      }
      return;
    }
    const int64_t o = L.oGate;
    for (int64_t c = 0; c < C; ++c) {
      float dc = Kt[G * C + c] * dcp[c];
      for (int64_t g = 0; g < G; ++g) if (g != o) dc += Kt[g * C + c] * u[g * C + c];
      outC[c] += dc;
      outH[c] += Kt[o * C + c] * u[o * C + c] + Kt[(G + 1) * C + c] * dc;
    }
  }

  // The per-channel S x S block of J_t for channel c (row-major, state order h, c).
  void block(int64_t C, const Work& w, const float* Kt, int64_t c, double* J) const {
    const int64_t G = L.G;
    if (L.S == 1) {
      double s = L.cell == NewtonCell::Elman ? 0.0 : double(Kt[G * C + c]);
      for (int64_t g = 0; g < G; ++g) s += double(Kt[g * C + c]) * w.Rd[g * C + c];
      J[0] = s;
      return;
    }
    const int64_t o = L.oGate;
    double ac = 0.0;
    for (int64_t g = 0; g < G; ++g) if (g != o) ac += double(Kt[g * C + c]) * w.Rd[g * C + c];
    const double f = Kt[G * C + c], ohc = Kt[(G + 1) * C + c];
    J[0] = double(Kt[o * C + c]) * w.Rd[o * C + c] + ohc * ac;
    J[1] = ohc * f;
    J[2] = ac;
    J[3] = f;
  }

  // Damped step: per channel, the normal equations of sum_t |d_t - J_t d_{t-1} - r_t|^2 + lambda |d_t|^2.
  void dampedSolve(const Unit& un, Work& w) const {
    const int64_t C = un.C, T = L.T, S = L.S, SS = S * S;
    const double lam = a.damping;
    float* r = w.r.data();
    auto rv = [&](int64_t t, int64_t s, int64_t c) -> float& { return r[(t * S + s) * C + c]; };
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < T; ++t) block(C, w, w.K.data() + t * L.K * C, c, w.Jb.data() + t * SS);
      auto J = [&](int64_t t, int64_t i, int64_t k) { return w.Jb[t * SS + i * S + k]; };
      for (int64_t t = 0; t < T; ++t) {
        double A[2][2] = {{1.0 + lam, 0.0}, {0.0, 1.0 + lam}}, b[2];
        for (int64_t i = 0; i < S; ++i) b[i] = rv(t, i, c);
        if (t + 1 < T) {
          for (int64_t i = 0; i < S; ++i) {
            for (int64_t k = 0; k < S; ++k) {
              double s = 0.0;
              for (int64_t m = 0; m < S; ++m) s += J(t + 1, m, i) * J(t + 1, m, k);
              A[i][k] += s;
            }
            double s = 0.0;
            for (int64_t m = 0; m < S; ++m) s += J(t + 1, m, i) * rv(t + 1, m, c);
            b[i] -= s;
          }
        }
        if (t > 0) {
          // P_t = A - J_t P_{t-1}^{-1} J_t^T;  y_t = b + J_t P_{t-1}^{-1} y_{t-1}.
          const double* Pp = w.Pinv.data() + (t - 1) * SS;
          double M[2][2];
          for (int64_t i = 0; i < S; ++i) {
            for (int64_t k = 0; k < S; ++k) {
              double s = 0.0;
              for (int64_t m = 0; m < S; ++m) s += J(t, i, m) * Pp[m * S + k];
              M[i][k] = s;
            }
          }
          for (int64_t i = 0; i < S; ++i) {
            for (int64_t k = 0; k < S; ++k) {
              double s = 0.0;
              for (int64_t m = 0; m < S; ++m) s += M[i][m] * J(t, k, m);
              A[i][k] -= s;
            }
            double s = 0.0;
            for (int64_t m = 0; m < S; ++m) s += M[i][m] * w.y[(t - 1) * S + m];
            b[i] += s;
          }
        }
        double* P = w.Pinv.data() + t * SS;
        if (S == 1) {
          P[0] = 1.0 / A[0][0];
        } else {
          const double det = A[0][0] * A[1][1] - A[0][1] * A[1][0];
          P[0] = A[1][1] / det;
          P[1] = -A[0][1] / det;
          P[2] = -A[1][0] / det;
          P[3] = A[0][0] / det;
        }
        for (int64_t i = 0; i < S; ++i) w.y[t * S + i] = b[i];
      }
      // d_t = P_t^{-1} (y_t + J_{t+1}^T d_{t+1}), from the last step back.
      double next[2] = {0.0, 0.0};
      for (int64_t t = T - 1; t >= 0; --t) {
        double v[2];
        for (int64_t i = 0; i < S; ++i) {
          v[i] = w.y[t * S + i];
          if (t + 1 < T) for (int64_t m = 0; m < S; ++m) v[i] += J(t + 1, m, i) * next[m];
        }
        const double* P = w.Pinv.data() + t * SS;
        for (int64_t i = 0; i < S; ++i) {
          double s = 0.0;
          for (int64_t k = 0; k < S; ++k) s += P[i * S + k] * v[k];
          next[i] = s;
        }
        for (int64_t i = 0; i < S; ++i) rv(t, i, c) = float(next[i]);
      }
    }
  }

  // Sequential evaluation of one item into traj.
  void sequential(const Unit& un, Work& w) const {
    load(un, w);
    const int64_t C = un.C;
    for (int64_t t = 0; t < L.T; ++t) {
      const float* hp = t == 0 ? w.h0.data() : at(trajOut, un, t - 1, 0);
      const float* cp = L.S == 2 ? (t == 0 ? w.h0.data() + C : at(trajOut, un, t - 1, 1)) : nullptr;
      recOf(un, w, hp);
      cell(un, w, t, hp, cp, at(trajOut, un, t, 0), L.S == 2 ? at(trajOut, un, t, 1) : nullptr, nullptr);
    }
  }

  struct ItemResult {
    int iterations = 0;
    float residual = 0.0f;
    bool converged = false;
  };

  // Newton iterations of one item. From start = 0 it sets up the initial guess; from start > 0 it
  // resumes at that iteration count from the trajectory left in traj. It stops at the first check
  // at or after minIters that passes, or after maxIters steps.
  ItemResult newton(const Unit& un, Work& w, int start, int minIters) const {
    load(un, w);
    const int64_t C = un.C, T = L.T, S = L.S;
    float* traj = trajOut;
    // The initial guess.
    if (start == 0 && a.guess == NewtonGuess::OneStep) recOf(un, w, w.h0.data());
    for (int64_t t = 0; t < T && start == 0; ++t) {
      if (a.guess == NewtonGuess::OneStep) {
        cell(un, w, t, w.h0.data(), S == 2 ? w.h0.data() + C : nullptr, at(traj, un, t, 0),
             S == 2 ? at(traj, un, t, 1) : nullptr, nullptr);
      } else {
        for (int64_t s = 0; s < S; ++s) {
          float* dst = at(traj, un, t, s);
          if (a.guess == NewtonGuess::Provided) std::copy(at(a.guessTraj, un, t, s), at(a.guessTraj, un, t, s) + C, dst);
          else std::fill(dst, dst + C, 0.0f);
        }
      }
    }
    ItemResult res;
    for (int it = start;; ++it) {
      // F_t, its coefficients and the residuals r_t = F_t - traj_t; the check.
      float resid = 0.0f;
      bool conv = true, nan = false;
      for (int64_t t = 0; t < T; ++t) {
        const float* hp = t == 0 ? w.h0.data() : at(traj, un, t - 1, 0);
        const float* cp = S == 2 ? (t == 0 ? w.h0.data() + C : at(traj, un, t - 1, 1)) : nullptr;
        float* rt = w.r.data() + t * S * C;
        recOf(un, w, hp);
        cell(un, w, t, hp, cp, rt, S == 2 ? rt + C : nullptr, w.K.data() + t * L.K * C);
        for (int64_t s = 0; s < S; ++s) {
          const float* cur = at(traj, un, t, s);
          float* rs = rt + s * C;
          for (int64_t c = 0; c < C; ++c) {
            const float e = rs[c] - cur[c];
            rs[c] = e;
            const float ae = std::fabs(e);
            if (!(ae <= a.tolAbs + a.tolRel * std::fabs(cur[c]))) conv = false;
            if (ae > resid) resid = ae;
            if (ae != ae) nan = true;
          }
        }
      }
      res.iterations = it;
      res.residual = nan ? std::numeric_limits<float>::quiet_NaN() : resid;
      res.converged = conv;
      if ((conv && it >= minIters) || it >= a.maxIters) return res;
      // The Newton step, in place of r.
      if (a.damping > 0.0f) {
        dampedSolve(un, w);
      } else {
        for (int64_t t = 1; t < T; ++t) {
          const float* dPrev = w.r.data() + (t - 1) * S * C;
          float* rt = w.r.data() + t * S * C;
          recurrent(un, w, dPrev, L.full, w.u.data());
          // S == 1: the GRU's direct term takes dh_{t-1}; S == 2: dc_{t-1}.
          applyJ(C, w.K.data() + t * L.K * C, w.u.data(), S == 2 ? dPrev + C : dPrev, rt, S == 2 ? rt + C : nullptr);
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t s = 0; s < S; ++s) {
          float* cur = at(traj, un, t, s);
          const float* d = w.r.data() + (t * S + s) * C;
          for (int64_t c = 0; c < C; ++c) cur[c] += d[c];
        }
      }
    }
  }

  void forward(const NewtonRnnOutputs& o) const {
    const int64_t items = L.batch * L.perRow;
    std::vector<int> iters(size_t(items), 0);
    std::vector<float> resid(size_t(items), 0.0f);
    std::vector<uint8_t> conv(size_t(items), 1);
    if (!a.sequential) {
      std::vector<int64_t> todo(static_cast<size_t>(items));
      for (int64_t i = 0; i < items; ++i) todo[size_t(i)] = i;
      std::vector<int> minIters(size_t(items), 0);
      // Items run on their own; then, to give exactly the row-wise lock-step result, the items of a
      // row that stopped before the row's count resume until a check at or after it passes, which
      // may raise the row's count again: repeated until every item of the row stopped at the same
      // count (the first at which all its items pass at once), or at maxIters.
      while (!todo.empty()) {
        parallelFor(int64_t(todo.size()), 1, [&](int64_t i0, int64_t i1) {
          Work w;
          w.size(L, true, a.damping > 0.0f);
          for (int64_t k = i0; k < i1; ++k) {
            const size_t i = size_t(todo[size_t(k)]);
            ItemResult r = newton(unitOf(L, int64_t(i)), w, iters[i], minIters[i]);
            iters[i] = r.iterations;
            resid[i] = r.residual;
            conv[i] = r.converged ? 1 : 0;
          }
        });
        todo.clear();
        for (int64_t b = 0; b < L.batch; ++b) {
          int rowIters = 0;
          bool all = true;
          for (int64_t u = 0; u < L.perRow; ++u) {
            const size_t i = size_t(b * L.perRow + u);
            rowIters = std::max(rowIters, iters[i]);
            all = all && conv[i];
          }
          if (!all) rowIters = a.maxIters;
          for (int64_t u = 0; u < L.perRow; ++u) {
            const size_t i = size_t(b * L.perRow + u);
            if (iters[i] < rowIters) {
              minIters[i] = rowIters;
              todo.push_back(int64_t(i));
            }
          }
        }
      }
    }
    // Per row: reduce the items; choose the rows to evaluate sequentially.
    std::vector<uint8_t> seqRow(size_t(L.batch), 0);
    for (int64_t b = 0; b < L.batch; ++b) {
      int it = 0;
      float rs = 0.0f;
      bool cv = true, nan = false;
      for (int64_t u = 0; u < L.perRow; ++u) {
        const size_t i = size_t(b * L.perRow + u);
        it = std::max(it, iters[i]);
        if (resid[i] != resid[i]) nan = true;
        else rs = std::max(rs, resid[i]);
        cv = cv && conv[i];
      }
      const bool fellBack = !a.sequential && !cv && a.fallbackSequential;
      seqRow[size_t(b)] = a.sequential || fellBack;
      if (o.iterations) o.iterations[b] = it;
      if (o.residual) o.residual[b] = nan ? std::numeric_limits<float>::quiet_NaN() : rs;
      if (o.converged) o.converged[b] = cv ? 1 : 0;
      if (o.fellBack) o.fellBack[b] = fellBack ? 1 : 0;
    }
    std::vector<int64_t> seqItems;
    for (int64_t i = 0; i < items; ++i) if (seqRow[size_t(i / L.perRow)]) seqItems.push_back(i);
    parallelFor(int64_t(seqItems.size()), 1, [&](int64_t i0, int64_t i1) {
      Work w;
      w.size(L, false, false);
      for (int64_t i = i0; i < i1; ++i) sequential(unitOf(L, seqItems[size_t(i)]), w);
    });
    // y and the final states from the trajectory.
    W* y = static_cast<W*>(o.y);
    parallelFor(L.batch * L.T, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* src = o.traj + r * L.S * L.N;
        W* dst = y + r * L.N;
        for (int64_t n = 0; n < L.N; ++n) dst[n] = Storage<W>::store(src[n]);
      }
    });
    if (o.finalStates) {
      for (int64_t s = 0; s < L.S; ++s) {
        for (int64_t b = 0; b < L.batch; ++b) {
          const float* src = o.traj + ((b * L.T + L.T - 1) * L.S + s) * L.N;
          std::copy(src, src + L.N, o.finalStates + (s * L.batch + b) * L.N);
        }
      }
    }
  }

  // The backward of one step at (hp, cp), w.rec computed: from lh, lc = dL/d(h, c after the step)
  // writes dL/dwx (dxOut [G][C]), dL/drec (drec [G][C]), the direct part of dL/dh_{t-1} (dhp) and
  // dL/dc_{t-1} (into lc).
  void cellBackward(const Work& w, int64_t C, int64_t t, const float* __restrict hp, const float* __restrict cp,
                    const float* __restrict lh, float* __restrict lc, float* __restrict drec,
                    float* __restrict dxOut, float* __restrict dhp) const {
    const int64_t G = L.G;
    const float* __restrict x = w.X.data() + t * G * C;
    const float* __restrict rc = w.rec.data();
    switch (L.cell) {
      case NewtonCell::Elman:
        for (int64_t c = 0; c < C; ++c) {
          const float h = tanhf_(x[c] + rc[c]);
          drec[c] = dxOut[c] = lh[c] * (1.0f - h * h);
          dhp[c] = 0.0f;
        }
        break;
      case NewtonCell::Gru:
      case NewtonCell::GruDiag:
        for (int64_t c = 0; c < C; ++c) {
          const float r = sigmoidf(x[c] + rc[c]), z = sigmoidf(x[C + c] + rc[C + c]);
          const float n = tanhf_(x[2 * C + c] + r * rc[2 * C + c]);
          const float da = lh[c] * (1.0f - z) * (1.0f - n * n);
          drec[c] = dxOut[c] = da * rc[2 * C + c] * r * (1.0f - r);
          drec[C + c] = dxOut[C + c] = lh[c] * (hp[c] - n) * z * (1.0f - z);
          dxOut[2 * C + c] = da;
          drec[2 * C + c] = da * r;
          dhp[c] = lh[c] * z;
        }
        break;
      case NewtonCell::Lstm:
        for (int64_t c = 0; c < C; ++c) {
          const float ig = sigmoidf(x[c] + rc[c]), fg = sigmoidf(x[C + c] + rc[C + c]);
          const float zz = tanhf_(x[2 * C + c] + rc[2 * C + c]), og = sigmoidf(x[3 * C + c] + rc[3 * C + c]);
          const float cn = fg * cp[c] + ig * zz, tc = tanhf_(cn);
          const float gc = lc[c] + lh[c] * og * (1.0f - tc * tc);
          drec[c] = dxOut[c] = gc * zz * ig * (1.0f - ig);
          drec[C + c] = dxOut[C + c] = gc * cp[c] * fg * (1.0f - fg);
          drec[2 * C + c] = dxOut[2 * C + c] = gc * ig * (1.0f - zz * zz);
          drec[3 * C + c] = dxOut[3 * C + c] = lh[c] * tc * og * (1.0f - og);
          dhp[c] = 0.0f;
          lc[c] = gc * fg;
        }
        break;
      case NewtonCell::LstmCifgDiag:
        for (int64_t c = 0; c < C; ++c) {
          const float fg = sigmoidf(x[c] + rc[c]), zz = tanhf_(x[C + c] + rc[C + c]);
          const float og = sigmoidf(x[2 * C + c] + rc[2 * C + c]);
          const float cn = fg * cp[c] + (1.0f - fg) * zz, tc = tanhf_(cn);
          const float gc = lc[c] + lh[c] * og * (1.0f - tc * tc);
          drec[c] = dxOut[c] = gc * (cp[c] - zz) * fg * (1.0f - fg);
          drec[C + c] = dxOut[C + c] = gc * (1.0f - fg) * (1.0f - zz * zz);
          drec[2 * C + c] = dxOut[2 * C + c] = lh[c] * tc * og * (1.0f - og);
          dhp[c] = 0.0f;
          lc[c] = gc * fg;
        }
        break;
    }
  }

  // Backward of one item: BPTT at the solution traj; dR and db accumulate into the thread's partials.
  void backwardItem(const Unit& un, Work& w, const NewtonRnnGrads& g, float* dR, float* db) const {
    load(un, w);
    const int64_t C = un.C, T = L.T, S = L.S, G = L.G, D = L.D;
    const W* dy = static_cast<const W*>(g.dy);
    W* dwx = static_cast<W*>(g.dwx);
    float* lh = w.lamH.data();
    float* lc = w.lamC.data();
    for (int64_t c = 0; c < C; ++c) {
      lh[c] = g.dFinal ? g.dFinal[(0 * L.batch + un.b) * L.N + un.c0 + c] : 0.0f;
      lc[c] = S == 2 && g.dFinal ? g.dFinal[(1 * L.batch + un.b) * L.N + un.c0 + c] : 0.0f;
    }
    float* drec = w.drec.data();
    float* dhp = w.dhp.data();
    for (int64_t t = T - 1; t >= 0; --t) {
      if (dy) {
        const W* src = dy + (un.b * T + t) * L.N + un.c0;
        for (int64_t c = 0; c < C; ++c) lh[c] += Storage<W>::load(src[c]);
      }
      const float* hp = t == 0 ? w.h0.data() : at(g.traj, un, t - 1, 0);
      const float* cp = S == 2 ? (t == 0 ? w.h0.data() + C : at(g.traj, un, t - 1, 1)) : nullptr;
      recOf(un, w, hp);
      float* dxOut = w.u.data();  // dL/dwx per gate
      cellBackward(w, C, t, hp, cp, lh, lc, drec, dxOut, dhp);
      for (int64_t gg = 0; gg < G; ++gg) {
        W* dst = dwx + ((un.b * T + t) * G + gg) * L.N + un.c0;
        float* dbg = db + gg * L.N + un.c0;
        const float* dr = drec + gg * C;
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = Storage<W>::store(dxOut[gg * C + c]);
          dbg[c] += dr[c];
        }
      }
      if (L.diag) {
        for (int64_t gg = 0; gg < G; ++gg) {
          float* dRg = dR + gg * L.N + un.c0;
          const float* dr = drec + gg * C;
          const float* rd = w.Rd.data() + gg * C;
          accumulateDiag(C, hp, rd, dr, dRg, dhp);
        }
      } else {
        for (int64_t gg = 0; gg < G; ++gg) {
          const float* R = denseR(gg, un.head);
          float* dRg = dR + (gg * L.H + un.head) * D * D;
          const float* dr = drec + gg * D;
          for (int64_t k = 0; k < D; ++k) {
            const float hk = hp[k];
            const float* row = R + k * D;
            float* drow = dRg + k * D;
            axpy(D, hk, dr, drow);
            dhp[k] += dotf(row, dr, D);
          }
        }
      }
      std::copy(dhp, dhp + C, lh);
    }
    if (g.dh0) {
      for (int64_t c = 0; c < C; ++c) {
        g.dh0[(0 * L.batch + un.b) * L.N + un.c0 + c] = lh[c];
        if (S == 2) g.dh0[(1 * L.batch + un.b) * L.N + un.c0 + c] = lc[c];
      }
    }
  }

  void backward(const NewtonRnnGrads& g) const {
    const int64_t rElems = L.diag ? L.G * L.N : L.G * L.H * L.D * L.D, bElems = L.G * L.N;
    std::fill(g.dR, g.dR + rElems, 0.0f);
    std::fill(g.db, g.db + bElems, 0.0f);
    std::mutex merge;
    parallelFor(L.batch * L.perRow, 1, [&](int64_t i0, int64_t i1) {
      Work w;
      w.size(L, false, false);
      std::vector<float> dR(size_t(rElems), 0.0f), db(size_t(bElems), 0.0f);
      for (int64_t i = i0; i < i1; ++i) backwardItem(unitOf(L, i), w, g, dR.data(), db.data());
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t i = 0; i < rElems; ++i) g.dR[i] += dR[size_t(i)];
      for (int64_t i = 0; i < bElems; ++i) g.db[i] += db[size_t(i)];
    });
  }
};

}  // namespace

void newtonRnnForwardCpu(const NewtonRnnArgs& a, const NewtonRnnOutputs& o) {
  const Layout L = layoutOf(a);
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using W = decltype(tag);
    Kernel<W> k(a, L);
    k.trajOut = o.traj;
    k.forward(o);
  });
}

void newtonRnnBackwardCpu(const NewtonRnnArgs& a, const NewtonRnnGrads& g) {
  const Layout L = layoutOf(a);
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using W = decltype(tag);
    Kernel<W>(a, L).backward(g);
  });
}

}  // namespace rk::newton
