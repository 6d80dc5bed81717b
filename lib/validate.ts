/** Argument checks shared by the ops. Every failure names the op, the argument and what was expected. */
import { ArgumentError, DTypeError, DeviceError, DisposedError, ShapeError } from './errors';
import { Tensor, type DType } from './tensor';

/** A short description of a value for messages ('null', 'an array', 'a Float32Array', 'number', ...). */
export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (ArrayBuffer.isView(v)) return `a ${v.constructor?.name ?? 'TypedArray'}`;
  return typeof v;
}

export function requireTensor(op: string, arg: string, t: unknown): asserts t is Tensor {
  if (!Tensor.isTensor(t)) {
    const hint = Array.isArray(t) || ArrayBuffer.isView(t) ? ' (make one with Tensor.from(data, shape))' : '';
    throw new ArgumentError(`${op}: ${arg} must be a Tensor, got ${describe(t)}${hint}`);
  }
  if (t.disposed) throw new DisposedError(`${op}: ${arg} was disposed`);
}

export function expectShape(
  op: string,
  arg: string,
  t: Tensor,
  expected: readonly number[],
  dims: string,
  relation = '',
): void {
  if (t.shape.length === expected.length && t.shape.every((d, i) => d === expected[i])) return;
  throw new ShapeError(
    `${op}: ${arg} has shape [${t.shape.join(',')}], expected [${expected.join(',')}] (${dims})` +
      (relation ? ` ${relation}` : ''),
  );
}

export function expectRank(op: string, arg: string, t: Tensor, rank: number, dims: string): void {
  if (t.shape.length !== rank)
    throw new ShapeError(`${op}: ${arg} has shape [${t.shape.join(',')}], expected ${rank} dimensions (${dims})`);
}

export function expectDType(op: string, arg: string, t: Tensor, allowed: readonly DType[], relation = ''): void {
  if (!allowed.includes(t.dtype))
    throw new DTypeError(
      `${op}: ${arg} has dtype ${t.dtype}, expected ${allowed.join(' or ')}` + (relation ? ` ${relation}` : ''),
    );
}

export function expectDevice(op: string, arg: string, t: Tensor, device: string, relation = ''): void {
  if (t.device !== device)
    throw new DeviceError(`${op}: ${arg} is on ${t.device}, expected ${device}` + (relation ? ` ${relation}` : ''));
}

/**
 * Whether v can be an options or inputs object: an object that is not an array, a TypedArray, a
 * Tensor, a function or a built-in such as Map or Date (its Object.prototype.toString tag is Object).
 */
function isPlainObject(v: unknown): v is object {
  return (
    typeof v === 'object' &&
    v !== null &&
    Object.prototype.toString.call(v) === '[object Object]' &&
    !Tensor.isTensor(v)
  );
}

/** A copy of the own enumerable properties of `obj` (inherited ones are ignored), without a prototype. */
function ownProperties(obj: object): Record<string, unknown> {
  const out: Record<string, unknown> = Object.create(null);
  for (const k of Object.keys(obj)) out[k] = (obj as Record<string, unknown>)[k];
  return out;
}

/**
 * The own properties of v, a plain object whose property names are all in `known` (each value then
 * passed to `check`, if given); otherwise an ArgumentError: `${op}: ${notObject}, got <what v is>`
 * or `${op}: ${unknownName(name)}`.
 */
function ownKnownProperties(
  op: string,
  v: unknown,
  known: readonly string[],
  notObject: string,
  unknownName: (k: string) => string,
  check?: (k: string, x: unknown) => void,
): Record<string, unknown> {
  if (!isPlainObject(v)) throw new ArgumentError(`${op}: ${notObject}, got ${describe(v)}`);
  const own = ownProperties(v);
  for (const [k, x] of Object.entries(own)) {
    if (!known.includes(k)) throw new ArgumentError(`${op}: ${unknownName(k)}`);
    check?.(k, x);
  }
  return own;
}

