// Gated delta rule, chunked form (WY representation / UT transform) on tensor cores: the forward
// and backward passes for fp16 / bf16 storage, fp32 state and accumulation. gatedDeltaRuleForward and
// gatedDeltaRuleBackward (gated_delta_rule.cu) call them for those dtypes; fp32 storage stays on the
// per-token recurrence (below, "fp32"). The launches are here; the kernels in
// gated_delta_rule_chunked_forward.cuh and gated_delta_rule_chunked_backward.cuh, their shared sizes and
// helpers in gated_delta_rule_chunked_common.cuh.
//
// Algorithm. Per (sequence, value head), a chunk of C = 64 positions t = 0..n-1 (n < 64 for the
// last one) with state S_0 (K x V) entering it, a_t = exp(g_t), G_t = g_0 + ... + g_t (cumulative
// within the chunk), Gamma_ts = exp(G_t - G_s) (s <= t). Unrolling the recurrence of api.h,
//   S_t = a_t S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - a_t S_{t-1}^T k_t),
// gives S_t = exp(G_t) S_0 + sum_{s<=t} Gamma_ts k_s u_s^T, hence
//   (I + A) U' = diag(beta) (V - diag(exp(G)) K S_0),   A_ts = beta_t Gamma_ts k_t.k_s (s < t),
// so with Tm = (I + A)^-1 diag(beta), W = Tm (K * exp(G)), U = Tm V (rows scaled per position):
//   V' = U - W S_0                                            (the rows u_t)
//   O  = scale ((Q * exp(G)) S_0 + tril(Q K^T * Gamma) V')    (diagonal included)
//   S  = exp(G_{n-1}) S_0 + (K * exp(G_{n-1} - G))^T V'       (the state entering the next chunk)
// Every decay factor is an exponential of a difference of cumulative sums that is <= 0 for g <= 0
// (never exp(G_t) * exp(-G_s)), and the cumulative sums are kept in fp64 inside a chunk, so that
// g = -1e4 (G down to -6.4e5) neither overflows nor loses the small decays that follow it.
// Padding rows (t >= n) have k = q = v = beta = 0 and g = 0: their rows of Tm, W, U, V' are 0.
//
// Without the delta term (ChunkParams::delta false: linear attention's 'linear' and 'gated' rules,
// S_t = a_t S_{t-1} + k_t v_t^T) the same kernels run with A = 0, beta = 1, so Tm = I, U = V and
// V' = U (no W: it is neither formed nor kept, and the products with it are skipped): the forward is
// O = Qg S_0 + P V, S = exp(G_{n-1}) S_0 + Kd^T V; the backward drops dW, dTm, dA, E and dbeta
// (chunkGradKernel<..., Delta = false> compiles them out); g may be absent (no decay: G = 0).
//
// With a decay per key row (ChunkParams::perKey: linear attention's per-key 'gated' and 'gated_delta'
// rules, GLA and KDA) G_t is a K-vector and Gamma_ts = diag(exp(G_t - G_s)) sits inside
// the intra-chunk sums: A_ts = beta_t sum_i k_t[i] k_s[i] exp(G_t[i] - G_s[i]), likewise P; and
// Qg = scale Q * exp(G), W = Tm (K * exp(G)), Kd = K * exp(G_{n-1} - G), the state decayed row by row
// by exp(G_{n-1}). The cumulative sums are kept per key (fp32, summed in fp64) in shared memory. A
// warp's products with the 16-row blocks left of its diagonal block take the factors split at the
// warp's first row r0, x_t[i] exp(G_t[i] - G_r0[i]) against k_s[i] exp(G_r0[i] - G_s[i]), both <= 1
// (as flash-linear-attention's chunk_gla / chunk_kda), on tensor cores; its diagonal 16 x 16 block,
// where no split is bounded, is summed in fp32 with one exponential per term. K <= 128.
// Its backward: the reverse pass decays dS row by row and keeps <S_0[i, :], dS_n[i, :]> per key row;
// the gradient kernel takes the per-key factors of Qg, Kd and K exp(G) element by element, and the
// intra-chunk products' gradients dq_t[i] = sum_s scale dP_ts k_s[i] exp(G_t[i] - G_s[i]) (and dk,
// and the delta term's through dA: dk, dbeta) with the same split at the warp's rows (r0 for the
// blocks left of its diagonal, r0 + 15 for those below it) and the diagonal block in fp32. The
// log-decay gradients come per (position, key) from the products themselves: q_t[i] dq_t[i] and
// -k_s[i] dk_s[i] for each term exp(G_t[i] - G_s[i]) (no 64 x 64 x K tensor), collected in dg's rows,
// which the block owns, and summed from the chunk's end in place. Shared memory: + 64 x K fp32 (the
// gradient kernel at K = V = 128: 141 KiB, one block per SM).
//
// Kernels.
//   chunkPrepKernel<T>  one block (4 warps) per (chunk, value head), all chunks in parallel: stages
//     the chunk's q, k in shared memory, L2 norms, fp64 cumulative decays; K K^T and Q K^T with
//     mma.sync (16 rows per warp, lower triangle only); A in fp32, (I + A)^-1 by blocks of 16 (the
//     four diagonal blocks inverted at once by forward substitution in registers, one warp each,
//     then three block rows of 16 x 16 products spread over the block, fp32), Tm its columns
//     scaled by beta; then W = Tm (K exp(G)) and U = Tm V with mma.sync (v's rows staged by
//     cp.async into q's bytes once Qg is written, during the inverse, and read with ldmatrix).
//     Writes W, U, Qg = scale Q exp(G), Kd = K exp(G_{n-1} - G), P = scale tril(Q K^T Gamma) (all
//     of the storage type) and exp(G_{n-1}) (fp32) to scratch.
//   chunkStateKernel<T, NT> one block (4 warps) per (sequence, value head, tile of vt = 8 NT value
//     columns, vt = 16, 32 or 64: the widest that still fills the SMs and fits a block's shared
//     memory),
//     sequential over the chunks: the fp32 state tile (K x vt) lives in shared memory; per chunk it
//     stores the checkpoint, then V' = U - W S, O = Qg S + P V', S = exp(G_{n-1}) S + Kd^T V', each
//     an mma.sync product (S and V' rounded to the storage type as operands, fp32 accumulation).
//     Every operand comes from shared memory through ldmatrix (.trans for Kd^T): the chunk's W, Qg,
//     Kd (rows of Kp, zero past K) and P are staged with 16-byte cp.async copies, the next chunk's
//     tile loading into each buffer as soon as the product that read it is done (one cp.async group
//     per buffer; U's value tile, read by V''s epilogue, with W), and the state and V' are kept
//     rounded to the storage type beside the fp32 state (the same roundings as before, so the
//     results are bitwise those of per-element loads). Shared memory: Kp (vt + 4) fp32 +
//     (Kp + 128)(vt + 8) + 3 * 64 (Kp + 8) + 64 * 72 16-bit elements (98 KiB at K = 128, vt = 32:
//     two blocks per SM; at K = 256 the tile is at most 32 columns wide, 174 KiB).
//
// fp32. tf32 operands (10-bit mantissa) put ~1e-3 relative errors in W, U, V' and the outputs, an
// order of magnitude above the fp32 tolerance (1e-4); 3xTF32 would triple every product and still
// needs the fp32 inverse. The per-token recurrence is exact in fp32, so fp32 storage stays there.
//
// Bounds (H100 / H200, bf16, K = V = 128; 64 positions per chunk):
//   prep (parallel over chunks x heads): ~4.2 MFLOP of mma per block (~1 % of the tensor-core
//     peak over the whole launch) and the blocked inverse (a 120-FMA substitution per diagonal
//     block in registers, then three block rows of at most 6 outputs per thread, 16-48 FMAs each,
//     seven barriers: ~2-3k cycles, where the column-wise substitution it replaces chained ~2k
//     FMAs and 63 shared-memory round trips in its longest column, ~10k cycles); HBM traffic
//     ~1.9 KB per (position, head): reads q, k, v (0.8 KB), writes W, U, Qg, Kd, P (1.1 KB). Bound
//     by HBM:
//     ~0.15-0.25 ms for 4 x 4096 x 16 (4096 blocks, 3 per SM by shared memory), about the same for
//     8 x 2048 x 32 (2x the work, ~0.3-0.5 ms) and 1 x 32768 x 16 (~0.15-0.25 ms).
//   state (sequential over chunks): per chunk three dependent mma chains (V', then O, then S) of
//     ~K / 16 steps separated by barriers, latency bound whatever the tile width; the tile width is
//     picked so the blocks fill the SMs (4 x 4096 x 16: 64 chunks, 256 blocks of 32 columns;
//     8 x 2048 x 32: 32 chunks, 512 blocks of 64 columns; 1 x 32768 x 16: 512 chunks in sequence,
//     128 blocks of 16 columns). With per-element fragment loads from global memory (eight 16-bit
//     loads per lane and A fragment, each chain step waiting on L2, ~600 cycles) this was ~2-4 us
//     per chunk. Staged: a chain step is an ldmatrix (~30 cycles) and NT mma.sync (~35 cycles
//     dependent), 3 x 8 steps at K = 128 plus three barriers and the checkpoint store (K vt fp32)
//     ~2.5-3.5k cycles: ~1.5-2 us per chunk at 1.75 GHz, the loads of the next chunk's 49 KB of
//     tiles (at K = 128) hidden behind the products. ~0.1-0.15 ms at 4 x 4096 x 16 and
//     8 x 2048 x 32, ~0.8-1 ms at 1 x 32768 x 16. Its rereads of the scratch (1.1 KB per position,
//     head and tile) mostly hit L2.
//   Expected forward: ~0.3-0.45 ms (4, 4096, 16), ~0.5-0.7 ms (8, 2048, 32), ~1-1.3 ms
//   (1, 32768, 16), against 0.77 / 1.29 / 1.93 ms for flash-linear-attention's Triton kernels; the
//   long single sequence is bound by the chunk-to-chunk latency of the state pass. Scratch: ~1.1 KB
//   per (position, value head) of the storage type (600 MB at 1 x 32768 x 16). Estimates: no GPU
//   has run these kernels yet.
//
// Backward. Given dO and dS_n (the gradient of the state leaving the chunk; dFinal for the last),
// the chunk's formulas above give, with Qg = scale Q exp(G), Kd = K exp(G_{n-1} - G), Kg = K exp(G):
//   dV' = P^T dO + Kd dS_n,   dS_0 = exp(G_{n-1}) dS_n + Qg^T dO - W^T dV'       (sequential)
// and then, per chunk independently (S_0 the checkpoint):
//   V' = U - W S_0;  dQg = dO S_0^T;  dKd = V' dS_n^T;  dP = tril(dO V'^T);  dW = -dV' S_0^T;
//   dv = Tm^T dV';  dTm = dV' V^T + dW Kg^T;  dKg = Tm^T dW;
//   Tm = X diag(beta), X = (I + A)^-1:  dbeta_c += sum_i dTm_ic X_ic,  dA = -X^T (dTm diag(beta)) X^T;
//   A_ts = beta_t Gamma_ts k_t.k_s:  E = dA beta Gamma:  dK += E K + E^T K,  dbeta_t += sum_s dA_ts Gamma_ts kk_ts;
//   P_ts = scale Gamma_ts q_t.k_s:  Ep = dP scale Gamma:  dQ += Ep K,  dK += Ep^T Q;
//   log-decay gradients: dG_t += sum_s (dA A + dP P)_ts - sum_s (dA A + dP P)_st (every Gamma_ts =
//   exp(G_t - G_s)), + the row sums of dQg Qg and dKg Kg, - those of dKd Kd (whose sum, with
//   exp(G_{n-1}) <S_0, dS_n>, goes to G_{n-1}); dg_t = sum_{t' >= t} dG_t' within the chunk.
// Only products of a gradient with an already-decayed factor appear, so g = -1e4 stays finite (the
// terms of the straddling pairs are exact zeros). dq, dk are first the gradients with respect to
// the normalised q, k, summed in fp32; where value heads share a q / k head (HV > H) their blocks
// add them atomically and gatedDeltaRuleBackward takes them through the L2 norm afterwards; with
// one value head per q / k head each gradient block owns its rows, writes them without atomics or
// zeroing and takes them through the L2 norm itself (the same row function, the same bits).
//   chunkPrepKernel      the forward's preparation, also keeping X = (I + A)^-1 (fp32).
//   chunkBwdStateKernel<T, NT> one block (4 warps) per (sequence, value head, value tile), from the
//     last chunk to the first: the fp32 dS tile in shared memory; per chunk it stores dS_n (fp32,
//     the checkpoints' layout) and <S_0, dS_n> (atomically over the tiles), dV' (storage type) and
//     steps dS; writes dh0. Same shape and shared memory as the forward's state pass (P, Kd, Qg, W
//     staged with cp.async a product ahead, every A operand and the dS / dV' B operands through
//     ldmatrix), plus two buffers of dO's value tile, the chunk before's loading with P and Kd (B
//     operand of both dO products through ldmatrix; 64 x (vt + 8) 16-bit elements each, so at
//     K = 256 the tile is at most 32 columns wide): latency bound.
//   chunkGradKernel<T, VS> one block (4 warps, 16 chunk rows each) per (chunk, value head), all
//     chunks in parallel: every product above with mma.sync (operands rounded to the storage type,
//     fp32 accumulation; the 64 x 64 factors dTm, dX, dA, E, dP kept in fp32 shared memory), loops
//     over the value columns (contractions) and over 32 key columns (the 64 x K outputs). Every
//     operand from global memory is staged in shared memory and read with ldmatrix: W, U, dV' and
//     v by 16-byte cp.async copies at the start; S_0 and dS rounded to the storage type a slice at
//     a time (32 value columns of S_0 for V', 32 key rows of S_0 and dS per column step, each with
//     the step's 32 columns of q and k); a warp's dO rows once into registers (VS fragments: 8 for
//     V <= 128, 16 above). Regions that no phase needs at once share their bytes (gradLayout), so
//     K = V = 128 takes 108 KiB (two blocks per SM). dq, dk as above; dv, dg, dbeta written.
// Bounds (H100 / H200, bf16, K = V = 128): prep as in the forward (+64 MB of X at 4 x 4096 x 16);
//   reverse pass like the forward's state pass (~1.5-2.5 us per chunk in sequence with the staged
//   tiles and dO; was ~2-4 us; plus 2 x 64 KB of fp32 state read / written per (chunk, head),
//   mostly hidden: ~0.15-0.2 ms at 4 x 4096 x 16 and 8 x 2048 x 32, ~1-1.3 ms at 1 x 32768 x 16);
//   gradients: ~20 MFLOP of mma per block (~80 GFLOP at 4 x 4096 x 16, ~10 % of the tensor-core
//   peak), ~0.3 MB of reads per block mostly from L2 (S_0 and dS_n fp32, 128 KB, read in coalesced
//   rows now). With per-element fragment loads (about 3,500 scalar global loads per lane, each
//   chain waiting on L2) it was estimated at ~0.5-1 ms at 4 x 4096 x 16; staged, a block's
//   operand traffic is ~40 coalesced 16-byte loads per thread plus the slices' fp32 rows, and its
//   products read shared memory (~30-cycle ldmatrix), with about 9 + 3 K / 32 barriers: ~10-15k
//   cycles per block, 4096 blocks over 132 SMs at two per SM: ~0.2-0.35 ms at 4 x 4096 x 16,
//   ~0.4-0.7 ms at 8 x 2048 x 32 and 1 x 32768 x 16.
//   Expected backward ~0.5-0.8 ms (4, 4096, 16), ~0.9-1.5 ms (8, 2048, 32), ~1.4-2 ms
//   (1, 32768, 16); forward + backward ~0.8-1.25 / 1.4-2.2 / 2.4-3.3 ms against flash-linear-
//   attention's 2.55 / 4.62 / 7.23 ms, not yet measured on a device (with HV = H the finished
//   dq, dk also save the 2 x 4 B x T H K zeroing, the atomics and two row passes, ~0.05-0.1 ms at
//   4 x 4096 x 16). The lever left: more warps per block.
//   Scratch on top of the forward's: X (16 KB), dS_n (4 K V bytes) and dV' per (chunk, value head).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/api.h"
#include "delta/gated_delta_rule.h"
#include "common/check.cuh"
#include "common/dtype.cuh"
#include "common/host.cuh"
#include "common/launch.cuh"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "delta/delta_params.cuh"
#include "delta/gated_delta_rule_chunked.h"

