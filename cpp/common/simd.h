// 16-lane fp32 vectors for the CPU kernels, built from the hardware vectors of the variant being
// compiled (see isa.h): one 512-bit register on AVX-512, two 256-bit ones on AVX2, four 128-bit ones
// on SSE2 / NEON. Kernels are written once against Lanes (a block of 16 channels, 64 bytes in
// memory on every variant) and each operation becomes RK_ISA_WIDTH-wide instructions, one per part:
// no lane is ever handled one at a time in arithmetic, comparisons, selects or conversions.
//
// Included inside an instruction-set region (isa_begin.h), once per variant translation unit; it
// defines everything in rk::RK_ISA_NS.
#if !defined(RK_ISA_NS) || !defined(RK_ISA_WIDTH)
#error "simd.h belongs inside an instruction-set region (common/isa_begin.h)"
#endif

namespace rk {
namespace RK_ISA_NS {

constexpr int kLanes = 16;
constexpr int kWidth = RK_ISA_WIDTH;
constexpr int kParts = kLanes / kWidth;
typedef float Vec __attribute__((vector_size(4 * kWidth)));
typedef int32_t VecI __attribute__((vector_size(4 * kWidth)));

#define RK_PARTS _Pragma("GCC unroll 4") for (int k = 0; k < kParts; ++k)

namespace simd_detail {
template <int... I> struct Ints {};
template <int N, int... I> struct MakeInts : MakeInts<N - 1, N - 1, I...> {};
template <int... I> struct MakeInts<0, I...> { using type = Ints<I...>; };
// {v, v, ..., v}: a broadcast (Vec{} + v would be an addition, 0 + -0 being +0).
template <int... I> RK_ALWAYS_INLINE Vec dup(float v, Ints<I...>) { return Vec{((void)I, v)...}; }
}  // namespace simd_detail

#if RK_ISA_WIDTH == 16
// One register holds all 16 lanes: Lanes is the hardware vector itself, with the compiler's own
// operators, comparisons (-1 / 0 per lane), subscripts and conditional selects.
typedef Vec Lanes;
typedef VecI LanesI;

RK_ALWAYS_INLINE Vec& part(Lanes& x, int) { return x; }
RK_ALWAYS_INLINE const Vec& part(const Lanes& x, int) { return x; }
RK_ALWAYS_INLINE Lanes select(LanesI m, Lanes a, Lanes b) { return m ? a : b; }
RK_ALWAYS_INLINE LanesI toInt(Lanes a) { return __builtin_convertvector(a, VecI); }
RK_ALWAYS_INLINE Lanes bitsAsFloat(LanesI a) { return (Vec)a; }
RK_ALWAYS_INLINE Lanes splat(float v) { return simd_detail::dup(v, simd_detail::MakeInts<kWidth>::type{}); }

#else
// Several registers per 16 lanes: Lanes holds kParts hardware vectors, and every operation is
// applied to each part (no lane is ever handled alone).

// kParts hardware vectors V of elements E. Copies are spelled out part by part: as plain
// aggregates, GCC copies a struct of several vectors through general-purpose registers (64 bits at
// a time) instead of with vector moves.
template <typename V, typename E> struct Parts {
  V p[kParts];
  Parts() = default;
  RK_ALWAYS_INLINE Parts(const Parts& o) { RK_PARTS p[k] = o.p[k]; }
  RK_ALWAYS_INLINE Parts& operator=(const Parts& o) {
    RK_PARTS p[k] = o.p[k];
    return *this;
  }
  RK_ALWAYS_INLINE E operator[](int i) const { return p[i / kWidth][i % kWidth]; }
#if defined(__clang__)
  // Clang binds no reference to an element of a vector; the elements lie in memory in order.
  RK_ALWAYS_INLINE E& operator[](int i) { return reinterpret_cast<E*>(p)[i]; }
#else
  RK_ALWAYS_INLINE E& operator[](int i) { return p[i / kWidth][i % kWidth]; }
#endif
};
typedef Parts<Vec, float> Lanes;
// A mask or integer per lane (comparisons give -1 for true, 0 for false).
typedef Parts<VecI, int32_t> LanesI;

RK_ALWAYS_INLINE Vec& part(Lanes& x, int k) { return x.p[k]; }
RK_ALWAYS_INLINE const Vec& part(const Lanes& x, int k) { return x.p[k]; }

RK_ALWAYS_INLINE Lanes splat(float v) {
  const Vec d = simd_detail::dup(v, simd_detail::MakeInts<kWidth>::type{});
  Lanes r;
  RK_PARTS r.p[k] = d;
  return r;
}

#define RK_LANES_ARITH(OP)                                    \
  RK_ALWAYS_INLINE Lanes operator OP(Lanes a, Lanes b) {      \
    RK_PARTS a.p[k] = a.p[k] OP b.p[k];                       \
    return a;                                                 \
  }                                                           \
  RK_ALWAYS_INLINE Lanes operator OP(Lanes a, float b) {      \
    RK_PARTS a.p[k] = a.p[k] OP b;                            \
    return a;                                                 \
  }                                                           \
  RK_ALWAYS_INLINE Lanes operator OP(float a, Lanes b) {      \
    RK_PARTS b.p[k] = a OP b.p[k];                            \
    return b;                                                 \
  }                                                           \
  RK_ALWAYS_INLINE Lanes& operator OP##=(Lanes& a, Lanes b) { \
    RK_PARTS a.p[k] = a.p[k] OP b.p[k];                       \
    return a;                                                 \
  }                                                           \
  RK_ALWAYS_INLINE Lanes& operator OP##=(Lanes& a, float b) { \
    RK_PARTS a.p[k] = a.p[k] OP b;                            \
    return a;                                                 \
  }
