// Gated delta rule and its decode step: the native kernels against the float64 oracle, forward and
// backward, for every device present, over the options, odd sizes, packed batches, the three dtypes
// and extreme decays; then bad input.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, tensor, tolerance, values } from './helpers';
import {
  gatedDeltaRuleRef,
  gatedDeltaRuleRefBackward,
  gatedDeltaRuleStepRef,
  type GatedDeltaRuleRefOptions,
} from './reference/gatedDeltaRule';
import { freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;

interface Case {
  batch: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
  h0: boolean;
  l2: boolean;
  scale?: number;
  cuSeqlens: number[] | null;
  dtype: rk.DType;
  g: 'mixed' | 'zero' | 'underflow';
}

const base: Case = {
  batch: 2,
  T: 7,
  H: 2,
  HV: 4,
  K: 5,
  V: 3,
  h0: true,
  l2: true,
  cuSeqlens: null,
  dtype: 'float32',
  g: 'mixed',
};

function name(c: Case): string {
  return (
    `${c.dtype} b${c.batch} T${c.T} H${c.H}/${c.HV} K${c.K} V${c.V}` +
    (c.h0 ? ' h0' : '') +
    (c.l2 ? ' l2' : '') +
    (c.scale !== undefined ? ` scale ${c.scale}` : '') +
    (c.cuSeqlens ? ` cu[${c.cuSeqlens.join(',')}]` : '') +
    (c.g !== 'mixed' ? ` g=${c.g}` : '')
  );
}

function runCase(c: Case, device: rk.Device) {
  const { batch, T, H, HV, K, V } = c;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  // Without the in-kernel norm, keep |k| <= 1 so that (I - beta k k^T) stays a contraction.
  const kScale = c.l2 ? 1 : 1 / Math.sqrt(K);
  const gv =
    c.g === 'zero'
      ? new Float64Array(batch * T * HV)
      : c.g === 'underflow'
        ? Float64Array.from({ length: batch * T * HV }, (_, i) => (i % 2 ? -1e4 : -0.3))
        : Float64Array.from(uniform(rand, batch * T * HV, -1.5, 0), (x, i) => (i % 3 === 0 ? 0 : x));
  const x = (v: ArrayLike<number>, shape: number[]) => tensor(v, shape, c.dtype, device);
  const inputs = {
    q: x(normal(rand, batch * T * H * K), [batch, T, H, K]),
    k: x(normal(rand, batch * T * H * K, kScale), [batch, T, H, K]),
    v: x(normal(rand, batch * T * HV * V), [batch, T, HV, V]),
    g: tensor(gv, [batch, T, HV], 'float32', device),
    beta: x(uniform(rand, batch * T * HV, 0.05, 1), [batch, T, HV]),
  };
  const h0 = c.h0 ? tensor(normal(rand, nseq * HV * K * V), [nseq, HV, K, V], 'float32', device) : null;
  const options = {
    initialState: h0,
    outputFinalState: true,
    useQkL2normInKernel: c.l2,
    cuSeqlens: c.cuSeqlens,
    ...(c.scale !== undefined ? { scale: c.scale } : {}),
  };
  const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, options);
  const refInputs = {
    q: values(inputs.q),
    k: values(inputs.k),
    v: values(inputs.v),
    g: values(inputs.g),
    beta: values(inputs.beta),
  };
  const refOptions: GatedDeltaRuleRefOptions = {
    batch,
    T,
    H,
    HV,
    K,
    V,
    scale: c.scale,
    initialState: h0 ? values(h0) : null,
    outputFinalState: true,
    cuSeqlens: c.cuSeqlens,
    useQkL2normInKernel: c.l2,
  };
  const ref = gatedDeltaRuleRef(refInputs, refOptions);
  const tol = c.dtype === 'float32' ? 1e-4 : tolerance[c.dtype];
  const nm = name(c);
  const close = (got: rk.Tensor | null, want: Float64Array | null, what: string, within = tol) => {
    expect(got, at(`${nm}: ${what}`)).toBeTruthy();
    const v = values(got!);
    expect(v.every(Number.isFinite), at(`${nm}: ${what} finite`)).toBe(true);
    expect(relErr(v, want!), at(`${nm}: ${what}`)).toBeLessThan(within);
  };
  // The CUDA backward for bf16 is the chunked tensor-core algorithm, whose products take bf16
  // operands several times over (states, their gradients, the UT transform): 2e-2 fits bf16 there.
  const gradTol = device === 'cuda' && c.dtype === 'bfloat16' ? 2e-2 : tol;
  close(outputs.o, ref.o, 'o');
  close(outputs.finalState, ref.finalState, 'finalState');
  const dO = x(normal(rand, batch * T * HV * V), [batch, T, HV, V]);
  const dFinal = tensor(normal(rand, nseq * HV * K * V), [nseq, HV, K, V], 'float32', device);
  const g = rk.ops.gatedDeltaRule.backward(ctx, { o: dO, finalState: dFinal });
  const gr = gatedDeltaRuleRefBackward(refInputs, refOptions, { dO: values(dO), dFinal: values(dFinal) });
  close(g.q, gr.dq, 'dq', gradTol);
  close(g.k, gr.dk, 'dk', gradTol);
  close(g.v, gr.dv, 'dv', gradTol);
  close(g.beta, gr.dbeta, 'dbeta', gradTol);
  // dg of an underflowed decay is exactly 0 in the oracle; compare the rest in norm.
  close(g.g, gr.dg, 'dg', gradTol);
  if (c.h0) close(g.initialState, gr.dInitialState, 'dInitialState', gradTol);
  else expect(g.initialState).toBeNull();
}

