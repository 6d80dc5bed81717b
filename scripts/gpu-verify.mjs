// npm run gpu:verify [-- --out DIR] [--quick] [--skip-bench]
//
// One call that verifies the CUDA path on a machine with an NVIDIA GPU and writes one report:
//   1. the device and driver (rk.cuda.deviceProperties(), nvidia-smi when present);
//   2. tests/gpu/ptx_smoke.cu, built with nvcc for this GPU: the inline PTX of cuda/common checked
//      exactly (mma with integer operands for f16, bf16 and tf32; cp.async with source sizes 0, 6 and
//      16; the cross-block group barrier; float4 atomicAdd), and under compute-sanitizer racecheck;
//      then the whole test suite with the GPU tests required (npm run test:gpu), per-file results;
//   3. scripts/gpu-smoke.mjs: every CUDA op forward + backward at small sizes against the CPU
//      kernels, plainly and, where compute-sanitizer is installed, under its memcheck, racecheck,
//      synccheck and initcheck tools; scripts/gpu-paths.mjs: the fused cells' multi-block path
//      against the single-block one bitwise (headDim 128 and 256, T = 4096, 30 repeats), the path
//      their plan takes at headDim 768 on this device, the Newton RNN's iteration counts against
//      the CPU's, and every op's accuracy at its anchor size against the CPU kernels;
//   4. the CUDA benchmarks of every op at their default sizes (bench/cli.mjs --device cuda --json),
//      with the PyTorch peers where python3 with torch is present (--quick: the quick sizes).
// It writes gpu-verify.json and gpu-verify.md into DIR (default .device-logs) after every step, so
// a run cut short still leaves what it got. Each step has its own time limit; the whole run is
// meant to fit in about 8-9 minutes on an H100 (tests ~3, smoke + sanitizers ~1, paths and anchors
// ~1, benchmarks ~4: an estimate, no GPU has run it yet).
// Without a usable GPU it stops at once with exit code 2 and says why. Exit code 1: a step failed.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const OPS = [
  'linear-scan',
  'selective-scan',
  'gated-delta-rule',
  'fused-rnn',
  'newton-rnn',
  'linear-attention',
  'causal-conv1d',
  'mamba2-scan',
];
// Ops benchmarked at their quick sizes only, to keep the whole run within its time (their CUDA paths
// are the per-token recurrence and elementwise kernels: correctness first).
const QUICK_ONLY = new Set(['linear-attention', 'causal-conv1d', 'mamba2-scan']);
const SANITIZER_TOOLS = ['memcheck', 'racecheck', 'synccheck', 'initcheck'];

