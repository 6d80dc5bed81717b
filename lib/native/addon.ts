/**
 * The addon's binding types: storage, the native module's functions, and the request each op's
 * entry point takes (cpp/napi/args.h).
 */
/** Opaque CUDA storage owned by the addon. */
export interface DeviceBuffer {
  readonly bytes: number;
  readonly disposed: boolean;
  dispose(): void;
}
export type Storage = Float32Array | Uint16Array | DeviceBuffer;

/** Number of float32 elements held by float32 storage (a TypedArray, or a DeviceBuffer's bytes / 4). */
export function float32Elements(s: Storage): number {
  return 'bytes' in s ? s.bytes / 4 : s.length;
}
export type Dev = 'cpu' | 'cuda';

export interface NativeModule {
  DeviceBuffer: new (bytes: number) => DeviceBuffer;
  cudaStatus(): { built: boolean; available: boolean; reason: string };
  cudaProperties(): Record<string, string | number>;
  cudaSynchronize(): void;
  copy(src: Storage, from: Dev, to: Dev, dtype: string, elements: number): Storage;
  convert(device: Dev, src: Storage, from: string, to: string, elements: number): Storage;
  setBufferSource(fn: (bytes: number) => ArrayBuffer, minBytes: number): void;
  memoryStats(): { deviceBytes: number; deviceBuffers: number };
  numThreads(): number;
  cpuInfo(): {
    isa: string;
    isasSupported: string[];
    threads: number;
    runs: Record<string, number>;
    soloTeams: number;
    peakBusyThreads: number;
  };
  cpuSetStepStallForTesting(microseconds: number): void;
  cpuResetPeakForTesting(): void;
  cpuSetIsa(isa: string): void;
  cpuSetThreads(threads: number): void;
  /** fn(...args) as an async call: its kernel is queued (see cpp/napi/async.h). */
  asyncCall(
    fn: (...args: unknown[]) => unknown,
    ...args: unknown[]
  ): { out: unknown; promise?: Promise<unknown>; job?: unknown };
  asyncCopy(job: unknown, maxBytes: number): boolean;
  asyncCancel(job: unknown): void;
  asyncPoll(job: unknown, microseconds: number): boolean;
  asyncStats(): { pending: number };
  timerStart(): unknown;
  timerStop(handle: unknown): number;
  // The ops' entry points: one request each, read by name (cpp/napi/args.h, Request).
  linearScanForward(
    req: Request<
      { a: Storage; b: Storage; h0: Storage | null },
      { rows: number; length: number; reverse: boolean; returnFinal: boolean }
    >,
  ): { h: Storage; finalState: Storage | null };
  linearScanBackward(
    req: Request<
      { a: Storage; h0: Storage | null },
      { rows: number; length: number; reverse: boolean; needGh0: boolean },
      { h: Storage; gh: Storage | null; gFinal: Storage | null }
    >,
  ): { ga: Storage; gb: Storage; gh0: Storage | null };
  selectiveScanForward(
    req: Request<SelectiveScanTensors, SelectiveScanConfig & { cuSeqlens: Int32Array | null; returnFinal: boolean }>,
  ): { y: Storage; states: Storage; finalState: Storage | null };
  selectiveScanBackward(
    req: Request<
      SelectiveScanTensors,
      SelectiveScanConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
      { states: Storage; dy: Storage | null; dFinal: Storage | null }
    >,
  ): {
    du: Storage;
    ddelta: Storage;
    dA: Storage;
    dB: Storage;
    dC: Storage;
    dD: Storage | null;
    dz: Storage | null;
    dDeltaBias: Storage | null;
    dh0: Storage | null;
  };
  selectiveStateUpdate(
    req: Request<
      {
        state: Storage;
        x: Storage;
        dt: Storage;
        A: Storage;
        B: Storage;
        C: Storage;
        D: Storage | null;
        z: Storage | null;
        dtBias: Storage | null;
      },
      {
        batch: number;
        dim: number;
        dstate: number;
        groups: number;
        tokens: number;
        deltaSoftplus: boolean;
        updateState: boolean;
        returnIntermediate: boolean;
      }
    >,
  ): { y: Storage; intermediate: Storage | null };
  gatedDeltaRuleForward(
    req: Request<
      GatedDeltaRuleTensors,
      GatedDeltaRuleConfig & { cuSeqlens: Int32Array | null; returnFinal: boolean; keepStates: boolean }
    >,
  ): { o: Storage; states: Storage | null; finalState: Storage | null };
  gatedDeltaRuleBackward(
    req: Request<
      GatedDeltaRuleTensors,
      GatedDeltaRuleConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
      { states: Storage; dO: Storage | null; dFinal: Storage | null }
    >,
  ): { dq: Storage; dk: Storage; dv: Storage; dg: Storage; dbeta: Storage; dh0: Storage | null };
  gatedDeltaRuleStep(
    req: Request<
      { state: Storage; q: Storage; k: Storage; v: Storage; g: Storage; beta: Storage },
      Omit<GatedDeltaRuleConfig, 'T'> & { tokens: number; updateState: boolean; returnIntermediate: boolean }
    >,
  ): { o: Storage; intermediate: Storage | null };
  causalConv1dForward(
    req: Request<
      CausalConv1dTensors,
      CausalConv1dConfig & { cuSeqlens: Int32Array | null; returnFinal: boolean; window: number }
    >,
  ): { y: Storage; finalState: Storage | null; windowStates: Storage | null };
  causalConv1dBackward(
    req: Request<
      CausalConv1dTensors,
      CausalConv1dConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
      { dY: Storage | null; dFinal: Storage | null }
    >,
  ): { dx: Storage; dweight: Storage; dbias: Storage | null; dh0: Storage | null };
  linearAttentionForward(
    req: Request<
      LinearAttentionTensors,
      LinearAttentionConfig & {
        cuSeqlens: Int32Array | null;
        returnFinal: boolean;
        keepStates: boolean;
        window: number;
      }
    >,
  ): { o: Storage; states: Storage | null; finalState: Storage | null; windowStates: Storage | null };
  linearAttentionBackward(
    req: Request<
      LinearAttentionTensors,
      LinearAttentionConfig & { cuSeqlens: Int32Array | null; needDh0: boolean },
      { states: Storage; dO: Storage | null; dFinal: Storage | null }
    >,
  ): { dq: Storage; dk: Storage; dv: Storage; dg: Storage | null; dbeta: Storage | null; dh0: Storage | null };
  linearAttentionStep(
    req: Request<
      Omit<LinearAttentionTensors, 'h0'> & { state: Storage },
      Omit<LinearAttentionConfig, 'T'> & { tokens: number; updateState: boolean; returnIntermediate: boolean }
    >,
  ): { o: Storage; intermediate: Storage | null };
  linearAttentionGates(req: Request<LinearGateTensors, LinearGateConfig>): { g: Storage | null; beta: Storage | null };
  linearAttentionGatesBackward(
    req: Request<LinearGateTensors, LinearGateConfig, { dg: Storage | null; dbeta: Storage | null }>,
  ): { ddecay: Storage | null; dbeta: Storage | null; daLog: Storage | null; ddtBias: Storage | null };
  mamba2Prepare(req: Request<Mamba2GateTensors, Mamba2GateConfig>): { g: Storage; v: Storage };
  mamba2Finish(req: Request<Mamba2GateTensors & { o: Storage }, Mamba2GateConfig>): { y: Storage };
  mamba2FinishBackward(req: Request<Mamba2GateTensors & { o: Storage }, Mamba2GateConfig, { dy: Storage }>): {
    dO: Storage;
    dz: Storage;
  };
  mamba2PrepareBackward(
    req: Request<Mamba2GateTensors, Mamba2GateConfig, { dO: Storage | null; dv: Storage; dg: Storage }>,
  ): { dx: Storage; ddt: Storage; dA: Storage; dDtBias: Storage | null; dD: Storage | null };
  mamba2TransposeStates(req: Request<{ src: Storage }, { count: number; rows: number; cols: number }>): {
    dst: Storage;
  };
  mamba2Step(
    req: Request<
      Mamba2GateTensors & { state: Storage; B: Storage; C: Storage },
      Mamba2GateConfig & {
        batch: number;
        tokens: number;
        G: number;
        N: number;
        updateState: boolean;
        returnIntermediate: boolean;
      }
    >,
  ): { y: Storage; intermediate: Storage | null };
  fusedRnnForward(req: Request<FusedRnnTensors, FusedRnnConfig & { lengths: Int32Array | null; training: boolean }>): {
    h: Storage;
    finalStates: Storage;
    savedStates: Storage | null;
    savedPre: Storage | null;
  };
  fusedRnnBackward(
    req: Request<
      FusedRnnTensors,
      FusedRnnConfig & { lengths: Int32Array | null; needDStates0: boolean },
      { savedStates: Storage; savedPre: Storage; dh: Storage | null; dFinal: Storage | null }
    >,
  ): { dwx: Storage; dR: Storage; db: Storage; dStates0: Storage | null };
  /** The cells' tables (cuda/cells/fused_rnn.h, cuda/newton/newton_rnn.h: their one definition). */
  fusedRnnCells(): { name: string; code: number; gates: number; states: number }[];
  newtonRnnCells(): { name: string; code: number; gates: number; states: number; diagonal: boolean }[];
  newtonRnnForward(req: Request<NewtonRnnTensors, NewtonRnnConfig>): {
    y: Storage;
    traj: Storage;
    finalStates: Storage;
    iterations: Int32Array;
    residual: Float32Array;
    converged: Uint8Array;
    fellBack: Uint8Array;
  };
  newtonRnnBackward(
    req: Request<
      NewtonRnnTensors,
      NewtonRnnConfig & { needDh0: boolean },
      { traj: Storage; dy: Storage | null; dFinal: Storage | null }
    >,
  ): { dwx: Storage; dR: Storage; db: Storage; dh0: Storage | null };
}

