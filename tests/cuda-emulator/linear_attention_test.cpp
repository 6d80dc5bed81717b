// CPU test of the linear-attention kernels (cuda/attention/linear_attention.cu, compiled unmodified)
// through the SIMT emulator in emu.h. The real launchers run on small problems and every output is
// compared with a float64 reference written here as plain loops (the per-token recurrence of each rule
// and its backward by hand; the backward itself checked against finite differences of the reference
// forward):
//   * linearAttentionForward / linearAttentionBackward for every dtype and every rule (linear, gated,
//     delta, gated_delta), one decay per head and per key row; heads Hq = Hk = Hv, grouped queries
//     (Hq > Hv), inverse grouping (Hq < Hv) and key heads shared by states (Hk < Hv); K and V in
//     {1, 3, 20, 64, 130} (some pairs); T = 1, chunk-1, chunk+1; batch 1 and 2; l2norm on and off;
//     packed sequences (a zero-length one, a gap between sequences and a tail in no sequence, where
//     the inputs are NaN); h0, finalState, dO, dFinal, dh0 each on and off; decays 0 and -1e4;
//     the trailing state window (slots before a sequence's start must be zero); every rows-per-lane
//     and block-size choice (pinned through rkcuda::tunable);
//   * the 'linear' and 'gated' rules with a scalar decay in the gated delta rule's layout, which the
//     launchers send to its chunked tensor-core kernels (without the delta term) for fp16 / bf16:
//     Hv = Hq and Hv > Hq, K and V off the tiles (20 x 3, 64 x 64, 130 x 9, 16 x 40), T up to three
//     chunks and a few, packed sequences, decays 0 and -1e4, dO absent, a forward with no checkpoints;
//     which path ran is checked against the launcher's rule worked out here, and the same layout once
//     forced onto the per-token kernels;
//   * the 'gated' and 'gated_delta' rules with a decay per key row in that layout (GLA, KDA), which
//     run on those kernels (both passes) for K <= 128 (20, 64, 128; 130 stays per token): the same
//     kinds of cases;
//   * the decode step as the binding runs it: the forward with the state as h0 and finalState (in
//     place) and the window as the intermediate states;
//   * the gate activations (linear_attention_gates.cu): the qwen gate with a per-head or per-key
//     dtBias, sigmoid beta, a beta shared by the heads, forward and backward (aLog, dtBias summed
//     over positions);
//   * arguments the launchers must refuse.
// Outputs are poisoned (NaN) before each call, so anything left unwritten fails; sentinels around
// every output catch out-of-bounds writes; positions in no sequence must be exactly 0; every
// stream-ordered allocation must be freed; every kernel instantiation must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/linear_attention_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "attention/linear_attention.cu"
#include "delta/gated_delta_rule.cu"
#include "delta/gated_delta_rule_chunked.cu"
#include "attention/linear_attention_gates.cu"
#include "harness.h"

#include <chrono>
#include <random>

namespace {

using rkcuda::DType;
using rkcuda::LinearRule;
using rkcuda::ScanSegment;
const int64_t kChunk = rkcuda::linearAttentionChunk();

template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-4;
  else if constexpr (std::is_same_v<T, __half>)
    return 5e-3;
  else
    return 2e-2;
}

const char* ruleName(LinearRule r) {
  switch (r) {
    case LinearRule::Linear:
      return "linear";
    case LinearRule::Gated:
      return "gated";
    case LinearRule::Delta:
      return "delta";
    default:
      return "gated_delta";
  }
}

// ---- the problem and its float64 reference ----

struct Problem {
  LinearRule rule = LinearRule::GatedDeltaRule;
  int64_t batch = 1, T = 1, Hq = 1, Hk = 1, Hv = 1, K = 1, V = 1, window = 0;
  bool perKey = false, l2 = false, packed = false;
  bool hasH0 = false, hasFinal = false, hasDO = false, hasDFinal = false, hasDh0 = false;
  double scale = 1;
  std::vector<ScanSegment> segs;
  int64_t totalChunks = 0;
  std::vector<double> q, k, v, g, beta, h0, dO, dFinal;
  int64_t nseq() const { return static_cast<int64_t>(segs.size()); }
  int64_t Ho() const { return std::max(Hq, Hv); }
  int64_t KV() const { return K * V; }
  bool decays() const { return rkcuda::ruleDecays(rule); }
  bool corrects() const { return rkcuda::ruleCorrects(rule); }
  int64_t gElems() const { return batch * T * Hv * (perKey ? K : 1); }
  int64_t qHead(int64_t hv, int64_t g) const { return Hq >= Hv ? hv * (Hq / Hv) + g : hv / (Hv / Hq); }
  int64_t oHead(int64_t hv, int64_t g) const { return Hq >= Hv ? hv * (Hq / Hv) + g : hv; }
  int64_t nQueries() const { return Hq >= Hv ? Hq / Hv : 1; }
};

struct Ref {
  std::vector<double> o, states, finalState, window, dq, dk, dv, dg, dbeta, dh0;
};

std::vector<double> rowOf(const std::vector<double>& x, int64_t off, int64_t K, bool l2, double* rn) {
  std::vector<double> y(x.begin() + off, x.begin() + off + K);
  double ss = 0;
  for (double e : y) ss += e * e;
  *rn = l2 ? 1.0 / std::sqrt(ss + 1e-6) : 1.0;
  for (double& e : y) e *= *rn;
  return y;
}

