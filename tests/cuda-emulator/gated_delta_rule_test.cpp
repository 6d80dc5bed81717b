// CPU test of the gated delta rule kernels (cuda/delta/gated_delta_rule.cu, compiled unmodified) through
// the SIMT emulator in emu.h. The real launchers run on small problems and every output is compared
// with a float64 reference written here as plain loops (the per-token recurrence and its backward
// by hand, the backward itself checked against finite differences of the reference forward):
//   * gatedDeltaRuleForward / gatedDeltaRuleBackward for every dtype; K and V in {1, 3, 64, 130, 256}
//     (some pairs); T = 1, 5, chunk-1, chunk, chunk+1 and 2*chunk+3 (chunk = gatedDeltaRuleChunk());
//     batch 1 and 2; H != HV; l2norm on and off; scale; packed sequences (a zero-length one,
//     positions between sequences and a tail in no sequence, where the inputs are NaN); h0,
//     finalState, dO, dFinal, dh0 each on and off; T = 0; g = 0 everywhere and g = -1e4 at some positions;
//     every rows-per-lane and block-size choice (pinned through rkcuda::tunable);
//   * the chunked tensor-core forward (fp16 / bf16, cuda/delta/gated_delta_rule_chunked.cu) pinned
//     through the "gatedDeltaRule.forwardPath" tunable, against the same reference at the rounding
//     level of the storage type: T = 1, chunk-1, chunk, chunk+1, 2*chunk+2; K != V (32 x 48,
//     16 x 80, 128 x 64, 256 x 24, 20 x 256); H != HV; packed lengths 0, 1 and partial chunks;
//     l2norm; g = 0 and -1e4; every value tile; the launch log shows which kernels ran;
//   * the chunked tensor-core backward (fp16 / bf16, "gatedDeltaRule.backwardPath") in the same
//     configurations (dO, dFinal and dh0 on and off, every reverse-pass value tile), against the
//     float64 backward at the rounding level of the storage type; once the recurrent backward from
//     the chunked checkpoints; the launchers' own choices (chunked both ways for fp16 / bf16);
//   * gatedDeltaRuleStep with 1 and 3 tokens, updateState and intermediate on and off, against the
//     same reference;
//   * arguments the launchers must refuse.
// Outputs are poisoned (NaN) before each call, so anything left unwritten fails; sentinels around
// every output catch out-of-bounds writes; positions in no sequence must be exactly 0; every
// stream-ordered allocation must be freed; every kernel instantiation must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/gated_delta_rule_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "delta/gated_delta_rule.cu"
#include "delta/gated_delta_rule_chunked.cu"
#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using rkcuda::DType;
using rkcuda::ScanSegment;
const int64_t kChunk = rkcuda::gatedDeltaRuleChunk();

// Norm-wise tolerance of each dtype's results.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-4;
  else if constexpr (std::is_same_v<T, __half>)
    return 5e-3;
  else
    return 1e-2;
}

// ---- the problem and its float64 reference ----

struct Problem {
  int64_t batch = 1, T = 1, H = 1, HV = 1, K = 1, V = 1;
  double scale = 1;
  bool l2 = false, packed = false;
  bool hasH0 = false, hasFinal = false, hasDO = false, hasDFinal = false, hasDh0 = false;
  std::vector<ScanSegment> segs;
  int64_t totalChunks = 0;
  std::vector<double> q, k, v, g, beta, h0, dO, dFinal;
  int64_t nseq() const { return static_cast<int64_t>(segs.size()); }
  int64_t KV() const { return K * V; }
};

struct Ref {
  std::vector<double> o, states, finalState, dq, dk, dv, dg, dbeta, dh0;
};

std::vector<double> normalized(const std::vector<double>& x, int64_t off, int64_t K, bool l2, double* rn) {
  std::vector<double> y(x.begin() + off, x.begin() + off + K);
  double ss = 0;
  for (double e : y) ss += e * e;
  *rn = l2 ? 1 / std::sqrt(ss + 1e-6) : 1.0;
  for (double& e : y) e *= *rn;
  return y;
}

// One step of head (row-major K x V) S; returns o (scale S^T q) when q is given.
void refStep(std::vector<double>& S, const std::vector<double>& kn, const double* qn, const double* v, double g,
             double beta, double scale, int64_t K, int64_t V, double* o) {
  const double a = std::exp(g);
  for (int64_t j = 0; j < V; ++j) {
    double s = 0;
    for (int64_t i = 0; i < K; ++i) s += kn[i] * S[i * V + j];
    const double w = beta * (v[j] - a * s);
    for (int64_t i = 0; i < K; ++i) S[i * V + j] = a * S[i * V + j] + kn[i] * w;
  }
  if (o != nullptr) {
    for (int64_t j = 0; j < V; ++j) {
      double s = 0;
      for (int64_t i = 0; i < K; ++i) s += qn[i] * S[i * V + j];
      o[j] = scale * s;
    }
  }
}

