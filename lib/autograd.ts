/**
 * The op contract and a small reverse-mode tape built on it.
 *
 * Every op exposes two hooks: `forward(inputs, options) -> { outputs, ctx }` (ctx holds what the
 * backward needs) and `backward(ctx, gradOutputs) -> grads` (one per named input, null where there
 * is none). Framework adapters use the hooks directly; `grad`, `valueAndGrad` and `Tape` compose
 * them in plain TypeScript.
 */
import { ArgumentError, ShapeError } from './errors';
import { Tensor } from './tensor';
import { finiteNumber } from './validate';

export type TensorMap = Record<string, Tensor | null | undefined>;
export type Grads<T> = { [K in keyof T]?: Tensor | null };

/** G: what backward returns (by default one optional grad per input; ops with differentiable options add theirs). */
export interface OpHooks<I extends object, O extends object, Opt, C, G = Grads<I>> {
  readonly name: string;
  /** Options that are tensors with a gradient (e.g. initialState); backward returns theirs too. */
  readonly differentiableOptions?: readonly string[];
  forward(inputs: I, options?: Opt): { outputs: O; ctx: C };
  backward(ctx: C, gradOutputs: Grads<O>): G;
}

export type Op<I extends object, O extends object, Opt, C, G = Grads<I>> = ((inputs: I, options?: Opt) => O) & {
  readonly hooks: OpHooks<I, O, Opt, C, G>;
};

interface Node {
  inputs: TensorMap;
  outputs: TensorMap;
  ctx: unknown;
  backward(ctx: unknown, gradOutputs: TensorMap): TensorMap;
}

const activeTapes: Tape[] = [];

/** Records the ops run while it is active on tensors it watches (or that depend on them). */
export class Tape {
  readonly #nodes: Node[] = [];
  readonly #tracked = new Set<Tensor>();

  watch(...tensors: Tensor[]): void {
    for (const t of tensors) this.#tracked.add(t);
  }

  /** Runs fn with this tape active. */
  run<T>(fn: () => T): T {
    activeTapes.push(this);
    try {
      return fn();
    } finally {
      activeTapes.splice(activeTapes.lastIndexOf(this), 1);
    }
  }

