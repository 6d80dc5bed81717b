// CPU test of the reusable fp32 scan primitive, cuda/common/scan.cuh (compiled unmodified), through
// the SIMT emulator in emu.h. The linear-scan kernels use it in a few fixed configurations; the
// small test kernels below, launched through rkcuda::launch like the real ones, run every public
// piece of it in the configurations other kernels may choose:
//   * compose / apply / identity on single pairs;
//   * warpInclusiveScan, warpExclusiveFromInclusive and shflIdx for every width 1..32, the default
//     width included, on several warps of several blocks;
//   * BlockScan<THREADS> for 1, 2, 3, 4, 8 (the largest "few warps" path), 9 (the smallest "many
//     warps" path), 16 and 32 warps: inclusiveScan / exclusiveScan with a block aggregate, with a
//     StateCarry and with a carry callback of one's own, and warpPrefix (fed from lane 31 only, and
//     twice back to back, which the double-buffered storage must allow), all on one BlockScan
//     across several consecutive chunks;
//   * stripedChunkStarts<V, WARPS> with threadReduce / threadApply over G items per group, for
//     WARPS = 1 (each warp its own sequence, no BlockScan: null) and 2, 3, 4, 8, 9, 32 warps.
// Inputs: random pairs (a uniform in [-1.2, 1.2], b standard normal), compared with a float64
// sequential reference within a bound scaled by the magnitude of the terms (see expectNear); and
// small integers (a in {-1, 0, 1}, b in [-4, 4]), for which fp32 is exact, so every result must
// equal the reference exactly; pairs and warp scans also run on identities only, which must give
// the identity bit for bit. Sequences end mid-chunk, padded with the identity, and some end with a
// whole chunk of identities, through which maps and states must pass exactly. Where scan.cuh's
// contract fixes the arithmetic (a carry's result is the carry prefix composed with the plain
// result, the block aggregate is the same in every thread, the state within a thread's group is
// threadApply's sequential fmaf), the results are checked bit for bit against that arithmetic
// redone here in fp32.
//
// Prints up to kMaxReported failures and a summary line "<n> checks, <m> failures"; exits 1 on any
// failure. Built and run by tests/cuda-emulator.test.ts; by hand:
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/scan_primitives_test.cpp
//   (from the repository root), then run the executable.
#include "emu.h"
// The code under test, after the emulator.
#include "common/launch.cuh"
#include "common/scan.cuh"
#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

namespace scan = rkcuda::scan;
using scan::Affine;

// ======================================= test kernels =======================================

// ---- pairs ----

struct PairIn {
  Affine f, g, k;
  float h;
};
struct PairOut {
  Affine fg, fgThenK, fThenGk, idF, fId, idId;
  float applyId, applyF, applyFg;
};

__global__ void pairKernel(const PairIn* in, PairOut* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const PairIn x = in[i];
  PairOut o;
  o.fg = scan::compose(x.f, x.g);
  o.fgThenK = scan::compose(o.fg, x.k);
  o.fThenGk = scan::compose(x.f, scan::compose(x.g, x.k));
  o.idF = scan::compose(scan::identity(), x.f);
  o.fId = scan::compose(x.f, scan::identity());
  o.idId = scan::compose(scan::identity(), scan::identity());
  o.applyId = scan::apply(scan::identity(), x.h);
  o.applyF = scan::apply(x.f, x.h);
  o.applyFg = scan::apply(o.fg, x.h);
  out[i] = o;
}

// ---- warp level ----

struct WarpOut {
  Affine incl, excl, picked;
};

// Lane i of each WIDTH-lane segment picks this lane of its segment through shflIdx.
__host__ __device__ inline int pickedLane(int laneInSegment, int width) {
  return (laneInSegment * 7 + 3) & (width - 1);
}

template <int WIDTH> __global__ void warpScanKernel(const Affine* in, WarpOut* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const Affine x = in[i];
  const int src = pickedLane(scan::laneId() & (WIDTH - 1), WIDTH);
  WarpOut o;
  if constexpr (WIDTH == 32) {  // the default width
    o.incl = scan::warpInclusiveScan(x);
    o.excl = scan::warpExclusiveFromInclusive(o.incl);
    o.picked = scan::shflIdx(x, src);
  } else {
    o.incl = scan::warpInclusiveScan<WIDTH>(x);
    o.excl = scan::warpExclusiveFromInclusive<WIDTH>(o.incl);
    o.picked = scan::shflIdx(x, src, WIDTH);
  }
  out[i] = o;
}

