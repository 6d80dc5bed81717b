// CPU test of the warp-level matrix multiply-accumulate helpers, cuda/common/mma.cuh (compiled
// unmodified; here its portable path runs, which gathers operands with warp shuffles), through the
// SIMT emulator in emu.h. Test kernels load A and B tiles from row-major global arrays with the
// documented fragment layouts (loadA16 / loadB16 / loadATf32 / loadBTf32), accumulate over several
// k-steps onto a loaded C, and store D with storeC. Checked against a float64 product of the
// operands rounded as the hardware rounds them (fp16 / bf16 / tf32): every element within a bound
// scaled by the magnitude of its terms. Also: pack/unpack round trips, tf32 rounding of special
// values, small integers, for which every result must be exact, the packed fragment loads from
// 16-bit arrays (the same fragments as the accessor loads), and operands staged through
// dynamic shared memory above the default 48 KiB limit (refused until allowDynamicShared), and the
// emulator's device-numerics mode.
//
// Prints up to 20 failures and a summary line "<n> checks, <m> failures"; exits 1 on any failure.
// Built and run by tests/cuda-emulator.test.ts; by hand (from the repository root):
//   g++ -std=c++17 -O1 -fno-strict-aliasing -I<CUDA include dir> -Icuda tests/cuda-emulator/mma_test.cpp
#include "emu.h"
// The code under test, after the emulator.
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "harness.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

namespace mma = rkcuda::mma;

void expect(bool ok, const char* what, int i, double got, double want) {
  ++checks;
  if (ok) return;
  if (++failures <= 20) std::printf("FAIL %s [%d]: got %.9g, want %.9g\n", what, i, got, want);
}

// D (16 x 8) = C + A (16 x 16*ksteps) * B (16*ksteps x 8), all row-major fp32 in global memory.
template <class T> __global__ void mma16Kernel(const float* A, const float* B, const float* C, float* D, int ksteps) {
  mma::FragC acc;
  for (int i = 0; i < 4; ++i) {
    const int g = mma::lane() >> 2, t = mma::lane() & 3;
    acc.c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  }
  const int K = 16 * ksteps;
  for (int s = 0; s < ksteps; ++s) {
    const mma::FragA16 a = mma::loadA16<T>([&](int r, int c) { return A[r * K + 16 * s + c]; });
    const mma::FragB16 b = mma::loadB16<T>([&](int k, int n) { return B[(16 * s + k) * 8 + n]; });
    mma::mma16816<T>(acc, a, b);
  }
  mma::storeC(acc, [&](int r, int c, float v) { D[r * 8 + c] = v; });
}

__global__ void mmaTf32Kernel(const float* A, const float* B, const float* C, float* D, int ksteps) {
  mma::FragC acc;
  {
    const int g = mma::lane() >> 2, t = mma::lane() & 3;
    for (int i = 0; i < 4; ++i) acc.c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  }
  const int K = 8 * ksteps;
  for (int s = 0; s < ksteps; ++s) {
    const mma::FragATf32 a = mma::loadATf32([&](int r, int c) { return A[r * K + 8 * s + c]; });
    const mma::FragBTf32 b = mma::loadBTf32([&](int k, int n) { return B[(8 * s + k) * 8 + n]; });
    mma::mma1688tf32(acc, a, b);
  }
  mma::storeC(acc, [&](int r, int c, float v) { D[r * 8 + c] = v; });
}

// The same product with A staged through dynamic shared memory (a whole 64 KiB of it, which needs
// the kernel's limit raised), by the first lane; the warp then reads its fragments from there.
__global__ void mmaSharedKernel(const float* A, const float* B, float* D) {
  float* tile = rkcuda::dynamicShared<float>();
  if (mma::lane() == 0) {
    for (int i = 0; i < 16 * 16; ++i) tile[i] = A[i];
    tile[64 * 1024 / 4 - 1] = 1.0f;  // the last byte of the allocation is writable
  }
  __syncwarp();
  mma::FragC acc;
  acc.zero();
  const mma::FragA16 a = mma::loadA16<__nv_bfloat16>([&](int r, int c) { return tile[r * 16 + c]; });
  const mma::FragB16 b = mma::loadB16<__nv_bfloat16>([&](int k, int n) { return B[k * 8 + n]; });
  mma::mma16816<__nv_bfloat16>(acc, a, b);
  mma::storeC(acc, [&](int r, int c, float v) { D[r * 8 + c] = v + tile[64 * 1024 / 4 - 1] - 1.0f; });
}

