// Float64 oracle of the causal depthwise convolution with carry state (lib/ops/causalConv1d.ts), in the
// channels-first layout: x (batch, C, T), weight (C, W), bias (C), states (N, C, L). Its gradients by
// reverse-mode differentiation, checked against finite differences in tests/causalConv1d.test.ts.
export interface ConvRefOptions {
  batch: number;
  C: number;
  T: number;
  W: number;
  dilation?: number;
  silu?: boolean;
  initialState?: ArrayLike<number> | null;
  cuSeqlens?: readonly number[] | null;
  window?: number;
}

function segments(o: ConvRefOptions) {
  if (o.cuSeqlens)
    return o.cuSeqlens.slice(1).map((e, s) => ({ b: 0, start: o.cuSeqlens![s], len: e - o.cuSeqlens![s] }));
  return Array.from({ length: o.batch }, (_, b) => ({ b, start: 0, len: o.T }));
}
const sig = (v: number) => 1 / (1 + Math.exp(-v));

/** xx of (sequence, channel): the L state positions, then the sequence's inputs. */
function row(
  x: ArrayLike<number>,
  o: ConvRefOptions,
  sg: { b: number; start: number; len: number },
  s: number,
  c: number,
) {
  const L = (o.W - 1) * (o.dilation ?? 1);
  const xx = new Float64Array(L + sg.len);
  if (o.initialState) for (let p = 0; p < L; p++) xx[p] = o.initialState[(s * o.C + c) * L + p];
  for (let t = 0; t < sg.len; t++) xx[L + t] = x[(sg.b * o.C + c) * o.T + sg.start + t];
  return xx;
}

export function causalConv1dRef(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  bias: ArrayLike<number> | null,
  o: ConvRefOptions,
) {
  const d = o.dilation ?? 1,
    L = (o.W - 1) * d,
    segs = segments(o),
    Wn = o.window ?? 0;
  const y = new Float64Array(o.batch * o.C * o.T);
  const fin = new Float64Array(segs.length * o.C * L);
  const win = new Float64Array(Wn * segs.length * o.C * L);
  segs.forEach((sg, s) => {
    for (let c = 0; c < o.C; c++) {
      const xx = row(x, o, sg, s, c);
      for (let t = 0; t < sg.len; t++) {
        let p = bias ? bias[c] : 0;
        for (let j = 0; j < o.W; j++) p += w[c * o.W + j] * xx[L + t - (o.W - 1 - j) * d];
        y[(sg.b * o.C + c) * o.T + sg.start + t] = o.silu ? p * sig(p) : p;
      }
      for (let p = 0; p < L; p++) fin[(s * o.C + c) * L + p] = xx[sg.len + p];
      for (let j = 0; j < Wn; j++) {
        const last = sg.len - Wn + j;
        if (last < 0) continue;
        for (let p = 0; p < L; p++) win[((j * segs.length + s) * o.C + c) * L + p] = xx[last + 1 + p];
      }
    }
  });
  return { y, finalState: fin, windowStates: win };
}

export function causalConv1dRefBackward(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  bias: ArrayLike<number> | null,
  o: ConvRefOptions,
  dy: ArrayLike<number> | null,
  dFinal: ArrayLike<number> | null,
) {
  const d = o.dilation ?? 1,
    L = (o.W - 1) * d,
    segs = segments(o);
  const dx = new Float64Array(x.length),
    dw = new Float64Array(w.length),
    db = new Float64Array(o.C),
    dh0 = new Float64Array(segs.length * o.C * L);
  segs.forEach((sg, s) => {
    for (let c = 0; c < o.C; c++) {
      const xx = row(x, o, sg, s, c);
      const dxx = new Float64Array(L + sg.len);
      if (dFinal) for (let p = 0; p < L; p++) dxx[sg.len + p] += dFinal[(s * o.C + c) * L + p];
      for (let t = 0; t < sg.len; t++) {
        let p = bias ? bias[c] : 0;
        for (let j = 0; j < o.W; j++) p += w[c * o.W + j] * xx[L + t - (o.W - 1 - j) * d];
        const g = dy ? dy[(sg.b * o.C + c) * o.T + sg.start + t] : 0;
        const dp = o.silu ? g * sig(p) * (1 + p * (1 - sig(p))) : g;
        db[c] += dp;
        for (let j = 0; j < o.W; j++) {
          const u = L + t - (o.W - 1 - j) * d;
          dw[c * o.W + j] += dp * xx[u];
          dxx[u] += dp * w[c * o.W + j];
        }
      }
      for (let t = 0; t < sg.len; t++) dx[(sg.b * o.C + c) * o.T + sg.start + t] = dxx[L + t];
      for (let p = 0; p < L; p++) dh0[(s * o.C + c) * L + p] = dxx[p];
    }
  });
  return { x: dx, weight: dw, bias: db, initialState: dh0 };
}
