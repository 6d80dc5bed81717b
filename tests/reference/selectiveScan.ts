// Float64 oracle of the Mamba-1 selective scan: the plain sequential recurrence, its backward written
// out by hand (reverse time through the same loop), and the decode step (selective state update).
//
// Data: every array is flat, row-major, float64 or anything indexable (Float32Array from dataSync(),
// number[]); its shape is given by the dims in the options, never inferred from lengths.
//
//   u, delta, z, y, du, ddelta, dz, dy ...... [batch, dim, seqlen]
//   A, dA ................................... [dim, dstate]
//   B, C, dB, dC: constant .................. [dim, dstate]                    (variableB/C false)
//                 variable .................. [batch, groups, dstate, seqlen]  (variableB/C true)
//                 channel d reads group floor(d / (dim / groups))
//   D, deltaBias, dD, dDeltaBias ............ [dim]
//   initialState, finalState, dFinal,
//   dInitialState ........................... [nseq, dim, dstate]; nseq = batch, or
//                                             cuSeqlens.length - 1 when packed (then batch == 1)
//   states (returnStates) ................... [batch, seqlen, dim, dstate]: the state after each position
//                                             (zeros at positions in no sequence)
//
// Math, per channel d, state n and position t of a sequence:
//   dt     = delta + deltaBias[d];  dt = dt <= 20 ? log1p(exp(dt)) : dt   (softplus only if deltaSoftplus)
//   x_t[n] = exp(dt * A[d,n]) * x_{t-1}[n] + dt * B_t[n] * u_t,  x_{-1} = initialState or 0
//   y_t    = (sum_n x_t[n] * C_t[n] + D[d] * u_t) * (z ? z_t * sigmoid(z_t) : 1)
// Packed input (cuSeqlens, nseq + 1 entries from 0, non-decreasing, last <= seqlen): sequence s covers
// positions [cuSeqlens[s], cuSeqlens[s+1]) of batch row 0 and starts from initialState[s]; positions
// after the last sequence get y = 0 and zero gradients.

export type Data = ArrayLike<number>;

export interface SelectiveScanRefInputs {
  u: Data;
  delta: Data;
  A: Data;
  B: Data;
  C: Data;
  D?: Data | null;
  z?: Data | null;
  deltaBias?: Data | null;
}

export interface SelectiveScanRefOptions {
  batch: number;
  dim: number;
  seqlen: number;
  dstate: number;
  /** Groups of a variable B / C (default 1); dim % groups must be 0. */
  groups?: number;
  variableB: boolean;
  variableC: boolean;
  deltaSoftplus?: boolean;
  initialState?: Data | null;
  cuSeqlens?: Data | null;
  /** Also return the state after every position (see `states` above). */
  returnStates?: boolean;
}

export interface SelectiveScanRefOutputs {
  y: Float64Array;
  finalState: Float64Array;
  states: Float64Array | null;
}

export interface SelectiveScanRefGrads {
  du: Float64Array;
  ddelta: Float64Array;
  dA: Float64Array;
  dB: Float64Array;
  dC: Float64Array;
  dD: Float64Array | null;
  dz: Float64Array | null;
  dDeltaBias: Float64Array | null;
  dInitialState: Float64Array | null;
}

export const SOFTPLUS_THRESHOLD = 20;

export function softplus(x: number): number {
  return x <= SOFTPLUS_THRESHOLD ? Math.log1p(Math.exp(x)) : x;
}

/** The derivative the kernels use: sigmoid(x) below the threshold, 1 above. */
export function softplusGrad(x: number): number {
  return x <= SOFTPLUS_THRESHOLD ? 1 / (1 + Math.exp(-x)) : 1;
}

export function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

export function silu(x: number): number {
  return x * sigmoid(x);
}

export function siluGrad(x: number): number {
  const s = sigmoid(x);
  return s * (1 + x * (1 - s));
}

/** One sequence: batch row b, positions [start, start + length); its index is its state slot. */
export interface Segment {
  b: number;
  start: number;
  length: number;
}

