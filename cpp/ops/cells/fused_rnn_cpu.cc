// CPU fused recurrent cells.
//
// Forward. Channels are cut into blocks of kLanes (16) and the recurrent weights of each head are
// repacked once per call into panels: a panel holds the G gate columns of one block (two blocks for
// the Elman cell) as [k][gate x block] rows of 16-float vectors. Per step, a few batch rows of one
// head (a row block) go through a small register-tiled GEMM against a panel (rows x D times
// D x (G * 16), one broadcast of h_{t-1}[k] per row and k), and the G gate vectors of every row then
// go straight into the cell update (vectorised exp/tanh/sigmoid), so pre-activations never travel
// through memory except to be saved for the backward pass.
//
// Threads own whole heads, or ranges of batch rows (rows are independent recurrences), and then run
// without synchronisation; only a batch too small to split makes them share a head's panels and
// meet at a spin barrier after each step (h_{t-1} is read by every owner of a panel of its head;
// h is double-buffered).
//
// Backward, time reversed, per step: (a) per channel, the cell's backward from the saved
// pre-activations and states gives dwx, the recurrent gate gradients dP (kept for all steps) and
// the direct gradients of the previous states; (b) dL/dh_{t-1} += dP_t @ R^T, a second small GEMM
// against R^T repacked into panels of up to four 16-channel output blocks. Threads own blocks of
// channels for both parts, so only (a) -> (b) needs a barrier. After the loop, dR = sum_t
// h_{t-1}^T dP_t is one GEMM over all (step, row) pairs (blocked in chunks of rows so that its inputs
// stay in cache) and db the column sums of dP; each output element is owned by one thread and summed
// in a fixed order, so results do not depend on the thread count.
//
// The GEMM tile and the cell math are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// run time; the tile height follows the register file of each.
#include "ops/cells/fused_rnn_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/isa.h"
#include "tensor/lanes.h"
#include "tensor/parallel.h"

