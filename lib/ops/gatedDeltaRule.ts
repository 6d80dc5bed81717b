/**
 * Gated delta rule (Gated DeltaNet), with the argument names and shapes of flash-linear-attention's
 * `chunk_gated_delta_rule`.
 *
 * Per value head hv, which reads q/k head h = floor(hv / (HV / H)), and position t of a sequence,
 * with the state S stored (K, V) (the layout of initialState):
 *
 *     q_t, k_t = q[t, h], k[t, h]      (with useQkL2normInKernel: x / sqrt(sum x^2 + 1e-6))
 *     S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      (S_{-1} = initialState or 0)
 *     o_t = scale * S_t^T q_t
 *
 * which is the reference's V x K form S'_t = exp(g_t) S'_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
 * o_t = scale S'_t q_t with S = S'^T. Each step's decay exp(g_t) is applied on its own (no cumulative
 * sums of g, no division by a decay), so g = 0 (no decay) and very negative g (the state forgotten
 * at once) are exact and finite.
 *
 * Inputs: `q`, `k` (batch, T, H, K); `v` (batch, T, HV, V), HV a multiple of H; `beta` (batch, T, HV);
 * one dtype for q, k, v, beta (float32, float16 or bfloat16); `g` (batch, T, HV) float32, log-space.
 * Options: `scale` (default K^-0.5); `initialState` (N, HV, K, V) float32; `outputFinalState`;
 * `cuSeqlens` (a packed batch of N sequences, batch 1, Int32Array or number[] of N + 1 offsets:
 * sequence s covers positions [cuSeqlens[s], cuSeqlens[s+1]) and starts from initialState[s];
 * positions after the last sequence give o = 0 and zero gradients); `useQkL2normInKernel`.
 * Outputs: `o` (batch, T, HV, V) in q's dtype; `finalState` (N, HV, K, V) float32 or null.
 * Backward: gradients for q, k, v, g, beta and initialState, from grads of o and/or finalState.
 */
import { defineOp, withInference } from '../autograd';
import { float32Elements, type GatedDeltaRuleConfig, type Storage } from '../native';
import { nativeCall, type Steps } from '../async';
import { Tensor, type DType, type Device } from '../tensor';
import { ShapeError } from '../errors';
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
  parseCuSeqlens,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
} from '../validate';

export interface GatedDeltaRuleInputs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  g: Tensor;
  beta: Tensor;
}
export interface GatedDeltaRuleOptions {
  scale?: number;
  initialState?: Tensor | null;
  outputFinalState?: boolean;
  cuSeqlens?: Int32Array | readonly number[] | null;
  useQkL2normInKernel?: boolean;
}
export interface GatedDeltaRuleOutputs {
  o: Tensor;
  finalState: Tensor | null;
}
export interface GatedDeltaRuleGrads {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  g: Tensor;
  beta: Tensor;
  initialState: Tensor | null;
}
export interface GatedDeltaRuleCtx {
  inputs: GatedDeltaRuleInputs & { initialState: Tensor | null };
  states: Tensor;
  config: GatedDeltaRuleConfig;
  cuSeqlens: Int32Array | null;
  nseq: number;
  dtype: DType;
  device: Device;
}

const OP = 'gatedDeltaRule';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
export const MAX_HEAD_DIM = 256;

