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
//   * arguments the launchers must refuse;
//   * end to end, the whole of rk.mamba2Scan on CUDA as lib/ops/mamba2Scan.ts composes it, through
//     the real launchers of this file and of cuda/attention/linear_attention.cu (compiled into the
//     same program), their argument structs filled as the bindings fill them (the sequence table,
//     chunk and checkpoints of cpp/ops/attention/linear_attention_binding.cc). Forward:
//     mamba2Prepare, the transpose of the initial states, linearAttentionForward (rule Gated, q = C,
//     k = B with G heads each, H state heads, K = dstate, V = headdim, g = d A, scale 1), the
//     transpose of the final states, mamba2Finish (with D or z); backward: mamba2FinishBackward
//     (with z), the transpose of the final states' gradient, linearAttentionBackward,
//     mamba2PrepareBackward, the transpose of dh0. y, the final states and every gradient (x, dt, A,
//     B, C, D, z, dtBias, initial states) are compared with the sequential recurrence in float64
//     (its backward by hand, checked against central differences of its forward) on the loss
//     sum(y wy) + sum(finalStates wf): seqlen 1, 63, 65 and 257; H 4 with G 1 and 2; headdim 1, 16
//     and 64; dstate 5 and 16; D absent, per head and per channel; z, softplus, dtBias, initial
//     states and final states each on and off; one clamp case; batch 1 and 2; packed sequences
//     (cuSeqlens: an empty sequence and a tail in no sequence, where y and the gradients of x, dt,
//     z, B and C must be exactly 0; and packed sequences covering every position, with D); float32
//     (forward 2e-5, gradients 1e-4, norm-wise), three bfloat16 and two float16 cases (3e-2; v = d x
//     is rounded to the dtype there; the scan on the chunked tensor-core kernels, checked, and once
//     forced onto the per-token kernels; seqlen 257 with headdim 64, and packed sequences with empty
//     ones and one of length 1). The packed cases with a tail in no sequence run with and without D (the
//     kernels after the scan take validRows, as the binding passes it).
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
// The scan the pipeline runs on.
#include "attention/linear_attention.cu"
#include "delta/gated_delta_rule.cu"
#include "delta/gated_delta_rule_chunked.cu"
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
      compare(std::string("reference d") + name, an, centralDifferences(v, loss), 1e-6);
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

// ---- end to end: the pipeline of lib/ops/mamba2Scan.ts ----
//
// Forward: mamba2Prepare -> mamba2TransposeStates (initial states) -> linearAttentionForward (rule
// Gated, q = C, k = B, v = d x, g = d A, scale 1) -> mamba2TransposeStates (final states) ->
// mamba2Finish (D and z). Backward: mamba2FinishBackward (z) -> transpose of the final states'
// gradient -> linearAttentionBackward -> mamba2PrepareBackward -> transpose of dh0. The argument
// structs are filled as cpp/ops/attention/linear_attention_binding.cc fills them (its sequence table,
// chunk and checkpoints) and cpp/ops/ssd/mamba2_scan_binding.cc; the reference is the sequential
// recurrence in float64, its backward by hand (checked against finite differences).

using rkcuda::ScanSegment;

struct Scan {
  Gate gate;  // rows = batch * T
  int64_t batch = 1, T = 1, G = 1, N = 1;
  std::vector<ScanSegment> segs;
  bool packed = false, h0 = false, fin = false;
  std::vector<double> B, C, s0, wy, wf;  // wy: the gradient of y; wf: of the final states (fin)
  int64_t nseq() const { return static_cast<int64_t>(segs.size()); }
  int64_t bcSize() const { return batch * T * G * N; }
  int64_t stateSize() const { return nseq() * gate.H * gate.P * N; }
};

struct ScanRef {
  std::vector<double> y, fin, dx, ddt, dA, dB, dC, dD, dz, dDtBias, ds0;
};

