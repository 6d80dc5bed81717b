// Cross-check of the CPU kernels against an independent implementation: ONNX Runtime's CPU kernels
// (onnxruntime-node, a dev dependency; models built in memory by bench/peers/ort.mjs). At small,
// awkward sizes, float32 both sides:
//   fusedRnn lstm / gru (one head of the full hidden size) against ONNX LSTM / GRU
//     (linear_before_reset = 1), with an input size of its own: our wx is x W^T (+ the GRU's input
//     bias of n) computed here in float64 from ONNX's W and X; initial states with and without;
//   gatedDeltaRule forward against com.microsoft.LinearAttention (update_rule gated_delta), with
//     and without an initial state, grouped heads, a given scale; the final state too;
//   and com.microsoft.GatedDeltaNet where this ORT has a CPU kernel for it;
//   linearAttention against com.microsoft.LinearAttention for every update rule, both decay shapes,
//   grouped queries both ways and a beta shared by the heads, with and without an initial state.
// Each comparison also reports both sides' distance to the float64 oracle, to tell which one is off.
// Layouts: ONNX LSTM gates are (i, o, f, c) and GRU gates (z, r, h), W [G*H, I] and R [G*H, H] row
// per output channel (x W^T, h R^T); ours: LSTM (i, f, z, o), GRU (r, z, n), R[g][0][i][j] multiplies
// h[i] into output j (h R), so R_ours[g][0][i][j] = R_onnx[gate(g) * H + j][i].
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { tensor, values } from './helpers';
import { fusedRnnRef } from './reference/fusedRnn';
import { gatedDeltaRuleRef } from './reference/gatedDeltaRule';
import { linearAttentionRef, type Rule } from './reference/linearAttention';
import { mamba2Ref } from './reference/mamba2Scan';
import { freshSeed, normal, relErr, rng, uniform } from './reference/util';
// @ts-expect-error: a JavaScript module without type declarations
import { ortGatedDeltaNet, ortGru, ortLinearAttention, ortLstm, ortStatus } from '../bench/peers/ort.mjs';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const TOL = 1e-5;
const status = ortStatus();

/** The ORT helpers return null without onnxruntime-node: fail loudly, it is a dev dependency. */
function need<T>(x: T | null): T {
  if (x === null)
    throw new Error(`onnxruntime-node is a dev dependency of this package and must load: ${status.reason}`);
  return x;
}

/** Rounded to float32: the inputs both implementations see. */
const f32 = (x: ArrayLike<number>) => Float64Array.from(Float32Array.from(x));
type Arr = ArrayLike<number>;

function compare(what: string, ours: Arr, ort: Arr, ref: Arr) {
  const e = relErr(ours, ort);
  const detail =
    `${what}: ours vs ORT ${e.toExponential(2)}; vs float64 oracle: ours ${relErr(ours, ref).toExponential(2)}, ` +
    `ORT ${relErr(ort, ref).toExponential(2)}`;
  expect(e, at(detail)).toBeLessThan(TOL);
}

describe('onnxruntime-node', () => {
  it('loads (it is a dev dependency: install with ONNXRUNTIME_NODE_INSTALL=skip npm ci)', () => {
    expect(status.ok, status.reason ?? '').toBe(true);
  });
});

interface RnnCase {
  cell: 'lstm' | 'gru';
  batch: number;
  T: number;
  I: number;
  H: number;
  states0: boolean;
}

// ONNX gate index of each of our gates.
const ONNX_GATE = { lstm: [0, 2, 3, 1], gru: [1, 0, 2] } as const;

