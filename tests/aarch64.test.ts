// The CPU kernels' aarch64 variant (base, on NEON: 128-bit vectors through GCC's vector extensions),
// cross-compiled and run under user-mode emulation, against the native build of the same variant.
// tests/cpu-cross/driver.cpp runs every CPU kernel (selective scan, gated delta rule, linear attention,
// causal conv, fused cells, Newton RNN: forward, backward, decode steps; and the linear scan) on fixed pseudo-random inputs
// and writes every output array to a file. It is built twice from one copy of the sources, with the
// addon's optimisation flags: natively (where the base variant is SSE2 on x86-64) and with
// aarch64-linux-gnu-g++ (static, run by qemu-aarch64). The native results are checked against
// float64 references by the op tests, so agreement to rounding checks the NEON build: per array
// ||a - b|| / ||b|| < 1e-5, no element further off than 1e-4 (|b_i| + rms(b)), every value finite
// (the driver starts the outputs that kernels must fill as NaN). bfloat16 outputs may differ by
// one bfloat16 rounding step where the fp32 results straddle a rounding boundary.
// The aarch64 run must also report that the dispatching functions chose the base variant for
// every call and that it was compiled for NEON with 4-float hardware vectors, and its kernel
// objects must hold NEON 4-lane float arithmetic.
// Skipped when the cross compiler or qemu-aarch64 is missing, unless RK_REQUIRE_AARCH64=1 (as in
// CI when they could be installed), where that is a failure.
import { spawn } from 'node:child_process';
import {
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
} from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const required = process.env.RK_REQUIRE_AARCH64 === '1';

function findOnPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  return undefined;
}

const tools = {
  native: findOnPath('g++'),
  cross: findOnPath('aarch64-linux-gnu-g++'),
  qemu: findOnPath('qemu-aarch64'),
  objdump: findOnPath('aarch64-linux-gnu-objdump'),
};
const missing = [!tools.native && 'g++', !tools.cross && 'aarch64-linux-gnu-g++', !tools.qemu && 'qemu-aarch64'].filter(
  (x): x is string => !!x,
);
const title =
  missing.length === 0 || required
    ? 'CPU kernels on aarch64 (NEON, under qemu) match the native build'
    : `CPU kernels on aarch64 (NEON, under qemu) match the native build (skipped: ${missing.join(', ')} not on ` +
      'PATH; RK_REQUIRE_AARCH64=1 makes this a failure)';

// The addon's flags (CMakeLists.txt, binding.gyp).
const cxxFlags = ['-std=c++17', '-O3', '-fno-trapping-math', '-Wall', '-Wextra', '-I', 'cpp', '-I', '.'];

/**
 * The translation units of the driver, relative to a source tree: the driver, the shared CPU code
 * (cpp/common) and every op's CPU kernels (cpp/ops/<family>/<op>_cpu*.cc: the dispatching unit and
 * one per variant; the x86 variants compile to nothing elsewhere). The driver first (quick, and the
 * first to notice an interface change), then the fused cells' units (the slowest), then the rest.
 */
function unitsOf(src: string): string[] {
  const units: string[] = [];
  for (const f of readdirSync(join(src, 'cpp', 'common'))) if (f.endsWith('.cc')) units.push(`cpp/common/${f}`);
  for (const family of readdirSync(join(src, 'cpp', 'ops'))) {
    const dir = join(src, 'cpp', 'ops', family);
    if (!statSync(dir).isDirectory()) continue;
    for (const f of readdirSync(dir)) if (/_cpu(_\w+)?\.cc$/.test(f)) units.push(`cpp/ops/${family}/${f}`);
  }
  const rank = (u: string) => (u.startsWith('cpp/ops/cells/') ? 0 : 1);
  units.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  return ['tests/cpu-cross/driver.cpp', ...units];
}

interface Result {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  seconds: number;
}

