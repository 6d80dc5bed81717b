// Runs the `base` instruction-set variant of every CPU kernel (selective scan, gated delta rule,
// linear attention, causal conv, Mamba-2's gate and decode step, fused cells, Newton RNN: forward,
// backward and the decode steps), and the linear scan (a header-only kernel shared by every variant,
// with SSE tile transposes on x86 and plain loops elsewhere), on fixed pseudo-random inputs at
// awkward sizes, and writes every output array as raw
// little-endian float32 to one binary file, with a text index beside it (<out>.txt: one line
// "name count kind" per array, in file order; kind is f32, or bf16 for an array stored as bfloat16
// and widened to float32 here).
//
// tests/aarch64.test.ts builds it twice, natively (the base variant is SSE2 on x86-64) and for
// aarch64 (where the base variant is NEON), runs both and compares the files array by array.
//
// No N-API: the argument structs of cuda/common/api.h are filled here the way the op bindings fill
// them (sequence tables, optional tensors, which outputs start zeroed). Outputs that the bindings
// allocate without clearing (the kernels write every element) start filled with NaN here, so an
// element a kernel leaves unwritten shows up in the comparison.
//
// Every call goes through the ops' dispatching functions (<op>_cpu.cc), as in the addon. On x86-64
// the driver selects the base variant (rk::setActiveIsa, as rk.cpu.setIsa does); elsewhere base is
// the only variant and the driver leaves the choice alone. It reports which variants the machine
// supports, which one was chosen, and how many calls each variant ran.
//
// Usage: driver <out.bin>. Prints the variant information and per-op timings to stdout.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/isa.h"
#include "common/parallel.h"
#include "cuda/common/api.h"
#include "ops/attention/linear_attention_cpu.h"
#include "ops/cells/fused_rnn_cpu.h"
#include "ops/conv/causal_conv1d_cpu.h"
#include "ops/delta/gated_delta_rule_cpu.h"
#include "ops/newton/newton_rnn_cpu.h"
#include "ops/scan/linear_scan_cpu.h"
#include "ops/scan/selective_scan_cpu.h"
#include "ops/ssd/mamba2_scan_cpu.h"
#include "common/dtype.h"

// The vector width the base variant is compiled with, taken from the same region header the
// kernels' translation units open (the driver is compiled with the same compiler and flags).
#define RK_ISA_LEVEL 0
#include "common/isa_begin.h"
namespace {
constexpr int kBaseWidth = RK_ISA_WIDTH;
}
#include "common/isa_end.h"
#undef RK_ISA_LEVEL

using rkcuda::CellKind;
using rkcuda::DType;
using rkcuda::NewtonCell;
using rkcuda::NewtonGuess;
using rkcuda::ScanSegment;

namespace {

// ---- the kernels' entry points ----

// The ops' dispatching functions (<op>_cpu.cc), as the addon calls them: each call picks the active
// variant and counts it (rk::isaRuns), and is counted here too.
int64_t kernelCalls = 0;
void scanForward(const rkcuda::SelectiveScanArgs& a, void* y, float* states, float* fin) {
  ++kernelCalls;
  rk::scan::selectiveScanForwardCpu(a, y, states, fin);
}
void scanBackward(const rkcuda::SelectiveScanArgs& a, const rkcuda::SelectiveScanGrads& g) {
  ++kernelCalls;
  rk::scan::selectiveScanBackwardCpu(a, g);
}
void scanUpdate(const rkcuda::SelectiveStateUpdateArgs& a) {
  ++kernelCalls;
  rk::scan::selectiveStateUpdateCpu(a);
}
void deltaForward(const rkcuda::GatedDeltaRuleArgs& a, void* o, float* states, float* fin) {
  ++kernelCalls;
  rk::delta::gatedDeltaRuleForwardCpu(a, o, states, fin);
}
void deltaBackward(const rkcuda::GatedDeltaRuleArgs& a, const rkcuda::GatedDeltaRuleGrads& g) {
  ++kernelCalls;
  rk::delta::gatedDeltaRuleBackwardCpu(a, g);
}
void deltaStep(const rkcuda::GatedDeltaRuleStepArgs& a) {
  ++kernelCalls;
  rk::delta::gatedDeltaRuleStepCpu(a);
}
void cellsForward(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnOutputs& o) {
  ++kernelCalls;
  rk::cells::fusedRnnForwardCpu(a, o);
}
void cellsBackward(const rkcuda::FusedRnnArgs& a, const rkcuda::FusedRnnGrads& g) {
  ++kernelCalls;
  rk::cells::fusedRnnBackwardCpu(a, g);
}
void newtonForward(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnOutputs& o) {
  ++kernelCalls;
  rk::newton::newtonRnnForwardCpu(a, o);
}
void newtonBackward(const rkcuda::NewtonRnnArgs& a, const rkcuda::NewtonRnnGrads& g) {
  ++kernelCalls;
  rk::newton::newtonRnnBackwardCpu(a, g);
}
void linearForward(rkcuda::DType dt, const void* a, const void* b, const float* h0, void* h, float* fin,
                   const rk::scan::LinearScanShape& s) {
  ++kernelCalls;
  rk::scan::linearScanForwardCpu(dt, a, b, h0, h, fin, s);
}
void linearBackward(rkcuda::DType dt, const void* a, const void* h, const float* h0, const void* gh,
                    const float* gFinal, void* ga, void* gb, float* gh0, const rk::scan::LinearScanShape& s) {
  ++kernelCalls;
  rk::scan::linearScanBackwardCpu(dt, a, h, h0, gh, gFinal, ga, gb, gh0, s);
}

// ---- inputs ----

// FNV-1a over the bits of every input drawn: printed, so that the test can tell that both builds
// ran on the same inputs.
uint64_t inputHash = 0xcbf29ce484222325ull;

// splitmix64, and floats from it by separately rounded operations (no multiply-add, which some
// targets would fuse and others not), so that every build draws bit-identical inputs.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t bits() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi): 24 random bits (exact), scaled and shifted.
  RK_NO_FP_CONTRACT float uniform(float lo, float hi) {
    RK_NO_FP_CONTRACT_BODY
    const float x = lo + (hi - lo) * (float(bits() >> 40) * 0x1p-24f);
    uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int i = 0; i < 4; ++i) inputHash = (inputHash ^ ((u >> (8 * i)) & 0xffu)) * 0x100000001b3ull;
    return x;
  }
  std::vector<float> vec(int64_t n, float lo, float hi) {
    std::vector<float> v(size_t(n < 0 ? 0 : n));
    for (float& x : v) x = uniform(lo, hi);
    return v;
  }
};

