// Float64 oracle of Mamba-2 (SSD; mamba_ssm's mamba_chunk_scan_combined, and its decode step): the
// plain per-token recurrence, and its gradients by reverse-mode differentiation written out token by
// token (checked against finite differences in tests/mamba2ScanReference.test.ts).
//
// Data: every array is flat, row-major, float64 or anything indexable; its shape comes from the dims
// in the options, never from lengths.
//
//   x, z, y ............. [batch, T, H, P]
//   dt .................. [batch, T, H]
//   A, dtBias ........... [H]
//   B, C ................ [batch, T, G, N]; head h reads group floor(h / (H / G))
//   D ................... [H], or [H, P] (dPerChannel)
//   states .............. [nseq, H, P, N] (initialStates, finalStates); nseq = batch, or
//                         cuSeqlens.length - 1 when packed (then batch == 1)
//   intermediate (step) . [batch, T, H, P, N]: the state after every token
//
// Math, per sequence, head h and position t (g the group of h, S the P x N state):
//   d = dt[t,h] + dtBias[h];  d = d > 20 ? d : log1p(exp(d))   (softplus only if dtSoftplus)
//   d = min(max(d, lo), hi)                                     (only if dtLimit = [lo, hi])
//   S[p][n] = exp(d A[h]) S[p][n] + d x[t,h,p] B[t,g,n],        S from initialStates or 0
//   y[t,h,p] = (sum_n S[p][n] C[t,g,n] + D[h or h,p] x[t,h,p]) * (z ? silu(z[t,h,p]) : 1)
// The softplus derivative is sigmoid(pre-softplus value), 1 above 20; the clamp's is 1 where
// lo < d < hi strictly and 0 elsewhere. (mamba_ssm clamps always, to (0, inf) by default, and passes
// the gradient at d == lo or hi too; here no dtLimit means no clamp, and the ends stop the gradient.)
// Packed input (cuSeqlens, non-decreasing, last <= T): sequence s covers positions [cuSeqlens[s],
// cuSeqlens[s+1]) of batch row 0 and starts from initialStates[s]; an empty one's final state is its
// initial state; positions in no sequence get y = 0 and zero gradients.

export interface Mamba2Dims {
  batch: number;
  T: number;
  H: number;
  P: number;
  G: number;
  N: number;
}
export interface Mamba2RefOptions extends Mamba2Dims {
  dtSoftplus?: boolean;
  /** [lo, hi]: clamp the effective time step (after softplus); null or absent: no clamp. */
  dtLimit?: readonly [number, number] | null;
  /** D is [H, P] rather than [H]. */
  dPerChannel?: boolean;
  initialStates?: ArrayLike<number> | null;
  cuSeqlens?: readonly number[] | null;
}
export interface Mamba2RefInputs {
  x: ArrayLike<number>;
  dt: ArrayLike<number>;
  A: ArrayLike<number>;
  B: ArrayLike<number>;
  C: ArrayLike<number>;
  D?: ArrayLike<number> | null;
  z?: ArrayLike<number> | null;
  dtBias?: ArrayLike<number> | null;
}
export interface Mamba2RefGrads {
  x: Float64Array;
  dt: Float64Array;
  A: Float64Array;
  B: Float64Array;
  C: Float64Array;
  D: Float64Array | null;
  z: Float64Array | null;
  dtBias: Float64Array | null;
  initialStates: Float64Array | null;
}
export interface Mamba2StepRefOptions extends Mamba2Dims {
  dtSoftplus?: boolean;
  dtLimit?: readonly [number, number] | null;
  dPerChannel?: boolean;
  /** The state before the first token, [batch, H, P, N]; read only. */
  state: ArrayLike<number>;
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));
const silu = (v: number) => v * sigmoid(v);
const siluGrad = (v: number) => {
  const s = sigmoid(v);
  return s * (1 + v * (1 - s));
};

