// mamba2Scan and mamba2StateUpdate against the float64 oracle (tests/reference/mamba2.ts), forward
// and backward: awkward lengths (1, 63, 65, 257), one group and several, headdim 1 and 64, D per head
// or per channel, the z gate, softplus, dtLimit, packed sequences with empty members; the decode
// step (one token and several, in place, intermediate states); an independent path (headdim 1:
// selectiveScan with A broadcast over dstate); and typed errors.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { expectError, hasCuda, tensor, tolerance, values } from './helpers';
import { mamba2Ref, mamba2RefBackward, mamba2StepRef, type Mamba2RefOptions } from './reference/mamba2Scan';
import { freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const f32 = (x: ArrayLike<number>) => Float64Array.from(Float32Array.from(x));

interface Case {
  batch: number;
  T: number;
  H: number;
  P: number;
  G: number;
  N: number;
  D?: 'head' | 'channel';
  z?: boolean;
  dtBias?: boolean;
  softplus?: boolean;
  dtLimit?: [number, number];
  h0?: boolean;
  cuSeqlens?: number[];
  dtype?: rk.DType;
  device?: rk.Device;
}

function problem(c: Case) {
  const { batch, T, H, P, G, N } = c;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const BT = batch * T;
  return {
    x: f32(normal(rand, BT * H * P)),
    // Raw time steps: softplus maps them into (0.05, 1.3); without it they are the steps themselves.
    dt: f32(c.softplus ? uniform(rand, BT * H, -3, 1) : uniform(rand, BT * H, 0.02, 0.8)),
    A: f32(uniform(rand, H, -2, -0.2)),
    B: f32(normal(rand, BT * G * N, 1 / Math.sqrt(N))),
    C: f32(normal(rand, BT * G * N, 1 / Math.sqrt(N))),
    D: c.D ? f32(normal(rand, c.D === 'channel' ? H * P : H)) : null,
    z: c.z ? f32(normal(rand, BT * H * P, 1.5)) : null,
    dtBias: c.dtBias ? f32(uniform(rand, H, -0.5, 0.5)) : null,
    h0: c.h0 ? f32(normal(rand, nseq * H * P * N, 0.5)) : null,
    nseq,
  };
}

function runCase(c: Case, withBackward = true) {
  const { batch, T, H, P, G, N } = c;
  const dtype = c.dtype ?? 'float32';
  const device = c.device ?? 'cpu';
  const p = problem(c);
  const mk = (v: Float64Array | null, shape: number[], dt: rk.DType = dtype) =>
    v ? tensor(v, shape, dt, device) : null;
  const inputs = {
    x: mk(p.x, [batch, T, H, P]) as rk.Tensor,
    dt: mk(p.dt, [batch, T, H]) as rk.Tensor,
    A: mk(p.A, [H], 'float32') as rk.Tensor,
    B: mk(p.B, [batch, T, G, N]) as rk.Tensor,
    C: mk(p.C, [batch, T, G, N]) as rk.Tensor,
    D: mk(p.D, c.D === 'channel' ? [H, P] : [H], 'float32'),
    z: mk(p.z, [batch, T, H, P]),
    dtBias: mk(p.dtBias, [H], 'float32'),
  };
  const options: rk.Mamba2ScanOptions = {
    dtSoftplus: !!c.softplus,
    dtLimit: c.dtLimit ?? null,
    initialStates: mk(p.h0, [p.nseq, H, P, N], 'float32'),
    returnFinalStates: true,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  // Inputs rounded to the dtype, as the kernels see them.
  const seen = (x: Float64Array | null) => (x ? values(tensor(x, [x.length], dtype)) : null);
  const refIn = {
    x: seen(p.x) as Float64Array,
    dt: seen(p.dt) as Float64Array,
    A: p.A,
    B: seen(p.B) as Float64Array,
    C: seen(p.C) as Float64Array,
    D: p.D,
    z: seen(p.z),
    dtBias: p.dtBias,
  };
  const refOpts: Mamba2RefOptions = {
    batch,
    T,
    H,
    P,
    G,
    N,
    dtSoftplus: !!c.softplus,
    dtLimit: c.dtLimit ?? null,
    dPerChannel: c.D === 'channel',
    initialStates: p.h0,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  const ref = mamba2Ref(refIn, refOpts);
  // v = d x is rounded to the dtype before the scan: half dtypes get a looser bound.
  const tol = dtype === 'float32' ? 2e-5 : tolerance[dtype] * 3;
  if (!withBackward) {
    const out = rk.mamba2Scan(inputs, options);
    expect(relErr(values(out.y), ref.y), at('y')).toBeLessThan(tol);
    expect(relErr(values(out.finalStates!), ref.finalStates), at('finalStates')).toBeLessThan(tol);
    return;
  }
  const { outputs, ctx } = rk.ops.mamba2Scan.forward(inputs, options);
  expect(outputs.y.shape).toEqual([batch, T, H, P]);
  expect(outputs.y.dtype).toBe(dtype);
  expect(relErr(values(outputs.y), ref.y), at('y')).toBeLessThan(tol);
  expect(relErr(values(outputs.finalStates!), ref.finalStates), at('finalStates')).toBeLessThan(tol);
  const wY = f32(normal(rand, batch * T * H * P)),
    wF = f32(normal(rand, p.nseq * H * P * N));
  const grads = rk.ops.mamba2Scan.backward(ctx, {
    y: tensor(wY, [batch, T, H, P], dtype, device),
    finalStates: tensor(wF, [p.nseq, H, P, N], 'float32', device),
  });
  const rg = mamba2RefBackward(refIn, refOpts, { y: seen(wY), finalStates: wF });
  const gtol = dtype === 'float32' ? 1e-4 : tolerance[dtype] * 4;
  for (const k of ['x', 'dt', 'A', 'B', 'C'] as const) {
    expect(grads[k].shape, k).toEqual(inputs[k].shape);
    expect(relErr(values(grads[k]), rg[k]), at(`d${k}`)).toBeLessThan(gtol);
  }
  for (const k of ['D', 'z', 'dtBias', 'initialStates'] as const) {
    const want = rg[k];
    if (want === null) expect(grads[k], k).toBeNull();
    else expect(relErr(values(grads[k]!), want), at(`d${k}`)).toBeLessThan(gtol);
  }
  rk.disposeCtx(ctx);
}

const name = (c: Case) =>
  `${c.batch}x${c.T} H ${c.H} P ${c.P} G ${c.G} N ${c.N}${c.D ? ` D per ${c.D}` : ''}${c.z ? ' z' : ''}` +
  `${c.dtBias ? ' dtBias' : ''}${c.softplus ? ' softplus' : ''}${c.dtLimit ? ` dtLimit [${c.dtLimit}]` : ''}` +
  `${c.h0 ? ' h0' : ''}${c.cuSeqlens ? ` packed [${c.cuSeqlens}]` : ''}${c.dtype && c.dtype !== 'float32' ? ` ${c.dtype}` : ''}`;

const CASES: Case[] = [
  { batch: 2, T: 65, H: 4, P: 5, G: 1, N: 7, D: 'head', z: true, dtBias: true, softplus: true, h0: true },
  { batch: 1, T: 63, H: 6, P: 3, G: 3, N: 16, D: 'channel', z: true, softplus: true },
  { batch: 2, T: 1, H: 2, P: 1, G: 2, N: 5, h0: true },
  { batch: 1, T: 257, H: 2, P: 64, G: 1, N: 64, D: 'head', z: true, dtBias: true, softplus: true, h0: true },
  { batch: 3, T: 9, H: 4, P: 2, G: 2, N: 3, dtLimit: [0.1, 0.6], D: 'head' },
  { batch: 2, T: 33, H: 3, P: 4, G: 1, N: 8, softplus: true, dtBias: true, dtLimit: [0.2, 1.1], z: true, h0: true },
  {
    batch: 1,
    T: 70,
    H: 2,
    P: 3,
    G: 1,
    N: 6,
    D: 'head',
    z: true,
    softplus: true,
    h0: true,
    cuSeqlens: [0, 0, 1, 66, 66, 70],
  },
  { batch: 1, T: 40, H: 4, P: 5, G: 2, N: 4, D: 'channel', z: true, softplus: true, cuSeqlens: [0, 9, 9, 30] },
  { batch: 2, T: 20, H: 4, P: 8, G: 2, N: 16, D: 'head', z: true, softplus: true, h0: true, dtype: 'bfloat16' },
  { batch: 2, T: 20, H: 2, P: 8, G: 1, N: 16, D: 'channel', z: true, dtBias: true, softplus: true, dtype: 'float16' },
];

describe('mamba2Scan vs the float64 oracle, forward and backward', () => {
  it.each(CASES.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));

  it('untaped inference equals the oracle (no checkpoints kept)', () => {
    runCase(CASES[0], false);
    runCase(CASES[6], false);
  });

  it('gradients through y alone, finalStates alone, or neither are the parts of the whole', () => {
    const c: Case = { batch: 2, T: 11, H: 2, P: 3, G: 1, N: 4, D: 'head', z: true, softplus: true, h0: true };
    const { batch, T, H, P, G, N } = c;
    const p = problem(c);
    const inputs = {
      x: tensor(p.x, [batch, T, H, P]),
      dt: tensor(p.dt, [batch, T, H]),
      A: tensor(p.A, [H]),
      B: tensor(p.B, [batch, T, G, N]),
      C: tensor(p.C, [batch, T, G, N]),
      D: tensor(p.D!, [H]),
      z: tensor(p.z!, [batch, T, H, P]),
    };
    const options = {
      dtSoftplus: true,
      initialStates: tensor(p.h0!, [batch, H, P, N]),
      returnFinalStates: true,
    };
    const gy = tensor(normal(rand, batch * T * H * P), [batch, T, H, P]),
      gF = tensor(normal(rand, batch * H * P * N), [batch, H, P, N]);
    const run = (grads: { y?: rk.Tensor; finalStates?: rk.Tensor }) => {
      const { ctx } = rk.ops.mamba2Scan.forward(inputs, options);
      return rk.ops.mamba2Scan.backward(ctx, grads);
    };
    const both = run({ y: gy, finalStates: gF }),
      onlyY = run({ y: gy }),
      onlyF = run({ finalStates: gF }),
      none = run({});
    for (const k of ['x', 'dt', 'A', 'B', 'C', 'D', 'z', 'initialStates'] as const) {
      const sum = values(onlyY[k]!).map((v, i) => v + values(onlyF[k]!)[i]);
      expect(relErr(values(both[k]!), sum), at(k)).toBeLessThan(1e-5);
      expect(Math.max(...values(none[k]!).map(Math.abs)), k).toBe(0);
    }
  });
});

describe('mamba2Scan against an independent path', () => {
  it('headdim 1, one group per head: selectiveScan with A broadcast over dstate', () => {
    const batch = 2,
      T = 37,
      H = 3,
      N = 5;
    const c: Case = { batch, T, H, P: 1, G: H, N, D: 'head', z: true, dtBias: true, softplus: true, h0: true };
    const p = problem(c);
    const ours = rk.mamba2Scan(
      {
        x: tensor(p.x, [batch, T, H, 1]),
        dt: tensor(p.dt, [batch, T, H]),
        A: tensor(p.A, [H]),
        B: tensor(p.B, [batch, T, H, N]),
        C: tensor(p.C, [batch, T, H, N]),
        D: tensor(p.D!, [H]),
        z: tensor(p.z!, [batch, T, H, 1]),
        dtBias: tensor(p.dtBias!, [H]),
      },
      { dtSoftplus: true, initialStates: tensor(p.h0!, [batch, H, 1, N]), returnFinalStates: true },
    );
    // selectiveScan is channel-first: u (batch, dim, T), B (batch, groups, N, T); dim = groups = H.
    const chFirst = (v: Float64Array, inner: number) =>
      Float64Array.from({ length: v.length }, (_, i) => {
        const t = i % T,
          rest = Math.floor(i / T),
          j = rest % (H * inner),
          b = Math.floor(rest / (H * inner));
        return v[(b * T + t) * H * inner + j];
      });
    const toBNT = (v: Float64Array) => {
      // (batch, T, H, N) -> (batch, H, N, T)
      const out = new Float64Array(v.length);
      for (let b = 0; b < batch; b++)
        for (let t = 0; t < T; t++)
          for (let h = 0; h < H; h++)
            for (let n = 0; n < N; n++) out[((b * H + h) * N + n) * T + t] = v[((b * T + t) * H + h) * N + n];
      return out;
    };
    const theirs = rk.selectiveScan(
      {
        u: tensor(chFirst(p.x, 1), [batch, H, T]),
        delta: tensor(chFirst(p.dt, 1), [batch, H, T]),
        A: tensor(
          Float64Array.from({ length: H * N }, (_, i) => p.A[Math.floor(i / N)]),
          [H, N],
        ),
        B: tensor(toBNT(p.B), [batch, H, N, T]),
        C: tensor(toBNT(p.C), [batch, H, N, T]),
        D: tensor(p.D!, [H]),
        z: tensor(chFirst(p.z!, 1), [batch, H, T]),
        deltaBias: tensor(p.dtBias!, [H]),
      },
      { deltaSoftplus: true, initialState: tensor(p.h0!, [batch, H, N]), returnFinalState: true },
    );
    // Compare in our layout: theirs.y (batch, H, T) -> (batch, T, H).
    const ty = values(theirs.y);
    const tyOurs = Float64Array.from({ length: ty.length }, (_, i) => {
      const h = i % H,
        t = Math.floor(i / H) % T,
        b = Math.floor(i / (H * T));
      return ty[(b * H + h) * T + t];
    });
    expect(relErr(values(ours.y), tyOurs), at('y')).toBeLessThan(2e-5);
    expect(relErr(values(ours.finalStates!), values(theirs.finalState!)), at('finalStates')).toBeLessThan(2e-5);
  });
});

describe('mamba2StateUpdate vs the float64 oracle', () => {
  function stepCase(tokens: number, G: number, dtype: rk.DType, update: boolean, intermediate: boolean) {
    const batch = 3,
      H = 4,
      P = 6,
      N = 5;
    const c: Case = { batch, T: tokens, H, P, G, N, D: 'channel', z: true, dtBias: true, softplus: true };
    const p = problem(c);
    const state0 = f32(normal(rand, batch * H * P * N, 0.5));
    const one = tokens === 1;
    const lead = one ? [batch] : [batch, tokens];
    const state = tensor(state0, [batch, H, P, N]);
    const out = rk.mamba2StateUpdate(
      {
        state,
        x: tensor(p.x, [...lead, H, P], dtype),
        dt: tensor(p.dt, [...lead, H], dtype),
        A: tensor(p.A, [H]),
        B: tensor(p.B, [...lead, G, N], dtype),
        C: tensor(p.C, [...lead, G, N], dtype),
        D: tensor(p.D!, [H, P]),
        z: tensor(p.z!, [...lead, H, P], dtype),
        dtBias: tensor(p.dtBias!, [H]),
      },
      { dtSoftplus: true, updateState: update, returnIntermediateStates: intermediate },
    );
    const seen = (x: Float64Array) => values(tensor(x, [x.length], dtype));
    const ref = mamba2StepRef(
      { x: seen(p.x), dt: seen(p.dt), A: p.A, B: seen(p.B), C: seen(p.C), D: p.D, z: seen(p.z!), dtBias: p.dtBias },
      { batch, T: tokens, H, P, G, N, dtSoftplus: true, dPerChannel: true, state: state0 },
    );
    const tol = dtype === 'float32' ? 2e-5 : tolerance[dtype] * 2;
    expect(out.y.shape).toEqual([...lead, H, P]);
    expect(relErr(values(out.y), ref.y), at('y')).toBeLessThan(tol);
    if (update) expect(relErr(values(state), ref.state), at('state')).toBeLessThan(2e-5);
    else expect(Array.from(values(state))).toEqual(Array.from(state0));
    if (intermediate) {
      expect(out.intermediateStates!.shape).toEqual([batch, tokens, H, P, N]);
      expect(relErr(values(out.intermediateStates!), ref.intermediate), at('intermediate')).toBeLessThan(2e-5);
    } else expect(out.intermediateStates).toBeNull();
  }
  it('one token, one group, float32, in place', () => stepCase(1, 1, 'float32', true, false));
  it('one token, two groups, bfloat16, intermediate states', () => stepCase(1, 2, 'bfloat16', true, true));
  it('four tokens (speculative verification), state left unchanged, intermediate states', () =>
    stepCase(4, 2, 'float32', false, true));
  it('three tokens, float16, in place', () => stepCase(3, 4, 'float16', true, false));

  it('steps token by token equal the scan (the scan state layout is the decode layout)', () => {
    const batch = 2,
      T = 6,
      H = 2,
      P = 3,
      G = 1,
      N = 4;
    const c: Case = { batch, T, H, P, G, N, D: 'head', z: true, softplus: true, h0: true };
    const p = problem(c);
    const mk = (v: Float64Array, shape: number[]) => tensor(v, shape);
    const scan = rk.mamba2Scan(
      {
        x: mk(p.x, [batch, T, H, P]),
        dt: mk(p.dt, [batch, T, H]),
        A: mk(p.A, [H]),
        B: mk(p.B, [batch, T, G, N]),
        C: mk(p.C, [batch, T, G, N]),
        D: mk(p.D!, [H]),
        z: mk(p.z!, [batch, T, H, P]),
      },
      { dtSoftplus: true, initialStates: mk(p.h0!, [batch, H, P, N]), returnFinalStates: true },
    );
    const state = mk(p.h0!, [batch, H, P, N]);
    const ys: number[][] = Array.from({ length: batch }, () => []);
    const slice = (v: Float64Array, t: number, inner: number) =>
      Float64Array.from({ length: batch * inner }, (_, i) => v[(Math.floor(i / inner) * T + t) * inner + (i % inner)]);
    for (let t = 0; t < T; t++) {
      const { y } = rk.mamba2StateUpdate(
        {
          state,
          x: mk(slice(p.x, t, H * P), [batch, H, P]),
          dt: mk(slice(p.dt, t, H), [batch, H]),
          A: mk(p.A, [H]),
          B: mk(slice(p.B, t, G * N), [batch, G, N]),
          C: mk(slice(p.C, t, G * N), [batch, G, N]),
          D: mk(p.D!, [H]),
          z: mk(slice(p.z!, t, H * P), [batch, H, P]),
        },
        { dtSoftplus: true },
      );
      const yv = values(y);
      for (let b = 0; b < batch; b++) ys[b].push(...yv.subarray(b * H * P, (b + 1) * H * P));
    }
    expect(relErr(ys.flat(), values(scan.y)), at('y')).toBeLessThan(2e-5);
    expect(relErr(values(state), values(scan.finalStates!)), at('state')).toBeLessThan(2e-5);
  });
});

describe('mamba2Scan errors', () => {
  const batch = 1,
    T = 4,
    H = 2,
    P = 3,
    N = 4;
  const base = () => ({
    x: tensor(new Float64Array(batch * T * H * P), [batch, T, H, P]),
    dt: tensor(new Float64Array(batch * T * H), [batch, T, H]),
    A: tensor([-1, -1], [H]),
    B: tensor(new Float64Array(batch * T * N), [batch, T, 1, N]),
    C: tensor(new Float64Array(batch * T * N), [batch, T, 1, N]),
  });
  it('names the argument and what was expected', () => {
    expectError(
      () => rk.mamba2Scan({ ...base(), x: tensor([1], [1]) }),
      'ERR_SHAPE',
      /x has shape \[1\], expected 4 dimensions/,
    );
    expectError(() => rk.mamba2Scan({ ...base(), dt: tensor([1, 2], [1, 2]) }), 'ERR_SHAPE', /dt/);
    expectError(
      () => rk.mamba2Scan({ ...base(), A: tensor([1, 1], [H], 'float16') }),
      'ERR_DTYPE',
      /A has dtype float16/,
    );
    expectError(
      () =>
        rk.mamba2Scan({
          ...base(),
          B: tensor(new Float64Array(batch * T * 3 * N), [batch, T, 3, N]),
          C: tensor(new Float64Array(batch * T * 3 * N), [batch, T, 3, N]),
        }),
      'ERR_SHAPE',
      /B has 3 groups, expected a divisor of x's 2 heads/,
    );
    expectError(
      () => rk.mamba2Scan({ ...base(), C: tensor(new Float64Array(batch * T * N), [batch, T, 1, N], 'bfloat16') }),
      'ERR_DTYPE',
      /C/,
    );
    expectError(() => rk.mamba2Scan({ ...base(), D: tensor([1, 2, 3], [3]) }), 'ERR_SHAPE', /D/);
    expectError(() => rk.mamba2Scan({ ...base(), z: tensor([1], [1, 1, 1, 1]) }), 'ERR_SHAPE', /z/);
    expectError(() => rk.mamba2Scan(base(), { dtLimit: [1, 0] }), 'ERR_ARGUMENT', /dtLimit/);
    expectError(() => rk.mamba2Scan(base(), { chunkSize: 0 }), 'ERR_ARGUMENT', /chunkSize/);
    expectError(
      () => rk.mamba2Scan(base(), { initialStates: tensor(new Float64Array(H * N * P), [1, H, N, P]) }),
      'ERR_SHAPE',
      /initialStates/,
    );
    expectError(
      () => rk.mamba2Scan(base(), { cuSeqlens: [0, 5] }),
      'ERR_ARGUMENT',
      /cuSeqlens\[1\] = 5 exceeds seqlen 4/,
    );
    expectError(() => rk.mamba2Scan(base(), { dtSoftplus: 1 as never }), 'ERR_ARGUMENT', /dtSoftplus/);
    expectError(() => rk.mamba2Scan({ ...base(), q: null } as never), 'ERR_ARGUMENT', /q/);
  });
  it('the backward checks its gradients', () => {
    const { ctx } = rk.ops.mamba2Scan.forward(base(), { returnFinalStates: true });
    expectError(() => rk.ops.mamba2Scan.backward(ctx, { y: tensor([1], [1]) }), 'ERR_SHAPE', /grad of y/);
    expectError(
      () => rk.ops.mamba2Scan.backward(ctx, { finalStates: tensor(new Float64Array(H * N * P), [1, H, N, P]) }),
      'ERR_SHAPE',
      /grad of finalStates/,
    );
    rk.disposeCtx(ctx);
  });
  it('the decode step checks the state', () => {
    const one = {
      x: tensor(new Float64Array(H * P), [1, H, P]),
      dt: tensor([0.1, 0.1], [1, H]),
      A: tensor([-1, -1], [H]),
      B: tensor(new Float64Array(N), [1, 1, N]),
      C: tensor(new Float64Array(N), [1, 1, N]),
    };
    expectError(
      () => rk.mamba2StateUpdate({ ...one, state: tensor(new Float64Array(H * N * P), [1, H, N, P]) }),
      'ERR_SHAPE',
      /state/,
    );
    expectError(
      () => rk.mamba2StateUpdate({ ...one, x: tensor([1], [1, 1]), state: tensor([1], [1]) }),
      'ERR_ARGUMENT',
      /rank 3/,
    );
  });
});

describe.runIf(hasCuda)('mamba2Scan on cuda vs the float64 oracle', () => {
  const cases = CASES.map((c) => ({ ...c, device: 'cuda' as const }));
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));
});
