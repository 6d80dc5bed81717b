/**
 * Linear attention, the family of ONNX `LinearAttention` (and com.microsoft `GatedDeltaNet`): linear,
 * gated (GLA, RetNet, HGRN2, scalar or per-key decay), delta (DeltaNet) and gated delta (Gated
 * DeltaNet; KDA with a per-key decay) rules, forward and backward.
 *
 * Per state head hv and position t of a sequence, with the state S stored (K, V) (the layout of
 * initialState; S[i][j], i over the key dimension) and a_t = exp(g_t), g_t the log-space decay
 * (one value per head, or a K-vector per head: then the decay applies per key row of the state):
 *
 *     linear:       S_t = S_{t-1} + k_t v_t^T
 *     gated:        S_t = diag(a_t) S_{t-1} + k_t v_t^T
 *     delta:        S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
 *     gated_delta:  S_t = diag(a_t) S_{t-1} + beta_t k_t (v_t - (diag(a_t) S_{t-1})^T k_t)^T
 *     o_t = scale * S_t^T q_t                               (S_{-1} = initialState or 0)
 *
 * Heads: q (batch, T, Hq, K), k (batch, T, Hk, K), v (batch, T, Hv, V), one state per v head. Key
 * head of state hv: floor(hv / (Hv / Hk)) (ONNX: Hk = Hv). Grouped queries (Hq a multiple of Hv):
 * query head h reads state floor(h / (Hq / Hv)) and o has Hq heads. Inverse grouping (Hv a multiple
 * of Hq): state hv reads query head floor(hv / (Hv / Hq)) and o has Hv heads. So o is
 * (batch, T, max(Hq, Hv), V).
 *
 * Inputs: `q`, `k`, `v` one dtype (float32, float16, bfloat16); `decay` float32 (batch, T, Hv) or
 * (batch, T, Hv, K) for the gated rules (absent otherwise); `beta` in q's dtype (batch, T, Hv) or
 * (batch, T, 1) (shared by the heads) for the delta rules (absent otherwise).
 * Options: `updateRule` (default 'gated_delta'); `scale` (default K^-0.5); `initialState`
 * (N, Hv, K, V) float32; `outputFinalState`; `cuSeqlens` (a packed batch of N sequences, batch 1);
 * `stateWindow` W in 0-8 (also return the states after the last W tokens of each sequence, as
 * `windowStates` (W, N, Hv, K, V): slot j is the state after token length - W + j, zeros for slots
 * before the sequence's start, so a speculative decoder can roll back to an accepted prefix);
 * `gateActivation` 'none' | 'qwen' (g = -exp(aLog) * softplus(decay + dtBias), in float32, with
 * `aLog` (Hv) and optional `dtBias` (Hv), or (Hv, K) with a per-key decay); `betaActivation` 'none' |
 * 'sigmoid'; `qkL2Norm` (q and k rows divided by sqrt(sum x^2 + 1e-6) first).
 * Outputs: `o` (batch, T, max(Hq, Hv), V) in q's dtype; `finalState` (N, Hv, K, V) float32 or null;
 * `windowStates` or null. Gradients flow through o and finalState (not windowStates) to q, k, v,
 * decay, beta, initialState, aLog and dtBias.
 *
 * ONNX's packed layouts map onto these shapes by a reshape (no copy): query (B, T, Hq*K) is
 * q (B, T, Hq, K), and likewise key, value, a per-key decay (B, T, Hv*K) -> (B, T, Hv, K) and the
 * output; GatedDeltaNet's token-major (tokens, H, D) is batch 1 with cuSeqlens, and its V-major state
 * (N, Hv, V, K) is the transpose of ours per head.
 *
 * The delta rules with a scalar decay, key heads equal to query heads and Hv a multiple of Hq (the
 * layout of Gated DeltaNet) run on the gated delta rule's kernels (CPU: blocked; CUDA: chunked
 * tensor-core kernels for fp16 / bf16). The 'linear' and 'gated' rules in that layout (no state window)
 * also run there, without the delta term (CPU: every dtype; CUDA: fp16 / bf16; the launchers' choice,
 * cuda/attention/linear_attention.h), and on CUDA so do the per-key 'gated' and 'gated_delta' rules
 * in that layout (GLA, KDA; fp16 / bf16, K <= 128). Every other configuration runs on this family's kernels (CPU:
 * blocked, or per token with several query heads per state or a state window; CUDA: per token).
 */