async function rnnCase(c: RnnCase) {
  const { cell, batch, T, I, H } = c;
  const G = cell === 'lstm' ? 4 : 3,
    S = cell === 'lstm' ? 2 : 1;
  const s = 1.2 / Math.sqrt(H);
  const W = f32(normal(rand, G * H * I, 1 / Math.sqrt(I))),
    R = f32(normal(rand, G * H * H, s));
  const B = f32(normal(rand, 2 * G * H, 0.3)),
    X = f32(normal(rand, T * batch * I));
  const s0 = f32(normal(rand, S * batch * H, 0.5)); // [S, batch, H]: h then c, as ONNX's initial_h / initial_c
  const make = cell === 'lstm' ? ortLstm : ortGru;
  const session = need(
    await make({
      batch,
      T,
      input: I,
      hidden: H,
      threads: 1,
      initialStates: c.states0,
      weights: { W: Float32Array.from(W), R: Float32Array.from(R), B: Float32Array.from(B) },
    }),
  );
  const feeds: Record<string, Float32Array> = { X: Float32Array.from(X) };
  if (c.states0) {
    feeds.initial_h = Float32Array.from(s0.subarray(0, batch * H));
    if (cell === 'lstm') feeds.initial_c = Float32Array.from(s0.subarray(batch * H));
  }
  const out = await session.run(feeds);
  await session.close();

  // Ours: wx [batch, T, G, 1, H], R [G, 1, H, H], b [G, 1, H].
  const wx = new Float64Array(batch * T * G * H),
    Ro = new Float64Array(G * H * H),
    bo = new Float64Array(G * H);
  for (let g = 0; g < G; g++) {
    const og = ONNX_GATE[cell][g];
    const nGate = cell === 'gru' && g === 2;
    for (let j = 0; j < H; j++) {
      const row = og * H + j;
      for (let i = 0; i < H; i++) Ro[(g * H + i) * H + j] = R[row * H + i];
      // The GRU's n gate: the input bias goes with wx, the recurrent one inside r * (h R + b).
      bo[g * H + j] = nGate ? B[G * H + row] : B[row] + B[G * H + row];
      for (let b = 0; b < batch; b++) {
        for (let t = 0; t < T; t++) {
          let acc = nGate ? B[row] : 0;
          for (let i = 0; i < I; i++) acc += X[(t * batch + b) * I + i] * W[row * I + i];
          wx[((b * T + t) * G + g) * H + j] = acc;
        }
      }
    }
  }
  const ours = rk.fusedRnn(
    {
      wx: tensor(wx, [batch, T, G, 1, H]),
      R: tensor(Ro, [G, 1, H, H]),
      b: tensor(bo, [G, 1, H]),
      states0: c.states0 ? tensor(s0, [S, batch, 1, H]) : null,
    },
    { cell },
  );
  const ref = fusedRnnRef(
    { wx: f32(wx), R: Ro, b: f32(bo), states0: c.states0 ? s0 : null },
    { cell, batch, seqlen: T, heads: 1, headDim: H },
  );

  // ONNX Y [T, 1, batch, H] to ours [batch, T, 1, H].
  const Y = out.Y as Float32Array,
    y = new Float64Array(batch * T * H);
  for (let t = 0; t < T; t++)
    for (let b = 0; b < batch; b++) for (let j = 0; j < H; j++) y[(b * T + t) * H + j] = Y[(t * batch + b) * H + j];
  const finals = cell === 'lstm' ? [...out.Y_h, ...out.Y_c] : [...out.Y_h];
  compare('h', values(ours.h), y, ref.h);
  compare('final states', values(ours.finalStates), finals, ref.finalStates);
  ours.h.dispose();
  ours.finalStates.dispose();
}

describe('fusedRnn (one head) vs ONNX Runtime LSTM / GRU', () => {
  const cases: RnnCase[] = [];
  for (const cell of ['lstm', 'gru'] as const) {
    cases.push(
      { cell, batch: 3, T: 7, I: 5, H: 5, states0: true },
      { cell, batch: 3, T: 7, I: 4, H: 17, states0: false },
      { cell, batch: 2, T: 9, I: 1, H: 33, states0: true },
    );
  }
  it.each(
    cases.map(
      (c) =>
        [`${c.cell} batch ${c.batch} T ${c.T} input ${c.I} hidden ${c.H}${c.states0 ? ' states0' : ''}`, c] as const,
    ),
  )('%s', async (_n, c) => rnnCase(c));
});

interface GdnCase {
  batch: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
  h0: boolean;
  scale?: number;
  l2InOurs: boolean;
}

/** Unit-norm rows (the delta rule's contract for k; ORT normalises nothing), in float64. */
function unitRows(x: Float64Array, n: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / n; r++) {
    let s = 0;
    for (let i = 0; i < n; i++) s += x[r * n + i] ** 2;
    for (let i = 0; i < n; i++) out[r * n + i] = x[r * n + i] / Math.sqrt(s);
  }
  return out;
}

function gdnData(c: GdnCase) {
  const { batch, T, H, HV, K, V } = c;
  const qRaw = normal(rand, batch * T * H * K),
    kRaw = normal(rand, batch * T * H * K);
  const g = Float64Array.from(uniform(rand, batch * T * HV, -2, 0), (x, i) => (i % 5 === 0 ? 0 : x));
  return {
    qRaw,
    kRaw,
    q: f32(unitRows(qRaw, K)),
    k: f32(unitRows(kRaw, K)),
    v: f32(normal(rand, batch * T * HV * V)),
    g: f32(g),
    beta: f32(uniform(rand, batch * T * HV, 0.05, 1)),
    h0: f32(normal(rand, batch * HV * K * V, 0.5)),
  };
}