// Adds the gradient through y = x * rn (rn = 1 / sqrt(|x|^2 + eps)) of dy to dx.
void l2Back(const std::vector<double>& x, int64_t off, int64_t K, bool l2, double rn, const std::vector<double>& dy,
            std::vector<double>& dx) {
  if (!l2) {
    for (int64_t i = 0; i < K; ++i) dx[off + i] += dy[i];
    return;
  }
  double yd = 0;
  for (int64_t i = 0; i < K; ++i) yd += x[off + i] * rn * dy[i];
  for (int64_t i = 0; i < K; ++i) dx[off + i] += (dy[i] - x[off + i] * rn * yd) * rn;
}

Ref reference(const Problem& P, bool backward) {
  const int64_t K = P.K, V = P.V, KV = P.KV(), Ho = P.Ho();
  Ref r;
  r.o.assign(P.batch * P.T * Ho * V, 0.0);
  r.states.assign(P.totalChunks * P.Hv * KV, 0.0);
  r.finalState.assign(P.nseq() * P.Hv * KV, 0.0);
  r.window.assign(P.window * P.nseq() * P.Hv * KV, 0.0);
  r.dq.assign(P.q.size(), 0.0);
  r.dk.assign(P.k.size(), 0.0);
  r.dv.assign(P.v.size(), 0.0);
  r.dg.assign(P.gElems(), 0.0);
  r.dbeta.assign(P.batch * P.T * P.Hv, 0.0);
  r.dh0.assign(P.nseq() * P.Hv * KV, 0.0);
  for (int64_t s = 0; s < P.nseq(); ++s) {
    const ScanSegment& sg = P.segs[s];
    for (int64_t hv = 0; hv < P.Hv; ++hv) {
      const int64_t hk = hv / (P.Hv / P.Hk);
      std::vector<std::vector<double>> Ss(sg.length + 1, std::vector<double>(KV, 0.0));
      if (P.hasH0)
        for (int64_t e = 0; e < KV; ++e) Ss[0][e] = P.h0[(s * P.Hv + hv) * KV + e];
      std::vector<std::vector<double>> As(sg.length), Ws(sg.length), Us(sg.length), Kn(sg.length);
      std::vector<double> rk(sg.length);
      for (int64_t t = 0; t < sg.length; ++t) {
        if (t % kChunk == 0)
          for (int64_t e = 0; e < KV; ++e) r.states[((sg.chunkOffset + t / kChunk) * P.Hv + hv) * KV + e] = Ss[t][e];
        const int64_t bt = sg.batch * P.T + sg.start + t, gi = bt * P.Hv + hv;
        Kn[t] = rowOf(P.k, (bt * P.Hk + hk) * K, K, P.l2, &rk[t]);
        As[t].assign(K, 1.0);
        if (P.decays())
          for (int64_t i = 0; i < K; ++i) As[t][i] = std::exp(P.perKey ? P.g[gi * K + i] : P.g[gi]);
        Us[t].assign(V, 0.0);
        Ws[t].assign(V, 0.0);
        for (int64_t j = 0; j < V; ++j) {
          double u = 0;
          for (int64_t i = 0; i < K; ++i) u += Kn[t][i] * As[t][i] * Ss[t][i * V + j];
          Us[t][j] = u;
          Ws[t][j] = P.corrects() ? P.beta[gi] * (P.v[gi * V + j] - u) : P.v[gi * V + j];
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) Ss[t + 1][i * V + j] = As[t][i] * Ss[t][i * V + j] + Kn[t][i] * Ws[t][j];
        for (int64_t g = 0; g < P.nQueries(); ++g) {
          double rq = 1;
          const std::vector<double> qn = rowOf(P.q, (bt * P.Hq + P.qHead(hv, g)) * K, K, P.l2, &rq);
          for (int64_t j = 0; j < V; ++j) {
            double acc = 0;
            for (int64_t i = 0; i < K; ++i) acc += qn[i] * Ss[t + 1][i * V + j];
            r.o[(bt * Ho + P.oHead(hv, g)) * V + j] = P.scale * acc;
          }
        }
        const int64_t slot = t - (sg.length - P.window);
        if (slot >= 0)
          for (int64_t e = 0; e < KV; ++e) r.window[((slot * P.nseq() + s) * P.Hv + hv) * KV + e] = Ss[t + 1][e];
      }
      for (int64_t e = 0; e < KV; ++e) r.finalState[(s * P.Hv + hv) * KV + e] = Ss[sg.length][e];
      if (!backward) continue;
      std::vector<double> D(KV, 0.0);
      if (P.hasDFinal)
        for (int64_t e = 0; e < KV; ++e) D[e] = P.dFinal[(s * P.Hv + hv) * KV + e];
      for (int64_t t = sg.length - 1; t >= 0; --t) {
        const int64_t bt = sg.batch * P.T + sg.start + t, gi = bt * P.Hv + hv;
        if (P.hasDO)
          for (int64_t g = 0; g < P.nQueries(); ++g) {
            const int64_t hq = P.qHead(hv, g);
            double rq = 1;
            const std::vector<double> qn = rowOf(P.q, (bt * P.Hq + hq) * K, K, P.l2, &rq);
            std::vector<double> dqn(K, 0.0);
            for (int64_t i = 0; i < K; ++i)
              for (int64_t j = 0; j < V; ++j) {
                const double d = P.scale * P.dO[(bt * Ho + P.oHead(hv, g)) * V + j];
                D[i * V + j] += qn[i] * d;
                dqn[i] += Ss[t + 1][i * V + j] * d;
              }
            l2Back(P.q, (bt * P.Hq + hq) * K, K, P.l2, rq, dqn, r.dq);
          }
        std::vector<double> dkn(K, 0.0), dw(V, 0.0);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) {
            dw[j] += Kn[t][i] * D[i * V + j];
            dkn[i] += D[i * V + j] * Ws[t][j];
          }
        for (int64_t j = 0; j < V; ++j) {
          if (!P.corrects()) {
            r.dv[gi * V + j] = dw[j];
            continue;
          }
          r.dv[gi * V + j] = P.beta[gi] * dw[j];
          r.dbeta[gi] += dw[j] * (P.v[gi * V + j] - Us[t][j]);
          const double du = -P.beta[gi] * dw[j];
          for (int64_t i = 0; i < K; ++i) {
            D[i * V + j] += Kn[t][i] * du;
            dkn[i] += As[t][i] * Ss[t][i * V + j] * du;
          }
        }
        for (int64_t i = 0; i < K; ++i) {
          double dgi = 0;
          for (int64_t j = 0; j < V; ++j) dgi += D[i * V + j] * As[t][i] * Ss[t][i * V + j];
          if (P.decays()) r.dg[P.perKey ? gi * K + i : gi] += dgi;
          for (int64_t j = 0; j < V; ++j) D[i * V + j] *= As[t][i];
        }
        l2Back(P.k, (bt * P.Hk + hk) * K, K, P.l2, rk[t], dkn, r.dk);
      }
      for (int64_t e = 0; e < KV; ++e) r.dh0[(s * P.Hv + hv) * KV + e] = D[e];
    }
  }
  return r;
}

