// The fused-RNN-cell oracle checked on its own: hand-computed one-step cases per cell, its backward
// against central finite differences for every input over every cell and many configurations, heads
// against separate and dense (PyTorch-form) computations, lengths and returnLastOnly against plain
// runs, and the sLSTM stabiliser.
import { describe, expect, it } from 'vitest';
import {
  FUSED_RNN_GATES,
  FUSED_RNN_STATES,
  fusedRnnRef,
  fusedRnnRefBackward,
  logsigmoid,
  sigmoid,
  type FusedRnnCell,
  type FusedRnnRefInputs,
  type FusedRnnRefOptions,
} from './reference/fusedRnn';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

const CELLS: FusedRnnCell[] = ['lstm', 'gru', 'slstm', 'elman'];

interface Config {
  cell: FusedRnnCell;
  batch: number;
  seqlen: number;
  heads: number;
  headDim: number;
  lengths?: number[] | null;
  states0?: boolean;
  returnLastOnly?: boolean;
}

interface Problem {
  inputs: FusedRnnRefInputs;
  options: FusedRnnRefOptions;
}

/** Random initial states; the sLSTM's normaliser n stays positive, as it does in any run. */
function randomStates(cell: FusedRnnCell, batch: number, H: number, D: number): Float64Array {
  const S = FUSED_RNN_STATES[cell],
    per = batch * H * D;
  const s = normal(rand, S * per);
  if (cell === 'slstm') s.set(uniform(rand, per, 0.5, 2), 2 * per);
  return s;
}

function makeProblem(c: Config): Problem {
  const G = FUSED_RNN_GATES[c.cell],
    { batch, seqlen: T, heads: H, headDim: D } = c;
  const inputs: FusedRnnRefInputs = {
    wx: normal(rand, batch * T * G * H * D),
    R: normal(rand, G * H * D * D, 0.6),
    b: normal(rand, G * H * D, 0.5),
    states0: c.states0 ? randomStates(c.cell, batch, H, D) : null,
  };
  const options: FusedRnnRefOptions = {
    cell: c.cell,
    batch,
    seqlen: T,
    heads: H,
    headDim: D,
    lengths: c.lengths ?? null,
    returnLastOnly: c.returnLastOnly ?? false,
  };
  return { inputs, options };
}

function describeConfig(c: Config): string {
  return (
    `${c.cell} heads ${c.heads} headDim ${c.headDim} T ${c.seqlen} lengths ${c.lengths ? `[${c.lengths}]` : 'full'}` +
    `${c.states0 ? ' states0' : ''}${c.returnLastOnly ? ' lastOnly' : ''}`
  );
}

const configs: Config[] = [];
for (const cell of CELLS) {
  for (const heads of [1, 3]) {
    for (const headDim of [1, 4]) {
      for (const [seqlen, lengths] of [
        [1, null],
        [1, [1, 0]],
        [5, null],
        [5, [5, 2]],
        [5, [0, 3]],
      ] as const) {
        for (const states0 of [false, true]) {
          configs.push({ cell, batch: 2, seqlen, heads, headDim, lengths: lengths ? [...lengths] : null, states0 });
        }
      }
    }
  }
  configs.push({
    cell,
    batch: 2,
    seqlen: 5,
    heads: 3,
    headDim: 4,
    lengths: [5, 2],
    states0: true,
    returnLastOnly: true,
  });
  configs.push({ cell, batch: 2, seqlen: 5, heads: 3, headDim: 4, lengths: [0, 4], returnLastOnly: true });
}

/** The oracle's gradients against central differences of L = sum(wh * h) + sum(wf * finalStates). */
function checkAgainstFd(p: Problem, wh: Float64Array | null, wf: Float64Array | null, what: string, tol = 1e-6): void {
  const names: (keyof FusedRnnRefInputs)[] = p.inputs.states0 ? ['wx', 'R', 'b', 'states0'] : ['wx', 'R', 'b'];
  const arrays = names.map((n) => Float64Array.from(p.inputs[n]!));
  const loss = (xs: Float64Array[]) => {
    const [wx, R, b, states0] = xs;
    const r = fusedRnnRef({ wx, R, b, states0: states0 ?? null }, p.options);
    return (wh ? dot(wh, r.h) : 0) + (wf ? dot(wf, r.finalStates) : 0);
  };
  const fd = finiteDifferences(loss, arrays, 1e-5);
  const g = fusedRnnRefBackward(p.inputs, p.options, { dh: wh, dFinalStates: wf });
  const ours = [g.dwx, g.dR, g.db, g.dStates0];
  names.forEach((name, k) => {
    expect(ours[k], `${name} ${what} ${at}`).not.toBeNull();
    expect(relErr(ours[k]!, fd[k]), `grad ${name} ${what} ${at}`).toBeLessThan(tol);
  });
  if (!p.inputs.states0) expect(g.dStates0).toBeNull();
}

