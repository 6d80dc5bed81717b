// Float64 oracle of the Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): the plain sequential
// recurrence h_t = f(h_{t-1}, x_t) that the op must reproduce, its backward (BPTT), and a float64
// Newton iteration with the op's convergence rule, used to check the op's iteration counts.
//
// Layouts (flat, row-major; N = heads * headDim channels, index head * D + j; G gates, S states):
//   wx, dwx ........... [batch, T, G, N]            R, dR ... [G, N] (diagonal cells) or [G, H, D, D]
//   b, db ............. [G, N]                      h0, dh0, finalStates, dFinal ... [S, batch, N]
//   traj .............. [batch, T, S, N]            y, dy ... [batch, T, N] (the h state of traj)
//
// Cells (pre_g = wx_g + b_g + rec_g; the GRU's n gate is wx_n + r (rec_n + b_n)):
//   gru-diag        G 3 (r, z, n)  S 1 (h)     rec_g[j] = R[g][j] h_{t-1}[j]; the fused GRU step
//   lstm-cifg-diag  G 3 (f, z, o)  S 2 (h, c)  rec_g[j] = R[g][j] h_{t-1}[j]; f = sig(pre_f),
//                                              c_t = f c_{t-1} + (1 - f) tanh(pre_z), h_t = sig(pre_o) tanh(c_t)
//   gru, lstm, elman                           the fused cells of ./fusedRnn.ts (h @ R per head)
// The dense cells' sequential evaluation and backward are those of fusedRnnRef / fusedRnnRefBackward.
// The generic step below (used by the Newton iteration, and for the diagonal cells) is checked
// against them in tests/newtonRnnReference.test.ts.
//
// Newton iteration (per batch row): from a guess traj, F_t = f(traj_{t-1}, x_t) (traj_{-1} = h0).
// Converged when every element has |F_t - traj_t| <= tolAbs + tolRel |traj_t|; this is checked before
// each step, and `iterations` counts the steps taken. A step solves d_t = J_t d_{t-1} + (F_t - traj_t),
// d_{-1} = 0, J_t = df/dh at traj_{t-1} (the full per-head Jacobian, or only the entries linking
// states of the same channel: 'diagonal'), and sets traj += d. With damping lambda > 0 (per-channel
// Jacobians only) d minimises sum_t |d_t - J_t d_{t-1} - r_t|^2 + lambda sum_t |d_t|^2, solved here
// as a dense linear system per channel (the normal equations).

import { fusedRnnRef, fusedRnnRefBackward, sigmoid, type Data } from './fusedRnn';

export type NewtonCell = 'gru-diag' | 'lstm-cifg-diag' | 'gru' | 'lstm' | 'elman';
export const NEWTON_GATES: Readonly<Record<NewtonCell, number>> = {
  'gru-diag': 3,
  'lstm-cifg-diag': 3,
  gru: 3,
  lstm: 4,
  elman: 1,
};
export const NEWTON_STATES: Readonly<Record<NewtonCell, number>> = {
  'gru-diag': 1,
  'lstm-cifg-diag': 2,
  gru: 1,
  lstm: 2,
  elman: 1,
};
export const isDiagonalCell = (c: NewtonCell): boolean => c === 'gru-diag' || c === 'lstm-cifg-diag';

export interface NewtonRefInputs {
  wx: Data;
  R: Data;
  b: Data;
  h0?: Data | null;
}
export interface NewtonRefDims {
  cell: NewtonCell;
  batch: number;
  T: number;
  heads: number;
  headDim: number;
}
export interface NewtonRefOutputs {
  y: Float64Array;
  finalStates: Float64Array;
  traj: Float64Array;
}
export interface NewtonRefGrads {
  dwx: Float64Array;
  dR: Float64Array;
  db: Float64Array;
  dh0: Float64Array;
}

interface Dims extends NewtonRefDims {
  G: number;
  S: number;
  N: number;
  D: number;
  H: number;
}

