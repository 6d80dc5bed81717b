// CPU test of the linear-scan kernels (cuda/scan/linear_scan.cu, compiled unmodified) through the
// SIMT emulator in emu.h. The real launchers, linearScanForward and linearScanBackward, run every
// kernel configuration: each dtype, both directions, 1/2/4/8 warps per row (pinned through
// rkcuda::tunable) and the vector and per-element paths (aligned or misaligned pointers, lengths
// that are or are not a multiple of a 16-byte vector), on lengths around the chunk boundaries,
// with the optional arguments present or absent and the per-row vectors aliased or not. Every
// output is compared with a float64 reference computed here from the same inputs, sentinel guards
// around every array catch out-of-bounds writes, and the launch log confirms which kernel ran.
//
// Prints up to kMaxReported failures and a summary line "<n> checks, <m> failures"; exits 1 on any
// failure. Built and run by tests/cuda-emulator.test.ts; by hand:
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/linear_scan_test.cpp
//   (from the repository root), then run the executable.
#include "emu.h"
// The kernels under test, after the emulator.
#include "scan/linear_scan.cu"
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

// Tolerance of each dtype's results.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 1e-5;  // fp32 state and storage
  else if constexpr (std::is_same_v<T, __half>)
    return 1e-3;  // the outputs' rounding: 2^-11 relative
  else
    return 8e-3;  // the outputs' rounding: 2^-8 relative
}

// ---- reporting ----

struct Case {
  const char* dtype;
  int64_t rows, length;
  bool reverse;
  int warps;
  int offset[6];                         // element offset from 16-byte alignment of a, b, h, gh, ga, gb (see Arr)
  bool h0, finalState, gh, gFinal, gh0;  // optional arguments passed
  bool alias;                            // h0 and finalState are one buffer, and so are gFinal and gh0

  std::string describe() const {
    char s[256];
    std::snprintf(s, sizeof s,
                  "%s rows=%lld L=%lld %s warps=%d offsets(a,b,h,gh,ga,gb)=%d,%d,%d,%d,%d,%d "
                  "h0=%d final=%d gh=%d gFinal=%d gh0=%d alias=%d",
                  dtype, static_cast<long long>(rows), static_cast<long long>(length), reverse ? "reverse" : "forward",
                  warps, offset[0], offset[1], offset[2], offset[3], offset[4], offset[5], h0, finalState, gh, gFinal,
                  gh0, alias);
    return s;
  }
};
enum Arr { kA, kB, kH, kGh, kGa, kGb };

void check(bool ok, const Case& c, const char* what, int64_t index, double got, double want) {
  ++checks;
  if (ok) return;
  if (++failures <= kMaxReported) {
    std::printf("FAIL %s[%lld]: got %.9g, want %.9g  (%s)\n", what, static_cast<long long>(index), got, want,
                c.describe().c_str());
  }
}

bool near(double got, double want, double tolerance) {
  return std::fabs(got - want) <= tolerance * (1.0 + std::fabs(want));  // NaN fails
}

// Sentinel guards of an output array untouched.
template <class T> void checkGuards(const Buf<T>& buf, const Case& c, const char* what) {
  const double s = Elem<T>::value(Buf<T>::sentinel());
  for (int i = 0; i < Buf<T>::kGuard; ++i) {
    const double before = Elem<T>::value(buf.data[i - Buf<T>::kGuard]);
    const double after = Elem<T>::value(buf.data[buf.n + i]);
    check(before == s, c, what, i - Buf<T>::kGuard, before, s);
    check(after == s, c, what, static_cast<int64_t>(buf.n) + i, after, s);
  }
}

// An input array still holding its values.
template <class T>
void checkUnchanged(const Buf<T>& buf, const std::vector<double>& values, const Case& c, const char* what) {
  size_t bad = 0;
  for (size_t i = 0; i < values.size(); ++i) bad += Elem<T>::value(buf.data[i]) != values[i];
  check(bad == 0, c, what, 0, static_cast<double>(bad), 0);
}

// ---- which kernel the launchers should pick ----

