/**
 * Newton-iteration parallel nonlinear RNN (DEER / ParaRNN): h_t = f(h_{t-1}, x_t) for every t at once.
 * From a guess of the whole trajectory, each Newton step linearises f around it (h_t = J_t h_{t-1} + c_t)
 * and solves that linear recurrence over time; iterations repeat until every element passes the
 * check, and a row that does not converge is recomputed exactly by sequential evaluation (or raises).
 *
 * Cells (N = heads * headDim channels, index head * headDim + j; pre_g = wx_g + b_g + rec_g, and the
 * GRU's n gate is wx_n + r (rec_n + b_n)):
 *   'gru-diag'        gates (r, z, n), states (h):    rec_g = R[g] * h_{t-1} (per channel)
 *                     h_t = (1 - z) n + z h_{t-1}, r = sig(pre_r), z = sig(pre_z), n = tanh(pre_n)
 *   'lstm-cifg-diag'  gates (f, z, o), states (h, c): rec_g = R[g] * h_{t-1} (per channel)
 *                     c_t = f c_{t-1} + (1 - f) tanh(pre_z), h_t = sig(pre_o) tanh(c_t), f = sig(pre_f)
 *   'gru', 'lstm' (gates i, f, z, o; states h, c), 'elman' (gate a; h_t = tanh(pre_a)): dense per head,
 *                     rec_g = h_{t-1} @ R[g][head] (R[g][head][i][j] links h_{t-1}[i] to gate output j)
 *
 * Inputs: `wx` (batch, T, gates, hidden) or (batch, T, gates, heads, headDim), float32/float16/bfloat16;
 * `R` (gates, hidden) for the diagonal cells (hidden as in wx), (gates, heads, headDim, headDim) for
 * the dense ones, float32; `b` (gates, hidden) float32; `h0` (states, batch, hidden) float32, optional.
 * Options: `cell`; `heads` (default: from a 5-d wx or a dense R, else 1); `jacobian` 'full' (DEER:
 * the exact per-head Jacobian of the dense cells) or 'diagonal' (quasi-DEER: only the entries that
 * link the states of one channel; the diagonal cells are always exact); `maxIters` (default 50);
 * `tol` { abs, rel } (defaults 1e-5, 1e-5): converged when every |f(traj_{t-1}) - traj_t| <= abs +
 * rel |traj_t|; `initialGuess` 'zeros' | 'one-step' (traj_t = f(h0, x_t)) | a trajectory tensor;
 * `damping` lambda >= 0 (Levenberg-Marquardt / ELK steps; per-channel Jacobians only, so with a
 * dense cell it needs jacobian 'diagonal'); `onNonConvergence` 'fallback' | 'error'; `mode` 'auto'
 * (sequential on CPU, Newton on CUDA) | 'newton' | 'sequential'.
 * Outputs: `y` (batch, T, hidden) in wx's dtype; `finalStates` (states, batch, hidden) and
 * `trajectory` (batch, T, states, hidden) float32 (hidden as in wx); `stats` per batch row.
 * Backward (implicit function theorem at the solution): gradients for wx, R, b and h0 from grads of
 * y and/or finalStates.
 */
import { defineOp } from '../autograd';
import { native, type NewtonRnnConfig, type Storage } from '../native';
import { nativeCall, type Steps } from '../async';
import { Tensor, type DType, type Device } from '../tensor';
import { ArgumentError, NotConvergedError, ShapeError } from '../errors';
import {
  checkCtx,
  checkCtxFields,
  ctxBoolean,
  ctxInteger,
  expectCtxValues,
  expectDType,
  expectDevice,
  expectShape,
  finiteNumber,
  readGrads,
  readInputs,
  readOptions,
  requireTensor,
  sealCtx,
} from '../validate';

export type NewtonRnnCell = 'gru-diag' | 'lstm-cifg-diag' | 'gru' | 'lstm' | 'elman';

