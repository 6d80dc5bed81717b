// Storage types of tensors (float, __half, __nv_bfloat16) and their conversion to and from the fp32
// used for all arithmetic: scalar load/store, 16-byte vector load/store with pack/unpack, and a
// host-side dispatch from rkcuda::DType to the storage type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/api.h"
#include "common/check.cuh"

namespace rkcuda {

// ---- scalar conversions ----

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T fromFloat(float x);
template <> __device__ __forceinline__ float fromFloat<float>(float x) { return x; }
template <> __device__ __forceinline__ __half fromFloat<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// An element given by its raw bits (the low 16 bits for the 16-bit types), as fp32.
template <class T> __device__ __forceinline__ float bitsToFloat(unsigned bits);
template <> __device__ __forceinline__ float bitsToFloat<float>(unsigned bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float bitsToFloat<__half>(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}
template <> __device__ __forceinline__ float bitsToFloat<__nv_bfloat16>(unsigned bits) {
  return __uint_as_float(bits << 16);
}

// Read-only load of one element, converted to fp32.
template <class T> __device__ __forceinline__ float loadScalar(const T* p) { return toFloat(__ldg(p)); }
// Store of one element, rounded to nearest even from fp32.
template <class T> __device__ __forceinline__ void storeScalar(T* p, float x) { *p = fromFloat<T>(x); }

// ---- 16-byte vectors ----
// A 16-byte vector holds kVecElems<T> consecutive elements (4 floats or 8 halves/bfloat16s), kept in
// a uint4 so that it lives in four registers; unpack16/pack16 convert to and from fp32 arrays. All
// indices into the arrays are compile-time constants after unrolling, so nothing spills to local
// memory.

template <class T> constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// p must be 16-byte aligned. Read-only (non-coherent) path: the data must not be written by the
// same kernel.
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
// p must be 16-byte aligned.
__device__ __forceinline__ void store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

namespace detail {
// Two 16-bit values packed in a 32-bit word; element 0 sits in the low half (lower address).
__device__ __forceinline__ float2 halfPairToFloat2(unsigned w) {
  __half2_raw r;
  r.x = static_cast<unsigned short>(w & 0xffffu);
  r.y = static_cast<unsigned short>(w >> 16);
  return __half22float2(__half2(r));
}
__device__ __forceinline__ unsigned float2ToHalfPair(float lo, float hi) {
  const __half2_raw r = static_cast<__half2_raw>(__floats2half2_rn(lo, hi));
  return static_cast<unsigned>(r.x) | (static_cast<unsigned>(r.y) << 16);
}
// bfloat16 -> float is exact: the bf16 bits are the high 16 bits of the float.
__device__ __forceinline__ float2 bf16PairToFloat2(unsigned w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ unsigned float2ToBf16Pair(float lo, float hi) {
  const __nv_bfloat162_raw r = static_cast<__nv_bfloat162_raw>(__floats2bfloat162_rn(lo, hi));
  return static_cast<unsigned>(r.x) | (static_cast<unsigned>(r.y) << 16);
}
__device__ __forceinline__ unsigned wordOf(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
}  // namespace detail

// uint4 -> kVecElems<T> floats.
template <class T> __device__ __forceinline__ void unpack16(const uint4& v, float (&out)[kVecElems<T>]);
template <> __device__ __forceinline__ void unpack16<float>(const uint4& v, float (&out)[4]) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}
template <> __device__ __forceinline__ void unpack16<__half>(const uint4& v, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = detail::halfPairToFloat2(detail::wordOf(v, i));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
template <> __device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& v, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = detail::bf16PairToFloat2(detail::wordOf(v, i));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// kVecElems<T> floats -> uint4 (round to nearest even for the 16-bit types).
template <class T> __device__ __forceinline__ uint4 pack16(const float (&in)[kVecElems<T>]);
template <> __device__ __forceinline__ uint4 pack16<float>(const float (&in)[4]) {
  return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
}
template <> __device__ __forceinline__ uint4 pack16<__half>(const float (&in)[8]) {
  return make_uint4(detail::float2ToHalfPair(in[0], in[1]), detail::float2ToHalfPair(in[2], in[3]),
                    detail::float2ToHalfPair(in[4], in[5]), detail::float2ToHalfPair(in[6], in[7]));
}
template <> __device__ __forceinline__ uint4 pack16<__nv_bfloat16>(const float (&in)[8]) {
  return make_uint4(detail::float2ToBf16Pair(in[0], in[1]), detail::float2ToBf16Pair(in[2], in[3]),
                    detail::float2ToBf16Pair(in[4], in[5]), detail::float2ToBf16Pair(in[6], in[7]));
}

// A vector whose every element is x.
template <class T> __device__ __forceinline__ uint4 splat16(float x) {
  float v[kVecElems<T>];
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) v[i] = x;
  return pack16<T>(v);
}

// Load / store 16 bytes (kVecElems<T> elements) as fp32.
template <class T> __device__ __forceinline__ void loadVec16(const T* p, float (&out)[kVecElems<T>]) {
  unpack16<T>(load16(p), out);
}
template <class T> __device__ __forceinline__ void storeVec16(T* p, const float (&in)[kVecElems<T>]) {
  store16(p, pack16<T>(in));
}

// Whether p is 16-byte aligned (host and device).
__host__ __device__ __forceinline__ bool isAligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- host-side dispatch ----

template <class T> struct TypeTag { using type = T; };

inline size_t dtypeSize(DType dt) {
  switch (dt) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
  }
  return 0;
}

// Calls f(TypeTag<T>{}) with T the storage type of dt and returns its Status.
template <class F> Status dispatchDType(DType dt, F&& f) {
  switch (dt) {
    case DType::F32:
      return f(TypeTag<float>{});
    case DType::F16:
      return f(TypeTag<__half>{});
    case DType::BF16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return statusError("unknown dtype");
}

}  // namespace rkcuda
