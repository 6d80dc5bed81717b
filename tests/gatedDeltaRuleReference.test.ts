// The gated-delta-rule oracle checked on its own: hand-computed cases, its backward against central
// finite differences for every input over many configurations, the literal matrix form of the
// recurrence, packed sequences against separate runs, the decode step against the recurrence, and
// decays at the edges (g = 0, exp(g) underflowing to 0, long runs of large |g|).
import { describe, expect, it } from 'vitest';
import {
  gatedDeltaRuleRef,
  gatedDeltaRuleRefBackward,
  gatedDeltaRuleStepRef,
  L2NORM_EPS,
  type GatedDeltaRuleRefGrads,
  type GatedDeltaRuleRefInputs,
  type GatedDeltaRuleRefOptions,
} from './reference/gatedDeltaRule';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

interface Config {
  name: string;
  batch: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
  h0?: boolean;
  /** outputFinalState (default true). */
  final?: boolean;
  l2?: boolean;
  scale?: number;
  cuSeqlens?: number[];
  /** How g is drawn: 'mixed' (default): uniform(-1.5, 0) with every third entry exactly 0. */
  g?: 'mixed' | 'zero' | 'underflow';
}

interface Problem {
  inputs: GatedDeltaRuleRefInputs & {
    q: Float64Array;
    k: Float64Array;
    v: Float64Array;
    g: Float64Array;
    beta: Float64Array;
  };
  options: GatedDeltaRuleRefOptions;
}

function makeProblem(c: Config): Problem {
  const { batch, T, H, HV, K, V } = c;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const BT = batch * T;
  // Without the in-kernel norm, |k|^2 is about 1 so that (I - beta k k^T) stays a contraction.
  const qkScale = c.l2 ? 1 : 1 / Math.sqrt(K);
  let g: Float64Array;
  if (c.g === 'zero') g = new Float64Array(BT * HV);
  else if (c.g === 'underflow') g = new Float64Array(BT * HV).fill(-1e4);
  else {
    g = uniform(rand, BT * HV, -1.5, 0);
    for (let i = 0; i < g.length; i += 3) g[i] = 0;
  }
  return {
    inputs: {
      q: normal(rand, BT * H * K, qkScale),
      k: normal(rand, BT * H * K, qkScale),
      v: normal(rand, BT * HV * V),
      g,
      beta: uniform(rand, BT * HV, 0.1, 1),
    },
    options: {
      batch,
      T,
      H,
      HV,
      K,
      V,
      scale: c.scale,
      initialState: c.h0 ? normal(rand, nseq * HV * K * V) : null,
      outputFinalState: c.final ?? true,
      cuSeqlens: c.cuSeqlens ?? null,
      useQkL2normInKernel: c.l2 ?? false,
    },
  };
}

const configs: Config[] = [
  { name: 'H != HV, K != V, initial state', batch: 2, T: 5, H: 2, HV: 4, K: 3, V: 2, h0: true },
  { name: 'T 1, L2 norm, no initial state', batch: 3, T: 1, H: 1, HV: 2, K: 4, V: 3, l2: true },
  {
    name: 'L2 norm, custom scale, initial state, H = HV, K < V',
    batch: 1,
    T: 7,
    H: 2,
    HV: 2,
    K: 2,
    V: 4,
    h0: true,
    l2: true,
    scale: 0.7,
  },
  { name: 'T 5, no L2 norm, custom scale, GVA 3', batch: 2, T: 5, H: 1, HV: 3, K: 3, V: 3, scale: 1.3 },
  {
    name: 'packed: length-1 and empty sequences, padded tail, L2 norm, initial state',
    batch: 1,
    T: 12,
    H: 1,
    HV: 3,
    K: 3,
    V: 2,
    h0: true,
    l2: true,
    cuSeqlens: [0, 1, 1, 5, 10],
  },
  {
    name: 'packed without initial state, empty first sequence',
    batch: 1,
    T: 9,
    H: 2,
    HV: 4,
    K: 2,
    V: 3,
    cuSeqlens: [0, 0, 4, 5, 8],
  },
  { name: 'g = 0 everywhere (no decay)', batch: 2, T: 5, H: 1, HV: 2, K: 3, V: 2, h0: true, l2: true, g: 'zero' },
  { name: 'g = -1e4 everywhere (exp(g) = 0)', batch: 1, T: 5, H: 2, HV: 4, K: 2, V: 3, h0: true, g: 'underflow' },
  {
    name: 'no final state (dO only), L2 norm, initial state',
    batch: 2,
    T: 4,
    H: 2,
    HV: 2,
    K: 3,
    V: 2,
    h0: true,
    l2: true,
    final: false,
  },
];

