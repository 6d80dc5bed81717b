/**
 * Finds and loads the native addon: RK_NATIVE_PATH when set, then the prebuilt binary of this
 * platform's package (an optional dependency), then the local build (build/Release). If every
 * candidate fails, throws one ERR_NATIVE_LOAD error listing each attempt and how to build from source.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { ArgumentError, NativeLoadError, RecurrentKernelsError, fromNative } from './errors';
import { POOL_MIN_BYTES, acquireHostBuffer } from './pool';

/** Opaque CUDA storage owned by the addon. */
export interface DeviceBuffer {
  readonly bytes: number;
  readonly disposed: boolean;
  dispose(): void;
}
export type Storage = Float32Array | Uint16Array | DeviceBuffer;

/** Number of float32 elements held by float32 storage (a TypedArray, or a DeviceBuffer's bytes / 4). */
export function float32Elements(s: Storage): number {
  return 'bytes' in s ? s.bytes / 4 : s.length;
}
type Dev = 'cpu' | 'cuda';

export interface NativeModule {
  DeviceBuffer: new (bytes: number) => DeviceBuffer;
  cudaStatus(): { built: boolean; available: boolean; reason: string };
  cudaProperties(): Record<string, string | number>;
  cudaSynchronize(): void;
  copy(src: Storage, from: Dev, to: Dev, dtype: string, elements: number): Storage;
  convert(device: Dev, src: Storage, from: string, to: string, elements: number): Storage;
  setBufferSource(fn: (bytes: number) => ArrayBuffer, minBytes: number): void;
  memoryStats(): { deviceBytes: number; deviceBuffers: number };
  numThreads(): number;
  cpuInfo(): {
    isa: string; isasSupported: string[]; threads: number; runs: Record<string, number>; soloTeams: number;
    peakBusyThreads: number;
  };
  cpuSetStepStallForTesting(microseconds: number): void;
  cpuResetPeakForTesting(): void;
  cpuSetIsa(isa: string): void;
  cpuSetThreads(threads: number): void;
  /** fn(...args) as an async call: its kernel is queued (see cpp/napi/async.h). */
  asyncCall(fn: (...args: unknown[]) => unknown, ...args: unknown[]): { out: unknown; promise?: Promise<unknown>; job?: unknown };
  asyncCopy(job: unknown, maxBytes: number): boolean;
  asyncCancel(job: unknown): void;
  asyncPoll(job: unknown, microseconds: number): boolean;
  asyncStats(): { pending: number };
  timerStart(): unknown;
  timerStop(handle: unknown): number;
  // The ops' entry points: one request each, read by name (cpp/tensor/args.h, Request).
  linearScanForward(req: Request<{ a: Storage; b: Storage; h0: Storage | null },
    { rows: number; length: number; reverse: boolean; returnFinal: boolean }>):
    { h: Storage; finalState: Storage | null };
  linearScanBackward(req: Request<{ a: Storage; h0: Storage | null },
    { rows: number; length: number; reverse: boolean; needGh0: boolean },
    { h: Storage; gh: Storage | null; gFinal: Storage | null }>): { ga: Storage; gb: Storage; gh0: Storage | null };
  selectiveScanForward(req: Request<SelectiveScanTensors,
    SelectiveScanConfig & { cuSeqlens: Int32Array | null; returnFinal: boolean }>):
    { y: Storage; states: Storage; finalState: Storage | null };
  selectiveScanBackward(req: Request<SelectiveScanTensors,
    SelectiveScanConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
    { states: Storage; dy: Storage | null; dFinal: Storage | null }>): {
    du: Storage; ddelta: Storage; dA: Storage; dB: Storage; dC: Storage; dD: Storage | null; dz: Storage | null;
    dDeltaBias: Storage | null; dh0: Storage | null;
  };
  selectiveStateUpdate(req: Request<{
    state: Storage; x: Storage; dt: Storage; A: Storage; B: Storage; C: Storage; D: Storage | null;
    z: Storage | null; dtBias: Storage | null;
  }, {
    batch: number; dim: number; dstate: number; groups: number; tokens: number; deltaSoftplus: boolean;
    updateState: boolean; returnIntermediate: boolean;
  }>): { y: Storage; intermediate: Storage | null };
  gatedDeltaForward(req: Request<GatedDeltaTensors,
    GatedDeltaConfig & { cuSeqlens: Int32Array | null; returnFinal: boolean; keepStates: boolean }>):
    { o: Storage; states: Storage | null; finalState: Storage | null };
  gatedDeltaBackward(req: Request<GatedDeltaTensors, GatedDeltaConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
    { states: Storage; dO: Storage | null; dFinal: Storage | null }>):
    { dq: Storage; dk: Storage; dv: Storage; dg: Storage; dbeta: Storage; dh0: Storage | null };
  gatedDeltaStep(req: Request<{ state: Storage; q: Storage; k: Storage; v: Storage; g: Storage; beta: Storage },
    Omit<GatedDeltaConfig, 'T'> & { tokens: number; updateState: boolean; returnIntermediate: boolean }>):
    { o: Storage; intermediate: Storage | null };
  fusedRnnForward(req: Request<FusedRnnTensors, FusedRnnConfig & { lengths: Int32Array | null; training: boolean }>):
    { h: Storage; finalStates: Storage; savedStates: Storage | null; savedPre: Storage | null };
  fusedRnnBackward(req: Request<FusedRnnTensors, FusedRnnConfig & { lengths: Int32Array | null; needDStates0: boolean },
    { savedStates: Storage; savedPre: Storage; dh: Storage | null; dFinal: Storage | null }>):
    { dwx: Storage; dR: Storage; db: Storage; dStates0: Storage | null };
  newtonRnnForward(req: Request<NewtonRnnTensors, NewtonRnnConfig>): {
    y: Storage; traj: Storage; finalStates: Storage; iterations: Int32Array; residual: Float32Array;
    converged: Uint8Array; fellBack: Uint8Array;
  };
  newtonRnnBackward(req: Request<NewtonRnnTensors, NewtonRnnConfig & { needDh0: boolean },
    { traj: Storage; dy: Storage | null; dFinal: Storage | null }>):
    { dwx: Storage; dR: Storage; db: Storage; dh0: Storage | null };
}