// A tensor's storage: fp32 values, or their bfloat16 roundings.
struct Buf {
  DType dt = DType::F32;
  std::vector<float> f;
  std::vector<uint16_t> h;
  Buf() = default;
  Buf(DType d, int64_t n, float fill) : dt(d) {
    if (d == DType::F32)
      f.assign(size_t(n), fill);
    else
      h.assign(size_t(n), rk::floatToBf16(fill));
  }
  Buf(DType d, const std::vector<float>& v) : dt(d) {
    if (d == DType::F32) {
      f = v;
    } else {
      h.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = rk::floatToBf16(v[i]);
    }
  }
  void* data() { return dt == DType::F32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  const void* cdata() const {
    return dt == DType::F32 ? static_cast<const void*>(f.data()) : static_cast<const void*>(h.data());
  }
  size_t size() const { return dt == DType::F32 ? f.size() : h.size(); }
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();
// An output the kernels must write entirely (the bindings' Init::Overwritten), or one that starts at zero.
Buf overwritten(DType dt, int64_t n) { return Buf(dt, n, kNaN); }
Buf zeroed(DType dt, int64_t n) { return Buf(dt, n, 0.0f); }
std::vector<float> overwrittenF(int64_t n) { return std::vector<float>(size_t(n), kNaN); }
std::vector<float> zeroedF(int64_t n) { return std::vector<float>(size_t(n), 0.0f); }

// The sequence table, as the bindings build it (cpp/napi/args.cc): one segment per batch row
// without cu, else one per offset pair of cu (batch 1).
std::vector<ScanSegment> segmentsOf(int64_t batch, int64_t length, const std::vector<int32_t>& cu, int64_t chunk,
                                    int64_t* totalChunks, bool* packed) {
  std::vector<ScanSegment> segs;
  *packed = !cu.empty();
  if (cu.empty()) {
    for (int64_t b = 0; b < batch; ++b) segs.push_back({b, 0, length, 0});
  } else {
    for (size_t i = 1; i < cu.size(); ++i) segs.push_back({0, cu[i - 1], int64_t(cu[i]) - cu[i - 1], 0});
  }
  int64_t total = 0;
  for (ScanSegment& s : segs) {
    s.chunkOffset = total;
    total += (s.length + chunk - 1) / chunk;
  }
  *totalChunks = total;
  return segs;
}

// ---- output ----

struct Out {
  FILE* bin = nullptr;
  FILE* idx = nullptr;
  int64_t arrays = 0, floats = 0;
  std::string prefix;

  void raw(const std::string& name, const float* p, size_t n, const char* kind) {
    if (n && std::fwrite(p, sizeof(float), n, bin) != n) {
      std::perror("write");
      std::exit(2);
    }
    std::fprintf(idx, "%s %zu %s\n", (prefix + name).c_str(), n, kind);
    ++arrays;
    floats += int64_t(n);
  }
  void f32(const std::string& name, const std::vector<float>& v) { raw(name, v.data(), v.size(), "f32"); }
  void buf(const std::string& name, const Buf& b) {
    if (b.dt == DType::F32) return raw(name, b.f.data(), b.f.size(), "f32");
    std::vector<float> w(b.h.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = rk::bf16ToFloat(b.h[i]);
    raw(name, w.data(), w.size(), "bf16");
  }
  template <typename T> void ints(const std::string& name, const T* p, int64_t n) {
    std::vector<float> w(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) w[size_t(i)] = float(p[i]);
    raw(name, w.data(), w.size(), "f32");
  }
};

// ---- selective scan ----

struct ScanCase {
  const char* name;
  DType dt;
  int64_t batch, dim, seqlen, dstate, groups;
  bool variableB, variableC, softplus, hasD, hasZ, hasBias, hasH0;
  std::vector<int32_t> cu;  // packed offsets (batch 1), or empty
};

void runScan(Out& out, const ScanCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::SelectiveScanArgs a;
  a.dt = c.dt;
  a.batch = c.batch;
  a.dim = c.dim;
  a.seqlen = c.seqlen;
  a.dstate = c.dstate;
  a.groups = c.groups;
  a.variableB = c.variableB;
  a.variableC = c.variableC;
  a.deltaSoftplus = c.softplus;
  a.chunk = rk::scan::kSelectiveChunk;
  const std::vector<ScanSegment> segs = segmentsOf(c.batch, c.seqlen, c.cu, a.chunk, &a.totalChunks, &a.packed);
  a.nseq = int64_t(segs.size());
  a.segments = segs.data();
  const int64_t elems = c.batch * c.dim * c.seqlen, params = c.dim * c.dstate;
  const int64_t bcVar = c.batch * c.groups * c.dstate * c.seqlen, stateElems = a.nseq * c.dim * c.dstate;
  const int64_t checkpoints = a.totalChunks * c.dim * c.dstate;

  const Buf u(c.dt, rng.vec(elems, -1.0f, 1.0f));
  // dt = delta (+ bias), through softplus or not: positive either way.
  const Buf delta(c.dt, c.softplus ? rng.vec(elems, -3.0f, 1.0f) : rng.vec(elems, 0.02f, 0.5f));
  const std::vector<float> A = rng.vec(params, -1.7f, -0.2f);
  const Buf B = c.variableB ? Buf(c.dt, rng.vec(bcVar, -1.0f, 1.0f)) : Buf(DType::F32, rng.vec(params, -1.0f, 1.0f));
  const Buf C = c.variableC ? Buf(c.dt, rng.vec(bcVar, -1.0f, 1.0f)) : Buf(DType::F32, rng.vec(params, -1.0f, 1.0f));
  const std::vector<float> D = c.hasD ? rng.vec(c.dim, -1.0f, 1.0f) : std::vector<float>();
  const Buf z = c.hasZ ? Buf(c.dt, rng.vec(elems, -2.0f, 2.0f)) : Buf();
  const std::vector<float> bias = c.hasBias ? rng.vec(c.dim, c.softplus ? -0.5f : 0.0f, 0.3f) : std::vector<float>();
  const std::vector<float> h0 = c.hasH0 ? rng.vec(stateElems, -0.5f, 0.5f) : std::vector<float>();
  a.u = u.cdata();
  a.delta = delta.cdata();
  a.A = A.data();
  a.B = B.cdata();
  a.C = C.cdata();
  a.D = c.hasD ? D.data() : nullptr;
  a.z = c.hasZ ? z.cdata() : nullptr;
  a.deltaBias = c.hasBias ? bias.data() : nullptr;
  a.h0 = c.hasH0 ? h0.data() : nullptr;

  Buf y = overwritten(c.dt, elems);
  std::vector<float> states = overwrittenF(checkpoints), fin = zeroedF(stateElems);
  scanForward(a, y.data(), states.data(), fin.data());
  out.buf("y", y);
  out.f32("states", states);
  out.f32("finalState", fin);

  const Buf dy(c.dt, rng.vec(elems, -1.0f, 1.0f));
  const std::vector<float> dFinal = rng.vec(stateElems, -0.5f, 0.5f);
  rkcuda::SelectiveScanGrads g;
  g.dy = dy.cdata();
  g.dFinal = dFinal.data();
  g.states = states.data();
  Buf du = a.packed ? zeroed(c.dt, elems) : overwritten(c.dt, elems);
  Buf ddelta = a.packed ? zeroed(c.dt, elems) : overwritten(c.dt, elems);
  Buf dz = a.packed ? zeroed(c.dt, c.hasZ ? elems : 0) : overwritten(c.dt, c.hasZ ? elems : 0);
  std::vector<float> dA = zeroedF(params), dD = zeroedF(c.hasD ? c.dim : 0), dBias = zeroedF(c.hasBias ? c.dim : 0);
  Buf dB = c.variableB ? zeroed(c.dt, bcVar) : zeroed(DType::F32, params);
  Buf dC = c.variableC ? zeroed(c.dt, bcVar) : zeroed(DType::F32, params);
  std::vector<float> dh0 = zeroedF(stateElems);
  g.du = du.data();
  g.ddelta = ddelta.data();
  g.dA = dA.data();
  g.dB = dB.data();
  g.dC = dC.data();
  g.dD = c.hasD ? dD.data() : nullptr;
  g.dz = c.hasZ ? dz.data() : nullptr;
  g.dDeltaBias = c.hasBias ? dBias.data() : nullptr;
  g.dh0 = dh0.data();
  scanBackward(a, g);
  out.buf("du", du);
  out.buf("ddelta", ddelta);
  out.f32("dA", dA);
  out.buf("dB", dB);
  out.buf("dC", dC);
  if (c.hasD) out.f32("dD", dD);
  if (c.hasZ) out.buf("dz", dz);
  if (c.hasBias) out.f32("dDeltaBias", dBias);
  out.f32("dh0", dh0);
}

void runScanUpdate(Out& out, uint64_t seed) {
  Rng rng(seed);
  rkcuda::SelectiveStateUpdateArgs a;
  a.batch = 2;
  a.dim = 21;
  a.dstate = 6;
  a.groups = 3;
  a.tokens = 3;
  a.deltaSoftplus = true;
  a.updateState = true;
  const int64_t elems = a.batch * a.dim * a.tokens, stateElems = a.batch * a.dim * a.dstate;
  const int64_t bc = a.batch * a.groups * a.dstate * a.tokens;
  std::vector<float> state = rng.vec(stateElems, -0.5f, 0.5f);
  const std::vector<float> x = rng.vec(elems, -1.0f, 1.0f), dt = rng.vec(elems, -3.0f, 1.0f);
  const std::vector<float> A = rng.vec(a.dim * a.dstate, -1.7f, -0.2f), B = rng.vec(bc, -1.0f, 1.0f),
                           C = rng.vec(bc, -1.0f, 1.0f), D = rng.vec(a.dim, -1.0f, 1.0f),
                           z = rng.vec(elems, -2.0f, 2.0f), bias = rng.vec(a.dim, -0.5f, 0.3f);
  std::vector<float> y = overwrittenF(elems), inter = overwrittenF(a.tokens * stateElems);
  a.state = state.data();
  a.x = x.data();
  a.delta = dt.data();
  a.A = A.data();
  a.B = B.data();
  a.C = C.data();
  a.D = D.data();
  a.z = z.data();
  a.deltaBias = bias.data();
  a.y = y.data();
  a.intermediate = inter.data();
  scanUpdate(a);
  out.f32("y", y);
  out.f32("intermediate", inter);
  out.f32("state", state);
}

// ---- linear attention ----

void attnForward(const rkcuda::LinearAttentionArgs& a, void* o, float* states, float* fin) {
  ++kernelCalls;
  rk::attention::linearAttentionForwardCpu(a, o, states, fin);
}
void attnBackward(const rkcuda::LinearAttentionArgs& a, const rkcuda::LinearAttentionGrads& g) {
  ++kernelCalls;
  rk::attention::linearAttentionBackwardCpu(a, g);
}

struct AttnCase {
  const char* name;
  rkcuda::LinearRule rule;
  DType dt;
  int64_t batch, T, Hq, Hk, Hv, K, V;
  bool perKey, l2norm;
  int64_t window;
  std::vector<int32_t> cu;
};

void runAttn(Out& out, const AttnCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::LinearAttentionArgs a;
  a.dt = c.dt;
  a.rule = c.rule;
  a.batch = c.batch, a.T = c.T, a.Hq = c.Hq, a.Hk = c.Hk, a.Hv = c.Hv, a.K = c.K, a.V = c.V;
  a.perKeyDecay = c.perKey;
  a.l2norm = c.l2norm;
  a.scale = 1.0f / std::sqrt(float(c.K));
  a.chunk = rk::attention::kLinearAttentionChunk;
  const std::vector<ScanSegment> segs = segmentsOf(c.batch, c.T, c.cu, a.chunk, &a.totalChunks, &a.packed);
  a.nseq = int64_t(segs.size());
  a.segments = segs.data();
  const int64_t BT = c.batch * c.T, Ho = a.outHeads(), KV = c.K * c.V, stateElems = a.nseq * c.Hv * KV;
  const float kq = c.l2norm ? 1.0f : 1.0f / std::sqrt(float(c.K));
  const Buf q(c.dt, rng.vec(BT * c.Hq * c.K, -kq, kq)), k(c.dt, rng.vec(BT * c.Hk * c.K, -kq, kq)),
      v(c.dt, rng.vec(BT * c.Hv * c.V, -1.0f, 1.0f)), beta(c.dt, rng.vec(BT * c.Hv, 0.05f, 0.95f));
  const std::vector<float> g = rng.vec(BT * c.Hv * (c.perKey ? c.K : 1), -0.6f, -0.02f);
  const std::vector<float> h0 = rng.vec(stateElems, -0.5f, 0.5f);
  a.q = q.cdata(), a.k = k.cdata(), a.v = v.cdata(), a.g = g.data(), a.beta = beta.cdata(), a.h0 = h0.data();
  Buf o = zeroed(c.dt, BT * Ho * c.V);
  std::vector<float> states = overwrittenF(a.totalChunks * c.Hv * KV), fin = zeroedF(stateElems),
                     win = zeroedF(c.window * stateElems);
  a.window = c.window;
  a.windowStates = c.window ? win.data() : nullptr;
  a.windowSlotStride = stateElems;
  a.windowSeqStride = c.Hv * KV;
  attnForward(a, o.data(), states.data(), fin.data());
  out.buf("o", o);
  out.f32("states", states);
  out.f32("finalState", fin);
  if (c.window) out.f32("window", win);
  a.window = 0, a.windowStates = nullptr;
  const Buf dO(c.dt, rng.vec(BT * Ho * c.V, -1.0f, 1.0f));
  const std::vector<float> dFinal = rng.vec(stateElems, -0.5f, 0.5f);
  Buf dq = zeroed(c.dt, BT * c.Hq * c.K), dk = zeroed(c.dt, BT * c.Hk * c.K), dv = zeroed(c.dt, BT * c.Hv * c.V),
      dbeta = zeroed(c.dt, BT * c.Hv);
  std::vector<float> dg = zeroedF(int64_t(g.size())), dh0 = zeroedF(stateElems);
  rkcuda::LinearAttentionGrads gr;
  gr.dO = dO.cdata();
  gr.dFinal = dFinal.data();
  gr.states = states.data();
  gr.dq = dq.data(), gr.dk = dk.data(), gr.dv = dv.data(), gr.dg = dg.data(), gr.dbeta = dbeta.data();
  gr.dh0 = dh0.data();
  attnBackward(a, gr);
  out.buf("dq", dq);
  out.buf("dk", dk);
  out.buf("dv", dv);
  if (rkcuda::ruleDecays(c.rule)) out.f32("dg", dg);
  if (rkcuda::ruleCorrects(c.rule)) out.buf("dbeta", dbeta);
  out.f32("dh0", dh0);
}

// ---- causal conv ----

void convForward(const rkcuda::CausalConv1dArgs& a, void* y, void* fin) {
  ++kernelCalls;
  rk::conv::causalConv1dForwardCpu(a, y, fin);
}
void convBackward(const rkcuda::CausalConv1dArgs& a, const rkcuda::CausalConv1dGrads& g) {
  ++kernelCalls;
  rk::conv::causalConv1dBackwardCpu(a, g);
}

struct ConvCase {
  const char* name;
  DType dt;
  int64_t batch, C, T, W, dilation;
  bool channelsLast, silu, bias;
  int64_t window;
  std::vector<int32_t> cu;
};

void runConv(Out& out, const ConvCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::CausalConv1dArgs a;
  a.dt = c.dt;
  a.batch = c.batch, a.C = c.C, a.T = c.T, a.W = c.W, a.dilation = c.dilation;
  a.channelsLast = c.channelsLast, a.silu = c.silu;
  int64_t chunks = 0;
  const std::vector<ScanSegment> segs = segmentsOf(c.batch, c.T, c.cu, 1, &chunks, &a.packed);
  a.nseq = int64_t(segs.size());
  a.segments = segs.data();
  const int64_t n = c.batch * c.C * c.T, stateElems = a.nseq * c.C * a.stateLen();
  const Buf x(c.dt, rng.vec(n, -1.0f, 1.0f)), w(c.dt, rng.vec(c.C * c.W, -1.0f, 1.0f)),
      bias(c.dt, rng.vec(c.C, -0.5f, 0.5f)), h0(c.dt, rng.vec(stateElems, -1.0f, 1.0f));
  a.x = x.cdata(), a.weight = w.cdata(), a.bias = c.bias ? bias.cdata() : nullptr, a.h0 = h0.cdata();
  Buf y = zeroed(c.dt, n), fin = zeroed(c.dt, stateElems), win = zeroed(c.dt, c.window * stateElems);
  a.window = c.window;
  a.windowStates = c.window ? win.data() : nullptr;
  convForward(a, y.data(), fin.data());
  out.buf("y", y);
  out.buf("finalState", fin);
  if (c.window) out.buf("window", win);
  a.window = 0, a.windowStates = nullptr;
  const Buf dY(c.dt, rng.vec(n, -1.0f, 1.0f)), dF(c.dt, rng.vec(stateElems, -1.0f, 1.0f));
  Buf dx = zeroed(c.dt, n), dw = zeroed(c.dt, c.C * c.W), db = zeroed(c.dt, c.C), dh0 = zeroed(c.dt, stateElems);
  rkcuda::CausalConv1dGrads g;
  g.dY = dY.cdata(), g.dFinal = dF.cdata();
  g.dx = dx.data(), g.dweight = dw.data(), g.dbias = c.bias ? db.data() : nullptr, g.dh0 = dh0.data();
  convBackward(a, g);
  out.buf("dx", dx);
  out.buf("dweight", dw);
  if (c.bias) out.buf("dbias", db);
  out.buf("dh0", dh0);
}

// ---- Mamba-2 (the kernels around the scan, and the decode step) ----

void gateForward(const rkcuda::Mamba2GateArgs& a, const void* o, void* y) {
  ++kernelCalls;
  rk::ssd::mamba2FinishCpu(a, o, y);
}
void gateBackward(const rkcuda::Mamba2GateArgs& a, const void* o, const void* dy, void* dO, void* dz) {
  ++kernelCalls;
  rk::ssd::mamba2FinishBackwardCpu(a, o, dy, dO, dz);
}
void timeStepBackward(const rkcuda::Mamba2GateArgs& a, const void* dO, const void* dv, const float* dg, void* dx,
                      void* ddt, float* dA, float* dDtBias, float* dD) {
  ++kernelCalls;
  rk::ssd::mamba2PrepareBackwardCpu(a, dO, dv, dg, dx, ddt, dA, dDtBias, dD);
}
void ssdStep(const rkcuda::Mamba2StepArgs& s, void* y) {
  ++kernelCalls;
  rk::ssd::mamba2StepCpu(s, y);
}

struct Mamba2Case {
  const char* name;
  DType dt;
  int64_t batch, T, H, P, G, N;
  bool softplus, clamp, dPerChannel;
};

// The time step, the output gate and their backward, the state transposes, and the decode step
// (the scan itself is linear attention's, checked above). The time step's forward and the transposes
// are compiled once (not dispatched, so not counted as calls).
void runMamba2(Out& out, const Mamba2Case& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::Mamba2GateArgs a;
  a.dt = c.dt;
  a.rows = c.batch * c.T, a.H = c.H, a.P = c.P;
  a.dtSoftplus = c.softplus, a.clamp = c.clamp, a.dPerChannel = c.dPerChannel;
  a.dtMin = 0.1f, a.dtMax = 0.9f;
  const int64_t n = a.rows * c.H * c.P, heads = a.rows * c.H, dW = c.dPerChannel ? c.H * c.P : c.H;
  const Buf x(c.dt, rng.vec(n, -1.0f, 1.0f)), dt(c.dt, rng.vec(heads, -2.0f, 1.5f)), z(c.dt, rng.vec(n, -3.0f, 3.0f)),
      o(c.dt, rng.vec(n, -1.0f, 1.0f)), dy(c.dt, rng.vec(n, -1.0f, 1.0f)), dv(c.dt, rng.vec(n, -1.0f, 1.0f));
  const std::vector<float> A = rng.vec(c.H, -2.0f, -0.1f), bias = rng.vec(c.H, -0.5f, 0.5f),
                           D = rng.vec(dW, -1.0f, 1.0f), dg = rng.vec(heads, -1.0f, 1.0f);
  a.x = x.cdata(), a.dtIn = dt.cdata(), a.A = A.data(), a.dtBias = bias.data(), a.D = D.data(), a.z = z.cdata();
  std::vector<float> g = overwrittenF(heads);
  Buf v = overwritten(c.dt, n), y = overwritten(c.dt, n), dO = overwritten(c.dt, n), dz = overwritten(c.dt, n);
  rk::ssd::mamba2PrepareCpu(a, g.data(), v.data());
  gateForward(a, o.cdata(), y.data());
  gateBackward(a, o.cdata(), dy.cdata(), dO.data(), dz.data());
  out.f32("g", g);
  out.buf("v", v);
  out.buf("y", y);
  out.buf("dO", dO);
  out.buf("dz", dz);
  Buf dx = overwritten(c.dt, n), ddt = overwritten(c.dt, heads);
  std::vector<float> dA = zeroedF(c.H), dBias = zeroedF(c.H), dD = zeroedF(dW);
  timeStepBackward(a, dO.cdata(), dv.cdata(), dg.data(), dx.data(), ddt.data(), dA.data(), dBias.data(), dD.data());
  out.buf("dx", dx);
  out.buf("ddt", ddt);
  out.f32("dA", dA);
  out.f32("dDtBias", dBias);
  out.f32("dD", dD);
  const std::vector<float> s0 = rng.vec(c.batch * c.H * c.P * c.N, -1.0f, 1.0f);
  std::vector<float> sT = overwrittenF(int64_t(s0.size()));
  rk::ssd::mamba2TransposeStatesCpu(s0.data(), sT.data(), c.batch * c.H, c.P, c.N);
  out.f32("transposed", sT);
  rkcuda::Mamba2StepArgs st;
  st.gate = a;
  st.batch = c.batch, st.T = c.T, st.G = c.G, st.N = c.N;
  const Buf B(c.dt, rng.vec(a.rows * c.G * c.N, -1.0f, 1.0f)), C(c.dt, rng.vec(a.rows * c.G * c.N, -1.0f, 1.0f));
  st.B = B.cdata(), st.C = C.cdata();
  std::vector<float> state = s0, inter = overwrittenF(a.rows * c.H * c.P * c.N);
  st.state = state.data(), st.update = true, st.intermediate = inter.data();
  Buf ys = overwritten(c.dt, n);
  ssdStep(st, ys.data());
  out.buf("step.y", ys);
  out.f32("step.state", state);
  out.f32("step.intermediate", inter);
}

// ---- gated delta rule ----

struct DeltaCase {
  const char* name;
  int64_t batch, T, H, HV, K, V;
  bool l2norm, hasH0;
  std::vector<int32_t> cu;
};

void runDelta(Out& out, const DeltaCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::GatedDeltaRuleArgs a;
  a.batch = c.batch;
  a.T = c.T;
  a.H = c.H;
  a.HV = c.HV;
  a.K = c.K;
  a.V = c.V;
  a.scale = 1.0f / std::sqrt(float(c.K));
  a.l2norm = c.l2norm;
  a.chunk = rk::delta::kGatedDeltaRuleChunk;
  const std::vector<ScanSegment> segs = segmentsOf(c.batch, c.T, c.cu, a.chunk, &a.totalChunks, &a.packed);
  a.nseq = int64_t(segs.size());
  a.segments = segs.data();
  const int64_t qk = c.batch * c.T * c.H * c.K, vo = c.batch * c.T * c.HV * c.V, gb = c.batch * c.T * c.HV;
  const int64_t stateElems = a.nseq * c.HV * c.K * c.V, checkpoints = a.totalChunks * c.HV * c.K * c.V;
  // Without the normalisation, keys small enough that beta |k|^2 < 1 keeps the recurrence stable.
  const float kq = c.l2norm ? 1.0f : 1.0f / std::sqrt(float(c.K));
  const std::vector<float> q = rng.vec(qk, -kq, kq), k = rng.vec(qk, -kq, kq), v = rng.vec(vo, -1.0f, 1.0f);
  const std::vector<float> g = rng.vec(gb, -0.6f, -0.02f), beta = rng.vec(gb, 0.05f, 0.95f);
  const std::vector<float> h0 = c.hasH0 ? rng.vec(stateElems, -0.5f, 0.5f) : std::vector<float>();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.g = g.data();
  a.beta = beta.data();
  a.h0 = c.hasH0 ? h0.data() : nullptr;

  // What the forward keeps for the backward: the checkpoints, then each token's delta-rule correction.
  std::vector<float> o = overwrittenF(vo), states = overwrittenF(checkpoints + vo), fin = zeroedF(stateElems);
  deltaForward(a, o.data(), states.data(), fin.data());
  out.f32("o", o);
  out.f32("states", states);
  out.f32("finalState", fin);

  const std::vector<float> dO = rng.vec(vo, -1.0f, 1.0f), dFinal = rng.vec(stateElems, -0.5f, 0.5f);
  std::vector<float> dq = overwrittenF(qk), dk = overwrittenF(qk), dv = zeroedF(vo), dg = zeroedF(gb),
                     dbeta = zeroedF(gb), dh0 = zeroedF(stateElems);
  rkcuda::GatedDeltaRuleGrads gr;
  gr.dO = dO.data();
  gr.dFinal = dFinal.data();
  gr.states = states.data();
  gr.dq = dq.data();
  gr.dk = dk.data();
  gr.dv = dv.data();
  gr.dg = dg.data();
  gr.dbeta = dbeta.data();
  gr.dh0 = dh0.data();
  deltaBackward(a, gr);
  out.f32("dq", dq);
  out.f32("dk", dk);
  out.f32("dv", dv);
  out.f32("dg", dg);
  out.f32("dbeta", dbeta);
  out.f32("dh0", dh0);
}

void runDeltaStep(Out& out, uint64_t seed) {
  Rng rng(seed);
  rkcuda::GatedDeltaRuleStepArgs a;
  a.batch = 2;
  a.tokens = 3;
  a.H = 2;
  a.HV = 4;
  a.K = 12;
  a.V = 10;
  a.scale = 1.0f / std::sqrt(12.0f);
  a.l2norm = true;
  a.updateState = true;
  const int64_t qk = a.batch * a.tokens * a.H * a.K, vo = a.batch * a.tokens * a.HV * a.V,
                gb = a.batch * a.tokens * a.HV;
  const int64_t stateElems = a.batch * a.HV * a.K * a.V;
  std::vector<float> state = rng.vec(stateElems, -0.5f, 0.5f);
  const std::vector<float> q = rng.vec(qk, -1.0f, 1.0f), k = rng.vec(qk, -1.0f, 1.0f), v = rng.vec(vo, -1.0f, 1.0f);
  const std::vector<float> g = rng.vec(gb, -0.6f, -0.02f), beta = rng.vec(gb, 0.05f, 0.95f);
  std::vector<float> o = overwrittenF(vo), inter = overwrittenF(a.tokens * stateElems);
  a.state = state.data();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.g = g.data();
  a.beta = beta.data();
  a.o = o.data();
  a.intermediate = inter.data();
  deltaStep(a);
  out.f32("o", o);
  out.f32("intermediate", inter);
  out.f32("state", state);
}

// ---- fused cells ----

struct CellCase {
  const char* name;
  CellKind cell;
  DType dt;
  int64_t batch, T, heads, headDim;
  bool returnLastOnly, hasStates0;
  std::vector<int32_t> lengths;  // empty: T for every row
};

void runCells(Out& out, const CellCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::FusedRnnArgs a;
  a.dt = c.dt;
  a.cell = c.cell;
  a.batch = c.batch;
  a.T = c.T;
  a.heads = c.heads;
  a.headDim = c.headDim;
  a.returnLastOnly = c.returnLastOnly;
  a.lengths = c.lengths.empty() ? nullptr : c.lengths.data();
  const int64_t G = rkcuda::cellGates(c.cell), S = rkcuda::cellStates(c.cell), H = c.heads, D = c.headDim;
  const int64_t wxElems = c.batch * c.T * G * H * D, rElems = G * H * D * D, bElems = G * H * D;
  const int64_t stateElems = S * c.batch * H * D;
  const int64_t hElems = c.returnLastOnly ? c.batch * H * D : c.batch * c.T * H * D;
  const float rs = 1.0f / std::sqrt(float(D));
  const Buf wx(c.dt, rng.vec(wxElems, -1.0f, 1.0f)), R(c.dt, rng.vec(rElems, -rs, rs));
  const std::vector<float> b = rng.vec(bElems, -0.5f, 0.5f);
  std::vector<float> states0;
  if (c.hasStates0) {
    states0 = rng.vec(stateElems, -0.5f, 0.5f);
    if (c.cell == CellKind::Slstm)  // the normaliser n (state 2) of a running sLSTM is positive
      for (int64_t i = 2 * c.batch * H * D; i < 3 * c.batch * H * D; ++i) states0[size_t(i)] += 1.0f;
  }
  a.wx = wx.cdata();
  a.R = R.cdata();
  a.b = b.data();
  a.states0 = c.hasStates0 ? states0.data() : nullptr;

  Buf h = overwritten(c.dt, hElems);
  std::vector<float> fin = overwrittenF(stateElems), saved = overwrittenF(c.T * stateElems),
                     pre = overwrittenF(c.T * c.batch * G * H * D);
  rkcuda::FusedRnnOutputs o;
  o.h = h.data();
  o.finalStates = fin.data();
  o.savedStates = saved.data();
  o.savedPre = pre.data();
  cellsForward(a, o);
  out.buf("h", h);
  out.f32("finalStates", fin);
  out.f32("savedStates", saved);
  out.f32("savedPre", pre);

  const Buf dh(c.dt, rng.vec(hElems, -1.0f, 1.0f));
  const std::vector<float> dFinal = rng.vec(stateElems, -0.5f, 0.5f);
  Buf dwx = overwritten(c.dt, wxElems), dR = overwritten(c.dt, rElems);
  std::vector<float> db = overwrittenF(bElems), dStates0 = overwrittenF(stateElems);
  rkcuda::FusedRnnGrads g;
  g.dh = dh.cdata();
  g.dFinal = dFinal.data();
  g.savedStates = saved.data();
  g.savedPre = pre.data();
  g.dwx = dwx.data();
  g.dR = dR.data();
  g.db = db.data();
  g.dStates0 = dStates0.data();
  cellsBackward(a, g);
  out.buf("dwx", dwx);
  out.buf("dR", dR);
  out.f32("db", db);
  out.f32("dStates0", dStates0);
}

// ---- Newton RNN ----

struct NewtonCase {
  const char* name;
  NewtonCell cell;
  int64_t batch, T, heads, headDim;
  bool fullJacobian, sequential, fallback;
  int maxIters;
  float tolAbs, tolRel, damping;
  NewtonGuess guess;
  bool hasH0;
};

void runNewton(Out& out, const NewtonCase& c, uint64_t seed) {
  Rng rng(seed);
  rkcuda::NewtonRnnArgs a;
  a.cell = c.cell;
  a.batch = c.batch;
  a.T = c.T;
  a.heads = c.heads;
  a.headDim = c.headDim;
  a.fullJacobian = c.fullJacobian;
  a.sequential = c.sequential;
  a.fallbackSequential = c.fallback;
  a.maxIters = c.maxIters;
  a.tolAbs = c.tolAbs;
  a.tolRel = c.tolRel;
  a.damping = c.damping;
  a.guess = c.guess;
  const bool diag = c.cell == NewtonCell::GruDiag || c.cell == NewtonCell::LstmCifgDiag;
  const int64_t G = c.cell == NewtonCell::Lstm ? 4 : c.cell == NewtonCell::Elman ? 1 : 3;
  const int64_t S = c.cell == NewtonCell::Lstm || c.cell == NewtonCell::LstmCifgDiag ? 2 : 1;
  const int64_t N = c.heads * c.headDim, D = c.headDim;
  const int64_t wxElems = c.batch * c.T * G * N, rElems = diag ? G * N : G * c.heads * D * D, bElems = G * N;
  const int64_t stateElems = S * c.batch * N, trajElems = c.batch * c.T * S * N, yElems = c.batch * c.T * N;
  const float rs = diag ? 0.9f : 1.0f / std::sqrt(float(D));
  const std::vector<float> wx = rng.vec(wxElems, -1.0f, 1.0f), R = rng.vec(rElems, -rs, rs),
                           b = rng.vec(bElems, -0.5f, 0.5f);
  const std::vector<float> h0 = c.hasH0 ? rng.vec(stateElems, -0.5f, 0.5f) : std::vector<float>();
  const std::vector<float> guess =
      c.guess == NewtonGuess::Provided ? rng.vec(trajElems, -0.3f, 0.3f) : std::vector<float>();
  a.wx = wx.data();
  a.R = R.data();
  a.b = b.data();
  a.h0 = c.hasH0 ? h0.data() : nullptr;
  a.guessTraj = guess.empty() ? nullptr : guess.data();

  std::vector<float> traj = overwrittenF(trajElems), y = overwrittenF(yElems), fin = overwrittenF(stateElems);
  std::vector<int32_t> iterations(size_t(c.batch), -1);
  std::vector<float> residual(size_t(c.batch), kNaN);
  std::vector<uint8_t> converged(size_t(c.batch), 7), fellBack(size_t(c.batch), 7);
  rkcuda::NewtonRnnOutputs o;
  o.traj = traj.data();
  o.y = y.data();
  o.finalStates = fin.data();
  o.iterations = iterations.data();
  o.residual = residual.data();
  o.converged = converged.data();
  o.fellBack = fellBack.data();
  newtonForward(a, o);
  out.f32("traj", traj);
  out.f32("y", y);
  out.f32("finalStates", fin);
  // The statistics (the residual itself is rounding noise once converged, so it is not compared;
  // whether the check passed, and after how many steps, is).
  out.ints("iterations", iterations.data(), c.batch);
  out.ints("converged", converged.data(), c.batch);
  out.ints("fellBack", fellBack.data(), c.batch);

  const std::vector<float> dy = rng.vec(yElems, -1.0f, 1.0f), dFinal = rng.vec(stateElems, -0.5f, 0.5f);
  std::vector<float> dwx = overwrittenF(wxElems), dR = overwrittenF(rElems), db = overwrittenF(bElems),
                     dh0 = overwrittenF(stateElems);
  rkcuda::NewtonRnnGrads g;
  g.dy = dy.data();
  g.dFinal = dFinal.data();
  g.traj = traj.data();
  g.dwx = dwx.data();
  g.dR = dR.data();
  g.db = db.data();
  g.dh0 = dh0.data();
  newtonBackward(a, g);
  out.f32("dwx", dwx);
  out.f32("dR", dR);
  out.f32("db", db);
  out.f32("dh0", dh0);
}

// ---- linear scan ----

struct LinearCase {
  const char* name;
  DType dt;
  int64_t rows, length;
  bool reverse;
};

void runLinear(Out& out, const LinearCase& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t n = c.rows * c.length;
  const rk::scan::LinearScanShape shape{c.rows, c.length, c.reverse};
  const Buf a(c.dt, rng.vec(n, 0.5f, 1.0f)), b(c.dt, rng.vec(n, -1.0f, 1.0f));
  const std::vector<float> h0 = rng.vec(c.rows, -1.0f, 1.0f);
  Buf h = overwritten(c.dt, n);
  std::vector<float> fin = zeroedF(c.rows);
  linearForward(c.dt, a.cdata(), b.cdata(), h0.data(), h.data(), fin.data(), shape);
  out.buf("h", h);
  out.f32("finalState", fin);
  const Buf gh(c.dt, rng.vec(n, -1.0f, 1.0f));
  const std::vector<float> gFinal = rng.vec(c.rows, -1.0f, 1.0f);
  Buf ga = overwritten(c.dt, n), gb = overwritten(c.dt, n);
  std::vector<float> gh0 = zeroedF(c.rows);
  linearBackward(c.dt, a.cdata(), h.cdata(), h0.data(), gh.cdata(), gFinal.data(), ga.data(), gb.data(), gh0.data(),
                 shape);
  out.buf("ga", ga);
  out.buf("gb", gb);
  out.f32("gh0", gh0);
}

double seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <out.bin>\n", argv[0]);
    return 2;
  }
  Out out;
  out.bin = std::fopen(argv[1], "wb");
  out.idx = std::fopen((std::string(argv[1]) + ".txt").c_str(), "w");
  if (!out.bin || !out.idx) {
    std::perror(argv[1]);
    return 2;
  }
  // A fixed thread count: the work split (and so the order of a few sums) depends on it.
  rk::setNumThreads(2);

  std::printf("arch %s\n",
#if defined(__aarch64__)
              "aarch64"
#elif defined(__x86_64__)
              "x86_64"
#else
              "other"
#endif
  );
  std::printf("simd %s width %d\n",
#if defined(__ARM_NEON)
              "neon",
#elif defined(__SSE2__)
              "sse2",
#else
              "none",
#endif
              kBaseWidth);
  std::printf("default %s\n", rk::isaName(rk::activeIsa()));
#ifdef RK_X86_VARIANTS
  rk::setActiveIsa(rk::Isa::Base);
#endif
  std::printf("active %s\n", rk::isaName(rk::activeIsa()));
  std::printf("supported");
  for (rk::Isa i : rk::supportedIsas()) std::printf(" %s", rk::isaName(i));
  std::printf("\n");

  uint64_t seed = 1;
  auto section = [&](const char* op, auto&& body) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    std::printf("time %s %.3f\n", op, seconds(t0));
    std::fflush(stdout);
  };

