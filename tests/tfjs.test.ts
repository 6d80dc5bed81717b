// The TensorFlow.js bridge: every op's forward equals the core op; tf.grads of a random weighted sum of
// its outputs equals the core backward, and the gradient of the same recurrence written with tf ops
// (linear scan, selective scan, gated delta rule, Newton GRU, LSTM); tensors neither leak in tfjs nor in the package; conversions;
// the training examples (a Mamba-style block, an LSTM) bring their loss down.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import * as rkTf from '../lib/tfjs/index';
import { freshSeed, normal, relErr, rng } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;

beforeAll(async () => {
  tf.env().set('IS_TEST', true); // no "install tfjs-node" banner
  await tf.setBackend('cpu');
});

const tfRand = (shape: number[], scale = 1, map: (x: number) => number = (x) => x) =>
  tf.tensor(
    Float32Array.from(
      normal(
        rand,
        shape.reduce((a, b) => a * b, 1),
        scale,
      ),
      map,
    ),
    shape,
    'float32',
  );
const rkOf = (t: tf.Tensor) => rk.Tensor.from(Float32Array.from(t.dataSync()), t.shape);
const arr = (t: tf.Tensor | rk.Tensor | null | undefined) =>
  t ? Array.from(t instanceof tf.Tensor ? t.dataSync() : t.toFloat32Array()) : null;

interface Case {
  name: string;
  run: (inputs: Record<string, tf.Tensor>) => Record<string, tf.Tensor | null>;
  hooks: rk.OpHooks<object, object, object, unknown, object>;
  inputs: () => Record<string, tf.Tensor>;
  /** Which of the inputs are options of the core op (tensor options, e.g. initialState). */
  optionTensors?: string[];
  options: object;
  outputs: string[];
}

