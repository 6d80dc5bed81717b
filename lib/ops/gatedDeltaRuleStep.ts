/**
 * Decode step of the gated delta rule (the recurrence of `gatedDeltaRule`, advanced by one or a few
 * tokens from a given state): `state` (batch, HV, K, V) float32 is updated in place.
 *
 * Inputs as for gatedDeltaRule with T tokens: `q`, `k` (batch, T, H, K); `v` (batch, T, HV, V);
 * `g` (batch, T, HV) float32; `beta` (batch, T, HV). Options: `scale` (default K^-0.5),
 * `useQkL2normInKernel`, `updateState` (default true: the state after the last token is written
 * back), `returnIntermediateStates` (the state after every token, (batch, T, HV, K, V) float32, so a
 * caller can keep the accepted prefix of speculative tokens). Returns `{ o, intermediateStates }`,
 * o (batch, T, HV, V). Inference only: there is no backward.
 */
import { callAsync } from '../autograd';
import { nativeCall, runSync, splitSignal, type AsyncOptions, type Steps } from '../async';
import { Tensor } from '../tensor';
import {
  booleanOption,
  expectDType,
  expectDevice,
  expectShape,
  finiteNumber,
  readInputs,
  readOptions,
  requireTensor,
} from '../validate';
import { checkDeltaInputs, type GatedDeltaRuleInputs } from './gatedDeltaRule';

export interface GatedDeltaRuleStepInputs extends GatedDeltaRuleInputs {
  state: Tensor;
}
export interface GatedDeltaRuleStepOptions {
  scale?: number;
  useQkL2normInKernel?: boolean;
  updateState?: boolean;
  returnIntermediateStates?: boolean;
}
export interface GatedDeltaRuleStepOutputs {
  o: Tensor;
  intermediateStates: Tensor | null;
}

const OP = 'gatedDeltaRuleStep';

function* steps(
  inputs: GatedDeltaRuleStepInputs,
  options: GatedDeltaRuleStepOptions = {},
): Steps<GatedDeltaRuleStepOutputs> {
  inputs = readInputs(OP, inputs, ['state', 'q', 'k', 'v', 'g', 'beta']);
  const opts = readOptions(OP, options, ['scale', 'useQkL2normInKernel', 'updateState', 'returnIntermediateStates']);
  const { batch, T, H, HV, K, V } = checkDeltaInputs(OP, inputs, 'tokens');
  const { state, q } = inputs;
  requireTensor(OP, 'state', state);
  expectShape(OP, 'state', state, [batch, HV, K, V], 'batch, HV, K, V', 'to match q and v');
  expectDType(OP, 'state', state, ['float32'], '(states are float32)');
  expectDevice(OP, 'state', state, q.device, 'to match q');
  const scale = opts.scale === undefined ? 1 / Math.sqrt(K) : finiteNumber(OP, 'scale', opts.scale, { float32: true });
  const l2norm = booleanOption(OP, 'useQkL2normInKernel', opts.useQkL2normInKernel, false);
  const updateState = booleanOption(OP, 'updateState', opts.updateState, true);
  const returnIntermediate = booleanOption(OP, 'returnIntermediateStates', opts.returnIntermediateStates, false);
  const r = yield* nativeCall((n) =>
    n.gatedDeltaRuleStep({
      device: q.device,
      dtype: q.dtype,
      tensors: {
        state: state.storage,
        q: q.storage,
        k: inputs.k.storage,
        v: inputs.v.storage,
        g: inputs.g.storage,
        beta: inputs.beta.storage,
      },
      config: { batch, tokens: T, H, HV, K, V, scale, l2norm, updateState, returnIntermediate },
    }),
  );
  return {
    o: new Tensor(r.o, inputs.v.shape, q.dtype, q.device),
    intermediateStates: r.intermediate ? new Tensor(r.intermediate, [batch, T, HV, K, V], 'float32', q.device) : null,
  };
}

export function gatedDeltaRuleStep(
  inputs: GatedDeltaRuleStepInputs,
  options: GatedDeltaRuleStepOptions = {},
): GatedDeltaRuleStepOutputs {
  return runSync(steps(inputs, options));
}

/** The Promise form of gatedDeltaRuleStep (the kernel runs off the JavaScript thread; see README, Async calls). */
export function gatedDeltaRuleStepAsync(
  inputs: GatedDeltaRuleStepInputs,
  options?: GatedDeltaRuleStepOptions & AsyncOptions,
): Promise<GatedDeltaRuleStepOutputs> {
  const split = splitSignal<GatedDeltaRuleStepOptions>('gatedDeltaRuleStepAsync', options);
  return callAsync('gatedDeltaRuleStep', [inputs, split.options], split.signal, () =>
    steps(inputs, split.options ?? {}),
  );
}
