// Thousands of calls leave no live tensors behind once disposed, and RSS stays flat.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, tensor } from './helpers';

/** After `warmup` calls of run, 1000 more leave the live tensors, native bytes and RSS (within 64 MB) as they were. */
function expectFlat(device: rk.Device, run: () => void, warmup: number): void {
  for (let i = 0; i < warmup; i++) run();
  global.gc?.();
  const live0 = rk.memory();
  const rss0 = process.memoryUsage().rss;
  for (let i = 0; i < 1000; i++) run();
  global.gc?.();
  const live1 = rk.memory();
  expect(live1[device].tensors).toBe(live0[device].tensors);
  expect(live1.cuda.nativeBytes).toBe(live0.cuda.nativeBytes);
  expect(process.memoryUsage().rss - rss0).toBeLessThan(64 * 1024 * 1024);
}

describe.each(devices)('memory on %s', (device) => {
  it('live tensors and RSS stay flat over thousands of forward+backward calls', () => {
    const shape = [2, 8, 256];
    const a = tensor(new Float32Array(4096).fill(0.9), shape, 'float32', device);
    const b = tensor(new Float32Array(4096).fill(0.1), shape, 'float32', device);
    const h0 = tensor(new Float32Array(16).fill(1), [2, 8], 'float32', device);
    const run = () => {
      const { outputs, ctx } = rk.ops.linearScan.forward({ a, b }, { initialState: h0, returnFinalState: true });
      const g = rk.ops.linearScan.backward(ctx, { h: outputs.h, finalState: outputs.finalState });
      for (const t of [outputs.h, outputs.finalState, g.a, g.b, g.initialState]) t?.dispose();
    };
    for (let i = 0; i < 200; i++) run();
    global.gc?.();
    const live0 = rk.memory();
    const rss0 = process.memoryUsage().rss;
    for (let i = 0; i < 3000; i++) run();
    global.gc?.();
    const live1 = rk.memory();
    expect(live1.cpu.tensors).toBe(live0.cpu.tensors);
    expect(live1.cuda.tensors).toBe(live0.cuda.tensors);
    expect(live1.cuda.nativeBytes).toBe(live0.cuda.nativeBytes);
    // 3000 iterations allocate ~250 MB in total; a leak of even one output per call would show.
    expect(process.memoryUsage().rss - rss0).toBeLessThan(64 * 1024 * 1024);
  });

  it('selective scan: live tensors and RSS stay flat over a thousand forward+backward calls', () => {
    const f = (n: number, v: number, shape: number[]) => tensor(new Float32Array(n).fill(v), shape, 'float32', device);
    const inputs = {
      u: f(4 * 300, 0.3, [1, 4, 300]),
      delta: f(4 * 300, 0.1, [1, 4, 300]),
      A: f(4 * 8, -1, [4, 8]),
      B: f(8 * 300, 0.2, [1, 1, 8, 300]),
      C: f(4 * 8, 0.5, [4, 8]),
      D: f(4, 1, [4]),
      z: f(4 * 300, 0.7, [1, 4, 300]),
    };
    const h0 = f(2 * 4 * 8, 0.1, [2, 4, 8]);
    const run = () => {
      const { outputs, ctx } = rk.ops.selectiveScan.forward(inputs, {
        initialState: h0,
        returnFinalState: true,
        cuSeqlens: [0, 100, 290],
        deltaSoftplus: true,
      });
      const g = rk.ops.selectiveScan.backward(ctx, { y: outputs.y, finalState: outputs.finalState });
      for (const t of [outputs.y, outputs.finalState, ctx.states, ...Object.values(g)]) t?.dispose();
    };
    expectFlat(device, run, 100);
  });

  it('gated delta rule and fused cells: live tensors and RSS stay flat over many forward+backward calls', () => {
    const f = (n: number, v: number, shape: number[]) => tensor(new Float32Array(n).fill(v), shape, 'float32', device);
    const [B, T, H, K] = [1, 70, 2, 8];
    const delta = {
      q: f(B * T * H * K, 0.3, [B, T, H, K]),
      k: f(B * T * H * K, 0.2, [B, T, H, K]),
      v: f(B * T * H * K, 0.5, [B, T, H, K]),
      g: f(B * T * H, -0.1, [B, T, H]),
      beta: f(B * T * H, 0.5, [B, T, H]),
    };
    const dO = f(B * T * H * K, 0.1, [B, T, H, K]);
    const cells = {
      wx: f(2 * 9 * 4 * 3 * 8, 0.1, [2, 9, 4, 3, 8]),
      R: f(4 * 3 * 8 * 8, 0.05, [4, 3, 8, 8]),
      b: f(4 * 3 * 8, 0.1, [4, 3, 8]),
    };
    const dh = f(2 * 9 * 3 * 8, 0.1, [2, 9, 3, 8]);
    const run = () => {
      const d = rk.ops.gatedDeltaRule.forward(delta, { outputFinalState: true, useQkL2normInKernel: true });
      const dg = rk.ops.gatedDeltaRule.backward(d.ctx, { o: dO, finalState: d.outputs.finalState });
      for (const t of [d.outputs.o, d.outputs.finalState, d.ctx.states, ...Object.values(dg)]) t?.dispose();
      const c = rk.ops.fusedRnn.forward(cells, { cell: 'lstm', lengths: [9, 4] });
      const cg = rk.ops.fusedRnn.backward(c.ctx, { h: dh, finalStates: c.outputs.finalStates });
      for (const t of [c.outputs.h, c.outputs.finalStates, c.ctx.savedStates, c.ctx.savedPre, ...Object.values(cg)])
        t?.dispose();
    };
    expectFlat(device, run, 50);
  });

  it('linear attention (with its gate activations) and the causal conv: live tensors and RSS stay flat', () => {
    const f = (n: number, v: number, shape: number[]) => tensor(new Float32Array(n).fill(v), shape, 'float32', device);
    const [B, T, H, K] = [1, 70, 2, 8];
    const attn = {
      q: f(B * T * H * K, 0.3, [B, T, H, K]),
      k: f(B * T * H * K, 0.2, [B, T, H, K]),
      v: f(B * T * H * K, 0.5, [B, T, H, K]),
      decay: f(B * T * H * K, 0.1, [B, T, H, K]),
      beta: f(B * T, 0.5, [B, T, 1]),
    };
    const gates = { gateActivation: 'qwen' as const, aLog: f(H, -1, [H]), dtBias: f(H, 0.2, [H]) };
    const dO = f(B * T * H * K, 0.1, [B, T, H, K]);
    const conv = { x: f(2 * 5 * T, 0.3, [2, 5, T]), weight: f(5 * 4, 0.2, [5, 4]), bias: f(5, 0.1, [5]) };
    const dy = f(2 * 5 * T, 0.1, [2, 5, T]);
    const run = () => {
      const a = rk.ops.linearAttention.forward(attn, { ...gates, betaActivation: 'sigmoid', outputFinalState: true });
      const ag = rk.ops.linearAttention.backward(a.ctx, { o: dO, finalState: a.outputs.finalState });
      for (const t of [a.outputs.o, a.outputs.finalState, ...Object.values(ag)]) t?.dispose();
      rk.disposeCtx(a.ctx);
      const c = rk.ops.causalConv1d.forward(conv, { activation: 'silu', returnFinalState: true });
      const cg = rk.ops.causalConv1d.backward(c.ctx, { y: dy, finalState: c.outputs.finalState });
      for (const t of [c.outputs.y, c.outputs.finalState, ...Object.values(cg)]) t?.dispose();
      rk.disposeCtx(c.ctx);
    };
    expectFlat(device, run, 50);
  });

  it('the Mamba-2 scan (with the scan ctx inside its own) and its decode step: live tensors and RSS stay flat', () => {
    const f = (n: number, v: number, shape: number[]) => tensor(new Float32Array(n).fill(v), shape, 'float32', device);
    const [B, T, H, P, N] = [2, 70, 2, 3, 4];
    const m = {
      x: f(B * T * H * P, 0.3, [B, T, H, P]),
      dt: f(B * T * H, 0.2, [B, T, H]),
      A: f(H, -1, [H]),
      B: f(B * T * N, 0.5, [B, T, 1, N]),
      C: f(B * T * N, 0.4, [B, T, 1, N]),
      D: f(H, 0.5, [H]),
      z: f(B * T * H * P, 0.1, [B, T, H, P]),
    };
    const h0 = f(B * H * P * N, 0.1, [B, H, P, N]);
    const dy = f(B * T * H * P, 0.1, [B, T, H, P]);
    const state = f(B * H * P * N, 0.1, [B, H, P, N]);
    const one = {
      x: f(B * H * P, 0.3, [B, H, P]),
      dt: f(B * H, 0.2, [B, H]),
      A: m.A,
      B: f(B * N, 0.5, [B, 1, N]),
      C: f(B * N, 0.4, [B, 1, N]),
    };
    const run = () => {
      const a = rk.ops.mamba2Scan.forward(m, { dtSoftplus: true, initialStates: h0, returnFinalStates: true });
      const ag = rk.ops.mamba2Scan.backward(a.ctx, { y: dy, finalStates: a.outputs.finalStates });
      for (const t of [a.outputs.y, a.outputs.finalStates, ...Object.values(ag)]) t?.dispose();
      rk.disposeCtx(a.ctx);
      const i = rk.mamba2Scan(m, { returnFinalStates: true });
      i.y.dispose();
      i.finalStates?.dispose();
      const s = rk.mamba2StateUpdate({ state, ...one }, { returnIntermediateStates: true });
      s.y.dispose();
      s.intermediateStates?.dispose();
    };
    expectFlat(device, run, 50);
  });

  it('tensors that are never disposed are reclaimed by the garbage collector', async () => {
    expect(global.gc, 'tests run with --expose-gc').toBeTypeOf('function');
    const before = rk.memory()[device].tensors;
    for (let i = 0; i < 100; i++) tensor(new Float32Array(1000), [1000], 'float32', device);
    expect(rk.memory()[device].tensors).toBe(before + 100);
    for (let i = 0; i < 10 && rk.memory()[device].tensors > before; i++) {
      await new Promise((r) => setTimeout(r, 10));
      global.gc!();
    }
    expect(rk.memory()[device].tensors).toBeLessThanOrEqual(before);
  });
});

