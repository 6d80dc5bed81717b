// Seeded fuzzing of the public API and the raw native functions (tests/fuzz/child.cjs): thousands of
// bad or borderline calls, in batches that each run in a child process. No batch may crash, throw
// anything but a RecurrentKernelsError, or return a non-finite output from finite inputs.
// RK_FUZZ_SEED picks another seed; RK_FUZZ_BATCHES / RK_FUZZ_CALLS change the amount.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const entry = join(__dirname, '..', 'dist', 'cjs', 'index.js');
const child = join(__dirname, 'fuzz', 'child.cjs');
const seed0 = Number(process.env.RK_FUZZ_SEED ?? 20261206);
const batches = Number(process.env.RK_FUZZ_BATCHES ?? 16);
const calls = Number(process.env.RK_FUZZ_CALLS ?? 200);

describe('fuzz', () => {
  it(`${batches} batches of ${calls} random calls (seed ${seed0})`, () => {
    let typed = 0,
      ok = 0;
    for (let b = 0; b < batches; b++) {
      const seed = seed0 + b;
      const r = spawnSync(process.execPath, [child, entry, String(seed), String(calls)], {
        encoding: 'utf8',
        timeout: 60_000,
        env: { ...process.env, RK_NUM_THREADS: '2' },
      });
      const line = r.stdout.split('\n').find((l) => l.startsWith('RESULT '));
      if (r.status !== 0 || !line)
        throw new Error(
          `batch with seed ${seed} crashed: status ${r.status}, signal ${r.signal}\n${r.stderr.slice(-3000)}`,
        );
      const res = JSON.parse(line.slice(7)) as {
        calls: number;
        typed: number;
        ok: number;
        untyped: string[];
        nonFinite: string[];
        baselineErrors: string[];
      };
      expect(res.baselineErrors, `seed ${seed}: baselines that do not run`).toEqual([]);
      expect(res.untyped, `seed ${seed}: untyped errors`).toEqual([]);
      expect(res.nonFinite, `seed ${seed}: non-finite outputs from finite inputs`).toEqual([]);
      typed += res.typed;
      ok += res.ok;
    }
    // The fuzzer must reach both outcomes, or it tests nothing.
    expect(typed).toBeGreaterThan(batches * calls * 0.3);
    expect(ok).toBeGreaterThan(batches * calls * 0.02);
  }, 180_000);
});
