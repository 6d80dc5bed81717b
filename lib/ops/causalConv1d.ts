/**
 * Causal depthwise 1-D convolution with carry state: the preprocessing step of Mamba and Gated DeltaNet
 * layers, with the semantics of mamba's `causal_conv1d_fn` / `causal_conv1d_update` and ONNX Runtime's
 * com.microsoft `CausalConvWithState`.
 *
 * Per channel c and position t of a sequence, with L = (W - 1) * dilation carry positions before the
 * sequence (`initialState`, oldest first; zeros without it) and xx the state followed by x:
 *
 *     y_t = act(bias[c] + sum_{j < W} weight[c][j] * xx[c][t - (W - 1 - j) * dilation])
 *
 * act is SiLU (`activation: 'silu'`, x * sigmoid(x)) or the identity ('none', the default). The final
 * state is the last L positions of xx (for a sequence shorter than L it still holds part of the
 * initial state).
 *
 * Inputs: `x` (batch, C, T), or (batch, T, C) with `channelsLast` (float32, float16 or bfloat16);
 * `weight` (C, W) or (C, 1, W) (ONNX's depthwise Conv layout), W >= 2; `bias` (C) or absent; all one
 * dtype. Options: `initialState` (N, C, L), or (N, L, C) with channelsLast; `returnFinalState`;
 * `dilation` (default 1); `cuSeqlens` (a packed batch of N sequences along T, batch 1, each from its
 * own initial state; positions after the last give y = 0); `stateWindow` W' in 0-8 (also return the
 * states after the last W' positions of each sequence, (W', N, C, L): slot j is the state after
 * position length - W' + j, zeros for slots before the sequence's start).
 * Outputs: `y` as x; `finalState` as initialState, or null; `windowStates` or null. Gradients flow
 * through y and finalState to x, weight, bias and initialState.
 *
 * ONNX's CausalConvWithState maps directly: its input (B, C, T) / channels-last (B, T, C), weight
 * (C, 1, k), past_state / present_state (B, C, L) and its state window (W', B, C, L) are these shapes.
 * CPU and CUDA.
 */
import { defineOp, withInference } from '../autograd';
import type { CausalConv1dConfig } from '../native';
import { nativeCall, type Steps } from '../async';
import { Tensor, type DType, type Device } from '../tensor';
import { ArgumentError, ShapeError } from '../errors';
import {
  booleanOption,
  checkCtx,
  checkCtxFields,
  expectCtxValues,
  expectDType,
  expectDevice,
  expectRank,
  expectShape,
  oneOf,
  parseCuSeqlens,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
  stateWindowOption,
} from '../validate';

export interface CausalConv1dInputs {
  x: Tensor;
  weight: Tensor;
  bias?: Tensor | null;
}
export interface CausalConv1dOptions {
  activation?: 'silu' | 'none';
  initialState?: Tensor | null;
  returnFinalState?: boolean;
  dilation?: number;
  cuSeqlens?: Int32Array | readonly number[] | null;
  stateWindow?: number;
  channelsLast?: boolean;
}
export interface CausalConv1dOutputs {
  y: Tensor;
  finalState: Tensor | null;
  windowStates: Tensor | null;
}
export interface CausalConv1dGrads {
  x: Tensor;
  weight: Tensor;
  bias: Tensor | null;
  initialState: Tensor | null;
}
export interface CausalConv1dCtx {
  inputs: { x: Tensor; weight: Tensor; bias: Tensor | null; initialState: Tensor | null };
  options: { activation: 'silu' | 'none'; dilation: number; channelsLast: boolean };
  cuSeqlens: Int32Array | null;
  nseq: number;
  dtype: DType;
  device: Device;
}

const OP = 'causalConv1d';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];