/** The one argument of an op's native entry point: inputs, sizes and flags by name; grads for a backward. */
export interface Request<T, C, G = undefined> {
  device: Dev;
  dtype: string;
  tensors: T;
  config: C;
  grads?: G;
}

export interface FusedRnnTensors {
  wx: Storage; R: Storage; b: Storage; states0: Storage | null;
}
/** cell: 0 elman, 1 lstm, 2 gru, 3 slstm (rkcuda::CellKind). */
export interface FusedRnnConfig {
  cell: number; batch: number; T: number; heads: number; headDim: number; returnLastOnly: boolean;
}

export interface NewtonRnnTensors {
  wx: Storage; R: Storage; b: Storage; h0: Storage | null; guess: Storage | null;
}
/** cell: 0 gru-diag, 1 lstm-cifg-diag, 2 gru, 3 lstm, 4 elman; guess: 0 zeros, 1 one-step, 2 provided. */
export interface NewtonRnnConfig {
  cell: number; batch: number; T: number; heads: number; headDim: number; fullJacobian: boolean;
  sequential: boolean; fallbackSequential: boolean; maxIters: number; tolAbs: number; tolRel: number;
  damping: number; guess: number;
}

export interface GatedDeltaTensors {
  q: Storage; k: Storage; v: Storage; g: Storage; beta: Storage; h0: Storage | null;
}
export interface GatedDeltaConfig {
  batch: number; T: number; H: number; HV: number; K: number; V: number; scale: number; l2norm: boolean;
}

export interface SelectiveScanTensors {
  u: Storage; delta: Storage; A: Storage; B: Storage; C: Storage;
  D: Storage | null; z: Storage | null; deltaBias: Storage | null; h0: Storage | null;
}
export interface SelectiveScanConfig {
  batch: number; dim: number; seqlen: number; dstate: number; groups: number;
  variableB: boolean; variableC: boolean; deltaSoftplus: boolean;
}

function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj)) {
      try {
        if (JSON.parse(readFileSync(pj, 'utf8')).name === 'recurrent-kernels') return dir;
      } catch { /* keep looking */ }
    }
    dir = dirname(dir);
  }
  return join(__dirname, '..');
}

