// Newton-iteration parallel RNN: the native kernels against the float64 oracle for every cell, both
// Jacobians, the modes, guesses and dtypes, on every device present; gradients against BPTT; the
// statistics against the oracle's own Newton iteration; non-convergence (fallback and error),
// damping on a stiff case; then bad input.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, hasCuda, tensor, values } from './helpers';
import {
  NEWTON_GATES,
  NEWTON_STATES,
  isDiagonalCell,
  newtonRnnIterate,
  newtonRnnRef,
  newtonRnnRefBackward,
  type NewtonCell,
  type NewtonRefDims,
  type NewtonRefInputs,
} from './reference/newtonRnn';
import { freshSeed, normal, relErr, rng } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const CELLS: NewtonCell[] = ['gru-diag', 'lstm-cifg-diag', 'gru', 'lstm', 'elman'];

interface Problem {
  ref: NewtonRefInputs;
  dims: NewtonRefDims;
  inputs: { wx: rk.Tensor; R: rk.Tensor; b: rk.Tensor; h0?: rk.Tensor | null };
}

function problem(
  cell: NewtonCell,
  batch: number,
  T: number,
  heads: number,
  headDim: number,
  opts: {
    h0?: boolean;
    rScale?: number;
    dtype?: rk.DType;
    device?: rk.Device;
    fiveD?: boolean;
    wxScale?: number;
  } = {},
): Problem {
  const { h0 = true, rScale = 0.5, dtype = 'float32', device = 'cpu', fiveD = false, wxScale = 1 } = opts;
  const G = NEWTON_GATES[cell],
    S = NEWTON_STATES[cell],
    N = heads * headDim;
  const hidden = fiveD ? [heads, headDim] : [N];
  const diag = isDiagonalCell(cell);
  // Dense weights scaled by 1/sqrt(headDim) keep the recurrence in its ordinary (contracting) regime.
  const R = normal(rand, diag ? G * N : G * N * headDim, diag ? rScale : rScale / Math.sqrt(headDim));
  const wxT = tensor(normal(rand, batch * T * G * N, wxScale), [batch, T, G, ...hidden], dtype, device);
  const ref: NewtonRefInputs = {
    wx: values(wxT),
    R,
    b: normal(rand, G * N, 0.5),
    h0: h0 ? normal(rand, S * batch * N, 0.5) : null,
  };
  return {
    ref,
    dims: { cell, batch, T, heads, headDim },
    inputs: {
      wx: wxT,
      R: tensor(R, diag ? [G, ...hidden] : [G, heads, headDim, headDim], 'float32', device),
      b: tensor(ref.b, [G, ...hidden], 'float32', device),
      h0: h0 ? tensor(ref.h0!, [S, batch, ...hidden], 'float32', device) : null,
    },
  };
}

/**
 * Relative error with a floor on the reference's norm: a gradient that has decayed through many
 * steps to almost nothing (dh0 from finalStates alone over a long sequence), or a one-element output
 * that lands near zero by cancellation of O(0.1) terms (so its fp32 rounding is large relative to
 * itself), compares absolutely.
 */
function flooredErr(got: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (got.length !== ref.length) return Infinity;
  let num = 0,
    den = 0;
  for (let i = 0; i < ref.length; i++) {
    if (!Number.isFinite(got[i])) return Infinity;
    num += (got[i] - ref[i]) ** 2;
    den += ref[i] * ref[i];
  }
  return Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-3 * Math.sqrt(ref.length));
}

/** Tolerance of an fp32 result against the float64 answer, growing with T (errors carry along time). */
const fp32Tol = (T: number) => 2e-5 * Math.max(1, Math.sqrt(T / 8));

interface Case {
  cell: NewtonCell;
  batch: number;
  T: number;
  heads: number;
  headDim: number;
  h0: boolean;
  jacobian: 'full' | 'diagonal';
  mode: 'newton' | 'sequential';
  guess: 'zeros' | 'one-step';
  fiveD?: boolean;
}
const name = (c: Case) =>
  `${c.cell} ${c.mode} ${c.jacobian} b${c.batch} T${c.T} H${c.heads} D${c.headDim}` +
  `${c.h0 ? ' h0' : ''} ${c.guess}${c.fiveD ? ' 5-d' : ''}`;

function cases(): Case[] {
  const out: Case[] = [];
  for (const cell of CELLS) {
    const b = { cell, h0: true, jacobian: 'full' as const, mode: 'newton' as const, guess: 'zeros' as const };
    out.push({ ...b, batch: 3, T: 37, heads: 3, headDim: 5 });
    out.push({ ...b, batch: 1, T: 1, heads: 1, headDim: 1, h0: false });
    out.push({ ...b, batch: 2, T: 9, heads: 1, headDim: 7, guess: 'one-step', fiveD: true });
    out.push({ ...b, batch: 1, T: 150, heads: 2, headDim: 3, h0: false });
    out.push({ ...b, batch: 3, T: 21, heads: 4, headDim: 3, jacobian: 'diagonal', guess: 'one-step' });
    out.push({ ...b, batch: 2, T: 19, heads: 2, headDim: 3, mode: 'sequential' });
    if (isDiagonalCell(cell)) out.push({ ...b, batch: 2, T: 11, heads: 1, headDim: 131 }); // crosses channel chunks
  }
  return out;
}

