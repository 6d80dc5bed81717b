#!/usr/bin/env node
// The Promise forms: what they cost on a tiny call, and how free the event loop stays while a long
// call runs (against the synchronous form, which blocks it for the whole call).
//
//   node bench/async.mjs [--reps N]
//
// Tiny call: rk.linearScan on 2x19x37, median of N rounds of 2000 calls each, awaited one after
// another, per call. Long call: rk.selectiveScan forward 1x{dim}x2048 with dstate 256 (about a second
// of work here), while a 5 ms setInterval timer runs; the event-loop delay comes from
// perf_hooks.monitorEventLoopDelay (1 ms resolution).
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { cpus } from 'node:os';
import * as rk from '../dist/index.mjs';

const args = process.argv.slice(2);
const reps = Number(args[args.indexOf('--reps') + 1] ?? 5) || 5;
let seed = 7;
const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
function tiled(n, map = (x) => x) {
  const block = Float32Array.from({ length: 1 << 16 }, () => map(rand()));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += block.length) out.set(block.subarray(0, Math.min(block.length, n - i)), i);
  return out;
}
const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

async function tinyCall() {
  const a = rk.Tensor.from(
    tiled(2 * 19 * 37, (x) => 0.5 * x),
    [2, 19, 37],
  );
  const b = rk.Tensor.from(tiled(2 * 19 * 37), [2, 19, 37]);
  const calls = 2000;
  const sync = [],
    asyncT = [];
  for (let r = 0; r < reps + 1; r++) {
    let t0 = performance.now();
    for (let i = 0; i < calls; i++) rk.linearScan({ a, b }).h.dispose();
    const s = ((performance.now() - t0) * 1000) / calls;
    t0 = performance.now();
    for (let i = 0; i < calls; i++) (await rk.linearScanAsync({ a, b })).h.dispose();
    const as = ((performance.now() - t0) * 1000) / calls;
    if (r > 0) {
      sync.push(s);
      asyncT.push(as);
    } // the first round warms up
  }
  return { sync: median(sync), async: median(asyncT) };
}

async function longCall() {
  const N = 256,
    len = 2048;
  const make = (dim) => ({
    u: rk.Tensor.from(tiled(dim * len), [1, dim, len]),
    delta: rk.Tensor.from(
      tiled(dim * len, (x) => 0.1 * Math.abs(x)),
      [1, dim, len],
    ),
    A: rk.Tensor.from(
      tiled(dim * N, (x) => -Math.abs(x)),
      [dim, N],
    ),
    B: rk.Tensor.from(tiled(N * len), [1, 1, N, len]),
    C: rk.Tensor.from(tiled(N * len), [1, 1, N, len]),
  });
  const probe = make(64);
  rk.selectiveScan(probe);
  let t0 = performance.now();
  rk.selectiveScan(probe);
  const dim = Math.min(8192, Math.ceil(1000 / ((performance.now() - t0) / 64) / 16) * 16);
  const x = make(dim);
  const measure = async (run) => {
    const h = monitorEventLoopDelay({ resolution: 1 });
    let maxGap = 0,
      last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      maxGap = Math.max(maxGap, now - last);
      last = now;
    }, 5);
    h.enable();
    const t = performance.now();
    await run();
    const ms = performance.now() - t;
    await new Promise((res) => setTimeout(res, 10)); // let the timer see the end of a blocking call
    h.disable();
    clearInterval(timer);
    return { ms, p99: h.percentile(99) / 1e6, max: h.max / 1e6, maxGap };
  };
  const s = await measure(async () => rk.selectiveScan(x).y.dispose());
  const a = await measure(async () => (await rk.selectiveScanAsync(x)).y.dispose());
  return { dim, len, N, sync: s, async: a };
}

const info = rk.cpu.info();
console.log(
  `# async calls: ${cpus()[0]?.model ?? 'unknown CPU'}, ${info.isa} variant, ${info.threads} threads, Node ${process.version}`,
);
const tiny = await tinyCall();
console.log('\n| tiny call (linearScan 2x19x37) | sync | async | async overhead |');
console.log('|---|---|---|---|');
console.log(
  `| per call, median of ${reps} x 2000 | ${tiny.sync.toFixed(1)} us | ${tiny.async.toFixed(1)} us | ` +
    `${(tiny.async - tiny.sync).toFixed(1)} us |`,
);
const long = await longCall();
const f = (x) => x.toFixed(1);
console.log(
  `\n| long call (selectiveScan fwd 1x${long.dim}x${long.len}, dstate ${long.N}) | time | event-loop delay p99 | max | longest 5 ms timer gap |`,
);
console.log('|---|---|---|---|---|');
for (const [k, v] of [
  ['sync', long.sync],
  ['async', long.async],
])
  console.log(`| ${k} | ${f(v.ms)} ms | ${f(v.p99)} ms | ${f(v.max)} ms | ${f(v.maxGap)} ms |`);
