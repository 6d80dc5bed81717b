/**
 * Tensors (row-major, contiguous), dtypes, devices, the CUDA runtime namespace and memory stats.
 *
 * CPU storage is a TypedArray: Float32Array for float32, Uint16Array holding the raw bits for
 * float16/bfloat16. CUDA storage is a native device buffer, freed by dispose() or, as a backup,
 * when the tensor is garbage collected.
 */
import { ArgumentError, DTypeError, DeviceError, DisposedError, ShapeError } from './errors';
import { native, type DeviceBuffer, type Storage } from './native';
import { clearHostPool, pooledHostBytes, releaseHostBuffer } from './pool';

export type DType = 'float32' | 'float16' | 'bfloat16';
export type Device = 'cpu' | 'cuda';
export const DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16'];
export const DEVICES: readonly Device[] = ['cpu', 'cuda'];

export function dtypeBytes(d: DType): number {
  return d === 'float32' ? 4 : 2;
}

// ------------------------------------------------------------------ live tensor accounting
const live = { cpu: { tensors: 0, bytes: 0 }, cuda: { tensors: 0, bytes: 0 } };
interface Held { device: Device; bytes: number; counted: boolean }
const registry = new FinalizationRegistry<Held>((held) => {
  if (!held.counted) return;
  held.counted = false;
  live[held.device].tensors--;
  live[held.device].bytes -= held.bytes;
});

const disposeSymbol: symbol = (Symbol as unknown as { dispose?: symbol }).dispose ?? Symbol.for('nodejs.dispose');

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

export interface TensorOptions {
  dtype?: DType;
  device?: Device;
}

