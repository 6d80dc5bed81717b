/**
 * Linear scan: h_t = a_t * h_{t-1} + b_t along the last axis of (batch, channels, length) tensors.
 *
 * - `a`, `b`: (batch, channels, length), float32 / float16 / bfloat16 (same dtype and device).
 * - options.initialState: (batch, channels) float32, the state before the first step (h_{-1}; zeros if absent).
 * - options.reverse: scan from the end (h_t = a_t * h_{t+1} + b_t).
 * - options.returnFinalState: also return the state after the last step, (batch, channels) float32.
 *
 * Outputs `h` (batch, channels, length) in the input dtype, `finalState` (or null). The state is
 * carried in float32 whatever the input dtype. Backward gives grads for a, b and initialState.
 */
import { defineOp } from '../autograd';
import { nativeCall, type Steps } from '../async';
import { type Storage } from '../native';
import { Tensor, type DType, type Device } from '../tensor';
import {
  booleanOption,
  checkCtx,
  ctxBoolean,
  expectCtxValues,
  expectDType,
  expectDevice,
  expectRank,
  expectShape,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
} from '../validate';
import { ShapeError } from '../errors';

export interface LinearScanInputs {
  a: Tensor;
  b: Tensor;
}
export interface LinearScanOptions {
  initialState?: Tensor | null;
  reverse?: boolean;
  returnFinalState?: boolean;
}
export interface LinearScanOutputs {
  h: Tensor;
  finalState: Tensor | null;
}
export interface LinearScanCtx {
  a: Tensor;
  h: Tensor;
  initialState: Tensor | null;
  dtype: DType;
  device: Device;
  shape: readonly number[];
  reverse: boolean;
}

const OP = 'linearScan';
const DIMS = 'batch, channels, length';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];

function* forward(
  inputs: LinearScanInputs,
  options: LinearScanOptions = {},
): Steps<{ outputs: LinearScanOutputs; ctx: LinearScanCtx }> {
  const { a, b } = readInputs(OP, inputs, ['a', 'b']);
  const opts = readOptions(OP, options, ['initialState', 'reverse', 'returnFinalState']);
  requireTensor(OP, 'a', a);
  requireTensor(OP, 'b', b);
  expectRank(OP, 'a', a, 3, DIMS);
  const [batch, channels, length] = a.shape;
  if (a.size === 0)
    throw new ShapeError(`${OP}: a has shape [${a.shape.join(',')}]; every dimension must be at least 1`);
  expectShape(OP, 'b', b, a.shape, DIMS, 'to match a');
  expectDType(OP, 'a', a, FLOAT_DTYPES);
  expectDType(OP, 'b', b, [a.dtype], 'to match a');
  expectDevice(OP, 'b', b, a.device, 'to match a');
  const reverse = booleanOption(OP, 'reverse', opts.reverse, false);
  const returnFinal = booleanOption(OP, 'returnFinalState', opts.returnFinalState, false);
  const h0 = opts.initialState ?? null;
  if (h0 !== null) checkInitialState(OP, h0, a);
  const rows = batch * channels;
  const r = yield* nativeCall((n) =>
    n.linearScanForward({
      device: a.device,
      dtype: a.dtype,
      tensors: { a: a.storage, b: b.storage, h0: h0?.storage ?? null },
      config: { rows, length, reverse, returnFinal },
    }),
  );
  const h = new Tensor(r.h, a.shape, a.dtype, a.device);
  const finalState = r.finalState ? new Tensor(r.finalState, [batch, channels], 'float32', a.device) : null;
  return {
    outputs: { h, finalState },
    ctx: sealCtx(OP, { a, h, initialState: h0, dtype: a.dtype, device: a.device, shape: a.shape, reverse }),
  };
}

function checkInitialState(op: string, h0: unknown, a: Tensor): void {
  requireTensor(op, 'initialState', h0);
  expectShape(op, 'initialState', h0, [a.shape[0], a.shape[1]], 'batch, channels', 'to match a');
  expectDType(op, 'initialState', h0, ['float32'], '(states are float32)');
  expectDevice(op, 'initialState', h0, a.device, 'to match a');
}

export interface LinearScanGrads {
  a: Tensor;
  b: Tensor;
  initialState: Tensor | null;
}

function* backward(
  ctx: LinearScanCtx,
  grads: { h?: Tensor | null; finalState?: Tensor | null },
): Steps<LinearScanGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { a: 'tensor', h: 'tensor', initialState: 'tensor?' });
  // The saved tensors must agree with each other and with the ctx's other fields.
  const { a, h } = ctx;
  expectRank(op, 'a (saved for backward)', a, 3, DIMS);
  expectShape(op, 'h (saved for backward)', h, a.shape, DIMS, 'to match a');
  expectDType(op, 'h (saved for backward)', h, [a.dtype], 'to match a');
  expectDevice(op, 'h (saved for backward)', h, a.device, 'to match a');
  if (ctx.initialState) checkInitialState(op, ctx.initialState, a);
  expectCtxValues(OP, 'ctx', ctx, { shape: a.shape, dtype: a.dtype, device: a.device });
  const reverse = ctxBoolean(OP, 'ctx.reverse', ctx.reverse);
  const h0 = ctx.initialState ?? null;
  const [batch, channels, length] = ctx.shape;
  const g = readGrads(op, grads, ['h', 'finalState']);
  const gh = g.h ?? null;
  const gFinal = g.finalState ?? null;
  if (gh) {
    expectShape(op, 'grad of h', gh, ctx.shape, DIMS, 'to match h');
    expectDType(op, 'grad of h', gh, [ctx.dtype], 'to match h');
    expectDevice(op, 'grad of h', gh, ctx.device, 'to match h');
  }
  if (gFinal) {
    expectShape(op, 'grad of finalState', gFinal, [batch, channels], 'batch, channels', 'to match finalState');
    expectDType(op, 'grad of finalState', gFinal, ['float32']);
    expectDevice(op, 'grad of finalState', gFinal, ctx.device, 'to match finalState');
  }
  const r = yield* nativeCall((n) =>
    n.linearScanBackward({
      device: ctx.device,
      dtype: ctx.dtype,
      tensors: { a: a.storage, h0: h0?.storage ?? null },
      grads: { h: h.storage, gh: gh?.storage ?? null, gFinal: gFinal?.storage ?? null },
      config: { rows: batch * channels, length, reverse, needGh0: h0 !== null },
    }),
  );
  const wrap = (s: Storage) => new Tensor(s, ctx.shape, ctx.dtype, ctx.device);
  return {
    a: wrap(r.ga),
    b: wrap(r.gb),
    initialState: r.gh0 ? new Tensor(r.gh0, [batch, channels], 'float32', ctx.device) : null,
  };
}

export const linearScan = defineOp<
  LinearScanInputs,
  LinearScanOutputs,
  LinearScanOptions,
  LinearScanCtx,
  LinearScanGrads
>({
  name: OP,
  differentiableOptions: ['initialState'],
  forward,
  backward,
});
