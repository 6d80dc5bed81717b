// The CUDA code, run on the CPU: compiles each driver in tests/cuda-emulator/ (the unmodified cuda/
// sources on a small SIMT emulator) with g++ against the CUDA toolkit headers, runs it, and expects
// "0 failures". linear_scan_test.cpp runs the linear-scan kernels through their launchers;
// scan_primitives_test.cpp runs the reusable scan primitive (cuda/common/scan.cuh) in every
// configuration through small test kernels; mma_test.cpp the warp-level tensor-core
// multiply-accumulate helpers (cuda/common/mma.cuh); selective_scan_test.cpp runs the selective-scan
// (Mamba-1) forward, backward and decode launchers against float64 references; gated_delta_test.cpp
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
import { existsSync, mkdtempSync, readdirSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';

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

/** Compiles tests/cuda-emulator/<driver>.cpp, runs it and expects a clean " 0 failures" summary. */
function compileAndRun(driver: string): void {
  expect(
    cuda.dir,
    `RK_CUDA=ON but no CUDA toolkit headers (cuda_runtime.h) in: ${cuda.tried.join(', ')}`,
  ).toBeDefined();
  const work = mkdtempSync(join(tmpdir(), 'rk-cuda-emulator-'));
  try {
    const exe = join(work, driver);
    const started = Date.now();
    // -fno-strict-aliasing: the kernels reinterpret element storage as raw bits and vectors, which
    // is fine for nvcc; the host compiler must not optimise on the assumption it does not happen.
    const build = spawnSync(
      'g++',
      [
        '-std=c++17',
        '-O1',
        '-fno-strict-aliasing',
        '-I',
        cuda.dir!,
        '-I',
        join(root, 'cuda'),
        join(root, 'tests', 'cuda-emulator', `${driver}.cpp`),
        '-o',
        exe,
      ],
      { encoding: 'utf8', timeout: 150_000 },
    );
    expect(build.error, 'g++ could not be run').toBeUndefined();
    expect(build.status, `g++ failed:\n${build.stderr}`).toBe(0);
    const compiled = Date.now();

    const run = spawnSync(exe, [], { encoding: 'utf8', timeout: 150_000 });
    const output = `${run.stdout}${run.stderr}`;
    expect(run.signal, `the emulator test was killed by ${run.signal}:\n${output}`).toBeNull();
    expect(run.status, output).toBe(0);
    expect(output).toMatch(/ 0 failures\b/);
    const summary = output.trim().split('\n').pop();
    console.log(`${summary}; compiled in ${((compiled - started) / 1000).toFixed(1)} s`);
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
        'gated_delta_test',
        'newton_rnn_test',
        'fused_rnn_test',
        'scan_primitives_test',
        'mma_test',
      ]),
    );
  });

  it.each(drivers)(
    '%s: every configuration matches its float64 reference',
    (driver) => {
      compileAndRun(driver);
    },
    180_000,
  );
});