Ref reference(const Problem& P, bool backward) {
  const int64_t K = P.K, V = P.V, KV = P.KV(), H = P.H, HV = P.HV, grp = HV / H, BT = P.batch * P.T;
  Ref r;
  r.o.assign(BT * HV * V, 0.0);
  r.states.assign(P.totalChunks * HV * KV, 0.0);
  r.finalState.assign(P.nseq() * HV * KV, 0.0);
  r.dq.assign(BT * H * K, 0.0);
  r.dk.assign(BT * H * K, 0.0);
  r.dv.assign(BT * HV * V, 0.0);
  r.dg.assign(BT * HV, 0.0);
  r.dbeta.assign(BT * HV, 0.0);
  r.dh0.assign(P.nseq() * HV * KV, 0.0);
  for (int64_t s = 0; s < P.nseq(); ++s) {
    const ScanSegment& seg = P.segs[s];
    const int64_t L = seg.length;
    for (int64_t hv = 0; hv < HV; ++hv) {
      const int64_t h = hv / grp;
      std::vector<std::vector<double>> Ss(L + 1, std::vector<double>(KV, 0.0));
      std::vector<std::vector<double>> qn(L), kn(L);
      std::vector<double> rq(L), rk(L);
      if (P.hasH0) std::copy(P.h0.begin() + (s * HV + hv) * KV, P.h0.begin() + (s * HV + hv + 1) * KV, Ss[0].begin());
      for (int64_t t = 0; t < L; ++t) {
        const int64_t bt = seg.batch * P.T + seg.start + t, gi = bt * HV + hv, qk = (bt * H + h) * K;
        if (t % kChunk == 0) {
          std::copy(Ss[t].begin(), Ss[t].end(), r.states.begin() + ((seg.chunkOffset + t / kChunk) * HV + hv) * KV);
        }
        qn[t] = normalized(P.q, qk, K, P.l2, &rq[t]);
        kn[t] = normalized(P.k, qk, K, P.l2, &rk[t]);
        Ss[t + 1] = Ss[t];
        refStep(Ss[t + 1], kn[t], qn[t].data(), &P.v[gi * V], P.g[gi], P.beta[gi], P.scale, K, V, &r.o[gi * V]);
      }
      std::copy(Ss[L].begin(), Ss[L].end(), r.finalState.begin() + (s * HV + hv) * KV);
      if (!backward) continue;
      std::vector<double> dS(KV, 0.0), u(V), w(V), dw(V);
      if (P.hasDFinal)
        std::copy(P.dFinal.begin() + (s * HV + hv) * KV, P.dFinal.begin() + (s * HV + hv + 1) * KV, dS.begin());
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t bt = seg.batch * P.T + seg.start + t, gi = bt * HV + hv, qk = (bt * H + h) * K, vo = gi * V;
        const std::vector<double>&prev = Ss[t], &cur = Ss[t + 1];
        const double a = std::exp(P.g[gi]), b = P.beta[gi];
        std::vector<double> dqn(K, 0.0), dkn(K, 0.0);
        if (P.hasDO) {
          for (int64_t i = 0; i < K; ++i) {
            for (int64_t j = 0; j < V; ++j) {
              dqn[i] += P.scale * cur[i * V + j] * P.dO[vo + j];
              dS[i * V + j] += P.scale * qn[t][i] * P.dO[vo + j];
            }
          }
        }
        for (int64_t j = 0; j < V; ++j) {
          double pk = 0, sk = 0;
          for (int64_t i = 0; i < K; ++i) {
            pk += prev[i * V + j] * kn[t][i];
            sk += dS[i * V + j] * kn[t][i];
          }
          u[j] = pk;
          w[j] = P.v[vo + j] - a * pk;
          dw[j] = b * sk;
        }
        double db = 0, da = 0;
        for (int64_t i = 0; i < K; ++i) {
          double sw = 0, pdu = 0;
          for (int64_t j = 0; j < V; ++j) {
            sw += dS[i * V + j] * w[j];
            da += dS[i * V + j] * prev[i * V + j];
            pdu += prev[i * V + j] * dw[j];
          }
          db += kn[t][i] * sw;
          dkn[i] += b * sw - a * pdu;
        }
        for (int64_t j = 0; j < V; ++j) {
          r.dv[vo + j] = dw[j];
          da -= dw[j] * u[j];
        }
        r.dbeta[gi] = db;
        r.dg[gi] = da * a;
        for (int64_t i = 0; i < K; ++i) {
          for (int64_t j = 0; j < V; ++j) dS[i * V + j] = a * dS[i * V + j] - a * kn[t][i] * dw[j];
        }
        // Through the L2 norm (linear in the gradient, so per value head is fine).
        for (int pass = 0; pass < 2; ++pass) {
          const std::vector<double>& y = pass == 0 ? qn[t] : kn[t];
          const std::vector<double>& dy = pass == 0 ? dqn : dkn;
          const double rn = pass == 0 ? rq[t] : rk[t];
          std::vector<double>& out = pass == 0 ? r.dq : r.dk;
          double yd = 0;
          for (int64_t i = 0; i < K; ++i) yd += y[i] * dy[i];
          for (int64_t i = 0; i < K; ++i) out[qk + i] += P.l2 ? (dy[i] - y[i] * yd) * rn : dy[i];
        }
      }
      std::copy(dS.begin(), dS.end(), r.dh0.begin() + (s * HV + hv) * KV);
    }
  }
  return r;
}

