// The inline PTX of cuda/common on a real GPU, checked exactly: the first step of
// `npm run gpu:verify` (scripts/gpu-verify.mjs compiles this with nvcc for the GPU at hand and runs
// it). The CPU emulator runs the portable form of each of these; this runs the device form.
//   * mma16816 (__half, __nv_bfloat16) and mma1688tf32 through the fragment loaders, with small
//     integer operands: every product and sum is exact, so D must equal the integer product;
//   * ldmatrix (plain and .trans, through ldmatrixA16 / ldmatrixA16T / ldmatrixB16x2 / ldmatrixB16x2T)
//     from padded shared-memory tiles of distinct 16-bit codes: every register equals the mma
//     fragment layout of mma.cuh (the CPU emulator's mma test checks its portable form the same way);
//   * copyAsync16 (cp.async) with source sizes 0, 6 and 16: the bytes past the source size are zero;
//   * groupBarrier across co-resident blocks of a cooperative launch: every block sees every other
//     block's writes of the round before;
//   * atomicAddFloat4: many threads add integer-valued vectors; the sums are exact.
// Prints "ptx smoke: N checks, M failures" and exits 1 on a failure; exits 2 without a usable GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "common/async_copy.cuh"
#include "common/group_sync.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"

namespace {

long checks = 0, failures = 0;
void check(bool ok, const char* what, double got = 0, double want = 0) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
}

#define CUDA_OK(expr)                                                                              \
  do {                                                                                             \
    const cudaError_t e = (expr);                                                                  \
    if (e != cudaSuccess) {                                                                        \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e), __FILE__, __LINE__, #expr); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

// ---- mma: one warp, D (16 x 8) = A (16 x K) * B (K x 8), row-major fp32 inputs ----

template <class T> __global__ void mma16Kernel(const float* A, const float* B, float* D) {
  using namespace rkcuda::mma;
  FragC c;
  c.zero();
  const FragA16 a = loadA16<T>([&](int r, int k) { return A[r * 16 + k]; });
  const FragB16 b = loadB16<T>([&](int k, int n) { return B[k * 8 + n]; });
  mma16816<T>(c, a, b);
  storeC(c, [&](int r, int n, float v) { D[r * 8 + n] = v; });
}

__global__ void mmaTf32Kernel(const float* A, const float* B, float* D) {
  using namespace rkcuda::mma;
  FragC c;
  c.zero();
  const FragATf32 a = loadATf32([&](int r, int k) { return A[r * 8 + k]; });
  const FragBTf32 b = loadBTf32([&](int k, int n) { return B[k * 8 + n]; });
  mma1688tf32(c, a, b);
  storeC(c, [&](int r, int n, float v) { D[r * 8 + n] = v; });
}

template <class Launch> void checkMma(const char* what, int K, Launch launch) {
  std::vector<float> A(16 * K), B(K * 8), D(16 * 8, -1.0f);
  for (int i = 0; i < 16 * K; ++i) A[i] = static_cast<float>((i * 7 + 3) % 17 - 8);
  for (int i = 0; i < K * 8; ++i) B[i] = static_cast<float>((i * 5 + 1) % 13 - 6);
  float *dA, *dB, *dD;
  CUDA_OK(cudaMalloc(&dA, A.size() * 4));
  CUDA_OK(cudaMalloc(&dB, B.size() * 4));
  CUDA_OK(cudaMalloc(&dD, D.size() * 4));
  CUDA_OK(cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice));
  launch(dA, dB, dD);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      double want = 0;
      for (int k = 0; k < K; ++k) want += static_cast<double>(A[r * K + k]) * B[k * 8 + n];
      if (D[r * 8 + n] != want) ++bad;
    }
  }
  check(bad == 0, what, bad, 0);
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dD);
}

// ---- cp.async: 16-byte copies of srcBytes (0, 6, 16) into shared memory, then back out ----

__global__ void copyAsyncKernel(const unsigned char* src, unsigned char* out) {
  __shared__ __align__(16) unsigned char tile[3][16];
  const int sizes[3] = {0, 6, 16};
  if (threadIdx.x < 3) rkcuda::copyAsync16(tile[threadIdx.x], src + 16 * threadIdx.x, sizes[threadIdx.x]);
  rkcuda::waitAsyncCopies();
  __syncthreads();
  if (threadIdx.x < 48) out[threadIdx.x] = tile[threadIdx.x / 16][threadIdx.x % 16];
}