// y and the final states; with `grads` the gradients of sum(y wy) + sum(final wf).
void scanReference(const Scan& s, bool grads, ScanRef* r) {
  const Gate& G = s.gate;
  const int64_t H = G.H, P = G.P, N = s.N, PN = P * N, perGroup = H / s.G;
  r->y.assign(G.n(), 0.0), r->fin.assign(s.stateSize(), 0.0);
  if (grads) {
    r->dx.assign(G.n(), 0.0), r->ddt.assign(G.rows * H, 0.0), r->dA.assign(H, 0.0), r->dB.assign(s.bcSize(), 0.0);
    r->dC.assign(s.bcSize(), 0.0), r->dD.assign(G.dSize(), 0.0), r->dz.assign(G.n(), 0.0), r->dDtBias.assign(H, 0.0);
    r->ds0.assign(s.stateSize(), 0.0);
  }
  for (int64_t si = 0; si < s.nseq(); ++si) {
    const ScanSegment& sg = s.segs[si];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / perGroup, st = (si * H + h) * PN;
      std::vector<double> S((sg.length + 1) * PN, 0.0);  // S[t] the state entering position t
      if (s.h0) std::copy(s.s0.begin() + st, s.s0.begin() + st + PN, S.begin());
      auto row = [&](int64_t t) { return sg.batch * s.T + sg.start + t; };
      // The output of position t before the gate: o + D x.
      auto pre = [&](int64_t t, int64_t p) {
        const int64_t rw = row(t), e = (rw * H + h) * P + p;
        const double* Ct = &s.C[(rw * s.G + g) * N];
        double o = 0;
        for (int64_t n = 0; n < N; ++n) o += S[(t + 1) * PN + p * N + n] * Ct[n];
        return o + G.skip(h, p) * G.x[e];
      };
      for (int64_t t = 0; t < sg.length; ++t) {
        const int64_t rw = row(t), rh = rw * H + h;
        const double d = G.step(G.dt[rh], h), a = std::exp(d * G.A[h]);
        const double* Bt = &s.B[(rw * s.G + g) * N];
        for (int64_t p = 0; p < P; ++p) {
          const int64_t e = rh * P + p;
          for (int64_t n = 0; n < N; ++n) S[(t + 1) * PN + p * N + n] = a * S[t * PN + p * N + n] + d * G.x[e] * Bt[n];
          const double v = pre(t, p);
          r->y[e] = G.z ? v * G.zv[e] * sigmoid(G.zv[e]) : v;
        }
      }
      std::copy(S.begin() + sg.length * PN, S.begin() + (sg.length + 1) * PN, r->fin.begin() + st);
      if (!grads) continue;
      std::vector<double> dS(PN, 0.0);
      if (s.fin) std::copy(s.wf.begin() + st, s.wf.begin() + st + PN, dS.begin());
      for (int64_t t = sg.length - 1; t >= 0; --t) {
        const int64_t rw = row(t), rh = rw * H + h;
        double grad;
        const double d = G.step(G.dt[rh], h, &grad), a = std::exp(d * G.A[h]);
        const int64_t bc = (rw * s.G + g) * N;
        double dd = 0, sdot = 0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t e = rh * P + p;
          const double xv = G.x[e];
          double dpre = s.wy[e];
          if (G.z) {
            const double zv = G.zv[e], sg2 = sigmoid(zv);
            r->dz[e] = dpre * pre(t, p) * sg2 * (1 + zv * (1 - sg2));
            dpre *= zv * sg2;
          }
          if (G.dMode != 0) r->dD[G.dMode == 2 ? h * P + p : h] += dpre * xv;
          r->dx[e] += G.skip(h, p) * dpre;
          for (int64_t n = 0; n < N; ++n) {
            double& ds = dS[p * N + n];
            ds += dpre * s.C[bc + n];
            r->dC[bc + n] += dpre * S[(t + 1) * PN + p * N + n];
            r->dB[bc + n] += ds * d * xv;
            r->dx[e] += ds * d * s.B[bc + n];
            dd += ds * xv * s.B[bc + n];
            sdot += ds * S[t * PN + p * N + n];
          }
        }
        dd += G.A[h] * a * sdot;
        r->dA[h] += d * a * sdot;
        r->ddt[rh] = dd * grad;
        r->dDtBias[h] += r->ddt[rh];
        for (double& ds : dS) ds *= a;
      }
      std::copy(dS.begin(), dS.end(), r->ds0.begin() + st);
    }
  }
}

// The sequence table as the binding builds it (parseSegments): one whole sequence per row, or the
// packed sequences of cuSeqlens in row 0; chunk offsets in linear attention's chunk.
void setSegments(Scan* s, const std::vector<int64_t>& cu) {
  s->segs.clear();
  s->packed = !cu.empty();
  if (cu.empty()) {
    for (int64_t b = 0; b < s->batch; ++b) s->segs.push_back({b, 0, s->T, 0});
  } else {
    for (size_t i = 1; i < cu.size(); ++i) s->segs.push_back({0, cu[i - 1], cu[i] - cu[i - 1], 0});
  }
}

