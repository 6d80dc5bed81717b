// linearAttention and linearAttentionStep against the float64 oracle (tests/reference/linearAttention.ts),
// forward and backward: every rule, scalar and per-key decay, grouped heads both ways, awkward
// lengths, packed sequences with empty and length-1 members, extreme decays, the gate activations,
// the state window (rolling back equals running the shorter sequence), the decode step, and errors.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { expectError, hasCuda, tensor, tolerance, values } from './helpers';
import {
  gatesRef,
  gatesRefBackward,
  linearAttentionRef,
  linearAttentionRefBackward,
  type Rule,
} from './reference/linearAttention';
import { freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const f32 = (x: ArrayLike<number>) => Float64Array.from(Float32Array.from(x));

interface Case {
  rule: Rule;
  perKey?: boolean;
  batch: number;
  T: number;
  Hq: number;
  Hk: number;
  Hv: number;
  K: number;
  V: number;
  h0?: boolean;
  l2?: boolean;
  cuSeqlens?: number[];
  /** decay values: 'mixed' (uniform(-2, 0), every third 0) or 'edge' (0 and -1e4 alternating in runs). */
  decay?: 'mixed' | 'edge';
  dtype?: rk.DType;
  sharedBeta?: boolean;
  gates?: boolean;
  device?: rk.Device;
}

const decays = (r: Rule) => r === 'gated' || r === 'gated_delta';
const corrects = (r: Rule) => r === 'delta' || r === 'gated_delta';

function problem(c: Case) {
  const { batch, T, Hq, Hk, Hv, K, V } = c;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const BT = batch * T;
  const qk = c.l2 ? 1 : 1 / Math.sqrt(K);
  const gn = BT * Hv * (c.perKey ? K : 1);
  let decay = uniform(rand, gn, -2, 0);
  for (let i = 0; i < gn; i += 3) decay[i] = 0;
  if (c.decay === 'edge') decay = Float64Array.from({ length: gn }, (_, i) => (Math.floor(i / 7) % 2 ? -1e4 : 0));
  if (c.gates) decay = normal(rand, gn, 2);
  const betaHeads = c.sharedBeta ? 1 : Hv;
  return {
    q: f32(normal(rand, BT * Hq * K, qk)),
    k: f32(normal(rand, BT * Hk * K, qk)),
    v: f32(normal(rand, BT * Hv * V)),
    decay: f32(decay),
    beta: f32(c.gates ? normal(rand, BT * betaHeads) : uniform(rand, BT * betaHeads, 0.1, 1)),
    h0: c.h0 ? f32(normal(rand, nseq * Hv * K * V, 0.5)) : null,
    aLog: f32(normal(rand, Hv, 0.3)),
    dtBias: f32(normal(rand, c.perKey ? Hv * K : Hv)),
    nseq,
    betaHeads,
  };
}

function runCase(c: Case, withBackward = true) {
  const { batch, T, Hq, Hk, Hv, K, V, rule } = c;
  const dtype = c.dtype ?? 'float32';
  const device = c.device ?? 'cpu';
  const p = problem(c);
  const Ho = Math.max(Hq, Hv);
  const gShape = c.perKey ? [batch, T, Hv, K] : [batch, T, Hv];
  const inputs = {
    q: tensor(p.q, [batch, T, Hq, K], dtype, device),
    k: tensor(p.k, [batch, T, Hk, K], dtype, device),
    v: tensor(p.v, [batch, T, Hv, V], dtype, device),
    decay: decays(rule) ? tensor(p.decay, gShape, 'float32', device) : null,
    beta: corrects(rule) ? tensor(p.beta, [batch, T, p.betaHeads], dtype, device) : null,
  };
  const options: rk.LinearAttentionOptions = {
    updateRule: rule,
    initialState: p.h0 ? tensor(p.h0, [p.nseq, Hv, K, V], 'float32', device) : null,
    outputFinalState: true,
    cuSeqlens: c.cuSeqlens ?? null,
    qkL2Norm: !!c.l2,
    ...(c.gates && decays(rule)
      ? {
          gateActivation: 'qwen' as const,
          aLog: tensor(p.aLog, [Hv], 'float32', device),
          dtBias: tensor(p.dtBias, c.perKey ? [Hv, K] : [Hv], 'float32', device),
        }
      : {}),
    ...(c.gates && corrects(rule) ? { betaActivation: 'sigmoid' as const } : {}),
  };
  // Inputs rounded to the dtype, as the kernel sees them.
  const seen = (x: Float64Array) => values(tensor(x, [x.length], dtype));
  const gateOpts = {
    rows: batch * T,
    Hv,
    K,
    perKey: !!c.perKey,
    qwen: !!c.gates && decays(rule),
    sigmoid: !!c.gates && corrects(rule),
    betaHeads: p.betaHeads,
  };
  const gateIn = {
    decay: decays(rule) ? p.decay : null,
    beta: corrects(rule) ? seen(p.beta) : null,
    aLog: p.aLog,
    dtBias: p.dtBias,
  };
  const eff = gatesRef(gateIn, gateOpts);
  const refIn = { q: seen(p.q), k: seen(p.k), v: seen(p.v), g: eff.g, beta: eff.beta };
  const refOpts = {
    batch,
    T,
    Hq,
    Hk,
    Hv,
    K,
    V,
    rule,
    perKey: !!c.perKey,
    l2norm: !!c.l2,
    initialState: p.h0,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  const ref = linearAttentionRef(refIn, refOpts);
  const tol = dtype === 'float32' ? 2e-5 : tolerance[dtype] * 2;
  if (!withBackward) {
    const out = rk.linearAttention(inputs, options);
    expect(relErr(values(out.o), ref.o), at('o')).toBeLessThan(tol);
    expect(relErr(values(out.finalState!), ref.finalState), at('finalState')).toBeLessThan(tol);
    return;
  }
  const { outputs, ctx } = rk.ops.linearAttention.forward(inputs, options);
  expect(outputs.o.shape).toEqual([batch, T, Ho, V]);
  expect(relErr(values(outputs.o), ref.o), at('o')).toBeLessThan(tol);
  expect(relErr(values(outputs.finalState!), ref.finalState), at('finalState')).toBeLessThan(tol);
  const wO = f32(normal(rand, batch * T * Ho * V)),
    wF = f32(normal(rand, p.nseq * Hv * K * V));
  const grads = rk.ops.linearAttention.backward(ctx, {
    o: tensor(wO, [batch, T, Ho, V], dtype, device),
    finalState: tensor(wF, [p.nseq, Hv, K, V], 'float32', device),
  });
  const rg = linearAttentionRefBackward(refIn, refOpts, seen(wO), wF);
  const gg = gatesRefBackward(gateIn, gateOpts, rg.g, rg.beta);
  const gtol = dtype === 'float32' ? 1e-4 : tolerance[dtype] * 3;
  expect(relErr(values(grads.q), rg.q), at('dq')).toBeLessThan(gtol);
  expect(relErr(values(grads.k), rg.k), at('dk')).toBeLessThan(gtol);
  expect(relErr(values(grads.v), rg.v), at('dv')).toBeLessThan(gtol);
  if (p.h0) expect(relErr(values(grads.initialState!), rg.initialState), at('dh0')).toBeLessThan(gtol);
  if (decays(rule)) expect(relErr(values(grads.decay!), gg.decay!), at('ddecay')).toBeLessThan(gtol);
  else expect(grads.decay).toBeNull();
  if (corrects(rule)) expect(relErr(values(grads.beta!), gg.beta!), at('dbeta')).toBeLessThan(gtol);
  else expect(grads.beta).toBeNull();
  if (c.gates && decays(rule)) {
    expect(relErr(values(grads.aLog!), gg.aLog!), at('daLog')).toBeLessThan(gtol);
    expect(relErr(values(grads.dtBias!), gg.dtBias!), at('ddtBias')).toBeLessThan(gtol);
  }
}

const RULES: Rule[] = ['linear', 'gated', 'delta', 'gated_delta'];
const name = (c: Case) =>
  `${c.rule}${c.perKey ? ' per-key' : ''} ${c.batch}x${c.T} Hq ${c.Hq} Hk ${c.Hk} Hv ${c.Hv} K ${c.K} V ${c.V}` +
  `${c.h0 ? ' h0' : ''}${c.l2 ? ' l2' : ''}${c.dtype && c.dtype !== 'float32' ? ` ${c.dtype}` : ''}` +
  `${c.cuSeqlens ? ` packed [${c.cuSeqlens}]` : ''}${c.decay === 'edge' ? ' decays 0 / -1e4' : ''}` +
  `${c.gates ? ' qwen gate + sigmoid beta' : ''}${c.sharedBeta ? ' shared beta' : ''}`;

describe('linearAttention vs the float64 oracle, forward and backward', () => {
  const cases: Case[] = [];
  for (const rule of RULES)
    for (const perKey of decays(rule) ? [false, true] : [false]) {
      cases.push(
        { rule, perKey, batch: 2, T: 65, Hq: 2, Hk: 2, Hv: 2, K: 19, V: 13, h0: true },
        { rule, perKey, batch: 1, T: 63, Hq: 4, Hk: 2, Hv: 2, K: 8, V: 17 },
        { rule, perKey, batch: 2, T: 1, Hq: 1, Hk: 3, Hv: 3, K: 5, V: 33, h0: true },
        { rule, perKey, batch: 1, T: 130, Hq: 2, Hk: 2, Hv: 4, K: 16, V: 16, h0: true, l2: true },
      );
    }
  // Edges: packed batches with empty and length-1 sequences, decays 0 and -1e4, bf16, gates.
  cases.push(
    {
      rule: 'gated_delta',
      batch: 1,
      T: 70,
      Hq: 1,
      Hk: 1,
      Hv: 2,
      K: 6,
      V: 5,
      h0: true,
      cuSeqlens: [0, 0, 1, 66, 66, 70],
    },
    { rule: 'gated', perKey: true, batch: 1, T: 70, Hq: 2, Hk: 1, Hv: 1, K: 6, V: 5, cuSeqlens: [0, 1, 1, 69] },
    { rule: 'gated_delta', perKey: true, batch: 2, T: 40, Hq: 2, Hk: 2, Hv: 2, K: 7, V: 9, h0: true, decay: 'edge' },
    { rule: 'gated', batch: 2, T: 40, Hq: 3, Hk: 3, Hv: 3, K: 7, V: 9, h0: true, decay: 'edge' },
    {
      rule: 'gated_delta',
      perKey: true,
      batch: 2,
      T: 20,
      Hq: 2,
      Hk: 2,
      Hv: 2,
      K: 16,
      V: 8,
      h0: true,
      dtype: 'bfloat16',
    },
    { rule: 'delta', batch: 2, T: 20, Hq: 1, Hk: 1, Hv: 2, K: 16, V: 8, dtype: 'float16' },
    { rule: 'gated_delta', batch: 2, T: 33, Hq: 2, Hk: 2, Hv: 4, K: 8, V: 6, h0: true, gates: true, l2: true },
    {
      rule: 'gated_delta',
      perKey: true,
      batch: 1,
      T: 33,
      Hq: 2,
      Hk: 2,
      Hv: 2,
      K: 8,
      V: 6,
      gates: true,
      sharedBeta: true,
    },
    { rule: 'delta', batch: 2, T: 9, Hq: 3, Hk: 3, Hv: 3, K: 4, V: 4, gates: true, sharedBeta: true },
    // 'linear' and 'gated' with one decay per head in the Gated DeltaNet layout (Hk = Hq, Hv a
    // multiple of Hq, no window) run on the gated delta rule's kernels without the delta term: packed,
    // 16-bit, the qwen gate, a single token.
    { rule: 'linear', batch: 1, T: 70, Hq: 1, Hk: 1, Hv: 2, K: 6, V: 21, h0: true, cuSeqlens: [0, 0, 1, 66, 66, 70] },
    { rule: 'gated', batch: 1, T: 70, Hq: 2, Hk: 2, Hv: 2, K: 17, V: 5, l2: true, cuSeqlens: [0, 1, 1, 69] },
    { rule: 'gated', batch: 2, T: 33, Hq: 2, Hk: 2, Hv: 4, K: 16, V: 8, h0: true, dtype: 'float16' },
    { rule: 'linear', batch: 2, T: 20, Hq: 1, Hk: 1, Hv: 1, K: 16, V: 8, h0: true, dtype: 'bfloat16' },
    { rule: 'gated', batch: 2, T: 33, Hq: 1, Hk: 1, Hv: 3, K: 8, V: 6, h0: true, gates: true },
    { rule: 'linear', batch: 3, T: 1, Hq: 2, Hk: 2, Hv: 2, K: 5, V: 3, h0: true },
    // The same rules outside that layout (a key head shared by the states, one query per state): this
    // family's blocked kernels over several blocks and chunks.
    { rule: 'linear', batch: 2, T: 75, Hq: 1, Hk: 2, Hv: 2, K: 20, V: 17, h0: true },
    { rule: 'gated', batch: 1, T: 45, Hq: 1, Hk: 2, Hv: 2, K: 33, V: 9, decay: 'edge', cuSeqlens: [0, 5, 45] },
  );
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));

  it('untaped inference equals the forward hook (delta rule, blocked kernels; gated per-key, per-token kernels)', () => {
    runCase({ rule: 'delta', batch: 2, T: 70, Hq: 2, Hk: 2, Hv: 4, K: 12, V: 10, h0: true }, false);
    runCase({ rule: 'gated', perKey: true, batch: 2, T: 70, Hq: 2, Hk: 2, Hv: 2, K: 12, V: 10, h0: true }, false);
  });
});

