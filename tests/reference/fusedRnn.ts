// Float64 oracle of the fused recurrent cells (FlashRNN-style: LSTM, GRU, sLSTM, Elman with many small
// heads): the recurrent part of an RNN layer, the input projection done outside. The plain sequential
// recurrence, and its backward written out by hand (reverse time through the same loop).
//
// Data: every array is flat, row-major, float64 or anything indexable (Float32Array from dataSync(),
// number[]); its shape is given by the dims in the options, never inferred from lengths.
// G = gates of the cell, S = states of the cell (table below), H = heads, D = headDim.
//
//   wx, dwx ................................. [batch, seqlen, G, H, D]  gate pre-activations (input part)
//   R, dR ................................... [G, H, D, D]  block-diagonal recurrent weights; R[g][h][i][j]
//                                             multiplies h_{t-1}[h][i] into gate g, output j (h_{t-1} @ R)
//   b, db ................................... [G, H, D]
//   states0, finalStates, dFinalStates,
//   dStates0 ................................ [S, batch, H, D]  (state 0 is always h)
//   h, dh ................................... [batch, seqlen, H, D]; with returnLastOnly [batch, H, D]
//   lengths ................................. [batch], integers in [0, seqlen]
//
// Per batch row b, head h, channel j and step t < lengths[b] (defaulting to seqlen), with hp = h_{t-1}:
//   rec_g[j] = sum_i hp[i] * R[g][h][i][j]
//   pre_g[j] = wx[b][t][g][h][j] + b[g][h][j] + rec_g[j]       (every gate except the GRU's n gate)
//
//   cell   G  S  gates (order)  states (order)  step
//   elman  1  1  (a)            (h)             h_t = tanh(pre_a)
//   lstm   4  2  (i, f, z, o)   (h, c)          c_t = sigmoid(pre_f) c + sigmoid(pre_i) tanh(pre_z)
//                                               h_t = sigmoid(pre_o) tanh(c_t)
//   gru    3  1  (r, z, n)      (h)             r = sigmoid(pre_r), z = sigmoid(pre_z)
//                                               n = tanh(wx_n + r * (rec_n + b_n))
//                                               h_t = (1 - z) n + z h_{t-1}
//   slstm  4  4  (i, f, z, o)   (h, c, n, m)    see below
//
// GRU bias: b_n sits inside the r-gated recurrent term, as PyTorch's / cuDNN's b_hn and FlashRNN's
// recurrent-only bias. The input-side bias of n (PyTorch's b_in) belongs in wx_n; for r and z the two
// biases simply add (b_r = b_ir + b_hr, or any split with wx). A PyTorch GRU with weights W_ih, W_hh
// (rows r, z, n) maps as wx = x W_ih^T + b_ih, b = b_hh, R[g][0][i][j] = W_hh[g * D + j][i].
//
// sLSTM (xLSTM paper; FlashRNN's sLSTM kernel with its default log-sigmoid forget gate):
//   i~ = pre_i, f~ = logsigmoid(pre_f)
//   m_t = max(f~ + m_{t-1}, i~);  m_t = i~ where the state is empty (per channel: n_{t-1} == 0 exactly)
//   i' = exp(i~ - m_t), f' = min(1, exp(f~ + m_{t-1} - m_t))
//   c_t = f' c_{t-1} + i' tanh(pre_z),  n_t = f' n_{t-1} + i',  h_t = sigmoid(pre_o) c_t / n_t
// Absent states0 means zeros (m_{-1} = 0 too); a zero state is empty, so its first step sets m = i~ and
// n = 1, and n_t >= 1 from then on: h stays finite for any pre-activations. The min acts only at an
// empty state, where f' multiplies n = 0. h does not depend on m (c and n carry a common factor
// exp(-m)); the final c, n, m are this stabilised representation. FlashRNN's kernel also clamps
// n_t >= 1, which acts only on states0 with 0 < n < 1; this oracle does not clamp. The backward is
// the exact gradient of this function, through m too (at a tie f~ + m_{t-1} == i~ the i~ branch
// takes it; at an empty state m depends on i~ alone).
//
// lengths: steps t >= lengths[b] leave the state unchanged and output h = 0 (gradients 0 there);
// finalStates is the state after step lengths[b] - 1 (states0, or zeros, at length 0).
// returnLastOnly: h is [batch, H, D], the final h state (finalStates[0]) of each batch row.

