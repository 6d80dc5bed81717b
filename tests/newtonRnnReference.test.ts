// The Newton-RNN oracle checked on its own: the generic step against the fused-cell oracle, hand-computed
// steps of the diagonal cells, the Jacobians and the backward against central finite differences, and
// the float64 Newton iteration (exact after T full steps, damping's dense solve against the plain scan).
import { describe, expect, it } from 'vitest';
import { sigmoid } from './reference/fusedRnn';
import {
  NEWTON_GATES,
  NEWTON_STATES,
  headStep,
  isDiagonalCell,
  newtonRnnIterate,
  newtonRnnRef,
  newtonRnnRefBackward,
  newtonRnnSequentialSteps,
  type NewtonCell,
  type NewtonRefDims,
  type NewtonRefInputs,
} from './reference/newtonRnn';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (s: string) => `${s} (seed ${seed})`;
const CELLS: NewtonCell[] = ['gru-diag', 'lstm-cifg-diag', 'gru', 'lstm', 'elman'];

function problem(
  cell: NewtonCell,
  batch: number,
  T: number,
  heads: number,
  headDim: number,
  h0 = true,
  rScale = 0.5,
): { inputs: NewtonRefInputs; dims: NewtonRefDims } {
  const G = NEWTON_GATES[cell],
    S = NEWTON_STATES[cell],
    N = heads * headDim;
  const rN = isDiagonalCell(cell) ? G * N : G * heads * headDim * headDim;
  return {
    inputs: {
      wx: normal(rand, batch * T * G * N),
      R: normal(rand, rN, rScale),
      b: normal(rand, G * N, 0.5),
      h0: h0 ? normal(rand, S * batch * N, 0.7) : null,
    },
    dims: { cell, batch, T, heads, headDim },
  };
}

