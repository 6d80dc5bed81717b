/**
 * Tensors (row-major, contiguous), dtypes, devices, the CUDA runtime namespace and memory stats.
 *
 * CPU storage is a TypedArray: Float32Array for float32, Uint16Array holding the raw bits for
 * float16/bfloat16, over a plain (not shared, not resizable) ArrayBuffer. CUDA storage is a native
 * device buffer, freed by dispose() or, as a backup, when the tensor is garbage collected.
 *
 * Tensors cannot be structured-cloned (worker.postMessage, structuredClone): that throws a
 * DataCloneError. Post `t.dataSync()` with the shape and dtype and rebuild with Tensor.from.
 */
import { types } from 'node:util';
import {
  ArgumentError,
  BusyError,
  DTypeError,
  DeviceError,
  DisposedError,
  OutOfMemoryError,
  ShapeError,
  fromNative,
} from './errors';
import { nativeCall, runAsync } from './async';
import { native, type DeviceBuffer, type Storage } from './native';
import { claimHostBuffer, clearHostPool, disownHostBuffer, pooledHostBytes, releaseHostBuffer } from './pool';

export type DType = 'float32' | 'float16' | 'bfloat16';
export type Device = 'cpu' | 'cuda';
export const DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
export const DEVICES: readonly Device[] = ['cpu', 'cuda'];

export function dtypeBytes(d: DType): number {
  return d === 'float32' ? 4 : 2;
}

// ------------------------------------------------------------------ live tensor accounting
const live = { cpu: { tensors: 0, bytes: 0 }, cuda: { tensors: 0, bytes: 0 } };
interface Held {
  device: Device;
  bytes: number;
  counted: boolean;
}
const registry = new FinalizationRegistry<Held>((held) => {
  if (!held.counted) return;
  held.counted = false;
  live[held.device].tensors--;
  live[held.device].bytes -= held.bytes;
});

function checkShape(shape: readonly number[], what: string): number {
  if (!Array.isArray(shape)) throw new ShapeError(`${what}: shape must be an array of integers`);
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0)
      throw new ShapeError(`${what}: shape [${shape.join(',')}] has an invalid dimension ${d}`);
    n *= d;
  }
  if (!Number.isSafeInteger(n)) throw new ShapeError(`${what}: shape [${shape.join(',')}] is too large`);
  return n;
}

/** A short description of a value for error messages ('an array', 'a Uint8Array', 'null', ...). */
function describe(x: unknown): string {
  if (x === null) return 'null';
  if (Array.isArray(x)) return 'an array';
  if (ArrayBuffer.isView(x)) return `a ${x.constructor?.name ?? 'TypedArray'}`;
  if (x instanceof Tensor) return "an object with Tensor's prototype that the Tensor constructor did not make";
  return typeof x === 'object' ? `an object (${(x as object).constructor?.name ?? 'no prototype'})` : typeof x;
}

/** The error for a value that should be a Tensor; arrays get a pointer to Tensor.from. */
function notATensor(what: string, x: unknown): ArgumentError {
  const hint = Array.isArray(x) || ArrayBuffer.isView(x) ? '; make one with Tensor.from(data, shape)' : '';
  return new ArgumentError(`${what}: not a Tensor, got ${describe(x)}${hint}`);
}

/** Whether an ArrayBuffer was detached (transferred away); a detached buffer cannot back a new view. */
function isDetached(buf: ArrayBufferLike): boolean {
  if (buf.byteLength !== 0 || types.isSharedArrayBuffer(buf)) return false;
  try {
    new Uint8Array(buf);
    return false;
  } catch {
    return true;
  }
}

/** Why a TypedArray cannot be used as storage without a copy ('' when it can). */
function unsupportedBuffer(a: ArrayBufferView): string {
  if (types.isSharedArrayBuffer(a.buffer)) return 'is backed by a SharedArrayBuffer (shared memory is not supported)';
  if ((a.buffer as { resizable?: boolean }).resizable) return 'is backed by a resizable ArrayBuffer (not supported)';
  if (isDetached(a.buffer)) return 'has a detached ArrayBuffer (it was transferred)';
  return '';
}