describe('CPU output pool', () => {
  it("reuses disposed outputs, never the caller's arrays, and reused outputs are fully rewritten", () => {
    rk.releaseCpuPool();
    const shape = [1, 4, 1 << 16]; // 1 MiB per float32 tensor
    const n = 4 << 16;
    const user = new Float32Array(n).fill(0.5);
    const a = rk.Tensor.from(user, shape);
    const b = tensor(new Float32Array(n).fill(1), shape);
    const first = rk.linearScan({ a, b }).h;
    const firstBuffer = first.dataSync().buffer;
    first.dispose();
    expect(rk.memory().cpu.pooledBytes).toBe(4 * n);
    expect(firstBuffer.byteLength).toBe(0); // its memory moved to the pool: arrays kept past dispose() read as empty
    const b2 = tensor(new Float32Array(n).fill(-3), shape);
    const second = rk.linearScan({ a, b: b2 }).h;
    expect(rk.memory().cpu.pooledBytes).toBe(0); // the output took the pooled memory
    const hv = second.dataSync();
    // h_t = 0.5 h_{t-1} - 3 from 0: -3, -4.5, ... -> -6
    expect(hv[0]).toBe(-3);
    expect(hv[1]).toBe(-4.5);
    expect(Math.abs(hv[n - 1] + 6)).toBeLessThan(1e-5);
    a.dispose();
    expect(rk.memory().cpu.pooledBytes).toBe(0); // the caller's array is not taken
    expect(user[0]).toBe(0.5);
    const view = second.reshape([n]);
    view.dispose(); // a view does not release its owner's storage
    expect(rk.memory().cpu.pooledBytes).toBe(0);
    const view2 = second.reshape([2, 2 * (1 << 16)]);
    second.dispose();
    expect(rk.memory().cpu.pooledBytes).toBe(4 * n);
    expect(() => view2.dataSync()).toThrow(rk.DisposedError); // its storage may be reused now
    rk.releaseCpuPool();
  });

  // Pooled outputs at packed positions in no sequence. A whole-sequence call fills the pool with
  // non-zero buffers (at least minPooled bytes); then a packed call (sequences [0, 100) and
  // [100, 1500) of T = 2048 positions) must take its outputs from the pool, and each named output
  // must be non-zero somewhere inside the sequences and exactly zero at positions 1500 and on.
  // positionOf(i, length): the position of element i (default: a [1, T, ...] layout).
  const T = 2048;
  const wave = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));
  type Run = (cuSeqlens: number[] | null) => {
    named: Record<string, rk.Tensor | null | undefined>;
    dispose: () => void;
  };
  function expectPooledZerosOutside(
    run: Run,
    minPooled: number,
    positionOf = (i: number, length: number) => Math.floor(i / (length / T)),
  ): void {
    rk.releaseCpuPool();
    run(null).dispose();
    const before = rk.memory().cpu.pooledBytes;
    expect(before).toBeGreaterThanOrEqual(minPooled);
    const packed = run([0, 100, 1500]); // positions 1500 .. 2047 in no sequence
    expect(rk.memory().cpu.pooledBytes).toBeLessThan(before); // the outputs came from the pool
    for (const [name, t] of Object.entries(packed.named)) {
      if (!t) continue;
      const x = t.dataSync();
      let inside = false;
      let outside = true;
      for (let i = 0; i < x.length; ++i) {
        if (positionOf(i, x.length) < 1500) inside ||= x[i] !== 0;
        else outside &&= x[i] === 0;
      }
      expect(inside, name).toBe(true);
      expect(outside, `${name} at uncovered positions`).toBe(true);
    }
    packed.dispose();
    rk.releaseCpuPool();
  }

  it.each([
    ['gated_delta', true],
    ['linear', false],
  ] as const)(
    'outputs and gradients from the pool read zero at packed positions in no sequence (linearAttention %s)',
    (updateRule, perKey) => {
      const [H, K, V] = [2, 64, 64]; // q, k, v, o, their gradients and per-key decays: 1 MiB each
      const inputs = {
        q: rk.Tensor.from(wave(T * H * K, 1), [1, T, H, K]),
        k: rk.Tensor.from(wave(T * H * K, 2), [1, T, H, K]),
        v: rk.Tensor.from(wave(T * H * V, 3), [1, T, H, V]),
        decay: perKey
          ? rk.Tensor.from(
              wave(T * H * K, 4).map((x) => -0.1 - 0.1 * Math.abs(x)),
              [1, T, H, K],
            )
          : undefined,
        beta: perKey
          ? rk.Tensor.from(
              wave(T * H, 5).map((x) => 0.5 + 0.4 * x),
              [1, T, H],
            )
          : undefined,
      };
      expectPooledZerosOutside(
        (cuSeqlens) => {
          const { outputs, ctx } = rk.ops.linearAttention.forward(inputs, { updateRule, qkL2Norm: true, cuSeqlens });
          const grads = rk.ops.linearAttention.backward(ctx, { o: outputs.o });
          return {
            named: { o: outputs.o, 'grad q': grads.q, 'grad k': grads.k, 'grad v': grads.v, 'grad decay': grads.decay },
            dispose: () => [outputs.o, grads.q, grads.k, grads.v, grads.decay, grads.beta].forEach((t) => t?.dispose()),
          };
        },
        (perKey ? 5 : 4) * T * H * K * 4,
      );
    },
  );

  it.each([false, true])(
    'y and grad x from the pool read zero at packed positions in no sequence (causalConv1d, channelsLast %s)',
    (channelsLast) => {
      const [C, W] = [128, 4]; // x, y and grad x: 1 MiB each
      const inputs = {
        x: rk.Tensor.from(wave(C * T, 1), channelsLast ? [1, T, C] : [1, C, T]),
        weight: rk.Tensor.from(wave(C * W, 2), [C, W]),
      };
      expectPooledZerosOutside(
        (cuSeqlens) => {
          const { outputs, ctx } = rk.ops.causalConv1d.forward(inputs, { activation: 'silu', channelsLast, cuSeqlens });
          const grads = rk.ops.causalConv1d.backward(ctx, { y: outputs.y });
          return {
            named: { y: outputs.y, 'grad x': grads.x },
            dispose: () => [outputs.y, grads.x, grads.weight].forEach((t) => t?.dispose()),
          };
        },
        2 * C * T * 4,
        (i) => (channelsLast ? Math.floor(i / C) : i % T),
      );
    },
  );

  it('an output taken from the pool reads zero at packed positions in no sequence (gated delta rule)', () => {
    const [H, K, V] = [2, 8, 64]; // o and grad v: 1 MiB each
    const inputs = {
      q: rk.Tensor.from(wave(T * H * K, 1), [1, T, H, K]),
      k: rk.Tensor.from(wave(T * H * K, 2), [1, T, H, K]),
      v: rk.Tensor.from(wave(T * H * V, 3), [1, T, H, V]),
      g: rk.Tensor.from(
        wave(T * H, 4).map((x) => -0.1 - 0.1 * Math.abs(x)),
        [1, T, H],
      ),
      beta: rk.Tensor.from(
        wave(T * H, 5).map((x) => 0.5 + 0.4 * x),
        [1, T, H],
      ),
    };
    expectPooledZerosOutside(
      (cuSeqlens) => {
        const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, { useQkL2normInKernel: true, cuSeqlens });
        const grads = rk.ops.gatedDeltaRule.backward(ctx, { o: outputs.o });
        return {
          named: { o: outputs.o, 'grad v': grads.v },
          dispose: () => [outputs.o, grads.q, grads.k, grads.v].forEach((t) => t?.dispose()),
        };
      },
      2 * T * H * V * 4,
    );
  });
});