/** The differentiable arrays of a problem (the problem's own arrays, so perturbing them moves the loss), by name. */
function parts(p: Problem): { names: string[]; arrays: Float64Array[] } {
  const names = ['q', 'k', 'v', 'g', 'beta'];
  const arrays = [p.inputs.q, p.inputs.k, p.inputs.v, p.inputs.g, p.inputs.beta];
  if (p.options.initialState) {
    names.push('initialState');
    arrays.push(p.options.initialState as Float64Array);
  }
  return { names, arrays };
}

const gradName: Record<string, keyof GatedDeltaRuleRefGrads> = {
  q: 'dq',
  k: 'dk',
  v: 'dv',
  g: 'dg',
  beta: 'dbeta',
  initialState: 'dInitialState',
};

function checkAgainstFd(p: Problem, wo: Float64Array | null, wf: Float64Array | null, what: string): void {
  // The arrays are perturbed in place, so the loss simply reruns the oracle on p.
  const { names, arrays } = parts(p);
  const loss = () => {
    const r = gatedDeltaRuleRef(p.inputs, p.options);
    return (wo ? dot(r.o, wo) : 0) + (wf ? dot(r.finalState!, wf) : 0);
  };
  // The loss is linear in v and initialState, and in q without the norm: a large step is exact there.
  const linear = new Set(['v', 'initialState', ...(p.options.useQkL2normInKernel ? [] : ['q'])]);
  const fd = finiteDifferences(
    loss,
    arrays,
    names.map((n) => (linear.has(n) ? 1e-2 : 1e-5)),
  );
  const g = gatedDeltaRuleRefBackward(p.inputs, p.options, { dO: wo, dFinal: wf });
  names.forEach((name, k) => {
    const ours = g[gradName[name]] as Float64Array | null;
    expect(ours, `${name} ${what} ${at}`).not.toBeNull();
    expect(ours!.length, `${name} ${what}`).toBe(arrays[k].length);
    expect(relErr(ours!, fd[k]), `grad ${name} ${what} ${at}`).toBeLessThan(1e-6);
  });
  if (!p.options.initialState) expect(g.dInitialState).toBeNull();
}

function allFinite(...xs: (ArrayLike<number> | null)[]): boolean {
  return xs.every((x) => !x || Array.from(x).every(Number.isFinite));
}

/**
 * The issue's form, literally, with explicit matrices: S' (V x K) = exp(g) S' (I - beta k k^T) + beta v k^T,
 * o = scale S' q. Unpacked input only. Returns o and the final state transposed to [.., K, V].
 */
function literalVxK(
  i: GatedDeltaRuleRefInputs,
  o: GatedDeltaRuleRefOptions,
): { o: Float64Array; finalState: Float64Array } {
  const { batch, T, H, HV, K, V } = o;
  const scale = o.scale ?? 1 / Math.sqrt(K);
  const out = new Float64Array(batch * T * HV * V),
    fin = new Float64Array(batch * HV * K * V);
  const norm = (x: ArrayLike<number>, off: number) => {
    const r = Array.from({ length: K }, (_, a) => x[off + a]);
    if (!o.useQkL2normInKernel) return r;
    const n = Math.sqrt(r.reduce((s, e) => s + e * e, 0) + 1e-6);
    return r.map((e) => e / n);
  };
  for (let b = 0; b < batch; b++) {
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / (HV / H));
      let S = Array.from({ length: V }, (_, r) =>
        Array.from({ length: K }, (_, c) => (o.initialState ? o.initialState[((b * HV + hv) * K + c) * V + r] : 0)),
      );
      for (let t = 0; t < T; t++) {
        const q = norm(i.q, ((b * T + t) * H + h) * K),
          k = norm(i.k, ((b * T + t) * H + h) * K);
        const gi = (b * T + t) * HV + hv,
          a = Math.exp(i.g[gi]),
          beta = i.beta[gi];
        const P = Array.from({ length: K }, (_, r) =>
          Array.from({ length: K }, (_, c) => (r === c ? 1 : 0) - beta * k[r] * k[c]),
        );
        S = S.map((row, r) =>
          Array.from({ length: K }, (_, c) => {
            let s = 0;
            for (let m = 0; m < K; m++) s += row[m] * P[m][c];
            return a * s + beta * i.v[gi * V + r] * k[c];
          }),
        );
        for (let r = 0; r < V; r++) out[gi * V + r] = scale * S[r].reduce((s, e, c) => s + e * q[c], 0);
      }
      for (let r = 0; r < V; r++) for (let c = 0; c < K; c++) fin[((b * HV + hv) * K + c) * V + r] = S[r][c];
    }
  }
  return { o: out, finalState: fin };
}