RK_LANES_ARITH(+)
RK_LANES_ARITH(-)
RK_LANES_ARITH(*)
RK_LANES_ARITH(/)
#undef RK_LANES_ARITH

RK_ALWAYS_INLINE Lanes operator-(Lanes a) {
  RK_PARTS a.p[k] = -a.p[k];
  return a;
}

#define RK_LANES_COMPARE(OP)                              \
  RK_ALWAYS_INLINE LanesI operator OP(Lanes a, Lanes b) { \
    LanesI r;                                             \
    RK_PARTS r.p[k] = a.p[k] OP b.p[k];                   \
    return r;                                             \
  }                                                       \
  RK_ALWAYS_INLINE LanesI operator OP(Lanes a, float b) { \
    LanesI r;                                             \
    RK_PARTS r.p[k] = a.p[k] OP b;                        \
    return r;                                             \
  }
RK_LANES_COMPARE(<)
RK_LANES_COMPARE(<=)
RK_LANES_COMPARE(>)
RK_LANES_COMPARE(>=)
RK_LANES_COMPARE(==)
RK_LANES_COMPARE(!=)
#undef RK_LANES_COMPARE

#define RK_LANESI_OP(OP)                                     \
  RK_ALWAYS_INLINE LanesI operator OP(LanesI a, LanesI b) {  \
    RK_PARTS a.p[k] = a.p[k] OP b.p[k];                      \
    return a;                                                \
  }                                                          \
  RK_ALWAYS_INLINE LanesI operator OP(LanesI a, int32_t b) { \
    RK_PARTS a.p[k] = a.p[k] OP b;                           \
    return a;                                                \
  }
RK_LANESI_OP(|)
RK_LANESI_OP(&)
RK_LANESI_OP(+)
RK_LANESI_OP(-)
RK_LANESI_OP(<<)
#undef RK_LANESI_OP

// m ? a : b per lane.
RK_ALWAYS_INLINE Lanes select(LanesI m, Lanes a, Lanes b) {
  RK_PARTS a.p[k] = m.p[k] ? a.p[k] : b.p[k];
  return a;
}
// Float to int per lane (truncating) and the bits of integers read as floats.
RK_ALWAYS_INLINE LanesI toInt(Lanes a) {
  LanesI r;
  RK_PARTS r.p[k] = __builtin_convertvector(a.p[k], VecI);
  return r;
}
RK_ALWAYS_INLINE Lanes bitsAsFloat(LanesI a) {
  Lanes r;
  RK_PARTS r.p[k] = (Vec)a.p[k];
  return r;
}
#endif

// 16 floats from / to memory with any alignment.
RK_ALWAYS_INLINE Lanes loadLanes(const float* src) {
  Lanes r;
  RK_PARTS std::memcpy(&part(r, k), src + k * kWidth, sizeof(Vec));
  return r;
}
RK_ALWAYS_INLINE void storeLanes(float* dst, const Lanes& v) {
  RK_PARTS std::memcpy(dst + k * kWidth, &part(v, k), sizeof(Vec));
}

RK_ALWAYS_INLINE Lanes absLanes(Lanes x) { return select(x < 0.0f, -x, x); }