// ---- block level ----

// A carry callback of one's own: keeps the composition of everything before the chunk (rather
// than a state, like StateCarry) and counts its calls.
struct PrefixCarry {
  Affine running;
  int calls;
  __device__ __forceinline__ Affine operator()(const Affine& chunkAggregate) {
    const Affine prefix = running;
    running = scan::compose(running, chunkAggregate);
    ++calls;
    return prefix;
  }
};

struct BlockOut {
  Affine incl, inclAggregate;       // inclusiveScan(x, blockAggregate)
  Affine excl, exclAggregate;       // exclusiveScan(x, blockAggregate)
  Affine warpPre, warpAggregate;    // warpPrefix, each warp's lane 31 passing its element x
  Affine warpPre2, warpAggregate2;  // warpPrefix again at once, lane 31 passing other(x)
  Affine stateIncl, stateExcl;      // with a StateCarry: b is the state
  Affine prefixIncl, prefixExcl;    // with a PrefixCarry
};
// Another element from x, for the second warpPrefix (exact for the exact inputs).
__host__ __device__ inline Affine other(const Affine& x) { return Affine{-x.a, x.b + 1.0f}; }

struct BlockFinal {
  float hIncl, hExcl;  // the StateCarries after the last chunk
  PrefixCarry carryIncl, carryExcl;
};

// Block blockIdx.x scans its own sequence: in[base, base + length), then identities up to
// `chunks` chunks of THREADS.
template <int THREADS>
__global__ void blockScanKernel(const Affine* in, const int* lengths, int chunks, const float* h0, BlockOut* out,
                                BlockFinal* finals) {
  using BlockScanT = scan::BlockScan<THREADS>;
  __shared__ typename BlockScanT::TempStorage storage;
  BlockScanT blockScan(storage);
  const int t = static_cast<int>(threadIdx.x);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * chunks * THREADS;
  const int length = lengths[blockIdx.x];
  const Affine garbage{__uint_as_float(0x7fc00000u), __uint_as_float(0x7fc00000u)};  // NaN

  scan::StateCarry stateIncl{h0[blockIdx.x]}, stateExcl{h0[blockIdx.x]};
  PrefixCarry carryIncl{scan::identity(), 0}, carryExcl{scan::identity(), 0};
  for (int c = 0; c < chunks; ++c) {
    const int p = c * THREADS + t;
    const Affine x = p < length ? in[base + p] : scan::identity();
    BlockOut o;
    o.incl = blockScan.inclusiveScan(x, o.inclAggregate);
    o.excl = blockScan.exclusiveScan(x, o.exclAggregate);
    // Only lane 31's value may matter.
    o.warpPre = blockScan.warpPrefix(scan::laneId() == 31 ? x : garbage, o.warpAggregate);
    // Back to back: the first thread past the barrier above writes its warp's total for this call
    // before the others have read the totals of that one (the storage's double buffering).
    o.warpPre2 = blockScan.warpPrefix(scan::laneId() == 31 ? other(x) : garbage, o.warpAggregate2);
    o.stateIncl = blockScan.inclusiveScan(x, stateIncl);
    o.stateExcl = blockScan.exclusiveScan(x, stateExcl);
    o.prefixIncl = blockScan.inclusiveScan(x, carryIncl);
    o.prefixExcl = blockScan.exclusiveScan(x, carryExcl);
    out[base + p] = o;
  }
  finals[blockIdx.x * THREADS + t] = BlockFinal{stateIncl.h, stateExcl.h, carryIncl, carryExcl};
}

// ---- striped chunks ----