/** The Markdown form of a report (exported for the tests). */
export function renderReport(r) {
  const lines = [`# GPU verification, ${r.started}`, ''];
  const d = r.device ?? {};
  lines.push(
    `Device: ${d.name ?? 'unknown'} (compute capability ${d.computeCapability ?? '?'}, ` +
      `${d.multiProcessorCount ?? '?'} SMs, ${d.totalMemory ? (d.totalMemory / 2 ** 30).toFixed(1) : '?'} GiB, ` +
      `peak ${d.peakBandwidthGBs ?? '?'} GB/s); driver ${r.driver ?? 'unknown'}; package ${r.version ?? '?'}.`,
    '',
  );
  const status = (ok) => (ok === true ? 'pass' : ok === false ? '**FAIL**' : 'not run');
  lines.push('| step | result | seconds | detail |', '|---|---|---|---|');
  for (const s of r.steps)
    lines.push(
      `| ${s.name} | ${status(s.ok)} | ${s.seconds?.toFixed(1) ?? ''} | ${(s.detail ?? '').replace(/\|/g, '\\|').replace(/\n/g, ' ')} |`,
    );
  if (r.smoke?.length) {
    lines.push(
      '',
      '### Smoke run (CUDA against the CPU kernels)',
      '',
      '| op | result | max rel. error | ms |',
      '|---|---|---|---|',
    );
    for (const o of r.smoke)
      lines.push(
        `| ${o.op} | ${status(o.pass)} | ${o.maxRelError?.toExponential(2) ?? o.error ?? ''} | ${o.ms?.toFixed(2) ?? ''} |`,
      );
  }
  if (r.paths) {
    lines.push('', '### Launch paths', '');
    for (const f of r.paths.fused ?? [])
      lines.push(
        `- fused ${f.case}: ${f.error ? `**error** ${f.error}` : f.pathsAgree ? `multi-block = single-block bitwise, ${f.repeats} repeats` : `**differ** (repeats agree: ${f.repeatsAgree})`}`,
      );
    if (r.paths.plan768) lines.push(`- fused cells at headDim 768: plan ${r.paths.plan768.plan}`);
    for (const a of r.paths.anchors ?? [])
      lines.push(
        `- ${a.op}: ${a.error ? `**error** ${a.error}` : `max rel. error against the CPU ${a.maxRelError.toExponential(2)}${a.pass ? '' : ' **FAIL**'}`}`,
      );
    for (const n of r.paths.newton ?? [])
      lines.push(
        `- Newton ${n.cell} ${n.size}: iterations ${n.equal ? 'equal to the CPU' : '**differ** from the CPU'} (device ${n.device?.join(' ')}; CPU ${n.cpu?.join(' ')})`,
      );
  }
  for (const b of r.benchmarks ?? []) {
    lines.push('', `### Benchmark ${b.op}`, '');
    if (!b.rows?.length) {
      lines.push(`not measured: ${b.detail ?? 'no rows'}`);
      continue;
    }
    const peers = [...new Set(b.rows.flatMap((x) => Object.keys(x.peers ?? {})))];
    lines.push(
      `| size | dtype | pass | ms | GB/s | ${peers.join(' | ')} |`,
      `|---|---|---|---|---|${peers.map(() => '---|').join('')}`,
    );
    for (const x of b.rows) {
      const ps = peers.map((p) => {
        const v = x.peers?.[p];
        return typeof v === 'number' ? `${v.toFixed(3)} ms (${(v / x.ms).toFixed(2)}x)` : (v ?? '');
      });
      lines.push(`| ${[x.size, x.dtype, x.pass, x.ms?.toFixed(3), x.gbs?.toFixed(1), ...ps].join(' | ')} |`);
    }
  }
  return `${lines.join('\n')}\n`;
}

function parseArgs(argv) {
  const args = { out: join(root, '.device-logs'), quick: false, skipBench: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--out' && i + 1 < argv.length) args.out = argv[++i];
    else if (argv[i] === '--quick') args.quick = true;
    else if (argv[i] === '--skip-bench') args.skipBench = true;
    else {
      console.error(
        `gpu:verify: unknown argument ${argv[i]} (usage: npm run gpu:verify -- [--out DIR] [--quick] [--skip-bench])`,
      );
      process.exit(2);
    }
  }
  return args;
}

