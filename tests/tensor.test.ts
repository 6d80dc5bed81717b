// Tensor creation, conversion, disposal, memory accounting, the CUDA namespace without a GPU,
// and that a wrong backward is caught by gradcheck.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { hasCuda, tensor, values } from './helpers';

describe('Tensor', () => {
  it('wraps a Float32Array without a copy', () => {
    const data = new Float32Array([1, 2, 3, 4, 5, 6]);
    const t = rk.Tensor.from(data, [2, 3]);
    expect(t.dataSync()).toBe(data);
    expect(t.shape).toEqual([2, 3]);
    expect(t.size).toBe(6);
    data[0] = 42;
    expect(t.dataSync()[0]).toBe(42);
  });

  it('encodes and decodes float16 and bfloat16 (round to nearest even)', () => {
    const xs = [0, 1, -2.5, 65504, 1e-7, 3.14159, -0.0001, 1 / 3];
    const h = rk.Tensor.from(xs, [8], { dtype: 'float16' });
    expect(h.dataSync()).toBeInstanceOf(Uint16Array);
    expect(h.dataSync()[1]).toBe(0x3c00);
    expect(h.dataSync()[3]).toBe(0x7bff);
    const hv = h.toFloat32Array();
    expect(hv[2]).toBe(-2.5);
    expect(Math.abs(hv[5] - 3.14159)).toBeLessThan(2e-3);
    expect(Math.abs(hv[4] - 1e-7)).toBeLessThan(6e-8); // subnormal
    const bf = rk.Tensor.from(xs, [8], { dtype: 'bfloat16' });
    expect(bf.dataSync()[1]).toBe(0x3f80);
    expect(Math.abs(bf.toFloat32Array()[7] - 1 / 3)).toBeLessThan(2e-3);
    expect(rk.Tensor.from([70000, NaN], [2], { dtype: 'float16' }).toFloat32Array()[0]).toBe(Infinity);
    expect(Number.isNaN(rk.Tensor.from([NaN], [1], { dtype: 'bfloat16' }).toFloat32Array()[0])).toBe(true);
  });

  it('converts dtypes with to()', () => {
    const t = tensor([1.5, -2, 3.25], [3]);
    const h = t.to({ dtype: 'bfloat16' });
    expect(h.dtype).toBe('bfloat16');
    expect(Array.from(h.to({ dtype: 'float32' }).dataSync())).toEqual([1.5, -2, 3.25]);
    expect(t.to('cpu')).toBe(t);
  });

  it('dispose, Symbol.dispose, clone and reshape views', () => {
    const t = tensor([1, 2, 3, 4], [2, 2]);
    const c = t.clone();
    const v = t.reshape([4]);
    expect(Array.from(values(v))).toEqual([1, 2, 3, 4]);
    {
      using u = tensor([1], [1]);
      expect(u.disposed).toBe(false);
    }
    t.dispose();
    expect(t.disposed).toBe(true);
    expect(() => t.dataSync()).toThrow(rk.DisposedError);
    t.dispose(); // idempotent
    expect(Array.from(values(c))).toEqual([1, 2, 3, 4]);
  });

  it('memory() counts live tensors and bytes', () => {
    const before = rk.memory().cpu;
    const ts = [tensor(new Float32Array(100), [100]), tensor(new Float32Array(10), [10], 'float16')];
    const mid = rk.memory().cpu;
    expect(mid.tensors - before.tensors).toBe(2);
    expect(mid.bytes - before.bytes).toBe(400 + 20);
    ts.forEach((t) => t.dispose());
    expect(rk.memory().cpu).toEqual(before);
  });

  it('cpuThreads reports the thread count', () => {
    expect(rk.cpuThreads()).toBeGreaterThanOrEqual(1);
  });
});

describe('cuda namespace', () => {
  it('answers whether CUDA is available, and why not', () => {
    expect(typeof rk.cuda.available()).toBe('boolean');
    if (!hasCuda) {
      expect(rk.cuda.reason().length).toBeGreaterThan(0);
      expect(() => rk.cuda.synchronize()).toThrow(rk.DeviceError);
      expect(() => rk.cuda.deviceProperties()).toThrow(/CUDA is not available/);
    } else {
      expect(rk.cuda.deviceProperties().multiProcessorCount).toBeGreaterThan(0);
    }
  });
  it.runIf(process.env.RK_REQUIRE_GPU === '1')('a GPU is present (npm run test:gpu)', () => {
    expect(rk.cuda.available(), rk.cuda.reason()).toBe(true);
  });
});

describe('autograd', () => {
  it('gradcheck catches a wrong backward', () => {
    const bad = rk.defineOp<{ x: rk.Tensor }, { y: rk.Tensor }, void, rk.Tensor>({
      name: 'cube-with-wrong-grad',
      forward: ({ x }) => ({
        outputs: {
          y: tensor(
            values(x).map((v) => v ** 3),
            [...x.shape],
          ),
        },
        ctx: x,
      }),
      backward: (x, { y }) => ({
        x: tensor(
          values(x).map((v, i) => 2 * v * v * values(y!)[i]),
          [...x.shape],
        ),
      }),
    });
    const x = tensor([0.5, -1, 2], [3]);
    expect(rk.gradcheck((x_) => rk.sum(bad({ x: x_ }).y), [x]).ok).toBe(false);
  });
  it('grad sums contributions along several paths and returns zeros for unused inputs', () => {
    const x = tensor([1, 2, 3], [3]);
    const unused = tensor([5], [1]);
    const [gx, gu] = rk.grad((x_, _u) => rk.sum(rk.add(rk.mul(x_, x_), x_)))(x, unused);
    expect(Array.from(values(gx))).toEqual([3, 5, 7]);
    expect(Array.from(values(gu))).toEqual([0]);
  });
});
