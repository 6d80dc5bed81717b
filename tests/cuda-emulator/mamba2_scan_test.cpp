// CPU test of the Mamba-2 (SSD) kernels (cuda/ssd/mamba2_scan.cu, compiled unmodified) through the SIMT
// emulator in emu.h. The real launchers run on small problems and every output is compared with a
// float64 reference written here as plain loops (the reference backward checked against finite
// differences of the reference forward):
//   * mamba2Prepare, mamba2Finish, mamba2FinishBackward, mamba2PrepareBackward for every dtype;
//     rows 1, 5 and 37, H 1, 2 and 3, P 1, 5, 64 and 300 (past the channels whose sums stay in
//     registers); softplus on and off (values above its cut-off of 20 too); the clamp on and off
//     (values on both sides of each limit); D absent, per head and per channel; z and dtBias each
//     absent and present; dDtBias and dO null where allowed; the backward with one block per head
//     and with many blocks per head (rowsPerSplit pinned);
//   * mamba2TransposeStates on square, ragged and degenerate matrices;
//   * mamba2Step for every dtype: T 1 and 3, G 1 and > 1, N 1, 7, 16, 64 and 256, P 1, 5 and 64,
//     update and intermediate each on and off, every states-per-lane configuration;
//   * arguments the launchers must refuse.
// Outputs are poisoned (NaN) before each call; sentinels around every output catch out-of-bounds
// writes; outputs a call must leave alone (dDtBias and intermediate when null, the state without
// update) must keep their bytes, and dD without D must be zeros; every stream-ordered allocation
// must be freed; every kernel instantiation must run.
// Prints failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure. Built and
// run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/mamba2_scan_test.cpp
#include "emu.h"
// The kernels under test, after the emulator.
#include "ssd/mamba2_scan.cu"
#include "harness.h"

#include <chrono>
#include <random>

namespace {

using rkcuda::DType;

template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 5e-3;
  else
    return 2e-2;
}
constexpr double kF32 = 1e-5;  // fp32 outputs (g, the sums over rows, the states), any dtype

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// ---- the gate and the output ----

// D: 0 absent, 1 per head, 2 per channel.
struct Gate {
  int64_t rows = 1, H = 1, P = 1;
  bool softplus = false, clamp = false, z = false, bias = false;
  int dMode = 0;
  double dtMin = 0, dtMax = 0;
  std::vector<double> x, dt, A, dtBias, D, zv;
  int64_t n() const { return rows * H * P; }
  int64_t dSize() const { return dMode == 2 ? H * P : H; }
  double skip(int64_t h, int64_t p) const { return dMode == 0 ? 0.0 : D[dMode == 2 ? h * P + p : h]; }
  // The effective time step of dt value `raw` of head h, and its derivative.
  double step(double raw, int64_t h, double* grad = nullptr) const {
    double d = raw + (bias ? dtBias[h] : 0.0), gr = 1.0;
    if (softplus) {
      gr = d > 20 ? 1.0 : sigmoid(d);
      d = d > 20 ? d : std::log1p(std::exp(d));
    }
    if (clamp) {
      if (!(d > dtMin && d < dtMax)) gr = 0.0;
      d = std::min(std::max(d, dtMin), dtMax);
    }
    if (grad != nullptr) *grad = gr;
    return d;
  }
};

struct GateRef {
  std::vector<double> g, v, y, dO, dz, dx, ddt, dA, dDtBias, dD;
};

// Prepare and Finish (o given).
void gateForward(const Gate& G, const std::vector<double>& o, GateRef* r) {
  r->g.assign(G.rows * G.H, 0.0), r->v.assign(G.n(), 0.0), r->y.assign(G.n(), 0.0);
  for (int64_t rh = 0; rh < G.rows * G.H; ++rh) {
    const int64_t h = rh % G.H;
    const double d = G.step(G.dt[rh], h);
    r->g[rh] = d * G.A[h];
    for (int64_t p = 0; p < G.P; ++p) {
      const int64_t e = rh * G.P + p;
      r->v[e] = d * G.x[e];
      const double pre = o[e] + G.skip(h, p) * G.x[e];
      r->y[e] = G.z ? pre * G.zv[e] * sigmoid(G.zv[e]) : pre;
    }
  }
}

