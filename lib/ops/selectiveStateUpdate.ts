/**
 * Decode step of the selective scan (Mamba-1), with the argument names of the reference
 * `selective_state_update`: advances a float32 `state` by one or a few tokens, in place.
 *
 *     dt     = dt + dtBias[d]; dt = dtSoftplus && dt <= 20 ? log(1 + exp(dt)) : dt
 *     state  = exp(dt * A[d,n]) * state + dt * B[n] * x
 *     y      = (sum_n state[n] * C[n] + D[d] * x) * (z ? z * sigmoid(z) : 1)
 *
 * Shapes, one token: `x`, `dt`, `z` (batch, dim); `B`, `C` (batch, dstate) or (batch, groups, dstate);
 * `y` (batch, dim). Several tokens (e.g. to verify speculative drafts): `x`, `dt`, `z`
 * (batch, dim, T); `B`, `C` (batch, groups, dstate, T); `y` (batch, dim, T). `state` is
 * (batch, dim, dstate) float32; `A` (dim, dstate), `D` and `dtBias` (dim) float32. x, dt, z, B, C
 * share one dtype (float32, float16 or bfloat16).
 *
 * Options: `dtSoftplus` (default false); `updateState` (default true): write the state after the last
 * token back into `state`; `returnIntermediateStates` (default false): also return the state after
 * every token, (batch, T, dim, dstate) float32, so that a caller can roll back to any accepted prefix.
 * Inference only: there is no backward (train with selectiveScan, which computes the same thing).
 */
import { callAsync } from '../autograd';
import { nativeCall, runSync, splitSignal, type AsyncOptions, type Steps } from '../async';
import { Tensor, type DType } from '../tensor';
import { ShapeError } from '../errors';
import {
  booleanOption,
  expectDType,
  expectDevice,
  expectRank,
  expectShape,
  readInputs,
  readOptions,
  requireTensor,
} from '../validate';
import { MAX_DSTATE } from './selectiveScan';

export interface SelectiveStateUpdateInputs {
  state: Tensor;
  x: Tensor;
  dt: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D?: Tensor | null;
  z?: Tensor | null;
  dtBias?: Tensor | null;
}
export interface SelectiveStateUpdateOptions {
  dtSoftplus?: boolean;
  updateState?: boolean;
  returnIntermediateStates?: boolean;
}
export interface SelectiveStateUpdateOutputs {
  y: Tensor;
  intermediateStates: Tensor | null;
}

const OP = 'selectiveStateUpdate';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];

