// The addon is context-aware: it loads and runs in worker threads, several at once.
import { Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const entry = join(__dirname, '..', 'dist', 'cjs', 'index.js');
const code = `
const { parentPort, workerData } = require('node:worker_threads');
const rk = require(workerData.entry);
const n = 4 * 64;
const a = rk.Tensor.from(new Float32Array(n).fill(0.5), [1, 4, 64]);
const b = rk.Tensor.from(new Float32Array(n).fill(workerData.k), [1, 4, 64]);
const { h } = rk.linearScan({ a, b });
parentPort.postMessage(Array.from(h.dataSync().slice(0, 3)));
`;

describe('worker_threads', () => {
  it('loads the addon and runs an op in several workers at once', async () => {
    const results = await Promise.all(
      [1, 2, 3].map(
        (k) =>
          new Promise<number[]>((resolve, reject) => {
            const w = new Worker(code, { eval: true, workerData: { entry, k } });
            w.once('message', (m) => {
              resolve(m);
              void w.terminate();
            });
            w.once('error', reject);
          }),
      ),
    );
    results.forEach((r, i) => expect(r).toEqual([i + 1, 1.5 * (i + 1), 1.75 * (i + 1)]));
  });
});
