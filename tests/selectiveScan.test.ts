// Selective scan (Mamba-1) and its decode step: the native kernels against the float64 oracle,
// forward and backward, for every device present, every combination of optional inputs, odd sizes
// and the three dtypes; then the decode step against the scan, autograd, and bad input.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, tensor, tolerance, values } from './helpers';
import {
  selectiveScanRef,
  selectiveScanRefBackward,
  selectiveStateUpdateRef,
  type SelectiveScanRefOptions,
} from './reference/selectiveScan';
import { freshSeed, normal, perturbed, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;

interface Case {
  batch: number;
  dim: number;
  seqlen: number;
  dstate: number;
  groups: number;
  variableB: boolean;
  variableC: boolean;
  D: boolean;
  z: boolean;
  deltaBias: boolean;
  softplus: boolean;
  h0: boolean;
  cuSeqlens: number[] | null;
  dtype: rk.DType;
}

function describeCase(c: Case): string {
  const opts =
    (['variableB', 'variableC', 'D', 'z', 'deltaBias', 'softplus', 'h0'] as const).filter((k) => c[k]).join('+') ||
    'plain';
  return (
    `${c.dtype} ${c.batch}x${c.dim}x${c.seqlen} N${c.dstate} G${c.groups} ${opts}` +
    (c.cuSeqlens ? ` cu[${c.cuSeqlens.join(',')}]` : '')
  );
}

const base: Case = {
  batch: 2,
  dim: 3,
  seqlen: 7,
  dstate: 3,
  groups: 1,
  variableB: true,
  variableC: true,
  D: true,
  z: true,
  deltaBias: true,
  softplus: true,
  h0: true,
  cuSeqlens: null,
  dtype: 'float32',
};

/** Random inputs of a case as float64 arrays (A negative as in Mamba, delta around softplus' knee). */
function makeData(c: Case) {
  const { batch, dim, seqlen: L, dstate: N, groups } = c;
  const n = batch * dim * L;
  const bc = (variable: boolean) => normal(rand, variable ? batch * groups * N * L : dim * N);
  return {
    u: normal(rand, n),
    // delta itself is the step size when there is no softplus: keep it positive and small then.
    delta: c.softplus ? uniform(rand, n, -3, 1) : uniform(rand, n, 0.01, 0.6),
    A: uniform(rand, dim * N, -2, -0.1),
    B: bc(c.variableB),
    C: bc(c.variableC),
    D: c.D ? normal(rand, dim) : null,
    z: c.z ? normal(rand, n) : null,
    deltaBias: c.deltaBias ? (c.softplus ? normal(rand, dim, 0.5) : uniform(rand, dim, 0, 0.2)) : null,
    h0: c.h0 ? normal(rand, (c.cuSeqlens ? c.cuSeqlens.length - 1 : batch) * dim * N) : null,
  };
}

function runCase(c: Case, device: rk.Device) {
  const d = makeData(c);
  const { batch, dim, seqlen: L, dstate: N, groups } = c;
  const x = (v: Float64Array, shape: number[]) => tensor(v, shape, c.dtype, device);
  const f = (v: Float64Array, shape: number[]) => tensor(v, shape, 'float32', device);
  const bcShape = (variable: boolean) => (variable ? [batch, groups, N, L] : [dim, N]);
  const inputs = {
    u: x(d.u, [batch, dim, L]),
    delta: x(d.delta, [batch, dim, L]),
    A: f(d.A, [dim, N]),
    B: c.variableB ? x(d.B, bcShape(true)) : f(d.B, bcShape(false)),
    C: c.variableC ? x(d.C, bcShape(true)) : f(d.C, bcShape(false)),
    D: d.D ? f(d.D, [dim]) : null,
    z: d.z ? x(d.z, [batch, dim, L]) : null,
    deltaBias: d.deltaBias ? f(d.deltaBias, [dim]) : null,
  };
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const h0 = d.h0 ? f(d.h0, [nseq, dim, N]) : null;
  const options = { deltaSoftplus: c.softplus, initialState: h0, returnFinalState: true, cuSeqlens: c.cuSeqlens };
  const { outputs, ctx } = rk.ops.selectiveScan.forward(inputs, options);

  // The oracle sees exactly what the kernel saw (inputs rounded to the dtype).
  const refInputs = {
    u: values(inputs.u),
    delta: values(inputs.delta),
    A: values(inputs.A),
    B: values(inputs.B),
    C: values(inputs.C),
    D: inputs.D ? values(inputs.D) : null,
    z: inputs.z ? values(inputs.z) : null,
    deltaBias: inputs.deltaBias ? values(inputs.deltaBias) : null,
  };
  const refOptions: SelectiveScanRefOptions = {
    batch,
    dim,
    seqlen: L,
    dstate: N,
    groups,
    variableB: c.variableB,
    variableC: c.variableC,
    deltaSoftplus: c.softplus,
    initialState: h0 ? values(h0) : null,
    cuSeqlens: c.cuSeqlens,
  };
  const ref = selectiveScanRef(refInputs, refOptions);
  // The same oracle at inputs perturbed by float32 rounding: an element that is a difference of nearly
  // equal terms (likeliest in the one-element cases) is only determined to that spread, so the error
  // allowed is the dtype's tolerance plus 100x the relative spread (the float32 kernel's margin).
  const prand = rng(seed ^ 0x5eed);
  const p = (v: Float64Array | null) => (v ? perturbed(prand, v) : null);
  const pInputs = {
    u: p(refInputs.u)!,
    delta: p(refInputs.delta)!,
    A: p(refInputs.A)!,
    B: p(refInputs.B)!,
    C: p(refInputs.C)!,
    D: p(refInputs.D),
    z: p(refInputs.z),
    deltaBias: p(refInputs.deltaBias),
  };
  const pOptions = { ...refOptions, initialState: p(refOptions.initialState ?? null) };
  const pRef = selectiveScanRef(pInputs, pOptions);
  const tol = tolerance[c.dtype];
  const name = describeCase(c);
  const near = (got: Float64Array, want: Float64Array, spread: Float64Array, what: string) =>
    expect(relErr(got, want), at(`${name}: ${what}`)).toBeLessThan(tol + 100 * relErr(spread, want));
  near(values(outputs.y), ref.y, pRef.y, 'y');
  near(values(outputs.finalState!), ref.finalState, pRef.finalState, 'finalState');

  const dy = x(normal(rand, batch * dim * L), [batch, dim, L]);
  const dFinal = f(normal(rand, nseq * dim * N), [nseq, dim, N]);
  const g = rk.ops.selectiveScan.backward(ctx, { y: dy, finalState: dFinal });
  const gr = selectiveScanRefBackward(refInputs, refOptions, { dy: values(dy), dFinal: values(dFinal) });
  const pGr = selectiveScanRefBackward(pInputs, pOptions, { dy: p(values(dy))!, dFinal: p(values(dFinal))! });
  const check = (
    got: rk.Tensor | null | undefined,
    want: Float64Array | null,
    spread: Float64Array | null,
    what: string,
  ) => {
    if (want === null) {
      expect(got ?? null, at(`${name}: ${what} should be null`)).toBeNull();
      return;
    }
    expect(got, at(`${name}: ${what} missing`)).toBeTruthy();
    const v = values(got!);
    expect(v.every(Number.isFinite), at(`${name}: ${what} finite`)).toBe(true);
    // Sums over many channels and steps written in a 16-bit dtype: one rounding of a sum.
    near(v, want, spread!, what);
  };
  check(g.u, gr.du, pGr.du, 'du');
  check(g.delta, gr.ddelta, pGr.ddelta, 'ddelta');
  check(g.A, gr.dA, pGr.dA, 'dA');
  check(g.B, gr.dB, pGr.dB, 'dB');
  check(g.C, gr.dC, pGr.dC, 'dC');
  check(g.D, gr.dD, pGr.dD, 'dD');
  check(g.z, gr.dz, pGr.dz, 'dz');
  check(g.deltaBias, gr.dDeltaBias, pGr.dDeltaBias, 'dDeltaBias');
  check(g.initialState, gr.dInitialState, pGr.dInitialState, 'dInitialState');
  expect(g.B.shape).toEqual(inputs.B.shape);
  expect(g.B.dtype).toBe(inputs.B.dtype);
}

/** Every optional input on and off: pairwise-varied combinations around the base case. */
function optionCases(): Case[] {
  const flags = ['variableB', 'variableC', 'D', 'z', 'deltaBias', 'softplus', 'h0'] as const;
  const cases: Case[] = [
    { ...base },
    { ...base, variableB: false, variableC: false, D: false, z: false, deltaBias: false, softplus: false, h0: false },
  ];
  for (const k of flags) cases.push({ ...base, [k]: false });
  for (const k of flags)
    cases.push({
      ...base,
      variableB: false,
      variableC: false,
      D: false,
      z: false,
      deltaBias: false,
      softplus: false,
      h0: false,
      [k]: true,
    });
  cases.push({ ...base, variableB: true, variableC: false });
  cases.push({ ...base, variableB: false, variableC: true });
  return cases;
}

const sizeCases: Case[] = [
  { ...base, batch: 1, dim: 1, seqlen: 1, dstate: 1 },
  { ...base, batch: 1, dim: 2, seqlen: 1, dstate: 3, h0: true },
  { ...base, batch: 3, dim: 17, seqlen: 65, dstate: 5 }, // channels past a 16-lane block, 65 steps
  { ...base, batch: 2, dim: 36, seqlen: 129, dstate: 16, groups: 2 }, // groups of 18 channels
  { ...base, batch: 1, dim: 6, seqlen: 40, dstate: 3, groups: 3, variableC: false },
  { ...base, batch: 1, dim: 5, seqlen: 2049, dstate: 16 },
  { ...base, batch: 1, dim: 2, seqlen: 70, dstate: 256 },
  { ...base, batch: 2, dim: 3, seqlen: 7, dstate: 256, variableB: false, variableC: false },
];

const packedCases: Case[] = [
  { ...base, batch: 1, dim: 4, seqlen: 30, dstate: 4, cuSeqlens: [0, 5, 5, 17, 29] }, // empty sequence, tail
  { ...base, batch: 1, dim: 3, seqlen: 150, dstate: 3, cuSeqlens: [0, 1, 70, 150] }, // length 1, chunk-crossing
  { ...base, batch: 1, dim: 18, seqlen: 20, dstate: 2, groups: 2, cuSeqlens: [0, 20], h0: false },
  { ...base, batch: 1, dim: 2, seqlen: 9, dstate: 2, cuSeqlens: [0, 0], z: false }, // only an empty sequence
];

describe.each(devices)('selectiveScan on %s vs the float64 oracle', (device) => {
  it.each(optionCases().map((c) => [describeCase(c), c] as const))('options: %s', (_n, c) => runCase(c, device));
  it.each(sizeCases.map((c) => [describeCase(c), c] as const))('sizes: %s', (_n, c) => runCase(c, device));
  it.each(packedCases.map((c) => [describeCase(c), c] as const))('packed: %s', (_n, c) => runCase(c, device));
  it.each(['float16', 'bfloat16'] as const)('%s inputs', (dtype) => {
    runCase({ ...base, dtype, batch: 2, dim: 19, seqlen: 100, dstate: 16 }, device);
    runCase(
      { ...base, dtype, batch: 1, dim: 4, seqlen: 33, dstate: 3, variableC: false, cuSeqlens: [0, 10, 33] },
      device,
    );
  });
  it('softplus on both sides of its threshold (delta + bias around 20)', () => {
    const c = { ...base, batch: 1, dim: 4, seqlen: 12, dstate: 2 };
    const d = makeData(c);
    // shift delta so that delta + bias straddles 20; A small so exp does not underflow to nothing
    const u = tensor(d.u, [1, 4, 12]);
    const delta = tensor(
      Array.from(d.delta, (v, i) => 19 + 2 * ((i % 3) / 2) + v * 0.1),
      [1, 4, 12],
    );
    const A = tensor(uniform(rand, 8, -0.05, -0.01), [4, 2]);
    const B = tensor(normal(rand, 24), [1, 1, 2, 12]);
    const C = tensor(normal(rand, 24), [1, 1, 2, 12]);
    const { outputs, ctx } = rk.ops.selectiveScan.forward({ u, delta, A, B, C }, { deltaSoftplus: true });
    const ref = selectiveScanRef(
      { u: values(u), delta: values(delta), A: values(A), B: values(B), C: values(C) },
      { batch: 1, dim: 4, seqlen: 12, dstate: 2, variableB: true, variableC: true, deltaSoftplus: true },
    );
    expect(relErr(values(outputs.y), ref.y), at('y')).toBeLessThan(1e-5);
    const dy = tensor(normal(rand, 48), [1, 4, 12]);
    const g = rk.ops.selectiveScan.backward(ctx, { y: dy });
    const gr = selectiveScanRefBackward(
      { u: values(u), delta: values(delta), A: values(A), B: values(B), C: values(C) },
      { batch: 1, dim: 4, seqlen: 12, dstate: 2, variableB: true, variableC: true, deltaSoftplus: true },
      { dy: values(dy) },
    );
    expect(relErr(values(g.delta), gr.ddelta), at('ddelta')).toBeLessThan(1e-5);
  });
  it('a gradient only through finalState, and none at all', () => {
    const c = { ...base, batch: 2, dim: 3, seqlen: 70, dstate: 3, cuSeqlens: null, softplus: false };
    const d = makeData(c);
    const inputs = {
      u: tensor(d.u, [2, 3, 70], 'float32', device),
      delta: tensor(d.delta, [2, 3, 70], 'float32', device),
      A: tensor(d.A, [3, 3], 'float32', device),
      B: tensor(d.B, [2, 1, 3, 70], 'float32', device),
      C: tensor(d.C, [2, 1, 3, 70], 'float32', device),
    };
    const refInputs = { u: d.u, delta: d.delta, A: d.A, B: d.B, C: d.C };
    const refOptions = { batch: 2, dim: 3, seqlen: 70, dstate: 3, variableB: true, variableC: true };
    const { ctx } = rk.ops.selectiveScan.forward(inputs, { returnFinalState: true });
    const dFinal = tensor(normal(rand, 18), [2, 3, 3], 'float32', device);
    const g = rk.ops.selectiveScan.backward(ctx, { finalState: dFinal });
    const gr = selectiveScanRefBackward(refInputs, refOptions, { dFinal: values(dFinal) });
    expect(relErr(values(g.u), gr.du), at('du')).toBeLessThan(1e-5);
    expect(relErr(values(g.A), gr.dA), at('dA')).toBeLessThan(1e-5);
    const none = rk.ops.selectiveScan.backward(ctx, {});
    expect(values(none.u).every((v) => v === 0)).toBe(true);
    expect(values(none.B).every((v) => v === 0)).toBe(true);
  });
  it('rank-3 B/C (batch, dstate, seqlen) are one group', () => {
    const d = makeData({ ...base, batch: 2, dim: 3, seqlen: 9, dstate: 4 });
    const mk = (shape: number[], v: Float64Array) => tensor(v, shape, 'float32', device);
    const common = { u: mk([2, 3, 9], d.u), delta: mk([2, 3, 9], d.delta), A: mk([3, 4], d.A) };
    const y3 = rk.selectiveScan({ ...common, B: mk([2, 4, 9], d.B), C: mk([2, 4, 9], d.C) }, { deltaSoftplus: true }).y;
    const y4 = rk.selectiveScan(
      { ...common, B: mk([2, 1, 4, 9], d.B), C: mk([2, 1, 4, 9], d.C) },
      { deltaSoftplus: true },
    ).y;
    expect(Array.from(values(y3))).toEqual(Array.from(values(y4)));
  });
});

describe.each(devices)('selectiveStateUpdate on %s', (device) => {
  function decodeCase(tokens: number, groups: number, dtype: rk.DType, oneTokenShapes = false) {
    const batch = 3,
      dim = 6,
      N = 5;
    const x = normal(rand, batch * dim * tokens),
      dt = uniform(rand, batch * dim * tokens, -2, 1);
    const z = normal(rand, batch * dim * tokens);
    const B = normal(rand, batch * groups * N * tokens),
      C = normal(rand, batch * groups * N * tokens);
    const A = uniform(rand, dim * N, -2, -0.1),
      D = normal(rand, dim),
      dtBias = normal(rand, dim, 0.3);
    const state0 = normal(rand, batch * dim * N);
    const xs = oneTokenShapes ? [batch, dim] : [batch, dim, tokens];
    const bs = oneTokenShapes ? (groups === 1 ? [batch, N] : [batch, groups, N]) : [batch, groups, N, tokens];
    const t = {
      state: tensor(state0, [batch, dim, N], 'float32', device),
      x: tensor(x, xs, dtype, device),
      dt: tensor(dt, xs, dtype, device),
      z: tensor(z, xs, dtype, device),
      B: tensor(B, bs, dtype, device),
      C: tensor(C, bs, dtype, device),
      A: tensor(A, [dim, N], 'float32', device),
      D: tensor(D, [dim], 'float32', device),
      dtBias: tensor(dtBias, [dim], 'float32', device),
    };
    const ref = selectiveStateUpdateRef(
      {
        state: state0,
        x: values(t.x),
        dt: values(t.dt),
        z: values(t.z),
        B: values(t.B),
        C: values(t.C),
        A,
        D,
        dtBias,
      },
      { batch, dim, dstate: N, groups, tokens, dtSoftplus: true },
    );
    return { t, ref, batch, dim, N };
  }

  it.each([
    [1, 1, true],
    [1, 2, true],
    [1, 3, false],
    [4, 2, false],
  ] as const)('%i token(s), %i group(s), single-token shapes %s: equals the oracle', (tokens, groups, single) => {
    for (const dtype of ['float32', 'bfloat16'] as const) {
      const { t, ref } = decodeCase(tokens, groups, dtype, single);
      const r = rk.selectiveStateUpdate(t, { dtSoftplus: true, returnIntermediateStates: true });
      expect(relErr(values(r.y), ref.y), at(`y ${dtype}`)).toBeLessThan(tolerance[dtype]);
      expect(relErr(values(t.state), ref.state), at(`state ${dtype}`)).toBeLessThan(tolerance[dtype]);
      expect(relErr(values(r.intermediateStates!), ref.intermediateStates), at('intermediate')).toBeLessThan(
        tolerance[dtype],
      );
    }
  });

  it('updateState: false leaves the state alone', () => {
    const { t } = decodeCase(2, 1, 'float32');
    const before = Array.from(values(t.state));
    rk.selectiveStateUpdate(t, { dtSoftplus: true, updateState: false });
    expect(Array.from(values(t.state))).toEqual(before);
  });

  it('decoding token by token equals the last positions of the full scan', () => {
    const batch = 2,
      dim = 5,
      L = 9,
      N = 4;
    const d = makeData({ ...base, batch, dim, seqlen: L, dstate: N });
    const mk = (v: ArrayLike<number>, shape: number[]) => tensor(v, shape, 'float32', device);
    const scan = rk.selectiveScan(
      {
        u: mk(d.u, [batch, dim, L]),
        delta: mk(d.delta, [batch, dim, L]),
        A: mk(d.A, [dim, N]),
        B: mk(d.B, [batch, 1, N, L]),
        C: mk(d.C, [batch, 1, N, L]),
        D: mk(d.D!, [dim]),
        z: mk(d.z!, [batch, dim, L]),
        deltaBias: mk(d.deltaBias!, [dim]),
      },
      { deltaSoftplus: true, returnFinalState: true },
    );
    const ys = values(scan.y);
    const state = mk(new Float64Array(batch * dim * N), [batch, dim, N]);
    const pick = (src: Float64Array, rows: number, t: number) => Array.from({ length: rows }, (_, r) => src[r * L + t]);
    for (let t = 0; t < L; t++) {
      const step = rk.selectiveStateUpdate(
        {
          state,
          x: mk(pick(d.u, batch * dim, t), [batch, dim]),
          dt: mk(pick(d.delta, batch * dim, t), [batch, dim]),
          A: mk(d.A, [dim, N]),
          B: mk(pick(d.B, batch * N, t), [batch, N]),
          C: mk(pick(d.C, batch * N, t), [batch, N]),
          D: mk(d.D!, [dim]),
          z: mk(pick(d.z!, batch * dim, t), [batch, dim]),
          dtBias: mk(d.deltaBias!, [dim]),
        },
        { dtSoftplus: true },
      );
      expect(relErr(values(step.y), pick(ys, batch * dim, t)), at(`step ${t}`)).toBeLessThan(1e-5);
    }
    expect(relErr(values(state), values(scan.finalState!)), at('final state')).toBeLessThan(1e-5);
  });
});

describe('selectiveScan autograd', () => {
  it("the tape gives the backward hook's gradients, and gradcheck passes", () => {
    const d = makeData({ ...base, batch: 1, dim: 2, seqlen: 5, dstate: 2 });
    const u = tensor(d.u, [1, 2, 5]),
      delta = tensor(d.delta, [1, 2, 5]),
      A = tensor(d.A, [2, 2]);
    const B = tensor(d.B, [1, 1, 2, 5]),
      C = tensor(d.C, [1, 1, 2, 5]),
      D = tensor(d.D!, [2]);
    const f = (u_: rk.Tensor, delta_: rk.Tensor, A_: rk.Tensor, B_: rk.Tensor, C_: rk.Tensor, D_: rk.Tensor) =>
      rk.sum(
        rk.square(rk.selectiveScan({ u: u_, delta: delta_, A: A_, B: B_, C: C_, D: D_ }, { deltaSoftplus: true }).y),
      );
    const res = rk.gradcheck(f, [u, delta, A, B, C, D], { eps: 1e-2, rtol: 2e-2, atol: 2e-3 });
    expect(res.ok, JSON.stringify(res).slice(0, 500)).toBe(true);
  });
});

describe('selectiveScan bad input', () => {
  const mk = (shape: number[], dtype: rk.DType = 'float32') =>
    tensor(new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.1), shape, dtype);
  const good = () => ({
    u: mk([2, 4, 6]),
    delta: mk([2, 4, 6]),
    A: mk([4, 3]),
    B: mk([2, 2, 3, 6]),
    C: mk([4, 3]),
    D: mk([4]),
    z: mk([2, 4, 6]),
    deltaBias: mk([4]),
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

  it('runs when everything is right (the baseline of the cases below)', () => {
    expect(rk.selectiveScan(good()).y.shape).toEqual([2, 4, 6]);
  });
  it('rejects wrong shapes, naming the argument', () => {
    fails(() => rk.selectiveScan({ ...good(), u: mk([2, 4]) }), 'ERR_SHAPE', /u has shape \[2,4\]/);
    fails(() => rk.selectiveScan({ ...good(), delta: mk([2, 4, 7]) }), 'ERR_SHAPE', /delta has shape .*to match u/);
    fails(() => rk.selectiveScan({ ...good(), A: mk([5, 3]) }), 'ERR_SHAPE', /A has shape/);
    fails(() => rk.selectiveScan({ ...good(), A: mk([4, 257]), C: mk([4, 257]) }), 'ERR_SHAPE', /dstate 257/);
    fails(() => rk.selectiveScan({ ...good(), B: mk([2, 3, 3, 6]) }), 'ERR_SHAPE', /B has 3 groups/);
    fails(() => rk.selectiveScan({ ...good(), B: mk([2, 2, 3, 5]) }), 'ERR_SHAPE', /B has shape/);
    fails(() => rk.selectiveScan({ ...good(), C: mk([2, 4, 3, 6]) }), 'ERR_SHAPE', /groups/);
    fails(() => rk.selectiveScan({ ...good(), D: mk([3]) }), 'ERR_SHAPE', /D has shape/);
    fails(() => rk.selectiveScan({ ...good(), z: mk([2, 4, 5]) }), 'ERR_SHAPE', /z has shape/);
    fails(() => rk.selectiveScan({ ...good(), u: mk([0, 4, 6]), delta: mk([0, 4, 6]) }), 'ERR_SHAPE', /at least 1/);
    fails(() => rk.selectiveScan(good(), { initialState: mk([2, 4, 2]) }), 'ERR_SHAPE', /initialState has shape/);
  });
  it('rejects wrong dtypes', () => {
    fails(
      () => rk.selectiveScan({ ...good(), delta: mk([2, 4, 6], 'bfloat16') }),
      'ERR_DTYPE',
      /delta has dtype bfloat16/,
    );
    fails(() => rk.selectiveScan({ ...good(), A: mk([4, 3], 'float16') }), 'ERR_DTYPE', /A has dtype float16/);
    fails(() => rk.selectiveScan({ ...good(), C: mk([4, 3], 'float16') }), 'ERR_DTYPE', /C has dtype/);
    fails(() => rk.selectiveScan(good(), { initialState: mk([2, 4, 3], 'bfloat16') }), 'ERR_DTYPE', /initialState/);
  });
  it('rejects bad options and cuSeqlens', () => {
    fails(
      () => rk.selectiveScan(good(), { deltaSoftPlus: true } as never),
      'ERR_ARGUMENT',
      /unknown option 'deltaSoftPlus'/,
    );
    fails(() => rk.selectiveScan({ ...good(), y: mk([1]) } as never), 'ERR_ARGUMENT', /unknown input 'y'/);
    fails(
      () => rk.selectiveScan(good(), { deltaSoftplus: 1 } as never),
      'ERR_ARGUMENT',
      /deltaSoftplus must be a boolean/,
    );
    fails(() => rk.selectiveScan(good(), { cuSeqlens: [0, 6] }), 'ERR_SHAPE', /batch of 1/);
    const one = { ...good(), u: mk([1, 4, 6]), delta: mk([1, 4, 6]), z: null, B: mk([4, 3]) };
    expect(rk.selectiveScan(one, { cuSeqlens: [0, 2, 6] }).y.shape).toEqual([1, 4, 6]);
    fails(() => rk.selectiveScan(one, { cuSeqlens: [1, 6] }), 'ERR_ARGUMENT', /cuSeqlens\[0\] must be 0/);
    fails(() => rk.selectiveScan(one, { cuSeqlens: [0, 4, 3] }), 'ERR_ARGUMENT', /non-decreasing/);
    fails(() => rk.selectiveScan(one, { cuSeqlens: [0, 7] }), 'ERR_ARGUMENT', /exceeds seqlen/);
    fails(() => rk.selectiveScan(one, { cuSeqlens: [0, 2.5, 6] }), 'ERR_ARGUMENT', /integer/);
    fails(() => rk.selectiveScan(one, { cuSeqlens: [0] }), 'ERR_ARGUMENT', /at least 2/);
    fails(() => rk.selectiveScan(one, { cuSeqlens: 'x' } as never), 'ERR_ARGUMENT', /Int32Array/);
    fails(
      () => rk.selectiveScan(one, { cuSeqlens: [0, 2, 6], initialState: mk([1, 4, 3]) }),
      'ERR_SHAPE',
      /initialState has shape \[1,4,3\], expected \[2,4,3\]/,
    );
  });
  it('rejects disposed tensors and non-tensors', () => {
    const g = good();
    g.B.dispose();
    fails(() => rk.selectiveScan(g), 'ERR_DISPOSED', /B was disposed/);
    fails(() => rk.selectiveScan({ ...good(), A: [1, 2] as never }), 'ERR_ARGUMENT', /A must be a Tensor/);
    const { ctx } = rk.ops.selectiveScan.forward(good());
    ctx.inputs.u.dispose();
    fails(() => rk.ops.selectiveScan.backward(ctx, { y: mk([2, 4, 6]) }), 'ERR_DISPOSED', /u \(saved for backward\)/);
  });
  it('rejects bad gradients', () => {
    const { ctx } = rk.ops.selectiveScan.forward(good(), { returnFinalState: true });
    fails(() => rk.ops.selectiveScan.backward(ctx, { y: mk([2, 4, 5]) }), 'ERR_SHAPE', /grad of y/);
    fails(() => rk.ops.selectiveScan.backward(ctx, { y: mk([2, 4, 6], 'float16') }), 'ERR_DTYPE', /grad of y/);
    fails(() => rk.ops.selectiveScan.backward(ctx, { finalState: mk([2, 4, 2]) }), 'ERR_SHAPE', /grad of finalState/);
  });
  it('the addon re-checks sizes it is given directly', () => {
    const n = rk.internals.native;
    const s = (k: number) => new Float32Array(k);
    const t = { u: s(48), delta: s(48), A: s(12), B: s(72), C: s(12), D: null, z: null, deltaBias: null, h0: null };
    const cfg = {
      batch: 2,
      dim: 4,
      seqlen: 6,
      dstate: 3,
      groups: 2,
      variableB: true,
      variableC: false,
      deltaSoftplus: false,
    };
    expect(() =>
      n().selectiveScanForward({
        device: 'cpu',
        dtype: 'float32',
        tensors: t,
        config: { ...cfg, cuSeqlens: null, returnFinal: false },
      }),
    ).not.toThrow();
    fails(
      () =>
        n().selectiveScanForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, B: s(71) },
          config: { ...cfg, cuSeqlens: null, returnFinal: false },
        }),
      'ERR_SHAPE',
      /B has 71/,
    );
    fails(
      () =>
        n().selectiveScanForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, groups: 3 }, cuSeqlens: null, returnFinal: false },
        }),
      'ERR_SHAPE',
      /groups/,
    );
    fails(
      () =>
        n().selectiveScanForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, batch: 1 }, cuSeqlens: new Int32Array([0, 6]), returnFinal: false },
        }),
      'ERR_SHAPE',
      /u has 48/,
    );
    fails(
      () =>
        n().selectiveScanForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, u: s(8), delta: s(8), B: s(36) },
          config: { ...cfg, batch: 1, seqlen: 2, cuSeqlens: new Int32Array([0, 3]), returnFinal: false },
        }),
      'ERR_ARGUMENT',
      /cuSeqlens/,
    );
  });
});