  section("selectiveScan", [&] {
    const ScanCase cases[] = {
        // variable B and C, D, z, bias, softplus, h0; several chunks with a partial last one
        {"full", DType::F32, 2, 37, 150, 7, 1, true, true, true, true, true, true, true, {}},
        // constant B, variable C in 2 groups; length 1, batch 1; no optional inputs
        {"len1", DType::F32, 1, 20, 1, 5, 2, false, true, false, false, false, false, false, {}},
        // packed sequences: lengths 1, 69, 0, 121, then positions in no sequence
        {"packed", DType::F32, 1, 19, 200, 5, 1, true, true, true, true, true, false, true, {0, 1, 70, 70, 191}},
        // more states than the backward pass keeps per tile (recomputed one state at a time)
        {"manyStates", DType::F32, 1, 17, 70, 65, 1, true, false, true, true, false, true, false, {}},
        // constant B and C, 3 groups, no z
        {"constBC", DType::F32, 2, 33, 65, 3, 3, false, false, true, true, false, true, true, {}},
        {"bf16", DType::BF16, 1, 18, 70, 4, 1, true, true, true, true, true, true, true, {}},
    };
    for (const ScanCase& c : cases) {
      out.prefix = std::string("selectiveScan.") + c.name + ".";
      runScan(out, c, seed++);
    }
    out.prefix = "selectiveStateUpdate.";
    runScanUpdate(out, seed++);
  });