struct ScanCase {
  int64_t batch, T, H, G, P, N;
  bool softplus, clamp, bias;
  int dMode;
  bool z, h0, fin;
  std::vector<int64_t> cu;  // cuSeqlens (batch 1); empty: not packed
  bool perToken = false;    // 16-bit: the scan forced onto linear attention's per-token kernels
};

template <class T> Scan makeScan(const ScanCase& c, std::mt19937& rng) {
  Scan s;
  Gate& G = s.gate;
  s.batch = c.batch, s.T = c.T, s.G = c.G, s.N = c.N, s.h0 = c.h0, s.fin = c.fin;
  G.rows = c.batch * c.T, G.H = c.H, G.P = c.P, G.softplus = c.softplus, G.clamp = c.clamp, G.z = c.z;
  G.bias = c.bias, G.dMode = c.dMode;
  setLimits(&G);
  setSegments(&s, c.cu);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, int64_t n, bool elem, double scale) {
    v.resize(n);
    for (double& e : v) e = elem ? roundTo<T>(scale * nd(rng)) : static_cast<float>(scale * nd(rng));
  };
  const int64_t rh = G.rows * G.H;
  fill(G.x, G.n(), true, 1.0), fill(G.zv, G.n(), true, 1.0), fill(G.D, G.dSize(), false, 1.0);
  G.A.resize(G.H), G.dtBias.resize(G.H), G.dt.resize(rh);
  for (double& e : G.A) e = static_cast<float>(-std::exp(0.5 * nd(rng)));
  for (double& e : G.dtBias) e = static_cast<float>(0.3 * nd(rng));
  for (int64_t i = 0; i < rh; ++i) G.dt[i] = roundTo<T>(rawDt(rng, c.softplus, c.softplus && !c.clamp, i));
  const double bc = 1.0 / std::sqrt(static_cast<double>(c.N));
  fill(s.B, s.bcSize(), true, bc), fill(s.C, s.bcSize(), true, bc);
  fill(s.s0, s.stateSize(), false, 0.5), fill(s.wf, s.stateSize(), false, 1.0), fill(s.wy, G.n(), true, 1.0);
  return s;
}

// Positions (b * T + t) in some sequence.
std::vector<bool> coveredRows(const Scan& s) {
  std::vector<bool> in(s.batch * s.T, false);
  for (const ScanSegment& sg : s.segs)
    for (int64_t t = 0; t < sg.length; ++t) in[sg.batch * s.T + sg.start + t] = true;
  return in;
}

// The reference backward against central differences of the reference forward.
void checkScanReferenceGradients() {
  std::mt19937 rng(11);
  const ScanCase cases[] = {
      {1, 9, 4, 2, 2, 3, true, true, true, 2, true, true, true, {0, 3, 3, 7}},
      {2, 5, 4, 1, 3, 2, false, false, false, 1, false, true, true, {}},
      {2, 4, 2, 2, 1, 4, true, false, true, 0, true, false, false, {}},
  };
  for (const ScanCase& c : cases) {
    Scan s = makeScan<float>(c, rng);
    s.gate.dtMin = 0.4137, s.gate.dtMax = 1.5;
    context = "scan reference gradients, case " + std::to_string(&c - cases);
    ScanRef r;
    scanReference(s, true, &r);
    auto loss = [&]() {
      ScanRef q;
      scanReference(s, false, &q);
      double l = 0;
      for (size_t i = 0; i < q.y.size(); ++i) l += q.y[i] * s.wy[i];
      if (s.fin)
        for (size_t i = 0; i < q.fin.size(); ++i) l += q.fin[i] * s.wf[i];
      return l;
    };
    auto fd = [&](std::vector<double>& v, const std::vector<double>& an, const char* name) {
      compare(std::string("scan reference d") + name, an, centralDifferences(v, loss), 1e-6);
    };
    fd(s.gate.x, r.dx, "x");
    fd(s.gate.dt, r.ddt, "dt");
    fd(s.gate.A, r.dA, "A");
    fd(s.B, r.dB, "B");
    fd(s.C, r.dC, "C");
    if (c.dMode != 0) fd(s.gate.D, r.dD, "D");
    if (c.z) fd(s.gate.zv, r.dz, "z");
    if (c.bias) fd(s.gate.dtBias, r.dDtBias, "dtBias");
    if (c.h0) fd(s.s0, r.ds0, "initialStates");
  }
}

