/**
 * recurrent-kernels: fast recurrent-sequence kernels for Node.js.
 *
 *   import * as rk from 'recurrent-kernels';
 *   const { h } = rk.linearScan({ a, b }, { reverse: false });
 */
import { linearScan } from './ops/linearScan';
import { elementwiseOps } from './ops/elementwise';

export { Tensor, cuda, memory, releaseCpuPool, cpuThreads, DTYPES, DEVICES, dtypeBytes } from './tensor';
export type { DType, Device, TensorOptions, CudaDeviceProperties, MemoryStats } from './tensor';
export {
  RecurrentKernelsError, ShapeError, DTypeError, DeviceError, ArgumentError, DisposedError, CudaError,
  OutOfMemoryError, NativeLoadError,
} from './errors';
export type { ErrorCode } from './errors';
export { Tape, grad, valueAndGrad, gradcheck, defineOp } from './autograd';
export type { OpHooks, Op, Grads, GradcheckOptions, GradcheckResult } from './autograd';
export { add, sub, mul, scale, square, sum, mean } from './ops/elementwise';
export { linearScan } from './ops/linearScan';
export type { LinearScanInputs, LinearScanOptions, LinearScanOutputs } from './ops/linearScan';

/** The forward/backward hooks of every op, for autograd adapters of other frameworks. */
export const ops = {
  linearScan: linearScan.hooks,
  ...Object.fromEntries(Object.entries(elementwiseOps).map(([k, v]) => [k, v.hooks])),
} as {
  linearScan: typeof linearScan.hooks;
} & { [K in keyof typeof elementwiseOps]: (typeof elementwiseOps)[K]['hooks'] };

export const version = '0.1.0';

import { native } from './native';
/** Low-level access for the package's own benchmarks and tests; not a stable API. */
export const internals = { native };