  section("gatedDeltaRule", [&] {
    const DeltaCase cases[] = {
        // H != HV, l2norm, h0; several chunks
        {"full", 2, 130, 2, 4, 20, 37, true, true, {}},
        // packed: lengths 1, 64, 0, 25, then positions in no sequence; no l2norm
        {"packed", 1, 100, 1, 3, 7, 9, false, true, {0, 1, 65, 65, 90}},
        // length 1, K past one 16-lane block, V two slabs
        {"len1", 1, 1, 1, 1, 33, 17, true, false, {}},
        // five column slabs (a full group of four and one more)
        {"wide", 1, 20, 1, 2, 5, 70, true, true, {}},
    };
    for (const DeltaCase& c : cases) {
      out.prefix = std::string("gatedDeltaRule.") + c.name + ".";
      runDelta(out, c, seed++);
    }
    out.prefix = "gatedDeltaRuleStep.";
    runDeltaStep(out, seed++);
  });

  section("linearAttention", [&] {
    using R = rkcuda::LinearRule;
    const AttnCase cases[] = {
        // per-key gated delta, grouped queries, l2norm, a window; several chunks
        {"kda", R::GatedDeltaRule, DType::F32, 2, 130, 4, 2, 2, 20, 37, true, true, 3, {}},
        // scalar gated, inverse grouping with shared keys, packed: lengths 1, 64, 0, 25, then a tail
        {"gated", R::Gated, DType::F32, 1, 100, 1, 1, 3, 7, 9, false, false, 0, {0, 1, 65, 65, 90}},
        // linear, bf16, K past one group of 16 rows
        {"linear", R::Linear, DType::BF16, 1, 21, 2, 2, 2, 33, 17, false, true, 2, {}},
        // delta rule, length 1
        {"delta", R::Delta, DType::F32, 2, 1, 1, 1, 1, 5, 70, false, true, 0, {}},
    };
    for (const AttnCase& c : cases) {
      out.prefix = std::string("linearAttention.") + c.name + ".";
      runAttn(out, c, seed++);
    }
  });

