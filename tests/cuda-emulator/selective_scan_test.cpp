// CPU test of the selective-scan kernels (cuda/scan/selective_scan.cu and selective_state_update.cu,
// compiled unmodified) through the SIMT emulator in emu.h. The real launchers run on small problems
// and every output is compared with a float64 reference written here as plain sequential loops
// (the backward one derived by hand from the recurrence, and itself checked against finite
// differences of the reference forward):
//   * selectiveScanForward / selectiveScanBackward for every dtype; dstate 1, 2, 3, 5, 16 and
//     256; seqlen 0, 1, 7, chunk-1, chunk, chunk+1, 2*chunk+3 and 6*chunk+9 (chunk =
//     selectiveScanChunk() = 256, the backward tile; the forward tile is two chunks); batch 1, 2
//     and 3; groups 1, 2 and 3, with several blocks per group; constant and variable B and C, mixed
//     too; with and without D, z, deltaBias, softplus, h0, finalState, dy, dFinal, dh0; packed
//     sequences (a zero-length one, positions between sequences and a tail in no sequence, where
//     the inputs are NaN; sequences spanning chunks); the vector and element-wise paths (aligned or
//     misaligned tensors, seqlen a multiple of 8 or not); every block size the launchers may pick
//     (pinned through rkcuda::tunable);
//   * selectiveStateUpdate with 1 and 3 tokens, updateState on and off, intermediate states on and
//     off, every states-per-lane configuration, and equal to the scan run on the same tokens;
//   * the reverse warp scan of common/scan.cuh that the backward kernel uses, on its own;
//   * arguments the launchers must refuse, without launching anything or leaking memory.
// Outputs are poisoned (NaN) before each call, so anything left unwritten fails; sentinels around
// every output catch out-of-bounds writes, NaN guards around every input out-of-bounds reads;
// positions in no sequence must be exactly 0; inputs must be unchanged; every stream-ordered
// allocation must be freed; every kernel instantiation must run.
// Tolerances are norm-wise relative errors: 1e-5 for fp32, 1e-2 (bf16) and 5e-3 (f16) where the
// outputs are rounded to 16 bits.
//
// Prints up to kMaxReported failures and a summary line "<n> checks, <m> failures"; exits 1 on any
// failure. Built and run by tests/cuda-emulator.test.ts; by hand:
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/selective_scan_test.cpp
//   (from the repository root), then run the executable.
#include "emu.h"
// The kernels under test, after the emulator.
#include "scan/selective_scan.cu"
#include "scan/selective_state_update.cu"
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
constexpr int64_t kChunk = 256;

// Norm-wise tolerance of each dtype's results.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 5e-3;
  else
    return 1e-2;
}

// ---- checks beyond harness.h ----

template <class T> void checkUnchanged(const std::string& what, const Buf<T>& buf, const std::vector<double>& want) {
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) bad += Elem<T>::value(buf.data[i]) != want[i];
  check(bad == 0, what + " changed", static_cast<double>(bad), 0);
}

void checkNoLeaks(const std::string& what) {
  check(emu::liveAllocations.empty(), what + ": stream-ordered allocations not freed",
        static_cast<double>(emu::liveAllocations.size()), 0);
}

// ---- the problem and its float64 reference ----

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct Problem {
  int64_t batch = 1, dim = 1, seqlen = 1, dstate = 1, groups = 1;
  bool varB = false, varC = false, softplus = false, packed = false;
  bool hasD = false, hasZ = false, hasBias = false, hasH0 = false, hasDy = false, hasDFinal = false;
  std::vector<ScanSegment> segs;
  int64_t totalChunks = 0;
  // Values exactly as stored (rounded to the dtype where the tensor has it).
  std::vector<double> u, delta, A, B, C, D, z, bias, h0, dy, dFinal;

  int64_t nseq() const { return static_cast<int64_t>(segs.size()); }
  int64_t elements() const { return batch * dim * seqlen; }
  int64_t bcElements(bool variable) const { return variable ? batch * groups * dstate * seqlen : dim * dstate; }
  int64_t stateElements() const { return nseq() * dim * dstate; }
  int64_t group(int64_t d) const { return d / (dim / groups); }
  // Index of B or C at (row b, channel d, state n, position pos).
  int64_t bcIndex(bool variable, int64_t b, int64_t d, int64_t n, int64_t pos) const {
    return variable ? ((b * groups + group(d)) * dstate + n) * seqlen + pos : d * dstate + n;
  }
  double dtOf(double pre) const { return softplus ? (pre <= 20 ? std::log1p(std::exp(pre)) : pre) : pre; }
  double dtGrad(double pre) const { return softplus ? (pre <= 20 ? sigmoid(pre) : 1.0) : 1.0; }
};

struct Forward {
  std::vector<double> y, states, finalState;
};
struct Backward {
  std::vector<double> du, ddelta, dA, dB, dC, dD, dz, dbias, dh0;
};

Forward referenceForward(const Problem& P) {
  const int64_t N = P.dstate;
  Forward f;
  f.y.assign(P.elements(), 0.0);
  f.states.assign(P.totalChunks * P.dim * N, 0.0);
  f.finalState.assign(P.stateElements(), 0.0);
  for (int64_t s = 0; s < P.nseq(); ++s) {
    const ScanSegment& seg = P.segs[s];
    const int64_t L = seg.length, nChunks = (L + kChunk - 1) / kChunk;
    for (int64_t d = 0; d < P.dim; ++d) {
      std::vector<double> x(N);
      for (int64_t n = 0; n < N; ++n) x[n] = P.hasH0 ? P.h0[(s * P.dim + d) * N + n] : 0.0;
      for (int64_t t = 0; t < L; ++t) {
        if (t % kChunk == 0) {
          for (int64_t n = 0; n < N; ++n)
            f.states[((seg.chunkOffset * P.dim + d * nChunks + t / kChunk) * N) + n] = x[n];
        }
        const int64_t pos = seg.start + t, i = (seg.batch * P.dim + d) * P.seqlen + pos;
        const double dt = P.dtOf(P.delta[i] + (P.hasBias ? P.bias[d] : 0.0));
        double out = P.hasD ? P.D[d] * P.u[i] : 0.0;
        for (int64_t n = 0; n < N; ++n) {
          x[n] = std::exp(dt * P.A[d * N + n]) * x[n] + dt * P.B[P.bcIndex(P.varB, seg.batch, d, n, pos)] * P.u[i];
          out += P.C[P.bcIndex(P.varC, seg.batch, d, n, pos)] * x[n];
        }
        f.y[i] = P.hasZ ? out * P.z[i] * sigmoid(P.z[i]) : out;
      }
      for (int64_t n = 0; n < N; ++n) f.finalState[(s * P.dim + d) * N + n] = x[n];
    }
  }
  return f;
}