/** Checks the storage handed to the Tensor constructor against its shape, dtype and device. */
function checkStorage(storage: unknown, size: number, shape: readonly number[], dtype: DType, device: Device): void {
  const need = `shape [${shape.join(',')}] needs ${size}`;
  if (device === 'cuda') {
    if (!(storage instanceof native().DeviceBuffer))
      throw new ArgumentError(`Tensor: storage of a cuda tensor must be a DeviceBuffer, got ${describe(storage)}`);
    if (storage.disposed) throw new DisposedError('Tensor: storage is a DeviceBuffer that was freed');
    if (storage.bytes !== size * dtypeBytes(dtype))
      throw new ShapeError(`Tensor: storage holds ${storage.bytes / dtypeBytes(dtype)} ${dtype} elements, ${need}`);
    return;
  }
  const want = dtype === 'float32' ? 'Float32Array' : 'Uint16Array';
  const ok = dtype === 'float32' ? types.isFloat32Array(storage) : types.isUint16Array(storage);
  if (!ok) {
    const Err = ArrayBuffer.isView(storage) ? DTypeError : ArgumentError;
    throw new Err(`Tensor: storage of a cpu ${dtype} tensor must be a ${want}, got ${describe(storage)}`);
  }
  const a = storage as Float32Array | Uint16Array;
  const why = unsupportedBuffer(a);
  if (why) throw new ArgumentError(`Tensor: storage ${why}`);
  if (a.length !== size) throw new ShapeError(`Tensor: storage has ${a.length} elements, ${need}`);
}

/** Reads the `{ dtype, device }` options of Tensor.from / Tensor.zeros (null or undefined: defaults). */
function readOptions(options: unknown, what: string): TensorOptions {
  if (options === undefined || options === null) return {};
  if (typeof options !== 'object' || Array.isArray(options))
    throw new ArgumentError(`${what}: options must be an object like { dtype, device }, got ${describe(options)}`);
  return options as TensorOptions;
}

/** Runs an allocation of `bytes`; an engine RangeError (too large for a TypedArray, or no memory) becomes ERR_OUT_OF_MEMORY. */
function allocate<T>(what: string, bytes: number, make: () => T): T {
  try {
    return make();
  } catch (e) {
    if (e instanceof RangeError) throw new OutOfMemoryError(`${what}: cannot allocate ${bytes} bytes (${e.message})`);
    throw e;
  }
}

/**
 * The value of each tensor's own `notCloneable` property. The structured clone algorithm
 * (worker.postMessage, structuredClone, v8.serialize) copies own enumerable properties and
 * cannot copy a symbol, so cloning a tensor throws a DataCloneError whose message starts with this
 * description, instead of delivering a data-less { shape, dtype, device, size } object.
 */
const NOT_CLONEABLE = Symbol(
  'a recurrent-kernels Tensor cannot be cloned or posted to a worker; post ' +
    't.dataSync() with its shape and dtype, and rebuild it with Tensor.from',
);

// ------------------------------------------------------------------ hooks for autograd and tidy
/**
 * Set by lib/autograd.ts, which imports this file (so this file cannot import it): `created` sees
 * every tensor made (with the tensor it views, if any), for rk.tidy; `derived` sees every tensor
 * that reshape, clone or to() makes from another, so that a recording tape differentiates through it.
 */
export interface TensorHooks {
  created(t: Tensor, owner: Tensor | null): void;
  derived(kind: 'reshape' | 'clone' | 'to', src: Tensor, out: Tensor): void;
}
let tensorHooks: TensorHooks | undefined;
export function setTensorHooks(hooks: TensorHooks): void {
  tensorHooks = hooks;
}

export interface TensorOptions {
  dtype?: DType;
  device?: Device;
}

/** Set by the Tensor class: adds d to the in-flight count of a tensor (and of the tensor it views). */
let addBusy: (t: Tensor, d: number) => void;
/** Set by the Tensor class; see lendStorage. */
let uncount: (t: Tensor) => void;

/**
 * Hands a CPU tensor's storage over to another owner (a framework that wraps the array without a
 * copy): the tensor stays usable but no longer counts in memory(), and its buffer never goes back
 * to the output pool (dispose() then only drops the tensor's reference).
 */
export function lendStorage(t: Tensor): Float32Array | Uint16Array {
  const s = t.storage as Float32Array | Uint16Array;
  uncount(t);
  disownHostBuffer(s);
  return s;
}
/**
 * Marks tensors as in use by an async call until the returned function is called: dispose() of any
 * of them (or of the tensor one views) meanwhile throws ERR_BUSY.
 */