describe('newtonRnn oracle', () => {
  it.each(['gru', 'lstm', 'elman'] as const)('the generic %s step equals the fused-cell oracle', (cell) => {
    const { inputs, dims } = problem(cell, 2, 6, 3, 4);
    const ref = newtonRnnRef(inputs, dims);
    const traj = newtonRnnSequentialSteps(inputs, dims);
    const S = NEWTON_STATES[cell],
      N = 12;
    const y = new Float64Array(2 * 6 * N),
      fin = new Float64Array(S * 2 * N);
    for (let b = 0; b < 2; b++) {
      for (let t = 0; t < 6; t++) for (let n = 0; n < N; n++) y[(b * 6 + t) * N + n] = traj[(b * 6 + t) * S * N + n];
      for (let s = 0; s < S; s++)
        for (let n = 0; n < N; n++) fin[(s * 2 + b) * N + n] = traj[((b * 6 + 5) * S + s) * N + n];
    }
    expect(relErr(y, ref.y)).toBeLessThan(1e-14);
    expect(relErr(fin, ref.finalStates)).toBeLessThan(1e-14);
  });

  it('hand-computed steps of the diagonal cells', () => {
    // gru-diag, one channel, T = 2, h0 = 0.5.
    const wx = [0.1, -0.2, 0.3, 0.4, 0.0, -0.5],
      R = [0.7, -0.3, 0.9],
      b = [0.05, 0.1, -0.2];
    const g = newtonRnnRef({ wx, R, b, h0: [0.5] }, { cell: 'gru-diag', batch: 1, T: 2, heads: 1, headDim: 1 });
    let h = 0.5;
    for (let t = 0; t < 2; t++) {
      const r = sigmoid(wx[3 * t] + b[0] + R[0] * h),
        z = sigmoid(wx[3 * t + 1] + b[1] + R[1] * h);
      const n = Math.tanh(wx[3 * t + 2] + r * (R[2] * h + b[2]));
      h = (1 - z) * n + z * h;
      expect(g.y[t]).toBeCloseTo(h, 14);
    }
    // lstm-cifg-diag, one channel, T = 1, h0 = (0.2, -0.4).
    const l = newtonRnnRef(
      { wx: [0.3, -0.1, 0.6], R: [0.5, 0.2, -0.4], b: [0.1, 0, 0.2], h0: [0.2, -0.4] },
      { cell: 'lstm-cifg-diag', batch: 1, T: 1, heads: 1, headDim: 1 },
    );
    const f = sigmoid(0.3 + 0.1 + 0.5 * 0.2),
      zz = Math.tanh(-0.1 + 0 + 0.2 * 0.2),
      o = sigmoid(0.6 + 0.2 - 0.4 * 0.2);
    const c = f * -0.4 + (1 - f) * zz;
    expect(l.finalStates[1]).toBeCloseTo(c, 14);
    expect(l.y[0]).toBeCloseTo(o * Math.tanh(c), 14);
    expect(l.traj[0]).toBeCloseTo(o * Math.tanh(c), 14);
    expect(l.traj[1]).toBeCloseTo(c, 14);
  });

  it.each(CELLS)('the %s Jacobian equals finite differences', (cell) => {
    const { inputs, dims } = problem(cell, 1, 1, 2, 3);
    const S = NEWTON_STATES[cell],
      SD = S * 3;
    const dm = { ...dims, G: NEWTON_GATES[cell], S, N: 6, D: 3, H: 2 };
    const prev = normal(rand, SD, 0.8),
      next = new Float64Array(SD),
      jac = new Float64Array(SD * SD);
    headStep(dm, inputs, 0, 0, 1, prev, next, jac);
    const fd = new Float64Array(SD * SD),
      p = new Float64Array(SD),
      m = new Float64Array(SD);
    for (let k = 0; k < SD; k++) {
      const x = Float64Array.from(prev);
      x[k] += 1e-6;
      headStep(dm, inputs, 0, 0, 1, x, p);
      x[k] -= 2e-6;
      headStep(dm, inputs, 0, 0, 1, x, m);
      for (let i = 0; i < SD; i++) fd[i * SD + k] = (p[i] - m[i]) / 2e-6;
    }
    expect(relErr(jac, fd), at(cell)).toBeLessThan(1e-8);
  });

  it.each(CELLS)('the %s backward equals finite differences (wx, R, b, h0; through y and finalStates)', (cell) => {
    const { inputs, dims } = problem(cell, 2, 5, 2, 2);
    const S = NEWTON_STATES[cell];
    const dy = normal(rand, 2 * 5 * 4),
      dFin = normal(rand, S * 2 * 4);
    const got = newtonRnnRefBackward(inputs, dims, { dy, dFinal: dFin });
    const xs = [
      Float64Array.from(inputs.wx),
      Float64Array.from(inputs.R),
      Float64Array.from(inputs.b),
      Float64Array.from(inputs.h0!),
    ];
    const loss = (a: Float64Array[]) => {
      const r = newtonRnnRef({ wx: a[0], R: a[1], b: a[2], h0: a[3] }, dims);
      return dot(r.y, dy) + dot(r.finalStates, dFin);
    };
    const fd = finiteDifferences(loss, xs, 1e-6);
    expect(relErr(got.dwx, fd[0]), at('dwx')).toBeLessThan(1e-7);
    expect(relErr(got.dR, fd[1]), at('dR')).toBeLessThan(1e-7);
    expect(relErr(got.db, fd[2]), at('db')).toBeLessThan(1e-7);
    expect(relErr(got.dh0, fd[3]), at('dh0')).toBeLessThan(1e-7);
    // Only through y; and without h0 (zeros).
    const noH0 = { ...inputs, h0: null };
    const g2 = newtonRnnRefBackward(noH0, dims, { dy });
    const fd2 = finiteDifferences((a) => dot(newtonRnnRef({ ...noH0, wx: a[0] }, dims).y, dy), [xs[0]], 1e-6);
    expect(relErr(g2.dwx, fd2[0]), at('dwx through y')).toBeLessThan(1e-7);
  });

  it.each(CELLS)('full-Jacobian Newton on %s is exact after at most T steps from any guess', (cell) => {
    const { inputs, dims } = problem(cell, 2, 7, 2, 3);
    const ref = newtonRnnRef(inputs, dims);
    const r = newtonRnnIterate(inputs, dims, { jacobian: 'full', maxIters: 7, tolAbs: 1e-12, tolRel: 0 });
    for (let b = 0; b < 2; b++) {
      expect(r.converged[b]).toBe(true);
      expect(r.iterations[b]).toBeLessThanOrEqual(7);
      expect(r.residuals[b].length).toBe(r.iterations[b] + 1);
    }
    expect(relErr(r.traj, ref.traj)).toBeLessThan(1e-12);
    // After k steps from zeros the first k time steps are exact (the error front moves one step per iteration).
    const k2 = newtonRnnIterate(inputs, dims, { jacobian: 'full', maxIters: 2, tolAbs: 0, tolRel: 0 });
    const S = NEWTON_STATES[cell],
      per = S * 6;
    for (let b = 0; b < 2; b++) {
      const got = k2.traj.subarray(b * 7 * per, b * 7 * per + 2 * per),
        want = ref.traj.subarray(b * 7 * per, b * 7 * per + 2 * per);
      expect(relErr(got, want)).toBeLessThan(1e-12);
    }
  });

  it.each(CELLS)(
    'per-channel-Jacobian Newton on %s converges to the sequential answer; a solution converges in 0 steps',
    (cell) => {
      const { inputs, dims } = problem(cell, 1, 9, 2, 2, true, 0.3);
      const ref = newtonRnnRef(inputs, dims);
      const r = newtonRnnIterate(inputs, dims, {
        jacobian: 'diagonal',
        maxIters: 200,
        tolAbs: 1e-11,
        tolRel: 0,
        guess: 'one-step',
      });
      expect(r.converged[0]).toBe(true);
      expect(relErr(r.traj, ref.traj)).toBeLessThan(1e-9);
      const z = newtonRnnIterate(inputs, dims, {
        jacobian: 'diagonal',
        maxIters: 5,
        tolAbs: 1e-12,
        tolRel: 0,
        guess: ref.traj,
      });
      expect(z.iterations[0]).toBe(0);
      expect(z.converged[0]).toBe(true);
    },
  );

  it.each(['gru-diag', 'lstm-cifg-diag', 'lstm'] as const)(
    'damping on %s: a vanishing lambda is the plain step, a large one shrinks it, and it converges',
    (cell) => {
      const { inputs, dims } = problem(cell, 1, 6, 1, 3);
      const opt = { jacobian: 'diagonal' as const, maxIters: 1, tolAbs: 0, tolRel: 0 };
      const plain = newtonRnnIterate(inputs, dims, opt);
      const tiny = newtonRnnIterate(inputs, dims, { ...opt, damping: 1e-12 });
      expect(relErr(tiny.traj, plain.traj)).toBeLessThan(1e-9);
      const big = newtonRnnIterate(inputs, dims, { ...opt, damping: 1e6 });
      let mx = 0;
      for (const v of big.traj) mx = Math.max(mx, Math.abs(v));
      expect(mx).toBeLessThan(1e-5);
      const ref = newtonRnnRef(inputs, dims);
      const conv = newtonRnnIterate(inputs, dims, {
        jacobian: 'diagonal',
        maxIters: 300,
        tolAbs: 1e-10,
        tolRel: 0,
        damping: 0.5,
      });
      expect(conv.converged[0]).toBe(true);
      expect(relErr(conv.traj, ref.traj)).toBeLessThan(1e-8);
    },
  );

  it('stops at maxIters without converging and says so', () => {
    const { inputs, dims } = problem('elman', 1, 30, 1, 4, true, 3);
    const r = newtonRnnIterate(inputs, dims, { jacobian: 'diagonal', maxIters: 2, tolAbs: 1e-9, tolRel: 0 });
    expect(r.converged[0]).toBe(false);
    expect(r.iterations[0]).toBe(2);
    expect(r.residuals[0].length).toBe(3);
  });
});
