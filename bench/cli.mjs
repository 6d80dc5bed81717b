#!/usr/bin/env node
// Microbenchmark CLI:  npm run bench -- --op linear-scan [--device cpu|cuda] [--json FILE] [--quick]
//                        [--size AxBx...[,AxBx...]] [--dtype float32|float16|bfloat16]
//                        [--isa avx512|avx2|base|all] [--threads N]
//                        [--curve] [--chart FILE.svg]   (curves and charts: the ops that have them)
// Prints, per size: median time (CUDA events on GPU), achieved GB/s, % of the device's measured
// copy bandwidth, any per-op columns (e.g. a floor), and the ratio to each peer measured in the
// same run. --size and --dtype replace an op's default sizes and dtypes where the op supports them.
// On CPU a header gives the CPU model, the kernels' instruction-set variant and thread count, and
// the machine's ceilings measured with ONNX Runtime (fp32 MatMul GFLOP/s) and a plain copy.
// --isa picks the CPU kernels' variant (rk.cpu.setIsa); --isa all runs the op once per variant the
// CPU supports (without peers) and prints each row's time per variant and its ratio to the best.
// --threads sets the CPU kernels' threads (rk.cpu.setThreads); ONNX Runtime peers use as many.
// Progress goes to stderr; tables to stdout. A bad argument exits with code 2 and one line.
import { readdirSync, writeFileSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import * as rk from '../dist/index.mjs';
import { bandwidthCeiling } from './timing.mjs';
import { machineCeilings, ortStatus } from './peers/ort.mjs';

// Every bench/ops/<name>.mjs is the op --op <name> (a new op adds its file and nothing here).
const opsDir = new URL('./ops/', import.meta.url);
const OPS = Object.fromEntries(
  await Promise.all(
    readdirSync(opsDir)
      .filter((f) => f.endsWith('.mjs'))
      .sort()
      .map(async (f) => [f.slice(0, -'.mjs'.length), (await import(new URL(f, opsDir).href)).default]),
  ),
);
const ISAS = ['avx512', 'avx2', 'base'];
const USAGE =
  `usage: npm run bench -- --op <${Object.keys(OPS).join('|')}> [--device cpu|cuda] [--json FILE] [--quick] ` +
  '[--size AxBx...[,...]] [--dtype DTYPE] [--isa avx512|avx2|base|all] [--threads N] [--curve] [--chart FILE.svg]';

/** A bad command line: one line on stderr, exit code 2. */
class UsageError extends Error {}

function parseSizes(v) {
  if (!v) throw new UsageError('bench: --size needs a value, e.g. --size 4x2048x2048x16[,...]');
  return v.split(',').map((s) => {
    const dims = s.split('x').map((d) => (/^\d+$/.test(d.trim()) ? Number(d) : NaN));
    if (dims.some((d) => !Number.isSafeInteger(d) || d < 1)) {
      throw new UsageError(`bench: bad --size ${s} (positive integers joined by x, e.g. 4x2048x2048x16)`);
    }
    return dims;
  });
}

function parseArgs(argv) {
  const args = {
    op: 'linear-scan',
    device: null,
    json: null,
    quick: false,
    sizes: null,
    dtype: null,
    curve: false,
    chart: null,
    isa: null,
    threads: null,
  };
  const value = (i, k) => {
    if (i >= argv.length || argv[i].startsWith('--')) throw new UsageError(`bench: ${k} needs a value`);
    return argv[i];
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--op') args.op = value(++i, k);
    else if (k === '--device') args.device = value(++i, k);
    else if (k === '--json') args.json = value(++i, k);
    else if (k === '--quick') args.quick = true;
    else if (k === '--curve') args.curve = true;
    else if (k === '--chart') args.chart = value(++i, k);
    else if (k === '--size') args.sizes = parseSizes(argv[++i]);
    else if (k === '--dtype') {
      args.dtype = value(++i, k);
      if (!rk.DTYPES.includes(args.dtype))
        throw new UsageError(`bench: --dtype must be one of ${rk.DTYPES.join(', ')}`);
    } else if (k === '--isa') {
      args.isa = value(++i, k);
      if (![...ISAS, 'all'].includes(args.isa))
        throw new UsageError(`bench: --isa must be one of ${[...ISAS, 'all'].join(', ')}`);
    } else if (k === '--threads') {
      const v = value(++i, k);
      args.threads = /^\d+$/.test(v) ? Number(v) : NaN;
      if (!Number.isInteger(args.threads) || args.threads < 1 || args.threads > 1024) {
        throw new UsageError(`bench: --threads must be an integer from 1 to 1024, got ${v}`);
      }
    } else if (k === '--help' || k === '-h') args.help = true;
    else throw new UsageError(`bench: unknown argument ${k} (--help for usage)`);
  }
  if (args.help) return args;
  if (!OPS[args.op]) throw new UsageError(`bench: unknown op ${args.op}; one of ${Object.keys(OPS).join(', ')}`);
  if (args.device !== null && !['cpu', 'cuda'].includes(args.device))
    throw new UsageError('bench: --device must be cpu or cuda');
  const op = OPS[args.op];
  for (const s of args.sizes ?? []) {
    if (!op.sizeDims.includes(s.length)) {
      throw new UsageError(
        `bench: --size ${s.join('x')} has ${s.length} dimensions; ${args.op} sizes are ${op.sizeHelp}`,
      );
    }
  }
  return args;
}

let args;
try {
  args = parseArgs(process.argv.slice(2));
} catch (e) {
  if (!(e instanceof UsageError)) throw e;
  console.error(e.message);
  process.exit(2);
}
if (args.help) {
  console.log(USAGE);
  process.exit(0);
}
const device = args.device ?? (rk.cuda.available() ? 'cuda' : 'cpu');
if (device === 'cuda' && !rk.cuda.available()) {
  console.error(`bench: CUDA is not available (${rk.cuda.reason()})`);
  process.exit(1);
}
if (args.isa === 'all' && device !== 'cpu') {
  console.error("bench: --isa all compares the CPU kernels' variants: use it with --device cpu");
  process.exit(2);
}
const supported = rk.cpu.info().isasSupported;
if (args.isa && args.isa !== 'all' && !supported.includes(args.isa)) {
  console.error(`bench: this CPU does not support --isa ${args.isa} (supported: ${supported.join(', ')})`);
  process.exit(2);
}
if (args.threads) rk.cpu.setThreads(args.threads);
if (args.isa && args.isa !== 'all') rk.cpu.setIsa(args.isa);

const op = OPS[args.op];
const progress = (i, n, label) => process.stderr.write(`[${i}/${n}] ${label} ...\n`);

/** The x86 instruction-set flags of interest that /proc/cpuinfo lists (empty elsewhere). */
function cpuFlags() {
  try {
    const flags = new Set(
      readFileSync('/proc/cpuinfo', 'utf8')
        .match(/^flags\s*:(.*)$/m)?.[1]
        .trim()
        .split(/\s+/) ?? [],
    );
    return ['avx512f', 'avx512vl', 'avx512dq', 'avx512_bf16', 'avx2', 'fma', 'neon', 'asimd'].filter((f) =>
      flags.has(f),
    );
  } catch {
    return [];
  }
}

let deviceName,
  ceilings = null;
if (device === 'cuda') {
  deviceName = rk.cuda.deviceProperties().name;
  console.log(`device: ${deviceName}`);
} else {
  const info = rk.cpu.info();
  const flags = cpuFlags();
  const threads = `${info.threads} thread${info.threads === 1 ? '' : 's'}`;
  deviceName = `${cpus()[0]?.model ?? 'CPU'} (${threads})`;
  console.log(
    `device: CPU, ${cpus()[0]?.model ?? 'unknown model'}, ${cpus().length} logical CPUs` +
      (flags.length ? `, flags ${flags.join(' ')}` : ''),
  );
  console.log(
    `CPU kernels: isa ${args.isa === 'all' ? `all of ${info.isasSupported.join(', ')}` : info.isa}` +
      ` (supported: ${info.isasSupported.join(', ')}), ${threads}`,
  );
  process.stderr.write('measuring the machine ceilings ...\n');
  ceilings = await machineCeilings(info.threads);
  const ort = ortStatus();
  console.log(
    ceilings.gflops == null
      ? `fp32 matmul rate: – (ORT not installed: ${ceilings.reason})`
      : `fp32 matmul rate: ${ceilings.gflops.toFixed(1)} GFLOP/s (ONNX Runtime ${ort.version} MatMul 2048^3, ${threads}, best of 5)`,
  );
  console.log(
    `copy bandwidth of one thread: ${ceilings.copyGBs.toFixed(1)} GB/s (Float32Array.set of 256 MB, read + write, best of 5)`,
  );
}
const ceiling = bandwidthCeiling(rk, device);
console.log(
  `measured copy bandwidth: ${ceiling.toFixed(1)} GB/s (read + write, the library's Tensor.clone of 256 MB${device === 'cpu' ? `, ${rk.cpu.info().threads} threads` : ''})`,
);

const ctx = {
  device,
  quick: args.quick,
  ceiling,
  ceilings,
  sizes: args.sizes,
  dtype: args.dtype,
  curve: args.curve,
  chart: args.chart,
  peers: true,
  progress,
};

const blank = (v) => v == null || v === '' || v === '–';

/** Prints rows as a markdown table; drops the op's meaningless columns and columns empty in every row. */
function printTable(cols, table) {
  const drop = new Set(op.dropColumns?.(device) ?? []);
  cols = cols.filter((c) => !drop.has(c) && table.some((l) => !blank(l[c])));
  const widths = cols.map((c) => Math.max(c.length, ...table.map((l) => String(l[c] ?? '').length)));
  const fmt = (vals) => `| ${vals.map((v, i) => String(v ?? '').padEnd(widths[i])).join(' | ')} |`;
  console.log(fmt(cols));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const l of table) console.log(fmt(cols.map((c) => l[c])));
}