function dimsOf(who: string, i: NewtonRefInputs, d: NewtonRefDims): Dims {
  const { cell, batch, T, heads: H, headDim: D } = d;
  if (!(cell in NEWTON_GATES)) throw new Error(`${who}: unknown cell '${cell}'`);
  const G = NEWTON_GATES[cell],
    S = NEWTON_STATES[cell],
    N = H * D;
  const need = (name: string, a: Data | null | undefined, n: number) => {
    if (a && a.length !== n) throw new Error(`${who}: ${name} has ${a.length} elements, expected ${n}`);
  };
  need('wx', i.wx, batch * T * G * N);
  need('R', i.R, isDiagonalCell(cell) ? G * N : G * H * D * D);
  need('b', i.b, G * N);
  need('h0', i.h0, S * batch * N);
  return { ...d, G, S, N, D, H };
}

/** Recurrent weight linking h_{t-1}[head hh, channel k] to gate g of channel j of the same head. */
function rw(dm: Dims, R: Data, g: number, hh: number, k: number, j: number): number {
  if (isDiagonalCell(dm.cell)) return k === j ? R[g * dm.N + hh * dm.D + j] : 0;
  return R[((g * dm.H + hh) * dm.D + k) * dm.D + j];
}

/** Gate quantities of one channel at one step: everything the step, its Jacobian and its backward need. */
interface Gates {
  pre: Float64Array; // pre-activations (the GRU's n: wx_n + r (rec_n + b_n))
  rec: Float64Array; // rec_g (the GRU's n: rec_n + b_n)
}

function gates(
  dm: Dims,
  inp: NewtonRefInputs,
  b: number,
  t: number,
  hh: number,
  j: number,
  prevH: ArrayLike<number>,
  out: Gates,
): void {
  const { G, N, D, T } = dm;
  const gru = dm.cell === 'gru' || dm.cell === 'gru-diag';
  for (let g = 0; g < G; g++) {
    let rec = 0;
    for (let k = 0; k < D; k++) rec += prevH[k] * rw(dm, inp.R, g, hh, k, j);
    const n = hh * D + j,
      w = inp.wx[((b * T + t) * G + g) * N + n],
      bias = inp.b[g * N + n];
    if (gru && g === 2) {
      out.rec[g] = rec + bias;
      out.pre[g] = w; // completed below with r
    } else {
      out.rec[g] = rec;
      out.pre[g] = w + bias + rec;
    }
  }
  if (gru) out.pre[2] += sigmoid(out.pre[0]) * out.rec[2];
}

/**
 * One step of head hh of row b at time t: prev [S * D] (state s, channel j at s * D + j) -> next [S * D].
 * With jac ([(S D) x (S D)], row = next index, column = prev index) also the exact Jacobian.
 */
export function headStep(
  dm: Dims,
  inp: NewtonRefInputs,
  b: number,
  t: number,
  hh: number,
  prev: ArrayLike<number>,
  next: Float64Array,
  jac?: Float64Array,
): void {
  const { D, S } = dm;
  const SD = S * D;
  const gt: Gates = { pre: new Float64Array(4), rec: new Float64Array(4) };
  const prevH = Array.from({ length: D }, (_, k) => prev[k]);
  if (jac) jac.fill(0);
  for (let j = 0; j < D; j++) {
    gates(dm, inp, b, t, hh, j, prevH, gt);
    const p = gt.pre;
    // dpre[g][k]: d pre_g / d h_{t-1}[k]
    const dpre = (g: number, k: number) => rw(dm, inp.R, g, hh, k, j);
    switch (dm.cell) {
      case 'elman': {
        const h = Math.tanh(p[0]);
        next[j] = h;
        if (jac) for (let k = 0; k < D; k++) jac[j * SD + k] = (1 - h * h) * dpre(0, k);
        break;
      }
      case 'gru':
      case 'gru-diag': {
        const r = sigmoid(p[0]),
          z = sigmoid(p[1]),
          n = Math.tanh(p[2]);
        next[j] = (1 - z) * n + z * prev[j];
        if (jac) {
          for (let k = 0; k < D; k++) {
            const dn = (1 - n * n) * (r * dpre(2, k) + gt.rec[2] * r * (1 - r) * dpre(0, k));
            jac[j * SD + k] = (k === j ? z : 0) + (prev[j] - n) * z * (1 - z) * dpre(1, k) + (1 - z) * dn;
          }
        }
        break;
      }
      case 'lstm': {
        const ig = sigmoid(p[0]),
          fg = sigmoid(p[1]),
          zz = Math.tanh(p[2]),
          og = sigmoid(p[3]);
        const c = fg * prev[D + j] + ig * zz,
          tc = Math.tanh(c);
        next[j] = og * tc;
        next[D + j] = c;
        if (jac) {
          for (let k = 0; k < D; k++) {
            const dc =
              prev[D + j] * fg * (1 - fg) * dpre(1, k) +
              zz * ig * (1 - ig) * dpre(0, k) +
              ig * (1 - zz * zz) * dpre(2, k);
            jac[(D + j) * SD + k] = dc;
            jac[j * SD + k] = tc * og * (1 - og) * dpre(3, k) + og * (1 - tc * tc) * dc;
          }
          jac[(D + j) * SD + D + j] = fg;
          jac[j * SD + D + j] = og * (1 - tc * tc) * fg;
        }
        break;
      }
      case 'lstm-cifg-diag': {
        const fg = sigmoid(p[0]),
          zz = Math.tanh(p[1]),
          og = sigmoid(p[2]);
        const c = fg * prev[D + j] + (1 - fg) * zz,
          tc = Math.tanh(c);
        next[j] = og * tc;
        next[D + j] = c;
        if (jac) {
          for (let k = 0; k < D; k++) {
            const dc = (prev[D + j] - zz) * fg * (1 - fg) * dpre(0, k) + (1 - fg) * (1 - zz * zz) * dpre(1, k);
            jac[(D + j) * SD + k] = dc;
            jac[j * SD + k] = tc * og * (1 - og) * dpre(2, k) + og * (1 - tc * tc) * dc;
          }
          jac[(D + j) * SD + D + j] = fg;
          jac[j * SD + D + j] = og * (1 - tc * tc) * fg;
        }
        break;
      }
    }
  }
}