function prepare(op: string, inputs: CausalConv1dInputs, options: CausalConv1dOptions | undefined) {
  const { x, weight } = readInputs(op, inputs, ['x', 'weight', 'bias']);
  const bias = inputs.bias ?? null;
  const opts = readOptions(op, options, [
    'activation',
    'initialState',
    'returnFinalState',
    'dilation',
    'cuSeqlens',
    'stateWindow',
    'channelsLast',
  ]);
  const channelsLast = booleanOption(op, 'channelsLast', opts.channelsLast, false);
  const names = channelsLast ? 'batch, T, C' : 'batch, C, T';
  requireTensor(op, 'x', x);
  expectRank(op, 'x', x, 3, names);
  if (x.size === 0)
    throw new ShapeError(`${op}: x has shape [${x.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(op, 'x', x, FLOAT_DTYPES);
  const [batch, d1, d2] = x.shape;
  const C = channelsLast ? d2 : d1,
    T = channelsLast ? d1 : d2;
  requireTensor(op, 'weight', weight);
  const W = weight.shape[weight.shape.length - 1];
  if (weight.shape.length === 3) expectShape(op, 'weight', weight, [C, 1, W], 'C, 1, W', 'to match x');
  else expectShape(op, 'weight', weight, [C, W], 'C, W (or C, 1, W)', 'to match x');
  if (W < 2 || W > 64) throw new ShapeError(`${op}: weight has width ${W}, expected 2 to 64`);
  expectDType(op, 'weight', weight, [x.dtype], 'to match x');
  expectDevice(op, 'weight', weight, x.device, 'to match x');
  if (bias !== null) {
    requireTensor(op, 'bias', bias);
    expectShape(op, 'bias', bias, [C], 'C', 'to match x');
    expectDType(op, 'bias', bias, [x.dtype], 'to match x');
    expectDevice(op, 'bias', bias, x.device, 'to match x');
  }
  const activation = oneOf(op, 'activation', opts.activation, ['silu', 'none'] as const, 'none');
  const dilation = opts.dilation ?? 1;
  if (!Number.isInteger(dilation) || dilation < 1 || (W - 1) * dilation > 1 << 20)
    throw new ArgumentError(
      `${op}: dilation must be a positive integer (state length at most 2^20), got ${String(opts.dilation)}`,
    );
  const L = (W - 1) * dilation;
  const cuSeqlens = parseCuSeqlens(op, opts.cuSeqlens, batch, T, 'T');
  const nseq = cuSeqlens ? cuSeqlens.length - 1 : batch;
  const window = stateWindowOption(op, opts.stateWindow);
  const stateShape = channelsLast ? [nseq, L, C] : [nseq, C, L];
  const h0 = opts.initialState ?? null;
  if (h0 !== null) {
    requireTensor(op, 'initialState', h0);
    const n = cuSeqlens ? 'N sequences' : 'batch';
    expectShape(
      op,
      'initialState',
      h0,
      stateShape,
      channelsLast ? `${n}, L, C` : `${n}, C, L`,
      `(L = (W - 1) * dilation = ${L})`,
    );
    expectDType(op, 'initialState', h0, [x.dtype], 'to match x');
    expectDevice(op, 'initialState', h0, x.device, 'to match x');
  }
  const config: CausalConv1dConfig = { batch, C, T, W, dilation, channelsLast, silu: activation === 'silu' };
  return {
    x,
    weight,
    bias,
    h0,
    config,
    cuSeqlens,
    nseq,
    window,
    stateShape,
    activation,
    returnFinal: booleanOption(op, 'returnFinalState', opts.returnFinalState, false),
  };
}

function* run(
  inputs: CausalConv1dInputs,
  options: CausalConv1dOptions,
  keep: boolean,
): Steps<{ outputs: CausalConv1dOutputs; ctx: CausalConv1dCtx | null }> {
  const p = prepare(OP, inputs, options);
  const { x } = p;
  const r = yield* nativeCall((n) =>
    n.causalConv1dForward({
      device: x.device,
      dtype: x.dtype,
      tensors: { x: x.storage, weight: p.weight.storage, bias: p.bias?.storage ?? null, h0: p.h0?.storage ?? null },
      config: { ...p.config, cuSeqlens: p.cuSeqlens, returnFinal: p.returnFinal, window: p.window },
    }),
  );
  const outputs: CausalConv1dOutputs = {
    y: new Tensor(r.y, x.shape, x.dtype, x.device),
    finalState: r.finalState ? new Tensor(r.finalState, p.stateShape, x.dtype, x.device) : null,
    windowStates: r.windowStates ? new Tensor(r.windowStates, [p.window, ...p.stateShape], x.dtype, x.device) : null,
  };
  if (!keep) return { outputs, ctx: null };
  return {
    outputs,
    ctx: sealCtx(OP, {
      inputs: { x, weight: p.weight, bias: p.bias, initialState: p.h0 },
      options: { activation: p.activation, dilation: p.config.dilation, channelsLast: p.config.channelsLast },
      cuSeqlens: p.cuSeqlens,
      nseq: p.nseq,
      dtype: x.dtype,
      device: x.device,
    } satisfies CausalConv1dCtx),
  };
}

function* forward(
  inputs: CausalConv1dInputs,
  options: CausalConv1dOptions = {},
): Steps<{ outputs: CausalConv1dOutputs; ctx: CausalConv1dCtx }> {
  return (yield* run(inputs, options, true)) as { outputs: CausalConv1dOutputs; ctx: CausalConv1dCtx };
}

function* backward(
  ctx: CausalConv1dCtx,
  grads: { y?: Tensor | null; finalState?: Tensor | null; windowStates?: Tensor | null },
): Steps<CausalConv1dGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { inputs: 'object', options: 'object', cuSeqlens: 'int32?' });
  checkCtxFields(
    OP,
    ctx.inputs,
    { x: 'tensor', weight: 'tensor', bias: 'tensor?', initialState: 'tensor?' },
    'ctx.inputs',
  );
  const { x, weight, bias, initialState } = ctx.inputs;
  const p = prepare(op, { x, weight, bias }, { ...ctx.options, initialState, cuSeqlens: ctx.cuSeqlens });
  expectCtxValues(OP, 'ctx', ctx, { nseq: p.nseq, dtype: x.dtype, device: x.device });
  const g = readGrads(op, grads, ['y', 'finalState', 'windowStates']);
  if (g.windowStates)
    throw new ArgumentError(`${op}: windowStates is an inference output; gradients flow through y and finalState`);
  const gY = g.y ?? null,
    gF = g.finalState ?? null;
  if (gY) {
    expectShape(op, 'grad of y', gY, x.shape, p.config.channelsLast ? 'batch, T, C' : 'batch, C, T', 'to match y');
    expectDType(op, 'grad of y', gY, [x.dtype], 'to match y');
    expectDevice(op, 'grad of y', gY, x.device, 'to match y');
  }
  if (gF) {
    expectShape(op, 'grad of finalState', gF, p.stateShape, 'N, C, L', 'to match finalState');
    expectDType(op, 'grad of finalState', gF, [x.dtype], 'to match finalState');
    expectDevice(op, 'grad of finalState', gF, x.device, 'to match finalState');
  }
  const r = yield* nativeCall((n) =>
    n.causalConv1dBackward({
      device: x.device,
      dtype: x.dtype,
      tensors: { x: x.storage, weight: weight.storage, bias: bias?.storage ?? null, h0: initialState?.storage ?? null },
      grads: { dY: gY?.storage ?? null, dFinal: gF?.storage ?? null },
      config: { ...p.config, cuSeqlens: ctx.cuSeqlens, needDh0: initialState !== null },
    }),
  );
  return {
    x: new Tensor(r.dx, x.shape, x.dtype, x.device),
    weight: new Tensor(r.dweight, weight.shape, x.dtype, x.device),
    bias: r.dbias && bias ? new Tensor(r.dbias, bias.shape, x.dtype, x.device) : null,
    initialState: r.dh0 && initialState ? new Tensor(r.dh0, initialState.shape, x.dtype, x.device) : null,
  };
}

const op = defineOp<CausalConv1dInputs, CausalConv1dOutputs, CausalConv1dOptions, CausalConv1dCtx, CausalConv1dGrads>({
  name: OP,
  differentiableOptions: ['initialState'],
  forward,
  backward,
});

export const causalConv1d = withInference(op, run);
