// Float64 oracle of linear attention (lib/ops/linearAttention.ts): the plain per-token recurrence of
// each rule, and its gradients by reverse-mode differentiation written out token by token (checked
// against finite differences in tests/linearAttentionReference.test.ts). Also the gate activations.
export type Rule = 'linear' | 'gated' | 'delta' | 'gated_delta';

export interface LinAttnDims {
  batch: number;
  T: number;
  Hq: number;
  Hk: number;
  Hv: number;
  K: number;
  V: number;
}
export interface LinAttnRefOptions extends LinAttnDims {
  rule: Rule;
  perKey?: boolean;
  scale?: number;
  l2norm?: boolean;
  initialState?: ArrayLike<number> | null;
  cuSeqlens?: readonly number[] | null;
  window?: number;
}
/** q, k, v; g the effective log decay (Hv, or Hv x K per key); beta the effective rate (Hv heads). */
export interface LinAttnRefInputs {
  q: ArrayLike<number>;
  k: ArrayLike<number>;
  v: ArrayLike<number>;
  g?: ArrayLike<number> | null;
  beta?: ArrayLike<number> | null;
}

const decays = (r: Rule) => r === 'gated' || r === 'gated_delta';
const corrects = (r: Rule) => r === 'delta' || r === 'gated_delta';

function segmentsOf(o: LinAttnRefOptions): { b: number; start: number; len: number }[] {
  if (o.cuSeqlens)
    return o.cuSeqlens.slice(1).map((e, s) => ({ b: 0, start: o.cuSeqlens![s], len: e - o.cuSeqlens![s] }));
  return Array.from({ length: o.batch }, (_, b) => ({ b, start: 0, len: o.T }));
}

/** Output heads of state hv: [output head, query head] pairs. */
function outputsOf(o: LinAttnDims, hv: number): [number, number][] {
  if (o.Hq >= o.Hv) {
    const G = o.Hq / o.Hv;
    return Array.from({ length: G }, (_, g) => [hv * G + g, hv * G + g]);
  }
  return [[hv, Math.floor(hv / (o.Hv / o.Hq))]];
}

function l2rows(x: ArrayLike<number>, K: number, on: boolean): Float64Array {
  const out = Float64Array.from(x);
  if (!on) return out;
  for (let r = 0; r < out.length / K; r++) {
    let s = 1e-6;
    for (let i = 0; i < K; i++) s += out[r * K + i] ** 2;
    const n = Math.sqrt(s);
    for (let i = 0; i < K; i++) out[r * K + i] /= n;
  }
  return out;
}
/** The gradient through x / sqrt(|x|^2 + 1e-6), row by row. */
function l2rowsBackward(x: ArrayLike<number>, g: Float64Array, K: number): Float64Array {
  const out = new Float64Array(g.length);
  for (let r = 0; r < g.length / K; r++) {
    let s = 1e-6,
      d = 0;
    for (let i = 0; i < K; i++) {
      s += x[r * K + i] ** 2;
      d += x[r * K + i] * g[r * K + i];
    }
    const n = Math.sqrt(s);
    for (let i = 0; i < K; i++) out[r * K + i] = g[r * K + i] / n - (x[r * K + i] * d) / (n * n * n);
  }
  return out;
}

interface Trace {
  o: Float64Array;
  finalState: Float64Array;
  windowStates: Float64Array | null;
  /** Per (segment, state head, token): the state before and after, the update w and v - u. */
  steps: Map<string, { prev: Float64Array; next: Float64Array; w: Float64Array; r: Float64Array; a: Float64Array }>;
  qn: Float64Array;
  kn: Float64Array;
}

