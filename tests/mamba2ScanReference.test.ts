// The Mamba-2 oracle checked on its own: its backward against central finite differences for every
// input, over grouped and ungrouped heads, the time-step transforms, every optional input and packed
// sequences with gaps and an empty one; the scan against the linear-attention oracle (rule 'gated')
// where the two contracts meet; and the decode step against the scan.
import { describe, expect, it } from 'vitest';
import {
  mamba2Ref,
  mamba2RefBackward,
  mamba2StepRef,
  type Mamba2RefGrads,
  type Mamba2RefInputs,
  type Mamba2RefOptions,
} from './reference/mamba2Scan';
import { linearAttentionRef } from './reference/linearAttention';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

const silu = (v: number) => v / (1 + Math.exp(-v));
const softplus = (v: number) => (v > 20 ? v : Math.log1p(Math.exp(v)));

interface Case {
  batch: number;
  T: number;
  H: number;
  P: number;
  G: number;
  N: number;
  softplus?: boolean;
  limit?: [number, number];
  D?: 'head' | 'channel';
  z?: boolean;
  bias?: boolean;
  init?: boolean;
  cu?: number[];
  /** One pre-softplus time step above the softplus threshold (20). */
  big?: boolean;
}

/** Gap between an effective time step and either end of dtLimit: finite differences stay off the kinks. */
const MARGIN = 0.02;

/**
 * Random inputs of a case. The time steps are drawn as effective values d and mapped back through
 * the bias and softplus; with dtLimit they cycle through below, inside and above it, each at least
 * MARGIN from the ends.
 */
function inputsOf(c: Case): { x: Mamba2RefInputs; o: Mamba2RefOptions } {
  const { batch, T, H, P, G, N } = c;
  const nseq = c.cu ? c.cu.length - 1 : batch;
  const dtBias = c.bias ? normal(rand, H, 0.3) : null;
  const dt = new Float64Array(batch * T * H);
  for (let i = 0; i < dt.length; i++) {
    let d = uniform(rand, 1, 0.05, 1.5)[0];
    if (c.limit) {
      const [lo, hi] = c.limit,
        r = rand();
      const band: [number, number][] = [
        [lo * 0.3, lo - MARGIN],
        [lo + MARGIN, hi - MARGIN],
        [hi + MARGIN, hi * 1.8],
      ];
      const [a, b] = band[i % 3];
      d = a + (b - a) * r;
    }
    dt[i] = (c.softplus ? Math.log(Math.expm1(d)) : d) - (dtBias ? dtBias[i % H] : 0);
  }
  if (c.big) dt[1] = 21 + 3 * rand() - (dtBias ? dtBias[1 % H] : 0);
  const x: Mamba2RefInputs = {
    x: normal(rand, batch * T * H * P),
    dt,
    A: uniform(rand, H, -1.5, -0.2),
    B: normal(rand, batch * T * G * N, 0.6),
    C: normal(rand, batch * T * G * N, 0.6),
    D: c.D ? normal(rand, c.D === 'channel' ? H * P : H) : null,
    z: c.z ? normal(rand, batch * T * H * P) : null,
    dtBias,
  };
  const o: Mamba2RefOptions = {
    batch,
    T,
    H,
    P,
    G,
    N,
    dtSoftplus: !!c.softplus,
    dtLimit: c.limit ?? null,
    dPerChannel: c.D === 'channel',
    initialStates: c.init ? normal(rand, nseq * H * P * N, 0.5) : null,
    cuSeqlens: c.cu ?? null,
  };
  return { x, o };
}

/** Whether position t of batch row b lies in a sequence. */
function covered(o: Mamba2RefOptions, b: number, t: number): boolean {
  if (!o.cuSeqlens) return true;
  const cu = o.cuSeqlens;
  return b === 0 && t >= cu[0] && t < cu[cu.length - 1];
}