const cases: Case[] = [
  { ...base },
  { ...base, h0: false, l2: false },
  { ...base, H: 3, HV: 3, K: 4, V: 6, scale: 0.7 },
  { ...base, batch: 1, T: 1, H: 1, HV: 1, K: 1, V: 1 },
  { ...base, batch: 1, T: 63, H: 1, HV: 2, K: 8, V: 5 },
  { ...base, batch: 1, T: 65, H: 2, HV: 2, K: 3, V: 4, l2: false },
  { ...base, batch: 1, T: 130, H: 1, HV: 1, K: 16, V: 16 },
  { ...base, batch: 1, T: 1000, H: 1, HV: 2, K: 8, V: 20 },
  { ...base, batch: 1, T: 3, H: 1, HV: 1, K: 256, V: 7 },
  { ...base, batch: 1, T: 67, H: 1, HV: 2, K: 6, V: 70 }, // 5 column slabs: a group of 4 and 1
  { ...base, batch: 1, T: 70, H: 1, HV: 2, K: 3, V: 3, cuSeqlens: [0, 1, 1, 66, 68] }, // length 1, empty, chunk-crossing, tail
  { ...base, batch: 1, T: 9, H: 2, HV: 4, K: 4, V: 2, cuSeqlens: [0, 0], h0: true }, // only an empty sequence
  { ...base, batch: 1, T: 150, H: 1, HV: 2, K: 40, V: 33 }, // partial 16-row and 16-column tiles, 3 chunks
  { ...base, g: 'zero' },
  { ...base, g: 'underflow', T: 66, batch: 1 },
];

