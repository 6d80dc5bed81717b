// Shared helpers for the test files: tensors from float64 arrays and back, device/dtype lists.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import * as rk from '../lib/index';

export const hasCuda = rk.cuda.available();
export const devices: rk.Device[] = hasCuda ? ['cpu', 'cuda'] : ['cpu'];
/** Relative-error bound per input dtype (fp32 scans vs float64; half inputs). */
export const tolerance: Record<rk.DType, number> = { float32: 1e-5, float16: 1e-2, bfloat16: 1e-2 };

export function tensor(
  values: ArrayLike<number>,
  shape: number[],
  dtype: rk.DType = 'float32',
  device: rk.Device = 'cpu',
): rk.Tensor {
  return rk.Tensor.from(Float32Array.from(values), shape, { dtype, device });
}

/** A tensor's values as float64 (copied back from the device if needed). */
export function values(t: rk.Tensor): Float64Array {
  return Float64Array.from(t.toFloat32Array());
}

/** Runs fn and expects a RecurrentKernelsError with this code (and a message matching pattern). */
export function expectError(fn: () => unknown, code: rk.ErrorCode, pattern?: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, 'expected an error').toBeInstanceOf(rk.RecurrentKernelsError);
  expect((caught as rk.RecurrentKernelsError).code, (caught as Error).message).toBe(code);
  if (pattern) expect((caught as Error).message).toMatch(pattern);
}

/**
 * The strict-mode TypeScript diagnostics of `source` (a module that may import lib/ files by absolute
 * path; LIB below is replaced by lib/'s path), [] when it type-checks. Only the snippet's own
 * diagnostics count (lib/ itself is type-checked by `tsc -p .`).
 */
export function typecheck(source: string): string[] {
  const root = join(__dirname, '..');
  const dir = mkdtempSync(join(tmpdir(), 'rk-typecheck-'));
  try {
    const file = join(dir, 'snippet.ts');
    writeFileSync(file, source.replaceAll('LIB', join(root, 'lib')));
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
    const r = spawnSync(
      process.execPath,
      [
        tsc,
        '--noEmit',
        '--strict',
        '--target',
        'ES2022',
        '--lib',
        'ES2022,ESNext.Disposable',
        '--module',
        'commonjs',
        '--types',
        'node',
        '--typeRoots',
        join(root, 'node_modules', '@types'),
        '--skipLibCheck',
        file,
      ],
      { cwd: dir, encoding: 'utf8' },
    );
    if (r.error) throw r.error;
    return (r.stdout + r.stderr).split('\n').filter((l) => l.includes('snippet.ts'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