template <class T> constexpr double scanForwardTolerance() { return std::is_same_v<T, float> ? 2e-5 : 3e-2; }
template <class T> constexpr double scanGradTolerance() { return std::is_same_v<T, float> ? 1e-4 : 3e-2; }

template <class T> void runScanCase(const ScanCase& c, std::mt19937& rng) {
  const Scan s = makeScan<T>(c, rng);
  const Gate& G = s.gate;
  std::string cu;
  for (int64_t e : c.cu) cu += (cu.empty() ? "" : ",") + std::to_string(e);
  context = std::string(Elem<T>::name) + " end to end batch " + std::to_string(c.batch) + " T " + std::to_string(c.T) +
            " H " + std::to_string(c.H) + " G " + std::to_string(c.G) + " P " + std::to_string(c.P) + " N " +
            std::to_string(c.N) + (c.softplus ? " softplus" : "") + (c.clamp ? " clamp" : "") +
            (c.bias ? " dtBias" : "") +
            (c.dMode == 1   ? " D per head"
             : c.dMode == 2 ? " D per channel"
                            : "") +
            (c.z ? " z" : "") + (c.h0 ? " initialStates" : "") + (c.fin ? " finalStates" : "") +
            (c.cu.empty() ? "" : " cuSeqlens [" + cu + "]") + (c.perToken ? " per-token" : "");
  ScanRef ref;
  scanReference(s, true, &ref);
  const int64_t H = G.H, P = G.P, N = s.N, n = G.n(), rh = G.rows * H, bcn = s.bcSize(), sn = s.stateSize();
  const int64_t count = s.nseq() * H;
  const double tolF = scanForwardTolerance<T>(), tolG = scanGradTolerance<T>();

  // Inputs.
  Buf<T> x(n), dt(rh), z(n), bB(bcn), bC(bcn), wy(n);
  Buf<float> A(H), bias(H), D(G.dSize()), s0(sn), wf(sn);
  x.set(G.x), dt.set(G.dt), z.set(G.zv), bB.set(s.B), bC.set(s.C), wy.set(s.wy);
  A.set(G.A), bias.set(G.dtBias), D.set(G.D), s0.set(s.s0), wf.set(s.wf);
  for (auto* b : {&x, &dt, &z, &bB, &bC, &wy}) b->poisonGuards();
  for (auto* b : {&A, &bias, &D, &s0, &wf}) b->poisonGuards();
  rkcuda::Mamba2GateArgs ga;  // gateConfig() and the gate binding's parseGate
  ga.dt = Elem<T>::dtype, ga.rows = G.rows, ga.H = H, ga.P = P;
  ga.dtSoftplus = c.softplus, ga.clamp = c.clamp, ga.dPerChannel = c.dMode == 2;
  ga.dtMin = c.clamp ? static_cast<float>(G.dtMin) : 0.0f, ga.dtMax = c.clamp ? static_cast<float>(G.dtMax) : 0.0f;
  ga.x = x.data, ga.dtIn = dt.data, ga.A = A.data, ga.dtBias = c.bias ? bias.data : nullptr;
  ga.D = c.dMode != 0 ? D.data : nullptr, ga.z = c.z ? z.data : nullptr;
  // Positions after a packed batch's last sequence are in none (lib/ops/mamba2Scan.ts: validRows).
  ga.validRows = c.cu.empty() ? G.rows : c.cu.back();

  // The scan's arguments as parseAttention fills them.
  std::vector<ScanSegment> segs = s.segs;
  const int64_t chunk = rkcuda::linearAttentionChunk();
  int64_t totalChunks = 0;
  for (ScanSegment& sg : segs) {
    sg.chunkOffset = totalChunks;
    totalChunks += (sg.length + chunk - 1) / chunk;
  }
  rkcuda::LinearAttentionArgs la;
  la.dt = Elem<T>::dtype, la.rule = rkcuda::LinearRule::Gated, la.batch = s.batch, la.T = s.T;
  la.Hq = s.G, la.Hk = s.G, la.Hv = H, la.K = N, la.V = P, la.perKeyDecay = false, la.l2norm = false, la.scale = 1.0f;
  la.nseq = s.nseq(), la.segments = segs.data(), la.packed = s.packed, la.chunk = chunk, la.totalChunks = totalChunks;

  // Forward.
  rkcuda::Status st;
  Buf<float> g(rh), h0T(sn);
  Buf<T> v(n);
  g.poison(), v.poison(), h0T.poison();
  st = rkcuda::mamba2Prepare(ga, g.data, v.data);
  check(st.ok(), "prepare status: " + st.message);
  if (c.h0) {
    st = rkcuda::mamba2TransposeStates(s0.data, h0T.data, count, P, N);
    check(st.ok(), "initial states transpose status: " + st.message);
  }
  la.q = bC.data, la.k = bB.data, la.v = v.data, la.g = g.data, la.h0 = c.h0 ? h0T.data : nullptr;
  Buf<T> o(n);
  Buf<float> states(std::max<int64_t>(totalChunks * H * N * P, 1)), finT(sn), fin(sn);
  o.poison(), states.poison(), finT.poison(), fin.poison();
  emu::setTunable("linearAttention.path", c.perToken ? 1 : 0);
  emu::launchLog.clear();
  st = rkcuda::linearAttentionForward(la, o.data, states.data, c.fin ? finT.data : nullptr);
  check(st.ok(), "scan forward status: " + st.message);
  // 16-bit storage runs the scan on the gated delta rule's chunked kernels (without the delta term)
  // unless forced onto the per-token ones.
  if constexpr (!std::is_same_v<T, float>) {
    bool chunked = false;
    for (const emu::LaunchRecord& l : emu::launchLog)
      chunked = chunked || l.kernel == emu::kernelId(rkcuda::deltachunked::chunkPrepKernel<T>);
    check(chunked == !c.perToken, c.perToken ? "the chunked scan ran" : "the chunked scan did not run");
  }
  if (c.fin) {
    st = rkcuda::mamba2TransposeStates(finT.data, fin.data, count, N, P);
    check(st.ok(), "final states transpose status: " + st.message);
    checkOutput("finalStates", fin, ref.fin, tolF);
  }
  Buf<T> yBuf(n);
  yBuf.poison();
  const Buf<T>* y = &o;
  if (c.dMode != 0 || c.z) {
    st = rkcuda::mamba2Finish(ga, o.data, yBuf.data);
    check(st.ok(), "finish status: " + st.message);
    y = &yBuf;
  }
  checkOutput("y", *y, ref.y, tolF);
  // Positions in no sequence: y and every gradient of the position exactly 0 (one check per
  // position and array, reporting its first nonzero value).
  const std::vector<bool> in = coveredRows(s);
  auto zeros = [&](const char* what, const T* data, int64_t width) {
    for (int64_t bt = 0; bt < s.batch * s.T; ++bt) {
      if (in[bt]) continue;
      double bad = 0;
      for (int64_t e = bt * width; e < (bt + 1) * width && bad == 0; ++e) bad = Elem<T>::value(data[e]);
      check(bad == 0, std::string(what) + " at position " + std::to_string(bt) + ", in no sequence", bad, 0);
    }
  };
  zeros("y", y->data, H * P);
  noteLaunches();

  // Backward.
  Buf<T> dO(n), dz(n);
  dO.poison(), dz.poison();
  const T* dOArg = wy.data;  // the gradient of y before the gate: dy itself without z
  if (c.z) {
    st = rkcuda::mamba2FinishBackward(ga, o.data, wy.data, dO.data, dz.data);
    check(st.ok(), "finish backward status: " + st.message);
    dOArg = dO.data;
  }
  Buf<float> wfT(sn);
  wfT.poison();
  if (c.fin) {
    st = rkcuda::mamba2TransposeStates(wf.data, wfT.data, count, P, N);
    check(st.ok(), "final states gradient transpose status: " + st.message);
  }
  Buf<T> dq(bcn), dk(bcn), dv(n);
  Buf<float> dg(rh), dh0T(sn), dh0(sn);
  dq.poison(), dk.poison(), dv.poison(), dg.poison(), dh0T.poison(), dh0.poison();
  rkcuda::LinearAttentionGrads lg;
  lg.dO = dOArg, lg.dFinal = c.fin ? wfT.data : nullptr, lg.states = states.data;
  lg.dq = dq.data, lg.dk = dk.data, lg.dv = dv.data, lg.dg = dg.data, lg.dbeta = nullptr;
  lg.dh0 = c.h0 ? dh0T.data : nullptr;
  st = rkcuda::linearAttentionBackward(la, lg);
  check(st.ok(), "scan backward status: " + st.message);
  Buf<T> dx(n), ddt(rh);
  Buf<float> dA(H), dDtBias(H), dD(G.dSize());
  dx.poison(), ddt.poison(), dA.poison(), dDtBias.poison(), dD.poison();
  st = rkcuda::mamba2PrepareBackward(ga, c.dMode != 0 ? dOArg : nullptr, dv.data, dg.data, dx.data, ddt.data, dA.data,
                                     c.bias ? dDtBias.data : nullptr, c.dMode != 0 ? dD.data : nullptr);
  check(st.ok(), "prepare backward status: " + st.message);
  if (c.h0) {
    st = rkcuda::mamba2TransposeStates(dh0T.data, dh0.data, count, N, P);
    check(st.ok(), "dh0 transpose status: " + st.message);
  }
  checkOutput("dx", dx, ref.dx, tolG);
  checkOutput("ddt", ddt, ref.ddt, tolG);
  checkOutput("dA", dA, ref.dA, tolG);
  checkOutput("dB", dk, ref.dB, tolG);
  checkOutput("dC", dq, ref.dC, tolG);
  if (c.dMode != 0) checkOutput("dD", dD, ref.dD, tolG);
  if (c.z) checkOutput("dz", dz, ref.dz, tolG);
  if (c.bias)
    checkOutput("dDtBias", dDtBias, ref.dDtBias, tolG);
  else
    check(untouched(dDtBias), "dDtBias written although null");
  if (c.h0) checkOutput("dInitialStates", dh0, ref.ds0, tolG);
  zeros("dx", dx.data, H * P);
  zeros("ddt", ddt.data, H);
  zeros("dB", dk.data, s.G * N);
  zeros("dC", dq.data, s.G * N);
  if (c.z) zeros("dz", dz.data, H * P);
  noteLaunches();
  check(emu::liveAllocations.empty(), "stream-ordered allocations not freed");
}

