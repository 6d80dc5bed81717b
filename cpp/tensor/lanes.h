// 16-lane fp32 vectors for the CPU kernels (GCC/Clang vector extensions: the compiler maps one
// Lanes value to 4 SSE, 2 AVX or 1 AVX-512 register, per the instruction set a loop is compiled for,
// see isa.h), and 64-byte aligned scratch rows of them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <new>

#include "tensor/isa.h"

// The vector helpers are internal and always inlined: their calling convention never matters.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace rk {

constexpr int kLanes = 16;
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t LanesI __attribute__((vector_size(4 * kLanes)));

constexpr float kLog2e = 1.44269504088896340736f;

RK_ALWAYS_INLINE Lanes splat(float v) { return Lanes{} + v; }
RK_ALWAYS_INLINE Lanes absLanes(Lanes x) { return x < 0.0f ? -x : x; }

#if defined(__clang__)
#define RK_SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define RK_SHUFFLE(x, y, ...) __builtin_shuffle(x, y, LanesI{__VA_ARGS__})
#endif

// 2^x per lane: 2^round(x) built in the exponent bits times a degree-7 Taylor polynomial of 2^f,
// |f| <= 1/2 (relative error below 1e-8 before rounding); 0 below 2^-126, inf above 2^128.
RK_ALWAYS_INLINE Lanes exp2Lanes(Lanes x) {
  Lanes xc = x < -127.0f ? splat(-127.0f) : x;
  xc = xc > 128.0f ? splat(128.0f) : xc;
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
  const LanesI bits = (__builtin_convertvector(r, LanesI) + 127) << 23;
  const Lanes v = p * (Lanes)bits;
  return x < -126.0f ? Lanes{} : v;
}

// Sum of the lanes (a pairwise tree).
RK_ALWAYS_INLINE float laneSum(Lanes v) {
  v += RK_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += RK_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  v += RK_SHUFFLE(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return v[0] + v[1];
}

// The lane sums of 16 vectors at once: lane i of the result is laneSum(r[i]). A transposing tree of
// shuffles and adds, about three operations per vector instead of a scalar reduction each.
RK_ALWAYS_INLINE Lanes laneSums16(const Lanes* r) {
  Lanes z[8], w[4], v[2];
  // Each level halves the partial sums per row and doubles the rows per vector.
  for (int m = 0; m < 8; ++m)
    z[m] = RK_SHUFFLE(r[2 * m], r[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           RK_SHUFFLE(r[2 * m], r[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int m = 0; m < 4; ++m)
    w[m] = RK_SHUFFLE(z[2 * m], z[2 * m + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           RK_SHUFFLE(z[2 * m], z[2 * m + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int m = 0; m < 2; ++m)
    v[m] = RK_SHUFFLE(w[2 * m], w[2 * m + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           RK_SHUFFLE(w[2 * m], w[2 * m + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const Lanes out = RK_SHUFFLE(v[0], v[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                    RK_SHUFFLE(v[0], v[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // Lane l now holds row bitreverse4(l); the permutation is its own inverse.
  return RK_SHUFFLE(out, out, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Working memory of `rows` Lanes, 64-byte aligned (the AVX-512 loops use aligned loads, whatever
// alignment the baseline target gives the Lanes type). Zero-initialised unless the caller writes
// every row before reading it (zero = false): for buffers of hundreds of MB the single-threaded
// memset, and the page faults it takes on the calling thread, cost more than the kernels that then
// fill them in parallel.
struct LaneScratch {
  Lanes* mem;
  explicit LaneScratch(size_t rows, bool zero = true)
      : mem(static_cast<Lanes*>(std::aligned_alloc(64, std::max<size_t>(rows, 1) * 64))) {
    if (!mem) throw std::bad_alloc();
    if (zero) std::memset(static_cast<void*>(mem), 0, std::max<size_t>(rows, 1) * 64);
  }
  ~LaneScratch() { std::free(mem); }
  LaneScratch(const LaneScratch&) = delete;
  LaneScratch& operator=(const LaneScratch&) = delete;
  Lanes* at(size_t row) { return mem + row; }
};

}  // namespace rk
