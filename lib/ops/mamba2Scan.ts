/**
 * Mamba-2 (SSD): the chunked state-space scan of mamba_ssm's `mamba_chunk_scan_combined`, with its
 * argument names, shapes and semantics, forward and backward.
 *
 * Per sequence, head h (of H) and position t, with g = floor(h / (H / G)) the head's group, the
 * state S (P x N per head, float32) and d_t the effective time step:
 *
 *     d_t  = dt[t, h] + dtBias[h]                       (dtBias absent: 0)
 *     d_t  = softplus(d_t)                              (dtSoftplus; d_t itself when d_t > 20)
 *     d_t  = min(max(d_t, dtLimit[0]), dtLimit[1])      (dtLimit given, other than [0, Infinity])
 *     S_t  = exp(d_t A[h]) S_{t-1} + d_t x[t, h] B[t, g]^T      (S_{-1} = initialStates or 0)
 *     y[t, h] = (S_t C[t, g] + D[h] x[t, h]) * silu(z[t, h])   (D, z absent: left out)
 *
 * Inputs: `x` (batch, seqlen, nheads, headdim); `dt` (batch, seqlen, nheads); `B`, `C` (batch, seqlen,
 * ngroups, dstate), ngroups dividing nheads; `z` like x (optional); all of one dtype (float32,
 * float16, bfloat16). `A` (nheads), `D` (nheads) or (nheads, headdim) and `dtBias` (nheads) are
 * float32 (D and dtBias optional). headdim and dstate at most 256.
 * Options: `dtSoftplus` (default false); `dtLimit` [min, max] (default [0, Infinity]: no clamp; the
 * gradient passes where min < d < max); `chunkSize` (a positive integer, accepted for compatibility:
 * the kernels choose their own blocking and the results do not depend on it); `initialStates`
 * (N, nheads, headdim, dstate) float32; `returnFinalStates`; `cuSeqlens` (a packed batch of N
 * sequences, batch 1; each sequence starts from its own initial state and returns its own final
 * state; positions in no sequence get y = 0).
 * Outputs: `y` like x; `finalStates` (N, nheads, headdim, dstate) float32, or null. Gradients flow
 * through y and finalStates to x, dt, A, B, C, D, z, dtBias and initialStates.
 *
 * The scan is gated linear attention (lib/ops/linearAttention.ts, rule 'gated'): q = C, k = B (the
 * groups as query and key heads), v = d x, a decay of d A per head, scale 1, and the state S^T. So it
 * runs on those kernels, which send it to the gated delta rule's without the delta term (CPU: blocked;
 * CUDA: chunked tensor-core kernels for fp16 / bf16, per token for fp32), with elementwise kernels
 * around it for the
 * time step, the skip term D x and the gate, and the transposes between the two state layouts.
 * v = d x is rounded to the inputs' dtype.
 */
import { defineOp, withInference } from '../autograd';
import type { Mamba2GateConfig, Storage } from '../native';
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
  parseCuSeqlens,
  readGrads,
  readInputs,
  readOptions,
  releaseCtx,
  requireTensor,
  sealCtx,
} from '../validate';
import { MAX_HEAD_DIM, linearAttentionSteps, type LinearAttentionCtx } from './linearAttention';

export interface Mamba2ScanInputs {
  x: Tensor;
  dt: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D?: Tensor | null;
  z?: Tensor | null;
  dtBias?: Tensor | null;
}
export interface Mamba2ScanOptions {
  dtSoftplus?: boolean;
  dtLimit?: readonly [number, number] | null;
  chunkSize?: number;
  initialStates?: Tensor | null;
  returnFinalStates?: boolean;
  cuSeqlens?: Int32Array | readonly number[] | null;
}
export interface Mamba2ScanOutputs {
  y: Tensor;
  finalStates: Tensor | null;
}
/** Every tensor of the op, the optional ones null when absent: its gradients, and what its ctx keeps. */
export interface Mamba2ScanGrads {
  x: Tensor;
  dt: Tensor;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  D: Tensor | null;
  z: Tensor | null;
  dtBias: Tensor | null;
  initialStates: Tensor | null;
}
type Saved = Mamba2ScanGrads;