/**
 * Reads an options object: only its own properties count (an inherited `reverse` is ignored),
 * names the op does not know are refused (catches typos such as `revers: true`), and anything but
 * a plain object is refused. Returns the own properties (an empty object for undefined or null).
 */
export function readOptions<T extends object>(
  op: string,
  options: T | null | undefined,
  known: readonly string[],
  what = 'options',
): Partial<T> {
  if (options === undefined || options === null) return {};
  return ownKnownProperties(
    op,
    options,
    known,
    `${what} must be a plain object`,
    (k) => `unknown option '${k}' (known: ${known.join(', ')})`,
  ) as Partial<T>;
}

/** Checks the named inputs of an op like readOptions (own properties of a plain object, known names) and returns them. */
export function readInputs<T extends object>(op: string, inputs: T, known: readonly string[]): T {
  return ownKnownProperties(
    op,
    inputs,
    known,
    `inputs must be an object with ${known.join(', ')}`,
    (k) => `unknown input '${k}' (known: ${known.join(', ')})`,
  ) as T;
}

/**
 * Reads the gradOutputs of a backward hook: a plain object whose own properties name outputs of
 * the op (absent, null or undefined: no gradient), each a Tensor.
 */
export function readGrads<T extends object>(op: string, grads: T, known: readonly string[]): T {
  return ownKnownProperties(
    op,
    grads,
    known,
    `gradOutputs must be an object with gradients of ${known.join(', ')}`,
    (k) => `gradOutputs has '${k}', which is not an output (outputs: ${known.join(', ')})`,
    (k, g) => {
      if (g !== undefined && g !== null) requireTensor(op, `grad of ${k}`, g);
    },
  ) as T;
}

export function booleanOption(op: string, name: string, v: unknown, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new ArgumentError(`${op}: option ${name} must be a boolean, got ${typeof v}`);
  return v;
}

/** A string option that must be one of `allowed` (fallback when undefined). */
export function oneOf<T extends string>(op: string, name: string, v: unknown, allowed: readonly T[], fallback: T): T {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || !allowed.includes(v as T))
    throw new ArgumentError(
      `${op}: ${name} must be one of ${allowed.map((x) => `'${x}'`).join(', ')}, got ${String(v)}`,
    );
  return v as T;
}

/** The stateWindow option: how many trailing per-position states to return, 0-8 (default 0). */
export function stateWindowOption(op: string, v: unknown): number {
  const window = v ?? 0;
  if (typeof window !== 'number' || !Number.isInteger(window) || window < 0 || window > 8)
    throw new ArgumentError(`${op}: stateWindow must be an integer 0-8, got ${String(v)}`);
  return window;
}

/** The largest finite float32. */
export const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * v as a finite number (positive if asked). A number the kernels use as a float32 must be finite as
 * a float32 too (float32: true): 1e39 is a finite double but an infinite float.
 */
export function finiteNumber(op: string, name: string, v: unknown, { positive = false, float32 = false } = {}): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || (positive && v <= 0))
    throw new ArgumentError(`${op}: ${name} must be a finite${positive ? ' positive' : ''} number, got ${String(v)}`);
  if (float32 && Math.abs(v) > FLOAT32_MAX)
    throw new ArgumentError(
      `${op}: ${name} must be finite as a float32 (at most ${FLOAT32_MAX} in magnitude), got ${v}`,
    );
  return v;
}

/**
 * Validates the offsets of a packed variable-length batch (nseq + 1 integers from 0, non-decreasing,
 * at most the length; the batch must be 1) and returns them as a new Int32Array; null when absent.
 */