export type Data = ArrayLike<number>;

export type FusedRnnCell = 'lstm' | 'gru' | 'slstm' | 'elman';

export const FUSED_RNN_GATES: Readonly<Record<FusedRnnCell, number>> = { lstm: 4, gru: 3, slstm: 4, elman: 1 };
export const FUSED_RNN_STATES: Readonly<Record<FusedRnnCell, number>> = { lstm: 2, gru: 1, slstm: 4, elman: 1 };

export interface FusedRnnRefInputs {
  wx: Data;
  R: Data;
  b: Data;
  /** Initial states (zeros when absent). */
  states0?: Data | null;
}

export interface FusedRnnRefOptions {
  cell: FusedRnnCell;
  batch: number;
  seqlen: number;
  heads: number;
  headDim: number;
  /** Per-batch sequence lengths (default: seqlen for every row). */
  lengths?: Data | null;
  /** h holds only the final h state of each row, [batch, H, D]. */
  returnLastOnly?: boolean;
}

export interface FusedRnnRefOutputs {
  h: Float64Array;
  finalStates: Float64Array;
}

export interface FusedRnnRefGrads {
  dwx: Float64Array;
  dR: Float64Array;
  db: Float64Array;
  /** Null unless states0 was given. */
  dStates0: Float64Array | null;
}

export function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/** log(sigmoid(x)), without overflow at either end. */
export function logsigmoid(x: number): number {
  return x >= 0 ? -Math.log1p(Math.exp(-x)) : x - Math.log1p(Math.exp(x));
}

interface Dims {
  cell: FusedRnnCell;
  G: number;
  S: number;
  batch: number;
  T: number;
  H: number;
  D: number;
  lengths: number[];
}

function dimsOf(who: string, i: FusedRnnRefInputs, o: FusedRnnRefOptions): Dims {
  const { cell, batch, seqlen: T, heads: H, headDim: D } = o;
  if (!(cell in FUSED_RNN_GATES)) throw new Error(`${who}: unknown cell '${cell}'`);
  for (const [name, v] of [
    ['batch', batch],
    ['seqlen', T],
    ['heads', H],
    ['headDim', D],
  ] as const) {
    if (!Number.isInteger(v) || v < 0) throw new Error(`${who}: ${name} must be a non-negative integer, got ${v}`);
  }
  const G = FUSED_RNN_GATES[cell],
    S = FUSED_RNN_STATES[cell];
  const need = (name: string, a: Data | null | undefined, n: number) => {
    if (a && a.length !== n) throw new Error(`${who}: ${name} has ${a.length} elements, expected ${n}`);
  };
  need('wx', i.wx, batch * T * G * H * D);
  need('R', i.R, G * H * D * D);
  need('b', i.b, G * H * D);
  need('states0', i.states0, S * batch * H * D);
  let lengths: number[];
  if (o.lengths) {
    need('lengths', o.lengths, batch);
    lengths = Array.from(o.lengths);
    for (const l of lengths) {
      if (!Number.isInteger(l) || l < 0 || l > T)
        throw new Error(`${who}: lengths must be integers in [0, ${T}], got ${l}`);
    }
  } else {
    lengths = new Array<number>(batch).fill(T);
  }
  return { cell, G, S, batch, T, H, D, lengths };
}

/**
 * One step of one channel. x[g]: input part of gate g (wx + b; wx alone for the GRU's n gate);
 * r[g]: recurrent part (rec; rec + b for the GRU's n gate); prev[s]: the states before the step.
 * Returns the states after it.
 */
