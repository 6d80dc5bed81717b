// Plain C++ interface between cpp/ (N-API, compiled by the host compiler) and cuda/ (compiled by
// nvcc). Nothing here names a CUDA type, so cpp/ builds without the CUDA headers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace rkcuda {

// Element type of a tensor's storage. State and accumulation are always fp32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Result of every call into cuda/. code 0 means success; otherwise message holds the CUDA error
// string and outOfMemory tells the caller to raise ERR_OUT_OF_MEMORY instead of ERR_CUDA.
struct Status {
  int code = 0;
  bool outOfMemory = false;
  std::string message;
  bool ok() const { return code == 0; }
};

// ---- runtime (cuda/common/runtime.cu) ----
// Whether a usable device exists; when not, reason says why (no driver, no device, driver too old).
bool available(std::string* reason);
struct DeviceProps {
  std::string name;
  int major = 0, minor = 0;
  int multiProcessorCount = 0;
  size_t totalGlobalMem = 0;
  size_t l2CacheSize = 0;
  size_t sharedMemPerBlockOptin = 0;
  int memoryBusWidth = 0;       // bits
  int memoryClockRateKHz = 0;
  int driverVersion = 0, runtimeVersion = 0;
};
Status deviceProperties(DeviceProps* out);
Status deviceMalloc(void** ptr, size_t bytes);   // stream-ordered on the default stream
Status deviceFree(void* ptr);                    // stream-ordered on the default stream
Status copyHostToDevice(void* dst, const void* src, size_t bytes);
Status copyDeviceToHost(void* dst, const void* src, size_t bytes);  // synchronises
Status copyDeviceToDevice(void* dst, const void* src, size_t bytes);
Status synchronize();
// Convert n elements between dtypes on the device (either side may be F32/F16/BF16).
Status convert(DType from, const void* src, DType to, void* dst, int64_t n);
// Event timing for benchmarks: elapsed milliseconds of fn's launches, measured with CUDA events.
Status eventRecordStart(void** ev);
Status eventElapsedMs(void* startEv, float* ms);  // records a stop event, synchronises, destroys

// ---- linear scan (cuda/scan/linear_scan.cu) ----
// rows independent sequences of `length` elements each, row-major contiguous [rows, length].
// Forward:  h_t = a_t * h_{t-1} + b_t  (t ascending; descending when reverse), h_{-1} = h0[row]
//           (0 when h0 is null). h has the dtype of a and b; finalState (nullable) is fp32 [rows].
// Outputs must not overlap the [rows, length] inputs; h0 and finalState may be the same buffer
// (likewise gFinal and gh0 below). Fastest when length is a multiple of 16 bytes' worth of
// elements and the tensors are 16-byte aligned (otherwise a per-element path is used).
// Asynchronous on the default stream, like every kernel launch here.
Status linearScanForward(DType dt, const void* a, const void* b, const float* h0, void* h,
                         float* finalState, int64_t rows, int64_t length, bool reverse);
// Backward of the above; "first", "last" and "t+1" are in scan order (t descending when
// reverse). gh (nullable: treated as zeros) is dL/dh, gFinal (nullable) dL/dfinalState.
// With g_t = dL/dh_t in total (g_last = gh_last + gFinal, g_t = gh_t + a_{t+1} g_{t+1}):
//   gb_t = g_t,  ga_t = g_t * h_{t-1},  gh0 = a_first * g_first (nullable output).
// h is the forward output, h0 the forward initial state (nullable). ga, gb have dtype dt.
Status linearScanBackward(DType dt, const void* a, const void* h, const float* h0, const void* gh,
                          const float* gFinal, void* ga, void* gb, float* gh0, int64_t rows,
                          int64_t length, bool reverse);

