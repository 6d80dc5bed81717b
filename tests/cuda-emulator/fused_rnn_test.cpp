// CPU test of the fused recurrent cell kernels (cuda/cells/fused_rnn.cu, compiled unmodified) through
// the SIMT emulator in emu.h. The real launchers run on small problems and every output is compared
// with a float64 reference written here as plain loops (the sequential recurrence of the four cells
// and its backward by hand, the backward itself checked against finite differences of the reference
// forward):
//   * fusedRnnForward / fusedRnnBackward for Elman, LSTM, GRU and sLSTM, every dtype, on the
//     persistent and the stepwise path (pinned through rkcuda::tunable "fusedRnn.path"); batch 1, 3,
//     17 (one and two batch tiles); headDim 16, 24, 48, 64 (persistent and stepwise) and 20, 264 (fp32)
//     or 136 (16-bit) only stepwise: not a multiple of 8, more channels than a stepwise block (and
//     than its staging chunk), where the launcher itself must choose the stepwise path for 20;
//   * the multi-block persistent path (fusedRnn.path 3, cooperative launches run with every block's
//     threads together): heads of 16, 32 and 48 split over 2 to 4 blocks (tunable fusedRnn.splits),
//     batch 1 and 17, T 1 and 9, several heads, lengths, returnLastOnly; the launcher's own choice of
//     it (a head too large for one block) and of the stepwise path when its blocks cannot all be
//     resident; groups of batch tiles run in several launches when one launch cannot hold them all;
//   * the emulator's cooperative mode itself: a group barrier with per-block shared memory, and a
//     barrier that a block never reaches reported as a deadlock (in a child process);
//     T 0, 1, 5, 33; batch 0; several heads; lengths per row (0 and T among them) or none; returnLastOnly;
//     states0 (with empty sLSTM states), finalStates, dh, dFinal and dStates0 each on and off;
//     inference (no saved tensors); the dR reduction with one and several splits;
//   * the saved tensors (states after every step, pre-activations) against the reference;
//   * a pinned persistent path that cannot run, and other arguments the launchers must refuse.
// Outputs are poisoned (NaN) before each call, so anything left unwritten fails; sentinels around
// every output catch out-of-bounds writes; h past a row's length must be exactly 0; every
// stream-ordered allocation must be freed; every kernel instantiation must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/fused_rnn_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "cells/fused_rnn.cu"
#include "harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using rkcuda::CellKind;
using rkcuda::DType;

// Norm-wise tolerance of each dtype's results.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 1e-2;
  else
    return 2e-2;
}

// ---- the problem and its float64 reference ----

const char* cellName(CellKind c) {
  switch (c) {
    case CellKind::Elman:
      return "elman";
    case CellKind::Lstm:
      return "lstm";
    case CellKind::Gru:
      return "gru";
    default:
      return "slstm";
  }
}

struct Problem {
  CellKind cell = CellKind::Lstm;
  int64_t batch = 1, T = 1, H = 1, D = 1;
  int G = 1, S = 1;
  bool lastOnly = false, hasLengths = false, hasStates0 = false;
  std::vector<int32_t> lengths;  // always filled (T where none are given)
  std::vector<double> wx, R, b, states0, dh, dFinal;
};

struct Ref {
  std::vector<double> h, finalStates, savedStates, savedPre, dwx, dR, db, dStates0;
};

double sigmoid(double x) { return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x)); }
double logsigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

// One step of one channel: p[g] pre-activations (GRU n gate: rec_n + b_n, with wxn = wx_n), st the states.
void stepRef(CellKind cell, const double* p, double wxn, double* st) {
  switch (cell) {
    case CellKind::Elman:
      st[0] = std::tanh(p[0]);
      return;
    case CellKind::Lstm: {
      const double c = sigmoid(p[1]) * st[1] + sigmoid(p[0]) * std::tanh(p[2]);
      st[0] = sigmoid(p[3]) * std::tanh(c);
      st[1] = c;
      return;
    }
    case CellKind::Gru: {
      const double r = sigmoid(p[0]), z = sigmoid(p[1]), n = std::tanh(wxn + r * p[2]);
      st[0] = (1 - z) * n + z * st[0];
      return;
    }
    default: {
      const double it = p[0], u = logsigmoid(p[1]) + st[3], zt = std::tanh(p[2]), og = sigmoid(p[3]);
      const double m = (st[2] == 0 || it >= u) ? it : u;
      const double ip = std::exp(it - m), fp = u > m ? 1 : std::exp(u - m);
      const double c = fp * st[1] + ip * zt, n = fp * st[2] + ip;
      st[0] = og * c / n;
      st[1] = c;
      st[2] = n;
      st[3] = m;
      return;
    }
  }
}