// Per row: a[base, base + length) and b likewise, then identities up to `chunks` chunks. WARPS == 1:
// each warp of the block is a row; otherwise the block is one row. Writes every state h (padding
// included), each thread's threadReduce parts and threadApply results, and its final carry.
template <int V, int WARPS, int G>
__global__ void stripedKernel(const float* a, const float* b, const int* lengths, int chunks, const float* h0, float* h,
                              Affine* parts, float* ends, float* carries) {
  using BlockScanT = scan::BlockScan<32 * WARPS>;
  __shared__ typename BlockScanT::TempStorage storage;
  BlockScanT blockScan(storage);
  constexpr int kChunk = 32 * WARPS * V * G;
  const int lane = scan::laneId();
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int row = WARPS == 1 ? static_cast<int>(blockIdx.x * (blockDim.x >> 5)) + warp : static_cast<int>(blockIdx.x);
  const int warpInRow = WARPS == 1 ? 0 : warp;
  const int length = lengths[row];
  const int64_t base = static_cast<int64_t>(row) * chunks * kChunk;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  float carry = h0[row];
  for (int c = 0; c < chunks; ++c) {
    float av[V][G], bv[V][G];
    Affine part[V];
    int first[V];  // position of group k's first item in the row
#pragma unroll
    for (int k = 0; k < V; ++k) {
      first[k] = c * kChunk + warpInRow * 32 * V * G + k * 32 * G + lane * G;
#pragma unroll
      for (int i = 0; i < G; ++i) {
        const int p = first[k] + i;
        av[k][i] = p < length ? a[base + p] : 1.0f;
        bv[k][i] = p < length ? b[base + p] : 0.0f;
      }
      part[k] = scan::threadReduce<G>(av[k], bv[k]);
      parts[(thread * chunks + c) * V + k] = part[k];
    }
    float start[V];
    scan::stripedChunkStarts<V, WARPS>(part, carry, start, WARPS == 1 ? nullptr : &blockScan);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ends[(thread * chunks + c) * V + k] = scan::threadApply<G>(av[k], bv[k], start[k]);
#pragma unroll
      for (int i = 0; i < G; ++i) h[base + first[k] + i] = bv[k][i];
    }
  }
  carries[thread] = carry;
}

// ======================================= host side =======================================

// ---- reporting ----

void check(bool ok, const std::string& what, long index, double got, double want) {
  ++checks;
  if (ok) return;
  if (++failures <= kMaxReported) {
    std::printf("FAIL %s[%ld]: got %.9g, want %.9g  (%s)\n", what.c_str(), index, got, want, context.c_str());
  }
}

// ---- comparisons ----

// Tolerance for random inputs: |got - want| <= kUlps * 2^-24 * magnitude, the magnitude being the
// same composition with |a| and |b| (the sum of the absolute values of the terms), which bounds the
// accumulated rounding of every evaluation order; kTiny absorbs underflow of long products.
constexpr double kUnit = 1.0 / (1 << 24);
constexpr double kUlps = 64;
constexpr double kTiny = 1e-30;
double worstUlps = 0;  // largest |got - want| / (kUnit * magnitude) seen

enum class Data { kRandom, kExact, kIdentity };
const char* dataName(Data d) { return d == Data::kRandom ? "random" : d == Data::kExact ? "exact" : "identity"; }

bool sameValue(float x, double y) { return static_cast<double>(x) == y; }  // NaN fails; -0 == +0
bool sameBits(float x, float y) { return std::memcmp(&x, &y, sizeof x) == 0; }

void expectNear(const std::string& what, long index, float got, double want, double magnitude, Data data) {
  if (data != Data::kRandom) {
    check(sameValue(got, want), what + " (exact)", index, got, want);
    return;
  }
  const double err = std::fabs(static_cast<double>(got) - want);
  if (magnitude > kTiny && std::isfinite(err)) worstUlps = std::max(worstUlps, err / (kUnit * magnitude));
  check(err <= kUlps * kUnit * magnitude + kTiny, what, index, got, want);  // NaN fails
}

void expectBits(const std::string& what, long index, float got, float want) {
  check(sameBits(got, want), what + " (bitwise)", index, got, want);
}
void expectBits(const std::string& what, long index, const Affine& got, const Affine& want) {
  expectBits(what + ".a", index, got.a, want.a);
  expectBits(what + ".b", index, got.b, want.b);
}

// ---- float64 reference ----

// A composition of maps in float64 (a, b), with its magnitude (ma, mb): the same with |a|, |b|.
struct Ref {
  double a = 1, b = 0, ma = 1, mb = 0;
  static Ref state(double h) { return Ref{0, h, 0, std::fabs(h)}; }  // the constant map to h
  Ref then(const Affine& x) const {
    return Ref{a * x.a, x.a * b + x.b, ma * std::fabs(x.a), std::fabs(x.a) * mb + std::fabs(x.b)};
  }
};

void expectMap(const std::string& what, long index, const Affine& got, const Ref& want, Data data) {
  expectNear(what + ".a", index, got.a, want.a, want.ma, data);
  expectNear(what + ".b", index, got.b, want.b, want.mb, data);
  if (data == Data::kIdentity) expectBits(what + " is the identity", index, got, Affine{1.0f, 0.0f});
}