  record(node: Node): void {
    const ins = Object.values(node.inputs).filter((t): t is Tensor => t instanceof Tensor);
    if (!ins.some((t) => this.#tracked.has(t))) return;
    this.#nodes.push(node);
    for (const t of Object.values(node.outputs)) if (t instanceof Tensor) this.#tracked.add(t);
  }

  /**
   * Gradients of `target` with respect to `sources` (zeros where target does not depend on a
   * source). `seed` is dL/dtarget (ones by default).
   */
  gradient(target: Tensor, sources: Tensor[], seed?: Tensor): Tensor[] {
    const grads = new Map<Tensor, Tensor>();
    const s = seed ?? ones(target);
    if (s.size !== target.size) throw new ShapeError('Tape.gradient: seed must have the shape of target');
    grads.set(target, s);
    for (let i = this.#nodes.length - 1; i >= 0; i--) {
      const node = this.#nodes[i];
      const gOut: TensorMap = {};
      let any = false;
      for (const [k, t] of Object.entries(node.outputs)) {
        const g = t instanceof Tensor ? grads.get(t) : undefined;
        if (g) { gOut[k] = g; any = true; }
      }
      if (!any) continue;
      const gIn = node.backward(node.ctx, gOut);
      for (const [k, t] of Object.entries(node.inputs)) {
        const g = gIn[k];
        if (!(t instanceof Tensor) || !(g instanceof Tensor) || !this.#tracked.has(t)) continue;
        const prev = grads.get(t);
        grads.set(t, prev ? accumulate(prev, g) : g);
      }
    }
    return sources.map((src) => grads.get(src) ?? Tensor.zeros(src.shape, { dtype: src.dtype, device: src.device }));
  }
}

function ones(like: Tensor): Tensor {
  return Tensor.from(new Float32Array(like.size).fill(1), like.shape, { dtype: like.dtype, device: like.device });
}

// Set by the elementwise helpers (they are ops themselves, defined on top of this file).
let accumulateImpl: ((a: Tensor, b: Tensor) => Tensor) | undefined;
export function setAccumulate(fn: (a: Tensor, b: Tensor) => Tensor): void {
  accumulateImpl = fn;
}
function accumulate(a: Tensor, b: Tensor): Tensor {
  if (!accumulateImpl) throw new Error('autograd: accumulate is not set');
  return accumulateImpl(a, b);
}

/** Whether a tape is recording: ops may then keep what their backward needs, and skip it otherwise. */
export function isRecording(): boolean {
  return activeTapes.length > 0;
}

/** Wraps op hooks into a callable op that records itself on the active tapes. */
export function defineOp<I extends object, O extends object, Opt, C, G = Grads<I>>(
  hooks: OpHooks<I, O, Opt, C, G>): Op<I, O, Opt, C, G> {
  const call = (inputs: I, options?: Opt): O => {
    const { outputs, ctx } = hooks.forward(inputs, options);
    if (activeTapes.length === 0) return outputs;
    const tracked: TensorMap = { ...(inputs as unknown as TensorMap) };
    for (const k of hooks.differentiableOptions ?? [])
      tracked[k] = (options as Record<string, Tensor | undefined> | undefined)?.[k];
    for (const tape of activeTapes) {
      tape.record({
        inputs: tracked,
        outputs: outputs as unknown as TensorMap,
        ctx,
        backward: hooks.backward as unknown as Node['backward'],
      });
    }
    return outputs;
  };
  return Object.assign(call, { hooks });
}

/** Runs f(...args) on a tape and returns its (scalar or any-shaped, seeded with ones) value and the gradients. */
export function valueAndGrad(f: (...args: Tensor[]) => Tensor): (...args: Tensor[]) => { value: Tensor; grads: Tensor[] } {
  return (...args: Tensor[]) => {
    for (const [i, a] of args.entries())
      if (!(a instanceof Tensor)) throw new ArgumentError(`valueAndGrad: argument ${i} is not a Tensor`);
    const tape = new Tape();
    tape.watch(...args);
    const value = tape.run(() => f(...args));
    if (!(value instanceof Tensor)) throw new ArgumentError('valueAndGrad: the function must return a Tensor');
    return { value, grads: tape.gradient(value, args) };
  };
}

/** Gradients of f's result (seeded with ones) with respect to each argument. */
export function grad(f: (...args: Tensor[]) => Tensor): (...args: Tensor[]) => Tensor[] {
  const vg = valueAndGrad(f);
  return (...args: Tensor[]) => vg(...args).grads;
}

export interface GradcheckOptions {
  /** Finite-difference step (default 1e-2 for float32). */
  eps?: number;
  atol?: number;
  rtol?: number;
  /** Check at most this many elements per input (randomly chosen); default all. */
  maxElements?: number;
}
export interface GradcheckResult {
  ok: boolean;
  maxAbsError: number;
  worst: { input: number; index: number; analytic: number; numeric: number } | null;
}

/**
 * Compares the tape's gradients of a scalar function with central finite differences. Inputs
 * must be float32 CPU tensors; f must return a one-element tensor.
 */
export function gradcheck(f: (...args: Tensor[]) => Tensor, inputs: Tensor[], options: GradcheckOptions = {}): GradcheckResult {
  const eps = finiteNumber('gradcheck', 'eps', options.eps ?? 1e-2, { positive: true });
  const atol = finiteNumber('gradcheck', 'atol', options.atol ?? 1e-3);
  const rtol = finiteNumber('gradcheck', 'rtol', options.rtol ?? 1e-2);
  if (options.maxElements !== undefined && !(Number.isSafeInteger(options.maxElements) && options.maxElements > 0))
    throw new ArgumentError(`gradcheck: maxElements must be a positive integer, got ${String(options.maxElements)}`);
  for (const [i, t] of inputs.entries())
    if (t.device !== 'cpu' || t.dtype !== 'float32')
      throw new ArgumentError(`gradcheck: input ${i} must be a float32 CPU tensor`);
  const scalar = (t: Tensor): number => {
    if (t.size !== 1) throw new ShapeError(`gradcheck: f must return one element, got shape [${t.shape.join(',')}]`);
    return t.toFloat32Array()[0];
  };
  const analytic = grad(f)(...inputs).map((g) => g.toFloat32Array());
  let maxAbsError = 0;
  let ok = true;
  let worst: GradcheckResult['worst'] = null;
  let worstExcess = -Infinity;
  inputs.forEach((t, i) => {
    const data = t.storage as Float32Array;
    let idx = [...Array(t.size).keys()];
    if (options.maxElements !== undefined && idx.length > options.maxElements) {
      for (let j = idx.length - 1; j > 0; j--) {
        const k = Math.floor(Math.random() * (j + 1));
        [idx[j], idx[k]] = [idx[k], idx[j]];
      }
      idx = idx.slice(0, options.maxElements);
    }
    for (const j of idx) {
      const orig = data[j];
      data[j] = orig + eps;
      const xPlus = data[j]; // the step as rounded to float32
      const plus = scalar(f(...inputs));
      data[j] = orig - eps;
      const xMinus = data[j];
      const minus = scalar(f(...inputs));
      data[j] = orig;
      const numeric = (plus - minus) / (xPlus - xMinus);
      const a = analytic[i][j];
      const err = Math.abs(a - numeric);
      maxAbsError = Math.max(maxAbsError, err);
      const excess = err - (atol + rtol * Math.abs(numeric));
      if (!(excess <= 0)) ok = false;
      if (excess > worstExcess || Number.isNaN(excess)) {
        worstExcess = Number.isNaN(excess) ? Infinity : excess;
        worst = { input: i, index: j, analytic: a, numeric };
      }
    }
  });
  return { ok, maxAbsError, worst };
}
