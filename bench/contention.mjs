#!/usr/bin/env node
// CPU kernels on a shared machine: each op's median time with 1 thread and with every thread, first on
// a quiet machine, then while another process keeps one core busy. A kernel that meets its threads
// once per step must not lose a time slice per step: with the busy core, the many-thread call should
// take at most about 1.5x the 1-thread call.
//
//   node bench/contention.mjs [--isa avx512|avx2|base] [--reps N]
import { spawn } from 'node:child_process';
import { cpus } from 'node:os';
import * as rk from '../dist/index.mjs';

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const isa = opt('--isa', null);
if (isa) rk.cpu.setIsa(isa);
const reps = Number(opt('--reps', 7));
const threads = rk.cpu.info().threads;

let seed = 12345;
const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
const data = (n, s = 1) => Float32Array.from({ length: n }, () => s * rand());
const T = (a, shape) => rk.Tensor.from(a, shape);

function cases() {
  const out = [];
  {
    const [B, D, L, N] = [1, 512, 2048, 16];
    const A = Float32Array.from({ length: D * N }, (_, i) => -((i % N) + 1));
    const inputs = {
      u: T(data(B * D * L), [B, D, L]),
      delta: T(data(B * D * L, 0.5), [B, D, L]),
      A: T(A, [D, N]),
      B: T(data(B * N * L), [B, 1, N, L]),
      C: T(data(B * N * L), [B, 1, N, L]),
    };
    out.push(['selectiveScan fwd 1x512x2048x16', () => rk.selectiveScan(inputs, { deltaSoftplus: true }).y.dispose()]);
  }
  {
    const [B, L, H, K, V] = [2, 512, 4, 64, 64];
    const inputs = {
      q: T(data(B * L * H * K), [B, L, H, K]),
      k: T(data(B * L * H * K), [B, L, H, K]),
      v: T(data(B * L * H * V), [B, L, H, V]),
      g: T(
        data(B * L * H, 0.1).map((x) => -Math.abs(x)),
        [B, L, H],
      ),
      beta: T(
        data(B * L * H).map((x) => 0.5 + 0.4 * x),
        [B, L, H],
      ),
    };
    out.push([
      'gatedDeltaRule fwd 2x512x4x64x64',
      () => rk.gatedDeltaRule(inputs, { useQkL2normInKernel: true }).o.dispose(),
    ]);
  }
  for (const [B, L, H, D] of [
    [16, 256, 1, 256],
    [1, 1024, 1, 256],
    [2, 512, 4, 64],
  ]) {
    const G = 4;
    const inputs = {
      wx: T(data(B * L * G * H * D), [B, L, G, H, D]),
      R: T(data(G * H * D * D, 1 / Math.sqrt(D)), [G, H, D, D]),
      b: T(data(G * H * D, 0.1), [G, H, D]),
    };
    const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, { cell: 'lstm' });
    out.push([`fusedRnn lstm fwd ${B}x${L}x${H}x${D}`, () => rk.fusedRnn(inputs, { cell: 'lstm' }).h.dispose()]);
    out.push([`fusedRnn lstm bwd ${B}x${L}x${H}x${D}`, () => rk.ops.fusedRnn.backward(ctx, { h: outputs.h })]);
  }
  return out;
}

function median(fn) {
  fn();
  const ts = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    ts.push(performance.now() - t0);
  }
  ts.sort((a, b) => a - b);
  return ts[ts.length >> 1];
}

function measure(all) {
  const rows = [];
  for (const [name, fn] of all) {
    rk.cpu.setThreads(1);
    const one = median(fn);
    rk.cpu.setThreads(threads);
    const many = median(fn);
    rows.push({ name, one, many });
    process.stderr.write('.');
  }
  process.stderr.write('\n');
  return rows;
}

const all = cases();
console.log(
  `CPU: ${cpus()[0]?.model ?? 'unknown'}; variant ${rk.cpu.info().isa}; ${threads} threads; median of ${reps}`,
);
const quiet = measure(all);
const busy = spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' });
await new Promise((r) => setTimeout(r, 300));
let loaded;
try {
  loaded = measure(all);
} finally {
  busy.kill();
}
const f = (x) => `${x.toFixed(2)} ms`;
console.log(
  `| op | quiet: 1 thread | quiet: ${threads} threads | one core busy: 1 thread | one core busy: ${threads} threads | busy: ${threads} / 1 |`,
);
console.log('|---|---|---|---|---|---|');
for (let i = 0; i < all.length; i++) {
  const q = quiet[i],
    l = loaded[i];
  console.log(
    `| ${q.name} | ${f(q.one)} | ${f(q.many)} | ${f(l.one)} | ${f(l.many)} | ${(l.many / l.one).toFixed(2)}x |`,
  );
}