// scan.cuh's arithmetic, redone here in fp32.
Affine composeF(const Affine& first, const Affine& second) {
  return Affine{first.a * second.a, std::fmaf(second.a, first.b, second.b)};
}
float applyF(const Affine& f, float h) { return std::fmaf(f.a, h, f.b); }

// ---- inputs ----

Affine draw(Data data, std::mt19937& rng) {
  switch (data) {
    case Data::kRandom: {
      std::uniform_real_distribution<float> a(-1.2f, 1.2f);
      std::normal_distribution<float> b(0.0f, 1.0f);
      return Affine{a(rng), b(rng)};
    }
    case Data::kExact: {
      // a in {-1, 0, 1} (0 now and then: a reset), b in [-4, 4]: every partial result is an
      // integer far below 2^24, so fp32 is exact.
      const unsigned r = rng() % 32;
      const float a = r == 0 ? 0.0f : r % 2 ? 1.0f : -1.0f;
      return Affine{a, static_cast<float>(static_cast<int>(rng() % 9) - 4)};
    }
    default:
      return Affine{1.0f, 0.0f};
  }
}

float drawState(Data data, std::mt19937& rng) {
  if (data == Data::kRandom) return std::normal_distribution<float>(0.0f, 1.0f)(rng);
  if (data == Data::kExact) return static_cast<float>(static_cast<int>(rng() % 9) - 4);
  return 0.0f;
}

float poison() { return std::nanf(""); }
Affine poisonPair() { return Affine{poison(), poison()}; }

// ---- launching ----

// Launches kernel through rkcuda::launch (the emulator's) and checks that exactly it ran, with
// this grid and block.
template <class... KArgs, class... Args>
void run(void (*kernel)(KArgs...), unsigned grid, unsigned block, Args... args) {
  emu::launchLog.clear();
  const rkcuda::Status st = rkcuda::launch(kernel, dim3(grid), dim3(block), 0, args...);
  check(st.ok(), "launch status: " + st.message, 0, st.code, 0);
  check(emu::launchLog.size() == 1, "number of launches", 0, static_cast<double>(emu::launchLog.size()), 1);
  if (emu::launchLog.size() != 1) return;
  const emu::LaunchRecord& r = emu::launchLog[0];
  check(r.kernel == emu::kernelId(kernel), "the kernel launched", 0, 0, 1);
  check(r.grid.x == grid, "grid size", 0, r.grid.x, grid);
  check(r.block.x == block, "block size", 0, r.block.x, block);
}

// ======================================= the tests =======================================

// ---- compose / apply / identity ----

void testPairs(Data data, std::mt19937& rng) {
  context = std::string("pairs, ") + dataName(data);
  constexpr unsigned kBlocks = 2, kThreads = 64;
  const int n = kBlocks * kThreads;
  std::vector<PairIn> in(n);
  for (PairIn& x : in) x = PairIn{draw(data, rng), draw(data, rng), draw(data, rng), drawState(data, rng)};
  std::vector<PairOut> out(n);
  std::fill(reinterpret_cast<float*>(out.data()), reinterpret_cast<float*>(out.data() + n), poison());
  run(pairKernel, kBlocks, kThreads, in.data(), out.data());

  for (int i = 0; i < n; ++i) {
    const PairIn& x = in[i];
    const PairOut& o = out[i];
    // f then g is h -> g.a*(f.a*h + f.b) + g.b: the product, and one fmaf (one rounding).
    expectBits("compose(f, g)", i, o.fg, composeF(x.f, x.g));
    const Ref fg = Ref().then(x.f).then(x.g), fgk = fg.then(x.k);
    expectMap("compose(f, g)", i, o.fg, fg, data);
    expectMap("compose(compose(f, g), k)", i, o.fgThenK, fgk, data);
    expectMap("compose(f, compose(g, k))", i, o.fThenGk, fgk, data);
    // The identity on either side changes nothing (in value: a -0 b may come back +0).
    for (const auto& [what, got] :
         {std::pair{"compose(identity, f)", o.idF}, std::pair{"compose(f, identity)", o.fId}}) {
      check(sameValue(got.a, x.f.a), std::string(what) + ".a", i, got.a, x.f.a);
      check(sameValue(got.b, x.f.b), std::string(what) + ".b", i, got.b, x.f.b);
    }
    expectBits("compose(identity, identity)", i, o.idId, Affine{1.0f, 0.0f});
    check(sameValue(o.applyId, x.h), "apply(identity, h)", i, o.applyId, x.h);
    expectBits("apply(f, h)", i, o.applyF, applyF(x.f, x.h));
    const Ref state = Ref::state(x.h).then(x.f).then(x.g);
    expectNear("apply(compose(f, g), h)", i, o.applyFg, state.b, state.mb, data);
  }
}