double lossOf(const Problem& P, const Ref& r) {
  double L = 0;
  if (P.hasDO)
    for (size_t i = 0; i < r.o.size(); ++i) L += r.o[i] * P.dO[i];
  if (P.hasDFinal)
    for (size_t i = 0; i < r.finalState.size(); ++i) L += r.finalState[i] * P.dFinal[i];
  return L;
}

// The reference backward against central differences of the reference forward, every input.
void checkReferenceGradients() {
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.1, 1.0), gd(-1.0, 0.0);
  for (int rule = 0; rule < 4; ++rule)
    for (int perKey = 0; perKey < 2; ++perKey) {
      Problem P;
      P.rule = LinearRule(rule);
      P.perKey = perKey;
      P.batch = 2, P.T = 4, P.Hq = 4, P.Hk = 1, P.Hv = 2, P.K = 3, P.V = 2, P.l2 = true, P.scale = 0.7;
      P.hasH0 = P.hasDO = P.hasDFinal = true;
      for (int64_t b = 0; b < P.batch; ++b) P.segs.push_back({b, 0, P.T, b});
      P.totalChunks = P.batch;
      auto fill = [&](std::vector<double>& x, int64_t n, auto& dist) {
        x.resize(n);
        for (double& e : x) e = dist(rng);
      };
      fill(P.q, P.batch * P.T * P.Hq * P.K, nd);
      fill(P.k, P.batch * P.T * P.Hk * P.K, nd);
      fill(P.v, P.batch * P.T * P.Hv * P.V, nd);
      fill(P.g, P.gElems(), gd);
      fill(P.beta, P.batch * P.T * P.Hv, ud);
      fill(P.h0, P.nseq() * P.Hv * P.KV(), nd);
      fill(P.dO, P.batch * P.T * P.Ho() * P.V, nd);
      fill(P.dFinal, P.nseq() * P.Hv * P.KV(), nd);
      context = std::string("reference gradients, ") + ruleName(P.rule) + (perKey ? " per-key" : "");
      const Ref r = reference(P, true);
      auto fd = [&](std::vector<double>& x, const std::vector<double>& an, const char* name) {
        const auto num = centralDifferences(x, [&] { return lossOf(P, reference(P, false)); });
        compare(std::string("reference d") + name, an, num, 1e-6);
      };
      fd(P.q, r.dq, "q");
      fd(P.k, r.dk, "k");
      fd(P.v, r.dv, "v");
      fd(P.h0, r.dh0, "h0");
      if (P.decays()) fd(P.g, r.dg, "g");
      if (P.corrects()) fd(P.beta, r.dbeta, "beta");
    }
}

// ---- running the launchers ----

struct Case {
  LinearRule rule = LinearRule::GatedDeltaRule;
  bool perKey = false;
  int64_t batch = 1, T = 1, Hq = 1, Hk = 1, Hv = 1, K = 1, V = 1, window = 0;
  bool l2 = false, packed = false, h0 = false, fin = false, dO = true, dFinal = false, dh0 = false;
  bool edgeDecays = false;
  int rows = 0, threads = 0;  // tunables (0: the launcher's choice)
  // chunked: a case of the chunked tensor-core path (must be one: the rules without the delta term
  // with a scalar decay, a key head per query head, Hv a multiple of Hq, no window, 16-bit storage);
  // perToken: such a case forced onto the per-token kernels; infer: a forward with no checkpoints
  // and no backward.
  bool chunked = false, perToken = false, infer = false;
};