function checkForward(c: Case, device: rk.Device) {
  const p = problem(c.cell, c.batch, c.T, c.heads, c.headDim, { h0: c.h0, device, fiveD: c.fiveD });
  const r = rk.newtonRnn(p.inputs, {
    cell: c.cell,
    heads: c.heads,
    jacobian: c.jacobian,
    mode: c.mode,
    initialGuess: c.guess,
    maxIters: 200,
    tol: { abs: 1e-6, rel: 1e-6 },
    onNonConvergence: 'error',
  });
  const ref = newtonRnnRef(p.ref, p.dims);
  const tol = fp32Tol(c.T);
  const S = NEWTON_STATES[c.cell],
    N = c.heads * c.headDim,
    hidden = c.fiveD ? [c.heads, c.headDim] : [N];
  expect(r.y.shape).toEqual([c.batch, c.T, ...hidden]);
  expect(r.finalStates.shape).toEqual([S, c.batch, ...hidden]);
  expect(r.trajectory.shape).toEqual([c.batch, c.T, S, ...hidden]);
  expect(flooredErr(values(r.y), ref.y), at(`${name(c)}: y`)).toBeLessThan(tol);
  expect(flooredErr(values(r.finalStates), ref.finalStates), at(`${name(c)}: finalStates`)).toBeLessThan(tol);
  expect(flooredErr(values(r.trajectory), ref.traj), at(`${name(c)}: trajectory`)).toBeLessThan(tol);
  expect(r.stats.converged).toEqual(new Array(c.batch).fill(true));
  expect(r.stats.fellBack).toEqual(new Array(c.batch).fill(false));
  if (c.mode === 'sequential') {
    expect(Array.from(r.stats.iterations)).toEqual(new Array(c.batch).fill(0));
    expect(Array.from(r.stats.residual)).toEqual(new Array(c.batch).fill(0));
  } else {
    // Converged: the residual is within the check's bound at the largest state.
    const traj = values(r.trajectory);
    const perRow = traj.length / c.batch;
    for (let b = 0; b < c.batch; b++) {
      let big = 0;
      for (let i = b * perRow; i < (b + 1) * perRow; i++) big = Math.max(big, Math.abs(traj[i]));
      expect(r.stats.iterations[b]).toBeGreaterThan(0);
      expect(r.stats.residual[b]).toBeLessThanOrEqual(1e-6 + 1e-6 * big);
    }
  }
}

function checkBackward(
  cell: NewtonCell,
  device: rk.Device,
  dtype: rk.DType,
  mode: 'newton' | 'sequential',
  h0: boolean,
  dims: [number, number, number, number],
) {
  const [batch, T, heads, headDim] = dims;
  const p = problem(cell, batch, T, heads, headDim, { h0, device, dtype });
  const S = NEWTON_STATES[cell],
    N = heads * headDim;
  const { outputs, ctx } = rk.ops.newtonRnn.forward(p.inputs, { cell, heads, mode, tol: { abs: 1e-6, rel: 1e-6 } });
  expect(outputs.stats.converged.every(Boolean)).toBe(true);
  const dy = tensor(normal(rand, batch * T * N), [batch, T, N], dtype, device);
  const dFinal = tensor(normal(rand, S * batch * N), [S, batch, N], 'float32', device);
  const tol = dtype === 'float32' ? 4 * fp32Tol(T) : 2e-2;
  for (const which of ['both', 'y', 'final'] as const) {
    const g = rk.ops.newtonRnn.backward(ctx, {
      y: which === 'final' ? null : dy,
      finalStates: which === 'y' ? null : dFinal,
    });
    const ref = newtonRnnRefBackward(p.ref, p.dims, {
      dy: which === 'final' ? null : values(dy),
      dFinal: which === 'y' ? null : values(dFinal),
    });
    const w = (s: string) => at(`${cell} ${dtype} ${mode} ${which}: ${s}`);
    expect(flooredErr(values(g.wx), ref.dwx), w('dwx')).toBeLessThan(tol);
    expect(flooredErr(values(g.R), ref.dR), w('dR')).toBeLessThan(tol);
    expect(flooredErr(values(g.b), ref.db), w('db')).toBeLessThan(tol);
    if (h0) expect(flooredErr(values(g.h0!), ref.dh0), w('dh0')).toBeLessThan(tol);
    else expect(g.h0).toBeNull();
  }
}

