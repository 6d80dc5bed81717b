// The CUDA code, run on the CPU: compiles each driver in tests/cuda-emulator/ (the unmodified cuda/
// sources on a small SIMT emulator) with g++ against the CUDA toolkit headers, runs it, and expects
// "0 failures". linear_scan_test.cpp runs the linear-scan kernels through their launchers;
// scan_primitives_test.cpp runs the reusable scan primitive (cuda/common/scan.cuh) in every
// configuration through small test kernels; mma_test.cpp the warp-level tensor-core
// multiply-accumulate helpers (cuda/common/mma.cuh); selective_scan_test.cpp runs the selective-scan
// (Mamba-1) forward, backward and decode launchers against float64 references; gated_delta_rule_test.cpp
// does the same for the gated delta rule (recurrent forward, backward and decode, and the chunked
// tensor-core forward and backward); newton_rnn_test.cpp the Newton-iteration parallel RNN (Newton
// solves, among them the full-Jacobian DEER step, fallback, backward); linear_attention_test.cpp the
// linear-attention family (every rule, both decay shapes, grouped heads, window, decode, gate activations);
// causal_conv1d_test.cpp the causal convolution with carry state; mamba2_scan_test.cpp Mamba-2's time-step,
// skip and gate kernels, state transposes and decode step, and the whole scan composed with linear
// attention's launchers, forward and backward; fused_rnn_test.cpp the fused
// recurrent cells (Elman, LSTM, GRU, sLSTM; persistent, multi-block and stepwise paths, and the
// emulator's cooperative launches). Needs the
// toolkit's headers but no GPU, so CI checks the kernels' results too. Skipped when no toolkit
// headers are found, unless RK_CUDA=ON (as in CI), where a missing toolkit is a failure.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseLaunchLog, readLaunches, writeLaunches } from '../scripts/cuda-launches.mjs';
import { sourcesHash } from '../scripts/cuda-resources.mjs';

const root = join(__dirname, '..');
const required = (process.env.RK_CUDA ?? '').toUpperCase() === 'ON';

function findOnPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  return undefined;
}

/** Include directories the CUDA compiler itself uses (nvcc may be a wrapper script). */
function nvccIncludes(nvcc: string): string[] {
  const r = spawnSync(nvcc, ['--dryrun', '-x', 'cu', '-c', '-o', '/dev/null', '/dev/null'], { encoding: 'utf8' });
  const line = `${r.stdout ?? ''}\n${r.stderr ?? ''}`.split('\n').find((l) => l.startsWith('#$ INCLUDES='));
  return line ? [...line.matchAll(/-I"?([^"\s]+)/g)].map((m) => m[1]) : [];
}

/** The CUDA toolkit's include directory (holding cuda_runtime.h), found from nvcc on PATH. */
function findCudaInclude(): { dir?: string; tried: string[] } {
  const tried: string[] = [];
  const candidates = function* () {
    const nvcc = findOnPath('nvcc');
    if (nvcc) {
      yield join(dirname(realpathSync(nvcc)), '..', 'include');
      yield* nvccIncludes(nvcc);
    }
    for (const home of [process.env.CUDA_HOME, process.env.CUDA_PATH]) if (home) yield join(home, 'include');
    yield '/usr/local/cuda/include';
  };
  for (const dir of candidates()) {
    tried.push(dir);
    if (existsSync(join(dir, 'cuda_runtime.h'))) return { dir, tried };
  }
  return { tried };
}

const cuda = findCudaInclude();
const title =
  cuda.dir || required
    ? 'CUDA kernels on the CPU emulator'
    : 'CUDA kernels on the CPU emulator (skipped: no CUDA toolkit headers found; RK_CUDA=ON makes this a failure)';

/**
 * How a driver is built and run. `checks`: with the emulator's hazard checks (tests/cuda-emulator/
 * checks.h: racecheck, initcheck, memcheck, synccheck), i.e. -fsanitize=thread,alignment hooks that the
 * emulator itself implements (no sanitizer runtime is linked). `schedule`: RK_EMU_SCHEDULE.
 * `deviceNumerics`: RK_EMU_DEVICE_NUMERICS=1 (tests/cuda-emulator/numerics.h: the hardware
 * approximations at their error bounds, tensor-core products summed in another order).
 */