// With dout_t = dy_t * gate_t and g_t = dL/dx_t (total): g_{L-1} = C dout + dFinal,
// g_t = C_t dout_t + a_{t+1} g_{t+1}; then dB_t += g dt u, dC_t += dout x_t, du = D dout + dt sum g B,
// ddt = u sum g B + sum A g a_t x_{t-1}, dA += dt g a_t x_{t-1}, dh0 = a_0 g_0, dz = dy out silu'(z).
Backward referenceBackward(const Problem& P) {
  const int64_t N = P.dstate;
  Backward r;
  r.du.assign(P.elements(), 0.0);
  r.ddelta.assign(P.elements(), 0.0);
  r.dz.assign(P.elements(), 0.0);
  r.dA.assign(P.dim * N, 0.0);
  r.dB.assign(P.bcElements(P.varB), 0.0);
  r.dC.assign(P.bcElements(P.varC), 0.0);
  r.dD.assign(P.dim, 0.0);
  r.dbias.assign(P.dim, 0.0);
  r.dh0.assign(P.stateElements(), 0.0);
  for (int64_t s = 0; s < P.nseq(); ++s) {
    const ScanSegment& seg = P.segs[s];
    const int64_t L = seg.length;
    for (int64_t d = 0; d < P.dim; ++d) {
      const double bias = P.hasBias ? P.bias[d] : 0.0, Dd = P.hasD ? P.D[d] : 0.0;
      std::vector<std::vector<double>> x(L + 1, std::vector<double>(N));  // x[t + 1] = state after t
      std::vector<double> dt(L), pre(L), dout(L);
      for (int64_t n = 0; n < N; ++n) x[0][n] = P.hasH0 ? P.h0[(s * P.dim + d) * N + n] : 0.0;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t pos = seg.start + t, i = (seg.batch * P.dim + d) * P.seqlen + pos;
        pre[t] = P.delta[i] + bias;
        dt[t] = P.dtOf(pre[t]);
        double out = Dd * P.u[i];
        for (int64_t n = 0; n < N; ++n) {
          x[t + 1][n] = std::exp(dt[t] * P.A[d * N + n]) * x[t][n] +
                        dt[t] * P.B[P.bcIndex(P.varB, seg.batch, d, n, pos)] * P.u[i];
          out += P.C[P.bcIndex(P.varC, seg.batch, d, n, pos)] * x[t + 1][n];
        }
        const double dyv = P.hasDy ? P.dy[i] : 0.0;
        dout[t] = P.hasZ ? dyv * P.z[i] * sigmoid(P.z[i]) : dyv;
        if (P.hasZ) {
          const double sg = sigmoid(P.z[i]);
          r.dz[i] = dyv * out * sg * (1 + P.z[i] * (1 - sg));
        }
      }
      std::vector<double> carry(N);  // a_{t+1} g_{t+1}, dFinal past the end
      for (int64_t n = 0; n < N; ++n) carry[n] = P.hasDFinal ? P.dFinal[(s * P.dim + d) * N + n] : 0.0;
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t pos = seg.start + t, i = (seg.batch * P.dim + d) * P.seqlen + pos;
        double sumGB = 0, sumAW = 0;
        for (int64_t n = 0; n < N; ++n) {
          const double A = P.A[d * N + n], a = std::exp(dt[t] * A);
          const int64_t bi = P.bcIndex(P.varB, seg.batch, d, n, pos), ci = P.bcIndex(P.varC, seg.batch, d, n, pos);
          const double g = P.C[ci] * dout[t] + carry[n];
          r.dB[bi] += g * dt[t] * P.u[i];
          r.dC[ci] += dout[t] * x[t + 1][n];
          sumGB += g * P.B[bi];
          const double w = g * a * x[t][n];
          sumAW += A * w;
          r.dA[d * N + n] += dt[t] * w;
          carry[n] = a * g;
        }
        r.du[i] = Dd * dout[t] + dt[t] * sumGB;
        r.ddelta[i] = (P.u[i] * sumGB + sumAW) * P.dtGrad(pre[t]);
        r.dD[d] += dout[t] * P.u[i];
        r.dbias[d] += r.ddelta[i];
      }
      for (int64_t n = 0; n < N; ++n) r.dh0[(s * P.dim + d) * N + n] = carry[n];
    }
  }
  return r;
}

// The reference gradients against central differences of the reference forward, on a small
// problem: loss = sum y * dy + sum finalState * dFinal.
void checkReferenceGradients() {
  context = "reference gradients vs finite differences";
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> sym(-1.0, 1.0), pos(0.3, 1.5);
  Problem P;
  P.batch = 2;
  P.dim = 4;
  P.seqlen = 6;
  P.dstate = 3;
  P.groups = 2;
  P.varB = true;
  P.varC = false;
  P.softplus = true;
  P.hasD = P.hasZ = P.hasBias = P.hasH0 = P.hasDy = P.hasDFinal = true;
  for (int64_t b = 0; b < P.batch; ++b) P.segs.push_back({b, 0, P.seqlen, b * 1});
  P.totalChunks = P.batch;
  auto fill = [&](std::vector<double>& v, size_t n, bool positive = false) {
    v.resize(n);
    for (double& e : v) e = positive ? -pos(rng) : sym(rng);
  };
  fill(P.u, P.elements());
  fill(P.delta, P.elements());
  fill(P.A, P.dim * P.dstate, true);
  fill(P.B, P.bcElements(true));
  fill(P.C, P.bcElements(false));
  fill(P.D, P.dim);
  fill(P.z, P.elements());
  fill(P.bias, P.dim);
  fill(P.h0, P.stateElements());
  fill(P.dy, P.elements());
  fill(P.dFinal, P.stateElements());
  auto loss = [&]() {
    const Forward f = referenceForward(P);
    double l = 0;
    for (size_t i = 0; i < f.y.size(); ++i) l += f.y[i] * P.dy[i];
    for (size_t i = 0; i < f.finalState.size(); ++i) l += f.finalState[i] * P.dFinal[i];
    return l;
  };
  const Backward g = referenceBackward(P);
  auto fd = [&](const char* name, std::vector<double>& param, const std::vector<double>& grad) {
    compare(std::string("d") + name, grad, centralDifferences(param, loss), 1e-6);
  };
  fd("u", P.u, g.du);
  fd("delta", P.delta, g.ddelta);
  fd("A", P.A, g.dA);
  fd("B", P.B, g.dB);
  fd("C", P.C, g.dC);
  fd("D", P.D, g.dD);
  fd("z", P.z, g.dz);
  fd("deltaBias", P.bias, g.dbias);
  fd("h0", P.h0, g.dh0);
}

