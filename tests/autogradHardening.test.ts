// The tape through views and copies, typed errors for junk given to the autograd API and to every
// backward hook, own-property options, the typing of grad / valueAndGrad, and tensor lifetimes
// (disposeCtx, Tape.dispose, what grad / valueAndGrad release, tidy).
import { afterEach, describe, expect, expectTypeOf, it } from 'vitest';
import * as rk from '../lib/index';
import { hasCuda, tensor, values, expectError, typecheck } from './helpers';

let seed = 7;
function rand(n: number, scale = 0.5): number[] {
  return Array.from({ length: n }, () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return (seed / 2 ** 31 - 0.5) * 2 * scale;
  });
}
const randT = (shape: number[], scale = 0.5) =>
  tensor(
    rand(
      shape.reduce((a, b) => a * b, 1),
      scale,
    ),
    shape,
  );
const close = (a: rk.Tensor, b: rk.Tensor, tol = 1e-6) => {
  expect(a.shape).toEqual(b.shape);
  const x = values(a),
    y = values(b);
  x.forEach((v, i) =>
    expect(Math.abs(v - y[i]), `element ${i}: ${v} vs ${y[i]}`).toBeLessThanOrEqual(tol * (1 + Math.abs(y[i]))),
  );
};
const any = (v: unknown) => v as never;

/** One small forward of every op with a backward, for the ctx tests. */
function forwards() {
  const ls = rk.ops.linearScan.forward({ a: randT([1, 2, 3]), b: randT([1, 2, 3]) }, { initialState: randT([1, 2]) });
  const ss = rk.ops.selectiveScan.forward({
    u: randT([1, 4, 6]),
    delta: randT([1, 4, 6]),
    A: randT([4, 3]),
    B: randT([1, 3, 6]),
    C: randT([1, 3, 6]),
  });
  const gd = rk.ops.gatedDeltaRule.forward({
    q: randT([1, 5, 2, 4]),
    k: randT([1, 5, 2, 4]),
    v: randT([1, 5, 2, 3]),
    g: randT([1, 5, 2]),
    beta: randT([1, 5, 2]),
  });
  const fr = rk.ops.fusedRnn.forward(
    { wx: randT([1, 3, 4, 2, 2]), R: randT([4, 2, 2, 2]), b: randT([4, 2, 2]) },
    { cell: 'lstm' },
  );
  const nr = rk.ops.newtonRnn.forward(
    { wx: randT([1, 3, 3, 4]), R: randT([3, 4]), b: randT([3, 4]) },
    { cell: 'gru-diag' },
  );
  return [
    { name: 'linearScan', hooks: rk.ops.linearScan as never, r: ls, grads: { h: ls.outputs.h }, cfg: 'shape' },
    { name: 'selectiveScan', hooks: rk.ops.selectiveScan as never, r: ss, grads: { y: ss.outputs.y }, cfg: 'config' },
    { name: 'gatedDeltaRule', hooks: rk.ops.gatedDeltaRule as never, r: gd, grads: { o: gd.outputs.o }, cfg: 'config' },
    { name: 'fusedRnn', hooks: rk.ops.fusedRnn as never, r: fr, grads: { h: fr.outputs.h }, cfg: 'config' },
    { name: 'newtonRnn', hooks: rk.ops.newtonRnn as never, r: nr, grads: { y: nr.outputs.y }, cfg: 'config' },
  ] as unknown as {
    name: string;
    hooks: { backward(ctx: unknown, g: unknown): Record<string, rk.Tensor | null> };
    r: { ctx: Record<string, unknown>; outputs: Record<string, unknown> };
    grads: Record<string, rk.Tensor>;
    cfg: string;
  }[];
}

