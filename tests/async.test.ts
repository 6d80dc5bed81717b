// The Promise forms: bitwise the sync results for every op, forward and backward (and the tape);
// tensors in use stay busy (dispose throws ERR_BUSY); AbortSignal before, during and after a call;
// many calls at once on the shared pool; the event loop stays free during a long call; worker
// threads, including one terminated while its call runs.
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, tensor } from './helpers';
import { freshSeed, normal, rng } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = (what: string) => `${what} (seed ${seed})`;
const r = (n: number, scale = 1) => normal(rand, n, scale);
const nativeMod = rk.internals.native();

/** Bits of a tensor (or null), for bitwise comparison. */
function bits(t: rk.Tensor | null | undefined): number[] | null {
  if (!t) return null;
  const d = t.dataSync();
  return Array.from(new Uint32Array(d.buffer, d.byteOffset, Math.floor(d.byteLength / 4))).concat(
    d.byteLength % 4 ? [new Uint16Array(d.buffer, d.byteOffset, d.length)[d.length - 1]] : [],
  );
}
/** Every tensor of an object of outputs or grads, by key. */
function tensorBits(o: object): Record<string, number[] | null> {
  const out: Record<string, number[] | null> = {};
  for (const [k, v] of Object.entries(o)) if (v === null || rk.Tensor.isTensor(v)) out[k] = bits(v as rk.Tensor | null);
  return out;
}
/** A gradient for each tensor output: random values of its shape, dtype and device. */
function gradsFor(outputs: object): Record<string, rk.Tensor> {
  const g: Record<string, rk.Tensor> = {};
  for (const [k, v] of Object.entries(outputs))
    if (rk.Tensor.isTensor(v)) g[k] = tensor(r(v.size), [...v.shape], v.dtype, v.device);
  return g;
}

interface Case {
  name: string;
  hooks: rk.OpHooks<object, object, object, unknown, object>;
  inputs: (dtype: rk.DType, device: rk.Device) => object;
  options?: object;
  grads?: (outputs: object) => object;
}

const D = 19,
  T = 37,
  N = 5;
