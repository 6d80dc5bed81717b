/**
 * recurrent-kernels: fast recurrent-sequence kernels for Node.js.
 *
 *   import * as rk from 'recurrent-kernels';
 *   const { h } = rk.linearScan({ a, b }, { reverse: false });
 *   const { y } = rk.selectiveScan({ u, delta, A, B, C, D, z }, { deltaSoftplus: true });
 */
import { linearScan } from './ops/linearScan';
import { selectiveScan } from './ops/selectiveScan';
import { gatedDeltaRule } from './ops/gatedDeltaRule';
import { fusedRnn } from './ops/fusedRnn';
import { newtonRnn } from './ops/newtonRnn';
import { linearAttention } from './ops/linearAttention';
import { causalConv1d } from './ops/causalConv1d';
import { mamba2Scan } from './ops/mamba2Scan';
import { elementwiseOps } from './ops/elementwise';
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
export { selectiveStateUpdate, selectiveStateUpdateAsync } from './ops/selectiveStateUpdate';
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
export { linearAttentionStep, linearAttentionStepAsync } from './ops/linearAttentionStep';
export { causalConv1d } from './ops/causalConv1d';
export type {
  CausalConv1dInputs,
  CausalConv1dOptions,
  CausalConv1dOutputs,
  CausalConv1dGrads,
} from './ops/causalConv1d';
export type {
  LinearAttentionStepInputs,
  LinearAttentionStepOptions,
  LinearAttentionStepOutputs,
} from './ops/linearAttentionStep';
export { mamba2Scan } from './ops/mamba2Scan';
export type { Mamba2ScanInputs, Mamba2ScanOptions, Mamba2ScanOutputs, Mamba2ScanGrads } from './ops/mamba2Scan';
export { mamba2StateUpdate, mamba2StateUpdateAsync } from './ops/mamba2StateUpdate';
export type {
  Mamba2StateUpdateInputs,
  Mamba2StateUpdateOptions,
  Mamba2StateUpdateOutputs,
} from './ops/mamba2StateUpdate';
export { gatedDeltaRuleStep, gatedDeltaRuleStepAsync } from './ops/gatedDeltaRuleStep';
export type {
  GatedDeltaRuleStepInputs,
  GatedDeltaRuleStepOptions,
  GatedDeltaRuleStepOutputs,
} from './ops/gatedDeltaRuleStep';
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
export type {
  SelectiveStateUpdateInputs,
  SelectiveStateUpdateOptions,
  SelectiveStateUpdateOutputs,
} from './ops/selectiveStateUpdate';

/**
 * The Promise forms of the ops: the same inputs and options plus `{ signal }`; the kernels run off
 * the JavaScript thread and the result is bitwise the sync form's (README, Async calls).
 */
export const linearScanAsync = linearScan.async;
export const selectiveScanAsync = selectiveScan.async;
export const gatedDeltaRuleAsync = gatedDeltaRule.async;
export const fusedRnnAsync = fusedRnn.async;
export const newtonRnnAsync = newtonRnn.async;
export const linearAttentionAsync = linearAttention.async;
export const causalConv1dAsync = causalConv1d.async;
export const mamba2ScanAsync = mamba2Scan.async;

/** The forward/backward hooks of every op, for autograd adapters of other frameworks. */
export const ops = {
  linearScan: linearScan.hooks,
  selectiveScan: selectiveScan.hooks,
  gatedDeltaRule: gatedDeltaRule.hooks,
  fusedRnn: fusedRnn.hooks,
  newtonRnn: newtonRnn.hooks,
  linearAttention: linearAttention.hooks,
  causalConv1d: causalConv1d.hooks,
  mamba2Scan: mamba2Scan.hooks,
  ...Object.fromEntries(Object.entries(elementwiseOps).map(([k, v]) => [k, v.hooks])),
} as {
  linearScan: typeof linearScan.hooks;
  selectiveScan: typeof selectiveScan.hooks;
  gatedDeltaRule: typeof gatedDeltaRule.hooks;
  fusedRnn: typeof fusedRnn.hooks;
  newtonRnn: typeof newtonRnn.hooks;
  linearAttention: typeof linearAttention.hooks;
  causalConv1d: typeof causalConv1d.hooks;
  mamba2Scan: typeof mamba2Scan.hooks;
} & { [K in keyof typeof elementwiseOps]: (typeof elementwiseOps)[K]['hooks'] };

export const version: string = packageVersion();

import { native, nativePath } from './native';
/** Low-level access for the package's own benchmarks and tests; not a stable API. */
export const internals = { native, nativePath };
