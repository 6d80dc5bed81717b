// Every CUDA op once, forward and backward, at small awkward sizes, against the CPU kernels (which
// the test suite checks against float64 references): prints one JSON line
// { ok, ops: [{ op, pass, maxRelError, ms }] }. Small enough to run under compute-sanitizer.
// Exits 1 if CUDA is unusable or any relative error exceeds 1e-3. RK_SMOKE_TARGET=cpu compares the
// CPU with itself (a check of this script on a machine without a GPU).
import * as rk from '../dist/index.mjs';
import { forwardBackward, maxRelError } from './op-compare.mjs';

const target = process.env.RK_SMOKE_TARGET ?? 'cuda';
if (target === 'cuda' && !rk.cuda.available()) {
  console.error(`gpu-smoke: CUDA is not usable: ${rk.cuda.reason()}`);
  process.exit(1);
}

let seed = 12345;
const rand = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5;
const data = (shape) => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, rand);

// name -> { hooks or a plain function, inputs as [shape, options?] specs, op options }
const cases = [
  { op: 'linearScan', hooks: rk.ops.linearScan, inputs: { a: [[2, 5, 37]], b: [[2, 5, 37]] }, options: {} },
  {
    op: 'selectiveScan',
    hooks: rk.ops.selectiveScan,
    inputs: {
      u: [[2, 6, 45]],
      delta: [[2, 6, 45]],
      A: [[6, 5]],
      B: [[2, 5, 45]],
      C: [[2, 5, 45]],
      D: [[6]],
      z: [[2, 6, 45]],
      deltaBias: [[6]],
    },
    options: { deltaSoftplus: true },
  },
  {
    op: 'gatedDeltaRule',
    hooks: rk.ops.gatedDeltaRule,
    inputs: { q: [[1, 70, 2, 16]], k: [[1, 70, 2, 16]], v: [[1, 70, 4, 12]], g: [[1, 70, 4]], beta: [[1, 70, 4]] },
    options: { useQkL2normInKernel: true },
  },
  {
    op: 'linearAttention (gated_delta, per-key decay)',
    hooks: rk.ops.linearAttention,
    inputs: { q: [[1, 9, 1, 16]], k: [[1, 9, 2, 16]], v: [[1, 9, 2, 12]], decay: [[1, 9, 2, 16]], beta: [[1, 9, 2]] },
    options: { updateRule: 'gated_delta', qkL2Norm: true },
  },
  {
    op: 'causalConv1d',
    hooks: rk.ops.causalConv1d,
    inputs: { x: [[2, 20, 37]], weight: [[20, 4]], bias: [[20]] },
    options: { activation: 'silu' },
  },
  {
    op: 'mamba2Scan',
    hooks: rk.ops.mamba2Scan,
    inputs: {
      x: [[2, 33, 4, 6]],
      dt: [[2, 33, 4]],
      A: [[4]],
      B: [[2, 33, 2, 16]],
      C: [[2, 33, 2, 16]],
      D: [[4]],
      z: [[2, 33, 4, 6]],
      dtBias: [[4]],
    },
    options: { dtSoftplus: true },
  },
  {
    op: 'fusedRnn (lstm)',
    hooks: rk.ops.fusedRnn,
    inputs: { wx: [[3, 9, 4, 2, 16]], R: [[4, 2, 16, 16]], b: [[4, 2, 16]] },
    options: { cell: 'lstm' },
  },
  {
    op: 'fusedRnn (gru)',
    hooks: rk.ops.fusedRnn,
    inputs: { wx: [[3, 9, 3, 2, 16]], R: [[3, 2, 16, 16]], b: [[3, 2, 16]] },
    options: { cell: 'gru' },
  },
  {
    op: 'newtonRnn (gru-diag)',
    hooks: rk.ops.newtonRnn,
    inputs: { wx: [[2, 33, 3, 24]], R: [[3, 24]], b: [[3, 24]] },
    options: { cell: 'gru-diag' },
  },
];

const results = [];
for (const c of cases) {
  const host = Object.fromEntries(Object.entries(c.inputs).map(([k, [shape]]) => [k, { shape, values: data(shape) }]));
  const run = (device) => {
    const inputs = Object.fromEntries(
      Object.entries(host).map(([k, { shape, values }]) => [k, rk.Tensor.from(values, shape, { device })]),
    );
    seed = 777; // the same output gradients on both devices
    return forwardBackward(c.hooks, inputs, c.options, device, (t) => data(t.shape));
  };
  try {
    const cpu = run('cpu');
    const gpu = run(target);
    const err = maxRelError(gpu.flat, cpu.flat);
    results.push({ op: c.op, pass: err < 1e-3, maxRelError: err, ms: gpu.ms });
  } catch (e) {
    results.push({ op: c.op, pass: false, error: `${e.code ?? e.name}: ${e.message}` });
  }
}
const ok = results.every((r) => r.pass);
console.log(JSON.stringify({ ok, ops: results }));
process.exit(ok ? 0 : 1);
