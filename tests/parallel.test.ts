// The CPU thread pool: results do not depend on the thread count, a team whose per-step barrier keeps
// stalling finishes on one thread with the same results, and calls from several worker threads at
// once share the pool.
import { Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { tensor } from './helpers';
import { freshSeed, normal, rng } from './reference/util';

const seed = freshSeed();
const at = (what: string) => `${what} (seed ${seed})`;
const native = rk.internals.native();
const threads0 = rk.cpu.info().threads;
afterEach(() => {
  native.cpuSetStepStallForTesting(0);
  rk.cpu.setThreads(threads0);
});

// One LSTM head, batch 1: the fused cells split each step's items over the team (a barrier per step).
function lstmForwardBackward(rand: () => number, T: number, D: number) {
  const wx = tensor(normal(rand, T * 4 * D), [1, T, 4, 1, D]);
  const R = tensor(normal(rand, 4 * D * D, 1 / Math.sqrt(D)), [4, 1, D, D]);
  const b = tensor(normal(rand, 4 * D, 0.1), [4, 1, D]);
  const gh = tensor(normal(rand, T * D), [1, T, 1, D]);
  return () => {
    const { outputs, ctx } = rk.ops.fusedRnn.forward({ wx, R, b }, { cell: 'lstm' });
    const g = rk.ops.fusedRnn.backward(ctx, { h: gh });
    return [outputs.h, g.wx!, g.R!, g.b!].map((t) => Array.from(t.toFloat32Array()));
  };
}

describe('CPU thread pool', () => {
  it('gives bitwise the same results with 1, 2 and 3 threads', () => {
    const run = lstmForwardBackward(rng(seed), 30, 520);
    rk.cpu.setThreads(1);
    const one = run();
    for (const n of [2, 3]) {
      rk.cpu.setThreads(n);
      expect(run(), at(`${n} threads`)).toEqual(one);
    }
  });

  it('finishes a stalling team on one thread, with the same results', () => {
    const run = lstmForwardBackward(rng(seed), 24, 600);
    rk.cpu.setThreads(2);
    const normalRun = run();
    const solo0 = native.cpuInfo().soloTeams;
    native.cpuSetStepStallForTesting(1500);
    const stalled = run();
    native.cpuSetStepStallForTesting(0);
    // Forward and backward each went solo after a few stalled steps instead of stalling every step.
    expect(native.cpuInfo().soloTeams - solo0).toBe(2);
    expect(stalled, at('solo')).toEqual(normalRun);
  });

  it('serves calls from several worker threads at once', async () => {
    const entry = join(__dirname, '..', 'dist', 'cjs', 'index.js');
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      const rk = require(workerData.entry);
      const D = 300, T = 30;
      const f = (n, s) => Float32Array.from({ length: n }, (_, i) => s * Math.sin(i * 0.37 + workerData.k));
      const out = [];
      for (let r = 0; r < 3; r++) {
        const { h } = rk.fusedRnn({ wx: rk.Tensor.from(f(T * 4 * D, 1), [1, T, 4, 1, D]),
          R: rk.Tensor.from(f(4 * D * D, 0.05), [4, 1, D, D]), b: rk.Tensor.from(f(4 * D, 0.1), [4, 1, D]) }, { cell: 'lstm' });
        out.push(Array.from(h.dataSync().slice(-4)));
      }
      parentPort.postMessage(out);
    `;
    const results = await Promise.all([1, 2, 3, 4].map((k) => new Promise<number[][]>((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { entry, k } });
      w.once('message', (m) => { resolve(m); void w.terminate(); });
      w.once('error', reject);
    })));
    for (const r of results) {
      expect(r[1]).toEqual(r[0]);
      expect(r[2]).toEqual(r[0]);
    }
    expect(results[0][0]).not.toEqual(results[1][0]);
  });
});
