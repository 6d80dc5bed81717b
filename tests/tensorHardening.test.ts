// The Tensor class and the CPU output pool against bad input: every failure is a typed error that
// names the argument, fake and detached tensors are recognised, arrays kept past dispose() cannot
// show another tensor's data, `using` type-checks, and tensors refuse to be structured-cloned.
import { inspect } from 'node:util';
import { serialize } from 'node:v8';
import { MessageChannel, Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import * as rk from '../lib/index';
import { hostBufferAllocations } from '../lib/pool';
import { tensor, expectError, typecheck } from './helpers';

const detach = (buf: ArrayBufferLike) => structuredClone(buf, { transfer: [buf as ArrayBuffer] });
const any = <T>(x: unknown) => x as T;

describe('new Tensor(storage, shape, dtype, device) validates its arguments', () => {
  const f32 = (n: number) => new Float32Array(n);

  it('accepts matching storage', () => {
    const t = new rk.Tensor(f32(6), [2, 3], 'float32', 'cpu');
    expect(t.size).toBe(6);
    t.dispose();
    new rk.Tensor(new Uint16Array(4), [4], 'bfloat16', 'cpu').dispose();
    new rk.Tensor(f32(0), [0, 5], 'float32', 'cpu').dispose();
  });

  it('device, dtype and shape', () => {
    expectError(
      () => new rk.Tensor(f32(1), [1], 'float32', any('tpu')),
      'ERR_DEVICE',
      /Tensor: device must be 'cpu' or 'cuda', got tpu/,
    );
    expectError(() => new rk.Tensor(f32(1), [1], any('int8'), 'cpu'), 'ERR_DTYPE', /Tensor: dtype must be one of/);
    expectError(() => new rk.Tensor(f32(1), any('1'), 'float32', 'cpu'), 'ERR_SHAPE', /shape must be an array/);
    expectError(() => new rk.Tensor(f32(1), [-1], 'float32', 'cpu'), 'ERR_SHAPE', /invalid dimension -1/);
    expectError(() => new rk.Tensor(f32(1), [NaN], 'float32', 'cpu'), 'ERR_SHAPE', /invalid dimension NaN/);
    expectError(
      () => new rk.Tensor(f32(3), [2, 2], 'float32', 'cpu'),
      'ERR_SHAPE',
      /storage has 3 elements, shape \[2,2\] needs 4/,
    );
  });

  it('storage of the wrong kind', () => {
    expectError(
      () => new rk.Tensor(any([1, 2]), [2], 'float32', 'cpu'),
      'ERR_ARGUMENT',
      /storage of a cpu float32 tensor must be a Float32Array, got an array/,
    );
    expectError(
      () => new rk.Tensor(any(null), [0], 'float32', 'cpu'),
      'ERR_ARGUMENT',
      /must be a Float32Array, got null/,
    );
    expectError(
      () => new rk.Tensor(new Uint16Array(2), [2], 'float32', 'cpu'),
      'ERR_DTYPE',
      /must be a Float32Array, got a Uint16Array/,
    );
    expectError(
      () => new rk.Tensor(f32(2), [2], 'float16', 'cpu'),
      'ERR_DTYPE',
      /must be a Uint16Array, got a Float32Array/,
    );
    expectError(
      () => new rk.Tensor(any(new Float64Array(2)), [2], 'float32', 'cpu'),
      'ERR_DTYPE',
      /got a Float64Array/,
    );
    expectError(
      () => new rk.Tensor(f32(2), [2], 'float32', 'cuda'),
      'ERR_ARGUMENT',
      /storage of a cuda tensor must be a DeviceBuffer/,
    );
  });

  it('storage over shared, resizable or detached memory', () => {
    const shared = new Float32Array(new SharedArrayBuffer(8));
    expectError(
      () => new rk.Tensor(shared, [2], 'float32', 'cpu'),
      'ERR_ARGUMENT',
      /SharedArrayBuffer \(shared memory is not supported\)/,
    );
    const resizable = new Float32Array(
      new (ArrayBuffer as unknown as new (n: number, o: object) => ArrayBuffer)(8, { maxByteLength: 16 }),
    );
    expectError(() => new rk.Tensor(resizable, [2], 'float32', 'cpu'), 'ERR_ARGUMENT', /resizable ArrayBuffer/);
    const gone = f32(2);
    detach(gone.buffer);
    expectError(() => new rk.Tensor(gone, [0], 'float32', 'cpu'), 'ERR_ARGUMENT', /detached/);
  });

  it('an owner that is not a Tensor', () => {
    expectError(
      () => new rk.Tensor(f32(1), [1], 'float32', 'cpu', any([1])),
      'ERR_ARGUMENT',
      /Tensor: owner: not a Tensor, got an array; make one with Tensor.from/,
    );
  });
});

describe('Tensor.from and Tensor.zeros', () => {
  it('options: null means defaults, a non-object is ERR_ARGUMENT', () => {
    const a = rk.Tensor.from([1, 2], [2], null);
    expect([a.dtype, a.device]).toEqual(['float32', 'cpu']);
    const z = rk.Tensor.zeros([3], null);
    expect([z.dtype, z.size]).toEqual(['float32', 3]);
    expectError(
      () => rk.Tensor.from([1], [1], any('float16')),
      'ERR_ARGUMENT',
      /Tensor.from: options must be an object/,
    );
    expectError(
      () => rk.Tensor.from([1], [1], any(5)),
      'ERR_ARGUMENT',
      /options must be an object like \{ dtype, device \}, got number/,
    );
    expectError(() => rk.Tensor.zeros([1], any(true)), 'ERR_ARGUMENT', /Tensor.zeros: options must be an object/);
    expectError(() => rk.Tensor.zeros([1], any([])), 'ERR_ARGUMENT', /Tensor.zeros: options must be an object/);
  });

  it('data that is not an array of numbers', () => {
    expectError(() => rk.Tensor.from(any('abc'), [3]), 'ERR_ARGUMENT', /data must be an array or a TypedArray/);
    expectError(() => rk.Tensor.from(any(rk.Tensor.from([1], [1])), [1]), 'ERR_ARGUMENT', /data is already a Tensor/);
    const gone = new Float32Array(4);
    detach(gone.buffer);
    expectError(() => rk.Tensor.from(gone, [4]), 'ERR_ARGUMENT', /detached/);
  });

  it('copies an array backed by a SharedArrayBuffer (storage is never shared memory)', () => {
    const shared = new Float32Array(new SharedArrayBuffer(12));
    shared.set([1, 2, 3]);
    const t = rk.Tensor.from(shared, [3]);
    expect(t.dataSync()).not.toBe(shared);
    shared[0] = 42;
    expect(Array.from(t.dataSync())).toEqual([1, 2, 3]);
    const bits = new Uint16Array(new SharedArrayBuffer(4));
    bits.set([0x3c00, 0x4000]); // 1, 2 in float16
    expect(Array.from(rk.Tensor.from(bits, [2], { dtype: 'float16' }).toFloat32Array())).toEqual([1, 2]);
    const f16 = rk.Tensor.from(shared, [3], { dtype: 'float16' });
    expect(Array.from(f16.toFloat32Array())).toEqual([42, 2, 3]);
  });

  it('allocations too large are ERR_OUT_OF_MEMORY, never a RangeError', () => {
    expectError(
      () => rk.Tensor.zeros([2 ** 40]),
      'ERR_OUT_OF_MEMORY',
      /Tensor.zeros: shape \[1099511627776\]: cannot allocate/,
    );
    expectError(
      () => rk.Tensor.zeros([2 ** 20, 2 ** 20], { dtype: 'bfloat16' }),
      'ERR_OUT_OF_MEMORY',
      /cannot allocate 2199023255552 bytes/,
    );
    expectError(
      () => rk.Tensor.from(any({ length: 2 ** 40 }), [2 ** 40]),
      'ERR_OUT_OF_MEMORY',
      /Tensor.from: copying data: cannot allocate/,
    );
  });
});

describe('objects that are not real tensors', () => {
  it("methods on an object with Tensor's prototype throw ERR_ARGUMENT, not a TypeError", () => {
    const fake = Object.create(rk.Tensor.prototype) as rk.Tensor;
    expect(rk.Tensor.isTensor(fake)).toBe(false);
    expect(rk.Tensor.isTensor(rk.Tensor.from([1], [1]))).toBe(true);
    const calls: Record<string, () => unknown> = {
      storage: () => fake.storage,
      disposed: () => fake.disposed,
      dataSync: () => fake.dataSync(),
      toFloat32Array: () => fake.toFloat32Array(),
      to: () => fake.to('cpu'),
      clone: () => fake.clone(),
      reshape: () => fake.reshape([0]),
      dispose: () => fake.dispose(),
      'Symbol.dispose': () => fake[Symbol.dispose](),
      toString: () => String(fake),
      shape: () => fake.shape,
      size: () => fake.size,
    };
    for (const call of Object.values(calls))
      expectError(call, 'ERR_ARGUMENT', /not a Tensor, got an object with Tensor's prototype/);
    return expect(fake.data()).rejects.toMatchObject({ code: 'ERR_ARGUMENT' });
  });

  it('a plain array in place of a tensor is told to use Tensor.from', () => {
    expectError(
      () => rk.Tensor.prototype.dataSync.call(any([1, 2, 3])),
      'ERR_ARGUMENT',
      /Tensor.dataSync: not a Tensor, got an array; make one with Tensor.from\(data, shape\)/,
    );
    expectError(
      () => rk.Tensor.prototype.dispose.call(any(new Float32Array(2))),
      'ERR_ARGUMENT',
      /got a Float32Array; make one with Tensor.from/,
    );
  });

  it('a tensor whose ArrayBuffer was transferred away reports ERR_DISPOSED when used', () => {
    const before = rk.memory().cpu;
    const t = tensor([1, 2, 3, 4], [2, 2]);
    const view = t.reshape([4]);
    detach(t.dataSync().buffer);
    expect(t.disposed).toBe(true);
    expect(view.disposed).toBe(true);
    expectError(() => t.dataSync(), 'ERR_DISPOSED', /detached/);
    expectError(() => view.toFloat32Array(), 'ERR_DISPOSED', /the tensor this view was made from was disposed/);
    expectError(() => t.clone(), 'ERR_DISPOSED', /detached/);
    const b = tensor([1, 2, 3, 4], [1, 2, 2]);
    expectError(() => rk.linearScan({ a: t, b }), 'ERR_DISPOSED', /disposed|detached/);
    b.dispose();
    const empty = new rk.Tensor(new Float32Array(0), [2, 0], 'float32', 'cpu');
    detach(empty.dataSync().buffer);
    expect(empty.disposed).toBe(true);
    expect(() => {
      t.dispose();
      view.dispose();
      empty.dispose();
    }).not.toThrow();
    expect(rk.memory().cpu).toEqual(before);
  });
});

describe('arrays kept past dispose()', () => {
  // 1 MiB float32 outputs: large enough for the pool.
  const shape = [1, 4, 1 << 16];
  const n = 4 << 16;

  it('read as empty once their pooled buffer is reused, and the pool still avoids re-allocation', () => {
    rk.releaseCpuPool();
    const a = tensor(new Float32Array(n).fill(0.5), shape);
    const b = tensor(new Float32Array(n).fill(1), shape);
    const first = rk.linearScan({ a, b }).h;
    const stale = first.dataSync();
    const alsoStale = first.storage as Float32Array;
    expect(stale[0]).toBe(1);
    first.dispose();
    expect(stale.length).toBe(0);
    expect(alsoStale.length).toBe(0);
    expect(rk.memory().cpu.pooledBytes).toBe(4 * n);

    // Reuse: many outputs of the same size, disposed in turn, allocate nothing new.
    const allocated = hostBufferAllocations();
    const b2 = tensor(new Float32Array(n).fill(-3), shape);
    for (let i = 0; i < 20; i++) {
      const h = rk.linearScan({ a, b: b2 }).h;
      expect(h.dataSync()[0]).toBe(-3);
      expect(stale.length).toBe(0); // never shows the new output's data
      h.dispose();
    }
    expect(hostBufferAllocations()).toBe(allocated);
    expect(rk.memory().cpu.pooledBytes).toBe(4 * n);
    for (const t of [a, b, b2]) t.dispose();
    rk.releaseCpuPool();
  });

  it("a second tensor over an output's array keeps that memory out of the pool", () => {
    rk.releaseCpuPool();
    const a = tensor(new Float32Array(n).fill(0.5), shape);
    const b = tensor(new Float32Array(n).fill(1), shape);
    const out = rk.linearScan({ a, b }).h;
    const wrapper = rk.Tensor.from(out.dataSync(), shape);
    wrapper.dispose(); // must not take out's memory
    expect(out.disposed).toBe(false);
    expect(out.dataSync()[0]).toBe(1);
    out.dispose();
    expect(rk.memory().cpu.pooledBytes).toBe(0);
    for (const t of [a, b]) t.dispose();
  });
});

describe('Symbol.dispose', () => {
  it('`using` disposes at the end of the block', () => {
    let kept: rk.Tensor;
    {
      using t = rk.Tensor.zeros([2]);
      kept = t;
      expect(t.disposed).toBe(false);
    }
    expect(kept.disposed).toBe(true);
    expect(typeof rk.Tensor.prototype[Symbol.dispose]).toBe('function');
  });

  it('`using t = Tensor...` type-checks under strict TypeScript', () => {
    expect(
      typecheck(`import { Tensor } from 'LIB/tensor';
export function f(): boolean {
  using t = Tensor.zeros([1]);
  return t.disposed;
}
`),
    ).toEqual([]);
  });
});

describe('structured clone', () => {
  const cannot = /Tensor cannot be cloned or posted to a worker; post t.dataSync\(\) with its shape and dtype/;

  it('structuredClone and v8.serialize throw a DataCloneError instead of dropping the data', () => {
    const t = tensor([1, 2, 3], [3]);
    expect(() => structuredClone(t)).toThrow(cannot);
    expect(() => structuredClone({ nested: [t.reshape([1, 3])] })).toThrow(cannot);
    expect(() => serialize(t)).toThrow();
    try {
      structuredClone(t);
    } catch (e) {
      expect((e as Error).name).toBe('DataCloneError');
    }
    expect(inspect(t)).toBe('Tensor(shape=[3], dtype=float32, device=cpu)'); // the guard does not clutter logs
    // Its data can be sent instead.
    const copy = structuredClone({ data: t.dataSync(), shape: t.shape, dtype: t.dtype });
    expect(Array.from(rk.Tensor.from(copy.data, copy.shape, { dtype: copy.dtype }).dataSync())).toEqual([1, 2, 3]);
  });

  it('postMessage of a tensor to a port or a worker throws', async () => {
    const t = tensor([1, 2], [2]);
    const { port1, port2 } = new MessageChannel();
    expect(() => port1.postMessage(t)).toThrow(cannot);
    port1.close();
    port2.close();
    const w = new Worker('require("node:worker_threads").parentPort.on("message", () => {})', { eval: true });
    try {
      expect(() => w.postMessage({ x: t })).toThrow(cannot);
    } finally {
      await w.terminate();
    }
  });
});