const cases: Case[] = [
  {
    name: 'linearScan',
    hooks: rk.ops.linearScan as never,
    outputs: ['h', 'finalState'],
    inputs: () => ({ a: tfRand([2, 3, 7], 0.4), b: tfRand([2, 3, 7]), initialState: tfRand([2, 3]) }),
    optionTensors: ['initialState'],
    options: { returnFinalState: true },
    run: ({ a, b, initialState }) => rkTf.linearScan({ a, b }, { initialState, returnFinalState: true }),
  },
  {
    name: 'selectiveScan',
    hooks: rk.ops.selectiveScan as never,
    outputs: ['y', 'finalState'],
    inputs: () => ({
      u: tfRand([2, 5, 9]),
      delta: tfRand([2, 5, 9], 0.3, Math.abs),
      A: tfRand([5, 3], 1, (x) => -Math.abs(x)),
      B: tfRand([2, 1, 3, 9]),
      C: tfRand([2, 1, 3, 9]),
      D: tfRand([5]),
      z: tfRand([2, 5, 9]),
    }),
    options: { returnFinalState: true, deltaSoftplus: true },
    run: (x) => rkTf.selectiveScan(x as never, { returnFinalState: true, deltaSoftplus: true }),
  },
  {
    name: 'gatedDeltaRule',
    hooks: rk.ops.gatedDeltaRule as never,
    outputs: ['o', 'finalState'],
    inputs: () => ({
      q: tfRand([1, 11, 2, 6]),
      k: tfRand([1, 11, 2, 6]),
      v: tfRand([1, 11, 2, 5]),
      g: tfRand([1, 11, 2], 0.1, (x) => -Math.abs(x)),
      beta: tfRand([1, 11, 2], 1, (x) => 1 / (1 + Math.exp(-x))),
      initialState: tfRand([1, 2, 6, 5], 0.3),
    }),
    optionTensors: ['initialState'],
    options: { useQkL2normInKernel: true, outputFinalState: true },
    run: ({ initialState, ...x }) =>
      rkTf.gatedDeltaRule(x as never, { initialState, useQkL2normInKernel: true, outputFinalState: true }),
  },
  {
    name: 'fusedRnn gru',
    hooks: rk.ops.fusedRnn as never,
    outputs: ['h', 'finalStates'],
    inputs: () => ({
      wx: tfRand([2, 6, 3, 2, 4]),
      R: tfRand([3, 2, 4, 4], 0.3),
      b: tfRand([3, 2, 4]),
      states0: tfRand([1, 2, 2, 4]),
    }),
    options: { cell: 'gru' },
    run: (x) => rkTf.fusedRnn(x as never, { cell: 'gru' }),
  },
  {
    name: 'newtonRnn gru-diag',
    hooks: rk.ops.newtonRnn as never,
    outputs: ['y', 'finalStates'],
    inputs: () => ({ wx: tfRand([2, 8, 3, 5]), R: tfRand([3, 5], 0.3), b: tfRand([3, 5]), h0: tfRand([1, 2, 5]) }),
    options: { cell: 'gru-diag' },
    run: (x) => rkTf.newtonRnn(x as never, { cell: 'gru-diag' }),
  },
  {
    name: 'linearAttention gated_delta, per-key decay, qwen gate',
    hooks: rk.ops.linearAttention as never,
    outputs: ['o', 'finalState'],
    inputs: () => ({
      q: tfRand([1, 11, 1, 6]),
      k: tfRand([1, 11, 2, 6]),
      v: tfRand([1, 11, 2, 5]),
      decay: tfRand([1, 11, 2, 6]),
      beta: tfRand([1, 11, 2]),
      initialState: tfRand([1, 2, 6, 5], 0.3),
      aLog: tfRand([2], 0.3),
      dtBias: tfRand([2, 6], 0.3),
    }),
    optionTensors: ['initialState', 'aLog', 'dtBias'],
    options: { gateActivation: 'qwen', betaActivation: 'sigmoid', qkL2Norm: true, outputFinalState: true },
    run: ({ initialState, aLog, dtBias, ...x }) =>
      rkTf.linearAttention(x as never, {
        initialState,
        aLog,
        dtBias,
        gateActivation: 'qwen',
        betaActivation: 'sigmoid',
        qkL2Norm: true,
        outputFinalState: true,
      }),
  },
  {
    name: 'causalConv1d silu, dilation 2',
    hooks: rk.ops.causalConv1d as never,
    outputs: ['y', 'finalState'],
    inputs: () => ({
      x: tfRand([2, 5, 9]),
      weight: tfRand([5, 3]),
      bias: tfRand([5]),
      initialState: tfRand([2, 5, 4]),
    }),
    optionTensors: ['initialState'],
    options: { activation: 'silu', dilation: 2, returnFinalState: true },
    run: ({ initialState, ...x }) =>
      rkTf.causalConv1d(x as never, { initialState, activation: 'silu', dilation: 2, returnFinalState: true }),
  },
  {
    name: 'mamba2Scan softplus, D per channel, z gate, two groups',
    hooks: rk.ops.mamba2Scan as never,
    outputs: ['y', 'finalStates'],
    inputs: () => ({
      x: tfRand([2, 9, 4, 3]),
      dt: tfRand([2, 9, 4]),
      A: tfRand([4], 0.3),
      B: tfRand([2, 9, 2, 5]),
      C: tfRand([2, 9, 2, 5]),
      D: tfRand([4, 3]),
      z: tfRand([2, 9, 4, 3]),
      dtBias: tfRand([4], 0.3),
      initialStates: tfRand([2, 4, 3, 5], 0.3),
    }),
    optionTensors: ['initialStates'],
    options: { dtSoftplus: true, returnFinalStates: true },
    run: ({ initialStates, ...x }) =>
      rkTf.mamba2Scan(x as never, { initialStates, dtSoftplus: true, returnFinalStates: true }),
  },
];