function hLength(o: FusedRnnRefOptions): number {
  return o.returnLastOnly ? o.batch * o.heads * o.headDim : o.batch * o.seqlen * o.heads * o.headDim;
}

function stateLength(o: FusedRnnRefOptions): number {
  return FUSED_RNN_STATES[o.cell] * o.batch * o.heads * o.headDim;
}

describe('fused RNN oracle: hand-computed one-step cases', () => {
  // batch 1, T 1, one head of headDim 2, h_{-1} = [1, 0], so rec_g[j] = R[g][0][0][j] (row 0 of R;
  // row 1 holds [7, -7], which R's transpose would read instead). Gates other than the GRU's n use
  // b = [0.5, 0.25] and R row 0 = [-0.5, -0.25], so pre = wx.
  const ln2 = Math.LN2,
    ln3 = Math.log(3);
  const opts = (cell: FusedRnnCell): FusedRnnRefOptions => ({ cell, batch: 1, seqlen: 1, heads: 1, headDim: 2 });
  const plainR = [-0.5, -0.25, 7, -7],
    plainB = [0.5, 0.25];
  const tight = 1e-14;

  it('lstm: gates (i, f, z, o), c = sig(f) c + sig(i) tanh(z), h = sig(o) tanh(c)', () => {
    // j = 0: sig(i) = 3/4, sig(f) = 1/2, tanh(z) = 3/5, sig(o) = 3/4, c_{-1} = 2:  c = 1 + 9/20 = 29/20
    // j = 1: sig(i) = 1/4, sig(f) = 3/4, tanh(z) = 4/5, sig(o) = 1/2, c_{-1} = -1: c = -3/4 + 1/5 = -11/20
    const inputs: FusedRnnRefInputs = {
      wx: [ln3, -ln3, 0, ln3, ln2, ln3, ln3, 0],
      R: [...plainR, ...plainR, ...plainR, ...plainR],
      b: [...plainB, ...plainB, ...plainB, ...plainB],
      states0: [1, 0, 2, -1],
    };
    const r = fusedRnnRef(inputs, opts('lstm'));
    const h = [0.75 * Math.tanh(29 / 20), 0.5 * Math.tanh(-11 / 20)];
    expect(relErr(r.h, h)).toBeLessThan(tight);
    expect(relErr(r.finalStates, [...h, 29 / 20, -11 / 20])).toBeLessThan(tight);
  });

  it('gru: gates (r, z, n), n = tanh(wx_n + r (rec_n + b_n)), h = (1 - z) n + z h_{-1}', () => {
    // j = 0: r = 3/4, z = 1/2, wx_n = 0, rec_n + b_n = 0.25 + 0.5: n = tanh(9/16), h = n / 2 + 1 / 2
    //        (b_n outside the r gate would give tanh(0.5 + 3/16))
    // j = 1: r = 1/4, z = 3/4, wx_n = 1, rec_n + b_n = 2 + 2:       n = tanh(2),    h = n / 4 + 0
    const inputs: FusedRnnRefInputs = {
      wx: [ln3, -ln3, 0, ln3, 0, 1],
      R: [...plainR, ...plainR, 0.25, 2, 7, -7],
      b: [...plainB, ...plainB, 0.5, 2],
      states0: [1, 0],
    };
    const r = fusedRnnRef(inputs, opts('gru'));
    const h = [Math.tanh(9 / 16) / 2 + 0.5, Math.tanh(2) / 4];
    expect(relErr(r.h, h)).toBeLessThan(tight);
    expect(relErr(r.finalStates, h)).toBeLessThan(tight);
  });

  it('slstm: gates (i, f, z, o), states (h, c, n, m), both branches of the stabiliser', () => {
    // i~ = 0, f~ = logsigmoid(ln 3) = ln(3/4) for both channels.
    // j = 0: m_{-1} = 0:    m = max(ln 3/4, 0) = 0,      i' = 1,   f' = 3/4; tanh(z) = 3/5, sig(o) = 3/4,
    //        c_{-1} = 2, n_{-1} = 1:  c = 3/2 + 3/5 = 21/10, n = 7/4, h = 3/4 * 6/5 = 9/10
    // j = 1: m_{-1} = ln 4: m = max(ln 3, 0) = ln 3,     i' = 1/3, f' = 1;   tanh(z) = 4/5, sig(o) = 1/2,
    //        c_{-1} = -1, n_{-1} = 2: c = -1 + 4/15 = -11/15, n = 7/3, h = 1/2 * -11/35 = -11/70
    const inputs: FusedRnnRefInputs = {
      wx: [0, 0, ln3, ln3, ln2, ln3, ln3, 0],
      R: [...plainR, ...plainR, ...plainR, ...plainR],
      b: [...plainB, ...plainB, ...plainB, ...plainB],
      states0: [1, 0, 2, -1, 1, 2, 0, Math.log(4)],
    };
    const r = fusedRnnRef(inputs, opts('slstm'));
    expect(relErr(r.h, [9 / 10, -11 / 70])).toBeLessThan(tight);
    expect(relErr(r.finalStates, [9 / 10, -11 / 70, 21 / 10, -11 / 15, 7 / 4, 7 / 3, 0, ln3])).toBeLessThan(tight);
  });

  it('slstm from an empty (zero) state: m = i~, n = 1, c = tanh(z), whatever f~', () => {
    // h_{-1} = 0 and b = 0, so pre = wx: i~ = [-5, 5], f~ = ln(3/4), tanh(z) = [3/5, 4/5],
    // sig(o) = [3/4, 1/2]: h = [9/20, 2/5].
    const inputs: FusedRnnRefInputs = {
      wx: [-5, 5, ln3, ln3, ln2, ln3, ln3, 0],
      R: [...plainR, ...plainR, ...plainR, ...plainR],
      b: new Float64Array(8),
    };
    const r = fusedRnnRef(inputs, opts('slstm'));
    expect(relErr(r.h, [9 / 20, 2 / 5])).toBeLessThan(tight);
    expect(relErr(r.finalStates, [9 / 20, 2 / 5, 3 / 5, 4 / 5, 1, 1, -5, 5])).toBeLessThan(tight);
    // Empty is per channel (n_{-1} == 0); a non-empty channel takes the max: max(ln 3/4 + 0, -5) = ln 3/4.
    const s = fusedRnnRef({ ...inputs, states0: [0, 0, 0, 0, 0, 1, 0, 0] }, opts('slstm'));
    expect(relErr(s.finalStates.subarray(6), [-5, 5])).toBeLessThan(tight);
    const t = fusedRnnRef({ ...inputs, states0: [0, 0, 0, 0, 1, 0, 0, 0] }, opts('slstm'));
    expect(relErr(t.finalStates.subarray(6), [Math.log(0.75), 5])).toBeLessThan(tight);
  });

  it('elman: h = tanh(pre), and its gradients', () => {
    // pre = [ln 2, -ln 3]: h = [3/5, -4/5], tanh' = [16/25, 9/25].
    const inputs: FusedRnnRefInputs = { wx: [ln2, -ln3], R: plainR, b: plainB, states0: [1, 0] };
    const r = fusedRnnRef(inputs, opts('elman'));
    expect(relErr(r.h, [3 / 5, -4 / 5])).toBeLessThan(tight);
    expect(relErr(r.finalStates, [3 / 5, -4 / 5])).toBeLessThan(tight);
    // dh = [1, 0]: dpre = [16/25, 0]; dR[i][j] = h_{-1}[i] dpre[j]; dh_{-1}[i] = sum_j R[i][j] dpre[j].
    const g0 = fusedRnnRefBackward(inputs, opts('elman'), { dh: [1, 0] });
    expect(relErr(g0.dwx, [16 / 25, 0])).toBeLessThan(tight);
    expect(relErr(g0.db, [16 / 25, 0])).toBeLessThan(tight);
    expect(relErr(g0.dR, [16 / 25, 0, 0, 0])).toBeLessThan(tight);
    expect(relErr(g0.dStates0!, [(-0.5 * 16) / 25, (7 * 16) / 25])).toBeLessThan(tight);
    // dFinalStates = [0, 1] is the same as dh = [0, 1] here (T = 1): dpre = [0, 9/25].
    const g1 = fusedRnnRefBackward(inputs, opts('elman'), { dFinalStates: [0, 1] });
    expect(relErr(g1.dR, [0, 9 / 25, 0, 0])).toBeLessThan(tight);
    expect(relErr(g1.dStates0!, [(-0.25 * 9) / 25, (-7 * 9) / 25])).toBeLessThan(tight);
  });

  it('no states0: every state starts at zero (sLSTM m too), and dStates0 is null', () => {
    for (const cell of CELLS) {
      const G = FUSED_RNN_GATES[cell],
        S = FUSED_RNN_STATES[cell];
      const inputs: FusedRnnRefInputs = { wx: normal(rand, G * 2), R: normal(rand, G * 4), b: normal(rand, G * 2) };
      const a = fusedRnnRef(inputs, opts(cell));
      const z = fusedRnnRef({ ...inputs, states0: new Float64Array(S * 2) }, opts(cell));
      expect(Array.from(a.finalStates), cell).toEqual(Array.from(z.finalStates));
      expect(fusedRnnRefBackward(inputs, opts(cell), { dh: [1, 1] }).dStates0, cell).toBeNull();
    }
  });
});