// Backward of stepRef: g (dL/d states after) in, the direct dL/d states before out; gx = dL/dwx_g,
// gr = dL/d(recurrent pre-activation).
void stepRefBackward(CellKind cell, const double* p, double wxn, const double* prev, double* g, double* gx,
                     double* gr) {
  switch (cell) {
    case CellKind::Elman: {
      const double h = std::tanh(p[0]);
      gx[0] = gr[0] = g[0] * (1 - h * h);
      g[0] = 0;
      return;
    }
    case CellKind::Lstm: {
      const double ig = sigmoid(p[0]), fg = sigmoid(p[1]), zt = std::tanh(p[2]), og = sigmoid(p[3]);
      const double c = fg * prev[1] + ig * zt, tc = std::tanh(c);
      const double gc = g[1] + g[0] * og * (1 - tc * tc);
      gx[0] = gr[0] = gc * zt * ig * (1 - ig);
      gx[1] = gr[1] = gc * prev[1] * fg * (1 - fg);
      gx[2] = gr[2] = gc * ig * (1 - zt * zt);
      gx[3] = gr[3] = g[0] * tc * og * (1 - og);
      g[0] = 0;
      g[1] = gc * fg;
      return;
    }
    case CellKind::Gru: {
      const double r = sigmoid(p[0]), z = sigmoid(p[1]), n = std::tanh(wxn + r * p[2]);
      const double ga = g[0] * (1 - z) * (1 - n * n);
      gx[0] = gr[0] = ga * p[2] * r * (1 - r);
      gx[1] = gr[1] = g[0] * (prev[0] - n) * z * (1 - z);
      gx[2] = ga;
      gr[2] = ga * r;
      g[0] = g[0] * z;
      return;
    }
    default: {
      // sLSTM: m = max(it, u) is continuous but its gradient is not: at a tie it >= u, gm goes to gi
      // or to gu, an O(1) change of dwx at that (row, channel, step) that dh_{t-1} carries to the
      // earlier steps. The 16-bit persistent and multi-block forwards round h_{t-1} to the input dtype
      // for the product, which moves it - u by up to about 1e-3 (bf16) from these values; where data
      // put |it - u| below that at some step, the kernels' backward (rightly following the branch of
      // their own forward) can miss this reference by tens of percent with no error in the kernels.
      // The committed seed has no such near-tie; another seed may (bf16 sLSTM, some shapes).
      const double it = p[0], u = logsigmoid(p[1]) + prev[3], zt = std::tanh(p[2]), og = sigmoid(p[3]);
      const bool iBranch = prev[2] == 0 || it >= u;
      const double m = iBranch ? it : u;
      const bool clamped = u > m;
      const double ip = std::exp(it - m), fp = clamped ? 1 : std::exp(u - m);
      const double c = fp * prev[1] + ip * zt, n = fp * prev[2] + ip;
      const double gc = g[1] + g[0] * og / n, gn = g[2] - g[0] * og * c / (n * n);
      const double gfp = gc * prev[1] + gn * prev[2], gip = gc * zt + gn;
      const double gfu = clamped ? 0 : gfp * fp, gm = g[3] - gfu - gip * ip;
      double gi = gip * ip, gu = gfu;
      if (iBranch)
        gi += gm;
      else
        gu += gm;
      gx[0] = gr[0] = gi;
      gx[1] = gr[1] = gu * sigmoid(-p[1]);
      gx[2] = gr[2] = gc * ip * (1 - zt * zt);
      gx[3] = gr[3] = g[0] * (c / n) * og * (1 - og);
      g[0] = 0;
      g[1] = gc * fp;
      g[2] = gn * fp;
      g[3] = gu;
      return;
    }
  }
}

