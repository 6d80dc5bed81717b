// causalConv1d against the float64 oracle (tests/reference/causalConv1d.ts), forward and backward: the
// oracle's gradients by finite differences; both layouts, widths 2-4, dilation, SiLU, bias or none,
// initial states, packed sequences with empty and length-1 members and sequences shorter than the
// state, half precision; the state window (rolling back equals the shorter sequence); ONNX Runtime's
// com.microsoft.CausalConvWithState as an independent cross-check; errors.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { expectError, hasCuda, tensor, tolerance, values } from './helpers';
import { causalConv1dRef, causalConv1dRefBackward, type ConvRefOptions } from './reference/causalConv1d';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng } from './reference/util';
// @ts-expect-error: a JavaScript module without type declarations
import { ortCausalConv, ortStatus } from '../bench/peers/ort.mjs';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const f32 = (x: ArrayLike<number>) => Float64Array.from(Float32Array.from(x));

/** (batch, C, T) <-> (batch, T, C), and (N, C, L) <-> (N, L, C). */
function swapLast(x: ArrayLike<number>, n: number, a: number, b: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let m = 0; m < n; m++)
    for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) out[(m * b + j) * a + i] = x[(m * a + i) * b + j];
  return out;
}

describe('causal conv oracle: backward vs finite differences', () => {
  it.each([
    ['silu, dilation 2, states', true, 2, true],
    ['identity, packed', false, 1, false],
  ] as const)('%s', (_n, silu, dilation, h0) => {
    const o: ConvRefOptions = {
      batch: h0 ? 2 : 1,
      C: 3,
      T: 7,
      W: 3,
      dilation,
      silu,
      cuSeqlens: h0 ? null : [0, 2, 2, 7],
    };
    const nseq = h0 ? 2 : 3,
      L = 2 * dilation;
    const x = normal(rand, o.batch * 3 * 7),
      w = normal(rand, 9),
      b = normal(rand, 3),
      s0 = normal(rand, nseq * 3 * L);
    const wy = normal(rand, x.length),
      wf = normal(rand, nseq * 3 * L);
    const loss = ([x_, w_, b_, s_]: Float64Array[]) => {
      const r = causalConv1dRef(x_, w_, b_, { ...o, initialState: h0 ? s_ : null });
      return dot(r.y, wy) + dot(r.finalState, wf);
    };
    const fd = finiteDifferences(loss, [x, w, b, s0]);
    const an = causalConv1dRefBackward(x, w, b, { ...o, initialState: h0 ? s0 : null }, wy, wf);
    expect(relErr(an.x, fd[0]), at('x')).toBeLessThan(1e-7);
    expect(relErr(an.weight, fd[1]), at('weight')).toBeLessThan(1e-7);
    expect(relErr(an.bias, fd[2]), at('bias')).toBeLessThan(1e-7);
    if (h0) expect(relErr(an.initialState, fd[3]), at('initialState')).toBeLessThan(1e-7);
  });
});

interface Case {
  batch: number;
  C: number;
  T: number;
  W: number;
  dilation?: number;
  silu?: boolean;
  bias?: boolean;
  h0?: boolean;
  last?: boolean;
  cuSeqlens?: number[];
  dtype?: rk.DType;
  weight3d?: boolean;
  device?: rk.Device;
}

