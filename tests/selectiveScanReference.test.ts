// The selective-scan oracle checked on its own: hand-computed cases, its backward against central
// finite differences for every input over many configurations, packed sequences against separate
// runs, and the decode step against the scan.
import { describe, expect, it } from 'vitest';
import {
  selectiveScanRef,
  selectiveScanRefBackward,
  selectiveStateUpdateRef,
  softplus,
  type SelectiveScanRefInputs,
  type SelectiveScanRefOptions,
} from './reference/selectiveScan';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

interface Config {
  name: string;
  batch: number;
  dim: number;
  seqlen: number;
  dstate: number;
  groups?: number;
  variableB: boolean;
  variableC: boolean;
  D?: boolean;
  z?: boolean;
  deltaBias?: boolean;
  softplus?: boolean;
  /** Raw dt (delta + bias) around the softplus threshold. */
  nearThreshold?: boolean;
  h0?: boolean;
  cuSeqlens?: number[];
}

interface Problem {
  inputs: SelectiveScanRefInputs;
  options: SelectiveScanRefOptions;
}

function makeProblem(c: Config): Problem {
  const { batch, dim, seqlen: L, dstate: N } = c;
  const groups = c.groups ?? 1;
  const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : batch;
  const BDL = batch * dim * L;
  const bc = (variable: boolean) => normal(rand, variable ? batch * groups * N * L : dim * N);
  const deltaBias = c.deltaBias ? uniform(rand, dim, -0.5, 0.5) : null;
  let delta: Float64Array;
  if (c.nearThreshold) {
    delta = uniform(rand, BDL, 17, 24);
    // Keep raw dt away from the threshold itself, where softplus jumps by about 2e-9.
    for (let i = 0; i < BDL; i++) {
      const d = Math.floor(i / L) % dim;
      const raw = delta[i] + (deltaBias ? deltaBias[d] : 0);
      if (Math.abs(raw - 20) < 0.05) delta[i] += 0.1;
    }
  } else {
    delta = c.softplus ? uniform(rand, BDL, -3, 1.5) : uniform(rand, BDL, 0.05, 1);
  }
  const inputs: SelectiveScanRefInputs = {
    u: normal(rand, BDL),
    delta,
    A: c.nearThreshold ? uniform(rand, dim * N, -0.1, -0.005) : uniform(rand, dim * N, -2, 0.3),
    B: bc(c.variableB),
    C: bc(c.variableC),
    D: c.D ? normal(rand, dim) : null,
    z: c.z ? normal(rand, BDL, 2) : null,
    deltaBias,
  };
  const options: SelectiveScanRefOptions = {
    batch,
    dim,
    seqlen: L,
    dstate: N,
    groups,
    variableB: c.variableB,
    variableC: c.variableC,
    deltaSoftplus: c.softplus ?? false,
    initialState: c.h0 ? normal(rand, nseq * dim * N) : null,
    cuSeqlens: c.cuSeqlens ?? null,
  };
  return { inputs, options };
}

const configs: Config[] = [
  {
    name: 'everything, variable B/C',
    batch: 2,
    dim: 4,
    seqlen: 5,
    dstate: 3,
    variableB: true,
    variableC: true,
    D: true,
    z: true,
    deltaBias: true,
    softplus: true,
    h0: true,
  },
  {
    name: 'nothing optional, constant B/C',
    batch: 2,
    dim: 3,
    seqlen: 6,
    dstate: 3,
    variableB: false,
    variableC: false,
  },
  {
    name: 'variable B, constant C, groups 2, D',
    batch: 1,
    dim: 4,
    seqlen: 7,
    dstate: 3,
    groups: 2,
    variableB: true,
    variableC: false,
    D: true,
    softplus: true,
  },
  {
    name: 'constant B, variable C, groups 2, z',
    batch: 2,
    dim: 4,
    seqlen: 4,
    dstate: 2,
    groups: 2,
    variableB: false,
    variableC: true,
    z: true,
    deltaBias: true,
  },
  {
    name: 'softplus near and above the threshold',
    batch: 2,
    dim: 2,
    seqlen: 6,
    dstate: 3,
    variableB: true,
    variableC: true,
    D: true,
    z: true,
    deltaBias: true,
    softplus: true,
    nearThreshold: true,
    h0: true,
  },
  {
    name: 'deltaBias without softplus, initial state',
    batch: 1,
    dim: 3,
    seqlen: 5,
    dstate: 3,
    variableB: true,
    variableC: true,
    deltaBias: true,
    h0: true,
  },
  {
    name: 'seqlen 1',
    batch: 3,
    dim: 2,
    seqlen: 1,
    dstate: 3,
    variableB: true,
    variableC: true,
    D: true,
    z: true,
    softplus: true,
    h0: true,
  },
  {
    name: 'dstate 1',
    batch: 2,
    dim: 4,
    seqlen: 6,
    dstate: 1,
    groups: 2,
    variableB: true,
    variableC: true,
    D: true,
    z: true,
    deltaBias: true,
    softplus: true,
  },
  {
    name: 'packed, empty sequence, padded tail',
    batch: 1,
    dim: 4,
    seqlen: 13,
    dstate: 3,
    groups: 2,
    variableB: true,
    variableC: true,
    D: true,
    z: true,
    deltaBias: true,
    softplus: true,
    h0: true,
    cuSeqlens: [0, 3, 3, 7, 11],
  },
  {
    name: 'packed, constant B/C, no initial state',
    batch: 1,
    dim: 2,
    seqlen: 9,
    dstate: 2,
    variableB: false,
    variableC: false,
    D: true,
    softplus: true,
    cuSeqlens: [0, 0, 4, 6],
  },
];

