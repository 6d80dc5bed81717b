// Float64 oracle of the gated delta rule (Gated DeltaNet, flash-linear-attention's
// `chunk_gated_delta_rule`): the plain per-token recurrence, its backward written out by hand
// (reverse time through the same loop, and through the optional L2 norm of q and k), and the decode
// step (the same recurrence advanced a few tokens from a given state).
//
// Data: every array is flat, row-major, float64 or anything indexable (Float32Array from dataSync(),
// number[]); its shape is given by the dims in the options, never inferred from lengths.
//
//   q, k, dq, dk ............................ [batch, T, H, K]
//   v, o, dv, dO ............................ [batch, T, HV, V]
//   g, beta, dg, dbeta ...................... [batch, T, HV]
//   initialState, finalState, dFinal,
//   dInitialState ........................... [N, HV, K, V]; N = batch, or cuSeqlens.length - 1 when
//                                             packed (then batch == 1)
//   states (returnStates) ................... [batch, T, HV, K, V]: the state after each position
//                                             (zeros at positions in no sequence)
//   value head hv reads q / k head floor(hv / (HV / H)); HV % H must be 0.
//
// Math, per value head hv (q / k head h) and position t of a sequence; the state S is K x V
// (S[i][j], the layout of initialState):
//   q_t, k_t = q[t, h], k[t, h], or with useQkL2normInKernel x / sqrt(sum_i x_i^2 + 1e-6)
//   S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   S_{-1} = initialState or 0
//       = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T   (the form computed)
//   o_t = scale * S_t^T q_t,   scale = K^-0.5 unless given
// This is the V x K form S'_t = exp(g_t) S'_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
// o_t = scale S'_t q_t, with S = S'^T. Each decay exp(g_t) is taken on its own (no cumulative sums
// of g, no division by a decay), so g = 0, g = -1e4 (exp(g) = 0) and long runs of large |g| stay
// finite.
// Packed input (cuSeqlens, N + 1 entries from 0, non-decreasing, last <= T): sequence s covers
// positions [cuSeqlens[s], cuSeqlens[s+1]) of batch row 0 and starts from initialState[s]; positions
// after the last sequence get o = 0 and zero gradients.

export type Data = ArrayLike<number>;

/** The eps of the in-kernel L2 norm: x / sqrt(sum x^2 + L2NORM_EPS). */
export const L2NORM_EPS = 1e-6;

export interface GatedDeltaRuleRefInputs {
  q: Data;
  k: Data;
  v: Data;
  /** Log-space decay (usually <= 0). */
  g: Data;
  beta: Data;
}

export interface GatedDeltaRuleRefOptions {
  batch: number;
  T: number;
  /** q / k heads. */
  H: number;
  /** v / output heads, a multiple of H. */
  HV: number;
  K: number;
  V: number;
  /** Default K^-0.5. */
  scale?: number;
  initialState?: Data | null;
  /** Return the final state (default false: finalState is null). */
  outputFinalState?: boolean;
  cuSeqlens?: Data | null;
  useQkL2normInKernel?: boolean;
  /** Also return the state after every position (see `states` above). */
  returnStates?: boolean;
}

export interface GatedDeltaRuleRefOutputs {
  o: Float64Array;
  finalState: Float64Array | null;
  states: Float64Array | null;
}

export interface GatedDeltaRuleRefGrads {
  dq: Float64Array;
  dk: Float64Array;
  dv: Float64Array;
  dg: Float64Array;
  dbeta: Float64Array;
  dInitialState: Float64Array | null;
}

/** One sequence: batch row b, positions [start, start + length); its index is its state slot. */
interface Segment {
  b: number;
  start: number;
  length: number;
}

interface Dims {
  batch: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
}

function checkDims(fn: string, d: Dims): void {
  for (const name of ['batch', 'T', 'H', 'HV', 'K', 'V'] as const) {
    const x = d[name];
    const min = name === 'T' ? 0 : 1;
    if (!Number.isInteger(x) || x < min) throw new Error(`${fn}: ${name} must be an integer >= ${min}, got ${x}`);
  }
  if (d.HV % d.H !== 0) throw new Error(`${fn}: HV ${d.HV} is not a multiple of H ${d.H}`);
}