constexpr float kLog2e = 1.44269504088896340736f;

// 2^x per lane: 2^round(x) built in the exponent bits times a degree-7 Taylor polynomial of 2^f,
// |f| <= 1/2 (relative error below 1e-8 before rounding); 0 below 2^-126, inf above 2^128.
RK_ALWAYS_INLINE Lanes exp2Lanes(Lanes x) {
  Lanes xc = select(x < -127.0f, splat(-127.0f), x);
  xc = select(xc > 128.0f, splat(128.0f), xc);
  const Lanes r = (xc + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const Lanes f = (xc - r) * 0.693147180559945309f;
  Lanes p = splat(1.0f / 5040.0f);
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const Lanes v = p * bitsAsFloat((toInt(r) + 127) << 23);
  return select(x < -126.0f, Lanes{}, v);
}

// 1 / (1 + e^-v) per lane.
RK_ALWAYS_INLINE Lanes sigmoidLanes(Lanes v) { return 1.0f / (1.0f + exp2Lanes(v * -kLog2e)); }

// ---- sums across lanes ----

namespace simd_detail {

// Pairs a and b at block size 2h: lane j of the result holds, for each 2h-block, a's first half then
// b's first half (Hi = 0), or their second halves (Hi = 1).
constexpr int pairIndex(int j, int h, int hi) {
  const int blk = j / (2 * h), o = j % (2 * h);
  return o < h ? blk * 2 * h + o + hi * h : kWidth + blk * 2 * h + (o - h) + hi * h;
}
template <int H, int Hi, int... J> RK_ALWAYS_INLINE Vec pairHalves(Vec a, Vec b, Ints<J...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, pairIndex(J, H, Hi)...);
#else
  return __builtin_shuffle(a, b, VecI{pairIndex(J, H, Hi)...});
#endif
}
// Sum of each block of 2h lanes folded to h lanes, interleaving a and b.
template <int H> RK_ALWAYS_INLINE Vec foldPair(Vec a, Vec b) {
  using Idx = typename MakeInts<kWidth>::type;
  return pairHalves<H, 0>(a, b, Idx{}) + pairHalves<H, 1>(a, b, Idx{});
}

template <int S, int... J> RK_ALWAYS_INLINE Vec rotate(Vec v, Ints<J...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, ((J + S) % kWidth)...);
#else
  return __builtin_shuffle(v, VecI{((J + S) % kWidth)...});
#endif
}

constexpr int bitReverse(int j) {
  int r = 0;
  for (int w = kWidth >> 1, b = 1; w > 0; w >>= 1, b <<= 1)
    if (j & b) r |= w;
  return r;
}
template <int... J> RK_ALWAYS_INLINE Vec unreverse(Vec v, Ints<J...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, bitReverse(J)...);
#else
  return __builtin_shuffle(v, VecI{bitReverse(J)...});
#endif
}

// Lane i of the result is the sum of the lanes of rows[i], for kWidth rows: a tree of shuffles and
// adds (log2(kWidth) levels of kWidth / 2^level pairs), then one permutation.
template <int N> RK_ALWAYS_INLINE void foldLevel(Vec* v) {
  // v[0 .. N) hold partial sums of their rows in blocks of N lanes; pair them up, halving the blocks.
  constexpr int H = N / 2;
#pragma GCC unroll 16
  for (int m = 0; m < N / 2; ++m) v[m] = foldPair<H>(v[2 * m], v[2 * m + 1]);
  if constexpr (N > 2) foldLevel<N / 2>(v);
}
RK_ALWAYS_INLINE Vec rowSums(Vec* rows) {
  foldLevel<kWidth>(rows);
  return unreverse(rows[0], typename MakeInts<kWidth>::type{});
}

// One stage of a kWidth x kWidth transpose: rows r and r + B (bit B of r clear) exchange their
// B x B blocks off the diagonal, which swaps bit B of the row and of the column of every element.
constexpr int swapLow(int j, int b) { return (j & b) == 0 ? j : kWidth + j - b; }
constexpr int swapHigh(int j, int b) { return (j & b) == 0 ? j + b : kWidth + j; }
template <int B, int... J> RK_ALWAYS_INLINE void swapBlocks(Vec& x, Vec& y, Ints<J...>) {
#if defined(__clang__)
  const Vec lo = __builtin_shufflevector(x, y, swapLow(J, B)...);
  const Vec hi = __builtin_shufflevector(x, y, swapHigh(J, B)...);
#else
  const Vec lo = __builtin_shuffle(x, y, VecI{swapLow(J, B)...});
  const Vec hi = __builtin_shuffle(x, y, VecI{swapHigh(J, B)...});
#endif
  x = lo;
  y = hi;
}
template <int B> RK_ALWAYS_INLINE void transposeStages(Vec* v) {
#pragma GCC unroll 16
  for (int r = 0; r < kWidth; ++r)
    if ((r & B) == 0) swapBlocks<B>(v[r], v[r + B], typename MakeInts<kWidth>::type{});
  if constexpr (B > 1) transposeStages<B / 2>(v);
}

}  // namespace simd_detail

