/**
 * One body for the synchronous and the Promise form of every op.
 *
 * An op's forward and backward are generators: they validate, then `yield* nativeCall(n => n.xxx(...))`
 * for each native call, then wrap the results. `runSync` performs each call at once; `runAsync`
 * makes it through the addon's asyncCall, so that the binding queues its kernel off the JavaScript
 * thread (cpp/napi/async.h), and resumes the generator once the kernel has finished. The same code
 * runs either way, so the two forms return bitwise the same results.
 */
import { AbortedError, ArgumentError, fromNative } from './errors';
import { native, rawNative, type NativeModule } from './native';

/** One native call of an op. */
export interface NativeStep {
  readonly invoke: (n: NativeModule) => unknown;
}
/** What an op's forward or backward generator yields; R is what it returns. */
export type Steps<R> = Generator<NativeStep, R, unknown>;

/** Options every async call accepts. */
export interface AsyncOptions {
  /** Aborting it stops the call at its next chunk / time-step / iteration boundary: the Promise rejects with ERR_ABORTED. */
  signal?: AbortSignal | null;
}

/** Performs a native call (in either form) and gives back its result. */
export function* nativeCall<R>(invoke: (n: NativeModule) => R): Generator<NativeStep, R, unknown> {
  return (yield { invoke }) as R;
}

/** Whether a value is a generator of native calls (what an op's forward/backward returns). */
export function isSteps(x: unknown): x is Steps<unknown> {
  const g = x as { next?: unknown; throw?: unknown; [Symbol.iterator]?: unknown } | null;
  return (
    typeof g === 'object' &&
    g !== null &&
    typeof g.next === 'function' &&
    typeof g.throw === 'function' &&
    typeof g[Symbol.iterator] === 'function'
  );
}

/** A value, or the result of the native calls that make it. */
export function* stepsOf<R>(x: R | Steps<R>): Steps<R> {
  return isSteps(x) ? ((yield* x) as R) : x;
}

/** Runs the calls on the JavaScript thread. */
export function runSync<R>(steps: Steps<R>): R {
  let r = steps.next();
  while (!r.done) {
    let value: unknown;
    let failure: { e: unknown } | null = null;
    try {
      value = r.value.invoke(native());
    } catch (e) {
      failure = { e };
    }
    r = failure ? steps.throw(failure.e) : steps.next(value);
  }
  return r.value;
}

/** Runs the calls' kernels off the JavaScript thread, one after another. */
export async function runAsync<R>(steps: Steps<R>, signal: AbortSignal | null): Promise<R> {
  let r = steps.next();
  while (!r.done) {
    let value: unknown;
    let failure: { e: unknown } | null = null;
    try {
      value = await invokeAsync(r.value, signal);
    } catch (e) {
      failure = { e };
    }
    r = failure ? steps.throw(failure.e) : steps.next(value);
  }
  return r.value;
}

/** How much of a call's inputs is copied per turn of the event loop (a few milliseconds of copying). */
const COPY_SLICE_BYTES = 4 << 20;
/**
 * How long the JavaScript thread waits for a call to finish before it returns to the event loop: a
 * short call then settles without the wake-up of the loop (tens of microseconds on some machines).
 */
const SHORT_CALL_MICROS = 30;

async function invokeAsync(step: NativeStep, signal: AbortSignal | null): Promise<unknown> {
  throwIfAborted(signal);
  const { out, promise, job } = step.invoke(asyncNative()) as AsyncCallResult;
  if (!promise || job === undefined) return out; // the call queued no kernel: its result is complete
  const n = native();
  const onAbort = (): void => n.asyncCancel(job);
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    // The inputs are copied on this thread in slices, the event loop running in between.
    while (!n.asyncCopy(job, COPY_SLICE_BYTES)) await new Promise<void>((resolve) => setImmediate(resolve));
    n.asyncPoll(job, SHORT_CALL_MICROS);
    await promise;
  } catch (e) {
    const err = fromNative(e);
    if (err instanceof AbortedError && signal?.aborted) throw new AbortedError(err.message, signal.reason);
    throw err;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  return out;
}

type AsyncCallResult = ReturnType<NativeModule['asyncCall']>;
let asyncModule: NativeModule | undefined;
/** The addon's functions, each made through asyncCall (errors typed like native()'s). */
function asyncNative(): NativeModule {
  if (!asyncModule) {
    const n = native();
    const raw = rawNative();
    asyncModule = Object.fromEntries(
      Object.entries(raw).map(([k, f]) => [
        k,
        typeof f === 'function' ? (...args: unknown[]) => n.asyncCall(f as (...a: unknown[]) => unknown, ...args) : f,
      ]),
    ) as unknown as NativeModule;
  }
  return asyncModule;
}

/** Throws ERR_ABORTED if the signal is aborted. */
export function throwIfAborted(signal: AbortSignal | null, what = 'the call'): void {
  if (signal?.aborted) throw new AbortedError(`${what} was aborted before it started`, signal.reason);
}

/** Reads `signal` of an async call's options: an AbortSignal, or absent. */
export function readSignal(op: string, signal: unknown): AbortSignal | null {
  if (signal === undefined || signal === null) return null;
  if (!(signal instanceof AbortSignal))
    throw new ArgumentError(`${op}: options.signal must be an AbortSignal, got ${typeof signal}`);
  return signal;
}

/**
 * Splits the options of an async op call into the op's own options and the signal. Anything that
 * is not a plain options object goes to the op untouched (its own checks then reject it).
 */
export function splitSignal<Opt>(
  op: string,
  options: (Opt & AsyncOptions) | undefined,
): { options: Opt | undefined; signal: AbortSignal | null } {
  if (typeof options !== 'object' || options === null || Array.isArray(options) || !Object.hasOwn(options, 'signal'))
    return { options, signal: null };
  const { signal, ...rest } = options as Opt & AsyncOptions;
  return { options: rest as Opt, signal: readSignal(op, signal) };
}