const CASES: [string, Case][] = [
  ['G 1, P 1, nothing optional', { batch: 1, T: 5, H: 2, P: 1, G: 1, N: 3 }],
  [
    'softplus (one step above 20), dtBias, D per head, z, initial states, batch 2',
    { batch: 2, T: 6, H: 2, P: 3, G: 1, N: 4, softplus: true, bias: true, D: 'head', z: true, init: true, big: true },
  ],
  [
    'H 4 G 2, softplus and dtLimit, D per channel, z, initial states',
    {
      batch: 2,
      T: 5,
      H: 4,
      P: 2,
      G: 2,
      N: 3,
      softplus: true,
      limit: [0.2, 1],
      bias: true,
      D: 'channel',
      z: true,
      init: true,
    },
  ],
  [
    'G = H, dtLimit without softplus, P 1, D per channel, no z',
    { batch: 2, T: 7, H: 2, P: 1, G: 2, N: 5, limit: [0.3, 0.9], bias: true, D: 'channel', init: true },
  ],
  [
    'H 4 G 1, no initial states, batch 3',
    { batch: 3, T: 4, H: 4, P: 2, G: 1, N: 2, softplus: true, D: 'head', z: true },
  ],
  [
    'packed [1, 4, 4, 8] in T 9: a gap each end, an empty sequence, initial states',
    {
      batch: 1,
      T: 9,
      H: 4,
      P: 2,
      G: 2,
      N: 3,
      softplus: true,
      limit: [0.2, 1],
      bias: true,
      D: 'head',
      z: true,
      init: true,
      cu: [1, 4, 4, 8],
    },
  ],
  [
    'packed [0, 3, 3, 6] in T 7, no initial states',
    { batch: 1, T: 7, H: 2, P: 2, G: 1, N: 3, bias: true, D: 'channel', cu: [0, 3, 3, 6] },
  ],
];

describe('mamba2 oracle: backward vs finite differences', () => {
  it.each(CASES)('%s', (_n, c) => {
    const { x, o } = inputsOf(c);
    const nseq = c.cu ? c.cu.length - 1 : c.batch;
    const wY = normal(rand, x.x.length),
      wF = normal(rand, nseq * c.H * c.P * c.N);
    // Every input present, with the finite-difference step of each: the loss is linear in x, B, C, D
    // and the initial states (a large step is exact there), not in dt, A, z or dtBias.
    const named: [keyof Mamba2RefGrads, Float64Array, number][] = [
      ['x', Float64Array.from(x.x), 1e-2],
      ['dt', Float64Array.from(x.dt), 1e-6],
      ['A', Float64Array.from(x.A), 1e-6],
      ['B', Float64Array.from(x.B), 1e-2],
      ['C', Float64Array.from(x.C), 1e-2],
    ];
    if (x.D) named.push(['D', Float64Array.from(x.D), 1e-2]);
    if (x.z) named.push(['z', Float64Array.from(x.z), 1e-6]);
    if (x.dtBias) named.push(['dtBias', Float64Array.from(x.dtBias), 1e-6]);
    if (o.initialStates) named.push(['initialStates', Float64Array.from(o.initialStates), 1e-2]);
    const unpack = (xs: Float64Array[]) => {
      const m = new Map(named.map(([k], i) => [k, xs[i]]));
      return {
        x: {
          x: m.get('x')!,
          dt: m.get('dt')!,
          A: m.get('A')!,
          B: m.get('B')!,
          C: m.get('C')!,
          D: m.get('D'),
          z: m.get('z'),
          dtBias: m.get('dtBias'),
        },
        o: { ...o, initialStates: m.get('initialStates') ?? null },
      };
    };
    const loss = (xs: Float64Array[]) => {
      const u = unpack(xs);
      const r = mamba2Ref(u.x, u.o);
      return dot(r.y, wY) + dot(r.finalStates, wF);
    };
    const fd = finiteDifferences(
      loss,
      named.map(([, v]) => v),
      named.map(([, , e]) => e),
    );
    const an = mamba2RefBackward(x, o, { y: wY, finalStates: wF });
    named.forEach(([k], i) => {
      expect(an[k], `${k} ${at}`).not.toBeNull();
      expect(relErr(an[k]!, fd[i]), `${k} ${at}`).toBeLessThan(1e-7);
    });
    // Absent inputs have no gradient.
    if (!x.D) expect(an.D).toBeNull();
    if (!x.z) expect(an.z).toBeNull();
    if (!x.dtBias) expect(an.dtBias).toBeNull();
    if (!o.initialStates) expect(an.initialStates).toBeNull();
    // With dtLimit, some steps are clamped (zero gradient) and some not.
    if (c.limit) {
      const zero = an.dt.filter((v) => v === 0).length;
      expect(zero, at).toBeGreaterThan(0);
      expect(zero, at).toBeLessThan(an.dt.length);
    }
  });

  it('positions in no sequence: y = 0, zero gradients; an empty sequence passes its state through', () => {
    const c = CASES.find(([n]) => n.startsWith('packed [1'))![1];
    const { x, o } = inputsOf(c);
    const { H, P, G, N } = c;
    const wY = normal(rand, x.x.length),
      wF = normal(rand, 3 * H * P * N);
    const r = mamba2Ref(x, o);
    const an = mamba2RefBackward(x, o, { y: wY, finalStates: wF });
    for (const t of [0, 8]) {
      for (let e = t * H * P; e < (t + 1) * H * P; e++) {
        expect(r.y[e]).toBe(0);
        expect(an.x[e]).toBe(0);
        expect(an.z![e]).toBe(0);
      }
      for (let h = 0; h < H; h++) expect(an.dt[t * H + h]).toBe(0);
      for (let e = t * G * N; e < (t + 1) * G * N; e++) {
        expect(an.B[e]).toBe(0);
        expect(an.C[e]).toBe(0);
      }
    }
    // Sequence 1 is empty: its final state is its initial state, and the gradient passes straight back.
    const slot = H * P * N;
    expect(Array.from(r.finalStates.subarray(slot, 2 * slot))).toEqual(
      Array.from(o.initialStates!).slice(slot, 2 * slot),
    );
    expect(Array.from(an.initialStates!.subarray(slot, 2 * slot))).toEqual(Array.from(wF.subarray(slot, 2 * slot)));
  });

  it('the gradients of y and of the final states add up', () => {
    const c = CASES[2][1];
    const { x, o } = inputsOf(c);
    const wY = normal(rand, x.x.length),
      wF = normal(rand, c.batch * c.H * c.P * c.N);
    const both = mamba2RefBackward(x, o, { y: wY, finalStates: wF });
    const onlyY = mamba2RefBackward(x, o, { y: wY }),
      onlyF = mamba2RefBackward(x, o, { finalStates: wF, y: null });
    for (const k of ['x', 'dt', 'A', 'B', 'C', 'D', 'z', 'dtBias', 'initialStates'] as const) {
      const sum = onlyY[k]!.map((v, i) => v + onlyF[k]![i]);
      expect(relErr(sum, both[k]!), `${k} ${at}`).toBeLessThan(1e-13);
    }
  });

  it('dtLimit: the gradient stops at the ends themselves (lo < d < hi strictly)', () => {
    const [lo, hi] = [0.25, 0.75];
    const o: Mamba2RefOptions = { batch: 1, T: 4, H: 1, P: 1, G: 1, N: 2, dtLimit: [lo, hi] };
    const x: Mamba2RefInputs = {
      x: [1, -0.5, 0.7, 0.3],
      dt: [lo, hi, lo + 1e-3, hi - 1e-3],
      A: [-0.5],
      B: normal(rand, 8),
      C: normal(rand, 8),
    };
    const an = mamba2RefBackward(x, o, { y: [1, 1, 1, 1], finalStates: [1, 1] });
    expect(Math.abs(an.dt[0])).toBe(0);
    expect(Math.abs(an.dt[1])).toBe(0);
    expect(an.dt[2]).not.toBe(0);
    expect(an.dt[3]).not.toBe(0);
  });
});

