/**
 * Small differentiable helpers (add, sub, mul, scale, square, sum, mean) to build losses on top of
 * the kernels. They compute on the host in float64 and return a tensor of the input's dtype and
 * device: convenient for losses and tests, not meant as fast kernels.
 */
import { defineOp, setAccumulate } from '../autograd';
import { ArgumentError, ShapeError } from '../errors';
import { Tensor, type DType, type Device } from '../tensor';
import {
  checkCtx,
  expectDType,
  expectDevice,
  expectShape,
  finiteNumber,
  readGrads,
  readInputs,
  requireTensor,
  sealCtx,
} from '../validate';

function values(t: Tensor): Float64Array {
  return Float64Array.from(t.toFloat32Array());
}
function make(v: ArrayLike<number>, shape: readonly number[], like: { dtype: DType; device: Device }): Tensor {
  return Tensor.from(Float32Array.from(v), shape, { dtype: like.dtype, device: like.device });
}
function sameShape(op: string, a: Tensor, b: Tensor): void {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i]))
    throw new ShapeError(`${op}: b has shape [${b.shape.join(',')}], expected [${a.shape.join(',')}] to match a`);
  expectDevice(op, 'b', b, a.device, 'to match a');
}
function zip(a: Float64Array, b: Float64Array, f: (x: number, y: number) => number): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f(a[i], b[i]);
  return out;
}

type AB = { a: Tensor; b: Tensor };
type Out = { out: Tensor };
/** What every helper's ctx holds: the output's shape, dtype and device (to check its gradient). */
type Like = { shape: readonly number[]; dtype: DType; device: Device };