// The reference backward against central differences of the reference forward, on a small case.
void checkReferenceGradients() {
  context = "reference gradients";
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> U(-1, 1);
  Problem P;
  P.batch = 1, P.T = 4, P.H = 1, P.HV = 2, P.K = 3, P.V = 2, P.scale = 0.7, P.l2 = true;
  P.hasH0 = P.hasDO = P.hasDFinal = true;
  P.segs = {ScanSegment{0, 0, 4, 0}};
  P.totalChunks = 1;
  auto fill = [&](std::vector<double>& x, size_t n, double lo, double hi) {
    x.resize(n);
    for (double& e : x) e = lo + (hi - lo) * (U(rng) + 1) / 2;
  };
  fill(P.q, 4 * 3, -1, 1), fill(P.k, 4 * 3, -1, 1), fill(P.v, 4 * 2 * 2, -1, 1), fill(P.g, 8, -1, 0);
  fill(P.beta, 8, 0, 1), fill(P.h0, 2 * 6, -1, 1), fill(P.dO, 16, -1, 1), fill(P.dFinal, 12, -1, 1);
  const Ref r = reference(P, true);
  auto loss = [&](const Problem& X) {
    const Ref f = reference(X, false);
    double L = 0;
    for (size_t i = 0; i < f.o.size(); ++i) L += f.o[i] * X.dO[i];
    for (size_t i = 0; i < f.finalState.size(); ++i) L += f.finalState[i] * X.dFinal[i];
    return L;
  };
  probeGradient(P, &Problem::q, r.dq, "q", loss);
  probeGradient(P, &Problem::k, r.dk, "k", loss);
  probeGradient(P, &Problem::v, r.dv, "v", loss);
  probeGradient(P, &Problem::g, r.dg, "g", loss);
  probeGradient(P, &Problem::beta, r.dbeta, "beta", loss);
  probeGradient(P, &Problem::h0, r.dh0, "h0", loss);
}

// ---- cases ----

struct Case {
  int64_t batch = 1, T = 1, H = 1, HV = 1, K = 1, V = 1;
  bool l2 = false, packed = false, hasH0 = true, hasFinal = true, hasDO = true, hasDFinal = true, hasDh0 = true;
  int gMode = 0;              // 0 random, 1 all 0, 2 some -1e4
  int rows = 0, threads = 0;  // tunables (0: the launcher's choice)
  bool backward = true;
  int path = 1;          // forward: 1 the recurrence, 2 the chunked form (fp16 / bf16), 0 the launcher's choice
  int valueTile = 0;     // the chunked state pass's value columns per block (0: its choice)
  int bpath = 1;         // backward: 1 the recurrence, 2 the chunked form, 0 the launcher's choice
  int backwardTile = 0;  // the chunked reverse pass's value columns per block (0: its choice)
};

template <class T> Problem makeProblem(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> U(-1, 1);
  Problem P;
  P.batch = c.batch, P.T = c.T, P.H = c.H, P.HV = c.HV, P.K = c.K, P.V = c.V;
  P.scale = 0.5 + 0.5 * std::fabs(U(rng));
  P.l2 = c.l2, P.packed = c.packed;
  P.hasH0 = c.hasH0, P.hasFinal = c.hasFinal, P.hasDO = c.hasDO, P.hasDFinal = c.hasDFinal, P.hasDh0 = c.hasDh0;
  if (c.packed) {
    // A gap at the front, a sequence, a zero-length one, a gap, a sequence, a tail in none.
    const int64_t len = c.T, edge = len >= 4 ? 1 : 0;
    std::vector<std::pair<int64_t, int64_t>> parts;
    int64_t cur = edge;
    const int64_t first = (len - 2 * edge) / 2;
    parts.push_back({cur, first});
    cur += first;
    parts.push_back({cur, 0});
    cur = std::min(len, cur + edge);
    parts.push_back({cur, std::max<int64_t>(len - edge - cur, 0)});
    int64_t off = 0;
    for (auto& pr : parts) {
      P.segs.push_back(ScanSegment{0, pr.first, pr.second, off});
      off += (pr.second + kChunk - 1) / kChunk;
    }
    P.totalChunks = off;
  } else {
    for (int64_t b = 0; b < c.batch; ++b) P.segs.push_back(ScanSegment{b, 0, c.T, b * ((c.T + kChunk - 1) / kChunk)});
    P.totalChunks = c.batch * ((c.T + kChunk - 1) / kChunk);
  }
  const int64_t BT = P.batch * P.T;
  std::vector<char> inSeq(BT, 0);
  for (const auto& s : P.segs)
    for (int64_t t = 0; t < s.length; ++t) inSeq[s.batch * P.T + s.start + t] = 1;
  const double kScale = c.l2 ? 1.5 : 1.0 / std::sqrt(static_cast<double>(c.K));
  auto gen = [&](std::vector<double>& x, int64_t per, auto value, bool rounded) {
    x.resize(BT * per);
    for (int64_t bt = 0; bt < BT; ++bt) {
      for (int64_t e = 0; e < per; ++e) {
        const double val = inSeq[bt] ? value() : NAN;
        x[bt * per + e] = rounded ? roundTo<T>(val) : static_cast<double>(static_cast<float>(val));
      }
    }
  };
  gen(
      P.q, P.H * P.K, [&] { return U(rng); }, true);
  gen(
      P.k, P.H * P.K, [&] { return kScale * U(rng); }, true);
  gen(
      P.v, P.HV * P.V, [&] { return U(rng); }, true);
  gen(
      P.beta, P.HV, [&] { return 0.5 + 0.5 * U(rng); }, true);
  gen(
      P.g, P.HV,
      [&] {
        if (c.gMode == 1) return 0.0;
        if (c.gMode == 2 && U(rng) > 0.3) return -1e4;
        return -0.3 * std::fabs(U(rng));
      },
      false);
  gen(
      P.dO, P.HV * P.V, [&] { return U(rng); }, true);
  const int64_t SE = P.nseq() * P.HV * P.KV();
  P.h0.resize(SE), P.dFinal.resize(SE);
  for (double& e : P.h0) e = static_cast<float>(0.5 * U(rng));
  for (double& e : P.dFinal) e = static_cast<float>(U(rng));
  return P;
}

