// Device numerics for the CUDA emulator (RK_EMU_DEVICE_NUMERICS=1).
//
// On the host the kernels' math is libm's (correctly rounded or within 1 ulp) and the portable
// tensor-core path sums its products in one fixed order. A GPU differs within documented bounds:
//   - ex2.approx.ftz.f32 (fastExp2): relative error up to 2^-22, subnormal results flushed to zero;
//   - __fdividef (the cells' div): within 2 ulp, and 0 for 2^126 < |b| < 2^128;
//   - expf and tanhf within 2 ulp, log1pf within 1 ulp (CUDA's math library);
//   - mma.sync: the products of one instruction summed in an order the ISA does not specify.
// In this mode each of those is perturbed by an error inside its bound (a fixed function of the
// operands, so a run repeats exactly, as on a device) and mma sums each instruction's products as a
// pairwise tree before adding them to the accumulator. A tolerance that holds only for host math then
// fails here instead of on the first GPU run. Off (the default), results are bitwise those of the
// plain host math.
//
// The overloads of expf, tanhf and log1pf are declared in namespace rkcuda: the kernels live there
// and call those functions unqualified, so they find these first (host code outside keeps libm).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace emu {

inline bool deviceNumerics() {
  static const bool on = [] {
    const char* v = std::getenv("RK_EMU_DEVICE_NUMERICS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// A relative error in [-bound, bound) that depends only on the bits of its inputs.
inline float pseudoError(float x, float y, float bound) {
  uint32_t a, b;
  std::memcpy(&a, &x, 4);
  std::memcpy(&b, &y, 4);
  uint32_t h = a * 0x9e3779b1u ^ (b + 0x7f4a7c15u);
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return bound * (float(h) * 0x1p-31f - 1.0f);
}

// r perturbed by up to `ulps` units in its last place.
inline float withUlpError(float r, float x, float y, float ulps) {
  if (!std::isfinite(r) || r == 0.0f) return r;
  return r * (1.0f + pseudoError(x, y, ulps * 0x1p-23f));
}

inline float ex2Approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  float y = std::exp2(x);
  if (!std::isfinite(y) || y == 0.0f) return y;
  if (x != 0.0f) y *= 1.0f + pseudoError(x, 0.0f, 0x1p-22f);  // 2^0 stays exactly 1
  return y < FLT_MIN ? 0.0f : y;
}

inline float divApprox(float a, float b) {
  const float ab = std::fabs(b);
  if (ab > 0x1p126f && std::isfinite(ab) && std::isfinite(a)) return 0.0f;
  return withUlpError(a / b, a, b, 2.0f);
}

}  // namespace emu

namespace rkcuda {
// (Exact cases stay exact: e^0 = 1, tanh 0 = 0, |tanh x| <= 1, log1p 0 = 0.)
inline float expf(float x) {
  const float r = ::expf(x);
  return emu::deviceNumerics() && x != 0.0f ? emu::withUlpError(r, x, 1.0f, 2.0f) : r;
}
inline float tanhf(float x) {
  const float r = ::tanhf(x);
  return emu::deviceNumerics() ? std::fmax(-1.0f, std::fmin(1.0f, emu::withUlpError(r, x, 2.0f, 2.0f))) : r;
}
inline float log1pf(float x) {
  const float r = ::log1pf(x);
  return emu::deviceNumerics() ? emu::withUlpError(r, x, 3.0f, 1.0f) : r;
}
}  // namespace rkcuda
