// Bad input of every kind gives a typed error that names the argument; the process survives.
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { fromNative } from '../lib/errors';
import { tensor, expectError } from './helpers';

const shape = [2, 3, 5];
const a = () => tensor(new Float32Array(30).fill(0.5), shape);
const b = () => tensor(new Float32Array(30).fill(1), shape);

describe('linearScan argument errors', () => {
  it('wrong shapes', () => {
    expectError(
      () => rk.linearScan({ a: a(), b: tensor(new Float32Array(10), [2, 5]) }),
      'ERR_SHAPE',
      /b has shape \[2,5\], expected \[2,3,5\]/,
    );
    expectError(
      () => rk.linearScan({ a: tensor(new Float32Array(10), [2, 5]), b: b() }),
      'ERR_SHAPE',
      /a has shape \[2,5\], expected 3 dimensions/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: tensor(new Float32Array(30), [2, 5, 3]) }),
      'ERR_SHAPE',
      /b has shape \[2,5,3\]/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: b() }, { initialState: tensor(new Float32Array(3), [3]) }),
      'ERR_SHAPE',
      /initialState has shape \[3\], expected \[2,3\]/,
    );
  });
  it('empty tensors', () => {
    expectError(
      () => rk.linearScan({ a: tensor([], [2, 0, 5]), b: tensor([], [2, 0, 5]) }),
      'ERR_SHAPE',
      /a has shape \[2,0,5\]/,
    );
    expectError(() => rk.linearScan({ a: tensor([], [1, 1, 0]), b: tensor([], [1, 1, 0]) }), 'ERR_SHAPE', /at least 1/);
  });
  it('wrong dtypes', () => {
    expectError(
      () => rk.linearScan({ a: a(), b: tensor(new Float32Array(30), shape, 'bfloat16') }),
      'ERR_DTYPE',
      /b has dtype bfloat16, expected float32/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: b() }, { initialState: tensor(new Float32Array(6), [2, 3], 'float16') }),
      'ERR_DTYPE',
      /initialState has dtype float16/,
    );
  });
  it('wrong devices', () => {
    if (rk.cuda.available()) {
      expectError(() => rk.linearScan({ a: a(), b: b().to('cuda') }), 'ERR_DEVICE', /b is on cuda, expected cpu/);
    } else {
      expectError(() => a().to('cuda'), 'ERR_DEVICE', /CUDA is not available/);
    }
    expectError(() => tensor([1], [1], 'float32', 'tpu' as rk.Device), 'ERR_DEVICE', /device must be 'cpu' or 'cuda'/);
  });
  it('not a tensor, missing, unknown names and bad option types', () => {
    expectError(
      () => rk.linearScan({ a: a(), b: [1, 2] as unknown as rk.Tensor }),
      'ERR_ARGUMENT',
      /b must be a Tensor/,
    );
    expectError(
      () => rk.linearScan({ a: a() } as unknown as rk.LinearScanInputs),
      'ERR_ARGUMENT',
      /b must be a Tensor, got undefined/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: b(), c: b() } as unknown as rk.LinearScanInputs),
      'ERR_ARGUMENT',
      /unknown input 'c'/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: b() }, { revers: true } as unknown as rk.LinearScanOptions),
      'ERR_ARGUMENT',
      /unknown option 'revers'/,
    );
    expectError(
      () => rk.linearScan({ a: a(), b: b() }, { reverse: 1 as unknown as boolean }),
      'ERR_ARGUMENT',
      /reverse must be a boolean/,
    );
    expectError(
      () => rk.linearScan(null as unknown as rk.LinearScanInputs),
      'ERR_ARGUMENT',
      /inputs must be an object/,
    );
  });
  it('disposed tensors', () => {
    const x = a();
    x.dispose();
    expectError(() => rk.linearScan({ a: x, b: b() }), 'ERR_DISPOSED', /a was disposed/);
    const y = a();
    const { ctx } = rk.ops.linearScan.forward({ a: y, b: b() });
    y.dispose();
    expectError(
      () => rk.ops.linearScan.backward(ctx, { h: b() }),
      'ERR_DISPOSED',
      /a \(saved for backward\) was disposed/,
    );
    expectError(() => x.dataSync(), 'ERR_DISPOSED', /disposed/);
  });
  it('bad gradients in backward', () => {
    const { ctx } = rk.ops.linearScan.forward({ a: a(), b: b() });
    expectError(
      () => rk.ops.linearScan.backward(ctx, { h: tensor(new Float32Array(6), [2, 3]) }),
      'ERR_SHAPE',
      /grad of h has shape \[2,3\]/,
    );
    expectError(
      () => rk.ops.linearScan.backward(ctx, { h: tensor(new Float32Array(30), shape, 'float16') }),
      'ERR_DTYPE',
      /grad of h has dtype float16/,
    );
    expectError(
      () => rk.ops.linearScan.backward(ctx, { finalState: tensor(new Float32Array(30), shape) }),
      'ERR_SHAPE',
      /grad of finalState/,
    );
  });
});

