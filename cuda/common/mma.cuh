// Warp-level tensor-core matrix multiply-accumulate (mma.sync), shared by every kernel family.
//
//   D (16 x 8, fp32) += A (16 x K) * B (K x 8)
//   mma16816<T>: K = 16, A and B of T = __half or __nv_bfloat16, products exact, fp32 accumulation;
//   mma1688tf32: K = 8,  A and B fp32 rounded to tf32 (10-bit mantissa), fp32 accumulation.
//
// Each of the 32 lanes of a warp holds a fixed part of every operand (the PTX fragment layouts).
// With g = lane / 4 and t = lane % 4:
//   FragC  c[i]:  row g + 8 * (i / 2), column 2t + (i % 2)
//   FragA16 (16 x 16, two elements per register, the lower column in the low half):
//          r[i]:  row g + 8 * (i % 2), columns 2t + 8 * (i / 2) + {0, 1}
//   FragB16 (16 x 8, two elements per register, the lower k in the low half):
//          r[i]:  k 2t + 8 * i + {0, 1}, column g
//   FragATf32 (16 x 8) r[i]: row g + 8 * (i % 2), column t + 4 * (i / 2)
//   FragBTf32 (8 x 8)  r[i]: k t + 4 * i, column g
// The load/store helpers below fill and read fragments from any row-major array (shared or global
// memory) through an element accessor, so kernels never repeat the index arithmetic.
//
// On the device (sm_80 and newer) each call is one mma.sync instruction. Elsewhere (the CPU
// emulator, older architectures) a portable version gathers the operands with warp shuffles and
// computes the same products in fp32; it is correct on any GPU, only slower. Every lane of the warp
// must call these together (they are warp-collective).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace rkcuda {
namespace mma {

struct FragA16 {
  uint32_t r[4];
};
struct FragB16 {
  uint32_t r[2];
};
struct FragATf32 {
  uint32_t r[4];
};
struct FragBTf32 {
  uint32_t r[2];
};
struct FragC {
  float c[4];
  __device__ __forceinline__ void zero() { c[0] = c[1] = c[2] = c[3] = 0.0f; }
};

__device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x) & 31; }