describe('views and copies on the tape', () => {
  it('reshape of a watched input (same or other shape) gives the gradients without it', () => {
    const x = randT([2, 3]);
    const ref = rk.grad((x_) => rk.sum(rk.square(x_)))(x)[0];
    close(rk.grad((x_) => rk.sum(rk.square(x_.reshape([2, 3]))))(x)[0], ref);
    close(rk.grad((x_) => rk.sum(rk.square(x_.reshape([6]))))(x)[0], ref);
    close(rk.grad((x_) => rk.sum(rk.square(x_.reshape([3, 2]).reshape([1, 6]))))(x)[0], ref);
    close(
      ref,
      tensor(
        values(x).map((v) => 2 * v),
        [2, 3],
      ),
    );
  });

  it('reshape of an op output, and of an input fed to a kernel, give the gradients without it', () => {
    const a = randT([1, 2, 5]),
      b = randT([1, 2, 5]);
    const f = (a_: rk.Tensor, b_: rk.Tensor) => rk.sum(rk.square(rk.linearScan({ a: a_, b: b_ }).h));
    const ref = rk.grad(f)(a, b);
    const viaOut = rk.grad((a_, b_) => rk.sum(rk.square(rk.linearScan({ a: a_, b: b_ }).h.reshape([10]))))(a, b);
    const flatA = a.reshape([10]);
    const viaIn = rk.grad((fa: rk.Tensor, b_: rk.Tensor) =>
      rk.sum(rk.square(rk.linearScan({ a: fa.reshape([1, 2, 5]), b: b_ }).h)),
    )(flatA, b);
    for (let i = 0; i < 2; i++) close(viaOut[i], ref[i]);
    close(viaIn[0], ref[0].reshape([10]));
    close(viaIn[1], ref[1]);
    expect(values(ref[0]).some((v) => v !== 0)).toBe(true);
  });

  it('clone and to() are recorded too', () => {
    const x = randT([4]);
    const ref = rk.grad((x_) => rk.sum(rk.square(x_)))(x)[0];
    close(rk.grad((x_) => rk.sum(rk.square(x_.clone())))(x)[0], ref);
    // A float32 -> bfloat16 copy: the gradient comes back to float32 (bf16 rounding of x and of the grad).
    const g = rk.grad((x_) => rk.sum(rk.square(x_.to({ dtype: 'bfloat16' }))))(x)[0];
    expect(g.dtype).toBe('float32');
    close(g, ref, 2e-2);
    expect(rk.grad((x_) => rk.sum(rk.square(x_.to('cpu'))))(x)[0].dtype).toBe('float32'); // to() returning itself
  });

  it.runIf(hasCuda)('to(cuda) is recorded: the gradient comes back to the CPU', () => {
    const x = randT([4]);
    const g = rk.grad((x_) => rk.sum(rk.square(x_.to('cuda'))))(x)[0];
    expect(g.device).toBe('cpu');
    close(
      g,
      tensor(
        values(x).map((v) => 2 * v),
        [4],
      ),
      1e-5,
    );
  });

  it('a persistent Tape and gradcheck see through views', () => {
    const x = randT([3, 2]);
    const tape = new rk.Tape();
    tape.watch(x);
    const y = tape.run(() => rk.sum(rk.mul(x.reshape([6]), x.reshape([6]))));
    close(
      tape.gradient(y, [x])[0],
      tensor(
        values(x).map((v) => 2 * v),
        [3, 2],
      ),
    );
    close(
      tape.gradient(y, [x])[0],
      tensor(
        values(x).map((v) => 2 * v),
        [3, 2],
      ),
    );
    tape.dispose();
    const a = randT([1, 2, 4]),
      b = randT([1, 2, 4]);
    const res = rk.gradcheck(
      (a_, b_) => rk.sum(rk.square(rk.linearScan({ a: a_.reshape([2, 4]).reshape([1, 2, 4]), b: b_ }).h.reshape([8]))),
      [a, b],
      { eps: 1e-2, rtol: 2e-2, atol: 2e-3 },
    );
    expect(res.ok, JSON.stringify(res)).toBe(true);
  });
});