template <class T, int W> const void* kernelFor(bool backward, bool desc, bool vec) {
  using namespace rkcuda;
  constexpr int F = kFwdGroups<T>, B = kBwdGroups<T>;
  if (backward) {
    if (desc)
      return vec ? emu::kernelId(linearScanBackwardKernel<T, B, W, true, true>)
                 : emu::kernelId(linearScanBackwardKernel<T, B, W, true, false>);
    return vec ? emu::kernelId(linearScanBackwardKernel<T, B, W, false, true>)
               : emu::kernelId(linearScanBackwardKernel<T, B, W, false, false>);
  }
  if (desc)
    return vec ? emu::kernelId(linearScanForwardKernel<T, F, W, true, true>)
               : emu::kernelId(linearScanForwardKernel<T, F, W, true, false>);
  return vec ? emu::kernelId(linearScanForwardKernel<T, F, W, false, true>)
             : emu::kernelId(linearScanForwardKernel<T, F, W, false, false>);
}

template <class T> const void* kernelFor(int warps, bool backward, bool desc, bool vec) {
  switch (warps) {
    case 1:
      return kernelFor<T, 1>(backward, desc, vec);
    case 2:
      return kernelFor<T, 2>(backward, desc, vec);
    case 4:
      return kernelFor<T, 4>(backward, desc, vec);
    default:
      return kernelFor<T, 8>(backward, desc, vec);
  }
}

// The launch log holds exactly the one launch expected (none for an empty row).
template <class T> void checkLaunch(const Case& c, bool backward, bool vec, const char* what) {
  const size_t want = c.length > 0 ? 1 : 0;
  check(emu::launchLog.size() == want, c, (std::string(what) + ": number of launches").c_str(), 0,
        static_cast<double>(emu::launchLog.size()), static_cast<double>(want));
  if (emu::launchLog.size() != 1 || want != 1) return;
  const emu::LaunchRecord& r = emu::launchLog[0];
  launched.insert(r.kernel);
  const bool desc = backward ? !c.reverse : c.reverse;  // the backward pass runs opposite
  const std::string kernel = std::string(what) + (vec ? ": not the vector-path" : ": not the per-element") +
                             " kernel for these warps per row and direction";
  check(r.kernel == kernelFor<T>(c.warps, backward, desc, vec), c, kernel.c_str(), 0, 0, 1);
  const unsigned threads = c.warps == 1 ? 128 : 32 * c.warps;
  const int64_t rowsPerBlock = c.warps == 1 ? 4 : 1;
  const int64_t blocks = (c.rows + rowsPerBlock - 1) / rowsPerBlock;
  check(r.block.x == threads, c, (std::string(what) + ": block size").c_str(), 0, r.block.x, threads);
  check(r.grid.x == blocks, c, (std::string(what) + ": grid size").c_str(), 0, r.grid.x, static_cast<double>(blocks));
}

// Every kernel instantiation ran at least once (the case set reaches every configuration).
template <class T> void checkCoverage() {
  for (int warps : {1, 2, 4, 8}) {
    for (int flags = 0; flags < 8; ++flags) {
      const bool backward = flags & 1, desc = flags & 2, vec = flags & 4;
      ++checks;
      if (launched.count(kernelFor<T>(warps, backward, desc, vec)) == 0 && ++failures <= kMaxReported) {
        std::printf("FAIL never ran: %s %s kernel, %d warps per row, %s memory, %s path\n", Elem<T>::name,
                    backward ? "backward" : "forward", warps, desc ? "descending" : "ascending",
                    vec ? "vector" : "per-element");
      }
    }
  }
}

// ---- one case: forward, then backward from the forward's output ----

