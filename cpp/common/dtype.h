// Host-side storage types and conversions. fp16/bf16 are stored as raw 16-bit patterns (the bits a
// JS Uint16Array holds); arithmetic is always done in float.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/common/api.h"

namespace rk {

// One enum for the host and the CUDA side (rkcuda::DType, cuda/common/api.h).
using DType = rkcuda::DType;

inline const char* dtypeName(DType d) {
  switch (d) {
    case DType::F32:
      return "float32";
    case DType::F16:
      return "float16";
    case DType::BF16:
      return "bfloat16";
  }
  return "?";
}
inline size_t dtypeSize(DType d) { return d == DType::F32 ? 4 : 2; }

inline float bitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t floatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16ToFloat(uint16_t h) { return bitsToFloat(uint32_t(h) << 16); }
inline uint16_t floatToBf16(float f) {
  uint32_t u = floatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
  return uint16_t(u >> 16);
}

inline float f16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bitsToFloat(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bitsToFloat(sign);
    // subnormal: value = mant * 2^-24
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline uint16_t floatToF16(float f) {
  uint32_t u = floatToBits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // nan
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (>= 65520) -> inf
  if (a < 0x38800000u) {                                  // subnormal or zero in fp16
    // round(|f| * 2^24) to nearest even, as an integer number of 2^-24 units
    float v = bitsToFloat(a) * 16777216.0f;
    uint32_t m = uint32_t(v);
    float frac = v - float(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) m++;
    return uint16_t(sign | m);
  }
  uint32_t e = ((a >> 23) - 112u) << 10;
  uint32_t m = (a >> 13) & 0x3ffu;
  uint32_t r = e | m;
  uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++;
  return uint16_t(sign | r);
}

// Load/store of one element of storage type S as float.
template <typename S> struct Storage;
template <> struct Storage<float> {
  static constexpr DType dtype = DType::F32;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct Half16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
template <> struct Storage<Half16> {
  static constexpr DType dtype = DType::F16;
  static float load(Half16 v) { return f16ToFloat(v.bits); }
  static Half16 store(float v) { return Half16{floatToF16(v)}; }
};
template <> struct Storage<BFloat16> {
  static constexpr DType dtype = DType::BF16;
  static float load(BFloat16 v) { return bf16ToFloat(v.bits); }
  static BFloat16 store(float v) { return BFloat16{floatToBf16(v)}; }
};

// Calls fn with a value of the storage type matching d (for template dispatch).
template <typename Fn> auto dispatchDType(DType d, Fn&& fn) {
  switch (d) {
    case DType::F16:
      return fn(Half16{});
    case DType::BF16:
      return fn(BFloat16{});
    default:
      return fn(float{});
  }
}

}  // namespace rk
