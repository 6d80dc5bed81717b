// Linear scan: the float64 oracle (checked by finite differences), then the native kernels against
// it, forward and backward, for every device present, dtype and awkward size.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { devices, tensor, tolerance, values } from './helpers';
import { linearScanBackwardRef, linearScanRef } from './reference/linearScan';
import { dot, finiteDifferences, freshSeed, normal, relErr, rng, uniform } from './reference/util';

const seed = freshSeed();
const rand = rng(seed);
const at = `(seed ${seed})`;

describe('linear scan oracle', () => {
  it.each([false, true])('backward equals finite differences (reverse=%s)', (reverse) => {
    const rows = 3,
      length = 7;
    const a = uniform(rand, rows * length, -1.2, 1.2);
    const b = normal(rand, rows * length);
    const h0 = normal(rand, rows);
    const gh = normal(rand, rows * length);
    const gFinal = normal(rand, rows);
    const loss = ([a_, b_, h0_]: Float64Array[]) => {
      const r = linearScanRef(a_, b_, rows, length, h0_, reverse);
      return dot(r.h, gh) + dot(r.finalState, gFinal);
    };
    const [fa, fb, fh0] = finiteDifferences(loss, [a, b, h0]);
    const g = linearScanBackwardRef(a, b, rows, length, h0, reverse, gh, gFinal);
    expect(relErr(g.ga, fa), at).toBeLessThan(1e-7);
    expect(relErr(g.gb, fb), at).toBeLessThan(1e-7);
    expect(relErr(g.gh0, fh0), at).toBeLessThan(1e-7);
  });
});

const sizes: [number, number, number][] = [
  [1, 1, 1],
  [1, 1, 2],
  [1, 3, 7],
  [2, 5, 33],
  [3, 2, 100],
  [1, 9, 2049],
  [2, 17, 1000],
  [1, 2, 5000],
];

