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
  int memoryBusWidth = 0;  // bits
  int memoryClockRateKHz = 0;
  int driverVersion = 0, runtimeVersion = 0;
};
Status deviceProperties(DeviceProps* out);
Status deviceMalloc(void** ptr, size_t bytes);  // stream-ordered on the default stream
Status deviceFree(void* ptr);                   // stream-ordered on the default stream
Status copyHostToDevice(void* dst, const void* src, size_t bytes);
Status copyDeviceToHost(void* dst, const void* src, size_t bytes);  // synchronises
Status copyDeviceToDevice(void* dst, const void* src, size_t bytes);
Status synchronize();
// Convert n elements between dtypes on the device (either side may be F32/F16/BF16).
Status convert(DType from, const void* src, DType to, void* dst, int64_t n);
// Event timing for benchmarks: elapsed milliseconds of fn's launches, measured with CUDA events.
Status eventRecordStart(void** ev);
Status eventElapsedMs(void* startEv, float* ms);  // records a stop event, synchronises, destroys
// Completion of the work queued so far (for the Promise form of the calls): eventRecord marks it on
// the default stream; eventWait blocks the calling thread until it is done, then destroys the event.
Status eventRecord(void** ev);
Status eventWait(void* ev);

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
  const void* dy = nullptr;       // nullable (zeros), dtype dt, [batch, dim, seqlen]
  const float* dFinal = nullptr;  // nullable (zeros), [nseq, dim, dstate]
  const float* states = nullptr;  // the forward pass's checkpoints
  // Outputs, each written entirely (zeros where nothing flows). du, ddelta, dz have dtype dt.
  void* du = nullptr;
  void* ddelta = nullptr;
  float* dA = nullptr;          // [dim, dstate]
  void* dB = nullptr;           // like B: variable -> dtype dt [batch, groups, dstate, seqlen]; constant -> fp32
  void* dC = nullptr;           // like C
  float* dD = nullptr;          // [dim], non-null exactly when D is
  void* dz = nullptr;           // non-null exactly when z is
  float* dDeltaBias = nullptr;  // [dim], non-null exactly when deltaBias is
  float* dh0 = nullptr;         // nullable (not wanted), [nseq, dim, dstate]
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
  int64_t chunk = 0;  // must equal gatedDeltaChunk() for the CUDA calls
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

// ---- fused recurrent cells, FlashRNN style (cuda/cells/fused_rnn.cu) ----
// The recurrent part of an RNN layer (the input projection is done outside), many small heads with
// block-diagonal recurrent weights. G gates, S states per cell (state 0 is always h):
//   cell   G  S  gates (order)  states (order)
//   elman  1  1  (a)            (h)            h_t = tanh(pre_a)
//   lstm   4  2  (i, f, z, o)   (h, c)         c_t = sig(pre_f) c + sig(pre_i) tanh(pre_z), h_t = sig(pre_o) tanh(c_t)
//   gru    3  1  (r, z, n)      (h)            n = tanh(wx_n + sig(pre_r) (rec_n + b_n)), h_t = (1 - z) n + z h_{t-1}
//   slstm  4  4  (i, f, z, o)   (h, c, n, m)   exponential gating with normaliser and stabiliser
// with rec_g[j] = sum_i h_{t-1}[i] R[g][head][i][j] and pre_g = wx_g + b_g + rec_g. The exact
// definitions (sLSTM's log-sigmoid forget gate and empty-state stabiliser reset included) are those
// of the float64 oracle, tests/reference/fusedRnn.ts, which is the specification.
// Layouts (D = headDim, H = heads): wx dt [batch, T, G, H, D]; R dt [G, H, D, D]; b fp32 [G, H, D];
// states0 (nullable: zeros) and finalStates fp32 [S, batch, H, D]; h dt [batch, T, H, D], or
// [batch, H, D] (the final h) when returnLastOnly.
// lengths (nullable: T for every row; host memory, batch entries in [0, T]): steps t >= lengths[b]
// leave the state unchanged and give h = 0 and zero gradients.
enum class CellKind : int { Elman = 0, Lstm = 1, Gru = 2, Slstm = 3 };
constexpr int cellGates(CellKind c) { return c == CellKind::Elman ? 1 : c == CellKind::Gru ? 3 : 4; }
constexpr int cellStates(CellKind c) { return c == CellKind::Lstm ? 2 : c == CellKind::Slstm ? 4 : 1; }
struct FusedRnnArgs {
  DType dt = DType::F32;
  CellKind cell = CellKind::Lstm;
  int64_t batch = 0, T = 0, heads = 0, headDim = 0;
  bool returnLastOnly = false;
  const int32_t* lengths = nullptr;  // host, nullable
  const void* wx = nullptr;
  const void* R = nullptr;
  const float* b = nullptr;
  const float* states0 = nullptr;  // nullable
};
// What the backward pass needs, written by a training forward (both null for inference):
//   savedStates fp32 [T, S, batch, H, D]: the states after step t (unchanged copies past a row's length);
//   savedPre    fp32 [T, batch, G, H, D]: pre_g at step t; for the GRU's n gate, rec_n + b_n (the part
//               that the r gate scales); zeros past a row's length.
struct FusedRnnOutputs {
  void* h = nullptr;             // every element written
  float* finalStates = nullptr;  // nullable
  float* savedStates = nullptr;  // nullable (inference)
  float* savedPre = nullptr;     // non-null exactly when savedStates is
};
Status fusedRnnForward(const FusedRnnArgs& a, const FusedRnnOutputs& o);
struct FusedRnnGrads {
  const void* dh = nullptr;       // nullable (zeros), dt, h's shape (with returnLastOnly: [batch, H, D])
  const float* dFinal = nullptr;  // nullable (zeros), [S, batch, H, D]
  const float* savedStates = nullptr;
  const float* savedPre = nullptr;
  // Outputs, each written entirely: dwx dt like wx; dR dt like R; db fp32 like b; dStates0 nullable.
  void* dwx = nullptr;
  void* dR = nullptr;
  float* db = nullptr;
  float* dStates0 = nullptr;
};
Status fusedRnnBackward(const FusedRnnArgs& a, const FusedRnnGrads& g);