// ---- warp level ----

template <int WIDTH> void testWarp(Data data, std::mt19937& rng) {
  context = "warp scans, width " + std::to_string(WIDTH) + ", " + dataName(data);
  constexpr unsigned kBlocks = 2, kThreads = 96;  // several warps and blocks: lanes come from threadIdx
  const int n = kBlocks * kThreads;
  std::vector<Affine> in(n);
  for (Affine& x : in) x = draw(data, rng);
  std::vector<WarpOut> out(n, WarpOut{poisonPair(), poisonPair(), poisonPair()});
  run(warpScanKernel<WIDTH>, kBlocks, kThreads, in.data(), out.data());

  for (int i = 0; i < n; ++i) {
    const int inSegment = (i % 32) % WIDTH;
    const int segment = i - inSegment;
    Ref before;  // x_0 then ... then x_{i-1} of the segment
    for (int j = segment; j < i; ++j) before = before.then(in[j]);
    expectMap("warpInclusiveScan", i, out[i].incl, before.then(in[i]), data);
    if (inSegment == 0) {
      expectBits("warpInclusiveScan, first lane of a segment: its own element", i, out[i].incl, in[i]);
      expectBits("warpExclusiveFromInclusive, first lane of a segment: the identity", i, out[i].excl,
                 Affine{1.0f, 0.0f});
    } else {
      expectBits("warpExclusiveFromInclusive: the previous lane's inclusive", i, out[i].excl, out[i - 1].incl);
      expectMap("warpExclusiveFromInclusive", i, out[i].excl, before, data);
    }
    expectBits("shflIdx", i, out[i].picked, in[segment + pickedLane(inSegment, WIDTH)]);
  }
}

// ---- block level ----