describe('fused RNN oracle: backward equals finite differences', () => {
  it.each(configs.map((c) => [describeConfig(c), c] as const))('%s', (name, c) => {
    const p = makeProblem(c);
    checkAgainstFd(
      p,
      normal(rand, hLength(p.options)),
      normal(rand, stateLength(p.options)),
      `${name}, dh and dFinalStates`,
    );
  });

  it.each(CELLS)('%s from dh alone and from dFinalStates alone', (cell) => {
    const p = makeProblem({ cell, batch: 2, seqlen: 5, heads: 3, headDim: 4, lengths: [5, 2], states0: true });
    checkAgainstFd(p, normal(rand, hLength(p.options)), null, `${cell} dh only`);
    checkAgainstFd(p, null, normal(rand, stateLength(p.options)), `${cell} dFinalStates only`);
  });
});

describe('fused RNN oracle: heads', () => {
  /** Slices head hh out of an [outer, H, inner] array. */
  function headSlice(x: ArrayLike<number>, outer: number, H: number, inner: number, hh: number): Float64Array {
    const out = new Float64Array(outer * inner);
    for (let o = 0; o < outer; o++) for (let k = 0; k < inner; k++) out[o * inner + k] = x[(o * H + hh) * inner + k];
    return out;
  }

  it.each(CELLS)('%s: each of 3 heads equals a 1-head run on its slice (outputs and gradients)', (cell) => {
    const G = FUSED_RNN_GATES[cell],
      S = FUSED_RNN_STATES[cell];
    const batch = 2,
      T = 5,
      H = 3,
      D = 3;
    const p = makeProblem({ cell, batch, seqlen: T, heads: H, headDim: D, lengths: [5, 2], states0: true });
    const dh = normal(rand, batch * T * H * D),
      dFin = normal(rand, S * batch * H * D);
    const r = fusedRnnRef(p.inputs, p.options);
    const g = fusedRnnRefBackward(p.inputs, p.options, { dh, dFinalStates: dFin });
    for (let hh = 0; hh < H; hh++) {
      const inputs: FusedRnnRefInputs = {
        wx: headSlice(p.inputs.wx, batch * T * G, H, D, hh),
        R: headSlice(p.inputs.R, G, H, D * D, hh),
        b: headSlice(p.inputs.b, G, H, D, hh),
        states0: headSlice(p.inputs.states0!, S * batch, H, D, hh),
      };
      const options = { ...p.options, heads: 1 };
      const one = fusedRnnRef(inputs, options);
      const what = `${cell} head ${hh} ${at}`;
      expect(relErr(one.h, headSlice(r.h, batch * T, H, D, hh)), what).toBe(0);
      expect(relErr(one.finalStates, headSlice(r.finalStates, S * batch, H, D, hh)), what).toBe(0);
      const go = fusedRnnRefBackward(inputs, options, {
        dh: headSlice(dh, batch * T, H, D, hh),
        dFinalStates: headSlice(dFin, S * batch, H, D, hh),
      });
      expect(relErr(go.dwx, headSlice(g.dwx, batch * T * G, H, D, hh)), what).toBe(0);
      expect(relErr(go.dR, headSlice(g.dR, G, H, D * D, hh)), what).toBe(0);
      expect(relErr(go.db, headSlice(g.db, G, H, D, hh)), what).toBe(0);
      expect(relErr(go.dStates0!, headSlice(g.dStates0!, S * batch, H, D, hh)), what).toBe(0);
    }
  });

  it.each(CELLS)('%s: 3 heads of 2 equal 1 head of 6 with a block-diagonal R', (cell) => {
    // wx, b, states0 and h have the same flat layout either way ([.., H, D] == [.., 1, H * D]).
    const G = FUSED_RNN_GATES[cell],
      S = FUSED_RNN_STATES[cell];
    const batch = 2,
      T = 4,
      H = 3,
      D = 2,
      W = H * D;
    const p = makeProblem({ cell, batch, seqlen: T, heads: H, headDim: D, lengths: [4, 3], states0: true });
    const dense = new Float64Array(G * W * W);
    for (let g = 0; g < G; g++) {
      for (let hh = 0; hh < H; hh++) {
        for (let i = 0; i < D; i++) {
          for (let j = 0; j < D; j++)
            dense[(g * W + hh * D + i) * W + hh * D + j] = p.inputs.R[((g * H + hh) * D + i) * D + j];
        }
      }
    }
    const dOpts = { ...p.options, heads: 1, headDim: W },
      dIn = { ...p.inputs, R: dense };
    const a = fusedRnnRef(p.inputs, p.options),
      d = fusedRnnRef(dIn, dOpts);
    expect(relErr(d.h, a.h), at).toBeLessThan(1e-15);
    expect(relErr(d.finalStates, a.finalStates), at).toBeLessThan(1e-15);
    const dh = normal(rand, batch * T * W),
      dFin = normal(rand, S * batch * W);
    const ga = fusedRnnRefBackward(p.inputs, p.options, { dh, dFinalStates: dFin });
    const gd = fusedRnnRefBackward(dIn, dOpts, { dh, dFinalStates: dFin });
    expect(relErr(gd.dwx, ga.dwx), at).toBeLessThan(1e-14);
    expect(relErr(gd.db, ga.db), at).toBeLessThan(1e-14);
    expect(relErr(gd.dStates0!, ga.dStates0!), at).toBeLessThan(1e-14);
    const diag = new Float64Array(G * H * D * D);
    for (let g = 0; g < G; g++) {
      for (let hh = 0; hh < H; hh++) {
        for (let i = 0; i < D; i++) {
          for (let j = 0; j < D; j++)
            diag[((g * H + hh) * D + i) * D + j] = gd.dR[(g * W + hh * D + i) * W + hh * D + j];
        }
      }
    }
    expect(relErr(diag, ga.dR), at).toBeLessThan(1e-14);
  });

  /**
   * One head written the PyTorch way: W_hh [G * D, D] (rows: gate-major outputs), x_t = W_ih x + ... given
   * per step as [G * D], separate input and recurrent biases; states as plain vectors.
   */
  function denseRun(
    cell: FusedRnnCell,
    D: number,
    T: number,
    xs: Float64Array,
    bih: Float64Array,
    bhh: Float64Array,
    Whh: Float64Array,
    s0: Float64Array[],
  ): { hs: Float64Array; states: Float64Array[] } {
    const G = FUSED_RNN_GATES[cell];
    let [h, c, n, m] = s0.map((s) => Float64Array.from(s));
    const hs = new Float64Array(T * D);
    for (let t = 0; t < T; t++) {
      const gi = new Float64Array(G * D),
        gh = new Float64Array(G * D);
      for (let row = 0; row < G * D; row++) {
        gi[row] = xs[t * G * D + row] + bih[row];
        let acc = bhh[row];
        for (let k = 0; k < D; k++) acc += Whh[row * D + k] * h[k];
        gh[row] = acc;
      }
      const pre = (g: number, j: number) => gi[g * D + j] + gh[g * D + j];
      const hn = new Float64Array(D);
      if (cell === 'elman') {
        for (let j = 0; j < D; j++) hn[j] = Math.tanh(pre(0, j));
      } else if (cell === 'lstm') {
        const cn = new Float64Array(D);
        for (let j = 0; j < D; j++) {
          cn[j] = sigmoid(pre(1, j)) * c[j] + sigmoid(pre(0, j)) * Math.tanh(pre(2, j));
          hn[j] = sigmoid(pre(3, j)) * Math.tanh(cn[j]);
        }
        c = cn;
      } else if (cell === 'gru') {
        for (let j = 0; j < D; j++) {
          const r = sigmoid(pre(0, j)),
            z = sigmoid(pre(1, j));
          const nn = Math.tanh(gi[2 * D + j] + r * gh[2 * D + j]);
          hn[j] = (1 - z) * nn + z * h[j];
        }
      } else {
        const cn = new Float64Array(D),
          nn = new Float64Array(D),
          mn = new Float64Array(D);
        for (let j = 0; j < D; j++) {
          const logI = pre(0, j),
            logF = Math.log(sigmoid(pre(1, j)));
          mn[j] = Math.max(logF + m[j], logI);
          const ig = Math.exp(logI - mn[j]),
            fg = Math.exp(logF + m[j] - mn[j]);
          cn[j] = fg * c[j] + ig * Math.tanh(pre(2, j));
          nn[j] = fg * n[j] + ig;
          hn[j] = (sigmoid(pre(3, j)) * cn[j]) / nn[j];
        }
        c = cn;
        n = nn;
        m = mn;
      }
      h = hn;
      hs.set(h, t * D);
    }
    return { hs, states: [h, c, n, m].slice(0, s0.length) };
  }

  it.each(CELLS)('%s: one head equals a dense PyTorch-form computation (h @ R == W_hh h, GRU biases)', (cell) => {
    const G = FUSED_RNN_GATES[cell],
      S = FUSED_RNN_STATES[cell];
    const batch = 2,
      T = 5,
      D = 4;
    const Whh = normal(rand, G * D * D, 0.6),
      bih = normal(rand, G * D, 0.5),
      bhh = normal(rand, G * D, 0.5);
    const xs = normal(rand, batch * T * G * D);
    const states0 = randomStates(cell, batch, 1, D);
    // wx = W_ih x + b_ih, b = b_hh, R[g][0][i][j] = W_hh[g * D + j][i].
    const wx = new Float64Array(batch * T * G * D);
    for (let k = 0; k < wx.length; k++) wx[k] = xs[k] + bih[k % (G * D)];
    const R = new Float64Array(G * D * D);
    for (let g = 0; g < G; g++)
      for (let i = 0; i < D; i++) for (let j = 0; j < D; j++) R[(g * D + i) * D + j] = Whh[(g * D + j) * D + i];
    const r = fusedRnnRef({ wx, R, b: bhh, states0 }, { cell, batch, seqlen: T, heads: 1, headDim: D });
    for (let b = 0; b < batch; b++) {
      const s0 = Array.from({ length: S }, (_, s) => states0.slice((s * batch + b) * D, (s * batch + b + 1) * D));
      const ref = denseRun(cell, D, T, xs.subarray(b * T * G * D, (b + 1) * T * G * D), bih, bhh, Whh, s0);
      expect(relErr(r.h.subarray(b * T * D, (b + 1) * T * D), ref.hs), `${cell} row ${b} ${at}`).toBeLessThan(1e-14);
      for (let s = 0; s < S; s++) {
        expect(
          relErr(r.finalStates.subarray((s * batch + b) * D, (s * batch + b + 1) * D), ref.states[s]),
          `${cell} state ${s} ${at}`,
        ).toBeLessThan(1e-14);
      }
    }
  });
});

