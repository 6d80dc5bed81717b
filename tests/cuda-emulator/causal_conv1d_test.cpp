// CPU test of the causal convolution's kernels (cuda/conv/causal_conv1d.cu, compiled unmodified)
// through the SIMT emulator in emu.h. The real launchers run on small problems and every output is
// compared with a float64 reference written here as plain loops (the backward checked against finite
// differences of the reference forward):
//   * causalConv1dForward / causalConv1dBackward for every dtype; channels-first and channels-last;
//     widths 2, 3 and 4; dilation 1 and 3; SiLU on and off; bias, h0, dY, dFinal, dh0 each on and off;
//     packed sequences (an empty one, one shorter than the carry state, a gap and a tail in no
//     sequence, where x is NaN); the state window (slots before a sequence's start must be zero);
//   * arguments the launchers must refuse.
// Outputs are poisoned (NaN) before each call; sentinels around every output catch out-of-bounds
// writes; positions in no sequence must be exactly 0; every stream-ordered allocation must be freed;
// every kernel instantiation must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/causal_conv1d_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "conv/causal_conv1d.cu"
#include "harness.h"

#include <chrono>
#include <random>

namespace {

using rkcuda::DType;
using rkcuda::ScanSegment;

template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 5e-3;
  else
    return 2e-2;
}

struct Problem {
  int64_t batch = 1, C = 1, T = 1, W = 2, dilation = 1, window = 0;
  bool last = false, silu = false, bias = false, h0 = false, dY = true, dFinal = false, packed = false;
  std::vector<ScanSegment> segs;
  std::vector<double> x, w, b, s0, dy, dfin;
  int64_t L() const { return (W - 1) * dilation; }
  int64_t nseq() const { return static_cast<int64_t>(segs.size()); }
  int64_t xi(int64_t bb, int64_t c, int64_t t) const { return last ? (bb * T + t) * C + c : (bb * C + c) * T + t; }
  int64_t si(int64_t s, int64_t c, int64_t p) const { return last ? (s * L() + p) * C + c : (s * C + c) * L() + p; }
};

struct Ref {
  std::vector<double> y, fin, win, dx, dw, db, dh0;
};

double in(const Problem& P, const ScanSegment& sg, int64_t s, int64_t c, int64_t u) {
  if (u >= 0) return P.x[P.xi(sg.batch, c, sg.start + u)];
  return P.h0 ? P.s0[P.si(s, c, P.L() + u)] : 0.0;
}

Ref reference(const Problem& P) {
  const int64_t L = P.L(), n = P.batch * P.C * P.T, ns = P.nseq() * P.C * L;
  Ref r;
  r.y.assign(n, 0.0), r.dx.assign(n, 0.0), r.fin.assign(ns, 0.0), r.win.assign(P.window * ns, 0.0);
  r.dw.assign(P.C * P.W, 0.0), r.db.assign(P.C, 0.0), r.dh0.assign(ns, 0.0);
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  for (int64_t s = 0; s < P.nseq(); ++s) {
    const ScanSegment& sg = P.segs[s];
    for (int64_t c = 0; c < P.C; ++c) {
      std::vector<double> dxx(L + sg.length, 0.0);
      for (int64_t u = 0; u < sg.length; ++u) {
        double pre = P.bias ? P.b[c] : 0.0;
        for (int64_t j = 0; j < P.W; ++j) pre += P.w[c * P.W + j] * in(P, sg, s, c, u - (P.W - 1 - j) * P.dilation);
        r.y[P.xi(sg.batch, c, sg.start + u)] = P.silu ? pre * sig(pre) : pre;
        const double g = P.dY ? P.dy[P.xi(sg.batch, c, sg.start + u)] : 0.0;
        const double dp = P.silu ? g * sig(pre) * (1 + pre * (1 - sig(pre))) : g;
        r.db[c] += dp;
        for (int64_t j = 0; j < P.W; ++j) {
          const int64_t v = u - (P.W - 1 - j) * P.dilation;
          r.dw[c * P.W + j] += dp * in(P, sg, s, c, v);
          dxx[L + v] += dp * P.w[c * P.W + j];
        }
      }
      for (int64_t p = 0; p < L; ++p) {
        r.fin[P.si(s, c, p)] = in(P, sg, s, c, sg.length - L + p);
        if (P.dFinal) dxx[sg.length + p] += P.dfin[P.si(s, c, p)];
      }
      for (int64_t j = 0; j < P.window; ++j) {
        const int64_t endAt = sg.length - P.window + j;
        if (endAt < 0) continue;
        for (int64_t p = 0; p < L; ++p) r.win[j * ns + P.si(s, c, p)] = in(P, sg, s, c, endAt + 1 - L + p);
      }
      for (int64_t u = 0; u < sg.length; ++u) r.dx[P.xi(sg.batch, c, sg.start + u)] = dxx[L + u];
      for (int64_t p = 0; p < L; ++p) r.dh0[P.si(s, c, p)] = dxx[p];
    }
  }
  return r;
}

