// The CUDA launch paths against each other on a device (a step of npm run gpu:verify):
//   - the fused cells' multi-block persistent path (heads split over co-resident blocks, a grid
//     barrier each step) against the single-block persistent path, LSTM and GRU at headDim 128 and
//     256, T = 4096, forward and backward, 30 repeats each: the two do the same arithmetic in the
//     same order, so any bit that differs (between paths or between repeats) is an ordering bug;
//   - which path the fused cells' plan takes at headDim 768 (the single-block kernel's shared memory
//     and the multi-block kernel's residency on this device decide);
//   - the Newton RNN's iteration counts per batch row on the device against the CPU kernels' for
//     the same inputs (mode 'newton' on both; the CUDA emulator's test expects them equal);
//   - accuracy at the anchor sizes (the issue benchmarks' shapes, default paths): forward and
//     backward on the device against the CPU kernels (which the test suite checks against float64),
//     the largest relative error (in norm) over the outputs and gradients; at most 1e-3 in fp32,
//     3e-2 with bf16 operands.
// Paths are pinned through RK_CUDA_TUNE (cuda/common/launch.cuh), read once per process, so each
// pinned run is a child process of this script: `node scripts/gpu-paths.mjs --child <task>` prints
// one JSON line. The parent prints { ok, fused: [...], plan768: {...}, newton: [...] } as one JSON
// line; exit code 1 if a comparison fails, 2 without a usable GPU.
// RK_GPU_PATHS_QUICK=1 runs 3 repeats at T = 256 (a check of the script itself).
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import * as rk from '../dist/index.mjs';
import { forwardBackward, maxRelError } from './op-compare.mjs';

const quick = process.env.RK_GPU_PATHS_QUICK === '1';
// RK_GPU_PATHS_DEVICE=cpu runs the same steps on the CPU (a check of this script without a GPU; the
// pins then change nothing).
const device = process.env.RK_GPU_PATHS_DEVICE ?? 'cuda';
const T = quick ? 256 : 4096;
const REPEATS = quick ? 3 : 30;
const BATCH = 8;
const GATES = { lstm: 4, gru: 3 };

let seed = 2468;
const rand = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5;
const data = (n, scale = 1) => Float32Array.from({ length: n }, () => scale * rand());

/** The fused cells at one size, `REPEATS` times: a hash of every output and gradient per repeat. */
function fusedHashes(cell, D) {
  seed = 1000 + D;
  const G = GATES[cell];
  const host = {
    wx: [[BATCH, T, G, 1, D], data(BATCH * T * G * D)],
    R: [[G, 1, D, D], data(G * D * D, 1 / Math.sqrt(D))],
    b: [[G, 1, D], data(G * D, 0.1)],
  };
  const dh = data(BATCH * T * D);
  const hashes = [];
  for (let r = 0; r < REPEATS; r++) {
    const inputs = Object.fromEntries(
      Object.entries(host).map(([k, [shape, v]]) => [k, rk.Tensor.from(v, shape, { device })]),
    );
    const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, { cell });
    const grads = rk.ops.fusedRnn.backward(ctx, { h: rk.Tensor.from(dh, outputs.h.shape, { device }) });
    const h = createHash('sha256');
    for (const t of [outputs.h, grads.wx, grads.R, grads.b]) h.update(Buffer.from(t.toFloat32Array().buffer));
    hashes.push(h.digest('hex').slice(0, 16));
    for (const t of [...Object.values(inputs), ...Object.values(outputs), ...Object.values(grads)])
      if (t instanceof rk.Tensor) t.dispose();
  }
  return hashes;
}

/** Whether the fused cells run at headDim D under the pinned path (forward and backward). */
function runsAt(D) {
  try {
    fusedOnce('lstm', D);
    return { ok: true };
  } catch (e) {
    return { ok: false, why: `${e.code ?? e.name}: ${e.message}` };
  }
}
function fusedOnce(cell, D) {
  seed = 99;
  const G = GATES[cell];
  const inputs = {
    wx: rk.Tensor.from(data(2 * 16 * G * D), [2, 16, G, 1, D], { device }),
    R: rk.Tensor.from(data(G * D * D, 1 / Math.sqrt(D)), [G, 1, D, D], { device }),
    b: rk.Tensor.from(data(G * D, 0.1), [G, 1, D], { device }),
  };
  const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, { cell });
  rk.ops.fusedRnn.backward(ctx, { h: rk.Tensor.from(data(2 * 16 * D), outputs.h.shape, { device }) });
  if (device === 'cuda') rk.cuda.synchronize();
}