// ---- which kernels ran ----

// ---- one scan case: forward, then backward from the forward's checkpoints ----

struct ScanCase {
  int64_t batch = 1, dim = 4, seqlen = 7, dstate = 3, groups = 1;
  bool varB = true, varC = true, softplus = true;
  bool hasD = true, hasZ = true, hasBias = true, hasH0 = true, wantFinal = true;
  bool hasDy = true, hasDFinal = true, wantDh0 = true;
  std::vector<int> cuSeqlens;         // empty: one whole sequence per row; else packed (batch 1)
  std::vector<ScanSegment> segments;  // explicit packed segments (with gaps), used when non-empty
  int fwdWarps = 0, bwdWarps = 0;     // pinned block sizes (0: the launcher's choice)
  int offset = 0;                     // misalignment (elements) of the [batch, dim, seqlen] tensors

  std::string describe(const char* dtype) const {
    char s[400];
    std::snprintf(s, sizeof s,
                  "%s batch=%lld dim=%lld seqlen=%lld dstate=%lld groups=%lld B=%s C=%s softplus=%d D=%d z=%d "
                  "bias=%d h0=%d final=%d dy=%d dFinal=%d dh0=%d packed=%zu fwdWarps=%d bwdWarps=%d offset=%d",
                  dtype, (long long)batch, (long long)dim, (long long)seqlen, (long long)dstate, (long long)groups,
                  varB ? "var" : "const", varC ? "var" : "const", softplus, hasD, hasZ, hasBias, hasH0, wantFinal,
                  hasDy, hasDFinal, wantDh0, segments.empty() ? cuSeqlens.size() : segments.size(), fwdWarps, bwdWarps,
                  offset);
    return s;
  }
};