function checkInputs(fn: string, d: Dims, i: GatedDeltaRuleRefInputs): void {
  const need = (name: string, a: Data, n: number) => {
    if (a.length !== n) throw new Error(`${fn}: ${name} has ${a.length} elements, expected ${n}`);
  };
  const BT = d.batch * d.T;
  need('q', i.q, BT * d.H * d.K);
  need('k', i.k, BT * d.H * d.K);
  need('v', i.v, BT * d.HV * d.V);
  need('g', i.g, BT * d.HV);
  need('beta', i.beta, BT * d.HV);
}

function segmentsOf(fn: string, o: GatedDeltaRuleRefOptions): Segment[] {
  if (!o.cuSeqlens) return Array.from({ length: o.batch }, (_, b) => ({ b, start: 0, length: o.T }));
  const cu = Array.from(o.cuSeqlens);
  if (o.batch !== 1) throw new Error(`${fn}: cuSeqlens requires batch == 1`);
  if (cu.length < 1 || cu[0] !== 0) throw new Error(`${fn}: cuSeqlens must start at 0`);
  const segs: Segment[] = [];
  for (let s = 0; s + 1 < cu.length; s++) {
    if (!(cu[s + 1] >= cu[s]) || !Number.isInteger(cu[s + 1]))
      throw new Error(`${fn}: cuSeqlens must be non-decreasing integers`);
    segs.push({ b: 0, start: cu[s], length: cu[s + 1] - cu[s] });
  }
  if (cu[cu.length - 1] > o.T) throw new Error(`${fn}: cuSeqlens exceeds T`);
  return segs;
}

/** q or k as used by the recurrence: a copy, or L2-normalised per [.., K] row; rnorm = 1 / sqrt(sum x^2 + eps) per row. */
function prepareQk(x: Data, rows: number, K: number, l2: boolean): { x: Float64Array; rnorm: Float64Array | null } {
  const out = Float64Array.from(x);
  if (!l2) return { x: out, rnorm: null };
  const rnorm = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < K; i++) ss += out[r * K + i] * out[r * K + i];
    const rn = 1 / Math.sqrt(ss + L2NORM_EPS);
    rnorm[r] = rn;
    for (let i = 0; i < K; i++) out[r * K + i] *= rn;
  }
  return { x: out, rnorm };
}

/** The gradient with respect to x of a row y = x * rnorm (rnorm = 1 / sqrt(|x|^2 + eps)) given dy: (dy - y (y . dy)) * rnorm. */
function l2normBackward(dy: Float64Array, y: Float64Array, rnorm: Float64Array, rows: number, K: number): Float64Array {
  const dx = new Float64Array(dy.length);
  for (let r = 0; r < rows; r++) {
    let yd = 0;
    for (let i = 0; i < K; i++) yd += y[r * K + i] * dy[r * K + i];
    for (let i = 0; i < K; i++) dx[r * K + i] = (dy[r * K + i] - y[r * K + i] * yd) * rnorm[r];
  }
  return dx;
}

/**
 * One token of one value head, in place: S (K x V) <- exp(g) S + beta k (v - exp(g) S^T k)^T, then
 * o[oOff + j] = scale * (S^T q)_j. `u` is scratch of length V.
 */
function stepHead(
  S: Float64Array,
  K: number,
  V: number,
  q: Float64Array,
  qOff: number,
  k: Float64Array,
  kOff: number,
  v: Data,
  vOff: number,
  g: number,
  beta: number,
  scale: number,
  u: Float64Array,
  o: Float64Array,
  oOff: number,
): void {
  const a = Math.exp(g);
  for (let j = 0; j < V; j++) {
    let s = 0;
    for (let i = 0; i < K; i++) s += k[kOff + i] * S[i * V + j];
    u[j] = beta * (v[vOff + j] - a * s);
  }
  for (let i = 0; i < K; i++) {
    const ki = k[kOff + i];
    for (let j = 0; j < V; j++) S[i * V + j] = a * S[i * V + j] + ki * u[j];
  }
  for (let j = 0; j < V; j++) {
    let s = 0;
    for (let i = 0; i < K; i++) s += S[i * V + j] * q[qOff + i];
    o[oOff + j] = scale * s;
  }
}