template <class T> void runCase(const Case& c, std::mt19937& rng) {
  const Problem P = makeProblem<T>(c, rng);
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "%s batch %lld T %lld H %lld HV %lld K %lld V %lld l2 %d packed %d h0 %d final %d dO %d dFinal %d dh0 "
                "%d g %d rows %d threads %d path %d tile %d bpath %d btile %d",
                Elem<T>::name, (long long)c.batch, (long long)c.T, (long long)c.H, (long long)c.HV, (long long)c.K,
                (long long)c.V, c.l2, c.packed, c.hasH0, c.hasFinal, c.hasDO, c.hasDFinal, c.hasDh0, c.gMode, c.rows,
                c.threads, c.path, c.valueTile, c.bpath, c.backwardTile);
  context = buf;
  emu::setTunable("gatedDeltaRule.rowsPerLane", c.rows);
  emu::setTunable("gatedDeltaRule.blockThreads", c.threads);
  emu::setTunable("gatedDeltaRule.forwardPath", c.path);
  emu::setTunable("gatedDeltaRuleChunked.valueTile", c.valueTile);
  emu::setTunable("gatedDeltaRule.backwardPath", c.bpath);
  emu::setTunable("gatedDeltaRuleChunked.backwardValueTile", c.backwardTile);
  const bool chunked = c.path == 2 || (c.path == 0 && !std::is_same_v<T, float>);
  const bool chunkedBackward = c.bpath == 2 || (c.bpath == 0 && !std::is_same_v<T, float>);

  // The chunked form rounds its intermediate operands (W, U, S, V') to the storage type.
  const double tol = chunked ? 1e-2 : tolerance<T>();
  const double stateTol = chunked ? 1e-2 : 1e-4;
  const int64_t BT = P.batch * P.T, SE = P.nseq() * P.HV * P.KV();

  Buf<T> q(BT * P.H * P.K), k(BT * P.H * P.K), v(BT * P.HV * P.V), beta(BT * P.HV), dO(BT * P.HV * P.V);
  Buf<float> g(BT * P.HV), h0(SE), dFinal(SE);
  q.set(P.q), k.set(P.k), v.set(P.v), beta.set(P.beta), dO.set(P.dO), g.set(P.g), h0.set(P.h0), dFinal.set(P.dFinal);
  rkcuda::GatedDeltaRuleArgs a;
  a.dt = Elem<T>::dtype;
  a.batch = P.batch, a.T = P.T, a.H = P.H, a.HV = P.HV, a.K = P.K, a.V = P.V;
  a.scale = static_cast<float>(P.scale);
  a.l2norm = P.l2;
  a.nseq = P.nseq();
  a.segments = P.segs.data();
  a.packed = P.packed;
  a.chunk = kChunk;
  a.totalChunks = P.totalChunks;
  a.q = q.data, a.k = k.data, a.v = v.data, a.g = g.data, a.beta = beta.data;
  a.h0 = P.hasH0 ? h0.data : nullptr;
  // h0 as the reference sees it.
  Problem R = P;
  if (!P.hasH0) std::fill(R.h0.begin(), R.h0.end(), 0.0);
  R.hasH0 = P.hasH0;
  const Ref want = reference(R, c.backward);

  Buf<T> o(BT * P.HV * P.V);
  Buf<float> states(P.totalChunks * P.HV * P.KV()), fin(SE);
  o.poison(), states.poison(), fin.poison();
  const rkcuda::Status st = rkcuda::gatedDeltaRuleForward(a, o.data, states.data, P.hasFinal ? fin.data : nullptr);
  check(st.ok(), "forward status: " + st.message);
  checkOutput("o", o, want.o, tol);
  checkOutput("states", states, want.states, stateTol);
  if (P.hasFinal) checkOutput("finalState", fin, want.finalState, stateTol);
  if constexpr (!std::is_same_v<T, float>) {
    if (chunked && P.totalChunks > 0) {
      // The chunked kernels ran, the recurrent forward did not.
      bool prep = false, pass = false, recurrent = false;
      for (const auto& l : emu::launchLog) {
        prep |= l.kernel == emu::kernelId(rkcuda::deltachunked::chunkPrepKernel<T>);
        pass |= l.kernel == emu::kernelId(rkcuda::deltachunked::chunkStateKernel<T, 2>) ||
                l.kernel == emu::kernelId(rkcuda::deltachunked::chunkStateKernel<T, 4>) ||
                l.kernel == emu::kernelId(rkcuda::deltachunked::chunkStateKernel<T, 8>);
        recurrent |= l.kernel == emu::kernelId(rkcuda::gatedDeltaRuleForwardKernel<T, 8>) ||
                     l.kernel == emu::kernelId(rkcuda::gatedDeltaRuleForwardKernel<T, 16>);
      }
      check(prep && pass && !recurrent, "the chunked forward's kernels ran (and only they)");
    }
  }
  // Positions in no sequence are exactly 0.
  std::vector<char> inSeq(BT, 0);
  for (const auto& s : P.segs)
    for (int64_t t = 0; t < s.length; ++t) inSeq[s.batch * P.T + s.start + t] = 1;
  auto zerosOutside = [&](const char* what, const std::vector<double>& got, int64_t per) {
    long bad = 0;
    for (int64_t bt = 0; bt < BT; ++bt) {
      if (inSeq[bt]) continue;
      for (int64_t e = 0; e < per; ++e) bad += got[bt * per + e] != 0.0;
    }
    check(bad == 0, std::string(what) + " not 0 outside the sequences", static_cast<double>(bad), 0);
  };
  zerosOutside("o", o.get(), P.HV * P.V);
  noteLaunches();

  if (c.backward) {
    Buf<T> dq(BT * P.H * P.K), dk(BT * P.H * P.K), dv(BT * P.HV * P.V), dbeta(BT * P.HV);
    Buf<float> dg(BT * P.HV), dh0(SE);
    dq.poison(), dk.poison(), dv.poison(), dbeta.poison(), dg.poison(), dh0.poison();
    rkcuda::GatedDeltaRuleGrads gr;
    gr.dO = P.hasDO ? dO.data : nullptr;
    gr.dFinal = P.hasDFinal ? dFinal.data : nullptr;
    gr.states = states.data;
    gr.dq = dq.data, gr.dk = dk.data, gr.dv = dv.data, gr.dg = dg.data, gr.dbeta = dbeta.data;
    gr.dh0 = P.hasDh0 ? dh0.data : nullptr;
    Problem B = R;
    if (!P.hasDO) std::fill(B.dO.begin(), B.dO.end(), 0.0);
    B.hasDO = true;
    if (!P.hasDFinal) std::fill(B.dFinal.begin(), B.dFinal.end(), 0.0);
    B.hasDFinal = true;
    for (int64_t bt = 0; bt < BT; ++bt) {
      if (inSeq[bt]) continue;
      for (int64_t e = 0; e < P.HV * P.V; ++e) B.dO[bt * P.HV * P.V + e] = 0;
    }
    const Ref wb = reference(B, true);
    const rkcuda::Status sb = rkcuda::gatedDeltaRuleBackward(a, gr);
    check(sb.ok(), "backward status: " + sb.message);
    // The chunked backward rounds its operands (P, W, V', dV', S, dS, the 64 x 64 factors) to the
    // storage type as the chunked forward does: fp16 errors stay near 5e-4; bf16's unit roundoff
    // (2^-8) through a chain of three or four rounded operands reaches ~1e-2 where the errors do
    // not average out (one position: the same rounded P_00 scales a whole head's dv).
    const double chunkedTol = std::is_same_v<T, __nv_bfloat16> ? 2e-2 : 5e-3;
    const double gtol = chunkedBackward ? chunkedTol : std::max(tol, 2e-4);
    checkOutput("dq", dq, wb.dq, gtol);
    checkOutput("dk", dk, wb.dk, gtol);
    checkOutput("dv", dv, wb.dv, gtol);
    checkOutput("dbeta", dbeta, wb.dbeta, gtol);
    checkOutput("dg", dg, wb.dg, gtol);
    if (P.hasDh0) checkOutput("dh0", dh0, wb.dh0, chunkedBackward ? chunkedTol : 2e-4);
    if constexpr (!std::is_same_v<T, float>) {
      // Which backward ran: the chunked kernels (reverse pass and gradients) or the recurrence.
      bool pass = false, grad = false, recurrent = false, finish = false;
      for (const auto& l : emu::launchLog) {
        finish |= l.kernel == emu::kernelId(rkcuda::l2normBackwardKernel<T>);
        pass |= l.kernel == emu::kernelId(rkcuda::deltachunked::chunkBwdStateKernel<T, 2>) ||
                l.kernel == emu::kernelId(rkcuda::deltachunked::chunkBwdStateKernel<T, 4>) ||
                l.kernel == emu::kernelId(rkcuda::deltachunked::chunkBwdStateKernel<T, 8>);
        grad |= l.kernel == emu::kernelId(rkcuda::deltachunked::chunkGradKernel<T, 8, true>) ||
                l.kernel == emu::kernelId(rkcuda::deltachunked::chunkGradKernel<T, 16, true>);
        recurrent |= l.kernel == emu::kernelId(rkcuda::gatedDeltaRuleBackwardKernel<T, 8>) ||
                     l.kernel == emu::kernelId(rkcuda::gatedDeltaRuleBackwardKernel<T, 16>);
      }
      if (P.nseq() > 0) {
        check(chunkedBackward ? pass && !recurrent : recurrent && !pass,
              "the selected backward's kernels ran (and only they)");
      }
      if (P.totalChunks > 0) check(grad == chunkedBackward, "the chunked gradient kernel ran iff selected");
      // The chunked gradient kernel finishes dq, dk itself with one value head per q / k head.
      if (BT > 0) {
        check(finish == !(chunkedBackward && P.H == P.HV), "dq, dk finished by the row kernel iff heads are shared");
      }
    }
    zerosOutside("dq", dq.get(), P.H * P.K);
    zerosOutside("dk", dk.get(), P.H * P.K);
    zerosOutside("dv", dv.get(), P.HV * P.V);
    zerosOutside("dg", dg.get(), P.HV);
    zerosOutside("dbeta", dbeta.get(), P.HV);
    noteLaunches();
  }
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
  emu::setTunable("gatedDeltaRule.rowsPerLane", 0);
  emu::setTunable("gatedDeltaRule.blockThreads", 0);
  emu::setTunable("gatedDeltaRule.forwardPath", 0);
  emu::setTunable("gatedDeltaRuleChunked.valueTile", 0);
  emu::setTunable("gatedDeltaRule.backwardPath", 0);
  emu::setTunable("gatedDeltaRuleChunked.backwardValueTile", 0);
}

