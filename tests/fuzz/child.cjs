// One batch of the fuzz test (tests/fuzz.test.ts): random bad or borderline calls of every public op,
// backward hook, Tensor method and raw native function, from one seed. Prints one JSON line:
// { calls, typed, ok, untyped: [...], nonFinite: [...], baselineErrors: [...] }. A crash of this process
// is a failure of the test.
'use strict';
const rk = require(process.argv[2]);
const seed = Number(process.argv[3]);
const calls = Number(process.argv[4]);

let state = seed >>> 0;
function rand() {
  // mulberry32
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (xs) => xs[Math.floor(rand() * xs.length)];
const T = (shape, opts) =>
  rk.Tensor.from(
    Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rand() - 0.5),
    shape,
    opts,
  );

// Valid calls of every op at small, awkward sizes; each returns fresh inputs and options.
const baselines = {
  linearScan: () => ({
    f: rk.linearScan,
    hooks: rk.ops.linearScan,
    inputs: { a: T([2, 3, 5]), b: T([2, 3, 5]) },
    options: { reverse: false, initialState: T([2, 3]), returnFinalState: true },
  }),
  selectiveScan: () => ({
    f: rk.selectiveScan,
    hooks: rk.ops.selectiveScan,
    inputs: {
      u: T([2, 4, 6]),
      delta: T([2, 4, 6]),
      A: T([4, 3]),
      B: T([2, 3, 6]),
      C: T([2, 3, 6]),
      D: T([4]),
      z: T([2, 4, 6]),
      deltaBias: T([4]),
    },
    options: { deltaSoftplus: true, initialState: T([2, 4, 3]), returnFinalState: true },
  }),
  selectiveStateUpdate: () => ({
    f: rk.selectiveStateUpdate,
    inputs: {
      state: T([2, 4, 3]),
      x: T([2, 4]),
      dt: T([2, 4]),
      A: T([4, 3]),
      B: T([2, 3]),
      C: T([2, 3]),
      D: T([4]),
      z: T([2, 4]),
      dtBias: T([4]),
    },
    options: { dtSoftplus: true },
  }),
  gatedDeltaRule: () => ({
    f: rk.gatedDeltaRule,
    hooks: rk.ops.gatedDeltaRule,
    inputs: { q: T([1, 5, 2, 4]), k: T([1, 5, 2, 4]), v: T([1, 5, 2, 3]), g: T([1, 5, 2]), beta: T([1, 5, 2]) },
    options: { scale: 0.5, outputFinalState: true, useQkL2normInKernel: true, initialState: T([1, 2, 4, 3]) },
  }),
  gatedDeltaRuleStep: () => ({
    f: rk.gatedDeltaRuleStep,
    inputs: {
      state: T([1, 2, 4, 3]),
      q: T([1, 1, 2, 4]),
      k: T([1, 1, 2, 4]),
      v: T([1, 1, 2, 3]),
      g: T([1, 1, 2]),
      beta: T([1, 1, 2]),
    },
    options: { useQkL2normInKernel: true },
  }),
  fusedRnn: () => ({
    f: rk.fusedRnn,
    hooks: rk.ops.fusedRnn,
    inputs: { wx: T([2, 3, 4, 1, 5]), R: T([4, 1, 5, 5]), b: T([4, 1, 5]), states0: T([2, 2, 1, 5]) },
    options: { cell: 'lstm', lengths: [3, 2] },
  }),
  newtonRnn: () => ({
    f: rk.newtonRnn,
    hooks: rk.ops.newtonRnn,
    inputs: { wx: T([2, 5, 3, 4]), R: T([3, 1, 4, 4]), b: T([3, 4]), h0: T([1, 2, 4]) },
    options: { cell: 'gru', maxIters: 20 },
  }),
  linearAttention: () => ({
    f: rk.linearAttention,
    hooks: rk.ops.linearAttention,
    inputs: { q: T([1, 5, 1, 4]), k: T([1, 5, 2, 4]), v: T([1, 5, 2, 3]), decay: T([1, 5, 2, 4]), beta: T([1, 5, 2]) },
    options: {
      updateRule: 'gated_delta',
      gateActivation: 'qwen',
      aLog: T([2]),
      betaActivation: 'sigmoid',
      qkL2Norm: true,
      outputFinalState: true,
      initialState: T([1, 2, 4, 3]),
    },
  }),
  linearAttentionStep: () => ({
    f: rk.linearAttentionStep,
    inputs: { state: T([1, 2, 4, 3]), q: T([1, 2, 2, 4]), k: T([1, 2, 2, 4]), v: T([1, 2, 2, 3]), decay: T([1, 2, 2]) },
    options: { updateRule: 'gated', returnIntermediateStates: true },
  }),
  causalConv1d: () => ({
    f: rk.causalConv1d,
    hooks: rk.ops.causalConv1d,
    inputs: { x: T([2, 3, 7]), weight: T([3, 4]), bias: T([3]) },
    options: { activation: 'silu', dilation: 2, initialState: T([2, 3, 6]), returnFinalState: true },
  }),
  mamba2Scan: () => ({
    f: rk.mamba2Scan,
    hooks: rk.ops.mamba2Scan,
    inputs: {
      x: T([2, 5, 4, 3]),
      dt: T([2, 5, 4]),
      A: T([4]),
      B: T([2, 5, 2, 3]),
      C: T([2, 5, 2, 3]),
      D: T([4, 3]),
      z: T([2, 5, 4, 3]),
      dtBias: T([4]),
    },
    options: { dtSoftplus: true, dtLimit: [0.1, 5], initialStates: T([2, 4, 3, 3]), returnFinalStates: true },
  }),
  mamba2StateUpdate: () => ({
    f: rk.mamba2StateUpdate,
    inputs: {
      state: T([2, 4, 3, 3]),
      x: T([2, 4, 3]),
      dt: T([2, 4]),
      A: T([4]),
      B: T([2, 2, 3]),
      C: T([2, 2, 3]),
      D: T([4]),
      z: T([2, 4, 3]),
      dtBias: T([4]),
    },
    options: { dtSoftplus: true, returnIntermediateStates: true },
  }),
  add: () => ({ f: (x) => ({ out: rk.add(x?.a, x?.b) }), inputs: { a: T([3]), b: T([3]) }, options: undefined }),
  scale: () => ({ f: (x, o) => ({ out: rk.scale(x?.a, o) }), inputs: { a: T([3]) }, options: 2 }),
};