/** Runs a command with a time limit; returns { ok, seconds, status, stdout, stderr }. */
function step(cmd, args, { timeoutS, env = {} }) {
  const t0 = performance.now();
  const r = spawnSync(cmd, args, {
    cwd: root,
    encoding: 'utf8',
    timeout: timeoutS * 1000,
    maxBuffer: 256 << 20,
    env: { ...process.env, ...env },
  });
  const seconds = (performance.now() - t0) / 1000;
  const timedOut = r.error?.code === 'ETIMEDOUT' || r.signal === 'SIGTERM';
  return {
    ok: r.status === 0,
    seconds,
    status: r.status,
    timedOut,
    stdout: r.stdout ?? '',
    stderr: r.stderr ?? '',
    error: r.error ? String(r.error.message) : null,
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const rk = await import(join(root, 'dist', 'index.mjs'));
  if (!rk.cuda.available()) {
    console.error(
      `gpu:verify: no usable NVIDIA GPU here (${rk.cuda.reason()}); nothing was run. ` +
        'Run it on a machine with an NVIDIA GPU and a CUDA build of the addon (npm run build with nvcc on PATH).',
    );
    process.exit(2);
  }
  mkdirSync(args.out, { recursive: true });
  const props = rk.cuda.deviceProperties();
  const smi = spawnSync('nvidia-smi', ['--query-gpu=driver_version', '--format=csv,noheader'], { encoding: 'utf8' });
  const report = {
    started: new Date().toISOString(),
    version: rk.version,
    device: props,
    driver: smi.status === 0 ? smi.stdout.trim() : `CUDA driver API ${props.driverVersion} (no nvidia-smi)`,
    steps: [],
    smoke: [],
    benchmarks: [],
  };
  const save = () => {
    writeFileSync(join(args.out, 'gpu-verify.json'), JSON.stringify(report, null, 2));
    writeFileSync(join(args.out, 'gpu-verify.md'), renderReport(report));
  };
  const tail = (s, n = 1500) => s.slice(-n);

  // 2a. The inline PTX, exactly (tests/gpu/ptx_smoke.cu), plainly and under racecheck.
  const nvcc = spawnSync('nvcc', ['--version'], { encoding: 'utf8' });
  if (nvcc.status !== 0) {
    report.steps.push({ name: 'ptx smoke (tests/gpu/ptx_smoke.cu)', ok: null, detail: 'nvcc is not on PATH' });
  } else {
    const exe = join(args.out, 'ptx_smoke');
    const cc = `${props.major}${props.minor}`;
    const b = step(
      'nvcc',
      [
        '-std=c++17',
        `-arch=sm_${cc}`,
        '--expt-relaxed-constexpr',
        '-I',
        join(root, 'cuda'),
        '-o',
        exe,
        join(root, 'tests', 'gpu', 'ptx_smoke.cu'),
      ],
      { timeoutS: 120 },
    );
    const r = b.ok ? step(exe, [], { timeoutS: 60 }) : b;
    report.steps.push({
      name: 'ptx smoke (tests/gpu/ptx_smoke.cu)',
      ok: r.ok,
      seconds: b.seconds + (b.ok ? r.seconds : 0),
      detail: tail((r.stdout + r.stderr).trim(), 500),
    });
    if (b.ok && spawnSync('compute-sanitizer', ['--version'], { encoding: 'utf8' }).status === 0) {
      const s = step('compute-sanitizer', ['--tool', 'racecheck', '--error-exitcode', '9', exe], { timeoutS: 120 });
      report.steps.push({
        name: 'ptx smoke under compute-sanitizer racecheck',
        ok: s.ok,
        seconds: s.seconds,
        detail: tail((s.stdout + s.stderr).trim(), 300),
      });
    }
    save();
  }

  // 2b. The test suite, GPU tests required.
  const testJson = join(args.out, 'vitest.json');
  const t = step(
    process.execPath,
    [
      join(root, 'node_modules', 'vitest', 'vitest.mjs'),
      'run',
      '--reporter=dot',
      '--reporter=json',
      `--outputFile.json=${testJson}`,
    ],
    { timeoutS: 240, env: { RK_REQUIRE_GPU: '1' } },
  );
  let detail = t.timedOut ? 'timed out after 240 s' : '';
  if (existsSync(testJson)) {
    const j = JSON.parse(readFileSync(testJson, 'utf8'));
    const failed = (j.testResults ?? []).flatMap((f) =>
      (f.assertionResults ?? [])
        .filter((a) => a.status === 'failed')
        .map((a) => `${f.name.replace(root, '')}: ${a.fullName}`),
    );
    detail =
      `${j.numPassedTests} passed, ${j.numFailedTests} failed, ${j.numPendingTests} skipped` +
      (failed.length ? `; failed: ${failed.slice(0, 20).join('; ')}` : '') +
      (detail ? `; ${detail}` : '');
    rmSync(testJson);
  } else detail ||= tail(t.stderr + t.stdout, 500);
  report.steps.push({ name: 'npm run test:gpu', ok: t.ok, seconds: t.seconds, detail });
  save();

  // 3. Smoke run, plain and under each compute-sanitizer tool.
  const smoke = step(process.execPath, [join(root, 'scripts', 'gpu-smoke.mjs')], { timeoutS: 60 });
  try {
    report.smoke = JSON.parse(smoke.stdout.trim().split('\n').pop()).ops;
  } catch {
    /* reported below */
  }
  report.steps.push({
    name: 'smoke run (scripts/gpu-smoke.mjs)',
    ok: smoke.ok,
    seconds: smoke.seconds,
    detail: smoke.ok ? '' : tail(smoke.stderr + smoke.stdout, 500),
  });
  save();
  const paths = step(process.execPath, [join(root, 'scripts', 'gpu-paths.mjs')], { timeoutS: 300 });
  try {
    report.paths = JSON.parse(paths.stdout.trim().split('\n').pop());
  } catch {
    /* reported below */
  }
  report.steps.push({
    name: 'launch paths (scripts/gpu-paths.mjs)',
    ok: paths.ok,
    seconds: paths.seconds,
    detail: paths.ok ? '' : paths.timedOut ? 'timed out after 300 s' : tail(paths.stderr + paths.stdout, 500),
  });
  save();
  const sanitizer = spawnSync('compute-sanitizer', ['--version'], { encoding: 'utf8' });
  for (const tool of SANITIZER_TOOLS) {
    if (sanitizer.status !== 0) {
      report.steps.push({ name: `compute-sanitizer ${tool}`, ok: null, detail: 'compute-sanitizer is not installed' });
      continue;
    }
    const s = step(
      'compute-sanitizer',
      [
        '--tool',
        tool,
        '--error-exitcode',
        '9',
        '--print-limit',
        '20',
        process.execPath,
        join(root, 'scripts', 'gpu-smoke.mjs'),
      ],
      { timeoutS: 120 },
    );
    const summary = (s.stdout + s.stderr)
      .split('\n')
      .filter((l) => /ERROR SUMMARY|Hazard|Invalid|Uninitialized|Barrier/.test(l));
    report.steps.push({
      name: `compute-sanitizer ${tool}`,
      ok: s.ok,
      seconds: s.seconds,
      detail: s.timedOut ? 'timed out after 120 s' : summary.slice(0, 12).join(' / '),
    });
    save();
  }

  // 4. Benchmarks.
  if (!args.skipBench) {
    for (const op of OPS) {
      const out = join(args.out, `bench-${op}.json`);
      const b = step(
        process.execPath,
        [
          join(root, 'bench', 'cli.mjs'),
          '--op',
          op,
          '--device',
          'cuda',
          '--json',
          out,
          ...(args.quick || QUICK_ONLY.has(op) ? ['--quick'] : []),
        ],
        { timeoutS: 150 },
      );
      let rows = [];
      if (existsSync(out)) {
        rows = JSON.parse(readFileSync(out, 'utf8')).rows ?? [];
        rmSync(out);
      }
      report.benchmarks.push({
        op,
        rows,
        detail: b.ok ? '' : b.timedOut ? 'timed out after 150 s' : tail(b.stderr, 400),
      });
      report.steps.push({ name: `bench ${op}`, ok: b.ok, seconds: b.seconds, detail: `${rows.length} rows` });
      save();
    }
  }
  save();
  const failed = report.steps.filter((s) => s.ok === false).map((s) => s.name);
  console.log(renderReport(report));
  console.log(
    `wrote ${join(args.out, 'gpu-verify.json')} and gpu-verify.md${failed.length ? `; failed: ${failed.join(', ')}` : ''}`,
  );
  process.exit(failed.length ? 1 : 0);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
