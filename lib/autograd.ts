/**
 * The op contract and a small reverse-mode tape built on it.
 *
 * Every op exposes two hooks: `forward(inputs, options) -> { outputs, ctx }` (ctx holds what the
 * backward needs) and `backward(ctx, gradOutputs) -> grads` (one per named input, null where there
 * is none), and their Promise forms `forwardAsync` / `backwardAsync`, which compute off the
 * JavaScript thread (lib/async.ts). Framework adapters use the hooks directly; `grad`,
 * `valueAndGrad` (and their async forms) and `Tape` compose them in plain TypeScript.
 */
import { runAsync, runSync, splitSignal, stepsOf, throwIfAborted, type AsyncOptions, type Steps } from './async';
import { ArgumentError, DisposedError, ShapeError } from './errors';
import { Tensor, pinTensors, setTensorHooks } from './tensor';
import { describe, expectDevice, expectShape, finiteNumber, readOptions, releaseCtx, requireTensor } from './validate';

export type TensorMap = Record<string, Tensor | null | undefined>;
export type Grads<T> = { [K in keyof T]?: Tensor | null };
/** One Tensor per element of a tuple of arguments (the gradients of grad / valueAndGrad). */
export type GradsOf<A extends readonly unknown[]> = { [K in keyof A]: Tensor };

/**
 * What defineOp takes. forward and backward either return their result, or are generators of
 * native calls (lib/async.ts) that return it; the package's ops are the latter, so that their async
 * forms run the kernels off the JavaScript thread.
 * G: what backward returns (by default one optional grad per input; ops with differentiable options add theirs).
 */
export interface OpDefinition<I extends object, O extends object, Opt, C, G = Grads<I>> {
  readonly name: string;
  /** Options that are tensors with a gradient (e.g. initialState); backward returns theirs too. */
  readonly differentiableOptions?: readonly string[];
  forward(inputs: I, options?: Opt): { outputs: O; ctx: C } | Steps<{ outputs: O; ctx: C }>;
  backward(ctx: C, gradOutputs: Grads<O>): G | Steps<G>;
}

/**
 * The hooks of an op. The async forms take `{ signal }` (with the op's options for forwardAsync; as
 * a third argument for backwardAsync), keep every tensor they were given busy until they settle
 * (dispose() throws ERR_BUSY meanwhile), and resolve with bitwise what the sync forms return.
 */
export interface OpHooks<I extends object, O extends object, Opt, C, G = Grads<I>> {
  readonly name: string;
  readonly differentiableOptions?: readonly string[];
  forward(inputs: I, options?: Opt): { outputs: O; ctx: C };
  backward(ctx: C, gradOutputs: Grads<O>): G;
  forwardAsync(inputs: I, options?: Opt & AsyncOptions): Promise<{ outputs: O; ctx: C }>;
  backwardAsync(ctx: C, gradOutputs: Grads<O>, options?: AsyncOptions): Promise<G>;
}

/** An op: call it for its outputs (recorded on the active tapes), or `op.async(inputs, options)` for a Promise of them. */
export type Op<I extends object, O extends object, Opt, C, G = Grads<I>> = ((inputs: I, options?: Opt) => O) & {
  readonly hooks: OpHooks<I, O, Opt, C, G>;
  readonly async: (inputs: I, options?: Opt & AsyncOptions) => Promise<O>;
};

interface Node {
  name: string;
  inputs: TensorMap;
  outputs: TensorMap;
  ctx: unknown;
  backward(ctx: unknown, gradOutputs: TensorMap): TensorMap | Steps<TensorMap>;
}

const activeTapes: Tape[] = [];
/** How many tapes hold each recorded ctx; the last one to be disposed releases it. */
const ctxHolders = new WeakMap<object, number>();

// ------------------------------------------------------------------ views, derived tensors, tidy scopes
/** The tensor owning the storage of each view (reshape), to never dispose the owner of a tensor kept. */
const viewOwner = new WeakMap<Tensor, Tensor>();
function rootOf(t: Tensor): Tensor {
  return viewOwner.get(t) ?? t;
}
/** Tensors created in each running tidy, innermost last. */
const scopes: Tensor[][] = [];