function cellStep(cell: FusedRnnCell, x: Float64Array, r: Float64Array, prev: Float64Array, out: Float64Array): void {
  switch (cell) {
    case 'elman':
      out[0] = Math.tanh(x[0] + r[0]);
      return;
    case 'lstm': {
      const ig = sigmoid(x[0] + r[0]),
        fg = sigmoid(x[1] + r[1]),
        zt = Math.tanh(x[2] + r[2]),
        og = sigmoid(x[3] + r[3]);
      const c = fg * prev[1] + ig * zt;
      out[0] = og * Math.tanh(c);
      out[1] = c;
      return;
    }
    case 'gru': {
      const rg = sigmoid(x[0] + r[0]),
        zg = sigmoid(x[1] + r[1]);
      const nn = Math.tanh(x[2] + rg * r[2]);
      out[0] = (1 - zg) * nn + zg * prev[0];
      return;
    }
    case 'slstm': {
      const it = x[0] + r[0],
        u = logsigmoid(x[1] + r[1]) + prev[3];
      const zt = Math.tanh(x[2] + r[2]),
        og = sigmoid(x[3] + r[3]);
      const m = prev[2] === 0 || it >= u ? it : u;
      const ip = Math.exp(it - m),
        fp = u > m ? 1 : Math.exp(u - m);
      const c = fp * prev[1] + ip * zt,
        n = fp * prev[2] + ip;
      out[0] = (og * c) / n;
      out[1] = c;
      out[2] = n;
      out[3] = m;
      return;
    }
  }
}

/**
 * The backward of cellStep: given g[s] = dL/d(states after the step), writes dL/dx, dL/dr and the
 * direct part of dL/dprev (the part through the recurrent matmul is added by the caller).
 */
function cellStepBackward(
  cell: FusedRnnCell,
  x: Float64Array,
  r: Float64Array,
  prev: Float64Array,
  g: Float64Array,
  gx: Float64Array,
  gr: Float64Array,
  gprev: Float64Array,
): void {
  switch (cell) {
    case 'elman': {
      const h = Math.tanh(x[0] + r[0]);
      gx[0] = gr[0] = g[0] * (1 - h * h);
      gprev[0] = 0;
      return;
    }
    case 'lstm': {
      const ig = sigmoid(x[0] + r[0]),
        fg = sigmoid(x[1] + r[1]),
        zt = Math.tanh(x[2] + r[2]),
        og = sigmoid(x[3] + r[3]);
      const c = fg * prev[1] + ig * zt,
        tc = Math.tanh(c);
      const gc = g[1] + g[0] * og * (1 - tc * tc);
      gx[0] = gr[0] = gc * zt * ig * (1 - ig);
      gx[1] = gr[1] = gc * prev[1] * fg * (1 - fg);
      gx[2] = gr[2] = gc * ig * (1 - zt * zt);
      gx[3] = gr[3] = g[0] * tc * og * (1 - og);
      gprev[0] = 0;
      gprev[1] = gc * fg;
      return;
    }
    case 'gru': {
      const rg = sigmoid(x[0] + r[0]),
        zg = sigmoid(x[1] + r[1]);
      const nn = Math.tanh(x[2] + rg * r[2]);
      const ga = g[0] * (1 - zg) * (1 - nn * nn); // dL / d(wx_n + r * (rec_n + b_n))
      gx[0] = gr[0] = ga * r[2] * rg * (1 - rg);
      gx[1] = gr[1] = g[0] * (prev[0] - nn) * zg * (1 - zg);
      gx[2] = ga;
      gr[2] = ga * rg;
      gprev[0] = g[0] * zg;
      return;
    }
    case 'slstm': {
      const it = x[0] + r[0],
        fpre = x[1] + r[1],
        u = logsigmoid(fpre) + prev[3];
      const zt = Math.tanh(x[2] + r[2]),
        og = sigmoid(x[3] + r[3]);
      const iBranch = prev[2] === 0 || it >= u,
        m = iBranch ? it : u;
      const fClamped = u > m;
      const ip = Math.exp(it - m),
        fp = fClamped ? 1 : Math.exp(u - m);
      const c = fp * prev[1] + ip * zt,
        n = fp * prev[2] + ip;
      const gc = g[1] + (g[0] * og) / n;
      const gn = g[2] - (g[0] * og * c) / (n * n);
      const gfp = gc * prev[1] + gn * prev[2],
        gip = gc * zt + gn;
      // m_t enters i' and an unclamped f' (both exp(. - m_t)) and is itself an output state.
      const gfu = fClamped ? 0 : gfp * fp; // dL / du through f'
      const gm = g[3] - gfu - gip * ip;
      let gi = gip * ip,
        gu = gfu;
      if (iBranch) gi += gm;
      else gu += gm;
      gx[0] = gr[0] = gi;
      gx[1] = gr[1] = gu * sigmoid(-fpre);
      gx[2] = gr[2] = gc * ip * (1 - zt * zt);
      gx[3] = gr[3] = g[0] * (c / n) * og * (1 - og);
      gprev[0] = 0;
      gprev[1] = gc * fp;
      gprev[2] = gn * fp;
      gprev[3] = gu;
      return;
    }
  }
}