describe('recurrent-kernels/tfjs', () => {
  for (const c of cases) {
    it(`${c.name}: forward equals the core op; tf.grads equals the core backward`, () => {
      const inputs = c.inputs();
      const names = Object.keys(inputs);
      const weights = tf.tidy(() => {
        const out = c.run(inputs);
        return c.outputs.map((k) => tfRand(out[k]!.shape));
      });
      const before = tf.memory().numTensors,
        rkBefore = rk.memory().cpu.tensors;
      // Core op on copies of the same values.
      const coreIn: Record<string, rk.Tensor> = {},
        coreOpt: Record<string, unknown> = { ...c.options };
      for (const k of names) (c.optionTensors?.includes(k) ? coreOpt : coreIn)[k] = rkOf(inputs[k]);
      const core = c.hooks.forward(coreIn, coreOpt) as { outputs: Record<string, rk.Tensor>; ctx: unknown };
      const fwd = tf.tidy(() => {
        const out = c.run(inputs);
        return c.outputs.map((k) => out[k]!);
      });
      c.outputs.forEach((k, i) => expect(arr(fwd[i]), at(k)).toEqual(arr(core.outputs[k])));
      tf.dispose(fwd);
      const coreW = Object.fromEntries(c.outputs.map((k, i) => [k, rkOf(weights[i])]));
      const coreGrads = c.hooks.backward(core.ctx, coreW) as Record<string, rk.Tensor | null>;
      const grads = tf.tidy(() =>
        tf.grads((...xs: tf.Tensor[]) => {
          const out = c.run(Object.fromEntries(names.map((k, i) => [k, xs[i]])));
          return tf.addN(c.outputs.map((k, i) => tf.sum(tf.mul(out[k]!, weights[i]))));
        })(names.map((k) => inputs[k])),
      );
      names.forEach((k, i) => {
        const want = coreGrads[k];
        expect(want, k).toBeTruthy();
        expect(relErr(grads[i].dataSync(), want!.toFloat32Array()), at(`grad of ${k}`)).toBeLessThan(1e-6);
      });
      tf.dispose(grads);
      expect(tf.memory().numTensors, 'tf tensors left').toBe(before);
      for (const t of [
        ...Object.values(coreIn),
        ...Object.values(coreOpt),
        ...Object.values(core.outputs),
        ...Object.values(coreGrads),
        ...Object.values(coreW),
      ])
        if (rk.Tensor.isTensor(t)) t.dispose();
      rk.disposeCtx(core.ctx);
      expect(rk.memory().cpu.tensors, 'package tensors left').toBe(rkBefore);
      tf.dispose([...Object.values(inputs), ...weights]);
    });
  }

  it('newtonRnn returns its stats too, and the other outputs are null where the core op has none', () => {
    const x = cases[4].inputs();
    const r = tf.tidy(() => {
      const out = rkTf.newtonRnn(x as never, { cell: 'gru-diag' });
      expect(out.stats.converged).toEqual([true, true]);
      const l = rkTf.linearScan({ a: x.b.reshape([1, 3, 5]), b: x.b.reshape([1, 3, 5]) });
      expect(l.finalState).toBeNull();
      return out.y;
    });
    expect(r.shape).toEqual([2, 8, 5]);
    tf.dispose([r, ...Object.values(x)]);
  });
});

// The same recurrences written with tf ops, differentiated by TensorFlow.js itself.
function tfLinearScan(a: tf.Tensor, b: tf.Tensor, h0: tf.Tensor): tf.Tensor {
  const [B, C, L] = a.shape;
  let h = h0;
  const hs: tf.Tensor[] = [];
  for (let t = 0; t < L; t++) {
    h = tf.add(tf.mul(a.slice([0, 0, t], [B, C, 1]).reshape([B, C]), h), b.slice([0, 0, t], [B, C, 1]).reshape([B, C]));
    hs.push(h);
  }
  return tf.stack(hs, 2);
}