/** The differentiable arrays of a problem (the problem's own arrays, so perturbing them moves the loss), by name. */
function parts(p: Problem): { names: string[]; arrays: Float64Array[] } {
  const names: string[] = [],
    arrays: Float64Array[] = [];
  const add = (name: string, a: unknown) => {
    if (a) {
      names.push(name);
      arrays.push(a as Float64Array);
    }
  };
  add('u', p.inputs.u);
  add('delta', p.inputs.delta);
  add('A', p.inputs.A);
  add('B', p.inputs.B);
  add('C', p.inputs.C);
  add('D', p.inputs.D);
  add('z', p.inputs.z);
  add('deltaBias', p.inputs.deltaBias);
  add('initialState', p.options.initialState);
  return { names, arrays };
}

const LINEAR = new Set(['u', 'B', 'C', 'D', 'initialState']);

const gradName: Record<string, keyof ReturnType<typeof selectiveScanRefBackward>> = {
  u: 'du',
  delta: 'ddelta',
  A: 'dA',
  B: 'dB',
  C: 'dC',
  D: 'dD',
  z: 'dz',
  deltaBias: 'dDeltaBias',
  initialState: 'dInitialState',
};

function checkAgainstFd(p: Problem, wy: Float64Array | null, wf: Float64Array | null, what: string): void {
  // The arrays are perturbed in place, so the loss simply reruns the oracle on p.
  const { names, arrays } = parts(p);
  const loss = () => {
    const r = selectiveScanRef(p.inputs, p.options);
    return (wy ? dot(r.y, wy) : 0) + (wf ? dot(r.finalState, wf) : 0);
  };
  // The loss is linear in u, B, C, D and initialState: a large step is exact there and adds no
  // rounding noise. A multiplies dt (up to ~25 here), so its step stays small.
  const fd = finiteDifferences(
    loss,
    arrays,
    names.map((n) => (LINEAR.has(n) ? 1e-2 : n === 'A' ? 1e-6 : 1e-5)),
  );
  const g = selectiveScanRefBackward(p.inputs, p.options, { dy: wy, dFinal: wf });
  names.forEach((name, k) => {
    const ours = g[gradName[name]] as Float64Array | null;
    expect(ours, `${name} ${what} ${at}`).not.toBeNull();
    expect(relErr(ours!, fd[k]), `grad ${name} ${what} ${at}`).toBeLessThan(1e-7);
  });
  // Absent optional inputs get null gradients.
  if (!p.inputs.D) expect(g.dD).toBeNull();
  if (!p.inputs.z) expect(g.dz).toBeNull();
  if (!p.inputs.deltaBias) expect(g.dDeltaBias).toBeNull();
  if (!p.options.initialState) expect(g.dInitialState).toBeNull();
}