// The reference backward against central differences of sum(y * dy) + sum(fin * dfin).
void checkReferenceGradients() {
  std::mt19937 rng(11);
  std::normal_distribution<double> nd(0.0, 1.0);
  Problem P;
  P.batch = 1, P.C = 2, P.T = 7, P.W = 3, P.dilation = 2, P.silu = true, P.bias = true, P.h0 = true, P.dFinal = true;
  P.packed = true;
  P.segs = {{0, 0, 2, 0}, {0, 2, 0, 2}, {0, 3, 4, 2}};
  auto fill = [&](std::vector<double>& v, int64_t n) {
    v.resize(n);
    for (double& e : v) e = nd(rng);
  };
  fill(P.x, P.C * P.T), fill(P.w, P.C * P.W), fill(P.b, P.C), fill(P.s0, P.nseq() * P.C * P.L());
  fill(P.dy, P.C * P.T), fill(P.dfin, P.nseq() * P.C * P.L());
  context = "reference gradients";
  const Ref r = reference(P);
  auto loss = [&]() {
    const Ref q = reference(P);
    double l = 0;
    for (size_t i = 0; i < q.y.size(); ++i) l += q.y[i] * P.dy[i];
    for (size_t i = 0; i < q.fin.size(); ++i) l += q.fin[i] * P.dfin[i];
    return l;
  };
  auto fd = [&](std::vector<double>& v, const std::vector<double>& an, const char* name) {
    // Positions in no sequence (x[2 + c*T] here) get no gradient either way.
    compare(std::string("reference d") + name, an, centralDifferences(v, loss), 1e-6);
  };
  fd(P.x, r.dx, "x");
  fd(P.w, r.dw, "weight");
  fd(P.b, r.db, "bias");
  fd(P.s0, r.dh0, "h0");
}

struct Case {
  int64_t batch, C, T, W, dilation, window;
  bool last, silu, bias, h0, dY, dFinal, dh0, packed;
};