template <class T> void runScanCase(const ScanCase& c, std::mt19937& rng) {
  using E = Elem<T>;
  context = c.describe(E::name);
  const double tol = tolerance<T>();
  Problem P;
  P.batch = c.batch;
  P.dim = c.dim;
  P.seqlen = c.seqlen;
  P.dstate = c.dstate;
  P.groups = c.groups;
  P.varB = c.varB;
  P.varC = c.varC;
  P.softplus = c.softplus;
  P.hasD = c.hasD;
  P.hasZ = c.hasZ;
  P.hasBias = c.hasBias;
  P.hasH0 = c.hasH0;
  P.hasDy = c.hasDy;
  P.hasDFinal = c.hasDFinal;
  if (!c.segments.empty()) {
    P.packed = true;
    P.segs = c.segments;
  } else if (!c.cuSeqlens.empty()) {
    P.packed = true;
    for (size_t i = 1; i < c.cuSeqlens.size(); ++i) {
      P.segs.push_back({0, c.cuSeqlens[i - 1], c.cuSeqlens[i] - c.cuSeqlens[i - 1], 0});
    }
  } else {
    for (int64_t b = 0; b < c.batch; ++b) P.segs.push_back({b, 0, c.seqlen, 0});
  }
  for (ScanSegment& s : P.segs) {
    s.chunkOffset = P.totalChunks;
    P.totalChunks += (s.length + kChunk - 1) / kChunk;
  }

  // Inputs, exactly representable in their storage type. A in [-2, -0.3] keeps the states bounded;
  // delta around 0 (dt about 0.3..1.3 after softplus), or in [0.01, 0.5] without softplus.
  std::uniform_real_distribution<double> sym(-1.0, 1.0), neg(0.3, 2.0), small(0.01, 0.5);
  auto fillT = [&](std::vector<double>& v, int64_t n, std::uniform_real_distribution<double>& dist, double sign = 1) {
    v.resize(n);
    for (double& e : v) e = E::value(E::from(sign * dist(rng)));
  };
  auto fillF = [&](std::vector<double>& v, int64_t n, std::uniform_real_distribution<double>& dist, double sign = 1) {
    v.resize(n);
    for (double& e : v) e = static_cast<float>(sign * dist(rng));
  };
  fillT(P.u, P.elements(), sym);
  if (c.softplus) {
    fillT(P.delta, P.elements(), sym);
  } else {
    fillT(P.delta, P.elements(), small);
  }
  fillF(P.A, P.dim * P.dstate, neg, -1);
  if (c.varB)
    fillT(P.B, P.bcElements(true), sym);
  else
    fillF(P.B, P.bcElements(false), sym);
  if (c.varC)
    fillT(P.C, P.bcElements(true), sym);
  else
    fillF(P.C, P.bcElements(false), sym);
  fillF(P.D, P.dim, sym);
  fillT(P.z, P.elements(), sym);
  fillF(P.bias, P.dim, sym);
  for (double& b : P.bias) b = c.softplus ? b : 0.1 * b;
  fillF(P.h0, P.stateElements(), sym);
  fillT(P.dy, P.elements(), sym);
  fillF(P.dFinal, P.stateElements(), sym);

  // Positions in no sequence (packed input): their y, du, ddelta, dz must be exactly 0.
  std::vector<char> covered(P.elements(), P.packed ? 0 : 1);
  if (P.packed) {
    for (const ScanSegment& s : P.segs) {
      for (int64_t d = 0; d < P.dim; ++d) {
        for (int64_t t = 0; t < s.length; ++t) covered[(s.batch * P.dim + d) * P.seqlen + s.start + t] = 1;
      }
    }
  }
  auto checkGaps = [&](const std::string& what, const std::vector<double>& got) {
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += !covered[i] && got[i] != 0.0;
    check(bad == 0, what + ": positions in no sequence not zero", static_cast<double>(bad), 0);
  };

  // Device arrays.
  const size_t E_ = static_cast<size_t>(P.elements());
  Buf<T> u(E_, c.offset), delta(E_, c.offset), z(E_, c.offset), y(E_, c.offset), dy(E_, c.offset), du(E_, c.offset),
      ddelta(E_, c.offset), dz(E_, c.offset);
  Buf<T> Bv(c.varB ? P.bcElements(true) : 0), Cv(c.varC ? P.bcElements(true) : 0);
  Buf<T> dBv(c.varB ? P.bcElements(true) : 0), dCv(c.varC ? P.bcElements(true) : 0);
  Buf<float> Bc(c.varB ? 0 : P.bcElements(false)), Cc(c.varC ? 0 : P.bcElements(false));
  Buf<float> dBc(c.varB ? 0 : P.bcElements(false)), dCc(c.varC ? 0 : P.bcElements(false));
  Buf<float> A(P.dim * P.dstate), D(P.dim), bias(P.dim), h0(P.stateElements()), dFinal(P.stateElements());
  Buf<float> states(P.totalChunks * P.dim * P.dstate), finalState(P.stateElements());
  Buf<float> dA(P.dim * P.dstate), dD(P.dim), dbias(P.dim), dh0(P.stateElements());
  u.set(P.u);
  delta.set(P.delta);
  z.set(P.z);
  dy.set(P.dy);
  if (c.varB)
    Bv.set(P.B);
  else
    Bc.set(P.B);
  if (c.varC)
    Cv.set(P.C);
  else
    Cc.set(P.C);
  A.set(P.A);
  D.set(P.D);
  bias.set(P.bias);
  h0.set(P.h0);
  dFinal.set(P.dFinal);
  for (Buf<T>* b : {&u, &delta, &z, &dy, &Bv, &Cv}) b->poisonGuards();
  for (Buf<float>* b : {&Bc, &Cc, &A, &D, &bias, &h0, &dFinal}) b->poisonGuards();
  // Inputs at positions in no sequence must not matter: NaN there.
  if (P.packed) {
    const T nan = E::from(std::nan(""));
    for (size_t i = 0; i < E_; ++i) {
      if (!covered[i]) u.data[i] = delta.data[i] = z.data[i] = dy.data[i] = nan;
    }
    for (int64_t n = 0; n < P.dstate * P.groups; ++n) {
      for (int64_t pos = 0; pos < P.seqlen; ++pos) {
        if (covered[pos]) continue;  // row 0, channel 0 stands for every channel of the row
        if (c.varB) Bv.data[n * P.seqlen + pos] = nan;
        if (c.varC) Cv.data[n * P.seqlen + pos] = nan;
      }
    }
  }

  rkcuda::SelectiveScanArgs a;
  a.dt = E::dtype;
  a.batch = P.batch;
  a.dim = P.dim;
  a.seqlen = P.seqlen;
  a.dstate = P.dstate;
  a.groups = P.groups;
  a.variableB = P.varB;
  a.variableC = P.varC;
  a.deltaSoftplus = P.softplus;
  a.nseq = P.nseq();
  a.segments = P.segs.data();
  a.packed = P.packed;
  a.chunk = rkcuda::selectiveScanChunk();
  a.totalChunks = P.totalChunks;
  a.u = u.data;
  a.delta = delta.data;
  a.A = A.data;
  a.B = c.varB ? static_cast<const void*>(Bv.data) : Bc.data;
  a.C = c.varC ? static_cast<const void*>(Cv.data) : Cc.data;
  a.D = c.hasD ? D.data : nullptr;
  a.z = c.hasZ ? z.data : nullptr;
  a.deltaBias = c.hasBias ? bias.data : nullptr;
  a.h0 = c.hasH0 ? h0.data : nullptr;

  emu::setTunable("selectiveScan.forwardWarps", c.fwdWarps);
  emu::setTunable("selectiveScan.backwardWarps", c.bwdWarps);

  // Forward.
  const Forward ref = referenceForward(P);
  y.poison();
  states.poison();
  finalState.poison();
  emu::launchLog.clear();
  rkcuda::Status st = rkcuda::selectiveScanForward(a, y.data, states.data, c.wantFinal ? finalState.data : nullptr);
  check(st.ok(), "forward status: " + st.message, st.code, 0);
  noteLaunches();
  checkNoLeaks("forward");
  if (!st.ok()) return;
  checkOutput("y", y, ref.y, tol);
  checkGaps("y", y.get());
  checkOutput("states (checkpoints)", states, ref.states, 1e-5);
  if (c.wantFinal) {
    checkOutput("finalState", finalState, ref.finalState, 1e-5);
  } else {
    const std::vector<double> untouched = finalState.get();
    check(std::all_of(untouched.begin(), untouched.end(), [](double v) { return std::isnan(v); }),
          "finalState written although not asked for");
  }
  if (!P.packed) {
    checkUnchanged("u", u, P.u);
    checkUnchanged("delta", delta, P.delta);
    if (c.varB) checkUnchanged("B", Bv, P.B);
  }
  if (c.hasH0) checkUnchanged("h0", h0, P.h0);

  // Backward, from the kernel's checkpoints.
  const Backward gref = referenceBackward(P);
  for (Buf<T>* b : {&du, &ddelta, &dz, &dBv, &dCv}) b->poison();
  for (Buf<float>* b : {&dA, &dD, &dbias, &dh0, &dBc, &dCc}) b->poison();
  rkcuda::SelectiveScanGrads g;
  g.dy = c.hasDy ? dy.data : nullptr;
  g.dFinal = c.hasDFinal ? dFinal.data : nullptr;
  g.states = states.data;
  g.du = du.data;
  g.ddelta = ddelta.data;
  g.dA = dA.data;
  g.dB = c.varB ? static_cast<void*>(dBv.data) : dBc.data;
  g.dC = c.varC ? static_cast<void*>(dCv.data) : dCc.data;
  g.dD = c.hasD ? dD.data : nullptr;
  g.dz = c.hasZ ? dz.data : nullptr;
  g.dDeltaBias = c.hasBias ? dbias.data : nullptr;
  g.dh0 = c.wantDh0 ? dh0.data : nullptr;
  st = rkcuda::selectiveScanBackward(a, g);
  check(st.ok(), "backward status: " + st.message, st.code, 0);
  noteLaunches();
  checkNoLeaks("backward");
  if (!st.ok()) return;
  checkOutput("du", du, gref.du, tol);
  checkGaps("du", du.get());
  checkOutput("ddelta", ddelta, gref.ddelta, tol);
  checkGaps("ddelta", ddelta.get());
  checkOutput("dA", dA, gref.dA, std::max(tol, 1e-5));
  if (c.varB)
    checkOutput("dB (variable)", dBv, gref.dB, tol);
  else
    checkOutput("dB (constant)", dBc, gref.dB, std::max(tol, 1e-5));
  if (c.varC)
    checkOutput("dC (variable)", dCv, gref.dC, tol);
  else
    checkOutput("dC (constant)", dCc, gref.dC, std::max(tol, 1e-5));
  if (c.hasD) checkOutput("dD", dD, gref.dD, std::max(tol, 1e-5));
  if (c.hasZ) {
    checkOutput("dz", dz, gref.dz, tol);
    checkGaps("dz", dz.get());
  }
  if (c.hasBias) checkOutput("dDeltaBias", dbias, gref.dbias, std::max(tol, 1e-5));
  if (c.wantDh0) {
    checkOutput("dh0", dh0, gref.dh0, std::max(tol, 1e-5));
  } else {
    check(std::isnan(dh0.data[0]), "dh0 written although not asked for");
  }
  if (!P.packed) checkUnchanged("dy", dy, P.dy);
}