describe.each(devices)('gatedDeltaRule on %s vs the float64 oracle', (device) => {
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c, device));
  it.each(['float16', 'bfloat16'] as const)('%s inputs', (dtype) => {
    runCase({ ...base, dtype, batch: 2, T: 40, H: 2, HV: 4, K: 16, V: 8 }, device);
    runCase({ ...base, dtype, batch: 1, T: 20, cuSeqlens: [0, 7, 20] }, device);
  });
  it('the decode step equals the recurrence, token by token and several at once', () => {
    const batch = 2,
      T = 5,
      H = 1,
      HV = 2,
      K = 4,
      V = 3;
    const q = normal(rand, batch * T * H * K),
      k = normal(rand, batch * T * H * K);
    const v = normal(rand, batch * T * HV * V),
      g = uniform(rand, batch * T * HV, -1, 0);
    const beta = uniform(rand, batch * T * HV, 0.1, 1),
      s0 = normal(rand, batch * HV * K * V);
    const t = (a: ArrayLike<number>, shape: number[]) => tensor(a, shape, 'float32', device);
    const full = rk.gatedDeltaRule(
      {
        q: t(q, [batch, T, H, K]),
        k: t(k, [batch, T, H, K]),
        v: t(v, [batch, T, HV, V]),
        g: t(g, [batch, T, HV]),
        beta: t(beta, [batch, T, HV]),
      },
      { initialState: t(s0, [batch, HV, K, V]), outputFinalState: true, useQkL2normInKernel: true },
    );
    const state = t(s0, [batch, HV, K, V]);
    const r = rk.gatedDeltaRuleStep(
      {
        state,
        q: t(q, [batch, T, H, K]),
        k: t(k, [batch, T, H, K]),
        v: t(v, [batch, T, HV, V]),
        g: t(g, [batch, T, HV]),
        beta: t(beta, [batch, T, HV]),
      },
      { useQkL2normInKernel: true, returnIntermediateStates: true },
    );
    expect(relErr(values(r.o), values(full.o)), at('o')).toBeLessThan(1e-5);
    expect(relErr(values(state), values(full.finalState!)), at('state')).toBeLessThan(1e-5);
    const ref = gatedDeltaRuleStepRef(
      { state: s0, q, k, v, g, beta },
      { batch, T, H, HV, K, V, useQkL2normInKernel: true },
    );
    expect(relErr(values(r.intermediateStates!), ref.intermediateStates), at('intermediate')).toBeLessThan(1e-5);
    // One token at a time, with updateState false leaving the state alone.
    const st = t(s0, [batch, HV, K, V]);
    const pick = (src: Float64Array, tok: number, inner: number) =>
      Array.from({ length: batch * inner }, (_, i) => src[(Math.floor(i / inner) * T + tok) * inner + (i % inner)]);
    const before = Array.from(values(st));
    rk.gatedDeltaRuleStep(
      {
        state: st,
        q: t(pick(q, 0, H * K), [batch, 1, H, K]),
        k: t(pick(k, 0, H * K), [batch, 1, H, K]),
        v: t(pick(v, 0, HV * V), [batch, 1, HV, V]),
        g: t(pick(g, 0, HV), [batch, 1, HV]),
        beta: t(pick(beta, 0, HV), [batch, 1, HV]),
      },
      { useQkL2normInKernel: true, updateState: false },
    );
    expect(Array.from(values(st))).toEqual(before);
    for (let tok = 0; tok < T; tok++) {
      const o = rk.gatedDeltaRuleStep(
        {
          state: st,
          q: t(pick(q, tok, H * K), [batch, 1, H, K]),
          k: t(pick(k, tok, H * K), [batch, 1, H, K]),
          v: t(pick(v, tok, HV * V), [batch, 1, HV, V]),
          g: t(pick(g, tok, HV), [batch, 1, HV]),
          beta: t(pick(beta, tok, HV), [batch, 1, HV]),
        },
        { useQkL2normInKernel: true },
      ).o;
      expect(relErr(values(o), pick(values(full.o), tok, HV * V)), at(`token ${tok}`)).toBeLessThan(1e-5);
    }
  });
});

