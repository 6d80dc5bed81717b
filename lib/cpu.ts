/**
 * The CPU kernels' settings: which instruction-set variant runs and how many threads it uses.
 *
 * Every CPU kernel is compiled for each variant the platform has: `avx512` (x86-64 with AVX-512
 * F/VL/DQ), `avx2` (x86-64 with AVX2 and FMA) and `base` (SSE2 on x86-64, NEON on arm64). The best
 * variant the CPU supports runs unless `RK_CPU_ISA` (read when the addon loads) or `cpu.setIsa()`
 * picks a lower one. Threads: `RK_NUM_THREADS`, else the number of logical CPUs, unless
 * `cpu.setThreads()` says otherwise. The kernels run on one persistent thread pool per process.
 * Both settings are process-wide: they apply to every worker thread too.
 */
import { ArgumentError } from './errors';
import { native } from './native';

export type CpuIsa = 'avx512' | 'avx2' | 'base';
export const CPU_ISAS: readonly CpuIsa[] = ['avx512', 'avx2', 'base'];

export interface CpuInfo {
  /** The variant the CPU kernels run with now. */
  isa: CpuIsa;
  /** The variants this CPU can run, best first. */
  isasSupported: CpuIsa[];
  /** Threads the CPU kernels use. */
  threads: number;
}

export const cpu = {
  info(): CpuInfo {
    const r = native().cpuInfo();
    return { isa: r.isa as CpuIsa, isasSupported: r.isasSupported as CpuIsa[], threads: r.threads };
  },
  /** Runs the CPU kernels with `isa` from now on; throws ERR_ARGUMENT if this CPU does not support it. */
  setIsa(isa: CpuIsa): void {
    if (!CPU_ISAS.includes(isa)) {
      throw new ArgumentError(`cpu.setIsa: isa is ${JSON.stringify(isa)}, expected one of ${CPU_ISAS.join(', ')}`);
    }
    native().cpuSetIsa(isa);
  },
  /** Uses `threads` threads (an integer >= 1) in the CPU kernels from now on. */
  setThreads(threads: number): void {
    if (!Number.isInteger(threads) || threads < 1 || threads > 1024) {
      throw new ArgumentError(`cpu.setThreads: threads is ${threads}, expected an integer from 1 to 1024`);
    }
    native().cpuSetThreads(threads);
  },
};