/** Fills x[g * D + j] and r[g * D + j] for step t of row b, head hh, from hp (h_{t-1} of that head). */
function gateInputs(
  dm: Dims,
  i: FusedRnnRefInputs,
  b: number,
  t: number,
  hh: number,
  hp: ArrayLike<number>,
  x: Float64Array,
  r: Float64Array,
): void {
  const { G, H, D, T } = dm;
  for (let g = 0; g < G; g++) {
    const biasInside = dm.cell === 'gru' && g === 2;
    for (let j = 0; j < D; j++) {
      let rec = 0;
      for (let k = 0; k < D; k++) rec += hp[k] * i.R[((g * H + hh) * D + k) * D + j];
      const bias = i.b[(g * H + hh) * D + j],
        w = i.wx[(((b * T + t) * G + g) * H + hh) * D + j];
      x[g * D + j] = biasInside ? w : w + bias;
      r[g * D + j] = biasInside ? rec + bias : rec;
    }
  }
}

/** Runs row b, head hh; returns the states before every step and after the last: [(len + 1), S, D]. */
function trajectory(dm: Dims, i: FusedRnnRefInputs, b: number, hh: number): Float64Array {
  const { G, S, batch, H, D } = dm;
  const len = dm.lengths[b];
  const traj = new Float64Array((len + 1) * S * D);
  for (let s = 0; s < S; s++) {
    for (let j = 0; j < D; j++) traj[s * D + j] = i.states0 ? i.states0[((s * batch + b) * H + hh) * D + j] : 0;
  }
  const x = new Float64Array(G * D),
    r = new Float64Array(G * D);
  const xe = new Float64Array(G),
    re = new Float64Array(G),
    pe = new Float64Array(S),
    ne = new Float64Array(S);
  for (let t = 0; t < len; t++) {
    const prev = traj.subarray(t * S * D, (t + 1) * S * D),
      next = traj.subarray((t + 1) * S * D, (t + 2) * S * D);
    gateInputs(dm, i, b, t, hh, prev.subarray(0, D), x, r);
    for (let j = 0; j < D; j++) {
      for (let g = 0; g < G; g++) {
        xe[g] = x[g * D + j];
        re[g] = r[g * D + j];
      }
      for (let s = 0; s < S; s++) pe[s] = prev[s * D + j];
      cellStep(dm.cell, xe, re, pe, ne);
      for (let s = 0; s < S; s++) next[s * D + j] = ne[s];
    }
  }
  return traj;
}

export function fusedRnnRef(inputs: FusedRnnRefInputs, options: FusedRnnRefOptions): FusedRnnRefOutputs {
  const dm = dimsOf('fusedRnnRef', inputs, options);
  const { S, batch, T, H, D } = dm;
  const last = options.returnLastOnly ?? false;
  const h = new Float64Array(last ? batch * H * D : batch * T * H * D);
  const finalStates = new Float64Array(S * batch * H * D);
  for (let b = 0; b < batch; b++) {
    const len = dm.lengths[b];
    for (let hh = 0; hh < H; hh++) {
      const traj = trajectory(dm, inputs, b, hh);
      for (let j = 0; j < D; j++) {
        for (let s = 0; s < S; s++) finalStates[((s * batch + b) * H + hh) * D + j] = traj[(len * S + s) * D + j];
        if (last) h[(b * H + hh) * D + j] = traj[len * S * D + j];
        else for (let t = 0; t < len; t++) h[((b * T + t) * H + hh) * D + j] = traj[(t + 1) * S * D + j];
      }
    }
  }
  return { h, finalStates };
}

/**
 * Gradients of L = sum(dh * h) + sum(dFinalStates * finalStates) with respect to wx, R, b and states0
 * (dStates0 is null unless states0 was given). dh has the layout of h (so [batch, H, D] with
 * returnLastOnly); either gradient may be absent (zeros).
 */