function tfSelectiveScan(u: tf.Tensor, delta: tf.Tensor, A: tf.Tensor, Bm: tf.Tensor, Cm: tf.Tensor): tf.Tensor {
  const [B, D, L] = u.shape,
    N = A.shape[1];
  let x = tf.zeros([B, D, N]);
  const ys: tf.Tensor[] = [];
  for (let t = 0; t < L; t++) {
    const dt = delta.slice([0, 0, t], [B, D, 1]); // [B, D, 1]
    const ut = u.slice([0, 0, t], [B, D, 1]);
    const bt = Bm.slice([0, 0, 0, t], [B, 1, N, 1]).reshape([B, 1, N]);
    const ct = Cm.slice([0, 0, 0, t], [B, 1, N, 1]).reshape([B, 1, N]);
    x = tf.add(tf.mul(tf.exp(tf.mul(dt, A.expandDims(0))), x), tf.mul(tf.mul(dt, ut), bt));
    ys.push(tf.sum(tf.mul(x, ct), 2));
  }
  return tf.stack(ys, 2);
}

/** LSTM with gates (i, f, z, o), wx [B, T, 4, H, D], R [4, H, D, D] (rec_j = sum_i h_i R[i][j]), b [4, H, D]. */
function tfLstm(wx: tf.Tensor, R: tf.Tensor, b: tf.Tensor): tf.Tensor {
  const [B, T, , H, D] = wx.shape;
  let h = tf.zeros([B, H, D]),
    c = tf.zeros([B, H, D]);
  const hs: tf.Tensor[] = [];
  for (let t = 0; t < T; t++) {
    const pre = [0, 1, 2, 3].map((g) => {
      const x = wx.slice([0, t, g, 0, 0], [B, 1, 1, H, D]).reshape([B, H, D]);
      const rg = R.slice([g, 0, 0, 0], [1, H, D, D]).reshape([H, D, D]);
      const rec = tf.matMul(h.transpose([1, 0, 2]), rg).transpose([1, 0, 2]); // [B, H, D]
      return tf.add(tf.add(x, rec), b.slice([g, 0, 0], [1, H, D]));
    });
    c = tf.add(tf.mul(tf.sigmoid(pre[1]), c), tf.mul(tf.sigmoid(pre[0]), tf.tanh(pre[2])));
    h = tf.mul(tf.sigmoid(pre[3]), tf.tanh(c));
    hs.push(h);
  }
  return tf.stack(hs, 1);
}

/**
 * The gated delta rule (H == HV, no L2 norm): S_t = exp(g_t) S + beta_t k_t (v_t - exp(g_t) S^T k_t)^T,
 * o_t = scale S_t^T q_t; returns o [B, T, HV, V] and the final state [B, HV, K, V], flattened and joined.
 */
function tfGatedDelta(
  q: tf.Tensor,
  k: tf.Tensor,
  v: tf.Tensor,
  g: tf.Tensor,
  beta: tf.Tensor,
  S0: tf.Tensor,
): tf.Tensor {
  const [B, T, H, K] = q.shape,
    V = v.shape[3];
  const scale = 1 / Math.sqrt(K);
  let S = S0;
  const os: tf.Tensor[] = [];
  for (let t = 0; t < T; t++) {
    const at = (x: tf.Tensor, n: number) => x.slice([0, t, 0, 0], [B, 1, H, n]).reshape([B, H, n]);
    const qt = at(q, K),
      kt = at(k, K),
      vt = at(v, V);
    const decay = tf.exp(g.slice([0, t, 0], [B, 1, H]).reshape([B, H, 1, 1]));
    const bt = beta.slice([0, t, 0], [B, 1, H]).reshape([B, H, 1]);
    const S1 = tf.mul(decay, S);
    const pred = tf.sum(tf.mul(S1, kt.expandDims(3)), 2); // [B, H, V]
    const u = tf.mul(bt, tf.sub(vt, pred));
    S = tf.add(S1, tf.mul(kt.expandDims(3), u.expandDims(2)));
    os.push(tf.mul(scale, tf.sum(tf.mul(S, qt.expandDims(3)), 2)));
  }
  return tf.concat([tf.stack(os, 1).flatten(), S.flatten()]);
}