/** Copies head hh of time t of row b from a [batch, T, S, N] array (t = -1: from h0 [S, batch, N], or zeros). */
function loadHead(
  dm: Dims,
  traj: ArrayLike<number>,
  h0: Data | null | undefined,
  b: number,
  t: number,
  hh: number,
  out: Float64Array,
): void {
  const { S, N, D, T, batch } = dm;
  for (let s = 0; s < S; s++) {
    for (let j = 0; j < D; j++) {
      out[s * D + j] =
        t < 0 ? (h0 ? h0[(s * batch + b) * N + hh * D + j] : 0) : traj[((b * T + t) * S + s) * N + hh * D + j];
    }
  }
}
function storeHead(dm: Dims, traj: Float64Array, b: number, t: number, hh: number, v: ArrayLike<number>): void {
  const { S, N, D, T } = dm;
  for (let s = 0; s < S; s++) for (let j = 0; j < D; j++) traj[((b * T + t) * S + s) * N + hh * D + j] = v[s * D + j];
}

/** Sequential evaluation with the generic step (every cell). */
export function newtonRnnSequentialSteps(inputs: NewtonRefInputs, d: NewtonRefDims): Float64Array {
  const dm = dimsOf('newtonRnnSequentialSteps', inputs, d);
  const { batch, T, H, S, D, N } = dm;
  const traj = new Float64Array(batch * T * S * N);
  const prev = new Float64Array(S * D),
    next = new Float64Array(S * D);
  for (let b = 0; b < batch; b++) {
    for (let hh = 0; hh < H; hh++) {
      loadHead(dm, traj, inputs.h0, b, -1, hh, prev);
      for (let t = 0; t < T; t++) {
        headStep(dm, inputs, b, t, hh, prev, next);
        storeHead(dm, traj, b, t, hh, next);
        prev.set(next);
      }
    }
  }
  return traj;
}

function outputsOf(dm: Dims, traj: Float64Array, h0: Data | null | undefined): NewtonRefOutputs {
  const { batch, T, S, N } = dm;
  const y = new Float64Array(batch * T * N),
    finalStates = new Float64Array(S * batch * N);
  for (let b = 0; b < batch; b++) {
    for (let t = 0; t < T; t++) for (let n = 0; n < N; n++) y[(b * T + t) * N + n] = traj[(b * T + t) * S * N + n];
    for (let s = 0; s < S; s++) {
      for (let n = 0; n < N; n++) {
        finalStates[(s * batch + b) * N + n] =
          T > 0 ? traj[((b * T + T - 1) * S + s) * N + n] : h0 ? h0[(s * batch + b) * N + n] : 0;
      }
    }
  }
  return { y, finalStates, traj };
}