// ---- 16-bit element packing ----
template <class T> struct Bits16;
template <> struct Bits16<__half> {
  __device__ __forceinline__ static uint16_t from(float x) { return __half_as_ushort(__float2half_rn(x)); }
  __device__ __forceinline__ static float to(uint16_t b) { return __half2float(__ushort_as_half(b)); }
};
template <> struct Bits16<__nv_bfloat16> {
  __device__ __forceinline__ static uint16_t from(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  __device__ __forceinline__ static float to(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
};
// Two floats rounded to T, packed (lo in the low half).
template <class T> __device__ __forceinline__ uint32_t pack(float lo, float hi) {
  return static_cast<uint32_t>(Bits16<T>::from(lo)) | (static_cast<uint32_t>(Bits16<T>::from(hi)) << 16);
}
template <class T> __device__ __forceinline__ float unpackLo(uint32_t v) {
  return Bits16<T>::to(static_cast<uint16_t>(v & 0xffffu));
}
template <class T> __device__ __forceinline__ float unpackHi(uint32_t v) {
  return Bits16<T>::to(static_cast<uint16_t>(v >> 16));
}

// fp32 -> tf32 (round to nearest, ties away from zero, as cvt.rna.tf32.f32), kept in fp32 bits.
__device__ __forceinline__ uint32_t toTf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  uint32_t b = __float_as_uint(x);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;  // finite: round the mantissa
  return b;
#endif
}

// What tf32 rounding drops, x - tf32(x) (exact in fp32). Splitting an operand as hi = tf32(x) and
// lo = tf32(tf32Rest(x)) gives fp32-grade products from three tf32 multiply-accumulates,
// a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi (the dropped a_lo b_lo is about 2^-22 relative).
__device__ __forceinline__ float tf32Rest(float x) { return x - __uint_as_float(toTf32(x)); }

// ---- the multiply-accumulates ----

// The portable version of both: lane 4g+s holds A's rows g, g+8 in r[0], r[1] (the k-slice s) and
// r[2], r[3] (the k-slice s + 4 slices); lane 4n+s holds B's column n in r[0], r[1] at the same
// k-slices. A k-slice is two elements (16-bit operands) or one (tf32); dotReg(a, b) multiplies and
// sums the elements of one slice.
// (The CPU emulator's device-numerics mode sums each output's products as a pairwise tree before
// adding them to the accumulator: the hardware's order is unspecified.)
template <class DotReg>
__device__ __forceinline__ void mmaPortable(FragC& d, const uint32_t (&a)[4], const uint32_t (&b)[2], DotReg dotReg) {
  const int g = lane() >> 2, t = lane() & 3;
  float part[4][8];  // per output, the products of slice s and half h at 2 s + h
  for (int s = 0; s < 4; ++s) {
    uint32_t ar[4], b0[2], b1[2];
    for (int i = 0; i < 4; ++i) ar[i] = __shfl_sync(0xffffffffu, a[i], 4 * g + s);
    for (int i = 0; i < 2; ++i) {
      b0[i] = __shfl_sync(0xffffffffu, b[i], 4 * (2 * t) + s);
      b1[i] = __shfl_sync(0xffffffffu, b[i], 4 * (2 * t + 1) + s);
    }
    for (int half = 0; half < 2; ++half) {
      for (int row = 0; row < 2; ++row) {
        part[2 * row + 0][2 * s + half] = dotReg(ar[2 * half + row], b0[half]);
        part[2 * row + 1][2 * s + half] = dotReg(ar[2 * half + row], b1[half]);
      }
    }
  }
#if defined(RK_CUDA_EMULATOR)
  if (emu::deviceNumerics()) {
    for (int i = 0; i < 4; ++i)
      d.c[i] += ((part[i][0] + part[i][1]) + (part[i][2] + part[i][3])) +
                ((part[i][4] + part[i][5]) + (part[i][6] + part[i][7]));
    return;
  }
#endif
  for (int k = 0; k < 8; ++k)
    for (int i = 0; i < 4; ++i) d.c[i] += part[i][k];
}

template <class T> __device__ __forceinline__ void mma16816(FragC& d, const FragA16& a, const FragB16& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
#else
  mmaPortable(d, a.r, b.r,
              [](uint32_t x, uint32_t y) { return unpackLo<T>(x) * unpackLo<T>(y) + unpackHi<T>(x) * unpackHi<T>(y); });
#endif
}

__device__ __forceinline__ void mma1688tf32(FragC& d, const FragATf32& a, const FragBTf32& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
#else
  mmaPortable(d, a.r, b.r, [](uint32_t x, uint32_t y) { return __uint_as_float(x) * __uint_as_float(y); });
#endif
}

// ---- fragment loads and stores through an accessor ----
// at(row, col) returns the float value of the logical matrix element (rows and columns relative to
// the tile); it may read any memory and may return 0 outside the matrix (padding).

// A tile (16 x 16) of a row-major (M x K) operand.
template <class T, class At> __device__ __forceinline__ FragA16 loadA16(At at) {
  const int g = lane() >> 2, t = lane() & 3;
  FragA16 f;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
    f.r[i] = pack<T>(at(row, col), at(row, col + 1));
  }
  return f;
}
// B tile (16 x 8): at(k, n) is element (k, n) of the K x N operand.
template <class T, class At> __device__ __forceinline__ FragB16 loadB16(At at) {
  const int g = lane() >> 2, t = lane() & 3;
  FragB16 f;
  for (int i = 0; i < 2; ++i) {
    const int k = 2 * t + 8 * i;
    f.r[i] = pack<T>(at(k, g), at(k + 1, g));
  }
  return f;
}
template <class At> __device__ __forceinline__ FragATf32 loadATf32(At at) {
  const int g = lane() >> 2, t = lane() & 3;
  FragATf32 f;
  for (int i = 0; i < 4; ++i) f.r[i] = toTf32(at(g + 8 * (i & 1), t + 4 * (i >> 1)));
  return f;
}
template <class At> __device__ __forceinline__ FragBTf32 loadBTf32(At at) {
  const int g = lane() >> 2, t = lane() & 3;
  FragBTf32 f;
  for (int i = 0; i < 2; ++i) f.r[i] = toTf32(at(t + 4 * i, g));
  return f;
}
// Fills C from get(row, col) for the four elements this lane holds (the layout storeC writes).
template <class Get> __device__ __forceinline__ FragC loadC(Get get) {
  const int g = lane() >> 2, t = lane() & 3;
  FragC c;
  for (int i = 0; i < 4; ++i) c.c[i] = get(g + 8 * (i >> 1), 2 * t + (i & 1));
  return c;
}
// The same fragments read straight from 16-bit arrays, two elements per 32-bit load (no conversion):
// A (16 x 16) row-major at a with leading dimension lda; B (16 x 8) given transposed, column n at
// bt + n * ldb with its k elements contiguous. lda, ldb and the pointers' element offsets even.
template <class T> __device__ __forceinline__ FragA16 loadA16Packed(const T* a, int lda) {
  const int g = lane() >> 2, t = lane() & 3;
  FragA16 f;
  for (int i = 0; i < 4; ++i) {
    f.r[i] = *reinterpret_cast<const uint32_t*>(a + (g + 8 * (i & 1)) * lda + 2 * t + 8 * (i >> 1));
  }
  return f;
}
template <class T> __device__ __forceinline__ FragB16 loadB16PackedT(const T* bt, int ldb) {
  const int g = lane() >> 2, t = lane() & 3;
  FragB16 f;
  for (int i = 0; i < 2; ++i) f.r[i] = *reinterpret_cast<const uint32_t*>(bt + g * ldb + 2 * t + 8 * i);
  return f;
}