/** The sequences of a (possibly packed) batch, checked against the contract. */
export function segmentsOf(o: Pick<SelectiveScanRefOptions, 'batch' | 'seqlen' | 'cuSeqlens'>): Segment[] {
  if (!o.cuSeqlens) return Array.from({ length: o.batch }, (_, b) => ({ b, start: 0, length: o.seqlen }));
  const cu = Array.from(o.cuSeqlens);
  if (o.batch !== 1) throw new Error('selectiveScanRef: cuSeqlens requires batch == 1');
  if (cu.length < 1 || cu[0] !== 0) throw new Error('selectiveScanRef: cuSeqlens must start at 0');
  const segs: Segment[] = [];
  for (let s = 0; s + 1 < cu.length; s++) {
    if (!(cu[s + 1] >= cu[s])) throw new Error('selectiveScanRef: cuSeqlens must be non-decreasing');
    segs.push({ b: 0, start: cu[s], length: cu[s + 1] - cu[s] });
  }
  if (cu[cu.length - 1] > o.seqlen) throw new Error('selectiveScanRef: cuSeqlens exceeds seqlen');
  return segs;
}

interface Layout {
  batch: number;
  dim: number;
  L: number;
  N: number;
  groups: number;
  perGroup: number;
  variableB: boolean;
  variableC: boolean;
}

function layoutOf(o: SelectiveScanRefOptions, i: SelectiveScanRefInputs): Layout {
  const groups = o.groups ?? 1;
  if (!(groups >= 1) || o.dim % groups !== 0)
    throw new Error(`selectiveScanRef: dim ${o.dim} is not a multiple of groups ${groups}`);
  const ly = {
    batch: o.batch,
    dim: o.dim,
    L: o.seqlen,
    N: o.dstate,
    groups,
    perGroup: o.dim / groups,
    variableB: o.variableB,
    variableC: o.variableC,
  };
  const need = (name: string, a: Data | null | undefined, n: number) => {
    if (a && a.length !== n) throw new Error(`selectiveScanRef: ${name} has ${a.length} elements, expected ${n}`);
  };
  const BDL = o.batch * o.dim * o.seqlen,
    varLen = o.batch * groups * o.dstate * o.seqlen,
    constLen = o.dim * o.dstate;
  need('u', i.u, BDL);
  need('delta', i.delta, BDL);
  need('z', i.z, BDL);
  need('A', i.A, constLen);
  need('B', i.B, o.variableB ? varLen : constLen);
  need('C', i.C, o.variableC ? varLen : constLen);
  need('D', i.D, o.dim);
  need('deltaBias', i.deltaBias, o.dim);
  return ly;
}

/** Index of B_t[n] (or C) for batch row b, channel d. */
function bcIndex(ly: Layout, variable: boolean, b: number, d: number, n: number, t: number): number {
  if (!variable) return d * ly.N + n;
  const g = Math.floor(d / ly.perGroup);
  return ((b * ly.groups + g) * ly.N + n) * ly.L + t;
}

function dtAt(i: SelectiveScanRefInputs, softplusOn: boolean, d: number, idx: number): { raw: number; dt: number } {
  const raw = i.delta[idx] + (i.deltaBias ? i.deltaBias[d] : 0);
  return { raw, dt: softplusOn ? softplus(raw) : raw };
}

export function selectiveScanRef(
  inputs: SelectiveScanRefInputs,
  options: SelectiveScanRefOptions,
): SelectiveScanRefOutputs {
  const ly = layoutOf(options, inputs);
  const { dim, L, N } = ly;
  const segs = segmentsOf(options);
  const nseq = segs.length;
  const h0 = options.initialState ?? null;
  if (h0 && h0.length !== nseq * dim * N)
    throw new Error(`selectiveScanRef: initialState has ${h0.length} elements, expected ${nseq * dim * N}`);
  const sp = options.deltaSoftplus ?? false;
  const { u, A, B, C, D, z } = inputs;
  const y = new Float64Array(ly.batch * dim * L);
  const finalState = new Float64Array(nseq * dim * N);
  const states = options.returnStates ? new Float64Array(ly.batch * L * dim * N) : null;
  const x = new Float64Array(N);
  for (let s = 0; s < nseq; s++) {
    const { b, start, length } = segs[s];
    for (let d = 0; d < dim; d++) {
      for (let n = 0; n < N; n++) x[n] = h0 ? h0[(s * dim + d) * N + n] : 0;
      for (let t = start; t < start + length; t++) {
        const idx = (b * dim + d) * L + t;
        const { dt } = dtAt(inputs, sp, d, idx);
        let acc = 0;
        for (let n = 0; n < N; n++) {
          x[n] = Math.exp(dt * A[d * N + n]) * x[n] + dt * B[bcIndex(ly, ly.variableB, b, d, n, t)] * u[idx];
          acc += x[n] * C[bcIndex(ly, ly.variableC, b, d, n, t)];
          if (states) states[((b * L + t) * dim + d) * N + n] = x[n];
        }
        acc += (D ? D[d] : 0) * u[idx];
        y[idx] = z ? acc * silu(z[idx]) : acc;
      }
      for (let n = 0; n < N; n++) finalState[(s * dim + d) * N + n] = x[n];
    }
  }
  return { y, finalState, states };
}