template <class T> void runSuite(std::mt19937& rng, int variant) {
  // (T, K, V): long sequences with small heads; large heads on short ones.
  struct Shape {
    int64_t len, K, V;
  };
  const Shape shapes[] = {
      {1, 3, 3},  {5, 1, 1},   {kChunk - 1, 3, 1}, {kChunk, 1, 3}, {kChunk + 1, 3, 3}, {2 * kChunk + 3, 3, 1},
      {5, 64, 3}, {3, 130, 3}, {5, 3, 130},        {1, 256, 2},    {2, 5, 256},        {kChunk + 1, 17, 2},
  };
  int n = variant;
  for (const Shape& s : shapes) {
    ++n;
    Case c;
    c.T = s.len, c.K = s.K, c.V = s.V;
    c.l2 = n % 2 == 0;
    c.packed = n % 3 == 1;
    c.batch = c.packed ? 1 : 1 + n % 2;
    c.H = 1 + n % 2;
    c.HV = c.H * (1 + (n / 2) % 2);
    c.hasH0 = n % 4 != 3;
    c.hasFinal = n % 5 != 2;
    c.hasDO = n % 7 != 4;
    c.hasDFinal = n % 3 != 2;
    c.hasDh0 = n % 4 != 1;
    c.gMode = n % 3;
    c.rows = n % 2 == 0 ? 8 : 16;
    c.threads = 64 << (n % 3);
    if (s.K * s.V >= 256 * 2 && s.len > 3) c.H = c.HV = 1;
    runCase<T>(c, rng);
  }
  // Defaults of the launcher, and a packed case with every option.
  Case d;
  d.T = 9, d.K = 8, d.V = 5, d.H = 2, d.HV = 4, d.batch = 2;
  runCase<T>(d, rng);
  Case e;  // no positions at all: final state = h0, dh0 = dFinal
  e.T = 0, e.K = 3, e.V = 2, e.batch = 2, e.H = 1, e.HV = 2;
  runCase<T>(e, rng);
  Case p;
  p.T = kChunk + 6, p.K = 4, p.V = 4, p.packed = true, p.l2 = true, p.H = 1, p.HV = 2, p.gMode = 2;
  runCase<T>(p, rng);
}