/** The one argument of an op's native entry point: inputs, sizes and flags by name; grads for a backward. */
export interface Request<T, C, G = undefined> {
  device: Dev;
  dtype: string;
  tensors: T;
  config: C;
  grads?: G;
}

export interface FusedRnnTensors {
  wx: Storage;
  R: Storage;
  b: Storage;
  states0: Storage | null;
}
/** cell: 0 elman, 1 lstm, 2 gru, 3 slstm (rkcuda::CellKind). */
export interface FusedRnnConfig {
  cell: number;
  batch: number;
  T: number;
  heads: number;
  headDim: number;
  returnLastOnly: boolean;
}

export interface NewtonRnnTensors {
  wx: Storage;
  R: Storage;
  b: Storage;
  h0: Storage | null;
  guess: Storage | null;
}
/** cell: 0 gru-diag, 1 lstm-cifg-diag, 2 gru, 3 lstm, 4 elman; guess: 0 zeros, 1 one-step, 2 provided. */
export interface NewtonRnnConfig {
  cell: number;
  batch: number;
  T: number;
  heads: number;
  headDim: number;
  fullJacobian: boolean;
  sequential: boolean;
  fallbackSequential: boolean;
  maxIters: number;
  tolAbs: number;
  tolRel: number;
  damping: number;
  guess: number;
}

