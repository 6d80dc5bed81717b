/**
 * Decode step of Mamba-2 (the recurrence of `mamba2Scan`, advanced by one or a few tokens from a
 * given state; mamba_ssm's `selective_state_update` with a head dimension): `state` (batch, nheads,
 * headdim, dstate) float32, the layout of mamba2Scan's initialStates and finalStates, is updated in
 * place.
 *
 * One token: `x`, `z` (batch, nheads, headdim); `dt` (batch, nheads); `B`, `C` (batch, ngroups,
 * dstate); `y` (batch, nheads, headdim). Several tokens (e.g. to verify speculative drafts): a token
 * dimension after batch, as mamba2Scan's seqlen: `x`, `z` (batch, T, nheads, headdim), `dt`
 * (batch, T, nheads), `B`, `C` (batch, T, ngroups, dstate), `y` (batch, T, nheads, headdim). `A`,
 * `D`, `dtBias` and the options `dtSoftplus`, `dtLimit` as for mamba2Scan. Options: `updateState`
 * (default true: the state after the last token is written back); `returnIntermediateStates` (the
 * state after every token, (batch, T, nheads, headdim, dstate) float32, so that a caller can roll
 * back to any accepted prefix). Inference only: there is no backward (train with mamba2Scan, which
 * computes the same thing).
 */
import { callAsync } from '../autograd';
import { nativeCall, runSync, splitSignal, type AsyncOptions, type Steps } from '../async';
import { Tensor } from '../tensor';
import { ArgumentError } from '../errors';
import {
  booleanOption,
  expectDType,
  expectDevice,
  expectShape,
  readInputs,
  readOptions,
  requireTensor,
} from '../validate';
import { checkMamba2, type Mamba2ScanInputs, type Mamba2ScanOptions } from './mamba2Scan';

export interface Mamba2StateUpdateInputs extends Mamba2ScanInputs {
  state: Tensor;
}
export interface Mamba2StateUpdateOptions extends Pick<Mamba2ScanOptions, 'dtSoftplus' | 'dtLimit'> {
  updateState?: boolean;
  returnIntermediateStates?: boolean;
}
export interface Mamba2StateUpdateOutputs {
  y: Tensor;
  intermediateStates: Tensor | null;
}

const OP = 'mamba2StateUpdate';

function* steps(
  inputs: Mamba2StateUpdateInputs,
  options: Mamba2StateUpdateOptions = {},
): Steps<Mamba2StateUpdateOutputs> {
  inputs = readInputs(OP, inputs, ['state', 'x', 'dt', 'A', 'B', 'C', 'D', 'z', 'dtBias']);
  const opts = readOptions(OP, options, ['dtSoftplus', 'dtLimit', 'updateState', 'returnIntermediateStates']);
  const { x } = inputs;
  requireTensor(OP, 'x', x);
  if (x.shape.length !== 3 && x.shape.length !== 4)
    throw new ArgumentError(
      `${OP}: x must have rank 3 (batch, nheads, headdim) or 4 (batch, T, nheads, headdim), got rank ${x.shape.length}`,
    );
  const several = x.shape.length === 4;
  const c = checkMamba2(OP, inputs, opts, !several, 'T');
  const batch = x.shape[0],
    T = several ? x.shape[1] : 1;
  const { H, P, G, N } = c;
  const { state } = inputs;
  requireTensor(OP, 'state', state);
  expectShape(OP, 'state', state, [batch, H, P, N], 'batch, nheads, headdim, dstate', 'to match x and B');
  expectDType(OP, 'state', state, ['float32'], '(states are float32)');
  expectDevice(OP, 'state', state, x.device, 'to match x');
  const updateState = booleanOption(OP, 'updateState', opts.updateState, true);
  const returnIntermediate = booleanOption(OP, 'returnIntermediateStates', opts.returnIntermediateStates, false);
  const { dt, A, B, C, D, z, dtBias } = c.saved;
  const r = yield* nativeCall((n) =>
    n.mamba2Step({
      device: x.device,
      dtype: x.dtype,
      tensors: {
        state: state.storage,
        x: x.storage,
        dt: dt.storage,
        A: A.storage,
        B: B.storage,
        C: C.storage,
        D: D?.storage ?? null,
        z: z?.storage ?? null,
        dtBias: dtBias?.storage ?? null,
      },
      config: { ...c.gate, batch, tokens: T, G, N, updateState, returnIntermediate },
    }),
  );
  return {
    y: new Tensor(r.y, x.shape, x.dtype, x.device),
    intermediateStates: r.intermediate ? new Tensor(r.intermediate, [batch, T, H, P, N], 'float32', x.device) : null,
  };
}

export function mamba2StateUpdate(
  inputs: Mamba2StateUpdateInputs,
  options: Mamba2StateUpdateOptions = {},
): Mamba2StateUpdateOutputs {
  return runSync(steps(inputs, options));
}

/** The Promise form of mamba2StateUpdate (the kernel runs off the JavaScript thread; see README, Async calls). */
export function mamba2StateUpdateAsync(
  inputs: Mamba2StateUpdateInputs,
  options?: Mamba2StateUpdateOptions & AsyncOptions,
): Promise<Mamba2StateUpdateOutputs> {
  const split = splitSignal<Mamba2StateUpdateOptions>('mamba2StateUpdateAsync', options);
  return callAsync(OP, [inputs, split.options], split.signal, () => steps(inputs, split.options ?? {}));
}