import { defineOp, withInference } from '../autograd';
import { float32Elements, type LinearAttentionConfig, type LinearGateConfig, type Storage } from '../native';
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
  finiteNumber,
  oneOf,
  parseCuSeqlens,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
  stateWindowOption,
} from '../validate';

export type LinearAttentionRule = 'linear' | 'gated' | 'delta' | 'gated_delta';
export const LINEAR_ATTENTION_RULES: readonly LinearAttentionRule[] = ['linear', 'gated', 'delta', 'gated_delta'];

export interface LinearAttentionInputs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  decay?: Tensor | null;
  beta?: Tensor | null;
}
export interface LinearAttentionOptions {
  updateRule?: LinearAttentionRule;
  scale?: number;
  initialState?: Tensor | null;
  outputFinalState?: boolean;
  cuSeqlens?: Int32Array | readonly number[] | null;
  stateWindow?: number;
  gateActivation?: 'none' | 'qwen';
  aLog?: Tensor | null;
  dtBias?: Tensor | null;
  betaActivation?: 'none' | 'sigmoid';
  qkL2Norm?: boolean;
}
export interface LinearAttentionOutputs {
  o: Tensor;
  finalState: Tensor | null;
  windowStates: Tensor | null;
}
export interface LinearAttentionGrads {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  decay: Tensor | null;
  beta: Tensor | null;
  initialState: Tensor | null;
  aLog: Tensor | null;
  dtBias: Tensor | null;
}

interface Saved {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  decay: Tensor | null;
  beta: Tensor | null;
  initialState: Tensor | null;
  aLog: Tensor | null;
  dtBias: Tensor | null;
}
export interface LinearAttentionCtx {
  inputs: Saved;
  /** The effective decay and beta when the gates computed them (else the inputs themselves). */
  g: Tensor | null;
  b: Tensor | null;
  states: Tensor;
  /** Whether the forward ran the gated delta rule's blocked kernels (their checkpoints differ). */
  blocked: boolean;
  options: Required<Pick<LinearAttentionOptions, 'updateRule' | 'gateActivation' | 'betaActivation' | 'qkL2Norm'>> & {
    scale: number;
  };
  cuSeqlens: Int32Array | null;
  nseq: number;
  dtype: DType;
  device: Device;
}

const OP = 'linearAttention';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
export const MAX_HEAD_DIM = 256;

