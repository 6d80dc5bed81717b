// rk.cpu: the instruction-set variants and the thread setting. Under `npm test` this file runs once per
// variant the machine supports (vitest.config.mts sets RK_CPU_ISA), beside the op tests.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { tensor } from './helpers';

const requested = process.env.RK_CPU_ISA as rk.CpuIsa | undefined;

function runEveryOp(): void {
  const T = 5,
    D = 3;
  const r = (n: number, s = 1) => Array.from({ length: n }, (_, i) => s * Math.sin(i + 1));
  rk.selectiveScan({
    u: tensor(r(D * T), [1, D, T]),
    delta: tensor(r(D * T, 0.1), [1, D, T]),
    A: tensor(r(D * 2, -1), [D, 2]),
    B: tensor(r(2 * T), [1, 1, 2, T]),
    C: tensor(r(2 * T), [1, 1, 2, T]),
  });
  rk.gatedDeltaRule({
    q: tensor(r(T * 4), [1, T, 1, 4]),
    k: tensor(r(T * 4), [1, T, 1, 4]),
    v: tensor(r(T * 3), [1, T, 1, 3]),
    g: tensor(r(T, -0.1), [1, T, 1]),
    beta: tensor(r(T, 0.5), [1, T, 1]),
  });
  rk.fusedRnn(
    {
      wx: tensor(r(T * 4 * D), [1, T, 4, 1, D]),
      R: tensor(r(4 * D * D, 0.1), [4, 1, D, D]),
      b: tensor(r(4 * D), [4, 1, D]),
    },
    { cell: 'lstm' },
  );
  rk.newtonRnn(
    { wx: tensor(r(T * 3 * D), [1, T, 3, D]), R: tensor(r(3 * D, 0.3), [3, D]), b: tensor(r(3 * D), [3, D]) },
    { cell: 'gru-diag' },
  );
  rk.linearScan({ a: tensor(r(D * T, 0.5), [1, D, T]), b: tensor(r(D * T), [1, D, T]) });
  rk.linearAttention(
    {
      q: tensor(r(T * 4), [1, T, 1, 4]),
      k: tensor(r(T * 4), [1, T, 1, 4]),
      v: tensor(r(T * 3), [1, T, 1, 3]),
      decay: tensor(r(T * 4, -0.1), [1, T, 1, 4]),
    },
    { updateRule: 'gated' },
  );
  rk.causalConv1d({ x: tensor(r(D * T), [1, D, T]), weight: tensor(r(D * 2), [D, 2]) });
}
const OPS_RUN = 5;

describe('cpu', () => {
  it('reports the variant, the supported ones and the threads', () => {
    const info = rk.cpu.info();
    expect(info.isasSupported.length).toBeGreaterThan(0);
    expect(info.isasSupported).toContain('base');
    expect(info.isasSupported).toContain(info.isa);
    expect(info.threads).toBeGreaterThanOrEqual(1);
    if (requested) expect(info.isa).toBe(requested);
  });

  it('runs the requested variant and no other', () => {
    const before = rk.internals.native().cpuInfo().runs;
    runEveryOp();
    const after = rk.internals.native().cpuInfo().runs;
    const isa = rk.cpu.info().isa;
    expect(after[isa] - before[isa]).toBeGreaterThanOrEqual(OPS_RUN);
    for (const other of rk.CPU_ISAS) if (other !== isa) expect(after[other] - before[other]).toBe(0);
  });

  it('switches variants at run time and refuses unknown or unsupported ones', () => {
    const info = rk.cpu.info();
    try {
      for (const isa of info.isasSupported) {
        rk.cpu.setIsa(isa);
        expect(rk.cpu.info().isa).toBe(isa);
        const before = rk.internals.native().cpuInfo().runs[isa];
        runEveryOp();
        expect(rk.internals.native().cpuInfo().runs[isa]).toBeGreaterThan(before);
      }
      expect(() => rk.cpu.setIsa('sse9' as rk.CpuIsa)).toThrow(rk.ArgumentError);
      for (const isa of rk.CPU_ISAS.filter((i) => !info.isasSupported.includes(i))) {
        expect(() => rk.cpu.setIsa(isa)).toThrow(/not supported/);
      }
    } finally {
      rk.cpu.setIsa(info.isa);
    }
  });

  it('sets the thread count and refuses bad ones', () => {
    const before = rk.cpu.info().threads;
    try {
      rk.cpu.setThreads(1);
      expect(rk.cpu.info().threads).toBe(1);
      expect(rk.cpuThreads()).toBe(1);
      rk.cpu.setThreads(3);
      expect(rk.cpu.info().threads).toBe(3);
      runEveryOp();
      for (const bad of [0, -1, 1.5, NaN, 5000]) expect(() => rk.cpu.setThreads(bad)).toThrow(rk.ArgumentError);
    } finally {
      rk.cpu.setThreads(before);
    }
  });
});