/** Newton iteration counts per batch row on the device and on the CPU, at the anchor's shape. */
function newtonCounts() {
  const out = [];
  for (const [cell, B, len, D] of [
    ['gru-diag', 8, quick ? 256 : 4096, 1024],
    ['lstm-cifg-diag', 4, quick ? 128 : 2048, 256],
  ]) {
    seed = 4242;
    const G = 3;
    const host = {
      wx: [[B, len, G, D], data(B * len * G * D)],
      R: [[G, D], data(G * D)],
      b: [[G, D], data(G * D, 0.1)],
    };
    const counts = {};
    for (const [name, on] of [
      ['cpu', 'cpu'],
      ['device', device],
    ]) {
      const inputs = Object.fromEntries(
        Object.entries(host).map(([k, [shape, v]]) => [k, rk.Tensor.from(v, shape, { device: on })]),
      );
      const r = rk.newtonRnn(inputs, { cell, mode: 'newton' });
      counts[name] = Array.from(r.stats.iterations);
      for (const t of [...Object.values(inputs), r.y, r.finalStates, r.trajectory]) t?.dispose?.();
    }
    out.push({ cell, size: `${B}x${len}x${D}`, ...counts, equal: counts.cpu.join() === counts.device.join() });
  }
  return out;
}

/** Forward + backward of each op at its anchor size, device against CPU. */
function anchors() {
  const bf16 = 'bfloat16';
  const cases = [
    { op: 'linearScan (8,1536,4096)', hooks: rk.ops.linearScan, inputs: { a: [8, 1536, 4096], b: [8, 1536, 4096] } },
    {
      op: 'selectiveScan (4,2048,2048,16)',
      hooks: rk.ops.selectiveScan,
      inputs: {
        u: [4, 2048, 2048],
        delta: [4, 2048, 2048],
        A: [2048, 16],
        B: [4, 16, 2048],
        C: [4, 16, 2048],
        D: [2048],
        z: [4, 2048, 2048],
        deltaBias: [2048],
      },
      options: { deltaSoftplus: true },
    },
    {
      op: 'gatedDeltaRule bf16 (4,4096,16,128)',
      hooks: rk.ops.gatedDeltaRule,
      inputs: {
        q: [4, 4096, 16, 128, bf16],
        k: [4, 4096, 16, 128, bf16],
        v: [4, 4096, 16, 128, bf16],
        g: [4, 4096, 16],
        beta: [4, 4096, 16, bf16],
      },
      options: { useQkL2normInKernel: true },
      tol: 3e-2,
    },
    // The per-key decay rules on the chunked kernels (KDA, GLA).
    ...['gated_delta', 'gated'].map((rule) => ({
      op: `linearAttention ${rule} per-key bf16 (2,1024,8,128)`,
      hooks: rk.ops.linearAttention,
      inputs: {
        q: [2, 1024, 8, 128, bf16],
        k: [2, 1024, 8, 128, bf16],
        v: [2, 1024, 8, 128, bf16],
        decay: [2, 1024, 8, 128],
        ...(rule === 'gated_delta' ? { beta: [2, 1024, 8, bf16] } : {}),
      },
      options: { updateRule: rule, qkL2Norm: true },
      tol: 3e-2,
    })),
    {
      op: 'fusedRnn lstm (16,1024,12,64)',
      hooks: rk.ops.fusedRnn,
      inputs: { wx: [16, 1024, 4, 12, 64], R: [4, 12, 64, 64], b: [4, 12, 64] },
      options: { cell: 'lstm' },
    },
    {
      op: 'newtonRnn gru-diag (8,4096,1024)',
      hooks: rk.ops.newtonRnn,
      inputs: { wx: [8, 4096, 3, 1024], R: [3, 1024], b: [3, 1024] },
      options: { cell: 'gru-diag', mode: 'newton' },
    },
  ];
  const out = [];
  for (const c of cases) {
    seed = 31337;
    const host = Object.fromEntries(
      Object.entries(c.inputs).map(([k, spec]) => {
        const dtype = typeof spec.at(-1) === 'string' ? spec.at(-1) : 'float32';
        const shape = spec.filter((x) => typeof x === 'number');
        const n = shape.reduce((a, b) => a * b, 1);
        // Decays and gates kept in their working ranges: g <= 0, beta in (0, 1), A < 0.
        const v = k === 'g' || k === 'decay' || k === 'A' ? data(n).map((x) => -0.05 - Math.abs(x)) : data(n);
        return [k, { shape, dtype, values: k === 'beta' ? v.map((x) => 0.5 + x) : v }];
      }),
    );
    try {
      const flat = {};
      for (const on of ['cpu', device]) {
        const inputs = Object.fromEntries(
          Object.entries(host).map(([k, h]) => [k, rk.Tensor.from(h.values, h.shape, { device: on, dtype: h.dtype })]),
        );
        seed = 777; // the same output gradients on both devices
        flat[on] = forwardBackward(c.hooks, inputs, c.options ?? {}, on, (t) => data(t.size)).flat;
        for (const t of Object.values(inputs)) t.dispose();
      }
      const err = maxRelError(flat[device], flat.cpu);
      out.push({ op: c.op, maxRelError: err, pass: err <= (c.tol ?? 1e-3) });
    } catch (e) {
      out.push({ op: c.op, pass: false, error: `${e.code ?? e.name}: ${e.message}` });
    }
  }
  return out;
}