namespace rk::cells {
namespace {

using rkcuda::CellKind;
using rkcuda::FusedRnnArgs;
using rkcuda::FusedRnnGrads;
using rkcuda::FusedRnnOutputs;

constexpr int kMaxRows = 8;   // tallest GEMM tile (rows of the batch, or of R for dR)
constexpr int kMaxVecs = 4;   // widest GEMM tile, in vectors
constexpr int kBwdPanel = 4;  // output blocks per backward panel
constexpr int64_t kRowChunk = 128;  // (step, row) pairs per chunk of the dR GEMM


// ---- vector math ----

RK_ALWAYS_INLINE Lanes expv(Lanes x) { return exp2Lanes(x * kLog2e); }
RK_ALWAYS_INLINE Lanes sigmoidv(Lanes x) { return 1.0f / (1.0f + expv(-x)); }
// tanh from exp(-2|x|); below |x| = 1/16 an odd Taylor polynomial keeps the relative accuracy.
RK_ALWAYS_INLINE Lanes tanhv(Lanes x) {
  const Lanes ax = absLanes(x);
  const Lanes e = exp2Lanes(ax * (-2.0f * kLog2e));
  Lanes t = (1.0f - e) / (1.0f + e);
  t = x < 0.0f ? -t : t;
  const Lanes x2 = x * x;
  const Lanes p = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  return ax < 0.0625f ? p : t;
}
// log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series.
RK_ALWAYS_INLINE Lanes log1pUnit(Lanes e) {
  const Lanes s = e / (2.0f + e), s2 = s * s;
  Lanes q = splat(1.0f / 15.0f);
  for (int k = 13; k >= 1; k -= 2) q = q * s2 + 1.0f / float(k);
  return 2.0f * s * q;
}
// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), finite at both ends.
RK_ALWAYS_INLINE Lanes logsigmoidv(Lanes x) {
  return (x < 0.0f ? x : Lanes{}) - log1pUnit(expv(-absLanes(x)));
}

// ---- the GEMM tile ----
// acc[m][v] (+)= sum_q A[m * am + q * aq] * B[q * bq + v], for MR rows and NV vectors of columns;
// acc row m lives at acc + m * accStride.
struct TileArgs {
  const float* A = nullptr;
  int64_t am = 0, aq = 0;
  const Lanes* B = nullptr;
  int64_t bq = 0;
  int64_t K = 0;
  Lanes* acc = nullptr;
  int64_t accStride = 0;
  bool load = false;
};

template <int MR, int NV> RK_ALWAYS_INLINE void tileBody(const TileArgs& p) {
  Lanes c[MR][NV];
  const float* a[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    a[m] = p.A + m * p.am;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = p.load ? p.acc[m * p.accStride + v] : Lanes{};
  }
  const Lanes* b = p.B;
  for (int64_t q = 0; q < p.K; ++q) {
    Lanes bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = b[v];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const Lanes x = splat(a[m][q * p.aq]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] += x * bv[v];
    }
    b += p.bq;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) p.acc[m * p.accStride + v] = c[m][v];
}

template <int NV> RK_ALWAYS_INLINE void tileRows(const TileArgs& p, int mr) {
  switch (mr) {
    case 1: return tileBody<1, NV>(p);
    case 2: return tileBody<2, NV>(p);
    case 3: return tileBody<3, NV>(p);
    case 4: return tileBody<4, NV>(p);
    case 5: return tileBody<5, NV>(p);
    case 6: return tileBody<6, NV>(p);
    case 7: return tileBody<7, NV>(p);
    default: return tileBody<8, NV>(p);
  }
}
RK_ALWAYS_INLINE void tileAny(const TileArgs& p, int mr, int nv) {
  switch (nv) {
    case 1: return tileRows<1>(p, mr);
    case 2: return tileRows<2>(p, mr);
    case 3: return tileRows<3>(p, mr);
    default: return tileRows<4>(p, mr);
  }
}

// ---- the cells, one 16-channel block at a time ----
// x[g]: input part of gate g (wx + b; wx alone for the GRU's n gate); r[g]: recurrent part (rec;
// rec + b for the GRU's n gate). In the backward pass x may hold the whole pre-activation and r zero.
struct CellIo {
  int n = 0;  // blocks
  const Lanes* x = nullptr;     // [n][G]
  const Lanes* r = nullptr;     // [n][G]
  const Lanes* prev = nullptr;  // [n][S]
  Lanes* next = nullptr;        // [n][S]
};
struct CellGradIo {
  int n = 0;
  const Lanes* x = nullptr;     // [n][G]
  const Lanes* r = nullptr;     // [n][G]
  const Lanes* prev = nullptr;  // [n][S]
  const Lanes* g = nullptr;     // [n][S] dL/d(states after the step)
  Lanes* gx = nullptr;          // [n][G] dL/dx
  Lanes* gr = nullptr;          // [n][G] dL/dr
  Lanes* gprev = nullptr;       // [n][S] direct part of dL/d(states before the step)
};

template <CellKind C> RK_ALWAYS_INLINE void cellFwdBody(const CellIo& io) {
  constexpr int G = rkcuda::cellGates(C), S = rkcuda::cellStates(C);
  for (int i = 0; i < io.n; ++i) {
    const Lanes* x = io.x + i * G;
    const Lanes* r = io.r + i * G;
    const Lanes* pv = io.prev + i * S;
    Lanes* nx = io.next + i * S;
    if constexpr (C == CellKind::Elman) {
      nx[0] = tanhv(x[0] + r[0]);
    } else if constexpr (C == CellKind::Lstm) {
      const Lanes ig = sigmoidv(x[0] + r[0]), fg = sigmoidv(x[1] + r[1]);
      const Lanes zt = tanhv(x[2] + r[2]), og = sigmoidv(x[3] + r[3]);
      const Lanes c = fg * pv[1] + ig * zt;
      nx[0] = og * tanhv(c);
      nx[1] = c;
    } else if constexpr (C == CellKind::Gru) {
      const Lanes rg = sigmoidv(x[0] + r[0]), zg = sigmoidv(x[1] + r[1]);
      const Lanes nn = tanhv(x[2] + rg * r[2]);
      nx[0] = (1.0f - zg) * nn + zg * pv[0];
    } else {
      const Lanes it = x[0] + r[0], u = logsigmoidv(x[1] + r[1]) + pv[3];
      const Lanes zt = tanhv(x[2] + r[2]), og = sigmoidv(x[3] + r[3]);
      const Lanes m = ((pv[2] == 0.0f) | (it >= u)) ? it : u;
      const Lanes ip = expv(it - m), fp = u > m ? splat(1.0f) : expv(u - m);
      const Lanes c = fp * pv[1] + ip * zt, n = fp * pv[2] + ip;
      nx[0] = og * c / n;
      nx[1] = c;
      nx[2] = n;
      nx[3] = m;
    }
  }
}

template <CellKind C> RK_ALWAYS_INLINE void cellBwdBody(const CellGradIo& io) {
  constexpr int G = rkcuda::cellGates(C), S = rkcuda::cellStates(C);
  for (int i = 0; i < io.n; ++i) {
    const Lanes* x = io.x + i * G;
    const Lanes* r = io.r + i * G;
    const Lanes* pv = io.prev + i * S;
    const Lanes* g = io.g + i * S;
    Lanes* gx = io.gx + i * G;
    Lanes* gr = io.gr + i * G;
    Lanes* gp = io.gprev + i * S;
    if constexpr (C == CellKind::Elman) {
      const Lanes h = tanhv(x[0] + r[0]);
      gx[0] = gr[0] = g[0] * (1.0f - h * h);
      gp[0] = Lanes{};
    } else if constexpr (C == CellKind::Lstm) {
      const Lanes ig = sigmoidv(x[0] + r[0]), fg = sigmoidv(x[1] + r[1]);
      const Lanes zt = tanhv(x[2] + r[2]), og = sigmoidv(x[3] + r[3]);
      const Lanes c = fg * pv[1] + ig * zt, tc = tanhv(c);
      const Lanes gc = g[1] + g[0] * og * (1.0f - tc * tc);
      gx[0] = gr[0] = gc * zt * ig * (1.0f - ig);
      gx[1] = gr[1] = gc * pv[1] * fg * (1.0f - fg);
      gx[2] = gr[2] = gc * ig * (1.0f - zt * zt);
      gx[3] = gr[3] = g[0] * tc * og * (1.0f - og);
      gp[0] = Lanes{};
      gp[1] = gc * fg;
    } else if constexpr (C == CellKind::Gru) {
      const Lanes rg = sigmoidv(x[0] + r[0]), zg = sigmoidv(x[1] + r[1]);
      const Lanes nn = tanhv(x[2] + rg * r[2]);
      const Lanes ga = g[0] * (1.0f - zg) * (1.0f - nn * nn);
      gx[0] = gr[0] = ga * r[2] * rg * (1.0f - rg);
      gx[1] = gr[1] = g[0] * (pv[0] - nn) * zg * (1.0f - zg);
      gx[2] = ga;
      gr[2] = ga * rg;
      gp[0] = g[0] * zg;
    } else {
      const Lanes it = x[0] + r[0], fpre = x[1] + r[1], u = logsigmoidv(fpre) + pv[3];
      const Lanes zt = tanhv(x[2] + r[2]), og = sigmoidv(x[3] + r[3]);
      const LanesI iBranch = (pv[2] == 0.0f) | (it >= u);
      const Lanes m = iBranch ? it : u;
      const LanesI fClamped = u > m;
      const Lanes ip = expv(it - m), fp = fClamped ? splat(1.0f) : expv(u - m);
      const Lanes c = fp * pv[1] + ip * zt, n = fp * pv[2] + ip;
      const Lanes gc = g[1] + g[0] * og / n;
      const Lanes gn = g[2] - g[0] * og * c / (n * n);
      const Lanes gfp = gc * pv[1] + gn * pv[2], gip = gc * zt + gn;
      const Lanes gfu = fClamped ? Lanes{} : gfp * fp;
      const Lanes gm = g[3] - gfu - gip * ip;
      const Lanes gi = gip * ip + (iBranch ? gm : Lanes{});
      const Lanes gu = gfu + (iBranch ? Lanes{} : gm);
      gx[0] = gr[0] = gi;
      gx[1] = gr[1] = gu * sigmoidv(-fpre);
      gx[2] = gr[2] = gc * ip * (1.0f - zt * zt);
      gx[3] = gr[3] = g[0] * (c / n) * og * (1.0f - og);
      gp[0] = Lanes{};
      gp[1] = gc * fp;
      gp[2] = gn * fp;
      gp[3] = gu;
    }
  }
}

RK_ALWAYS_INLINE void cellFwdAny(CellKind c, const CellIo& io) {
  switch (c) {
    case CellKind::Elman: return cellFwdBody<CellKind::Elman>(io);
    case CellKind::Lstm: return cellFwdBody<CellKind::Lstm>(io);
    case CellKind::Gru: return cellFwdBody<CellKind::Gru>(io);
    case CellKind::Slstm: return cellFwdBody<CellKind::Slstm>(io);
  }
}
RK_ALWAYS_INLINE void cellBwdAny(CellKind c, const CellGradIo& io) {
  switch (c) {
    case CellKind::Elman: return cellBwdBody<CellKind::Elman>(io);
    case CellKind::Lstm: return cellBwdBody<CellKind::Lstm>(io);
    case CellKind::Gru: return cellBwdBody<CellKind::Gru>(io);
    case CellKind::Slstm: return cellBwdBody<CellKind::Slstm>(io);
  }
}

// The tallest tile (rows) per tile width that keeps the accumulators, the B vectors and a broadcast
// in registers, for the instruction set the thread bodies below run with.
struct Kernels {
  int rows[kMaxVecs + 1];
};

const Kernels& kernels() {
  static const Kernels chosen = [] {
#ifdef RK_X86_MULTIVERSION
    if (isa() == Isa::Avx512) return Kernels{{0, 8, 8, 8, 6}};
    if (isa() == Isa::Avx2) return Kernels{{0, 4, 2, 1, 1}};
#endif
    return Kernels{{0, 2, 1, 1, 1}};
  }();
  return chosen;
}

// ---- memory, threads ----

inline void cpuRelax() {
#ifdef RK_X86_MULTIVERSION
  __builtin_ia32_pause();
#endif
}

// Threads that meet once per step: spin briefly, then yield (the cores may be shared).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ <= 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 1000) cpuRelax();
      else std::this_thread::yield();
    }
  }

 private:
  std::atomic<int> count_{0}, gen_{0};
  int n_;
};

