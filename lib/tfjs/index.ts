/**
 * recurrent-kernels/tfjs: the ops as TensorFlow.js kernels, with gradients from the package's own
 * backward kernels.
 *
 *   import * as tf from '@tensorflow/tfjs-core';
 *   import '@tensorflow/tfjs-backend-cpu';
 *   import * as rkTf from 'recurrent-kernels/tfjs';
 *   const { y } = rkTf.selectiveScan({ u, delta, A, B, C }, { deltaSoftplus: true }); // tf.Tensors
 *
 * Importing this module registers one kernel per op (`RecurrentKernels<Op>`) on the `cpu` backend
 * and its gradient, so that the ops work inside tf.tidy, tf.grad / tf.grads / tf.variableGrads and
 * the optimizers. Each function takes and returns tf.Tensors, with the names and options of the
 * core op (a tensor option, e.g. initialState, is a tf.Tensor too).
 *
 * Memory: the kernels read a float32 tf.Tensor's values array in place and hand their outputs to
 * TensorFlow.js without a copy. While gradients are recorded, the forward keeps what its backward
 * needs (its state checkpoints) outside TensorFlow.js's accounting, until the forward's first output
 * is disposed and collected. Only float32 tf.Tensors on the `cpu` backend are accepted; fp16/bf16
 * exist only on this package's side (toTf converts them to float32, a copy).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as rk from '../index';
import { tensorsIn } from '../autograd';
import { ArgumentError, DTypeError, DeviceError } from '../errors';
import { lendStorage } from '../tensor';

type TfTensor = tf.Tensor;
type TfMap = Record<string, TfTensor | null | undefined>;
const BACKEND = 'cpu';

interface CpuBackend {
  data: { get(dataId: object): { values?: unknown } | undefined };
}

/** The float32 values array of a tensor on the cpu backend, without a copy. */
function valuesOf(t: tf.TensorInfo, what: string): Float32Array {
  if (tf.getBackend() !== BACKEND)
    throw new DeviceError(
      `${what}: recurrent-kernels/tfjs runs on the 'cpu' backend, the active one is '${tf.getBackend()}'`,
    );
  if (t.dtype !== 'float32') throw new DTypeError(`${what} has dtype ${t.dtype}, expected float32`);
  const values = (tf.backend() as unknown as CpuBackend).data.get(t.dataId)?.values;
  if (!(values instanceof Float32Array)) throw new ArgumentError(`${what}: its data is not on the cpu backend`);
  return values;
}

/** A package tensor over a tf.Tensor's values (no copy, not counted in rk.memory()). */
function borrow(t: tf.TensorInfo, what: string): rk.Tensor {
  const x = new rk.Tensor(valuesOf(t, what), t.shape, 'float32', 'cpu');
  lendStorage(x);
  return x;
}

/** A TensorInfo over a package tensor's storage (no copy; the storage is TensorFlow.js's from now on). */
function lend(t: rk.Tensor): tf.TensorInfo {
  const f32 = t.dtype === 'float32' ? t : t.to({ dtype: 'float32' });
  const values = lendStorage(f32) as Float32Array;
  return (
    tf.backend() as unknown as { makeTensorInfo(s: number[], d: string, v: Float32Array): tf.TensorInfo }
  ).makeTensorInfo([...t.shape], 'float32', values);
}

/**
 * The bridge's state, shared by every copy of this module in the process (TensorFlow.js's kernel
 * registry is process-wide, so a kernel registered by one copy must find what another copy's
 * function reads): what the forward of each recorded call keeps for its gradient, by the data of its
 * first output; and what the last kernel call returned besides its tensors (the names of the tensor
 * outputs, in order, and the other outputs, e.g. newtonRnn's stats), read right after the call.
 */
interface State {
  saved: WeakMap<object, { ctx: unknown; outputs: string[] }>;
  last: { names: string[]; extras: Record<string, unknown> };
}
const state: State = ((globalThis as Record<symbol, State>)[Symbol.for('recurrent-kernels/tfjs')] ??= {
  saved: new WeakMap(),
  last: { names: [], extras: {} },
});
const saved = state.saved;

interface Bridged {
  /** The core op's hooks and its call without a tape. */
  hooks: { forward(i: object, o?: object): { outputs: object; ctx: unknown }; backward(c: unknown, g: object): object };
  call(i: object, o?: object): object;
  /** Inputs and tensor options that get a gradient. */
  differentiable: readonly string[];
  /** Outputs with no gradient (TensorFlow.js hands them zeros; anything else is refused). */
  noGradient?: readonly string[];
}

function isTf(x: unknown): x is TfTensor {
  return x instanceof tf.Tensor;
}