const cases: Case[] = [
  {
    name: 'linearScan',
    hooks: rk.ops.linearScan as never,
    inputs: (dt, dev) => ({
      a: tensor(r(2 * D * T, 0.5), [2, D, T], dt, dev),
      b: tensor(r(2 * D * T), [2, D, T], dt, dev),
    }),
    options: { returnFinalState: true },
  },
  {
    name: 'selectiveScan',
    hooks: rk.ops.selectiveScan as never,
    inputs: (dt, dev) => ({
      u: tensor(r(2 * D * T), [2, D, T], dt, dev),
      delta: tensor(r(2 * D * T, 0.3), [2, D, T], dt, dev),
      A: tensor(
        r(D * N).map((x) => -Math.abs(x)),
        [D, N],
        'float32',
        dev,
      ),
      B: tensor(r(2 * N * T), [2, 1, N, T], dt, dev),
      C: tensor(r(2 * N * T), [2, 1, N, T], dt, dev),
      D: tensor(r(D), [D], 'float32', dev),
      z: tensor(r(2 * D * T), [2, D, T], dt, dev),
    }),
    options: { deltaSoftplus: true, returnFinalState: true },
  },
  {
    name: 'gatedDeltaRule',
    hooks: rk.ops.gatedDeltaRule as never,
    inputs: (dt, dev) => ({
      q: tensor(r(2 * T * 2 * 12), [2, T, 2, 12], dt, dev),
      k: tensor(r(2 * T * 2 * 12), [2, T, 2, 12], dt, dev),
      v: tensor(r(2 * T * 2 * 9), [2, T, 2, 9], dt, dev),
      g: tensor(
        r(2 * T * 2, 0.1).map((x) => -Math.abs(x)),
        [2, T, 2],
        'float32',
        dev,
      ),
      beta: tensor(
        r(2 * T * 2).map((x) => 1 / (1 + Math.exp(-x))),
        [2, T, 2],
        dt,
        dev,
      ),
    }),
    options: { useQkL2normInKernel: true, outputFinalState: true },
  },
  {
    name: 'fusedRnn lstm',
    hooks: rk.ops.fusedRnn as never,
    inputs: (dt, dev) => ({
      wx: tensor(r(3 * T * 4 * 2 * 7), [3, T, 4, 2, 7], dt, dev),
      R: tensor(r(4 * 2 * 7 * 7, 0.2), [4, 2, 7, 7], dt, dev),
      b: tensor(r(4 * 2 * 7), [4, 2, 7], 'float32', dev),
    }),
    options: { cell: 'lstm', lengths: [T, 5, 0] },
  },
  {
    name: 'newtonRnn gru-diag',
    hooks: rk.ops.newtonRnn as never,
    inputs: (dt, dev) => ({
      wx: tensor(r(2 * T * 3 * D), [2, T, 3, D], dt, dev),
      R: tensor(r(3 * D, 0.3), [3, D], 'float32', dev),
      b: tensor(r(3 * D), [3, D], 'float32', dev),
    }),
    options: { cell: 'gru-diag' },
    grads: (o) => gradsFor({ y: (o as { y: rk.Tensor }).y }),
  },
  {
    name: 'linearAttention gated_delta per-key decay, inverse grouping',
    hooks: rk.ops.linearAttention as never,
    inputs: (dt, dev) => ({
      q: tensor(r(2 * T * 8), [2, T, 1, 8], dt, dev),
      k: tensor(r(2 * T * 2 * 8), [2, T, 2, 8], dt, dev),
      v: tensor(r(2 * T * 2 * 6), [2, T, 2, 6], dt, dev),
      decay: tensor(
        r(2 * T * 2 * 8, 0.1).map((x) => -Math.abs(x)),
        [2, T, 2, 8],
        'float32',
        dev,
      ),
      beta: tensor(
        r(2 * T * 2).map((x) => 1 / (1 + Math.exp(-x))),
        [2, T, 2],
        dt,
        dev,
      ),
    }),
    options: { updateRule: 'gated_delta', qkL2Norm: true, outputFinalState: true },
  },
  {
    name: 'causalConv1d',
    hooks: rk.ops.causalConv1d as never,
    inputs: (dt, dev) => ({
      x: tensor(r(2 * D * T), [2, D, T], dt, dev),
      weight: tensor(r(D * 4), [D, 4], dt, dev),
      bias: tensor(r(D), [D], dt, dev),
    }),
    options: { activation: 'silu', returnFinalState: true },
  },
  {
    name: 'mamba2Scan',
    hooks: rk.ops.mamba2Scan as never,
    inputs: (dt, dev) => ({
      x: tensor(r(2 * T * 4 * 3), [2, T, 4, 3], dt, dev),
      dt: tensor(r(2 * T * 4), [2, T, 4], dt, dev),
      A: tensor(
        r(4).map((v) => -Math.abs(v)),
        [4],
        'float32',
        dev,
      ),
      B: tensor(r(2 * T * 2 * N), [2, T, 2, N], dt, dev),
      C: tensor(r(2 * T * 2 * N), [2, T, 2, N], dt, dev),
      D: tensor(r(4), [4], 'float32', dev),
      z: tensor(r(2 * T * 4 * 3), [2, T, 4, 3], dt, dev),
    }),
    options: { dtSoftplus: true, returnFinalStates: true },
  },
];