function runCase(c: Case) {
  const { batch, C, T, W } = c;
  const dtype = c.dtype ?? 'float32';
  const device = c.device ?? 'cpu';
  const d = c.dilation ?? 1,
    L = (W - 1) * d;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const seen = (x: Float64Array) => values(tensor(x, [x.length], dtype));
  const x = seen(normal(rand, batch * C * T)),
    w = seen(normal(rand, C * W, 0.6)),
    b = seen(normal(rand, C)),
    s0 = seen(normal(rand, nseq * C * L));
  const o: ConvRefOptions = {
    batch,
    C,
    T,
    W,
    dilation: d,
    silu: !!c.silu,
    initialState: c.h0 ? s0 : null,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  const ref = causalConv1dRef(x, w, c.bias ? b : null, o);
  const xs = c.last ? swapLast(x, batch, C, T) : x;
  const ss = c.last ? swapLast(s0, nseq, C, L) : s0;
  const inputs = {
    x: tensor(xs, c.last ? [batch, T, C] : [batch, C, T], dtype, device),
    weight: tensor(w, c.weight3d ? [C, 1, W] : [C, W], dtype, device),
    bias: c.bias ? tensor(b, [C], dtype, device) : null,
  };
  const options: rk.CausalConv1dOptions = {
    activation: c.silu ? 'silu' : 'none',
    dilation: d,
    channelsLast: !!c.last,
    initialState: c.h0 ? tensor(ss, c.last ? [nseq, L, C] : [nseq, C, L], dtype, device) : null,
    returnFinalState: true,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  const tol = dtype === 'float32' ? 1e-5 : tolerance[dtype] * 2;
  const { outputs, ctx } = rk.ops.causalConv1d.forward(inputs, options);
  const y = c.last ? swapLast(values(outputs.y), batch, T, C) : values(outputs.y);
  const fin = c.last ? swapLast(values(outputs.finalState!), nseq, L, C) : values(outputs.finalState!);
  expect(relErr(y, ref.y), at('y')).toBeLessThan(tol);
  expect(relErr(fin, ref.finalState), at('finalState')).toBeLessThan(tol);
  const wy = seen(normal(rand, x.length)),
    wf = seen(normal(rand, nseq * C * L));
  const grads = rk.ops.causalConv1d.backward(ctx, {
    y: tensor(c.last ? swapLast(wy, batch, C, T) : wy, inputs.x.shape as number[], dtype, device),
    finalState: tensor(c.last ? swapLast(wf, nseq, C, L) : wf, c.last ? [nseq, L, C] : [nseq, C, L], dtype, device),
  });
  const rg = causalConv1dRefBackward(x, w, c.bias ? b : null, o, wy, wf);
  const gtol = dtype === 'float32' ? 1e-5 : tolerance[dtype] * 3;
  const dx = c.last ? swapLast(values(grads.x), batch, T, C) : values(grads.x);
  expect(relErr(dx, rg.x), at('dx')).toBeLessThan(gtol);
  expect(grads.weight.shape).toEqual(inputs.weight.shape);
  expect(relErr(values(grads.weight), rg.weight), at('dweight')).toBeLessThan(gtol);
  if (c.bias) expect(relErr(values(grads.bias!), rg.bias), at('dbias')).toBeLessThan(gtol);
  else expect(grads.bias).toBeNull();
  if (c.h0) {
    const dh = c.last ? swapLast(values(grads.initialState!), nseq, L, C) : values(grads.initialState!);
    expect(relErr(dh, rg.initialState), at('dinitialState')).toBeLessThan(gtol);
  }
}

const name = (c: Case) =>
  `${c.batch}x${c.C}x${c.T} W ${c.W}${c.dilation ? ` dilation ${c.dilation}` : ''}${c.silu ? ' silu' : ''}` +
  `${c.bias ? ' bias' : ''}${c.h0 ? ' states' : ''}${c.last ? ' channels-last' : ''}` +
  `${c.cuSeqlens ? ` packed [${c.cuSeqlens}]` : ''}${c.dtype ? ` ${c.dtype}` : ''}${c.weight3d ? ' weight (C,1,W)' : ''}`;

describe('causalConv1d vs the float64 oracle, forward and backward', () => {
  const cases: Case[] = [
    { batch: 2, C: 17, T: 37, W: 4, silu: true, bias: true, h0: true },
    { batch: 2, C: 17, T: 37, W: 4, silu: true, bias: true, h0: true, last: true },
    { batch: 1, C: 40, T: 130, W: 3, dilation: 3, bias: true, h0: true, weight3d: true },
    { batch: 3, C: 5, T: 1, W: 2, silu: true, h0: true },
    { batch: 2, C: 33, T: 2, W: 4, dilation: 2, silu: true, bias: true, h0: true, last: true },
    { batch: 1, C: 16, T: 40, W: 4, silu: true, bias: true, h0: true, cuSeqlens: [0, 0, 1, 3, 33, 33, 38] },
    { batch: 1, C: 19, T: 30, W: 3, bias: false, last: true, cuSeqlens: [0, 17, 29] },
    { batch: 2, C: 24, T: 50, W: 4, silu: true, bias: true, h0: true, dtype: 'bfloat16' },
    { batch: 2, C: 24, T: 50, W: 4, silu: true, h0: true, dtype: 'float16', last: true },
  ];
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));
});