interface Prepared {
  d: Dims;
  segs: Segment[];
  scale: number;
  l2: boolean;
  q: { x: Float64Array; rnorm: Float64Array | null };
  k: { x: Float64Array; rnorm: Float64Array | null };
  h0: Data | null;
}

function prepare(fn: string, inputs: GatedDeltaRuleRefInputs, options: GatedDeltaRuleRefOptions): Prepared {
  const d: Dims = { batch: options.batch, T: options.T, H: options.H, HV: options.HV, K: options.K, V: options.V };
  checkDims(fn, d);
  checkInputs(fn, d, inputs);
  const segs = segmentsOf(fn, options);
  const h0 = options.initialState ?? null;
  const stateLen = segs.length * d.HV * d.K * d.V;
  if (h0 && h0.length !== stateLen)
    throw new Error(`${fn}: initialState has ${h0.length} elements, expected ${stateLen}`);
  const l2 = options.useQkL2normInKernel ?? false;
  const rows = d.batch * d.T * d.H;
  return {
    d,
    segs,
    h0,
    l2,
    scale: options.scale ?? 1 / Math.sqrt(d.K),
    q: prepareQk(inputs.q, rows, d.K, l2),
    k: prepareQk(inputs.k, rows, d.K, l2),
  };
}

export function gatedDeltaRuleRef(
  inputs: GatedDeltaRuleRefInputs,
  options: GatedDeltaRuleRefOptions,
): GatedDeltaRuleRefOutputs {
  const p = prepare('gatedDeltaRuleRef', inputs, options);
  const { batch, T, H, HV, K, V } = p.d;
  const KV = K * V,
    group = HV / H;
  const o = new Float64Array(batch * T * HV * V);
  const finalState = options.outputFinalState ? new Float64Array(p.segs.length * HV * KV) : null;
  const states = options.returnStates ? new Float64Array(batch * T * HV * KV) : null;
  const S = new Float64Array(KV),
    u = new Float64Array(V);
  p.segs.forEach(({ b, start, length }, s) => {
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / group);
      for (let e = 0; e < KV; e++) S[e] = p.h0 ? p.h0[(s * HV + hv) * KV + e] : 0;
      for (let t = start; t < start + length; t++) {
        const bt = b * T + t,
          gi = bt * HV + hv,
          qk = (bt * H + h) * K;
        stepHead(S, K, V, p.q.x, qk, p.k.x, qk, inputs.v, gi * V, inputs.g[gi], inputs.beta[gi], p.scale, u, o, gi * V);
        if (states) states.set(S, gi * KV);
      }
      if (finalState) finalState.set(S, (s * HV + hv) * KV);
    }
  });
  return { o, finalState, states };
}

/**
 * Gradients of L = sum(dO * o) + sum(dFinal * finalState) with respect to every input (dFinal needs
 * outputFinalState; dInitialState is null unless initialState was given). dq / dk are summed over
 * the value heads that share a q / k head, and taken through the L2 norm when it is on.
 */