interface Mode {
  checks: boolean;
  schedule: 'ordered' | 'random' | 'starve';
  seed: number;
  deviceNumerics?: boolean;
}

const checkFlags = ['-fsanitize=thread,alignment', '--param', 'tsan-instrument-func-entry-exit=0', '-fno-pie', '-g1'];

/** Builds tests/cuda-emulator/<source> into work/<name>; returns the executable's path. */
function build(source: string, work: string, checks: boolean): string {
  expect(
    cuda.dir,
    `RK_CUDA=ON but no CUDA toolkit headers (cuda_runtime.h) in: ${cuda.tried.join(', ')}`,
  ).toBeDefined();
  const exe = join(work, source.replace(/\.cpp$/, checks ? '.checks' : ''));
  // -fno-strict-aliasing: the kernels reinterpret element storage as raw bits and vectors, which
  // is fine for nvcc; the host compiler must not optimise on the assumption it does not happen.
  const common = ['-std=c++17', '-O1', '-fno-strict-aliasing', '-I', cuda.dir!, '-I', join(root, 'cuda')];
  const src = join(root, 'tests', 'cuda-emulator', source);
  // With the checks: compile with the instrumentation, link without its runtime (checks.h has the hooks).
  const steps = checks
    ? [
        [...common, ...checkFlags, '-c', src, '-o', `${exe}.o`],
        ['-no-pie', `${exe}.o`, '-o', exe],
      ]
    : [[...common, src, '-o', exe]];
  for (const args of steps) {
    const r = spawnSync('g++', args, { encoding: 'utf8', timeout: 200_000 });
    expect(r.error, 'g++ could not be run').toBeUndefined();
    expect(r.status, `g++ failed:\n${r.stderr}`).toBe(0);
  }
  return exe;
}

function run(exe: string, args: string[], mode: Mode, launchLog = '') {
  // With the checks, shuffles do not order a warp's memory accesses (only __syncwarp and
  // __syncthreads do), as in the PTX memory model.
  const env = {
    ...process.env,
    RK_EMU_SCHEDULE: mode.schedule,
    RK_EMU_SEED: String(mode.seed),
    RK_EMU_STRICT_WARP: mode.checks ? '1' : '0',
    RK_EMU_DEVICE_NUMERICS: mode.deviceNumerics ? '1' : '0',
    RK_EMU_LAUNCH_LOG: launchLog,
  };
  const r = spawnSync(exe, args, { encoding: 'utf8', timeout: 400_000, env });
  return { ...r, output: `${r.stdout}${r.stderr}` };
}

/**
 * Compiles tests/cuda-emulator/<driver>.cpp (with or without the checks), runs it under each
 * schedule and expects a clean " 0 failures" summary (and no hazard). Returns the kernel
 * instantiations the runs launched (RK_EMU_LAUNCH_LOG), sorted.
 */