describe.each(devices)('async forms on %s', (device) => {
  for (const c of cases) {
    for (const dtype of ['float32', 'bfloat16'] as rk.DType[]) {
      it(`${c.name} ${dtype}: forwardAsync and backwardAsync equal the sync hooks bitwise`, async () => {
        const inputs = c.inputs(dtype, device);
        const sync = c.hooks.forward(inputs, c.options);
        const got = await c.hooks.forwardAsync(inputs, c.options);
        expect(tensorBits(got.outputs), at('outputs')).toEqual(tensorBits(sync.outputs));
        const grads = (c.grads ?? gradsFor)(sync.outputs);
        const gSync = c.hooks.backward(sync.ctx, grads);
        const gAsync = await c.hooks.backwardAsync(got.ctx, grads);
        expect(tensorBits(gAsync), at('grads')).toEqual(tensorBits(gSync));
        // The ctx (what the backward needs) is the same too: the sync backward on the async ctx.
        expect(tensorBits(c.hooks.backward(got.ctx, grads))).toEqual(tensorBits(gSync));
        rk.disposeCtx(sync.ctx);
        rk.disposeCtx(got.ctx);
      });
    }
  }

  it('op.async and rk.<op>Async equal the ops (inference, no tape)', async () => {
    const x = cases[2].inputs('float32', device) as rk.GatedDeltaRuleInputs;
    expect(tensorBits(await rk.gatedDeltaRuleAsync(x))).toEqual(tensorBits(rk.gatedDeltaRule(x)));
    const f = cases[3].inputs('float32', device) as rk.FusedRnnInputs;
    expect(tensorBits(await rk.fusedRnnAsync(f, { cell: 'lstm' }))).toEqual(
      tensorBits(rk.fusedRnn(f, { cell: 'lstm' })),
    );
    const l = cases[0].inputs('float32', device) as rk.LinearScanInputs;
    expect(tensorBits(await rk.linearScanAsync(l))).toEqual(tensorBits(rk.linearScan(l)));
    const s = cases[1].inputs('float32', device) as rk.SelectiveScanInputs;
    expect(tensorBits(await rk.selectiveScanAsync(s))).toEqual(tensorBits(rk.selectiveScan(s)));
    // await t.data(): the same contents as dataSync (on CUDA, read back off the JavaScript thread).
    const { h } = rk.linearScan(l);
    const viaData = await h.data();
    expect(Array.from(viaData)).toEqual(Array.from(h.dataSync()));
    const n = cases[4].inputs('float32', device) as rk.NewtonRnnInputs;
    const ns = rk.newtonRnn(n, { cell: 'gru-diag' }),
      na = await rk.newtonRnnAsync(n, { cell: 'gru-diag' });
    expect(tensorBits(na)).toEqual(tensorBits(ns));
    expect(na.stats).toEqual(ns.stats);
  });

  it('the decode steps: async equals sync, including the state updated in place', async () => {
    const state = tensor(r(2 * D * N), [2, D, N], 'float32', device);
    const stateA = state.clone();
    const x = {
      x: tensor(r(2 * D), [2, D], 'float32', device),
      dt: tensor(r(2 * D, 0.3), [2, D], 'float32', device),
      A: tensor(
        r(D * N).map((v) => -Math.abs(v)),
        [D, N],
        'float32',
        device,
      ),
      B: tensor(r(2 * N), [2, N], 'float32', device),
      C: tensor(r(2 * N), [2, N], 'float32', device),
    };
    const ys = rk.selectiveStateUpdate({ state, ...x });
    const ya = await rk.selectiveStateUpdateAsync({ state: stateA, ...x });
    expect(bits(ya.y)).toEqual(bits(ys.y));
    expect(bits(stateA)).toEqual(bits(state));
    const S = tensor(r(2 * 2 * 6 * 5), [2, 2, 6, 5], 'float32', device),
      SA = S.clone();
    const d = {
      q: tensor(r(2 * 2 * 6), [2, 1, 2, 6], 'float32', device),
      k: tensor(r(2 * 2 * 6), [2, 1, 2, 6], 'float32', device),
      v: tensor(r(2 * 2 * 5), [2, 1, 2, 5], 'float32', device),
      g: tensor(
        r(4, 0.1).map((v) => -Math.abs(v)),
        [2, 1, 2],
        'float32',
        device,
      ),
      beta: tensor(
        r(4).map((v) => 1 / (1 + Math.exp(-v))),
        [2, 1, 2],
        'float32',
        device,
      ),
    };
    const os = rk.gatedDeltaRuleStep({ state: S, ...d });
    const oa = await rk.gatedDeltaRuleStepAsync({ state: SA, ...d });
    expect(bits(oa.o)).toEqual(bits(os.o));
    expect(bits(SA)).toEqual(bits(S));
    const M = tensor(r(2 * 4 * 3 * N), [2, 4, 3, N], 'float32', device),
      MA = M.clone();
    const m = {
      x: tensor(r(2 * 4 * 3), [2, 4, 3], 'float32', device),
      dt: tensor(r(2 * 4), [2, 4], 'float32', device),
      A: tensor(
        r(4).map((v) => -Math.abs(v)),
        [4],
        'float32',
        device,
      ),
      B: tensor(r(2 * N), [2, 1, N], 'float32', device),
      C: tensor(r(2 * N), [2, 1, N], 'float32', device),
    };
    const ms = rk.mamba2StateUpdate({ state: M, ...m }, { dtSoftplus: true });
    const ma = await rk.mamba2StateUpdateAsync({ state: MA, ...m }, { dtSoftplus: true });
    expect(bits(ma.y)).toEqual(bits(ms.y));
    expect(bits(MA)).toEqual(bits(M));
  });

  it('valueAndGradAsync equals valueAndGrad bitwise', async () => {
    const { a, b } = cases[0].inputs('float32', device) as rk.LinearScanInputs;
    const f = (x: rk.Tensor, y: rk.Tensor) => rk.sum(rk.square(rk.linearScan({ a: x, b: y }).h));
    const fa = async (x: rk.Tensor, y: rk.Tensor) => rk.sum(rk.square((await rk.linearScanAsync({ a: x, b: y })).h));
    const s = rk.valueAndGrad(f)(a, b);
    const g = await rk.valueAndGradAsync(fa)(a, b);
    expect(bits(g.value)).toEqual(bits(s.value));
    expect(g.grads.map(bits)).toEqual(s.grads.map(bits));
    // A synchronous f works too, and gradAsync.
    expect((await rk.gradAsync(f)(a, b)).map(bits)).toEqual(s.grads.map(bits));
  });
});