// What each thread owns for a whole call: items [i0, i1) (perHead consecutive items per head) of
// batch rows [r0, r1). Three ways to split:
//   heads: whole heads per thread, every row;           no synchronisation inside the time loop
//   rows:  every head, a range of batch rows per thread; none either (rows are independent)
//   items: parts of heads, every row;                   a barrier per step (h_{t-1} is shared)
struct Own {
  int64_t i0 = 0, i1 = 0, r0 = 0, r1 = 0;
};
struct Plan {
  int threads = 1;
  bool sync = false;
  std::vector<Own> own;
};

Plan makePlan(int64_t heads, int64_t perHead, int64_t batch, double fmaPerStep, double fmaTotal) {
  Plan p;
  const int64_t items = heads * perHead;
  int th = int(std::min<int64_t>(defaultThreads(), std::max(items, batch)));
  if (fmaTotal < double(1 << 21)) th = 1;
  enum { Heads, Rows, Items } mode = Heads;
  if (th > 1) {
    if (heads % th == 0 || heads >= 4 * th) mode = Heads;
    else if (batch >= th) mode = Rows;
    else if (fmaPerStep >= double(1 << 15) && items >= th) mode = Items;
    else th = 1;  // a barrier per step would cost more than it saves
  }
  p.threads = std::max(th, 1);
  p.sync = p.threads > 1 && mode == Items;
  const int64_t n = p.threads;
  for (int64_t i = 0; i < n; ++i) {
    Own o{0, items, 0, batch};
    if (n > 1 && mode == Heads) o.i0 = heads * i / n * perHead, o.i1 = heads * (i + 1) / n * perHead;
    if (n > 1 && mode == Items) o.i0 = items * i / n, o.i1 = items * (i + 1) / n;
    if (n > 1 && mode == Rows) o.r0 = batch * i / n, o.r1 = batch * (i + 1) / n;
    p.own.push_back(o);
  }
  return p;
}

template <typename Fn> void runThreads(int threads, Fn&& fn) {
  parallelFor(threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(int(i));
  });
}

// Row blocks of the batch for tiles of at most mrMax rows, as even as possible.
std::vector<int64_t> rowBlocks(int64_t r0, int64_t r1, int mrMax) {
  const int64_t n = r1 - r0, nb = (n + mrMax - 1) / mrMax;
  std::vector<int64_t> cut(size_t(nb) + 1);
  for (int64_t i = 0; i <= nb; ++i) cut[size_t(i)] = r0 + (nb ? n * i / nb : 0);
  return cut;
}

// ---- element access ----