// The chunked forward (fp16 / bf16) in every configuration: T at and around the chunk edges, K != V
// (neither a multiple of the 16 x 8 tiles nor of the value tile), one K = 256 and one V = 256,
// H != HV, packed sequences (lengths 0, 1 and partial last chunks), l2norm on and off, g = 0 and
// g = -1e4, every value tile; the recurrent backward then runs from its checkpoints.
template <class T> void runChunkedSuite(std::mt19937& rng, int variant) {
  struct Shape {
    int64_t len, K, V;
    bool packed;
  };
  const Shape shapes[] = {
      {1, 32, 48, false},
      {kChunk - 1, 16, 80, false},
      {kChunk, 32, 48, false},
      {kChunk + 1, 16, 80, false},
      {2 * kChunk + 2, 32, 48, false},
      {5, 16, 20, true},
      {2 * kChunk + 5, 24, 40, true},
      {kChunk + 1, 128, 64, false},
      {3, 256, 24, false},
      {2, 20, 256, false},
  };
  int n = variant;
  for (const Shape& s : shapes) {
    ++n;
    Case c;
    c.path = 2;
    c.T = s.len, c.K = s.K, c.V = s.V, c.packed = s.packed;
    c.l2 = n % 2 == 0;
    c.batch = c.packed ? 1 : 1 + n % 2;
    c.H = 1 + n % 2;
    c.HV = c.H * (1 + (n / 2) % 2);
    c.hasH0 = n % 4 != 3;
    c.hasFinal = n % 5 != 2;
    c.hasDO = n % 7 != 4;
    c.hasDFinal = n % 3 != 2;
    c.hasDh0 = n % 4 != 1;
    c.gMode = n % 3;
    c.valueTile = 16 << (n % 3);
    if (s.K > 128 && c.valueTile == 64) c.valueTile = 32;  // 64 needs more shared memory (refusals)
    // The chunked backward, every reverse-pass value tile; once the recurrent backward from the
    // chunked checkpoints (costly here).
    c.bpath = s.len == kChunk + 1 && s.K * s.V <= 64 * 64 && n % 2 == 0 ? 1 : 2;
    c.backwardTile = 16 << ((n + 1) % 3);
    if (s.K > 128 && c.backwardTile == 64) c.backwardTile = 32;  // 64 needs more shared memory (refusals)
    if (s.K * s.V > 64 * 64 || s.len >= kChunk - 1) c.batch = 1, c.H = 1, c.HV = 1 + n % 2;
    if (s.K * s.V >= 128 * 64 && s.len > kChunk) c.HV = 1;
    runCase<T>(c, rng);
  }
  Case d;  // the launchers' own choices (chunked both ways) and value tiles; no positions at all
  d.path = 0, d.bpath = 0, d.T = 0, d.K = 16, d.V = 8, d.batch = 2, d.H = 1, d.HV = 2;
  runCase<T>(d, rng);
  d.T = 9, d.l2 = true, d.gMode = 2;
  runCase<T>(d, rng);
  d.T = kChunk + 3, d.K = 20, d.V = 12, d.batch = 1, d.HV = 1, d.l2 = false, d.gMode = 1, d.hasH0 = false,
  d.hasDO = false;
  runCase<T>(d, rng);
}