template <class T> Problem makeProblem(const Case& c, std::mt19937& rng) {
  Problem P;
  P.rule = c.rule, P.perKey = c.perKey, P.batch = c.batch, P.T = c.T, P.Hq = c.Hq, P.Hk = c.Hk, P.Hv = c.Hv;
  P.K = c.K, P.V = c.V, P.window = c.window, P.l2 = c.l2, P.packed = c.packed;
  P.hasH0 = c.h0, P.hasFinal = c.fin, P.hasDO = c.dO, P.hasDFinal = c.dFinal, P.hasDh0 = c.dh0;
  P.scale = 1.0 / std::sqrt(static_cast<double>(c.K));
  if (c.packed) {
    // Row 0: a sequence, an empty one, a gap, a sequence, then a tail in no sequence.
    const int64_t a = c.T / 3, b = c.T / 3;
    P.segs = {{0, 0, a, 0}, {0, a, 0, 0}, {0, a + 1, b, 0}};
  } else {
    for (int64_t s = 0; s < c.batch; ++s) P.segs.push_back({s, 0, c.T, 0});
  }
  int64_t chunks = 0;
  for (ScanSegment& sg : P.segs) {
    sg.chunkOffset = chunks;
    chunks += (sg.length + kChunk - 1) / kChunk;
  }
  P.totalChunks = chunks;
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.1, 1.0), gd(-1.5, 0.0);
  const double qk = c.l2 ? 1.0 : 1.0 / std::sqrt(static_cast<double>(c.K));
  auto fill = [&](std::vector<double>& x, int64_t n, auto gen) {
    x.resize(n);
    for (double& e : x) e = roundTo<T>(gen());
  };
  fill(P.q, c.batch * c.T * c.Hq * c.K, [&] { return qk * nd(rng); });
  fill(P.k, c.batch * c.T * c.Hk * c.K, [&] { return qk * nd(rng); });
  fill(P.v, c.batch * c.T * c.Hv * c.V, [&] { return nd(rng); });
  P.g.resize(P.gElems());
  for (size_t i = 0; i < P.g.size(); ++i)
    P.g[i] = c.edgeDecays ? ((i / 5) % 2 ? -1e4 : 0.0) : static_cast<float>(i % 4 == 0 ? 0.0 : gd(rng));
  fill(P.beta, c.batch * c.T * c.Hv, [&] { return ud(rng); });
  fill(P.h0, P.nseq() * c.Hv * c.K * c.V, [&] { return 0.5 * nd(rng); });
  fill(P.dO, c.batch * c.T * P.Ho() * c.V, [&] { return nd(rng); });
  fill(P.dFinal, P.nseq() * c.Hv * c.K * c.V, [&] { return nd(rng); });
  return P;
}

// Positions in no sequence of row 0 (packed): their inputs are NaN, their outputs must be 0.
std::vector<bool> covered(const Problem& P) {
  std::vector<bool> in(P.batch * P.T, !P.packed);
  if (P.packed)
    for (const ScanSegment& sg : P.segs)
      for (int64_t t = 0; t < sg.length; ++t) in[sg.start + t] = true;
  return in;
}