export class Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly device: Device;
  readonly size: number;
  #storage: Storage | null;
  #owner: Tensor | null;
  #held: Held;

  /**
   * Wraps existing storage (no copy). Prefer Tensor.from / Tensor.zeros. `owner` makes this a view
   * of storage another tensor owns: not counted in memory(), unusable once the owner is disposed.
   */
  constructor(storage: Storage, shape: readonly number[], dtype: DType, device: Device, owner?: Tensor) {
    this.size = checkShape(shape, 'Tensor');
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.device = device;
    this.#storage = storage;
    const bytes = this.size * dtypeBytes(dtype);
    this.#owner = owner ?? null;
    this.#held = { device, bytes, counted: !owner };
    if (owner) return;
    live[device].tensors++;
    live[device].bytes += bytes;
    registry.register(this, this.#held, this);
  }

  /**
   * Creates a tensor from numbers or a TypedArray. A Float32Array (for float32) or a Uint16Array of
   * raw bits (for float16/bfloat16) backs a CPU tensor without a copy; anything else is converted.
   */
  static from(data: ArrayLike<number>, shape: readonly number[], options: TensorOptions = {}): Tensor {
    const dtype = options.dtype ?? 'float32';
    const device = options.device ?? 'cpu';
    checkDType(dtype, 'Tensor.from', 'dtype');
    checkDevice(device, 'Tensor.from');
    const n = checkShape(shape, 'Tensor.from');
    if (data == null || typeof (data as ArrayLike<number>).length !== 'number')
      throw new ArgumentError('Tensor.from: data must be an array or a TypedArray');
    if (data.length !== n)
      throw new ShapeError(`Tensor.from: data has ${data.length} elements, shape [${shape.join(',')}] needs ${n}`);
    let storage: Float32Array | Uint16Array;
    if (dtype === 'float32') {
      storage = data instanceof Float32Array ? data : Float32Array.from(data);
    } else if (data instanceof Uint16Array) {
      storage = data;
    } else {
      const f32 = data instanceof Float32Array ? data : Float32Array.from(data);
      storage = native().convert('cpu', f32, 'float32', dtype, n) as Uint16Array;
    }
    const t = new Tensor(storage, shape, dtype, 'cpu');
    return device === 'cpu' ? t : t.#moveAndDispose(device);
  }

  static zeros(shape: readonly number[], options: TensorOptions = {}): Tensor {
    const dtype = options.dtype ?? 'float32';
    checkDType(dtype, 'Tensor.zeros', 'dtype');
    const n = checkShape(shape, 'Tensor.zeros');
    const storage = dtype === 'float32' ? new Float32Array(n) : new Uint16Array(n);
    const t = new Tensor(storage, shape, dtype, 'cpu');
    const device = options.device ?? 'cpu';
    checkDevice(device, 'Tensor.zeros');
    return device === 'cpu' ? t : t.#moveAndDispose(device);
  }

  /** Raw storage; throws ERR_DISPOSED once disposed. For ops and advanced use. */
  get storage(): Storage {
    if (this.#storage === null) throw new DisposedError('Tensor: this tensor was disposed');
    if (this.#owner?.disposed) throw new DisposedError('Tensor: the tensor this view was made from was disposed');
    const s = this.#storage;
    if (this.device === 'cuda' && (s as DeviceBuffer).disposed)
      throw new DisposedError('Tensor: the device buffer of this tensor was freed');
    return s;
  }

  /** True once dispose() was called, or, for a view, once the tensor it views was disposed. */
  get disposed(): boolean {
    return this.#storage === null || (this.#owner?.disposed ?? false);
  }

  /** Copies to another device and/or converts to another dtype. Returns `this` when nothing changes. */
  to(target: Device | { device?: Device; dtype?: DType }): Tensor {
    if (typeof target !== 'string' && (target === null || typeof target !== 'object'))
      throw new ArgumentError(`Tensor.to: expected a device or { device, dtype }, got ${String(target)}`);
    const device = typeof target === 'string' ? target : (target.device ?? this.device);
    const dtype = typeof target === 'string' ? this.dtype : (target.dtype ?? this.dtype);
    checkDevice(device, 'Tensor.to');
    checkDType(dtype, 'Tensor.to', 'dtype');
    let t: Tensor = this;
    if (dtype !== this.dtype) {
      t = new Tensor(native().convert(this.device, this.storage, this.dtype, dtype, this.size), this.shape, dtype,
        this.device);
    }
    if (device !== t.device) {
      const moved = t.#copyTo(device);
      if (t !== this) t.dispose();
      t = moved;
    }
    return t;
  }

  #copyTo(device: Device): Tensor {
    if (device === 'cuda') requireCuda('Tensor.to');
    return new Tensor(native().copy(this.storage, this.device, device, this.dtype, this.size), this.shape, this.dtype,
      device);
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
    return this.#copyTo(this.device);
  }

  /** A view with a new shape (same number of elements) over the same storage, which stays owned by this tensor. */
  reshape(shape: readonly number[]): Tensor {
    const n = checkShape(shape, 'Tensor.reshape');
    if (n !== this.size)
      throw new ShapeError(`Tensor.reshape: cannot view [${this.shape.join(',')}] as [${shape.join(',')}]`);
    return new Tensor(this.storage, shape, this.dtype, this.device, this.#owner ?? this);
  }

  /**
   * The raw contents: on CPU the backing TypedArray itself (no copy), on CUDA a copy read back
   * after the queued work finishes. float16/bfloat16 come as Uint16Array bits (see toFloat32Array).
   */
  dataSync(): Float32Array | Uint16Array {
    if (this.device === 'cpu') return this.storage as Float32Array | Uint16Array;
    return native().copy(this.storage, 'cuda', 'cpu', this.dtype, this.size) as Float32Array | Uint16Array;
  }

  async data(): Promise<Float32Array | Uint16Array> {
    return this.dataSync();
  }

  /** Contents decoded to float32 (a copy unless CPU float32). */
  toFloat32Array(): Float32Array {
    const raw = this.dataSync();
    if (this.dtype === 'float32') return raw as Float32Array;
    return native().convert('cpu', raw, this.dtype, 'float32', this.size) as Float32Array;
  }

  /**
   * Frees the storage now: device memory at once on CUDA; on CPU, a large output buffer the
   * package allocated goes back to a pool for reuse by later outputs, so do not keep arrays read
   * with dataSync() past dispose(). Further use of the tensor throws ERR_DISPOSED.
   */
  dispose(): void {
    if (this.#storage === null) return;
    if (this.#held.counted) {
      if (this.device === 'cuda') (this.#storage as DeviceBuffer).dispose();
      else releaseHostBuffer(this.#storage as Float32Array | Uint16Array);
    }
    this.#storage = null;
    registry.unregister(this);
    if (this.#held.counted) {
      this.#held.counted = false;
      live[this.device].tensors--;
      live[this.device].bytes -= this.#held.bytes;
    }
  }

  [disposeSymbol](): void {
    this.dispose();
  }

  toString(): string {
    return `Tensor(shape=[${this.shape.join(',')}], dtype=${this.dtype}, device=${this.device}${this.disposed ? ', disposed' : ''})`;
  }
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