template <typename St> RK_ALWAYS_INLINE Lanes loadBlock(const St* src, int n) {
  Lanes v{};
  if constexpr (sizeof(St) == 4) {
    if (n == kLanes) {
      std::memcpy(&v, src, sizeof(Lanes));
      return v;
    }
  }
  for (int i = 0; i < n; ++i) v[i] = Storage<St>::load(src[i]);
  return v;
}
template <typename St> RK_ALWAYS_INLINE void storeBlock(St* dst, int n, const Lanes& v) {
  if constexpr (sizeof(St) == 4) {
    if (n == kLanes) {
      std::memcpy(dst, &v, sizeof(Lanes));
      return;
    }
  }
  for (int i = 0; i < n; ++i) dst[i] = Storage<St>::store(v[i]);
}
template <typename St> void zeroElems(St* dst, int64_t n) {
  const St z = Storage<St>::store(0.0f);
  for (int64_t i = 0; i < n; ++i) dst[i] = z;
}

struct Dims {
  CellKind cell;
  int G, S;
  int64_t B, T, H, D, Dp, nblk, Tmax;
  std::vector<int64_t> len;
  // Internal layouts, shared by the set-up (buffer sizes) and the thread bodies (indexing).
  int CB;                     // forward: 16-channel blocks per panel of R
  int64_t npanel, panelStride;  // forward: panels per head, vectors per panel
  int64_t stateVecs;          // vectors of one fp32 state buffer, [B, H, nblk]
  int64_t QW, QV;             // backward: a row of dP, in floats and in vectors
  int64_t nkp, rtStride;      // backward: panels of R^T per head, vectors per panel
  int64_t rowsTotal;          // backward: (step, row) pairs of dP per head
  explicit Dims(const FusedRnnArgs& a)
      : cell(a.cell), G(rkcuda::cellGates(a.cell)), S(rkcuda::cellStates(a.cell)), B(a.batch), T(a.T), H(a.heads),
        D(a.headDim) {
    Dp = (D + kLanes - 1) / kLanes * kLanes;
    nblk = Dp / kLanes;
    len.resize(size_t(B));
    Tmax = 0;
    for (int64_t b = 0; b < B; ++b) {
      len[size_t(b)] = a.lengths ? std::clamp<int64_t>(a.lengths[b], 0, T) : T;
      Tmax = std::max(Tmax, len[size_t(b)]);
    }
    CB = cell == CellKind::Elman ? 2 : 1;
    npanel = (nblk + CB - 1) / CB;
    panelStride = int64_t(G) * CB * D;
    stateVecs = B * H * nblk;
    QW = G * Dp;
    QV = G * nblk;
    nkp = (nblk + kBwdPanel - 1) / kBwdPanel;
    rtStride = QW * kBwdPanel;
    rowsTotal = Tmax * B;
  }
  // Offsets into the contract's layouts.
  int64_t wx(int64_t b, int64_t t, int g, int64_t h) const { return (((b * T + t) * G + g) * H + h) * D; }
  int64_t st(int s, int64_t b, int64_t h) const { return ((s * B + b) * H + h) * D; }                 // [S, B, H, D]
  int64_t saved(int64_t t, int s, int64_t b, int64_t h) const { return (t * S + s) * B * H * D + (b * H + h) * D; }
  int64_t pre(int64_t t, int64_t b, int g, int64_t h) const { return (((t * B + b) * G + g) * H + h) * D; }
  int64_t rw(int g, int64_t h, int64_t k) const { return ((g * H + h) * D + k) * D; }                 // R row k
  // Internal fp32 state buffers, [B, H, nblk] vectors.
  int64_t blk(int64_t b, int64_t h) const { return (b * H + h) * nblk; }
  double fmaPerStep() const { return double(B) * H * G * D * D; }
};

// ---- forward ----

// Everything a forward thread shares with the others (set up by forwardImpl).
template <typename St> struct FwdCtx {
  const FusedRnnArgs& a;
  const FusedRnnOutputs& o;
  const Dims& d;
  const Plan& plan;
  SpinBarrier& bar;
  LaneScratch& Rp;
  Lanes* hb;
  Lanes* sb;
};