/**
 * The diagonal GRU of newtonRnn's 'gru-diag' cell, sequentially: pre_g = wx_g + b_g + R_g h (per
 * channel) for r and z; n = tanh(wx_n + r (R_n h + b_n)); h = (1 - z) n + z h. Returns y and the final
 * state, flattened and joined.
 */
function tfGruDiag(wx: tf.Tensor, R: tf.Tensor, b: tf.Tensor, h0: tf.Tensor): tf.Tensor {
  const [B, T, , N] = wx.shape;
  let h = h0.reshape([B, N]);
  const gate = (x: tf.Tensor, g: number) => x.slice([g, 0], [1, N]).reshape([N]);
  const ys: tf.Tensor[] = [];
  for (let t = 0; t < T; t++) {
    const w = (g: number) => wx.slice([0, t, g, 0], [B, 1, 1, N]).reshape([B, N]);
    const r = tf.sigmoid(tf.add(tf.add(w(0), gate(b, 0)), tf.mul(gate(R, 0), h)));
    const z = tf.sigmoid(tf.add(tf.add(w(1), gate(b, 1)), tf.mul(gate(R, 1), h)));
    const n = tf.tanh(tf.add(w(2), tf.mul(r, tf.add(tf.mul(gate(R, 2), h), gate(b, 2)))));
    h = tf.add(tf.mul(tf.sub(1, z), n), tf.mul(z, h));
    ys.push(h);
  }
  return tf.concat([tf.stack(ys, 1).flatten(), h.flatten()]);
}

describe('recurrent-kernels/tfjs against the same recurrence in tf ops', () => {
  const check = (
    name: string,
    inputs: tf.Tensor[],
    ours: (...x: tf.Tensor[]) => tf.Tensor,
    theirs: (...x: tf.Tensor[]) => tf.Tensor,
  ) => {
    const w = tf.tidy(() => tfRand(ours(...inputs).shape));
    const loss =
      (f: (...x: tf.Tensor[]) => tf.Tensor) =>
      (...x: tf.Tensor[]) =>
        tf.sum(tf.mul(f(...x), w));
    const [y1, y2] = tf.tidy(() => [ours(...inputs), theirs(...inputs)]);
    expect(relErr(y1.dataSync(), y2.dataSync()), at(`${name} forward`)).toBeLessThan(1e-5);
    const g1 = tf.tidy(() => tf.grads(loss(ours))(inputs));
    const g2 = tf.tidy(() => tf.grads(loss(theirs))(inputs));
    g1.forEach((g, i) => expect(relErr(g.dataSync(), g2[i].dataSync()), at(`${name} grad ${i}`)).toBeLessThan(1e-4));
    tf.dispose([w, y1, y2, ...g1, ...g2, ...inputs]);
  };

  it('linear scan, with an initial state', () => {
    check(
      'linearScan',
      [tfRand([2, 3, 7], 0.4), tfRand([2, 3, 7]), tfRand([2, 3])],
      (a, b, h0) => rkTf.linearScan({ a, b }, { initialState: h0 }).h,
      tfLinearScan,
    );
  });

  it('selective scan', () => {
    check(
      'selectiveScan',
      [
        tfRand([2, 4, 9]),
        tfRand([2, 4, 9], 0.3, Math.abs),
        tfRand([4, 3], 1, (x) => -Math.abs(x)),
        tfRand([2, 1, 3, 9]),
        tfRand([2, 1, 3, 9]),
      ],
      (u, delta, A, B, C) => rkTf.selectiveScan({ u, delta, A, B, C }).y,
      tfSelectiveScan,
    );
  });

  it('gated delta rule, with an initial state and the final state', () => {
    check(
      'gatedDeltaRule',
      [
        tfRand([2, 6, 2, 4]),
        tfRand([2, 6, 2, 4], 0.5),
        tfRand([2, 6, 2, 3]),
        tfRand([2, 6, 2], 0.2, (x) => -Math.abs(x)),
        tfRand([2, 6, 2], 1, (x) => 1 / (1 + Math.exp(-x))),
        tfRand([2, 2, 4, 3], 0.3),
      ],
      (q, k, v, g, beta, S0) => {
        const { o, finalState } = rkTf.gatedDeltaRule(
          { q, k, v, g, beta },
          { initialState: S0, outputFinalState: true },
        );
        return tf.concat([o.flatten(), finalState!.flatten()]);
      },
      tfGatedDelta,
    );
  });

  it('newtonRnn gru-diag, with h0 and the final state', () => {
    check(
      'newtonRnn',
      [tfRand([2, 7, 3, 5]), tfRand([3, 5], 0.4), tfRand([3, 5]), tfRand([1, 2, 5])],
      (wx, R, b, h0) => {
        const { y, finalStates } = rkTf.newtonRnn({ wx, R, b, h0 }, { cell: 'gru-diag' });
        return tf.concat([y.flatten(), finalStates.flatten()]);
      },
      tfGruDiag,
    );
  });

  it('LSTM (fusedRnn), two heads', () => {
    check(
      'fusedRnn lstm',
      [tfRand([2, 5, 4, 2, 3]), tfRand([4, 2, 3, 3], 0.4), tfRand([4, 2, 3])],
      (wx, R, b) => rkTf.fusedRnn({ wx, R, b }, { cell: 'lstm' }).h,
      tfLstm,
    );
  });
});