type GateOptions = Pick<Mamba2RefOptions, 'H' | 'dtSoftplus' | 'dtLimit'>;

/** The effective time step at dt index i (head h), and its derivative with respect to dt[i]. */
function timeStep(x: Mamba2RefInputs, o: GateOptions, i: number, h: number): { d: number; grad: number } {
  let d = x.dt[i] + (x.dtBias ? x.dtBias[h] : 0);
  let grad = 1;
  if (o.dtSoftplus && d <= 20) {
    grad = sigmoid(d);
    d = Math.log1p(Math.exp(d));
  }
  if (o.dtLimit) {
    const [lo, hi] = o.dtLimit;
    if (!(d > lo && d < hi)) grad = 0;
    d = Math.min(Math.max(d, lo), hi);
  }
  return { d, grad };
}

const skip = (x: Mamba2RefInputs, o: { P: number; dPerChannel?: boolean }, h: number, p: number) =>
  x.D ? x.D[o.dPerChannel ? h * o.P + p : h] : 0;

function check(x: Mamba2RefInputs, o: Mamba2Dims & { dPerChannel?: boolean }, who: string) {
  const { batch, T, H, P, G, N } = o;
  if (!(G >= 1) || H % G !== 0) throw new Error(`${who}: H ${H} is not a multiple of G ${G}`);
  const need = (name: string, a: ArrayLike<number> | null | undefined, n: number) => {
    if (a && a.length !== n) throw new Error(`${who}: ${name} has ${a.length} elements, expected ${n}`);
  };
  need('x', x.x, batch * T * H * P);
  need('z', x.z, batch * T * H * P);
  need('dt', x.dt, batch * T * H);
  need('A', x.A, H);
  need('dtBias', x.dtBias, H);
  need('B', x.B, batch * T * G * N);
  need('C', x.C, batch * T * G * N);
  need('D', x.D, o.dPerChannel ? H * P : H);
}

/** One sequence: batch row b, positions [start, start + len); its index is its state slot. */
function segmentsOf(o: Mamba2RefOptions): { b: number; start: number; len: number }[] {
  const cu = o.cuSeqlens;
  if (!cu) return Array.from({ length: o.batch }, (_, b) => ({ b, start: 0, len: o.T }));
  if (o.batch !== 1) throw new Error('mamba2Ref: cuSeqlens requires batch == 1');
  for (let s = 0; s + 1 < cu.length; s++)
    if (!(cu[s] >= 0 && cu[s + 1] >= cu[s])) throw new Error('mamba2Ref: cuSeqlens must be non-decreasing from 0');
  if (cu.length && cu[cu.length - 1] > o.T) throw new Error('mamba2Ref: cuSeqlens exceeds T');
  return cu.slice(1).map((e, s) => ({ b: 0, start: cu[s], len: e - cu[s] }));
}

/**
 * The states of one (sequence, head): states[k * P * N + p * N + n] is S[p][n] after position
 * start + k - 1 (k = 0: the initial state), for k = 0 .. len.
 */
function scanHead(
  x: Mamba2RefInputs,
  o: Mamba2RefOptions,
  sg: { b: number; start: number; len: number },
  s: number,
  h: number,
): Float64Array {
  const { T, H, P, G, N } = o;
  const g = Math.floor(h / (H / G));
  const PN = P * N;
  const states = new Float64Array((sg.len + 1) * PN);
  if (o.initialStates) for (let e = 0; e < PN; e++) states[e] = o.initialStates[(s * H + h) * PN + e];
  for (let k = 0; k < sg.len; k++) {
    const row = sg.b * T + sg.start + k;
    const { d } = timeStep(x, o, row * H + h, h);
    const a = Math.exp(d * x.A[h]);
    for (let p = 0; p < P; p++) {
      const xv = x.x[(row * H + h) * P + p];
      for (let n = 0; n < N; n++)
        states[(k + 1) * PN + p * N + n] = a * states[k * PN + p * N + n] + d * xv * x.B[(row * G + g) * N + n];
    }
  }
  return states;
}