  section("causalConv1d", [&] {
    const ConvCase cases[] = {
        {"silu", DType::F32, 2, 37, 50, 4, 1, false, true, true, 3, {}},
        {"channelsLast", DType::F32, 2, 21, 33, 3, 2, true, true, false, 0, {}},
        {"packed", DType::BF16, 1, 17, 40, 4, 1, false, false, true, 2, {0, 1, 1, 30}},
    };
    for (const ConvCase& c : cases) {
      out.prefix = std::string("causalConv1d.") + c.name + ".";
      runConv(out, c, seed++);
    }
  });

  section("mamba2Scan", [&] {
    const Mamba2Case cases[] = {
        {"softplus", DType::F32, 2, 37, 3, 21, 1, 7, true, false, false},
        {"clampPerChannel", DType::F32, 1, 70, 4, 5, 2, 16, false, true, true},
        {"bf16", DType::BF16, 2, 9, 2, 64, 2, 33, true, true, false},
    };
    for (const Mamba2Case& c : cases) {
      out.prefix = std::string("mamba2Scan.") + c.name + ".";
      runMamba2(out, c, seed++);
    }
  });

  section("fusedRnn", [&] {
    const CellCase cases[] = {
        {"elman", CellKind::Elman, DType::F32, 3, 37, 3, 20, false, true, {37, 0, 19}},
        {"lstm", CellKind::Lstm, DType::F32, 3, 37, 3, 20, false, true, {37, 0, 19}},
        {"gru", CellKind::Gru, DType::F32, 3, 37, 3, 20, false, true, {37, 0, 19}},
        {"slstm", CellKind::Slstm, DType::F32, 3, 37, 3, 20, false, true, {37, 0, 19}},
        {"slstmEmpty", CellKind::Slstm, DType::F32, 2, 21, 2, 7, false, false, {}},
        {"lstmLast", CellKind::Lstm, DType::F32, 1, 1, 1, 5, true, true, {}},
        {"gruLast", CellKind::Gru, DType::F32, 2, 23, 5, 13, true, false, {23, 11}},
        // large enough for several threads: whole heads per thread, ranges of rows per thread,
        // and parts of one head per thread meeting at a barrier every step
        {"lstmHeads", CellKind::Lstm, DType::F32, 2, 70, 2, 40, false, true, {70, 45}},
        {"gruRows", CellKind::Gru, DType::F32, 4, 130, 1, 70, false, true, {}},
        {"lstmItems", CellKind::Lstm, DType::F32, 1, 60, 1, 97, false, true, {}},
        {"lstmBf16", CellKind::Lstm, DType::BF16, 2, 19, 2, 18, false, true, {19, 7}},
    };
    for (const CellCase& c : cases) {
      out.prefix = std::string("fusedRnn.") + c.name + ".";
      runCells(out, c, seed++);
    }
  });