// Decode steps against the reference forward on the same tokens.
template <class T>
void runStep(std::mt19937& rng, int64_t tokens, int64_t K, int64_t V, bool update, bool inter, bool l2, int rows) {
  Case c;
  c.batch = 2, c.T = tokens, c.K = K, c.V = V, c.H = 1, c.HV = 2, c.l2 = l2, c.gMode = tokens > 1 ? 2 : 0;
  const Problem P = makeProblem<T>(c, rng);
  char buf[200];
  std::snprintf(buf, sizeof buf, "step %s tokens %lld K %lld V %lld update %d intermediate %d l2 %d rows %d",
                Elem<T>::name, (long long)tokens, (long long)K, (long long)V, update, inter, l2, rows);
  context = buf;
  emu::setTunable("gatedDeltaRule.rowsPerLane", rows);
  const Ref want = reference(P, false);
  const int64_t BT = P.batch * P.T, SE = P.batch * P.HV * P.KV();
  Buf<T> q(BT * P.H * P.K), k(BT * P.H * P.K), v(BT * P.HV * P.V), beta(BT * P.HV), o(BT * P.HV * P.V);
  Buf<float> g(BT * P.HV), state(SE), inter_(BT * P.HV * P.KV());
  q.set(P.q), k.set(P.k), v.set(P.v), beta.set(P.beta), g.set(P.g), state.set(P.h0);
  o.poison(), inter_.poison();
  rkcuda::GatedDeltaRuleStepArgs a;
  a.dt = Elem<T>::dtype;
  a.batch = P.batch, a.tokens = tokens, a.H = P.H, a.HV = P.HV, a.K = K, a.V = V;
  a.scale = static_cast<float>(P.scale);
  a.l2norm = l2, a.updateState = update;
  a.state = state.data, a.q = q.data, a.k = k.data, a.v = v.data, a.g = g.data, a.beta = beta.data, a.o = o.data;
  a.intermediate = inter ? inter_.data : nullptr;
  const rkcuda::Status st = rkcuda::gatedDeltaRuleStep(a);
  check(st.ok(), "step status: " + st.message);
  checkOutput("step o", o, want.o, tolerance<T>());
  checkOutput("step state", state, update ? want.finalState : P.h0, 1e-4);
  if (inter) {
    // The reference's state after every token: rerun one token at a time.
    std::vector<double> all(BT * P.HV * P.KV());
    for (int64_t t = 1; t <= tokens; ++t) {
      Problem X = P;
      X.T = t;
      X.segs.clear();
      for (int64_t b = 0; b < P.batch; ++b) X.segs.push_back(ScanSegment{b, 0, t, b});
      X.totalChunks = P.batch;
      X.q.clear(), X.k.clear(), X.v.clear(), X.g.clear(), X.beta.clear();
      for (int64_t b = 0; b < P.batch; ++b) {
        auto part = [&](const std::vector<double>& src, std::vector<double>& dst, int64_t per) {
          dst.insert(dst.end(), src.begin() + b * tokens * per, src.begin() + (b * tokens + t) * per);
        };
        part(P.q, X.q, P.H * K), part(P.k, X.k, P.H * K), part(P.v, X.v, P.HV * V), part(P.g, X.g, P.HV),
            part(P.beta, X.beta, P.HV);
      }
      const Ref f = reference(X, false);
      for (int64_t b = 0; b < P.batch; ++b) {
        std::copy(f.finalState.begin() + b * P.HV * P.KV(), f.finalState.begin() + (b + 1) * P.HV * P.KV(),
                  all.begin() + ((b * tokens + t - 1) * P.HV) * P.KV());
      }
    }
    checkOutput("step intermediate", inter_, all, 1e-4);
  }
  noteLaunches();
  emu::setTunable("gatedDeltaRule.rowsPerLane", 0);
}