// Forward (and, with backward, the gradients of sum(dh * h) + sum(dFinal * finalStates)).
Ref reference(const Problem& P, bool backward) {
  const int64_t B = P.batch, T = P.T, H = P.H, D = P.D;
  const int G = P.G, S = P.S;
  const bool gru = P.cell == CellKind::Gru;
  Ref r;
  r.h.assign(P.lastOnly ? B * H * D : B * T * H * D, 0.0);
  r.finalStates.assign(S * B * H * D, 0.0);
  r.savedStates.assign(T * S * B * H * D, 0.0);
  r.savedPre.assign(T * B * G * H * D, 0.0);
  r.dwx.assign(B * T * G * H * D, 0.0);
  r.dR.assign(G * H * D * D, 0.0);
  r.db.assign(G * H * D, 0.0);
  r.dStates0.assign(S * B * H * D, 0.0);
  auto wxAt = [&](int64_t b, int64_t t, int g, int64_t hh, int64_t j) {
    return P.wx[(((b * T + t) * G + g) * H + hh) * D + j];
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = P.lengths[b];
    for (int64_t hh = 0; hh < H; ++hh) {
      // traj[t][s][j]: states before step t (t <= len); pre[t][g][j].
      std::vector<double> traj((len + 1) * S * D), pre(len * G * D);
      for (int s = 0; s < S; ++s) {
        for (int64_t j = 0; j < D; ++j) traj[s * D + j] = P.hasStates0 ? P.states0[((s * B + b) * H + hh) * D + j] : 0;
      }
      for (int64_t t = 0; t < len; ++t) {
        const double* hp = &traj[t * S * D];
        for (int64_t j = 0; j < D; ++j) {
          double p[4], st[4];
          for (int g = 0; g < G; ++g) {
            double rec = 0;
            for (int64_t k = 0; k < D; ++k) rec += hp[k] * P.R[((g * H + hh) * D + k) * D + j];
            const double bias = P.b[(g * H + hh) * D + j];
            p[g] = (gru && g == 2) ? rec + bias : wxAt(b, t, g, hh, j) + bias + rec;
            pre[(t * G + g) * D + j] = p[g];
          }
          for (int s = 0; s < S; ++s) st[s] = traj[(t * S + s) * D + j];
          stepRef(P.cell, p, gru ? wxAt(b, t, 2, hh, j) : 0, st);
          for (int s = 0; s < S; ++s) traj[((t + 1) * S + s) * D + j] = st[s];
        }
      }
      for (int64_t j = 0; j < D; ++j) {
        for (int s = 0; s < S; ++s) r.finalStates[((s * B + b) * H + hh) * D + j] = traj[(len * S + s) * D + j];
        if (P.lastOnly) r.h[(b * H + hh) * D + j] = traj[len * S * D + j];
        for (int64_t t = 0; t < T; ++t) {
          const int64_t tt = std::min(t + 1, len);
          for (int s = 0; s < S; ++s)
            r.savedStates[(((t * S + s) * B + b) * H + hh) * D + j] = traj[(tt * S + s) * D + j];
          if (t < len) {
            if (!P.lastOnly) r.h[((b * T + t) * H + hh) * D + j] = traj[(t + 1) * S * D + j];
            for (int g = 0; g < G; ++g) r.savedPre[(((t * B + b) * G + g) * H + hh) * D + j] = pre[(t * G + g) * D + j];
          }
        }
      }
      if (!backward) continue;
      std::vector<double> gS(S * D), gr(G * D);
      for (int s = 0; s < S; ++s) {
        for (int64_t j = 0; j < D; ++j) gS[s * D + j] = P.dFinal[((s * B + b) * H + hh) * D + j];
      }
      if (P.lastOnly)
        for (int64_t j = 0; j < D; ++j) gS[j] += P.dh[(b * H + hh) * D + j];
      for (int64_t t = len - 1; t >= 0; --t) {
        if (!P.lastOnly)
          for (int64_t j = 0; j < D; ++j) gS[j] += P.dh[((b * T + t) * H + hh) * D + j];
        const double* prev = &traj[t * S * D];
        for (int64_t j = 0; j < D; ++j) {
          double p[4], pv[4], g[4], gx[4], grr[4];
          for (int gg = 0; gg < G; ++gg) p[gg] = pre[(t * G + gg) * D + j];
          for (int s = 0; s < S; ++s) pv[s] = prev[s * D + j], g[s] = gS[s * D + j];
          stepRefBackward(P.cell, p, gru ? wxAt(b, t, 2, hh, j) : 0, pv, g, gx, grr);
          for (int gg = 0; gg < G; ++gg) {
            r.dwx[(((b * T + t) * G + gg) * H + hh) * D + j] = gx[gg];
            r.db[(gg * H + hh) * D + j] += grr[gg];
            gr[gg * D + j] = grr[gg];
          }
          for (int s = 0; s < S; ++s) gS[s * D + j] = g[s];
        }
        for (int gg = 0; gg < G; ++gg) {
          for (int64_t k = 0; k < D; ++k) {
            const int64_t row = ((gg * H + hh) * D + k) * D;
            double acc = 0;
            for (int64_t j = 0; j < D; ++j) {
              r.dR[row + j] += prev[k] * gr[gg * D + j];
              acc += P.R[row + j] * gr[gg * D + j];
            }
            gS[k] += acc;
          }
        }
      }
      for (int s = 0; s < S; ++s) {
        for (int64_t j = 0; j < D; ++j) r.dStates0[((s * B + b) * H + hh) * D + j] = gS[s * D + j];
      }
    }
  }
  return r;
}

template <class T>
Problem makeProblem(CellKind cell, int64_t batch, int64_t T_, int64_t H, int64_t D, bool lastOnly, bool lengths,
                    bool states0, std::mt19937& rng) {
  std::uniform_real_distribution<double> U(-1, 1);
  Problem P;
  P.cell = cell;
  P.batch = batch, P.T = T_, P.H = H, P.D = D;
  P.G = rkcuda::cellGates(cell), P.S = rkcuda::cellStates(cell);
  P.lastOnly = lastOnly, P.hasLengths = lengths, P.hasStates0 = states0;
  P.lengths.assign(batch, static_cast<int32_t>(T_));
  if (lengths) {
    for (int64_t b = 0; b < batch; ++b) P.lengths[b] = static_cast<int32_t>(rng() % (T_ + 1));
    if (batch > 1) P.lengths[1] = 0;
    if (batch > 2) P.lengths[2] = static_cast<int32_t>(T_);
  }
  const int G = P.G, S = P.S;
  const double rs = 1.5 / std::sqrt(static_cast<double>(D));
  P.wx.resize(batch * T_ * G * H * D);
  for (double& e : P.wx) e = roundTo<T>(U(rng));
  P.R.resize(G * H * D * D);
  for (double& e : P.R) e = roundTo<T>(rs * U(rng));
  P.b.resize(G * H * D);
  for (double& e : P.b) e = static_cast<float>(0.5 * U(rng));
  P.states0.assign(S * batch * H * D, 0.0);
  if (states0) {
    for (int s = 0; s < S; ++s) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t e = 0; e < H * D; ++e) {
          double v = 0.5 * U(rng);
          // sLSTM: n > 0 (row 0: an empty state, n = 0, c = 0, h = 0) and any m.
          if (cell == CellKind::Slstm) {
            if (b == 0)
              v = s == 3 ? U(rng) : 0.0;
            else if (s == 2)
              v = 1 + std::fabs(U(rng));
            else if (s == 3)
              v = U(rng);
          }
          P.states0[(s * batch + b) * H * D + e] = static_cast<float>(v);
        }
      }
    }
  }
  P.dh.resize(lastOnly ? batch * H * D : batch * T_ * H * D);
  for (double& e : P.dh) e = roundTo<T>(U(rng));
  P.dFinal.resize(S * batch * H * D);
  for (double& e : P.dFinal) e = static_cast<float>(U(rng));
  return P;
}