// One thread of the forward pass: its share of the panel packing, then the time loop over the items
// and rows it owns. Compiled per instruction set (below), so that the gathering of each step's gate
// inputs and the stores around the GEMM tile and the cell update use the same vectors as they do.
template <typename St> RK_ALWAYS_INLINE void forwardThreadBody(const FwdCtx<St>& c, int th) {
  const FusedRnnArgs& a = c.a;
  const FusedRnnOutputs& o = c.o;
  const Dims& d = c.d;
  const Plan& plan = c.plan;
  SpinBarrier& bar = c.bar;
  LaneScratch& Rp = c.Rp;
  Lanes* const hb = c.hb;
  Lanes* const sb = c.sb;
  const Kernels& K = kernels();
  const int G = d.G, S = d.S;
  const int64_t H = d.H, D = d.D, nblk = d.nblk;
  const int CB = d.CB;
  const int64_t npanel = d.npanel, panelStride = d.panelStride, stateVecs = d.stateVecs;
  const St* wx = static_cast<const St*>(a.wx);
  const St* R = static_cast<const St*>(a.R);
  St* hOut = static_cast<St*>(o.h);
  const bool last = a.returnLastOnly, saving = o.savedStates != nullptr && o.savedPre != nullptr;
  const Own own = plan.own[size_t(th)];
  const int64_t i0 = own.i0, i1 = own.i1;
  const std::vector<int64_t> rows = rowBlocks(own.r0, own.r1, K.rows[G * CB]);
  // Pack a share of the panels: Rp[(h, p)][k][cb * G + g] = R[g][h][k][(p * CB + cb) * 16 + lane].
  const int64_t nItems = H * npanel;
  for (int64_t it = nItems * th / plan.threads; it < nItems * (th + 1) / plan.threads; ++it) {
    const int64_t h = it / npanel, p = it % npanel;
    const int ncb = int(std::min<int64_t>(CB, nblk - p * CB)), nv = G * ncb;
    Lanes* dst = Rp.at(0) + (h * npanel + p) * panelStride;
    for (int64_t k = 0; k < D; ++k)
      for (int cb = 0; cb < ncb; ++cb) {
        const int64_t j0 = (p * CB + cb) * kLanes;
        const int nj = int(std::min<int64_t>(kLanes, D - j0));
        for (int g = 0; g < G; ++g) dst[k * nv + cb * G + g] = loadBlock(R + d.rw(g, h, k) + j0, nj);
      }
  }
  bar.wait();
  Lanes acc[kMaxRows * kMaxVecs], xs[kMaxRows * 2 * 4], rs[kMaxRows * 2 * 4], pv[kMaxRows * 2 * 4],
      nx[kMaxRows * 2 * 4];
  int64_t entB[kMaxRows * 2], entBlk[kMaxRows * 2];
  for (int64_t t = 0; t < d.Tmax; ++t) {
    const Lanes* hp = hb + (t & 1) * stateVecs;
    Lanes* hn = hb + ((t + 1) & 1) * stateVecs;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t h = it / npanel, p = it % npanel;
      const int ncb = int(std::min<int64_t>(CB, nblk - p * CB)), nv = G * ncb;
      for (size_t rb = 0; rb + 1 < rows.size(); ++rb) {
        const int64_t b0 = rows[rb];
        const int mr = int(rows[rb + 1] - b0);
        bool any = false;
        for (int m = 0; m < mr; ++m) any = any || t < d.len[size_t(b0 + m)];
        if (any) {
          TileArgs ta;
          ta.A = reinterpret_cast<const float*>(hp + d.blk(b0, h));
          ta.am = H * nblk * kLanes;
          ta.aq = 1;
          ta.B = Rp.at(0) + (h * npanel + p) * panelStride;
          ta.bq = nv;
          ta.K = D;
          ta.acc = acc;
          ta.accStride = nv;
          tileAny(ta, mr, nv);
        }
        int n = 0;
        for (int m = 0; m < mr; ++m) {
          const int64_t b = b0 + m;
          const bool active = t < d.len[size_t(b)];
          for (int cb = 0; cb < ncb; ++cb) {
            const int64_t bk = p * CB + cb, j0 = bk * kLanes;
            const int nj = int(std::min<int64_t>(kLanes, D - j0));
            const int64_t si = d.blk(b, h) + bk;
            if (!active) {
              hn[si] = hp[si];
              if (!last) zeroElems(hOut + ((b * d.T + t) * H + h) * D + j0, nj);
              if (saving) {
                for (int s = 0; s < S; ++s) {
                  const Lanes v = s == 0 ? hp[si] : sb[(s - 1) * stateVecs + si];
                  storeBlock(o.savedStates + d.saved(t, s, b, h) + j0, nj, v);
                }
                for (int g = 0; g < G; ++g) zeroElems(o.savedPre + d.pre(t, b, g, h) + j0, nj);
              }
              continue;
            }
            for (int g = 0; g < G; ++g) {
              const Lanes w = loadBlock(wx + d.wx(b, t, g, h) + j0, nj);
              const Lanes bias = loadBlock(a.b + (g * H + h) * D + j0, nj);
              const Lanes rec = acc[m * nv + cb * G + g];
              if (d.cell == CellKind::Gru && g == 2) {
                xs[n * G + g] = w;
                rs[n * G + g] = rec + bias;
              } else {
                xs[n * G + g] = w + bias;
                rs[n * G + g] = rec;
              }
            }
            pv[n * S] = hp[si];
            for (int s = 1; s < S; ++s) pv[n * S + s] = sb[(s - 1) * stateVecs + si];
            entB[n] = b;
            entBlk[n] = bk;
            ++n;
          }
        }
        if (n == 0) continue;
        CellIo io;
        io.n = n;
        io.x = xs;
        io.r = rs;
        io.prev = pv;
        io.next = nx;
        cellFwdAny(d.cell, io);
        for (int e = 0; e < n; ++e) {
          const int64_t b = entB[e], bk = entBlk[e], j0 = bk * kLanes, si = d.blk(b, h) + bk;
          const int nj = int(std::min<int64_t>(kLanes, D - j0));
          hn[si] = nx[e * S];
          for (int s = 1; s < S; ++s) sb[(s - 1) * stateVecs + si] = nx[e * S + s];
          if (!last) storeBlock(hOut + ((b * d.T + t) * H + h) * D + j0, nj, nx[e * S]);
          if (saving) {
            for (int s = 0; s < S; ++s) storeBlock(o.savedStates + d.saved(t, s, b, h) + j0, nj, nx[e * S + s]);
            for (int g = 0; g < G; ++g) {
              const Lanes pre = (d.cell == CellKind::Gru && g == 2) ? rs[e * G + g] : xs[e * G + g] + rs[e * G + g];
              storeBlock(o.savedPre + d.pre(t, b, g, h) + j0, nj, pre);
            }
          }
        }
      }
    }
    if (plan.sync) bar.wait();
  }
}

// ---- backward ----

// Everything a backward thread shares with the others (set up by backwardImpl).
template <typename St> struct BwdCtx {
  const FusedRnnArgs& a;
  const FusedRnnGrads& gr;
  const Dims& d;
  const Plan& plan;
  SpinBarrier& bar;
  LaneScratch &RT, &gH, &gO, &dP, &dRacc, &hc;
};