/** The exact answer: sequential evaluation (the dense cells through fusedRnnRef). */
export function newtonRnnRef(inputs: NewtonRefInputs, d: NewtonRefDims): NewtonRefOutputs {
  const dm = dimsOf('newtonRnnRef', inputs, d);
  const traj = newtonRnnSequentialSteps(inputs, d);
  if (isDiagonalCell(dm.cell)) return outputsOf(dm, traj, inputs.h0);
  const fused = fusedRnnRef(
    { wx: inputs.wx, R: inputs.R, b: inputs.b, states0: inputs.h0 ?? null },
    { cell: dm.cell as 'gru' | 'lstm' | 'elman', batch: dm.batch, seqlen: dm.T, heads: dm.H, headDim: dm.D },
  );
  // The fused oracle's y and final states; the trajectory of the generic step (checked against them).
  return { y: fused.h, finalStates: fused.finalStates, traj };
}

/**
 * Gradients of L = sum(dy * y) + sum(dFinal * finalStates) (either may be absent: zeros), by
 * backpropagation through time. dh0 is always returned (the gradient with respect to h0, zeros or not).
 */
export function newtonRnnRefBackward(
  inputs: NewtonRefInputs,
  d: NewtonRefDims,
  grads: { dy?: Data | null; dFinal?: Data | null },
): NewtonRefGrads {
  const dm = dimsOf('newtonRnnRefBackward', inputs, d);
  const { cell, batch, T, G, S, N, D, H } = dm;
  const h0 = inputs.h0 ?? new Float64Array(S * batch * N);
  if (!isDiagonalCell(cell)) {
    const r = fusedRnnRefBackward(
      { wx: inputs.wx, R: inputs.R, b: inputs.b, states0: h0 },
      { cell: cell as 'gru' | 'lstm' | 'elman', batch, seqlen: T, heads: H, headDim: D },
      { dh: grads.dy ?? null, dFinalStates: grads.dFinal ?? null },
    );
    return { dwx: r.dwx, dR: r.dR, db: r.db, dh0: r.dStates0! };
  }
  const traj = newtonRnnSequentialSteps({ ...inputs, h0 }, d);
  const out: NewtonRefGrads = {
    dwx: new Float64Array(batch * T * G * N),
    dR: new Float64Array(G * N),
    db: new Float64Array(G * N),
    dh0: new Float64Array(S * batch * N),
  };
  const dy = grads.dy,
    dFin = grads.dFinal;
  for (let b = 0; b < batch; b++) {
    for (let n = 0; n < N; n++) {
      // g[s]: dL / d(state s after the current step), flowing backwards.
      const g = [0, 0];
      for (let s = 0; s < S; s++) g[s] = dFin ? dFin[(s * batch + b) * N + n] : 0;
      for (let t = T - 1; t >= 0; t--) {
        if (dy) g[0] += dy[(b * T + t) * N + n];
        const pv = (s: number) => (t === 0 ? h0[(s * batch + b) * N + n] : traj[((b * T + t - 1) * S + s) * N + n]);
        const hp = pv(0);
        const wx = (gg: number) => inputs.wx[((b * T + t) * G + gg) * N + n];
        const R = (gg: number) => inputs.R[gg * N + n],
          bb = (gg: number) => inputs.b[gg * N + n];
        const dpre = [0, 0, 0];
        let dhp = 0,
          dcp = 0;
        if (cell === 'gru-diag') {
          const recN = R(2) * hp + bb(2);
          const r = sigmoid(wx(0) + bb(0) + R(0) * hp),
            z = sigmoid(wx(1) + bb(1) + R(1) * hp);
          const nn = Math.tanh(wx(2) + r * recN);
          const da = g[0] * (1 - z) * (1 - nn * nn);
          dpre[0] = da * recN * r * (1 - r);
          dpre[1] = g[0] * (hp - nn) * z * (1 - z);
          dpre[2] = da; // d wx_n
          const dRecN = da * r;
          out.db[2 * N + n] += dRecN;
          out.db[0 * N + n] += dpre[0];
          out.db[1 * N + n] += dpre[1];
          out.dR[0 * N + n] += dpre[0] * hp;
          out.dR[1 * N + n] += dpre[1] * hp;
          out.dR[2 * N + n] += dRecN * hp;
          dhp = g[0] * z + dpre[0] * R(0) + dpre[1] * R(1) + dRecN * R(2);
        } else {
          const cp = pv(1);
          const fg = sigmoid(wx(0) + bb(0) + R(0) * hp),
            zz = Math.tanh(wx(1) + bb(1) + R(1) * hp);
          const og = sigmoid(wx(2) + bb(2) + R(2) * hp);
          const c = fg * cp + (1 - fg) * zz,
            tc = Math.tanh(c);
          const gc = g[1] + g[0] * og * (1 - tc * tc);
          dpre[0] = gc * (cp - zz) * fg * (1 - fg);
          dpre[1] = gc * (1 - fg) * (1 - zz * zz);
          dpre[2] = g[0] * tc * og * (1 - og);
          for (let gg = 0; gg < 3; gg++) {
            out.db[gg * N + n] += dpre[gg];
            out.dR[gg * N + n] += dpre[gg] * hp;
          }
          dhp = dpre[0] * R(0) + dpre[1] * R(1) + dpre[2] * R(2);
          dcp = gc * fg;
        }
        for (let gg = 0; gg < G; gg++) out.dwx[((b * T + t) * G + gg) * N + n] = dpre[gg];
        g[0] = dhp;
        g[1] = dcp;
      }
      for (let s = 0; s < S; s++) out.dh0[(s * batch + b) * N + n] = g[s];
    }
  }
  return out;
}