/**
 * Gradients of L = sum(dy * y) + sum(dFinal * finalState) with respect to every input (null for
 * absent optional inputs; dInitialState is null unless initialState was given). dB / dC have the
 * layout of B / C: a constant one is summed over batch and time, a variable one over the channels
 * of its group.
 */
export function selectiveScanRefBackward(
  inputs: SelectiveScanRefInputs,
  options: SelectiveScanRefOptions,
  grads: { dy?: Data | null; dFinal?: Data | null },
): SelectiveScanRefGrads {
  const ly = layoutOf(options, inputs);
  const { dim, L, N } = ly;
  const segs = segmentsOf(options);
  const nseq = segs.length;
  const h0 = options.initialState ?? null;
  const sp = options.deltaSoftplus ?? false;
  const { u, A, B, C, D, z } = inputs;
  const dy = grads.dy ?? null,
    dFinal = grads.dFinal ?? null;
  if (dy && dy.length !== ly.batch * dim * L) throw new Error('selectiveScanRefBackward: dy has the wrong length');
  if (dFinal && dFinal.length !== nseq * dim * N)
    throw new Error('selectiveScanRefBackward: dFinal has the wrong length');
  const out: SelectiveScanRefGrads = {
    du: new Float64Array(u.length),
    ddelta: new Float64Array(u.length),
    dA: new Float64Array(A.length),
    dB: new Float64Array(B.length),
    dC: new Float64Array(C.length),
    dD: D ? new Float64Array(dim) : null,
    dz: z ? new Float64Array(u.length) : null,
    dDeltaBias: inputs.deltaBias ? new Float64Array(dim) : null,
    dInitialState: h0 ? new Float64Array(nseq * dim * N) : null,
  };
  const gx = new Float64Array(N);
  for (let s = 0; s < nseq; s++) {
    const { b, start, length } = segs[s];
    // xs[k * N + n] = state after position start + k - 1 (k = 0: the initial state).
    const xs = new Float64Array((length + 1) * N);
    for (let d = 0; d < dim; d++) {
      for (let n = 0; n < N; n++) xs[n] = h0 ? h0[(s * dim + d) * N + n] : 0;
      for (let k = 0; k < length; k++) {
        const t = start + k,
          idx = (b * dim + d) * L + t;
        const { dt } = dtAt(inputs, sp, d, idx);
        for (let n = 0; n < N; n++) {
          xs[(k + 1) * N + n] =
            Math.exp(dt * A[d * N + n]) * xs[k * N + n] + dt * B[bcIndex(ly, ly.variableB, b, d, n, t)] * u[idx];
        }
      }
      for (let n = 0; n < N; n++) gx[n] = dFinal ? dFinal[(s * dim + d) * N + n] : 0;
      for (let k = length - 1; k >= 0; k--) {
        const t = start + k,
          idx = (b * dim + d) * L + t;
        const { raw, dt } = dtAt(inputs, sp, d, idx);
        const g = dy ? dy[idx] : 0;
        let gyc = g; // dL / d(sum_n x C + D u)
        if (z) {
          let yc = (D ? D[d] : 0) * u[idx];
          for (let n = 0; n < N; n++) yc += xs[(k + 1) * N + n] * C[bcIndex(ly, ly.variableC, b, d, n, t)];
          out.dz![idx] = g * yc * siluGrad(z[idx]);
          gyc = g * silu(z[idx]);
        }
        if (D) {
          out.dD![d] += gyc * u[idx];
          out.du[idx] += gyc * D[d];
        }
        let gdt = 0;
        for (let n = 0; n < N; n++) {
          const ci = bcIndex(ly, ly.variableC, b, d, n, t),
            bi = bcIndex(ly, ly.variableB, b, d, n, t);
          const a = A[d * N + n],
            decay = Math.exp(dt * a),
            prev = xs[k * N + n];
          out.dC[ci] += gyc * xs[(k + 1) * N + n];
          const gn = gx[n] + gyc * C[ci]; // dL / dx_t[n]
          // x_t = decay * prev + dt * B * u
          gdt += gn * (prev * decay * a + B[bi] * u[idx]);
          out.dA[d * N + n] += gn * prev * decay * dt;
          out.dB[bi] += gn * dt * u[idx];
          out.du[idx] += gn * dt * B[bi];
          gx[n] = gn * decay;
        }
        const gdelta = sp ? gdt * softplusGrad(raw) : gdt;
        out.ddelta[idx] = gdelta;
        if (out.dDeltaBias) out.dDeltaBias[d] += gdelta;
      }
      if (out.dInitialState) for (let n = 0; n < N; n++) out.dInitialState[(s * dim + d) * N + n] = gx[n];
    }
  }
  return out;
}