function run(x: LinAttnRefInputs, o: LinAttnRefOptions, keep: boolean): Trace {
  const { T, Hq, Hk, Hv, K, V, rule } = o;
  const Ho = Math.max(Hq, Hv);
  const scale = o.scale ?? 1 / Math.sqrt(K);
  const qn = l2rows(x.q, K, !!o.l2norm),
    kn = l2rows(x.k, K, !!o.l2norm);
  const segs = segmentsOf(o);
  const W = o.window ?? 0;
  const out = new Float64Array(o.batch * T * Ho * V);
  const fin = new Float64Array(segs.length * Hv * K * V);
  const win = W > 0 ? new Float64Array(W * segs.length * Hv * K * V) : null;
  const steps: Trace['steps'] = new Map();
  segs.forEach((sg, s) => {
    for (let hv = 0; hv < Hv; hv++) {
      const hk = Math.floor(hv / (Hv / Hk));
      let S = new Float64Array(K * V);
      if (o.initialState) for (let e = 0; e < K * V; e++) S[e] = o.initialState[(s * Hv + hv) * K * V + e];
      for (let t = 0; t < sg.len; t++) {
        const pos = sg.start + t;
        const gi = (sg.b * T + pos) * Hv + hv;
        const a = new Float64Array(K).fill(1);
        if (decays(rule)) for (let i = 0; i < K; i++) a[i] = Math.exp(o.perKey ? x.g![gi * K + i] : x.g![gi]);
        const kv = kn.subarray(((sg.b * T + pos) * Hk + hk) * K, ((sg.b * T + pos) * Hk + hk + 1) * K);
        const vv = Float64Array.from({ length: V }, (_, j) => x.v[gi * V + j]);
        const Sd = new Float64Array(K * V);
        for (let i = 0; i < K; i++) for (let j = 0; j < V; j++) Sd[i * V + j] = a[i] * S[i * V + j];
        const w = new Float64Array(V),
          r = new Float64Array(V);
        for (let j = 0; j < V; j++) {
          if (!corrects(rule)) {
            w[j] = vv[j];
            continue;
          }
          let u = 0;
          for (let i = 0; i < K; i++) u += kv[i] * Sd[i * V + j];
          r[j] = vv[j] - u;
          w[j] = x.beta![gi] * r[j];
        }
        const next = new Float64Array(K * V);
        for (let i = 0; i < K; i++) for (let j = 0; j < V; j++) next[i * V + j] = Sd[i * V + j] + kv[i] * w[j];
        for (const [oh, hq] of outputsOf(o, hv)) {
          const qv = qn.subarray(((sg.b * T + pos) * Hq + hq) * K, ((sg.b * T + pos) * Hq + hq + 1) * K);
          for (let j = 0; j < V; j++) {
            let acc = 0;
            for (let i = 0; i < K; i++) acc += qv[i] * next[i * V + j];
            out[((sg.b * T + pos) * Ho + oh) * V + j] = scale * acc;
          }
        }
        const slot = t - (sg.len - W);
        if (win && slot >= 0) win.set(next, ((slot * segs.length + s) * Hv + hv) * K * V);
        if (keep) steps.set(`${s}/${hv}/${t}`, { prev: S, next, w, r, a });
        S = next;
      }
      fin.set(S, (s * Hv + hv) * K * V);
    }
  });
  return { o: out, finalState: fin, windowStates: win, steps, qn, kn };
}

export function linearAttentionRef(x: LinAttnRefInputs, o: LinAttnRefOptions) {
  const r = run(x, o, false);
  return { o: r.o, finalState: r.finalState, windowStates: r.windowStates };
}

/** Gradients of every input from those of o and finalState (either may be null). */
export function linearAttentionRefBackward(
  x: LinAttnRefInputs,
  o: LinAttnRefOptions,
  dO: ArrayLike<number> | null,
  dFinal: ArrayLike<number> | null,
) {
  const { T, Hq, Hk, Hv, K, V, rule } = o;
  const Ho = Math.max(Hq, Hv);
  const scale = o.scale ?? 1 / Math.sqrt(K);
  const tr = run(x, o, true);
  const segs = segmentsOf(o);
  const dq = new Float64Array(x.q.length),
    dk = new Float64Array(x.k.length),
    dv = new Float64Array(x.v.length);
  const dg = decays(rule) ? new Float64Array(x.g!.length) : null;
  const dbeta = corrects(rule) ? new Float64Array(x.beta!.length) : null;
  const dh0 = new Float64Array(segs.length * Hv * K * V);
  segs.forEach((sg, s) => {
    for (let hv = 0; hv < Hv; hv++) {
      const hk = Math.floor(hv / (Hv / Hk));
      const D = new Float64Array(K * V);
      if (dFinal) for (let e = 0; e < K * V; e++) D[e] = dFinal[(s * Hv + hv) * K * V + e];
      for (let t = sg.len - 1; t >= 0; t--) {
        const pos = sg.start + t;
        const gi = (sg.b * T + pos) * Hv + hv;
        const st = tr.steps.get(`${s}/${hv}/${t}`)!;
        const kOff = ((sg.b * T + pos) * Hk + hk) * K;
        if (dO)
          for (const [oh, hq] of outputsOf(o, hv)) {
            const qOff = ((sg.b * T + pos) * Hq + hq) * K,
              oOff = ((sg.b * T + pos) * Ho + oh) * V;
            for (let i = 0; i < K; i++)
              for (let j = 0; j < V; j++) {
                D[i * V + j] += scale * tr.qn[qOff + i] * dO[oOff + j];
                dq[qOff + i] += scale * st.next[i * V + j] * dO[oOff + j];
              }
          }
        const dw = new Float64Array(V);
        for (let i = 0; i < K; i++)
          for (let j = 0; j < V; j++) {
            dw[j] += D[i * V + j] * tr.kn[kOff + i];
            dk[kOff + i] += D[i * V + j] * st.w[j];
          }
        if (corrects(rule)) {
          const beta = x.beta![gi];
          let db = 0;
          for (let j = 0; j < V; j++) {
            dv[gi * V + j] = beta * dw[j];
            db += dw[j] * st.r[j];
          }
          dbeta![gi] = db;
          for (let i = 0; i < K; i++)
            for (let j = 0; j < V; j++) {
              const du = -beta * dw[j];
              D[i * V + j] += tr.kn[kOff + i] * du;
              dk[kOff + i] += st.a[i] * st.prev[i * V + j] * du;
            }
        } else {
          for (let j = 0; j < V; j++) dv[gi * V + j] = dw[j];
        }
        if (decays(rule)) {
          for (let i = 0; i < K; i++) {
            let d = 0;
            for (let j = 0; j < V; j++) d += D[i * V + j] * st.a[i] * st.prev[i * V + j];
            if (o.perKey) dg![gi * K + i] = d;
            else dg![gi] += d;
          }
        }
        for (let i = 0; i < K; i++) for (let j = 0; j < V; j++) D[i * V + j] *= st.a[i];
      }
      dh0.set(D, (s * Hv + hv) * K * V);
    }
  });
  return {
    q: o.l2norm ? l2rowsBackward(x.q, dq, K) : dq,
    k: o.l2norm ? l2rowsBackward(x.k, dk, K) : dk,
    v: dv,
    g: dg,
    beta: dbeta,
    initialState: dh0,
  };
}