/** Checks the inputs and the options they depend on; returns the kernels' config and the gate config. */
export function checkLinearAttention(
  op: string,
  inputs: LinearAttentionInputs,
  opts: LinearAttentionOptions,
  tokensName: string,
) {
  const { q, k, v } = inputs;
  const decay = inputs.decay ?? null,
    beta = inputs.beta ?? null;
  const updateRule = oneOf(op, 'updateRule', opts.updateRule, LINEAR_ATTENTION_RULES, 'gated_delta');
  const rule = LINEAR_ATTENTION_RULES.indexOf(updateRule);
  const decays = updateRule === 'gated' || updateRule === 'gated_delta';
  const corrects = updateRule === 'delta' || updateRule === 'gated_delta';
  requireTensor(op, 'q', q);
  expectRank(op, 'q', q, 4, `batch, ${tokensName}, Hq, K`);
  if (q.size === 0)
    throw new ShapeError(`${op}: q has shape [${q.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(op, 'q', q, FLOAT_DTYPES);
  const [batch, T, Hq, K] = q.shape;
  if (K > MAX_HEAD_DIM) throw new ShapeError(`${op}: q has K = ${K}, expected at most ${MAX_HEAD_DIM}`);
  requireTensor(op, 'v', v);
  expectRank(op, 'v', v, 4, `batch, ${tokensName}, Hv, V`);
  const [, , Hv, V] = v.shape;
  expectShape(op, 'v', v, [batch, T, Hv, V], `batch, ${tokensName}, Hv, V`, 'to match q');
  if (Hv < 1 || V < 1 || (Hq >= Hv ? Hq % Hv : Hv % Hq) !== 0)
    throw new ShapeError(
      `${op}: v has ${Hv} heads, expected a divisor or a multiple of q's ${Hq} heads (grouped queries either way)`,
    );
  if (V > MAX_HEAD_DIM) throw new ShapeError(`${op}: v has V = ${V}, expected at most ${MAX_HEAD_DIM}`);
  expectDType(op, 'v', v, [q.dtype], 'to match q');
  expectDevice(op, 'v', v, q.device, 'to match q');
  requireTensor(op, 'k', k);
  expectRank(op, 'k', k, 4, `batch, ${tokensName}, Hk, K`);
  const Hk = k.shape[2];
  expectShape(op, 'k', k, [batch, T, Hk, K], `batch, ${tokensName}, Hk, K`, 'to match q');
  if (Hk < 1 || Hv % Hk !== 0) throw new ShapeError(`${op}: k has ${Hk} heads, expected a divisor of v's ${Hv} heads`);
  expectDType(op, 'k', k, [q.dtype], 'to match q');
  expectDevice(op, 'k', k, q.device, 'to match q');
  let perKeyDecay = false;
  if (decays) {
    if (decay === null) throw new ArgumentError(`${op}: updateRule '${updateRule}' needs decay`);
    requireTensor(op, 'decay', decay);
    perKeyDecay = decay.shape.length === 4;
    if (perKeyDecay) expectShape(op, 'decay', decay, [batch, T, Hv, K], `batch, ${tokensName}, Hv, K`, 'to match v');
    else expectShape(op, 'decay', decay, [batch, T, Hv], `batch, ${tokensName}, Hv (or Hv, K per key)`, 'to match v');
    expectDType(op, 'decay', decay, ['float32'], '(decays are float32)');
    expectDevice(op, 'decay', decay, q.device, 'to match q');
  } else if (decay !== null) {
    throw new ArgumentError(`${op}: updateRule '${updateRule}' takes no decay (use 'gated' or 'gated_delta')`);
  }
  let betaHeads = Hv;
  if (corrects) {
    if (beta === null) throw new ArgumentError(`${op}: updateRule '${updateRule}' needs beta`);
    requireTensor(op, 'beta', beta);
    betaHeads = beta.shape.length === 3 && beta.shape[2] === 1 ? 1 : Hv;
    expectShape(op, 'beta', beta, [batch, T, betaHeads], `batch, ${tokensName}, Hv (or 1)`, 'to match v');
    expectDType(op, 'beta', beta, [q.dtype], 'to match q');
    expectDevice(op, 'beta', beta, q.device, 'to match q');
  } else if (beta !== null) {
    throw new ArgumentError(`${op}: updateRule '${updateRule}' takes no beta (use 'delta' or 'gated_delta')`);
  }
  const gateActivation = oneOf(op, 'gateActivation', opts.gateActivation, ['none', 'qwen'] as const, 'none');
  const betaActivation = oneOf(op, 'betaActivation', opts.betaActivation, ['none', 'sigmoid'] as const, 'none');
  const qwen = gateActivation === 'qwen';
  if (qwen && !decays) throw new ArgumentError(`${op}: gateActivation 'qwen' needs a rule with decay`);
  if (betaActivation === 'sigmoid' && !corrects)
    throw new ArgumentError(`${op}: betaActivation 'sigmoid' needs a rule with beta`);
  const aLog = opts.aLog ?? null,
    dtBias = opts.dtBias ?? null;
  let dtBiasPerKey = false;
  if (qwen) {
    if (aLog === null) throw new ArgumentError(`${op}: gateActivation 'qwen' needs aLog`);
    requireTensor(op, 'aLog', aLog);
    expectShape(op, 'aLog', aLog, [Hv], 'Hv', 'to match v');
    expectDType(op, 'aLog', aLog, ['float32']);
    expectDevice(op, 'aLog', aLog, q.device, 'to match q');
    if (dtBias !== null) {
      requireTensor(op, 'dtBias', dtBias);
      dtBiasPerKey = perKeyDecay && dtBias.shape.length === 2;
      if (dtBiasPerKey) expectShape(op, 'dtBias', dtBias, [Hv, K], 'Hv, K', 'to match the per-key decay');
      else expectShape(op, 'dtBias', dtBias, [Hv], perKeyDecay ? 'Hv (or Hv, K)' : 'Hv', 'to match v');
      expectDType(op, 'dtBias', dtBias, ['float32']);
      expectDevice(op, 'dtBias', dtBias, q.device, 'to match q');
    }
  } else if (aLog !== null || dtBias !== null) {
    throw new ArgumentError(`${op}: aLog and dtBias belong to gateActivation 'qwen'`);
  }
  const scale = opts.scale === undefined ? 1 / Math.sqrt(K) : finiteNumber(op, 'scale', opts.scale, { float32: true });
  const l2norm = booleanOption(op, 'qkL2Norm', opts.qkL2Norm, false);
  const config: LinearAttentionConfig = { rule, batch, T, Hq, Hk, Hv, K, V, perKeyDecay, scale, l2norm };
  const gates: LinearGateConfig = {
    rows: batch * T,
    Hv,
    K,
    perKey: perKeyDecay,
    qwen,
    sigmoid: betaActivation === 'sigmoid',
    betaHeads,
    dtBiasPerKey,
  };
  const needGates = qwen || gates.sigmoid || (corrects && betaHeads === 1);
  // The gated delta rule's blocked kernels: delta rules, one decay per head, k heads = q heads <= v heads.
  const blocked = corrects && !perKeyDecay && Hk === Hq && Hq <= Hv;
  return {
    config,
    gates,
    needGates,
    blocked,
    decays,
    corrects,
    settings: { updateRule, gateActivation, betaActivation, qkL2Norm: l2norm, scale },
    saved: { q, k, v, decay, beta, aLog, dtBias },
  };
}