// The reference backward against central differences of the reference forward, for every cell.
void checkReferenceGradients() {
  std::mt19937 rng(11);
  const CellKind cells[] = {CellKind::Elman, CellKind::Lstm, CellKind::Gru, CellKind::Slstm};
  for (CellKind cell : cells) {
    for (int last = 0; last < 2; ++last) {
      context = std::string("reference gradients ") + cellName(cell) + (last ? " lastOnly" : "");
      Problem P = makeProblem<float>(cell, 3, 4, 2, 3, last == 1, true, true, rng);
      if (cell == CellKind::Slstm) {  // well away from the branch switches of m
        for (int64_t i = 0; i < static_cast<int64_t>(P.states0.size()); ++i) {
          if (i / (P.batch * P.H * P.D) == 2 && P.states0[i] != 0) P.states0[i] = 1.5;
        }
      }
      const Ref r = reference(P, true);
      auto loss = [&](const Problem& X) {
        const Ref f = reference(X, false);
        double L = 0;
        for (size_t i = 0; i < f.h.size(); ++i) L += f.h[i] * X.dh[i];
        for (size_t i = 0; i < f.finalStates.size(); ++i) L += f.finalStates[i] * X.dFinal[i];
        return L;
      };
      probeGradient(P, &Problem::wx, r.dwx, "wx", loss);
      probeGradient(P, &Problem::R, r.dR, "R", loss);
      probeGradient(P, &Problem::b, r.db, "b", loss);
      // The empty sLSTM state (n = 0 exactly) is a branch point: probe the others only.
      Problem keep = P;
      for (size_t i = 0; i < P.states0.size(); ++i) {
        if (cell == CellKind::Slstm && (i / (P.H * P.D)) % P.batch == 0) continue;
        Problem A = P, B = P;
        A.states0[i] += 1e-6;
        B.states0[i] -= 1e-6;
        const double fd = (loss(A) - loss(B)) / 2e-6;
        check(std::fabs(fd - r.dStates0[i]) <= 1e-6 * (1 + std::fabs(fd)), "dStates0[" + std::to_string(i) + "]",
              r.dStates0[i], fd);
      }
    }
  }
}

// ---- cases ----

struct Case {
  CellKind cell = CellKind::Lstm;
  int64_t batch = 1, T = 1, H = 1, D = 16;
  int path = 0;            // tunable fusedRnn.path (0: the launcher's choice)
  int splits = 0;          // tunable fusedRnn.reduceSplits
  int blocks = 0;          // tunable fusedRnn.splits (blocks per head of the multi-block path)
  int expectPath = 0;      // when not 0, the path the launch log must show (2 stepwise, 3 multi-block)
  int expectLaunches = 0;  // when not 0, the cooperative launches of the forward
  bool lastOnly = false, lengths = false, states0 = true, finalStates = true, training = true;
  bool dh = true, dFinal = true, dStates0 = true;
  int misalign = 0;  // elements by which every tensor starts past a 16-byte boundary
};

// The kernels of a path (2 stepwise, 3 multi-block): forward and backward.
template <class T, int C> std::pair<const void*, const void*> pathKernels(int path) {
  using namespace rkcuda;
  if (path == 3)
    return {emu::kernelId(fusedRnnForwardMultiKernel<T, C>), emu::kernelId(fusedRnnBackwardMultiKernel<T, C>)};
  return {emu::kernelId(fusedRnnForwardStepKernel<T, C>), emu::kernelId(fusedRnnBackwardStepKernel<T, C>)};
}
template <class T> std::pair<const void*, const void*> pathKernels(CellKind cell, int path) {
  switch (cell) {
    case CellKind::Elman:
      return pathKernels<T, rkcuda::kElman>(path);
    case CellKind::Lstm:
      return pathKernels<T, rkcuda::kLstm>(path);
    case CellKind::Gru:
      return pathKernels<T, rkcuda::kGru>(path);
    default:
      return pathKernels<T, rkcuda::kSlstm>(path);
  }
}
// Launches of kernel in the log; *grid, *block: those of the first.
long launchesOf(const void* kernel, unsigned* grid = nullptr, unsigned* block = nullptr) {
  long n = 0;
  for (const auto& l : emu::launchLog) {
    if (l.kernel != kernel) continue;
    if (n++ == 0 && grid != nullptr) *grid = l.grid.x, *block = l.block.x;
  }
  return n;
}