void testDynamicShared() {
  std::vector<float> A(16 * 16), B(16 * 8), D(16 * 8, NAN);
  for (int i = 0; i < 16 * 16; ++i) A[i] = static_cast<float>(i % 7 - 3);
  for (int i = 0; i < 16 * 8; ++i) B[i] = static_cast<float>(i % 5 - 2);
  const size_t bytes = 64 * 1024;
  const rkcuda::Status refused =
      rkcuda::launch(mmaSharedKernel, dim3(1), dim3(32), bytes, A.data(), B.data(), D.data());
  expect(!refused.ok(), "64 KiB of dynamic shared memory without allowDynamicShared is refused", 0, refused.ok(), 0);
  expect(rkcuda::allowDynamicShared(mmaSharedKernel, bytes).ok(), "allowDynamicShared", 0, 0, 1);
  const rkcuda::Status st = rkcuda::launch(mmaSharedKernel, dim3(1), dim3(32), bytes, A.data(), B.data(), D.data());
  expect(st.ok(), "launch with dynamic shared memory", 0, st.ok(), 1);
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double want = 0;
      for (int k = 0; k < 16; ++k) want += static_cast<double>(A[r * 16 + k]) * B[k * 8 + n];
      expect(D[r * 8 + n] == want, "mma through dynamic shared memory", r * 8 + n, D[r * 8 + n], want);
    }
  }
}

// loadA16Packed / loadB16PackedT (16-bit arrays, leading dimensions with padding) give the same
// fragments as loadA16 / loadB16 on the same values; out[lane] counts the registers that differ.
template <class T> __global__ void packedLoadKernel(const T* a, int lda, const T* bt, int ldb, int* out) {
  const mma::FragA16 fa = mma::loadA16Packed(a, lda);
  const mma::FragB16 fb = mma::loadB16PackedT(bt, ldb);
  const mma::FragA16 ra = mma::loadA16<T>([&](int r, int c) { return static_cast<float>(a[r * lda + c]); });
  const mma::FragB16 rb = mma::loadB16<T>([&](int k, int n) { return static_cast<float>(bt[n * ldb + k]); });
  int bad = 0;
  for (int i = 0; i < 4; ++i) bad += fa.r[i] != ra.r[i];
  for (int i = 0; i < 2; ++i) bad += fb.r[i] != rb.r[i];
  out[mma::lane()] = bad;
}

template <class T> void testPackedLoads(const char* name) {
  const int lda = 24, ldb = 40;  // padded rows
  std::vector<T> a(16 * lda), bt(8 * ldb);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<T>(static_cast<float>(static_cast<int>(i % 13) - 6) * 0.25f);
  for (size_t i = 0; i < bt.size(); ++i)
    bt[i] = static_cast<T>(static_cast<float>(static_cast<int>(i % 11) - 5) * 0.5f);
  std::vector<int> out(32, -1);
  rkcuda::launch(packedLoadKernel<T>, dim3(1), dim3(32), 0, a.data(), lda, bt.data() + 16, ldb, out.data());
  for (int l = 0; l < 32; ++l) expect(out[l] == 0, name, l, out[l], 0);
}

// ldmatrix (ldmatrixA16, ldmatrixA16T, ldmatrixB16x2, ldmatrixB16x2T) from 16-bit tiles staged in
// shared memory with padded rows: element (r, c) of each logical 16 x 16 matrix holds the code
// r * 16 + c + 1 (A: (m, k), B: (k, n)), so every register is checked against the fragment layout of
// the header written out by hand. out[lane * 16 + j]: A, A from its transpose, then B (two n-blocks)
// from row-major and from transposed storage.
constexpr int kLd = 24;  // 48-byte rows: 16-byte aligned, and not a multiple of 128 (as kernels pad)
__global__ void ldmatrixKernel(const uint16_t* codes, uint32_t* out) {
  alignas(16) __shared__ uint16_t sA[16 * kLd], sAt[16 * kLd], sB[16 * kLd], sBt[16 * kLd];
  for (int e = static_cast<int>(threadIdx.x); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    sA[r * kLd + c] = codes[e];   // A (m = r, k = c)
    sAt[c * kLd + r] = codes[e];  // the same A stored transposed
    sB[r * kLd + c] = codes[e];   // B (k = r, n = c)
    sBt[c * kLd + r] = codes[e];  // the same B stored transposed
  }
  __syncthreads();
  const mma::FragA16 a = mma::ldmatrixA16(reinterpret_cast<const __half*>(sA), kLd);
  const mma::FragA16 at = mma::ldmatrixA16T(reinterpret_cast<const __half*>(sAt), kLd);
  mma::FragB16 b0, b1, bt0, bt1;
  mma::ldmatrixB16x2(reinterpret_cast<const __half*>(sB), kLd, b0, b1);
  mma::ldmatrixB16x2T(reinterpret_cast<const __half*>(sBt), kLd, bt0, bt1);
  uint32_t* o = out + mma::lane() * 16;
  for (int i = 0; i < 4; ++i) o[i] = a.r[i], o[4 + i] = at.r[i];
  o[8] = b0.r[0], o[9] = b0.r[1], o[10] = b1.r[0], o[11] = b1.r[1];
  o[12] = bt0.r[0], o[13] = bt0.r[1], o[14] = bt1.r[0], o[15] = bt1.r[1];
}