// One thread of the backward pass (its share of R^T, the reverse time loop, dstates0, then its
// share of dR and db), compiled per instruction set like the forward's.
template <typename St> RK_ALWAYS_INLINE void backwardThreadBody(const BwdCtx<St>& c, int th) {
  const FusedRnnArgs& a = c.a;
  const FusedRnnGrads& gr = c.gr;
  const Dims& d = c.d;
  const Plan& plan = c.plan;
  SpinBarrier& bar = c.bar;
  LaneScratch &RT = c.RT, &gH = c.gH, &gO = c.gO, &dP = c.dP, &dRacc = c.dRacc, &hc = c.hc;
  const Kernels& K = kernels();
  const int G = d.G, S = d.S;
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, Dp = d.Dp, nblk = d.nblk, Tmax = d.Tmax;
  const int64_t QW = d.QW, QV = d.QV, nkp = d.nkp, rtStride = d.rtStride, rowsTotal = d.rowsTotal;
  const int64_t nqp = (QV + kMaxVecs - 1) / kMaxVecs;
  const St* wx = static_cast<const St*>(a.wx);
  const St* R = static_cast<const St*>(a.R);
  const St* dh = static_cast<const St*>(gr.dh);
  St* dwx = static_cast<St*>(gr.dwx);
  St* dR = static_cast<St*>(gr.dR);
  const bool last = a.returnLastOnly;
  const int64_t stateVecs = d.stateVecs;
  const float zeros[kLanes] = {};
  const Own own = plan.own[size_t(th)];
  const int64_t i0 = own.i0, i1 = own.i1;
  const std::vector<int64_t> rowsB = rowBlocks(own.r0, own.r1, K.rows[kBwdPanel]);
  auto blocksOf = [&](int64_t it, int64_t* h, int64_t* k0, int* nvk) {
    *h = it / nkp;
    const int64_t kp = it % nkp;
    *k0 = kp * kBwdPanel;
    *nvk = int(std::min<int64_t>(kBwdPanel, nblk - *k0));
  };
  // Pack a share of R^T: RT[(h, kp)][q = g * Dp + j][v] lane l = R[g][h][(k0 + v) * 16 + l][j].
  const int64_t nItems = H * nkp;
  for (int64_t it = nItems * th / plan.threads; it < nItems * (th + 1) / plan.threads; ++it) {
    int64_t h, k0;
    int nvk;
    blocksOf(it, &h, &k0, &nvk);
    float* dst = reinterpret_cast<float*>(RT.at(0) + (h * nkp + it % nkp) * rtStride);
    std::memset(dst, 0, size_t(QW * nvk) * sizeof(Lanes));
    for (int v = 0; v < nvk; ++v)
      for (int l = 0; l < kLanes; ++l) {
        const int64_t k = (k0 + v) * kLanes + l;
        if (k >= D) break;
        for (int g = 0; g < G; ++g) {
          const St* row = R + d.rw(g, h, k);
          for (int64_t j = 0; j < D; ++j) dst[((g * Dp + j) * nvk + v) * kLanes + l] = Storage<St>::load(row[j]);
        }
      }
  }
  // Gradients flowing into the final states (and the last h), for the owned channels and rows.
  for (int64_t it = i0; it < i1; ++it) {
    int64_t h, k0;
    int nvk;
    blocksOf(it, &h, &k0, &nvk);
    for (int64_t b = own.r0; b < own.r1; ++b)
      for (int v = 0; v < nvk; ++v) {
        const int64_t bk = k0 + v, j0 = bk * kLanes, si = d.blk(b, h) + bk;
        const int nj = int(std::min<int64_t>(kLanes, D - j0));
        for (int s = 0; s < S; ++s) {
          Lanes g0 = gr.dFinal ? loadBlock(gr.dFinal + d.st(s, b, h) + j0, nj) : Lanes{};
          if (s == 0 && last && dh) g0 += loadBlock(dh + (b * H + h) * D + j0, nj);
          (s == 0 ? gH.at(0) : gO.at(0) + (s - 1) * stateVecs)[si] = g0;
        }
      }
  }
  bar.wait();
  Lanes xs[kBwdPanel * 4], rs[kBwdPanel * 4], pv[kBwdPanel * 4], gs[kBwdPanel * 4], gx[kBwdPanel * 4],
      grr[kBwdPanel * 4], gp[kBwdPanel * 4];
  for (int64_t t = Tmax - 1; t >= 0; --t) {
    // (a) the cells' backward for the owned channels.
    for (int64_t it = i0; it < i1; ++it) {
      int64_t h, k0;
      int nvk;
      blocksOf(it, &h, &k0, &nvk);
      for (int64_t b = own.r0; b < own.r1; ++b) {
        Lanes* dProw = dP.at(0) + (h * rowsTotal + t * B + b) * QV;
        if (t >= d.len[size_t(b)]) {
          for (int v = 0; v < nvk; ++v) {
            const int64_t j0 = (k0 + v) * kLanes;
            const int nj = int(std::min<int64_t>(kLanes, D - j0));
            for (int g = 0; g < G; ++g) {
              zeroElems(dwx + d.wx(b, t, g, h) + j0, nj);
              dProw[g * nblk + k0 + v] = Lanes{};
            }
          }
          continue;
        }
        for (int v = 0; v < nvk; ++v) {
          const int64_t bk = k0 + v, j0 = bk * kLanes, si = d.blk(b, h) + bk;
          const int nj = int(std::min<int64_t>(kLanes, D - j0));
          for (int g = 0; g < G; ++g) {
            xs[v * G + g] = loadBlock(gr.savedPre + d.pre(t, b, g, h) + j0, nj);
            rs[v * G + g] = Lanes{};
          }
          if (d.cell == CellKind::Gru) {
            rs[v * G + 2] = xs[v * G + 2];
            xs[v * G + 2] = loadBlock(wx + d.wx(b, t, 2, h) + j0, nj);
          }
          for (int s = 0; s < S; ++s) {
            const float* src = t > 0 ? gr.savedStates + d.saved(t - 1, s, b, h) + j0
                                     : a.states0 ? a.states0 + d.st(s, b, h) + j0 : zeros;
            pv[v * S + s] = loadBlock(src, nj);
          }
          Lanes g0 = gH.at(0)[si];
          if (!last && dh) g0 += loadBlock(dh + ((b * T + t) * H + h) * D + j0, nj);
          gs[v * S] = g0;
          for (int s = 1; s < S; ++s) gs[v * S + s] = gO.at(0)[(s - 1) * stateVecs + si];
        }
        CellGradIo io;
        io.n = nvk;
        io.x = xs;
        io.r = rs;
        io.prev = pv;
        io.g = gs;
        io.gx = gx;
        io.gr = grr;
        io.gprev = gp;
        cellBwdAny(d.cell, io);
        for (int v = 0; v < nvk; ++v) {
          const int64_t bk = k0 + v, j0 = bk * kLanes, si = d.blk(b, h) + bk;
          const int nj = int(std::min<int64_t>(kLanes, D - j0));
          Lanes mask{};
          for (int l = 0; l < nj; ++l) mask[l] = 1.0f;
          for (int g = 0; g < G; ++g) {
            storeBlock(dwx + d.wx(b, t, g, h) + j0, nj, gx[v * G + g]);
            dProw[g * nblk + bk] = nj == kLanes ? grr[v * G + g] : grr[v * G + g] * mask;
          }
          gH.at(0)[si] = gp[v * S];
          for (int s = 1; s < S; ++s) gO.at(0)[(s - 1) * stateVecs + si] = gp[v * S + s];
        }
      }
    }
    if (plan.sync) bar.wait();
    // (b) dL/dh_{t-1} += dP_t @ R^T for the owned output blocks.
    for (int64_t it = i0; it < i1; ++it) {
      int64_t h, k0;
      int nvk;
      blocksOf(it, &h, &k0, &nvk);
      for (size_t rb = 0; rb + 1 < rowsB.size(); ++rb) {
        const int64_t b0 = rowsB[rb];
        const int mr = int(rowsB[rb + 1] - b0);
        bool any = false;
        for (int m = 0; m < mr; ++m) any = any || t < d.len[size_t(b0 + m)];
        if (!any) continue;
        TileArgs ta;
        ta.A = reinterpret_cast<const float*>(dP.at(0) + (h * rowsTotal + t * B + b0) * QV);
        ta.am = QW;
        ta.aq = 1;
        ta.B = RT.at(0) + (h * nkp + it % nkp) * rtStride;
        ta.bq = nvk;
        ta.K = QW;
        ta.acc = gH.at(0) + d.blk(b0, h) + k0;
        ta.accStride = H * nblk;
        ta.load = true;
        tileAny(ta, mr, nvk);
      }
    }
  }
  // dL/dstates0 for the owned channels.
  if (gr.dStates0) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t h, k0;
      int nvk;
      blocksOf(it, &h, &k0, &nvk);
      for (int64_t b = own.r0; b < own.r1; ++b)
        for (int v = 0; v < nvk; ++v) {
          const int64_t bk = k0 + v, j0 = bk * kLanes, si = d.blk(b, h) + bk;
          const int nj = int(std::min<int64_t>(kLanes, D - j0));
          for (int s = 0; s < S; ++s)
            storeBlock(gr.dStates0 + d.st(s, b, h) + j0, nj, (s == 0 ? gH.at(0) : gO.at(0) + (s - 1) * stateVecs)[si]);
        }
    }
  }
  bar.wait();
  // dR = sum over (step, row) of h_{t-1}^T dP, db = column sums of dP; items (head, 4 vectors of dP
  // columns) split evenly, chunks of rows outermost so that a chunk's h_{t-1} is copied once.
  const int64_t q0 = H * nqp * th / plan.threads, q1 = H * nqp * (th + 1) / plan.threads;
  float* Hc = reinterpret_cast<float*>(hc.at(0) + int64_t(th) * kRowChunk * nblk);
  for (int64_t r0 = 0; r0 < rowsTotal; r0 += kRowChunk) {
    const int64_t nr = std::min(kRowChunk, rowsTotal - r0);
    int64_t cached = -1;
    for (int64_t it = q0; it < q1; ++it) {
      const int64_t h = it / nqp, qp = it % nqp;
      const int nqv = int(std::min<int64_t>(kMaxVecs, QV - qp * kMaxVecs));
      if (h != cached) {
        for (int64_t rr = 0; rr < nr; ++rr) {
          const int64_t tb = r0 + rr, t = tb / B, b = tb % B;
          const float* src = t > 0 ? gr.savedStates + d.saved(t - 1, 0, b, h) : a.states0 ? a.states0 + d.st(0, b, h) : nullptr;
          float* dst = Hc + rr * Dp;
          if (src) std::memcpy(dst, src, size_t(D) * 4);
          else std::memset(dst, 0, size_t(D) * 4);
          for (int64_t j = D; j < Dp; ++j) dst[j] = 0.0f;
        }
        cached = h;
      }
      const int mrMax = K.rows[nqv];
      for (int64_t k0 = 0; k0 < D; k0 += mrMax) {
        TileArgs ta;
        ta.A = Hc + k0;
        ta.am = 1;
        ta.aq = Dp;
        ta.B = dP.at(0) + (h * rowsTotal + r0) * QV + qp * kMaxVecs;
        ta.bq = QV;
        ta.K = nr;
        ta.acc = dRacc.at(0) + (h * D + k0) * QV + qp * kMaxVecs;
        ta.accStride = QV;
        ta.load = r0 > 0;
        tileAny(ta, int(std::min<int64_t>(mrMax, D - k0)), nqv);
      }
    }
  }
  for (int64_t it = q0; it < q1; ++it) {
    const int64_t h = it / nqp, qp = it % nqp;
    const int nqv = int(std::min<int64_t>(kMaxVecs, QV - qp * kMaxVecs));
    for (int v = 0; v < nqv; ++v) {
      const int64_t qv = qp * kMaxVecs + v;
      const int g = int(qv / nblk);
      const int64_t j0 = (qv % nblk) * kLanes;
      const int nj = int(std::min<int64_t>(kLanes, D - j0));
      Lanes sum{};
      const Lanes* col = dP.at(0) + h * rowsTotal * QV + qv;
      for (int64_t tb = 0; tb < rowsTotal; ++tb) sum += col[tb * QV];
      storeBlock(gr.db + (g * H + h) * D + j0, nj, sum);
      for (int64_t k = 0; k < D; ++k) {
        const Lanes v2 = rowsTotal > 0 ? dRacc.at(0)[(h * D + k) * QV + qv] : Lanes{};
        storeBlock(dR + d.rw(g, h, k) + j0, nj, v2);
      }
    }
  }
}

