// CPU selective scan. The work is cut into blocks of up to kLanes channels of one group of one
// sequence, walked in tiles of kSelectiveChunk steps. Within a block the channels are SIMD lanes:
// for every state n the kLanes recurrences advance together, one vector per step, and a variable
// B_t[n] / C_t[n] (shared by the group) is a scalar broadcast to all lanes. A tile's inputs are
// first transposed to [step][lane] fp32 buffers (with delta's bias and softplus applied once per
// element, not once per state). exp(dt * A) is a branch-free exp2 polynomial on whole vectors; the
// hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time.
//
// Backward, per block, tiles from last to first: the tile's states are recomputed from the saved
// checkpoint (one state n at a time), then walked backwards carrying dL/dx. Sums over channels
// (dA, D, deltaBias, and dB/dC) go into per-thread fp32 accumulators that are added up at the end.
#include "ops/scan/selective_scan_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <mutex>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/isa.h"
#include "tensor/lanes.h"
#include "tensor/parallel.h"

namespace rk::scan {
namespace {

using rkcuda::ScanSegment;
using rkcuda::SelectiveScanArgs;
using rkcuda::SelectiveScanGrads;
using rkcuda::SelectiveStateUpdateArgs;

constexpr int kSteps = int(kSelectiveChunk);
// Up to this many states the backward pass keeps a tile's trajectory (2 * N * kSteps vectors).
constexpr int64_t kKeepStates = 64;
// One value per lane (channel): Lanes (tensor/lanes.h).
inline float softplus(float v) { return v <= 20.0f ? std::log1p(std::exp(v)) : v; }
inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

RK_ALWAYS_INLINE Lanes sigmoidLanes(Lanes v) { return 1.0f / (1.0f + exp2Lanes(v * -kLog2e)); }

// log(1 + exp(v)) = max(v, 0) + log1p(e), e = exp(-|v|) in (0, 1]; log1p(e) = 2 atanh(s) with
// s = e / (2 + e) <= 1/3, summed as an odd series (accurate in relative terms even for tiny e).
// Above 20 it is v, as in the reference kernels.
RK_ALWAYS_INLINE Lanes softplusLanes(Lanes v) {
  const Lanes av = v < 0.0f ? -v : v;
  const Lanes e = exp2Lanes(av * -kLog2e);
  const Lanes s = e / (2.0f + e), s2 = s * s;
  Lanes q = splat(1.0f / 17.0f);
  for (int k = 15; k >= 1; k -= 2) q = q * s2 + 1.0f / float(k);
  const Lanes r = (v > 0.0f ? v : Lanes{}) + 2.0f * s * q;
  return v <= 20.0f ? r : v;
}

// ---- the inner loops ----

// What the forward and backward tile loops read: one tile of one block.
struct TileInputs {
  int steps = 0, N = 0;
  const Lanes* dt = nullptr;   // [steps] dt after bias and softplus
  const Lanes* dtu = nullptr;  // [steps] dt * u
  const Lanes* A2 = nullptr;   // [N] A * log2(e)
  const float* Bv = nullptr;   // variable: row n at Bv + n * bStride, `steps` floats
  int64_t bStride = 0;
  const Lanes* Bc = nullptr;   // constant: [N]
  const float* Cv = nullptr;
  int64_t cStride = 0;
  const Lanes* Cc = nullptr;
};

// One tile of one block, all states: x[n] advances over `steps` steps, y[t] += x . C.
struct FwdTile : TileInputs {
  Lanes* x = nullptr;  // [N] in/out
  Lanes* y = nullptr;  // [steps] accumulated
  // Optional (backward): the state before each step and each step's decay, [N][kSteps] each.
  Lanes* xprevOut = nullptr;
  Lanes* decayOut = nullptr;
};

template <bool VB, bool VC, bool KEEP> RK_ALWAYS_INLINE void fwdTileBody(const FwdTile& p) {
  for (int n = 0; n < p.N; ++n) {
    Lanes xv = p.x[n];
    const Lanes a2 = p.A2[n];
    for (int t = 0; t < p.steps; ++t) {
      const Lanes bb = VB ? splat(p.Bv[n * p.bStride + t]) : p.Bc[n];
      const Lanes cc = VC ? splat(p.Cv[n * p.cStride + t]) : p.Cc[n];
      const Lanes d = exp2Lanes(p.dt[t] * a2);
      if constexpr (KEEP) {
        p.xprevOut[n * kSteps + t] = xv;
        p.decayOut[n * kSteps + t] = d;
      }
      xv = d * xv + p.dtu[t] * bb;
      p.y[t] += xv * cc;
    }
    p.x[n] = xv;
  }
}

// One tile of one block backwards. g[n] is dL/dx at the tile's last step that arrives from later
// steps (already multiplied by their decay); on return it is the same for the step before the
// tile. x0 is the checkpoint (the state entering the tile).
struct BwdTile : TileInputs {
  const Lanes* u = nullptr;
  const Lanes* dyp = nullptr;  // dL/d(pre-gate y)
  const Lanes* A = nullptr;    // [N]
  const Lanes* x0 = nullptr;  // [N]
  Lanes* g = nullptr;         // [N] in/out
  // The state before each step and each step's decay: [N][kSteps] computed beforehand by
  // fwdTile (kept), or [kSteps] scratch recomputed here for one state at a time.
  Lanes* xprev = nullptr;
  Lanes* decay = nullptr;
  Lanes* ddt = nullptr;       // [steps] accumulated dL/d(dt)
  Lanes* du = nullptr;        // [steps] accumulated dL/du (through the state)
  Lanes* dA = nullptr;        // [N] accumulated
  float* dBv = nullptr;       // variable: row n at dBv + n * dbStride, accumulated
  int64_t dbStride = 0;
  Lanes* dBc = nullptr;       // constant: [N] accumulated
  float* dCv = nullptr;
  int64_t dcStride = 0;
  Lanes* dCc = nullptr;
};

template <bool VB, bool VC, bool KEPT> RK_ALWAYS_INLINE void bwdTileBody(const BwdTile& p) {
  for (int n = 0; n < p.N; ++n) {
    const Lanes a2 = p.A2[n], an = p.A[n];
    const Lanes* xprev = KEPT ? p.xprev + n * kSteps : p.xprev;
    const Lanes* decay = KEPT ? p.decay + n * kSteps : p.decay;
    if constexpr (!KEPT) {
      Lanes xv = p.x0[n];
      for (int t = 0; t < p.steps; ++t) {
        const Lanes bb = VB ? splat(p.Bv[n * p.bStride + t]) : p.Bc[n];
        const Lanes d = exp2Lanes(p.dt[t] * a2);
        p.xprev[t] = xv;
        p.decay[t] = d;
        xv = d * xv + p.dtu[t] * bb;
      }
    }
    Lanes gv = p.g[n], dAn{}, dBn{}, dCn{};
    for (int t = p.steps - 1; t >= 0; --t) {
      const Lanes bb = VB ? splat(p.Bv[n * p.bStride + t]) : p.Bc[n];
      const Lanes cc = VC ? splat(p.Cv[n * p.cStride + t]) : p.Cc[n];
      const Lanes xp = xprev[t], dec = decay[t], dt = p.dt[t], dtu = p.dtu[t], dyp = p.dyp[t];
      const Lanes xt = dec * xp + dtu * bb;
      const Lanes gt = gv + dyp * cc;
      const Lanes gDecay = gt * xp * dec;  // dL/d(dt * A) through exp
      const Lanes cB = gt * dtu, cC = dyp * xt;
      p.du[t] += gt * dt * bb;
      p.ddt[t] += gt * p.u[t] * bb + gDecay * an;
      dAn += gDecay * dt;
      if constexpr (VB) p.dBv[n * p.dbStride + t] += laneSum(cB); else dBn += cB;
      if constexpr (VC) p.dCv[n * p.dcStride + t] += laneSum(cC); else dCn += cC;
      gv = dec * gt;
    }
    p.g[n] = gv;
    p.dA[n] += dAn;
    if constexpr (!VB) p.dBc[n] += dBn;
    if constexpr (!VC) p.dCc[n] += dCn;
  }
}

// Element-wise work of a tile (once per channel and step, not per state).
struct PrepTile {  // dt = softplus(delta + bias) (or not), dtu = dt * u, dsp = d(dt)/d(delta)
  int steps = 0;
  bool softplus = false;
  Lanes bias{}, on{};  // on: 1 for present lanes, 0 for absent ones
  Lanes* dt = nullptr;  // in: delta; out: dt
  Lanes* dtu = nullptr;
  const Lanes* u = nullptr;
  Lanes* dsp = nullptr;  // nullable
};
RK_ALWAYS_INLINE void prepTileBody(const PrepTile& p) {
  for (int t = 0; t < p.steps; ++t) {
    Lanes v = p.dt[t] + p.bias, d = p.on;
    if (p.softplus) {
      d = v <= 20.0f ? sigmoidLanes(v) * p.on : p.on;
      v = softplusLanes(v) * p.on;
    }
    p.dt[t] = v;
    p.dtu[t] = v * p.u[t];
    if (p.dsp) p.dsp[t] = d;
  }
}
struct GateTile {
  int steps = 0;
  Lanes D{};
  const Lanes* u = nullptr;
  const Lanes* ypre = nullptr;  // sum_n x C (without the D term)
  Lanes* y = nullptr;           // forward: out y = (ypre + D u) * silu(z)
  Lanes* z = nullptr;           // nullable; backward: in z, out dL/dz
  Lanes* dy = nullptr;          // backward: in dL/dy, out dL/d(pre-gate y)
};
RK_ALWAYS_INLINE void gateFwdBody(const GateTile& p) {
  for (int t = 0; t < p.steps; ++t) {
    Lanes v = p.ypre[t] + p.D * p.u[t];
    if (p.z) v *= p.z[t] * sigmoidLanes(p.z[t]);
    p.y[t] = v;
  }
}
RK_ALWAYS_INLINE void gateBwdBody(const GateTile& p) {
  for (int t = 0; t < p.steps; ++t) {
    const Lanes zv = p.z[t], sgm = sigmoidLanes(zv), pre = p.ypre[t] + p.D * p.u[t];
    p.z[t] = p.dy[t] * pre * sgm * (1.0f + zv * (1.0f - sgm));
    p.dy[t] *= zv * sgm;
  }
}

// The loops above, compiled per instruction set and picked at run time.
#define RK_ISA_VARIANTS(SUFFIX, ATTR)                                                           \
  ATTR void fwdTile##SUFFIX(const FwdTile& p, bool vb, bool vc) {                               \
    const bool keep = p.xprevOut != nullptr;                                                    \
    if (vb && vc) keep ? fwdTileBody<true, true, true>(p) : fwdTileBody<true, true, false>(p);  \
    if (vb && !vc) keep ? fwdTileBody<true, false, true>(p) : fwdTileBody<true, false, false>(p); \
    if (!vb && vc) keep ? fwdTileBody<false, true, true>(p) : fwdTileBody<false, true, false>(p); \
    if (!vb && !vc) keep ? fwdTileBody<false, false, true>(p) : fwdTileBody<false, false, false>(p); \
  }                                                                                             \
  ATTR void bwdTile##SUFFIX(const BwdTile& p, bool vb, bool vc, bool kept) {                    \
    if (vb && vc) kept ? bwdTileBody<true, true, true>(p) : bwdTileBody<true, true, false>(p);  \
    if (vb && !vc) kept ? bwdTileBody<true, false, true>(p) : bwdTileBody<true, false, false>(p); \
    if (!vb && vc) kept ? bwdTileBody<false, true, true>(p) : bwdTileBody<false, true, false>(p); \
    if (!vb && !vc) kept ? bwdTileBody<false, false, true>(p) : bwdTileBody<false, false, false>(p); \
  }                                                                                             \
  ATTR void prepTile##SUFFIX(const PrepTile& p) { prepTileBody(p); }                            \
  ATTR void gateFwd##SUFFIX(const GateTile& p) { gateFwdBody(p); }                              \
  ATTR void gateBwd##SUFFIX(const GateTile& p) { gateBwdBody(p); }