describe('junk given to the autograd API gives typed errors', () => {
  it('grad, valueAndGrad, Tape, gradcheck, defineOp, disposeCtx, tidy', () => {
    const x = randT([2]);
    expectError(() => rk.grad(any(5)), 'ERR_ARGUMENT', /grad: f must be a function/);
    expectError(() => rk.valueAndGrad(any(null)), 'ERR_ARGUMENT', /valueAndGrad: f must be a function/);
    expectError(() => rk.grad((t) => t)(any([1, 2])), 'ERR_ARGUMENT', /argument 0 is not a Tensor.*Tensor\.from/);
    expectError(
      () => rk.valueAndGrad((_t: rk.Tensor) => any(3))(x),
      'ERR_ARGUMENT',
      /must return a Tensor, got number/,
    );
    const tape = new rk.Tape();
    expectError(() => tape.run(any(5)), 'ERR_ARGUMENT', /Tape.run: fn must be a function/);
    expectError(() => tape.gradient(any(null), [x]), 'ERR_ARGUMENT', /target must be a Tensor, got null/);
    expectError(() => tape.gradient(x, [any(null)]), 'ERR_ARGUMENT', /sources\[0\] must be a Tensor, got null/);
    expectError(() => tape.gradient(x, any(x)), 'ERR_ARGUMENT', /sources must be an array/);
    expectError(() => tape.gradient(x, [x], any(5)), 'ERR_ARGUMENT', /seed must be a Tensor/);
    expectError(() => tape.watch(any(5)), 'ERR_ARGUMENT', /Tape.watch: argument 0 must be a Tensor, got number/);
    expectError(
      () => rk.gradcheck((t) => rk.sum(t), [any(null)]),
      'ERR_ARGUMENT',
      /argument 0 is not a Tensor, got null/,
    );
    expectError(() => rk.gradcheck(any(5), [x]), 'ERR_ARGUMENT', /gradcheck: f must be a function/);
    expectError(() => rk.gradcheck((t) => rk.sum(t), any(x)), 'ERR_ARGUMENT', /inputs must be an array/);
    expectError(() => rk.gradcheck((t) => rk.sum(t), [x], any([1])), 'ERR_ARGUMENT', /options must be a plain object/);
    expectError(() => rk.gradcheck((_t: rk.Tensor) => any('x'), [x]), 'ERR_ARGUMENT', /must return a Tensor/);
    expectError(() => rk.defineOp(any(null)), 'ERR_ARGUMENT', /defineOp: hooks must be an object/);
    expectError(() => rk.defineOp(any({})), 'ERR_ARGUMENT', /hooks.name must be a non-empty string/);
    expectError(
      () => rk.defineOp(any({ name: 'f', forward: () => null })),
      'ERR_ARGUMENT',
      /hooks.backward must be a function/,
    );
    const bad = rk.defineOp(any({ name: 'bad', forward: () => 5, backward: () => ({}) }));
    expectError(() => bad(any({})), 'ERR_ARGUMENT', /bad.forward must return \{ outputs, ctx \}/);
    expectError(() => rk.disposeCtx(5), 'ERR_ARGUMENT', /disposeCtx/);
    expectError(() => rk.disposeCtx({ states: x }), 'ERR_ARGUMENT', /disposeCtx/);
    expect(x.disposed).toBe(false);
    expectError(() => rk.tidy(any(5)), 'ERR_ARGUMENT', /tidy: fn must be a function/);
  });

  it('a backward returning junk, or a grad of the wrong shape, is named', () => {
    const x = randT([3]);
    const junk = rk.defineOp<{ x: rk.Tensor }, { y: rk.Tensor }, void, null>({
      name: 'junk',
      forward: ({ x: t }) => ({ outputs: { y: t.clone() }, ctx: null }),
      backward: () => any(7),
    });
    expectError(() => rk.grad((t) => rk.sum(junk({ x: t }).y))(x), 'ERR_ARGUMENT', /junk.backward returned number/);
    const wrong = rk.defineOp<{ x: rk.Tensor }, { y: rk.Tensor }, void, null>({
      name: 'wrong',
      forward: ({ x: t }) => ({ outputs: { y: t.clone() }, ctx: null }),
      backward: () => ({ x: randT([4]) }),
    });
    expectError(() => rk.grad((t) => rk.sum(wrong({ x: t }).y))(x), 'ERR_SHAPE', /gradient of x from wrong.backward/);
  });

  it("the elementwise helpers' hooks", () => {
    const a = randT([3]),
      b = randT([3]);
    const { add, mul, scale, square, sum } = rk.ops;
    expectError(() => add.forward(any(null)), 'ERR_ARGUMENT', /add: inputs must be an object/);
    expectError(() => add.forward(any({ a })), 'ERR_ARGUMENT', /add: b must be a Tensor, got undefined/);
    expectError(() => add.forward(any({ a, b, c: a })), 'ERR_ARGUMENT', /unknown input 'c'/);
    expectError(() => mul.forward({ a, b: any([1, 2, 3]) }), 'ERR_ARGUMENT', /Tensor\.from/);
    expectError(() => scale.forward({ a }, NaN), 'ERR_ARGUMENT', /finite number/);
    expectError(() => square.forward(any(5)), 'ERR_ARGUMENT', /square: inputs must be an object/);
    expectError(() => rk.sum(any([1, 2])), 'ERR_ARGUMENT', /sum: a must be a Tensor, got an array/);
    const m = mul.forward({ a, b });
    const s = sum.forward({ a });
    const g = randT([3]);
    expectError(
      () => add.backward(any(null), { out: g }),
      'ERR_ARGUMENT',
      /add.backward: ctx must be the ctx returned by add.forward, got null/,
    );
    expectError(
      () => mul.backward(any({}), { out: g }),
      'ERR_ARGUMENT',
      /mul.backward: ctx is not a ctx returned by mul.forward/,
    );
    expectError(
      () => square.backward(any(s.ctx), { out: g }),
      'ERR_ARGUMENT',
      /returned by sum.forward, not square.forward/,
    );
    expectError(() => mul.backward(m.ctx, any(null)), 'ERR_ARGUMENT', /gradOutputs must be an object/);
    expectError(() => mul.backward(m.ctx, any(undefined)), 'ERR_ARGUMENT', /gradOutputs must be an object/);
    expectError(() => mul.backward(m.ctx, any({ out: 5 })), 'ERR_ARGUMENT', /grad of out must be a Tensor/);
    expectError(() => mul.backward(m.ctx, any({ y: g })), 'ERR_ARGUMENT', /'y', which is not an output/);
    expectError(() => mul.backward(m.ctx, { out: randT([4]) }), 'ERR_SHAPE', /grad of out has shape \[4\]/);
    expectError(() => sum.backward(s.ctx, { out: g }), 'ERR_SHAPE', /grad of out has shape \[3\], expected \[\]/);
    expectError(
      () => add.backward(any({ ...add.forward({ a, b }).ctx, shape: 5 }), { out: g }),
      'ERR_ARGUMENT',
      /ctx.shape/,
    );
    expect(Object.isFrozen(m.ctx)).toBe(true);
    const a2 = randT([3]);
    const m2 = mul.forward({ a: a2, b });
    a2.dispose();
    expectError(() => mul.backward(m2.ctx, { out: g }), 'ERR_DISPOSED', /a \(saved for backward\) was disposed/);
  });

  it("every op's backward: null, partial, foreign, disposed or altered ctx; junk grads", () => {
    const ops = forwards();
    for (const [i, { name, hooks, r, grads, cfg }] of ops.entries()) {
      const other = ops[(i + 1) % ops.length];
      const ctx = r.ctx;
      expectError(
        () => hooks.backward(null, grads),
        'ERR_ARGUMENT',
        new RegExp(`${name}.backward: ctx must be the ctx returned by ${name}.forward, got null`),
      );
      expectError(() => hooks.backward(undefined, grads), 'ERR_ARGUMENT', /ctx must be the ctx/);
      expectError(() => hooks.backward(7, grads), 'ERR_ARGUMENT', /ctx must be the ctx/);
      expectError(() => hooks.backward({}, grads), 'ERR_ARGUMENT', /is not a ctx returned by/);
      expectError(
        () => hooks.backward(other.r.ctx, grads),
        'ERR_ARGUMENT',
        new RegExp(`returned by ${other.name}.forward, not ${name}.forward`),
      );
      // Partial: a field missing, in a copy that keeps the brand.
      for (const k of Object.keys(ctx)) {
        const { [k]: _dropped, ...partial } = ctx;
        if (ctx[k] === null) continue; // an absent optional tensor
        expectError(
          () => hooks.backward(partial, grads),
          'ERR_ARGUMENT',
          new RegExp(`^${name}\\.backward: .*\\b${k}\\b`),
        );
      }
      // Altered: the ctx is frozen; a rebuilt copy with other numbers is refused.
      expect(Object.isFrozen(ctx)).toBe(true);
      expect(() => {
        (ctx as Record<string, unknown>).dtype = 'float16';
      }).toThrow(TypeError);
      if (cfg === 'config') {
        expect(Object.isFrozen(ctx.config)).toBe(true);
        const config = ctx.config as Record<string, unknown>;
        for (const [k, v] of Object.entries(config)) {
          const bad = typeof v === 'number' ? NaN : typeof v === 'boolean' ? 'yes' : null;
          expectError(
            () => hooks.backward({ ...ctx, config: { ...config, [k]: bad } }, grads),
            'ERR_ARGUMENT',
            undefined,
          );
        }
        expectError(
          () => hooks.backward({ ...ctx, config: { ...config, batch: 2 ** 31 } }, grads),
          'ERR_ARGUMENT',
          /ctx.config.batch is 2147483648, expected 1 from the tensors saved for backward/,
        );
        expectError(
          () => hooks.backward({ ...ctx, config: null }, grads),
          'ERR_ARGUMENT',
          /ctx.config must be an object/,
        );
      } else {
        expectError(
          () => hooks.backward({ ...ctx, shape: [2 ** 31, 2, 3] }, grads),
          'ERR_ARGUMENT',
          /ctx.shape is \[2147483648,2,3\]/,
        );
        expectError(
          () => hooks.backward({ ...ctx, reverse: 'no' }, grads),
          'ERR_ARGUMENT',
          /ctx.reverse must be a boolean/,
        );
      }
      expectError(
        () => hooks.backward({ ...ctx, dtype: 'float16' }, grads),
        'ERR_ARGUMENT',
        /ctx.dtype is float16, expected float32/,
      );
      // Junk grads.
      for (const g of [null, undefined, 5, 'y', [grads]])
        expectError(() => hooks.backward(ctx, g), 'ERR_ARGUMENT', /gradOutputs must be an object/);
      expectError(
        () => hooks.backward(ctx, { [Object.keys(grads)[0]]: 5 }),
        'ERR_ARGUMENT',
        /must be a Tensor, got number/,
      );
      expectError(
        () => hooks.backward(ctx, { nope: Object.values(grads)[0] }),
        'ERR_ARGUMENT',
        /'nope', which is not an output/,
      );
      // Inherited grads are not read.
      const g0 = hooks.backward(ctx, Object.create(grads));
      expect(Object.values(g0).every((t) => t === null || values(t).every((v) => v === 0))).toBe(true);
      // The real ctx still works; after disposeCtx it is refused.
      expect(Object.values(hooks.backward(ctx, grads)).some((t) => t !== null)).toBe(true);
      rk.disposeCtx(ctx);
      expectError(() => hooks.backward(ctx, grads), 'ERR_DISPOSED', undefined);
    }
  });

  it("every op's backward: a ctx whose saved tensors were disposed or swapped", () => {
    for (const { name, hooks, r, grads } of forwards()) {
      const inputs = (r.ctx.inputs ?? { a: r.ctx.a }) as Record<string, rk.Tensor>;
      const [k, t] = Object.entries(inputs)[0];
      // Swapped for a tensor of another shape (in a rebuilt ctx).
      const swapped = r.ctx.inputs
        ? { ...r.ctx, inputs: { ...inputs, [k]: randT([2, ...t.shape]) } }
        : { ...r.ctx, a: randT([2, 1, 2, 3]) };
      expectError(() => hooks.backward(swapped, grads), 'ERR_SHAPE', undefined);
      t.dispose();
      expectError(
        () => hooks.backward(r.ctx, grads),
        'ERR_DISPOSED',
        new RegExp(`${name}.backward: ${k} \\(saved for backward\\) was disposed`),
      );
    }
  });
});