/** Ours (q, k normalised by the caller, or raw with the in-kernel norm) and the float64 oracle. */
function gdnOurs(c: GdnCase, d: ReturnType<typeof gdnData>) {
  const { batch, T, H, HV, K, V } = c;
  const q = c.l2InOurs ? d.qRaw : d.q,
    k = c.l2InOurs ? d.kRaw : d.k;
  const ours = rk.gatedDeltaRule(
    {
      q: tensor(q, [batch, T, H, K]),
      k: tensor(k, [batch, T, H, K]),
      v: tensor(d.v, [batch, T, HV, V]),
      g: tensor(d.g, [batch, T, HV]),
      beta: tensor(d.beta, [batch, T, HV]),
    },
    {
      initialState: c.h0 ? tensor(d.h0, [batch, HV, K, V]) : null,
      outputFinalState: true,
      useQkL2normInKernel: c.l2InOurs,
      ...(c.scale !== undefined ? { scale: c.scale } : {}),
    },
  );
  const ref = gatedDeltaRuleRef(
    { q: d.q, k: d.k, v: d.v, g: d.g, beta: d.beta },
    { batch, T, H, HV, K, V, scale: c.scale, initialState: c.h0 ? d.h0 : null, outputFinalState: true },
  );
  return { o: values(ours.o), finalState: values(ours.finalState!), ref };
}

const gdnCases: GdnCase[] = [
  { batch: 3, T: 7, H: 2, HV: 4, K: 5, V: 3, h0: true, l2InOurs: false },
  { batch: 2, T: 9, H: 3, HV: 3, K: 17, V: 6, h0: false, scale: 0.7, l2InOurs: false },
  { batch: 2, T: 6, H: 1, HV: 2, K: 5, V: 7, h0: true, l2InOurs: true },
  // K * V >= 4096: ORT's MLAS path.
  { batch: 1, T: 5, H: 1, HV: 2, K: 64, V: 65, h0: true, l2InOurs: false },
];
const gdnName = (c: GdnCase) =>
  `batch ${c.batch} T ${c.T} H ${c.H} HV ${c.HV} K ${c.K} V ${c.V}` +
  (c.h0 ? ' initial state' : '') +
  (c.scale !== undefined ? ` scale ${c.scale}` : '') +
  (c.l2InOurs ? ' (our in-kernel L2 norm)' : '');

describe('gatedDeltaRule vs ONNX Runtime com.microsoft.LinearAttention (gated_delta)', () => {
  it.each(gdnCases.map((c) => [gdnName(c), c] as const))('%s', async (_n, c) => {
    const { batch, T, H, HV, K, V } = c;
    const d = gdnData(c);
    const session = need(
      await ortLinearAttention({
        batch,
        T,
        H,
        HV,
        K,
        V,
        scale: c.scale ?? 1 / Math.sqrt(K),
        threads: 1,
        initialState: c.h0,
      }),
    );
    // ORT's packed [B, T, heads * dim] is our [B, T, heads, dim]; its state (B, HV, K, V) is ours.
    const out = await session.run({
      query: Float32Array.from(d.q),
      key: Float32Array.from(d.k),
      value: Float32Array.from(d.v),
      decay: Float32Array.from(d.g),
      beta: Float32Array.from(d.beta),
      ...(c.h0 ? { past_state: Float32Array.from(d.h0) } : {}),
    });
    await session.close();
    const ours = gdnOurs(c, d);
    compare('o', ours.o, out.output, ours.ref.o);
    compare('final state', ours.finalState, out.present_state, ours.ref.finalState!);
  });
});

// GatedDeltaNet: run where ORT has a CPU kernel for it; reported as skipped (with the reason) where the
// only problem is that missing kernel; any other failure to build the model fails the test.
const gdnProbe = status.ok ? await ortGatedDeltaNet({ batch: 1, T: 2, H: 1, K: 4, threads: 1 }) : null;
if (gdnProbe?.session) await gdnProbe.session.close();
const gdnNoKernel = /Could not find an implementation/.test(gdnProbe?.reason ?? '');