RK_ISA_VARIANTS(Base, )
#ifdef RK_X86_MULTIVERSION
RK_ISA_VARIANTS(Avx2, RK_ISA_TARGET_AVX2)
RK_ISA_VARIANTS(Avx512, RK_ISA_TARGET_AVX512)
#endif

RK_DISPATCH(fwdTile, (const FwdTile& p, bool vb, bool vc), (p, vb, vc))
RK_DISPATCH(bwdTile, (const BwdTile& p, bool vb, bool vc, bool kept), (p, vb, vc, kept))
RK_DISPATCH(prepTile, (const PrepTile& p), (p))
RK_DISPATCH(gateFwd, (const GateTile& p), (p))
RK_DISPATCH(gateBwd, (const GateTile& p), (p))

// ---- blocks: kLanes channels of one group of one segment ----

struct Block {
  int64_t seg = 0, ch0 = 0;
  int nc = 0;
};

std::vector<Block> makeBlocks(const SelectiveScanArgs& a) {
  std::vector<Block> blocks;
  const int64_t perGroup = a.dim / a.groups;
  for (int64_t s = 0; s < a.nseq; ++s)
    for (int64_t g = 0; g < a.groups; ++g)
      for (int64_t c = 0; c < perGroup; c += kLanes)
        blocks.push_back({s, g * perGroup + c, int(std::min<int64_t>(kLanes, perGroup - c))});
  return blocks;
}

