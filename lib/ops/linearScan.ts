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
import { native, type Storage } from '../native';
import { Tensor, type DType, type Device } from '../tensor';
import {
  booleanOption, checkInputs, checkOptions, expectDType, expectDevice, expectRank, expectShape, requireTensor,
} from '../validate';
import { ShapeError } from '../errors';

export interface LinearScanInputs {
  a: Tensor;
  b: Tensor;
}
export interface LinearScanOptions {
  initialState?: Tensor;
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

function forward(inputs: LinearScanInputs, options: LinearScanOptions = {}): { outputs: LinearScanOutputs; ctx: LinearScanCtx } {
  checkInputs(OP, inputs, ['a', 'b']);
  checkOptions(OP, options, ['initialState', 'reverse', 'returnFinalState']);
  const { a, b } = inputs;
  requireTensor(OP, 'a', a);
  requireTensor(OP, 'b', b);
  expectRank(OP, 'a', a, 3, DIMS);
  const [batch, channels, length] = a.shape;
  if (a.size === 0) throw new ShapeError(`${OP}: a has shape [${a.shape.join(',')}]; every dimension must be at least 1`);
  expectShape(OP, 'b', b, a.shape, DIMS, 'to match a');
  expectDType(OP, 'a', a, FLOAT_DTYPES);
  expectDType(OP, 'b', b, [a.dtype], 'to match a');
  expectDevice(OP, 'b', b, a.device, 'to match a');
  const reverse = booleanOption(OP, 'reverse', options.reverse, false);
  const returnFinal = booleanOption(OP, 'returnFinalState', options.returnFinalState, false);
  const h0 = options.initialState ?? null;
  if (h0 !== null) {
    requireTensor(OP, 'initialState', h0);
    expectShape(OP, 'initialState', h0, [batch, channels], 'batch, channels', 'to match a');
    expectDType(OP, 'initialState', h0, ['float32'], '(states are float32)');
    expectDevice(OP, 'initialState', h0, a.device, 'to match a');
  }
  const rows = batch * channels;
  const r = native().linearScanForward(a.device, a.dtype, a.storage, b.storage, h0?.storage ?? null, rows, length,
    reverse, returnFinal);
  const h = new Tensor(r.h, a.shape, a.dtype, a.device);
  const finalState = r.finalState ? new Tensor(r.finalState, [batch, channels], 'float32', a.device) : null;
  return {
    outputs: { h, finalState },
    ctx: { a, h, initialState: h0, dtype: a.dtype, device: a.device, shape: a.shape, reverse },
  };
}

export interface LinearScanGrads {
  a: Tensor;
  b: Tensor;
  initialState: Tensor | null;
}

function backward(ctx: LinearScanCtx, grads: { h?: Tensor | null; finalState?: Tensor | null }): LinearScanGrads {
  const op = `${OP}.backward`;
  const [batch, channels, length] = ctx.shape;
  const gh = grads.h ?? null;
  const gFinal = grads.finalState ?? null;
  if (gh) {
    requireTensor(op, 'grad of h', gh);
    expectShape(op, 'grad of h', gh, ctx.shape, DIMS, 'to match h');
    expectDType(op, 'grad of h', gh, [ctx.dtype], 'to match h');
    expectDevice(op, 'grad of h', gh, ctx.device, 'to match h');
  }
  if (gFinal) {
    requireTensor(op, 'grad of finalState', gFinal);
    expectShape(op, 'grad of finalState', gFinal, [batch, channels], 'batch, channels', 'to match finalState');
    expectDType(op, 'grad of finalState', gFinal, ['float32']);
    expectDevice(op, 'grad of finalState', gFinal, ctx.device, 'to match finalState');
  }
  requireTensor(op, 'a (saved for backward)', ctx.a);
  requireTensor(op, 'h (saved for backward)', ctx.h);
  if (ctx.initialState) requireTensor(op, 'initialState (saved for backward)', ctx.initialState);
  const r = native().linearScanBackward(ctx.device, ctx.dtype, ctx.a.storage, ctx.h.storage,
    ctx.initialState?.storage ?? null, gh?.storage ?? null, gFinal?.storage ?? null, batch * channels, length,
    ctx.reverse, ctx.initialState !== null);
  const wrap = (s: Storage) => new Tensor(s, ctx.shape, ctx.dtype, ctx.device);
  return {
    a: wrap(r.ga),
    b: wrap(r.gb),
    initialState: r.gh0 ? new Tensor(r.gh0, [batch, channels], 'float32', ctx.device) : null,
  };
}

export const linearScan = defineOp<LinearScanInputs, LinearScanOutputs, LinearScanOptions, LinearScanCtx, LinearScanGrads>({
  name: OP,
  differentiableOptions: ['initialState'],
  forward,
  backward,
});