/** Runs a command without blocking the event loop (so the builds and runs overlap). */
function run(cmd: string, args: string[], cwd: string, timeoutMs: number): Promise<Result> {
  const started = Date.now();
  return new Promise((resolve) => {
    const env = { ...process.env };
    delete env.RK_CPU_ISA; // the aarch64 driver must pick its variant on its own
    delete env.RK_NUM_THREADS;
    const child = spawn(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '',
      stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout,
        stderr: stderr + (signal === 'SIGKILL' ? `\n(killed after ${timeoutMs / 1000} s)` : ''),
        seconds: (Date.now() - started) / 1000,
      });
    };
    child.on('error', (e) => {
      stderr += String(e);
      done(-1, null);
    });
    child.on('close', done);
  });
}

function check(r: Result, what: string): Result {
  if (r.code !== 0) throw new Error(`${what} failed (${r.signal ?? `exit ${r.code}`}):\n${r.stdout}${r.stderr}`);
  return r;
}

/** Runs tasks with at most `limit` at once, in order of the list; after a failure starts no more. */
async function pool(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  let failure: unknown = null;
  const worker = async () => {
    while (next < tasks.length && !failure) {
      try {
        await tasks[next++]();
      } catch (e) {
        failure ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure) throw failure;
}

interface Build {
  name: 'native' | 'aarch64';
  cxx: string;
  linkFlags: string[];
}
interface Arrays {
  names: string[];
  kinds: Map<string, string>;
  data: Map<string, Float32Array>;
}
interface Outcome {
  stdout: string;
  arrays: Arrays;
  compileSeconds: number;
  runSeconds: number;
  objects: string[];
}

function readArrays(bin: string): Arrays {
  const floats = new Float32Array(Uint8Array.from(readFileSync(bin)).buffer); // little-endian, like both builds
  const names: string[] = [];
  const kinds = new Map<string, string>(),
    data = new Map<string, Float32Array>();
  let offset = 0;
  for (const line of readFileSync(`${bin}.txt`, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const [name, count, kind] = line.split(' ');
    const n = Number(count);
    names.push(name);
    kinds.set(name, kind);
    data.set(name, floats.subarray(offset, offset + n));
    offset += n;
  }
  if (offset !== floats.length) throw new Error(`${bin}: the index covers ${offset} floats of ${floats.length}`);
  return { names, kinds, data };
}

/**
 * What is wrong with `got` as a rebuild of `want` (problem null: nothing), and ||got - want|| / ||want||.
 * fp32: that ratio below 1e-5, and no element off by more than 1e-4 (|want_i| + rms(want)) (a
 * wrong lane or element in a large array barely moves the norm). bfloat16: elements at most one
 * rounding step apart (a step is at most 2^-7 of the larger magnitude). Nothing non-finite.
 */
function mismatch(got: Float32Array, want: Float32Array, kind: string): { error: number; problem: string | null } {
  if (got.length !== want.length) return { error: Infinity, problem: `${got.length} values, native ${want.length}` };
  let num = 0,
    den = 0;
  for (let i = 0; i < want.length; i++) {
    const a = got[i],
      b = want[i];
    if (!Number.isFinite(b)) return { error: Infinity, problem: `native value ${i} is ${b} (unwritten or overflowed)` };
    if (!Number.isFinite(a)) return { error: Infinity, problem: `value ${i} is ${a}, native ${b}` };
    num += (a - b) ** 2;
    den += b * b;
  }
  const rms = Math.sqrt(den / Math.max(want.length, 1));
  for (let i = 0; i < want.length; i++) {
    const a = got[i],
      b = want[i],
      d = Math.abs(a - b);
    if (kind === 'bf16' ? d > 2 ** -7 * Math.max(Math.abs(a), Math.abs(b)) : d > 1e-4 * (Math.abs(b) + rms)) {
      return {
        error: Infinity,
        problem: `value ${i} is ${a}, native ${b}` + (kind === 'bf16' ? ' (more than one bfloat16 step)' : ''),
      };
    }
  }
  const error = den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
  const bound = kind === 'bf16' ? 2 ** -8 : 1e-5;
  return { error, problem: error < bound ? null : `relative error ${error.toExponential(2)} (bound ${bound})` };
}

function field(stdout: string, key: string): string | undefined {
  return stdout
    .split('\n')
    .find((l) => l.startsWith(`${key} `))
    ?.slice(key.length + 1)
    .trim();
}

// The ops the driver runs (the first part of each array's name).
const ops = [
  'selectiveScan',
  'selectiveStateUpdate',
  'gatedDeltaRule',
  'gatedDeltaRuleStep',
  'linearAttention',
  'causalConv1d',
  'mamba2Scan',
  'fusedRnn',
  'newtonRnn',
  'linearScan',
];

describe.skipIf(missing.length > 0 && !required)(title, () => {
  let work = '';
  const outcomes = new Map<string, Outcome>();

  beforeAll(async () => {
    expect(missing, 'RK_REQUIRE_AARCH64=1, but these are not on PATH').toEqual([]);
    work = mkdtempSync(join(tmpdir(), 'rk-aarch64-'));
    // One copy of the sources for both builds.
    const src = join(work, 'src');
    cpSync(join(root, 'cpp'), join(src, 'cpp'), { recursive: true });
    // The contracts the CPU kernels implement: cuda/common/api.h and each op's cuda/<family>/<op>.h.
    for (const dir of readdirSync(join(root, 'cuda'))) {
      const headers = readdirSync(join(root, 'cuda', dir)).filter((f) => f.endsWith('.h'));
      if (headers.length) mkdirSync(join(src, 'cuda', dir), { recursive: true });
      for (const h of headers) copyFileSync(join(root, 'cuda', dir, h), join(src, 'cuda', dir, h));
    }
    mkdirSync(join(src, 'tests', 'cpu-cross'), { recursive: true });
    copyFileSync(join(root, 'tests', 'cpu-cross', 'driver.cpp'), join(src, 'tests', 'cpu-cross', 'driver.cpp'));

    const units = unitsOf(src);
    const builds: Build[] = [
      { name: 'native', cxx: tools.native!, linkFlags: [] },
      { name: 'aarch64', cxx: tools.cross!, linkFlags: ['-static'] },
    ];
    const objectOf = (b: Build, unit: string) => join(work, b.name, `${unit.replace(/[/.]/g, '_')}.o`);
    for (const b of builds) mkdirSync(join(work, b.name), { recursive: true });
    // Compile, both builds interleaved, one job per core.
    const started = Date.now();
    const compiled = new Map<string, number>();
    const jobs = units.flatMap((unit) =>
      builds.map((build) => async () => {
        const r = check(
          await run(build.cxx, [...cxxFlags, '-c', unit, '-o', objectOf(build, unit)], src, 480_000),
          `${build.name}: compiling ${unit}`,
        );
        if (r.stderr.trim()) console.log(`${build.name} compiler warnings for ${unit}:\n${r.stderr}`);
        compiled.set(build.name, (Date.now() - started) / 1000);
      }),
    );
    await pool(jobs, Math.max(1, Math.min(availableParallelism(), 8)));
    // Link and run both at once.
    await Promise.all(
      builds.map(async (b) => {
        const exe = join(work, b.name, 'driver');
        const objects = units.map((u) => objectOf(b, u));
        check(
          await run(b.cxx, [...b.linkFlags, '-pthread', ...objects, '-o', exe], src, 120_000),
          `${b.name}: linking`,
        );
        const bin = join(work, b.name, 'out.bin');
        const r = check(
          await run(b.name === 'aarch64' ? tools.qemu! : exe, b.name === 'aarch64' ? [exe, bin] : [bin], src, 240_000),
          `${b.name}: running the driver`,
        );
        outcomes.set(b.name, {
          stdout: r.stdout,
          arrays: readArrays(bin),
          compileSeconds: compiled.get(b.name) ?? 0,
          runSeconds: r.seconds,
          objects: units.filter((u) => /_base(_\w+)?\.cc$/.test(u)).map((u) => objectOf(b, u)),
        });
      }),
    );
    for (const [name, o] of outcomes) {
      console.log(
        `${name}: compiled in ${o.compileSeconds.toFixed(1)} s (both builds sharing the cores), ran in ` +
          `${o.runSeconds.toFixed(2)} s (${o.arrays.names.length} arrays)`,
      );
    }
  }, 900_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('the aarch64 run used the base variant, compiled for NEON with 4-float vectors, for every call', async () => {
    const o = outcomes.get('aarch64')!;
    expect(field(o.stdout, 'arch')).toBe('aarch64');
    expect(field(o.stdout, 'simd')).toBe('neon width 4');
    expect(field(o.stdout, 'supported')).toBe('base');
    expect(field(o.stdout, 'default')).toBe('base');
    expect(field(o.stdout, 'active')).toBe('base');
    const calls = Number(field(o.stdout, 'calls'));
    expect(calls).toBeGreaterThan(0);
    expect(field(o.stdout, 'runs')).toBe(`base ${calls} avx2 0 avx512 0`);
    // The native run compared against is the base variant too (SSE2 on x86-64).
    const native = outcomes.get('native')!;
    expect(field(native.stdout, 'active')).toBe('base');
    expect(field(native.stdout, 'runs')).toBe(`base ${calls} avx2 0 avx512 0`);
    if (process.arch === 'x64') expect(field(native.stdout, 'simd')).toBe('sse2 width 4');
    // The kernels' vector code became NEON 4-lane float arithmetic (not scalar code). The smallest
    // kernel, the linear scan (a multiply-add per step; forward and backward, three dtypes), has 96
    // such instructions; scalarised code would have next to none.
    if (tools.objdump) {
      for (const obj of o.objects) {
        const r = check(await run(tools.objdump, ['-d', '--no-show-raw-insn', obj], dirname(obj), 60_000), 'objdump');
        const neon = r.stdout.split('\n').filter((l) => /\sf(add|sub|mul|mla|mls|div)\s+v\d+\.4s/.test(l)).length;
        expect(neon, `NEON 4-lane float instructions in ${obj}`).toBeGreaterThan(60);
      }
    }
  });

  it('both builds drew the same inputs and wrote the same arrays', () => {
    expect(field(outcomes.get('aarch64')!.stdout, 'inputs')).toBe(field(outcomes.get('native')!.stdout, 'inputs'));
    const a = outcomes.get('aarch64')!.arrays,
      n = outcomes.get('native')!.arrays;
    expect(a.names).toEqual(n.names);
    expect(a.names.map((x) => a.data.get(x)!.length)).toEqual(n.names.map((x) => n.data.get(x)!.length));
    expect(a.names.map((x) => a.kinds.get(x))).toEqual(n.names.map((x) => n.kinds.get(x)));
    expect([...new Set(n.names.map((x) => x.split('.')[0]))].sort()).toEqual([...ops].sort());
  });

  it.each(ops)('%s: every output array matches the native build', (op) => {
    const a = outcomes.get('aarch64')!.arrays,
      n = outcomes.get('native')!.arrays;
    const names = n.names.filter((x) => x.startsWith(`${op}.`));
    expect(names.length).toBeGreaterThan(0);
    const problems: string[] = [];
    let worst = 0,
      worstName = '';
    for (const name of names) {
      const got = a.data.get(name);
      if (!got) {
        problems.push(`${name}: missing`);
        continue;
      }
      const m = mismatch(got, n.data.get(name)!, n.kinds.get(name)!);
      if (m.problem) problems.push(`${name}: ${m.problem}`);
      else if (m.error >= worst) [worst, worstName] = [m.error, name];
    }
    console.log(`${op}: ${names.length} arrays, largest relative error ${worst.toExponential(2)} (${worstName})`);
    expect(problems).toEqual([]);
  });

  it('the comparison notices a small change in one value', () => {
    const n = outcomes.get('native')!.arrays;
    const name = n.names.find((x) => x.startsWith('fusedRnn.') && x.endsWith('.dR'))!;
    const want = n.data.get(name)!,
      got = Float32Array.from(want);
    let i = 0;
    for (let j = 1; j < got.length; j++) if (Math.abs(got[j]) > Math.abs(got[i])) i = j;
    got[i] *= 1 + 1e-3;
    expect(mismatch(got, want, 'f32').problem).not.toBeNull();
    got[i] = NaN;
    expect(mismatch(got, want, 'f32').problem).not.toBeNull();
  });
});
