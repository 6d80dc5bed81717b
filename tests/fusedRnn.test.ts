// Fused recurrent cells: the native kernels against the float64 oracle, forward and every gradient,
// for every device present and every cell, over head counts and sizes (odd head dims, one head of
// 256), lengths (0 and T included), returnLastOnly, with and without states0, gradients through h
// and/or finalStates, the three dtypes and sizes that take each way of splitting work across
// threads; then the tape, and bad input.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, hasCuda, tensor, tolerance, values } from './helpers';
import {
  FUSED_RNN_GATES,
  FUSED_RNN_STATES,
  fusedRnnRef,
  fusedRnnRefBackward,
  type FusedRnnCell,
  type FusedRnnRefOptions,
} from './reference/fusedRnn';
import { freshSeed, normal, relErr, rng } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const CELLS: FusedRnnCell[] = ['lstm', 'gru', 'slstm', 'elman'];

interface Case {
  cell: FusedRnnCell;
  batch: number;
  T: number;
  H: number;
  D: number;
  states0: boolean;
  lengths: number[] | 'random' | null;
  last: boolean;
  grads: 'both' | 'h' | 'final';
  dtype: rk.DType;
}

const base: Omit<Case, 'cell'> = {
  batch: 3,
  T: 7,
  H: 2,
  D: 16,
  states0: true,
  lengths: [7, 0, 4],
  last: false,
  grads: 'both',
  dtype: 'float32',
};

function name(c: Case): string {
  return (
    `${c.cell} ${c.dtype} b${c.batch} T${c.T} H${c.H} D${c.D}` +
    (c.states0 ? ' states0' : '') +
    (c.lengths ? ` lengths ${Array.isArray(c.lengths) ? `[${c.lengths.join(',')}]` : c.lengths}` : '') +
    (c.last ? ' last' : '') +
    (c.grads !== 'both' ? ` grad ${c.grads}` : '')
  );
}

/** Inputs in the cells' working range: recurrent weights scaled so that h neither saturates nor vanishes. */
function makeInputs(c: Case, device: rk.Device, emptyRow = true) {
  const { batch, T, H, D } = c;
  const G = FUSED_RNN_GATES[c.cell],
    S = FUSED_RNN_STATES[c.cell];
  const s0 = normal(rand, S * batch * H * D, 0.5);
  if (c.cell === 'slstm') {
    // n > 0 (a non-empty state) except for the first row, which starts empty (when emptyRow); m anywhere.
    for (let i = 2 * batch * H * D; i < 3 * batch * H * D; i++) s0[i] = Math.abs(s0[i]) + 0.3;
    if (emptyRow) for (let i = 0; i < H * D; i++) for (let s = 0; s < S; s++) s0[s * batch * H * D + i] = 0;
  }
  const x = (v: ArrayLike<number>, shape: number[]) => tensor(v, shape, c.dtype, device);
  return {
    wx: x(normal(rand, batch * T * G * H * D), [batch, T, G, H, D]),
    R: x(normal(rand, G * H * D * D, 1.2 / Math.sqrt(D)), [G, H, D, D]),
    b: tensor(normal(rand, G * H * D, 0.3), [G, H, D], 'float32', device),
    states0: c.states0 ? tensor(s0, [S, batch, H, D], 'float32', device) : null,
  };
}

function lengthsOf(c: Case): number[] | null {
  if (c.lengths !== 'random') return c.lengths;
  return Array.from({ length: c.batch }, (_, i) => (i === 0 ? c.T : i === 1 ? 0 : Math.floor(rand() * (c.T + 1))));
}