describe('options and inputs: own properties of plain objects, null for absent tensors, arrays refused', () => {
  afterEach(() => {
    delete (Object.prototype as Record<string, unknown>).reverse;
  });

  it('inherited options are ignored, polluted prototypes included', () => {
    const a = randT([1, 1, 4]),
      b = randT([1, 1, 4]);
    const plain = values(rk.linearScan({ a, b }).h);
    expect(Array.from(values(rk.linearScan({ a, b }, Object.create({ reverse: true })).h))).toEqual(Array.from(plain));
    (Object.prototype as Record<string, unknown>).reverse = true;
    expect(Array.from(values(rk.linearScan({ a, b }, {}).h))).toEqual(Array.from(plain));
    expect(Array.from(values(rk.linearScan({ a, b }).h))).toEqual(Array.from(plain));
    delete (Object.prototype as Record<string, unknown>).reverse;
    expect(Array.from(values(rk.linearScan({ a, b }, { reverse: true }).h))).not.toEqual(Array.from(plain));
    // Inherited inputs too.
    expectError(() => rk.linearScan(Object.create({ a, b })), 'ERR_ARGUMENT', /a must be a Tensor, got undefined/);
  });

  it('options that are not plain objects are refused', () => {
    const a = randT([1, 1, 4]),
      b = randT([1, 1, 4]);
    for (const o of [[], new Map(), a, 5, 'reverse', () => 1])
      expectError(() => rk.linearScan({ a, b }, any(o)), 'ERR_ARGUMENT', /options must be a plain object/);
    expectError(() => rk.linearScan(any([a, b])), 'ERR_ARGUMENT', /inputs must be an object/);
    expect(rk.linearScan({ a, b }, any(null)).h.shape).toEqual([1, 1, 4]);
    const wx = randT([1, 3, 3, 4]),
      R = randT([3, 4]),
      bb = randT([3, 4]);
    expectError(() => rk.newtonRnn({ wx, R, b: bb }, { cell: 'gru-diag', tol: any([1]) }), 'ERR_ARGUMENT', /tol/);
  });

  it('newtonRnn accepts initialGuess: null like the other absent optional tensors', () => {
    const inputs = { wx: randT([1, 3, 3, 4]), R: randT([3, 4]), b: randT([3, 4]) };
    const ref = rk.newtonRnn(inputs, { cell: 'gru-diag', mode: 'newton' });
    const got = rk.newtonRnn({ ...inputs, h0: null }, { cell: 'gru-diag', mode: 'newton', initialGuess: null });
    expect(Array.from(values(got.y))).toEqual(Array.from(values(ref.y)));
    expectError(
      () => rk.newtonRnn(inputs, { cell: 'gru-diag', initialGuess: any([0, 1]) }),
      'ERR_ARGUMENT',
      /initialGuess must be a Tensor.*Tensor\.from/,
    );
  });

  it('a plain array where a tensor goes: ERR_ARGUMENT pointing to Tensor.from', () => {
    const arr = any([1, 2, 3]);
    const cases: [string, () => unknown][] = [
      ['a', () => rk.linearScan({ a: arr, b: randT([1, 1, 3]) })],
      ['initialState', () => rk.linearScan({ a: randT([1, 1, 3]), b: randT([1, 1, 3]) }, { initialState: arr })],
      ['u', () => rk.selectiveScan({ u: arr, delta: arr, A: arr, B: arr, C: arr })],
      ['q', () => rk.gatedDeltaRule({ q: arr, k: arr, v: arr, g: arr, beta: arr })],
      ['wx', () => rk.fusedRnn({ wx: new Float32Array(3) as never, R: arr, b: arr }, { cell: 'lstm' })],
      ['wx', () => rk.newtonRnn({ wx: arr, R: arr, b: arr }, { cell: 'gru' })],
      ['a', () => rk.add(arr, arr)],
    ];
    for (const [name, fn] of cases)
      expectError(
        fn,
        'ERR_ARGUMENT',
        new RegExp(`${name} must be a Tensor, got an? \\w+ \\(make one with Tensor\\.from`),
      );
  });
});