// FinishBackward (needs z).
void finishBackward(const Gate& G, const std::vector<double>& o, const std::vector<double>& dy, GateRef* r) {
  r->dO.assign(G.n(), 0.0), r->dz.assign(G.n(), 0.0);
  for (int64_t e = 0; e < G.n(); ++e) {
    const int64_t p = e % G.P, h = e / G.P % G.H;
    const double pre = o[e] + G.skip(h, p) * G.x[e], s = sigmoid(G.zv[e]);
    r->dO[e] = dy[e] * G.zv[e] * s;
    r->dz[e] = dy[e] * pre * s * (1 + G.zv[e] * (1 - s));
  }
}

// PrepareBackward; dO may be empty without D.
void prepareBackward(const Gate& G, const std::vector<double>& dO, const std::vector<double>& dv,
                     const std::vector<double>& dg, GateRef* r) {
  r->dx.assign(G.n(), 0.0), r->ddt.assign(G.rows * G.H, 0.0), r->dA.assign(G.H, 0.0), r->dDtBias.assign(G.H, 0.0);
  r->dD.assign(G.dSize(), 0.0);
  for (int64_t rh = 0; rh < G.rows * G.H; ++rh) {
    const int64_t h = rh % G.H;
    double grad;
    const double d = G.step(G.dt[rh], h, &grad);
    double dd = dg[rh] * G.A[h];
    for (int64_t p = 0; p < G.P; ++p) {
      const int64_t e = rh * G.P + p;
      dd += dv[e] * G.x[e];
      r->dx[e] = dv[e] * d + (G.dMode != 0 ? G.skip(h, p) * dO[e] : 0.0);
      if (G.dMode != 0) r->dD[G.dMode == 2 ? h * G.P + p : h] += dO[e] * G.x[e];
    }
    r->dA[h] += dg[rh] * d;
    r->ddt[rh] = dd * grad;
    r->dDtBias[h] += r->ddt[rh];
  }
}

// Raw dt values: softplus inputs around 0 (every 9th above the cut-off of 20 when `big`), or
// positive time steps without softplus.
double rawDt(std::mt19937& rng, bool softplus, bool big, int64_t i) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  if (big && i % 9 == 4) return 20.5 + 4 * ud(rng);
  return softplus ? 1.5 * nd(rng) : 0.05 + 0.8 * std::fabs(nd(rng));
}

// The clamp's limits: inside the range of the time steps, so that some fall on each side.
void setLimits(Gate* G) {
  G->dtMin = G->softplus ? 0.4137 : 0.3137;
  G->dtMax = G->softplus ? 1.9291 : 0.9291;
}

// The reference backward against central differences of
// sum(g wg) + sum(v wv) + sum(y dy)  (wg, wv standing for the scan's gradients dg, dv).
void checkReferenceGradients() {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int dMode : {1, 2}) {
    Gate G;
    G.rows = 4, G.H = 2, G.P = 3, G.softplus = true, G.clamp = true, G.z = true, G.bias = true, G.dMode = dMode;
    G.dtMin = 0.4137, G.dtMax = 21.5;
    auto fill = [&](std::vector<double>& v, int64_t n) {
      v.resize(n);
      for (double& e : v) e = nd(rng);
    };
    fill(G.x, G.n()), fill(G.A, G.H), fill(G.dtBias, G.H), fill(G.D, G.dSize()), fill(G.zv, G.n());
    G.dt.resize(G.rows * G.H);
    for (int64_t i = 0; i < G.rows * G.H; ++i) G.dt[i] = rawDt(rng, true, true, i);
    G.dt[1] = 30;  // above dtMax
    std::vector<double> o, dy, wv, wg;
    fill(o, G.n()), fill(dy, G.n()), fill(wv, G.n()), fill(wg, G.rows * G.H);
    context = "reference gradients, D mode " + std::to_string(dMode);
    GateRef r;
    finishBackward(G, o, dy, &r);
    prepareBackward(G, r.dO, wv, wg, &r);
    auto loss = [&]() {
      GateRef q;
      gateForward(G, o, &q);
      double l = 0;
      for (size_t i = 0; i < q.g.size(); ++i) l += q.g[i] * wg[i];
      for (size_t i = 0; i < q.v.size(); ++i) l += q.v[i] * wv[i] + q.y[i] * dy[i];
      return l;
    };
    auto fd = [&](std::vector<double>& v, const std::vector<double>& an, const char* name) {
      std::vector<double> num(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        const double v0 = v[i];
        v[i] = v0 + 1e-6;
        const double lp = loss();
        v[i] = v0 - 1e-6;
        const double lm = loss();
        v[i] = v0;
        num[i] = (lp - lm) / 2e-6;
      }
      compare(std::string("reference d") + name, an, num, 1e-6);
    };
    fd(G.x, r.dx, "x");
    fd(G.dt, r.ddt, "dt");
    fd(G.A, r.dA, "A");
    fd(G.dtBias, r.dDtBias, "dtBias");
    fd(G.D, r.dD, "D");
    fd(G.zv, r.dz, "z");
    fd(o, r.dO, "o");
  }
}