// ---- decode ----

struct DecodeCase {
  int64_t batch = 2, dim = 4, dstate = 3, groups = 1, tokens = 1;
  bool softplus = true, hasD = true, hasZ = true, hasBias = true, updateState = true, intermediate = true;
  int perLane = 0;  // pinned states per lane (0: the launcher's choice)

  std::string describe(const char* dtype) const {
    char s[300];
    std::snprintf(s, sizeof s,
                  "decode %s batch=%lld dim=%lld dstate=%lld groups=%lld tokens=%lld softplus=%d D=%d z=%d bias=%d "
                  "update=%d intermediate=%d perLane=%d",
                  dtype, (long long)batch, (long long)dim, (long long)dstate, (long long)groups, (long long)tokens,
                  softplus, hasD, hasZ, hasBias, updateState, intermediate, perLane);
    return s;
  }
};

template <class T> void runDecodeCase(const DecodeCase& c, std::mt19937& rng) {
  using E = Elem<T>;
  context = c.describe(E::name);
  const double tol = tolerance<T>();
  const int64_t Bt = c.batch, Dm = c.dim, N = c.dstate, G = c.groups, Tk = c.tokens;
  std::uniform_real_distribution<double> sym(-1.0, 1.0), neg(0.3, 2.0);
  auto rnd = [&](int64_t n, bool storage, double lo = 0) {
    std::vector<double> v(n);
    for (double& e : v) e = storage ? E::value(E::from(sym(rng))) : static_cast<float>(lo != 0 ? -neg(rng) : sym(rng));
    return v;
  };
  std::vector<double> state = rnd(Bt * Dm * N, false), x = rnd(Bt * Dm * Tk, true), delta = rnd(Bt * Dm * Tk, true),
                      A = rnd(Dm * N, false, -1), Bm = rnd(Bt * G * N * Tk, true), Cm = rnd(Bt * G * N * Tk, true),
                      D = rnd(Dm, false), z = rnd(Bt * Dm * Tk, true), bias = rnd(Dm, false);

  // Reference.
  std::vector<double> yRef(Bt * Dm * Tk), stateRef = state, inter(Bt * Tk * Dm * N);
  for (int64_t b = 0; b < Bt; ++b) {
    for (int64_t d = 0; d < Dm; ++d) {
      const int64_t g = d / (Dm / G);
      for (int64_t t = 0; t < Tk; ++t) {
        const int64_t i = (b * Dm + d) * Tk + t;
        double dt = delta[i] + (c.hasBias ? bias[d] : 0.0);
        if (c.softplus) dt = dt <= 20 ? std::log1p(std::exp(dt)) : dt;
        double out = c.hasD ? D[d] * x[i] : 0.0;
        for (int64_t n = 0; n < N; ++n) {
          double& s = stateRef[(b * Dm + d) * N + n];
          const int64_t bc = ((b * G + g) * N + n) * Tk + t;
          s = std::exp(dt * A[d * N + n]) * s + dt * Bm[bc] * x[i];
          out += Cm[bc] * s;
          inter[((b * Tk + t) * Dm + d) * N + n] = s;
        }
        yRef[i] = c.hasZ ? out * z[i] * sigmoid(z[i]) : out;
      }
    }
  }

  Buf<float> stateB(Bt * Dm * N), AB(Dm * N), DB(Dm), biasB(Dm), interB(Bt * Tk * Dm * N);
  Buf<T> xB(Bt * Dm * Tk), deltaB(Bt * Dm * Tk), zB(Bt * Dm * Tk), yB(Bt * Dm * Tk), BB(Bt * G * N * Tk),
      CB(Bt * G * N * Tk);
  stateB.set(state);
  AB.set(A);
  DB.set(D);
  biasB.set(bias);
  xB.set(x);
  deltaB.set(delta);
  zB.set(z);
  BB.set(Bm);
  CB.set(Cm);
  yB.poison();
  interB.poison();

  rkcuda::SelectiveStateUpdateArgs a;
  a.dt = E::dtype;
  a.batch = Bt;
  a.dim = Dm;
  a.dstate = N;
  a.groups = G;
  a.tokens = Tk;
  a.deltaSoftplus = c.softplus;
  a.updateState = c.updateState;
  a.state = stateB.data;
  a.x = xB.data;
  a.delta = deltaB.data;
  a.A = AB.data;
  a.B = BB.data;
  a.C = CB.data;
  a.D = c.hasD ? DB.data : nullptr;
  a.z = c.hasZ ? zB.data : nullptr;
  a.deltaBias = c.hasBias ? biasB.data : nullptr;
  a.y = yB.data;
  a.intermediate = c.intermediate ? interB.data : nullptr;
  emu::setTunable("selectiveStateUpdate.statesPerLane", c.perLane);
  emu::launchLog.clear();
  const rkcuda::Status st = rkcuda::selectiveStateUpdate(a);
  check(st.ok(), "decode status: " + st.message, st.code, 0);
  noteLaunches();
  checkNoLeaks("decode");
  if (!st.ok()) return;
  checkOutput("decode y", yB, yRef, tol);
  if (c.updateState) {
    checkOutput("decode state", stateB, stateRef, 1e-5);
  } else {
    checkUnchanged("decode state (updateState off)", stateB, state);
  }
  if (c.intermediate) {
    checkOutput("decode intermediate states", interB, inter, 1e-5);
  } else {
    check(std::isnan(interB.data[0]), "intermediate states written although not asked for");
  }
  checkUnchanged("decode x", xB, x);

  // The same tokens through the scan: y and the final state agree with the decode step.
  Buf<T> yScan(Bt * Dm * Tk);
  Buf<float> states(Bt * ((Tk + kChunk - 1) / kChunk) * Dm * N), finalScan(Bt * Dm * N), h0(Bt * Dm * N);
  h0.set(state);
  std::vector<ScanSegment> segs;
  for (int64_t b = 0; b < Bt; ++b) segs.push_back({b, 0, Tk, b * ((Tk + kChunk - 1) / kChunk)});
  rkcuda::SelectiveScanArgs s;
  s.dt = E::dtype;
  s.batch = Bt;
  s.dim = Dm;
  s.seqlen = Tk;
  s.dstate = N;
  s.groups = G;
  s.variableB = s.variableC = true;
  s.deltaSoftplus = c.softplus;
  s.nseq = Bt;
  s.segments = segs.data();
  s.chunk = rkcuda::selectiveScanChunk();
  s.totalChunks = Bt * ((Tk + kChunk - 1) / kChunk);
  s.u = xB.data;
  s.delta = deltaB.data;
  s.A = AB.data;
  s.B = BB.data;
  s.C = CB.data;
  s.D = a.D;
  s.z = a.z;
  s.deltaBias = a.deltaBias;
  s.h0 = h0.data;
  const rkcuda::Status ss = rkcuda::selectiveScanForward(s, yScan.data, states.data, finalScan.data);
  check(ss.ok(), "scan status: " + ss.message, ss.code, 0);
  noteLaunches();
  if (!ss.ok()) return;
  compare("decode y == scan y", yB.get(), yScan.get(), tol);
  if (c.updateState) compare("decode state == scan final state", stateB.get(), finalScan.get(), 1e-5);
}