describe.runIf(hasCuda)('causalConv1d on cuda vs the float64 oracle', () => {
  const cases: Case[] = [
    { batch: 2, C: 17, T: 37, W: 4, silu: true, bias: true, h0: true, device: 'cuda' },
    { batch: 2, C: 33, T: 2, W: 4, dilation: 2, silu: true, bias: true, h0: true, last: true, device: 'cuda' },
    {
      batch: 1,
      C: 16,
      T: 40,
      W: 4,
      silu: true,
      bias: true,
      h0: true,
      cuSeqlens: [0, 0, 1, 3, 33, 33, 38],
      device: 'cuda',
    },
    { batch: 2, C: 24, T: 50, W: 4, silu: true, bias: true, h0: true, dtype: 'bfloat16', device: 'cuda' },
  ];
  it.each(cases.map((c) => [name(c), c] as const))('%s', (_n, c) => runCase(c));
});

describe('causalConv1d stateWindow', () => {
  it('rolling back to slot j and continuing equals running the shorter sequence', () => {
    const batch = 2,
      C = 5,
      T = 9,
      W = 4,
      Wn = 4,
      L = 3;
    const x = f32(normal(rand, batch * C * T)),
      w = f32(normal(rand, C * W)),
      s0 = f32(normal(rand, batch * C * L));
    const cut = (len: number) => {
      const out = new Float64Array(batch * C * len);
      for (let m = 0; m < batch * C; m++) out.set(x.subarray(m * T, m * T + len), m * len);
      return tensor(out, [batch, C, len]);
    };
    const weight = tensor(w, [C, W]),
      initialState = tensor(s0, [batch, C, L]);
    const full = rk.causalConv1d({ x: cut(T), weight }, { initialState, returnFinalState: true, stateWindow: Wn });
    const win = values(full.windowStates!),
      slot = batch * C * L;
    expect(full.windowStates!.shape).toEqual([Wn, batch, C, L]);
    for (let j = 0; j < Wn; j++) {
      const shorter = rk.causalConv1d({ x: cut(T - Wn + j + 1), weight }, { initialState, returnFinalState: true });
      expect(Array.from(win.subarray(j * slot, (j + 1) * slot)), at(`slot ${j}`)).toEqual(
        Array.from(values(shorter.finalState!)),
      );
    }
    const short = rk.causalConv1d({ x: cut(2), weight }, { initialState, stateWindow: 4 });
    expect(Array.from(values(short.windowStates!).subarray(0, 2 * slot)).every((v) => v === 0)).toBe(true);
  });
});