struct GateCase {
  int64_t rows, H, P;
  bool softplus, clamp, big;
  int dMode;
  bool z, bias;
  int rowsPerSplit;  // 0: the launcher's choice
};

// Whether every byte of buf is still the poison (0xff).
template <class T> bool untouched(const Buf<T>& buf) {
  const unsigned char* b = reinterpret_cast<const unsigned char*>(buf.data);
  return std::all_of(b, b + buf.n * sizeof(T), [](unsigned char c) { return c == 0xff; });
}

template <class T> void runGateCase(const GateCase& c, std::mt19937& rng, int variant) {
  Gate G;
  G.rows = c.rows, G.H = c.H, G.P = c.P, G.softplus = c.softplus, G.clamp = c.clamp, G.z = c.z, G.bias = c.bias;
  G.dMode = c.dMode;
  setLimits(&G);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, int64_t n, bool elem) {
    v.resize(n);
    for (double& e : v) e = elem ? roundTo<T>(nd(rng)) : static_cast<float>(nd(rng));
  };
  const int64_t n = G.n(), rh = G.rows * G.H;
  fill(G.x, n, true), fill(G.zv, n, true), fill(G.D, G.dSize(), false);
  G.A.resize(G.H), G.dtBias.resize(G.H), G.dt.resize(rh);
  for (double& e : G.A) e = static_cast<float>(-std::exp(0.5 * nd(rng)));
  for (double& e : G.dtBias) e = static_cast<float>(0.3 * nd(rng));
  for (int64_t i = 0; i < rh; ++i) G.dt[i] = roundTo<T>(rawDt(rng, c.softplus, c.big, i));
  std::vector<double> o, dy, dOin, dv, dg;
  fill(o, n, true), fill(dy, n, true), fill(dOin, n, true), fill(dv, n, true), fill(dg, rh, false);
  context = std::string(Elem<T>::name) + " gate rows " + std::to_string(c.rows) + " H " + std::to_string(c.H) + " P " +
            std::to_string(c.P) + (c.softplus ? " softplus" : "") + (c.clamp ? " clamp" : "") + (c.big ? " big" : "") +
            (c.dMode == 1   ? " D per head"
             : c.dMode == 2 ? " D per channel"
                            : "") +
            (c.z ? " z" : "") + (c.bias ? " dtBias" : "") +
            (c.rowsPerSplit ? " rowsPerSplit " + std::to_string(c.rowsPerSplit) : "");
  GateRef ref;
  gateForward(G, o, &ref);
  if (c.z) finishBackward(G, o, dy, &ref);
  prepareBackward(G, dOin, dv, dg, &ref);

  Buf<T> x(n), dt(rh), z(n), bo(n), bdy(n), bdO(n), bdv(n);
  Buf<float> A(G.H), bias(G.H), D(G.dSize()), bdg(rh);
  x.set(G.x), dt.set(G.dt), z.set(G.zv), bo.set(o), bdy.set(dy), bdO.set(dOin), bdv.set(dv);
  A.set(G.A), bias.set(G.dtBias), D.set(G.D), bdg.set(dg);
  for (auto* b : {&x, &dt, &z, &bo, &bdy, &bdO, &bdv}) b->poisonGuards();
  for (auto* b : {&A, &bias, &D, &bdg}) b->poisonGuards();
  rkcuda::Mamba2GateArgs a;
  a.dt = Elem<T>::dtype, a.rows = c.rows, a.H = c.H, a.P = c.P;
  a.dtSoftplus = c.softplus, a.clamp = c.clamp, a.dPerChannel = c.dMode == 2;
  a.dtMin = static_cast<float>(G.dtMin), a.dtMax = static_cast<float>(G.dtMax);
  a.x = x.data, a.dtIn = dt.data, a.A = A.data, a.dtBias = c.bias ? bias.data : nullptr;
  a.D = c.dMode != 0 ? D.data : nullptr, a.z = c.z ? z.data : nullptr;
  const double tol = tolerance<T>();

  Buf<float> g(rh);
  Buf<T> v(n);
  g.poison(), v.poison();
  rkcuda::Status st = rkcuda::mamba2Prepare(a, g.data, v.data);
  check(st.ok(), "prepare status: " + st.message);
  checkOutput("g", g, ref.g, kF32);
  checkOutput("v", v, ref.v, tol);

  Buf<T> y(n);
  y.poison();
  st = rkcuda::mamba2Finish(a, bo.data, y.data);
  check(st.ok(), "finish status: " + st.message);
  checkOutput("y", y, ref.y, tol);

  Buf<T> dO(n), dz(n);
  dO.poison(), dz.poison();
  st = rkcuda::mamba2FinishBackward(a, bo.data, bdy.data, dO.data, dz.data);
  if (c.z) {
    check(st.ok(), "finish backward status: " + st.message);
    checkOutput("dO", dO, ref.dO, tol);
    checkOutput("dz", dz, ref.dz, tol);
  } else {
    check(!st.ok(), "finish backward without z must be refused");
  }
  noteLaunches();

  emu::setTunable("mamba2PrepareBackward.rowsPerSplit", c.rowsPerSplit);
  Buf<T> dx(n), ddt(rh);
  Buf<float> dA(G.H), dDtBias(G.H), dD(G.dSize());
  dx.poison(), ddt.poison(), dA.poison(), dDtBias.poison(), dD.poison();
  const bool withBias = variant != 1;  // dDtBias null in some runs
  // Without D, dO may be null (and dD is left alone).
  const void* dOArg = c.dMode != 0 || variant == 0 ? bdO.data : nullptr;
  st = rkcuda::mamba2PrepareBackward(a, dOArg, bdv.data, bdg.data, dx.data, ddt.data, dA.data,
                                     withBias ? dDtBias.data : nullptr, dD.data);
  emu::setTunable("mamba2PrepareBackward.rowsPerSplit", 0);
  check(st.ok(), "prepare backward status: " + st.message);
  checkOutput("dx", dx, ref.dx, tol);
  checkOutput("ddt", ddt, ref.ddt, tol);
  checkOutput("dA", dA, ref.dA, kF32);
  if (withBias)
    checkOutput("dDtBias", dDtBias, ref.dDtBias, kF32);
  else
    check(untouched(dDtBias), "dDtBias written although null");
  if (c.dMode != 0)
    checkOutput("dD", dD, ref.dD, kF32);
  else
    checkOutput("dD without D", dD, std::vector<double>(G.dSize(), 0.0), 0.0);
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
}