template <class T> void runCase(const Case& c, std::mt19937& rng) {
  Problem P = makeProblem<T>(c, rng);
  context = std::string(Elem<T>::name) + " " + ruleName(c.rule) + (c.perKey ? " per-key" : "") + " batch " +
            std::to_string(c.batch) + " T " + std::to_string(c.T) + " Hq/Hk/Hv " + std::to_string(c.Hq) + "/" +
            std::to_string(c.Hk) + "/" + std::to_string(c.Hv) + " K " + std::to_string(c.K) + " V " +
            std::to_string(c.V) + (c.l2 ? " l2" : "") + (c.packed ? " packed" : "") + (c.h0 ? " h0" : "") +
            (c.window ? " window " + std::to_string(c.window) : "") + (c.edgeDecays ? " decays 0/-1e4" : "") +
            " rows " + std::to_string(c.rows) + " threads " + std::to_string(c.threads);
  // The launcher's choice, worked out here independently.
  // The gated delta rule's layout (16-bit storage): the rules without the delta term with a scalar
  // decay, and the decaying rules with a decay per key row (K <= 128). The backward has no window: it
  // takes the chunked kernels wherever the heads and the rule allow.
  const bool heads = !std::is_same_v<T, float> && c.Hk == c.Hq && c.Hv % c.Hq == 0;
  const bool rule = (!P.corrects() && !c.perKey) || (c.perKey && P.decays() && c.K <= 128);
  const bool chunkable = heads && rule && c.window == 0;
  const bool expectChunked = chunkable && !c.perToken;
  const bool expectChunkedBackward = heads && rule && !c.perToken;
  context += expectChunked ? " chunked" : "";
  context += c.perToken ? " per-token" : "";
  context += c.infer ? " inference" : "";
  check(!c.chunked || chunkable, "not a case of the chunked path");
  emu::setTunable("linearAttention.path", c.perToken ? 1 : 0);
  emu::setTunable("linearAttention.rowsPerLane", c.rows);
  emu::setTunable("linearAttention.blockThreads", c.threads);
  const std::vector<bool> in = covered(P);
  const int64_t K = P.K, V = P.V, Ho = P.Ho();
  Buf<T> q(P.q.size()), k(P.k.size()), v(P.v.size()), beta(P.beta.size()), dO(P.dO.size());
  Buf<float> g(P.g.size()), h0(P.h0.size()), dFinal(P.dFinal.size());
  q.set(P.q), k.set(P.k), v.set(P.v), beta.set(P.beta), dO.set(P.dO), g.set(P.g), h0.set(P.h0), dFinal.set(P.dFinal);
  // NaN inputs at the positions in no sequence.
  for (int64_t bt = 0; bt < P.batch * P.T; ++bt) {
    if (in[bt]) continue;
    for (int64_t e = 0; e < P.Hq * K; ++e) q.data[bt * P.Hq * K + e] = Elem<T>::from(NAN);
    for (int64_t e = 0; e < P.Hk * K; ++e) k.data[bt * P.Hk * K + e] = Elem<T>::from(NAN);
    for (int64_t e = 0; e < P.Hv * V; ++e) v.data[bt * P.Hv * V + e] = Elem<T>::from(NAN);
  }
  for (auto* b : {&q, &k, &v, &beta, &dO}) b->poisonGuards();
  for (auto* b : {&g, &h0, &dFinal}) b->poisonGuards();
  rkcuda::LinearAttentionArgs a;
  a.dt = Elem<T>::dtype, a.rule = c.rule, a.batch = P.batch, a.T = P.T, a.Hq = P.Hq, a.Hk = P.Hk, a.Hv = P.Hv;
  a.K = K, a.V = V, a.perKeyDecay = c.perKey, a.l2norm = c.l2, a.scale = static_cast<float>(P.scale);
  a.nseq = P.nseq(), a.segments = P.segs.data(), a.packed = P.packed, a.chunk = kChunk, a.totalChunks = P.totalChunks;
  a.q = q.data, a.k = k.data, a.v = v.data, a.g = P.decays() ? g.data : nullptr;
  a.beta = P.corrects() ? beta.data : nullptr, a.h0 = c.h0 ? h0.data : nullptr;
  const Ref ref = reference(P, true);
  const double tol = tolerance<T>();
  // The chunked forward rounds its operands (P, V', the state) to the storage type: 1e-2 as the gated
  // delta rule's chunked forward; its backward meets the dtype's tolerance.
  const double ftol = expectChunked ? std::max(tol, 1e-2) : tol;
  // Forward.
  Buf<T> o(P.batch * P.T * Ho * V);
  Buf<float> states(std::max<int64_t>(P.totalChunks * P.Hv * K * V, 1)), fin(P.nseq() * P.Hv * K * V),
      win(std::max<int64_t>(c.window * P.nseq() * P.Hv * K * V, 1));
  o.poison(), states.poison(), fin.poison(), win.poison();
  a.window = c.window;
  a.windowStates = c.window ? win.data : nullptr;
  a.windowSlotStride = P.nseq() * P.Hv * K * V;
  a.windowSeqStride = P.Hv * K * V;
  emu::launchLog.clear();
  rkcuda::Status st =
      rkcuda::linearAttentionForward(a, o.data, c.infer ? nullptr : states.data, c.fin ? fin.data : nullptr);
  check(st.ok(), "forward status: " + st.message);
  // Whether the last call launched any of the chunked state passes (forward or reverse).
  auto ranAny = [](std::initializer_list<const void*> kernels) {
    for (const emu::LaunchRecord& l : emu::launchLog)
      for (const void* kern : kernels)
        if (l.kernel == kern) return true;
    return false;
  };
  bool ranChunked = false;
  if constexpr (!std::is_same_v<T, float>) {
    using namespace rkcuda::deltachunked;
    ranChunked = ranAny({emu::kernelId(chunkStateKernel<T, 2>), emu::kernelId(chunkStateKernel<T, 4>),
                         emu::kernelId(chunkStateKernel<T, 8>)});
  }
  check(ranChunked == expectChunked, expectChunked ? "the chunked path did not run" : "the chunked path ran");
  checkOutput("o", o, ref.o, ftol);
  if (P.totalChunks > 0 && !c.infer) checkOutput("checkpoints", states, ref.states, ftol);
  if (c.fin) checkOutput("finalState", fin, ref.finalState, ftol);
  if (c.window) checkOutput("window states", win, ref.window, tol);
  for (int64_t bt = 0; bt < P.batch * P.T; ++bt)
    if (!in[bt])
      for (int64_t e = 0; e < Ho * V; ++e) check(Elem<T>::value(o.data[bt * Ho * V + e]) == 0.0, "o in no sequence");
  noteLaunches();
  if (c.infer) {
    check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
    return;
  }
  // Backward.
  Buf<T> dq(P.q.size()), dk(P.k.size()), dv(P.v.size()), dbeta(P.beta.size());
  Buf<float> dg(P.g.size()), dh0(P.h0.size());
  dq.poison(), dk.poison(), dv.poison(), dbeta.poison(), dg.poison(), dh0.poison();
  rkcuda::LinearAttentionGrads gr;
  gr.dO = c.dO ? dO.data : nullptr;
  gr.dFinal = c.dFinal ? dFinal.data : nullptr;
  gr.states = states.data;
  gr.dq = dq.data, gr.dk = dk.data, gr.dv = dv.data;
  gr.dg = P.decays() ? dg.data : nullptr;
  gr.dbeta = P.corrects() ? dbeta.data : nullptr;
  gr.dh0 = c.dh0 ? dh0.data : nullptr;
  a.window = 0, a.windowStates = nullptr;
  st = rkcuda::linearAttentionBackward(a, gr);
  check(st.ok(), "backward status: " + st.message);
  bool ranChunkedBackward = false;
  if constexpr (!std::is_same_v<T, float>) {
    using namespace rkcuda::deltachunked;
    ranChunkedBackward = ranAny({emu::kernelId(chunkBwdStateKernel<T, 2>), emu::kernelId(chunkBwdStateKernel<T, 4>),
                                 emu::kernelId(chunkBwdStateKernel<T, 8>)});
  }
  check(ranChunkedBackward == expectChunkedBackward,
        expectChunkedBackward ? "the chunked backward did not run" : "the chunked backward ran");
  checkOutput("dq", dq, ref.dq, tol);
  checkOutput("dk", dk, ref.dk, tol);
  checkOutput("dv", dv, ref.dv, tol);
  if (P.decays()) checkOutput("dg", dg, ref.dg, tol);
  if (P.corrects()) checkOutput("dbeta", dbeta, ref.dbeta, tol);
  if (c.dh0) checkOutput("dh0", dh0, ref.dh0, tol);
  for (int64_t bt = 0; bt < P.batch * P.T; ++bt)
    if (!in[bt]) {
      for (int64_t e = 0; e < P.Hq * K; ++e)
        check(Elem<T>::value(dq.data[bt * P.Hq * K + e]) == 0.0, "dq in no sequence");
      for (int64_t e = 0; e < P.Hk * K; ++e)
        check(Elem<T>::value(dk.data[bt * P.Hk * K + e]) == 0.0, "dk in no sequence");
      for (int64_t e = 0; e < P.Hv * V; ++e)
        check(Elem<T>::value(dv.data[bt * P.Hv * V + e]) == 0.0, "dv in no sequence");
    }
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
  emu::setTunable("linearAttention.rowsPerLane", 0);
  emu::setTunable("linearAttention.blockThreads", 0);
  emu::setTunable("linearAttention.path", 0);
}