const ortOk = ortStatus().ok;
describe('causalConv1d vs ONNX Runtime com.microsoft.CausalConvWithState', () => {
  it.each([
    ['silu, dilation 1, bias, past state', { silu: true, dilation: 1, bias: true, h0: true, last: false }],
    ['silu, dilation 3, no bias', { silu: true, dilation: 3, bias: false, h0: true, last: false }],
    ['identity, channels-last, past state', { silu: false, dilation: 2, bias: true, h0: true, last: true }],
    ['silu, no past state', { silu: true, dilation: 1, bias: true, h0: false, last: false }],
  ])('%s', async (_n, c) => {
    expect(ortOk, 'onnxruntime-node is a dev dependency and must load').toBe(true);
    const batch = 2,
      C = 7,
      T = 11,
      K = 4,
      L = (K - 1) * c.dilation;
    const x = f32(normal(rand, batch * C * T)),
      w = f32(normal(rand, C * K)),
      b = f32(normal(rand, C)),
      s0 = f32(normal(rand, batch * C * L));
    const session = await ortCausalConv({
      batch,
      C,
      T,
      K,
      dilation: c.dilation,
      activation: c.silu ? 'silu' : 'none',
      channelsLast: c.last,
      bias: c.bias,
      initialState: c.h0,
      threads: 1,
    });
    const xs = c.last ? swapLast(x, batch, C, T) : x,
      ss = c.last ? swapLast(s0, batch, C, L) : s0;
    const out = await session.run({
      input: Float32Array.from(xs),
      weight: Float32Array.from(w),
      ...(c.bias ? { bias: Float32Array.from(b) } : {}),
      ...(c.h0 ? { past_state: Float32Array.from(ss) } : {}),
    });
    await session.close();
    const ours = rk.causalConv1d(
      {
        x: tensor(xs, c.last ? [batch, T, C] : [batch, C, T]),
        weight: tensor(w, [C, 1, K]),
        bias: c.bias ? tensor(b, [C]) : null,
      },
      {
        activation: c.silu ? 'silu' : 'none',
        dilation: c.dilation,
        channelsLast: c.last,
        initialState: c.h0 ? tensor(ss, c.last ? [batch, L, C] : [batch, C, L]) : null,
        returnFinalState: true,
      },
    );
    const ref = causalConv1dRef(x, w, c.bias ? b : null, {
      batch,
      C,
      T,
      W: K,
      dilation: c.dilation,
      silu: c.silu,
      initialState: c.h0 ? s0 : null,
    });
    const refY = c.last ? swapLast(ref.y, batch, C, T) : ref.y;
    const refF = c.last ? swapLast(ref.finalState, batch, C, L) : ref.finalState;
    const e = relErr(values(ours.y), out.output);
    expect(
      e,
      at(`y: ours vs ORT ${e}; vs oracle ours ${relErr(values(ours.y), refY)}, ORT ${relErr(out.output, refY)}`),
    ).toBeLessThan(1e-5);
    expect(relErr(values(ours.finalState!), out.present_state), at('final state vs ORT')).toBeLessThan(1e-6);
    expect(relErr(out.present_state, refF), at('ORT final state vs oracle')).toBeLessThan(1e-6);
  });
});

describe('causalConv1d errors', () => {
  const x = tensor(normal(rand, 2 * 3 * 5), [2, 3, 5]);
  it('names the argument and what was expected', () => {
    expectError(
      () => rk.causalConv1d({ x, weight: tensor(normal(rand, 8), [4, 2]) }),
      'ERR_SHAPE',
      /weight has shape \[4,2\], expected \[3,2\]/,
    );
    expectError(
      () => rk.causalConv1d({ x, weight: tensor(normal(rand, 3), [3, 1]) }),
      'ERR_SHAPE',
      /width 1, expected 2 to 64/,
    );
    expectError(
      () =>
        rk.causalConv1d(
          { x, weight: tensor(normal(rand, 12), [3, 4]) },
          { initialState: tensor(normal(rand, 12), [2, 3, 2]) },
        ),
      'ERR_SHAPE',
      /initialState has shape \[2,3,2\], expected \[2,3,3\]/,
    );
    expectError(
      () => rk.causalConv1d({ x, weight: tensor(normal(rand, 12), [3, 4]) }, { activation: 'relu' as 'silu' }),
      'ERR_ARGUMENT',
      /activation/,
    );
    expectError(
      () => rk.causalConv1d({ x, weight: tensor(normal(rand, 12), [3, 4]) }, { dilation: 0 }),
      'ERR_ARGUMENT',
      /dilation/,
    );
    expectError(
      () => rk.causalConv1d({ x, weight: tensor(normal(rand, 12), [3, 4], 'bfloat16') }),
      'ERR_DTYPE',
      /weight has dtype bfloat16, expected float32 to match x/,
    );
  });
});