const junkValues = () => [
  null,
  undefined,
  0,
  -1,
  1.5,
  NaN,
  Infinity,
  -Infinity,
  1e39,
  2 ** 31,
  2 ** 53,
  'x',
  '',
  true,
  {},
  [],
  [1, 2],
  () => 1,
  Symbol('s'),
  new Int32Array([0, 5, 3]),
  new Float32Array(3),
  10n,
  Object.create({ inherited: true }),
  new Proxy(
    {},
    {
      get() {
        throw new Error('trap');
      },
    },
  ),
];
const junkTensors = () => [
  null,
  undefined,
  5,
  'x',
  [1, 2, 3],
  {},
  new Float32Array(6),
  T([1]),
  T([2, 3, 5]),
  T([0, 3]),
  T([3, 1, 1, 1, 1, 1]),
  T([2, 3, 5], { dtype: 'float16' }),
  T([2, 3, 5], { dtype: 'bfloat16' }),
  (() => {
    const t = T([2, 3]);
    t.dispose();
    return t;
  })(),
  Object.create(rk.Tensor.prototype),
];

function mutate(base) {
  const inputs = { ...base.inputs };
  let options = base.options && typeof base.options === 'object' ? { ...base.options } : base.options;
  const what = [];
  const n = 1 + Math.floor(rand() * 3);
  for (let i = 0; i < n; i++) {
    const r = rand();
    const keys = Object.keys(inputs);
    if (r < 0.35 && keys.length) {
      const k = pick(keys);
      inputs[k] = pick(junkTensors());
      what.push(`input ${k}`);
    } else if (r < 0.45 && keys.length) {
      const k = pick(keys);
      const t = inputs[k];
      let shape0 = null;
      try {
        shape0 = t.shape;
      } catch {
        /* a fake tensor */
      }
      if (Array.isArray(shape0) && shape0.length) {
        const shape = shape0.map((d) => (rand() < 0.3 ? pick([0, 1, d + 1, d - 1]) : d)).map((d) => Math.max(0, d));
        inputs[k] = T(shape);
        what.push(`shape of ${k}`);
      }
    } else if (r < 0.75 && options && Object.getPrototypeOf(options) === Object.prototype) {
      const k = pick([
        ...Object.keys(options),
        'cuSeqlens',
        'scale',
        'initialState',
        'stateWindow',
        'lengths',
        'cell',
        'bogus',
      ]);
      options[k] = pick(rand() < 0.5 ? junkValues() : junkTensors());
      what.push(`option ${k}`);
    } else if (r < 0.85) {
      options = pick(junkValues());
      what.push('options');
    } else if (r < 0.9) {
      delete inputs[pick(keys)];
      what.push('missing input');
    } else {
      what.push('inputs');
      return { inputs: pick(junkValues()), options, what };
    }
  }
  return { inputs, options, what };
}