export function gatedDeltaRuleRefBackward(
  inputs: GatedDeltaRuleRefInputs,
  options: GatedDeltaRuleRefOptions,
  grads: { dO?: Data | null; dFinal?: Data | null },
): GatedDeltaRuleRefGrads {
  const fn = 'gatedDeltaRuleRefBackward';
  const p = prepare(fn, inputs, options);
  const { batch, T, H, HV, K, V } = p.d;
  const KV = K * V,
    group = HV / H,
    scale = p.scale;
  const dO = grads.dO ?? null,
    dFinal = grads.dFinal ?? null;
  if (dO && dO.length !== batch * T * HV * V)
    throw new Error(`${fn}: dO has ${dO.length} elements, expected ${batch * T * HV * V}`);
  if (dFinal) {
    if (!options.outputFinalState) throw new Error(`${fn}: dFinal given without outputFinalState`);
    if (dFinal.length !== p.segs.length * HV * KV)
      throw new Error(`${fn}: dFinal has ${dFinal.length} elements, expected ${p.segs.length * HV * KV}`);
  }
  const { v, g, beta } = inputs;
  const qx = p.q.x,
    kx = p.k.x;
  const dqn = new Float64Array(qx.length),
    dkn = new Float64Array(kx.length);
  const out: GatedDeltaRuleRefGrads = {
    dq: dqn,
    dk: dkn,
    dv: new Float64Array(v.length),
    dg: new Float64Array(g.length),
    dbeta: new Float64Array(beta.length),
    dInitialState: p.h0 ? new Float64Array(p.segs.length * HV * KV) : null,
  };
  const dS = new Float64Array(KV),
    u = new Float64Array(V),
    w = new Float64Array(V),
    dw = new Float64Array(V);
  const scratch = new Float64Array(V);
  p.segs.forEach(({ b, start, length }, s) => {
    // Ss[n * KV ..] = state after position start + n - 1 (n = 0: the initial state).
    const Ss = new Float64Array((length + 1) * KV);
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / group);
      for (let e = 0; e < KV; e++) Ss[e] = p.h0 ? p.h0[(s * HV + hv) * KV + e] : 0;
      for (let n = 0; n < length; n++) {
        const bt = b * T + start + n,
          gi = bt * HV + hv,
          qk = (bt * H + h) * K;
        const S = Ss.subarray((n + 1) * KV, (n + 2) * KV);
        S.set(Ss.subarray(n * KV, (n + 1) * KV));
        stepHead(S, K, V, qx, qk, kx, qk, v, gi * V, g[gi], beta[gi], scale, u, scratch, 0);
      }
      for (let e = 0; e < KV; e++) dS[e] = dFinal ? dFinal[(s * HV + hv) * KV + e] : 0;
      for (let n = length - 1; n >= 0; n--) {
        const bt = b * T + start + n,
          gi = bt * HV + hv,
          qk = (bt * H + h) * K,
          vo = gi * V;
        const prev = Ss.subarray(n * KV, (n + 1) * KV),
          cur = Ss.subarray((n + 1) * KV, (n + 2) * KV);
        const a = Math.exp(g[gi]),
          bb = beta[gi];
        // o = scale * S^T q
        if (dO) {
          for (let i = 0; i < K; i++) {
            let sq = 0;
            for (let j = 0; j < V; j++) {
              sq += cur[i * V + j] * dO[vo + j];
              dS[i * V + j] += scale * qx[qk + i] * dO[vo + j];
            }
            dqn[qk + i] += scale * sq;
          }
        }
        // S = a * prev + beta k w^T, w = v - a u, u = prev^T k
        for (let j = 0; j < V; j++) {
          let pk = 0,
            sk = 0;
          for (let i = 0; i < K; i++) {
            pk += prev[i * V + j] * kx[qk + i];
            sk += dS[i * V + j] * kx[qk + i];
          }
          u[j] = pk;
          w[j] = v[vo + j] - a * pk;
          dw[j] = bb * sk;
        }
        let dbeta = 0,
          da = 0;
        for (let i = 0; i < K; i++) {
          let sw = 0,
            pdu = 0;
          for (let j = 0; j < V; j++) {
            sw += dS[i * V + j] * w[j];
            da += dS[i * V + j] * prev[i * V + j];
            pdu += prev[i * V + j] * dw[j];
          }
          dbeta += kx[qk + i] * sw;
          // direct term beta * dS w, then through u: prev * du with du = -a dw
          dkn[qk + i] += bb * sw - a * pdu;
        }
        for (let j = 0; j < V; j++) {
          out.dv[vo + j] = dw[j];
          da -= dw[j] * u[j];
        }
        out.dbeta[gi] = dbeta;
        out.dg[gi] = da * a;
        for (let i = 0; i < K; i++) {
          for (let j = 0; j < V; j++) dS[i * V + j] = a * dS[i * V + j] - a * kx[qk + i] * dw[j];
        }
      }
      if (out.dInitialState) out.dInitialState.set(dS, (s * HV + hv) * KV);
    }
  });
  if (p.l2) {
    const rows = batch * T * H;
    out.dq = l2normBackward(dqn, qx, p.q.rnorm!, rows, K);
    out.dk = l2normBackward(dkn, kx, p.k.rnorm!, rows, K);
  }
  return out;
}