// The rules without the delta term with a scalar decay in the gated delta rule's layout (a key head
// per query head, Hv a multiple of Hq, no window): 16-bit storage runs them on its chunked
// tensor-core kernels. Value heads sharing a query head and not, K and V off the 16-element tiles
// (and V off the 16-byte rows), several chunks with a short last one, packed sequences with an empty
// one and gaps, decays 0 and -1e4, every optional input and output; then the same layout forced onto
// the per-token kernels (linearAttention.path = 1) and a forward with no checkpoints.
template <class T> void runChunkedSuite(std::mt19937& rng) {
  Case c;
  c.rule = LinearRule::Gated, c.chunked = true;
  c.batch = 2, c.T = 2 * kChunk + 3, c.Hq = 1, c.Hk = 1, c.Hv = 2, c.K = 20, c.V = 3, c.l2 = true;
  c.h0 = c.fin = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Linear, c.chunked = true;
  c.batch = 1, c.T = 3 * kChunk + 7, c.Hq = 2, c.Hk = 2, c.Hv = 2, c.K = 64, c.V = 64, c.packed = true, c.fin = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Gated, c.chunked = true;
  c.batch = 1, c.T = kChunk + 1, c.Hq = 1, c.Hk = 1, c.Hv = 1, c.K = 130, c.V = 9, c.packed = true, c.dO = false;
  c.edgeDecays = true, c.h0 = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Gated, c.chunked = true, c.infer = true;
  c.batch = 2, c.T = kChunk - 1, c.Hq = 2, c.Hk = 2, c.Hv = 4, c.K = 16, c.V = 40, c.h0 = c.fin = true;
  runCase<T>(c, rng);
  // A decay per key row (GLA, KDA): both passes chunked for K <= 128.
  c = Case{};
  c.rule = LinearRule::Gated, c.perKey = true, c.chunked = true;
  c.batch = 2, c.T = 2 * kChunk + 3, c.Hq = 1, c.Hk = 1, c.Hv = 2, c.K = 20, c.V = 3, c.l2 = true;
  c.h0 = c.fin = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::GatedDeltaRule, c.perKey = true, c.chunked = true;
  c.batch = 1, c.T = 3 * kChunk + 7, c.Hq = 2, c.Hk = 2, c.Hv = 2, c.K = 64, c.V = 64, c.packed = true, c.fin = true;
  c.l2 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::GatedDeltaRule, c.perKey = true, c.chunked = true;
  c.batch = 1, c.T = kChunk + 1, c.Hq = 1, c.Hk = 1, c.Hv = 1, c.K = 128, c.V = 9, c.packed = true, c.dO = false;
  c.edgeDecays = true, c.h0 = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Gated, c.perKey = true, c.chunked = true;
  c.batch = 1, c.T = 2 * kChunk + 5, c.Hq = 1, c.Hk = 1, c.Hv = 2, c.K = 128, c.V = 24, c.packed = true;
  c.edgeDecays = true, c.h0 = c.fin = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Gated, c.perKey = true, c.chunked = true, c.infer = true;
  c.batch = 2, c.T = kChunk - 1, c.Hq = 2, c.Hk = 2, c.Hv = 4, c.K = 16, c.V = 40, c.h0 = c.fin = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::GatedDeltaRule, c.perKey = true, c.chunked = true;
  c.batch = 2, c.T = kChunk + 9, c.Hq = 1, c.Hk = 1, c.Hv = 2, c.K = 32, c.V = 16, c.l2 = true;
  c.h0 = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::GatedDeltaRule, c.perKey = true;  // K above the chunked kernels' 128: per token
  c.batch = 1, c.T = kChunk + 2, c.Hq = 1, c.Hk = 1, c.Hv = 1, c.K = 130, c.V = 5, c.fin = true;
  runCase<T>(c, rng);
  c = Case{};
  c.rule = LinearRule::Linear, c.perToken = true;
  c.batch = 2, c.T = kChunk + 1, c.Hq = 1, c.Hk = 1, c.Hv = 2, c.K = 8, c.V = 16,
  c.h0 = c.fin = c.dFinal = c.dh0 = true;
  runCase<T>(c, rng);
}