export interface Mamba2ScanCtx {
  inputs: Saved;
  /** The scan's ctx (linear attention's), and what it reads: v = d x, g = d A, the initial states transposed. */
  scan: LinearAttentionCtx;
  v: Tensor;
  g: Tensor;
  h0: Tensor | null;
  /** The scan's output (the gate's backward needs it; null without z). */
  o: Tensor | null;
  options: { dtSoftplus: boolean; dtLimit: readonly [number, number] | null };
  cuSeqlens: Int32Array | null;
  nseq: number;
  dtype: DType;
  device: Device;
}

const OP = 'mamba2Scan';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];

/**
 * The dtLimit option: null for no clamp (absent, or mamba_ssm's default [0, Infinity]), else
 * [min, max] with min < max (either may be infinite).
 */
export function dtLimitOption(op: string, v: unknown): readonly [number, number] | null {
  if (v === undefined || v === null) return null;
  if (!Array.isArray(v) || v.length !== 2 || !v.every((x) => typeof x === 'number' && !Number.isNaN(x)) || v[0] >= v[1])
    throw new ArgumentError(`${op}: dtLimit must be [min, max] with min < max, got ${JSON.stringify(v)}`);
  return v[0] === 0 && v[1] === Infinity ? null : [v[0], v[1]];
}

/** The gate kernels' config. */
export function gateConfig(
  rows: number,
  H: number,
  P: number,
  dtSoftplus: boolean,
  dtLimit: readonly [number, number] | null,
  D: Tensor | null,
): Mamba2GateConfig {
  return {
    rows,
    H,
    P,
    dtSoftplus,
    clamp: dtLimit !== null,
    dtMin: dtLimit ? dtLimit[0] : 0,
    dtMax: dtLimit ? dtLimit[1] : 0,
    dPerChannel: D !== null && D.shape.length === 2,
  };
}

/**
 * Checks the inputs of a Mamba-2 scan or decode step and the time-step options; returns the sizes.
 * With oneToken the inputs have no time dimension (a decode step's single token); `tokensName` names
 * the time dimension in messages.
 */