describe('conversions', () => {
  it('toTf and fromTf share float32 CPU memory and convert the rest', () => {
    const before = rk.memory().cpu.tensors;
    const t = rk.Tensor.from([1, 2, 3, 4], [2, 2]);
    const x = rkTf.toTf(t);
    expect(x.dataSync()).toBe(t.dataSync()); // the same array
    expect(rk.memory().cpu.tensors).toBe(before); // now TensorFlow.js's
    const back = rkTf.fromTf(x);
    expect(back.dataSync()).toBe(x.dataSync());
    const half = rkTf.fromTf(x, { dtype: 'bfloat16' });
    expect(half.dtype).toBe('bfloat16');
    expect(Array.from(half.toFloat32Array())).toEqual([1, 2, 3, 4]);
    const x2 = rkTf.toTf(half);
    expect(Array.from(x2.dataSync())).toEqual([1, 2, 3, 4]);
    half.dispose();
    tf.dispose([x, x2]);
    expect(() => rkTf.fromTf(tf.tensor([1, 2], [2], 'int32'))).toThrow(rk.DTypeError);
  });
});

describe('the training examples', () => {
  const run = (file: string, steps: number) => {
    const r = spawnSync(process.execPath, [join(__dirname, '..', 'examples', file), String(steps)], {
      encoding: 'utf8',
    });
    const m = /loss fell ([\d.]+)x/.exec(r.stdout);
    if (r.status !== 0 || !m)
      throw new Error(`${file} failed (status ${r.status}):\n${r.stdout}\n${r.stderr.slice(-2000)}`);
    return Number(m[1]);
  };
  it('the Mamba-style block: the loss falls at least 3x in 150 Adam steps', () => {
    expect(run('tfjs-mamba.mjs', 150)).toBeGreaterThanOrEqual(3);
  }, 120_000);
  it('the LSTM: the loss falls at least 100x in 150 Adam steps', () => {
    expect(run('tfjs-lstm.mjs', 150)).toBeGreaterThanOrEqual(100);
  }, 120_000);
});