// On a GPU: the per-token CUDA kernels (every configuration but the Gated DeltaNet layout) and the
// gated delta rule's kernels (that layout: the delta rules; with bfloat16 the chunked tensor-core
// kernels, which the 'linear' and 'gated' rules with a scalar decay and the per-key 'gated' and
// 'gated_delta' rules also take there), against the same oracle.
describe.runIf(hasCuda)('linearAttention on cuda vs the float64 oracle', () => {
  const cases: Case[] = [];
  for (const rule of RULES)
    for (const perKey of decays(rule) ? [false, true] : [false])
      cases.push(
        { rule, perKey, batch: 2, T: 65, Hq: 2, Hk: 2, Hv: 2, K: 19, V: 13, h0: true, device: 'cuda' },
        { rule, perKey, batch: 1, T: 63, Hq: 4, Hk: 1, Hv: 2, K: 8, V: 17, l2: true, device: 'cuda' },
        {
          rule,
          perKey,
          batch: 1,
          T: 70,
          Hq: 1,
          Hk: 1,
          Hv: 2,
          K: 32,
          V: 16,
          h0: true,
          device: 'cuda',
          dtype: 'bfloat16',
        },
      );
  cases.push(
    { rule: 'gated_delta', batch: 2, T: 33, Hq: 2, Hk: 2, Hv: 4, K: 8, V: 6, h0: true, gates: true, device: 'cuda' },
    {
      rule: 'gated_delta',
      perKey: true,
      batch: 1,
      T: 33,
      Hq: 2,
      Hk: 2,
      Hv: 2,
      K: 8,
      V: 6,
      gates: true,
      sharedBeta: true,
      device: 'cuda',
    },
  );
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));
});

