// The decode step of the selective scan (Mamba-1; selectiveStateUpdate, declared in
// scan/selective_scan.h): T tokens of every channel through the recurrence from a given fp32 state,
// for F32/F16/BF16 storage with fp32 arithmetic. The states of a channel are spread over a group of
// lanes (P per lane, coalesced over n); the state stays in registers across the tokens and y is a
// shuffle sum over the group.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "common/api.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/scan.cuh"
#include "scan/selective_scan.h"

namespace rkcuda {
namespace {

// The call's arguments, plus how many lanes share a channel (a power of two; the channel's states
// are spread over them).
struct DecodeParams : SelectiveStateUpdateArgs {
  int lanesPerChannel = 32;
};

constexpr int kDecodeThreads = 128;

// Lane i of a channel's group holds the states n = i + j * lanesPerChannel, j < P.
template <class T, int P>
__global__ void __launch_bounds__(kDecodeThreads) selectiveStateUpdateKernel(const DecodeParams p) {
  const int lpc = p.lanesPerChannel;
  const int lane = scan::laneId();
  const int sub = lane & (lpc - 1);
  const int64_t channelsPerWarp = 32 / lpc;
  const int64_t warpGlobal = static_cast<int64_t>(blockIdx.x) * (kDecodeThreads / 32) + (threadIdx.x >> 5);
  const int64_t channel = warpGlobal * channelsPerWarp + lane / lpc;
  const bool active = channel < p.batch * p.dim;
  const int64_t ch = active ? channel : 0;
  const int64_t b = ch / p.dim, d = ch - b * p.dim;
  const int64_t g = d / (p.dim / p.groups);
  const int N = static_cast<int>(p.dstate);
  const int64_t tokens = p.tokens;

  float* stateRow = p.state + ch * N;
  float x[P], A2[P];
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const int n = sub + j * lpc;
    x[j] = active && n < N ? stateRow[n] : 0.0f;  // an idle lane must not read a state that another updates
    A2[j] = n < N ? __ldg(p.A + d * N + n) * kLog2e : 0.0f;
  }
  const float bias = p.deltaBias != nullptr ? p.deltaBias[d] : 0.0f;
  const float Dd = p.D != nullptr ? p.D[d] : 0.0f;
  const T* xRow = static_cast<const T*>(p.x) + ch * tokens;
  const T* deltaRow = static_cast<const T*>(p.delta) + ch * tokens;
  const T* zRow = p.z != nullptr ? static_cast<const T*>(p.z) + ch * tokens : nullptr;
  T* yRow = static_cast<T*>(p.y) + ch * tokens;
  const T* BRow = static_cast<const T*>(p.B) + (b * p.groups + g) * N * tokens;  // + n * tokens + t
  const T* CRow = static_cast<const T*>(p.C) + (b * p.groups + g) * N * tokens;

  for (int64_t t = 0; t < tokens; ++t) {
    const float u = loadScalar(xRow + t);
    const float pre = loadScalar(deltaRow + t) + bias;
    const float dt = p.deltaSoftplus ? softplus(pre) : pre;
    const float dtu = dt * u;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int n = sub + j * lpc;
      if (n < N) {
        const float a = fastExp2(dt * A2[j]);
        x[j] = fmaf(a, x[j], dtu * loadScalar(BRow + n * tokens + t));
        acc = fmaf(loadScalar(CRow + n * tokens + t), x[j], acc);
        if (p.intermediate != nullptr && active) p.intermediate[((b * tokens + t) * p.dim + d) * N + n] = x[j];
      }
    }
    for (int m = lpc / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(scan::kFullMask, acc, m);
    if (active && sub == 0) {
      float yv = fmaf(Dd, u, acc);
      if (zRow != nullptr) yv *= silu(loadScalar(zRow + t));
      storeScalar(yRow + t, yv);
    }
  }
  if (active && p.updateState) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int n = sub + j * lpc;
      if (n < N) stateRow[n] = x[j];
    }
  }
}

}  // namespace

Status selectiveStateUpdate(const SelectiveStateUpdateArgs& a) {
  auto bad = [](const std::string& what) { return statusError("selectiveStateUpdate: " + what); };
  if (a.dt != DType::F32 && a.dt != DType::F16 && a.dt != DType::BF16) return bad("unknown dtype");
  if (a.batch < 0 || a.dim < 0 || a.tokens < 0) return bad("negative size");
  if (a.dstate < 1 || a.dstate > kSelectiveScanMaxDstate) return bad("dstate must be in 1..256");
  if (a.groups < 1 || a.dim % a.groups != 0) return bad("dim must be a positive multiple of groups");
  if (a.batch == 0 || a.dim == 0 || a.tokens == 0) return Status{};
  if (a.state == nullptr || a.x == nullptr || a.delta == nullptr || a.A == nullptr || a.B == nullptr ||
      a.C == nullptr || a.y == nullptr) {
    return bad("null tensor");
  }
  // States per lane: the fewest that fit a channel in one warp.
  int chosen = 1;
  while (chosen * 32 < a.dstate) chosen *= 2;
  const int perLane = tunable("selectiveStateUpdate.statesPerLane", chosen);
  if ((perLane != 1 && perLane != 2 && perLane != 4 && perLane != 8) || perLane * 32 < a.dstate) {
    return bad("unsupported states per lane " + std::to_string(perLane));
  }
  DecodeParams p;
  static_cast<SelectiveStateUpdateArgs&>(p) = a;
  int lanes = 1;
  while (lanes * perLane < a.dstate) lanes *= 2;
  p.lanesPerChannel = lanes;
  const int64_t channelsPerBlock = (kDecodeThreads / 32) * (32 / lanes);
  const int64_t blocks = ceilDiv(a.batch * a.dim, channelsPerBlock);
  if (blocks > INT_MAX) return bad("too many channels for one launch");
  return dispatchDType(a.dt, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    const unsigned grid = static_cast<unsigned>(blocks);
    switch (perLane) {
      case 1:
        return launch(selectiveStateUpdateKernel<T, 1>, grid, kDecodeThreads, 0, p);
      case 2:
        return launch(selectiveStateUpdateKernel<T, 2>, grid, kDecodeThreads, 0, p);
      case 4:
        return launch(selectiveStateUpdateKernel<T, 4>, grid, kDecodeThreads, 0, p);
      default:
        return launch(selectiveStateUpdateKernel<T, 8>, grid, kDecodeThreads, 0, p);
    }
  });
}

}  // namespace rkcuda