export function pinTensors(tensors: Iterable<Tensor>): () => void {
  const list = [...tensors];
  for (const t of list) addBusy(t, 1);
  let done = false;
  return () => {
    if (done) return;
    done = true;
    for (const t of list) addBusy(t, -1);
  };
}

export class Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly device: Device;
  readonly size: number;
  #storage: Storage | null;
  #owner: Tensor | null;
  #held: Held;
  #busy = 0; // async calls in flight that use this tensor or a view of it

  static {
    addBusy = (t, d) => {
      t.#busy += d;
      if (t.#owner) t.#owner.#busy += d;
    };
    uncount = (t) => {
      const root = t.#owner ?? t;
      if (!root.#held.counted) return;
      root.#held.counted = false;
      registry.unregister(root);
      live[root.device].tensors--;
      live[root.device].bytes -= root.#held.bytes;
    };
  }

  /**
   * Wraps existing storage (no copy). Prefer Tensor.from / Tensor.zeros. The storage must match
   * the dtype and device (a Float32Array for cpu float32, a Uint16Array of raw bits for cpu
   * float16/bfloat16, over a plain ArrayBuffer; a DeviceBuffer for cuda) and hold exactly the
   * shape's number of elements. `owner` makes this a view of storage another tensor owns: not
   * counted in memory(), unusable once the owner is disposed.
   */
  constructor(storage: Storage, shape: readonly number[], dtype: DType, device: Device, owner?: Tensor) {
    checkDevice(device, 'Tensor');
    checkDType(dtype, 'Tensor', 'dtype');
    this.size = checkShape(shape, 'Tensor');
    checkStorage(storage, this.size, shape, dtype, device);
    if (owner !== undefined && !Tensor.isTensor(owner)) throw notATensor('Tensor: owner', owner);
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.device = device;
    Object.defineProperty(this, 'notCloneable', { value: NOT_CLONEABLE, enumerable: true });
    this.#storage = storage;
    const bytes = this.size * dtypeBytes(dtype);
    this.#owner = owner ?? null;
    this.#held = { device, bytes, counted: !owner };
    tensorHooks?.created(this, owner ?? null);
    if (owner) return;
    if (device === 'cpu') claimHostBuffer(storage as Float32Array | Uint16Array);
    live[device].tensors++;
    live[device].bytes += bytes;
    registry.register(this, this.#held, this);
  }

  /** Whether `x` is a tensor made by this class (not merely an object with Tensor's prototype). */
  static isTensor(x: unknown): x is Tensor {
    return typeof x === 'object' && x !== null && #storage in x;
  }

  /** Throws ERR_ARGUMENT unless `self` (the `this` of a method) is a real tensor. */
  static #check(self: unknown, method: string): void {
    if (!Tensor.isTensor(self)) throw notATensor(`Tensor.${method}`, self);
  }

  /**
   * Creates a tensor from numbers or a TypedArray. A Float32Array (for float32) or a Uint16Array of
   * raw bits (for float16/bfloat16) backs a CPU tensor without a copy; anything else is converted.
   * An array backed by a SharedArrayBuffer or a resizable ArrayBuffer is copied (tensor storage is
   * never shared memory). `options` may be omitted or null (float32 on the CPU).
   */
  static from(data: ArrayLike<number>, shape: readonly number[], options?: TensorOptions | null): Tensor {
    const opts = readOptions(options, 'Tensor.from');
    const dtype = opts.dtype ?? 'float32';
    const device = opts.device ?? 'cpu';
    checkDType(dtype, 'Tensor.from', 'dtype');
    checkDevice(device, 'Tensor.from');
    const n = checkShape(shape, 'Tensor.from');
    if (Tensor.isTensor(data))
      throw new ArgumentError('Tensor.from: data is already a Tensor (use clone(), reshape() or to())');
    const length = (data as ArrayLike<number> | null | undefined)?.length;
    if (typeof data !== 'object' || data === null || typeof length !== 'number')
      throw new ArgumentError('Tensor.from: data must be an array or a TypedArray');
    if (ArrayBuffer.isView(data) && isDetached(data.buffer))
      throw new ArgumentError('Tensor.from: data has a detached ArrayBuffer (it was transferred)');
    if (length !== n)
      throw new ShapeError(`Tensor.from: data has ${length} elements, shape [${shape.join(',')}] needs ${n}`);
    // Wrapped as is only when the array is of the storage type over a plain ArrayBuffer.
    const direct = ArrayBuffer.isView(data) && !unsupportedBuffer(data) ? data : null;
    const copy = <T>(bytes: number, make: () => T) => allocate('Tensor.from: copying data', bytes, make);
    let storage: Float32Array | Uint16Array;
    if (dtype === 'float32') {
      storage = types.isFloat32Array(direct) ? direct : copy(n * 4, () => Float32Array.from(data));
    } else if (types.isUint16Array(data)) {
      storage = types.isUint16Array(direct) ? direct : copy(n * 2, () => new Uint16Array(data));
    } else {
      const f32 = types.isFloat32Array(direct) ? direct : copy(n * 4, () => Float32Array.from(data));
      storage = native().convert('cpu', f32, 'float32', dtype, n) as Uint16Array;
    }
    const t = new Tensor(storage, shape, dtype, 'cpu');
    return device === 'cpu' ? t : t.#moveAndDispose(device);
  }

  /** A tensor of zeros. `options` may be omitted or null (float32 on the CPU). */
  static zeros(shape: readonly number[], options?: TensorOptions | null): Tensor {
    const opts = readOptions(options, 'Tensor.zeros');
    const dtype = opts.dtype ?? 'float32';
    const device = opts.device ?? 'cpu';
    checkDType(dtype, 'Tensor.zeros', 'dtype');
    checkDevice(device, 'Tensor.zeros');
    const n = checkShape(shape, 'Tensor.zeros');
    const storage = allocate(`Tensor.zeros: shape [${shape.join(',')}]`, n * dtypeBytes(dtype), () =>
      dtype === 'float32' ? new Float32Array(n) : new Uint16Array(n),
    );
    const t = new Tensor(storage, shape, dtype, 'cpu');
    return device === 'cpu' ? t : t.#moveAndDispose(device);
  }

  /** Raw storage; throws ERR_DISPOSED once disposed. For ops and advanced use. */
  get storage(): Storage {
    Tensor.#check(this, 'storage');
    if (this.#storage === null) throw new DisposedError('Tensor: this tensor was disposed');
    if (this.#owner?.disposed) throw new DisposedError('Tensor: the tensor this view was made from was disposed');
    const s = this.#storage;
    if (this.device === 'cuda' && (s as DeviceBuffer).disposed)
      throw new DisposedError('Tensor: the device buffer of this tensor was freed');
    if (this.device === 'cpu' && this.#detached())
      throw new DisposedError('Tensor: the ArrayBuffer of this tensor was detached (transferred away)');
    return s;
  }

  /**
   * True once dispose() was called, or, for a view, once the tensor it views was disposed; also
   * when the ArrayBuffer of a CPU tensor was detached (transferred away).
   */
  get disposed(): boolean {
    Tensor.#check(this, 'disposed');
    return this.#storage === null || (this.#owner?.disposed ?? false) || (this.device === 'cpu' && this.#detached());
  }

  /** Whether the CPU storage lost its memory to a transfer (its length no longer matches). */
  #detached(): boolean {
    const s = this.#storage as Float32Array | Uint16Array;
    return s.length !== this.size || (this.size === 0 && isDetached(s.buffer));
  }

  /** Copies to another device and/or converts to another dtype. Returns `this` when nothing changes. */
  to(target: Device | { device?: Device; dtype?: DType }): Tensor {
    Tensor.#check(this, 'to');
    if (typeof target !== 'string' && (target === null || typeof target !== 'object'))
      throw new ArgumentError(`Tensor.to: expected a device or { device, dtype }, got ${String(target)}`);
    const device = typeof target === 'string' ? target : (target.device ?? this.device);
    const dtype = typeof target === 'string' ? this.dtype : (target.dtype ?? this.dtype);
    checkDevice(device, 'Tensor.to');
    checkDType(dtype, 'Tensor.to', 'dtype');
    let t: Tensor = this;
    if (dtype !== this.dtype) {
      t = new Tensor(
        native().convert(this.device, this.storage, this.dtype, dtype, this.size),
        this.shape,
        dtype,
        this.device,
      );
    }
    if (device !== t.device) {
      const moved = t.#copyTo(device);
      if (t !== this) t.dispose();
      t = moved;
    }
    if (t !== this) tensorHooks?.derived('to', this, t);
    return t;
  }

  #copyTo(device: Device): Tensor {
    if (device === 'cuda') requireCuda('Tensor.to');
    return new Tensor(
      native().copy(this.storage, this.device, device, this.dtype, this.size),
      this.shape,
      this.dtype,
      device,
    );
  }

  #moveAndDispose(device: Device): Tensor {
    try {
      return this.#copyTo(device);
    } finally {
      this.dispose();
    }
  }

  /** A copy with its own storage. */
  clone(): Tensor {
    Tensor.#check(this, 'clone');
    const copy = this.#copyTo(this.device);
    tensorHooks?.derived('clone', this, copy);
    return copy;
  }

  /** A view with a new shape (same number of elements) over the same storage, which stays owned by this tensor. */
  reshape(shape: readonly number[]): Tensor {
    Tensor.#check(this, 'reshape');
    const n = checkShape(shape, 'Tensor.reshape');
    if (n !== this.size)
      throw new ShapeError(`Tensor.reshape: cannot view [${this.shape.join(',')}] as [${shape.join(',')}]`);
    const view = new Tensor(this.storage, shape, this.dtype, this.device, this.#owner ?? this);
    // While a tape records, the view is recorded on it (its gradient is the view's, reshaped back).
    tensorHooks?.derived('reshape', this, view);
    return view;
  }

  /**
   * The raw contents: on CPU the backing TypedArray itself (no copy), on CUDA a copy read back
   * after the queued work finishes. float16/bfloat16 come as Uint16Array bits (see toFloat32Array).
   */
  dataSync(): Float32Array | Uint16Array {
    Tensor.#check(this, 'dataSync');
    if (this.device === 'cpu') return this.storage as Float32Array | Uint16Array;
    return native().copy(this.storage, 'cuda', 'cpu', this.dtype, this.size) as Float32Array | Uint16Array;
  }

  /**
   * The raw contents, like dataSync(); on CUDA the copy waits for the queued work off the
   * JavaScript thread.
   */
  async data(): Promise<Float32Array | Uint16Array> {
    Tensor.#check(this, 'data');
    if (this.device === 'cpu') return this.dataSync();
    const storage = this.storage;
    const unpin = pinTensors([this]);
    try {
      return (await runAsync(
        nativeCall((n) => n.copy(storage, 'cuda', 'cpu', this.dtype, this.size)),
        null,
      )) as Float32Array | Uint16Array;
    } finally {
      unpin();
    }
  }

  /** Contents decoded to float32 (a copy unless CPU float32). */
  toFloat32Array(): Float32Array {
    Tensor.#check(this, 'toFloat32Array');
    const raw = this.dataSync();
    if (this.dtype === 'float32') return raw as Float32Array;
    return native().convert('cpu', raw, this.dtype, 'float32', this.size) as Float32Array;
  }

  /**
   * Frees the storage now: device memory at once on CUDA; on CPU, a large output buffer the
   * package allocated goes back to a pool for reuse by later outputs, and arrays read from it
   * with dataSync() (or `storage`) become empty (their ArrayBuffer is detached). Further use of
   * the tensor throws ERR_DISPOSED. While an async call that uses the tensor (or a view of it) is
   * in flight, dispose() throws ERR_BUSY and changes nothing: await the call first.
   */
  dispose(): void {
    Tensor.#check(this, 'dispose');
    const storage = this.#storage;
    if (storage === null) return;
    if (this.#busy > 0 && this.#held.counted)
      throw new BusyError('Tensor.dispose: an async call that uses this tensor is in flight; await it first');
    // Bookkeeping first, so that the tensor counts as disposed even if freeing the storage fails.
    this.#storage = null;
    registry.unregister(this);
    if (!this.#held.counted) return; // a view: the owner frees the storage
    this.#held.counted = false;
    live[this.device].tensors--;
    live[this.device].bytes -= this.#held.bytes;
    if (this.device === 'cpu') {
      releaseHostBuffer(storage as Float32Array | Uint16Array);
      return;
    }
    try {
      (storage as DeviceBuffer).dispose();
    } catch (e) {
      throw fromNative(e);
    }
  }

  /** `using t = ...` disposes the tensor at the end of the block. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  /** How console.log and util.inspect show a tensor (the same as toString()). */
  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return Tensor.isTensor(this) ? this.toString() : 'Tensor (not made by the Tensor constructor)';
  }

  toString(): string {
    Tensor.#check(this, 'toString');
    return `Tensor(shape=[${this.shape.join(',')}], dtype=${this.dtype}, device=${this.device}${this.disposed ? ', disposed' : ''})`;
  }
}

// An object with Tensor's prototype that the constructor did not make has none of the fields; reading
// one is ERR_ARGUMENT. (A real tensor's own fields, defined when it is constructed, shadow these.)
for (const field of ['shape', 'dtype', 'device', 'size']) {
  Object.defineProperty(Tensor.prototype, field, {
    get(this: unknown) {
      throw notATensor(`Tensor.${field}`, this);
    },
    configurable: true,
  });
}

export function checkDType(d: unknown, op: string, arg: string): asserts d is DType {
  if (!DTYPES.includes(d as DType))
    throw new DTypeError(`${op}: ${arg} must be one of ${DTYPES.join(', ')}, got ${String(d)}`);
}
export function checkDevice(d: unknown, op: string): asserts d is Device {
  if (!DEVICES.includes(d as Device)) throw new DeviceError(`${op}: device must be 'cpu' or 'cuda', got ${String(d)}`);
}

// ------------------------------------------------------------------ CUDA runtime
export interface CudaDeviceProperties {
  name: string;
  computeCapability: string;
  multiProcessorCount: number;
  totalMemory: number;
  l2CacheSize: number;
  sharedMemoryPerBlockOptin: number;
  peakBandwidthGBs: number;
  driverVersion: number;
  runtimeVersion: number;
}

function requireCuda(op: string): void {
  const st = native().cudaStatus();
  if (!st.available) throw new DeviceError(`${op}: CUDA is not available (${st.reason})`);
}

export const cuda = {
  /** Whether CUDA tensors can be used in this process. */
  available(): boolean {
    return native().cudaStatus().available;
  },
  /** Why CUDA is not available ('' when it is). */
  reason(): string {
    return native().cudaStatus().reason;
  },
  /** Whether this binary was built with the CUDA path. */
  built(): boolean {
    return native().cudaStatus().built;
  },
  deviceProperties(): CudaDeviceProperties {
    requireCuda('cuda.deviceProperties');
    return native().cudaProperties() as unknown as CudaDeviceProperties;
  },
  /**
   * Milliseconds the CUDA work queued by fn takes, measured with CUDA events (for benchmarks;
   * synchronises).
   */
  timeMs(fn: () => void): number {
    if (typeof fn !== 'function') throw new ArgumentError('cuda.timeMs: fn must be a function');
    requireCuda('cuda.timeMs');
    const handle = native().timerStart();
    let ms = 0;
    try {
      fn();
    } finally {
      ms = native().timerStop(handle); // also releases the events when fn throws
    }
    return ms;
  },
  /** Waits for all queued CUDA work. */
  synchronize(): void {
    requireCuda('cuda.synchronize');
    native().cudaSynchronize();
  },
};

export interface MemoryStats {
  /** pooledBytes: disposed output buffers kept for reuse (see releaseCpuPool). */
  cpu: { tensors: number; bytes: number; pooledBytes: number };
  cuda: { tensors: number; bytes: number; nativeBuffers: number; nativeBytes: number };
}

/** Live (not disposed, not yet collected) tensors and their bytes per device. */
export function memory(): MemoryStats {
  const nat = native().memoryStats();
  return {
    cpu: { ...live.cpu, pooledBytes: pooledHostBytes() },
    cuda: { ...live.cuda, nativeBuffers: nat.deviceBuffers, nativeBytes: nat.deviceBytes },
  };
}

/** Drops the CPU buffers kept for reuse by disposed outputs. */
export function releaseCpuPool(): void {
  clearHostPool();
}

/** Number of threads the CPU kernels use (the same as `cpu.info().threads`). */
export function cpuThreads(): number {
  return native().numThreads();
}