template <class T> void runCase(const Case& c, std::mt19937& rng) {
  const Problem P = makeProblem<T>(c.cell, c.batch, c.T, c.H, c.D, c.lastOnly, c.lengths, c.states0, rng);
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%s %s batch %lld T %lld H %lld D %lld path %d splits %d last %d lengths %d states0 %d final %d "
                "training %d dh %d dFinal %d dStates0 %d misalign %d",
                Elem<T>::name, cellName(c.cell), (long long)c.batch, (long long)c.T, (long long)c.H, (long long)c.D,
                c.path, c.splits, c.lastOnly, c.lengths, c.states0, c.finalStates, c.training, c.dh, c.dFinal,
                c.dStates0, c.misalign);
  context = buf;
  emu::setTunable("fusedRnn.path", c.path);
  emu::setTunable("fusedRnn.reduceSplits", c.splits);
  emu::setTunable("fusedRnn.splits", c.blocks);
  const auto kernels = pathKernels<T>(c.cell, c.expectPath);
  const double tol = tolerance<T>();
  const bool f32 = Elem<T>::dtype == DType::F32;
  const int64_t B = P.batch, L = P.T, H = P.H, D = P.D, G = P.G, S = P.S, SE = S * B * H * D;
  const int64_t hN = c.lastOnly ? B * H * D : B * L * H * D;

  const int m = c.misalign;
  Buf<T> wx(B * L * G * H * D, m), R(G * H * D * D, m), dh(hN, m), h(hN, m), dwx(B * L * G * H * D, m),
      dR(G * H * D * D, m);
  Buf<float> bias(G * H * D, m), states0(SE, m), dFinal(SE, m), fin(SE, m), saved(L * SE, m), pre(L * B * G * H * D, m),
      db(G * H * D, m), dS0(SE, m);
  wx.set(P.wx), R.set(P.R), bias.set(P.b), states0.set(P.states0), dh.set(P.dh), dFinal.set(P.dFinal);
  rkcuda::FusedRnnArgs a;
  a.dt = Elem<T>::dtype;
  a.cell = c.cell;
  a.batch = B, a.T = L, a.heads = H, a.headDim = D;
  a.returnLastOnly = c.lastOnly;
  a.lengths = c.lengths ? P.lengths.data() : nullptr;
  a.wx = wx.data, a.R = R.data, a.b = bias.data;
  a.states0 = c.states0 ? states0.data : nullptr;
  const Ref want = reference(P, false);

  h.poison(), fin.poison(), saved.poison(), pre.poison();
  rkcuda::FusedRnnOutputs o;
  o.h = h.data;
  o.finalStates = c.finalStates ? fin.data : nullptr;
  o.savedStates = c.training ? saved.data : nullptr;
  o.savedPre = c.training ? pre.data : nullptr;
  const rkcuda::Status st = rkcuda::fusedRnnForward(a, o);
  check(st.ok(), "forward status: " + st.message);
  checkOutput("h", h, want.h, tol);
  if (!c.lastOnly) {  // exactly 0 past each row's length
    long bad = 0;
    const std::vector<double> got = h.get();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = P.lengths[b]; t < L; ++t) {
        for (int64_t e = 0; e < H * D; ++e) bad += got[(b * L + t) * H * D + e] != 0.0;
      }
    }
    check(bad == 0, "h not 0 past the lengths", static_cast<double>(bad), 0);
  }
  if (c.finalStates) checkOutput("finalStates", fin, want.finalStates, f32 ? 2e-5 : tol);
  if (c.training) {
    checkOutput("savedStates", saved, want.savedStates, f32 ? 2e-5 : tol);
    checkOutput("savedPre", pre, want.savedPre, f32 ? 2e-5 : tol);
  }
  if (c.expectPath != 0) {
    unsigned grid = 0, block = 0;
    const long n = launchesOf(kernels.first, &grid, &block);
    check(n > 0, "forward did not take path " + std::to_string(c.expectPath));
    if (c.expectPath == 3 && n > 0) {
      const int64_t splits = block > 0 ? 4 * D / block : 0;
      check(block * splits == 4 * D && splits > 0 && grid % splits == 0, "multi-block launch shape", grid, block);
      if (c.blocks != 0) check(splits == c.blocks, "blocks per head", static_cast<double>(splits), c.blocks);
      if (c.expectLaunches != 0)
        check(n == c.expectLaunches, "cooperative launches", static_cast<double>(n), c.expectLaunches);
    }
  }
  noteLaunches();

  if (c.training) {
    Problem Q = P;  // the gradients the kernels are given
    if (!c.dh) std::fill(Q.dh.begin(), Q.dh.end(), 0.0);
    if (!c.dFinal) std::fill(Q.dFinal.begin(), Q.dFinal.end(), 0.0);
    if (!c.lastOnly) {  // h is constant past a row's length: no gradient flows from there
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = P.lengths[b]; t < L; ++t) {
          for (int64_t e = 0; e < H * D; ++e) Q.dh[(b * L + t) * H * D + e] = 0;
        }
      }
    }
    const Ref wb = reference(Q, true);
    dwx.poison(), dR.poison(), db.poison(), dS0.poison();
    rkcuda::FusedRnnGrads g;
    g.dh = c.dh ? dh.data : nullptr;
    g.dFinal = c.dFinal ? dFinal.data : nullptr;
    g.savedStates = saved.data;
    g.savedPre = pre.data;
    g.dwx = dwx.data, g.dR = dR.data, g.db = db.data;
    g.dStates0 = c.dStates0 ? dS0.data : nullptr;
    const rkcuda::Status sb = rkcuda::fusedRnnBackward(a, g);
    check(sb.ok(), "backward status: " + sb.message);
    const double gtol = f32 ? 1e-4 : 2 * tol;
    checkOutput("dwx", dwx, wb.dwx, gtol);
    checkOutput("dR", dR, wb.dR, gtol);
    checkOutput("db", db, wb.db, gtol);
    if (c.dStates0) checkOutput("dStates0", dS0, wb.dStates0, gtol);
    if (c.expectPath != 0 && B > 0)
      check(launchesOf(kernels.second) > 0, "backward did not take path " + std::to_string(c.expectPath));
    long bad = 0;  // dwx exactly 0 past each row's length
    const std::vector<double> got = dwx.get();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = P.lengths[b]; t < L; ++t) {
        for (int64_t e = 0; e < G * H * D; ++e) bad += got[(b * L + t) * G * H * D + e] != 0.0;
      }
    }
    check(bad == 0, "dwx not 0 past the lengths", static_cast<double>(bad), 0);
    noteLaunches();
  }
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
  emu::setTunable("fusedRnn.path", 0);
  emu::setTunable("fusedRnn.reduceSplits", 0);
  emu::setTunable("fusedRnn.splits", 0);
}