void testLdmatrix() {
  std::vector<uint16_t> codes(256);
  for (int e = 0; e < 256; ++e) codes[e] = static_cast<uint16_t>(e + 1);
  std::vector<uint32_t> out(32 * 16, 0);
  rkcuda::launch(ldmatrixKernel, dim3(1), dim3(32), 0, codes.data(), out.data());
  auto code = [](int r, int c) { return static_cast<uint32_t>(r * 16 + c + 1); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* o = out.data() + l * 16;
    for (int i = 0; i < 4; ++i) {  // A: r[i] holds (g + 8 (i % 2), 2t + 8 (i / 2) + {0, 1})
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      const uint32_t want = code(row, col) | (code(row, col + 1) << 16);
      expect(o[i] == want, "ldmatrixA16: register of the A fragment", l * 4 + i, o[i], want);
      expect(o[4 + i] == want, "ldmatrixA16T: register of the A fragment", l * 4 + i, o[4 + i], want);
    }
    for (int j = 0; j < 4; ++j) {  // B block j / 2 (columns 8 (j / 2) + g), r[j % 2]: k 2t + 8 (j % 2) + {0, 1}
      const int n = 8 * (j / 2) + g, k = 2 * t + 8 * (j % 2);
      const uint32_t want = code(k, n) | (code(k + 1, n) << 16);
      expect(o[8 + j] == want, "ldmatrixB16x2: register of a B fragment", l * 4 + j, o[8 + j], want);
      expect(o[12 + j] == want, "ldmatrixB16x2T: register of a B fragment", l * 4 + j, o[12 + j], want);
    }
  }
}

// Rounding as the operands see it.
float roundHalf(float x) { return __half2float(__float2half_rn(x)); }
float roundBf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
float roundTf32(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

enum class Kind { kHalf, kBf16, kTf32 };

void run(Kind kind, int ksteps, bool integers, std::mt19937& rng) {
  const int kTile = kind == Kind::kTf32 ? 8 : 16;
  const int K = kTile * ksteps;
  std::vector<float> A(16 * K), B(K * 8), C(16 * 8), D(16 * 8, NAN);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-4, 4);
  auto draw = [&]() { return integers ? static_cast<float>(small(rng)) : normal(rng); };
  for (auto& x : A) x = draw();
  for (auto& x : B) x = draw();
  for (auto& x : C) x = draw();
  const char* name = kind == Kind::kHalf ? "mma16816<half>" : kind == Kind::kBf16 ? "mma16816<bf16>" : "mma1688tf32";
  if (kind == Kind::kHalf)
    rkcuda::launch(mma16Kernel<__half>, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data(), ksteps);
  if (kind == Kind::kBf16)
    rkcuda::launch(mma16Kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data(), ksteps);
  if (kind == Kind::kTf32)
    rkcuda::launch(mmaTf32Kernel, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data(), ksteps);
  auto rnd = [&](float x) {
    return kind == Kind::kHalf ? roundHalf(x) : kind == Kind::kBf16 ? roundBf16(x) : roundTf32(x);
  };
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double want = C[r * 8 + n], mag = std::fabs(C[r * 8 + n]);
      for (int k = 0; k < K; ++k) {
        const double p = static_cast<double>(rnd(A[r * K + k])) * rnd(B[k * 8 + n]);
        want += p;
        mag += std::fabs(p);
      }
      const double got = D[r * 8 + n];
      const double tol = integers ? 0.0 : 4e-7 * (K + 2) * mag;
      expect(std::fabs(got - want) <= tol, name, r * 8 + n, got, want);
    }
  }
}

