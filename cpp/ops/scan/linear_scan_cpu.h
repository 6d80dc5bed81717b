// CPU linear scan, h_t = a_t * h_{t-1} + b_t, over rows of a [rows, length] array, fp32 state.
//
// One row alone is bound by the latency of its multiply-add chain, and walking many rows side by
// side at a power-of-two stride thrashes the L1 cache. So each thread takes blocks of kTileRows
// rows and walks them in tiles of kTileSteps steps: a tile is copied (and converted to fp32) into a
// small transposed buffer, the kTileRows chains advance together there (one SIMD vector per step),
// and the results are streamed back row by row.
#pragma once
#include <algorithm>
#include <cstdint>

#include "tensor/dtype.h"
#include "common/parallel.h"

#if defined(__SSE__) || defined(_M_X64)
#include <immintrin.h>
#define RK_HAVE_SSE 1
#endif

namespace rk::scan {

constexpr int kTileRows = 8;
constexpr int kTileSteps = 64;
using Tile = float[kTileSteps][kTileRows];

struct LinearScanShape {
  int64_t rows = 0, length = 0;
  bool reverse = false;
};

// Scan index i of a row lives at memory offset pos(i); a tile of scan indices [i0, i0 + n) covers
// the memory offsets [first, first + n).
inline int64_t tileFirst(const LinearScanShape& s, int64_t i0, int n) { return s.reverse ? s.length - i0 - n : i0; }
inline int64_t scanPos(const LinearScanShape& s, int64_t i) { return s.reverse ? s.length - 1 - i : i; }

// Copies n steps of nr rows (row stride `stride`) into tile[step][row], filling absent rows.
// `descending`: the kernel walks memory downwards. Each row's lines are then read from the top
// down as well: reading them upwards would train the hardware prefetcher to fetch the lines above,
// which were already consumed, and halve the useful bandwidth.
template <typename S>
inline void loadTile(const S* src, int64_t stride, int nr, int n, Tile& tile, float fill, bool descending) {
#ifdef RK_HAVE_SSE
  if constexpr (sizeof(S) == 4) {
    if (nr == kTileRows && n == kTileSteps) {
      // fp32 full tile: 4x4 blocks transposed in registers.
      const float* f = reinterpret_cast<const float*>(src);
      for (int r = 0; r < kTileRows; r += 4) {
        for (int k = 0; k < kTileSteps; k += 4) {
          const int j = descending ? kTileSteps - 4 - k : k;
          __m128 x0 = _mm_loadu_ps(f + (r + 0) * stride + j);
          __m128 x1 = _mm_loadu_ps(f + (r + 1) * stride + j);
          __m128 x2 = _mm_loadu_ps(f + (r + 2) * stride + j);
          __m128 x3 = _mm_loadu_ps(f + (r + 3) * stride + j);
          _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
          _mm_storeu_ps(&tile[j + 0][r], x0);
          _mm_storeu_ps(&tile[j + 1][r], x1);
          _mm_storeu_ps(&tile[j + 2][r], x2);
          _mm_storeu_ps(&tile[j + 3][r], x3);
        }
      }
      return;
    }
  }
#endif
  for (int r = 0; r < nr; ++r) {
    const S* row = src + r * stride;
    if (descending) {
      for (int j = n - 1; j >= 0; --j) tile[j][r] = Storage<S>::load(row[j]);
    } else {
      for (int j = 0; j < n; ++j) tile[j][r] = Storage<S>::load(row[j]);
    }
  }
  for (int r = nr; r < kTileRows; ++r)
    for (int j = 0; j < n; ++j) tile[j][r] = fill;
}

// Writes tile[step][row] back to n steps of nr rows. fp32 full tiles use streaming stores: the
// output is not read again soon, and it spares reading each line before writing it.
template <typename S>
inline void storeTile(S* dst, int64_t stride, int nr, int n, const Tile& tile) {
#ifdef RK_HAVE_SSE
  if constexpr (sizeof(S) == 4) {
    bool aligned = true;
    for (int r = 0; r < nr; ++r) aligned = aligned && (reinterpret_cast<uintptr_t>(dst + r * stride) & 15) == 0;
    if (nr == kTileRows && n == kTileSteps && aligned) {
      float* f = reinterpret_cast<float*>(dst);
      for (int r = 0; r < kTileRows; r += 4) {
        for (int j = 0; j < kTileSteps; j += 4) {
          __m128 x0 = _mm_loadu_ps(&tile[j + 0][r]);
          __m128 x1 = _mm_loadu_ps(&tile[j + 1][r]);
          __m128 x2 = _mm_loadu_ps(&tile[j + 2][r]);
          __m128 x3 = _mm_loadu_ps(&tile[j + 3][r]);
          _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
          _mm_stream_ps(f + (r + 0) * stride + j, x0);
          _mm_stream_ps(f + (r + 1) * stride + j, x1);
          _mm_stream_ps(f + (r + 2) * stride + j, x2);
          _mm_stream_ps(f + (r + 3) * stride + j, x3);
        }
      }
      return;
    }
  }
#endif
  for (int r = 0; r < nr; ++r) {
    S* row = dst + r * stride;
    int j = 0;
    for (; j < n; ++j) row[j] = Storage<S>::store(tile[j][r]);
  }
}

inline void storeFence() {
#ifdef RK_HAVE_SSE
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the thread finishes
#endif
}

template <typename S>
void linearScanForwardBlock(const S* a, const S* b, const float* h0, S* h, float* finalState, int64_t r0, int nr,
                            const LinearScanShape& s) {
  alignas(64) Tile A, B;
  float st[kTileRows];
  for (int r = 0; r < kTileRows; ++r) st[r] = (r < nr && h0) ? h0[r0 + r] : 0.0f;
  const int64_t L = s.length;
  for (int64_t i0 = 0; i0 < L; i0 += kTileSteps) {
    const int n = int(std::min<int64_t>(kTileSteps, L - i0));
    const int64_t off = r0 * L + tileFirst(s, i0, n);
    loadTile(a + off, L, nr, n, A, 1.0f, s.reverse);
    loadTile(b + off, L, nr, n, B, 0.0f, s.reverse);
    for (int k = 0; k < n; ++k) {
      const int j = s.reverse ? n - 1 - k : k;
      for (int r = 0; r < kTileRows; ++r) {
        st[r] = A[j][r] * st[r] + B[j][r];
        A[j][r] = st[r];
      }
    }
    storeTile(h + off, L, nr, n, A);
  }
  if (finalState)
    for (int r = 0; r < nr; ++r) finalState[r0 + r] = st[r];
}

// Backward. In scan order: g_i = gh_i + a_{i+1} g_{i+1}, g_last = gh_last + gFinal;
// gb_i = g_i, ga_i = g_i * h_{i-1} (h_{-1} = h0), gh0 = a_0 g_0.
template <typename S>
void linearScanBackwardBlock(const S* a, const S* h, const float* h0, const S* gh, const float* gFinal, S* ga, S* gb,
                             float* gh0, int64_t r0, int nr, const LinearScanShape& s) {
  alignas(64) Tile A, H, G;
  float carry[kTileRows], hprev[kTileRows];
  for (int r = 0; r < kTileRows; ++r) carry[r] = (r < nr && gFinal) ? gFinal[r0 + r] : 0.0f;
  const int64_t L = s.length;
  const int64_t tiles = (L + kTileSteps - 1) / kTileSteps;
  for (int64_t ti = tiles - 1; ti >= 0; --ti) {
    const int64_t i0 = ti * kTileSteps;
    const int n = int(std::min<int64_t>(kTileSteps, L - i0));
    const int64_t off = r0 * L + tileFirst(s, i0, n);
    const bool down = !s.reverse;  // the backward pass walks opposite to the forward scan
    loadTile(a + off, L, nr, n, A, 0.0f, down);
    loadTile(h + off, L, nr, n, H, 0.0f, down);
    if (gh) loadTile(gh + off, L, nr, n, G, 0.0f, down);
    else std::fill(&G[0][0], &G[0][0] + kTileSteps * kTileRows, 0.0f);
    // The state before this tile: the last h of the previous tile in scan order, or h0.
    for (int r = 0; r < kTileRows; ++r) {
      if (r >= nr) hprev[r] = 0.0f;
      else if (i0 > 0) hprev[r] = Storage<S>::load(h[(r0 + r) * L + scanPos(s, i0 - 1)]);
      else hprev[r] = h0 ? h0[r0 + r] : 0.0f;
    }
    for (int k = n - 1; k >= 0; --k) {
      const int j = s.reverse ? n - 1 - k : k;
      const int jp = s.reverse ? j + 1 : j - 1;  // scan index k - 1, valid when k > 0
      for (int r = 0; r < kTileRows; ++r) {
        const float g = carry[r] + G[j][r];
        const float hp = k > 0 ? H[jp][r] : hprev[r];
        carry[r] = A[j][r] * g;
        G[j][r] = g;        // gb
        H[j][r] = g * hp;   // ga (H[j] is not read again: later steps read H at smaller scan indices)
      }
    }
    storeTile(gb + off, L, nr, n, G);
    storeTile(ga + off, L, nr, n, H);
  }
  if (gh0)
    for (int r = 0; r < nr; ++r) gh0[r0 + r] = carry[r];
}

template <typename Fn>
void forEachRowBlock(const LinearScanShape& s, Fn&& fn) {
  const int64_t blocks = (s.rows + kTileRows - 1) / kTileRows;
  // Aim for at least ~64K elements per thread before splitting.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, s.length * kTileRows));
  parallelFor(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kTileRows;
      fn(r0, int(std::min<int64_t>(kTileRows, s.rows - r0)));
    }
    storeFence();
  });
}

template <typename S>
void linearScanForward(const S* a, const S* b, const float* h0, S* h, float* finalState, const LinearScanShape& s) {
  forEachRowBlock(s, [&](int64_t r0, int nr) { linearScanForwardBlock(a, b, h0, h, finalState, r0, nr, s); });
}

template <typename S>
void linearScanBackward(const S* a, const S* h, const float* h0, const S* gh, const float* gFinal, S* ga, S* gb,
                        float* gh0, const LinearScanShape& s) {
  forEachRowBlock(s, [&](int64_t r0, int nr) {
    linearScanBackwardBlock(a, h, h0, gh, gFinal, ga, gb, gh0, r0, nr, s);
  });
}

}  // namespace rk::scan