describe('types', () => {
  it('grad and valueAndGrad return one gradient per argument, as a tuple', () => {
    const a = randT([2]),
      b = randT([2]);
    const grads = rk.grad((x: rk.Tensor, y: rk.Tensor) => rk.sum(rk.mul(x, y)))(a, b);
    expectTypeOf(grads).toEqualTypeOf<[rk.Tensor, rk.Tensor]>();
    const vg = rk.valueAndGrad((x: rk.Tensor) => rk.sum(x))(a);
    expectTypeOf(vg.grads).toEqualTypeOf<[rk.Tensor]>();
    const loose = rk.grad((...xs: rk.Tensor[]) => rk.sum(xs[0]))(a, b);
    expectTypeOf(loose).toEqualTypeOf<rk.Tensor[]>();
    expect(grads).toHaveLength(2);
    close(grads[0], b);
    close(grads[1], a);
    // The same, checked by the compiler (expectTypeOf above is checked by none of the test runs).
    expect(
      typecheck(`import * as rk from 'LIB/index';
declare const a: rk.Tensor, b: rk.Tensor;
const grads = rk.grad((x: rk.Tensor, y: rk.Tensor) => rk.sum(rk.mul(x, y)))(a, b);
export const pair: [rk.Tensor, rk.Tensor] = grads;
// @ts-expect-error there is no third gradient
export const third: rk.Tensor = grads[2];
export const one: [rk.Tensor] = rk.valueAndGrad((x: rk.Tensor) => rk.sum(x))(a).grads;
`),
    ).toEqual([]);
  });
});