export function fusedRnnRefBackward(
  inputs: FusedRnnRefInputs,
  options: FusedRnnRefOptions,
  grads: { dh?: Data | null; dFinalStates?: Data | null },
): FusedRnnRefGrads {
  const dm = dimsOf('fusedRnnRefBackward', inputs, options);
  const { cell, G, S, batch, T, H, D } = dm;
  const last = options.returnLastOnly ?? false;
  const dh = grads.dh ?? null,
    dFin = grads.dFinalStates ?? null;
  const hLen = last ? batch * H * D : batch * T * H * D;
  if (dh && dh.length !== hLen) throw new Error(`fusedRnnRefBackward: dh has ${dh.length} elements, expected ${hLen}`);
  if (dFin && dFin.length !== S * batch * H * D) {
    throw new Error(`fusedRnnRefBackward: dFinalStates has ${dFin.length} elements, expected ${S * batch * H * D}`);
  }
  const out: FusedRnnRefGrads = {
    dwx: new Float64Array(batch * T * G * H * D),
    dR: new Float64Array(G * H * D * D),
    db: new Float64Array(G * H * D),
    dStates0: inputs.states0 ? new Float64Array(S * batch * H * D) : null,
  };
  const x = new Float64Array(G * D),
    r = new Float64Array(G * D);
  const gS = new Float64Array(S * D),
    gPrev = new Float64Array(S * D);
  const xe = new Float64Array(G),
    re = new Float64Array(G),
    pe = new Float64Array(S),
    ge = new Float64Array(S);
  const gxe = new Float64Array(G),
    gre = new Float64Array(G),
    gpe = new Float64Array(S);
  const gr = new Float64Array(G * D);
  for (let b = 0; b < batch; b++) {
    const len = dm.lengths[b];
    for (let hh = 0; hh < H; hh++) {
      const traj = trajectory(dm, inputs, b, hh);
      // gS[s * D + j] = dL / d(state s after the current step), flowing backwards.
      for (let s = 0; s < S; s++) {
        for (let j = 0; j < D; j++) gS[s * D + j] = dFin ? dFin[((s * batch + b) * H + hh) * D + j] : 0;
      }
      if (last && dh) for (let j = 0; j < D; j++) gS[j] += dh[(b * H + hh) * D + j];
      for (let t = len - 1; t >= 0; t--) {
        if (!last && dh) for (let j = 0; j < D; j++) gS[j] += dh[((b * T + t) * H + hh) * D + j];
        const prev = traj.subarray(t * S * D, (t + 1) * S * D);
        gateInputs(dm, inputs, b, t, hh, prev.subarray(0, D), x, r);
        for (let j = 0; j < D; j++) {
          for (let g = 0; g < G; g++) {
            xe[g] = x[g * D + j];
            re[g] = r[g * D + j];
          }
          for (let s = 0; s < S; s++) {
            pe[s] = prev[s * D + j];
            ge[s] = gS[s * D + j];
          }
          cellStepBackward(cell, xe, re, pe, ge, gxe, gre, gpe);
          for (let g = 0; g < G; g++) {
            const gbi = (g * H + hh) * D + j;
            out.dwx[(((b * T + t) * G + g) * H + hh) * D + j] = gxe[g];
            out.db[gbi] += cell === 'gru' && g === 2 ? gre[g] : gxe[g];
            gr[g * D + j] = gre[g];
          }
          for (let s = 0; s < S; s++) gPrev[s * D + j] = gpe[s];
        }
        // rec_g[j] = sum_k hp[k] R[g][hh][k][j]
        for (let g = 0; g < G; g++) {
          for (let k = 0; k < D; k++) {
            const rowR = ((g * H + hh) * D + k) * D;
            let acc = 0;
            for (let j = 0; j < D; j++) {
              out.dR[rowR + j] += prev[k] * gr[g * D + j];
              acc += inputs.R[rowR + j] * gr[g * D + j];
            }
            gPrev[k] += acc;
          }
        }
        gS.set(gPrev);
      }
      if (out.dStates0) {
        for (let s = 0; s < S; s++) {
          for (let j = 0; j < D; j++) out.dStates0[((s * batch + b) * H + hh) * D + j] = gS[s * D + j];
        }
      }
    }
  }
  return out;
}