describe.each(devices)('newtonRnn on %s vs the float64 oracle', (device) => {
  it.each(cases().map((c) => [name(c), c] as const))('%s', (_n, c) => checkForward(c, device));

  it.each(['float16', 'bfloat16'] as const)('%s inputs', (dtype) => {
    for (const cell of CELLS) {
      const p = problem(cell, 2, 24, 2, 4, { dtype, device });
      const r = rk.newtonRnn(p.inputs, { cell, mode: 'newton', tol: { abs: 1e-6, rel: 1e-6 } });
      expect(r.y.dtype).toBe(dtype);
      const ref = newtonRnnRef(p.ref, p.dims);
      expect(relErr(values(r.y), ref.y), at(`${cell} ${dtype} y`)).toBeLessThan(1e-2);
      expect(relErr(values(r.finalStates), ref.finalStates), at(`${cell} ${dtype} final`)).toBeLessThan(1e-4);
    }
  });

  it('a provided solution converges in 0 iterations and is returned unchanged', () => {
    for (const cell of CELLS) {
      const p = problem(cell, 2, 13, 2, 3, { device });
      const seq = rk.newtonRnn(p.inputs, { cell, mode: 'sequential' });
      const r = rk.newtonRnn(p.inputs, { cell, mode: 'newton', initialGuess: seq.trajectory });
      expect(Array.from(r.stats.iterations), at(cell)).toEqual([0, 0]);
      expect(r.stats.converged).toEqual([true, true]);
      expect(Array.from(values(r.trajectory))).toEqual(Array.from(values(seq.trajectory)));
    }
  });

  it.each(CELLS)('%s gradients equal BPTT (wx, R, b, h0; through y and finalStates)', (cell) => {
    checkBackward(cell, device, 'float32', 'newton', true, [3, 17, 2, 3]);
    checkBackward(cell, device, 'float32', 'sequential', false, [1, 1, 1, 1]);
    checkBackward(cell, device, 'float32', 'newton', true, [2, 60, 1, 5]);
    checkBackward(cell, device, 'bfloat16', 'newton', true, [2, 9, 2, 2]);
  });

  it('the tape differentiates through y and finalStates', () => {
    const p = problem('gru', 2, 8, 2, 2, { device });
    const { wx, R, b, h0 } = p.inputs;
    const [gwx, gR, gb, gh0] = rk.grad((wx_, R_, b_, h0_) => {
      const r = rk.newtonRnn({ wx: wx_, R: R_, b: b_, h0: h0_ }, { cell: 'gru', mode: 'newton' });
      return rk.add(rk.sum(r.y), rk.sum(r.finalStates));
    })(wx, R, b, h0!);
    const ref = newtonRnnRefBackward(p.ref, p.dims, {
      dy: new Float64Array(2 * 8 * 4).fill(1),
      dFinal: new Float64Array(8).fill(1),
    });
    expect(relErr(values(gwx), ref.dwx)).toBeLessThan(1e-4);
    expect(relErr(values(gR), ref.dR)).toBeLessThan(1e-4);
    expect(relErr(values(gb), ref.db)).toBeLessThan(1e-4);
    expect(relErr(values(gh0), ref.dh0)).toBeLessThan(1e-4);
  });

  it.each([
    ['gru', 'full'],
    ['lstm', 'full'],
    ['elman', 'diagonal'],
    ['gru-diag', 'full'],
    ['lstm-cifg-diag', 'full'],
  ] as const)(
    'stats are truthful: %s (%s Jacobian) reports the iterations the float64 Newton needs; one fewer falls back',
    (cell, jacobian) => {
      const T = 40,
        batch = 2;
      // The residual history of the float64 iteration; pick k where it drops the most (by 2x at least,
      // on a fresh draw if this one has no such drop: per-channel Newton need not decrease
      // monotonically), and a tolerance between the residuals before and after step k, far from both
      // and from fp32 rounding.
      // The draw must also need at least one iteration at that tolerance (the residual may rise before
      // it drops, so an earlier one can already be below it), or "one fewer" would be no iterations.
      let p = problem(cell, batch, T, 2, 3, { device, rScale: 0.8, wxScale: 1.5 });
      let hist: number[][] = [],
        k = -1,
        tolAbs = 0;
      let want = { iterations: [0, 0], residuals: [[0], [0]] } as ReturnType<typeof newtonRnnIterate>;
      for (let attempt = 0; attempt < 20 && (k < 0 || Math.max(...want.iterations) < 1); attempt++) {
        if (attempt > 0) p = problem(cell, batch, T, 2, 3, { device, rScale: 0.8, wxScale: 1.5 });
        hist = newtonRnnIterate(p.ref, p.dims, { jacobian, maxIters: 30, tolAbs: 0, tolRel: 0 }).residuals;
        let best = 2;
        k = -1;
        for (let i = 1; i < Math.min(hist[0].length, hist[1].length); i++) {
          const before = Math.min(hist[0][i - 1], hist[1][i - 1]),
            after = Math.max(hist[0][i], hist[1][i], 1e-5);
          if (before > 1e-3 && before / after > best) {
            best = before / after;
            k = i;
          }
        }
        if (k < 0) continue;
        const before = Math.min(hist[0][k - 1], hist[1][k - 1]),
          after = Math.max(hist[0][k], hist[1][k], 1e-5);
        tolAbs = Math.sqrt(before * after);
        want = newtonRnnIterate(p.ref, p.dims, { jacobian, maxIters: 100, tolAbs, tolRel: 0 });
      }
      expect(k, at('no clear drop in the residual')).toBeGreaterThan(0);
      expect(Math.max(...want.iterations), at('no draw needing an iteration')).toBeGreaterThan(0);
      const opts = { cell, jacobian, mode: 'newton' as const, tol: { abs: tolAbs, rel: 0 }, maxIters: 100 };
      const r = rk.newtonRnn(p.inputs, opts);
      expect(Array.from(r.stats.iterations), at(`${cell} k ${k}`)).toEqual(want.iterations);
      expect(r.stats.converged).toEqual([true, true]);
      expect(r.stats.fellBack).toEqual([false, false]);
      for (let b = 0; b < batch; b++) {
        const wr = want.residuals[b][want.iterations[b]];
        expect(r.stats.residual[b]).toBeLessThanOrEqual(tolAbs);
        expect(Math.abs(r.stats.residual[b] - wr), at('residual')).toBeLessThan(1e-5 + 0.05 * wr);
      }
      // One iteration fewer than the slower row: it does not converge, falls back, and the answer is exact.
      const m = Math.max(...want.iterations) - 1;
      const f = rk.newtonRnn(p.inputs, { ...opts, maxIters: m });
      const ref = newtonRnnRef(p.ref, p.dims);
      for (let b = 0; b < batch; b++) {
        const slow = want.iterations[b] > m;
        expect(f.stats.converged[b]).toBe(!slow);
        expect(f.stats.fellBack[b]).toBe(slow);
        expect(f.stats.iterations[b]).toBe(slow ? m : want.iterations[b]);
        if (slow) expect(f.stats.residual[b]).toBeGreaterThan(tolAbs);
      }
      expect(relErr(values(f.y), ref.y), at('fallback y')).toBeLessThan(fp32Tol(T));
      expect(() => rk.newtonRnn(p.inputs, { ...opts, maxIters: m, onNonConvergence: 'error' })).toThrow(
        rk.NotConvergedError,
      );
    },
  );

  it('a chaotic elman (R ~ 3/sqrt(D), long T) does not converge, falls back to the exact answer, or throws', () => {
    const D = 8,
      T = 300;
    const p = problem('elman', 2, T, 1, D, { device, rScale: 3 });
    const r = rk.newtonRnn(p.inputs, { cell: 'elman', mode: 'newton', maxIters: 12, tol: { abs: 1e-5, rel: 0 } });
    expect(r.stats.converged).toEqual([false, false]);
    expect(r.stats.fellBack).toEqual([true, true]);
    expect(Array.from(r.stats.iterations)).toEqual([12, 12]);
    const ref = newtonRnnRef(p.ref, p.dims);
    // Chaos amplifies fp32 rounding over time; compare the first steps tightly and the states' range.
    const y = values(r.y);
    expect(relErr(y.subarray(0, 20 * D), ref.y.subarray(0, 20 * D)), at('chaotic y, first steps')).toBeLessThan(1e-4);
    const seq = rk.newtonRnn(p.inputs, { cell: 'elman', mode: 'sequential' });
    expect(Array.from(y)).toEqual(Array.from(values(seq.y)));
    let err: unknown;
    try {
      rk.newtonRnn(p.inputs, { cell: 'elman', mode: 'newton', maxIters: 12, onNonConvergence: 'error' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(rk.NotConvergedError);
    expect((err as rk.RecurrentKernelsError).code).toBe('ERR_NOT_CONVERGED');
    expect((err as Error).message).toMatch(/batch rows \[0,1\] did not converge within maxIters 12/);
  });

  it.each([
    ['gru-diag', 1.5, 0.1],
    ['lstm-cifg-diag', 1.5, 0.1],
    ['elman', 1.6, 0.3],
  ] as const)(
    'damping converges on a stiff %s case (R scale %s, lambda %s) and matches the float64 damped steps',
    (cell, rScale, damping) => {
      const T = 60,
        D = cell === 'elman' ? 8 : 3,
        heads = cell === 'elman' ? 1 : 2;
      // A fixed damping does not make every stiff problem converge, even in float64 (about one random
      // problem in 25 here stalls with a residual near 1e-3): draw problems until the float64 damped
      // iteration converges within 300 steps on both rows, then ask the kernel to converge within 1000.
      const draw = () => problem(cell, 2, T, heads, D, { device, rScale, wxScale: cell === 'elman' ? 1 : 2 });
      let p = draw();
      for (let n = 1; n < 20; n++) {
        const exact = newtonRnnIterate(p.ref, p.dims, {
          jacobian: 'diagonal',
          maxIters: 300,
          tolAbs: 1e-5,
          tolRel: 0,
          damping,
        });
        if (exact.converged.every(Boolean)) break;
        p = draw();
      }
      const jacobian = cell === 'elman' ? ('diagonal' as const) : ('full' as const);
      const opts = { cell, jacobian, mode: 'newton' as const, damping, maxIters: 1000, tol: { abs: 1e-5, rel: 0 } };
      const r = rk.newtonRnn(p.inputs, { ...opts, onNonConvergence: 'error' });
      expect(r.stats.converged).toEqual([true, true]);
      expect(r.stats.fellBack).toEqual([false, false]);
      const ref = newtonRnnRef(p.ref, p.dims);
      expect(relErr(values(r.y), ref.y), at('damped y')).toBeLessThan(1e-3);
      // Three damped steps give the float64 damped iterate (the same minimiser): the trajectory of the
      // last iterate, read without the fallback through the addon, and its residual.
      const it3 = newtonRnnIterate(p.ref, p.dims, { jacobian: 'diagonal', maxIters: 3, tolAbs: 0, tolRel: 0, damping });
      const k3 = rk.newtonRnn(p.inputs, { ...opts, maxIters: 3, tol: { abs: 0, rel: 0 } });
      expect(Array.from(k3.stats.iterations)).toEqual([3, 3]);
      expect(k3.stats.fellBack).toEqual([true, true]);
      for (let b = 0; b < 2; b++) {
        const want = it3.residuals[b][3];
        expect(Math.abs(k3.stats.residual[b] - want), at(`damped residual row ${b}`)).toBeLessThan(1e-5 + 1e-3 * want);
      }
      if (device === 'cpu') {
        const raw = rk.internals.native().newtonRnnForward({
          device: 'cpu',
          dtype: 'float32',
          tensors: {
            wx: p.inputs.wx.storage,
            R: p.inputs.R.storage,
            b: p.inputs.b.storage,
            h0: p.inputs.h0!.storage,
            guess: null,
          },
          config: {
            cell: ({ 'gru-diag': 0, 'lstm-cifg-diag': 1, elman: 4 } as const)[cell],
            batch: 2,
            T,
            heads,
            headDim: D,
            fullJacobian: jacobian === 'full',
            sequential: false,
            fallbackSequential: false,
            maxIters: 3,
            tolAbs: 0,
            tolRel: 0,
            damping,
            guess: 0,
          },
        });
        expect(Array.from(raw.fellBack)).toEqual([0, 0]);
        expect(
          relErr(Float64Array.from(raw.traj as Float32Array), it3.traj),
          at('damped 3-step trajectory'),
        ).toBeLessThan(1e-4);
      }
    },
  );
});

describe.each(devices)('newtonRnn memory on %s', (device) => {
  it('live tensors and RSS stay flat over many calls, the non-convergence error included', () => {
    const p = problem('lstm', 2, 40, 2, 4, { device });
    const chaotic = problem('elman', 1, 60, 1, 4, { device, rScale: 3 });
    const dy = tensor(new Float32Array(2 * 40 * 8).fill(0.1), [2, 40, 8], 'float32', device);
    const run = () => {
      const { outputs, ctx } = rk.ops.newtonRnn.forward(p.inputs, { cell: 'lstm', mode: 'newton' });
      const g = rk.ops.newtonRnn.backward(ctx, { y: dy });
      for (const t of [outputs.y, outputs.finalStates, outputs.trajectory, g.wx, g.R, g.b, g.h0]) t?.dispose();
      expect(() =>
        rk.newtonRnn(chaotic.inputs, { cell: 'elman', mode: 'newton', maxIters: 2, onNonConvergence: 'error' }),
      ).toThrow(rk.NotConvergedError);
    };
    for (let i = 0; i < 50; i++) run();
    global.gc?.();
    const live0 = rk.memory();
    const rss0 = process.memoryUsage().rss;
    for (let i = 0; i < 1000; i++) run();
    global.gc?.();
    const live1 = rk.memory();
    expect(live1.cpu.tensors).toBe(live0.cpu.tensors);
    expect(live1.cuda.tensors).toBe(live0.cuda.tensors);
    expect(process.memoryUsage().rss - rss0).toBeLessThan(64 * 1024 * 1024);
  });
});

describe('newtonRnn modes and options', () => {
  it("'auto' is sequential on CPU", () => {
    const p = problem('gru-diag', 2, 10, 1, 4);
    const r = rk.newtonRnn(p.inputs, { cell: 'gru-diag' });
    expect(Array.from(r.stats.iterations)).toEqual([0, 0]);
    expect(Array.from(r.stats.residual)).toEqual([0, 0]);
  });
  it('maxIters 0 checks the guess only', () => {
    const p = problem('lstm', 1, 5, 1, 2);
    const r = rk.newtonRnn(p.inputs, { cell: 'lstm', mode: 'newton', maxIters: 0 });
    expect(r.stats.fellBack).toEqual([true]);
    expect(r.stats.iterations[0]).toBe(0);
    expect(relErr(values(r.y), newtonRnnRef(p.ref, p.dims).y)).toBeLessThan(1e-5);
  });
});

describe.runIf(hasCuda)('newtonRnn on CUDA against the CPU kernels', () => {
  it.each(CELLS)('%s, long sequences and many rows', (cell) => {
    const p = problem(cell, 5, 1000, 4, 8);
    const cuda = {
      wx: p.inputs.wx.to('cuda'),
      R: p.inputs.R.to('cuda'),
      b: p.inputs.b.to('cuda'),
      h0: p.inputs.h0!.to('cuda'),
    };
    for (const jacobian of ['full', 'diagonal'] as const) {
      const opts = { cell, jacobian, mode: 'newton' as const, maxIters: 300, tol: { abs: 1e-6, rel: 1e-6 } };
      const c = rk.newtonRnn(p.inputs, opts),
        g = rk.newtonRnn(cuda, opts);
      expect(g.stats.converged.every(Boolean)).toBe(true);
      expect(relErr(values(g.y), values(c.y)), at(`${cell} ${jacobian} y`)).toBeLessThan(1e-4);
      const { ctx } = rk.ops.newtonRnn.forward(cuda, opts);
      const dy = tensor(normal(rand, 5 * 1000 * 32), [5, 1000, 32]);
      const gc = rk.ops.newtonRnn.backward(rk.ops.newtonRnn.forward(p.inputs, opts).ctx, { y: dy });
      const gg = rk.ops.newtonRnn.backward(ctx, { y: dy.to('cuda') });
      expect(relErr(values(gg.R), values(gc.R)), at(`${cell} dR`)).toBeLessThan(1e-3);
      expect(relErr(values(gg.wx), values(gc.wx)), at(`${cell} dwx`)).toBeLessThan(1e-3);
    }
  });

  it("heads beyond the CUDA full-Jacobian solve: 'newton' refuses them, 'auto' evaluates sequentially", () => {
    const p = problem('lstm', 2, 20, 1, 65);
    const cuda = {
      wx: p.inputs.wx.to('cuda'),
      R: p.inputs.R.to('cuda'),
      b: p.inputs.b.to('cuda'),
      h0: p.inputs.h0!.to('cuda'),
    };
    expect(() => rk.newtonRnn(cuda, { cell: 'lstm', mode: 'newton' })).toThrow(/states x headDim <= 128/);
    const r = rk.newtonRnn(cuda, { cell: 'lstm' });
    expect(Array.from(r.stats.iterations)).toEqual([0, 0]);
    const ref = newtonRnnRef(p.ref, p.dims);
    expect(relErr(values(r.y), ref.y)).toBeLessThan(1e-4);
  });
});

describe('newtonRnn bad input', () => {
  const mk = (shape: number[], dtype: rk.DType = 'float32') =>
    tensor(new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.1), shape, dtype);
  const good = () => ({ wx: mk([2, 5, 3, 6]), R: mk([3, 2, 3, 3]), b: mk([3, 6]), h0: mk([1, 2, 6]) });
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
  const gru = { cell: 'gru' as const, heads: 2 };
  it('runs when everything is right', () => {
    expect(rk.newtonRnn(good(), { ...gru, mode: 'newton' }).y.shape).toEqual([2, 5, 6]);
    expect(rk.newtonRnn(good(), { cell: 'gru' }).y.shape).toEqual([2, 5, 6]); // heads from R
  });
  it('names the argument and what was expected', () => {
    fails(
      () => rk.newtonRnn({ ...good(), wx: mk([2, 5, 18]) }, gru),
      'ERR_SHAPE',
      /wx has shape \[2,5,18\], expected 4/,
    );
    fails(() => rk.newtonRnn({ ...good(), wx: mk([2, 5, 4, 6]) }, gru), 'ERR_SHAPE', /wx has 4 gates.*expected 3/);
    fails(() => rk.newtonRnn({ ...good(), wx: mk([2, 0, 3, 6]) }, gru), 'ERR_SHAPE', /at least 1/);
    fails(
      () => rk.newtonRnn({ ...good(), R: mk([3, 6]) }, gru),
      'ERR_SHAPE',
      /R has shape \[3,6\], expected \[3,2,3,3\]/,
    );
    fails(
      () => rk.newtonRnn({ ...good(), R: mk([3, 2, 3, 3]) }, { cell: 'gru-diag' }),
      'ERR_SHAPE',
      /R has shape.*expected \[3,6\]/,
    );
    fails(() => rk.newtonRnn({ ...good(), b: mk([3, 5]) }, gru), 'ERR_SHAPE', /b has shape \[3,5\]/);
    fails(
      () => rk.newtonRnn({ ...good(), h0: mk([2, 2, 6]) }, gru),
      'ERR_SHAPE',
      /h0 has shape \[2,2,6\], expected \[1,2,6\]/,
    );
    fails(
      () => rk.newtonRnn({ ...good(), h0: mk([1, 2, 6]) }, { cell: 'lstm', heads: 2 }),
      'ERR_SHAPE',
      /wx has 3 gates/,
    );
    fails(() => rk.newtonRnn({ ...good(), R: mk([3, 2, 3, 3], 'bfloat16') }, gru), 'ERR_DTYPE', /R has dtype bfloat16/);
    fails(() => rk.newtonRnn({ ...good(), b: mk([3, 6], 'float16') }, gru), 'ERR_DTYPE', /b has dtype float16/);
    fails(() => rk.newtonRnn({ ...good(), h0: mk([1, 2, 6], 'float16') }, gru), 'ERR_DTYPE', /h0 has dtype/);
    fails(() => rk.newtonRnn(good(), { ...gru, heads: 4 }), 'ERR_SHAPE', /not a multiple of heads 4|R has shape/);
    fails(() => rk.newtonRnn(good(), { ...gru, heads: 0 }), 'ERR_ARGUMENT', /heads must be a positive integer/);
    fails(() => rk.newtonRnn(good(), { cell: 'rnn' } as never), 'ERR_ARGUMENT', /cell must be one of/);
    fails(() => rk.newtonRnn(good(), undefined as never), 'ERR_ARGUMENT', /cell/);
    fails(() => rk.newtonRnn(good(), { ...gru, maxIters: 2.5 }), 'ERR_ARGUMENT', /maxIters must be an integer/);
    fails(() => rk.newtonRnn(good(), { ...gru, maxIters: -1 }), 'ERR_ARGUMENT', /maxIters/);
    fails(() => rk.newtonRnn(good(), { ...gru, tol: { abs: NaN } }), 'ERR_ARGUMENT', /tol.abs must be a finite number/);
    fails(() => rk.newtonRnn(good(), { ...gru, tol: { rel: -1 } }), 'ERR_ARGUMENT', /tol.rel must be non-negative/);
    fails(
      () => rk.newtonRnn(good(), { ...gru, tol: { absolute: 1 } as never }),
      'ERR_ARGUMENT',
      /unknown option 'absolute'/,
    );
    fails(() => rk.newtonRnn(good(), { ...gru, damping: Infinity }), 'ERR_ARGUMENT', /damping must be a finite number/);
    fails(
      () => rk.newtonRnn(good(), { ...gru, damping: 0.5 }),
      'ERR_ARGUMENT',
      /damping 0.5 needs per-channel Jacobians/,
    );
    expect(
      rk.newtonRnn(good(), { ...gru, damping: 0.5, jacobian: 'diagonal', mode: 'newton' }).stats.converged,
    ).toEqual([true, true]);
    fails(
      () => rk.newtonRnn(good(), { ...gru, jacobian: 'dense' as never }),
      'ERR_ARGUMENT',
      /jacobian must be 'full' or 'diagonal'/,
    );
    fails(() => rk.newtonRnn(good(), { ...gru, mode: 'fast' as never }), 'ERR_ARGUMENT', /mode must be/);
    fails(
      () => rk.newtonRnn(good(), { ...gru, onNonConvergence: 'ignore' as never }),
      'ERR_ARGUMENT',
      /onNonConvergence/,
    );
    fails(
      () => rk.newtonRnn(good(), { ...gru, initialGuess: 'ones' as never }),
      'ERR_ARGUMENT',
      /initialGuess must be/,
    );
    fails(
      () => rk.newtonRnn(good(), { ...gru, initialGuess: mk([2, 5, 6]) }),
      'ERR_SHAPE',
      /initialGuess has shape \[2,5,6\], expected \[2,5,1,6\]/,
    );
    fails(
      () => rk.newtonRnn(good(), { ...gru, initialGuess: mk([2, 5, 1, 6], 'bfloat16') }),
      'ERR_DTYPE',
      /initialGuess has dtype/,
    );
    fails(() => rk.newtonRnn(good(), { ...gru, tolerance: 1 } as never), 'ERR_ARGUMENT', /unknown option 'tolerance'/);
    fails(() => rk.newtonRnn({ ...good(), x: mk([1]) } as never, gru), 'ERR_ARGUMENT', /unknown input 'x'/);
    fails(() => rk.newtonRnn({ ...good(), wx: [1, 2] } as never, gru), 'ERR_ARGUMENT', /wx must be a Tensor/);
    const g = good();
    g.b.dispose();
    fails(() => rk.newtonRnn(g, gru), 'ERR_DISPOSED', /b was disposed/);
    const g2 = good();
    const { ctx } = rk.ops.newtonRnn.forward(g2, gru);
    fails(() => rk.ops.newtonRnn.backward(ctx, { y: mk([2, 5, 5]) }), 'ERR_SHAPE', /grad of y has shape/);
    fails(() => rk.ops.newtonRnn.backward(ctx, { y: mk([2, 5, 6], 'float16') }), 'ERR_DTYPE', /grad of y has dtype/);
    fails(() => rk.ops.newtonRnn.backward(ctx, { finalStates: mk([2, 2, 6]) }), 'ERR_SHAPE', /grad of finalStates/);
    fails(
      () => rk.ops.newtonRnn.backward(ctx, { trajectory: mk([2, 5, 1, 6]) }),
      'ERR_ARGUMENT',
      /trajectory output has no gradient/,
    );
    g2.R.dispose();
    fails(
      () => rk.ops.newtonRnn.backward(ctx, { y: mk([2, 5, 6]) }),
      'ERR_DISPOSED',
      /R \(saved for backward\) was disposed/,
    );
    if (!hasCuda) {
      fails(
        () => rk.newtonRnn({ ...good(), wx: rk.Tensor.zeros([2, 5, 3, 6], { device: 'cuda' }) }, gru),
        'ERR_DEVICE',
        /./,
      );
    }
  });
  it('the cell table comes from the addon (its one definition) and names every NewtonRnnCell', () => {
    const names: rk.NewtonRnnCell[] = ['gru-diag', 'lstm-cifg-diag', 'gru', 'lstm', 'elman'];
    const cells = rk.internals.native().newtonRnnCells();
    expect(cells.map((c) => c.name)).toEqual(names);
    expect(cells.map((c) => [c.code, c.gates, c.states, c.diagonal])).toEqual([
      [0, 3, 1, true],
      [1, 3, 2, true],
      [2, 3, 1, false],
      [3, 4, 2, false],
      [4, 1, 1, false],
    ]);
  });
  it('the addon re-checks sizes and scalars it is given directly', () => {
    const n = rk.internals.native;
    const s = (k: number) => new Float32Array(k);
    const t = { wx: s(180), R: s(54), b: s(18), h0: s(12), guess: null };
    const cfg = {
      cell: 2,
      batch: 2,
      T: 5,
      heads: 2,
      headDim: 3,
      fullJacobian: true,
      sequential: false,
      fallbackSequential: true,
      maxIters: 5,
      tolAbs: 1e-5,
      tolRel: 0,
      damping: 0,
      guess: 0,
    };
    const fwd = (tensors: typeof t, config: typeof cfg) =>
      n().newtonRnnForward({ device: 'cpu', dtype: 'float32', tensors, config });
    expect(() => fwd(t, cfg)).not.toThrow();
    fails(() => fwd({ ...t, wx: s(179) }, cfg), 'ERR_SHAPE', /wx has 179/);
    fails(() => fwd({ ...t, R: s(18) }, cfg), 'ERR_SHAPE', /R has 18/);
    fails(() => fwd({ ...t, h0: s(11) }, cfg), 'ERR_SHAPE', /h0 has 11/);
    fails(() => fwd(t, { ...cfg, cell: 7 }), 'ERR_ARGUMENT', /unknown cell 7/);
    fails(() => fwd(t, { ...cfg, tolAbs: NaN }), 'ERR_ARGUMENT', /tolAbs/);
    fails(() => fwd(t, { ...cfg, damping: -1 }), 'ERR_ARGUMENT', /damping/);
    fails(() => fwd(t, { ...cfg, damping: 1 }), 'ERR_ARGUMENT', /per-channel Jacobians/);
    fails(() => fwd(t, { ...cfg, guess: 2 }), 'ERR_DEVICE', /initialGuess must be CPU storage/);
    fails(() => fwd(t, { ...cfg, maxIters: -2 }), 'ERR_ARGUMENT', /maxIters/);
    fails(
      () =>
        n().newtonRnnBackward({
          device: 'cpu',
          dtype: 'float32',
          tensors: t,
          config: { ...cfg, needDh0: true },
          grads: { traj: s(59), dy: null, dFinal: null },
        }),
      'ERR_SHAPE',
      /trajectory \(saved for backward\) has 59/,
    );
  });
});
