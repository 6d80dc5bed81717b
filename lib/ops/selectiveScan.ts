/**
 * Selective scan (Mamba-1), with the argument names and shapes of the reference `selective_scan_fn`.
 *
 * For every channel d (of `dim`) and state n (of `dstate`), over the positions t of a sequence:
 *
 *     dt_t   = delta_t + deltaBias[d]                    (deltaBias optional)
 *     dt_t   = dt_t <= 20 ? log(1 + exp(dt_t)) : dt_t    (when deltaSoftplus)
 *     x_t[n] = exp(dt_t * A[d,n]) * x_{t-1}[n] + dt_t * B_t[n] * u_t        (x_{-1} = initialState or 0)
 *     y_t    = (sum_n x_t[n] * C_t[n] + D[d] * u_t) * (z ? z_t * sigmoid(z_t) : 1)
 *
 * Inputs (u's dtype: float32, float16 or bfloat16; parameters and states are float32):
 * - `u`, `delta`, `z` (optional): (batch, dim, seqlen).
 * - `A`: (dim, dstate) float32, dstate <= 256.
 * - `B`, `C`: constant (dim, dstate) float32, or input-dependent (batch, groups, dstate, seqlen) or
 *   (batch, dstate, seqlen) (one group) in u's dtype; channel d reads group floor(d / (dim / groups)).
 * - `D`, `deltaBias` (optional): (dim) float32.
 * Options:
 * - `deltaSoftplus` (default false), `returnFinalState` (default false).
 * - `initialState`: (nseq, dim, dstate) float32, the state before each sequence's first step.
 * - `cuSeqlens`: a packed variable-length batch (batch must be 1): Int32Array or number[] of
 *   nseq + 1 offsets, starting at 0, non-decreasing, at most seqlen. Sequence s covers positions
 *   [cuSeqlens[s], cuSeqlens[s+1]) and starts again from initialState[s] (or zeros); positions
 *   after the last sequence give y = 0 and get zero gradients. Without it nseq = batch.
 * Outputs: `y` (batch, dim, seqlen) in u's dtype; `finalState` (nseq, dim, dstate) float32 or null.
 *
 * Backward gives gradients for every input and for initialState, from grads of y and/or
 * finalState. The forward pass keeps the state at the start of every chunk of steps (a fraction
 * dstate / chunk of u's size in float32) and the backward pass recomputes the states in between.
 */
import { defineOp } from '../autograd';
import { float32Elements, type SelectiveScanConfig, type Storage } from '../native';
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
  parseCuSeqlens,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
} from '../validate';

export interface SelectiveScanInputs {
  u: Tensor;
  delta: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D?: Tensor | null;
  z?: Tensor | null;
  deltaBias?: Tensor | null;
}
export interface SelectiveScanOptions {
  deltaSoftplus?: boolean;
  initialState?: Tensor | null;
  returnFinalState?: boolean;
  cuSeqlens?: Int32Array | readonly number[] | null;
}
export interface SelectiveScanOutputs {
  y: Tensor;
  finalState: Tensor | null;
}
export interface SelectiveScanGrads {
  u: Tensor;
  delta: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D: Tensor | null;
  z: Tensor | null;
  deltaBias: Tensor | null;
  initialState: Tensor | null;
}
export interface SelectiveScanCtx {
  inputs: {
    u: Tensor;
    delta: Tensor;
    A: Tensor;
    B: Tensor;
    C: Tensor;
    D: Tensor | null;
    z: Tensor | null;
    deltaBias: Tensor | null;
    initialState: Tensor | null;
  };
  states: Tensor;
  config: SelectiveScanConfig;
  cuSeqlens: Int32Array | null;
  nseq: number;
  dtype: DType;
  device: Device;
}

const OP = 'selectiveScan';
const DIMS = 'batch, dim, seqlen';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
export const MAX_DSTATE = 256;

/** Checks B or C; returns its number of groups (0 when constant). */
function bcGroups(OP: string, name: string, t: Tensor, u: Tensor, dstate: number): number {
  requireTensor(OP, name, t);
  expectDevice(OP, name, t, u.device, 'to match u');
  const [batch, dim, seqlen] = u.shape;
  if (t.shape.length === 2) {
    expectShape(OP, name, t, [dim, dstate], 'dim, dstate', 'to match u and A (constant)');
    expectDType(OP, name, t, ['float32'], '(a constant B/C is float32)');
    return 0;
  }
  if (t.shape.length === 3) {
    expectShape(OP, name, t, [batch, dstate, seqlen], 'batch, dstate, seqlen', 'to match u and A');
  } else {
    expectRank(OP, name, t, 4, 'batch, groups, dstate, seqlen');
    const groups = t.shape[1];
    expectShape(OP, name, t, [batch, groups, dstate, seqlen], 'batch, groups, dstate, seqlen', 'to match u and A');
    if (groups < 1 || dim % groups !== 0)
      throw new ShapeError(`${OP}: ${name} has ${groups} groups, expected a divisor of dim ${dim}`);
  }
  expectDType(OP, name, t, [u.dtype], 'to match u (an input-dependent B/C has the dtype of u)');
  return t.shape.length === 3 ? 1 : t.shape[1];
}