void runScanSuite(std::mt19937& rng) {
  // batch, T, H, G, P, N, softplus, clamp, dtBias, D mode, z, initial states, final states, cuSeqlens
  const ScanCase f32[] = {
      {2, 1, 4, 1, 1, 5, false, false, false, 0, false, true, true, {}},
      {2, 63, 4, 2, 16, 16, true, false, true, 1, true, true, true, {}},
      {2, 65, 4, 1, 16, 5, true, false, false, 2, true, false, true, {}},
      {2, 65, 4, 2, 1, 16, true, true, true, 1, false, true, false, {}},
      {2, 63, 4, 1, 1, 5, false, false, true, 2, true, false, false, {}},
      {1, 257, 4, 2, 16, 16, true, false, true, 1, true, true, true, {}},
      {1, 65, 4, 2, 64, 16, true, false, true, 2, true, true, true, {}},
      // Packed: an empty sequence and a tail in no sequence, without D and with D.
      {1, 65, 4, 2, 16, 5, true, false, true, 0, true, true, true, {0, 20, 20, 58}},
      {1, 65, 4, 2, 16, 5, true, false, true, 1, true, true, true, {0, 20, 20, 58}},
      // Packed, every position covered (an empty first sequence), D per channel.
      {1, 65, 4, 1, 16, 16, false, false, true, 2, true, true, true, {0, 0, 1, 65}},
  };
  for (const ScanCase& c : f32) runScanCase<float>(c, rng);
  const ScanCase bf16[] = {
      {2, 63, 4, 2, 16, 16, true, false, true, 1, true, true, true, {}},
      {1, 65, 4, 1, 5, 16, true, false, false, 0, true, true, true, {0, 30, 30, 60}},
      {2, 63, 4, 2, 16, 16, true, false, true, 1, true, true, true, {}, true},
  };
  for (const ScanCase& c : bf16) runScanCase<__nv_bfloat16>(c, rng);
  const ScanCase f16[] = {
      {1, 257, 4, 2, 64, 16, true, false, true, 2, true, true, true, {}},
      {1, 130, 4, 1, 16, 5, true, false, true, 1, false, true, true, {0, 0, 1, 66, 66, 130}},
  };
  for (const ScanCase& c : f16) runScanCase<__half>(c, rng);
  emu::setTunable("linearAttention.path", 0);
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

int main(int argc, char** argv) {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20260311);
  checkReferenceGradients();
  checkRefusals();
  runTransposes();
  runSuite<float>(rng, 0);
  runSuite<__half>(rng, 1);
  runSuite<__nv_bfloat16>(rng, 2);
  checkScanReferenceGradients();
  runScanSuite(rng);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  context = "coverage";
  check(launched.count(emu::kernelId(rkcuda::transposeKernel)) == 1, "the transpose kernel never ran");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("mamba2 on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