describe('gatedDeltaRule vs ONNX Runtime com.microsoft.GatedDeltaNet', () => {
  it.skipIf(gdnNoKernel).each(gdnCases.filter((c) => c.h0).map((c) => [gdnName(c), c] as const))(
    `%s${gdnNoKernel ? ` (onnxruntime-node ${status.version} has no CPU kernel for GatedDeltaNet)` : ''}`,
    async (_n, c) => {
      const { batch, T, H, HV, K, V } = c;
      const d = gdnData(c);
      const r = await ortGatedDeltaNet({ batch, T, H, HV, K, V, scale: c.scale ?? 1 / Math.sqrt(K), threads: 1 });
      if (!r.session) throw new Error(r.reason);
      // Its state is V-major, [B, HV, V, K]: the transpose of ours per head.
      const transpose = (s: ArrayLike<number>, rows: number, cols: number) => {
        const out = new Float64Array(s.length);
        for (let m = 0; m < s.length / (rows * cols); m++) {
          for (let i = 0; i < rows; i++)
            for (let j = 0; j < cols; j++) out[m * rows * cols + j * rows + i] = s[m * rows * cols + i * cols + j];
        }
        return out;
      };
      const out = await r.session.run({
        query: Float32Array.from(d.q),
        key: Float32Array.from(d.k),
        value: Float32Array.from(d.v),
        decay: Float32Array.from(d.g),
        beta: Float32Array.from(d.beta),
        initial_state: Float32Array.from(transpose(d.h0, K, V)),
      });
      await r.session.close();
      const ours = gdnOurs(c, d);
      compare('o', ours.o, out.output, ours.ref.o);
      compare('final state', ours.finalState, transpose(out.final_state, V, K), ours.ref.finalState!);
    },
  );
});

interface LinCase {
  rule: Rule;
  perKey: boolean;
  Hq: number;
  Hk: number;
  Hv: number;
  h0: boolean;
  betaHeads?: number;
}

describe('linearAttention vs ONNX Runtime com.microsoft.LinearAttention', () => {
  const cases: LinCase[] = [];
  for (const rule of ['linear', 'gated', 'delta', 'gated_delta'] as Rule[])
    for (const perKey of rule === 'gated' || rule === 'gated_delta' ? [false, true] : [false])
      cases.push(
        { rule, perKey, Hq: 2, Hk: 2, Hv: 2, h0: true },
        { rule, perKey, Hq: 4, Hk: 2, Hv: 2, h0: false },
        { rule, perKey, Hq: 1, Hk: 2, Hv: 2, h0: true },
      );
  cases.push({ rule: 'gated_delta', perKey: false, Hq: 1, Hk: 1, Hv: 2, h0: true });
  cases.push({ rule: 'delta', perKey: false, Hq: 2, Hk: 2, Hv: 2, h0: true, betaHeads: 1 });
  const name = (c: LinCase) =>
    `${c.rule}${c.perKey ? ' per-key decay' : ''} Hq ${c.Hq} Hk ${c.Hk} Hv ${c.Hv}` +
    `${c.h0 ? ' initial state' : ''}${c.betaHeads === 1 ? ' shared beta' : ''}`;
  it.each(cases.map((c) => [name(c), c] as const))('%s', async (_n, c) => {
    const batch = 2,
      T = 9,
      K = 6,
      V = 5;
    const { Hq, Hk, Hv, rule, perKey } = c;
    const betaHeads = c.betaHeads ?? Hv;
    const decays = rule === 'gated' || rule === 'gated_delta';
    const corrects = rule === 'delta' || rule === 'gated_delta';
    const q = f32(unitRows(normal(rand, batch * T * Hq * K), K)),
      k = f32(unitRows(normal(rand, batch * T * Hk * K), K)),
      v = f32(normal(rand, batch * T * Hv * V)),
      decay = f32(uniform(rand, batch * T * Hv * (perKey ? K : 1), -2, 0)),
      beta = f32(uniform(rand, batch * T * betaHeads, 0.05, 1)),
      h0 = f32(normal(rand, batch * Hv * K * V, 0.5));
    const session = need(
      await ortLinearAttention({
        batch,
        T,
        H: Hq,
        HV: Hv,
        Hk,
        K,
        V,
        threads: 1,
        initialState: c.h0,
        rule,
        perKey,
        betaHeads,
      }),
    );
    const out = await session.run({
      query: Float32Array.from(q),
      key: Float32Array.from(k),
      value: Float32Array.from(v),
      ...(decays ? { decay: Float32Array.from(decay) } : {}),
      ...(corrects ? { beta: Float32Array.from(beta) } : {}),
      ...(c.h0 ? { past_state: Float32Array.from(h0) } : {}),
    });
    await session.close();
    // ORT's packed (B, T, heads * dim) is our (B, T, heads, dim); a per-key decay (B, T, Hv * K) is (B, T, Hv, K).
    const ours = rk.linearAttention(
      {
        q: tensor(q, [batch, T, Hq, K]),
        k: tensor(k, [batch, T, Hk, K]),
        v: tensor(v, [batch, T, Hv, V]),
        decay: decays ? tensor(decay, perKey ? [batch, T, Hv, K] : [batch, T, Hv]) : null,
        beta: corrects ? tensor(beta, [batch, T, betaHeads]) : null,
      },
      { updateRule: rule, initialState: c.h0 ? tensor(h0, [batch, Hv, K, V]) : null, outputFinalState: true },
    );
    const bEff = Float64Array.from(
      { length: batch * T * Hv },
      (_, e) => beta[betaHeads === 1 ? Math.floor(e / Hv) : e],
    );
    const ref = linearAttentionRef(
      { q, k, v, g: decay, beta: bEff },
      { batch, T, Hq, Hk, Hv, K, V, rule, perKey, initialState: c.h0 ? h0 : null },
    );
    compare('o', values(ours.o), out.output, ref.o);
    compare('final state', values(ours.finalState!), out.present_state, ref.finalState);
  });
});