#include "delta/gated_delta_rule_chunked_backward.cuh"
#include "delta/gated_delta_rule_chunked_common.cuh"
#include "delta/gated_delta_rule_chunked_forward.cuh"

namespace rkcuda {
namespace deltachunked {
namespace {

// ============================== launch ==============================

// Parameters, the value tile (tunable `tileName`) and the preparation's scratch, allocated in
// *scratch followed by the backward's when `backward`; launches the preparation kernel.
template <class T>
Status prepare(const std::string& fn, const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments,
               const char* tileName, bool backward, ChunkParams* out, DeviceBuffer* scratch) {
  ChunkParams& p = *out;
  delta::setInputs(p, a, a.T, a.h0);
  p.uniformChunks = ceilDiv(a.T, kC);
  p.nseq = a.nseq;
  p.Kp = roundUp16(a.K);
  p.Vp = roundUp16(a.V);
  p.ldk = p.Kp + 8;
  p.segments = deviceSegments;
  p.delta = a.delta;
  p.perKey = a.perKeyDecay;

  // Value tile of the sequential pass (latency bound): the widest of 64, 32, 16 columns that still
  // gives at least one block per SM and whose shared memory a block may have.
  int sms = 132;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int optin = 0;
  RK_TRY(deviceAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  auto fits = [&](int vt) { return stateLayout(p.Kp, vt, sizeof(T), backward).bytes <= static_cast<size_t>(optin); };
  const int64_t heads = a.nseq * a.HV;
  int chosenVt = 64;
  while (chosenVt > 16 && (heads * ceilDiv(a.V, chosenVt) < sms || !fits(chosenVt))) chosenVt /= 2;
  p.vt = tunable(tileName, chosenVt);
  if (p.vt != 16 && p.vt != 32 && p.vt != 64) {
    return statusError(fn + ": unsupported value tile " + std::to_string(p.vt));
  }
  if (!fits(p.vt)) {
    return statusError(fn + ": value tile " + std::to_string(p.vt) + " needs more shared memory than a block has");
  }
  p.vTiles = static_cast<int>(ceilDiv(a.V, p.vt));

  const int64_t cbs = a.totalChunks * a.HV;  // (chunk, value head) pairs
  if (cbs > INT_MAX || heads * p.vTiles > INT_MAX) return statusError(fn + ": too many chunks for one launch");
  if (cbs == 0) return Status{};
  const int64_t perChunkK = cbs * kC * p.Kp, perChunkV = cbs * kC * a.V, perP = cbs * kC * kC;
  auto aligned = [](int64_t elems, int64_t size) { return (elems * size + 255) / 256 * 256; };
  const int64_t es = static_cast<int64_t>(sizeof(T)), fs = static_cast<int64_t>(sizeof(float));
  const int64_t perChunkW = a.delta ? perChunkK : 0;  // W = 0 without the delta term: not kept
  const int64_t gammas = cbs * (p.perKey ? p.Kp : 1);
  int64_t bytes = aligned(perChunkW, es) + 2 * aligned(perChunkK, es) + aligned(perChunkV, es) + aligned(perP, es) +
                  aligned(gammas, fs);
  if (backward)
    bytes += aligned(perP, fs) + aligned(cbs * a.K * a.V, fs) + aligned(perChunkV, es) + aligned(gammas, fs);
  RK_TRY(scratch->allocate(static_cast<size_t>(bytes)));
  char* base = static_cast<char*>(scratch->get());
  auto take = [&](int64_t elems, int64_t size) {
    char* at = base;
    base += aligned(elems, size);
    return at;
  };
  p.W = a.delta ? take(perChunkW, es) : nullptr;
  p.Qg = take(perChunkK, es);
  p.Kd = take(perChunkK, es);
  p.U = take(perChunkV, es);
  p.P = take(perP, es);
  p.gammaLast = reinterpret_cast<float*>(take(gammas, fs));
  if (backward) {
    p.Xinv = reinterpret_cast<float*>(take(perP, fs));
    p.dStates = reinterpret_cast<float*>(take(cbs * a.K * a.V, fs));
    p.dVp = take(perChunkV, es);
    p.dGamL = reinterpret_cast<float*>(take(gammas, fs));
    RK_TRY(zeroFloats(p.dGamL, gammas));
  }
  const size_t prepBytes = prepSharedBytes(p, sizeof(T));
  RK_TRY(allowDynamicShared(chunkPrepKernel<T>, prepBytes));
  return launch(chunkPrepKernel<T>, static_cast<unsigned>(cbs), kThreads, prepBytes, p);
}

template <class T>
Status launchChunked(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments, void* o, float* states,
                     float* finalState) {
  const std::string fn = "gatedDeltaRuleForward (chunked)";
  ChunkParams p;
  p.o = o, p.states = states, p.finalState = finalState;
  DeviceBuffer scratch;
  RK_TRY(prepare<T>(fn, a, deviceSegments, "gatedDeltaRuleChunked.valueTile", false, &p, &scratch));
  const int64_t heads = a.nseq * a.HV;
  if (heads == 0) return Status{};
  const size_t stateBytes = stateLayout(p.Kp, p.vt, sizeof(T), false).bytes;
  const unsigned blocks = static_cast<unsigned>(heads * p.vTiles);
  if (p.vt == 16) {
    RK_TRY(allowDynamicShared(chunkStateKernel<T, 2>, stateBytes));
    return launch(chunkStateKernel<T, 2>, blocks, kThreads, stateBytes, p);
  }
  if (p.vt == 32) {
    RK_TRY(allowDynamicShared(chunkStateKernel<T, 4>, stateBytes));
    return launch(chunkStateKernel<T, 4>, blocks, kThreads, stateBytes, p);
  }
  RK_TRY(allowDynamicShared(chunkStateKernel<T, 8>, stateBytes));
  return launch(chunkStateKernel<T, 8>, blocks, kThreads, stateBytes, p);
}

template <class T>
Status launchChunkedBackward(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments,
                             const GatedDeltaRuleGrads& g, const ChunkedGradAccumulators& acc) {
  const std::string fn = "gatedDeltaRuleBackward (chunked)";
  ChunkParams p;
  p.checkpoints = g.states;
  p.dO = g.dO, p.dFinal = g.dFinal, p.dh0 = g.dh0, p.dv = g.dv, p.dg = g.dg;
  p.dqAcc = acc.dq, p.dkAcc = acc.dk, p.dbetaAcc = acc.dbeta;
  if (gatedDeltaRuleChunkedFinishesQK(a)) p.dqOut = g.dq, p.dkOut = g.dk;
  DeviceBuffer scratch;
  RK_TRY(prepare<T>(fn, a, deviceSegments, "gatedDeltaRuleChunked.backwardValueTile", true, &p, &scratch));
  const int64_t heads = a.nseq * a.HV;
  if (heads == 0) return Status{};
  const size_t stateBytes = stateLayout(p.Kp, p.vt, sizeof(T), true).bytes;
  const unsigned blocks = static_cast<unsigned>(heads * p.vTiles);
  if (p.vt == 16) {
    RK_TRY(allowDynamicShared(chunkBwdStateKernel<T, 2>, stateBytes));
    RK_TRY(launch(chunkBwdStateKernel<T, 2>, blocks, kThreads, stateBytes, p));
  } else if (p.vt == 32) {
    RK_TRY(allowDynamicShared(chunkBwdStateKernel<T, 4>, stateBytes));
    RK_TRY(launch(chunkBwdStateKernel<T, 4>, blocks, kThreads, stateBytes, p));
  } else {
    RK_TRY(allowDynamicShared(chunkBwdStateKernel<T, 8>, stateBytes));
    RK_TRY(launch(chunkBwdStateKernel<T, 8>, blocks, kThreads, stateBytes, p));
  }
  const int64_t cbs = a.totalChunks * a.HV;
  if (cbs == 0) return Status{};
  const size_t gradBytes = gradSharedBytes(p, sizeof(T));
  // dO fragments per row block held in registers: Vp / 16 of at most VS; Delta: the delta term's
  // products (the rules without it skip them at compile time).
  auto run = [&](auto kernel) -> Status {
    RK_TRY(allowDynamicShared(kernel, gradBytes));
    return launch(kernel, static_cast<unsigned>(cbs), kThreads, gradBytes, p);
  };
  if (p.Vp <= 128) return p.delta ? run(chunkGradKernel<T, 8, true>) : run(chunkGradKernel<T, 8, false>);
  return p.delta ? run(chunkGradKernel<T, 16, true>) : run(chunkGradKernel<T, 16, false>);
}

}  // namespace
}  // namespace deltachunked

bool gatedDeltaRuleChunkedSupports(DType dt) { return dt == DType::F16 || dt == DType::BF16; }

bool gatedDeltaRuleChunkedFinishesQK(const GatedDeltaRuleArgs& a) { return a.H == a.HV; }

Status gatedDeltaRuleChunkedForward(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments, void* o,
                                    float* states, float* finalState) {
  switch (a.dt) {
    case DType::F16:
      return deltachunked::launchChunked<__half>(a, deviceSegments, o, states, finalState);
    case DType::BF16:
      return deltachunked::launchChunked<__nv_bfloat16>(a, deviceSegments, o, states, finalState);
    default:
      return statusError("gatedDeltaRuleForward (chunked): fp16 or bf16 storage only");
  }
}

Status gatedDeltaRuleChunkedBackward(const GatedDeltaRuleArgs& a, const ScanSegment* deviceSegments,
                                     const GatedDeltaRuleGrads& g, const ChunkedGradAccumulators& acc) {
  switch (a.dt) {
    case DType::F16:
      return deltachunked::launchChunkedBackward<__half>(a, deviceSegments, g, acc);
    case DType::BF16:
      return deltachunked::launchChunkedBackward<__nv_bfloat16>(a, deviceSegments, g, acc);
    default:
      return statusError("gatedDeltaRuleBackward (chunked): fp16 or bf16 storage only");
  }
}

}  // namespace rkcuda