void checkCopyAsync() {
  std::vector<unsigned char> src(48), out(48, 0xAA);
  for (int i = 0; i < 48; ++i) src[i] = static_cast<unsigned char>(i + 1);
  unsigned char *dSrc, *dOut;
  CUDA_OK(cudaMalloc(&dSrc, 48));
  CUDA_OK(cudaMalloc(&dOut, 48));
  CUDA_OK(cudaMemcpy(dSrc, src.data(), 48, cudaMemcpyHostToDevice));
  copyAsyncKernel<<<1, 64>>>(dSrc, dOut);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaMemcpy(out.data(), dOut, 48, cudaMemcpyDeviceToHost));
  const int sizes[3] = {0, 6, 16};
  int bad = 0;
  for (int c = 0; c < 3; ++c) {
    for (int b = 0; b < 16; ++b) {
      const unsigned char want = b < sizes[c] ? src[16 * c + b] : 0;
      if (out[16 * c + b] != want) ++bad;
    }
  }
  check(bad == 0, "cp.async with source sizes 0, 6, 16", bad, 0);
  cudaFree(dSrc);
  cudaFree(dOut);
}

// ---- ldmatrix: element (r, c) of each 16 x 16 matrix holds the code r * 16 + c + 1 ----

constexpr int kLd = 24;  // padded rows of 48 bytes
__global__ void ldmatrixKernel(uint32_t* out) {
  using namespace rkcuda::mma;
  __shared__ alignas(16) uint16_t sA[16 * kLd], sAt[16 * kLd], sB[16 * kLd], sBt[16 * kLd];
  for (int e = static_cast<int>(threadIdx.x); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    const uint16_t code = static_cast<uint16_t>(e + 1);
    sA[r * kLd + c] = code, sAt[c * kLd + r] = code, sB[r * kLd + c] = code, sBt[c * kLd + r] = code;
  }
  __syncthreads();
  const FragA16 a = ldmatrixA16(reinterpret_cast<const __half*>(sA), kLd);
  const FragA16 at = ldmatrixA16T(reinterpret_cast<const __half*>(sAt), kLd);
  FragB16 b0, b1, bt0, bt1;
  ldmatrixB16x2(reinterpret_cast<const __half*>(sB), kLd, b0, b1);
  ldmatrixB16x2T(reinterpret_cast<const __half*>(sBt), kLd, bt0, bt1);
  uint32_t* o = out + lane() * 16;
  for (int i = 0; i < 4; ++i) o[i] = a.r[i], o[4 + i] = at.r[i];
  o[8] = b0.r[0], o[9] = b0.r[1], o[10] = b1.r[0], o[11] = b1.r[1];
  o[12] = bt0.r[0], o[13] = bt0.r[1], o[14] = bt1.r[0], o[15] = bt1.r[1];
}

void checkLdmatrix() {
  uint32_t* dOut;
  CUDA_OK(cudaMalloc(&dOut, 32 * 16 * sizeof(uint32_t)));
  ldmatrixKernel<<<1, 32>>>(dOut);
  CUDA_OK(cudaGetLastError());
  std::vector<uint32_t> out(32 * 16);
  CUDA_OK(cudaMemcpy(out.data(), dOut, out.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost));
  auto code = [](int r, int c) { return static_cast<uint32_t>(r * 16 + c + 1); };
  int badA = 0, badAt = 0, badB = 0, badBt = 0;
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* o = out.data() + l * 16;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      const uint32_t want = code(row, col) | (code(row, col + 1) << 16);
      badA += o[i] != want, badAt += o[4 + i] != want;
    }
    for (int j = 0; j < 4; ++j) {
      const int n = 8 * (j / 2) + g, k = 2 * t + 8 * (j % 2);
      const uint32_t want = code(k, n) | (code(k + 1, n) << 16);
      badB += o[8 + j] != want, badBt += o[12 + j] != want;
    }
  }
  check(badA == 0, "ldmatrix: A fragment registers", badA, 0);
  check(badAt == 0, "ldmatrix.trans: A fragment registers (A stored transposed)", badAt, 0);
  check(badB == 0, "ldmatrix.trans: B fragment registers (B row-major)", badB, 0);
  check(badBt == 0, "ldmatrix: B fragment registers (B stored transposed)", badBt, 0);
  cudaFree(dOut);
}