// The decode step as the binding runs it: the state is h0 and the final state (updated in place), the
// window (one slot per token, [batch, tokens, ...]) the intermediate states.
template <class T>
void runStep(std::mt19937& rng, LinearRule rule, bool perKey, int64_t tokens, int64_t Hq, int64_t Hv, int64_t K,
             int64_t V) {
  Case c;
  c.rule = rule, c.perKey = perKey, c.batch = 2, c.T = tokens, c.Hq = Hq, c.Hk = Hv, c.Hv = Hv, c.K = K, c.V = V;
  c.h0 = true, c.fin = true, c.window = tokens;
  Problem P = makeProblem<T>(c, rng);
  context = std::string("step ") + Elem<T>::name + " " + ruleName(rule) + (perKey ? " per-key" : "") + " tokens " +
            std::to_string(tokens);
  const Ref ref = reference(P, false);
  Buf<T> q(P.q.size()), k(P.k.size()), v(P.v.size()), beta(P.beta.size()), o(P.batch * tokens * P.Ho() * V);
  Buf<float> g(P.g.size()), state(P.h0.size()), inter(P.batch * tokens * Hv * K * V);
  q.set(P.q), k.set(P.k), v.set(P.v), beta.set(P.beta), g.set(P.g), state.set(P.h0);
  o.poison(), inter.poison();
  rkcuda::LinearAttentionArgs a;
  a.dt = Elem<T>::dtype, a.rule = rule, a.batch = 2, a.T = tokens, a.Hq = Hq, a.Hk = Hv, a.Hv = Hv, a.K = K, a.V = V;
  a.perKeyDecay = perKey, a.scale = static_cast<float>(P.scale);
  a.nseq = 2, a.segments = P.segs.data(), a.chunk = kChunk, a.totalChunks = P.totalChunks;
  a.q = q.data, a.k = k.data, a.v = v.data, a.g = P.decays() ? g.data : nullptr;
  a.beta = P.corrects() ? beta.data : nullptr, a.h0 = state.data;
  a.window = tokens, a.windowStates = inter.data, a.windowSlotStride = Hv * K * V,
  a.windowSeqStride = tokens * Hv * K * V;
  const rkcuda::Status st = rkcuda::linearAttentionForward(a, o.data, nullptr, state.data);
  check(st.ok(), "step status: " + st.message);
  checkOutput("step o", o, ref.o, tolerance<T>());
  checkOutput("step state", state, ref.finalState, tolerance<T>());
  // ref.window is [slot, seq, ...]; the step's is [seq, slot, ...].
  std::vector<double> want(inter.n);
  const int64_t per = Hv * K * V;
  for (int64_t s = 0; s < 2; ++s)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t e = 0; e < per; ++e) want[(s * tokens + t) * per + e] = ref.window[(t * 2 + s) * per + e];
  checkOutput("step intermediate", inter, want, tolerance<T>());
  noteLaunches();
}

// The gate activations against float64: g = -exp(aLog) softplus(decay + dtBias), beta = sigmoid(b)
// (broadcast when shared), and their backward.
template <class T> void runGates(std::mt19937& rng, bool perKey, bool dtBiasPerKey, bool sigmoid, int64_t betaHeads) {
  const int64_t rows = 7, Hv = 3, K = 5, per = perKey ? K : 1, n = rows * Hv * per;
  context = std::string("gates ") + Elem<T>::name + (perKey ? " per-key" : "") +
            (dtBiasPerKey ? " dtBias per key" : "") + (sigmoid ? " sigmoid" : "") + " betaHeads " +
            std::to_string(betaHeads);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> decay(n), b(rows * betaHeads), aLog(Hv), dtBias(dtBiasPerKey ? Hv * K : Hv), dg(n), db(rows * Hv);
  for (auto* v : {&decay, &b, &aLog, &dtBias, &dg, &db})
    for (double& e : *v) e = 2 * nd(rng);
  for (double& e : b) e = roundTo<T>(e);
  for (double& e : db) e = roundTo<T>(e);
  Buf<float> bd(n), ba(Hv), bt(dtBias.size()), bdg(n), g(n), dDecay(n), daLog(Hv), dDt(dtBias.size());
  Buf<T> bb(b.size()), bdb(db.size()), beta(rows * Hv), dBeta(b.size());
  bd.set(decay), ba.set(aLog), bt.set(dtBias), bdg.set(dg), bb.set(b), bdb.set(db);
  for (auto* x : {&g, &dDecay, &daLog, &dDt}) x->poison();
  beta.poison(), dBeta.poison();
  rkcuda::LinearGateArgs a;
  a.dt = Elem<T>::dtype, a.rows = rows, a.Hv = Hv, a.K = K, a.betaHeads = betaHeads;
  a.perKey = perKey, a.qwen = true, a.sigmoid = sigmoid, a.dtBiasPerKey = dtBiasPerKey;
  a.decay = bd.data, a.beta = bb.data, a.aLog = ba.data, a.dtBias = bt.data;
  check(rkcuda::linearAttentionGates(a, g.data, beta.data).ok(), "gates status");
  check(rkcuda::linearAttentionGatesBackward(a, bdg.data, bdb.data, dDecay.data, dBeta.data, daLog.data, dDt.data).ok(),
        "gates backward status");
  auto sp = [](double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); };
  auto sg = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  std::vector<double> wg(n), wdd(n), wa(Hv, 0.0), wt(dtBias.size(), 0.0), wb(rows * Hv), wdb(b.size(), 0.0);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t h = e / per % Hv, bi = dtBiasPerKey ? e % (Hv * K) : h;
    const double x = decay[e] + dtBias[bi], A = -std::exp(aLog[h]);
    wg[e] = A * sp(x);
    wdd[e] = dg[e] * A * sg(x);
    wa[h] += dg[e] * A * sp(x);
    wt[bi] += wdd[e];
  }
  for (int64_t e = 0; e < rows * Hv; ++e) {
    const int64_t src = betaHeads == 1 ? e / Hv : e;
    wb[e] = sigmoid ? sg(b[src]) : b[src];
    wdb[src] += db[e] * (sigmoid ? sg(b[src]) * (1 - sg(b[src])) : 1.0);
  }
  checkOutput("g", g, wg, 1e-5);
  checkOutput("beta", beta, wb, tolerance<T>());
  checkOutput("ddecay", dDecay, wdd, 1e-5);
  checkOutput("daLog", daLog, wa, 1e-5);
  checkOutput("ddtBias", dDt, wt, 1e-5);
  checkOutput("dbeta", dBeta, wdb, tolerance<T>());
  noteLaunches();
}

