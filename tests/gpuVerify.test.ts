// npm run gpu:verify (scripts/gpu-verify.mjs) and its smoke run (scripts/gpu-smoke.mjs), as far as
// a machine without a GPU can check them: the refusal, the report's rendering, the smoke cases.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { hasCuda } from './helpers';

const root = join(__dirname, '..');

describe('gpu:verify', () => {
  it.runIf(!hasCuda)('stops at once with a clear message and exit code 2 when no GPU is usable', () => {
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'gpu-verify.mjs')], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/gpu:verify: no usable NVIDIA GPU here \(.+\); nothing was run/);
  });

  it('renders a report: device, steps, smoke errors, benchmark rows with peer ratios', async () => {
    const { renderReport } = await import(pathToFileURL(join(root, 'scripts', 'gpu-verify.mjs')).href);
    const md: string = renderReport({
      started: '2026-01-01T00:00:00Z',
      version: '1.2.3',
      device: {
        name: 'NVIDIA H100',
        computeCapability: '9.0',
        multiProcessorCount: 132,
        totalMemory: 80 * 2 ** 30,
        peakBandwidthGBs: 3350,
      },
      driver: '580.1',
      steps: [
        { name: 'npm run test:gpu', ok: true, seconds: 100, detail: '10 passed' },
        { name: 'compute-sanitizer racecheck', ok: false, seconds: 5, detail: 'ERROR SUMMARY: 1 error | x' },
        { name: 'compute-sanitizer initcheck', ok: null, detail: 'compute-sanitizer is not installed' },
      ],
      smoke: [
        { op: 'linearScan', pass: true, maxRelError: 1.5e-7, ms: 0.5 },
        { op: 'fusedRnn', pass: false, error: 'ERR_CUDA: x' },
      ],
      paths: {
        fused: [
          { case: 'lstm 128', repeats: 30, repeatsAgree: true, pathsAgree: true },
          { case: 'gru 256', repeats: 30, repeatsAgree: true, pathsAgree: false },
        ],
        plan768: { plan: 'multi-block' },
        newton: [{ cell: 'gru-diag', size: '8x4096x1024', cpu: [4, 5], device: [4, 6], equal: false }],
        anchors: [{ op: 'linearScan (8,1536,4096)', maxRelError: 2.5e-7, pass: true }],
      },
      benchmarks: [
        {
          op: 'linear-scan',
          rows: [{ size: '4x2048', dtype: 'float32', pass: 'fwd', ms: 2, gbs: 100, peers: { PyTorch: 4 } }],
        },
        { op: 'newton-rnn', rows: [], detail: 'timed out after 150 s' },
      ],
    });
    expect(md).toContain(
      'Device: NVIDIA H100 (compute capability 9.0, 132 SMs, 80.0 GiB, peak 3350 GB/s); driver 580.1; package 1.2.3.',
    );
    expect(md).toContain('| npm run test:gpu | pass | 100.0 | 10 passed |');
    expect(md).toContain('| compute-sanitizer racecheck | **FAIL** | 5.0 | ERROR SUMMARY: 1 error \\| x |');
    expect(md).toContain('| compute-sanitizer initcheck | not run |  | compute-sanitizer is not installed |');
    expect(md).toContain('| linearScan | pass | 1.50e-7 | 0.50 |');
    expect(md).toContain('| fusedRnn | **FAIL** | ERR_CUDA: x |  |');
    expect(md).toContain('| 4x2048 | float32 | fwd | 2.000 | 100.0 | 4.000 ms (2.00x) |');
    expect(md).toContain('not measured: timed out after 150 s');
    expect(md).toContain('- fused lstm 128: multi-block = single-block bitwise, 30 repeats');
    expect(md).toContain('- fused gru 256: **differ** (repeats agree: true)');
    expect(md).toContain('- fused cells at headDim 768: plan multi-block');
    expect(md).toContain('- linearScan (8,1536,4096): max rel. error against the CPU 2.50e-7');
    expect(md).toContain('- Newton gru-diag 8x4096x1024: iterations **differ** from the CPU (device 4 6; CPU 4 5)');
  });

  it('the smoke cases run forward and backward (CPU against itself here)', () => {
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'gpu-smoke.mjs')], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, RK_SMOKE_TARGET: 'cpu' },
    });
    expect(r.status, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout.trim().split('\n').pop() as string);
    expect(res.ok).toBe(true);
    expect(res.ops.map((o: { op: string }) => o.op)).toEqual([
      'linearScan',
      'selectiveScan',
      'gatedDeltaRule',
      'linearAttention (gated_delta, per-key decay)',
      'causalConv1d',
      'mamba2Scan',
      'fusedRnn (lstm)',
      'fusedRnn (gru)',
      'newtonRnn (gru-diag)',
    ]);
  });

  it('the launch-path comparison runs its steps (CPU here, at small sizes: the pins change nothing)', () => {
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'gpu-paths.mjs')], {
      encoding: 'utf8',
      timeout: 120_000,
      env: { ...process.env, RK_GPU_PATHS_DEVICE: 'cpu', RK_GPU_PATHS_QUICK: '1' },
    });
    expect(r.status, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout.trim().split('\n').pop() as string);
    expect(res.ok).toBe(true);
    expect(res.fused.map((f: { case: string }) => f.case)).toEqual(['lstm 128', 'lstm 256', 'gru 128', 'gru 256']);
    for (const f of res.fused) expect(f).toMatchObject({ repeats: 3, repeatsAgree: true, pathsAgree: true });
    expect(res.plan768.plan).toBe('persistent');
    expect(res.newton.map((n: { cell: string }) => n.cell)).toEqual(['gru-diag', 'lstm-cifg-diag']);
    for (const n of res.newton) expect(n.cpu.length).toBeGreaterThan(0);
  });
});