/** Registers the kernel and gradient of an op and returns its tf.Tensor function. */
function bridge<I extends object, O extends object>(name: string, op: Bridged) {
  const kernelName = `RecurrentKernels${name[0].toUpperCase()}${name.slice(1)}`;
  tf.registerKernel({
    kernelName,
    backendName: BACKEND,
    kernelFunc: ({ inputs, attrs }) => {
      const a = attrs as unknown as { inputNames: string[]; optionNames: string[]; options: Record<string, unknown> };
      const ins: Record<string, rk.Tensor> = {};
      const opts: Record<string, unknown> = { ...a.options };
      for (const [k, t] of Object.entries(inputs)) {
        if (!t) continue;
        const x = borrow(t, `${name}: ${k}`);
        if (a.optionNames.includes(k)) opts[k] = x;
        else ins[k] = x;
      }
      // Keep what the backward needs only while TensorFlow.js records gradients.
      const recording = (tf.engine().state as unknown as { gradientDepth: number }).gradientDepth > 0;
      let outputs: object,
        ctx: unknown = null;
      if (recording) ({ outputs, ctx } = op.hooks.forward(ins, opts));
      else outputs = op.call(ins, opts);
      const names: string[] = [];
      const infos: tf.TensorInfo[] = [];
      const extras: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(outputs)) {
        if (rk.Tensor.isTensor(v)) {
          names.push(k);
          infos.push(lend(v));
        } else {
          extras[k] = v;
        }
      }
      state.last = { names, extras };
      if (recording) {
        // The ctx's own tensors (checkpoints) and the borrowed inputs stay with the ctx.
        for (const t of tensorsIn(ctx)) if (!t.disposed) lendStorage(t);
        saved.set(infos[0].dataId, { ctx, outputs: names });
      }
      return infos;
    },
  });
  tf.registerGradient({
    kernelName,
    outputsToSave: [true],
    gradFunc: (dy, savedTensors, attrs) => {
      const a = attrs as unknown as { inputNames: string[] };
      const entry = saved.get(savedTensors[0].dataId);
      if (!entry) throw new ArgumentError(`${name}: no saved state for the gradient (was the forward recorded?)`);
      const dys = Array.isArray(dy) ? dy : [dy];
      const grads: Record<string, rk.Tensor> = {};
      entry.outputs.forEach((k, i) => {
        if (!dys[i]) return;
        const g = borrow(dys[i], `${name}: gradient of ${k}`);
        if (!op.noGradient?.includes(k)) grads[k] = g;
        else if ((g.storage as Float32Array).some((v) => v !== 0))
          throw new ArgumentError(`${name}: the ${k} output has no gradient; differentiate through the others`);
      });
      let got: Record<string, rk.Tensor | null> | null = null;
      const all = () => (got ??= op.hooks.backward(entry.ctx, grads) as Record<string, rk.Tensor | null>);
      const out: Record<string, () => TfTensor> = {};
      for (const k of a.inputNames) {
        if (!op.differentiable.includes(k)) continue;
        out[k] = () => {
          const g = all()[k];
          if (!g) throw new ArgumentError(`${name}: the backward gave no gradient for ${k}`);
          return tf.engine().makeTensorFromTensorInfo(lend(g)) as TfTensor;
        };
      }
      return out;
    },
  });
  return (inputs: I, options: Record<string, unknown> = {}): O => {
    if (typeof inputs !== 'object' || inputs === null)
      throw new ArgumentError(`${name}: inputs must be an object of tf.Tensors`);
    if (typeof options !== 'object' || options === null) throw new ArgumentError(`${name}: options must be an object`);
    const tensorInputs: TfMap = {};
    const inputNames: string[] = [],
      optionNames: string[] = [];
    const plain: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(inputs as TfMap)) {
      if (v === null || v === undefined) continue;
      if (!isTf(v)) throw new ArgumentError(`${name}: ${k} must be a tf.Tensor`);
      tensorInputs[k] = v;
      inputNames.push(k);
    }
    for (const [k, v] of Object.entries(options)) {
      if (isTf(v)) {
        tensorInputs[k] = v;
        inputNames.push(k);
        optionNames.push(k);
      } else {
        plain[k] = v;
      }
    }
    const attrs = { inputNames, optionNames, options: plain } as unknown as tf.NamedAttrMap;
    const outs = tf.engine().runKernel(kernelName, tensorInputs as tf.NamedTensorMap, attrs) as TfTensor | TfTensor[];
    const list = Array.isArray(outs) ? outs : [outs];
    const result: Record<string, unknown> = { ...state.last.extras };
    state.last.names.forEach((k, i) => {
      result[k] = list[i];
    });
    return result as O;
  };
}

const asBridged = (
  op: { hooks: unknown },
  call: unknown,
  differentiable: readonly string[],
  noGradient?: readonly string[],
): Bridged => ({ hooks: op.hooks as Bridged['hooks'], call: call as Bridged['call'], differentiable, noGradient });

/** tf.Tensor forms of the inputs and options of an op: every Tensor becomes a tf.Tensor. */
type Tf<T> = {
  [K in keyof T]: T[K] extends rk.Tensor
    ? TfTensor
    : T[K] extends rk.Tensor | null | undefined
      ? TfTensor | null | undefined
      : T[K];
};