const result = { calls: 0, typed: 0, ok: 0, untyped: [], nonFinite: [], baselineErrors: [] };
const typedOrRecord = (label, e) => {
  if (e instanceof rk.RecurrentKernelsError) result.typed++;
  else if (e instanceof Error && e.message === 'trap')
    result.typed++; // thrown by the fuzzer's own Proxy: passed through
  else if (result.untyped.length < 20)
    result.untyped.push(`${label}: ${e?.constructor?.name}: ${String(e?.message ?? e).slice(0, 200)}`);
  else result.untyped.push('...');
};
const tensorsIn = (x, out = []) => {
  if (x instanceof rk.Tensor) out.push(x);
  else if (x && typeof x === 'object' && !ArrayBuffer.isView(x)) for (const v of Object.values(x)) tensorsIn(v, out);
  return out;
};
const finite = (t) => {
  try {
    const d = t.to({ device: 'cpu', dtype: 'float32' }).dataSync();
    for (let i = 0; i < d.length; i++) if (!Number.isFinite(d[i])) return false;
  } catch {
    /* a disposed or foreign tensor: not an output of this call */
  }
  return true;
};

// Every baseline must run as written, or the fuzzing of that op means nothing.
for (const [name, make] of Object.entries(baselines)) {
  try {
    make().f(make().inputs, make().options);
  } catch (e) {
    result.baselineErrors.push(`${name}: ${e.message}`);
  }
}

const nativeFns = Object.entries(rk.internals.native()).filter(
  ([k, v]) =>
    typeof v === 'function' &&
    !['setBufferSource', 'cpuSetIsa', 'cpuSetThreads', 'cpuSetStepStallForTesting', 'timerStart', 'timerStop'].includes(
      k,
    ),
);