type Checked = ReturnType<typeof checkLinearAttention>;
type GateInputs = Pick<Saved, 'decay' | 'beta' | 'aLog' | 'dtBias'>;

/** The gate kernels' tensors (each nullable). */
const gateTensors = ({ decay, beta, aLog, dtBias }: GateInputs) => ({
  decay: decay?.storage ?? null,
  beta: beta?.storage ?? null,
  aLog: aLog?.storage ?? null,
  dtBias: dtBias?.storage ?? null,
});

/**
 * The effective decay and beta (gate activations, beta shared by the heads): new tensors (owned) when
 * they differ from the inputs, else the inputs themselves.
 */
export function* effectiveGates(c: Checked): Steps<{ g: Tensor | null; b: Tensor | null; owned: boolean }> {
  const { decay, beta, q } = c.saved;
  if (!c.needGates) return { g: decay, b: beta, owned: false };
  const r = yield* nativeCall((n) =>
    n.linearAttentionGates({
      device: q.device,
      dtype: q.dtype,
      tensors: gateTensors(c.saved),
      config: c.gates,
    }),
  );
  const { batch, T, Hv } = c.config;
  return {
    g: r.g && decay ? new Tensor(r.g, decay.shape, 'float32', q.device) : null,
    b: r.beta ? new Tensor(r.beta, [batch, T, Hv], q.dtype, q.device) : null,
    owned: true,
  };
}