describe('stateWindow', () => {
  it.each([
    ['gated_delta scalar decay', 'gated_delta' as Rule, false],
    ['gated per-key decay', 'gated' as Rule, true],
  ])('%s: rolling back to slot j and continuing equals running the shorter sequence', (_n, rule, perKey) => {
    const batch = 2,
      T = 11,
      H = 2,
      K = 5,
      V = 6,
      W = 4;
    const p = problem({ rule, perKey, batch, T, Hq: H, Hk: H, Hv: H, K, V, h0: true });
    const full = (len: number) => {
      const cut = (x: Float64Array, per: number) => {
        const out = new Float64Array(batch * len * per);
        for (let b = 0; b < batch; b++) out.set(x.subarray(b * T * per, (b * T + len) * per), b * len * per);
        return out;
      };
      return {
        q: tensor(cut(p.q, H * K), [batch, len, H, K]),
        k: tensor(cut(p.k, H * K), [batch, len, H, K]),
        v: tensor(cut(p.v, H * V), [batch, len, H, V]),
        decay: decays(rule)
          ? tensor(cut(p.decay, H * (perKey ? K : 1)), perKey ? [batch, len, H, K] : [batch, len, H])
          : null,
        beta: corrects(rule) ? tensor(cut(p.beta, H), [batch, len, H]) : null,
      };
    };
    const h0 = tensor(p.h0!, [batch, H, K, V]);
    const out = rk.linearAttention(full(T), {
      updateRule: rule,
      initialState: h0,
      outputFinalState: true,
      stateWindow: W,
    });
    expect(out.windowStates!.shape).toEqual([W, batch, H, K, V]);
    const win = values(out.windowStates!);
    const slot = K * V * H * batch;
    expect(relErr(win.subarray((W - 1) * slot), values(out.finalState!)), at('last slot = final state')).toBeLessThan(
      1e-7,
    );
    for (let j = 0; j < W; j++) {
      const shorter = rk.linearAttention(full(T - W + j + 1), {
        updateRule: rule,
        initialState: h0,
        outputFinalState: true,
      });
      expect(relErr(win.subarray(j * slot, (j + 1) * slot), values(shorter.finalState!)), at(`slot ${j}`)).toBeLessThan(
        1e-6,
      );
    }
    // A window longer than the sequence: the slots before its first token are zeros.
    const short = rk.linearAttention(full(2), { updateRule: rule, initialState: h0, stateWindow: 5 });
    expect(Array.from(values(short.windowStates!).subarray(0, 3 * slot)).every((x) => x === 0)).toBe(true);
  });
});