export interface CausalConv1dTensors {
  x: Storage;
  weight: Storage;
  bias: Storage | null;
  h0: Storage | null;
}
export interface CausalConv1dConfig {
  batch: number;
  C: number;
  T: number;
  W: number;
  dilation: number;
  channelsLast: boolean;
  silu: boolean;
}

export interface LinearAttentionTensors {
  q: Storage;
  k: Storage;
  v: Storage;
  g: Storage | null;
  beta: Storage | null;
  h0: Storage | null;
}
export interface LinearAttentionConfig {
  rule: number;
  batch: number;
  T: number;
  Hq: number;
  Hk: number;
  Hv: number;
  K: number;
  V: number;
  perKeyDecay: boolean;
  scale: number;
  l2norm: boolean;
}
export interface LinearGateTensors {
  decay: Storage | null;
  beta: Storage | null;
  aLog: Storage | null;
  dtBias: Storage | null;
}
export interface LinearGateConfig {
  rows: number;
  Hv: number;
  K: number;
  perKey: boolean;
  qwen: boolean;
  sigmoid: boolean;
  betaHeads: number;
  dtBiasPerKey: boolean;
}

/** Mamba-2's glue around the scan (cpp/ops/ssd/mamba2_scan_binding.cc); each kernel reads what it needs. */
export interface Mamba2GateTensors {
  x: Storage;
  dt?: Storage | null;
  A?: Storage | null;
  dtBias?: Storage | null;
  D?: Storage | null;
  z?: Storage | null;
}
export interface Mamba2GateConfig {
  rows: number;
  /** Rows at or past this lie in no sequence (zero outputs and gradients); absent: every row. */
  validRows?: number;
  H: number;
  P: number;
  dtSoftplus: boolean;
  clamp: boolean;
  dtMin: number;
  dtMax: number;
  dPerChannel: boolean;
}

export interface GatedDeltaRuleTensors {
  q: Storage;
  k: Storage;
  v: Storage;
  g: Storage;
  beta: Storage;
  h0: Storage | null;
}
export interface GatedDeltaRuleConfig {
  batch: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
  scale: number;
  l2norm: boolean;
}

export interface SelectiveScanTensors {
  u: Storage;
  delta: Storage;
  A: Storage;
  B: Storage;
  C: Storage;
  D: Storage | null;
  z: Storage | null;
  deltaBias: Storage | null;
  h0: Storage | null;
}
export interface SelectiveScanConfig {
  batch: number;
  dim: number;
  seqlen: number;
  dstate: number;
  groups: number;
  variableB: boolean;
  variableC: boolean;
  deltaSoftplus: boolean;
}