for (const device of devices) {
  describe.runIf(device === 'cpu' || rk.cuda.available())(`linear scan on ${device}`, () => {
    for (const dtype of rk.DTYPES) {
      it.each(sizes)(`${dtype} forward and backward, batch %i, channels %i, length %i`, (batch, channels, length) => {
        for (const reverse of [false, true]) {
          for (const withH0 of [false, true]) {
            const rows = batch * channels,
              n = rows * length;
            const shape = [batch, channels, length];
            const a = tensor(uniform(rand, n, -1, 1), shape, dtype, device);
            const b = tensor(normal(rand, n), shape, dtype, device);
            const h0 = withH0 ? tensor(normal(rand, rows), [batch, channels], 'float32', device) : undefined;
            // The oracle sees exactly the values the kernel sees (after rounding to dtype).
            const a64 = values(a),
              b64 = values(b),
              h064 = h0 ? values(h0) : null;
            const { outputs, ctx } = rk.ops.linearScan.forward(
              { a, b },
              { initialState: h0, reverse, returnFinalState: true },
            );
            const ref = linearScanRef(a64, b64, rows, length, h064, reverse);
            const tol = tolerance[dtype];
            const what = `${at} reverse=${reverse} h0=${withH0}`;
            expect(relErr(values(outputs.h), ref.h), `h ${what}`).toBeLessThan(tol);
            expect(relErr(values(outputs.finalState!), ref.finalState), `finalState ${what}`).toBeLessThan(
              1e-5 + (dtype === 'float32' ? 0 : tol),
            );

            const gh = tensor(normal(rand, n), shape, dtype, device);
            const gFinal = tensor(normal(rand, rows), [batch, channels], 'float32', device);
            const grads = rk.ops.linearScan.backward(ctx, { h: gh, finalState: gFinal });
            // For half inputs the kernel saves h in the input dtype, so the oracle uses that h too.
            const gref = linearScanBackwardRef(a64, b64, rows, length, h064, reverse, values(gh), values(gFinal));
            expect(relErr(values(grads.b!), gref.gb), `grad b ${what}`).toBeLessThan(tol);
            expect(relErr(values(grads.a!), gref.ga), `grad a ${what}`).toBeLessThan(
              dtype === 'float32' ? tol : 2 * tol,
            );
            if (withH0) expect(relErr(values(grads.initialState!), gref.gh0), `grad h0 ${what}`).toBeLessThan(tol);
            else expect(grads.initialState).toBeNull();
          }
        }
      });
    }

    it('gradient flows from finalState alone, and from h alone', () => {
      const shape = [2, 3, 11];
      const a = tensor(uniform(rand, 66, -1, 1), shape, 'float32', device);
      const b = tensor(normal(rand, 66), shape, 'float32', device);
      const { ctx } = rk.ops.linearScan.forward({ a, b }, { returnFinalState: true });
      const gFinal = normal(rand, 6);
      const g1 = rk.ops.linearScan.backward(ctx, { finalState: tensor(gFinal, [2, 3], 'float32', device) });
      const r1 = linearScanBackwardRef(values(a), values(b), 6, 11, null, false, null, gFinal);
      expect(relErr(values(g1.a!), r1.ga), at).toBeLessThan(1e-5);
      expect(relErr(values(g1.b!), r1.gb), at).toBeLessThan(1e-5);
      const gh = normal(rand, 66);
      const g2 = rk.ops.linearScan.backward(ctx, { h: tensor(gh, shape, 'float32', device) });
      const r2 = linearScanBackwardRef(values(a), values(b), 6, 11, null, false, gh, null);
      expect(relErr(values(g2.a!), r2.ga), at).toBeLessThan(1e-5);
    });

    it('finalState is the last step in scan order and is omitted unless asked', () => {
      const a = tensor([1, 1, 1], [1, 1, 3], 'float32', device);
      const b = tensor([1, 2, 3], [1, 1, 3], 'float32', device);
      expect(rk.linearScan({ a, b }).finalState).toBeNull();
      expect(Array.from(values(rk.linearScan({ a, b }, { returnFinalState: true }).finalState!))).toEqual([6]);
      const rev = rk.linearScan({ a, b }, { reverse: true, returnFinalState: true });
      expect(Array.from(values(rev.h))).toEqual([6, 5, 3]);
      expect(Array.from(values(rev.finalState!))).toEqual([6]);
    });
  });
}

describe('linear scan through the tape', () => {
  it('grad of a loss matches finite differences (gradcheck)', () => {
    const shape = [2, 3, 9];
    const a = tensor(uniform(rand, 54, -0.9, 0.9), shape);
    const b = tensor(normal(rand, 54), shape);
    const h0 = tensor(normal(rand, 6), [2, 3]);
    const w = tensor(normal(rand, 54), shape);
    const f = (a_: rk.Tensor, b_: rk.Tensor, h0_: rk.Tensor) => {
      const { h, finalState } = rk.linearScan({ a: a_, b: b_ }, { initialState: h0_, returnFinalState: true });
      return rk.add(rk.sum(rk.mul(h, w)), rk.sum(rk.square(finalState!)));
    };
    const res = rk.gradcheck(f, [a, b, h0], { eps: 1e-2, rtol: 2e-2, atol: 2e-3 });
    expect(res.ok, `${at} ${JSON.stringify(res.worst)}`).toBe(true);
  });

  it('two chained scans differentiate through both', () => {
    const shape = [1, 2, 6];
    const a = tensor(uniform(rand, 12, -0.9, 0.9), shape);
    const b = tensor(normal(rand, 12), shape);
    const f = (a_: rk.Tensor, b_: rk.Tensor) => {
      const { h } = rk.linearScan({ a: a_, b: b_ });
      const { h: h2 } = rk.linearScan({ a: a_, b: h }, { reverse: true });
      return rk.mean(rk.square(h2));
    };
    const res = rk.gradcheck(f, [a, b], { eps: 1e-2, rtol: 2e-2, atol: 1e-3 });
    expect(res.ok, `${at} ${JSON.stringify(res.worst)}`).toBe(true);
  });
});
