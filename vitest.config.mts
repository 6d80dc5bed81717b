import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { defineConfig } from 'vitest/config';

// The CPU kernels are compiled once per instruction-set variant (avx512, avx2, base). The op tests
// run once per variant this machine supports, each in its own project with RK_CPU_ISA set, and
// tests/cpu.test.ts there fails if a call ran any other variant. The variants come from the built
// addon; without one, the op tests run once (and fail on the missing addon, as everything else does).
const opTests = [
  'tests/selectiveScan.test.ts',
  'tests/gatedDeltaRule.test.ts',
  'tests/linearAttention.test.ts',
  'tests/causalConv1d.test.ts',
  'tests/mamba2Scan.test.ts',
  'tests/fusedRnn.test.ts',
  'tests/newtonRnn.test.ts',
  'tests/linearScan.test.ts',
  'tests/ort.test.ts',
  'tests/cpu.test.ts',
];

function supportedIsas(): string[] {
  const path = new URL('./build/Release/recurrent_kernels.node', import.meta.url).pathname;
  if (process.env.RK_CPU_ISA) return [process.env.RK_CPU_ISA];
  if (!existsSync(path)) return [];
  try {
    return (createRequire(import.meta.url)(path).cpuInfo() as { isasSupported: string[] }).isasSupported;
  } catch {
    return [];
  }
}

const shared = { pool: 'forks' as const, execArgv: ['--expose-gc'], testTimeout: 120_000, hookTimeout: 120_000 };
const isas = supportedIsas();

export default defineConfig({
  test: {
    projects: [
      { test: { ...shared, name: 'main', include: ['tests/**/*.test.ts'], exclude: isas.length ? opTests : [] } },
      ...isas.map((isa) => ({
        test: { ...shared, name: `cpu-${isa}`, include: opTests, env: { RK_CPU_ISA: isa } },
      })),
    ],
  },
});