describe('fused RNN oracle: lengths and returnLastOnly', () => {
  it.each(CELLS)('%s: a row of length L equals a run of seqlen L; h and gradients are 0 past it', (cell) => {
    const G = FUSED_RNN_GATES[cell],
      S = FUSED_RNN_STATES[cell];
    const batch = 3,
      T = 5,
      H = 2,
      D = 3,
      lengths = [5, 2, 0],
      HD = H * D;
    const p = makeProblem({ cell, batch, seqlen: T, heads: H, headDim: D, lengths, states0: true });
    const dh = normal(rand, batch * T * HD),
      dFin = normal(rand, S * batch * HD);
    const r = fusedRnnRef(p.inputs, p.options);
    const g = fusedRnnRefBackward(p.inputs, p.options, { dh, dFinalStates: dFin });
    // Gradients do not depend on dh past the lengths.
    const dhMasked = Float64Array.from(dh);
    for (let b = 0; b < batch; b++)
      for (let t = lengths[b]; t < T; t++) dhMasked.fill(0, (b * T + t) * HD, (b * T + t + 1) * HD);
    const gm = fusedRnnRefBackward(p.inputs, p.options, { dh: dhMasked, dFinalStates: dFin });
    for (const k of ['dwx', 'dR', 'db', 'dStates0'] as const) expect(relErr(gm[k]!, g[k]!), `${cell} ${k}`).toBe(0);
    const stateRow = (x: ArrayLike<number>, b: number) => {
      const out = new Float64Array(S * HD);
      for (let s = 0; s < S; s++) for (let k = 0; k < HD; k++) out[s * HD + k] = x[(s * batch + b) * HD + k];
      return out;
    };
    for (let b = 0; b < batch; b++) {
      const L = lengths[b],
        what = `${cell} row ${b} ${at}`;
      for (let k = L * HD; k < T * HD; k++) expect(r.h[b * T * HD + k], what).toBe(0);
      for (let k = L * G * HD; k < T * G * HD; k++) expect(g.dwx[b * T * G * HD + k], what).toBe(0);
      if (L === 0) {
        expect(Array.from(stateRow(r.finalStates, b)), what).toEqual(Array.from(stateRow(p.inputs.states0!, b)));
        expect(Array.from(stateRow(g.dStates0!, b)), what).toEqual(Array.from(stateRow(dFin, b)));
        continue;
      }
      const inputs: FusedRnnRefInputs = {
        ...p.inputs,
        wx: (p.inputs.wx as Float64Array).slice(b * T * G * HD, (b * T + L) * G * HD),
        states0: stateRow(p.inputs.states0!, b),
      };
      const options: FusedRnnRefOptions = { ...p.options, batch: 1, seqlen: L, lengths: null };
      const one = fusedRnnRef(inputs, options);
      expect(relErr(r.h.subarray(b * T * HD, (b * T + L) * HD), one.h), what).toBe(0);
      expect(relErr(stateRow(r.finalStates, b), one.finalStates), what).toBe(0);
      const go = fusedRnnRefBackward(inputs, options, {
        dh: dh.subarray(b * T * HD, (b * T + L) * HD),
        dFinalStates: stateRow(dFin, b),
      });
      expect(relErr(g.dwx.subarray(b * T * G * HD, (b * T + L) * G * HD), go.dwx), what).toBe(0);
      expect(relErr(stateRow(g.dStates0!, b), go.dStates0!), what).toBe(0);
    }
  });

  it.each(CELLS)('%s: returnLastOnly gives the final h state; its dh acts as dFinalStates[0]', (cell) => {
    const S = FUSED_RNN_STATES[cell];
    const batch = 3,
      T = 4,
      H = 2,
      D = 2,
      HD = H * D;
    for (const states0 of [false, true]) {
      const p = makeProblem({ cell, batch, seqlen: T, heads: H, headDim: D, lengths: [4, 1, 0], states0 });
      const full = fusedRnnRef(p.inputs, p.options);
      const last = fusedRnnRef(p.inputs, { ...p.options, returnLastOnly: true });
      expect(Array.from(last.h)).toEqual(Array.from(full.finalStates.subarray(0, batch * HD)));
      expect(Array.from(last.finalStates)).toEqual(Array.from(full.finalStates));
      // Row 0 runs all T steps: its last h is h at T - 1.
      expect(Array.from(last.h.subarray(0, HD))).toEqual(Array.from(full.h.subarray((T - 1) * HD, T * HD)));
      const dh = normal(rand, batch * HD),
        dFin = normal(rand, S * batch * HD);
      const gl = fusedRnnRefBackward(p.inputs, { ...p.options, returnLastOnly: true }, { dh, dFinalStates: dFin });
      const dFin2 = Float64Array.from(dFin);
      for (let k = 0; k < batch * HD; k++) dFin2[k] += dh[k];
      const gf = fusedRnnRefBackward(p.inputs, p.options, { dFinalStates: dFin2 });
      for (const k of ['dwx', 'dR', 'db', 'dStates0'] as const) {
        if (gl[k] === null) expect(gf[k], `${cell} ${k}`).toBeNull();
        else expect(relErr(gl[k]!, gf[k]!), `${cell} ${k} ${at}`).toBe(0);
      }
    }
  });
});

