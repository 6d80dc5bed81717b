// The linear-attention oracle checked on its own: its backward against central finite differences
// for every input, every rule, both decay shapes and grouped heads both ways; the gate activations'
// backward likewise; and the oracle against the gated-delta-rule oracle where the two contracts meet.
import { describe, expect, it } from 'vitest';
import {
  gatesRef,
  gatesRefBackward,
  linearAttentionRef,
  linearAttentionRefBackward,
  type LinAttnRefOptions,
  type Rule,
} from './reference/linearAttention';
import { gatedDeltaRuleRef } from './reference/gatedDeltaRule';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

const RULES: Rule[] = ['linear', 'gated', 'delta', 'gated_delta'];
const LAYOUTS = [
  { Hq: 2, Hk: 2, Hv: 2 },
  { Hq: 4, Hk: 2, Hv: 2 },
  { Hq: 1, Hk: 2, Hv: 2 },
  { Hq: 1, Hk: 1, Hv: 2 },
];

describe('linear attention oracle: backward vs finite differences', () => {
  const cases: [string, Rule, boolean, (typeof LAYOUTS)[number], boolean][] = [];
  for (const rule of RULES)
    for (const perKey of rule === 'gated' || rule === 'gated_delta' ? [false, true] : [false])
      LAYOUTS.forEach((l, i) =>
        cases.push([`${rule}${perKey ? ' per-key' : ''} Hq ${l.Hq} Hk ${l.Hk} Hv ${l.Hv}`, rule, perKey, l, i === 1]),
      );
  it.each(cases)('%s', (_n, rule, perKey, l, l2norm) => {
    const batch = 2,
      T = 4,
      K = 3,
      V = 2,
      { Hq, Hk, Hv } = l;
    const o: LinAttnRefOptions = { batch, T, Hq, Hk, Hv, K, V, rule, perKey, l2norm, scale: 0.8 };
    const q = normal(rand, batch * T * Hq * K, 0.6),
      k = normal(rand, batch * T * Hk * K, 0.6),
      v = normal(rand, batch * T * Hv * V);
    const g = uniform(rand, batch * T * Hv * (perKey ? K : 1), -1, 0);
    const beta = uniform(rand, batch * T * Hv, 0.1, 1);
    const h0 = normal(rand, batch * Hv * K * V, 0.5);
    const wO = normal(rand, batch * T * Math.max(Hq, Hv) * V),
      wF = normal(rand, batch * Hv * K * V);
    const loss = ([q_, k_, v_, g_, b_, h_]: Float64Array[]) => {
      const r = linearAttentionRef({ q: q_, k: k_, v: v_, g: g_, beta: b_ }, { ...o, initialState: h_ });
      return dot(r.o, wO) + dot(r.finalState, wF);
    };
    const fd = finiteDifferences(loss, [q, k, v, g, beta, h0]);
    const an = linearAttentionRefBackward({ q, k, v, g, beta }, { ...o, initialState: h0 }, wO, wF);
    const pairs: [string, Float64Array | null, Float64Array][] = [
      ['q', an.q, fd[0]],
      ['k', an.k, fd[1]],
      ['v', an.v, fd[2]],
      ['initialState', an.initialState, fd[5]],
    ];
    if (rule === 'gated' || rule === 'gated_delta') pairs.push(['g', an.g, fd[3]]);
    if (rule === 'delta' || rule === 'gated_delta') pairs.push(['beta', an.beta, fd[4]]);
    for (const [name, a, f] of pairs) expect(relErr(a!, f), `${name} ${at}`).toBeLessThan(1e-7);
  });
});

describe('gate activations oracle: backward vs finite differences', () => {
  it.each([
    ['scalar decay, dtBias, shared sigmoid beta', false, 1, true],
    ['per-key decay, per-key dtBias, beta per head', true, 3, false],
  ] as const)('%s', (_n, perKey, betaHeads, sigmoid) => {
    const rows = 5,
      Hv = 3,
      K = 4;
    const o = { rows, Hv, K, perKey, qwen: true, sigmoid, betaHeads };
    const decay = normal(rand, rows * Hv * (perKey ? K : 1), 2),
      beta = normal(rand, rows * betaHeads),
      aLog = normal(rand, Hv, 0.5),
      dtBias = normal(rand, perKey ? Hv * K : Hv);
    const wg = normal(rand, decay.length),
      wb = normal(rand, rows * Hv);
    const loss = ([d, b, a, t]: Float64Array[]) => {
      const r = gatesRef({ decay: d, beta: b, aLog: a, dtBias: t }, o);
      return dot(r.g!, wg) + dot(r.beta!, wb);
    };
    const fd = finiteDifferences(loss, [decay, beta, aLog, dtBias]);
    const an = gatesRefBackward({ decay, beta, aLog, dtBias }, o, wg, wb);
    expect(relErr(an.decay!, fd[0]), at).toBeLessThan(1e-7);
    expect(relErr(an.beta!, fd[1]), at).toBeLessThan(1e-7);
    expect(relErr(an.aLog!, fd[2]), at).toBeLessThan(1e-7);
    expect(relErr(an.dtBias!, fd[3]), at).toBeLessThan(1e-7);
  });
});

describe('linear attention oracle vs the gated delta rule oracle', () => {
  it('gated_delta with a scalar decay, k heads = q heads < v heads, is the gated delta rule', () => {
    const batch = 2,
      T = 6,
      H = 1,
      HV = 2,
      K = 4,
      V = 3;
    const q = normal(rand, batch * T * H * K, 0.5),
      k = normal(rand, batch * T * H * K, 0.5),
      v = normal(rand, batch * T * HV * V),
      g = uniform(rand, batch * T * HV, -1, 0),
      beta = uniform(rand, batch * T * HV, 0.1, 1);
    const a = linearAttentionRef({ q, k, v, g, beta }, { batch, T, Hq: H, Hk: H, Hv: HV, K, V, rule: 'gated_delta' });
    const b = gatedDeltaRuleRef({ q, k, v, g, beta }, { batch, T, H, HV, K, V, outputFinalState: true });
    expect(relErr(a.o, b.o), at).toBeLessThan(1e-12);
    expect(relErr(a.finalState, b.finalState!), at).toBeLessThan(1e-12);
  });
});
