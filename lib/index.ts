/**
 * recurrent-kernels: fast recurrent-sequence kernels for Node.js.
 *
 *   import * as rk from 'recurrent-kernels';
 *   const { h } = rk.linearScan({ a, b }, { reverse: false });
 *   const { y } = rk.selectiveScan({ u, delta, A, B, C, D, z }, { deltaSoftplus: true });
 */
import { registry } from './ops/registry';
import { packageVersion } from './native';

export { Tensor, cuda, memory, releaseCpuPool, cpuThreads, DTYPES, DEVICES, dtypeBytes } from './tensor';
export type { DType, Device, TensorOptions, CudaDeviceProperties, MemoryStats } from './tensor';
export { cpu, CPU_ISAS } from './cpu';
export type { CpuIsa, CpuInfo } from './cpu';
export {
  RecurrentKernelsError,
  ShapeError,
  DTypeError,
  DeviceError,
  ArgumentError,
  DisposedError,
  CudaError,
  OutOfMemoryError,
  NativeLoadError,
  NotConvergedError,
  AbortedError,
  BusyError,
} from './errors';
export type { ErrorCode } from './errors';
export {
  Tape,
  grad,
  valueAndGrad,
  gradAsync,
  valueAndGradAsync,
  gradcheck,
  defineOp,
  disposeCtx,
  tidy,
} from './autograd';
export type { OpHooks, OpDefinition, Op, Grads, GradsOf, GradcheckOptions, GradcheckResult } from './autograd';
export type { AsyncOptions } from './async';
export { add, sub, mul, scale, square, sum, mean } from './ops/elementwise';
export { linearScan } from './ops/linearScan';
export type { LinearScanInputs, LinearScanOptions, LinearScanOutputs, LinearScanGrads } from './ops/linearScan';
export { selectiveScan } from './ops/selectiveScan';
export type {
  SelectiveScanInputs,
  SelectiveScanOptions,
  SelectiveScanOutputs,
  SelectiveScanGrads,
} from './ops/selectiveScan';
export { gatedDeltaRule } from './ops/gatedDeltaRule';
export type {
  GatedDeltaRuleInputs,
  GatedDeltaRuleOptions,
  GatedDeltaRuleOutputs,
  GatedDeltaRuleGrads,
} from './ops/gatedDeltaRule';
export { linearAttention, LINEAR_ATTENTION_RULES } from './ops/linearAttention';
export type {
  LinearAttentionRule,
  LinearAttentionInputs,
  LinearAttentionOptions,
  LinearAttentionOutputs,
  LinearAttentionGrads,
} from './ops/linearAttention';
export { causalConv1d } from './ops/causalConv1d';
export type {
  CausalConv1dInputs,
  CausalConv1dOptions,
  CausalConv1dOutputs,
  CausalConv1dGrads,
} from './ops/causalConv1d';
export { mamba2Scan } from './ops/mamba2Scan';
export type { Mamba2ScanInputs, Mamba2ScanOptions, Mamba2ScanOutputs, Mamba2ScanGrads } from './ops/mamba2Scan';
export { fusedRnn } from './ops/fusedRnn';
export type {
  FusedRnnCell,
  FusedRnnInputs,
  FusedRnnOptions,
  FusedRnnOutputs,
  FusedRnnGrads,
} from './ops/fusedRnn';
export { newtonRnn } from './ops/newtonRnn';
export type {
  NewtonRnnInputs,
  NewtonRnnOptions,
  NewtonRnnOutputs,
  NewtonRnnGrads,
  NewtonRnnStats,
  NewtonRnnCell,
} from './ops/newtonRnn';
// The decode steps (each module's exports are its public surface: the step, its Promise form and
// their types).
export * from './ops/selectiveStateUpdate';
export * from './ops/gatedDeltaRuleStep';
export * from './ops/linearAttentionStep';
export * from './ops/mamba2StateUpdate';

/**
 * The Promise forms of the ops: the same inputs and options plus `{ signal }`; the kernels run off
 * the JavaScript thread and the result is bitwise the sync form's (README, Async calls).
 */
export const linearScanAsync = registry.linearScan.async;
export const selectiveScanAsync = registry.selectiveScan.async;
export const gatedDeltaRuleAsync = registry.gatedDeltaRule.async;
export const fusedRnnAsync = registry.fusedRnn.async;
export const newtonRnnAsync = registry.newtonRnn.async;
export const linearAttentionAsync = registry.linearAttention.async;
export const causalConv1dAsync = registry.causalConv1d.async;
export const mamba2ScanAsync = registry.mamba2Scan.async;

/** The forward/backward hooks of every op, for autograd adapters of other frameworks. */
export const ops = Object.fromEntries(Object.entries(registry).map(([name, op]) => [name, op.hooks])) as {
  [K in keyof typeof registry]: (typeof registry)[K]['hooks'];
};

export const version: string = packageVersion();

import { native, nativePath } from './native';
/** Low-level access for the package's own benchmarks and tests; not a stable API. */
export const internals = { native, nativePath };
