// CPU linear scan, h_t = a_t * h_{t-1} + b_t, over rows of a [rows, length] array. Each thread
// takes a range of rows and advances kRows of them together so that the kRows dependency chains
// overlap (one row alone is bound by the latency of its multiply-add chain). fp32 state always.
#pragma once
#include <cstdint>

#include "tensor/dtype.h"
#include "tensor/parallel.h"

namespace rk::scan {

struct LinearScanShape {
  int64_t rows = 0, length = 0;
  bool reverse = false;
};

template <typename S, int R>
void linearScanForwardRows(const S* a, const S* b, const float* h0, S* h, float* finalState, int64_t r0,
                           const LinearScanShape& s) {
  const int64_t L = s.length;
  float st[R];
  const S* ar[R];
  const S* br[R];
  S* hr[R];
  for (int r = 0; r < R; ++r) {
    st[r] = h0 ? h0[r0 + r] : 0.0f;
    ar[r] = a + (r0 + r) * L;
    br[r] = b + (r0 + r) * L;
    hr[r] = h + (r0 + r) * L;
  }
  const int64_t step = s.reverse ? -1 : 1;
  int64_t t = s.reverse ? L - 1 : 0;
  for (int64_t i = 0; i < L; ++i, t += step) {
    for (int r = 0; r < R; ++r) {
      st[r] = Storage<S>::load(ar[r][t]) * st[r] + Storage<S>::load(br[r][t]);
      hr[r][t] = Storage<S>::store(st[r]);
    }
  }
  if (finalState)
    for (int r = 0; r < R; ++r) finalState[r0 + r] = st[r];
}

// Backward. In scan order i (position t(i)): g_i = gh_i + a_{i+1} g_{i+1}, g_last = gh_last + gFinal;
// gb_i = g_i, ga_i = g_i * h_{i-1} (h_{-1} = h0), gh0 = a_0 g_0.
template <typename S, int R>
void linearScanBackwardRows(const S* a, const S* h, const float* h0, const S* gh, const float* gFinal, S* ga,
                            S* gb, float* gh0, int64_t r0, const LinearScanShape& s) {
  const int64_t L = s.length;
  float carry[R];
  const S* ar[R];
  const S* hr[R];
  const S* ghr[R];
  S* gar[R];
  S* gbr[R];
  for (int r = 0; r < R; ++r) {
    carry[r] = gFinal ? gFinal[r0 + r] : 0.0f;
    ar[r] = a + (r0 + r) * L;
    hr[r] = h + (r0 + r) * L;
    ghr[r] = gh ? gh + (r0 + r) * L : nullptr;
    gar[r] = ga + (r0 + r) * L;
    gbr[r] = gb + (r0 + r) * L;
  }
  const int64_t step = s.reverse ? 1 : -1;  // walks scan order backwards
  int64_t t = s.reverse ? 0 : L - 1;
  for (int64_t i = L - 1; i >= 0; --i, t += step) {
    for (int r = 0; r < R; ++r) {
      float g = carry[r] + (gh ? Storage<S>::load(ghr[r][t]) : 0.0f);
      float hprev = i > 0 ? Storage<S>::load(hr[r][t + step]) : (h0 ? h0[r0 + r] : 0.0f);
      gbr[r][t] = Storage<S>::store(g);
      gar[r][t] = Storage<S>::store(g * hprev);
      carry[r] = Storage<S>::load(ar[r][t]) * g;
    }
  }
  if (gh0)
    for (int r = 0; r < R; ++r) gh0[r0 + r] = carry[r];
}

constexpr int kRows = 8;

template <typename S>
void linearScanForward(const S* a, const S* b, const float* h0, S* h, float* finalState, const LinearScanShape& s) {
  int64_t blocks = (s.rows + kRows - 1) / kRows;
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, s.length * kRows));
  parallelFor(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t r0 = blk * kRows;
      if (r0 + kRows <= s.rows) {
        linearScanForwardRows<S, kRows>(a, b, h0, h, finalState, r0, s);
      } else {
        for (int64_t r = r0; r < s.rows; ++r) linearScanForwardRows<S, 1>(a, b, h0, h, finalState, r, s);
      }
    }
  });
}

template <typename S>
void linearScanBackward(const S* a, const S* h, const float* h0, const S* gh, const float* gFinal, S* ga, S* gb,
                        float* gh0, const LinearScanShape& s) {
  int64_t blocks = (s.rows + kRows - 1) / kRows;
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, s.length * kRows));
  parallelFor(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t r0 = blk * kRows;
      if (r0 + kRows <= s.rows) {
        linearScanBackwardRows<S, kRows>(a, h, h0, gh, gFinal, ga, gb, gh0, r0, s);
      } else {
        for (int64_t r = r0; r < s.rows; ++r)
          linearScanBackwardRows<S, 1>(a, h, h0, gh, gFinal, ga, gb, gh0, r, s);
      }
    }
  });
}

}  // namespace rk::scan