export function parseCuSeqlens(
  op: string,
  v: unknown,
  batch: number,
  length: number,
  lengthName: string,
): Int32Array | null {
  if (v === undefined || v === null) return null;
  if (!(v instanceof Int32Array) && !Array.isArray(v))
    throw new ArgumentError(`${op}: cuSeqlens must be an Int32Array or an array of integers`);
  const arr = Array.from(v as ArrayLike<number>);
  if (arr.length < 2)
    throw new ArgumentError(`${op}: cuSeqlens must have at least 2 entries (nseq + 1), got ${arr.length}`);
  if (batch !== 1) throw new ShapeError(`${op}: cuSeqlens needs a packed batch of 1, got batch ${batch}`);
  arr.forEach((x, i) => {
    if (!Number.isInteger(x)) throw new ArgumentError(`${op}: cuSeqlens[${i}] must be an integer, got ${String(x)}`);
    if (i === 0 && x !== 0) throw new ArgumentError(`${op}: cuSeqlens[0] must be 0, got ${x}`);
    if (i > 0 && x < arr[i - 1])
      throw new ArgumentError(`${op}: cuSeqlens must be non-decreasing, got ${arr[i - 1]} then ${x} at ${i}`);
    if (x > length) throw new ArgumentError(`${op}: cuSeqlens[${i}] = ${x} exceeds ${lengthName} ${length}`);
  });
  return Int32Array.from(arr);
}

// ------------------------------------------------------------------ the ctx of an op's forward
/**
 * The brand of a ctx returned by an op's forward: the op's name and the fields holding tensors
 * that only the ctx refers to (checkpoints), which disposeCtx frees. It is an own enumerable
 * symbol property, so that a copy made with spread syntax (e.g. to rebuild a ctx with tensors moved
 * to another device) stays a ctx of the same op.
 */
const CTX_BRAND = Symbol('recurrent-kernels ctx');
interface CtxBrand {
  op: string;
  owned: readonly string[];
}
/** Ctx objects given to disposeCtx: backward refuses them. */
const disposedCtxs = new WeakSet<object>();

function brandOf(ctx: unknown): CtxBrand | undefined {
  return typeof ctx === 'object' && ctx !== null ? (ctx as { [CTX_BRAND]?: CtxBrand })[CTX_BRAND] : undefined;
}

/** Freezes plain objects and arrays, recursively; tensors and typed arrays are left as they are. */
function deepFreeze<T>(v: T): T {
  if (typeof v !== 'object' || v === null || Tensor.isTensor(v) || ArrayBuffer.isView(v) || Object.isFrozen(v))
    return v;
  const proto = Object.getPrototypeOf(v);
  if (proto !== Object.prototype && proto !== Array.prototype && proto !== null) return v;
  Object.freeze(v);
  for (const x of Object.values(v)) deepFreeze(x);
  return v;
}

/**
 * Marks ctx as returned by op's forward and freezes it (with the plain objects and arrays in it),
 * so that its config cannot be altered between forward and backward. `owned` names the fields
 * holding tensors that only the ctx refers to (never inputs or outputs), or the ctx of an op run
 * inside this one's forward (released with it).
 */
export function sealCtx<C extends object>(op: string, ctx: C, owned: readonly (keyof C & string)[] = []): C {
  const brand: CtxBrand = Object.freeze({ op, owned: Object.freeze([...owned]) });
  Object.defineProperty(ctx, CTX_BRAND, { value: brand, enumerable: true });
  return deepFreeze(ctx);
}

/**
 * What a ctx field must hold: a live tensor; a live tensor or null; an object; an Int32Array or
 * null. Every field must be present (an absent optional tensor is null, not missing).
 */
export type CtxField = 'tensor' | 'tensor?' | 'object' | 'int32?';

/**
 * Checks, at the start of `${op}.backward`, that ctx is a ctx returned by op's forward (not null,
 * not another op's, not disposed) and that it has the given fields; tensors must not be disposed
 * (named `<field> (saved for backward)` in messages).
 */
export function checkCtx(op: string, ctx: unknown, fields: Readonly<Record<string, CtxField>>): void {
  const where = `${op}.backward`;
  if (typeof ctx !== 'object' || ctx === null)
    throw new ArgumentError(`${where}: ctx must be the ctx returned by ${op}.forward, got ${describe(ctx)}`);
  const brand = brandOf(ctx);
  if (!brand) throw new ArgumentError(`${where}: ctx is not a ctx returned by ${op}.forward`);
  if (brand.op !== op) throw new ArgumentError(`${where}: ctx was returned by ${brand.op}.forward, not ${op}.forward`);
  if (disposedCtxs.has(ctx)) throw new DisposedError(`${where}: ctx was disposed`);
  checkCtxFields(op, ctx, fields);
}

