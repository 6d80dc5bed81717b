/** Error classes. Every error thrown by the package is a RecurrentKernelsError with a stable `code`. */

export type ErrorCode =
  | 'ERR_SHAPE'
  | 'ERR_DTYPE'
  | 'ERR_DEVICE'
  | 'ERR_ARGUMENT'
  | 'ERR_DISPOSED'
  | 'ERR_CUDA'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_NATIVE_LOAD'
  | 'ERR_NOT_CONVERGED'
  | 'ERR_ABORTED'
  | 'ERR_BUSY';

export class RecurrentKernelsError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}
export class ShapeError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_SHAPE', message);
  }
}
export class DTypeError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_DTYPE', message);
  }
}
export class DeviceError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_DEVICE', message);
  }
}
export class ArgumentError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_ARGUMENT', message);
  }
}
export class DisposedError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_DISPOSED', message);
  }
}
export class CudaError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_CUDA', message);
  }
}
export class OutOfMemoryError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_OUT_OF_MEMORY', message);
  }
}
export class NativeLoadError extends RecurrentKernelsError {
  constructor(message: string, cause?: unknown) {
    super('ERR_NATIVE_LOAD', message, { cause });
  }
}
/** An iterative solver did not converge and the caller asked for an error instead of a fallback. */
export class NotConvergedError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_NOT_CONVERGED', message);
  }
}

/** An async call was aborted through its AbortSignal (`cause`: the signal's reason). */
export class AbortedError extends RecurrentKernelsError {
  constructor(message: string, cause?: unknown) {
    super('ERR_ABORTED', message, cause === undefined ? undefined : { cause });
  }
}
/** A tensor was disposed while an async call that uses it is in flight. */
export class BusyError extends RecurrentKernelsError {
  constructor(message: string) {
    super('ERR_BUSY', message);
  }
}

const byCode: Record<string, new (message: string) => RecurrentKernelsError> = {
  ERR_SHAPE: ShapeError,
  ERR_DTYPE: DTypeError,
  ERR_DEVICE: DeviceError,
  ERR_ARGUMENT: ArgumentError,
  ERR_DISPOSED: DisposedError,
  ERR_CUDA: CudaError,
  ERR_OUT_OF_MEMORY: OutOfMemoryError,
  ERR_ABORTED: AbortedError,
};

/** Turns an error thrown by the native addon (a plain Error with a `code`) into its typed class. */
export function fromNative(e: unknown): unknown {
  if (e instanceof RecurrentKernelsError) return e;
  const code = (e as { code?: unknown } | null)?.code;
  if (e instanceof Error && typeof code === 'string' && byCode[code]) {
    const err = new byCode[code](e.message);
    return err;
  }
  return e;
}