describe('fused RNN oracle: sLSTM stabiliser', () => {
  const batch = 2,
    T = 6,
    H = 2,
    D = 3,
    HD = H * D,
    G = 4;

  /** The unstabilised sLSTM from zero states: C = sig(f) C + exp(i) tanh(z), N = sig(f) N + exp(i). */
  function unstabilised(p: Problem): { h: Float64Array; C: Float64Array; N: Float64Array } {
    const { wx, R, b } = p.inputs;
    const h = new Float64Array(batch * T * HD),
      C = new Float64Array(batch * HD),
      N = new Float64Array(batch * HD);
    for (let bb = 0; bb < batch; bb++) {
      for (let hh = 0; hh < H; hh++) {
        let hp = new Float64Array(D);
        const c = new Float64Array(D),
          n = new Float64Array(D);
        for (let t = 0; t < T; t++) {
          const hn = new Float64Array(D);
          for (let j = 0; j < D; j++) {
            const pre = [0, 1, 2, 3].map((g) => {
              let acc = wx[(((bb * T + t) * G + g) * H + hh) * D + j] + b[(g * H + hh) * D + j];
              for (let k = 0; k < D; k++) acc += hp[k] * R[((g * H + hh) * D + k) * D + j];
              return acc;
            });
            c[j] = sigmoid(pre[1]) * c[j] + Math.exp(pre[0]) * Math.tanh(pre[2]);
            n[j] = sigmoid(pre[1]) * n[j] + Math.exp(pre[0]);
            hn[j] = (sigmoid(pre[3]) * c[j]) / n[j];
          }
          hp = hn;
          h.set(hn, (bb * T + t) * HD + hh * D);
        }
        C.set(c, bb * HD + hh * D);
        N.set(n, bb * HD + hh * D);
      }
    }
    return { h, C, N };
  }

  it('equals the unstabilised recurrence at moderate pre-activations; c, n are C, N scaled by exp(-m)', () => {
    const p = makeProblem({ cell: 'slstm', batch, seqlen: T, heads: H, headDim: D });
    const r = fusedRnnRef(p.inputs, p.options),
      u = unstabilised(p);
    expect(relErr(r.h, u.h), at).toBeLessThan(1e-13);
    const per = batch * HD,
      c = new Float64Array(per),
      n = new Float64Array(per);
    for (let k = 0; k < per; k++) {
      const scale = Math.exp(-r.finalStates[3 * per + k]);
      c[k] = u.C[k] * scale;
      n[k] = u.N[k] * scale;
    }
    expect(relErr(r.finalStates.subarray(per, 2 * per), c), at).toBeLessThan(1e-13);
    expect(relErr(r.finalStates.subarray(2 * per, 3 * per), n), at).toBeLessThan(1e-13);
  });

  it('h does not depend on m: shifting m0 (c0, n0 scaled to match) changes no h, nor L(h) along that direction', () => {
    const p = makeProblem({ cell: 'slstm', batch, seqlen: T, heads: H, headDim: D, lengths: [6, 3], states0: true });
    const per = batch * HD,
      s0 = Float64Array.from(p.inputs.states0!);
    const shifted = Float64Array.from(s0);
    for (let k = 0; k < per; k++) {
      const delta = 3 * (rand() - 0.5);
      shifted[per + k] *= Math.exp(-delta);
      shifted[2 * per + k] *= Math.exp(-delta);
      shifted[3 * per + k] += delta;
    }
    const a = fusedRnnRef(p.inputs, p.options),
      s = fusedRnnRef({ ...p.inputs, states0: shifted }, p.options);
    expect(relErr(s.h, a.h), at).toBeLessThan(1e-13);
    // d/d delta of (c0 e^-delta, n0 e^-delta, m0 + delta) is (-c0, -n0, 1): dm0 = c0 dc0 + n0 dn0.
    const g = fusedRnnRefBackward(p.inputs, p.options, { dh: normal(rand, batch * T * HD) });
    const d = g.dStates0!,
      along = new Float64Array(per),
      dm0 = d.subarray(3 * per, 4 * per);
    for (let k = 0; k < per; k++) along[k] = s0[per + k] * d[per + k] + s0[2 * per + k] * d[2 * per + k];
    expect(relErr(dm0, along), at).toBeLessThan(1e-12);
    expect(Math.max(...Array.from(dm0, Math.abs))).toBeGreaterThan(1e-3);
  });

  it('stays finite for large pre-activations, where the unstabilised form overflows', () => {
    const p = makeProblem({ cell: 'slstm', batch, seqlen: T, heads: H, headDim: D, states0: false });
    const wx = p.inputs.wx as Float64Array;
    // Magnitudes past exp's overflow (709.8); the first step's input gates of row 0, head 0 are -1000 and +1000.
    for (let k = 0; k < wx.length; k++) wx[k] = (rand() < 0.5 ? -1 : 1) * (720 + 280 * rand());
    wx[0] = -1000;
    wx[1] = 1000;
    const u = unstabilised(p);
    expect(u.h.some((v) => !Number.isFinite(v))).toBe(true);
    const r = fusedRnnRef(p.inputs, p.options);
    for (const v of r.h) {
      expect(Number.isFinite(v)).toBe(true);
      expect(Math.abs(v)).toBeLessThanOrEqual(1);
    }
    for (const v of r.finalStates) expect(Number.isFinite(v)).toBe(true);
    const g = fusedRnnRefBackward(p.inputs, p.options, {
      dh: normal(rand, batch * T * HD),
      dFinalStates: normal(rand, 4 * batch * HD),
    });
    for (const k of ['dwx', 'dR', 'db'] as const) for (const v of g[k]) expect(Number.isFinite(v), k).toBe(true);
  });

  it('its gradients match finite differences with input-gate pre-activations of 60 to 100', () => {
    const p = makeProblem({ cell: 'slstm', batch, seqlen: T, heads: H, headDim: D, lengths: [6, 4], states0: true });
    const wx = p.inputs.wx as Float64Array;
    for (let bb = 0; bb < batch; bb++) {
      for (let t = 0; t < T; t++) for (let k = 0; k < HD; k++) wx[((bb * T + t) * G + 0) * HD + k] = 60 + 40 * rand();
    }
    const per = batch * HD;
    checkAgainstFd(p, normal(rand, batch * T * HD), normal(rand, 4 * per), 'large input gates');
  });
});