// ---- the reverse warp scan (common/scan.cuh) on its own ----

__global__ void reverseScanKernel(const rkcuda::scan::Affine* in, rkcuda::scan::Affine* inclusive,
                                  rkcuda::scan::Affine* exclusive, int width) {
  namespace scan = rkcuda::scan;
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  scan::Affine incl, excl;
  switch (width) {
    case 4:
      incl = scan::warpInclusiveScanReverse<4>(in[i]);
      excl = scan::warpExclusiveFromInclusiveReverse<4>(incl);
      break;
    case 16:
      incl = scan::warpInclusiveScanReverse<16>(in[i]);
      excl = scan::warpExclusiveFromInclusiveReverse<16>(incl);
      break;
    default:
      incl = scan::warpInclusiveScanReverse<32>(in[i]);
      excl = scan::warpExclusiveFromInclusiveReverse<32>(incl);
      break;
  }
  inclusive[i] = incl;
  exclusive[i] = excl;
}

void checkReverseWarpScan(std::mt19937& rng) {
  context = "warpInclusiveScanReverse";
  // Small integers: fp32 is exact, so results must equal the reference exactly.
  const int threads = 64;
  std::vector<rkcuda::scan::Affine> in(threads), incl(threads), excl(threads);
  for (auto& x : in)
    x = {static_cast<float>(static_cast<int>(rng() % 3) - 1), static_cast<float>(static_cast<int>(rng() % 9) - 4)};
  for (int width : {4, 16, 32}) {
    emu::launchLog.clear();
    const rkcuda::Status st =
        rkcuda::launch(reverseScanKernel, dim3(1), dim3(threads), 0, in.data(), incl.data(), excl.data(), width);
    check(st.ok(), "reverse scan launch");
    emu::launchLog.clear();
    for (int i = 0; i < threads; ++i) {
      const int groupEnd = (i / width + 1) * width;  // one past the last lane of the group
      double a = 1, b = 0;  // composition of the maps of lanes groupEnd-1 down to i (applied in that order)
      double ea = 1, eb = 0;
      for (int j = groupEnd - 1; j >= i; --j) {
        if (j == i) {
          ea = a;
          eb = b;
        }
        a = a * in[j].a;
        b = in[j].a * b + in[j].b;
      }
      const std::string at = " width " + std::to_string(width) + " lane " + std::to_string(i);
      check(incl[i].a == a && incl[i].b == b, "inclusive" + at, incl[i].b, b);
      check(excl[i].a == ea && excl[i].b == eb, "exclusive" + at, excl[i].b, eb);
    }
  }
}

// ---- arguments the launchers refuse ----

