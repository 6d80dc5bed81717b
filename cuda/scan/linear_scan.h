// Linear scan: the interface of cuda/scan/linear_scan.cu.
// The contract between cpp/ (the CPU kernels and the binding) and cuda/ (the CUDA launchers).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/api.h"

namespace rkcuda {

// ---- linear scan (cuda/scan/linear_scan.cu) ----
// rows independent sequences of `length` elements each, row-major contiguous [rows, length].
// Forward:  h_t = a_t * h_{t-1} + b_t  (t ascending; descending when reverse), h_{-1} = h0[row]
//           (0 when h0 is null). h has the dtype of a and b; finalState (nullable) is fp32 [rows].
// Outputs must not overlap the [rows, length] inputs; h0 and finalState may be the same buffer
// (likewise gFinal and gh0 below). Fastest when length is a multiple of 16 bytes' worth of
// elements and the tensors are 16-byte aligned (otherwise a per-element path is used).
// Asynchronous on the default stream, like every kernel launch here.
Status linearScanForward(DType dt, const void* a, const void* b, const float* h0, void* h, float* finalState,
                         int64_t rows, int64_t length, bool reverse);
// Backward of the above; "first", "last" and "t+1" are in scan order (t descending when
// reverse). gh (nullable: treated as zeros) is dL/dh, gFinal (nullable) dL/dfinalState.
// With g_t = dL/dh_t in total (g_last = gh_last + gFinal, g_t = gh_t + a_{t+1} g_{t+1}):
//   gb_t = g_t,  ga_t = g_t * h_{t-1},  gh0 = a_first * g_first (nullable output).
// h is the forward output, h0 the forward initial state (nullable). ga, gb have dtype dt.
Status linearScanBackward(DType dt, const void* a, const void* h, const float* h0, const void* gh, const float* gFinal,
                          void* ga, void* gb, float* gh0, int64_t rows, int64_t length, bool reverse);

}  // namespace rkcuda