for (let i = 0; i < calls; i++) {
  result.calls++;
  const kind = rand();
  if (kind < 0.6) {
    const name = pick(Object.keys(baselines));
    const base = baselines[name]();
    const m = mutate(base);
    const label = `${name} [${m.what.join(', ')}]`;
    try {
      const out = base.f(m.inputs, m.options);
      result.ok++;
      // A factor above 1 may overflow a finite input legitimately (rk.scale of fp16 by 2^31).
      const overflowable = name === 'scale' && typeof m.options === 'number' && Math.abs(m.options) > 1;
      const inputsFinite = !overflowable && tensorsIn(m.inputs).every(finite) && tensorsIn(m.options).every(finite);
      if (inputsFinite && !tensorsIn(out).every(finite) && result.nonFinite.length < 20) result.nonFinite.push(label);
    } catch (e) {
      typedOrRecord(label, e);
    }
  } else if (kind < 0.8) {
    // Backward hooks with a valid, a partial or an altered ctx, and junk gradients.
    const name = pick([
      'linearScan',
      'selectiveScan',
      'gatedDeltaRule',
      'linearAttention',
      'causalConv1d',
      'mamba2Scan',
      'fusedRnn',
      'newtonRnn',
    ]);
    const base = baselines[name]();
    let ctx, outputs;
    try {
      ({ ctx, outputs } = base.hooks.forward(base.inputs, base.options));
    } catch (e) {
      typedOrRecord(`${name} forward`, e);
      continue;
    }
    const grads = {};
    for (const [k, t] of Object.entries(outputs))
      if (t instanceof rk.Tensor) grads[k] = rand() < 0.7 ? T(t.shape) : pick(junkTensors());
    let c = ctx;
    const r = rand();
    const what = [];
    if (r < 0.2) {
      c = pick(junkValues());
      what.push('junk ctx');
    } else if (r < 0.4 && ctx && typeof ctx === 'object') {
      c = { ...ctx };
      delete c[pick(Object.keys(c))];
      what.push('partial ctx');
    } else if (r < 0.6 && ctx && typeof ctx === 'object') {
      c = { ...ctx };
      const k = pick(Object.keys(c));
      c[k] =
        c[k] && typeof c[k] === 'object' && !(c[k] instanceof rk.Tensor)
          ? { ...c[k], [pick(Object.keys(c[k]).concat('batch'))]: pick(junkValues()) }
          : pick(junkValues());
      what.push(`altered ctx.${k}`);
    } else if (r < 0.7) {
      const other = baselines[pick(['linearScan', 'gatedDeltaRule'])]();
      try {
        c = other.hooks.forward(other.inputs, other.options).ctx;
      } catch (e) {
        typedOrRecord('foreign forward', e);
      }
      what.push('foreign ctx');
    }
    const g = rand() < 0.15 ? pick(junkValues()) : grads;
    const label = `${name}.backward [${what.join(', ') || 'valid ctx'}${g === grads ? '' : ', junk grads'}]`;
    try {
      const out = base.hooks.backward(c, g);
      result.ok++;
      if (c === ctx && g === grads && !tensorsIn(out).every(finite) && result.nonFinite.length < 20)
        result.nonFinite.push(label);
    } catch (e) {
      typedOrRecord(label, e);
    }
  } else if (kind < 0.9) {
    // Tensor methods and helpers with junk.
    const calls = [
      () =>
        rk.Tensor.from(
          pick(junkValues()),
          pick([[3], [1, 3], pick(junkValues())]),
          pick([undefined, null, {}, ...junkValues()]),
        ),
      () =>
        rk.Tensor.zeros(
          pick([[2, 3], [2 ** 40], [-1], [1.5], pick(junkValues())]),
          pick([undefined, null, ...junkValues()]),
        ),
      () => T([2, 3]).reshape(pick([[3, 2], [6], [7], pick(junkValues())])),
      () => T([2, 3]).to(pick(['cpu', 'cuda', { dtype: 'float16' }, ...junkValues()])),
      () =>
        new rk.Tensor(
          pick(junkValues()),
          pick([[3], pick(junkValues())]),
          pick(['float32', ...junkValues()]),
          pick(['cpu', 'tpu', ...junkValues()]),
        ),
      () => rk.add(pick(junkTensors()), pick(junkTensors())),
      () => rk.scale(T([3]), pick(junkValues())),
      () => rk.grad(pick(junkValues()))(T([3])),
      () => new rk.Tape().run(pick(junkValues())),
      () => rk.gradcheck(pick([(x) => rk.sum(x), ...junkValues()]), [pick(junkTensors())]),
      () => rk.defineOp(pick(junkValues())),
    ];
    try {
      pick(calls)();
      result.ok++;
    } catch (e) {
      typedOrRecord('tensor/autograd helper', e);
    }
  } else {
    // Raw native functions with random arguments.
    const [name, fn] = pick(nativeFns);
    const arg = () =>
      pick([
        ...junkValues(),
        'cpu',
        'float32',
        'float16',
        { batch: 2 ** 31, T: 3 },
        { q: new Float32Array(4) },
        new Float32Array(8),
        new Uint16Array(8),
      ]);
    const args = Array.from({ length: Math.floor(rand() * 12) }, arg);
    try {
      name === 'DeviceBuffer' ? new fn(...args) : fn(...args);
      result.ok++;
    } catch (e) {
      typedOrRecord(`native ${name}`, e);
    }
  }
}
console.log('RESULT ' + JSON.stringify(result));