function child(task) {
  if (task === 'fused') {
    const r = {};
    for (const cell of ['lstm', 'gru'])
      for (const D of [128, 256]) {
        try {
          r[`${cell} ${D}`] = fusedHashes(cell, D);
        } catch (e) {
          r[`${cell} ${D}`] = { error: `${e.code ?? e.name}: ${e.message}` };
        }
      }
    return r;
  }
  if (task === 'plan768') return runsAt(768);
  if (task === 'newton') return newtonCounts();
  if (task === 'anchors') return anchors();
  throw new Error(`unknown task ${task}`);
}

function inChild(task, tune) {
  const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--child', task], {
    encoding: 'utf8',
    env: { ...process.env, RK_CUDA_TUNE: tune },
    maxBuffer: 64 << 20,
    timeout: 240_000,
  });
  const last = (r.stdout ?? '').trim().split('\n').pop();
  try {
    return JSON.parse(last);
  } catch {
    return { error: `exit ${r.status}: ${(r.stderr ?? '').slice(-400)}` };
  }
}

function main() {
  if (device === 'cuda' && !rk.cuda.available()) {
    console.error(`gpu-paths: CUDA is not usable: ${rk.cuda.reason()}`);
    process.exit(2);
  }
  const i = process.argv.indexOf('--child');
  if (i >= 0) {
    console.log(JSON.stringify(child(process.argv[i + 1])));
    return;
  }
  // Single-block (1) against multi-block (3), both directions pinned together.
  const single = inChild('fused', 'fusedRnn.path=1');
  const multi = inChild('fused', 'fusedRnn.path=3');
  const fused = [];
  for (const key of Object.keys(single.error ? {} : single)) {
    const a = single[key],
      b = multi[key] ?? { error: 'not run' };
    if (a.error || b.error) {
      fused.push({ case: key, pathsAgree: false, error: a.error ?? b.error });
      continue;
    }
    const repeatsAgree = new Set(a).size === 1 && new Set(b).size === 1;
    fused.push({ case: key, repeats: a.length, repeatsAgree, pathsAgree: repeatsAgree && a[0] === b[0] });
  }
  // The plan at 768: persistent if it fits, else multi-block if it is resident, else stepwise.
  const persistent = inChild('plan768', 'fusedRnn.path=1');
  const multiBlock = inChild('plan768', 'fusedRnn.path=3');
  const plan768 = {
    persistent,
    multiBlock,
    plan: persistent.ok ? 'persistent' : multiBlock.ok ? 'multi-block' : 'stepwise',
  };
  const newton = inChild('newton', '');
  const anchorErrors = quick ? [] : inChild('anchors', '');
  const ok =
    !single.error &&
    !multi.error &&
    fused.length > 0 &&
    fused.every((f) => f.pathsAgree) &&
    Array.isArray(newton) &&
    newton.every((n) => n.equal) &&
    Array.isArray(anchorErrors) &&
    anchorErrors.every((a) => a.pass);
  console.log(
    JSON.stringify({
      ok,
      fused,
      ...(single.error || multi.error ? { errors: [single.error, multi.error].filter(Boolean) } : {}),
      plan768,
      newton,
      anchors: anchorErrors,
    }),
  );
  process.exit(ok ? 0 : 1);
}

main();