// The thread bodies compiled per instruction set, and picked at run time.
#define RK_CELLS_VARIANTS(SUFFIX, ATTR)                                                                   \
  template <typename St> ATTR void forwardThread##SUFFIX(const FwdCtx<St>& c, int th) {                 \
    forwardThreadBody<St>(c, th);                                                                        \
  }                                                                                                      \
  template <typename St> ATTR void backwardThread##SUFFIX(const BwdCtx<St>& c, int th) {                \
    backwardThreadBody<St>(c, th);                                                                       \
  }
RK_CELLS_VARIANTS(Base, )
#ifdef RK_X86_MULTIVERSION
RK_CELLS_VARIANTS(Avx2, RK_ISA_TARGET_AVX2)
RK_CELLS_VARIANTS(Avx512, RK_ISA_TARGET_AVX512)
#endif
template <typename St> RK_DISPATCH(forwardThread, (const FwdCtx<St>& c, int th), (c, th))
template <typename St> RK_DISPATCH(backwardThread, (const BwdCtx<St>& c, int th), (c, th))


template <typename St> void forwardImpl(const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  const Dims d(a);
  const int G = d.G, S = d.S;
  const int64_t B = d.B, H = d.H, D = d.D;
  St* hOut = static_cast<St*>(o.h);
  const bool last = a.returnLastOnly, saving = o.savedStates != nullptr && o.savedPre != nullptr;
  const int64_t stateVecs = d.stateVecs;

  LaneScratch Rp{size_t(H * d.npanel * d.panelStride)};
  LaneScratch hbuf{size_t(2 * stateVecs)}, sbuf{size_t(std::max(S - 1, 0) * stateVecs)};
  Lanes* const hb = hbuf.at(0);
  Lanes* const sb = sbuf.at(0);
  if (a.states0) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int s = 0; s < S; ++s) {
          float* dst = reinterpret_cast<float*>((s == 0 ? hb : sb + (s - 1) * stateVecs) + d.blk(b, h));
          std::memcpy(dst, a.states0 + d.st(s, b, h), size_t(D) * 4);
        }
  }
  const Plan plan = makePlan(H, d.npanel, B, d.fmaPerStep(), d.fmaPerStep() * double(d.Tmax));
  SpinBarrier bar(plan.threads);

  const FwdCtx<St> ctx{a, o, d, plan, bar, Rp, hb, sb};
  runThreads(plan.threads, [&](int th) { forwardThread<St>(ctx, th); });

  // The final states (every row's length is reached by Tmax), steps past every length, last h.
  const Lanes* hf = hb + (d.Tmax & 1) * stateVecs;
  auto finalState = [&](int s, int64_t b, int64_t h) {
    return reinterpret_cast<const float*>((s == 0 ? hf : sb + (s - 1) * stateVecs) + d.blk(b, h));
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      if (o.finalStates)
        for (int s = 0; s < S; ++s) std::memcpy(o.finalStates + d.st(s, b, h), finalState(s, b, h), size_t(D) * 4);
      if (last) {
        const float* src = finalState(0, b, h);
        St* dst = hOut + (b * H + h) * D;
        for (int64_t j = 0; j < D; ++j) dst[j] = Storage<St>::store(src[j]);
      }
    }
  for (int64_t t = d.Tmax; t < d.T; ++t) {
    if (!last)
      for (int64_t b = 0; b < B; ++b) zeroElems(hOut + (b * d.T + t) * H * D, H * D);
    if (saving) {
      for (int s = 0; s < S; ++s)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h)
            std::memcpy(o.savedStates + d.saved(t, s, b, h), finalState(s, b, h), size_t(D) * 4);
      std::memset(o.savedPre + t * B * G * H * D, 0, size_t(B * G * H * D) * 4);
    }
  }
}