describe('tensor argument errors', () => {
  it('Tensor.from checks data, shape and dtype', () => {
    expectError(() => rk.Tensor.from([1, 2, 3], [2, 2]), 'ERR_SHAPE', /3 elements, shape \[2,2\] needs 4/);
    expectError(() => rk.Tensor.from([1], [-1]), 'ERR_SHAPE', /invalid dimension -1/);
    expectError(() => rk.Tensor.from([1], [1.5]), 'ERR_SHAPE', /invalid dimension 1.5/);
    expectError(() => rk.Tensor.from([1], [1], { dtype: 'int8' as rk.DType }), 'ERR_DTYPE', /dtype must be one of/);
    expectError(() => rk.Tensor.from(5 as unknown as number[], [1]), 'ERR_ARGUMENT', /data must be an array/);
    expectError(() => rk.Tensor.from([1, 2], [2]).reshape([3]), 'ERR_SHAPE', /cannot view \[2\] as \[3\]/);
    expectError(
      () => rk.Tensor.from([1, 2], [2]).to(5 as unknown as rk.Device),
      'ERR_ARGUMENT',
      /Tensor.to: expected a device/,
    );
  });
  it('non-finite scalars and bad helper arguments', () => {
    const x = tensor([1, 2], [2]);
    expectError(() => rk.scale(x, NaN), 'ERR_ARGUMENT', /scale: the factor must be a finite number, got NaN/);
    expectError(() => rk.scale(x, Infinity), 'ERR_ARGUMENT', /got Infinity/);
    expectError(
      () => rk.gradcheck((t) => rk.sum(t), [x], { eps: 0 }),
      'ERR_ARGUMENT',
      /eps must be a finite positive number/,
    );
    expectError(
      () => rk.gradcheck((t) => rk.sum(t), [x], { rtol: NaN }),
      'ERR_ARGUMENT',
      /rtol must be a finite number/,
    );
    expectError(() => rk.add(x, tensor([1, 2, 3], [3])), 'ERR_SHAPE', /add: b has shape \[3\], expected \[2\]/);
    expectError(
      () => rk.valueAndGrad((t) => t)(5 as unknown as rk.Tensor),
      'ERR_ARGUMENT',
      /argument 0 is not a Tensor/,
    );
  });
});

describe('native layer re-checks what reaches it', () => {
  // Calls the addon directly with inconsistent sizes, bypassing lib/: it must refuse, not overrun.
  const nat = require('../build/Release/recurrent_kernels.node');
  it('refuses storage of the wrong length or type', () => {
    const f = new Float32Array(10);
    const fwd = (device: string, dtype: string, a: unknown, b: unknown, h0: unknown, rows: number, length: number) =>
      nat.linearScanForward({
        device,
        dtype,
        tensors: { a, b, h0 },
        config: { rows, length, reverse: false, returnFinal: false },
      });
    expect(() => fwd('cpu', 'float32', f, new Float32Array(9), null, 2, 5)).toThrow(/b has 9 elements, expected 10/);
    expect(() => fwd('cpu', 'float32', f, new Uint16Array(10), null, 2, 5)).toThrow(/does not match dtype/);
    expect(() => fwd('cpu', 'float32', f, f, new Float32Array(1), 2, 5)).toThrow(/initialState has 1 elements/);
    expect(() => fwd('cpu', 'float32', f, f, null, 2 ** 40, 2 ** 40)).toThrow(/overflows/);
    expect(() => fwd('cpu', 'float32', f, f, null, -1, 5)).toThrow(/rows must be a non-negative integer/);
    expect(() => fwd('gpu', 'float32', f, f, null, 2, 5)).toThrow(/device must be/);
    expect(() =>
      nat.linearScanBackward({
        device: 'cpu',
        dtype: 'float32',
        tensors: { a: f, h0: null },
        grads: { h: f, gh: new Float32Array(3), gFinal: null },
        config: { rows: 2, length: 5, reverse: false, needGh0: false },
      }),
    ).toThrow(/grad of h has 3 elements/);
    expect(() => nat.linearScanForward(f)).toThrow(/argument 1 \(request\) must be an object/);
    expect(() => nat.linearScanForward({ device: 'cpu', dtype: 'float32', tensors: { a: f, b: f, h0: null } })).toThrow(
      /request.config must be an object/,
    );
    expect(() => fwd('cpu', 'float64', f, f, null, 2, 5)).toThrow(expect.objectContaining({ code: 'ERR_DTYPE' }));
  });
});

describe('error codes', () => {
  const { readFileSync, readdirSync } = require('node:fs') as typeof import('node:fs');
  const { join } = require('node:path') as typeof import('node:path');
  const root = join(__dirname, '..');
  const cppCodes = [
    ...readFileSync(join(root, 'cpp', 'napi', 'errors.h'), 'utf8').matchAll(
      /constexpr const char\* k\w+ = "(ERR_[A-Z_]+)"/g,
    ),
  ].map((m) => m[1]);
  const tsCodes = [
    ...readFileSync(join(root, 'lib', 'errors.ts'), 'utf8')
      .split('export class')[0]
      .matchAll(/'(ERR_[A-Z_]+)'/g),
  ].map((m) => m[1]);

  it('every code the addon raises is one of lib/errors.ts and becomes its typed class', () => {
    expect(cppCodes.length).toBeGreaterThan(5);
    for (const c of cppCodes) {
      expect(tsCodes, c).toContain(c);
      const e = Object.assign(new Error('x'), { code: c });
      const typed = fromNative(e);
      expect(typed, c).toBeInstanceOf(rk.RecurrentKernelsError);
      expect((typed as rk.RecurrentKernelsError).code).toBe(c);
    }
  });

  it('the native sources spell codes only through those constants', () => {
    const files = (readdirSync(join(root, 'cpp'), { recursive: true }) as string[]).filter(
      (f) => /\.(cc|h|inc)$/.test(f) && !f.endsWith(join('napi', 'errors.h')),
    );
    const literal = files.filter((f) => /"ERR_[A-Z_]+"/.test(readFileSync(join(root, 'cpp', f), 'utf8')));
    expect(literal).toEqual([]);
  });
});