setTensorHooks({
  created(t, owner) {
    if (owner) viewOwner.set(t, rootOf(owner));
    scopes.at(-1)?.push(t);
  },
  // reshape, clone and to() are recorded like ops (input a, output out) on the tapes that watch src.
  derived(kind, src, out) {
    if (activeTapes.length === 0) return;
    const { shape, dtype, device } = src;
    const back = (g: Tensor): Tensor =>
      kind === 'reshape' ? g.reshape(shape) : kind === 'to' ? g.to({ device, dtype }) : g;
    const node: Node = {
      name: `Tensor.${kind}`,
      inputs: { a: src },
      outputs: { out },
      ctx: null,
      backward: (_ctx, { out: g }) => ({ a: g ? back(g) : null }),
    };
    for (const tape of activeTapes) tape.record(node);
  },
});

/** Every tensor in a value: itself, or those in the arrays and objects it holds (any depth). */
export function tensorsIn(v: unknown, found = new Set<Tensor>(), seen = new Set<object>()): Set<Tensor> {
  if (typeof v !== 'object' || v === null || seen.has(v) || ArrayBuffer.isView(v)) return found;
  seen.add(v);
  if (Tensor.isTensor(v)) found.add(v);
  else for (const x of Object.values(v)) tensorsIn(x, found, seen);
  return found;
}

/** The tensors to keep and the owners of their storage. */
function withRoots(keep: Iterable<Tensor>): Set<Tensor> {
  const out = new Set<Tensor>();
  for (const t of keep) out.add(t).add(rootOf(t));
  return out;
}

/**
 * Runs fn and disposes every tensor created while it runs, except those it returns (a tensor, or
 * tensors anywhere in the arrays and objects it returns) and the tensors they view. Tensors made
 * before are never touched. If fn throws, everything it created is disposed. Nested tidies hand the
 * tensors they keep to the enclosing one. fn must be synchronous.
 */
export function tidy<T>(fn: () => T): T {
  if (typeof fn !== 'function') throw new ArgumentError(`tidy: fn must be a function, got ${describe(fn)}`);
  const scope: Tensor[] = [];
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    endScope(scope, new Set());
    throw e;
  }
  if (typeof (result as { then?: unknown } | null)?.then === 'function') {
    endScope(scope, new Set(scope)); // the Promise's work may still use them
    throw new ArgumentError('tidy: fn returned a Promise; tidy tracks synchronous work only');
  }
  endScope(scope, withRoots(tensorsIn(result)));
  return result;
}

/** Ends a tidy scope: disposes its tensors but those kept, which go to the enclosing scope. */
function endScope(scope: Tensor[], keep: Set<Tensor>): void {
  scopes.splice(scopes.lastIndexOf(scope), 1);
  const parent = scopes.at(-1);
  for (const t of scope) {
    if (keep.has(t)) parent?.push(t);
    else t.dispose();
  }
}

/**
 * Frees the tensors only a ctx refers to (the checkpoints an op's forward kept for its backward;
 * never the op's inputs or outputs), at once instead of when garbage collected. The op's backward
 * then refuses the ctx with ERR_DISPOSED.
 */
export function disposeCtx(ctx: unknown): void {
  releaseCtx(ctx, true);
}

/** Pointer to Tape's private release of its intermediates (for valueAndGrad). */
let disposeIntermediates: (tape: Tape, keep: Iterable<Tensor>) => void;

/** Records the ops run while it is active on tensors it watches (or that depend on them). */
export class Tape {
  readonly #nodes: Node[] = [];
  readonly #tracked = new Set<Tensor>();
  #disposed = false;

  static {
    disposeIntermediates = (tape, keep) => tape.#disposeIntermediates(keep);
  }

  #checkLive(method: string): void {
    if (this.#disposed) throw new DisposedError(`Tape.${method}: this tape was disposed`);
  }

  watch(...tensors: Tensor[]): void {
    this.#checkLive('watch');
    tensors.forEach((t, i) => requireTensor('Tape.watch', `argument ${i}`, t));
    for (const t of tensors) this.#tracked.add(t);
  }

  /** Runs fn with this tape active. */
  run<T>(fn: () => T): T {
    this.#checkLive('run');
    if (typeof fn !== 'function') throw new ArgumentError(`Tape.run: fn must be a function, got ${describe(fn)}`);
    activeTapes.push(this);
    try {
      return fn();
    } finally {
      activeTapes.splice(activeTapes.lastIndexOf(this), 1);
    }
  }