template <int THREADS> void testBlock(Data data, std::mt19937& rng) {
  context = "BlockScan<" + std::to_string(THREADS) + ">, " + dataName(data);
  constexpr int kBlocks = 3, kChunks = 3;
  constexpr int kSpan = kChunks * THREADS;  // positions per block
  // Block 0: every chunk full. Block 1: ends inside chunk 1 (or at its end), so chunk 2 is all
  // identities. Block 2: a random length.
  const std::vector<int> lengths = {kSpan, THREADS + 1 + static_cast<int>(rng() % THREADS),
                                    1 + static_cast<int>(rng() % kSpan)};
  std::vector<Affine> in(kBlocks * kSpan);
  for (Affine& x : in) x = draw(data, rng);
  std::vector<float> h0(kBlocks);
  for (float& h : h0) h = drawState(data, rng);
  const Affine nanA = poisonPair();
  std::vector<BlockOut> out(kBlocks * kSpan,
                            BlockOut{nanA, nanA, nanA, nanA, nanA, nanA, nanA, nanA, nanA, nanA, nanA, nanA});
  std::vector<BlockFinal> finals(kBlocks * THREADS, BlockFinal{poison(), poison(), {nanA, -1}, {nanA, -1}});
  run(blockScanKernel<THREADS>, kBlocks, THREADS, in.data(), lengths.data(), kChunks, h0.data(), out.data(),
      finals.data());

  for (int blk = 0; blk < kBlocks; ++blk) {
    const int length = lengths[blk];
    auto x = [&](int p) { return p < length ? in[blk * kSpan + p] : Affine{1.0f, 0.0f}; };
    Ref total;                        // everything before the chunk
    Ref state = Ref::state(h0[blk]);  // the state before the chunk
    // What the carries hold before each chunk, from the block aggregates the kernel reported, in
    // fp32 as scan.cuh computes them: StateCarry h -> apply(aggregate, h), PrefixCarry running ->
    // compose(running, aggregate).
    float h = h0[blk];
    Affine running{1.0f, 0.0f};
    for (int c = 0; c < kChunks; ++c) {
      const long first = static_cast<long>(blk) * kSpan + c * THREADS;
      const Affine aggregate = out[first].inclAggregate;
      const bool allIdentity = c * THREADS >= length;
      Ref chunk;                    // the chunk's elements up to the current one
      Ref warpTotals, warpTotals2;  // lane 31's elements (x, other(x)) of the warps before the current one
      Ref chunkAll, warpAll, warpAll2;
      for (int t = 0; t < THREADS; ++t) {
        chunkAll = chunkAll.then(x(c * THREADS + t));
        if (t % 32 == 31) warpAll = warpAll.then(x(c * THREADS + t));
        if (t % 32 == 31) warpAll2 = warpAll2.then(other(x(c * THREADS + t)));
      }
      for (int t = 0; t < THREADS; ++t) {
        const int p = c * THREADS + t;
        const long i = first + t;
        const BlockOut& o = out[i];
        const Ref chunkBefore = chunk, totalBefore = total, stateBefore = state;
        chunk = chunk.then(x(p));
        total = total.then(x(p));
        state = state.then(x(p));
        if (t > 0 && t % 32 == 0) warpTotals = warpTotals.then(x(p - 1));
        if (t > 0 && t % 32 == 0) warpTotals2 = warpTotals2.then(other(x(p - 1)));

        // Plain scans: the chunk on its own.
        expectMap("inclusiveScan", i, o.incl, chunk, data);
        if (t == 0) {
          expectBits("exclusiveScan, thread 0: the identity", i, o.excl, Affine{1.0f, 0.0f});
        } else {
          expectMap("exclusiveScan", i, o.excl, chunkBefore, data);
        }
        // The block aggregate: the whole chunk, the same bits in every thread and both calls.
        expectMap("inclusiveScan's blockAggregate", i, o.inclAggregate, chunkAll, data);
        expectBits("blockAggregate, same in every thread", i, o.inclAggregate, aggregate);
        expectBits("exclusiveScan's blockAggregate == inclusiveScan's", i, o.exclAggregate, aggregate);
        // warpPrefix: the lane-31 elements of the lower warps, and of all warps.
        if (t < 32) {
          expectBits("warpPrefix, warp 0: the identity", i, o.warpPre, Affine{1.0f, 0.0f});
        } else {
          expectMap("warpPrefix", i, o.warpPre, warpTotals, data);
        }
        expectMap("warpPrefix's blockAggregate", i, o.warpAggregate, warpAll, data);
        expectBits("warpPrefix's blockAggregate, same in every thread", i, o.warpAggregate, out[first].warpAggregate);
        if (t < 32) {
          expectBits("second warpPrefix, warp 0: the identity", i, o.warpPre2, Affine{1.0f, 0.0f});
        } else {
          expectMap("second warpPrefix", i, o.warpPre2, warpTotals2, data);
        }
        expectMap("second warpPrefix's blockAggregate", i, o.warpAggregate2, warpAll2, data);
        expectBits("second warpPrefix's blockAggregate, same in every thread", i, o.warpAggregate2,
                   out[first].warpAggregate2);

        // With carries: the whole sequence so far. Exactly the carry's prefix composed with the
        // plain result: (0, h) for a StateCarry, the running composition for PrefixCarry.
        expectBits("inclusiveScan with StateCarry", i, o.stateIncl, composeF(Affine{0.0f, h}, o.incl));
        expectBits("exclusiveScan with StateCarry", i, o.stateExcl, composeF(Affine{0.0f, h}, o.excl));
        expectBits("inclusiveScan with a carry callback", i, o.prefixIncl, composeF(running, o.incl));
        expectBits("exclusiveScan with a carry callback", i, o.prefixExcl, composeF(running, o.excl));
        check(o.stateIncl.a == 0.0f, "inclusiveScan with StateCarry: a == 0", i, o.stateIncl.a, 0);
        check(o.stateExcl.a == 0.0f, "exclusiveScan with StateCarry: a == 0", i, o.stateExcl.a, 0);
        expectNear("inclusiveScan with StateCarry: the state", i, o.stateIncl.b, state.b, state.mb, data);
        expectNear("exclusiveScan with StateCarry: the state", i, o.stateExcl.b, stateBefore.b, stateBefore.mb, data);
        expectMap("inclusiveScan with a carry callback", i, o.prefixIncl, total, data);
        expectMap("exclusiveScan with a carry callback", i, o.prefixExcl, totalBefore, data);
        if (t == 0) {  // exactly what precedes the chunk
          check(sameValue(o.stateExcl.b, h), "exclusiveScan with StateCarry, thread 0: the carried state", i,
                o.stateExcl.b, h);
          check(sameValue(o.prefixExcl.a, running.a) && sameValue(o.prefixExcl.b, running.b),
                "exclusiveScan with a carry callback, thread 0: the carried prefix", i, o.prefixExcl.b, running.b);
        }
        if (allIdentity) {  // nothing moves: exactly the carries
          check(sameValue(o.stateIncl.b, h) && sameValue(o.stateExcl.b, h),
                "identity chunk with StateCarry: the carried state", i, o.stateIncl.b, h);
          check(sameValue(o.prefixIncl.a, running.a) && sameValue(o.prefixIncl.b, running.b),
                "identity chunk with a carry callback: the carried prefix", i, o.prefixIncl.b, running.b);
          expectBits("identity chunk: inclusiveScan", i, o.incl, Affine{1.0f, 0.0f});
          expectBits("identity chunk: blockAggregate", i, o.inclAggregate, Affine{1.0f, 0.0f});
        }
      }
      const float hNext = applyF(aggregate, h);
      if (allIdentity) check(sameValue(hNext, h), "identity chunk: StateCarry unchanged", c, hNext, h);
      h = hNext;
      running = composeF(running, aggregate);
    }
    // After the last chunk: the same carries in every thread, as computed above.
    for (int t = 0; t < THREADS; ++t) {
      const long i = static_cast<long>(blk) * THREADS + t;
      const BlockFinal& f = finals[i];
      expectBits("StateCarry after the last chunk (inclusive)", i, f.hIncl, h);
      expectBits("StateCarry after the last chunk (exclusive)", i, f.hExcl, h);
      expectBits("carry callback after the last chunk (inclusive)", i, f.carryIncl.running, running);
      expectBits("carry callback after the last chunk (exclusive)", i, f.carryExcl.running, running);
      check(f.carryIncl.calls == kChunks && f.carryExcl.calls == kChunks, "carry callback: one call per chunk", i,
            f.carryIncl.calls, kChunks);
      expectNear("final state", i, f.hIncl, state.b, state.mb, data);
      expectMap("final prefix", i, f.carryIncl.running, total, data);
    }
  }
}