// ---- Newton-iteration parallel nonlinear RNN, DEER / ParaRNN (cuda/newton/newton_rnn.cu) ----
// Solves h_t = f(h_{t-1}, x_t) for every t of every batch row at once: from a guess of the whole
// trajectory, each Newton step linearises f around it, h_t = J_t h_{t-1} + c_t, and solves that
// linear recurrence with a parallel scan over time.
// Cells, with N = heads * headDim channels (index head * D + j), G gates, S states:
//   gru-diag        G 3 (r, z, n)  S 1 (h)     the fused cells' GRU with rec_g[j] = R[g][j] h_{t-1}[j]
//   lstm-cifg-diag  G 3 (f, z, o)  S 2 (h, c)  rec_g[j] = R[g][j] h_{t-1}[j]; f = sig(pre_f),
//                                              c_t = f c_{t-1} + (1 - f) tanh(pre_z), h_t = sig(pre_o) tanh(c_t)
//   gru, lstm, elman                           exactly the fused cells above (R [G, H, D, D])
// pre_g = wx_g + b_g + rec_g (GRU n gate: wx_n + r (rec_n + b_n)).
// Layouts: wx dt [batch, T, G, N]; R fp32, [G, N] (diagonal cells) or [G, H, D, D]; b fp32 [G, N];
// h0 (nullable: zeros) and finalStates fp32 [S, batch, N]; the trajectory traj (and a provided
// guess) fp32 [batch, T, S, N]; y dt [batch, T, N] = the h state of traj.
// Jacobian: the diagonal cells always use their exact per-channel S x S blocks. The dense cells use
// the exact (S*D) x (S*D) block per head when fullJacobian (DEER), else only the S x S blocks
// linking the states of the same channel (quasi-DEER: more iterations, far less work).
// Convergence, per batch row: every element satisfies |f(traj_{t-1}, x_t) - traj_t| <=
// tolAbs + tolRel * |traj_t|. The check runs before each Newton step; iterations counts the steps
// taken (0 when the guess already satisfies it). residual is max |f(traj_{t-1}, x_t) - traj_t| of
// the last Newton iterate. A row that has not converged after maxIters steps is, when
// fallbackSequential, recomputed exactly by sequential evaluation (fellBack = 1); otherwise its
// trajectory is left as the last iterate and the caller must not use it (the op raises an error).
// damping lambda >= 0: Levenberg-Marquardt-regularised steps (ELK); 0 is plain Newton.
// sequential: skip Newton and evaluate sequentially (iterations 0, converged 1, residual 0).
enum class NewtonCell : int { GruDiag = 0, LstmCifgDiag = 1, Gru = 2, Lstm = 3, Elman = 4 };
enum class NewtonGuess : int { Zeros = 0, OneStep = 1, Provided = 2 };  // OneStep: traj_t = f(h0, x_t)
struct NewtonRnnArgs {
  DType dt = DType::F32;
  NewtonCell cell = NewtonCell::GruDiag;
  int64_t batch = 0, T = 0, heads = 1, headDim = 0;
  bool fullJacobian = true;
  bool sequential = false;
  bool fallbackSequential = true;
  int maxIters = 0;
  float tolAbs = 0.0f, tolRel = 0.0f, damping = 0.0f;
  NewtonGuess guess = NewtonGuess::Zeros;
  const float* guessTraj = nullptr;  // fp32 [batch, T, S, N] when guess == Provided
  const void* wx = nullptr;
  const float* R = nullptr;
  const float* b = nullptr;
  const float* h0 = nullptr;  // nullable
};
struct NewtonRnnOutputs {
  float* traj = nullptr;         // every element written
  void* y = nullptr;             // every element written
  float* finalStates = nullptr;  // nullable
  // Per-row statistics, host memory, batch entries each (the CUDA call synchronises to fill them).
  int32_t* iterations = nullptr;
  float* residual = nullptr;
  uint8_t* converged = nullptr;
  uint8_t* fellBack = nullptr;
};
Status newtonRnnForward(const NewtonRnnArgs& a, const NewtonRnnOutputs& o);
// Backward by the implicit function theorem at the solution traj: one reverse-time linear recurrence
// with the transposed exact Jacobians (lambda_t = dy_t + J_{t+1}^T lambda_{t+1}), then the parameter
// gradients. No backpropagation through the iterations.
struct NewtonRnnGrads {
  const void* dy = nullptr;       // nullable (zeros), dt [batch, T, N]
  const float* dFinal = nullptr;  // nullable (zeros), [S, batch, N]
  const float* traj = nullptr;    // the forward solution
  // Outputs, each written entirely: dwx dt like wx; dR, db fp32 like R, b; dh0 nullable.
  void* dwx = nullptr;
  float* dR = nullptr;
  float* db = nullptr;
  float* dh0 = nullptr;
};
Status newtonRnnBackward(const NewtonRnnArgs& a, const NewtonRnnGrads& g);

}  // namespace rkcuda