// ---- selective scan, Mamba-1 (cuda/scan/selective_scan.cu) ----
// Per channel d of dim and state n of dstate, over the positions t of one sequence:
//   dt_t    = delta_t + deltaBias[d]                      (deltaBias nullable: 0)
//   dt_t    = dt_t <= 20 ? log1p(exp(dt_t)) : dt_t         (only when deltaSoftplus)
//   x_t[n]  = exp(dt_t * A[d,n]) * x_{t-1}[n] + dt_t * B_t[n] * u_t,   x_{-1} = h0 (nullable: 0)
//   y_t     = (sum_n x_t[n] * C_t[n] + D[d] * u_t) * (z ? z_t * sigmoid(z_t) : 1)   (D nullable: 0)
// u, delta, z, y are [batch, dim, seqlen] of dtype dt. A is fp32 [dim, dstate]. B (likewise C) is
// either constant, fp32 [dim, dstate], or variable, dtype dt [batch, groups, dstate, seqlen], where
// channel d reads group d / (dim / groups). D and deltaBias are fp32 [dim]; states are fp32.
//
// Sequences. segments[s] (a host array of nseq entries) says where sequence s lives: row `batch`
// of the tensors, positions [start, start + length). Without packing, nseq == batch and segment s
// is (s, 0, seqlen). Packed (varlen) input has batch == 1 and one segment per sequence, in order,
// not overlapping; length may be 0. The state restarts at each segment (from h0[s]); positions in no
// segment get y = 0 and zero gradients. h0 and finalState are fp32 [nseq, dim, dstate].
//
// Checkpoints. The forward pass saves, for every segment s, channel d and chunk c of `chunk` steps
// (c < nChunks(s) = ceil(length / chunk)), the state entering that chunk (x_{start + c*chunk - 1},
// which is h0 or 0 for c = 0) at
//   states[((chunkOffset * dim + d * nChunks(s) + c) * dstate + n]
// where chunkOffset = sum of nChunks over the segments before s; states has
// sum_s nChunks(s) * dim * dstate floats. The backward pass recomputes each chunk from there.
struct ScanSegment {
  int64_t batch = 0, start = 0, length = 0, chunkOffset = 0;
};
struct SelectiveScanArgs {
  DType dt = DType::F32;
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 1;
  bool variableB = false, variableC = false, deltaSoftplus = false;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;                    // segments came from cuSeqlens (else the uniform layout)
  int64_t chunk = 0;                      // must equal selectiveScanChunk() for the CUDA calls
  int64_t totalChunks = 0;
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;          // nullable
  const void* z = nullptr;           // nullable
  const float* deltaBias = nullptr;  // nullable
  const float* h0 = nullptr;         // nullable
};
// Checkpoint spacing (steps) used by the CUDA kernels.
int64_t selectiveScanChunk();
// Writes y (every element), states (every element) and finalState (nullable, [nseq, dim, dstate]).
Status selectiveScanForward(const SelectiveScanArgs& a, void* y, float* states, float* finalState);
struct SelectiveScanGrads {
  const void* dy = nullptr;        // nullable (zeros), dtype dt, [batch, dim, seqlen]
  const float* dFinal = nullptr;   // nullable (zeros), [nseq, dim, dstate]
  const float* states = nullptr;   // the forward pass's checkpoints
  // Outputs, each written entirely (zeros where nothing flows). du, ddelta, dz have dtype dt.
  void* du = nullptr;
  void* ddelta = nullptr;
  float* dA = nullptr;             // [dim, dstate]
  void* dB = nullptr;              // like B: variable -> dtype dt [batch, groups, dstate, seqlen]; constant -> fp32
  void* dC = nullptr;              // like C
  float* dD = nullptr;             // [dim], non-null exactly when D is
  void* dz = nullptr;              // non-null exactly when z is
  float* dDeltaBias = nullptr;     // [dim], non-null exactly when deltaBias is
  float* dh0 = nullptr;            // nullable (not wanted), [nseq, dim, dstate]
};
Status selectiveScanBackward(const SelectiveScanArgs& a, const SelectiveScanGrads& g);