describe('gatedDeltaRule bad input', () => {
  const mk = (shape: number[], dtype: rk.DType = 'float32') =>
    tensor(new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.1), shape, dtype);
  const good = () => ({
    q: mk([1, 6, 2, 4]),
    k: mk([1, 6, 2, 4]),
    v: mk([1, 6, 4, 3]),
    g: mk([1, 6, 4]),
    beta: mk([1, 6, 4]),
  });
  const fails = (fn: () => unknown, code: string, message: RegExp) => {
    let err: unknown;
    try {
      fn();
    } catch (e) {
      err = e;
    }
    expect(err, 'expected an error').toBeInstanceOf(rk.RecurrentKernelsError);
    expect((err as rk.RecurrentKernelsError).code).toBe(code);
    expect((err as Error).message).toMatch(message);
  };
  it('runs when everything is right', () => {
    expect(rk.gatedDeltaRule(good()).o.shape).toEqual([1, 6, 4, 3]);
  });
  it('names the argument and what was expected', () => {
    fails(() => rk.gatedDeltaRule({ ...good(), q: mk([1, 6, 2]) }), 'ERR_SHAPE', /q has shape \[1,6,2\]/);
    fails(() => rk.gatedDeltaRule({ ...good(), k: mk([1, 6, 2, 5]) }), 'ERR_SHAPE', /k has shape/);
    fails(() => rk.gatedDeltaRule({ ...good(), v: mk([1, 6, 3, 3]) }), 'ERR_SHAPE', /v has 3 heads/);
    fails(() => rk.gatedDeltaRule({ ...good(), g: mk([1, 6, 2]) }), 'ERR_SHAPE', /g has shape/);
    fails(() => rk.gatedDeltaRule({ ...good(), beta: mk([1, 5, 4]) }), 'ERR_SHAPE', /beta has shape/);
    fails(() => rk.gatedDeltaRule({ ...good(), g: mk([1, 6, 4], 'bfloat16') }), 'ERR_DTYPE', /g has dtype bfloat16/);
    fails(() => rk.gatedDeltaRule({ ...good(), v: mk([1, 6, 4, 3], 'float16') }), 'ERR_DTYPE', /v has dtype/);
    fails(() => rk.gatedDeltaRule({ ...good(), q: mk([1, 6, 2, 257]), k: mk([1, 6, 2, 257]) }), 'ERR_SHAPE', /K = 257/);
    fails(() => rk.gatedDeltaRule(good(), { scale: NaN }), 'ERR_ARGUMENT', /scale must be a finite number/);
    fails(() => rk.gatedDeltaRule(good(), { initialState: mk([1, 4, 4, 2]) }), 'ERR_SHAPE', /initialState has shape/);
    fails(() => rk.gatedDeltaRule(good(), { cuSeqlens: [0, 7] }), 'ERR_ARGUMENT', /exceeds T 6/);
    fails(() => rk.gatedDeltaRule(good(), { outputFinalstate: true } as never), 'ERR_ARGUMENT', /unknown option/);
    const g = good();
    g.beta.dispose();
    fails(() => rk.gatedDeltaRule(g), 'ERR_DISPOSED', /beta was disposed/);
    const { ctx } = rk.ops.gatedDeltaRule.forward(good(), { outputFinalState: true });
    fails(() => rk.ops.gatedDeltaRule.backward(ctx, { o: mk([1, 6, 4, 2]) }), 'ERR_SHAPE', /grad of o/);
    fails(
      () => rk.ops.gatedDeltaRule.backward(ctx, { finalState: mk([1, 4, 4, 2]) }),
      'ERR_SHAPE',
      /grad of finalState/,
    );
    fails(() => rk.gatedDeltaRuleStep({ ...good(), state: mk([1, 4, 3, 4]) }), 'ERR_SHAPE', /state has shape/);
    fails(
      () => rk.gatedDeltaRuleStep({ ...good(), state: mk([1, 4, 4, 3], 'bfloat16') }),
      'ERR_DTYPE',
      /state has dtype/,
    );
    const step = { ...good(), state: mk([1, 4, 4, 3]) };
    step.k.dispose();
    fails(() => rk.gatedDeltaRuleStep(step), 'ERR_DISPOSED', /k was disposed/);
  });
  it('the addon re-checks sizes it is given directly', () => {
    const n = rk.internals.native;
    const s = (k: number) => new Float32Array(k);
    const t = { q: s(48), k: s(48), v: s(72), g: s(24), beta: s(24), h0: null };
    const cfg = { batch: 1, T: 6, H: 2, HV: 4, K: 4, V: 3, scale: 0.5, l2norm: false };
    expect(() =>
      n().gatedDeltaRuleForward({
        device: 'cpu',
        dtype: 'float32',
        tensors: t,
        config: { ...cfg, cuSeqlens: null, returnFinal: false, keepStates: false },
      }),
    ).not.toThrow();
    fails(
      () =>
        n().gatedDeltaRuleForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, v: s(71) },
          config: { ...cfg, cuSeqlens: null, returnFinal: false, keepStates: false },
        }),
      'ERR_SHAPE',
      /v has 71/,
    );
    fails(
      () =>
        n().gatedDeltaRuleForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, HV: 3 }, cuSeqlens: null, returnFinal: false, keepStates: false },
        }),
      'ERR_SHAPE',
      /multiple/,
    );
    fails(
      () =>
        n().gatedDeltaRuleForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, scale: Infinity }, cuSeqlens: null, returnFinal: false, keepStates: false },
        }),
      'ERR_ARGUMENT',
      /scale/,
    );
    fails(
      () =>
        n().gatedDeltaRuleForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, cuSeqlens: new Int32Array([0, 9]), returnFinal: false, keepStates: false },
        }),
      'ERR_ARGUMENT',
      /cuSeqlens/,
    );
  });
});