export interface NewtonRnnInputs {
  wx: Tensor;
  R: Tensor;
  b: Tensor;
  h0?: Tensor | null;
}
export interface NewtonRnnOptions {
  cell: NewtonRnnCell;
  heads?: number;
  jacobian?: 'full' | 'diagonal';
  maxIters?: number;
  tol?: { abs?: number; rel?: number };
  initialGuess?: 'zeros' | 'one-step' | Tensor | null;
  damping?: number;
  onNonConvergence?: 'fallback' | 'error';
  mode?: 'auto' | 'newton' | 'sequential';
}
export interface NewtonRnnStats {
  /** Newton steps taken per batch row (0 when the guess already passed the check, or sequential). */
  iterations: Int32Array;
  /** max |f(traj_{t-1}, x_t) - traj_t| of each row's last Newton iterate (0 when sequential). */
  residual: Float32Array;
  converged: boolean[];
  /** The row did not converge within maxIters and was recomputed by sequential evaluation. */
  fellBack: boolean[];
}
export interface NewtonRnnOutputs {
  y: Tensor;
  finalStates: Tensor;
  trajectory: Tensor;
  stats: NewtonRnnStats;
}
export interface NewtonRnnGrads {
  wx: Tensor;
  R: Tensor;
  b: Tensor;
  h0: Tensor | null;
}
export interface NewtonRnnCtx {
  inputs: { wx: Tensor; R: Tensor; b: Tensor; h0: Tensor | null };
  trajectory: Tensor;
  config: NewtonRnnConfig;
  hidden: number[];
  states: number;
  dtype: DType;
  device: Device;
}

/** Largest states x headDim of the CUDA full-Jacobian (DEER) solve (cuda/newton/newton_rnn.cu). */
const CUDA_MAX_FULL_JACOBIAN = 128;
const OP = 'newtonRnn';
const FLOAT_DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
interface CellInfo {
  code: number;
  gates: number;
  states: number;
  diagonal: boolean;
}
let cellTable: Readonly<Record<NewtonRnnCell, CellInfo>> | undefined;
/** The cells by name (defined once, in cuda/newton/newton_rnn.h). */
function cells(): Readonly<Record<NewtonRnnCell, CellInfo>> {
  cellTable ??= Object.freeze(
    Object.fromEntries(
      native()
        .newtonRnnCells()
        .map(({ name, ...c }) => [name, Object.freeze(c)]),
    ),
  ) as Readonly<Record<NewtonRnnCell, CellInfo>>;
  return cellTable;
}
export const NEWTON_DEFAULTS = { maxIters: 50, tolAbs: 1e-5, tolRel: 1e-5 } as const;

function oneOf<T extends string>(OP: string, name: string, v: unknown, allowed: readonly T[], fallback: T): T {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || !allowed.includes(v as T))
    throw new ArgumentError(
      `${OP}: option ${name} must be ${allowed.map((a) => `'${a}'`).join(' or ')}, got ${String(v)}`,
    );
  return v as T;
}

function nonNegative(OP: string, name: string, v: unknown, fallback: number): number {
  if (v === undefined) return fallback;
  const x = finiteNumber(OP, name, v);
  if (x < 0) throw new ArgumentError(`${OP}: ${name} must be non-negative, got ${x}`);
  return x;
}

/**
 * Checks the arguments and derives the kernels' config. `OP` names the caller in messages: the
 * forward, or the backward re-checking the tensors saved in its ctx.
 */