/** The effective time steps [batch * T, H], written out here apart from the oracle. */
function effectiveDt(x: Mamba2RefInputs, o: Mamba2RefOptions): Float64Array {
  return Float64Array.from({ length: x.dt.length }, (_, i) => {
    let d = x.dt[i] + (x.dtBias ? x.dtBias[i % o.H] : 0);
    if (o.dtSoftplus) d = softplus(d);
    return o.dtLimit ? Math.min(Math.max(d, o.dtLimit[0]), o.dtLimit[1]) : d;
  });
}

/** [m, r, c] -> [m, c, r]. */
function transpose(a: ArrayLike<number>, rows: number, cols: number): Float64Array {
  const out = new Float64Array(a.length);
  for (let m = 0; m < a.length / (rows * cols); m++)
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) out[(m * cols + c) * rows + r] = a[(m * rows + r) * cols + c];
  return out;
}

describe('mamba2 oracle vs the linear attention oracle (rule gated)', () => {
  it.each([
    ['H 4 G 2, softplus and dtLimit, D per channel, z, initial states', CASES[2][1]],
    ['G 1, no z, D per head, no initial states', { batch: 2, T: 6, H: 3, P: 2, G: 1, N: 4, D: 'head' } as Case],
    ['G = H, P 1', { batch: 1, T: 8, H: 2, P: 1, G: 2, N: 5, softplus: true, z: true, init: true } as Case],
    [
      'packed [2, 5, 5, 9] in T 10',
      {
        batch: 1,
        T: 10,
        H: 4,
        P: 3,
        G: 2,
        N: 2,
        softplus: true,
        bias: true,
        D: 'channel',
        z: true,
        init: true,
        cu: [2, 5, 5, 9],
      } as Case,
    ],
  ])('%s', (_n, c) => {
    const { x, o } = inputsOf(c);
    const { batch, T, H, P, G, N } = c;
    const d = effectiveDt(x, o);
    const v = Float64Array.from({ length: x.x.length }, (_, e) => d[Math.floor(e / P)] * x.x[e]);
    const g = Float64Array.from(d, (dv, i) => dv * x.A[i % H]);
    const la = linearAttentionRef(
      { q: x.C, k: x.B, v, g },
      {
        batch,
        T,
        Hq: G,
        Hk: G,
        Hv: H,
        K: N,
        V: P,
        rule: 'gated',
        scale: 1,
        initialState: o.initialStates ? transpose(o.initialStates, P, N) : null,
        cuSeqlens: o.cuSeqlens,
      },
    );
    const expected = new Float64Array(x.x.length);
    for (let e = 0; e < expected.length; e++) {
      const row = Math.floor(e / (H * P)),
        h = Math.floor(e / P) % H,
        p = e % P;
      if (!covered(o, Math.floor(row / T), row % T)) continue;
      const D = x.D ? x.D[o.dPerChannel ? h * P + p : h] : 0;
      const pre = la.o[e] + D * x.x[e];
      expected[e] = x.z ? pre * silu(x.z[e]) : pre;
    }
    const r = mamba2Ref(x, o);
    expect(relErr(r.y, expected), at).toBeLessThan(1e-12);
    expect(relErr(r.finalStates, transpose(la.finalState, N, P)), at).toBeLessThan(1e-12);
  });
});