/** The output before the z gate at (row, h, p), from the state S after that position. */
function preGate(x: Mamba2RefInputs, o: Mamba2RefOptions, S: Float64Array, row: number, h: number, p: number) {
  const { H, P, G, N } = o;
  const g = Math.floor(h / (H / G));
  let acc = skip(x, o, h, p) * x.x[(row * H + h) * P + p];
  for (let n = 0; n < N; n++) acc += S[p * N + n] * x.C[(row * G + g) * N + n];
  return acc;
}

export function mamba2Ref(x: Mamba2RefInputs, o: Mamba2RefOptions): { y: Float64Array; finalStates: Float64Array } {
  check(x, o, 'mamba2Ref');
  const { batch, T, H, P, N } = o;
  const segs = segmentsOf(o);
  const PN = P * N;
  if (o.initialStates && o.initialStates.length !== segs.length * H * PN)
    throw new Error(
      `mamba2Ref: initialStates has ${o.initialStates.length} elements, expected ${segs.length * H * PN}`,
    );
  const y = new Float64Array(batch * T * H * P);
  const finalStates = new Float64Array(segs.length * H * PN);
  segs.forEach((sg, s) => {
    for (let h = 0; h < H; h++) {
      const states = scanHead(x, o, sg, s, h);
      for (let k = 0; k < sg.len; k++) {
        const row = sg.b * T + sg.start + k;
        const S = states.subarray((k + 1) * PN, (k + 2) * PN);
        for (let p = 0; p < P; p++) {
          const e = (row * H + h) * P + p;
          const pre = preGate(x, o, S, row, h, p);
          y[e] = x.z ? pre * silu(x.z[e]) : pre;
        }
      }
      finalStates.set(states.subarray(sg.len * PN), (s * H + h) * PN);
    }
  });
  return { y, finalStates };
}

/**
 * Gradients of L = sum(grads.y * y) + sum(grads.finalStates * finalStates) with respect to every
 * input (either grad may be null). D, z and dtBias are null where absent, initialStates null unless
 * given; B and C are summed over the heads of their group, A, D and dtBias over positions.
 */