// Sum of the 16 lanes (a pairwise tree).
RK_ALWAYS_INLINE float laneSum(Lanes v) {
  Vec s = part(v, 0);
  if constexpr (kParts == 4) {
    s = (part(v, 0) + part(v, 2)) + (part(v, 1) + part(v, 3));
  } else if constexpr (kParts == 2) {
    s = part(v, 0) + part(v, 1);
  }
  // Halve the vector until 4 lanes remain, then add those pairwise.
  if constexpr (kWidth >= 16) s += simd_detail::rotate<8>(s, simd_detail::MakeInts<kWidth>::type{});
  if constexpr (kWidth >= 8) s += simd_detail::rotate<4>(s, simd_detail::MakeInts<kWidth>::type{});
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// The lane sums of 16 vectors at once: lane i of the result is laneSum(r[i]) (up to the order of
// the additions). About three operations per vector instead of a scalar reduction each.
RK_ALWAYS_INLINE Lanes laneSums16(const Lanes* r) {
  Lanes out;
#pragma GCC unroll 4
  for (int q = 0; q < kParts; ++q) {
    // Rows q*kWidth .. q*kWidth + kWidth - 1, each first folded to one hardware vector.
    Vec rows[kWidth];
#pragma GCC unroll 16
    for (int i = 0; i < kWidth; ++i) {
      const Lanes& x = r[q * kWidth + i];
      Vec s = part(x, 0);
      if constexpr (kParts == 4)
        s = (part(x, 0) + part(x, 2)) + (part(x, 1) + part(x, 3));
      else if constexpr (kParts == 2)
        s = part(x, 0) + part(x, 1);
      rows[i] = s;
    }
    part(out, q) = simd_detail::rowSums(rows);
  }
  return out;
}

// A 16 x 16 transpose: lane i of out[j] is lane j of in[i] (in and out distinct). Each
// kWidth x kWidth tile of hardware vectors is transposed in log2(kWidth) stages of two-register
// shuffles and lands in the mirrored tile.
RK_ALWAYS_INLINE void transpose16(const Lanes* in, Lanes* out) {
#pragma GCC unroll 4
  for (int bi = 0; bi < kParts; ++bi)
#pragma GCC unroll 4
    for (int bj = 0; bj < kParts; ++bj) {
      Vec t[kWidth];
#pragma GCC unroll 16
      for (int x = 0; x < kWidth; ++x) t[x] = part(in[bi * kWidth + x], bj);
      if constexpr (kWidth > 1) simd_detail::transposeStages<kWidth / 2>(t);
#pragma GCC unroll 16
      for (int x = 0; x < kWidth; ++x) part(out[bj * kWidth + x], bi) = t[x];
    }
}

#undef RK_PARTS

// Working memory of `rows` Lanes, 64-byte aligned, from the thread's scratch cache (common/scratch.h).
// Zero-initialised unless the caller writes every row before reading it (zero = false): for buffers
// of hundreds of MB the single-threaded memset, and the page faults it takes on the calling thread,
// cost more than the kernels that then fill them in parallel.
struct LaneScratch {
  ScratchBlock block;
  Lanes* mem;
  explicit LaneScratch(size_t rows, bool zero = true)
      : block(scratchAcquire(std::max<size_t>(rows, 1) * 64)), mem(static_cast<Lanes*>(block.p)) {
    if (zero) std::memset(static_cast<void*>(mem), 0, std::max<size_t>(rows, 1) * 64);
  }
  ~LaneScratch() { scratchRelease(block); }
  LaneScratch(const LaneScratch&) = delete;
  LaneScratch& operator=(const LaneScratch&) = delete;
  Lanes* at(size_t row) { return mem + row; }
};

}  // namespace RK_ISA_NS
}  // namespace rk
