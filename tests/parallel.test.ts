// The CPU thread pool: results do not depend on the thread count (the Mamba-2 scan's row sums go
// through fixed blocks for that), a team whose per-step barrier keeps stalling finishes on one
// thread with the same results, and calls from several worker threads at once share the pool.
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

  it('gives the gated delta rule bitwise the same results with 1, 2 and 3 threads', () => {
    const rand = rng(seed + 1);
    const [B, T, H, K, V] = [2, 300, 3, 32, 20];
    const inputs = {
      q: tensor(normal(rand, B * T * H * K), [B, T, H, K]),
      k: tensor(normal(rand, B * T * H * K), [B, T, H, K]),
      v: tensor(normal(rand, B * T * H * V), [B, T, H, V]),
      g: tensor(
        normal(rand, B * T * H, 0.1).map((x) => -Math.abs(x)),
        [B, T, H],
      ),
      beta: tensor(
        normal(rand, B * T * H, 0.2).map((x) => 0.5 + x),
        [B, T, H],
      ),
    };
    const dO = tensor(normal(rand, B * T * H * V), [B, T, H, V]);
    const run = () => {
      const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, { useQkL2normInKernel: true });
      const g = rk.ops.gatedDeltaRule.backward(ctx, { o: dO });
      return [outputs.o, g.q!, g.k!, g.v!, g.g!, g.beta!].map((t) => Array.from(t.toFloat32Array()));
    };
    rk.cpu.setThreads(1);
    const one = run();
    for (const n of [2, 3]) {
      rk.cpu.setThreads(n);
      expect(run(), at(`${n} threads`)).toEqual(one);
    }
  });

  it('gives the selective scan the same forward bits with any thread count, and the same bits per thread count', () => {
    const rand = rng(seed + 2);
    const [B, D, L, N] = [2, 40, 600, 16];
    const inputs = {
      u: tensor(normal(rand, B * D * L), [B, D, L]),
      delta: tensor(normal(rand, B * D * L, 0.5), [B, D, L]),
      A: tensor(
        normal(rand, D * N).map((x) => -Math.abs(x) - 0.1),
        [D, N],
      ),
      B: tensor(normal(rand, B * N * L), [B, 1, N, L]),
      C: tensor(normal(rand, B * N * L), [B, 1, N, L]),
      D: tensor(normal(rand, D), [D]),
    };
    const dy = tensor(normal(rand, B * D * L), [B, D, L]);
    const run = () => {
      const { outputs, ctx } = rk.ops.selectiveScan.forward(inputs, { deltaSoftplus: true });
      const g = rk.ops.selectiveScan.backward(ctx, { y: dy });
      return [outputs.y, g.u!, g.delta!, g.A!, g.B!, g.C!, g.D!].map((t) => Array.from(t.toFloat32Array()));
    };
    rk.cpu.setThreads(1);
    const one = run();
    for (const n of [2, 3]) {
      rk.cpu.setThreads(n);
      const r = run();
      // y, du, ddelta have one writer each; dA, dB, dC, dD are sums over threads' shares.
      expect(r.slice(0, 3), at(`${n} threads`)).toEqual(one.slice(0, 3));
      expect(run(), at(`${n} threads, again`)).toEqual(r);
      for (let i = 3; i < r.length; i++) {
        const err = Math.hypot(...r[i].map((x, j) => x - one[i][j])) / Math.hypot(...one[i]);
        expect(err, at(`${n} threads, gradient ${i}`)).toBeLessThan(1e-5);
      }
    }
  });

  it('splits the value heads of a lone q/k head over the threads: the same forward bits, a backward within rounding', () => {
    // One sequence, one q/k head, six value heads: 2 and 3 threads take 2 and 3 parts of them. The
    // backward adds the parts' sums towards dq and dk in part order: the same bits per thread count,
    // within fp32 rounding of the one-thread result.
    const rand = rng(seed + 4);
    const [T, HV, K, V] = [300, 6, 32, 64];
    const inputs = {
      q: tensor(normal(rand, T * K), [1, T, 1, K]),
      k: tensor(normal(rand, T * K), [1, T, 1, K]),
      v: tensor(normal(rand, T * HV * V), [1, T, HV, V]),
      g: tensor(
        normal(rand, T * HV, 0.1).map((x) => -Math.abs(x)),
        [1, T, HV],
      ),
      beta: tensor(
        normal(rand, T * HV, 0.2).map((x) => 0.5 + x),
        [1, T, HV],
      ),
    };
    const initialState = tensor(normal(rand, HV * K * V), [1, HV, K, V]);
    const dO = tensor(normal(rand, T * HV * V), [1, T, HV, V]);
    const run = () => {
      const opts = { useQkL2normInKernel: true, outputFinalState: true, initialState };
      const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, opts);
      const g = rk.ops.gatedDeltaRule.backward(ctx, { o: dO });
      const fwd = [outputs.o, outputs.finalState!].map((t) => Array.from(t.toFloat32Array()));
      const bwd = [g.q!, g.k!, g.v!, g.g!, g.beta!, g.initialState!].map((t) => Array.from(t.toFloat32Array()));
      return { fwd, bwd };
    };
    const close = (x: number[], y: number[]) => {
      let d = 0,
        n = 0;
      for (let i = 0; i < x.length; i++) {
        d += (x[i] - y[i]) ** 2;
        n += y[i] ** 2;
      }
      return Math.sqrt(d / Math.max(n, 1e-30));
    };
    rk.cpu.setThreads(1);
    const one = run();
    for (const n of [2, 3]) {
      rk.cpu.setThreads(n);
      const r = run();
      expect(r.fwd, at(`${n} threads`)).toEqual(one.fwd);
      expect(run().bwd, at(`${n} threads, again`)).toEqual(r.bwd);
      r.bwd.forEach((x, i) => expect(close(x, one.bwd[i]), at(`${n} threads, gradient ${i}`)).toBeLessThan(1e-5));
    }
  });

  it('gives the Mamba-2 scan (on linear attention) bitwise the same results with 1, 2 and 3 threads', () => {
    const rand = rng(seed + 3);
    const [B, T, H, P, G, N] = [2, 300, 4, 16, 2, 16];
    const inputs = {
      x: tensor(normal(rand, B * T * H * P), [B, T, H, P]),
      dt: tensor(normal(rand, B * T * H), [B, T, H]),
      A: tensor(
        normal(rand, H).map((x) => -Math.abs(x) - 0.1),
        [H],
      ),
      B: tensor(normal(rand, B * T * G * N, 0.3), [B, T, G, N]),
      C: tensor(normal(rand, B * T * G * N, 0.3), [B, T, G, N]),
      D: tensor(normal(rand, H * P), [H, P]),
      z: tensor(normal(rand, B * T * H * P), [B, T, H, P]),
      dtBias: tensor(normal(rand, H, 0.3), [H]),
    };
    const dy = tensor(normal(rand, B * T * H * P), [B, T, H, P]);
    const run = () => {
      const { outputs, ctx } = rk.ops.mamba2Scan.forward(inputs, { dtSoftplus: true });
      const g = rk.ops.mamba2Scan.backward(ctx, { y: dy });
      return [outputs.y, g.x, g.dt, g.A, g.B, g.C, g.D!, g.z!, g.dtBias!].map((t) => Array.from(t.toFloat32Array()));
    };
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
    const results = await Promise.all(
      [1, 2, 3, 4].map(
        (k) =>
          new Promise<number[][]>((resolve, reject) => {
            const w = new Worker(code, { eval: true, workerData: { entry, k } });
            w.once('message', (m) => {
              resolve(m);
              void w.terminate();
            });
            w.once('error', reject);
          }),
      ),
    );
    for (const r of results) {
      expect(r[1]).toEqual(r[0]);
      expect(r[2]).toEqual(r[0]);
    }
    expect(results[0][0]).not.toEqual(results[1][0]);
  });
});