describe('selective scan oracle: hand-computed cases', () => {
  // dt = 1 everywhere (delta 0.25 + bias 0.75), decays exp(A) = 1/2 and 1/4, B = [1, 2], C = [3, -1],
  // D = 0.5, x_{-1} = [4, 8], u = [2, -1]:
  //   t=0: x = [0.5*4 + 2, 0.25*8 + 4] = [4, 6];     y = 12 - 6 + 1 = 7
  //   t=1: x = [0.5*4 - 1, 0.25*6 - 2] = [1, -0.5];  y = 3 + 0.5 - 0.5 = 3
  const inputs: SelectiveScanRefInputs = {
    u: [2, -1],
    delta: [0.25, 0.25],
    A: [Math.log(0.5), Math.log(0.25)],
    B: [1, 2],
    C: [3, -1],
    D: [0.5],
    deltaBias: [0.75],
  };
  const options: SelectiveScanRefOptions = {
    batch: 1,
    dim: 1,
    seqlen: 2,
    dstate: 2,
    variableB: false,
    variableC: false,
    initialState: [4, 8],
  };

  it('two steps with constant B/C, D, deltaBias and an initial state', () => {
    const r = selectiveScanRef(inputs, { ...options, returnStates: true });
    expect(relErr(r.y, [7, 3])).toBeLessThan(1e-15);
    expect(relErr(r.finalState, [1, -0.5])).toBeLessThan(1e-15);
    expect(relErr(r.states!, [4, 6, 1, -0.5])).toBeLessThan(1e-15);
  });

  it('the same case with z gates y by z * sigmoid(z)', () => {
    const r = selectiveScanRef({ ...inputs, z: [0, Math.log(3)] }, options);
    expect(relErr(r.y, [0, 3 * 0.75 * Math.log(3)])).toBeLessThan(1e-15);
  });

  it('the same case as variable B/C (batch 1, groups 1) and as a decode step', () => {
    const v = selectiveScanRef(
      { ...inputs, B: [1, 1, 2, 2], C: [3, 3, -1, -1] },
      { ...options, variableB: true, variableC: true },
    );
    expect(relErr(v.y, [7, 3])).toBeLessThan(1e-15);
    const s = selectiveStateUpdateRef(
      {
        state: [4, 8],
        x: [2, -1],
        dt: [0.25, 0.25],
        dtBias: [0.75],
        A: inputs.A,
        B: [1, 1, 2, 2],
        C: [3, 3, -1, -1],
        D: [0.5],
      },
      { batch: 1, dim: 1, dstate: 2, tokens: 2 },
    );
    expect(relErr(s.y, [7, 3])).toBeLessThan(1e-15);
    expect(relErr(s.state, [1, -0.5])).toBeLessThan(1e-15);
    expect(relErr(s.intermediateStates, [4, 6, 1, -0.5])).toBeLessThan(1e-15);
  });

  it('gradients of the hand case', () => {
    // y_0 = C . (decay * x_{-1}) + ..., so dy_0/dx_{-1} = C * decay = [1.5, -0.25];
    // dy_1/dx_{-1} = C * decay^2 = [0.75, -0.0625]; dy/dD = u; dy_1/du_0 = sum_n C_n decay_n dt B_n = 1.5 - 0.5.
    const g0 = selectiveScanRefBackward(inputs, options, { dy: [1, 0] });
    expect(relErr(g0.dInitialState!, [1.5, -0.25])).toBeLessThan(1e-15);
    expect(relErr(g0.dD!, [2])).toBeLessThan(1e-15);
    const g1 = selectiveScanRefBackward(inputs, options, { dy: [0, 1] });
    expect(relErr(g1.dInitialState!, [0.75, -0.0625])).toBeLessThan(1e-15);
    expect(relErr(g1.dD!, [-1])).toBeLessThan(1e-15);
    expect(g1.du[0]).toBeCloseTo(1.5 * 1 + -0.25 * 2 * 1, 14);
    // dy_1/dC = x_1; dy_1/dB_n = C_n * dt * (u_1 + decay_n * u_0) = [3 * 0, -1 * -0.5].
    expect(relErr(g1.dC, [1, -0.5])).toBeLessThan(1e-15);
    expect(relErr(g1.dB, [0, 0.5])).toBeLessThan(1e-15);
    // Through the final state: dFinal = [1, 0] gives dx_{-1} = [decay^2, 0] = [0.25, 0].
    const gf = selectiveScanRefBackward(inputs, options, { dFinal: [1, 0] });
    expect(relErr(gf.dInitialState!, [0.25, 0])).toBeLessThan(1e-15);
    expect(relErr(gf.du, [0.5, 1])).toBeLessThan(1e-15); // du_t = decay_0^(1-t) * dt * B_0
  });

  it('softplus: ln 2 at 0, identity above 20, slope 1/2 at 0 and 1 above', () => {
    // A = 0, B = C = 1, u = 1: x_t = x_{t-1} + dt_t, y_t = x_t.
    const i: SelectiveScanRefInputs = { u: [1, 1], delta: [25, 0], A: [0], B: [1], C: [1] };
    const o: SelectiveScanRefOptions = {
      batch: 1,
      dim: 1,
      seqlen: 2,
      dstate: 1,
      variableB: false,
      variableC: false,
      deltaSoftplus: true,
    };
    expect(relErr(selectiveScanRef(i, o).y, [25, 25 + Math.LN2])).toBeLessThan(1e-15);
    const g = selectiveScanRefBackward(i, o, { dy: [0, 1] });
    expect(relErr(g.ddelta, [1, 0.5])).toBeLessThan(1e-15);
    expect(softplus(20)).toBeCloseTo(20 + Math.log1p(Math.exp(-20)), 12);
    expect(softplus(20.5)).toBe(20.5);
    expect(softplus(-30)).toBeGreaterThan(0);
  });

  it('channel d reads group floor(d / (dim / groups))', () => {
    // dim 4, groups 2: channels 0, 1 read group 0 and channels 2, 3 read group 1, which is zero.
    const dim = 4,
      L = 3,
      N = 2;
    const B = new Float64Array(2 * N * L);
    for (let i = 0; i < N * L; i++) B[i] = 1;
    const i: SelectiveScanRefInputs = {
      u: new Float64Array(dim * L).fill(1),
      delta: new Float64Array(dim * L).fill(0.5),
      A: new Float64Array(dim * N).fill(-1),
      B,
      C: new Float64Array(dim * N).fill(1),
      D: [0, 0, 0.25, 0.25],
    };
    const r = selectiveScanRef(i, {
      batch: 1,
      dim,
      seqlen: L,
      dstate: N,
      groups: 2,
      variableB: true,
      variableC: false,
    });
    for (let t = 0; t < L; t++) {
      expect(r.y[0 * L + t]).toBeGreaterThan(0.5);
      expect(r.y[2 * L + t]).toBe(0.25);
      expect(r.y[3 * L + t]).toBe(0.25);
    }
  });
});