/** The package's version, from its package.json (the one place it is written). */
export function packageVersion(): string {
  try {
    const v: unknown = JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')).version;
    return typeof v === 'string' ? v : 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * The platform package holding this machine's prebuilt binary (`@recurrent-kernels/<os>-<cpu>[-<libc>]`),
 * as sharp and other native packages name theirs; null where none is published.
 */
export function platformPackage(): string | null {
  if (process.platform === 'linux') {
    const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
    const libc = report?.header?.glibcVersionRuntime ? 'gnu' : 'musl';
    return `@recurrent-kernels/linux-${process.arch}-${libc}`;
  }
  return null;
}

/** Published platform packages (the main package's optionalDependencies list the same). */
export const PLATFORM_PACKAGES: readonly string[] = ['@recurrent-kernels/linux-x64-gnu'];
export const PLATFORM_BINARY = 'recurrent-kernels.node';

/** Where to look, in order, each with a note when there is nothing to try. */
function candidates(root: string, req: NodeJS.Require): { path: string | null; label: string }[] {
  const out: { path: string | null; label: string }[] = [];
  if (process.env.RK_NATIVE_PATH) out.push({ path: process.env.RK_NATIVE_PATH, label: process.env.RK_NATIVE_PATH });
  const pkg = platformPackage();
  if (pkg && PLATFORM_PACKAGES.includes(pkg)) {
    try {
      const p = req.resolve(`${pkg}/${PLATFORM_BINARY}`);
      out.push({ path: p, label: p });
    } catch {
      out.push({ path: null, label: `${pkg}: not installed (an optional dependency; npm skips it with --omit=optional or --no-optional)` });
    }
  } else {
    out.push({ path: null, label: `no prebuilt binary is published for ${process.platform}-${process.arch}${pkg ? ` (${pkg})` : ''}` });
  }
  out.push({ path: join(root, 'build', 'Release', 'recurrent_kernels.node'), label: '' });
  out.push({ path: join(root, 'build', 'Debug', 'recurrent_kernels.node'), label: '' });
  return out;
}

let loadedFrom = '';
/** The file the addon was loaded from ('' before the first load). */
export function nativePath(): string {
  return loadedFrom;
}

function load(): NativeModule {
  const root = packageRoot();
  const req = createRequire(join(root, 'package.json'));
  const tried: string[] = [];
  for (const { path, label } of candidates(root, req)) {
    if (path === null) { tried.push(`  ${label}`); continue; }
    if (!existsSync(path)) { tried.push(`  ${path}: not found`); continue; }
    try {
      const raw = req(path) as NativeModule;
      const mod = wrap(raw);
      rawModule = raw;
      mod.setBufferSource(acquireHostBuffer, POOL_MIN_BYTES);
      applyCpuIsaEnv(mod);
      loadedFrom = path;
      return mod;
    } catch (e) {
      if (e instanceof RecurrentKernelsError && e.code === 'ERR_ARGUMENT') throw e;
      tried.push(`  ${path}: ${(e as Error).message}`);
    }
  }
  throw new NativeLoadError(
    `recurrent-kernels: could not load the native addon. Tried:\n${tried.join('\n')}\n` +
      `To build it from source, run \`npx recurrent-kernels build\` in your project (in a clone of the ` +
      `repository: \`npm run build\`). That needs a C++17 compiler and CMake (or node-gyp), and the build ` +
      `tools cmake-js and node-addon-api (the command says how to install them); nvcc on PATH adds the CUDA path.`);
}

/** RK_CPU_ISA asks for one variant of the CPU kernels: one this CPU cannot run is an error, not a fallback. */
function applyCpuIsaEnv(mod: NativeModule): void {
  const want = process.env.RK_CPU_ISA;
  if (want === undefined || want === '') return;
  try {
    mod.cpuSetIsa(want);
  } catch (e) {
    throw new ArgumentError(`RK_CPU_ISA: ${(e as Error).message.replace(/^cpu\.setIsa: /, '')}`);
  }
}

/** Every native function rethrows its errors as the typed error classes. */
function wrap(mod: NativeModule): NativeModule {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(mod)) {
    if (k === 'DeviceBuffer' && typeof v === 'function') {
      // Callable with or without `new`, errors typed; instances stay the native class's.
      const Native = v as unknown as new (bytes: unknown) => object;
      const ctor = function DeviceBuffer(bytes: unknown): object {
        try {
          return new Native(bytes);
        } catch (e) {
          throw fromNative(e);
        }
      };
      ctor.prototype = Native.prototype;
      out[k] = ctor;
    } else if (typeof v === 'function') {
      out[k] = (...args: unknown[]) => {
        try {
          return (v as (...a: unknown[]) => unknown)(...args);
        } catch (e) {
          throw fromNative(e);
        }
      };
    } else {
      out[k] = v;
    }
  }
  return out as unknown as NativeModule;
}

let cached: NativeModule | undefined;
let rawModule: NativeModule | undefined;
/** The addon's own functions (errors untyped), for asyncCall, which needs them as they are. */
export function rawNative(): NativeModule {
  native();
  return rawModule!;
}
/** The loaded addon (loaded on first use). */
export function native(): NativeModule {
  if (!cached) cached = load();
  return cached;
}