describe('gated delta rule oracle: hand-computed cases', () => {
  // One head, K = V = 2, scale 1/2, S_{-1} = [[1, 2], [3, 4]] (K x V).
  //   t=0: g = 0 (decay 1), beta = 1/2, k = [1, 0], v = [2, 3], q = [2, 2]:
  //        u = S^T k = [1, 2]; w = v - u = [1, 1]; S_0 = S + (1/2) k w^T = [[1.5, 2.5], [3, 4]]
  //        o_0 = (1/2) S_0^T q = (1/2) (2 [1.5, 2.5] + 2 [3, 4]) = [4.5, 6.5]
  //   t=1: g = ln(1/2), beta = 1, k = [0.6, 0.8] (unit), v = [1, -1], q = [1, 1]:
  //        u = S_0^T k = [3.3, 4.7]; w = v - u / 2 = [-0.65, -3.35]
  //        S_1 = S_0 / 2 + k w^T = [[0.36, -0.76], [0.98, -0.68]]; o_1 = (1/2) [1.34, -1.44] = [0.67, -0.72]
  //        (beta = 1 with a unit k stores v exactly: S_1^T k = v_1.)
  const inputs: GatedDeltaRuleRefInputs = {
    q: [2, 2, 1, 1],
    k: [1, 0, 0.6, 0.8],
    v: [2, 3, 1, -1],
    g: [0, Math.log(0.5)],
    beta: [0.5, 1],
  };
  const options: GatedDeltaRuleRefOptions = {
    batch: 1,
    T: 2,
    H: 1,
    HV: 1,
    K: 2,
    V: 2,
    scale: 0.5,
    initialState: [1, 2, 3, 4],
    outputFinalState: true,
  };

  it('two tokens with an initial state', () => {
    const r = gatedDeltaRuleRef(inputs, { ...options, returnStates: true });
    expect(relErr(r.o, [4.5, 6.5, 0.67, -0.72])).toBeLessThan(1e-15);
    expect(relErr(r.finalState!, [0.36, -0.76, 0.98, -0.68])).toBeLessThan(1e-15);
    expect(relErr(r.states!, [1.5, 2.5, 3, 4, 0.36, -0.76, 0.98, -0.68])).toBeLessThan(1e-15);
    const S = r.finalState!;
    expect(relErr([0.6 * S[0] + 0.8 * S[2], 0.6 * S[1] + 0.8 * S[3]], [1, -1])).toBeLessThan(1e-15);
  });

  it('the same case as a decode step, and without outputFinalState', () => {
    const s = gatedDeltaRuleStepRef(
      { state: [1, 2, 3, 4], ...inputs },
      { batch: 1, T: 2, H: 1, HV: 1, K: 2, V: 2, scale: 0.5 },
    );
    expect(relErr(s.o, [4.5, 6.5, 0.67, -0.72])).toBeLessThan(1e-15);
    expect(relErr(s.state, [0.36, -0.76, 0.98, -0.68])).toBeLessThan(1e-15);
    expect(relErr(s.intermediateStates, [1.5, 2.5, 3, 4, 0.36, -0.76, 0.98, -0.68])).toBeLessThan(1e-15);
    expect(gatedDeltaRuleRef(inputs, { ...options, outputFinalState: false }).finalState).toBeNull();
  });

  it('gradients of o_0[0]', () => {
    // o_0[0] = (1/2) q^T (a S + beta k v^T - a beta k k^T S)[:, 0], a = 1, beta = 1/2:
    //   dq = (1/2) S_0[:, 0] = [0.75, 1.5]; dv_0 = (1/2) beta (k . q) e_0 = [0.5, 0]
    //   dbeta = (1/2) (k . q) w_0 = 1; dg = a (1/2) q^T ((I - beta k k^T) S)[:, 0] = (1/2) (2 * 0.5 + 2 * 3) = 3.5
    //   dS_{-1} = a (1/2) (I - beta k k^T) q e_0^T = [[0.5, 0], [1, 0]]
    //   dk = (1/2) beta (v_0 q - a ((k . S[:, 0]) q + (q . k) S[:, 0])) = 0.25 ([4, 4] - [2, 2] - [2, 6]) = [0, -1]
    // Nothing at t = 1 reaches o_0.
    const gr = gatedDeltaRuleRefBackward(inputs, options, { dO: [1, 0, 0, 0] });
    expect(relErr(gr.dq, [0.75, 1.5, 0, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dk, [0, -1, 0, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dv, [0.5, 0, 0, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dbeta, [1, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dg, [3.5, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dInitialState!, [0.5, 0, 1, 0])).toBeLessThan(1e-15);
  });

  it('gradients through the final state', () => {
    // dFinal = e_0 e_0^T. At t = 1 (a = 1/2, beta = 1): S_1[0][0] = a S_0[0][0] + k_0 (v_0 - a (S_0^T k)_0), so
    //   dv_1 = [k_0, 0] = [0.6, 0]; dbeta_1 = k_0 w_0 = 0.6 * -0.65 = -0.39
    //   dg_1 = a (S_0[0][0] - k_0 (S_0^T k)_0) = 0.5 (1.5 - 0.6 * 3.3) = -0.24
    //   dS_0 = a (I - k k^T) e_0 e_0^T = [[0.32, 0], [-0.24, 0]]
    // At t = 0 (a = 1, beta = 1/2, k = e_0): dv_0 = beta dS_0^T k = [0.16, 0];
    //   dS_{-1} = (I - beta e_0 e_0^T) dS_0 = [[0.16, 0], [-0.24, 0]].
    const gr = gatedDeltaRuleRefBackward(inputs, options, { dFinal: [1, 0, 0, 0] });
    expect(relErr(gr.dv, [0.16, 0, 0.6, 0])).toBeLessThan(1e-15);
    expect(relErr(gr.dbeta.subarray(1), [-0.39])).toBeLessThan(1e-15);
    expect(relErr(gr.dg.subarray(1), [-0.24])).toBeLessThan(1e-15);
    expect(gr.dq.every((x) => x === 0)).toBe(true);
    expect(relErr(gr.dInitialState!, [0.16, 0, -0.24, 0])).toBeLessThan(1e-15);
  });

  it('the in-kernel L2 norm is x / sqrt(sum x^2 + 1e-6), and the default scale is K^-0.5', () => {
    // One token from zero state, beta = 1, g = 0: S = k v^T, o = scale (q . k) v.
    expect(L2NORM_EPS).toBe(1e-6);
    const i: GatedDeltaRuleRefInputs = { q: [0, 5], k: [3, 4], v: [1, 2], g: [0], beta: [1] };
    const o: GatedDeltaRuleRefOptions = { batch: 1, T: 1, H: 1, HV: 1, K: 2, V: 2, useQkL2normInKernel: true };
    const c = 20 / (25 + 1e-6) / Math.SQRT2;
    expect(relErr(gatedDeltaRuleRef(i, o).o, [c, 2 * c])).toBeLessThan(1e-15);
    expect(
      relErr(gatedDeltaRuleRef(i, { ...o, useQkL2normInKernel: false }).o, [20 / Math.SQRT2, 40 / Math.SQRT2]),
    ).toBeLessThan(1e-15);
    // A zero q stays zero (no division by zero) and its gradient is finite: dq = dqn / sqrt(1e-6).
    const z = gatedDeltaRuleRef({ ...i, q: [0, 0] }, o);
    expect(Array.from(z.o)).toEqual([0, 0]);
    const gz = gatedDeltaRuleRefBackward({ ...i, q: [0, 0] }, o, { dO: [1, 0] });
    expect(
      relErr(gz.dq, [
        (0.6 / Math.SQRT2) * 1e3 * (5 / Math.sqrt(25 + 1e-6)),
        (0.8 / Math.SQRT2) * 1e3 * (5 / Math.sqrt(25 + 1e-6)),
      ]),
    ).toBeLessThan(1e-12);
  });
});

describe('gated delta rule oracle: backward equals finite differences', () => {
  it.each(configs.map((c) => [c.name, c] as const))('%s', (_, c) => {
    const p = makeProblem(c);
    const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : c.batch;
    const wo = normal(rand, c.batch * c.T * c.HV * c.V);
    const wf = (c.final ?? true) ? normal(rand, nseq * c.HV * c.K * c.V) : null;
    checkAgainstFd(p, wo, wf, 'dO and dFinal');
  });

  it('from dO alone and from dFinal alone', () => {
    const c = configs[0];
    const p = makeProblem(c);
    checkAgainstFd(p, normal(rand, c.batch * c.T * c.HV * c.V), null, 'dO only');
    checkAgainstFd(p, null, normal(rand, c.batch * c.HV * c.K * c.V), 'dFinal only');
  });
});

describe('gated delta rule oracle: consistency', () => {
  it.each([false, true])('the recurrence equals the literal V x K matrix form (L2 norm %s)', (l2) => {
    const p = makeProblem({ name: '', batch: 2, T: 6, H: 2, HV: 4, K: 3, V: 2, h0: true, l2, scale: 0.8 });
    const r = gatedDeltaRuleRef(p.inputs, p.options),
      lit = literalVxK(p.inputs, p.options);
    expect(relErr(r.o, lit.o), at).toBeLessThan(1e-13);
    expect(relErr(r.finalState!, lit.finalState), at).toBeLessThan(1e-13);
  });

  it('value head hv reads q / k head floor(hv / (HV / H)): the same as q / k repeated per value head', () => {
    const batch = 2,
      T = 4,
      H = 2,
      HV = 6,
      K = 3,
      V = 2,
      G = HV / H;
    const p = makeProblem({ name: '', batch, T, H, HV, K, V, h0: true, l2: true });
    const expand = (x: ArrayLike<number>) => {
      const out = new Float64Array(batch * T * HV * K);
      for (let bt = 0; bt < batch * T; bt++)
        for (let hv = 0; hv < HV; hv++)
          for (let i = 0; i < K; i++) out[(bt * HV + hv) * K + i] = x[(bt * H + Math.floor(hv / G)) * K + i];
      return out;
    };
    const eInputs = { ...p.inputs, q: expand(p.inputs.q), k: expand(p.inputs.k) },
      eOptions = { ...p.options, H: HV };
    const r = gatedDeltaRuleRef(p.inputs, p.options),
      e = gatedDeltaRuleRef(eInputs, eOptions);
    expect(relErr(r.o, e.o)).toBeLessThan(1e-15);
    expect(relErr(r.finalState!, e.finalState!)).toBeLessThan(1e-15);
    const dO = normal(rand, batch * T * HV * V),
      dFinal = normal(rand, batch * HV * K * V);
    const gr = gatedDeltaRuleRefBackward(p.inputs, p.options, { dO, dFinal }),
      ge = gatedDeltaRuleRefBackward(eInputs, eOptions, { dO, dFinal });
    const reduce = (x: Float64Array) => {
      const out = new Float64Array(batch * T * H * K);
      for (let bt = 0; bt < batch * T; bt++)
        for (let hv = 0; hv < HV; hv++)
          for (let i = 0; i < K; i++) out[(bt * H + Math.floor(hv / G)) * K + i] += x[(bt * HV + hv) * K + i];
      return out;
    };
    expect(relErr(gr.dq, reduce(ge.dq))).toBeLessThan(1e-13);
    expect(relErr(gr.dk, reduce(ge.dk))).toBeLessThan(1e-13);
    for (const n of ['dv', 'dg', 'dbeta', 'dInitialState'] as const)
      expect(relErr(gr[n]!, ge[n]!), n).toBeLessThan(1e-15);
  });

  it('the default scale is K^-0.5, and o is linear in scale', () => {
    const p = makeProblem({ name: '', batch: 1, T: 4, H: 1, HV: 2, K: 5, V: 2, h0: true });
    const d = gatedDeltaRuleRef(p.inputs, { ...p.options, scale: undefined });
    expect(relErr(d.o, gatedDeltaRuleRef(p.inputs, { ...p.options, scale: 1 / Math.sqrt(5) }).o)).toBeLessThan(1e-15);
    const two = gatedDeltaRuleRef(p.inputs, { ...p.options, scale: 2 / Math.sqrt(5) });
    expect(
      relErr(
        two.o,
        d.o.map((x) => 2 * x),
      ),
    ).toBeLessThan(1e-15);
    expect(relErr(two.finalState!, d.finalState!)).toBe(0);
  });

  it('packed sequences equal separate runs; the padded tail gives o = 0 and zero gradients', () => {
    const cu = [0, 1, 1, 5, 10],
      T = 12,
      H = 2,
      HV = 4,
      K = 3,
      V = 2,
      KV = K * V;
    const p = makeProblem({ name: '', batch: 1, T, H, HV, K, V, h0: true, l2: true, scale: 0.9, cuSeqlens: cu });
    const nseq = cu.length - 1;
    const dO = normal(rand, T * HV * V),
      dFinal = normal(rand, nseq * HV * KV);
    const packed = gatedDeltaRuleRef(p.inputs, { ...p.options, returnStates: true });
    const gp = gatedDeltaRuleRefBackward(p.inputs, p.options, { dO, dFinal });
    // Positions [s, s + n) of [1, T, ...rest] data, rest elements per position.
    const cut = (x: ArrayLike<number>, rest: number, s: number, n: number) =>
      Float64Array.from({ length: n * rest }, (_, i) => x[s * rest + i]);
    const slot = (x: ArrayLike<number>, s: number) =>
      Float64Array.from({ length: HV * KV }, (_, i) => x[s * HV * KV + i]);
    const h0 = p.options.initialState!;
    for (let s = 0; s < nseq; s++) {
      const start = cu[s],
        n = cu[s + 1] - cu[s];
      const what = `sequence ${s} ${at}`;
      if (n === 0) {
        expect(Array.from(slot(packed.finalState!, s)), what).toEqual(Array.from(slot(h0, s)));
        expect(Array.from(slot(gp.dInitialState!, s)), what).toEqual(Array.from(slot(dFinal, s)));
        continue;
      }
      const inputs: GatedDeltaRuleRefInputs = {
        q: cut(p.inputs.q, H * K, start, n),
        k: cut(p.inputs.k, H * K, start, n),
        v: cut(p.inputs.v, HV * V, start, n),
        g: cut(p.inputs.g, HV, start, n),
        beta: cut(p.inputs.beta, HV, start, n),
      };
      const options: GatedDeltaRuleRefOptions = { ...p.options, T: n, cuSeqlens: null, initialState: slot(h0, s) };
      const one = gatedDeltaRuleRef(inputs, options);
      expect(relErr(cut(packed.o, HV * V, start, n), one.o), what).toBeLessThan(1e-15);
      expect(relErr(slot(packed.finalState!, s), one.finalState!), what).toBeLessThan(1e-15);
      const g = gatedDeltaRuleRefBackward(inputs, options, { dO: cut(dO, HV * V, start, n), dFinal: slot(dFinal, s) });
      expect(relErr(cut(gp.dq, H * K, start, n), g.dq), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dk, H * K, start, n), g.dk), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dv, HV * V, start, n), g.dv), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dg, HV, start, n), g.dg), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dbeta, HV, start, n), g.dbeta), what).toBeLessThan(1e-15);
      expect(relErr(slot(gp.dInitialState!, s), g.dInitialState!), what).toBeLessThan(1e-15);
    }
    const tail = cu[cu.length - 1],
      n = T - tail;
    const zero = (x: ArrayLike<number>, rest: number) => cut(x, rest, tail, n).every((e) => e === 0);
    expect([zero(packed.o, HV * V), zero(packed.states!, HV * KV)]).toEqual([true, true]);
    expect([zero(gp.dq, H * K), zero(gp.dk, H * K), zero(gp.dv, HV * V), zero(gp.dg, HV), zero(gp.dbeta, HV)]).toEqual([
      true,
      true,
      true,
      true,
      true,
    ]);
    // The tail's inputs do not matter at all.
    const noisy = { ...p.inputs, v: Float64Array.from(p.inputs.v), g: Float64Array.from(p.inputs.g) };
    for (let i = tail * HV * V; i < T * HV * V; i++) noisy.v[i] = NaN;
    for (let i = tail * HV; i < T * HV; i++) noisy.g[i] = 50;
    const rn = gatedDeltaRuleRef(noisy, p.options);
    expect(relErr(rn.o, packed.o)).toBe(0);
    expect(relErr(rn.finalState!, packed.finalState!)).toBe(0);
  });

  it.each([1, 3])('the decode step equals the recurrence (%i tokens), and its states are the trajectory', (n) => {
    const batch = 2,
      T = 6,
      H = 1,
      HV = 2,
      K = 3,
      V = 4,
      KV = K * V;
    const p = makeProblem({ name: '', batch, T, H, HV, K, V, h0: true, l2: true, scale: 0.6 });
    const full = gatedDeltaRuleRef(p.inputs, { ...p.options, returnStates: true });
    // The state entering position T - n: the recurrence's state after position T - n - 1.
    const state = new Float64Array(batch * HV * KV);
    for (let b = 0; b < batch; b++)
      state.set(full.states!.subarray((b * T + T - n - 1) * HV * KV, (b * T + T - n) * HV * KV), b * HV * KV);
    const last = (x: ArrayLike<number>, rest: number) => {
      const out = new Float64Array(batch * n * rest);
      for (let b = 0; b < batch; b++)
        for (let i = 0; i < n * rest; i++) out[b * n * rest + i] = x[(b * T + T - n) * rest + i];
      return out;
    };
    const before = Float64Array.from(state);
    const st = gatedDeltaRuleStepRef(
      {
        state,
        q: last(p.inputs.q, H * K),
        k: last(p.inputs.k, H * K),
        v: last(p.inputs.v, HV * V),
        g: last(p.inputs.g, HV),
        beta: last(p.inputs.beta, HV),
      },
      { batch, T: n, H, HV, K, V, scale: 0.6, useQkL2normInKernel: true },
    );
    expect(relErr(st.o, last(full.o, HV * V)), at).toBeLessThan(1e-14);
    expect(relErr(st.state, full.finalState!), at).toBeLessThan(1e-14);
    expect(relErr(st.intermediateStates, last(full.states!, HV * KV)), at).toBeLessThan(1e-14);
    expect(Array.from(state)).toEqual(Array.from(before));
  });

  it('the whole recurrence from its initial state is a decode of T tokens', () => {
    const p = makeProblem({ name: '', batch: 2, T: 5, H: 2, HV: 4, K: 2, V: 3, h0: true });
    const full = gatedDeltaRuleRef(p.inputs, { ...p.options, returnStates: true });
    const st = gatedDeltaRuleStepRef(
      { state: p.options.initialState!, ...p.inputs },
      { batch: 2, T: 5, H: 2, HV: 4, K: 2, V: 3 },
    );
    expect(relErr(st.o, full.o)).toBeLessThan(1e-14);
    expect(relErr(st.intermediateStates, full.states!)).toBeLessThan(1e-14);
    expect(relErr(st.state, full.finalState!)).toBeLessThan(1e-14);
  });

  it('rejects inputs that do not match the dims', () => {
    const p = makeProblem(configs[0]);
    expect(() => gatedDeltaRuleRef({ ...p.inputs, v: new Float64Array(3) }, p.options)).toThrow(/v has 3 elements/);
    expect(() => gatedDeltaRuleRef(p.inputs, { ...p.options, HV: 3 })).toThrow(/multiple of H/);
    expect(() => gatedDeltaRuleRef(p.inputs, { ...p.options, cuSeqlens: [0, 2] })).toThrow(/batch == 1/);
    expect(() => gatedDeltaRuleRef(p.inputs, { ...p.options, initialState: new Float64Array(5) })).toThrow(
      /initialState has 5 elements/,
    );
    expect(() =>
      gatedDeltaRuleRefBackward(p.inputs, { ...p.options, outputFinalState: false }, { dFinal: new Float64Array(48) }),
    ).toThrow(/outputFinalState/);
    const one = makeProblem({ name: '', batch: 1, T: 4, H: 1, HV: 1, K: 2, V: 2 });
    expect(() => gatedDeltaRuleRef(one.inputs, { ...one.options, cuSeqlens: [0, 3, 2] })).toThrow(/non-decreasing/);
    expect(() => gatedDeltaRuleRef(one.inputs, { ...one.options, cuSeqlens: [0, 5] })).toThrow(/exceeds T/);
    expect(() =>
      gatedDeltaRuleStepRef({ state: new Float64Array(3), ...one.inputs }, { batch: 1, T: 4, H: 1, HV: 1, K: 2, V: 2 }),
    ).toThrow(/state has 3 elements/);
  });
});