/** Shape checks shared with the decode step; returns the dims. */
export function checkDeltaInputs(
  op: string,
  inputs: GatedDeltaRuleInputs,
  tokensName: string,
): { batch: number; T: number; H: number; HV: number; K: number; V: number } {
  const { q, k, v, g, beta } = inputs;
  requireTensor(op, 'q', q);
  expectRank(op, 'q', q, 4, `batch, ${tokensName}, H, K`);
  if (q.size === 0)
    throw new ShapeError(`${op}: q has shape [${q.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(op, 'q', q, FLOAT_DTYPES);
  const [batch, T, H, K] = q.shape;
  if (K > MAX_HEAD_DIM) throw new ShapeError(`${op}: q has K = ${K}, expected at most ${MAX_HEAD_DIM}`);
  requireTensor(op, 'k', k);
  expectShape(op, 'k', k, q.shape, `batch, ${tokensName}, H, K`, 'to match q');
  expectDType(op, 'k', k, [q.dtype], 'to match q');
  expectDevice(op, 'k', k, q.device, 'to match q');
  requireTensor(op, 'v', v);
  expectRank(op, 'v', v, 4, `batch, ${tokensName}, HV, V`);
  const [, , HV, V] = v.shape;
  expectShape(op, 'v', v, [batch, T, HV, V], `batch, ${tokensName}, HV, V`, 'to match q');
  if (HV < 1 || V < 1 || HV % H !== 0)
    throw new ShapeError(`${op}: v has ${HV} heads, expected a positive multiple of q's ${H} heads`);
  if (V > MAX_HEAD_DIM) throw new ShapeError(`${op}: v has V = ${V}, expected at most ${MAX_HEAD_DIM}`);
  expectDType(op, 'v', v, [q.dtype], 'to match q');
  expectDevice(op, 'v', v, q.device, 'to match q');
  requireTensor(op, 'g', g);
  expectShape(op, 'g', g, [batch, T, HV], `batch, ${tokensName}, HV`, 'to match v');
  expectDType(op, 'g', g, ['float32'], '(log-space decays are float32)');
  expectDevice(op, 'g', g, q.device, 'to match q');
  requireTensor(op, 'beta', beta);
  expectShape(op, 'beta', beta, [batch, T, HV], `batch, ${tokensName}, HV`, 'to match v');
  expectDType(op, 'beta', beta, [q.dtype], 'to match q');
  expectDevice(op, 'beta', beta, q.device, 'to match q');
  return { batch, T, H, HV, K, V };
}

function* forward(
  inputs: GatedDeltaRuleInputs,
  options: GatedDeltaRuleOptions = {},
): Steps<{ outputs: GatedDeltaRuleOutputs; ctx: GatedDeltaRuleCtx }> {
  return (yield* run(inputs, options, true)) as { outputs: GatedDeltaRuleOutputs; ctx: GatedDeltaRuleCtx };
}

/**
 * Checks the arguments and derives the kernels' config. `OP` names the caller in messages: the
 * forward, or the backward re-checking the tensors saved in its ctx.
 */
function prepare(OP: string, inputs: GatedDeltaRuleInputs, options: GatedDeltaRuleOptions | undefined) {
  inputs = readInputs(OP, inputs, ['q', 'k', 'v', 'g', 'beta']);
  const opts = readOptions(OP, options, [
    'scale',
    'initialState',
    'outputFinalState',
    'cuSeqlens',
    'useQkL2normInKernel',
  ]);
  const dims = checkDeltaInputs(OP, inputs, 'T');
  const { batch, T, HV, K, V } = dims;
  const { q } = inputs;
  const scale = opts.scale === undefined ? 1 / Math.sqrt(K) : finiteNumber(OP, 'scale', opts.scale, { float32: true });
  const l2norm = booleanOption(OP, 'useQkL2normInKernel', opts.useQkL2normInKernel, false);
  const returnFinal = booleanOption(OP, 'outputFinalState', opts.outputFinalState, false);
  const cuSeqlens = parseCuSeqlens(OP, opts.cuSeqlens, batch, T, 'T');
  const nseq = cuSeqlens ? cuSeqlens.length - 1 : batch;
  const h0 = opts.initialState ?? null;
  if (h0) {
    requireTensor(OP, 'initialState', h0);
    expectShape(
      OP,
      'initialState',
      h0,
      [nseq, HV, K, V],
      cuSeqlens ? 'N sequences, HV, K, V' : 'batch, HV, K, V',
      'to match q and v',
    );
    expectDType(OP, 'initialState', h0, ['float32'], '(states are float32)');
    expectDevice(OP, 'initialState', h0, q.device, 'to match q');
  }
  const config: GatedDeltaRuleConfig = { ...dims, scale, l2norm };
  return { inputs: { ...inputs, initialState: h0 }, config, cuSeqlens, nseq, returnFinal };
}

/** The forward pass; without keep (no backward to follow) the CPU kernels save no state checkpoints. */
function* run(
  inputs: GatedDeltaRuleInputs,
  options: GatedDeltaRuleOptions,
  keep: boolean,
): Steps<{ outputs: GatedDeltaRuleOutputs; ctx: GatedDeltaRuleCtx | null }> {
  const { inputs: x, config, cuSeqlens, nseq, returnFinal } = prepare(OP, inputs, options);
  const { q, initialState: h0 } = x;
  const { HV, K, V } = config;
  const r = yield* nativeCall((n) =>
    n.gatedDeltaRuleForward({
      device: q.device,
      dtype: q.dtype,
      tensors: {
        q: q.storage,
        k: x.k.storage,
        v: x.v.storage,
        g: x.g.storage,
        beta: x.beta.storage,
        h0: h0?.storage ?? null,
      },
      config: { ...config, cuSeqlens, returnFinal, keepStates: keep },
    }),
  );
  const outputs = {
    o: new Tensor(r.o, x.v.shape, q.dtype, q.device),
    finalState: r.finalState ? new Tensor(r.finalState, [nseq, HV, K, V], 'float32', q.device) : null,
  };
  if (!r.states) {
    if (keep) throw new Error(`${OP}: the addon returned no state checkpoints`);
    return { outputs, ctx: null };
  }
  return {
    outputs,
    ctx: sealCtx(
      OP,
      {
        inputs: x,
        states: new Tensor(r.states, [float32Elements(r.states)], 'float32', q.device),
        config,
        cuSeqlens,
        nseq,
        dtype: q.dtype,
        device: q.device,
      },
      ['states'],
    ),
  };
}

function* backward(
  ctx: GatedDeltaRuleCtx,
  grads: { o?: Tensor | null; finalState?: Tensor | null },
): Steps<GatedDeltaRuleGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { inputs: 'object', states: 'tensor', cuSeqlens: 'int32?' });
  checkCtxFields(
    OP,
    ctx.inputs,
    { q: 'tensor', k: 'tensor', v: 'tensor', g: 'tensor', beta: 'tensor', initialState: 'tensor?' },
    'ctx.inputs',
  );
  // The saved tensors are checked again as the forward checked them, and must give the ctx's config.
  const { initialState, ...saved } = ctx.inputs;
  const p = prepare(op, saved, {
    scale: ctx.config?.scale,
    useQkL2normInKernel: ctx.config?.l2norm,
    initialState,
    cuSeqlens: ctx.cuSeqlens,
  });
  expectCtxValues(OP, 'ctx.config', ctx.config, { ...p.config });
  expectCtxValues(OP, 'ctx', ctx, { nseq: p.nseq, dtype: p.inputs.q.dtype, device: p.inputs.q.device });
  const { inputs: x, config: cfg, cuSeqlens } = p;
  expectDType(op, 'states (saved for backward)', ctx.states, ['float32']);
  expectDevice(op, 'states (saved for backward)', ctx.states, ctx.device, 'to match q');
  const g = readGrads(op, grads, ['o', 'finalState']);
  const gO = g.o ?? null;
  const gFinal = g.finalState ?? null;
  if (gO) {
    expectShape(op, 'grad of o', gO, x.v.shape, 'batch, T, HV, V', 'to match o');
    expectDType(op, 'grad of o', gO, [ctx.dtype], 'to match o');
    expectDevice(op, 'grad of o', gO, ctx.device, 'to match o');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalState',
      gFinal,
      [ctx.nseq, cfg.HV, cfg.K, cfg.V],
      'N, HV, K, V',
      'to match finalState',
    );
    expectDType(op, 'grad of finalState', gFinal, ['float32']);
    expectDevice(op, 'grad of finalState', gFinal, ctx.device, 'to match finalState');
  }
  const r = yield* nativeCall((n) =>
    n.gatedDeltaRuleBackward({
      device: ctx.device,
      dtype: ctx.dtype,
      tensors: {
        q: x.q.storage,
        k: x.k.storage,
        v: x.v.storage,
        g: x.g.storage,
        beta: x.beta.storage,
        h0: x.initialState?.storage ?? null,
      },
      grads: { states: ctx.states.storage, dO: gO?.storage ?? null, dFinal: gFinal?.storage ?? null },
      config: { ...cfg, cuSeqlens, needDh0: x.initialState !== null },
    }),
  );
  const like = (s: Storage, t: Tensor) => new Tensor(s, t.shape, t.dtype, t.device);
  return {
    q: like(r.dq, x.q),
    k: like(r.dk, x.k),
    v: like(r.dv, x.v),
    g: like(r.dg, x.g),
    beta: like(r.dbeta, x.beta),
    initialState: r.dh0 && x.initialState ? like(r.dh0, x.initialState) : null,
  };
}

const op = defineOp<
  GatedDeltaRuleInputs,
  GatedDeltaRuleOutputs,
  GatedDeltaRuleOptions,
  GatedDeltaRuleCtx,
  GatedDeltaRuleGrads
>({
  name: OP,
  differentiableOptions: ['initialState'],
  forward,
  backward,
});

// While a tape records, the forward keeps what the backward needs (the state entering every chunk of
// tokens); otherwise the CPU kernels keep nothing.
export const gatedDeltaRule = withInference(op, run);
