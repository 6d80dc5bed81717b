// CUDA-only checks (run when a GPU is present; `npm run test:gpu` requires one). The kernels are
// also covered by the per-device suites in linearScan.test.ts; these add long sequences that cross
// many chunks, unaligned rows, device memory accounting and error mapping.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { hasCuda, tensor, tolerance, values } from './helpers';
import { linearScanBackwardRef, linearScanRef } from './reference/linearScan';
import { freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

describe.runIf(hasCuda)('CUDA runtime', () => {
  it('round-trips every dtype through the device', () => {
    const xs = normal(rand, 1001);
    for (const dtype of rk.DTYPES) {
      const cpu = tensor(xs, [1001], dtype);
      const gpu = cpu.to('cuda');
      expect(gpu.device).toBe('cuda');
      expect(Array.from(gpu.dataSync())).toEqual(Array.from(cpu.dataSync()));
      const conv = gpu.to({ dtype: 'float32' });
      expect(Array.from(values(conv))).toEqual(Array.from(values(cpu)));
      for (const t of [gpu, conv]) t.dispose();
    }
  });

  it('counts device memory and frees it on dispose', () => {
    const before = rk.memory().cuda;
    const t = rk.Tensor.zeros([1 << 20], { device: 'cuda' });
    expect(rk.memory().cuda.nativeBytes - before.nativeBytes).toBe(4 << 20);
    t.dispose();
    expect(rk.memory().cuda.nativeBytes).toBe(before.nativeBytes);
    expect(() => t.dataSync()).toThrow(rk.DisposedError);
  });

  it('an impossible allocation is ERR_OUT_OF_MEMORY, and the device stays usable', () => {
    const nat = rk.internals.native();
    expect(() => new nat.DeviceBuffer(2 ** 52)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY' }));
    const t = tensor([1, 2, 3], [3], 'float32', 'cuda');
    expect(Array.from(values(t))).toEqual([1, 2, 3]);
  });
});

describe.runIf(hasCuda)('CUDA linear scan, long and unaligned', () => {
  const cases: [number, number, number][] = [
    [1, 3, 65537],
    [2, 1, 131072],
    [1, 5, 4095],
    [3, 7, 1],
  ];
  for (const dtype of rk.DTYPES) {
    it.each(cases)(`${dtype} batch %i, channels %i, length %i`, (batch, channels, length) => {
      for (const reverse of [false, true]) {
        const rows = batch * channels,
          n = rows * length,
          shape = [batch, channels, length];
        const a = tensor(uniform(rand, n, 0.5, 1), shape, dtype, 'cuda');
        const b = tensor(normal(rand, n), shape, dtype, 'cuda');
        const h0 = tensor(normal(rand, rows), [batch, channels], 'float32', 'cuda');
        const a64 = values(a),
          b64 = values(b),
          h064 = values(h0);
        const { outputs, ctx } = rk.ops.linearScan.forward(
          { a, b },
          { initialState: h0, reverse, returnFinalState: true },
        );
        const ref = linearScanRef(a64, b64, rows, length, h064, reverse);
        expect(relErr(values(outputs.h), ref.h), `h ${at}`).toBeLessThan(tolerance[dtype]);
        expect(relErr(values(outputs.finalState!), ref.finalState), `final ${at}`).toBeLessThan(
          Math.max(1e-5, tolerance[dtype]),
        );
        const gh = tensor(normal(rand, n), shape, dtype, 'cuda');
        const gFinal = tensor(normal(rand, rows), [batch, channels], 'float32', 'cuda');
        const g = rk.ops.linearScan.backward(ctx, { h: gh, finalState: gFinal });
        const gref = linearScanBackwardRef(a64, b64, rows, length, h064, reverse, values(gh), values(gFinal));
        expect(relErr(values(g.b!), gref.gb), `grad b ${at}`).toBeLessThan(tolerance[dtype]);
        expect(relErr(values(g.a!), gref.ga), `grad a ${at}`).toBeLessThan(2 * tolerance[dtype]);
        expect(relErr(values(g.initialState!), gref.gh0), `grad h0 ${at}`).toBeLessThan(tolerance[dtype]);
      }
    });
  }

  it('agrees with the CPU kernel in float32 on a short row', () => {
    const a = tensor(uniform(rand, 40, -1, 1), [1, 2, 20]);
    const b = tensor(normal(rand, 40), [1, 2, 20]);
    const cpu = values(rk.linearScan({ a, b }).h);
    const gpu = values(rk.linearScan({ a: a.to('cuda'), b: b.to('cuda') }).h);
    expect(relErr(gpu, cpu)).toBeLessThan(1e-6);
  });
});

describe.runIf(hasCuda)('CUDA selective scan, many blocks and long sequences, against the CPU kernel', () => {
  // Sizes large enough to spread over every SM and to cross many checkpoints, where races and
  // carry bugs show; the CPU kernel (itself checked against the float64 oracle) is the reference.
  const cases: [number, number, number, number, number][] = [
    // batch, dim, seqlen, dstate, groups
    [2, 130, 4099, 16, 1],
    [1, 64, 20000, 16, 2],
    [3, 33, 517, 64, 1],
    [1, 8, 300, 256, 1],
  ];
  it.each(cases)('batch %i, dim %i, seqlen %i, dstate %i, groups %i', (batch, dim, L, N, groups) => {
    for (const dtype of ['float32', 'bfloat16'] as const) {
      const n = batch * dim * L;
      const host = {
        u: tensor(normal(rand, n), [batch, dim, L], dtype),
        delta: tensor(uniform(rand, n, -4, 0), [batch, dim, L], dtype),
        A: tensor(uniform(rand, dim * N, -2, -0.1), [dim, N]),
        B: tensor(normal(rand, batch * groups * N * L), [batch, groups, N, L], dtype),
        C: tensor(normal(rand, batch * groups * N * L), [batch, groups, N, L], dtype),
        D: tensor(normal(rand, dim), [dim]),
        z: tensor(normal(rand, n), [batch, dim, L], dtype),
        deltaBias: tensor(normal(rand, dim, 0.5), [dim]),
      };
      const h0 = tensor(normal(rand, batch * dim * N), [batch, dim, N]);
      const dev = Object.fromEntries(Object.entries(host).map(([k, t]) => [k, t.to('cuda')])) as typeof host;
      const opts = { deltaSoftplus: true, returnFinalState: true };
      const cpu = rk.ops.selectiveScan.forward(host, { ...opts, initialState: h0 });
      const gpu = rk.ops.selectiveScan.forward(dev, { ...opts, initialState: h0.to('cuda') });
      const tol = dtype === 'float32' ? 1e-5 : 1e-2;
      expect(relErr(values(gpu.outputs.y), values(cpu.outputs.y)), `y ${dtype} ${at}`).toBeLessThan(tol);
      expect(relErr(values(gpu.outputs.finalState!), values(cpu.outputs.finalState!)), `final ${at}`).toBeLessThan(tol);
      const dy = tensor(normal(rand, n), [batch, dim, L], dtype);
      const dFinal = tensor(normal(rand, batch * dim * N), [batch, dim, N]);
      const gc = rk.ops.selectiveScan.backward(cpu.ctx, { y: dy, finalState: dFinal });
      const gg = rk.ops.selectiveScan.backward(gpu.ctx, { y: dy.to('cuda'), finalState: dFinal.to('cuda') });
      for (const k of ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'deltaBias', 'initialState'] as const)
        expect(relErr(values(gg[k]!), values(gc[k]!)), `grad ${k} ${dtype} ${at}`).toBeLessThan(2 * tol);
    }
  });

  it('packed sequences over many blocks', () => {
    const dim = 96,
      L = 3000,
      N = 16;
    const cu = [0, 1, 700, 700, 2047, 2999];
    const host = {
      u: tensor(normal(rand, dim * L), [1, dim, L]),
      delta: tensor(uniform(rand, dim * L, -4, 0), [1, dim, L]),
      A: tensor(uniform(rand, dim * N, -2, -0.1), [dim, N]),
      B: tensor(normal(rand, N * L), [1, 1, N, L]),
      C: tensor(normal(rand, dim * N), [dim, N]),
      z: tensor(normal(rand, dim * L), [1, dim, L]),
    };
    const dev = Object.fromEntries(Object.entries(host).map(([k, t]) => [k, t.to('cuda')])) as typeof host;
    const opts = { deltaSoftplus: true, returnFinalState: true, cuSeqlens: cu };
    const cpu = rk.ops.selectiveScan.forward(host, opts);
    const gpu = rk.ops.selectiveScan.forward(dev, opts);
    expect(relErr(values(gpu.outputs.y), values(cpu.outputs.y)), at).toBeLessThan(1e-5);
    const dy = tensor(normal(rand, dim * L), [1, dim, L]);
    const gc = rk.ops.selectiveScan.backward(cpu.ctx, { y: dy });
    const gg = rk.ops.selectiveScan.backward(gpu.ctx, { y: dy.to('cuda') });
    for (const k of ['u', 'delta', 'A', 'B', 'C', 'z'] as const)
      expect(relErr(values(gg[k]!), values(gc[k]!)), `grad ${k} ${at}`).toBeLessThan(2e-5);
  });
});
