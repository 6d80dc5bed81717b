// Row helpers shared by the CPU kernels whose state is a K x V matrix per head (the gated delta
// rule, the linear-attention family): rows loaded as fp32 with an optional L2 normalisation and
// its gradient, and the state kept as column slabs of 16 (Lanes) for the sweeps over its rows.
//
// Included inside an instruction-set region (isa_begin.h) after simd.h, once per variant
// translation unit; it defines everything in rk::RK_ISA_NS.
#if !defined(RK_ISA_NS) || !defined(RK_ISA_WIDTH)
#error "state_rows.h belongs inside an instruction-set region (common/isa_begin.h)"
#endif

namespace rk {
namespace RK_ISA_NS {

constexpr float kL2Eps = 1e-6f;

// Asks for the cache lines of a row of n elements to be brought towards the core (into L2): for the
// rows of the next work item, a few hundred bytes apart per position, which the hardware prefetchers
// do not follow across pages.
template <typename S> RK_ALWAYS_INLINE void prefetchRow(const S* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * int64_t(sizeof(S)); b += 64) __builtin_prefetch(p + b, 0, 2);
}

// sum_i x_i^2 in 16 partial sums (vector registers, not a chain through every element).
RK_ALWAYS_INLINE float sumSquares(const float* x, int64_t n) {
  Lanes acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Lanes v = loadLanes(x + i);
    acc += v * v;
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * x[i];
  return laneSum(acc) + tail;
}

// Loads n elements as fp32; with l2norm divides by sqrt(sum x^2 + eps) and returns that divisor.
template <typename S> RK_ALWAYS_INLINE float loadVector(const S* src, int64_t n, bool l2norm, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<S>::load(src[i]);
  if (!l2norm) return 1.0f;
  const float r = std::sqrt(sumSquares(dst, n) + kL2Eps);
  for (int64_t i = 0; i < n; ++i) dst[i] /= r;
  return r;
}

// The gradient through x / sqrt(|x|^2 + eps) of one row. With r^2 = |x|^2 + eps:
// dx_i = (g_i (r^2 - x_i^2) - x_i (x.g - x_i g_i)) / r^3, written so that a dominant component does
// not cancel against itself (exact for K = 1) -- which needs every product rounded on its own, so
// the compiler must not fuse them into multiply-adds here.
template <typename S> RK_NO_FP_CONTRACT void l2NormBackward(const float* x, const float* g, int64_t K, S* dst) {
  RK_NO_FP_CONTRACT_BODY
  Lanes ssv{}, dotv{};
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes) {
    const Lanes xv = loadLanes(x + i), gv = loadLanes(g + i);
    ssv += xv * xv;
    dotv += xv * gv;
  }
  float ss = laneSum(ssv), dot = laneSum(dotv);
  for (; i < K; ++i) {
    ss += x[i] * x[i];
    dot += x[i] * g[i];
  }
  const float r2 = ss + kL2Eps, inv = 1.0f / (r2 * std::sqrt(r2));
  for (i = 0; i < K; ++i) {
    const float xi = x[i], gi = g[i];
    dst[i] = Storage<S>::store((gi * ((ss - xi * xi) + kL2Eps) - xi * (dot - xi * gi)) * inv);
  }
}

// A gradient row g of the normalised row (of x) taken through the normalisation (l2norm), or stored as
// it is.
template <typename S> void storeGradientRow(const float* x, const float* g, int64_t K, bool l2norm, S* dst) {
  if (l2norm) return l2NormBackward(x, g, K, dst);
  for (int64_t i = 0; i < K; ++i) dst[i] = Storage<S>::store(g[i]);
}

// ---- the state in column slabs ----
// The columns of a K x V state evolve independently under these recurrences (column j of the
// update involves column j alone), so a head's state is kept as ceil(V / 16) slabs of K rows x 16
// columns (Lanes), zero in the padding columns past V, and advances one slab at a time.

// The 16 columns of slab jb of a length-V row, zero past V.
template <typename S> RK_ALWAYS_INLINE Lanes loadCols(const S* row, int64_t jb, int64_t V) {
  const int64_t j0 = jb * kLanes, n = std::min<int64_t>(kLanes, V - j0);
  if constexpr (sizeof(S) == 4)
    if (n == kLanes) return loadLanes(row + j0);
  float tmp[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) tmp[l] = Storage<S>::load(row[j0 + l]);
  return loadLanes(tmp);
}
template <typename S> RK_ALWAYS_INLINE void storeCols(S* row, int64_t jb, int64_t V, Lanes x) {
  const int64_t j0 = jb * kLanes, n = std::min<int64_t>(kLanes, V - j0);
  if constexpr (sizeof(S) == 4)
    if (n == kLanes) return storeLanes(row + j0, x);
  float tmp[kLanes];
  storeLanes(tmp, x);
  for (int64_t l = 0; l < n; ++l) row[j0 + l] = Storage<S>::store(tmp[l]);
}
// Slabs <-> a K x V row-major state (a null state reads as zeros).
RK_ALWAYS_INLINE void slabsFromState(Lanes* slabs, const float* st, int64_t K, int64_t V) {
  const int64_t nb = (V + kLanes - 1) / kLanes;
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t i = 0; i < K; ++i) slabs[jb * K + i] = st ? loadCols(st + i * V, jb, V) : Lanes{};
}
RK_ALWAYS_INLINE void stateFromSlabs(float* st, const Lanes* slabs, int64_t K, int64_t V) {
  const int64_t nb = (V + kLanes - 1) / kLanes;
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t i = 0; i < K; ++i) storeCols(st + i * V, jb, V, slabs[jb * K + i]);
}

}  // namespace RK_ISA_NS
}  // namespace rk