function compileAndRun(driver: string, checks: boolean, modes: Omit<Mode, 'checks'>[]): string[] {
  const work = mkdtempSync(join(tmpdir(), 'rk-cuda-emulator-'));
  try {
    const started = Date.now();
    const exe = build(`${driver}.cpp`, work, checks);
    const compiled = Date.now();
    const launchLog = join(work, 'launches.log');
    for (const m of modes) {
      const mode = { ...m, checks };
      const r = run(exe, [], mode, launchLog);
      const how =
        `RK_EMU_SCHEDULE=${mode.schedule} RK_EMU_SEED=${mode.seed}` +
        `${mode.deviceNumerics ? ' RK_EMU_DEVICE_NUMERICS=1' : ''}${checks ? ', with the checks' : ''}`;
      expect(r.signal, `the emulator test was killed by ${r.signal} (${how}):\n${r.output}`).toBeNull();
      expect(r.status, `${how}:\n${r.output}`).toBe(0);
      expect(r.output).toMatch(/ 0 failures\b/);
      if (checks) expect(r.output).toMatch(/cuda emulator checks \(.*\): 0 hazards/);
      const summary = r.output
        .trim()
        .split('\n')
        .filter((l) => / failures\b| hazards/.test(l))
        .join('; ');
      console.log(`${summary}; ${how}; compiled in ${((compiled - started) / 1000).toFixed(1)} s`);
    }
    return existsSync(launchLog) ? parseLaunchLog(readFileSync(launchLog, 'utf8')) : [];
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

// Every driver in tests/cuda-emulator/ (<name>_test.cpp) is one test: a new kernel family adds its
// driver there and nothing here.
const drivers = readdirSync(join(root, 'tests', 'cuda-emulator'))
  .filter((f) => f.endsWith('_test.cpp'))
  .map((f) => f.slice(0, -'.cpp'.length))
  .sort();

describe.skipIf(!cuda.dir && !required)(title, () => {
  it('finds the drivers', () => {
    expect(drivers).toEqual(
      expect.arrayContaining([
        'linear_scan_test',
        'selective_scan_test',
        'gated_delta_rule_test',
        'newton_rnn_test',
        'fused_rnn_test',
        'scan_primitives_test',
        'mma_test',
      ]),
    );
  });

  // Plain builds under the `starve` schedule (one warp per block held back until nothing else can
  // run, blocks in random order) and the `random` one, the latter with the device numerics (every
  // tolerance must hold for a GPU's approximate math too); builds with the checks under `random`.
  // Fixed seeds, so that a failure reproduces; RK_EMU_SEED overrides them.
  const seed = Number(process.env.RK_EMU_SEED ?? 1);
  // The resource model's table (tests/cuda-emulator/resources.h) must come from the current sources.
  it('has sm_90 kernel resources generated from the current cuda/ sources', () => {
    const table = readFileSync(join(root, 'tests', 'cuda-emulator', 'resources.h'), 'utf8');
    const recorded = table.match(/kSourcesHash = "([0-9a-f]+)"/)?.[1];
    expect(recorded, 'tests/cuda-emulator/resources.h is out of date: run npm run cuda:resources').toBe(sourcesHash());
  });

  // The kernel instantiations each driver launches are recorded in tests/cuda-emulator/launches.txt
  // (npm run cuda:launches): a kernel lost or new fails the driver's plain test, so that moving code
  // between kernels shows every instantiation still built and run. With RK_EMU_WRITE_LAUNCHES=1 the
  // plain tests write their sections instead.
  it('records the launched kernels of exactly the drivers there are', () => {
    expect(Object.keys(readLaunches()).sort(), 'tests/cuda-emulator/launches.txt: run npm run cuda:launches').toEqual(
      drivers,
    );
  });

  it.each(drivers)(
    '%s: every configuration matches its float64 reference (starve schedule; random with device numerics)',
    (driver) => {
      const launched = compileAndRun(driver, false, [
        { schedule: 'starve', seed },
        { schedule: 'random', seed: seed + 1, deviceNumerics: true },
      ]);
      if (process.env.RK_EMU_WRITE_LAUNCHES === '1') {
        writeLaunches(driver, launched);
        return;
      }
      const recorded: string[] = readLaunches()[driver] ?? [];
      const lost = recorded.filter((k) => !launched.includes(k));
      const added = launched.filter((k) => !recorded.includes(k));
      const list = (ks: string[]) => ks.map((k) => `\n  ${k}`).join('');
      expect(
        [...lost.map((k) => `lost: ${k}`), ...added.map((k) => `new: ${k}`)],
        `${driver} no longer launches ${lost.length} recorded kernel(s):${list(lost)}\n` +
          `and launches ${added.length} kernel(s) not in tests/cuda-emulator/launches.txt:${list(added)}\n` +
          '(when intended, regenerate the list: npm run cuda:launches)',
      ).toEqual([]);
    },
    300_000,
  );

  it.each(drivers)(
    '%s: no hazard under the checks (random schedule)',
    (driver) => {
      compileAndRun(driver, true, [{ schedule: 'random', seed: seed + 2 }]);
    },
    600_000,
  );

  // The device side of the same primitives (tests/gpu/ptx_smoke.cu, the first step of gpu:verify):
  // it must compile for sm_90, and without a GPU say so (exit code 2); with one, pass.
  it.skipIf(!findOnPath('nvcc'))(
    'the inline-PTX smoke test builds for sm_90 and runs where it can',
    () => {
      const work = mkdtempSync(join(tmpdir(), 'rk-ptx-smoke-'));
      try {
        const exe = join(work, 'ptx_smoke');
        const src = join(root, 'tests', 'gpu', 'ptx_smoke.cu');
        const b = spawnSync(
          'nvcc',
          ['-std=c++17', '-arch=sm_90', '--expt-relaxed-constexpr', '-I', join(root, 'cuda'), '-o', exe, src],
          {
            encoding: 'utf8',
            timeout: 200_000,
          },
        );
        expect(b.status, `nvcc failed:\n${b.stderr}`).toBe(0);
        const r = spawnSync(exe, [], { encoding: 'utf8', timeout: 60_000 });
        const output = `${r.stdout}${r.stderr}`;
        if (r.status === 2) expect(output).toContain('ptx smoke: no usable CUDA device');
        else {
          expect(r.status, output).toBe(0);
          expect(output).toMatch(/ptx smoke: \d+ checks, 0 failures/);
        }
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    },
    240_000,
  );

  // Each check reports its planted bug (tests/cuda-emulator/planted_bugs.cpp) and passes the kernel
  // without it.
  describe('planted bugs', () => {
    const expected: Record<string, RegExp> = {
      'missing-barrier': /HAZARD racecheck: data race/,
      'write-after-read': /HAZARD racecheck: data race/,
      'warp-without-syncwarp': /HAZARD racecheck: data race/,
      'shuffle-as-ordering': /HAZARD racecheck: data race/,
      'dynamic-shared-off-by-one': /HAZARD memcheck: out-of-bounds access/,
      'global-off-by-one': /HAZARD memcheck: out-of-bounds access/,
      'misaligned-vector-load': /HAZARD memcheck: misaligned access/,
      'uninitialised-shared': /HAZARD initcheck: read of uninitialised memory/,
      'uninitialised-global': /HAZARD initcheck: read of uninitialised memory/,
      'cp-async-read-before-wait': /HAZARD initcheck: read of a cp\.async destination before its wait/,
      'partial-barrier': /synccheck: deadlock/,
      'shuffle-mask-without-caller': /synccheck: shuffle with a mask that leaves out the calling lane/,
      'shuffle-with-exited-lanes': /synccheck: deadlock/,
      'flag-without-fence': /HAZARD racecheck: blocks access the same bytes without a release and acquire/,
    };
    let work = '';
    let exe = '';
    const mode: Mode = { checks: true, schedule: 'ordered', seed: 1 };
    it('builds with the checks and lists every case', () => {
      work = mkdtempSync(join(tmpdir(), 'rk-cuda-emulator-planted-'));
      exe = build('planted_bugs.cpp', work, true);
      const r = run(exe, ['list'], mode);
      expect(r.status, r.output).toBe(0);
      expect(r.stdout.trim().split('\n').sort()).toEqual(Object.keys(expected).sort());
    }, 200_000);
    it.each(Object.entries(expected))('%s: reported, and passes once fixed', (name, report) => {
      expect(exe, 'the planted-bug driver was not built').not.toBe('');
      const buggy = run(exe, [name], mode);
      expect(buggy.status, buggy.output).not.toBe(0);
      expect(buggy.output).toMatch(report);
      const fixed = run(exe, [`${name}-fixed`], mode);
      expect(fixed.status, fixed.output).toBe(0);
      expect(fixed.output).toContain(`ran ${name}-fixed`);
      expect(fixed.output).toMatch(/cuda emulator checks \(.*\): 0 hazards/);
    });
    afterAll(() => {
      if (work) rmSync(work, { recursive: true, force: true });
    });
  });
});