  section("newtonRnn", [&] {
    const NewtonCase cases[] = {
        // diagonal GRU, exact Newton from zeros; two channel chunks, the second partial
        {"gruDiag", NewtonCell::GruDiag, 2, 150, 1, 70, true, false, true, 200, 1e-5f, 1e-5f, 0.0f, NewtonGuess::Zeros,
         true},
        // diagonal CIFG LSTM, a fixed number of damped steps from the one-step guess (damped steps
        // converge linearly: where a check would pass is too close to call across builds, so the
        // tolerance is 0 and the last iterate is compared, without the fallback)
        {"cifgDamped", NewtonCell::LstmCifgDiag, 2, 40, 1, 19, true, false, false, 25, 0.0f, 0.0f, 0.5f,
         NewtonGuess::OneStep, true},
        // dense LSTM with the full per-head Jacobian (DEER) from a provided guess
        {"lstmFull", NewtonCell::Lstm, 2, 40, 3, 11, true, false, true, 100, 1e-5f, 1e-5f, 0.0f, NewtonGuess::Provided,
         true},
        // dense GRU, quasi-DEER, too few steps: every row falls back to sequential evaluation
        {"gruFallback", NewtonCell::Gru, 2, 30, 2, 9, false, false, true, 2, 1e-7f, 0.0f, 0.0f, NewtonGuess::Zeros,
         false},
        // Elman, sequential evaluation, length 1
        {"elmanSeq", NewtonCell::Elman, 1, 1, 1, 5, true, true, true, 10, 1e-5f, 0.0f, 0.0f, NewtonGuess::Zeros, true},
    };
    for (const NewtonCase& c : cases) {
      out.prefix = std::string("newtonRnn.") + c.name + ".";
      runNewton(out, c, seed++);
    }
  });

  section("linearScan", [&] {
    const LinearCase cases[] = {
        {"forward", DType::F32, 21, 150, false},  // full 8 x 64 tiles and partial ones
        {"reverse", DType::F32, 21, 150, true},
        {"aligned", DType::F32, 16, 128, false},  // full tiles only, rows 16-byte aligned
        {"short", DType::F32, 3, 1, true},
        {"bf16", DType::BF16, 9, 70, true},
    };
    for (const LinearCase& c : cases) {
      out.prefix = std::string("linearScan.") + c.name + ".";
      runLinear(out, c, seed++);
    }
  });

  std::fclose(out.bin);
  std::fclose(out.idx);
  std::printf("inputs %016llx\n", (unsigned long long)inputHash);
  std::printf("calls %lld\n", (long long)kernelCalls);
  std::printf("runs base %llu avx2 %llu avx512 %llu\n", (unsigned long long)rk::isaRuns(rk::Isa::Base),
              (unsigned long long)rk::isaRuns(rk::Isa::Avx2), (unsigned long long)rk::isaRuns(rk::Isa::Avx512));
  std::printf("arrays %lld floats %lld\n", (long long)out.arrays, (long long)out.floats);
  return 0;
}