export interface GatedDeltaRuleStepRefInputs {
  /** [batch, HV, K, V]; read only (the new state is returned). */
  state: Data;
  /** q, k: [batch, T, H, K]; v: [batch, T, HV, V]; g, beta: [batch, T, HV] (one token: the same data without T). */
  q: Data;
  k: Data;
  v: Data;
  g: Data;
  beta: Data;
}

export interface GatedDeltaRuleStepRefOptions {
  batch: number;
  /** Tokens per call (default 1). */
  T?: number;
  H: number;
  HV: number;
  K: number;
  V: number;
  scale?: number;
  useQkL2normInKernel?: boolean;
}

export interface GatedDeltaRuleStepRefOutputs {
  /** [batch, T, HV, V]. */
  o: Float64Array;
  /** The state after the last token, [batch, HV, K, V]. */
  state: Float64Array;
  /** The state after every token, [batch, T, HV, K, V]. */
  intermediateStates: Float64Array;
}

/** The decode step: the same recurrence, advanced T tokens from `state` (one sequence per batch row). */
export function gatedDeltaRuleStepRef(
  inputs: GatedDeltaRuleStepRefInputs,
  options: GatedDeltaRuleStepRefOptions,
): GatedDeltaRuleStepRefOutputs {
  const fn = 'gatedDeltaRuleStepRef';
  const d: Dims = { batch: options.batch, T: options.T ?? 1, H: options.H, HV: options.HV, K: options.K, V: options.V };
  checkDims(fn, d);
  checkInputs(fn, d, inputs);
  const { batch, T, H, HV, K, V } = d;
  const KV = K * V,
    group = HV / H;
  if (inputs.state.length !== batch * HV * KV)
    throw new Error(`${fn}: state has ${inputs.state.length} elements, expected ${batch * HV * KV}`);
  const l2 = options.useQkL2normInKernel ?? false;
  const scale = options.scale ?? 1 / Math.sqrt(K);
  const q = prepareQk(inputs.q, batch * T * H, K, l2).x,
    k = prepareQk(inputs.k, batch * T * H, K, l2).x;
  const state = Float64Array.from(inputs.state);
  const o = new Float64Array(batch * T * HV * V);
  const intermediateStates = new Float64Array(batch * T * HV * KV);
  const u = new Float64Array(V);
  for (let b = 0; b < batch; b++) {
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / group);
      const S = state.subarray((b * HV + hv) * KV, (b * HV + hv + 1) * KV);
      for (let t = 0; t < T; t++) {
        const bt = b * T + t,
          gi = bt * HV + hv,
          qk = (bt * H + h) * K;
        const a = Math.exp(inputs.g[gi]),
          bb = inputs.beta[gi];
        // S <- a S; v' = beta (v - S^T k); S += k v'^T; o = scale S^T q
        for (let e = 0; e < KV; e++) S[e] *= a;
        for (let j = 0; j < V; j++) {
          let sk = 0;
          for (let i = 0; i < K; i++) sk += S[i * V + j] * k[qk + i];
          u[j] = bb * (inputs.v[gi * V + j] - sk);
        }
        for (let i = 0; i < K; i++) for (let j = 0; j < V; j++) S[i * V + j] += k[qk + i] * u[j];
        for (let j = 0; j < V; j++) {
          let sq = 0;
          for (let i = 0; i < K; i++) sq += S[i * V + j] * q[qk + i];
          o[gi * V + j] = scale * sq;
        }
        intermediateStates.set(S, gi * KV);
      }
    }
  }
  return { o, state, intermediateStates };
}