template <class T> void runCase(const Case& c, std::mt19937& rng) {
  using E = Elem<T>;
  constexpr int64_t G = 16 / sizeof(T);
  const int64_t rows = c.rows, L = c.length;
  const size_t n = static_cast<size_t>(rows * L);
  const double tol = tolerance<T>();
  emu::setTunable("linearScan.warpsPerRow", c.warps);

  // Inputs, exactly representable in T: a of either sign with |a| in [0.6, 1] (so states stay
  // bounded over long rows), the rest in [-1, 1].
  std::uniform_real_distribution<double> mag(0.6, 1.0), sym(-1.0, 1.0);
  std::vector<double> a(n), b(n), gh(n), h0(rows), gFinal(rows);
  for (auto& x : a) x = E::value(E::from(rng() % 2 ? mag(rng) : -mag(rng)));
  for (auto& x : b) x = E::value(E::from(sym(rng)));
  for (auto& x : gh) x = E::value(E::from(sym(rng)));
  for (auto& x : h0) x = static_cast<float>(sym(rng));
  for (auto& x : gFinal) x = static_cast<float>(sym(rng));

  Buf<T> bufA(n, c.offset[kA]), bufB(n, c.offset[kB]), bufH(n, c.offset[kH]), bufGh(n, c.offset[kGh]),
      bufGa(n, c.offset[kGa]), bufGb(n, c.offset[kGb]);
  for (size_t i = 0; i < n; ++i) {
    bufA.data[i] = E::from(a[i]);
    bufB.data[i] = E::from(b[i]);
    bufGh.data[i] = E::from(gh[i]);
  }
  // Per-row fp32 vectors with one sentinel past the end.
  const float rowSentinel = 777.0f;
  std::vector<float> h0Buf(rows + 1, rowSentinel), finalBuf(rows + 1, rowSentinel);
  std::copy(h0.begin(), h0.end(), h0Buf.begin());
  float* finalOut = c.alias ? h0Buf.data() : finalBuf.data();

  // Forward.
  const bool fwdVec = L % G == 0 && c.offset[kA] == 0 && c.offset[kB] == 0 && c.offset[kH] == 0;
  emu::launchLog.clear();
  rkcuda::Status st = rkcuda::linearScanForward(E::dtype, bufA.data, bufB.data, c.h0 ? h0Buf.data() : nullptr,
                                                bufH.data, c.finalState ? finalOut : nullptr, rows, L, c.reverse);
  check(st.ok(), c, ("forward status: " + st.message).c_str(), 0, st.code, 0);
  if (!st.ok()) return;
  checkLaunch<T>(c, false, fwdVec, "forward launch");

  std::vector<double> h(n);  // the kernel's h, as the backward pass will read it
  for (int64_t r = 0; r < rows; ++r) {
    double s = c.h0 ? h0[r] : 0.0;
    for (int64_t p = 0; p < L; ++p) {
      const int64_t i = r * L + (c.reverse ? L - 1 - p : p);
      s = a[i] * s + b[i];
      h[i] = E::value(bufH.data[i]);
      check(near(h[i], s, tol), c, "h", i, h[i], s);
    }
    if (c.finalState) {
      check(near(finalOut[r], s, tol), c, "finalState", r, finalOut[r], s);
      // fp32 storage: the final state is the last h, bit for bit.
      const int64_t last = r * L + (c.reverse ? 0 : L - 1);
      if (sizeof(T) == 4 && L > 0) check(finalOut[r] == h[last], c, "finalState == last h", r, finalOut[r], h[last]);
    }
  }
  if (c.finalState) check(finalOut[rows] == rowSentinel, c, "finalState guard", rows, finalOut[rows], rowSentinel);
  checkGuards(bufH, c, "h guard");
  checkUnchanged(bufA, a, c, "a unchanged");
  checkUnchanged(bufB, b, c, "b unchanged");

  // Backward, from the forward's h.
  std::copy(h0.begin(), h0.end(), h0Buf.begin());  // the aliased forward overwrote it
  std::vector<float> gFinalBuf(rows + 1, rowSentinel), gh0Buf(rows + 1, rowSentinel);
  std::copy(gFinal.begin(), gFinal.end(), gFinalBuf.begin());
  float* gh0Out = c.alias ? gFinalBuf.data() : gh0Buf.data();
  const bool bwdVec = L % G == 0 && c.offset[kA] == 0 && c.offset[kH] == 0 && (!c.gh || c.offset[kGh] == 0) &&
                      c.offset[kGa] == 0 && c.offset[kGb] == 0;
  emu::launchLog.clear();
  st = rkcuda::linearScanBackward(E::dtype, bufA.data, bufH.data, c.h0 ? h0Buf.data() : nullptr,
                                  c.gh ? bufGh.data : nullptr, c.gFinal ? gFinalBuf.data() : nullptr, bufGa.data,
                                  bufGb.data, c.gh0 ? gh0Out : nullptr, rows, L, c.reverse);
  check(st.ok(), c, ("backward status: " + st.message).c_str(), 0, st.code, 0);
  if (!st.ok()) return;
  checkLaunch<T>(c, true, bwdVec, "backward launch");

  // g_t = gh_t + a_{t+1} g_{t+1} over scan order (g_last = gh_last + gFinal); gb_t = g_t,
  // ga_t = g_t * h_{t-1} (h0 before the first), gh0 = a_first * g_first.
  for (int64_t r = 0; r < rows; ++r) {
    double g = c.gFinal ? gFinal[r] : 0.0;  // gradient flowing into the step after the current one
    double aNext = 1.0;                     // a of that step
    for (int64_t p = L - 1; p >= 0; --p) {
      const int64_t i = r * L + (c.reverse ? L - 1 - p : p);
      const int64_t prev = c.reverse ? i + 1 : i - 1;  // previous step of the forward scan
      g = aNext * g + (c.gh ? gh[i] : 0.0);
      const double hPrev = p == 0 ? (c.h0 ? h0[r] : 0.0) : h[prev];
      const double gotGb = E::value(bufGb.data[i]), gotGa = E::value(bufGa.data[i]);
      check(near(gotGb, g, tol), c, "gb", i, gotGb, g);
      check(near(gotGa, g * hPrev, tol), c, "ga", i, gotGa, g * hPrev);
      aNext = a[i];
    }
    if (c.gh0) check(near(gh0Out[r], aNext * g, tol), c, "gh0", r, gh0Out[r], aNext * g);
  }
  if (c.gh0) check(gh0Out[rows] == rowSentinel, c, "gh0 guard", rows, gh0Out[rows], rowSentinel);
  checkGuards(bufGa, c, "ga guard");
  checkGuards(bufGb, c, "gb guard");
  checkUnchanged(bufA, a, c, "a unchanged (backward)");
  checkUnchanged(bufH, h, c, "h unchanged (backward)");
  checkUnchanged(bufGh, gh, c, "gh unchanged");
}