void checkRefusals() {
  context = "refusals";
  rkcuda::LinearAttentionArgs a;
  a.batch = 1, a.T = 1, a.Hq = 2, a.Hk = 3, a.Hv = 3, a.K = 4, a.V = 4, a.chunk = kChunk;
  std::vector<ScanSegment> segs = {{0, 0, 1, 0}};
  a.nseq = 1, a.segments = segs.data(), a.totalChunks = 1;
  float x[64] = {};
  a.q = a.k = a.v = a.beta = x, a.g = x;
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "Hq neither a divisor nor a multiple of Hv");
  a.Hq = 3, a.K = 300;
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "K above 256");
  a.K = 4, a.chunk = 32;
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "wrong chunk");
  a.chunk = kChunk, a.g = nullptr;
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "null decay for gated_delta");
  a.g = x, a.window = 9;
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "window above 8");
  a.window = 0, a.Hq = 3, a.Hk = 3, a.rule = LinearRule::Gated;
  emu::setTunable("linearAttention.path", 2);
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "the chunked path forced for fp32");
  emu::setTunable("linearAttention.path", 3);
  check(!rkcuda::linearAttentionForward(a, x, x, nullptr).ok(), "an unknown path");
  emu::setTunable("linearAttention.path", 0);
}

template <class T> void runSuite(std::mt19937& rng, int variant) {
  const LinearRule rules[] = {LinearRule::Linear, LinearRule::Gated, LinearRule::Delta, LinearRule::GatedDeltaRule};
  int n = 0;
  for (LinearRule rule : rules)
    for (int perKey = 0; perKey < (rkcuda::ruleDecays(rule) ? 2 : 1); ++perKey) {
      const int r = (n++ + variant) % 4;
      Case c;
      c.rule = rule, c.perKey = perKey;
      // Rotate layouts, sizes and options through the rules.
      switch (r) {
        case 0:
          c.batch = 2, c.T = kChunk + 1, c.Hq = 2, c.Hk = 2, c.Hv = 2, c.K = 20, c.V = 3,
          c.h0 = c.fin = c.dFinal = c.dh0 = true;
          c.rows = 8, c.threads = 64;
          break;
        case 1:
          c.batch = 1, c.T = kChunk - 1, c.Hq = 4, c.Hk = 1, c.Hv = 2, c.K = 3, c.V = 20, c.l2 = true, c.window = 3;
          c.fin = true, c.rows = 16, c.threads = 128;
          break;
        case 2:
          c.batch = 1, c.T = 2 * kChunk + 3, c.Hq = 1, c.Hk = 2, c.Hv = 2, c.K = 64, c.V = 1, c.packed = true;
          c.h0 = c.fin = c.dFinal = c.dh0 = true, c.window = 2, c.edgeDecays = true, c.threads = 256;
          break;
        default:
          c.batch = 2, c.T = 1, c.Hq = 2, c.Hk = 2, c.Hv = 4, c.K = 130, c.V = 9, c.h0 = c.dh0 = true, c.l2 = true;
          c.dO = variant != 2, c.dFinal = true, c.window = 4;
          break;
      }
      runCase<T>(c, rng);
    }
}

template <class T> void checkCoverage() {
  for (const void* kern : {emu::kernelId(rkcuda::linearAttentionForwardKernel<T, 8>),
                           emu::kernelId(rkcuda::linearAttentionForwardKernel<T, 16>),
                           emu::kernelId(rkcuda::linearAttentionBackwardKernel<T, 8>),
                           emu::kernelId(rkcuda::linearAttentionBackwardKernel<T, 16>),
                           emu::kernelId(rkcuda::l2normBackwardKernel<T>), emu::kernelId(rkcuda::zeroGapsKernel<T>),
                           emu::kernelId(rkcuda::betaForwardKernel<T>), emu::kernelId(rkcuda::betaBackwardKernel<T>),
                           emu::kernelId(rkcuda::gateForwardKernel), emu::kernelId(rkcuda::gateBackwardKernel)}) {
    context = std::string("coverage ") + Elem<T>::name;
    check(launched.count(kern) == 1, "a kernel instantiation never ran");
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20261207);
  checkReferenceGradients();
  checkRefusals();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  runChunkedSuite<__half>(rng);
  runChunkedSuite<__nv_bfloat16>(rng);
  runGates<float>(rng, false, false, true, 1);
  runGates<float>(rng, true, true, false, 3);
  runGates<__half>(rng, true, false, true, 3);
  runGates<__nv_bfloat16>(rng, false, false, true, 1);
  runStep<float>(rng, LinearRule::GatedDeltaRule, true, 3, 1, 2, 8, 5);
  runStep<float>(rng, LinearRule::Gated, false, 1, 4, 2, 64, 7);
  runStep<__half>(rng, LinearRule::Linear, false, 2, 2, 2, 3, 3);
  runStep<__nv_bfloat16>(rng, LinearRule::Delta, false, 4, 1, 2, 130, 4);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("linear attention on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