function* steps(
  inputs: SelectiveStateUpdateInputs,
  options: SelectiveStateUpdateOptions = {},
): Steps<SelectiveStateUpdateOutputs> {
  inputs = readInputs(OP, inputs, ['state', 'x', 'dt', 'A', 'B', 'C', 'D', 'z', 'dtBias']);
  const opts = readOptions(OP, options, ['dtSoftplus', 'updateState', 'returnIntermediateStates']);
  const { state, x, dt, A, B, C } = inputs;
  requireTensor(OP, 'state', state);
  expectRank(OP, 'state', state, 3, 'batch, dim, dstate');
  expectDType(OP, 'state', state, ['float32'], '(states are float32)');
  const [batch, dim, dstate] = state.shape;
  if (state.size === 0)
    throw new ShapeError(`${OP}: state has shape [${state.shape.join(',')}]; every dimension must be at least 1`);
  if (dstate > MAX_DSTATE) throw new ShapeError(`${OP}: state has dstate ${dstate}, expected at most ${MAX_DSTATE}`);
  const device = state.device;
  requireTensor(OP, 'x', x);
  expectDevice(OP, 'x', x, device, 'to match state');
  expectDType(OP, 'x', x, FLOAT_DTYPES);
  const multi = x.shape.length === 3;
  const tokens = multi ? x.shape[2] : 1;
  const xShape = multi ? [batch, dim, tokens] : [batch, dim];
  const xDims = multi ? 'batch, dim, tokens' : 'batch, dim';
  if (x.shape.length !== 2 && !multi)
    throw new ShapeError(
      `${OP}: x has shape [${x.shape.join(',')}], expected [${batch},${dim}] (batch, dim) or (batch, dim, tokens)`,
    );
  expectShape(OP, 'x', x, xShape, xDims, 'to match state');
  if (tokens < 1) throw new ShapeError(`${OP}: x has 0 tokens`);
  const same = (name: string, t: Tensor) => {
    expectShape(OP, name, t, xShape, xDims, 'to match x');
    expectDType(OP, name, t, [x.dtype], 'to match x');
    expectDevice(OP, name, t, device, 'to match state');
  };
  requireTensor(OP, 'dt', dt);
  same('dt', dt);
  const z = inputs.z ?? null;
  if (z) {
    requireTensor(OP, 'z', z);
    same('z', z);
  }
  requireTensor(OP, 'A', A);
  expectShape(OP, 'A', A, [dim, dstate], 'dim, dstate', 'to match state');
  expectDType(OP, 'A', A, ['float32']);
  expectDevice(OP, 'A', A, device, 'to match state');
  for (const [name, t] of [
    ['D', inputs.D ?? null],
    ['dtBias', inputs.dtBias ?? null],
  ] as const) {
    if (!t) continue;
    requireTensor(OP, name, t);
    expectShape(OP, name, t, [dim], 'dim', 'to match state');
    expectDType(OP, name, t, ['float32']);
    expectDevice(OP, name, t, device, 'to match state');
  }
  let groups = 0;
  for (const [name, t] of [
    ['B', B],
    ['C', C],
  ] as const) {
    requireTensor(OP, name, t);
    expectDType(OP, name, t, [x.dtype], 'to match x');
    expectDevice(OP, name, t, device, 'to match state');
    let g: number;
    if (multi) {
      expectRank(OP, name, t, 4, 'batch, groups, dstate, tokens');
      g = t.shape[1];
      expectShape(OP, name, t, [batch, g, dstate, tokens], 'batch, groups, dstate, tokens', 'to match x and state');
    } else if (t.shape.length === 2) {
      g = 1;
      expectShape(OP, name, t, [batch, dstate], 'batch, dstate', 'to match state');
    } else {
      expectRank(OP, name, t, 3, 'batch, groups, dstate');
      g = t.shape[1];
      expectShape(OP, name, t, [batch, g, dstate], 'batch, groups, dstate', 'to match state');
    }
    if (g < 1 || dim % g !== 0)
      throw new ShapeError(`${OP}: ${name} has ${g} groups, expected a divisor of dim ${dim}`);
    if (groups && g !== groups) throw new ShapeError(`${OP}: B has ${groups} groups and C has ${g}; they must match`);
    groups = g;
  }
  const dtSoftplus = booleanOption(OP, 'dtSoftplus', opts.dtSoftplus, false);
  const updateState = booleanOption(OP, 'updateState', opts.updateState, true);
  const returnIntermediate = booleanOption(OP, 'returnIntermediateStates', opts.returnIntermediateStates, false);
  const r = yield* nativeCall((n) =>
    n.selectiveStateUpdate({
      device,
      dtype: x.dtype,
      tensors: {
        state: state.storage,
        x: x.storage,
        dt: dt.storage,
        A: A.storage,
        B: B.storage,
        C: C.storage,
        D: inputs.D?.storage ?? null,
        z: z?.storage ?? null,
        dtBias: inputs.dtBias?.storage ?? null,
      },
      config: { batch, dim, dstate, groups, tokens, deltaSoftplus: dtSoftplus, updateState, returnIntermediate },
    }),
  );
  return {
    y: new Tensor(r.y, xShape, x.dtype, device),
    intermediateStates: r.intermediate
      ? new Tensor(r.intermediate, [batch, tokens, dim, dstate], 'float32', device)
      : null,
  };
}

export function selectiveStateUpdate(
  inputs: SelectiveStateUpdateInputs,
  options: SelectiveStateUpdateOptions = {},
): SelectiveStateUpdateOutputs {
  return runSync(steps(inputs, options));
}

/** The Promise form of selectiveStateUpdate (the kernel runs off the JavaScript thread; see README, Async calls). */
export function selectiveStateUpdateAsync(
  inputs: SelectiveStateUpdateInputs,
  options?: SelectiveStateUpdateOptions & AsyncOptions,
): Promise<SelectiveStateUpdateOutputs> {
  const split = splitSignal<SelectiveStateUpdateOptions>('selectiveStateUpdateAsync', options);
  return callAsync('selectiveStateUpdate', [inputs, split.options], split.signal, () =>
    steps(inputs, split.options ?? {}),
  );
}