function prepare(OP: string, inputs: NewtonRnnInputs, options: NewtonRnnOptions) {
  inputs = readInputs(OP, inputs, ['wx', 'R', 'b', 'h0']);
  if (options === undefined || options === null) throw new ArgumentError(`${OP}: options with a cell are required`);
  const opts = readOptions(OP, options, [
    'cell',
    'heads',
    'jacobian',
    'maxIters',
    'tol',
    'initialGuess',
    'damping',
    'onNonConvergence',
    'mode',
  ]);
  const cellName = opts.cell;
  if (typeof cellName !== 'string' || !Object.hasOwn(cells(), cellName))
    throw new ArgumentError(
      `${OP}: option cell must be one of ${Object.keys(cells())
        .map((c) => `'${c}'`)
        .join(', ')}, ` + `got ${String(cellName)}`,
    );
  const cell = cells()[cellName];
  const { wx, R, b } = inputs;
  const h0 = inputs.h0 ?? null;
  requireTensor(OP, 'wx', wx);
  if (wx.shape.length !== 4 && wx.shape.length !== 5)
    throw new ShapeError(
      `${OP}: wx has shape [${wx.shape.join(',')}], expected 4 dimensions (batch, T, gates, hidden) ` +
        'or 5 (batch, T, gates, heads, headDim)',
    );
  if (wx.size === 0)
    throw new ShapeError(`${OP}: wx has shape [${wx.shape.join(',')}]; every dimension must be at least 1`);
  expectDType(OP, 'wx', wx, FLOAT_DTYPES);
  const [batch, T, G] = wx.shape;
  if (G !== cell.gates)
    throw new ShapeError(
      `${OP}: wx has ${G} gates (dimension 2 of [${wx.shape.join(',')}]), expected ${cell.gates} for ` +
        `cell '${cellName}'`,
    );
  const fiveD = wx.shape.length === 5;
  requireTensor(OP, 'R', R);
  expectDType(OP, 'R', R, ['float32'], '(weights are float32)');
  expectDevice(OP, 'R', R, wx.device, 'to match wx');
  let heads: number;
  if (opts.heads !== undefined) {
    if (!Number.isInteger(opts.heads) || opts.heads < 1)
      throw new ArgumentError(`${OP}: option heads must be a positive integer, got ${String(opts.heads)}`);
    heads = opts.heads;
  } else {
    heads = fiveD ? wx.shape[3] : !cell.diagonal && R.shape.length === 4 ? R.shape[1] : 1;
  }
  const N = fiveD ? wx.shape[3] * wx.shape[4] : wx.shape[3];
  if (fiveD && heads !== wx.shape[3])
    throw new ShapeError(`${OP}: option heads is ${heads} but wx has ${wx.shape[3]} heads (dimension 3)`);
  if (N % heads !== 0) throw new ShapeError(`${OP}: hidden size ${N} of wx is not a multiple of heads ${heads}`);
  const D = N / heads;
  const hidden = fiveD ? [heads, D] : [N];
  const hiddenDims = fiveD ? 'heads, headDim' : 'hidden';
  if (cell.diagonal)
    expectShape(OP, 'R', R, [G, ...hidden], `gates, ${hiddenDims}`, `for the diagonal cell '${cellName}'`);
  else expectShape(OP, 'R', R, [G, heads, D, D], 'gates, heads, headDim, headDim', `for the dense cell '${cellName}'`);
  requireTensor(OP, 'b', b);
  expectShape(OP, 'b', b, [G, ...hidden], `gates, ${hiddenDims}`, 'to match wx');
  expectDType(OP, 'b', b, ['float32'], '(biases are float32)');
  expectDevice(OP, 'b', b, wx.device, 'to match wx');
  const S = cell.states;
  if (h0) {
    requireTensor(OP, 'h0', h0);
    expectShape(OP, 'h0', h0, [S, batch, ...hidden], `states, batch, ${hiddenDims}`, 'to match wx');
    expectDType(OP, 'h0', h0, ['float32'], '(states are float32)');
    expectDevice(OP, 'h0', h0, wx.device, 'to match wx');
  }
  const jacobian = oneOf(OP, 'jacobian', opts.jacobian, ['full', 'diagonal'] as const, 'full');
  let maxIters: number = NEWTON_DEFAULTS.maxIters;
  if (opts.maxIters !== undefined) {
    if (!Number.isInteger(opts.maxIters) || opts.maxIters < 0 || opts.maxIters > 1e6)
      throw new ArgumentError(
        `${OP}: option maxIters must be an integer in [0, 1000000], got ${String(opts.maxIters)}`,
      );
    maxIters = opts.maxIters;
  }
  if (opts.tol !== undefined && (opts.tol === null || typeof opts.tol !== 'object'))
    throw new ArgumentError(`${OP}: option tol must be an object { abs, rel }`);
  const tol = readOptions(`${OP}: tol`, opts.tol, ['abs', 'rel'], 'option tol');
  // Tolerances beyond float32's range accept everything; the kernels compare in float32.
  const tolAbs = Math.min(nonNegative(OP, 'tol.abs', tol.abs, NEWTON_DEFAULTS.tolAbs), 3e38);
  const tolRel = Math.min(nonNegative(OP, 'tol.rel', tol.rel, NEWTON_DEFAULTS.tolRel), 3e38);
  const damping = nonNegative(OP, 'damping', opts.damping, 0);
  const fullJacobian = jacobian === 'full';
  if (damping > 0 && fullJacobian && !cell.diagonal)
    throw new ArgumentError(
      `${OP}: damping ${damping} needs per-channel Jacobians; with the dense cell '${cellName}' ` +
        "use jacobian 'diagonal' (damping is not supported with the full Jacobian)",
    );
  const onNon = oneOf(OP, 'onNonConvergence', opts.onNonConvergence, ['fallback', 'error'] as const, 'fallback');
  const mode = oneOf(OP, 'mode', opts.mode, ['auto', 'newton', 'sequential'] as const, 'auto');
  // The CUDA full-Jacobian solve keeps a head's (states x headDim)^2 matrices in shared memory.
  const fullTooLarge = wx.device === 'cuda' && fullJacobian && !cell.diagonal && S * D > CUDA_MAX_FULL_JACOBIAN;
  if (mode === 'newton' && fullTooLarge)
    throw new ArgumentError(
      `${OP}: on CUDA the full Jacobian needs states x headDim <= ${CUDA_MAX_FULL_JACOBIAN}, got ` +
        `${S} x ${D} for '${cellName}'; use jacobian 'diagonal' or mode 'sequential'`,
    );
  // 'auto': on a CPU the sequential loop is always faster (measured, bench/RESULTS.md); on CUDA Newton,
  // except where the full-Jacobian solve does not apply (a provisional rule, not yet measured on a GPU).
  const sequential = mode === 'sequential' || (mode === 'auto' && (wx.device === 'cpu' || fullTooLarge));
  let guess = 0;
  let guessTensor: Tensor | null = null;
  // initialGuess: a trajectory tensor, a named guess, or absent (undefined or null: zeros).
  const ig = opts.initialGuess ?? undefined;
  if (Tensor.isTensor(ig) || Array.isArray(ig) || ArrayBuffer.isView(ig)) {
    requireTensor(OP, 'initialGuess', ig);
    expectShape(OP, 'initialGuess', ig, [batch, T, S, ...hidden], `batch, T, states, ${hiddenDims}`, 'to match wx');
    expectDType(OP, 'initialGuess', ig, ['float32'], '(trajectories are float32)');
    expectDevice(OP, 'initialGuess', ig, wx.device, 'to match wx');
    guess = 2;
    guessTensor = ig;
  } else if (ig !== undefined) {
    guess = oneOf(OP, 'initialGuess', ig, ['zeros', 'one-step'] as const, 'zeros') === 'one-step' ? 1 : 0;
  }
  const config: NewtonRnnConfig = {
    cell: cell.code,
    batch,
    T,
    heads,
    headDim: D,
    fullJacobian,
    sequential,
    fallbackSequential: onNon === 'fallback',
    maxIters,
    tolAbs,
    tolRel,
    damping,
    guess,
  };
  return { inputs: { wx, R, b, h0 }, config, guessTensor, hidden, states: S, onNon };
}