function prepare(op: string, inputs: LinearAttentionInputs, options: LinearAttentionOptions | undefined) {
  inputs = readInputs(op, inputs, ['q', 'k', 'v', 'decay', 'beta']);
  const opts = readOptions(op, options, [
    'updateRule',
    'scale',
    'initialState',
    'outputFinalState',
    'cuSeqlens',
    'stateWindow',
    'gateActivation',
    'aLog',
    'dtBias',
    'betaActivation',
    'qkL2Norm',
  ]);
  const c = checkLinearAttention(op, inputs, opts, 'T');
  const { batch, T, Hv, K, V } = c.config;
  const { q } = c.saved;
  const returnFinal = booleanOption(op, 'outputFinalState', opts.outputFinalState, false);
  const cuSeqlens = parseCuSeqlens(op, opts.cuSeqlens, batch, T, 'T');
  const nseq = cuSeqlens ? cuSeqlens.length - 1 : batch;
  const window = stateWindowOption(op, opts.stateWindow);
  const h0 = opts.initialState ?? null;
  if (h0) {
    requireTensor(op, 'initialState', h0);
    const dims = cuSeqlens ? 'N sequences, Hv, K, V' : 'batch, Hv, K, V';
    expectShape(op, 'initialState', h0, [nseq, Hv, K, V], dims, 'to match q and v');
    expectDType(op, 'initialState', h0, ['float32'], '(states are float32)');
    expectDevice(op, 'initialState', h0, q.device, 'to match q');
  }
  return { c, returnFinal, cuSeqlens, nseq, window, h0 };
}

function* run(
  inputs: LinearAttentionInputs,
  options: LinearAttentionOptions,
  keep: boolean,
): Steps<{ outputs: LinearAttentionOutputs; ctx: LinearAttentionCtx | null }> {
  const { c, returnFinal, cuSeqlens, nseq, window, h0 } = prepare(OP, inputs, options);
  const { q, k, v } = c.saved;
  const { batch, T, Hq, Hv, K, V } = c.config;
  const gates = yield* effectiveGates(c);
  const useBlocked = c.blocked && window === 0;
  let r: { o: Storage; states: Storage | null; finalState: Storage | null; windowStates: Storage | null };
  if (useBlocked) {
    const g = gates.g ?? zeroDecay(c.config, q.device);
    try {
      const res = yield* nativeCall((n) =>
        n.gatedDeltaRuleForward({
          device: q.device,
          dtype: q.dtype,
          tensors: {
            q: q.storage,
            k: k.storage,
            v: v.storage,
            g: g.storage,
            beta: (gates.b as Tensor).storage,
            h0: h0?.storage ?? null,
          },
          config: { ...blockedConfig(c.config), cuSeqlens, returnFinal, keepStates: keep },
        }),
      );
      r = { ...res, windowStates: null };
    } finally {
      if (g !== gates.g) g.dispose();
    }
  } else {
    r = yield* nativeCall((n) =>
      n.linearAttentionForward({
        device: q.device,
        dtype: q.dtype,
        tensors: {
          q: q.storage,
          k: k.storage,
          v: v.storage,
          g: gates.g?.storage ?? null,
          beta: gates.b?.storage ?? null,
          h0: h0?.storage ?? null,
        },
        config: { ...c.config, cuSeqlens, returnFinal, keepStates: keep, window },
      }),
    );
  }
  const outputs: LinearAttentionOutputs = {
    o: new Tensor(r.o, [batch, T, Math.max(Hq, Hv), V], q.dtype, q.device),
    finalState: r.finalState ? new Tensor(r.finalState, [nseq, Hv, K, V], 'float32', q.device) : null,
    windowStates: r.windowStates ? new Tensor(r.windowStates, [window, nseq, Hv, K, V], 'float32', q.device) : null,
  };
  const dropGates = () => {
    if (!gates.owned) return;
    gates.g?.dispose();
    gates.b?.dispose();
  };
  if (!r.states) {
    dropGates();
    if (keep) throw new Error(`${OP}: the addon returned no state checkpoints`);
    return { outputs, ctx: null };
  }
  const states = new Tensor(r.states, [float32Elements(r.states)], 'float32', q.device);
  if (!keep) {
    dropGates();
    states.dispose();
    return { outputs, ctx: null };
  }
  const owned: ('states' | 'g' | 'b')[] = gates.owned ? ['states', 'g', 'b'] : ['states'];
  return {
    outputs,
    ctx: sealCtx(
      OP,
      {
        inputs: { ...c.saved, initialState: h0 },
        g: gates.owned ? gates.g : null,
        b: gates.owned ? gates.b : null,
        states,
        blocked: useBlocked,
        options: c.settings,
        cuSeqlens,
        nseq,
        dtype: q.dtype,
        device: q.device,
      } satisfies LinearAttentionCtx,
      owned,
    ),
  };
}