describe('linearAttentionStep', () => {
  it.each([
    ['gated_delta per-key, inverse grouping', { rule: 'gated_delta' as Rule, perKey: true, Hq: 1, Hk: 2, Hv: 2 }],
    ['gated scalar, grouped queries', { rule: 'gated' as Rule, perKey: false, Hq: 4, Hk: 2, Hv: 2 }],
    ['delta (blocked kernels)', { rule: 'delta' as Rule, perKey: false, Hq: 1, Hk: 1, Hv: 2 }],
    ['linear', { rule: 'linear' as Rule, perKey: false, Hq: 2, Hk: 2, Hv: 2 }],
  ])('%s: several tokens from a state equal linearAttention with that initial state', (_n, l) => {
    const batch = 2,
      T = 3,
      K = 6,
      V = 5;
    const c: Case = { ...l, batch, T, K, V, h0: true };
    const p = problem(c);
    const inputs = {
      q: tensor(p.q, [batch, T, l.Hq, K]),
      k: tensor(p.k, [batch, T, l.Hk, K]),
      v: tensor(p.v, [batch, T, l.Hv, V]),
      decay: decays(l.rule) ? tensor(p.decay, l.perKey ? [batch, T, l.Hv, K] : [batch, T, l.Hv]) : null,
      beta: corrects(l.rule) ? tensor(p.beta, [batch, T, l.Hv]) : null,
    };
    const full = rk.linearAttention(inputs, {
      updateRule: l.rule,
      initialState: tensor(p.h0!, [batch, l.Hv, K, V]),
      outputFinalState: true,
      stateWindow: T,
    });
    const state = tensor(p.h0!, [batch, l.Hv, K, V]);
    const step = rk.linearAttentionStep({ ...inputs, state }, { updateRule: l.rule, returnIntermediateStates: true });
    expect(relErr(values(step.o), values(full.o)), at('o')).toBeLessThan(1e-6);
    expect(relErr(values(state), values(full.finalState!)), at('state in place')).toBeLessThan(1e-6);
    // intermediate (batch, T, Hv, K, V) against the window (T, batch, Hv, K, V).
    const inter = values(step.intermediateStates!),
      win = values(full.windowStates!);
    const per = l.Hv * K * V;
    for (let b = 0; b < batch; b++)
      for (let t = 0; t < T; t++)
        expect(
          relErr(
            inter.subarray((b * T + t) * per, (b * T + t + 1) * per),
            win.subarray((t * batch + b) * per, (t * batch + b + 1) * per),
          ),
          at(`intermediate ${b} ${t}`),
        ).toBeLessThan(1e-6);
  });
});