template <class T> void runSuite(std::mt19937& rng, int variant) {
  const bool wide = Elem<T>::dtype == DType::F32;  // the tensor-core path is slow on the emulator
  struct Shape {
    int64_t batch, len, H, D;
  };
  const Shape shapes[] = {
      {1, 5, 2, 16}, {3, 33, 1, 24}, {17, 5, 1, 48}, {3, wide ? 9 : 3, 1, 64}, {1, 1, 3, 16}, {2, 3, 1, 20},
  };
  const CellKind cells[] = {CellKind::Elman, CellKind::Lstm, CellKind::Gru, CellKind::Slstm};
  int n = variant;
  for (CellKind cell : cells) {
    for (const Shape& s : shapes) {
      for (int path = 1; path <= 2; ++path) {
        if (s.D % 8 != 0 && path == 1) continue;
        ++n;
        Case c;
        c.cell = cell;
        c.batch = s.batch, c.T = s.len, c.H = s.H, c.D = s.D;
        c.path = s.D % 8 != 0 ? 0 : path;
        c.splits = n % 3 == 0 ? 0 : n % 3 == 1 ? 1 : 3;
        c.lastOnly = n % 4 == 1;
        c.lengths = n % 3 != 2;
        c.states0 = n % 5 != 3;
        c.finalStates = n % 6 != 4;
        c.dh = n % 7 != 5;
        c.dFinal = n % 4 != 2;
        c.dStates0 = n % 5 != 1;
        c.training = n % 11 != 7;
        runCase<T>(c, rng);
      }
    }
    // A head larger than a stepwise block (and, fp32, than its staging chunk: the launcher's own
    // choice there; the 16-bit tensor-core reductions are slow here, so their head is smaller).
    Case big;
    big.cell = cell, big.batch = 2, big.T = 2, big.H = 1, big.D = wide ? 264 : 136, big.lengths = true;
    big.path = 2;
    runCase<T>(big, rng);
    // No steps at all: final states = states0, dStates0 = dFinal (+ dh on h with returnLastOnly).
    Case empty;
    empty.cell = cell, empty.batch = 2, empty.T = 0, empty.H = 2, empty.D = 16, empty.lastOnly = cell == CellKind::Gru;
    empty.path = 1 + (n++ % 2);
    runCase<T>(empty, rng);
  }
  // Tensors that start 2 elements past a 16-byte boundary: the per-step rows are accessed element
  // by element (the 4-element fragment-native accesses need aligned rows), both persistent kernels.
  for (CellKind cell : {CellKind::Lstm, CellKind::Gru}) {
    Case off;
    off.cell = cell, off.batch = 3, off.T = 4, off.H = 2, off.D = 16, off.lengths = true, off.path = 1;
    off.misalign = 2;
    runCase<T>(off, rng);
  }
  // No rows: nothing to run, but dR and db must still be written (zeros).
  Case none;
  none.cell = CellKind::Gru, none.batch = 0, none.T = 3, none.H = 2, none.D = 16, none.lengths = true;
  runCase<T>(none, rng);
}

// The multi-block path: small heads split over 2 to 4 blocks, every cell.
template <class T> void runMultiSuite(std::mt19937& rng, int variant) {
  const bool wide = Elem<T>::dtype == DType::F32;  // the tensor-core path is slow on the emulator
  struct Shape {
    int64_t batch, len, H, D;
    int blocks;
  };
  const Shape shapes[] = {
      {1, wide ? 9 : 5, 1, 32, 2},
      {17, wide ? 9 : 3, 1, 48, 3},
      {17, 1, 2, 32, 4},
      {3, wide ? 9 : 4, 2, 16, 2},
      {1, 1, 1, 48, 2},
  };
  const CellKind cells[] = {CellKind::Elman, CellKind::Lstm, CellKind::Gru, CellKind::Slstm};
  int n = variant;
  for (int ci = 0; ci < 4; ++ci) {
    for (int si = 0; si < 5; ++si) {
      if (!wide && (ci + si) % 2 != 0) continue;  // 16-bit: each shape with two of the cells
      const Shape& s = shapes[si];
      ++n;
      Case c;
      c.cell = cells[ci];
      c.batch = s.batch, c.T = s.len, c.H = s.H, c.D = s.D;
      c.path = 3, c.blocks = s.blocks, c.expectPath = 3;
      c.splits = n % 2 == 0 ? 0 : 2;
      c.lastOnly = n % 4 == 1;
      c.lengths = n % 3 != 2;
      c.states0 = n % 5 != 3;
      c.finalStates = n % 6 != 4;
      c.dh = n % 7 != 5;
      c.dFinal = n % 4 != 2;
      c.dStates0 = n % 5 != 1;
      runCase<T>(c, rng);
    }
  }
  // Groups of batch tiles and heads in several cooperative launches: 2 blocks resident in all, 2 per
  // head, 2 heads x 2 tiles.
  const int sms = emu::smCount, perSm = emu::blocksPerSm;
  emu::smCount = 2, emu::blocksPerSm = 1;
  Case chunked;
  chunked.cell = CellKind::Lstm, chunked.batch = 17, chunked.T = 3, chunked.H = 2, chunked.D = 32,
  chunked.lengths = true;
  chunked.path = 3, chunked.blocks = 2, chunked.expectPath = 3, chunked.expectLaunches = 4;
  runCase<T>(chunked, rng);
  // The launcher's own choice for a head too large for one block (fp32 LSTM: above 112; 16-bit
  // sLSTM: above 128): the multi-block path, or the stepwise one when its blocks cannot all be resident.
  emu::smCount = 132, emu::blocksPerSm = 4;
  Case off;  // tensors 2 elements past a 16-byte boundary (element-wise row accesses)
  off.cell = CellKind::Gru, off.batch = 3, off.T = 3, off.H = 1, off.D = 32, off.lengths = true;
  off.path = 3, off.blocks = 2, off.expectPath = 3, off.misalign = 2;
  runCase<T>(off, rng);
  Case own;
  own.cell = wide ? CellKind::Lstm : CellKind::Slstm, own.batch = 2, own.T = 2, own.H = 1, own.D = 136,
  own.lengths = true;
  own.expectPath = 3;
  runCase<T>(own, rng);
  emu::smCount = 1, emu::blocksPerSm = 1;
  own.expectPath = 2;
  runCase<T>(own, rng);
  emu::smCount = sms, emu::blocksPerSm = perSm;
  // The multi-block path pinned, and the device refuses the cooperative launch (MPS, or another
  // process holding SMs): forward and backward fall back to the stepwise path.
  emu::refuseCooperative = true;
  own.path = 3;
  own.expectPath = 2;
  runCase<T>(own, rng);
  emu::refuseCooperative = false;
}