// Mamba-2 is gated linear attention: ORT's LinearAttention ('gated') with q = C, k = B (the groups as
// query and key heads), v = d x, decay d A, scale 1 and the state transposed per head, plus D x and
// the z gate (applied here in float64 to ORT's output), must give mamba2Scan's y and final states.
describe('mamba2Scan vs ONNX Runtime com.microsoft.LinearAttention (gated)', () => {
  it.each([
    ['one group, D and z, initial states', 1, true],
    ['two groups, no D or z', 2, false],
  ] as const)('%s', async (_n, G, extras) => {
    const batch = 2,
      T = 9,
      H = 4,
      P = 5,
      N = 6;
    const x = f32(normal(rand, batch * T * H * P)),
      dtRaw = f32(uniform(rand, batch * T * H, -3, 1)),
      A = f32(uniform(rand, H, -2, -0.2)),
      B = f32(normal(rand, batch * T * G * N, 0.5)),
      C = f32(normal(rand, batch * T * G * N, 0.5)),
      D = f32(normal(rand, H)),
      z = f32(normal(rand, batch * T * H * P)),
      h0 = f32(normal(rand, batch * H * P * N, 0.5));
    const ours = rk.mamba2Scan(
      {
        x: tensor(x, [batch, T, H, P]),
        dt: tensor(dtRaw, [batch, T, H]),
        A: tensor(A, [H]),
        B: tensor(B, [batch, T, G, N]),
        C: tensor(C, [batch, T, G, N]),
        D: extras ? tensor(D, [H]) : null,
        z: extras ? tensor(z, [batch, T, H, P]) : null,
      },
      { dtSoftplus: true, initialStates: extras ? tensor(h0, [batch, H, P, N]) : null, returnFinalStates: true },
    );
    // The time steps as float32 (what ORT gets), v = d x and the decay d A.
    const d = Float32Array.from(dtRaw, (v) => (v > 20 ? v : Math.log1p(Math.exp(v))));
    const v = Float32Array.from(x, (xv, i) => Math.fround(xv * d[Math.floor(i / P)]));
    const decay = Float32Array.from(d, (dv, i) => dv * A[i % H]);
    // (p, n) state per head -> ORT's (K = n, V = p), and back.
    const swap = (s: ArrayLike<number>, rows: number, cols: number) =>
      Float32Array.from({ length: s.length }, (_, i) => {
        const m = Math.floor(i / (rows * cols)),
          r = Math.floor(i / cols) % rows,
          c = i % cols;
        return s[m * rows * cols + c * rows + r];
      });
    const session = need(
      await ortLinearAttention({
        batch,
        T,
        H: G,
        HV: H,
        Hk: G,
        K: N,
        V: P,
        scale: 1,
        threads: 1,
        initialState: extras,
        rule: 'gated',
      }),
    );
    const out = await session.run({
      query: Float32Array.from(C),
      key: Float32Array.from(B),
      value: v,
      decay,
      ...(extras ? { past_state: swap(h0, N, P) } : {}),
    });
    await session.close();
    const ortY = Float64Array.from(out.output as ArrayLike<number>, (o, i) => {
      if (!extras) return o;
      const h = Math.floor(i / P) % H;
      return (o + D[h] * x[i]) * (z[i] / (1 + Math.exp(-z[i])));
    });
    const ref = mamba2Ref(
      { x, dt: dtRaw, A, B, C, D: extras ? D : null, z: extras ? z : null },
      { batch, T, H, P, G, N, dtSoftplus: true, initialStates: extras ? h0 : null },
    );
    compare('y', values(ours.y), ortY, ref.y);
    compare(
      'final states',
      values(ours.finalStates!),
      swap(out.present_state as ArrayLike<number>, P, N),
      ref.finalStates,
    );
  });
});