// One or a few decode steps of the same recurrence from a given state, for generation:
// x, delta, z, y are dtype dt [batch, dim, tokens]; B and C dtype dt [batch, groups, dstate, tokens];
// A fp32 [dim, dstate]; D, deltaBias fp32 [dim] (nullable), z nullable. state is fp32
// [batch, dim, dstate]: read as x_{-1}, and overwritten with the state after the last token when
// updateState. intermediate (nullable) receives the state after every token, fp32
// [batch, tokens, dim, dstate].
struct SelectiveStateUpdateArgs {
  DType dt = DType::F32;
  int64_t batch = 0, dim = 0, dstate = 0, groups = 1, tokens = 1;
  bool deltaSoftplus = false, updateState = true;
  float* state = nullptr;
  const void* x = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const void* z = nullptr;
  const float* deltaBias = nullptr;
  void* y = nullptr;
  float* intermediate = nullptr;
};
Status selectiveStateUpdate(const SelectiveStateUpdateArgs& a);

// ---- gated delta rule, Gated DeltaNet (cuda/delta/gated_delta.cu) ----
// Per value head hv (q / k head h = hv / (HV / H)) and position t of a sequence, with the state S
// stored K x V (S[i][j]):
//   q_t, k_t = q[t, h], k[t, h]; with l2norm each is first divided by sqrt(sum_i x_i^2 + 1e-6)
//   S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   S_{-1} = h0 (nullable: 0)
//   o_t = scale * S_t^T q_t
// q, k: dtype dt [batch, T, H, K]; v, o: dt [batch, T, HV, V]; g: fp32 [batch, T, HV] (log-space
// decay); beta: dt [batch, T, HV]; h0 and finalState: fp32 [nseq, HV, K, V].
// Sequences as for the selective scan (ScanSegment: row `batch`, positions [start, start+length));
// positions in no segment get o = 0 and zero gradients.
// Checkpoints: the state entering chunk c (of `chunk` positions) of segment s for head hv at
//   states[((chunkOffset + c) * HV + hv) * K * V + i * V + j],  c < ceil(length / chunk).
struct GatedDeltaArgs {
  DType dt = DType::F32;
  int64_t batch = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
  float scale = 1.0f;
  bool l2norm = false;
  int64_t nseq = 0;
  const ScanSegment* segments = nullptr;  // host memory, nseq entries
  bool packed = false;
  int64_t chunk = 0;                      // must equal gatedDeltaChunk() for the CUDA calls
  int64_t totalChunks = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;  // nullable
};
int64_t gatedDeltaChunk();
// Writes o (every element), states (every element), finalState (nullable).
Status gatedDeltaForward(const GatedDeltaArgs& a, void* o, float* states, float* finalState);
struct GatedDeltaGrads {
  const void* dO = nullptr;       // nullable (zeros), dt [batch, T, HV, V]
  const float* dFinal = nullptr;  // nullable (zeros), [nseq, HV, K, V]
  const float* states = nullptr;  // the forward pass's checkpoints
  // Outputs, written entirely: dq, dk dt [batch, T, H, K] (summed over the value heads of a q/k
  // head); dv dt [batch, T, HV, V]; dg fp32 [batch, T, HV]; dbeta dt [batch, T, HV]; dh0 nullable.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dg = nullptr;
  void* dbeta = nullptr;
  float* dh0 = nullptr;
};
Status gatedDeltaBackward(const GatedDeltaArgs& a, const GatedDeltaGrads& g);
// Decode: `tokens` steps of the recurrence from state (fp32 [batch, HV, K, V]), which is overwritten
// with the state after the last token when updateState. q, k dt [batch, tokens, H, K]; v, o dt
// [batch, tokens, HV, V]; g fp32 and beta dt [batch, tokens, HV]. intermediate (nullable): the
// state after every token, fp32 [batch, tokens, HV, K, V].
struct GatedDeltaStepArgs {
  DType dt = DType::F32;
  int64_t batch = 0, tokens = 1, H = 0, HV = 0, K = 0, V = 0;
  float scale = 1.0f;
  bool l2norm = false, updateState = true;
  float* state = nullptr;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* g = nullptr;
  const void* beta = nullptr;
  void* o = nullptr;
  float* intermediate = nullptr;
};
Status gatedDeltaStep(const GatedDeltaStepArgs& a);

}  // namespace rkcuda