/** The inputs a and b of a binary helper, checked. */
function binary(op: string, inputs: AB): AB {
  const { a, b } = readInputs(op, inputs, ['a', 'b']);
  requireTensor(op, 'a', a);
  requireTensor(op, 'b', b);
  sameShape(op, a, b);
  return { a, b };
}
/** The input a of a unary helper, checked. */
function unary(op: string, inputs: { a: Tensor }): Tensor {
  const { a } = readInputs(op, inputs, ['a']);
  requireTensor(op, 'a', a);
  return a;
}
/** The ctx of a helper's forward: the output's shape, dtype and device, and what its backward needs. */
function ctxOf<C extends object>(op: string, out: Tensor, extra: C): Like & C {
  return sealCtx(op, { shape: out.shape, dtype: out.dtype, device: out.device, ...extra });
}
/** Checks a helper's ctx (the fields in `tensors` are saved tensors) and returns its output's gradient, or null. */
function gradOut(
  op: string,
  ctx: Like,
  grads: { out?: Tensor | null },
  tensors: Record<string, 'tensor'> = {},
): Tensor | null {
  checkCtx(op, ctx, tensors);
  const where = `${op}.backward`;
  if (!Array.isArray(ctx.shape) || !ctx.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
    throw new ArgumentError(`${where}: ctx.shape must be an array of sizes, got ${String(ctx.shape)}`);
  const { out } = readGrads(where, grads, ['out']);
  if (!out) return null;
  expectShape(where, 'grad of out', out, ctx.shape, 'the shape of out', 'to match out');
  expectDType(where, 'grad of out', out, [ctx.dtype], 'to match out');
  expectDevice(where, 'grad of out', out, ctx.device, 'to match out');
  return out;
}

const addOp = defineOp<AB, Out, void, Like>({
  name: 'add',
  forward(inputs) {
    const { a, b } = binary('add', inputs);
    const out = make(
      zip(values(a), values(b), (x, y) => x + y),
      a.shape,
      a,
    );
    return { outputs: { out }, ctx: ctxOf('add', out, {}) };
  },
  backward(ctx, grads) {
    const out = gradOut('add', ctx, grads);
    return { a: out, b: out };
  },
});

const subOp = defineOp<AB, Out, void, Like>({
  name: 'sub',
  forward(inputs) {
    const { a, b } = binary('sub', inputs);
    const out = make(
      zip(values(a), values(b), (x, y) => x - y),
      a.shape,
      a,
    );
    return { outputs: { out }, ctx: ctxOf('sub', out, {}) };
  },
  backward(ctx, grads) {
    const out = gradOut('sub', ctx, grads);
    return {
      a: out,
      b: out
        ? make(
            values(out).map((x) => -x),
            out.shape,
            out,
          )
        : null,
    };
  },
});

const mulOp = defineOp<AB, Out, void, Like & AB>({
  name: 'mul',
  forward(inputs) {
    const { a, b } = binary('mul', inputs);
    const out = make(
      zip(values(a), values(b), (x, y) => x * y),
      a.shape,
      a,
    );
    return { outputs: { out }, ctx: ctxOf('mul', out, { a, b }) };
  },
  backward(ctx, grads) {
    const out = gradOut('mul', ctx, grads, { a: 'tensor', b: 'tensor' });
    if (!out) return { a: null, b: null };
    const { a, b } = ctx;
    sameShape('mul.backward', a, b);
    expectShape('mul.backward', 'a (saved for backward)', a, ctx.shape, 'the shape of out', 'to match out');
    const g = values(out);
    return {
      a: make(
        zip(g, values(b), (x, y) => x * y),
        a.shape,
        a,
      ),
      b: make(
        zip(g, values(a), (x, y) => x * y),
        b.shape,
        b,
      ),
    };
  },
});

const scaleOp = defineOp<{ a: Tensor }, Out, number, Like & { factor: number }>({
  name: 'scale',
  forward(inputs, s = 1) {
    const a = unary('scale', inputs);
    const factor = finiteNumber('scale', 'the factor', s, { float32: true });
    const out = make(
      values(a).map((x) => x * factor),
      a.shape,
      a,
    );
    return { outputs: { out }, ctx: ctxOf('scale', out, { factor }) };
  },
  backward(ctx, grads) {
    const out = gradOut('scale', ctx, grads);
    const factor = finiteNumber('scale.backward', 'ctx.factor', ctx.factor);
    return {
      a: out
        ? make(
            values(out).map((x) => x * factor),
            out.shape,
            out,
          )
        : null,
    };
  },
});

const squareOp = defineOp<{ a: Tensor }, Out, void, Like & { a: Tensor }>({
  name: 'square',
  forward(inputs) {
    const a = unary('square', inputs);
    const out = make(
      values(a).map((x) => x * x),
      a.shape,
      a,
    );
    return { outputs: { out }, ctx: ctxOf('square', out, { a }) };
  },
  backward(ctx, grads) {
    const out = gradOut('square', ctx, grads, { a: 'tensor' });
    if (!out) return { a: null };
    const { a } = ctx;
    expectShape('square.backward', 'a (saved for backward)', a, ctx.shape, 'the shape of out', 'to match out');
    return {
      a: make(
        zip(values(out), values(a), (g, x) => 2 * g * x),
        a.shape,
        a,
      ),
    };
  },
});

const sumOp = defineOp<{ a: Tensor }, Out, void, Like & { a: Tensor }>({
  name: 'sum',
  forward(inputs) {
    const a = unary('sum', inputs);
    let s = 0;
    for (const x of values(a)) s += x;
    const out = make([s], [], a);
    return { outputs: { out }, ctx: ctxOf('sum', out, { a }) };
  },
  backward(ctx, grads) {
    const out = gradOut('sum', ctx, grads, { a: 'tensor' });
    if (!out) return { a: null };
    const { a } = ctx;
    return { a: make(new Float64Array(a.size).fill(values(out)[0]), a.shape, a) };
  },
});

export const add = (a: Tensor, b: Tensor): Tensor => addOp({ a, b }).out;
export const sub = (a: Tensor, b: Tensor): Tensor => subOp({ a, b }).out;
export const mul = (a: Tensor, b: Tensor): Tensor => mulOp({ a, b }).out;
export const scale = (a: Tensor, s: number): Tensor => scaleOp({ a }, s).out;
export const square = (a: Tensor): Tensor => squareOp({ a }).out;
export const sum = (a: Tensor): Tensor => sumOp({ a }).out;
export const mean = (a: Tensor): Tensor => scale(sum(a), a.size === 0 ? 0 : 1 / a.size);

export const elementwiseOps = { add: addOp, sub: subOp, mul: mulOp, scale: scaleOp, square: squareOp, sum: sumOp };

// Gradients reaching one tensor along several paths are summed without being recorded.
setAccumulate((a, b) => addOp.hooks.forward({ a, b }).outputs.out);