describe('tensor lifetimes', () => {
  const live = () => {
    global.gc?.();
    return rk.memory().cpu.tensors;
  };

  it('disposeCtx frees the checkpoints only, never inputs or outputs', () => {
    const ops = forwards();
    for (const { name, r } of ops) {
      const ctx = r.ctx;
      const owned = ['states', 'savedStates', 'savedPre']
        .map((k) => ctx[k])
        .filter((t): t is rk.Tensor => t instanceof rk.Tensor);
      const kept = [
        ...Object.values((ctx.inputs ?? {}) as Record<string, rk.Tensor | null>),
        ctx.a,
        ctx.h,
        ctx.trajectory,
        ...Object.values(r.outputs),
      ].filter((t): t is rk.Tensor => t instanceof rk.Tensor);
      expect(owned.length > 0, name).toBe(['selectiveScan', 'gatedDeltaRule', 'fusedRnn'].includes(name));
      rk.disposeCtx(ctx);
      rk.disposeCtx(ctx); // twice is fine
      for (const t of owned) expect(t.disposed, name).toBe(true);
      for (const t of kept) expect(t.disposed, name).toBe(false);
    }
  });

  it('a plain op call frees its checkpoints at once', () => {
    const inputs = {
      u: randT([1, 4, 50]),
      delta: randT([1, 4, 50]),
      A: randT([4, 8]),
      B: randT([1, 8, 50]),
      C: randT([1, 8, 50]),
    };
    rk.selectiveScan(inputs).y.dispose();
    const before = live();
    for (let i = 0; i < 5; i++) rk.selectiveScan(inputs).y.dispose();
    expect(rk.memory().cpu.tensors).toBeLessThanOrEqual(before);
  });

  it('Tape.dispose releases the ctx of every op it recorded; the tape is then unusable', () => {
    const x = randT([1, 4, 6]);
    const inputs = { delta: randT([1, 4, 6]), A: randT([4, 3]), B: randT([1, 3, 6]), C: randT([1, 3, 6]) };
    const tape = new rk.Tape();
    tape.watch(x);
    const before = live();
    const y = tape.run(() => rk.selectiveScan({ u: x, ...inputs }).y);
    expect(rk.memory().cpu.tensors).toBe(before + 2); // y and the checkpoints
    const [gx] = tape.gradient(y, [x]);
    tape.dispose();
    tape.dispose();
    expect(rk.memory().cpu.tensors).toBe(before + 2); // y and gx
    expect(y.disposed || gx.disposed).toBe(false);
    expectError(() => tape.gradient(y, [x]), 'ERR_DISPOSED', /this tape was disposed/);
    expectError(() => tape.run(() => 1), 'ERR_DISPOSED', /this tape was disposed/);
  });

  it("grad and valueAndGrad release the tape's intermediates, never arguments or results", () => {
    const a = randT([1, 2, 5]),
      b = randT([1, 2, 5]);
    let h: rk.Tensor | undefined;
    const f = (a_: rk.Tensor, b_: rk.Tensor) => {
      h = rk.selectiveScan({ u: a_, delta: b_, A: randT([2, 3]), B: randT([1, 3, 5]), C: randT([1, 3, 5]) }).y;
      return rk.sum(rk.square(h.reshape([10])));
    };
    rk.valueAndGrad(f)(a, b); // warm up
    const before = live();
    const { value, grads } = rk.valueAndGrad(f)(a, b);
    expect(h!.disposed).toBe(true); // an intermediate
    expect([a, b, value, ...grads].some((t) => t.disposed)).toBe(false);
    // value, two grads, and the three constants made in f (not on the tape, left to the caller).
    expect(rk.memory().cpu.tensors).toBe(before + 6);
    const g2 = rk.grad(f)(a, b);
    expect(g2.some((t) => t.disposed)).toBe(false);
    // One new tensor per argument, even where the gradients are the same.
    const [ga, gb] = rk.grad((x: rk.Tensor, y: rk.Tensor) => rk.sum(rk.add(x, y)))(a, b);
    expect(ga).not.toBe(gb);
    ga.dispose();
    expect(values(gb).every((v) => v === 1)).toBe(true);
    const [gi] = rk.grad((x: rk.Tensor) => x.reshape([10]))(a);
    expect(values(gi).every((v) => v === 1)).toBe(true);
    expect(a.disposed).toBe(false);
  });

  it('inside another tape, grad leaves the intermediates (that tape may need them)', () => {
    const x = randT([3]);
    const outer = new rk.Tape();
    outer.watch(x);
    let inner: rk.Tensor | undefined;
    const y = outer.run(() => {
      rk.grad((t: rk.Tensor) => rk.sum((inner = rk.square(t))))(x);
      return rk.sum(inner!);
    });
    expect(inner!.disposed).toBe(false);
    close(
      outer.gradient(y, [x])[0],
      tensor(
        values(x).map((v) => 2 * v),
        [3],
      ),
    );
  });

  it('tidy disposes what fn created except what it returns (and what that views)', () => {
    const outside = randT([4]);
    let made: rk.Tensor[] = [];
    const r = rk.tidy(() => {
      const a = rk.square(outside),
        b = rk.add(a, outside),
        c = rk.mul(b, b);
      const view = c.reshape([2, 2]);
      made = [a, b, c, view];
      return { view, list: [b, 5, 'x'], outside };
    });
    expect(made.map((t) => t.disposed)).toEqual([true, false, false, false]);
    expect(r.view.shape).toEqual([2, 2]);
    expect(outside.disposed).toBe(false);
    // Nested: the inner tidy's result belongs to the outer one.
    let inner: rk.Tensor | undefined;
    const kept = rk.tidy(() => {
      inner = rk.tidy(() => rk.square(outside));
      return rk.sum(outside);
    });
    expect(inner!.disposed).toBe(true);
    expect(kept.disposed).toBe(false);
    // fn throws: everything it made is disposed.
    let t: rk.Tensor | undefined;
    expect(() =>
      rk.tidy(() => {
        t = rk.square(outside);
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(t!.disposed).toBe(true);
    // Promises are refused.
    expectError(() => rk.tidy(async () => 1), 'ERR_ARGUMENT', /Promise/);
    // Counted: nothing left behind.
    const before = live();
    rk.tidy(() => {
      rk.grad((x: rk.Tensor) => rk.sum(rk.square(x)))(outside);
    });
    expect(rk.memory().cpu.tensors).toBe(before);
  });

  it('gradcheck disposes what its evaluations create', () => {
    const x = randT([5]);
    const f = (t: rk.Tensor) => rk.sum(rk.square(t));
    rk.gradcheck(f, [x]);
    const before = live();
    expect(rk.gradcheck(f, [x]).ok).toBe(true);
    expect(rk.memory().cpu.tensors).toBe(before);
  });
});