void checkRefusals() {
  context = "argument checks";
  std::vector<float> buf(4096, 0.5f);
  std::vector<ScanSegment> segs = {{0, 0, 5, 0}, {1, 0, 5, 1}};
  auto base = [&]() {
    rkcuda::SelectiveScanArgs a;
    a.dt = DType::F32;
    a.batch = 2;
    a.dim = 4;
    a.seqlen = 5;
    a.dstate = 3;
    a.groups = 2;
    a.variableB = a.variableC = true;
    a.nseq = 2;
    a.segments = segs.data();
    a.chunk = rkcuda::selectiveScanChunk();
    a.totalChunks = 2;
    a.u = a.delta = a.B = a.C = buf.data();
    a.A = buf.data();
    return a;
  };
  float* out = buf.data() + 1024;
  auto refused = [&](const char* what, rkcuda::SelectiveScanArgs a) {
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveScanForward(a, out, out, nullptr);
    check(!st.ok() && !st.message.empty(), std::string("refused: ") + what);
    check(emu::launchLog.empty(), std::string("no launch: ") + what);
    checkNoLeaks(what);
  };
  {
    rkcuda::SelectiveScanArgs a = base();
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveScanForward(a, out, out, nullptr);
    check(st.ok(), "the valid base call: " + st.message);
    emu::launchLog.clear();
  }
  rkcuda::SelectiveScanArgs a = base();
  a.dstate = 0;
  refused("dstate 0", a);
  a = base();
  a.dstate = 257;
  refused("dstate 257", a);
  a = base();
  a.groups = 3;
  refused("dim not a multiple of groups", a);
  a = base();
  a.chunk = 128;
  refused("another chunk", a);
  a = base();
  a.totalChunks = 3;
  refused("totalChunks", a);
  a = base();
  a.nseq = 1;
  refused("nseq != batch", a);
  a = base();
  a.packed = true;
  refused("packed with batch 2", a);
  std::vector<ScanSegment> bad = {{0, 0, 5, 0}, {1, 1, 5, 1}};
  a = base();
  a.segments = bad.data();
  refused("sequence out of range", a);
  std::vector<ScanSegment> overlap = {{0, 0, 3, 0}, {0, 2, 2, 1}};
  a = base();
  a.batch = 1;
  a.packed = true;
  a.segments = overlap.data();
  refused("overlapping packed sequences", a);
  std::vector<ScanSegment> offsets = {{0, 0, 5, 0}, {1, 0, 5, 0}};
  a = base();
  a.segments = offsets.data();
  refused("wrong chunkOffset", a);
  a = base();
  a.u = nullptr;
  refused("null u", a);
  {
    a = base();
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveScanForward(a, nullptr, out, nullptr);
    check(!st.ok(), "refused: null y");
  }
  // A block size the kernels do not have, after the sequence table was uploaded: refused, freed.
  {
    std::vector<ScanSegment> packed = {{0, 0, 2, 0}, {0, 3, 1, 1}};
    a = base();
    a.batch = 1;
    a.packed = true;
    a.segments = packed.data();
    emu::setTunable("selectiveScan.forwardWarps", 3);
    refused("unsupported forward block size", a);
    emu::setTunable("selectiveScan.forwardWarps", 0);
    rkcuda::SelectiveScanGrads g;
    g.states = out;
    g.du = g.ddelta = g.dB = g.dC = out;
    g.dA = out;
    emu::setTunable("selectiveScan.backwardWarps", 8);
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveScanBackward(a, g);
    check(!st.ok(), "refused: unsupported backward block size");
    checkNoLeaks("unsupported backward block size");
    emu::setTunable("selectiveScan.backwardWarps", 0);
    emu::launchLog.clear();
  }
  // Backward: dD exactly when D.
  {
    a = base();
    rkcuda::SelectiveScanGrads g;
    g.states = out;
    g.du = g.ddelta = g.dB = g.dC = out;
    g.dA = out;
    g.dD = out;
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveScanBackward(a, g);
    check(!st.ok(), "refused: dD without D");
    check(emu::launchLog.empty(), "no launch: dD without D");
  }
  // Decode: too few lanes for the states.
  {
    rkcuda::SelectiveStateUpdateArgs d;
    d.dt = DType::F32;
    d.batch = 1;
    d.dim = 2;
    d.dstate = 64;
    d.state = out;
    d.x = d.delta = d.B = d.C = d.y = buf.data();
    d.A = buf.data();
    emu::setTunable("selectiveStateUpdate.statesPerLane", 1);
    emu::launchLog.clear();
    const rkcuda::Status st = rkcuda::selectiveStateUpdate(d);
    check(!st.ok(), "refused: 1 state per lane for dstate 64");
    check(emu::launchLog.empty(), "no launch: 1 state per lane for dstate 64");
    emu::setTunable("selectiveStateUpdate.statesPerLane", 0);
    d.dstate = 300;
    check(!rkcuda::selectiveStateUpdate(d).ok(), "refused: decode dstate 300");
  }
  // Nothing to do: no channels.
  {
    a = base();
    a.dim = 0;
    emu::launchLog.clear();
    check(rkcuda::selectiveScanForward(a, out, out, nullptr).ok(), "dim 0 is a no-op");
    check(emu::launchLog.empty(), "dim 0: no launch");
  }
}

// Packed input with no sequences at all: y is all zeros.
void checkNoSequences() {
  context = "packed input without sequences";
  Buf<float> y(2 * 9), states(1), in(2 * 9);
  y.poison();
  rkcuda::SelectiveScanArgs a;
  a.dt = DType::F32;
  a.batch = 1;
  a.dim = 2;
  a.seqlen = 9;
  a.dstate = 2;
  a.packed = true;
  a.nseq = 0;
  a.chunk = rkcuda::selectiveScanChunk();
  a.u = a.delta = a.B = a.C = in.data;
  a.A = in.data;
  emu::launchLog.clear();
  const rkcuda::Status st = rkcuda::selectiveScanForward(a, y.data, states.data, nullptr);
  check(st.ok(), "status: " + st.message);
  noteLaunches();
  checkNoLeaks("no sequences");
  checkOutput("y", y, std::vector<double>(18, 0.0), 0);
}

// ---- the case set ----