// ---- the transposes ----

void runTransposes() {
  struct Shape {
    int64_t count, rows, cols;
  };
  for (const Shape& s : {Shape{3, 5, 7}, Shape{2, 64, 128}, Shape{4, 33, 1}, Shape{1, 1, 1}, Shape{2, 40, 70}}) {
    context = "transpose " + std::to_string(s.count) + " x " + std::to_string(s.rows) + " x " + std::to_string(s.cols);
    const int64_t n = s.count * s.rows * s.cols;
    std::vector<double> src(n), want(n);
    for (int64_t i = 0; i < n; ++i) src[i] = static_cast<double>(i) * 0.5 - 3;
    for (int64_t m = 0; m < s.count; ++m)
      for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t c = 0; c < s.cols; ++c) want[(m * s.cols + c) * s.rows + r] = src[(m * s.rows + r) * s.cols + c];
    Buf<float> a(n), b(n);
    a.set(src), a.poisonGuards(), b.poison();
    const rkcuda::Status st = rkcuda::mamba2TransposeStates(a.data, b.data, s.count, s.rows, s.cols);
    check(st.ok(), "transpose status: " + st.message);
    checkOutput("transposed", b, want, 0.0);
  }
  noteLaunches();
}

// ---- the decode step ----

struct StepCase {
  int64_t batch, T, H, G, P, N;
  bool softplus, clamp;
  int dMode;
  bool z, bias, update, intermediate;
  int perLane;  // 0: the launcher's choice
};