describe('fused RNN oracle: arguments', () => {
  it('rejects inputs that do not match the dims', () => {
    const p = makeProblem({ cell: 'lstm', batch: 2, seqlen: 3, heads: 2, headDim: 2, states0: true });
    expect(() => fusedRnnRef({ ...p.inputs, R: new Float64Array(5) }, p.options)).toThrow(
      /R has 5 elements, expected 32/,
    );
    expect(() => fusedRnnRef(p.inputs, { ...p.options, cell: 'gru' })).toThrow(/wx has 96 elements, expected 72/);
    expect(() => fusedRnnRef({ ...p.inputs, states0: new Float64Array(8) }, p.options)).toThrow(
      /states0 has 8 elements/,
    );
    expect(() => fusedRnnRef(p.inputs, { ...p.options, lengths: [1, 4] })).toThrow(
      /lengths must be integers in \[0, 3\]/,
    );
    expect(() => fusedRnnRef(p.inputs, { ...p.options, lengths: [1] })).toThrow(/lengths has 1 elements/);
    expect(() => fusedRnnRef(p.inputs, { ...p.options, cell: 'rnn' as FusedRnnCell })).toThrow(/unknown cell/);
    expect(() => fusedRnnRefBackward(p.inputs, p.options, { dh: new Float64Array(3) })).toThrow(/dh has 3 elements/);
    expect(() =>
      fusedRnnRefBackward(p.inputs, { ...p.options, returnLastOnly: true }, { dh: new Float64Array(24) }),
    ).toThrow(/dh has 24 elements, expected 8/);
  });

  it('logsigmoid and sigmoid are exact at both ends', () => {
    expect(logsigmoid(-800)).toBe(-800);
    expect(logsigmoid(800) === 0).toBe(true);
    expect(logsigmoid(0)).toBeCloseTo(-Math.LN2, 15);
    expect(sigmoid(-800)).toBe(0);
    expect(sigmoid(800)).toBe(1);
    expect(logsigmoid(-40)).toBeCloseTo(-40 - Math.exp(-40), 15);
  });
});