export const linearScan = bridge<Tf<rk.LinearScanInputs>, Tf<rk.LinearScanOutputs>>(
  'linearScan',
  asBridged(rk.linearScan, rk.linearScan, ['a', 'b', 'initialState']),
) as (inputs: Tf<rk.LinearScanInputs>, options?: Tf<rk.LinearScanOptions>) => Tf<rk.LinearScanOutputs>;
export const selectiveScan = bridge<Tf<rk.SelectiveScanInputs>, Tf<rk.SelectiveScanOutputs>>(
  'selectiveScan',
  asBridged(rk.selectiveScan, rk.selectiveScan, ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'deltaBias', 'initialState']),
) as (inputs: Tf<rk.SelectiveScanInputs>, options?: Tf<rk.SelectiveScanOptions>) => Tf<rk.SelectiveScanOutputs>;
export const gatedDeltaRule = bridge<Tf<rk.GatedDeltaRuleInputs>, Tf<rk.GatedDeltaRuleOutputs>>(
  'gatedDeltaRule',
  asBridged(rk.gatedDeltaRule, rk.gatedDeltaRule, ['q', 'k', 'v', 'g', 'beta', 'initialState']),
) as (inputs: Tf<rk.GatedDeltaRuleInputs>, options?: Tf<rk.GatedDeltaRuleOptions>) => Tf<rk.GatedDeltaRuleOutputs>;
export const fusedRnn = bridge<Tf<rk.FusedRnnInputs>, Tf<rk.FusedRnnOutputs>>(
  'fusedRnn',
  asBridged(rk.fusedRnn, rk.fusedRnn, ['wx', 'R', 'b', 'states0']),
) as (inputs: Tf<rk.FusedRnnInputs>, options: Tf<rk.FusedRnnOptions>) => Tf<rk.FusedRnnOutputs>;
export const newtonRnn = bridge<Tf<rk.NewtonRnnInputs>, Tf<rk.NewtonRnnOutputs>>(
  'newtonRnn',
  asBridged(rk.newtonRnn, rk.newtonRnn, ['wx', 'R', 'b', 'h0'], ['trajectory']),
) as (inputs: Tf<rk.NewtonRnnInputs>, options: Tf<rk.NewtonRnnOptions>) => Tf<rk.NewtonRnnOutputs>;

export const linearAttention = bridge<Tf<rk.LinearAttentionInputs>, Tf<rk.LinearAttentionOutputs>>(
  'linearAttention',
  asBridged(
    rk.linearAttention,
    rk.linearAttention,
    ['q', 'k', 'v', 'decay', 'beta', 'initialState', 'aLog', 'dtBias'],
    ['windowStates'],
  ),
) as (inputs: Tf<rk.LinearAttentionInputs>, options?: Tf<rk.LinearAttentionOptions>) => Tf<rk.LinearAttentionOutputs>;
export const mamba2Scan = bridge<Tf<rk.Mamba2ScanInputs>, Tf<rk.Mamba2ScanOutputs>>(
  'mamba2Scan',
  asBridged(rk.mamba2Scan, rk.mamba2Scan, ['x', 'dt', 'A', 'B', 'C', 'D', 'z', 'dtBias', 'initialStates']),
) as (inputs: Tf<rk.Mamba2ScanInputs>, options?: Tf<rk.Mamba2ScanOptions>) => Tf<rk.Mamba2ScanOutputs>;
export const causalConv1d = bridge<Tf<rk.CausalConv1dInputs>, Tf<rk.CausalConv1dOutputs>>(
  'causalConv1d',
  asBridged(rk.causalConv1d, rk.causalConv1d, ['x', 'weight', 'bias', 'initialState'], ['windowStates']),
) as (inputs: Tf<rk.CausalConv1dInputs>, options?: Tf<rk.CausalConv1dOptions>) => Tf<rk.CausalConv1dOutputs>;

/**
 * A package tensor as a float32 tf.Tensor on the cpu backend: a CPU float32 tensor's array is
 * shared (no copy; the tensor no longer counts in rk.memory() and its buffer is never reused by the
 * package); fp16/bf16 and CUDA tensors are converted (a copy).
 */
export function toTf(t: rk.Tensor): TfTensor {
  if (!rk.Tensor.isTensor(t)) throw new ArgumentError('toTf: not a recurrent-kernels Tensor');
  const cpu = t.device === 'cpu' ? t : t.to('cpu');
  return tf.engine().makeTensorFromTensorInfo(lend(cpu)) as TfTensor;
}

/**
 * A tf.Tensor (float32, cpu backend) as a package tensor: by default a view of its values (no copy;
 * valid while the tf.Tensor lives, and not counted in rk.memory()); with { dtype } or { device }
 * other than float32 on the CPU, a converted copy.
 */
export function fromTf(t: TfTensor, options: { dtype?: rk.DType; device?: rk.Device } = {}): rk.Tensor {
  if (!isTf(t)) throw new ArgumentError('fromTf: not a tf.Tensor');
  const x = borrow(t, 'fromTf: the tensor');
  const dtype = options.dtype ?? 'float32',
    device = options.device ?? 'cpu';
  return dtype === 'float32' && device === 'cpu' ? x : x.to({ dtype, device });
}