function runCase(c: Case, device: rk.Device) {
  const { cell, batch, T, H, D } = c;
  const S = FUSED_RNN_STATES[cell];
  const inputs = makeInputs(c, device);
  const lengths = lengthsOf(c);
  const options = { cell, lengths, returnLastOnly: c.last };
  const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, options);
  const refInputs = {
    wx: values(inputs.wx),
    R: values(inputs.R),
    b: values(inputs.b),
    states0: inputs.states0 ? values(inputs.states0) : null,
  };
  const refOptions: FusedRnnRefOptions = {
    cell,
    batch,
    seqlen: T,
    heads: H,
    headDim: D,
    lengths,
    returnLastOnly: c.last,
  };
  const ref = fusedRnnRef(refInputs, refOptions);
  const half = c.dtype !== 'float32';
  const nm = name(c);
  const close = (got: rk.Tensor | null, want: Float64Array | null, what: string, tol: number) => {
    expect(got, at(`${nm}: ${what}`)).toBeTruthy();
    const v = values(got!);
    expect(v.every(Number.isFinite), at(`${nm}: ${what} finite`)).toBe(true);
    expect(relErr(v, want!), at(`${nm}: ${what}`)).toBeLessThan(tol);
  };
  close(outputs.h, ref.h, 'h', half ? tolerance[c.dtype] : 1e-5);
  close(outputs.finalStates, ref.finalStates, 'finalStates', half ? 2e-3 : 1e-5);
  expect(outputs.h.shape).toEqual(c.last ? [batch, H, D] : [batch, T, H, D]);
  expect(outputs.finalStates.shape).toEqual([S, batch, H, D]);

  const hShape = c.last ? [batch, H, D] : [batch, T, H, D];
  const dh =
    c.grads !== 'final'
      ? tensor(
          normal(
            rand,
            hShape.reduce((p, q) => p * q, 1),
          ),
          hShape,
          c.dtype,
          device,
        )
      : null;
  const dF = c.grads !== 'h' ? tensor(normal(rand, S * batch * H * D), [S, batch, H, D], 'float32', device) : null;
  const g = rk.ops.fusedRnn.backward(ctx, { h: dh, finalStates: dF });
  const gr = fusedRnnRefBackward(refInputs, refOptions, {
    dh: dh ? values(dh) : null,
    dFinalStates: dF ? values(dF) : null,
  });
  const tol = half ? tolerance[c.dtype] : 1e-4;
  close(g.wx, gr.dwx, 'dwx', tol);
  close(g.R, gr.dR, 'dR', tol);
  close(g.b, gr.db, 'db', half ? 2e-3 : 1e-4);
  if (c.states0) close(g.states0, gr.dStates0, 'dStates0', half ? 2e-3 : 1e-4);
  else expect(g.states0).toBeNull();
  expect(g.wx.dtype).toBe(c.dtype);
  expect(g.R.dtype).toBe(c.dtype);
}

const shapes: Omit<Case, 'cell'>[] = [
  { ...base },
  { ...base, states0: false, lengths: null },
  { ...base, batch: 1, T: 1, H: 1, D: 16, lengths: null }, // the smallest
  { ...base, batch: 1, T: 1, H: 1, D: 5, lengths: [0], last: true }, // length 0 only
  { ...base, batch: 5, T: 12, H: 3, D: 48, lengths: 'random', last: true },
  { ...base, batch: 2, T: 9, H: 1, D: 64, lengths: [9, 3], grads: 'h' },
  { ...base, batch: 3, T: 6, H: 2, D: 20, grads: 'final', states0: false, lengths: null }, // D not a multiple of 16
  { ...base, batch: 4, T: 5, H: 5, D: 33, lengths: 'random' },
  { ...base, batch: 2, T: 3, H: 1, D: 256, lengths: null }, // one head of 256
  { ...base, batch: 11, T: 4, H: 1, D: 130, lengths: 'random' }, // panel chunks of 64 rows + 2, many row blocks
  // Large enough to run on several threads: split by batch rows, by heads, by parts of a head.
  { ...base, batch: 9, T: 31, H: 1, D: 64, lengths: null }, // 279 (step, row) pairs
  { ...base, batch: 3, T: 26, H: 4, D: 48, lengths: 'random', last: true },
  { ...base, batch: 1, T: 70, H: 3, D: 64, lengths: null },
];