function optionalTensor(OP: string, name: string, t: Tensor | null | undefined): Tensor | null {
  if (t === undefined || t === null) return null;
  requireTensor(OP, name, t);
  return t;
}

/**
 * Checks the arguments and derives the kernels' config. `OP` names the caller in messages: the
 * forward, or the backward re-checking the tensors saved in its ctx.
 */
function prepare(OP: string, inputs: SelectiveScanInputs, options: SelectiveScanOptions | undefined) {
  inputs = readInputs(OP, inputs, ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'deltaBias']);
  const opts = readOptions(OP, options, ['deltaSoftplus', 'initialState', 'returnFinalState', 'cuSeqlens']);
  const { u, delta, A } = inputs;
  requireTensor(OP, 'u', u);
  expectRank(OP, 'u', u, 3, DIMS);
  if (u.size === 0)
    throw new ShapeError(`${OP}: u has shape [${u.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(OP, 'u', u, FLOAT_DTYPES);
  const [batch, dim, seqlen] = u.shape;
  requireTensor(OP, 'delta', delta);
  expectShape(OP, 'delta', delta, u.shape, DIMS, 'to match u');
  expectDType(OP, 'delta', delta, [u.dtype], 'to match u');
  expectDevice(OP, 'delta', delta, u.device, 'to match u');
  requireTensor(OP, 'A', A);
  expectRank(OP, 'A', A, 2, 'dim, dstate');
  const dstate = A.shape[1];
  expectShape(OP, 'A', A, [dim, dstate], 'dim, dstate', 'to match u');
  if (dstate < 1 || dstate > MAX_DSTATE)
    throw new ShapeError(`${OP}: A has dstate ${dstate}, expected 1 to ${MAX_DSTATE}`);
  expectDType(OP, 'A', A, ['float32']);
  expectDevice(OP, 'A', A, u.device, 'to match u');
  const gB = bcGroups(OP, 'B', inputs.B, u, dstate);
  const gC = bcGroups(OP, 'C', inputs.C, u, dstate);
  if (gB && gC && gB !== gC) throw new ShapeError(`${OP}: B has ${gB} groups and C has ${gC}; they must match`);
  const D = optionalTensor(OP, 'D', inputs.D);
  const deltaBias = optionalTensor(OP, 'deltaBias', inputs.deltaBias);
  for (const [name, t] of [
    ['D', D],
    ['deltaBias', deltaBias],
  ] as const) {
    if (!t) continue;
    expectShape(OP, name, t, [dim], 'dim', 'to match u');
    expectDType(OP, name, t, ['float32']);
    expectDevice(OP, name, t, u.device, 'to match u');
  }
  const z = optionalTensor(OP, 'z', inputs.z);
  if (z) {
    expectShape(OP, 'z', z, u.shape, DIMS, 'to match u');
    expectDType(OP, 'z', z, [u.dtype], 'to match u');
    expectDevice(OP, 'z', z, u.device, 'to match u');
  }
  const deltaSoftplus = booleanOption(OP, 'deltaSoftplus', opts.deltaSoftplus, false);
  const returnFinal = booleanOption(OP, 'returnFinalState', opts.returnFinalState, false);
  const cuSeqlens = parseCuSeqlens(OP, opts.cuSeqlens, batch, seqlen, 'seqlen');
  const nseq = cuSeqlens ? cuSeqlens.length - 1 : batch;
  const h0 = optionalTensor(OP, 'initialState', opts.initialState);
  if (h0) {
    expectShape(
      OP,
      'initialState',
      h0,
      [nseq, dim, dstate],
      cuSeqlens ? 'nseq, dim, dstate' : 'batch, dim, dstate',
      'to match u and A',
    );
    expectDType(OP, 'initialState', h0, ['float32'], '(states are float32)');
    expectDevice(OP, 'initialState', h0, u.device, 'to match u');
  }
  const config: SelectiveScanConfig = {
    batch,
    dim,
    seqlen,
    dstate,
    groups: gB || gC || 1,
    variableB: gB > 0,
    variableC: gC > 0,
    deltaSoftplus,
  };
  return {
    inputs: { u, delta, A, B: inputs.B, C: inputs.C, D, z, deltaBias, initialState: h0 },
    config,
    cuSeqlens,
    nseq,
    returnFinal,
  };
}

function* forward(
  inputs: SelectiveScanInputs,
  options: SelectiveScanOptions = {},
): Steps<{ outputs: SelectiveScanOutputs; ctx: SelectiveScanCtx }> {
  const { inputs: x, config, cuSeqlens, nseq, returnFinal } = prepare(OP, inputs, options);
  const { u, delta, A, D, z, deltaBias, initialState: h0 } = x;
  const { dim, dstate } = config;
  const r = yield* nativeCall((n) =>
    n.selectiveScanForward({
      device: u.device,
      dtype: u.dtype,
      tensors: {
        u: u.storage,
        delta: delta.storage,
        A: A.storage,
        B: x.B.storage,
        C: x.C.storage,
        D: D?.storage ?? null,
        z: z?.storage ?? null,
        deltaBias: deltaBias?.storage ?? null,
        h0: h0?.storage ?? null,
      },
      config: { ...config, cuSeqlens, returnFinal },
    }),
  );
  const y = new Tensor(r.y, u.shape, u.dtype, u.device);
  const finalState = r.finalState ? new Tensor(r.finalState, [nseq, dim, dstate], 'float32', u.device) : null;
  // Checkpoints (flat; their layout is the kernels' business): for each sequence, the state at the
  // start of every chunk of steps.
  const states = new Tensor(r.states, [float32Elements(r.states)], 'float32', u.device);
  return {
    outputs: { y, finalState },
    ctx: sealCtx(OP, { inputs: x, states, config, cuSeqlens, nseq, dtype: u.dtype, device: u.device }, ['states']),
  };
}

function* backward(
  ctx: SelectiveScanCtx,
  grads: { y?: Tensor | null; finalState?: Tensor | null },
): Steps<SelectiveScanGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { inputs: 'object', states: 'tensor', cuSeqlens: 'int32?' });
  checkCtxFields(
    OP,
    ctx.inputs,
    {
      u: 'tensor',
      delta: 'tensor',
      A: 'tensor',
      B: 'tensor',
      C: 'tensor',
      D: 'tensor?',
      z: 'tensor?',
      deltaBias: 'tensor?',
      initialState: 'tensor?',
    },
    'ctx.inputs',
  );
  // The saved tensors are checked again as the forward checked them, and must give the ctx's config.
  const { initialState, ...saved } = ctx.inputs;
  const p = prepare(op, saved, { deltaSoftplus: ctx.config?.deltaSoftplus, initialState, cuSeqlens: ctx.cuSeqlens });
  expectCtxValues(OP, 'ctx.config', ctx.config, { ...p.config });
  expectCtxValues(OP, 'ctx', ctx, { nseq: p.nseq, dtype: p.inputs.u.dtype, device: p.inputs.u.device });
  const { inputs: x, config: cfg, cuSeqlens } = p;
  expectDType(op, 'states (saved for backward)', ctx.states, ['float32']);
  expectDevice(op, 'states (saved for backward)', ctx.states, ctx.device, 'to match u');
  const g = readGrads(op, grads, ['y', 'finalState']);
  const gy = g.y ?? null;
  const gFinal = g.finalState ?? null;
  if (gy) {
    expectShape(op, 'grad of y', gy, x.u.shape, DIMS, 'to match y');
    expectDType(op, 'grad of y', gy, [ctx.dtype], 'to match y');
    expectDevice(op, 'grad of y', gy, ctx.device, 'to match y');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalState',
      gFinal,
      [ctx.nseq, cfg.dim, cfg.dstate],
      'nseq, dim, dstate',
      'to match finalState',
    );
    expectDType(op, 'grad of finalState', gFinal, ['float32']);
    expectDevice(op, 'grad of finalState', gFinal, ctx.device, 'to match finalState');
  }
  const r = yield* nativeCall((n) =>
    n.selectiveScanBackward({
      device: ctx.device,
      dtype: ctx.dtype,
      tensors: {
        u: x.u.storage,
        delta: x.delta.storage,
        A: x.A.storage,
        B: x.B.storage,
        C: x.C.storage,
        D: x.D?.storage ?? null,
        z: x.z?.storage ?? null,
        deltaBias: x.deltaBias?.storage ?? null,
        h0: x.initialState?.storage ?? null,
      },
      grads: { states: ctx.states.storage, dy: gy?.storage ?? null, dFinal: gFinal?.storage ?? null },
      config: { ...cfg, cuSeqlens, needDh0: x.initialState !== null },
    }),
  );
  const like = (s: Storage | null, t: Tensor | null) => (s && t ? new Tensor(s, t.shape, t.dtype, t.device) : null);
  return {
    u: like(r.du, x.u)!,
    delta: like(r.ddelta, x.delta)!,
    A: like(r.dA, x.A)!,
    B: like(r.dB, x.B)!,
    C: like(r.dC, x.C)!,
    D: like(r.dD, x.D),
    z: like(r.dz, x.z),
    deltaBias: like(r.dDeltaBias, x.deltaBias),
    initialState: like(r.dh0, x.initialState),
  };
}

export const selectiveScan = defineOp<
  SelectiveScanInputs,
  SelectiveScanOutputs,
  SelectiveScanOptions,
  SelectiveScanCtx,
  SelectiveScanGrads
>({
  name: OP,
  differentiableOptions: ['initialState'],
  forward,
  backward,
});