/** An array of n values from a random block of 64K values, repeated (fast to make at any size). */
function tiled(n: number, map: (x: number) => number = (x) => x): Float32Array {
  const block = Float32Array.from(r(1 << 16), map);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += block.length) out.set(block.subarray(0, Math.min(block.length, n - i)), i);
  return out;
}

/**
 * A selective scan with about `ms` milliseconds of work on this machine: dstate 256, so that the work
 * is large for the size of the inputs (which an async call copies).
 */
function longScan(ms: number): rk.SelectiveScanInputs {
  const N = 256,
    len = 2048;
  const mk = (dim: number): rk.SelectiveScanInputs => ({
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
  const probe = mk(64);
  rk.selectiveScan(probe);
  // The fastest of three runs: on a machine shared with other test files one run may be slowed
  // down several times, and sizing from it would make the real call far shorter than asked.
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    rk.selectiveScan(probe);
    best = Math.min(best, performance.now() - t0);
  }
  const perRow = Math.max(best, 0.01) / 64;
  return mk(Math.min(8192, Math.max(64, Math.ceil(ms / perRow / 16) * 16)));
}

describe('busy tensors, abort, concurrency, the event loop (cpu)', () => {
  it('dispose of an input or a saved tensor in flight throws ERR_BUSY and changes nothing', async () => {
    const x = cases[1].inputs('float32', 'cpu') as rk.SelectiveScanInputs;
    const view = x.u.reshape([x.u.size]);
    const p = rk.selectiveScanAsync({ ...x, u: view.reshape(x.u.shape as number[]) });
    expect(() => x.u.dispose()).toThrow(rk.BusyError);
    expect(() => x.A.dispose()).toThrow(expect.objectContaining({ code: 'ERR_BUSY' }));
    expect(x.u.disposed).toBe(false);
    const y = await p;
    x.u.dispose(); // free again once settled
    expect(x.u.disposed).toBe(true);
    expect(y.y.disposed).toBe(false);
    // The backward keeps the ctx's tensors busy.
    const xs = cases[1].inputs('float32', 'cpu');
    const { outputs, ctx } = rk.ops.selectiveScan.forward(xs as rk.SelectiveScanInputs);
    const pb = rk.ops.selectiveScan.backwardAsync(ctx, { y: tensor(r(outputs.y.size), [...outputs.y.shape]) });
    expect(() => rk.disposeCtx(ctx)).toThrow(rk.BusyError);
    await pb;
    rk.disposeCtx(ctx);
  });

  it('an input transferred away in flight cannot reach the kernel (the async call works on a copy)', async () => {
    const x = cases[0].inputs('float32', 'cpu') as rk.LinearScanInputs;
    const want = bits(rk.linearScan(x).h);
    const p = rk.linearScanAsync(x);
    const buf = (x.a.storage as Float32Array).buffer;
    const moved = structuredClone(buf, { transfer: [buf] }); // detaches a's storage
    new Float32Array(moved).fill(NaN);
    expect(bits((await p).h)).toEqual(want);
  });

  it('abort before start rejects at once with ERR_ABORTED and queues nothing', async () => {
    const ac = new AbortController();
    ac.abort(new Error('changed my mind'));
    const x = cases[0].inputs('float32', 'cpu') as rk.LinearScanInputs;
    const p = rk.linearScanAsync(x, { signal: ac.signal });
    expect(nativeMod.asyncStats().pending).toBe(0);
    const e = await p.then(
      () => null,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(rk.AbortedError);
    expect((e as rk.AbortedError).code).toBe('ERR_ABORTED');
    expect((e as Error).cause).toEqual(new Error('changed my mind'));
    expect(() => x.a.dispose()).not.toThrow(); // nothing kept busy
  });

  it('abort during a long call stops its kernel promptly; abort after completion changes nothing', async () => {
    const x = longScan(1000);
    for (const op of ['forward', 'backward'] as const) {
      const ac = new AbortController();
      let p: Promise<unknown>;
      if (op === 'forward') {
        p = rk.selectiveScanAsync(x, { signal: ac.signal });
      } else {
        const { outputs, ctx } = rk.ops.selectiveScan.forward(x);
        p = rk.ops.selectiveScan.backwardAsync(ctx, { y: outputs.y }, { signal: ac.signal });
      }
      await new Promise((res) => setTimeout(res, 100));
      const t0 = performance.now();
      ac.abort();
      const e = await p.then(
        () => null,
        (err: unknown) => err,
      );
      const took = performance.now() - t0;
      expect(e, op).toBeInstanceOf(rk.AbortedError);
      expect(took, `${op}: rejected ${took.toFixed(1)} ms after abort`).toBeLessThan(100);
      expect(nativeMod.asyncStats().pending).toBe(0);
    }
    // After completion: the result stands.
    const small = cases[0].inputs('float32', 'cpu') as rk.LinearScanInputs;
    const ac = new AbortController();
    const done = await rk.linearScanAsync(small, { signal: ac.signal });
    ac.abort();
    expect(bits(done.h)).toEqual(bits(rk.linearScan(small).h));
  });

  it('8 calls in flight at once give the sync results and never use more threads than the pool has', async () => {
    const inputs = Array.from({ length: 8 }, (_, i) => cases[i % 2 === 0 ? 1 : 3].inputs('float32', 'cpu'));
    const big = longScan(150);
    const want = [
      ...inputs.map((x, i) =>
        tensorBits(
          i % 2 === 0
            ? rk.selectiveScan(x as rk.SelectiveScanInputs)
            : rk.fusedRnn(x as rk.FusedRnnInputs, { cell: 'lstm', lengths: [T, 5, 0] }),
        ),
      ),
      tensorBits(rk.selectiveScan(big)),
    ];
    nativeMod.cpuResetPeakForTesting();
    const got = await Promise.all([
      ...inputs.map((x, i) =>
        i % 2 === 0
          ? rk.selectiveScanAsync(x as rk.SelectiveScanInputs)
          : rk.fusedRnnAsync(x as rk.FusedRnnInputs, { cell: 'lstm', lengths: [T, 5, 0] }),
      ),
      rk.selectiveScanAsync(big),
      rk.selectiveScanAsync(big),
    ]);
    expect(got.slice(0, 9).map(tensorBits)).toEqual(want);
    expect(tensorBits(got[9])).toEqual(want[8]);
    const info = nativeMod.cpuInfo();
    expect(info.peakBusyThreads).toBeGreaterThan(0);
    expect(info.peakBusyThreads).toBeLessThanOrEqual(info.threads);
  });

  it('the event loop stays free while a long async call runs', async () => {
    const x = longScan(2000);
    /** The longest wait of a 5 ms timer while `during` runs, and the event-loop delay histogram. */
    const watch = async (during: () => Promise<unknown>) => {
      const h = monitorEventLoopDelay({ resolution: 1 });
      let maxGap = 0,
        last = performance.now();
      const timer = setInterval(() => {
        const now = performance.now();
        maxGap = Math.max(maxGap, now - last);
        last = now;
      }, 5);
      h.enable();
      await during();
      h.disable();
      clearInterval(timer);
      return { maxGap, maxDelay: h.max / 1e6 };
    };
    // The same timer with nothing of ours running: on a machine busy with other work (tests run in
    // parallel) its gaps set the floor. The limit is 20 ms, or twice that floor, or a tenth of the
    // call, whichever is highest: the test files that run beside this one on a 2-core machine can
    // take a core for tens of milliseconds at any moment, while a call that blocked the JavaScript
    // thread would hold the timer for the whole call (over a second).
    // Calls one after another for at least a second: the input size is capped, so on a fast machine
    // one call may take less than that. A call that blocked the JavaScript thread would hold the
    // timer for the whole call.
    const idle = await watch(() => new Promise((resolve) => setTimeout(resolve, 400)));
    const t0 = performance.now();
    let calls = 0;
    const busy = await watch(async () => {
      do {
        await rk.selectiveScanAsync(x);
        calls++;
      } while (performance.now() - t0 < 1000);
    });
    const took = (performance.now() - t0) / calls;
    const limit = Math.max(20, 2 * idle.maxGap, took / 10);
    expect(took, 'each call should run at least 300 ms').toBeGreaterThan(300);
    expect(
      busy.maxGap,
      `a 5 ms timer waited ${busy.maxGap.toFixed(1)} ms (idle: ${idle.maxGap.toFixed(1)} ms)`,
    ).toBeLessThan(limit);
    expect(busy.maxDelay, 'event loop delay').toBeLessThan(limit);
  });
});

describe('worker threads', () => {
  const workers: Worker[] = [];
  afterAll(async () => {
    for (const w of workers) await w.terminate();
  });
  const script = `
    const { parentPort, workerData } = require('node:worker_threads');
    const rk = require(${JSON.stringify(join(__dirname, '..', 'dist', 'cjs', 'index.js'))});
    (async () => {
      const n = workerData.len;
      const a = rk.Tensor.from(Float32Array.from({ length: 64 * n }, (_, i) => 0.5 * Math.sin(i)), [1, 64, n]);
      const b = rk.Tensor.from(Float32Array.from({ length: 64 * n }, (_, i) => Math.cos(i)), [1, 64, n]);
      parentPort.postMessage({ started: true });
      const sync = rk.linearScan({ a, b }).h.dataSync();
      const got = (await rk.linearScanAsync({ a, b })).h.dataSync();
      parentPort.postMessage({ equal: Buffer.compare(Buffer.from(sync.buffer), Buffer.from(got.buffer)) === 0 });
      if (workerData.forever) for (;;) await rk.selectiveScanAsync({
        u: rk.Tensor.from(new Float32Array(512 * 4096).fill(0.1), [1, 512, 4096]),
        delta: rk.Tensor.from(new Float32Array(512 * 4096).fill(0.01), [1, 512, 4096]),
        A: rk.Tensor.from(new Float32Array(512 * 16).fill(-1), [512, 16]),
        B: rk.Tensor.from(new Float32Array(16 * 4096).fill(1), [1, 1, 16, 4096]),
        C: rk.Tensor.from(new Float32Array(16 * 4096).fill(1), [1, 1, 16, 4096]),
      });
    })().catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));
  `;
  const run = (workerData: object) => {
    const w = new Worker(script, { eval: true, workerData });
    workers.push(w);
    const messages: Record<string, unknown>[] = [];
    const next = () =>
      new Promise<Record<string, unknown>>((res, rej) => {
        if (messages.length) return res(messages.shift()!);
        w.once('message', (m) => res(m));
        w.once('error', rej);
      });
    return { w, next };
  };

  it('async calls work inside a worker', async () => {
    const { next } = run({ len: 1000, forever: false });
    expect(await next()).toEqual({ started: true });
    expect(await next()).toEqual({ equal: true });
  }, 60_000);

  it('terminating a worker while its async call runs neither crashes nor hangs', async () => {
    const { w, next } = run({ len: 100, forever: true });
    expect(await next()).toEqual({ started: true });
    expect(await next()).toEqual({ equal: true });
    await new Promise((res) => setTimeout(res, 150));
    const t0 = performance.now();
    await w.terminate();
    expect(performance.now() - t0).toBeLessThan(5000);
    // The main thread's calls still run.
    const x = cases[0].inputs('float32', 'cpu') as rk.LinearScanInputs;
    expect(bits((await rk.linearScanAsync(x)).h)).toEqual(bits(rk.linearScan(x).h));
  }, 60_000);
});