template <typename St> void backwardImpl(const FusedRnnArgs& a, const FusedRnnGrads& gr) {
  const Dims d(a);
  const int G = d.G, S = d.S;
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, nblk = d.nblk, Tmax = d.Tmax;
  const int64_t QV = d.QV, nkp = d.nkp, rowsTotal = d.rowsTotal, stateVecs = d.stateVecs;
  St* dwx = static_cast<St*>(gr.dwx);

  LaneScratch RT{size_t(H * nkp * d.rtStride)};
  LaneScratch gH{size_t(stateVecs)}, gO{size_t(std::max(S - 1, 0) * stateVecs)};
  LaneScratch dP{size_t(H * rowsTotal * QV), false};  // every row written by (a) before any read
  LaneScratch dRacc{size_t(H * D * QV)};
  const Plan plan = makePlan(H, nkp, B, d.fmaPerStep(), d.fmaPerStep() * double(Tmax));
  LaneScratch hc{size_t(int64_t(plan.threads) * kRowChunk * nblk)};
  SpinBarrier bar(plan.threads);

  const BwdCtx<St> ctx{a, gr, d, plan, bar, RT, gH, gO, dP, dRacc, hc};
  runThreads(plan.threads, [&](int th) { backwardThread<St>(ctx, th); });

  for (int64_t b = 0; b < B; ++b)
    if (Tmax < T) zeroElems(dwx + d.wx(b, Tmax, 0, 0), (T - Tmax) * G * H * D);
}

}  // namespace

void fusedRnnForwardCpu(const FusedRnnArgs& a, const FusedRnnOutputs& o) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) { forwardImpl<decltype(tag)>(a, o); });
}

void fusedRnnBackwardCpu(const FusedRnnArgs& a, const FusedRnnGrads& g) {
  dispatchDType(DType(int(a.dt)), [&](auto tag) { backwardImpl<decltype(tag)>(a, g); });
}

}  // namespace rk::cells