export interface NewtonIterOptions {
  /** 'full': the exact per-head Jacobian; 'diagonal': only entries linking states of the same channel. */
  jacobian: 'full' | 'diagonal';
  maxIters: number;
  tolAbs: number;
  tolRel: number;
  damping?: number;
  /** 'zeros', 'one-step' (traj_t = f(h0, x_t)) or a trajectory [batch, T, S, N]. */
  guess?: 'zeros' | 'one-step' | Data;
}
export interface NewtonIterResult {
  traj: Float64Array;
  iterations: number[];
  converged: boolean[];
  /** Per row: the residual max |F_t - traj_t| before each step and after the last (iterations + 1 entries). */
  residuals: number[][];
}

/** Solves the dense system A x = rhs (n x n, row-major; overwritten) by Gaussian elimination with pivoting. */
function solveDense(A: Float64Array, rhs: Float64Array, n: number): Float64Array {
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(A[r * n + c]) > Math.abs(A[p * n + c])) p = r;
    if (p !== c) {
      for (let k = 0; k < n; k++) [A[c * n + k], A[p * n + k]] = [A[p * n + k], A[c * n + k]];
      [rhs[c], rhs[p]] = [rhs[p], rhs[c]];
    }
    for (let r = c + 1; r < n; r++) {
      const m = A[r * n + c] / A[c * n + c];
      if (m === 0) continue;
      for (let k = c; k < n; k++) A[r * n + k] -= m * A[c * n + k];
      rhs[r] -= m * rhs[c];
    }
  }
  const x = new Float64Array(n);
  for (let r = n - 1; r >= 0; r--) {
    let s = rhs[r];
    for (let k = r + 1; k < n; k++) s -= A[r * n + k] * x[k];
    x[r] = s / A[r * n + r];
  }
  return x;
}

