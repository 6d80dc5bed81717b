/** Argument checks shared by the ops. Every failure names the op, the argument and what was expected. */
import { ArgumentError, DTypeError, DeviceError, DisposedError, ShapeError } from './errors';
import { Tensor, type DType } from './tensor';

export function requireTensor(op: string, arg: string, t: unknown): asserts t is Tensor {
  if (!(t instanceof Tensor))
    throw new ArgumentError(`${op}: ${arg} must be a Tensor, got ${t === null ? 'null' : typeof t}`);
  if (t.disposed) throw new DisposedError(`${op}: ${arg} was disposed`);
}

export function expectShape(op: string, arg: string, t: Tensor, expected: readonly number[], dims: string,
  relation = ''): void {
  if (t.shape.length === expected.length && t.shape.every((d, i) => d === expected[i])) return;
  throw new ShapeError(`${op}: ${arg} has shape [${t.shape.join(',')}], expected [${expected.join(',')}] (${dims})` +
    (relation ? ` ${relation}` : ''));
}

export function expectRank(op: string, arg: string, t: Tensor, rank: number, dims: string): void {
  if (t.shape.length !== rank)
    throw new ShapeError(`${op}: ${arg} has shape [${t.shape.join(',')}], expected ${rank} dimensions (${dims})`);
}

export function expectDType(op: string, arg: string, t: Tensor, allowed: readonly DType[], relation = ''): void {
  if (!allowed.includes(t.dtype))
    throw new DTypeError(`${op}: ${arg} has dtype ${t.dtype}, expected ${allowed.join(' or ')}` +
      (relation ? ` ${relation}` : ''));
}

export function expectDevice(op: string, arg: string, t: Tensor, device: string, relation = ''): void {
  if (t.device !== device)
    throw new DeviceError(`${op}: ${arg} is on ${t.device}, expected ${device}` + (relation ? ` ${relation}` : ''));
}

/** Rejects option names the op does not know (catches typos such as `revers: true`). */
export function checkOptions(op: string, options: unknown, known: readonly string[]): void {
  if (options === undefined) return;
  if (options === null || typeof options !== 'object')
    throw new ArgumentError(`${op}: options must be an object`);
  for (const k of Object.keys(options))
    if (!known.includes(k)) throw new ArgumentError(`${op}: unknown option '${k}' (known: ${known.join(', ')})`);
}

export function checkInputs(op: string, inputs: unknown, known: readonly string[]): void {
  if (inputs === null || typeof inputs !== 'object')
    throw new ArgumentError(`${op}: inputs must be an object with ${known.join(', ')}`);
  for (const k of Object.keys(inputs))
    if (!known.includes(k)) throw new ArgumentError(`${op}: unknown input '${k}' (known: ${known.join(', ')})`);
}

export function booleanOption(op: string, name: string, v: unknown, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new ArgumentError(`${op}: option ${name} must be a boolean, got ${typeof v}`);
  return v;
}

export function finiteNumber(op: string, name: string, v: unknown, { positive = false } = {}): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || (positive && v <= 0))
    throw new ArgumentError(`${op}: ${name} must be a finite${positive ? ' positive' : ''} number, got ${String(v)}`);
  return v;
}

/**
 * Validates the offsets of a packed variable-length batch (nseq + 1 integers from 0, non-decreasing,
 * at most the length; the batch must be 1) and returns them as a new Int32Array; null when absent.
 */
export function parseCuSeqlens(op: string, v: unknown, batch: number, length: number, lengthName: string):
  Int32Array | null {
  if (v === undefined || v === null) return null;
  if (!(v instanceof Int32Array) && !Array.isArray(v))
    throw new ArgumentError(`${op}: cuSeqlens must be an Int32Array or an array of integers`);
  const arr = Array.from(v as ArrayLike<number>);
  if (arr.length < 2) throw new ArgumentError(`${op}: cuSeqlens must have at least 2 entries (nseq + 1), got ${arr.length}`);
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