function* forward(
  inputs: NewtonRnnInputs,
  options: NewtonRnnOptions,
): Steps<{ outputs: NewtonRnnOutputs; ctx: NewtonRnnCtx }> {
  const { inputs: x, config, guessTensor, hidden, states: S, onNon } = prepare(OP, inputs, options);
  const { wx, R, b, h0 } = x;
  const { batch, T, maxIters, tolAbs, tolRel } = config;
  const r = yield* nativeCall((n) =>
    n.newtonRnnForward({
      device: wx.device,
      dtype: wx.dtype,
      tensors: {
        wx: wx.storage,
        R: R.storage,
        b: b.storage,
        h0: h0?.storage ?? null,
        guess: guessTensor?.storage ?? null,
      },
      config,
    }),
  );
  const converged = Array.from(r.converged, (v) => v !== 0);
  const trajectory = new Tensor(r.traj, [batch, T, S, ...hidden], 'float32', wx.device);
  const y = new Tensor(r.y, [batch, T, ...hidden], wx.dtype, wx.device);
  const finalStates = new Tensor(r.finalStates, [S, batch, ...hidden], 'float32', wx.device);
  if (onNon === 'error' && converged.some((c) => !c)) {
    const bad = converged.flatMap((c, i) => (c ? [] : [i]));
    trajectory.dispose();
    y.dispose();
    finalStates.dispose();
    throw new NotConvergedError(
      `${OP}: batch rows [${bad.join(',')}] did not converge within maxIters ${maxIters} ` +
        `(residual ${bad.map((i) => r.residual[i]).join(', ')}; tolerance abs ${tolAbs} + rel ${tolRel} |h|); ` +
        "use onNonConvergence 'fallback', more iterations, damping or a looser tolerance",
    );
  }
  return {
    outputs: {
      y,
      finalStates,
      trajectory,
      stats: {
        iterations: r.iterations,
        residual: r.residual,
        converged,
        fellBack: Array.from(r.fellBack, (v) => v !== 0),
      },
    },
    // The trajectory is also an output (the caller's), so the ctx owns no tensor.
    ctx: sealCtx(OP, { inputs: x, trajectory, config, hidden, states: S, dtype: wx.dtype, device: wx.device }),
  };
}