template <class T> void runStepCase(const StepCase& c, std::mt19937& rng) {
  Gate G;
  G.rows = c.batch * c.T, G.H = c.H, G.P = c.P, G.softplus = c.softplus, G.clamp = c.clamp, G.z = c.z;
  G.bias = c.bias, G.dMode = c.dMode;
  setLimits(&G);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, int64_t n, bool elem) {
    v.resize(n);
    for (double& e : v) e = elem ? roundTo<T>(nd(rng)) : static_cast<float>(nd(rng));
  };
  const int64_t n = G.n(), rh = G.rows * G.H, bc = G.rows * c.G * c.N, ns = c.batch * c.H * c.P * c.N;
  fill(G.x, n, true), fill(G.zv, n, true), fill(G.D, G.dSize(), false);
  G.A.resize(G.H), G.dtBias.resize(G.H), G.dt.resize(rh);
  for (double& e : G.A) e = static_cast<float>(-std::exp(0.5 * nd(rng)));
  for (double& e : G.dtBias) e = static_cast<float>(0.3 * nd(rng));
  for (int64_t i = 0; i < rh; ++i) G.dt[i] = roundTo<T>(rawDt(rng, c.softplus, c.softplus && !c.clamp, i));
  std::vector<double> B, C, s0;
  fill(B, bc, true), fill(C, bc, true), fill(s0, ns, false);
  context = std::string(Elem<T>::name) + " step batch " + std::to_string(c.batch) + " T " + std::to_string(c.T) +
            " H " + std::to_string(c.H) + " G " + std::to_string(c.G) + " P " + std::to_string(c.P) + " N " +
            std::to_string(c.N) + (c.softplus ? " softplus" : "") + (c.clamp ? " clamp" : "") +
            (c.dMode == 1   ? " D per head"
             : c.dMode == 2 ? " D per channel"
                            : "") +
            (c.z ? " z" : "") + (c.bias ? " dtBias" : "") + (c.update ? " update" : "") +
            (c.intermediate ? " intermediate" : "") + (c.perLane ? " perLane " + std::to_string(c.perLane) : "");

  // Reference.
  std::vector<double> yRef(n), inter(G.rows * c.H * c.P * c.N), fin(s0);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t g = h / (c.H / c.G);
      for (int64_t p = 0; p < c.P; ++p) {
        double* S = &fin[((b * c.H + h) * c.P + p) * c.N];
        for (int64_t t = 0; t < c.T; ++t) {
          const int64_t bt = b * c.T + t, e = (bt * c.H + h) * c.P + p;
          const double d = G.step(G.dt[bt * c.H + h], h), decay = std::exp(d * G.A[h]);
          double acc = G.skip(h, p) * G.x[e];
          for (int64_t k = 0; k < c.N; ++k) {
            S[k] = decay * S[k] + d * G.x[e] * B[(bt * c.G + g) * c.N + k];
            acc += S[k] * C[(bt * c.G + g) * c.N + k];
            inter[e * c.N + k] = S[k];
          }
          yRef[e] = c.z ? acc * G.zv[e] * sigmoid(G.zv[e]) : acc;
        }
      }
    }

  Buf<T> x(n), dt(rh), z(n), bB(bc), bC(bc), y(n);
  Buf<float> A(G.H), bias(G.H), D(G.dSize()), state(ns), im(std::max<int64_t>(G.rows * c.H * c.P * c.N, 1));
  x.set(G.x), dt.set(G.dt), z.set(G.zv), bB.set(B), bC.set(C);
  A.set(G.A), bias.set(G.dtBias), D.set(G.D), state.set(s0);
  for (auto* b : {&x, &dt, &z, &bB, &bC}) b->poisonGuards();
  for (auto* b : {&A, &bias, &D}) b->poisonGuards();
  y.poison(), im.poison();
  rkcuda::Mamba2StepArgs a;
  rkcuda::Mamba2GateArgs& ga = a.gate;
  ga.dt = Elem<T>::dtype, ga.rows = G.rows, ga.H = c.H, ga.P = c.P;
  ga.dtSoftplus = c.softplus, ga.clamp = c.clamp, ga.dPerChannel = c.dMode == 2;
  ga.dtMin = static_cast<float>(G.dtMin), ga.dtMax = static_cast<float>(G.dtMax);
  ga.x = x.data, ga.dtIn = dt.data, ga.A = A.data, ga.dtBias = c.bias ? bias.data : nullptr;
  ga.D = c.dMode != 0 ? D.data : nullptr, ga.z = c.z ? z.data : nullptr;
  a.batch = c.batch, a.T = c.T, a.G = c.G, a.N = c.N, a.B = bB.data, a.C = bC.data, a.state = state.data;
  a.update = c.update, a.intermediate = c.intermediate ? im.data : nullptr;
  emu::setTunable("mamba2Step.statesPerLane", c.perLane);
  const rkcuda::Status st = rkcuda::mamba2Step(a, y.data);
  emu::setTunable("mamba2Step.statesPerLane", 0);
  check(st.ok(), "step status: " + st.message);
  checkOutput("y", y, yRef, tolerance<T>());
  if (c.update) {
    checkOutput("state", state, fin, kF32);
  } else {
    const std::vector<double> got = state.get();
    check(got == s0 && state.guardsIntact(), "state changed without update");
  }
  if (c.intermediate)
    checkOutput("intermediate", im, inter, kF32);
  else
    check(untouched(im), "intermediate written although null");
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
}