describe('selectiveStateUpdate bad input', () => {
  const mk = (shape: number[], dtype: rk.DType = 'float32') =>
    tensor(new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.1), shape, dtype);
  const good = () => ({
    state: mk([2, 4, 3]),
    x: mk([2, 4]),
    dt: mk([2, 4]),
    A: mk([4, 3]),
    B: mk([2, 3]),
    C: mk([2, 3]),
  });
  const code = (fn: () => unknown) => {
    try {
      fn();
    } catch (e) {
      return `${(e as rk.RecurrentKernelsError).code}: ${(e as Error).message}`;
    }
    return 'no error';
  };
  it('names the argument and the expected shape / dtype', () => {
    expect(code(() => rk.selectiveStateUpdate(good()))).toBe('no error');
    expect(code(() => rk.selectiveStateUpdate({ ...good(), state: mk([2, 4, 3], 'bfloat16') }))).toMatch(
      /ERR_DTYPE: .*state/,
    );
    expect(code(() => rk.selectiveStateUpdate({ ...good(), x: mk([2, 5]) }))).toMatch(
      /ERR_SHAPE: .*x has shape \[2,5\]/,
    );
    expect(code(() => rk.selectiveStateUpdate({ ...good(), dt: mk([2, 4], 'float16') }))).toMatch(/ERR_DTYPE: .*dt/);
    expect(code(() => rk.selectiveStateUpdate({ ...good(), B: mk([2, 4]) }))).toMatch(/ERR_SHAPE: .*B has shape/);
    expect(code(() => rk.selectiveStateUpdate({ ...good(), C: mk([2, 3, 3]) }))).toMatch(/ERR_SHAPE: .*C has 3 groups/);
    expect(code(() => rk.selectiveStateUpdate({ ...good(), x: mk([2, 4, 2]), dt: mk([2, 4, 2]) }))).toMatch(
      /ERR_SHAPE: .*B has shape \[2,3\], expected 4 dimensions/,
    );
    expect(code(() => rk.selectiveStateUpdate(good(), { updateState: 'yes' } as never))).toMatch(/ERR_ARGUMENT/);
    const g = good();
    g.state.dispose();
    expect(code(() => rk.selectiveStateUpdate(g))).toMatch(/ERR_DISPOSED: .*state/);
  });
});