/** Checks fields of an object inside a ctx (e.g. ctx.inputs), as checkCtx does for the ctx itself. */
export function checkCtxFields(
  op: string,
  obj: unknown,
  fields: Readonly<Record<string, CtxField>>,
  path = 'ctx',
): void {
  const where = `${op}.backward`;
  if (typeof obj !== 'object' || obj === null)
    throw new ArgumentError(`${where}: ${path} must be an object, got ${describe(obj)}`);
  for (const [k, kind] of Object.entries(fields)) {
    const v = Object.hasOwn(obj, k) ? (obj as Record<string, unknown>)[k] : undefined;
    if (kind === 'object') {
      if (typeof v !== 'object' || v === null)
        throw new ArgumentError(`${where}: ${path}.${k} must be an object, got ${describe(v)}`);
    } else if (kind === 'int32?') {
      if (v !== null && !(v instanceof Int32Array))
        throw new ArgumentError(`${where}: ${path}.${k} must be an Int32Array or null, got ${describe(v)}`);
    } else if (kind === 'tensor' || v !== null) {
      if (v === undefined && kind === 'tensor?')
        throw new ArgumentError(`${where}: ${k} (saved for backward) must be a Tensor or null, got undefined`);
      requireTensor(where, `${k} (saved for backward)`, v);
    }
  }
}

/** Throws unless each value of `actual` equals that of `expected` (recomputed from the saved tensors). */
export function expectCtxValues(
  op: string,
  path: string,
  actual: unknown,
  expected: Readonly<Record<string, unknown>>,
): void {
  const where = `${op}.backward`;
  if (typeof actual !== 'object' || actual === null)
    throw new ArgumentError(`${where}: ${path} must be an object, got ${describe(actual)}`);
  for (const [k, want] of Object.entries(expected)) {
    const got = (actual as Record<string, unknown>)[k];
    const same = Array.isArray(want)
      ? Array.isArray(got) && got.length === want.length && got.every((x, i) => Object.is(x, want[i]))
      : Object.is(got, want);
    if (!same) {
      const show = (x: unknown) => (Array.isArray(x) ? `[${x.join(',')}]` : String(x));
      throw new ArgumentError(
        `${where}: ${path}.${k} is ${show(got)}, expected ${show(want)} from the tensors saved ` +
          'for backward (the ctx was altered, or rebuilt from mismatched parts)',
      );
    }
  }
}

/**
 * Disposes the tensors only a ctx refers to (its checkpoints; never the op's inputs or outputs)
 * and marks it disposed, so that backward refuses it. Objects that are not a ctx of an op are
 * refused when `strict`, ignored otherwise.
 */
export function releaseCtx(ctx: unknown, strict: boolean): void {
  const brand = brandOf(ctx);
  if (!brand) {
    if (strict)
      throw new ArgumentError(
        `disposeCtx: expected the ctx returned by an op's forward, got ${describe(ctx)}` +
          (typeof ctx === 'object' && ctx !== null ? ' that is not one' : ''),
      );
    return;
  }
  disposedCtxs.add(ctx as object);
  for (const k of brand.owned) {
    const t = (ctx as Record<string, unknown>)[k];
    if (Tensor.isTensor(t)) t.dispose();
    else if (brandOf(t) && !disposedCtxs.has(t as object)) releaseCtx(t, false); // the ctx of an op run inside
  }
}

/** Returns a ctx field that must be a boolean (one not derived from the saved tensors). */
export function ctxBoolean(op: string, path: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw new ArgumentError(`${op}.backward: ${path} must be a boolean, got ${describe(v)}`);
  return v;
}

/** Returns a ctx field that must be an integer in [min, max]. */
export function ctxInteger(op: string, path: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max)
    throw new ArgumentError(`${op}.backward: ${path} must be an integer in [${min}, ${max}], got ${String(v)}`);
  return v;
}