inline int64_t nChunks(const ScanSegment& sg) { return (sg.length + kSteps - 1) / kSteps; }

// What a block needs of the inputs, converted to fp32 and laid out by lane.
template <typename S> struct BlockInputs {
  const SelectiveScanArgs& a;
  const ScanSegment& sg;
  int64_t ch0;
  int nc;
  int64_t rowBase(int w) const { return (sg.batch * a.dim + ch0 + w) * a.seqlen; }
  int64_t group() const { return ch0 / (a.dim / a.groups); }
  int64_t bcBase() const { return (sg.batch * a.groups + group()) * a.dstate * a.seqlen; }

  void params(Lanes* A, Lanes* A2, Lanes* Bc, Lanes* Cc) const {
    for (int64_t n = 0; n < a.dstate; ++n)
      for (int w = 0; w < kLanes; ++w) {
        const bool on = w < nc;
        const int64_t i = (ch0 + w) * a.dstate + n;
        A[n][w] = on ? a.A[i] : 0.0f;
        A2[n][w] = A[n][w] * kLog2e;
        if (!a.variableB) Bc[n][w] = on ? static_cast<const float*>(a.B)[i] : 0.0f;
        if (!a.variableC) Cc[n][w] = on ? static_cast<const float*>(a.C)[i] : 0.0f;
      }
  }
  // Rows of a [batch, dim, seqlen] tensor for steps [t0, t0 + steps) into dst[t][lane], as fp32
  // (zeros for absent lanes), and back.
  void gather(const void* src, int64_t t0, int steps, Lanes* dst) const {
    const S* s = static_cast<const S*>(src);
    for (int w = 0; w < kLanes; ++w) {
      if (w >= nc || !s) {
        for (int t = 0; t < steps; ++t) dst[t][w] = 0.0f;
        continue;
      }
      const S* row = s + rowBase(w) + t0;
      for (int t = 0; t < steps; ++t) dst[t][w] = Storage<S>::load(row[t]);
    }
  }
  void scatter(const Lanes* src, int64_t t0, int steps, void* dst) const {
    for (int w = 0; w < nc; ++w) {
      S* row = static_cast<S*>(dst) + rowBase(w) + t0;
      for (int t = 0; t < steps; ++t) row[t] = Storage<S>::store(src[t][w]);
    }
  }
  Lanes perChannel(const float* v) const {
    Lanes out{};
    if (v)
      for (int w = 0; w < nc; ++w) out[w] = v[ch0 + w];
    return out;
  }
  // dt (after bias and softplus), dt * u, u, and (when wanted) softplus' derivative, for steps
  // [t0, t0 + steps) of the row; absent lanes get zeros.
  void tile(int64_t t0, int steps, Lanes* dt, Lanes* dtu, Lanes* u, Lanes* dsp) const {
    gather(a.delta, t0, steps, dt);
    gather(a.u, t0, steps, u);
    PrepTile p;
    p.steps = steps;
    p.softplus = a.deltaSoftplus;
    p.bias = perChannel(a.deltaBias);
    for (int w = 0; w < nc; ++w) p.on[w] = 1.0f;
    p.dt = dt;
    p.dtu = dtu;
    p.u = u;
    p.dsp = dsp;
    prepTile(p);
  }
  // Rows n of a variable B or C for steps [t0, t0 + steps) as fp32: the tensor itself for fp32,
  // else converted into buf ([dstate][kSteps]). Returns the pointer and stride for FwdTile/BwdTile.
  const float* variable(const void* src, int64_t t0, int steps, float* buf, int64_t* stride) const {
    const S* s = static_cast<const S*>(src) + bcBase() + t0;
    if constexpr (sizeof(S) == 4) {
      *stride = a.seqlen;
      return reinterpret_cast<const float*>(s);
    } else {
      for (int64_t n = 0; n < a.dstate; ++n)
        for (int t = 0; t < steps; ++t) buf[n * kSteps + t] = Storage<S>::load(s[n * a.seqlen + t]);
      *stride = kSteps;
      return buf;
    }
  }
  TileInputs tileInputs(int64_t t0, int steps, const Lanes* dt, const Lanes* dtu, const Lanes* A2, const Lanes* Bc,
                        const Lanes* Cc, float* bBuf, float* cBuf) const {
    TileInputs ti;
    ti.steps = steps;
    ti.N = int(a.dstate);
    ti.dt = dt;
    ti.dtu = dtu;
    ti.A2 = A2;
    ti.Bc = Bc;
    ti.Cc = Cc;
    if (a.variableB) ti.Bv = variable(a.B, t0, steps, bBuf, &ti.bStride);
    if (a.variableC) ti.Cv = variable(a.C, t0, steps, cBuf, &ti.cStride);
    return ti;
  }
  template <typename F> F* checkpoint(F* states, int64_t c, int w) const {
    return states + ((sg.chunkOffset * a.dim + (ch0 + w) * nChunks(sg) + c) * a.dstate);
  }
};