function* backward(
  ctx: NewtonRnnCtx,
  grads: { y?: Tensor | null; finalStates?: Tensor | null; trajectory?: Tensor | null },
): Steps<NewtonRnnGrads> {
  const op = `${OP}.backward`;
  checkCtx(OP, ctx, { inputs: 'object', config: 'object', trajectory: 'tensor' });
  checkCtxFields(OP, ctx.inputs, { wx: 'tensor', R: 'tensor', b: 'tensor', h0: 'tensor?' }, 'ctx.inputs');
  // The saved tensors are checked again as the forward checked them (with the options the config
  // records), and must give the ctx's config.
  const c = ctx.config;
  const cellName = (Object.keys(cells()) as NewtonRnnCell[]).find((k) => cells()[k].code === c.cell);
  if (cellName === undefined) throw new ArgumentError(`${op}: ctx.config.cell is ${String(c.cell)}, not a cell's code`);
  const guess = ctxInteger(OP, 'ctx.config.guess', c.guess, 0, 2);
  const p = prepare(op, ctx.inputs, {
    cell: cellName,
    heads: c.heads,
    maxIters: c.maxIters,
    tol: { abs: c.tolAbs, rel: c.tolRel },
    damping: c.damping,
    jacobian: ctxBoolean(OP, 'ctx.config.fullJacobian', c.fullJacobian) ? 'full' : 'diagonal',
    onNonConvergence: ctxBoolean(OP, 'ctx.config.fallbackSequential', c.fallbackSequential) ? 'fallback' : 'error',
    mode: ctxBoolean(OP, 'ctx.config.sequential', c.sequential) ? 'sequential' : 'newton',
  });
  expectCtxValues(OP, 'ctx.config', c, { ...p.config, guess });
  const { inputs: x, config: cfg, hidden } = p;
  expectCtxValues(OP, 'ctx', ctx, { hidden, states: p.states, dtype: x.wx.dtype, device: x.wx.device });
  expectShape(
    op,
    'trajectory (saved for backward)',
    ctx.trajectory,
    [cfg.batch, cfg.T, p.states, ...hidden],
    `batch, T, states, ${hidden.length === 2 ? 'heads, headDim' : 'hidden'}`,
    'to match wx',
  );
  expectDType(op, 'trajectory (saved for backward)', ctx.trajectory, ['float32']);
  expectDevice(op, 'trajectory (saved for backward)', ctx.trajectory, ctx.device, 'to match wx');
  const g = readGrads(op, grads, ['y', 'finalStates', 'trajectory']);
  if (g.trajectory)
    throw new ArgumentError(`${op}: the trajectory output has no gradient; differentiate through y and finalStates`);
  const gY = g.y ?? null,
    gFinal = g.finalStates ?? null;
  const hiddenDims = hidden.length === 2 ? 'heads, headDim' : 'hidden';
  if (gY) {
    expectShape(op, 'grad of y', gY, [cfg.batch, cfg.T, ...hidden], `batch, T, ${hiddenDims}`, 'to match y');
    expectDType(op, 'grad of y', gY, [ctx.dtype], 'to match y');
    expectDevice(op, 'grad of y', gY, ctx.device, 'to match y');
  }
  if (gFinal) {
    expectShape(
      op,
      'grad of finalStates',
      gFinal,
      [ctx.states, cfg.batch, ...hidden],
      `states, batch, ${hiddenDims}`,
      'to match finalStates',
    );
    expectDType(op, 'grad of finalStates', gFinal, ['float32']);
    expectDevice(op, 'grad of finalStates', gFinal, ctx.device, 'to match finalStates');
  }
  const r = yield* nativeCall((n) =>
    n.newtonRnnBackward({
      device: ctx.device,
      dtype: ctx.dtype,
      tensors: { wx: x.wx.storage, R: x.R.storage, b: x.b.storage, h0: x.h0?.storage ?? null, guess: null },
      grads: { traj: ctx.trajectory.storage, dy: gY?.storage ?? null, dFinal: gFinal?.storage ?? null },
      config: { ...cfg, guess: 0, needDh0: x.h0 !== null },
    }),
  );
  const like = (s: Storage, t: Tensor) => new Tensor(s, t.shape, t.dtype, t.device);
  return {
    wx: like(r.dwx, x.wx),
    R: like(r.dR, x.R),
    b: like(r.db, x.b),
    h0: r.dh0 && x.h0 ? like(r.dh0, x.h0) : null,
  };
}

export const newtonRnn = defineOp<NewtonRnnInputs, NewtonRnnOutputs, NewtonRnnOptions, NewtonRnnCtx, NewtonRnnGrads>({
  name: OP,
  forward,
  backward,
});