describe.each(devices)('fusedRnn on %s vs the float64 oracle', (device) => {
  for (const cell of CELLS) {
    it.each(shapes.map((s) => [name({ ...s, cell }), { ...s, cell }] as const))('%s', (_n, c) => runCase(c, device));
  }
  it.each(['float16', 'bfloat16'] as const)('%s inputs', (dtype) => {
    for (const cell of CELLS)
      runCase({ ...base, cell, dtype, batch: 3, T: 9, H: 2, D: 24, lengths: [9, 2, 0] }, device);
  });
  it('the plain call equals the hooks, with nothing kept for backward outside a tape', () => {
    const c: Case = { ...base, cell: 'lstm', batch: 2, T: 5, H: 2, D: 16, lengths: [5, 3] };
    const inputs = makeInputs(c, device);
    const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, { cell: 'lstm', lengths: [5, 3] });
    const plain = rk.fusedRnn(inputs, { cell: 'lstm', lengths: new Int32Array([5, 3]) });
    expect(Array.from(values(plain.h))).toEqual(Array.from(values(outputs.h)));
    expect(Array.from(values(plain.finalStates))).toEqual(Array.from(values(outputs.finalStates)));
    expect(ctx.savedStates.shape).toEqual([5, 2, 2, 2, 16]);
    expect(ctx.savedPre.shape).toEqual([5, 2, 4, 2, 16]);
  });
});

describe('fusedRnn through the tape', () => {
  for (const cell of CELLS) {
    it(`${cell}: grads of a loss of h and finalStates match finite differences (gradcheck)`, () => {
      const c: Case = { ...base, cell, batch: 2, T: 4, H: 2, D: 3, lengths: [4, 2] };
      // No empty sLSTM state here: n == 0 exactly is where its stabiliser switches branch.
      const { wx, R, b, states0 } = makeInputs(c, 'cpu', false);
      const S = FUSED_RNN_STATES[cell];
      const wh = tensor(normal(rand, 2 * 4 * 2 * 3), [2, 4, 2, 3]);
      // sLSTM's final c, n, m carry the stabiliser, which has kinks (m = max(...)) that finite
      // differences may straddle; its h is smooth, so only the final h enters the loss there.
      const wf = tensor(
        normal(rand, S * 2 * 2 * 3).map((v, i) => (cell === 'slstm' && i >= 12 ? 0 : v)),
        [S, 2, 2, 3],
      );
      const f = (wx_: rk.Tensor, R_: rk.Tensor, b_: rk.Tensor, s0_: rk.Tensor) => {
        const { h, finalStates } = rk.fusedRnn({ wx: wx_, R: R_, b: b_, states0: s0_ }, { cell, lengths: [4, 2] });
        return rk.add(rk.sum(rk.mul(h, wh)), rk.sum(rk.mul(finalStates, wf)));
      };
      // A small step: with recurrent weights near 2 the loss can have third derivatives in the hundreds,
      // and a central difference's error (f''' eps^2 / 6) must stay well inside atol; float32 rounding
      // of the loss over 2 * eps stays near 1e-4.
      const res = rk.gradcheck(f, [wx, R, b, states0!], { eps: 2e-3, rtol: 3e-2, atol: 3e-3 });
      expect(res.ok, at(JSON.stringify(res.worst))).toBe(true);
    });
  }
  it('returnLastOnly: the gradient of the last h reaches every input', () => {
    const c: Case = { ...base, cell: 'gru', batch: 2, T: 5, H: 1, D: 4, lengths: [5, 3], last: true };
    const { wx, R, b, states0 } = makeInputs(c, 'cpu');
    const f = (wx_: rk.Tensor, R_: rk.Tensor, b_: rk.Tensor, s0_: rk.Tensor) =>
      rk.sum(
        rk.square(
          rk.fusedRnn({ wx: wx_, R: R_, b: b_, states0: s0_ }, { cell: 'gru', lengths: [5, 3], returnLastOnly: true })
            .h,
        ),
      );
    const res = rk.gradcheck(f, [wx, R, b, states0!], { eps: 2e-3, rtol: 3e-2, atol: 3e-3 });
    expect(res.ok, at(JSON.stringify(res.worst))).toBe(true);
  });
});