template <class T> void runCase(const Case& c, std::mt19937& rng) {
  Problem P;
  P.batch = c.batch, P.C = c.C, P.T = c.T, P.W = c.W, P.dilation = c.dilation, P.window = c.window;
  P.last = c.last, P.silu = c.silu, P.bias = c.bias, P.h0 = c.h0, P.dY = c.dY, P.dFinal = c.dFinal, P.packed = c.packed;
  if (c.packed) {
    // A sequence, an empty one, a gap of 2, one shorter than the carry state, then a tail.
    const int64_t a = c.T / 2, b = std::max<int64_t>(1, P.L() - 1);
    P.segs = {{0, 0, a, 0}, {0, a, 0, a}, {0, a + 2, b, a}};
  } else {
    for (int64_t s = 0; s < c.batch; ++s) P.segs.push_back({s, 0, c.T, s * c.T});
  }
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, int64_t n) {
    v.resize(n);
    for (double& e : v) e = roundTo<T>(nd(rng));
  };
  const int64_t n = c.batch * c.C * c.T, ns = P.nseq() * c.C * P.L();
  fill(P.x, n), fill(P.w, c.C * c.W), fill(P.b, c.C), fill(P.s0, ns), fill(P.dy, n), fill(P.dfin, ns);
  std::vector<bool> covered(n, !c.packed);
  for (const ScanSegment& sg : P.segs)
    for (int64_t t = 0; t < sg.length; ++t)
      for (int64_t ch = 0; ch < c.C; ++ch) covered[P.xi(sg.batch, ch, sg.start + t)] = true;
  context = std::string(Elem<T>::name) + " batch " + std::to_string(c.batch) + " C " + std::to_string(c.C) + " T " +
            std::to_string(c.T) + " W " + std::to_string(c.W) + " dilation " + std::to_string(c.dilation) +
            (c.last ? " channels-last" : "") + (c.silu ? " silu" : "") + (c.bias ? " bias" : "") + (c.h0 ? " h0" : "") +
            (c.packed ? " packed" : "") + (c.window ? " window " + std::to_string(c.window) : "");
  const Ref ref = reference(P);
  Buf<T> x(n), w(P.w.size()), b(c.C), s0(std::max<int64_t>(ns, 1)), dy(n), dfin(std::max<int64_t>(ns, 1));
  x.set(P.x), w.set(P.w), b.set(P.b), s0.set(P.s0), dy.set(P.dy), dfin.set(P.dfin);
  for (int64_t i = 0; i < n; ++i)
    if (!covered[i]) x.data[i] = Elem<T>::from(NAN);
  for (auto* buf : {&x, &w, &b, &s0, &dy, &dfin}) buf->poisonGuards();
  rkcuda::CausalConv1dArgs a;
  a.dt = Elem<T>::dtype, a.batch = c.batch, a.C = c.C, a.T = c.T, a.W = c.W, a.dilation = c.dilation;
  a.channelsLast = c.last, a.silu = c.silu, a.nseq = P.nseq(), a.segments = P.segs.data(), a.packed = c.packed;
  a.x = x.data, a.weight = w.data, a.bias = c.bias ? b.data : nullptr, a.h0 = c.h0 ? s0.data : nullptr;
  Buf<T> y(n), fin(std::max<int64_t>(ns, 1)), win(std::max<int64_t>(c.window * ns, 1));
  y.poison(), fin.poison(), win.poison();
  a.window = c.window, a.windowStates = c.window ? win.data : nullptr;
  rkcuda::Status st = rkcuda::causalConv1dForward(a, y.data, fin.data);
  check(st.ok(), "forward status: " + st.message);
  const double tol = tolerance<T>();
  checkOutput("y", y, ref.y, tol);
  if (ns > 0) checkOutput("finalState", fin, ref.fin, tol);
  if (c.window) checkOutput("window", win, ref.win, tol);
  for (int64_t i = 0; i < n; ++i)
    if (!covered[i]) check(Elem<T>::value(y.data[i]) == 0.0, "y in no sequence");
  noteLaunches();
  Buf<T> dx(n), dw(P.w.size()), db(c.C), dh0(std::max<int64_t>(ns, 1));
  dx.poison(), dw.poison(), db.poison(), dh0.poison();
  rkcuda::CausalConv1dGrads g;
  g.dY = c.dY ? dy.data : nullptr, g.dFinal = c.dFinal ? dfin.data : nullptr;
  g.dx = dx.data, g.dweight = dw.data, g.dbias = c.bias ? db.data : nullptr, g.dh0 = c.dh0 ? dh0.data : nullptr;
  a.window = 0, a.windowStates = nullptr;
  st = rkcuda::causalConv1dBackward(a, g);
  check(st.ok(), "backward status: " + st.message);
  checkOutput("dx", dx, ref.dx, tol);
  checkOutput("dweight", dw, ref.dw, tol);
  if (c.bias) checkOutput("dbias", db, ref.db, tol);
  if (c.dh0 && ns > 0) checkOutput("dh0", dh0, ref.dh0, tol);
  for (int64_t i = 0; i < n; ++i)
    if (!covered[i]) check(Elem<T>::value(dx.data[i]) == 0.0, "dx in no sequence");
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
}

void checkRefusals() {
  context = "refusals";
  rkcuda::CausalConv1dArgs a;
  std::vector<ScanSegment> segs = {{0, 0, 4, 0}};
  float buf[64] = {};
  a.batch = 1, a.C = 2, a.T = 4, a.W = 1, a.nseq = 1, a.segments = segs.data(), a.x = buf, a.weight = buf;
  check(!rkcuda::causalConv1dForward(a, buf, nullptr).ok(), "width 1");
  a.W = 4, a.dilation = 0;
  check(!rkcuda::causalConv1dForward(a, buf, nullptr).ok(), "dilation 0");
  a.dilation = 1, a.window = 9;
  check(!rkcuda::causalConv1dForward(a, buf, nullptr).ok(), "window 9");
  a.window = 0, segs[0].chunkOffset = 1;
  check(!rkcuda::causalConv1dForward(a, buf, nullptr).ok(), "bad sequence table");
}

template <class T> void runSuite(std::mt19937& rng, int variant) {
  const Case cases[] = {
      {2, 5, 37, 4, 1, 3, false, true, true, true, true, true, true, false},
      {2, 33, 9, 3, 3, 0, true, true, false, true, variant != 1, true, true, false},
      {1, 7, 40, 4, 2, 2, variant == 2, false, true, true, true, true, true, true},
      {3, 4, 1, 2, 1, 4, true, true, true, false, true, false, false, false},
  };
  for (const Case& c : cases) runCase<T>(c, rng);
}

template <class T> void checkCoverage() {
  for (const void* k : {emu::kernelId(rkcuda::convForwardKernel<T>), emu::kernelId(rkcuda::convStatesKernel<T>),
                        emu::kernelId(rkcuda::convDpreKernel<T>), emu::kernelId(rkcuda::convDxKernel<T>),
                        emu::kernelId(rkcuda::convWeightGradKernel<T>)}) {
    context = std::string("coverage ") + Elem<T>::name;
    check(launched.count(k) == 1, "a kernel instantiation never ran");
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
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("causal conv on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