// The emulator's resource model (resources.h, emu::occupancy): the multi-block kernels' occupancy
// and launch limits are those of their sm_90 register and shared-memory allocation.
void checkResourceModel() {
  using namespace rkcuda;
  const void* kernel = emu::kernelId(fusedRnnBackwardMultiKernel<__half, kLstm>);
  const emu::KernelResources* r = emu::resourcesOf(kernel);
  check(r != nullptr, "the LSTM multi-block backward kernel has sm_90 resources");
  if (r == nullptr) return;
  const int registersPerWarp = emu::registersPerWarp(*r);
  int blocks = -1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&blocks, kernel, 256, 0, 0);
  const int want = std::min(8, 65536 / registersPerWarp / 8);  // 8 warps a block
  check(blocks == want, "occupancy of 256 threads from the kernel's registers", blocks, want);
  cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&blocks, kernel, 256, 150 * 1024, 0);
  check(blocks == 1, "occupancy with 150 KiB of dynamic shared memory", blocks, 1);
  emu::blocksPerSm = 3;  // a test's own answer wins
  cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&blocks, kernel, 256, 0, 0);
  check(blocks == 3, "occupancy pinned by a test", blocks, 3);
  emu::blocksPerSm = 0;
  // More registers than an SM has for the block: refused before it runs, as on a device.
  if (registersPerWarp * 32 > 65536) {
    const Status st = launch(fusedRnnBackwardMultiKernel<__half, kLstm>, 1, 1024, 0, RnnParams{});
    check(st.code == static_cast<int>(cudaErrorLaunchOutOfResources),
          "1024 threads of a kernel with " + std::to_string(r->registers) + " registers refused", st.code,
          cudaErrorLaunchOutOfResources);
  }
}

// The emulator's cooperative mode: every block keeps its own dynamic shared memory, and the group
// barrier orders the blocks' rounds of writes and reads.
__global__ void cooperativeExchangeKernel(float* slots, float* out, unsigned* counter, int rounds) {
  float* mine = rkcuda::dynamicShared<float>();
  const unsigned nb = gridDim.x, b = blockIdx.x, tid = threadIdx.x;
  unsigned passed = 0;
  float sum = 0.0f;
  mine[tid] = static_cast<float>(b * 1000 + tid);
  for (int r = 0; r < rounds; ++r) {
    if (tid == 0) slots[(r & 1) * nb + b] = static_cast<float>(b * 10 + r);
    rkcuda::groupBarrier(counter, nb, &passed);
    for (unsigned k = 0; k < nb; ++k) sum += slots[(r & 1) * nb + k];
    rkcuda::groupBarrier(counter, nb, &passed);
  }
  out[b * blockDim.x + tid] = sum + (mine[tid] == static_cast<float>(b * 1000 + tid) ? 0.0f : 1e9f);
}
// Block 0 waits at a barrier that the others never reach.
__global__ void cooperativeDeadlockKernel(unsigned* counter) {
  unsigned passed = 0;
  if (blockIdx.x == 0) rkcuda::groupBarrier(counter, gridDim.x, &passed);
}

void checkCooperativeEmulator() {
  context = "cooperative emulator";
  const unsigned nb = 3, threads = 64;
  const int rounds = 5;
  std::vector<float> slots(2 * nb, -1.0f), out(nb * threads, -1.0f);
  unsigned counter = 0;
  const rkcuda::Status st = rkcuda::launchCooperative(cooperativeExchangeKernel, nb, threads, threads * sizeof(float),
                                                      slots.data(), out.data(), &counter, rounds);
  check(st.ok(), "cooperative launch status: " + st.message);
  double want = 0;
  for (int r = 0; r < rounds; ++r) {
    for (unsigned k = 0; k < nb; ++k) want += k * 10 + r;
  }
  long bad = 0;
  for (float v : out) bad += v != want;
  check(bad == 0, "cooperative exchange: wrong sums or shared memory", static_cast<double>(bad), 0);
  check(counter == 2 * rounds * nb, "barrier counter", counter, 2 * rounds * nb);
  const int sms = emu::smCount;
  emu::smCount = 1;
  check(!rkcuda::launchCooperative(cooperativeDeadlockKernel, 5, 32, 0, &counter).ok(),
        "cooperative launch above residency");
  emu::smCount = sms;
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    unsigned c = 0;
    (void)rkcuda::launchCooperative(cooperativeDeadlockKernel, 2, 32, 0, &c);
    _exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  check(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "a barrier that one block never reaches is not reported");
  emu::launchLog.clear();
}