// ---- groupBarrier: rounds of writes and reads across the blocks of a cooperative launch ----

__global__ void groupBarrierKernel(float* slots, int* errors, unsigned* counter, int rounds) {
  unsigned passed = 0;
  const unsigned blocks = gridDim.x;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) slots[(r & 1) * blocks + blockIdx.x] = static_cast<float>(r * 1000 + blockIdx.x);
    rkcuda::groupBarrier(counter, blocks, &passed);
    for (unsigned b = threadIdx.x; b < blocks; b += blockDim.x) {
      const float v = __ldcg(&slots[(r & 1) * blocks + b]);
      if (v != static_cast<float>(r * 1000 + b)) atomicAdd(errors, 1);
    }
    rkcuda::groupBarrier(counter, blocks, &passed);
  }
}

void checkGroupBarrier() {
  int dev = 0, sms = 0, perSm = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CUDA_OK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, groupBarrierKernel, 128, 0));
  unsigned blocks = static_cast<unsigned>(sms * (perSm < 2 ? perSm : 2));
  float* slots;
  int* errors;
  unsigned* counter;
  CUDA_OK(cudaMalloc(&slots, 2 * blocks * sizeof(float)));
  CUDA_OK(cudaMalloc(&errors, sizeof(int)));
  CUDA_OK(cudaMalloc(&counter, sizeof(unsigned)));
  CUDA_OK(cudaMemset(errors, 0, sizeof(int)));
  CUDA_OK(cudaMemset(counter, 0, sizeof(unsigned)));
  int rounds = 200;
  void* args[] = {&slots, &errors, &counter, &rounds};
  CUDA_OK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(groupBarrierKernel), blocks, 128, args, 0, 0));
  CUDA_OK(cudaDeviceSynchronize());
  int bad = -1;
  CUDA_OK(cudaMemcpy(&bad, errors, sizeof(int), cudaMemcpyDeviceToHost));
  check(bad == 0, "groupBarrier: stale reads across blocks", bad, 0);
  cudaFree(slots);
  cudaFree(errors);
  cudaFree(counter);
}

// ---- atomicAddFloat4 ----

__global__ void atomicAddFloat4Kernel(float* sums) {
  const int v = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  rkcuda::atomicAddFloat4(sums + 4 * (v % 8), make_float4(1.0f, static_cast<float>(v % 3), 2.0f, -1.0f));
}

void checkAtomicAddFloat4() {
  float* sums;
  CUDA_OK(cudaMalloc(&sums, 32 * sizeof(float)));
  CUDA_OK(cudaMemset(sums, 0, 32 * sizeof(float)));
  const int blocks = 64, threads = 256, n = blocks * threads;
  atomicAddFloat4Kernel<<<blocks, threads>>>(sums);
  CUDA_OK(cudaGetLastError());
  std::vector<float> got(32);
  CUDA_OK(cudaMemcpy(got.data(), sums, 32 * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<double> want(32, 0.0);
  for (int v = 0; v < n; ++v) {
    want[4 * (v % 8)] += 1, want[4 * (v % 8) + 1] += v % 3, want[4 * (v % 8) + 2] += 2, want[4 * (v % 8) + 3] -= 1;
  }
  int bad = 0;
  for (int i = 0; i < 32; ++i) bad += got[i] != want[i];
  check(bad == 0, "atomicAddFloat4 sums", bad, 0);
  cudaFree(sums);
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("ptx smoke: no usable CUDA device\n");
    return 2;
  }
  cudaDeviceProp p;
  CUDA_OK(cudaGetDeviceProperties(&p, 0));
  std::printf("ptx smoke on %s (compute capability %d.%d)\n", p.name, p.major, p.minor);
  checkMma("mma16816 __half, integer operands", 16,
           [](const float* A, const float* B, float* D) { mma16Kernel<__half><<<1, 32>>>(A, B, D); });
  checkMma("mma16816 __nv_bfloat16, integer operands", 16,
           [](const float* A, const float* B, float* D) { mma16Kernel<__nv_bfloat16><<<1, 32>>>(A, B, D); });
  checkMma("mma1688tf32, integer operands", 8,
           [](const float* A, const float* B, float* D) { mmaTf32Kernel<<<1, 32>>>(A, B, D); });
  checkLdmatrix();
  checkCopyAsync();
  checkGroupBarrier();
  checkAtomicAddFloat4();
  std::printf("ptx smoke: %ld checks, %ld failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