// ---- refusals ----

void expectRefused(const rkcuda::Status& st, const std::string& fn, const std::string& what) {
  check(!st.ok() && st.message.rfind(fn + ": ", 0) == 0, fn + " must refuse " + what + " (got '" + st.message + "')");
}

void checkRefusals() {
  context = "refusals";
  float buf[4096] = {};
  float* f = buf;
  auto gate = [&]() {
    rkcuda::Mamba2GateArgs a;
    a.rows = 2, a.H = 2, a.P = 4, a.x = f, a.dtIn = f, a.A = f;
    return a;
  };
  rkcuda::Mamba2GateArgs a = gate();
  check(rkcuda::mamba2Prepare(a, f, f).ok(), "prepare with good arguments");
  a.dt = static_cast<DType>(7);
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "an unknown dtype");
  expectRefused(rkcuda::mamba2Finish(a, f, f), "mamba2Finish", "an unknown dtype");
  expectRefused(rkcuda::mamba2FinishBackward(a, f, f, f, f), "mamba2FinishBackward", "an unknown dtype");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, f, f, f, f, f), "mamba2PrepareBackward", "an unknown dtype");
  a = gate(), a.rows = -1;
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "negative rows");
  expectRefused(rkcuda::mamba2Finish(a, f, f), "mamba2Finish", "negative rows");
  a = gate(), a.H = 0;
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "H 0");
  a = gate(), a.P = -3;
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, f, f, f, f, f), "mamba2PrepareBackward", "negative P");
  a = gate(), a.x = nullptr;
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "a null x");
  a = gate(), a.dtIn = nullptr;
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "a null dt");
  a = gate(), a.A = nullptr;
  expectRefused(rkcuda::mamba2Prepare(a, f, f), "mamba2Prepare", "a null A");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, f, f, f, f, f), "mamba2PrepareBackward", "a null A");
  a = gate();
  expectRefused(rkcuda::mamba2Prepare(a, nullptr, f), "mamba2Prepare", "a null g");
  expectRefused(rkcuda::mamba2Prepare(a, f, nullptr), "mamba2Prepare", "a null v");
  expectRefused(rkcuda::mamba2Finish(a, nullptr, f), "mamba2Finish", "a null o");
  expectRefused(rkcuda::mamba2Finish(a, f, nullptr), "mamba2Finish", "a null y");
  a.D = f, a.x = nullptr;
  expectRefused(rkcuda::mamba2Finish(a, f, f), "mamba2Finish", "D without x");
  a = gate();
  expectRefused(rkcuda::mamba2FinishBackward(a, f, f, f, f), "mamba2FinishBackward", "a null z");
  a.z = f;
  check(rkcuda::mamba2FinishBackward(a, f, f, f, f).ok(), "finish backward with good arguments");
  expectRefused(rkcuda::mamba2FinishBackward(a, f, nullptr, f, f), "mamba2FinishBackward", "a null dy");
  expectRefused(rkcuda::mamba2FinishBackward(a, f, f, nullptr, f), "mamba2FinishBackward", "a null dO");
  expectRefused(rkcuda::mamba2FinishBackward(a, f, f, f, nullptr), "mamba2FinishBackward", "a null dz");
  a = gate();
  check(rkcuda::mamba2PrepareBackward(a, nullptr, f, f, f, f, f, nullptr, nullptr).ok(),
        "prepare backward with good arguments");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, f, f, nullptr, f, f), "mamba2PrepareBackward", "a null dA");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, nullptr, f, f, f, f, f, f), "mamba2PrepareBackward", "a null dv");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, nullptr, f, f, f, f, f), "mamba2PrepareBackward", "a null dg");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, nullptr, f, f, f, f), "mamba2PrepareBackward", "a null dx");
  expectRefused(rkcuda::mamba2PrepareBackward(a, f, f, f, f, nullptr, f, f, f), "mamba2PrepareBackward", "a null ddt");
  a.D = f;
  expectRefused(rkcuda::mamba2PrepareBackward(a, nullptr, f, f, f, f, f, f, f), "mamba2PrepareBackward",
                "D without dO");
  // No rows: nothing to do, but the sums over rows are zeros.
  a = gate(), a.rows = 0, a.x = nullptr, a.dtIn = nullptr;
  buf[0] = buf[1] = 7.0f;
  check(rkcuda::mamba2Prepare(a, nullptr, nullptr).ok(), "prepare with no rows");
  check(rkcuda::mamba2PrepareBackward(a, nullptr, nullptr, nullptr, nullptr, nullptr, f, nullptr, nullptr).ok() &&
            buf[0] == 0.0f && buf[1] == 0.0f,
        "prepare backward with no rows zeroes dA");

  expectRefused(rkcuda::mamba2TransposeStates(f, f + 64, -1, 2, 2), "mamba2TransposeStates", "a negative count");
  expectRefused(rkcuda::mamba2TransposeStates(f, f + 64, 1, 2, -2), "mamba2TransposeStates", "negative cols");
  expectRefused(rkcuda::mamba2TransposeStates(nullptr, f, 1, 2, 2), "mamba2TransposeStates", "a null src");
  expectRefused(rkcuda::mamba2TransposeStates(f, f, 1, 2, 2), "mamba2TransposeStates", "src == dst");
  check(rkcuda::mamba2TransposeStates(nullptr, nullptr, 0, 2, 2).ok(), "transpose of nothing");

  auto step = [&]() {
    rkcuda::Mamba2StepArgs s;
    s.gate = gate();
    s.batch = 1, s.T = 2, s.G = 1, s.N = 8, s.B = f, s.C = f, s.state = f + 1024;
    return s;
  };
  rkcuda::Mamba2StepArgs s = step();
  check(rkcuda::mamba2Step(s, f + 2048).ok(), "step with good arguments");
  s.gate.dt = static_cast<DType>(3);
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "an unknown dtype");
  s = step(), s.N = 0;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "N 0");
  s = step(), s.N = 257;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "N 257");
  s = step(), s.G = 0;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "G 0");
  s = step(), s.G = 3, s.gate.H = 4;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "G not dividing H");
  s = step(), s.T = -1;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "negative T");
  s = step(), s.gate.rows = 3;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "rows other than batch * T");
  s = step(), s.state = nullptr;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "a null state");
  s = step(), s.B = nullptr;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "a null B");
  s = step(), s.C = nullptr;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "a null C");
  s = step(), s.gate.A = nullptr;
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "a null A");
  s = step();
  expectRefused(rkcuda::mamba2Step(s, nullptr), "mamba2Step", "a null y");
  s = step(), s.N = 64;
  emu::setTunable("mamba2Step.statesPerLane", 1);
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "too few states per lane");
  emu::setTunable("mamba2Step.statesPerLane", 3);
  expectRefused(rkcuda::mamba2Step(s, f), "mamba2Step", "3 states per lane");
  emu::setTunable("mamba2Step.statesPerLane", 0);
  s = step(), s.batch = 0, s.gate.rows = 0, s.state = nullptr;
  check(rkcuda::mamba2Step(s, nullptr).ok(), "step of an empty batch");
  emu::launchLog.clear();
}