// ---- the case set ----

template <class T> void runSuite(std::mt19937& rng) {
  constexpr int G = 16 / sizeof(T);
  // Positions per row per chunk with one warp per row: 32 lanes x 16 items in the forward kernel,
  // x 8 in the backward one; both scale with the warps per row.
  constexpr int64_t kFwdChunk1 = rkcuda::Layout<T, rkcuda::kFwdGroups<T>, 1>::CHUNK;
  constexpr int64_t kBwdChunk1 = rkcuda::Layout<T, rkcuda::kBwdGroups<T>, 1>::CHUNK;
  static_assert(kFwdChunk1 == 512 && kBwdChunk1 == 256, "chunk sizes changed: revisit the lengths below");

  for (int warps : {1, 2, 4, 8}) {
    const int64_t C = kFwdChunk1 * warps;  // forward chunk; the backward chunk is C / 2
    // Single elements and groups; around the backward chunk (C / 2) and the forward chunk; three
    // and four forward chunks (both register buffers reused, odd and even chunk counts), ending
    // with a whole group or mid-group; and random lengths, which move the last position (whose
    // thread writes finalState / gh0) to arbitrary warps, lanes and groups.
    std::vector<int64_t> lengths = {1,
                                    2,
                                    G - 1,
                                    G,
                                    G + 1,
                                    C / 2 - 1,
                                    C / 2,
                                    C / 2 + 1,
                                    C - G,
                                    C - 1,
                                    C,
                                    C + 1,
                                    C + G,
                                    2 * C + G,
                                    2 * C + C / 2 + 3,
                                    3 * C + C / 2 + 1};
    for (int i = 0; i < 3; ++i) lengths.push_back(1 + static_cast<int64_t>(rng() % (3 * C)));
    int variant = 0;
    for (int64_t L : lengths) {
      for (int reverse = 0; reverse < 2; ++reverse, ++variant) {
        Case c{};
        c.dtype = Elem<T>::name;
        // One warp per row: 4 rows per block, so 5 rows leave a partial block. Otherwise a block
        // per row.
        c.rows = warps == 1 ? (variant % 2 ? 5 : 8) : (variant % 2 ? 2 : 3);
        c.length = L;
        c.reverse = reverse;
        c.warps = warps;
        // Optional arguments (and aliasing): all present, all absent, or a random combination.
        const unsigned mask = variant % 5 == 0 ? 0x3f : variant % 5 == 1 ? 0 : static_cast<unsigned>(rng());
        c.h0 = mask & 1;
        c.finalState = mask & 2;
        c.gh = mask & 4;
        c.gFinal = mask & 8;
        c.gh0 = mask & 16;
        c.alias = mask & 32;
        runCase<T>(c, rng);
        // Where the vector path is possible, again with one array misaligned (per-element path).
        if (L % G == 0) {
          int arr = static_cast<int>(rng() % 6);
          if (arr == kGh && !c.gh) arr = kA;  // an absent gh cannot matter
          c.offset[arr] = 1 + static_cast<int>(rng() % (G - 1));
          runCase<T>(c, rng);
        }
      }
    }
  }
}