void testPacking() {
  const float values[] = {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 1e-3f, 3.14159265f};
  for (float v : values) {
    const uint32_t ph = mma::pack<__half>(v, -v);
    expect(mma::unpackLo<__half>(ph) == roundHalf(v), "pack<half> lo", 0, mma::unpackLo<__half>(ph), roundHalf(v));
    expect(mma::unpackHi<__half>(ph) == roundHalf(-v), "pack<half> hi", 0, mma::unpackHi<__half>(ph), roundHalf(-v));
    const uint32_t pb = mma::pack<__nv_bfloat16>(v, 2 * v);
    expect(mma::unpackLo<__nv_bfloat16>(pb) == roundBf16(v), "pack<bf16> lo", 0, mma::unpackLo<__nv_bfloat16>(pb),
           roundBf16(v));
    expect(mma::unpackHi<__nv_bfloat16>(pb) == roundBf16(2 * v), "pack<bf16> hi", 0, mma::unpackHi<__nv_bfloat16>(pb),
           roundBf16(2 * v));
  }
  // tf32: 1 + 2^-11 rounds up to 1 + 2^-10 (ties away), 1 + 2^-12 rounds down; inf and NaN stay.
  const float tie = 1.0f + std::ldexp(1.0f, -11), below = 1.0f + std::ldexp(1.0f, -12);
  expect(__uint_as_float(mma::toTf32(tie)) == 1.0f + std::ldexp(1.0f, -10), "tf32 tie", 0,
         __uint_as_float(mma::toTf32(tie)), 1.0f + std::ldexp(1.0f, -10));
  expect(__uint_as_float(mma::toTf32(below)) == 1.0f, "tf32 below", 0, __uint_as_float(mma::toTf32(below)), 1.0);
  expect(std::isinf(__uint_as_float(mma::toTf32(INFINITY))), "tf32 inf", 0, __uint_as_float(mma::toTf32(INFINITY)),
         INFINITY);
  expect(std::isnan(__uint_as_float(mma::toTf32(NAN))), "tf32 nan", 0, __uint_as_float(mma::toTf32(NAN)), NAN);
}

// The emulator's device-numerics mode (RK_EMU_DEVICE_NUMERICS=1, numerics.h) changes what it says it
// does, and nothing without it: ex2.approx within 2^-22 (not always exact), its flush of subnormal
// results, 2^0 = 1; and the order of one mma's sums, seen through products whose sum depends on it:
// 2^24 + 1 + 1 - 2^24 is 0 summed in order, 1 summed as (2^24 + 1) + (1 - 2^24).
void testNumericsMode(std::mt19937& rng) {
  const bool device = emu::deviceNumerics();
  std::uniform_real_distribution<float> uni(-20.0f, 20.0f);
  int differ = 0;
  for (int i = 0; i < 1000; ++i) {
    const float x = uni(rng), got = rkcuda::fastExp2(x), exact = exp2f(x);
    if (got != exact) ++differ;
    const double rel = std::fabs(double(got) / double(exact) - 1.0);
    expect(rel <= (device ? 0x1p-22 + 0x1p-23 : 0.0), "fastExp2 error", i, got, exact);
  }
  expect(device ? differ > 100 : differ == 0, "fastExp2 results that differ from exp2f", 0, differ, device ? 100 : 0);
  expect(rkcuda::fastExp2(0.0f) == 1.0f, "fastExp2(0)", 0, rkcuda::fastExp2(0.0f), 1.0);
  expect(rkcuda::fastExp2(-130.0f) == (device ? 0.0f : exp2f(-130.0f)), "fastExp2 of a subnormal result", 0,
         rkcuda::fastExp2(-130.0f), device ? 0.0 : exp2f(-130.0f));
  // Row 0 of A: k = 0, 4, 1, 5 hold 2^24, 1, 1, -2^24 (the order the portable path visits k in);
  // B is all ones, C zero.
  std::vector<float> A(16 * 8, 0.0f), B(8 * 8, 1.0f), C(16 * 8, 0.0f), D(16 * 8, -1.0f);
  A[0] = 0x1p24f;
  A[4] = 1.0f;
  A[1] = 1.0f;
  A[5] = -0x1p24f;
  rkcuda::launch(mmaTf32Kernel, dim3(1), dim3(32), 0, A.data(), B.data(), C.data(), D.data(), 1);
  expect(D[0] == (device ? 1.0f : 0.0f), "mma summation order", 0, D[0], device ? 1.0 : 0.0);
}

}  // namespace

int main() {
  std::mt19937 rng(20261125);
  testPacking();
  testDynamicShared();
  testPackedLoads<__half>("loadA16Packed / loadB16PackedT <half>");
  testPackedLoads<__nv_bfloat16>("loadA16Packed / loadB16PackedT <bf16>");
  testLdmatrix();
  testNumericsMode(rng);
  for (Kind kind : {Kind::kHalf, Kind::kBf16, Kind::kTf32}) {
    for (int ksteps : {1, 2, 5}) {
      run(kind, ksteps, false, rng);
      run(kind, ksteps, true, rng);
    }
  }
  std::printf("mma: %ld checks, %ld failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
