/**
 * Finds and loads the native addon: RK_NATIVE_PATH when set, then the prebuilt binary of this
 * platform's package (an optional dependency), then the local build (build/Release). If every
 * candidate fails, throws one ERR_NATIVE_LOAD error listing each attempt and how to build from source.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { ArgumentError, NativeLoadError, RecurrentKernelsError, fromNative } from '../errors';
import { POOL_MIN_BYTES, acquireHostBuffer } from '../pool';
import type { NativeModule } from './addon';

function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj)) {
      try {
        if (JSON.parse(readFileSync(pj, 'utf8')).name === 'recurrent-kernels') return dir;
      } catch {
        /* keep looking */
      }
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
      out.push({
        path: null,
        label: `${pkg}: not installed (an optional dependency; npm skips it with --omit=optional or --no-optional)`,
      });
    }
  } else {
    out.push({
      path: null,
      label: `no prebuilt binary is published for ${process.platform}-${process.arch}${pkg ? ` (${pkg})` : ''}`,
    });
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
    if (path === null) {
      tried.push(`  ${label}`);
      continue;
    }
    if (!existsSync(path)) {
      tried.push(`  ${path}: not found`);
      continue;
    }
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
      `tools cmake-js and node-addon-api (the command says how to install them); nvcc on PATH adds the CUDA path.`,
  );
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