void checkRefusals() {
  context = "refusals";
  float dummy[64] = {};
  ScanSegment seg{0, 0, 4, 0};
  auto base = [&] {
    rkcuda::GatedDeltaRuleArgs a;
    a.batch = 1, a.T = 4, a.H = 1, a.HV = 1, a.K = 4, a.V = 4;
    a.nseq = 1, a.segments = &seg, a.chunk = kChunk, a.totalChunks = 1;
    a.q = a.k = a.v = a.beta = dummy;
    a.g = dummy;
    return a;
  };
  auto refused = [&](const char* what, rkcuda::GatedDeltaRuleArgs a) {
    const size_t before = emu::launchLog.size();
    check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), std::string("forward accepts ") + what);
    rkcuda::GatedDeltaRuleGrads g;
    g.states = dummy, g.dq = g.dk = g.dv = g.dbeta = dummy, g.dg = dummy;
    check(!rkcuda::gatedDeltaRuleBackward(a, g).ok(), std::string("backward accepts ") + what);
    check(emu::launchLog.size() == before, std::string("launched with ") + what);
  };
  auto a = base();
  a.K = 0;
  refused("K = 0", a);
  a = base();
  a.K = 257;
  refused("K = 257", a);
  a = base();
  a.V = 257;
  refused("V = 257", a);
  a = base();
  a.V = 0;
  refused("V = 0", a);
  a = base();
  a.HV = 3;
  a.H = 2;
  refused("HV % H != 0", a);
  a = base();
  a.chunk = 32;
  refused("a wrong chunk", a);
  a = base();
  a.totalChunks = 2;
  refused("a wrong totalChunks", a);
  a = base();
  a.T = -1;
  refused("T < 0", a);
  a = base();
  a.dt = static_cast<DType>(7);
  refused("an unknown dtype", a);
  rkcuda::GatedDeltaRuleStepArgs s;
  s.batch = 1, s.H = 1, s.HV = 1, s.K = 300, s.V = 4;
  check(!rkcuda::gatedDeltaRuleStep(s).ok(), "step accepts K = 300");
  emu::setTunable("gatedDeltaRule.rowsPerLane", 5);
  a = base();
  check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), "forward accepts rows per lane 5");
  emu::setTunable("gatedDeltaRule.rowsPerLane", 0);
  const size_t launchesBefore = emu::launchLog.size();
  emu::setTunable("gatedDeltaRule.forwardPath", 2);
  a = base();
  check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), "forward accepts the chunked path for fp32");
  a.dt = DType::BF16;
  emu::setTunable("gatedDeltaRuleChunked.valueTile", 48);
  check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), "forward accepts a value tile of 48");
  emu::setTunable("gatedDeltaRuleChunked.valueTile", 64);
  a.K = 256;  // the state pass's shared memory at K = 256 and 64 value columns: over 227 KiB
  check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), "forward accepts a value tile of 64 at K = 256");
  a.K = 4;
  emu::setTunable("gatedDeltaRuleChunked.valueTile", 0);
  emu::setTunable("gatedDeltaRule.forwardPath", 3);
  check(!rkcuda::gatedDeltaRuleForward(a, dummy, dummy, nullptr).ok(), "forward accepts forward path 3");
  emu::setTunable("gatedDeltaRule.forwardPath", 0);
  {
    rkcuda::GatedDeltaRuleGrads g;
    g.states = dummy, g.dq = g.dk = g.dv = g.dbeta = dummy, g.dg = dummy;
    a = base();
    emu::setTunable("gatedDeltaRule.backwardPath", 2);
    check(!rkcuda::gatedDeltaRuleBackward(a, g).ok(), "backward accepts the chunked path for fp32");
    a.dt = DType::F16;
    emu::setTunable("gatedDeltaRule.backwardPath", 3);
    check(!rkcuda::gatedDeltaRuleBackward(a, g).ok(), "backward accepts backward path 3");
    emu::setTunable("gatedDeltaRule.backwardPath", 2);
    emu::setTunable("gatedDeltaRuleChunked.backwardValueTile", 24);
    check(!rkcuda::gatedDeltaRuleBackward(a, g).ok(), "backward accepts a value tile of 24");
    emu::setTunable("gatedDeltaRuleChunked.backwardValueTile", 64);
    a.K = 256;  // the reverse pass's shared memory at K = 256 and 64 value columns: over 227 KiB
    check(!rkcuda::gatedDeltaRuleBackward(a, g).ok(), "backward accepts a value tile of 64 at K = 256");
    a.K = 4;
    emu::setTunable("gatedDeltaRuleChunked.backwardValueTile", 0);
    emu::setTunable("gatedDeltaRule.backwardPath", 0);
  }
  check(emu::launchLog.size() == launchesBefore, "launched while refusing");
  check(emu::liveAllocations.empty(), "refusals leak");
}

template <class T> void checkCoverage() {
  using namespace rkcuda;
  const std::pair<const void*, const char*> kernels[] = {
      {emu::kernelId(gatedDeltaRuleForwardKernel<T, 8>), "forward, 8 rows per lane"},
      {emu::kernelId(gatedDeltaRuleForwardKernel<T, 16>), "forward, 16 rows per lane"},
      {emu::kernelId(gatedDeltaRuleBackwardKernel<T, 8>), "backward, 8 rows per lane"},
      {emu::kernelId(gatedDeltaRuleBackwardKernel<T, 16>), "backward, 16 rows per lane"},
      {emu::kernelId(l2normBackwardKernel<T>), "dq / dk finish"},
      {emu::kernelId(zeroGapsKernel<T>), "zeros for positions in no sequence"},
  };
  if constexpr (!std::is_same_v<T, float>) {
    context = "coverage";
    check(launched.count(emu::kernelId(deltachunked::chunkPrepKernel<T>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked preparation");
    check(launched.count(emu::kernelId(deltachunked::chunkStateKernel<T, 2>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked state pass, 16 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkStateKernel<T, 4>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked state pass, 32 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkStateKernel<T, 8>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked state pass, 64 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkBwdStateKernel<T, 2>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked reverse pass, 16 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkBwdStateKernel<T, 4>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked reverse pass, 32 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkBwdStateKernel<T, 8>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked reverse pass, 64 value columns");
    check(launched.count(emu::kernelId(deltachunked::chunkGradKernel<T, 8, true>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked gradients, V <= 128");
    check(launched.count(emu::kernelId(deltachunked::chunkGradKernel<T, 16, true>)) == 1,
          std::string("never ran: ") + Elem<T>::name + " chunked gradients, V > 128");
  }
  context = "coverage";
  for (const auto& kk : kernels)
    check(launched.count(kk.first) == 1, std::string("never ran: ") + Elem<T>::name + " " + kk.second);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20261125);
  checkReferenceGradients();
  checkRefusals();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  runChunkedSuite<__half>(rng, 0);
  runChunkedSuite<__nv_bfloat16>(rng, 1);
  runStep<float>(rng, 1, 64, 5, true, true, true, 8);
  runStep<float>(rng, 3, 130, 3, false, true, false, 16);
  runStep<__half>(rng, 3, 7, 9, true, false, true, 0);
  runStep<__nv_bfloat16>(rng, 1, 3, 2, false, false, false, 8);
  runStep<__nv_bfloat16>(rng, 3, 256, 2, true, true, true, 16);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("gated delta rule on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