// Arguments the launchers handle without a kernel: empty rows, no rows, bad sizes.
void runEdgeCases() {
  using rkcuda::linearScanBackward;
  using rkcuda::linearScanForward;
  Case c{};
  c.dtype = "f32";
  c.rows = 3;
  c.warps = 1;
  const std::vector<float> h0 = {1.5f, -2.0f, 0.25f, 777.0f};  // 3 rows and a sentinel
  std::vector<float> out;
  auto outIs = [&](const rkcuda::Status& st, const char* what, std::vector<float> want) {
    check(st.ok(), c, what, -1, st.code, 0);
    for (size_t r = 0; r < want.size(); ++r) {
      check(out[r] == want[r], c, what, static_cast<int64_t>(r), out[r], want[r]);
    }
  };
  emu::launchLog.clear();

  // Length 0: finalState = h0 (zeros without h0), gh0 = gFinal.
  out.assign(4, 777.0f);
  outIs(linearScanForward(DType::F32, nullptr, nullptr, h0.data(), nullptr, out.data(), 3, 0, false), "L=0: finalState",
        h0);
  outIs(linearScanForward(DType::F32, nullptr, nullptr, nullptr, nullptr, out.data(), 3, 0, true),
        "L=0: finalState without h0", {0, 0, 0, 777.0f});
  outIs(linearScanBackward(DType::F32, nullptr, nullptr, nullptr, nullptr, h0.data(), nullptr, nullptr, out.data(), 3,
                           0, false),
        "L=0: gh0", h0);

  rkcuda::Status st = linearScanForward(DType::F32, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 5, false);
  check(st.ok(), c, "rows=0 is a no-op", 0, st.code, 0);
  st = linearScanForward(DType::F32, nullptr, nullptr, nullptr, nullptr, nullptr, -1, 5, false);
  check(!st.ok(), c, "rows<0 refused", 0, st.code, -1);
  st = linearScanBackward(DType::F32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 2, 5,
                          false);
  check(!st.ok(), c, "null tensors refused", 0, st.code, -1);
  check(emu::launchLog.empty(), c, "no launches", 0, static_cast<double>(emu::launchLog.size()), 0);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 rng(20240611);
  runEdgeCases();
  runSuite<float>(rng);
  runSuite<__half>(rng);
  runSuite<__nv_bfloat16>(rng);
  checkCoverage<float>();
  checkCoverage<__half>();
  checkCoverage<__nv_bfloat16>();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("linear scan on the CUDA emulator: %ld checks, %ld failures (%.1f s)\n", checks, failures, seconds);
  return failures == 0 ? 0 : 1;
}
