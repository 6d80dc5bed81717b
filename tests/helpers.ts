// Shared helpers for the test files: tensors from float64 arrays and back, device/dtype lists.
import { expect } from 'vitest';
import * as rk from '../lib/index';

export const hasCuda = rk.cuda.available();
export const devices: rk.Device[] = hasCuda ? ['cpu', 'cuda'] : ['cpu'];
/** Relative-error bound per input dtype (fp32 scans vs float64; half inputs). */
export const tolerance: Record<rk.DType, number> = { float32: 1e-5, float16: 1e-2, bfloat16: 1e-2 };

export function tensor(values: ArrayLike<number>, shape: number[], dtype: rk.DType = 'float32',
  device: rk.Device = 'cpu'): rk.Tensor {
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