describe('fusedRnn bad input', () => {
  const mk = (shape: number[], dtype: rk.DType = 'float32') =>
    tensor(new Float32Array(shape.reduce((p, q) => p * q, 1)).fill(0.1), shape, dtype);
  const good = () => ({ wx: mk([2, 5, 4, 3, 8]), R: mk([4, 3, 8, 8]), b: mk([4, 3, 8]) });
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
    const r = rk.fusedRnn(good(), { cell: 'lstm' });
    expect(r.h.shape).toEqual([2, 5, 3, 8]);
    expect(r.finalStates.shape).toEqual([2, 2, 3, 8]);
  });
  it('shapes', () => {
    fails(
      () => rk.fusedRnn({ ...good(), wx: mk([2, 5, 4, 24]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /wx has shape \[2,5,4,24\], expected 5 dimensions/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'gru' }),
      'ERR_SHAPE',
      /wx has shape \[2,5,4,3,8\] with 4 gates, expected 3 for cell 'gru'/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), R: mk([4, 3, 8, 7]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /R has shape \[4,3,8,7\], expected \[4,3,8,8\]/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), b: mk([4, 8]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /b has shape \[4,8\], expected \[4,3,8\]/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), states0: mk([4, 2, 3, 8]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /states0 has shape \[4,2,3,8\], expected \[2,2,3,8\]/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), states0: mk([2, 2, 3, 8]) }, { cell: 'slstm' }),
      'ERR_SHAPE',
      /expected \[4,2,3,8\]/,
    );
  });
  it('empty tensors', () => {
    fails(
      () => rk.fusedRnn({ wx: mk([2, 0, 4, 3, 8]), R: mk([4, 3, 8, 8]), b: mk([4, 3, 8]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /wx has shape \[2,0,4,3,8\]; every dimension must be at least 1/,
    );
    fails(
      () => rk.fusedRnn({ wx: mk([2, 5, 4, 3, 0]), R: mk([4, 3, 0, 0]), b: mk([4, 3, 0]) }, { cell: 'lstm' }),
      'ERR_SHAPE',
      /at least 1/,
    );
  });
  it('dtypes', () => {
    fails(
      () => rk.fusedRnn({ ...good(), R: mk([4, 3, 8, 8], 'bfloat16') }, { cell: 'lstm' }),
      'ERR_DTYPE',
      /R has dtype bfloat16, expected float32 to match wx/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), b: mk([4, 3, 8], 'float16') }, { cell: 'lstm' }),
      'ERR_DTYPE',
      /b has dtype float16, expected float32/,
    );
    fails(
      () => rk.fusedRnn({ ...good(), states0: mk([2, 2, 3, 8], 'bfloat16') }, { cell: 'lstm' }),
      'ERR_DTYPE',
      /states0 has dtype bfloat16/,
    );
  });
  it('devices', () => {
    if (hasCuda) {
      fails(
        () => rk.fusedRnn({ ...good(), R: good().R.to('cuda') }, { cell: 'lstm' }),
        'ERR_DEVICE',
        /R is on cuda, expected cpu/,
      );
      fails(
        () => rk.fusedRnn({ ...good(), b: good().b.to('cuda') }, { cell: 'lstm' }),
        'ERR_DEVICE',
        /b is on cuda, expected cpu/,
      );
    } else {
      fails(() => good().R.to('cuda'), 'ERR_DEVICE', /CUDA is not available/);
      const n = rk.internals.native;
      const t = { wx: new Float32Array(960), R: new Float32Array(768), b: new Float32Array(96), states0: null };
      const cfg = { cell: 1, batch: 2, T: 5, heads: 3, headDim: 8, returnLastOnly: false };
      fails(
        () =>
          n().fusedRnnForward({
            device: 'cuda',
            dtype: 'float32',
            tensors: t,
            config: { ...cfg, lengths: null, training: false },
          }),
        'ERR_DEVICE',
        /CUDA/,
      );
    }
  });
  it('lengths', () => {
    fails(() => rk.fusedRnn(good(), { cell: 'lstm', lengths: [5] }), 'ERR_SHAPE', /lengths has 1 entries, expected 2/);
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', lengths: [5, 6] }),
      'ERR_ARGUMENT',
      /lengths\[1\] = 6 is outside \[0, 5\]/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', lengths: [-1, 2] }),
      'ERR_ARGUMENT',
      /lengths\[0\] = -1 is outside/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', lengths: [2.5, 2] }),
      'ERR_ARGUMENT',
      /lengths\[0\] must be an integer, got 2.5/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', lengths: [NaN, 2] }),
      'ERR_ARGUMENT',
      /lengths\[0\] must be an integer/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', lengths: 'all' as never }),
      'ERR_ARGUMENT',
      /lengths must be an Int32Array or an array/,
    );
  });
  it('cell and options', () => {
    fails(
      () => rk.fusedRnn(good(), { cell: 'rnn' as never }),
      'ERR_ARGUMENT',
      /cell must be one of 'elman', 'lstm', 'gru', 'slstm', got 'rnn'/,
    );
    fails(() => rk.fusedRnn(good(), {} as never), 'ERR_ARGUMENT', /cell must be one of .*got undefined/);
    fails(() => rk.fusedRnn(good(), undefined as never), 'ERR_ARGUMENT', /options must be an object/);
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', returnLast: true } as never),
      'ERR_ARGUMENT',
      /unknown option 'returnLast'/,
    );
    fails(
      () => rk.fusedRnn(good(), { cell: 'lstm', returnLastOnly: 1 } as never),
      'ERR_ARGUMENT',
      /returnLastOnly must be a boolean/,
    );
    fails(() => rk.fusedRnn({ ...good(), x: mk([1]) } as never, { cell: 'lstm' }), 'ERR_ARGUMENT', /unknown input 'x'/);
    fails(() => rk.fusedRnn({ ...good(), R: [1, 2] } as never, { cell: 'lstm' }), 'ERR_ARGUMENT', /R must be a Tensor/);
  });
  it('disposed tensors, before and after the forward', () => {
    const g = good();
    g.b.dispose();
    fails(() => rk.fusedRnn(g, { cell: 'lstm' }), 'ERR_DISPOSED', /b was disposed/);
    const g2 = good();
    const { ctx } = rk.ops.fusedRnn.forward(g2, { cell: 'lstm' });
    ctx.savedPre.dispose();
    fails(
      () => rk.ops.fusedRnn.backward(ctx, { h: mk([2, 5, 3, 8]) }),
      'ERR_DISPOSED',
      /savedPre \(saved for backward\) was disposed/,
    );
    const g3 = good();
    const r3 = rk.ops.fusedRnn.forward(g3, { cell: 'lstm' });
    g3.R.dispose();
    fails(
      () => rk.ops.fusedRnn.backward(r3.ctx, { h: mk([2, 5, 3, 8]) }),
      'ERR_DISPOSED',
      /R \(saved for backward\) was disposed/,
    );
  });
  it('gradients of the wrong shape or dtype', () => {
    const { ctx } = rk.ops.fusedRnn.forward(good(), { cell: 'lstm' });
    fails(
      () => rk.ops.fusedRnn.backward(ctx, { h: mk([2, 5, 3, 7]) }),
      'ERR_SHAPE',
      /grad of h has shape \[2,5,3,7\], expected \[2,5,3,8\]/,
    );
    fails(
      () => rk.ops.fusedRnn.backward(ctx, { h: mk([2, 5, 3, 8], 'float16') }),
      'ERR_DTYPE',
      /grad of h has dtype float16/,
    );
    fails(
      () => rk.ops.fusedRnn.backward(ctx, { finalStates: mk([1, 2, 3, 8]) }),
      'ERR_SHAPE',
      /grad of finalStates has shape/,
    );
    const last = rk.ops.fusedRnn.forward(good(), { cell: 'lstm', returnLastOnly: true });
    fails(() => rk.ops.fusedRnn.backward(last.ctx, { h: mk([2, 5, 3, 8]) }), 'ERR_SHAPE', /expected \[2,3,8\]/);
  });
  it('the cell table comes from the addon (its one definition) and names every FusedRnnCell', () => {
    const names: rk.FusedRnnCell[] = ['elman', 'lstm', 'gru', 'slstm'];
    expect(rk.internals.native().fusedRnnCells()).toEqual(
      names.map((name, code) => ({
        name,
        code,
        gates: FUSED_RNN_GATES[name],
        states: FUSED_RNN_STATES[name],
      })),
    );
  });
  it('the addon re-checks what it is given directly', () => {
    const n = rk.internals.native;
    const s = (k: number) => new Float32Array(k);
    const t = { wx: s(960), R: s(768), b: s(96), states0: null };
    const cfg = { cell: 1, batch: 2, T: 5, heads: 3, headDim: 8, returnLastOnly: false };
    expect(() =>
      n().fusedRnnForward({
        device: 'cpu',
        dtype: 'float32',
        tensors: t,
        config: { ...cfg, lengths: null, training: false },
      }),
    ).not.toThrow();
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, wx: s(959) },
          config: { ...cfg, lengths: null, training: false },
        }),
      'ERR_SHAPE',
      /wx has 959/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, R: s(767) },
          config: { ...cfg, lengths: null, training: false },
        }),
      'ERR_SHAPE',
      /R has 767/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: { ...t, states0: s(95) },
          config: { ...cfg, lengths: null, training: false },
        }),
      'ERR_SHAPE',
      /states0 has 95/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, cell: 4 }, lengths: null, training: false },
        }),
      'ERR_ARGUMENT',
      /unknown cell 4/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...{ ...cfg, cell: 2 }, lengths: null, training: false },
        }),
      'ERR_SHAPE',
      /wx has 960/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, lengths: new Int32Array([5]), training: false },
        }),
      'ERR_SHAPE',
      /lengths has 1 entries/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, lengths: new Int32Array([5, 6]), training: false },
        }),
      'ERR_ARGUMENT',
      /lengths\[1\] = 6/,
    );
    fails(
      () =>
        n().fusedRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, lengths: [5, 5] as never, training: false },
        }),
      'ERR_ARGUMENT',
      /lengths must be an Int32Array/,
    );
    const f = n().fusedRnnForward({
      device: 'cpu',
      dtype: 'float32',
      tensors: t,
      config: { ...cfg, lengths: null, training: true },
    });
    const saved = { savedStates: f.savedStates!, savedPre: f.savedPre!, dh: null, dFinal: null };
    expect(() =>
      n().fusedRnnBackward({
        device: 'cpu',
        dtype: 'float32',
        tensors: t,
        config: { ...cfg, lengths: null, needDStates0: false },
        grads: saved,
      }),
    ).not.toThrow();
    fails(
      () =>
        n().fusedRnnBackward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, lengths: null, needDStates0: false },
          grads: { ...saved, savedPre: s(10) },
        }),
      'ERR_SHAPE',
      /savedPre/,
    );
    fails(
      () =>
        n().fusedRnnBackward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, lengths: null, needDStates0: false },
          grads: { ...saved, dh: s(10) },
        }),
      'ERR_SHAPE',
      /grad of h/,
    );
  });
});