template <class T> void runSuite(std::mt19937& rng, int typeIndex) {
  const int64_t C = kChunk;
  int rot = typeIndex;  // rotates the pinned block sizes and options over the cases
  const int fwd[] = {4, 8, 0}, bwd[] = {2, 4, 0};
  auto next = [&](ScanCase c) {
    c.fwdWarps = fwd[rot % 3];
    c.bwdWarps = bwd[(rot / 3 + rot) % 3];
    ++rot;
    runScanCase<T>(c, rng);
  };

  // Lengths around the chunk and tile boundaries, with everything present.
  for (int64_t L : {int64_t{1}, int64_t{7}, C - 1, C, C + 1, 2 * C + 3}) {
    ScanCase c;
    c.seqlen = L;
    c.dim = L > 100 ? 3 : 4;
    c.dstate = 3;
    c.batch = L == 7 ? 3 : 1;
    next(c);
  }
  {
    ScanCase c;  // empty sequences: finalState = h0, dh0 = dFinal, parameter gradients 0
    c.seqlen = 0;
    c.batch = 2;
    next(c);
  }
  {
    ScanCase c;  // four forward tiles' worth of checkpoints, the carry passed three times
    c.seqlen = 6 * C + 9;
    c.dim = 1;
    c.dstate = 2;
    c.varC = false;
    next(c);
  }
  // dstate 1, 5, 16 and 256; groups 2 with several blocks per group; batch 3.
  {
    ScanCase c;
    c.dstate = 1;
    c.seqlen = C + 1;
    c.dim = 2;
    next(c);
    c.dstate = 5;
    c.seqlen = 9;
    c.dim = 6;
    c.groups = 2;
    c.batch = 3;
    next(c);
    c.dstate = 16;
    c.seqlen = 40;
    c.dim = 4;
    c.groups = 2;
    c.batch = 1;
    next(c);
    c.dstate = 256;
    c.seqlen = 3;
    c.dim = 2;
    c.groups = 1;
    next(c);
    c.dstate = 2;
    c.seqlen = 11;
    c.dim = 18;  // several blocks per group for both block sizes, the last one partial
    c.groups = 2;
    next(c);
  }
  // Constant / variable B and C, mixed; options off.
  for (int m = 0; m < 4; ++m) {
    ScanCase c;
    c.varB = m & 1;
    c.varC = m & 2;
    c.seqlen = m == 3 ? C + 5 : 13;
    c.dim = 3;
    c.dstate = 2;
    c.batch = m == 1 ? 3 : 1;
    c.groups = m == 2 ? 3 : 1;
    next(c);
  }
  {
    ScanCase c;  // everything optional absent
    c.hasD = c.hasZ = c.hasBias = c.softplus = c.hasH0 = c.wantFinal = c.hasDy = c.hasDFinal = c.wantDh0 = false;
    c.seqlen = C + 3;
    c.dim = 2;
    c.dstate = 2;
    next(c);
    c.hasDFinal = true;  // only the final state's gradient flows
    c.wantFinal = true;
    c.seqlen = 9;
    next(c);
    c.hasDFinal = false;  // only dy
    c.hasDy = true;
    c.hasZ = true;
    c.softplus = true;
    next(c);
  }
  // Vector path (seqlen a multiple of 8, aligned) and element-wise path (misaligned tensors).
  {
    ScanCase c;
    c.seqlen = 24;
    c.dim = 3;
    next(c);
    c.offset = 1;
    next(c);
    c.seqlen = 2 * C;
    c.dim = 2;
    c.offset = 0;
    next(c);
  }
  // Packed sequences: from cuSeqlens (a zero-length sequence, a tail in no sequence), and with gaps
  // between sequences; long ones cross chunks and tiles; starts at odd positions.
  {
    ScanCase c;
    c.dim = 3;
    c.seqlen = 40;
    c.cuSeqlens = {0, 9, 9, 16, 37};  // [16, 37) moves in vectors, its last one partial
    next(c);
    c.cuSeqlens.clear();
    c.segments = {{0, 2, 5, 0}, {0, 7, 0, 0}, {0, 8, 19, 0}, {0, 33, 1, 0}};
    c.hasH0 = true;
    next(c);
    c.seqlen = C + 3 * 8 + 3 + 40;
    c.dim = 2;
    c.segments = {{0, 0, 8, 0}, {0, 8, C + 3 * 8 + 3, 0}, {0, C + 3 * 8 + 11, 0, 0}, {0, C + 3 * 8 + 13, 30, 0}};
    c.varC = false;
    next(c);
  }
}

template <class T> void runDecodeSuite(std::mt19937& rng) {
  for (int tokens : {1, 3}) {
    for (int64_t N : {int64_t{1}, int64_t{5}, int64_t{16}, int64_t{40}, int64_t{256}}) {
      for (int perLane : {1, 2, 4, 8}) {
        if (perLane * 32 < N) continue;
        DecodeCase c;
        c.tokens = tokens;
        c.dstate = N;
        c.perLane = perLane;
        c.dim = N >= 40 ? 2 : 6;
        c.groups = N >= 40 ? 1 : 2;
        c.batch = N >= 40 ? 1 : 2;
        const int v = static_cast<int>(N % 4) + perLane + tokens;
        c.updateState = v % 2 == 0;
        c.intermediate = v % 3 != 0;
        c.hasZ = v % 4 != 1;
        c.hasD = v % 5 != 2;
        c.hasBias = v % 3 != 1;
        c.softplus = v % 4 != 3;
        runDecodeCase<T>(c, rng);
      }
    }
  }
  DecodeCase c;  // the launcher's own choice
  runDecodeCase<T>(c, rng);
}

template <class T> void checkCoverage() {
  using namespace rkcuda;
  const std::pair<const void*, const char*> kernels[] = {
      {emu::kernelId(selectiveScanForwardKernel<T, 4>), "forward, 4 warps"},
      {emu::kernelId(selectiveScanForwardKernel<T, 8>), "forward, 8 warps"},
      {emu::kernelId(selectiveScanBackwardKernel<T, 2>), "backward, 2 warps"},
      {emu::kernelId(selectiveScanBackwardKernel<T, 4>), "backward, 4 warps"},
      {emu::kernelId(selectiveStateUpdateKernel<T, 1>), "decode, 1 state per lane"},
      {emu::kernelId(selectiveStateUpdateKernel<T, 2>), "decode, 2 states per lane"},
      {emu::kernelId(selectiveStateUpdateKernel<T, 4>), "decode, 4 states per lane"},
      {emu::kernelId(selectiveStateUpdateKernel<T, 8>), "decode, 8 states per lane"},
      {emu::kernelId(zeroGapsKernel<T>), "zeros for positions in no sequence"},
  };
  context = "coverage";
  for (const auto& k : kernels)
    check(launched.count(k.first) == 1, std::string("never ran: ") + Elem<T>::name + " " + k.second);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20240611);
  checkReferenceGradients();
  checkReverseWarpScan(rng);
  checkRefusals();
  checkNoSequences();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  runDecodeSuite<float>(rng);
  runDecodeSuite<__half>(rng);
  runDecodeSuite<__nv_bfloat16>(rng);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("selective scan on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