describe('selective scan oracle: backward equals finite differences', () => {
  it.each(configs.map((c) => [c.name, c] as const))('%s', (_, c) => {
    const p = makeProblem(c);
    const nseq = c.cuSeqlens ? c.cuSeqlens.length - 1 : c.batch;
    const wy = normal(rand, c.batch * c.dim * c.seqlen);
    const wf = normal(rand, nseq * c.dim * c.dstate);
    checkAgainstFd(p, wy, wf, 'dy and dFinal');
  });

  it('from dy alone and from dFinal alone', () => {
    const c = configs[0];
    const p = makeProblem(c);
    checkAgainstFd(p, normal(rand, c.batch * c.dim * c.seqlen), null, 'dy only');
    checkAgainstFd(p, null, normal(rand, c.batch * c.dim * c.dstate), 'dFinal only');
  });
});

describe('selective scan oracle: consistency', () => {
  it('a variable B/C equal to a constant one (groups = dim, constant over batch and time) gives the same result', () => {
    const batch = 2,
      dim = 3,
      L = 5,
      N = 3;
    const p = makeProblem({
      name: '',
      batch,
      dim,
      seqlen: L,
      dstate: N,
      variableB: false,
      variableC: false,
      D: true,
      z: true,
      softplus: true,
      h0: true,
    });
    const broadcast = (x: ArrayLike<number>) => {
      const out = new Float64Array(batch * dim * N * L);
      for (let b = 0; b < batch; b++)
        for (let d = 0; d < dim; d++)
          for (let n = 0; n < N; n++) for (let t = 0; t < L; t++) out[((b * dim + d) * N + n) * L + t] = x[d * N + n];
      return out;
    };
    const varInputs = { ...p.inputs, B: broadcast(p.inputs.B), C: broadcast(p.inputs.C) };
    const varOptions = { ...p.options, groups: dim, variableB: true, variableC: true };
    const rc = selectiveScanRef(p.inputs, p.options),
      rv = selectiveScanRef(varInputs, varOptions);
    expect(relErr(rv.y, rc.y)).toBeLessThan(1e-14);
    expect(relErr(rv.finalState, rc.finalState)).toBeLessThan(1e-14);
    // Grads of the variable form, summed over batch and time, are the constant form's grads.
    const dy = normal(rand, batch * dim * L),
      dFinal = normal(rand, batch * dim * N);
    const gc = selectiveScanRefBackward(p.inputs, p.options, { dy, dFinal });
    const gv = selectiveScanRefBackward(varInputs, varOptions, { dy, dFinal });
    const reduce = (g: Float64Array) => {
      const out = new Float64Array(dim * N);
      for (let b = 0; b < batch; b++)
        for (let d = 0; d < dim; d++)
          for (let n = 0; n < N; n++) for (let t = 0; t < L; t++) out[d * N + n] += g[((b * dim + d) * N + n) * L + t];
      return out;
    };
    expect(relErr(reduce(gv.dB), gc.dB)).toBeLessThan(1e-13);
    expect(relErr(reduce(gv.dC), gc.dC)).toBeLessThan(1e-13);
    expect(relErr(gv.du, gc.du)).toBeLessThan(1e-13);
    expect(relErr(gv.dA, gc.dA)).toBeLessThan(1e-13);
  });

  it('packed sequences equal separate runs; the padded tail gives y = 0 and zero gradients', () => {
    const cu = [0, 3, 3, 7, 11],
      L = 13,
      dim = 4,
      N = 3,
      groups = 2;
    const p = makeProblem({
      name: '',
      batch: 1,
      dim,
      seqlen: L,
      dstate: N,
      groups,
      variableB: true,
      variableC: true,
      D: true,
      z: true,
      deltaBias: true,
      softplus: true,
      h0: true,
      cuSeqlens: cu,
    });
    const dy = normal(rand, dim * L),
      dFinal = normal(rand, (cu.length - 1) * dim * N);
    const packed = selectiveScanRef(p.inputs, { ...p.options, returnStates: true });
    const gp = selectiveScanRefBackward(p.inputs, p.options, { dy, dFinal });
    // Slices [.., start, start + len) along the last axis of [rows, L] data, and back.
    const cut = (x: ArrayLike<number>, rows: number, s: number, n: number) => {
      const out = new Float64Array(rows * n);
      for (let r = 0; r < rows; r++) for (let t = 0; t < n; t++) out[r * n + t] = x[r * L + s + t];
      return out;
    };
    for (let s = 0; s + 1 < cu.length; s++) {
      const start = cu[s],
        n = cu[s + 1] - cu[s];
      const h0 = (p.options.initialState as Float64Array).subarray(s * dim * N, (s + 1) * dim * N);
      const fin = packed.finalState.subarray(s * dim * N, (s + 1) * dim * N);
      if (n === 0) {
        expect(Array.from(fin)).toEqual(Array.from(h0));
        expect(Array.from(gp.dInitialState!.subarray(s * dim * N, (s + 1) * dim * N))).toEqual(
          Array.from(dFinal.subarray(s * dim * N, (s + 1) * dim * N)),
        );
        continue;
      }
      const inputs: SelectiveScanRefInputs = {
        ...p.inputs,
        u: cut(p.inputs.u, dim, start, n),
        delta: cut(p.inputs.delta, dim, start, n),
        z: cut(p.inputs.z!, dim, start, n),
        B: cut(p.inputs.B, groups * N, start, n),
        C: cut(p.inputs.C, groups * N, start, n),
      };
      const options: SelectiveScanRefOptions = { ...p.options, seqlen: n, cuSeqlens: null, initialState: h0 };
      const one = selectiveScanRef(inputs, options);
      const what = `sequence ${s} ${at}`;
      expect(relErr(cut(packed.y, dim, start, n), one.y), what).toBeLessThan(1e-15);
      expect(relErr(fin, one.finalState), what).toBeLessThan(1e-15);
      const g = selectiveScanRefBackward(inputs, options, {
        dy: cut(dy, dim, start, n),
        dFinal: dFinal.subarray(s * dim * N, (s + 1) * dim * N),
      });
      expect(relErr(cut(gp.du, dim, start, n), g.du), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.ddelta, dim, start, n), g.ddelta), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dz!, dim, start, n), g.dz!), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dB, groups * N, start, n), g.dB), what).toBeLessThan(1e-15);
      expect(relErr(cut(gp.dC, groups * N, start, n), g.dC), what).toBeLessThan(1e-15);
      expect(relErr(gp.dInitialState!.subarray(s * dim * N, (s + 1) * dim * N), g.dInitialState!), what).toBeLessThan(
        1e-15,
      );
    }
    const tail = cu[cu.length - 1];
    for (let d = 0; d < dim; d++) {
      for (let t = tail; t < L; t++) {
        const i = d * L + t;
        expect([packed.y[i], gp.du[i], gp.ddelta[i], gp.dz![i]]).toEqual([0, 0, 0, 0]);
      }
    }
    for (let r = 0; r < groups * N; r++)
      for (let t = tail; t < L; t++) expect([gp.dB[r * L + t], gp.dC[r * L + t]]).toEqual([0, 0]);
    for (let t = tail; t < L; t++) for (let k = 0; k < dim * N; k++) expect(packed.states![t * dim * N + k]).toBe(0);
  });

  it.each([1, 4])('the decode step equals the scan (%i tokens), and its states are the scan trajectory', (T) => {
    const batch = 2,
      dim = 4,
      N = 3,
      groups = 2,
      L = 6;
    const p = makeProblem({
      name: '',
      batch,
      dim,
      seqlen: L,
      dstate: N,
      groups,
      variableB: true,
      variableC: true,
      D: true,
      z: true,
      deltaBias: true,
      softplus: true,
      h0: true,
    });
    const scan = selectiveScanRef(p.inputs, { ...p.options, returnStates: true });
    // The state entering position L - T: the scan's state after position L - T - 1.
    const state = new Float64Array(batch * dim * N);
    for (let b = 0; b < batch; b++) {
      for (let k = 0; k < dim * N; k++) state[b * dim * N + k] = scan.states![(b * L + L - T - 1) * dim * N + k];
    }
    const last = (x: ArrayLike<number>, rows: number) => {
      const out = new Float64Array(rows * T);
      for (let r = 0; r < rows; r++) for (let t = 0; t < T; t++) out[r * T + t] = x[r * L + L - T + t];
      return out;
    };
    const su = selectiveStateUpdateRef(
      {
        state,
        x: last(p.inputs.u, batch * dim),
        dt: last(p.inputs.delta, batch * dim),
        A: p.inputs.A,
        B: last(p.inputs.B, batch * groups * N),
        C: last(p.inputs.C, batch * groups * N),
        D: p.inputs.D,
        z: last(p.inputs.z!, batch * dim),
        dtBias: p.inputs.deltaBias,
      },
      { batch, dim, dstate: N, groups, tokens: T, dtSoftplus: true },
    );
    expect(relErr(su.y, last(scan.y, batch * dim)), at).toBeLessThan(1e-14);
    expect(relErr(su.state, scan.finalState), at).toBeLessThan(1e-14);
    const traj = new Float64Array(batch * T * dim * N);
    for (let b = 0; b < batch; b++) {
      for (let t = 0; t < T; t++)
        for (let k = 0; k < dim * N; k++)
          traj[(b * T + t) * dim * N + k] = scan.states![(b * L + L - T + t) * dim * N + k];
    }
    expect(relErr(su.intermediateStates, traj), at).toBeLessThan(1e-14);
    // The input state is left as it was.
    expect(state[0]).toBe(scan.states![(L - T - 1) * dim * N]);
  });

  it('the whole scan from its initial state is a decode of seqlen tokens', () => {
    const batch = 1,
      dim = 2,
      N = 2,
      L = 5;
    const p = makeProblem({
      name: '',
      batch,
      dim,
      seqlen: L,
      dstate: N,
      variableB: true,
      variableC: true,
      D: true,
      h0: true,
    });
    const scan = selectiveScanRef(p.inputs, { ...p.options, returnStates: true });
    const su = selectiveStateUpdateRef(
      {
        state: p.options.initialState!,
        x: p.inputs.u,
        dt: p.inputs.delta,
        A: p.inputs.A,
        B: p.inputs.B,
        C: p.inputs.C,
        D: p.inputs.D,
      },
      { batch, dim, dstate: N, tokens: L },
    );
    expect(relErr(su.y, scan.y)).toBeLessThan(1e-14);
    expect(relErr(su.intermediateStates, scan.states!)).toBeLessThan(1e-14);
  });

  it('rejects inputs that do not match the dims', () => {
    const p = makeProblem(configs[0]);
    expect(() => selectiveScanRef({ ...p.inputs, B: new Float64Array(3) }, p.options)).toThrow(/B has 3 elements/);
    expect(() => selectiveScanRef(p.inputs, { ...p.options, groups: 3 })).toThrow(/multiple of groups/);
    expect(() => selectiveScanRef(p.inputs, { ...p.options, cuSeqlens: [0, 2] })).toThrow(/batch == 1/);
  });
});