template <typename S> void zeroUncovered(const SelectiveScanArgs& a, S* out) {
  if (!a.packed) return;
  int64_t end = 0;
  for (int64_t s = 0; s < a.nseq; ++s) end = std::max(end, a.segments[s].start + a.segments[s].length);
  if (end >= a.seqlen) return;
  for (int64_t d = 0; d < a.dim; ++d)
    for (int64_t t = end; t < a.seqlen; ++t) out[d * a.seqlen + t] = Storage<S>::store(0.0f);
}

template <typename S>
void forwardImpl(const SelectiveScanArgs& a, S* y, float* states, float* finalState) {
  const std::vector<Block> blocks = makeBlocks(a);
  const int64_t N = a.dstate;
  const bool vb = a.variableB, vc = a.variableC;
  parallelFor(int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    // rows: A, A2, Bc, Cc, x (N each); dt, dtu, u, y, z (kSteps each)
    LaneScratch sc(size_t(5 * N + 5 * kSteps));
    Lanes *A = sc.at(0), *A2 = sc.at(N), *Bc = sc.at(2 * N), *Cc = sc.at(3 * N), *x = sc.at(4 * N);
    Lanes *dt = sc.at(5 * N), *dtu = dt + kSteps, *u = dtu + kSteps, *yt = u + kSteps, *zt = yt + kSteps;
    std::vector<float> bBuf(vb && sizeof(S) != 4 ? N * kSteps : 0), cBuf(vc && sizeof(S) != 4 ? N * kSteps : 0);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& bl = blocks[size_t(bi)];
      const ScanSegment& sg = a.segments[bl.seg];
      BlockInputs<S> in{a, sg, bl.ch0, bl.nc};
      in.params(A, A2, Bc, Cc);
      for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < kLanes; ++w)
          x[n][w] = (a.h0 && w < bl.nc) ? a.h0[(bl.seg * a.dim + bl.ch0 + w) * N + n] : 0.0f;
      const int64_t chunks = nChunks(sg);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t0 = sg.start + c * kSteps;
        const int steps = int(std::min<int64_t>(kSteps, sg.length - c * kSteps));
        for (int w = 0; w < bl.nc; ++w) {
          float* cp = in.checkpoint(states, c, w);
          for (int64_t n = 0; n < N; ++n) cp[n] = x[n][w];
        }
        in.tile(t0, steps, dt, dtu, u, nullptr);
        for (int t = 0; t < steps; ++t)
          for (int w = 0; w < kLanes; ++w) yt[t][w] = 0.0f;
        FwdTile p;
        static_cast<TileInputs&>(p) = in.tileInputs(t0, steps, dt, dtu, A2, Bc, Cc, bBuf.data(), cBuf.data());
        p.x = x;
        p.y = yt;
        fwdTile(p, vb, vc);
        GateTile gt;
        gt.steps = steps;
        gt.D = in.perChannel(a.D);
        gt.u = u;
        gt.ypre = yt;
        gt.y = yt;
        if (a.z) {
          in.gather(a.z, t0, steps, zt);
          gt.z = zt;
        }
        gateFwd(gt);
        in.scatter(yt, t0, steps, y);
      }
      if (finalState)
        for (int w = 0; w < bl.nc; ++w)
          for (int64_t n = 0; n < N; ++n) finalState[(bl.seg * a.dim + bl.ch0 + w) * N + n] = x[n][w];
    }
  });
  zeroUncovered(a, y);
}

