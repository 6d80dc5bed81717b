/**
 * Decode step of linear attention (the recurrence of `linearAttention`, advanced by one or a few
 * tokens from a given state): `state` (batch, Hv, K, V) float32 is updated in place.
 *
 * Inputs as for linearAttention with T tokens: `q` (batch, T, Hq, K), `k` (batch, T, Hk, K), `v`
 * (batch, T, Hv, V), `decay`, `beta` as the rule needs them. Options: `updateRule`, `scale`,
 * `gateActivation` with `aLog`, `dtBias`, `betaActivation`, `qkL2Norm` (as linearAttention),
 * `updateState` (default true: the state after the last token is written back),
 * `returnIntermediateStates` (the state after every token, (batch, T, Hv, K, V) float32, so a caller
 * can keep the accepted prefix of speculative tokens). Returns `{ o, intermediateStates }`, o
 * (batch, T, max(Hq, Hv), V). Inference only: there is no backward.
 */
import { callAsync } from '../autograd';
import { nativeCall, runSync, splitSignal, type AsyncOptions, type Steps } from '../async';
import { Tensor } from '../tensor';
import type { Storage } from '../native';
import {
  booleanOption,
  expectDType,
  expectDevice,
  expectShape,
  readInputs,
  readOptions,
  requireTensor,
} from '../validate';
import {
  blockedConfig,
  checkLinearAttention,
  effectiveGates,
  zeroDecay,
  type LinearAttentionInputs,
  type LinearAttentionOptions,
} from './linearAttention';

export interface LinearAttentionStepInputs extends LinearAttentionInputs {
  state: Tensor;
}
export interface LinearAttentionStepOptions
  extends Pick<
    LinearAttentionOptions,
    'updateRule' | 'scale' | 'gateActivation' | 'aLog' | 'dtBias' | 'betaActivation' | 'qkL2Norm'
  > {
  updateState?: boolean;
  returnIntermediateStates?: boolean;
}
export interface LinearAttentionStepOutputs {
  o: Tensor;
  intermediateStates: Tensor | null;
}

const OP = 'linearAttentionStep';

function* steps(
  inputs: LinearAttentionStepInputs,
  options: LinearAttentionStepOptions = {},
): Steps<LinearAttentionStepOutputs> {
  inputs = readInputs(OP, inputs, ['state', 'q', 'k', 'v', 'decay', 'beta']);
  const opts = readOptions(OP, options, [
    'updateRule',
    'scale',
    'gateActivation',
    'aLog',
    'dtBias',
    'betaActivation',
    'qkL2Norm',
    'updateState',
    'returnIntermediateStates',
  ]);
  const c = checkLinearAttention(OP, inputs, opts, 'tokens');
  const { batch, T, Hq, Hv, K, V } = c.config;
  const { q, k, v } = c.saved;
  const { state } = inputs;
  requireTensor(OP, 'state', state);
  expectShape(OP, 'state', state, [batch, Hv, K, V], 'batch, Hv, K, V', 'to match q and v');
  expectDType(OP, 'state', state, ['float32'], '(states are float32)');
  expectDevice(OP, 'state', state, q.device, 'to match q');
  const updateState = booleanOption(OP, 'updateState', opts.updateState, true);
  const returnIntermediate = booleanOption(OP, 'returnIntermediateStates', opts.returnIntermediateStates, false);
  const owned: Tensor[] = [];
  try {
    const gates = yield* effectiveGates(c);
    if (gates.owned) for (const t of [gates.g, gates.b]) if (t) owned.push(t);
    let g = gates.g;
    const b = gates.b;
    let r: { o: Storage; intermediate: Storage | null };
    if (c.blocked) {
      if (!g) owned.push((g = zeroDecay(c.config, q.device)));
      const gd = g,
        bd = b as Tensor;
      const { T: _T, ...cfg } = blockedConfig(c.config);
      r = yield* nativeCall((n) =>
        n.gatedDeltaRuleStep({
          device: q.device,
          dtype: q.dtype,
          tensors: { state: state.storage, q: q.storage, k: k.storage, v: v.storage, g: gd.storage, beta: bd.storage },
          config: { ...cfg, tokens: T, updateState, returnIntermediate },
        }),
      );
    } else {
      const { T: _T, ...cfg } = c.config;
      const gd = g,
        bd = b;
      r = yield* nativeCall((n) =>
        n.linearAttentionStep({
          device: q.device,
          dtype: q.dtype,
          tensors: {
            state: state.storage,
            q: q.storage,
            k: k.storage,
            v: v.storage,
            g: gd?.storage ?? null,
            beta: bd?.storage ?? null,
          },
          config: { ...cfg, tokens: T, updateState, returnIntermediate },
        }),
      );
    }
    return {
      o: new Tensor(r.o, [batch, T, Math.max(Hq, Hv), V], q.dtype, q.device),
      intermediateStates: r.intermediate ? new Tensor(r.intermediate, [batch, T, Hv, K, V], 'float32', q.device) : null,
    };
  } finally {
    for (const t of owned) t.dispose();
  }
}

export function linearAttentionStep(
  inputs: LinearAttentionStepInputs,
  options: LinearAttentionStepOptions = {},
): LinearAttentionStepOutputs {
  return runSync(steps(inputs, options));
}

/** The Promise form of linearAttentionStep (the kernel runs off the JavaScript thread; see README, Async calls). */
export function linearAttentionStepAsync(
  inputs: LinearAttentionStepInputs,
  options?: LinearAttentionStepOptions & AsyncOptions,
): Promise<LinearAttentionStepOutputs> {
  const split = splitSignal<LinearAttentionStepOptions>('linearAttentionStepAsync', options);
  return callAsync(OP, [inputs, split.options], split.signal, () => steps(inputs, split.options ?? {}));
}