export interface SelectiveStateUpdateRefInputs {
  /** [batch, dim, dstate]; read only (the new state is returned). */
  state: Data;
  /** x, dt, z: [batch, dim, tokens] (one token: [batch, dim], the same data). */
  x: Data;
  dt: Data;
  A: Data;
  /** B, C: [batch, groups, dstate, tokens] (one token: [batch, groups, dstate] or, groups 1, [batch, dstate]). */
  B: Data;
  C: Data;
  D?: Data | null;
  z?: Data | null;
  dtBias?: Data | null;
}

export interface SelectiveStateUpdateRefOptions {
  batch: number;
  dim: number;
  dstate: number;
  groups?: number;
  /** Tokens per call (default 1). */
  tokens?: number;
  dtSoftplus?: boolean;
}

export interface SelectiveStateUpdateRefOutputs {
  /** [batch, dim, tokens] (one token: [batch, dim]). */
  y: Float64Array;
  /** The state after the last token, [batch, dim, dstate]. */
  state: Float64Array;
  /** The state after every token, [batch, tokens, dim, dstate]. */
  intermediateStates: Float64Array;
}

/** The decode step: the same recurrence, advanced `tokens` steps from `state`. */
export function selectiveStateUpdateRef(
  inputs: SelectiveStateUpdateRefInputs,
  options: SelectiveStateUpdateRefOptions,
): SelectiveStateUpdateRefOutputs {
  const { batch, dim, dstate: N } = options;
  const groups = options.groups ?? 1,
    T = options.tokens ?? 1;
  if (dim % groups !== 0) throw new Error(`selectiveStateUpdateRef: dim ${dim} is not a multiple of groups ${groups}`);
  const { x, dt: dtIn, A, B, C, D, z, dtBias } = inputs;
  if (inputs.state.length !== batch * dim * N) throw new Error('selectiveStateUpdateRef: state has the wrong length');
  if (x.length !== batch * dim * T || dtIn.length !== batch * dim * T)
    throw new Error('selectiveStateUpdateRef: x / dt have the wrong length');
  if (B.length !== batch * groups * N * T || C.length !== batch * groups * N * T)
    throw new Error('selectiveStateUpdateRef: B / C have the wrong length');
  const sp = options.dtSoftplus ?? false;
  const state = Float64Array.from(inputs.state);
  const y = new Float64Array(batch * dim * T);
  const intermediateStates = new Float64Array(batch * T * dim * N);
  for (let b = 0; b < batch; b++) {
    for (let d = 0; d < dim; d++) {
      const g = Math.floor(d / (dim / groups));
      for (let t = 0; t < T; t++) {
        const idx = (b * dim + d) * T + t;
        const raw = dtIn[idx] + (dtBias ? dtBias[d] : 0);
        const dt = sp ? softplus(raw) : raw;
        let acc = (D ? D[d] : 0) * x[idx];
        for (let n = 0; n < N; n++) {
          const si = (b * dim + d) * N + n,
            bc = ((b * groups + g) * N + n) * T + t;
          state[si] = Math.exp(dt * A[d * N + n]) * state[si] + dt * B[bc] * x[idx];
          acc += state[si] * C[bc];
          intermediateStates[((b * T + t) * dim + d) * N + n] = state[si];
        }
        y[idx] = z ? acc * silu(z[idx]) : acc;
      }
    }
  }
  return { y, state, intermediateStates };
}
