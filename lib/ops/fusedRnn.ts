/**
 * Fused recurrent cells (FlashRNN style): the recurrent part of an RNN layer with many small heads
 * and block-diagonal recurrent weights, the input projection done outside (wx = x W + b_x).
 *
 * Per batch row b, head h, step t < lengths[b] and channel j, with h_{t-1} the h state of the head:
 *
 *     rec_g[j] = sum_i h_{t-1}[i] R[g][h][i][j]
 *     pre_g[j] = wx[b][t][g][h][j] + b[g][h][j] + rec_g[j]
 *
 *   elman (gate a):          h_t = tanh(pre_a)
 *   lstm  (gates i, f, z, o; states h, c):
 *                            c_t = sigmoid(pre_f) c_{t-1} + sigmoid(pre_i) tanh(pre_z),  h_t = sigmoid(pre_o) tanh(c_t)
 *   gru   (gates r, z, n; state h):
 *                            n = tanh(wx_n + sigmoid(pre_r) (rec_n + b_n)),  h_t = (1 - sigmoid(pre_z)) n + sigmoid(pre_z) h_{t-1}
 *   slstm (gates i, f, z, o; states h, c, n, m): exponential input gate, log-sigmoid forget gate,
 *                            normaliser n and stabiliser m (xLSTM; tests/reference/fusedRnn.ts has the exact
 *                            definition, the empty-state reset included).
 *
 * Inputs: `wx` (batch, T, gates, heads, headDim) and `R` (gates, heads, headDim, headDim) of one dtype
 * (float32, float16 or bfloat16); `b` (gates, heads, headDim) float32; `states0` (states, batch, heads,
 * headDim) float32, zeros when absent. Options: `cell` ('lstm' | 'gru' | 'slstm' | 'elman'); `lengths`
 * (batch integers in [0, T]: later steps leave the state alone and give h = 0); `returnLastOnly`.
 * Outputs: `h` (batch, T, heads, headDim) in wx's dtype, or (batch, heads, headDim), the final h, with
 * returnLastOnly; `finalStates` (states, batch, heads, headDim) float32, every state kind.
 * Backward: gradients for wx, R, b and states0 from grads of h and/or finalStates.
 */
import { callAsync, defineOp, isRecording } from '../autograd';
import { native, type FusedRnnConfig, type Storage } from '../native';
import { nativeCall, runSync, splitSignal, type AsyncOptions, type Steps } from '../async';
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
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
} from '../validate';

export type FusedRnnCell = 'lstm' | 'gru' | 'slstm' | 'elman';

export interface FusedRnnInputs {
  wx: Tensor;
  R: Tensor;
  b: Tensor;
  states0?: Tensor | null;
}
export interface FusedRnnOptions {
  cell: FusedRnnCell;
  lengths?: Int32Array | readonly number[] | null;
  returnLastOnly?: boolean;
}
export interface FusedRnnOutputs {
  h: Tensor;
  finalStates: Tensor;
}
export interface FusedRnnGrads {
  wx: Tensor;
  R: Tensor;
  b: Tensor;
  states0: Tensor | null;
}
export interface FusedRnnCtx {
  inputs: { wx: Tensor; R: Tensor; b: Tensor; states0: Tensor | null };
  savedStates: Tensor;
  savedPre: Tensor;
  config: FusedRnnConfig;
  lengths: Int32Array | null;
  states: number;
  dtype: DType;
  device: Device;
}

const OP = 'fusedRnn';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
/** Gates, states and the native code of each cell (rkcuda::CellKind). */
interface CellInfo {
  gates: number;
  states: number;
  code: number;
}
let cellTable: Readonly<Record<FusedRnnCell, CellInfo>> | undefined;
/** The cells by name: gates, states and the addon's code (defined once, in cuda/cells/fused_rnn.h). */
export function fusedRnnCells(): Readonly<Record<FusedRnnCell, CellInfo>> {
  cellTable ??= Object.freeze(
    Object.fromEntries(
      native()
        .fusedRnnCells()
        .map(({ name, ...c }) => [name, Object.freeze(c)]),
    ),
  ) as Readonly<Record<FusedRnnCell, CellInfo>>;
  return cellTable;
}

function parseLengths(OP: string, v: unknown, batch: number, T: number): Int32Array | null {
  if (v === undefined || v === null) return null;
  if (!(v instanceof Int32Array) && !Array.isArray(v))
    throw new ArgumentError(`${OP}: lengths must be an Int32Array or an array of integers, got ${typeof v}`);
  const arr = Array.from(v as ArrayLike<number>);
  if (arr.length !== batch)
    throw new ShapeError(`${OP}: lengths has ${arr.length} entries, expected ${batch} (one per batch row)`);
  arr.forEach((x, i) => {
    if (typeof x !== 'number' || !Number.isInteger(x))
      throw new ArgumentError(`${OP}: lengths[${i}] must be an integer, got ${String(x)}`);
    if (x < 0 || x > T) throw new ArgumentError(`${OP}: lengths[${i}] = ${x} is outside [0, ${T}] (T)`);
  });
  return Int32Array.from(arr);
}