// ---- suites ----

template <class T> void runSuite(std::mt19937& rng, int variant) {
  const GateCase gates[] = {
      {37, 3, 64, true, false, true, 2, true, true, 0},
      {37, 3, 5, true, true, false, 1, true, false, 5},
      {1, 1, 1, false, false, false, 0, false, false, 0},
      {37, 1, 5, false, true, false, 2, variant != 2, true, 3},
      {1, 3, 64, true, true, true, 1, false, true, 0},
      {37, 3, 1, variant == 1, variant != 1, false, variant == 0 ? 0 : 2, true, variant != 0, 7},
      {5, 2, 300, true, variant != 2, false, variant == 1 ? 1 : 2, true, true, 2},
  };
  for (const GateCase& c : gates) runGateCase<T>(c, rng, variant);
  const StepCase steps[] = {
      {2, 1, 4, 2, 64, 16, true, false, 2, true, true, true, true, 0},
      {1, 3, 3, 3, 5, 7, true, true, 1, true, false, true, true, 0},
      {2, 3, 3, 1, 1, 64, false, true, 0, false, true, false, true, 0},
      {1, 3, 1, 1, 5, 1, true, false, 1, false, true, true, false, 0},
      {1, 1, 2, 1, 3, 256, true, false, 2, true, true, true, true, 0},
      {2, 3, 4, 4, 5, 16, true, variant == 1, 2, variant != 2, false, variant != 0, variant == 0, 8},
      {1, 3, 2, 2, 7, 7, false, false, 1, true, true, true, true, 1},
      {1, 2, 3, 1, 4, 64, true, true, 0, true, false, true, true, 4},
      {1, 1, 1, 1, 33, 40, true, false, 1, true, true, true, false, 2},
  };
  for (const StepCase& c : steps) runStepCase<T>(c, rng);
}

template <class T> void checkCoverage() {
  context = std::string("coverage ") + Elem<T>::name;
  for (const void* k : {emu::kernelId(rkcuda::prepareKernel<T>), emu::kernelId(rkcuda::finishKernel<T>),
                        emu::kernelId(rkcuda::finishBackwardKernel<T>), emu::kernelId(rkcuda::prepareBackwardKernel<T>),
                        emu::kernelId(rkcuda::stepKernel<T, 1>), emu::kernelId(rkcuda::stepKernel<T, 2>),
                        emu::kernelId(rkcuda::stepKernel<T, 4>), emu::kernelId(rkcuda::stepKernel<T, 8>)}) {
    check(launched.count(k) == 1, "a kernel instantiation never ran");
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20260311);
  checkReferenceGradients();
  checkRefusals();
  runTransposes();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  context = "coverage";
  check(launched.count(emu::kernelId(rkcuda::transposeKernel)) == 1, "the transpose kernel never ran");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("mamba2 on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