describe('gated delta rule oracle: decays at the edges', () => {
  const dims = { batch: 2, T: 5, H: 1, HV: 2, K: 3, V: 2 };

  it.each([-1e4, -Infinity])(
    'g = %s: the state restarts every token, o_t = scale beta_t (q_t . k_t) v_t, dg = 0',
    (gv) => {
      const p = makeProblem({ name: '', ...dims, h0: true, l2: true, scale: 0.75 });
      p.inputs.g.fill(gv);
      const r = gatedDeltaRuleRef(p.inputs, p.options);
      const { batch, T, H, HV, K, V } = dims;
      const expectO = new Float64Array(batch * T * HV * V),
        expectFinal = new Float64Array(batch * HV * K * V);
      const unit = (x: ArrayLike<number>, off: number) => {
        const n = Math.sqrt(Array.from({ length: K }, (_, i) => x[off + i] ** 2).reduce((s, e) => s + e, 0) + 1e-6);
        return Array.from({ length: K }, (_, i) => x[off + i] / n);
      };
      for (let b = 0; b < batch; b++) {
        for (let t = 0; t < T; t++) {
          const q = unit(p.inputs.q, (b * T + t) * H * K),
            k = unit(p.inputs.k, (b * T + t) * H * K);
          const qk = q.reduce((s, e, i) => s + e * k[i], 0);
          for (let hv = 0; hv < HV; hv++) {
            const gi = (b * T + t) * HV + hv,
              beta = p.inputs.beta[gi];
            for (let j = 0; j < V; j++) expectO[gi * V + j] = 0.75 * beta * qk * p.inputs.v[gi * V + j];
            if (t === T - 1)
              for (let i = 0; i < K; i++)
                for (let j = 0; j < V; j++)
                  expectFinal[((b * HV + hv) * K + i) * V + j] = beta * k[i] * p.inputs.v[gi * V + j];
          }
        }
      }
      expect(relErr(r.o, expectO)).toBeLessThan(1e-14);
      expect(relErr(r.finalState!, expectFinal)).toBeLessThan(1e-14);
      const gr = gatedDeltaRuleRefBackward(p.inputs, p.options, {
        dO: normal(rand, r.o.length),
        dFinal: normal(rand, r.finalState!.length),
      });
      expect(allFinite(gr.dq, gr.dk, gr.dv, gr.dg, gr.dbeta, gr.dInitialState)).toBe(true);
      expect(gr.dg.every((x) => x === 0)).toBe(true);
      expect(gr.dInitialState!.every((x) => x === 0)).toBe(true);
    },
  );

  it('g = 0: no decay, and a unit k with beta = 1 replaces exactly what the state held along k', () => {
    const p = makeProblem({ name: '', ...dims, h0: true, g: 'zero' });
    const { batch, T, H, HV, K, V } = dims;
    p.inputs.beta.fill(1);
    for (let r = 0; r < batch * T * H; r++) {
      const n = Math.hypot(...Array.from(p.inputs.k.subarray(r * K, (r + 1) * K)));
      for (let i = 0; i < K; i++) p.inputs.k[r * K + i] /= n;
    }
    const r = gatedDeltaRuleRef(p.inputs, p.options);
    expect(relErr(r.o, literalVxK(p.inputs, p.options).o)).toBeLessThan(1e-13);
    expect(relErr(r.finalState!, literalVxK(p.inputs, p.options).finalState)).toBeLessThan(1e-13);
    // After the last token S^T k_{T-1} = v_{T-1}.
    for (let b = 0; b < batch; b++) {
      for (let hv = 0; hv < HV; hv++) {
        const ko = (b * T + T - 1) * H * K,
          sk = new Float64Array(V);
        for (let j = 0; j < V; j++)
          for (let i = 0; i < K; i++) sk[j] += r.finalState![((b * HV + hv) * K + i) * V + j] * p.inputs.k[ko + i];
        const vo = ((b * T + T - 1) * HV + hv) * V;
        expect(relErr(sk, p.inputs.v.subarray(vo, vo + V)), at).toBeLessThan(1e-13);
      }
    }
  });

  it('long runs of large |g| (cumulative g below -5000) stay finite and match the literal form', () => {
    const p = makeProblem({ name: '', batch: 1, T: 200, H: 1, HV: 2, K: 2, V: 2, h0: true, l2: true });
    for (let i = 0; i < p.inputs.g.length; i++) p.inputs.g[i] = i % 7 === 3 ? 0 : -30 - 30 * rand();
    const r = gatedDeltaRuleRef(p.inputs, p.options);
    expect(allFinite(r.o, r.finalState)).toBe(true);
    const lit = literalVxK(p.inputs, p.options);
    expect(relErr(r.o, lit.o)).toBeLessThan(1e-13);
    expect(relErr(r.finalState!, lit.finalState)).toBeLessThan(1e-13);
    const gr = gatedDeltaRuleRefBackward(p.inputs, p.options, {
      dO: normal(rand, r.o.length),
      dFinal: normal(rand, r.finalState!.length),
    });
    expect(allFinite(gr.dq, gr.dk, gr.dv, gr.dg, gr.dbeta, gr.dInitialState)).toBe(true);
    // The initial state is forgotten after the first decay (at most exp(-30)), so its gradient is tiny.
    expect(Math.max(...Array.from(gr.dInitialState!, Math.abs))).toBeLessThan(1e-10);
  });
});
