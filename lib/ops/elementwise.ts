/**
 * Small differentiable helpers (add, sub, mul, scale, square, sum, mean) to build losses on top of
 * the kernels. They compute on the host in float64 and return a tensor of the input's dtype and
 * device: convenient for losses and tests, not meant as fast kernels.
 */
import { defineOp, setAccumulate } from '../autograd';
import { ShapeError } from '../errors';
import { Tensor } from '../tensor';
import { expectDevice, finiteNumber, requireTensor } from '../validate';

function values(t: Tensor): Float64Array {
  return Float64Array.from(t.toFloat32Array());
}
function make(v: ArrayLike<number>, shape: readonly number[], like: Tensor): Tensor {
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

const addOp = defineOp<AB, Out, void, null>({
  name: 'add',
  forward({ a, b }) {
    requireTensor('add', 'a', a); requireTensor('add', 'b', b); sameShape('add', a, b);
    return { outputs: { out: make(zip(values(a), values(b), (x, y) => x + y), a.shape, a) }, ctx: null };
  },
  backward(_ctx, { out }) {
    return { a: out ?? null, b: out ?? null };
  },
});

const subOp = defineOp<AB, Out, void, null>({
  name: 'sub',
  forward({ a, b }) {
    requireTensor('sub', 'a', a); requireTensor('sub', 'b', b); sameShape('sub', a, b);
    return { outputs: { out: make(zip(values(a), values(b), (x, y) => x - y), a.shape, a) }, ctx: null };
  },
  backward(_ctx, { out }) {
    return { a: out ?? null, b: out ? make(values(out).map((x) => -x), out.shape, out) : null };
  },
});

const mulOp = defineOp<AB, Out, void, AB>({
  name: 'mul',
  forward({ a, b }) {
    requireTensor('mul', 'a', a); requireTensor('mul', 'b', b); sameShape('mul', a, b);
    return { outputs: { out: make(zip(values(a), values(b), (x, y) => x * y), a.shape, a) }, ctx: { a, b } };
  },
  backward({ a, b }, { out }) {
    if (!out) return {};
    const g = values(out);
    return { a: make(zip(g, values(b), (x, y) => x * y), a.shape, a), b: make(zip(g, values(a), (x, y) => x * y), b.shape, b) };
  },
});

const scaleOp = defineOp<{ a: Tensor }, Out, number, number>({
  name: 'scale',
  forward({ a }, s = 1) {
    requireTensor('scale', 'a', a);
    finiteNumber('scale', 'the factor', s);
    return { outputs: { out: make(values(a).map((x) => x * s), a.shape, a) }, ctx: s };
  },
  backward(s, { out }) {
    return { a: out ? make(values(out).map((x) => x * s), out.shape, out) : null };
  },
});

const squareOp = defineOp<{ a: Tensor }, Out, void, Tensor>({
  name: 'square',
  forward({ a }) {
    requireTensor('square', 'a', a);
    return { outputs: { out: make(values(a).map((x) => x * x), a.shape, a) }, ctx: a };
  },
  backward(a, { out }) {
    return { a: out ? make(zip(values(out), values(a), (g, x) => 2 * g * x), a.shape, a) : null };
  },
});

const sumOp = defineOp<{ a: Tensor }, Out, void, Tensor>({
  name: 'sum',
  forward({ a }) {
    requireTensor('sum', 'a', a);
    let s = 0;
    for (const x of values(a)) s += x;
    return { outputs: { out: make([s], [], a) }, ctx: a };
  },
  backward(a, { out }) {
    if (!out) return {};
    const g = values(out)[0];
    return { a: make(new Float64Array(a.size).fill(g), a.shape, a) };
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