// ---- fragments from 16-bit tiles in shared memory: ldmatrix ----
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 loads four 8 x 8 matrices of 16-bit elements. Lane
// l gives the address of row l % 8 of matrix l / 8 (8 elements, 16 bytes, 16-byte aligned, in shared
// memory); register i of every lane receives two elements of matrix i (the lower in the low half):
//   plain: row g, columns 2t and 2t + 1;   Trans: rows 2t and 2t + 1 of column g   (g = l / 4, t = l % 4)
// which are the mma fragment layouts above. One instruction replaces eight 16-bit (or four 32-bit)
// loads per lane, and its shared-memory accesses are whole 16-byte rows. On the device (sm_75 and
// newer) it is that instruction; elsewhere a portable version reads the same elements through
// shuffled row addresses (the emulator checks their alignment). Warp-collective.
template <bool Trans> __device__ __forceinline__ void ldmatrixX4(uint32_t (&r)[4], const void* rowAddr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(rowAddr));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
#else
  const uint64_t mine = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(rowAddr));
#if defined(RK_CUDA_EMULATOR)
  if (mine % 16 != 0) emu::fail("ldmatrix: a row address that is not 16-byte aligned");
#endif
  const int g = lane() >> 2, t = lane() & 3;
  auto rowOf = [&](int src) {  // the row address lane src gave
    const uint32_t lo = __shfl_sync(0xffffffffu, static_cast<uint32_t>(mine), src);
    const uint32_t hi = __shfl_sync(0xffffffffu, static_cast<uint32_t>(mine >> 32), src);
    return reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>((static_cast<uint64_t>(hi) << 32) | lo));
  };
  for (int i = 0; i < 4; ++i) {
    if constexpr (Trans) {
      const uint16_t* r0 = rowOf(8 * i + 2 * t);
      const uint16_t* r1 = rowOf(8 * i + 2 * t + 1);
      r[i] = static_cast<uint32_t>(r0[g]) | (static_cast<uint32_t>(r1[g]) << 16);
    } else {
      const uint16_t* row = rowOf(8 * i + g);
      r[i] = static_cast<uint32_t>(row[2 * t]) | (static_cast<uint32_t>(row[2 * t + 1]) << 16);
    }
  }
#endif
}

// A (16 x 16) from a row-major tile: element (m, k) at a[m * lda + k].
template <class T> __device__ __forceinline__ FragA16 ldmatrixA16(const T* a, int lda) {
  const int l = lane(), i = l >> 3;
  FragA16 f;
  ldmatrixX4<false>(f.r, a + ((l & 7) + 8 * (i & 1)) * lda + 8 * (i >> 1));
  return f;
}
// A (16 x 16) from its transpose: element (m, k) at at[k * ldt + m] (a row-major K x M tile).
template <class T> __device__ __forceinline__ FragA16 ldmatrixA16T(const T* at, int ldt) {
  const int l = lane(), i = l >> 3;
  FragA16 f;
  ldmatrixX4<true>(f.r, at + ((l & 7) + 8 * (i >> 1)) * ldt + 8 * (i & 1));
  return f;
}
// Two B tiles (16 x 8: columns n0 .. n0 + 7 and n0 + 8 .. n0 + 15, in b0 and b1) from a row-major K x N
// tile: element (k, n) at b[k * ldb + n].
template <class T> __device__ __forceinline__ void ldmatrixB16x2(const T* b, int ldb, FragB16& b0, FragB16& b1) {
  const int l = lane(), i = l >> 3;
  uint32_t r[4];
  ldmatrixX4<true>(r, b + ((l & 7) + 8 * (i & 1)) * ldb + 8 * (i >> 1));
  b0.r[0] = r[0], b0.r[1] = r[1], b1.r[0] = r[2], b1.r[1] = r[3];
}
// The same from the transposed storage: element (k, n) at bt[n * ldt + k] (as loadB16PackedT).
template <class T> __device__ __forceinline__ void ldmatrixB16x2T(const T* bt, int ldt, FragB16& b0, FragB16& b1) {
  const int l = lane(), i = l >> 3;
  uint32_t r[4];
  ldmatrixX4<false>(r, bt + ((l & 7) + 8 * (i >> 1)) * ldt + 8 * (i & 1));
  b0.r[0] = r[0], b0.r[1] = r[1], b1.r[0] = r[2], b1.r[1] = r[3];
}

// Calls put(row, col, value) for the four elements of C this lane holds.
template <class Put> __device__ __forceinline__ void storeC(const FragC& c, Put put) {
  const int g = lane() >> 2, t = lane() & 3;
  for (int i = 0; i < 4; ++i) put(g + 8 * (i >> 1), 2 * t + (i & 1), c.c[i]);
}

}  // namespace mma
}  // namespace rkcuda