describe('linearAttention errors', () => {
  const q = tensor(normal(rand, 2 * 3 * 2 * 4), [2, 3, 2, 4]);
  const v = tensor(normal(rand, 2 * 3 * 2 * 5), [2, 3, 2, 5]);
  const g = tensor(uniform(rand, 12, -1, 0), [2, 3, 2]);
  const b = tensor(uniform(rand, 12, 0, 1), [2, 3, 2]);
  it('names the argument and what was expected', () => {
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: b }, { updateRule: 'nope' as Rule }),
      'ERR_ARGUMENT',
      /updateRule must be one of/,
    );
    expectError(() => rk.linearAttention({ q, k: q, v, beta: b }), 'ERR_ARGUMENT', /needs decay/);
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: b }, { updateRule: 'linear' }),
      'ERR_ARGUMENT',
      /takes no decay/,
    );
    expectError(
      () => rk.linearAttention({ q, k: tensor(normal(rand, 2 * 3 * 3 * 4), [2, 3, 3, 4]), v, decay: g, beta: b }),
      'ERR_SHAPE',
      /k has 3 heads, expected a divisor of v's 2 heads/,
    );
    expectError(
      () =>
        rk.linearAttention({ q, k: q, v, decay: tensor(uniform(rand, 2 * 3 * 2 * 3, -1, 0), [2, 3, 2, 3]), beta: b }),
      'ERR_SHAPE',
      /decay has shape \[2,3,2,3\], expected \[2,3,2,4\]/,
    );
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: b }, { stateWindow: 9 }),
      'ERR_ARGUMENT',
      /stateWindow/,
    );
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: b }, { gateActivation: 'qwen' }),
      'ERR_ARGUMENT',
      /needs aLog/,
    );
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: b }, { aLog: tensor([0, 0], [2]) }),
      'ERR_ARGUMENT',
      /belong to gateActivation 'qwen'/,
    );
    expectError(
      () => rk.linearAttention({ q, k: q, v, decay: g, beta: tensor(uniform(rand, 12, 0, 1), [2, 3, 2], 'bfloat16') }),
      'ERR_DTYPE',
      /beta has dtype bfloat16, expected float32 to match q/,
    );
  });
  it('refuses a gradient for windowStates', () => {
    const { ctx } = rk.ops.linearAttention.forward({ q, k: q, v, decay: g, beta: b }, { stateWindow: 2 });
    expectError(
      () =>
        rk.ops.linearAttention.backward(ctx, {
          windowStates: tensor(new Float64Array(2 * 2 * 2 * 4 * 5), [2, 2, 2, 4, 5]),
        }),
      'ERR_ARGUMENT',
      /windowStates is an inference output/,
    );
  });
});