/** The float64 Newton iteration of the contract (lock-step over each whole batch row). */
export function newtonRnnIterate(inputs: NewtonRefInputs, d: NewtonRefDims, o: NewtonIterOptions): NewtonIterResult {
  const dm = dimsOf('newtonRnnIterate', inputs, d);
  const { batch, T, H, S, D, N } = dm;
  const SD = S * D;
  const lambda = o.damping ?? 0;
  const full = o.jacobian === 'full' && !isDiagonalCell(dm.cell);
  if (lambda > 0 && full) throw new Error('newtonRnnIterate: damping needs per-channel Jacobians');
  const traj = new Float64Array(batch * T * S * N);
  const guess = o.guess ?? 'zeros';
  if (guess === 'one-step') {
    const prev = new Float64Array(SD),
      next = new Float64Array(SD);
    for (let b = 0; b < batch; b++) {
      for (let hh = 0; hh < H; hh++) {
        loadHead(dm, traj, inputs.h0, b, -1, hh, prev);
        for (let t = 0; t < T; t++) {
          headStep(dm, inputs, b, t, hh, prev, next);
          storeHead(dm, traj, b, t, hh, next);
        }
      }
    }
  } else if (guess !== 'zeros') {
    traj.set(Array.from(guess));
  }
  const res: NewtonIterResult = { traj, iterations: [], converged: [], residuals: [] };
  const F = new Float64Array(T * H * SD),
    J = new Float64Array(T * H * SD * SD);
  const prev = new Float64Array(SD),
    cur = new Float64Array(SD);
  for (let b = 0; b < batch; b++) {
    const hist: number[] = [];
    let it = 0,
      conv = false;
    for (;;) {
      // F_t and J_t at the current trajectory, and the check.
      let resid = 0;
      conv = true;
      for (let hh = 0; hh < H; hh++) {
        for (let t = 0; t < T; t++) {
          loadHead(dm, traj, inputs.h0, b, t - 1, hh, prev);
          const off = (t * H + hh) * SD;
          headStep(dm, inputs, b, t, hh, prev, F.subarray(off, off + SD), J.subarray(off * SD, (off + SD) * SD));
          loadHead(dm, traj, inputs.h0, b, t, hh, cur);
          for (let i = 0; i < SD; i++) {
            const e = Math.abs(F[off + i] - cur[i]);
            resid = Math.max(resid, e);
            if (!(e <= o.tolAbs + o.tolRel * Math.abs(cur[i]))) conv = false;
          }
        }
      }
      hist.push(resid);
      if (conv || it === o.maxIters) break;
      it++;
      for (let hh = 0; hh < H; hh++) {
        // Keep only the same-channel entries for the per-channel variant.
        const Jt = (t: number, r: number, c: number) => {
          if (!full && r % D !== c % D) return 0;
          return J[((t * H + hh) * SD + r) * SD + c];
        };
        const r = (t: number, i: number) => {
          loadHead(dm, traj, inputs.h0, b, t, hh, cur);
          return F[(t * H + hh) * SD + i] - cur[i];
        };
        const delta = new Float64Array(T * SD);
        if (lambda === 0) {
          const dprev = new Float64Array(SD);
          for (let t = 0; t < T; t++) {
            for (let i = 0; i < SD; i++) {
              let s = r(t, i);
              for (let k = 0; k < SD; k++) s += Jt(t, i, k) * dprev[k];
              delta[t * SD + i] = s;
            }
            dprev.set(delta.subarray(t * SD, (t + 1) * SD));
          }
        } else {
          // Per channel j: unknowns d_t[s] (index t * S + s); normal equations of
          // sum_t |d_t - J_t d_{t-1} - r_t|^2 + lambda |d_t|^2.
          for (let j = 0; j < D; j++) {
            const n = T * S;
            const A = new Float64Array(n * n),
              rhs = new Float64Array(n);
            const jt = (t: number, s: number, q: number) => Jt(t, s * D + j, q * D + j);
            // residual rows e_t = d_t - J_t d_{t-1} - r_t: add e^T e to the quadratic form.
            for (let t = 0; t < T; t++) {
              for (let s = 0; s < S; s++) {
                // row coefficients: +1 at (t, s), -J_t[s][q] at (t - 1, q)
                const cols: [number, number][] = [[t * S + s, 1]];
                if (t > 0) for (let q = 0; q < S; q++) cols.push([(t - 1) * S + q, -jt(t, s, q)]);
                const rv = r(t, s * D + j);
                for (const [c1, v1] of cols) {
                  rhs[c1] += v1 * rv;
                  for (const [c2, v2] of cols) A[c1 * n + c2] += v1 * v2;
                }
              }
            }
            for (let i = 0; i < n; i++) A[i * n + i] += lambda;
            const x = solveDense(A, rhs, n);
            for (let t = 0; t < T; t++) for (let s = 0; s < S; s++) delta[t * SD + s * D + j] = x[t * S + s];
          }
        }
        for (let t = 0; t < T; t++) {
          loadHead(dm, traj, inputs.h0, b, t, hh, cur);
          for (let i = 0; i < SD; i++) cur[i] += delta[t * SD + i];
          storeHead(dm, traj, b, t, hh, cur);
        }
      }
    }
    res.iterations.push(it);
    res.converged.push(conv);
    res.residuals.push(hist);
  }
  return res;
}