// Per-thread sums over channels and time, added into the totals at the end.
struct Accumulators {
  std::vector<float> dA, dD, dBias, dB, dC;
  Accumulators(const SelectiveScanArgs& a, bool wantD, bool wantBias) {
    const size_t params = size_t(a.dim * a.dstate);
    const size_t variable = size_t(a.batch * a.groups * a.dstate * a.seqlen);
    dA.assign(params, 0.0f);
    if (wantD) dD.assign(size_t(a.dim), 0.0f);
    if (wantBias) dBias.assign(size_t(a.dim), 0.0f);
    dB.assign(a.variableB ? variable : params, 0.0f);
    dC.assign(a.variableC ? variable : params, 0.0f);
  }
  void addTo(Accumulators& total) const {
    auto add = [](std::vector<float>& dst, const std::vector<float>& src) {
      for (size_t i = 0; i < src.size(); ++i) dst[i] += src[i];
    };
    add(total.dA, dA);
    add(total.dD, dD);
    add(total.dBias, dBias);
    add(total.dB, dB);
    add(total.dC, dC);
  }
};

template <typename S> void backwardImpl(const SelectiveScanArgs& a, const SelectiveScanGrads& g) {
  const std::vector<Block> blocks = makeBlocks(a);
  const int64_t N = a.dstate;
  const bool vb = a.variableB, vc = a.variableC;
  Accumulators total(a, g.dD != nullptr, g.dDeltaBias != nullptr);
  std::mutex merge;
  parallelFor(int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    Accumulators acc(a, g.dD != nullptr, g.dDeltaBias != nullptr);
    // rows: A, A2, Bc, Cc, x, gcarry, dAc, dBc, dCc, xw (N each);
    // dt, dtu, u, dsp, dyp, ddt, du, xprev, decay, ypre, z (kSteps each)
    LaneScratch sc(size_t(10 * N + 11 * kSteps));
    Lanes *A = sc.at(0), *A2 = sc.at(N), *Bc = sc.at(2 * N), *Cc = sc.at(3 * N), *x = sc.at(4 * N);
    Lanes *gc = sc.at(5 * N), *dAc = sc.at(6 * N), *dBc = sc.at(7 * N), *dCc = sc.at(8 * N);
    Lanes* xw = sc.at(9 * N);
    Lanes *dt = sc.at(10 * N), *dtu = dt + kSteps, *u = dtu + kSteps, *dsp = u + kSteps, *dyp = dsp + kSteps;
    Lanes *ddt = dyp + kSteps, *dut = ddt + kSteps, *xprev = dut + kSteps, *decay = xprev + kSteps,
          *ypre = decay + kSteps, *zt = ypre + kSteps;
    // With few states, the tile's whole trajectory is kept ([N][kSteps] twice) so that the states
    // are computed once per tile rather than once for y (needed by z's gradient) and once per state.
    const bool keep = N <= kKeepStates;
    LaneScratch kept(keep ? size_t(2 * N * kSteps) : 0);
    std::vector<float> bBuf(vb && sizeof(S) != 4 ? N * kSteps : 0), cBuf(vc && sizeof(S) != 4 ? N * kSteps : 0);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& bl = blocks[size_t(bi)];
      const ScanSegment& sg = a.segments[bl.seg];
      BlockInputs<S> in{a, sg, bl.ch0, bl.nc};
      in.params(A, A2, Bc, Cc);
      for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < kLanes; ++w) {
          gc[n][w] = (g.dFinal && w < bl.nc) ? g.dFinal[(bl.seg * a.dim + bl.ch0 + w) * N + n] : 0.0f;
          dAc[n][w] = dBc[n][w] = dCc[n][w] = 0.0f;
        }
      const int64_t vOff = in.bcBase();
      Lanes laneD{}, laneBias{};
      for (int64_t c = nChunks(sg) - 1; c >= 0; --c) {
        const int64_t t0 = sg.start + c * kSteps;
        const int steps = int(std::min<int64_t>(kSteps, sg.length - c * kSteps));
        in.tile(t0, steps, dt, dtu, u, dsp);
        for (int w = 0; w < kLanes; ++w) {
          const float* cp = w < bl.nc ? in.checkpoint(g.states, c, w) : nullptr;
          for (int64_t n = 0; n < N; ++n) x[n][w] = cp ? cp[n] : 0.0f;
        }
        const TileInputs ti = in.tileInputs(t0, steps, dt, dtu, A2, Bc, Cc, bBuf.data(), cBuf.data());
        // The pre-gate output is needed for dz and for the gate's factor: recompute it.
        if (a.z || keep) {
          for (int t = 0; t < steps; ++t) ypre[t] = Lanes{};
          FwdTile p;
          static_cast<TileInputs&>(p) = ti;
          for (int64_t n = 0; n < N; ++n)
            for (int w = 0; w < kLanes; ++w) xw[n][w] = x[n][w];
          p.x = xw;
          p.y = ypre;
          if (keep) {
            p.xprevOut = kept.at(0);
            p.decayOut = kept.at(size_t(N * kSteps));
          }
          fwdTile(p, vb, vc);
        }
        in.gather(g.dy, t0, steps, dyp);
        const Lanes dv = in.perChannel(a.D);
        if (a.z) {
          in.gather(a.z, t0, steps, zt);
          GateTile gt;
          gt.steps = steps;
          gt.D = dv;
          gt.u = u;
          gt.ypre = ypre;
          gt.z = zt;
          gt.dy = dyp;
          gateBwd(gt);  // zt becomes dL/dz, dyp dL/d(pre-gate y)
          in.scatter(zt, t0, steps, g.dz);
        }
        for (int t = 0; t < steps; ++t) {
          laneD += dyp[t] * u[t];
          ddt[t] = Lanes{};
          dut[t] = dyp[t] * dv;
        }
        BwdTile p;
        static_cast<TileInputs&>(p) = ti;
        p.u = u;
        p.dyp = dyp;
        p.A = A;
        p.x0 = x;
        p.g = gc;
        p.xprev = keep ? kept.at(0) : xprev;
        p.decay = keep ? kept.at(size_t(N * kSteps)) : decay;
        p.ddt = ddt;
        p.du = dut;
        p.dA = dAc;
        p.dBv = vb ? acc.dB.data() + vOff + t0 : nullptr;
        p.dbStride = a.seqlen;
        p.dBc = dBc;
        p.dCv = vc ? acc.dC.data() + vOff + t0 : nullptr;
        p.dcStride = a.seqlen;
        p.dCc = dCc;
        bwdTile(p, vb, vc, keep);
        for (int t = 0; t < steps; ++t) {
          ddt[t] *= dsp[t];
          laneBias += ddt[t];
        }
        in.scatter(ddt, t0, steps, g.ddelta);
        in.scatter(dut, t0, steps, g.du);
      }
      for (int w = 0; w < bl.nc; ++w) {
        const int64_t ch = bl.ch0 + w;
        for (int64_t n = 0; n < N; ++n) {
          acc.dA[ch * N + n] += dAc[n][w];
          if (!vb) acc.dB[ch * N + n] += dBc[n][w];
          if (!vc) acc.dC[ch * N + n] += dCc[n][w];
          if (g.dh0) g.dh0[(bl.seg * a.dim + ch) * N + n] = gc[n][w];
        }
        if (g.dD) acc.dD[ch] += laneD[w];
        if (g.dDeltaBias) acc.dBias[ch] += laneBias[w];
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    acc.addTo(total);
  });
  std::copy(total.dA.begin(), total.dA.end(), g.dA);
  if (g.dD) std::copy(total.dD.begin(), total.dD.end(), g.dD);
  if (g.dDeltaBias) std::copy(total.dBias.begin(), total.dBias.end(), g.dDeltaBias);
  auto emit = [&](bool variable, const std::vector<float>& src, void* dst) {
    if (!variable) {
      std::copy(src.begin(), src.end(), static_cast<float*>(dst));
      return;
    }
    S* out = static_cast<S*>(dst);
    for (size_t i = 0; i < src.size(); ++i) out[i] = Storage<S>::store(src[i]);
  };
  emit(vb, total.dB, g.dB);
  emit(vc, total.dC, g.dC);
  zeroUncovered(a, static_cast<S*>(g.du));
  zeroUncovered(a, static_cast<S*>(g.ddelta));
  if (g.dz) zeroUncovered(a, static_cast<S*>(g.dz));
}

}  // namespace