export function checkMamba2(
  op: string,
  inputs: Mamba2ScanInputs,
  opts: { dtSoftplus?: unknown; dtLimit?: unknown },
  oneToken: boolean,
  tokensName: string,
) {
  const { x, dt, A, B, C } = inputs;
  const D = inputs.D ?? null,
    z = inputs.z ?? null,
    dtBias = inputs.dtBias ?? null;
  requireTensor(op, 'x', x);
  const rank = oneToken ? 3 : 4;
  const lead = oneToken ? 'batch' : `batch, ${tokensName}`;
  const xDims = `${lead}, nheads, headdim`;
  expectRank(op, 'x', x, rank, xDims);
  if (x.size === 0)
    throw new ShapeError(`${op}: x has shape [${x.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(op, 'x', x, FLOAT_DTYPES);
  const rows = x.shape.slice(0, rank - 2);
  const [H, P] = x.shape.slice(rank - 2);
  if (P > MAX_HEAD_DIM) throw new ShapeError(`${op}: x has headdim ${P}, expected at most ${MAX_HEAD_DIM}`);
  const same = (name: string, t: Tensor | null | undefined, shape: number[], dims: string) => {
    requireTensor(op, name, t);
    expectShape(op, name, t, shape, dims, 'to match x');
    expectDType(op, name, t, [x.dtype], 'to match x');
    expectDevice(op, name, t, x.device, 'to match x');
  };
  const float = (name: string, t: Tensor, shape: number[], dims: string) => {
    requireTensor(op, name, t);
    expectShape(op, name, t, shape, dims, 'to match x');
    expectDType(op, name, t, ['float32']);
    expectDevice(op, name, t, x.device, 'to match x');
  };
  same('dt', dt, [...rows, H], `${lead}, nheads`);
  float('A', A, [H], 'nheads');
  requireTensor(op, 'B', B);
  expectRank(op, 'B', B, rank, `${lead}, ngroups, dstate`);
  const [G, N] = B.shape.slice(rank - 2);
  same('B', B, [...rows, G, N], `${lead}, ngroups, dstate`);
  if (G < 1 || H % G !== 0) throw new ShapeError(`${op}: B has ${G} groups, expected a divisor of x's ${H} heads`);
  if (N < 1 || N > MAX_HEAD_DIM) throw new ShapeError(`${op}: B has dstate ${N}, expected 1 to ${MAX_HEAD_DIM}`);
  same('C', C, [...rows, G, N], `${lead}, ngroups, dstate (as B)`);
  if (D !== null) {
    requireTensor(op, 'D', D);
    if (D.shape.length === 2) float('D', D, [H, P], 'nheads (or nheads, headdim)');
    else float('D', D, [H], 'nheads (or nheads, headdim)');
  }
  if (z !== null) same('z', z, x.shape as number[], xDims);
  if (dtBias !== null) float('dtBias', dtBias, [H], 'nheads');
  const dtSoftplus = booleanOption(op, 'dtSoftplus', opts.dtSoftplus, false);
  const dtLimit = dtLimitOption(op, opts.dtLimit);
  const rowCount = rows.reduce((a, b) => a * b, 1);
  return {
    H,
    P,
    G,
    N,
    rows: rowCount,
    dtSoftplus,
    dtLimit,
    saved: { x, dt, A, B, C, D, z, dtBias },
    gate: gateConfig(rowCount, H, P, dtSoftplus, dtLimit, D),
  };
}

function prepare(op: string, inputs: Mamba2ScanInputs, options: Mamba2ScanOptions | undefined) {
  inputs = readInputs(op, inputs, ['x', 'dt', 'A', 'B', 'C', 'D', 'z', 'dtBias']);
  const opts = readOptions(op, options, [
    'dtSoftplus',
    'dtLimit',
    'chunkSize',
    'initialStates',
    'returnFinalStates',
    'cuSeqlens',
  ]);
  const c = checkMamba2(op, inputs, opts, false, 'seqlen');
  const [batch, T] = c.saved.x.shape;
  if (
    opts.chunkSize !== undefined &&
    (typeof opts.chunkSize !== 'number' || !Number.isInteger(opts.chunkSize) || opts.chunkSize < 1)
  )
    throw new ArgumentError(`${op}: chunkSize must be a positive integer, got ${String(opts.chunkSize)}`);
  const returnFinal = booleanOption(op, 'returnFinalStates', opts.returnFinalStates, false);
  const cuSeqlens = parseCuSeqlens(op, opts.cuSeqlens, batch, T, 'seqlen');
  const nseq = cuSeqlens ? cuSeqlens.length - 1 : batch;
  const h0 = opts.initialStates ?? null;
  if (h0) {
    requireTensor(op, 'initialStates', h0);
    const n = cuSeqlens ? 'N sequences' : 'batch';
    expectShape(op, 'initialStates', h0, [nseq, c.H, c.P, c.N], `${n}, nheads, headdim, dstate`, 'to match x and B');
    expectDType(op, 'initialStates', h0, ['float32'], '(states are float32)');
    expectDevice(op, 'initialStates', h0, c.saved.x.device, 'to match x');
  }
  // The kernels around the scan: positions after a packed batch's last sequence are in none.
  const gate = { ...c.gate, validRows: cuSeqlens ? cuSeqlens[cuSeqlens.length - 1] : c.rows };
  return { c, batch, T, returnFinal, cuSeqlens, nseq, h0, gate };
}

/** The states (count, rows, cols) as (count, cols, rows): between the reference's layout and the scan's. */
function* transposeStates(s: Tensor, count: number, rows: number, cols: number): Steps<Tensor> {
  const r = yield* nativeCall((n) =>
    n.mamba2TransposeStates({
      device: s.device,
      dtype: 'float32',
      tensors: { src: s.storage },
      config: { count, rows, cols },
    }),
  );
  return new Tensor(r.dst, s.shape.slice(0, -2).concat([cols, rows]), 'float32', s.device);
}

function* run(
  inputs: Mamba2ScanInputs,
  options: Mamba2ScanOptions,
  keep: boolean,
): Steps<{ outputs: Mamba2ScanOutputs; ctx: Mamba2ScanCtx | null }> {
  const { c, batch, T, returnFinal, cuSeqlens, nseq, h0, gate: gateCfg } = prepare(OP, inputs, options);
  const { x, dt, A, B, C, D, z, dtBias } = c.saved;
  const dev = x.device;
  const { H, P, N } = c;
  const temps: Tensor[] = [];
  let scanCtx: LinearAttentionCtx | null = null;
  try {
    const gate = yield* nativeCall((n) =>
      n.mamba2Prepare({
        device: dev,
        dtype: x.dtype,
        tensors: { x: x.storage, dt: dt.storage, A: A.storage, dtBias: dtBias?.storage ?? null },
        config: gateCfg,
      }),
    );
    const g = new Tensor(gate.g, [batch, T, H], 'float32', dev);
    const v = new Tensor(gate.v, x.shape, x.dtype, dev);
    temps.push(g, v);
    const h0T = h0 ? yield* transposeStates(h0, nseq * H, P, N) : null;
    if (h0T) temps.push(h0T);
    const scan = yield* linearAttentionSteps.run(
      { q: C, k: B, v, decay: g },
      { updateRule: 'gated', scale: 1, initialState: h0T, outputFinalState: returnFinal, cuSeqlens },
      keep,
    );
    scanCtx = scan.ctx;
    const o = scan.outputs.o;
    temps.push(o);
    const finT = scan.outputs.finalState;
    if (finT) temps.push(finT);
    const finalStates = finT ? yield* transposeStates(finT, nseq * H, N, P) : null;
    let y = o;
    if (D || z) {
      const r = yield* nativeCall((n) =>
        n.mamba2Finish({
          device: dev,
          dtype: x.dtype,
          tensors: { x: x.storage, o: o.storage, D: D?.storage ?? null, z: z?.storage ?? null },
          config: gateCfg,
        }),
      );
      y = new Tensor(r.y, x.shape, x.dtype, dev);
    }
    const outputs: Mamba2ScanOutputs = { y, finalStates };
    // What the ctx keeps (the scan's ctx, v, g, the transposed initial states, and o when the gate's
    // backward needs it) leaves the temporaries; so does o when it is y.
    const savedO = keep && z ? o : null;
    const kept = keep ? [v, g, h0T, savedO] : [];
    for (const t of [...kept, y]) if (t && temps.includes(t)) temps.splice(temps.indexOf(t), 1);
    for (const t of temps) t.dispose();
    temps.length = 0;
    if (!keep) return { outputs, ctx: null };
    if (!scanCtx) throw new Error(`${OP}: the scan returned no ctx`);
    const owned: ('scan' | 'v' | 'g' | 'h0' | 'o')[] = ['scan', 'v', 'g'];
    if (h0T) owned.push('h0');
    if (savedO) owned.push('o');
    return {
      outputs,
      ctx: sealCtx(
        OP,
        {
          inputs: { ...c.saved, initialStates: h0 },
          scan: scanCtx,
          v,
          g,
          h0: h0T,
          o: savedO,
          options: { dtSoftplus: c.dtSoftplus, dtLimit: c.dtLimit },
          cuSeqlens,
          nseq,
          dtype: x.dtype,
          device: dev,
        } satisfies Mamba2ScanCtx,
        owned,
      ),
    };
  } catch (e) {
    for (const t of temps) t.dispose();
    if (scanCtx) releaseCtx(scanCtx, false);
    throw e;
  }
}

function* forward(
  inputs: Mamba2ScanInputs,
  options: Mamba2ScanOptions = {},
): Steps<{ outputs: Mamba2ScanOutputs; ctx: Mamba2ScanCtx }> {
  return (yield* run(inputs, options, true)) as { outputs: Mamba2ScanOutputs; ctx: Mamba2ScanCtx };
}

function* backward(
  ctx: Mamba2ScanCtx,
  grads: { y?: Tensor | null; finalStates?: Tensor | null },
): Steps<Mamba2ScanGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, {
    inputs: 'object',
    scan: 'object',
    v: 'tensor',
    g: 'tensor',
    h0: 'tensor?',
    o: 'tensor?',
    cuSeqlens: 'int32?',
  });
  checkCtxFields(
    OP,
    ctx.inputs,
    {
      x: 'tensor',
      dt: 'tensor',
      A: 'tensor',
      B: 'tensor',
      C: 'tensor',
      D: 'tensor?',
      z: 'tensor?',
      dtBias: 'tensor?',
      initialStates: 'tensor?',
    },
    'ctx.inputs',
  );
  const { x, dt, A, B, C, D, z, dtBias, initialStates } = ctx.inputs;
  const p = prepare(op, { x, dt, A, B, C, D, z, dtBias }, { ...ctx.options, initialStates, cuSeqlens: ctx.cuSeqlens });
  expectCtxValues(OP, 'ctx', ctx, { nseq: p.nseq, dtype: x.dtype, device: x.device });
  if ((z !== null) !== (ctx.o !== null) || (initialStates !== null) !== (ctx.h0 !== null))
    throw new ArgumentError(`${op}: ctx does not hold what its forward saved`);
  const { c, nseq } = p;
  const { H, P, N } = c;
  const g = readGrads(op, grads, ['y', 'finalStates']);
  const dev = ctx.device;
  const gy = g.y ?? null,
    gFinal = g.finalStates ?? null;
  if (gy) {
    expectShape(op, 'grad of y', gy, x.shape, 'batch, seqlen, nheads, headdim', 'to match y');
    expectDType(op, 'grad of y', gy, [ctx.dtype], 'to match y');
    expectDevice(op, 'grad of y', gy, dev, 'to match y');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalStates',
      gFinal,
      [nseq, H, P, N],
      'N, nheads, headdim, dstate',
      'to match finalStates',
    );
    expectDType(op, 'grad of finalStates', gFinal, ['float32']);
    expectDevice(op, 'grad of finalStates', gFinal, dev, 'to match finalStates');
  }
  const temps: Tensor[] = [];
  try {
    // The gradient of y before the gate (and of the scan's output), and that of z.
    let dy = gy;
    if (!dy && (z || D)) temps.push((dy = Tensor.zeros(x.shape, { dtype: ctx.dtype, device: dev })));
    let dO = dy;
    let dz: Tensor | null = null;
    if (z && dy) {
      const dyv = dy;
      const r = yield* nativeCall((n) =>
        n.mamba2FinishBackward({
          device: dev,
          dtype: ctx.dtype,
          tensors: { x: x.storage, o: (ctx.o as Tensor).storage, D: D?.storage ?? null, z: z.storage },
          grads: { dy: dyv.storage },
          config: p.gate,
        }),
      );
      dO = new Tensor(r.dO, x.shape, ctx.dtype, dev);
      dz = new Tensor(r.dz, x.shape, ctx.dtype, dev);
      temps.push(dO);
    }
    const gFinalT = gFinal ? yield* transposeStates(gFinal, nseq * H, P, N) : null;
    if (gFinalT) temps.push(gFinalT);
    const s = yield* linearAttentionSteps.backward(ctx.scan, { o: dO, finalState: gFinalT });
    temps.push(s.v);
    if (s.decay) temps.push(s.decay);
    if (s.initialState) temps.push(s.initialState);
    if (!s.decay) throw new Error(`${OP}: the scan returned no gradient of its decay`);
    const dOv = dO,
      dv = s.v,
      dgv = s.decay;
    const r = yield* nativeCall((n) =>
      n.mamba2PrepareBackward({
        device: dev,
        dtype: ctx.dtype,
        tensors: {
          x: x.storage,
          dt: dt.storage,
          A: A.storage,
          dtBias: dtBias?.storage ?? null,
          D: D?.storage ?? null,
        },
        grads: { dO: D ? (dOv as Tensor).storage : null, dv: dv.storage, dg: dgv.storage },
        config: p.gate,
      }),
    );
    const dInit = s.initialState && initialStates ? yield* transposeStates(s.initialState, nseq * H, N, P) : null;
    const like = (st: Storage | null, t: Tensor | null) =>
      st && t ? new Tensor(st, t.shape, t.dtype, t.device) : null;
    return {
      x: like(r.dx, x) as Tensor,
      dt: like(r.ddt, dt) as Tensor,
      A: like(r.dA, A) as Tensor,
      B: s.k,
      C: s.q,
      D: like(r.dD, D),
      z: dz ?? (z ? Tensor.zeros(z.shape, { dtype: z.dtype, device: dev }) : null),
      dtBias: like(r.dDtBias, dtBias),
      initialStates: dInit,
    };
  } finally {
    for (const t of temps) t.dispose();
  }
}

const op = defineOp<Mamba2ScanInputs, Mamba2ScanOutputs, Mamba2ScanOptions, Mamba2ScanCtx, Mamba2ScanGrads>({
  name: OP,
  differentiableOptions: ['initialStates'],
  forward,
  backward,
});

export const mamba2Scan = withInference(op, run);