/** The delta rule as the gated delta rule: a log-space decay of 0 for every (position, state head). */
export function zeroDecay(cfg: LinearAttentionConfig, device: Device): Tensor {
  return Tensor.from(new Float32Array(cfg.batch * cfg.T * cfg.Hv), [cfg.batch, cfg.T, cfg.Hv], { device });
}

/** The gated delta rule kernels' configuration for the Gated DeltaNet layout (k heads = q heads). */
export function blockedConfig(cfg: LinearAttentionConfig) {
  return {
    batch: cfg.batch,
    T: cfg.T,
    H: cfg.Hq,
    HV: cfg.Hv,
    K: cfg.K,
    V: cfg.V,
    scale: cfg.scale,
    l2norm: cfg.l2norm,
  };
}

function* forward(
  inputs: LinearAttentionInputs,
  options: LinearAttentionOptions = {},
): Steps<{ outputs: LinearAttentionOutputs; ctx: LinearAttentionCtx }> {
  return (yield* run(inputs, options, true)) as { outputs: LinearAttentionOutputs; ctx: LinearAttentionCtx };
}

function* backward(
  ctx: LinearAttentionCtx,
  grads: { o?: Tensor | null; finalState?: Tensor | null; windowStates?: Tensor | null },
): Steps<LinearAttentionGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { inputs: 'object', states: 'tensor', g: 'tensor?', b: 'tensor?', cuSeqlens: 'int32?' });
  checkCtxFields(
    OP,
    ctx.inputs,
    {
      q: 'tensor',
      k: 'tensor',
      v: 'tensor',
      decay: 'tensor?',
      beta: 'tensor?',
      initialState: 'tensor?',
      aLog: 'tensor?',
      dtBias: 'tensor?',
    },
    'ctx.inputs',
  );
  const { q, k, v, decay, beta, initialState, aLog, dtBias } = ctx.inputs;
  const p = prepare(
    op,
    { q, k, v, decay, beta },
    { ...ctx.options, initialState, aLog, dtBias, cuSeqlens: ctx.cuSeqlens },
  );
  expectCtxValues(OP, 'ctx', ctx, {
    nseq: p.nseq,
    dtype: q.dtype,
    device: q.device,
    blocked: p.c.blocked && p.window === 0 ? ctx.blocked : false,
  });
  const { c } = p;
  const cfg = c.config;
  const g = readGrads(op, grads, ['o', 'finalState', 'windowStates']);
  if (g.windowStates)
    throw new ArgumentError(`${op}: windowStates is an inference output; gradients flow through o and finalState`);
  const gO = g.o ?? null,
    gFinal = g.finalState ?? null;
  const Ho = Math.max(cfg.Hq, cfg.Hv);
  if (gO) {
    expectShape(op, 'grad of o', gO, [cfg.batch, cfg.T, Ho, cfg.V], 'batch, T, max(Hq, Hv), V', 'to match o');
    expectDType(op, 'grad of o', gO, [ctx.dtype], 'to match o');
    expectDevice(op, 'grad of o', gO, ctx.device, 'to match o');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalState',
      gFinal,
      [ctx.nseq, cfg.Hv, cfg.K, cfg.V],
      'N, Hv, K, V',
      'to match finalState',
    );
    expectDType(op, 'grad of finalState', gFinal, ['float32']);
    expectDevice(op, 'grad of finalState', gFinal, ctx.device, 'to match finalState');
  }
  const gEff = c.needGates ? ctx.g : decay;
  const bEff = c.needGates ? ctx.b : beta;
  if (c.needGates && ((c.decays && !gEff) || (c.corrects && !bEff)))
    throw new ArgumentError(`${op}: ctx lost the effective gates its forward computed`);
  const grad = { states: ctx.states.storage, dO: gO?.storage ?? null, dFinal: gFinal?.storage ?? null };
  let r: { dq: Storage; dk: Storage; dv: Storage; dg: Storage | null; dbeta: Storage | null; dh0: Storage | null };
  if (ctx.blocked) {
    const zeros = gEff ?? zeroDecay(cfg, q.device);
    try {
      const res = yield* nativeCall((n) =>
        n.gatedDeltaRuleBackward({
          device: ctx.device,
          dtype: ctx.dtype,
          tensors: {
            q: q.storage,
            k: k.storage,
            v: v.storage,
            g: zeros.storage,
            beta: (bEff as Tensor).storage,
            h0: initialState?.storage ?? null,
          },
          grads: grad,
          config: { ...blockedConfig(cfg), cuSeqlens: ctx.cuSeqlens, needDh0: initialState !== null },
        }),
      );
      r = { ...res, dg: c.decays ? res.dg : null };
      if (!c.decays) new Tensor(res.dg, [float32Elements(res.dg)], 'float32', ctx.device).dispose();
    } finally {
      if (zeros !== gEff) zeros.dispose();
    }
  } else {
    r = yield* nativeCall((n) =>
      n.linearAttentionBackward({
        device: ctx.device,
        dtype: ctx.dtype,
        tensors: {
          q: q.storage,
          k: k.storage,
          v: v.storage,
          g: gEff?.storage ?? null,
          beta: bEff?.storage ?? null,
          h0: initialState?.storage ?? null,
        },
        grads: grad,
        config: { ...cfg, cuSeqlens: ctx.cuSeqlens, needDh0: initialState !== null },
      }),
    );
  }
  const like = (s: Storage, t: Tensor) => new Tensor(s, t.shape, t.dtype, t.device);
  const out: LinearAttentionGrads = {
    q: like(r.dq, q),
    k: like(r.dk, k),
    v: like(r.dv, v),
    decay: null,
    beta: null,
    initialState: r.dh0 && initialState ? like(r.dh0, initialState) : null,
    aLog: null,
    dtBias: null,
  };
  if (!c.needGates) {
    out.decay = r.dg && decay ? like(r.dg, decay) : null;
    out.beta = r.dbeta && beta ? like(r.dbeta, beta) : null;
    return out;
  }
  const dgEff = r.dg ? new Tensor(r.dg, (gEff as Tensor).shape, 'float32', ctx.device) : null;
  const dbEff = r.dbeta ? new Tensor(r.dbeta, (bEff as Tensor).shape, ctx.dtype, ctx.device) : null;
  try {
    const gr = yield* nativeCall((n) =>
      n.linearAttentionGatesBackward({
        device: ctx.device,
        dtype: ctx.dtype,
        tensors: gateTensors({ decay, beta, aLog, dtBias }),
        grads: { dg: dgEff?.storage ?? null, dbeta: dbEff?.storage ?? null },
        config: c.gates,
      }),
    );
    out.decay = gr.ddecay && decay ? like(gr.ddecay, decay) : null;
    out.beta = gr.dbeta && beta ? like(gr.dbeta, beta) : null;
    out.aLog = gr.daLog && aLog ? like(gr.daLog, aLog) : null;
    out.dtBias = gr.ddtBias && dtBias ? like(gr.ddtBias, dtBias) : null;
  } finally {
    dgEff?.dispose();
    dbEff?.dispose();
  }
  return out;
}

const op = defineOp<
  LinearAttentionInputs,
  LinearAttentionOutputs,
  LinearAttentionOptions,
  LinearAttentionCtx,
  LinearAttentionGrads
>({
  name: OP,
  differentiableOptions: ['initialState', 'aLog', 'dtBias'],
  forward,
  backward,
});

export const linearAttention = withInference(op, run);

/** The steps of the forward (keep: also its ctx) and of the backward, for ops built on this one. */
export const linearAttentionSteps = { run, backward };