void selectiveScanForwardCpu(const SelectiveScanArgs& a, void* y, float* states, float* finalState) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using S = decltype(tag);
    forwardImpl<S>(a, static_cast<S*>(y), states, finalState);
  });
}

void selectiveScanBackwardCpu(const SelectiveScanArgs& a, const SelectiveScanGrads& g) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) { backwardImpl<decltype(tag)>(a, g); });
}

void selectiveStateUpdateCpu(const SelectiveStateUpdateArgs& a) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) {
    using S = decltype(tag);
    const S* xs = static_cast<const S*>(a.x);
    const S* ds = static_cast<const S*>(a.delta);
    const S* Bs = static_cast<const S*>(a.B);
    const S* Cs = static_cast<const S*>(a.C);
    const S* zs = static_cast<const S*>(a.z);
    S* ys = static_cast<S*>(a.y);
    const int64_t N = a.dstate, T = a.tokens, perGroup = a.dim / a.groups;
    parallelFor(a.batch * a.dim, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> h(static_cast<size_t>(N));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / a.dim, d = r % a.dim, grp = d / perGroup;
        float* st = a.state + r * N;
        std::copy(st, st + N, h.begin());
        const float* An = a.A + d * N;
        const int64_t bc = (b * a.groups + grp) * N * T;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = r * T + t;
          float dt = Storage<S>::load(ds[i]) + (a.deltaBias ? a.deltaBias[d] : 0.0f);
          if (a.deltaSoftplus) dt = softplus(dt);
          const float xv = Storage<S>::load(xs[i]);
          float y = 0.0f;
          for (int64_t n = 0; n < N; ++n) {
            h[size_t(n)] = std::exp(dt * An[n]) * h[size_t(n)] + dt * Storage<S>::load(Bs[bc + n * T + t]) * xv;
            y += h[size_t(n)] * Storage<S>::load(Cs[bc + n * T + t]);
          }
          if (a.D) y += a.D[d] * xv;
          if (zs) {
            const float zv = Storage<S>::load(zs[i]);
            y *= zv * sigmoid(zv);
          }
          ys[i] = Storage<S>::store(y);
          if (a.intermediate) std::copy(h.begin(), h.end(), a.intermediate + ((b * T + t) * a.dim + d) * N);
        }
        if (a.updateState) std::copy(h.begin(), h.end(), st);
      }
    });
  });
}

}  // namespace rk::scan