/**
 * Checks the arguments and derives the kernels' config. `OP` names the caller in messages: the
 * forward, or the backward re-checking the tensors saved in its ctx.
 */
function prepare(OP: string, inputs: FusedRnnInputs, options: FusedRnnOptions) {
  inputs = readInputs(OP, inputs, ['wx', 'R', 'b', 'states0']);
  if (options === undefined || options === null || typeof options !== 'object')
    throw new ArgumentError(`${OP}: options must be an object with at least cell`);
  const opts = readOptions(OP, options, ['cell', 'lengths', 'returnLastOnly']);
  const cell = opts.cell;
  if (typeof cell !== 'string' || !Object.hasOwn(fusedRnnCells(), cell))
    throw new ArgumentError(
      `${OP}: cell must be one of ${Object.keys(fusedRnnCells())
        .map((c) => `'${c}'`)
        .join(', ')}, ` + `got ${typeof cell === 'string' ? `'${cell}'` : String(cell)}`,
    );
  const { gates: G, states: S, code } = fusedRnnCells()[cell];
  const { wx, R, b } = inputs;
  requireTensor(OP, 'wx', wx);
  expectRank(OP, 'wx', wx, 5, 'batch, T, gates, heads, headDim');
  if (wx.size === 0)
    throw new ShapeError(`${OP}: wx has shape [${wx.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(OP, 'wx', wx, FLOAT_DTYPES);
  const [batch, T, gates, H, D] = wx.shape;
  if (gates !== G)
    throw new ShapeError(
      `${OP}: wx has shape [${wx.shape.join(',')}] with ${gates} gates, expected ${G} for cell '${cell}'`,
    );
  const device = wx.device;
  requireTensor(OP, 'R', R);
  expectShape(OP, 'R', R, [G, H, D, D], 'gates, heads, headDim, headDim', 'to match wx');
  expectDType(OP, 'R', R, [wx.dtype], 'to match wx');
  expectDevice(OP, 'R', R, device, 'to match wx');
  requireTensor(OP, 'b', b);
  expectShape(OP, 'b', b, [G, H, D], 'gates, heads, headDim', 'to match wx');
  expectDType(OP, 'b', b, ['float32'], '(biases are float32)');
  expectDevice(OP, 'b', b, device, 'to match wx');
  const states0 = inputs.states0 ?? null;
  if (states0) {
    requireTensor(OP, 'states0', states0);
    expectShape(
      OP,
      'states0',
      states0,
      [S, batch, H, D],
      'states, batch, heads, headDim',
      `to match wx and cell '${cell}'`,
    );
    expectDType(OP, 'states0', states0, ['float32'], '(states are float32)');
    expectDevice(OP, 'states0', states0, device, 'to match wx');
  }
  const lengths = parseLengths(OP, opts.lengths, batch, T);
  const returnLastOnly = booleanOption(OP, 'returnLastOnly', opts.returnLastOnly, false);
  const config: FusedRnnConfig = { cell: code, batch, T, heads: H, headDim: D, returnLastOnly };
  return { inputs: { wx, R, b, states0 }, config, lengths, states: S, gates: G };
}

function* run(
  inputs: FusedRnnInputs,
  options: FusedRnnOptions,
  training: boolean,
): Steps<{
  outputs: FusedRnnOutputs;
  ctx: FusedRnnCtx | null;
  saved: { states: Storage | null; pre: Storage | null };
}> {
  const { inputs: x, config, lengths, states: S, gates: G } = prepare(OP, inputs, options);
  const { wx, R, b, states0 } = x;
  const { batch, T, heads: H, headDim: D, returnLastOnly } = config;
  const device = wx.device;
  const r = yield* nativeCall((n) =>
    n.fusedRnnForward({
      device,
      dtype: wx.dtype,
      tensors: { wx: wx.storage, R: R.storage, b: b.storage, states0: states0?.storage ?? null },
      config: { ...config, lengths, training },
    }),
  );
  const outputs: FusedRnnOutputs = {
    h: new Tensor(r.h, returnLastOnly ? [batch, H, D] : [batch, T, H, D], wx.dtype, device),
    finalStates: new Tensor(r.finalStates, [S, batch, H, D], 'float32', device),
  };
  const ctx =
    training && r.savedStates && r.savedPre
      ? sealCtx(
          OP,
          {
            inputs: x,
            savedStates: new Tensor(r.savedStates, [T, S, batch, H, D], 'float32', device),
            savedPre: new Tensor(r.savedPre, [T, batch, G, H, D], 'float32', device),
            config,
            lengths,
            states: S,
            dtype: wx.dtype,
            device,
          },
          ['savedStates', 'savedPre'],
        )
      : null;
  return { outputs, ctx, saved: { states: r.savedStates, pre: r.savedPre } };
}

function* forward(
  inputs: FusedRnnInputs,
  options: FusedRnnOptions,
): Steps<{ outputs: FusedRnnOutputs; ctx: FusedRnnCtx }> {
  const { outputs, ctx } = yield* run(inputs, options, true);
  return { outputs, ctx: ctx! };
}

function* backward(ctx: FusedRnnCtx, grads: { h?: Tensor | null; finalStates?: Tensor | null }): Steps<FusedRnnGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, {
    inputs: 'object',
    config: 'object',
    savedStates: 'tensor',
    savedPre: 'tensor',
    lengths: 'int32?',
  });
  checkCtxFields(OP, ctx.inputs, { wx: 'tensor', R: 'tensor', b: 'tensor', states0: 'tensor?' }, 'ctx.inputs');
  // The saved tensors are checked again as the forward checked them, and must give the ctx's config.
  const cell = (Object.keys(fusedRnnCells()) as FusedRnnCell[]).find(
    (c) => fusedRnnCells()[c].code === ctx.config.cell,
  );
  if (cell === undefined)
    throw new ArgumentError(`${op}: ctx.config.cell is ${String(ctx.config.cell)}, not a cell's code`);
  const p = prepare(op, ctx.inputs, { cell, lengths: ctx.lengths, returnLastOnly: ctx.config.returnLastOnly });
  expectCtxValues(OP, 'ctx.config', ctx.config, { ...p.config });
  const { inputs: x, config: cfg, lengths } = p;
  const { batch, T, heads: H, headDim: D } = cfg;
  expectCtxValues(OP, 'ctx', ctx, { states: p.states, dtype: x.wx.dtype, device: x.wx.device });
  for (const [name, t, shape, dims] of [
    ['savedStates', ctx.savedStates, [T, p.states, batch, H, D], 'T, states, batch, heads, headDim'],
    ['savedPre', ctx.savedPre, [T, batch, p.gates, H, D], 'T, batch, gates, heads, headDim'],
  ] as const) {
    expectShape(op, `${name} (saved for backward)`, t, shape, dims, 'to match wx');
    expectDType(op, `${name} (saved for backward)`, t, ['float32']);
    expectDevice(op, `${name} (saved for backward)`, t, ctx.device, 'to match wx');
  }
  const g = readGrads(op, grads, ['h', 'finalStates']);
  const gH = g.h ?? null;
  const gFinal = g.finalStates ?? null;
  const hShape = cfg.returnLastOnly ? [cfg.batch, cfg.heads, cfg.headDim] : [cfg.batch, cfg.T, cfg.heads, cfg.headDim];
  if (gH) {
    expectShape(
      op,
      'grad of h',
      gH,
      hShape,
      cfg.returnLastOnly ? 'batch, heads, headDim' : 'batch, T, heads, headDim',
      'to match h',
    );
    expectDType(op, 'grad of h', gH, [ctx.dtype], 'to match h');
    expectDevice(op, 'grad of h', gH, ctx.device, 'to match h');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalStates',
      gFinal,
      [ctx.states, cfg.batch, cfg.heads, cfg.headDim],
      'states, batch, heads, headDim',
      'to match finalStates',
    );
    expectDType(op, 'grad of finalStates', gFinal, ['float32']);
    expectDevice(op, 'grad of finalStates', gFinal, ctx.device, 'to match finalStates');
  }
  const r = yield* nativeCall((n) =>
    n.fusedRnnBackward({
      device: ctx.device,
      dtype: ctx.dtype,
      tensors: { wx: x.wx.storage, R: x.R.storage, b: x.b.storage, states0: x.states0?.storage ?? null },
      grads: {
        savedStates: ctx.savedStates.storage,
        savedPre: ctx.savedPre.storage,
        dh: gH?.storage ?? null,
        dFinal: gFinal?.storage ?? null,
      },
      config: { ...cfg, lengths, needDStates0: x.states0 !== null },
    }),
  );
  const like = (s: Storage, t: Tensor) => new Tensor(s, t.shape, t.dtype, t.device);
  return {
    wx: like(r.dwx, x.wx),
    R: like(r.dR, x.R),
    b: like(r.db, x.b),
    states0: r.dStates0 && x.states0 ? like(r.dStates0, x.states0) : null,
  };
}

const op = defineOp<FusedRnnInputs, FusedRnnOutputs, FusedRnnOptions, FusedRnnCtx, FusedRnnGrads>({
  name: OP,
  forward,
  backward,
});

/**
 * Runs the cells. While a tape records, the forward keeps what the backward needs (the states after
 * every step and the pre-activations); otherwise it keeps nothing.
 */
function* inference(inputs: FusedRnnInputs, options: FusedRnnOptions): Steps<FusedRnnOutputs> {
  return (yield* run(inputs, options, false)).outputs;
}
function call(inputs: FusedRnnInputs, options: FusedRnnOptions): FusedRnnOutputs {
  return isRecording() ? op(inputs, options) : runSync(inference(inputs, options));
}
async function callAsyncForm(
  inputs: FusedRnnInputs,
  options: FusedRnnOptions & AsyncOptions,
): Promise<FusedRnnOutputs> {
  if (isRecording()) return op.async(inputs, options);
  const split = splitSignal<FusedRnnOptions>(`${OP}.async`, options);
  return callAsync(OP, [inputs, split.options], split.signal, () =>
    inference(inputs, split.options as FusedRnnOptions),
  );
}

export const fusedRnn = Object.assign(call, { hooks: op.hooks, async: callAsyncForm });