export function mamba2RefBackward(
  x: Mamba2RefInputs,
  o: Mamba2RefOptions,
  grads: { y?: ArrayLike<number> | null; finalStates?: ArrayLike<number> | null },
): Mamba2RefGrads {
  check(x, o, 'mamba2RefBackward');
  const { T, H, P, G, N } = o;
  const segs = segmentsOf(o);
  const PN = P * N;
  const dy = grads.y ?? null,
    dFinal = grads.finalStates ?? null;
  if (dy && dy.length !== x.x.length) throw new Error('mamba2RefBackward: grads.y has the wrong length');
  if (dFinal && dFinal.length !== segs.length * H * PN)
    throw new Error('mamba2RefBackward: grads.finalStates has the wrong length');
  const out: Mamba2RefGrads = {
    x: new Float64Array(x.x.length),
    dt: new Float64Array(x.dt.length),
    A: new Float64Array(H),
    B: new Float64Array(x.B.length),
    C: new Float64Array(x.C.length),
    D: x.D ? new Float64Array(x.D.length) : null,
    z: x.z ? new Float64Array(x.z.length) : null,
    dtBias: x.dtBias ? new Float64Array(H) : null,
    initialStates: o.initialStates ? new Float64Array(segs.length * H * PN) : null,
  };
  segs.forEach((sg, s) => {
    for (let h = 0; h < H; h++) {
      const g = Math.floor(h / (H / G));
      const states = scanHead(x, o, sg, s, h);
      // gS = dL / dS after the current position, carried back through the recurrence.
      const gS = new Float64Array(PN);
      if (dFinal) for (let e = 0; e < PN; e++) gS[e] = dFinal[(s * H + h) * PN + e];
      for (let k = sg.len - 1; k >= 0; k--) {
        const row = sg.b * T + sg.start + k;
        const S = states.subarray((k + 1) * PN, (k + 2) * PN),
          prev = states.subarray(k * PN, (k + 1) * PN);
        const bOff = (row * G + g) * N;
        // The output: y = pre * silu(z), pre = S C + D x.
        for (let p = 0; p < P; p++) {
          const e = (row * H + h) * P + p;
          let gPre = dy ? dy[e] : 0;
          if (x.z) {
            out.z![e] = gPre * preGate(x, o, S, row, h, p) * siluGrad(x.z[e]);
            gPre *= silu(x.z[e]);
          }
          if (x.D) {
            out.D![o.dPerChannel ? h * P + p : h] += gPre * x.x[e];
            out.x[e] += gPre * x.D[o.dPerChannel ? h * P + p : h];
          }
          for (let n = 0; n < N; n++) {
            out.C[bOff + n] += gPre * S[p * N + n];
            gS[p * N + n] += gPre * x.C[bOff + n];
          }
        }
        // The update: S = a prev + d x B^T, a = exp(d A).
        const { d, grad } = timeStep(x, o, row * H + h, h);
        const a = Math.exp(d * x.A[h]);
        let gd = 0,
          ga = 0;
        for (let p = 0; p < P; p++) {
          const e = (row * H + h) * P + p;
          const xv = x.x[e];
          for (let n = 0; n < N; n++) {
            const gv = gS[p * N + n];
            ga += gv * prev[p * N + n];
            gd += gv * xv * x.B[bOff + n];
            out.B[bOff + n] += gv * d * xv;
            out.x[e] += gv * d * x.B[bOff + n];
            gS[p * N + n] = gv * a;
          }
        }
        // a = exp(d A): da/dd = a A, da/dA = a d.
        gd += ga * a * x.A[h];
        out.A[h] += ga * a * d;
        const gdt = gd * grad;
        out.dt[row * H + h] = gdt;
        if (out.dtBias) out.dtBias[h] += gdt;
      }
      if (out.initialStates) out.initialStates.set(gS, (s * H + h) * PN);
    }
  });
  return out;
}

/**
 * The decode step: T tokens of every batch row through the same recurrence, starting from
 * options.state. Returns y [batch, T, H, P], the state after the last token [batch, H, P, N] and the
 * state after every token [batch, T, H, P, N].
 */
export function mamba2StepRef(
  x: Mamba2RefInputs,
  o: Mamba2StepRefOptions,
): { y: Float64Array; state: Float64Array; intermediate: Float64Array } {
  check(x, o, 'mamba2StepRef');
  const { batch, T, H, P, G, N } = o;
  const PN = P * N;
  if (o.state.length !== batch * H * PN)
    throw new Error(`mamba2StepRef: state has ${o.state.length} elements, expected ${batch * H * PN}`);
  const state = Float64Array.from(o.state);
  const y = new Float64Array(batch * T * H * P);
  const intermediate = new Float64Array(batch * T * H * PN);
  for (let b = 0; b < batch; b++)
    for (let t = 0; t < T; t++) {
      const row = b * T + t;
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / (H / G));
        const { d } = timeStep(x, o, row * H + h, h);
        const a = Math.exp(d * x.A[h]);
        const S = state.subarray((b * H + h) * PN, (b * H + h + 1) * PN);
        for (let p = 0; p < P; p++) {
          const e = (row * H + h) * P + p;
          let acc = skip(x, o, h, p) * x.x[e];
          for (let n = 0; n < N; n++) {
            S[p * N + n] = a * S[p * N + n] + d * x.x[e] * x.B[(row * G + g) * N + n];
            acc += S[p * N + n] * x.C[(row * G + g) * N + n];
          }
          y[e] = x.z ? acc * silu(x.z[e]) : acc;
        }
        intermediate.set(S, (row * H + h) * PN);
      }
    }
  return { y, state, intermediate };
}