// ---- striped chunks ----

template <int V, int WARPS, int G> void testStriped(Data data, std::mt19937& rng) {
  context = "stripedChunkStarts<V=" + std::to_string(V) + ", WARPS=" + std::to_string(WARPS) +
            "> with G=" + std::to_string(G) + " items per group, " + dataName(data);
  constexpr int kChunk = 32 * WARPS * V * G;
  constexpr int kChunks = 3;
  constexpr int kSpan = kChunks * kChunk;  // positions per row
  // WARPS == 1: 4 warps (rows) per block, as in the linear-scan kernels; otherwise a block per row.
  constexpr unsigned kThreads = WARPS == 1 ? 128 : 32 * WARPS;
  constexpr unsigned kBlocks = WARPS == 1 ? 2 : 3;
  constexpr int kRows = WARPS == 1 ? 8 : 3;
  // Row 0: full. Row 1: ends in chunk 1 (or at its end), chunk 2 all identities. Then a random
  // length, and (one warp per row) one item, one group, and more random lengths.
  std::vector<int> lengths = {kSpan, kChunk + 1 + static_cast<int>(rng() % kChunk),
                              1 + static_cast<int>(rng() % kSpan)};
  for (int r = 3; r < kRows; ++r) lengths.push_back(r == 3 ? 1 : r == 4 ? G : 1 + static_cast<int>(rng() % kSpan));

  std::vector<float> a(kRows * kSpan), b(kRows * kSpan), h0(kRows);
  for (int i = 0; i < kRows * kSpan; ++i) {
    const Affine x = draw(data, rng);
    a[i] = x.a;
    b[i] = x.b;
  }
  for (float& h : h0) h = drawState(data, rng);
  const int threads = static_cast<int>(kBlocks * kThreads);
  std::vector<float> h(kRows * kSpan, poison()), ends(threads * kChunks * V, poison()), carries(threads, poison());
  std::vector<Affine> parts(threads * kChunks * V, poisonPair());
  run(stripedKernel<V, WARPS, G>, kBlocks, kThreads, a.data(), b.data(), lengths.data(), kChunks, h0.data(), h.data(),
      parts.data(), ends.data(), carries.data());

  for (int row = 0; row < kRows; ++row) {
    const int length = lengths[row];
    const long base = static_cast<long>(row) * kSpan;
    auto x = [&](int p) { return p < length ? Affine{a[base + p], b[base + p]} : Affine{1.0f, 0.0f}; };
    Ref state = Ref::state(h0[row]);
    for (int p = 0; p < kSpan; ++p) {
      state = state.then(x(p));
      expectNear("h", base + p, h[base + p], state.b, state.mb, data);
      // Within a group, threadApply's sequential fmaf from the previous state.
      if (p % G != 0) expectBits("h within a group", base + p, h[base + p], applyF(x(p), h[base + p - 1]));
      if (p == length - 1) {
        const Ref atEnd = state;
        // The final carry: the state after the last item (not bitwise: another evaluation order),
        // the same in every thread of the row.
        for (int t = 0; t < threads; ++t) {
          const int tRow = WARPS == 1 ? t / 32 : t / static_cast<int>(kThreads);
          if (tRow != row) continue;
          expectNear("final carry", t, carries[t], atEnd.b, atEnd.mb, data);
          expectBits("final carry, same in every thread of the row", t, carries[t],
                     carries[WARPS == 1 ? row * 32 : row * kThreads]);
        }
      }
    }
    // A chunk of identities carries the state through exactly.
    if (length <= (kChunks - 1) * kChunk) {
      const float carried = carries[WARPS == 1 ? row * 32 : row * kThreads];
      for (int p = (kChunks - 1) * kChunk; p < kSpan; ++p) {
        check(sameValue(h[base + p], carried), "h in an identity chunk: the carried state", base + p, h[base + p],
              carried);
      }
    }
  }
  // threadReduce and threadApply, per group: the sequential fp32 arithmetic.
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, warp = (t % static_cast<int>(kThreads)) / 32;
    const int row = WARPS == 1 ? t / 32 : t / static_cast<int>(kThreads);
    const int warpInRow = WARPS == 1 ? 0 : warp;
    const long base = static_cast<long>(row) * kSpan;
    for (int c = 0; c < kChunks; ++c) {
      for (int k = 0; k < V; ++k) {
        const int first = c * kChunk + warpInRow * 32 * V * G + k * 32 * G + lane * G;
        auto x = [&](int p) { return p < lengths[row] ? Affine{a[base + p], b[base + p]} : Affine{1.0f, 0.0f}; };
        Affine acc = x(first);
        Ref ref = Ref().then(x(first));
        for (int i = 1; i < G; ++i) {
          acc = composeF(acc, x(first + i));
          ref = ref.then(x(first + i));
        }
        const long slot = (static_cast<long>(t) * kChunks + c) * V + k;
        expectBits("threadReduce", slot, parts[slot], acc);
        expectMap("threadReduce", slot, parts[slot], ref, data);
        expectBits("threadApply's result: the group's last state", slot, ends[slot], h[base + first + G - 1]);
      }
    }
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20240612);

  for (Data data : {Data::kRandom, Data::kExact, Data::kIdentity}) {
    testPairs(data, rng);
    testWarp<1>(data, rng);
    testWarp<2>(data, rng);
    testWarp<4>(data, rng);
    testWarp<8>(data, rng);
    testWarp<16>(data, rng);
    testWarp<32>(data, rng);
  }
  for (Data data : {Data::kRandom, Data::kExact}) {
    testBlock<32>(data, rng);
    testBlock<64>(data, rng);
    testBlock<96>(data, rng);
    testBlock<128>(data, rng);
    testBlock<256>(data, rng);
    testBlock<288>(data, rng);
    testBlock<512>(data, rng);
    testBlock<1024>(data, rng);

    testStriped<1, 1, 1>(data, rng);
    testStriped<4, 1, 4>(data, rng);
    testStriped<2, 1, 8>(data, rng);
    testStriped<2, 2, 4>(data, rng);
    testStriped<1, 3, 2>(data, rng);
    testStriped<4, 4, 4>(data, rng);
    testStriped<2, 8, 2>(data, rng);
    testStriped<1, 9, 1>(data, rng);
    testStriped<2, 32, 1>(data, rng);
  }

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "scan primitives on the CUDA emulator: %ld checks, %ld failures (%.1f s; random inputs within %.0f "
      "of the %.0f ulps allowed)\n",
      checks, failures, seconds, worstUlps, kUlps);
  return failures == 0 ? 0 : 1;
}