const sizeCol = `size (${op.sizeLabel})`;
const tagCol = op.tagLabel ?? 'tag';

/** Runs the op; its own complaints about the sizes ("bench: ...") end the run like a bad argument. */
async function runOp(context) {
  try {
    return await op.run(rk, context);
  } catch (e) {
    if (!String(e?.message).startsWith('bench:')) throw e;
    console.error(e.message);
    process.exit(2);
  }
}

let out;
if (args.isa === 'all') {
  // Every variant, peers off; then one line per row: the time of each variant and its ratio to the best.
  const byIsa = {};
  for (const isa of supported) {
    rk.cpu.setIsa(isa);
    console.log(`-- isa ${isa}`);
    process.stderr.write(`-- isa ${isa}\n`);
    byIsa[isa] = await runOp({ ...ctx, peers: false });
  }
  const first = byIsa[supported[0]];
  const table = first.map((r, i) => {
    const times = Object.fromEntries(supported.map((isa) => [isa, byIsa[isa][i]?.ms]));
    const best = Math.min(...Object.values(times));
    const bestIsa = supported.find((isa) => times[isa] === best);
    return {
      [sizeCol]: r.size,
      [tagCol]: r.tag,
      dtype: r.dtype,
      pass: r.pass,
      ...Object.fromEntries(
        supported.map((isa) => [`${isa} ms`, `${times[isa].toFixed(3)} (${(times[isa] / best).toFixed(2)}x)`]),
      ),
      best: bestIsa,
    };
  });
  printTable([sizeCol, tagCol, 'dtype', 'pass', ...supported.map((isa) => `${isa} ms`), 'best'], table);
  console.log("variant columns: median ms (time / the best variant's time)");
  out = { variants: byIsa };
} else {
  const rows = await runOp(ctx);
  const extraCols = [...new Set(rows.flatMap((r) => Object.keys(r.extra ?? {})))];
  const peerCols = [...new Set(rows.flatMap((r) => Object.keys(r.peers)))];
  const table = rows.map((r) => {
    const line = {
      [sizeCol]: r.size,
      [tagCol]: r.tag,
      dtype: r.dtype,
      pass: r.pass,
      ms: r.ms.toFixed(3),
      'GB/s': r.gbs == null ? '–' : r.gbs.toFixed(1),
      '% of copy': r.gbs == null ? '–' : `${((100 * r.gbs) / ceiling).toFixed(0)}%`,
      ...r.extra,
    };
    for (const [name, p] of Object.entries(r.peers)) {
      line[name] = p == null ? '–' : typeof p === 'string' ? p : `${p.toFixed(3)} ms (${(p / r.ms).toFixed(2)}x)`;
    }
    return line;
  });
  printTable([sizeCol, tagCol, 'dtype', 'pass', 'ms', 'GB/s', '% of copy', ...extraCols, ...peerCols], table);
  if (peerCols.length) console.log('peer columns: peer time (peer time / ours; above 1x means we are faster)');
  out = { rows };
}

if (args.json) {
  writeFileSync(
    args.json,
    JSON.stringify(
      {
        op: args.op,
        device,
        deviceName,
        copyBandwidthGBs: ceiling,
        ceilings,
        cpu: device === 'cpu' ? { ...rk.cpu.info(), model: cpus()[0]?.model ?? null } : null,
        ...out,
      },
      null,
      2,
    ),
  );
  console.log(`wrote ${args.json}`);
}