// ---- the gate activations ----
export interface GateRefOptions {
  rows: number;
  Hv: number;
  K: number;
  perKey: boolean;
  qwen: boolean;
  sigmoid: boolean;
  betaHeads: number;
}
export interface GateRefInputs {
  decay?: ArrayLike<number> | null;
  beta?: ArrayLike<number> | null;
  aLog?: ArrayLike<number> | null;
  dtBias?: ArrayLike<number> | null;
}
const softplus = (x: number) => Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x)));
const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));

function gateParts(x: GateRefInputs, o: GateRefOptions, e: number) {
  const per = o.perKey ? o.K : 1;
  const h = Math.floor(e / per) % o.Hv;
  const biasPerKey = !!x.dtBias && x.dtBias.length === o.Hv * o.K && o.perKey && o.K > 1;
  const bias = x.dtBias ? x.dtBias[biasPerKey ? e % (o.Hv * o.K) : h] : 0;
  return { h, bi: biasPerKey ? e % (o.Hv * o.K) : h, xv: x.decay![e] + bias };
}

export function gatesRef(x: GateRefInputs, o: GateRefOptions) {
  const g = x.decay
    ? Float64Array.from({ length: x.decay.length }, (_, e) => {
        if (!o.qwen) return x.decay![e];
        const { h, xv } = gateParts(x, o, e);
        return -Math.exp(x.aLog![h]) * softplus(xv);
      })
    : null;
  const beta = x.beta
    ? Float64Array.from({ length: o.rows * o.Hv }, (_, e) => {
        const b = x.beta![o.betaHeads === 1 ? Math.floor(e / o.Hv) : e];
        return o.sigmoid ? sigmoid(b) : b;
      })
    : null;
  return { g, beta };
}

export function gatesRefBackward(
  x: GateRefInputs,
  o: GateRefOptions,
  dg: ArrayLike<number> | null,
  db: ArrayLike<number> | null,
) {
  const ddecay = x.decay && dg ? new Float64Array(x.decay.length) : null;
  const daLog = o.qwen && x.aLog ? new Float64Array(o.Hv) : null;
  const ddtBias = o.qwen && x.dtBias ? new Float64Array(x.dtBias.length) : null;
  if (ddecay)
    for (let e = 0; e < ddecay.length; e++) {
      if (!o.qwen) {
        ddecay[e] = dg![e];
        continue;
      }
      const { h, bi, xv } = gateParts(x, o, e);
      const A = -Math.exp(x.aLog![h]);
      ddecay[e] = dg![e] * A * sigmoid(xv);
      daLog![h] += dg![e] * A * softplus(xv);
      if (ddtBias) ddtBias[bi] += ddecay[e];
    }
  const dbeta = x.beta && db ? new Float64Array(x.beta.length) : null;
  if (dbeta)
    for (let e = 0; e < o.rows * o.Hv; e++) {
      const src = o.betaHeads === 1 ? Math.floor(e / o.Hv) : e;
      const s = sigmoid(x.beta![src]);
      dbeta[src] += db![e] * (o.sigmoid ? s * (1 - s) : 1);
    }
  return { decay: ddecay, beta: dbeta, aLog: daLog, dtBias: ddtBias };
}