  /** Runs fn (which may return a Promise) with this tape active until it settles. Ops run meanwhile by other code are recorded too. */
  async runAsync<T>(fn: () => T | Promise<T>): Promise<T> {
    this.#checkLive('runAsync');
    if (typeof fn !== 'function') throw new ArgumentError(`Tape.runAsync: fn must be a function, got ${describe(fn)}`);
    activeTapes.push(this);
    try {
      return await fn();
    } finally {
      activeTapes.splice(activeTapes.lastIndexOf(this), 1);
    }
  }

  /** Records a node if one of its inputs is watched (or depends on a watched tensor); returns whether it did. */
  record(node: Node): boolean {
    if (this.#disposed) return false;
    const ins = Object.values(node.inputs).filter((t): t is Tensor => Tensor.isTensor(t));
    if (!ins.some((t) => this.#tracked.has(t))) return false;
    this.#nodes.push(node);
    for (const t of Object.values(node.outputs)) if (Tensor.isTensor(t)) this.#tracked.add(t);
    if (typeof node.ctx === 'object' && node.ctx !== null)
      ctxHolders.set(node.ctx, (ctxHolders.get(node.ctx) ?? 0) + 1);
    return true;
  }

  /**
   * Gradients of `target` with respect to `sources` (zeros where target does not depend on a
   * source), one new tensor each. `seed` is dL/dtarget (ones by default). The gradients of the
   * tensors in between are disposed before it returns.
   */
  gradient<S extends readonly Tensor[]>(target: Tensor, sources: readonly [...S], seed?: Tensor | null): GradsOf<S> {
    return runSync(this.#gradientSteps('Tape.gradient', target, sources, seed));
  }

  /** gradient() with every backward kernel off the JavaScript thread; bitwise the same gradients. */
  async gradientAsync<S extends readonly Tensor[]>(
    target: Tensor,
    sources: readonly [...S],
    seed?: Tensor | null,
    options?: AsyncOptions,
  ): Promise<GradsOf<S>> {
    const { signal } = splitSignal('Tape.gradientAsync', options ?? {});
    throwIfAborted(signal, 'Tape.gradientAsync');
    return runAsync(this.#gradientSteps('Tape.gradientAsync', target, sources, seed), signal);
  }

  *#gradientSteps<S extends readonly Tensor[]>(
    op: string,
    target: Tensor,
    sources: readonly [...S],
    seed?: Tensor | null,
  ): Steps<GradsOf<S>> {
    this.#checkLive('gradient');
    requireTensor(op, 'target', target);
    if (!Array.isArray(sources))
      throw new ArgumentError(`${op}: sources must be an array of Tensors, got ${describe(sources)}`);
    sources.forEach((t, i) => requireTensor(op, `sources[${i}]`, t));
    /** Tensors made here (gradients); those not returned are disposed at the end. */
    const made = new Set<Tensor>();
    let s: Tensor;
    if (seed === undefined || seed === null) {
      s = ones(target);
      made.add(s);
    } else {
      requireTensor(op, 'seed', seed);
      if (seed.size !== target.size) throw new ShapeError(`${op}: seed must have the shape of target`);
      expectDevice(op, 'seed', seed, target.device, 'to match target');
      s = seed;
    }
    const grads = new Map<Tensor, Tensor>();
    grads.set(target, s);
    for (let i = this.#nodes.length - 1; i >= 0; i--) {
      const node = this.#nodes[i];
      const gOut: TensorMap = {};
      let any = false;
      for (const [k, t] of Object.entries(node.outputs)) {
        const g = Tensor.isTensor(t) ? grads.get(t) : undefined;
        if (g) {
          gOut[k] = g;
          any = true;
        }
      }
      if (!any) continue;
      const gIn: unknown = yield* stepsOf(node.backward(node.ctx, gOut));
      if (typeof gIn !== 'object' || gIn === null)
        throw new ArgumentError(
          `${op}: ${node.name}.backward returned ${describe(gIn)}, expected an object of gradients`,
        );
      for (const g of Object.values(gIn)) if (Tensor.isTensor(g)) made.add(g); // the unused ones too
      for (const [k, t] of Object.entries(node.inputs)) {
        const g = Object.hasOwn(gIn, k) ? (gIn as TensorMap)[k] : undefined;
        if (!Tensor.isTensor(t) || !this.#tracked.has(t) || g === undefined || g === null) continue;
        const what = `the gradient of ${k} from ${node.name}.backward`;
        requireTensor(op, what, g);
        expectShape(op, what, g, t.shape, 'the shape of the input', `to match ${k}`);
        expectDevice(op, what, g, t.device, `to match ${k}`);
        const prev = grads.get(t);
        const sum = prev ? accumulate(prev, g) : g;
        made.add(sum);
        grads.set(t, sum);
      }
    }
    // One new tensor per source: a gradient shared by two sources, or not made here (the seed, or a
    // tensor a backward handed on), is copied.
    const out: Tensor[] = [];
    for (const src of sources) {
      let g = grads.get(src);
      if (!g) made.add((g = Tensor.zeros(src.shape, { dtype: src.dtype, device: src.device })));
      else if (!made.has(g) || out.includes(g)) made.add((g = g.clone()));
      out.push(g);
    }
    // Dispose the other gradients made here, except tensors the tape recorded and owners of those returned.
    const keep = withRoots(out);
    const recorded = new Set<Tensor>(this.#tracked);
    for (const node of this.#nodes) for (const t of Object.values(node.inputs)) if (Tensor.isTensor(t)) recorded.add(t);
    for (const t of made) if (!keep.has(t) && !recorded.has(t) && t !== seed) t.dispose();
    return out as unknown as GradsOf<S>;
  }

  /**
   * Releases what the tape holds: the ctx of every op it recorded (their checkpoints are disposed
   * unless another tape recorded the same op call) and the record itself. Tensors the ops returned
   * are not disposed. The tape cannot be used afterwards.
   */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const { ctx } of this.#nodes) {
      if (typeof ctx !== 'object' || ctx === null) continue;
      const n = (ctxHolders.get(ctx) ?? 1) - 1;
      ctxHolders.set(ctx, n);
      if (n === 0) releaseCtx(ctx, false);
    }
    this.#nodes.length = 0;
    this.#tracked.clear();
  }

  /** Disposes the outputs of the recorded ops, except those in `keep` and the tensors they view. */
  #disposeIntermediates(keep: Iterable<Tensor>): void {
    const kept = withRoots(keep);
    for (const node of this.#nodes) {
      const ins = Object.values(node.inputs);
      for (const t of Object.values(node.outputs))
        if (Tensor.isTensor(t) && !kept.has(t) && !ins.includes(t)) t.dispose();
    }
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

/**
 * Makes a callable op from its definition: `op(inputs, options)` records itself on the active
 * tapes; `op.async(inputs, options)` is its Promise form (recorded on the tapes active when it was
 * called); `op.hooks` are the forward/backward hooks in both forms. A ctx no tape recorded is
 * released at once (its checkpoints disposed).
 */
export function defineOp<I extends object, O extends object, Opt, C, G = Grads<I>>(
  def: OpDefinition<I, O, Opt, C, G>,
): Op<I, O, Opt, C, G> {
  if (typeof def !== 'object' || def === null)
    throw new ArgumentError(`defineOp: hooks must be an object { name, forward, backward }, got ${describe(def)}`);
  const { name, forward, backward, differentiableOptions = [] } = def;
  if (typeof name !== 'string' || name === '')
    throw new ArgumentError(`defineOp: hooks.name must be a non-empty string, got ${describe(name)}`);
  for (const [k, f] of [
    ['forward', forward],
    ['backward', backward],
  ] as const)
    if (typeof f !== 'function')
      throw new ArgumentError(`defineOp: ${name}: hooks.${k} must be a function, got ${describe(f)}`);
  if (!Array.isArray(differentiableOptions) || !differentiableOptions.every((k) => typeof k === 'string'))
    throw new ArgumentError(`defineOp: ${name}: hooks.differentiableOptions must be an array of option names`);
  type Result = { outputs: O; ctx: C };
  const forwardSteps = (inputs: I, options?: Opt): Steps<Result> => stepsOf(def.forward(inputs, options));
  const backwardSteps = (ctx: C, grads: Grads<O>): Steps<G> => stepsOf(def.backward(ctx, grads));
  const runPinned = <R>(args: unknown, signal: AbortSignal | null, steps: () => Steps<R>): Promise<R> =>
    callAsync(name, args, signal, steps);
  const hooks: OpHooks<I, O, Opt, C, G> = {
    name,
    differentiableOptions,
    forward: (inputs, options) => runSync(forwardSteps(inputs, options)),
    backward: (ctx, grads) => runSync(backwardSteps(ctx, grads)),
    forwardAsync: async (inputs, options) => {
      const split = splitSignal<Opt>(`${name}.forwardAsync`, options);
      return runPinned([inputs, split.options], split.signal, () => forwardSteps(inputs, split.options));
    },
    backwardAsync: async (ctx, grads, options) => {
      const { signal } = splitSignal(`${name}.backwardAsync`, options ?? {});
      return runPinned([ctx, grads], signal, () => backwardSteps(ctx, grads));
    },
  };
  /** Records the call on the tapes (those active when it was made) and returns its outputs. */
  const finish = (tapes: readonly Tape[], inputs: I, options: Opt | undefined, result: unknown): O => {
    const outputs = (result as { outputs?: unknown } | null)?.outputs;
    if (typeof outputs !== 'object' || outputs === null)
      throw new ArgumentError(`${name}.forward must return { outputs, ctx }, got ${describe(result)}`);
    const { ctx } = result as { ctx: C };
    let recorded = false;
    if (tapes.length > 0) {
      const tracked: TensorMap = { ...(inputs as unknown as TensorMap) };
      for (const k of differentiableOptions) {
        const own = typeof options === 'object' && options !== null && Object.hasOwn(options, k);
        tracked[k] = own ? (options as Record<string, Tensor | undefined>)[k] : undefined;
      }
      const node: Node = {
        name,
        inputs: tracked,
        outputs: outputs as TensorMap,
        ctx,
        backward: backwardSteps as unknown as Node['backward'],
      };
      for (const tape of tapes) recorded = tape.record(node) || recorded;
    }
    if (!recorded) releaseCtx(ctx, false);
    return outputs as O;
  };
  const call = (inputs: I, options?: Opt): O =>
    finish(activeTapes, inputs, options, runSync(forwardSteps(inputs, options)));
  const asyncForm = async (inputs: I, options?: Opt & AsyncOptions): Promise<O> => {
    const tapes = [...activeTapes];
    const split = splitSignal<Opt>(`${name}.async`, options);
    const result = await runPinned([inputs, split.options], split.signal, () => forwardSteps(inputs, split.options));
    return finish(tapes, inputs, split.options, result);
  };
  return Object.assign(call, { hooks, async: asyncForm });
}

/**
 * An op's public form when its plain (untaped) call may skip what only a backward needs: while a
 * tape records it is the op itself; otherwise `run(inputs, options ?? {}, false)` runs (its ctx, if any,
 * is released) and only the outputs come back. The Promise form follows the same rule.
 */
export function withInference<I extends object, O extends object, Opt, C, G>(
  op: Op<I, O, Opt, C, G>,
  run: (inputs: I, options: Opt, keep: boolean) => Steps<{ outputs: O; ctx: C | null }>,
): ((inputs: I, options?: Opt) => O) & Pick<Op<I, O, Opt, C, G>, 'hooks' | 'async'> {
  const name = op.hooks.name;
  function* inference(inputs: I, options: Opt | undefined): Steps<O> {
    const { outputs, ctx } = yield* run(inputs, (options ?? {}) as Opt, false);
    if (ctx) releaseCtx(ctx, false); // what a device kept anyway
    return outputs;
  }
  const call = (inputs: I, options?: Opt): O =>
    isRecording() ? op(inputs, options) : runSync(inference(inputs, options));
  const asyncForm = async (inputs: I, options?: Opt & AsyncOptions): Promise<O> => {
    if (isRecording()) return op.async(inputs, options);
    const split = splitSignal<Opt>(`${name}.async`, options);
    return callAsync(name, [inputs, split.options], split.signal, () => inference(inputs, split.options));
  };
  return Object.assign(call, { hooks: op.hooks, async: asyncForm });
}

/**
 * Runs an op body's native calls off the JavaScript thread (lib/async.ts), with every tensor in
 * `args` kept busy (dispose() throws ERR_BUSY) until it settles.
 */
export async function callAsync<R>(
  name: string,
  args: unknown,
  signal: AbortSignal | null,
  steps: () => Steps<R>,
): Promise<R> {
  throwIfAborted(signal, name);
  const unpin = pinTensors(tensorsIn(args));
  try {
    return await runAsync(steps(), signal);
  } finally {
    unpin();
  }
}

function checkArgs(op: string, args: readonly unknown[]): void {
  args.forEach((a, i) => {
    if (!Tensor.isTensor(a)) {
      const hint = Array.isArray(a) || ArrayBuffer.isView(a) ? ' (make one with Tensor.from(data, shape))' : '';
      throw new ArgumentError(`${op}: argument ${i} is not a Tensor, got ${describe(a)}${hint}`);
    }
    requireTensor(op, `argument ${i}`, a);
  });
}

/** valueAndGrad and grad: runs f on a tape, then releases the tape and the tensors computed in between. */
function differentiate<A extends Tensor[]>(
  op: string,
  f: (...args: A) => Tensor,
  args: A,
  keepValue: boolean,
): { value: Tensor; grads: GradsOf<A> } {
  checkArgs(op, args);
  // Inside another tape's run, the tensors computed here may be recorded there too: leave them.
  const nested = activeTapes.length > 0;
  const tape = new Tape();
  tape.watch(...args);
  let keep: Tensor[] | null = null;
  try {
    const value: unknown = tape.run(() => f(...args));
    if (!Tensor.isTensor(value))
      throw new ArgumentError(`${op}: the function must return a Tensor, got ${describe(value)}`);
    const grads = tape.gradient<A>(value, args);
    keep = [...args, ...grads];
    if (keepValue || nested) keep.push(value);
    return { value, grads };
  } finally {
    if (!nested) disposeIntermediates(tape, keep ?? args);
    tape.dispose();
  }
}

/** valueAndGradAsync and gradAsync: differentiate with f awaited and the backward kernels off the thread. */
async function differentiateAsync<A extends Tensor[]>(
  op: string,
  f: (...args: A) => Tensor | Promise<Tensor>,
  args: A,
  keepValue: boolean,
  signal: AbortSignal | null,
): Promise<{ value: Tensor; grads: GradsOf<A> }> {
  checkArgs(op, args);
  throwIfAborted(signal, op);
  const nested = activeTapes.length > 0;
  const tape = new Tape();
  tape.watch(...args);
  let keep: Tensor[] | null = null;
  try {
    const value: unknown = await tape.runAsync(() => f(...args));
    if (!Tensor.isTensor(value))
      throw new ArgumentError(`${op}: the function must return a Tensor, got ${describe(value)}`);
    const grads = await tape.gradientAsync<A>(value, args, null, { signal });
    keep = [...args, ...grads];
    if (keepValue || nested) keep.push(value);
    return { value, grads };
  } finally {
    if (!nested) disposeIntermediates(tape, keep ?? args);
    tape.dispose();
  }
}

/**
 * The Promise form of valueAndGrad: f may be async (e.g. await the async forms of ops), and the
 * backward kernels run off the JavaScript thread. `signal` aborts the backward pass. While f runs,
 * the tape also records ops that other code runs on the watched tensors: run one at a time.
 */
export function valueAndGradAsync<A extends Tensor[]>(
  f: (...args: A) => Tensor | Promise<Tensor>,
  options?: AsyncOptions,
): (...args: A) => Promise<{ value: Tensor; grads: GradsOf<A> }> {
  if (typeof f !== 'function') throw new ArgumentError(`valueAndGradAsync: f must be a function, got ${describe(f)}`);
  const { signal } = splitSignal('valueAndGradAsync', options ?? {});
  return (...args: A) => differentiateAsync('valueAndGradAsync', f, args, true, signal);
}

/** The Promise form of grad; see valueAndGradAsync. */
export function gradAsync<A extends Tensor[]>(
  f: (...args: A) => Tensor | Promise<Tensor>,
  options?: AsyncOptions,
): (...args: A) => Promise<GradsOf<A>> {
  if (typeof f !== 'function') throw new ArgumentError(`gradAsync: f must be a function, got ${describe(f)}`);
  const { signal } = splitSignal('gradAsync', options ?? {});
  return async (...args: A) => (await differentiateAsync('gradAsync', f, args, false, signal)).grads;
}

/**
 * Runs f(...args) on a tape and returns its (scalar or any-shaped, seeded with ones) value and the
 * gradients, one per argument. The tensors computed in between (outputs of the ops f ran, other
 * than its value, and the checkpoints their backward used) are disposed before it returns.
 */
export function valueAndGrad<A extends Tensor[]>(
  f: (...args: A) => Tensor,
): (...args: A) => { value: Tensor; grads: GradsOf<A> } {
  if (typeof f !== 'function') throw new ArgumentError(`valueAndGrad: f must be a function, got ${describe(f)}`);
  return (...args: A) => differentiate('valueAndGrad', f, args, true);
}

/** Gradients of f's result (seeded with ones) with respect to each argument; see valueAndGrad. */
export function grad<A extends Tensor[]>(f: (...args: A) => Tensor): (...args: A) => GradsOf<A> {
  if (typeof f !== 'function') throw new ArgumentError(`grad: f must be a function, got ${describe(f)}`);
  return (...args: A) => differentiate('grad', f, args, false).grads;
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
 * must be float32 CPU tensors; f must return a one-element tensor. The tensors f creates are
 * disposed after each evaluation.
 */
export function gradcheck<A extends Tensor[]>(
  f: (...args: A) => Tensor,
  inputs: readonly [...A],
  options: GradcheckOptions = {},
): GradcheckResult {
  if (typeof f !== 'function') throw new ArgumentError(`gradcheck: f must be a function, got ${describe(f)}`);
  if (!Array.isArray(inputs))
    throw new ArgumentError(`gradcheck: inputs must be an array of Tensors, got ${describe(inputs)}`);
  checkArgs('gradcheck', inputs);
  const opts = readOptions('gradcheck', options, ['eps', 'atol', 'rtol', 'maxElements']);
  const eps = finiteNumber('gradcheck', 'eps', opts.eps ?? 1e-2, { positive: true });
  const atol = finiteNumber('gradcheck', 'atol', opts.atol ?? 1e-3);
  const rtol = finiteNumber('gradcheck', 'rtol', opts.rtol ?? 1e-2);
  const maxElements = opts.maxElements;
  if (maxElements !== undefined && !(Number.isSafeInteger(maxElements) && maxElements > 0))
    throw new ArgumentError(`gradcheck: maxElements must be a positive integer, got ${String(maxElements)}`);
  for (const [i, t] of inputs.entries())
    if (t.device !== 'cpu' || t.dtype !== 'float32')
      throw new ArgumentError(`gradcheck: input ${i} must be a float32 CPU tensor`);
  const args = [...inputs] as unknown as A;
  const scalar = (): number =>
    tidy(() => {
      const t: unknown = f(...args);
      if (!Tensor.isTensor(t)) throw new ArgumentError(`gradcheck: f must return a Tensor, got ${describe(t)}`);
      if (t.size !== 1) throw new ShapeError(`gradcheck: f must return one element, got shape [${t.shape.join(',')}]`);
      return t.toFloat32Array()[0];
    });
  const analytic = grad(f)(...args).map((g) => {
    const v = Float32Array.from(g.toFloat32Array());
    g.dispose();
    return v;
  });
  let maxAbsError = 0;
  let ok = true;
  let worst: GradcheckResult['worst'] = null;
  let worstExcess = -Infinity;
  inputs.forEach((t, i) => {
    const data = t.storage as Float32Array;
    let idx = [...Array(t.size).keys()];
    if (maxElements !== undefined && idx.length > maxElements) {
      for (let j = idx.length - 1; j > 0; j--) {
        const k = Math.floor(Math.random() * (j + 1));
        [idx[j], idx[k]] = [idx[k], idx[j]];
      }
      idx = idx.slice(0, maxElements);
    }
    for (const j of idx) {
      const orig = data[j];
      data[j] = orig + eps;
      const xPlus = data[j]; // the step as rounded to float32
      const plus = scalar();
      data[j] = orig - eps;
      const xMinus = data[j];
      const minus = scalar();
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