void checkRefusals() {
  context = "refusals";
  float dummy[4096] = {};
  int32_t lens[2] = {1, 5};
  auto base = [&] {
    rkcuda::FusedRnnArgs a;
    a.batch = 2, a.T = 4, a.heads = 1, a.headDim = 16, a.cell = CellKind::Lstm;
    a.wx = dummy, a.R = dummy, a.b = dummy;
    return a;
  };
  auto refused = [&](const char* what, rkcuda::FusedRnnArgs a) {
    const size_t before = emu::launchLog.size();
    rkcuda::FusedRnnOutputs o;
    o.h = dummy;
    check(!rkcuda::fusedRnnForward(a, o).ok(), std::string("forward accepts ") + what);
    rkcuda::FusedRnnGrads g;
    g.savedStates = g.savedPre = dummy, g.dwx = dummy, g.dR = dummy, g.db = dummy;
    check(!rkcuda::fusedRnnBackward(a, g).ok(), std::string("backward accepts ") + what);
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
  refused("T < 0", a);
  a = base();
  a.batch = -1;
  refused("batch < 0", a);
  a = base();
  a.dt = static_cast<DType>(7);
  refused("an unknown dtype", a);
  a = base();
  a.cell = static_cast<CellKind>(9);
  refused("an unknown cell", a);
  a = base();
  a.lengths = lens;
  refused("a length above T", a);
  a = base();
  a.R = nullptr;
  refused("a null R", a);
  emu::setTunable("fusedRnn.path", 1);
  a = base();
  a.headDim = 20;
  refused("a pinned persistent path with headDim 20", a);
  a = base();
  a.headDim = 512;
  refused("a pinned persistent path with headDim 512", a);
  emu::setTunable("fusedRnn.path", 3);
  a = base();
  a.headDim = 20;
  refused("a pinned multi-block path with headDim 20", a);
  emu::setTunable("fusedRnn.splits", 3);
  a = base();
  a.headDim = 32;
  refused("3 blocks for headDim 32", a);
  emu::setTunable("fusedRnn.splits", 1);
  a = base();
  a.headDim = 128;
  refused("a block of 128 columns", a);
  emu::setTunable("fusedRnn.splits", 0);
  {
    const int sms = emu::smCount, perSm = emu::blocksPerSm;
    emu::smCount = 1, emu::blocksPerSm = 1;
    a = base();
    a.headDim = 128;
    refused("a head whose blocks cannot all be resident", a);
    emu::smCount = sms, emu::blocksPerSm = perSm;
  }
  emu::setTunable("fusedRnn.path", 4);
  a = base();
  refused("an unknown path", a);
  emu::setTunable("fusedRnn.path", 0);
  {
    rkcuda::FusedRnnOutputs o;
    o.h = dummy;
    o.savedStates = dummy;
    check(!rkcuda::fusedRnnForward(base(), o).ok(), "forward accepts savedStates without savedPre");
  }
  check(emu::liveAllocations.empty(), "refusals leak");
}

template <class T> void checkCoverage() {
  using namespace rkcuda;
  context = "coverage";
  auto need = [&](const void* k, const std::string& what) {
    check(launched.count(k) == 1, std::string("never ran: ") + Elem<T>::name + " " + what);
  };
  auto cell = [&](auto tag, const char* name) {
    constexpr int C = decltype(tag)::value;
    need(emu::kernelId(fusedRnnForwardKernel<T, C>), std::string(name) + " persistent forward");
    need(emu::kernelId(fusedRnnBackwardKernel<T, C>), std::string(name) + " persistent backward");
    need(emu::kernelId(fusedRnnForwardStepKernel<T, C>), std::string(name) + " stepwise forward");
    need(emu::kernelId(fusedRnnBackwardStepKernel<T, C>), std::string(name) + " stepwise backward");
    need(emu::kernelId(fusedRnnForwardMultiKernel<T, C>), std::string(name) + " multi-block forward");
    need(emu::kernelId(fusedRnnBackwardMultiKernel<T, C>), std::string(name) + " multi-block backward");
  };
  cell(std::integral_constant<int, kElman>{}, "elman");
  cell(std::integral_constant<int, kLstm>{}, "lstm");
  cell(std::integral_constant<int, kGru>{}, "gru");
  cell(std::integral_constant<int, kSlstm>{}, "slstm");
  need(emu::kernelId(finishForwardKernel<T>), "stepwise forward finish");
  need(emu::kernelId(initGradKernel<T>), "stepwise backward set-up");
  need(emu::kernelId(transposeRKernel<T>), "R transpose");
  need(emu::kernelId(finishGradKernel<T>), "dR / db finish");
  need(emu::kernelId(reduceGradKernel < std::is_same<T, float>::value ? false : true >), "dR / db reduction");
  need(emu::kernelId(initStatesKernel), "stepwise forward set-up");
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20261125);
  checkReferenceGradients();
  checkRefusals();
  checkCooperativeEmulator();
  checkResourceModel();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  runMultiSuite<float>(rng, 0);
  runMultiSuite<__half>(rng, 1);
  runMultiSuite<__nv_bfloat16>(rng, 2);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fused recurrent cells on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures,
              seconds);
  return failures == 0 ? 0 : 1;
}