describe.runIf(hasCuda)('fusedRnn on CUDA against the CPU kernels at a large size', () => {
  it.each(CELLS)('%s', (cell) => {
    const c: Case = { ...base, cell, batch: 16, T: 256, H: 4, D: 64, lengths: 'random' };
    const cpu = makeInputs(c, 'cpu');
    const lengths = lengthsOf(c);
    const gpu = { wx: cpu.wx.to('cuda'), R: cpu.R.to('cuda'), b: cpu.b.to('cuda'), states0: cpu.states0!.to('cuda') };
    const a = rk.ops.fusedRnn.forward(cpu, { cell, lengths });
    const g = rk.ops.fusedRnn.forward(gpu, { cell, lengths });
    expect(relErr(values(g.outputs.h), values(a.outputs.h)), at('h')).toBeLessThan(1e-4);
    expect(relErr(values(g.outputs.finalStates), values(a.outputs.finalStates)), at('finalStates')).toBeLessThan(1e-4);
    const S = FUSED_RNN_STATES[cell];
    const dh = tensor(normal(rand, 16 * 256 * 4 * 64), [16, 256, 4, 64]);
    const dF = tensor(normal(rand, S * 16 * 4 * 64), [S, 16, 4, 64]);
    const ga = rk.ops.fusedRnn.backward(a.ctx, { h: dh, finalStates: dF });
    const gg = rk.ops.fusedRnn.backward(g.ctx, { h: dh.to('cuda'), finalStates: dF.to('cuda') });
    for (const k of ['wx', 'R', 'b', 'states0'] as const)
      expect(relErr(values(gg[k]!), values(ga[k]!)), at(`d${k}`)).toBeLessThan(1e-3);
    // Each device's backward accepts the other's saved tensors (one contract for both).
    const mixed = rk.ops.fusedRnn.backward(
      {
        ...a.ctx,
        inputs: { ...gpu },
        savedStates: a.ctx.savedStates.to('cuda'),
        savedPre: a.ctx.savedPre.to('cuda'),
        device: 'cuda',
      },
      { h: dh.to('cuda'), finalStates: dF.to('cuda') },
    );
    expect(relErr(values(mixed.R), values(ga.R)), at('dR from CPU-saved tensors')).toBeLessThan(1e-3);
  });
});