/** The first len positions of each batch row of a [batch, T, inner] array. */
function prefix(a: ArrayLike<number> | null | undefined, batch: number, T: number, inner: number, len: number) {
  if (!a) return null;
  const out = new Float64Array(batch * len * inner);
  for (let b = 0; b < batch; b++) for (let e = 0; e < len * inner; e++) out[b * len * inner + e] = a[b * T * inner + e];
  return out;
}

describe('mamba2 decode step vs the scan', () => {
  it.each([
    [
      'H 4 G 2, softplus and dtLimit, D per channel, z, dtBias',
      {
        batch: 2,
        T: 5,
        H: 4,
        P: 2,
        G: 2,
        N: 3,
        softplus: true,
        limit: [0.2, 1],
        bias: true,
        D: 'channel',
        z: true,
        init: true,
      } as Case,
    ],
    ['one token, G 1, D per head, no z', { batch: 3, T: 1, H: 2, P: 3, G: 1, N: 4, D: 'head', init: true } as Case],
  ])('%s', (_n, c) => {
    const { x, o } = inputsOf(c);
    const { batch, T, H, P, G, N } = c;
    const state0 = Float64Array.from(o.initialStates!);
    const step = mamba2StepRef(x, { ...o, state: o.initialStates! });
    expect(Array.from(o.initialStates!)).toEqual(Array.from(state0)); // read only
    const full = mamba2Ref(x, o);
    expect(relErr(step.y, full.y), at).toBeLessThan(1e-14);
    expect(relErr(step.state, full.finalStates), at).toBeLessThan(1e-14);
    const slot = H * P * N;
    for (let len = 1; len <= T; len++) {
      const part = mamba2Ref(
        {
          x: prefix(x.x, batch, T, H * P, len)!,
          dt: prefix(x.dt, batch, T, H, len)!,
          A: x.A,
          B: prefix(x.B, batch, T, G * N, len)!,
          C: prefix(x.C, batch, T, G * N, len)!,
          D: x.D,
          z: prefix(x.z, batch, T, H * P, len),
          dtBias: x.dtBias,
        },
        { ...o, T: len },
      );
      for (let b = 0; b < batch; b++) {
        const mid = step.intermediate.subarray((b * T + len - 1) * slot, (b * T + len) * slot);
        expect(relErr(mid, part.finalStates.subarray(b * slot, (b + 1) * slot)), `len ${len} ${at}`).toBeLessThan(
          1e-14,
        );
      }
    }
  });
});
