#!/usr/bin/env node
// Microbenchmark CLI:  npm run bench -- --op linear-scan [--device cpu|cuda] [--json FILE] [--quick]
//                        [--size AxBx...[,AxBx...]] [--dtype float32|float16|bfloat16]
//                        [--curve] [--chart FILE.svg]   (curves and charts: the ops that have them)
// Prints, per size: median time (CUDA events on GPU), achieved GB/s, % of the device's measured
// copy bandwidth, any per-op columns (e.g. a floor), and the ratio to each peer measured in the
// same run. --size and --dtype replace an op's default sizes and dtypes where the op supports them.
import { writeFileSync } from 'node:fs';
import * as rk from '../dist/index.mjs';
import { bandwidthCeiling } from './timing.mjs';
import linearScan from './ops/linear-scan.mjs';
import selectiveScan from './ops/selective-scan.mjs';
import gatedDeltaRule from './ops/gated-delta-rule.mjs';
import fusedRnn from './ops/fused-rnn.mjs';
import newtonRnn from './ops/newton-rnn.mjs';

const OPS = {
  'linear-scan': linearScan,
  'selective-scan': selectiveScan,
  'gated-delta-rule': gatedDeltaRule,
  'fused-rnn': fusedRnn,
  'newton-rnn': newtonRnn,
};

function parseSizes(v) {
  return v.split(',').map((s) => {
    const dims = s.split('x').map(Number);
    if (dims.some((d) => !Number.isInteger(d) || d < 1)) throw new Error(`bench: bad --size ${s} (expected e.g. 4x2048x2048x16)`);
    return dims;
  });
}

function parseArgs(argv) {
  const args = {
    op: 'linear-scan', device: rk.cuda.available() ? 'cuda' : 'cpu', json: null, quick: false, sizes: null, dtype: null,
    curve: false, chart: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--op') args.op = argv[++i];
    else if (k === '--device') args.device = argv[++i];
    else if (k === '--json') args.json = argv[++i];
    else if (k === '--quick') args.quick = true;
    else if (k === '--curve') args.curve = true;
    else if (k === '--chart') args.chart = argv[++i];
    else if (k === '--size') args.sizes = parseSizes(argv[++i] ?? '');
    else if (k === '--dtype') {
      args.dtype = argv[++i];
      if (!rk.DTYPES.includes(args.dtype)) throw new Error(`bench: --dtype must be one of ${rk.DTYPES.join(', ')}`);
    }
    else if (k === '--help' || k === '-h') args.help = true;
    else throw new Error(`bench: unknown argument ${k}`);
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
if (args.help || !OPS[args.op]) {
  console.log(`usage: npm run bench -- --op <${Object.keys(OPS).join('|')}> [--device cpu|cuda] [--json FILE] [--quick] [--size AxBx...[,...]] [--dtype DTYPE] [--curve] [--chart FILE.svg]`);
  process.exit(args.help ? 0 : 1);
}
if (args.device === 'cuda' && !rk.cuda.available()) {
  console.error(`bench: CUDA is not available (${rk.cuda.reason()})`);
  process.exit(1);
}

const device = args.device;
const deviceName = device === 'cuda'
  ? rk.cuda.deviceProperties().name
  : `${(await import('node:os')).cpus()[0]?.model ?? 'CPU'} (${rk.cpuThreads()} threads)`;
const ceiling = bandwidthCeiling(rk, device);
console.log(`device: ${deviceName}`);
console.log(`measured copy bandwidth: ${ceiling.toFixed(1)} GB/s (read + write)`);

const rows = await OPS[args.op].run(rk, {
  device, quick: args.quick, ceiling, sizes: args.sizes, dtype: args.dtype, curve: args.curve, chart: args.chart,
});
const extraCols = [...new Set(rows.flatMap((r) => Object.keys(r.extra ?? {})))];
const cols = ['size', 'dtype', 'pass', 'ms', 'GB/s', '% of copy', ...extraCols, ...new Set(rows.flatMap((r) => Object.keys(r.peers)))];
const table = rows.map((r) => {
  const line = {
    size: r.size, dtype: r.dtype, pass: r.pass, ms: r.ms.toFixed(3), 'GB/s': r.gbs == null ? '–' : r.gbs.toFixed(1),
    '% of copy': r.gbs == null ? '–' : `${((100 * r.gbs) / ceiling).toFixed(0)}%`,
    ...r.extra,
  };
  for (const [name, p] of Object.entries(r.peers)) line[name] = p == null ? '–' : `${p.toFixed(3)} ms (${(p / r.ms).toFixed(1)}x)`;
  return line;
});
const widths = cols.map((c) => Math.max(c.length, ...table.map((l) => String(l[c] ?? '').length)));
const fmt = (vals) => `| ${vals.map((v, i) => String(v ?? '').padEnd(widths[i])).join(' | ')} |`;
console.log(fmt(cols));
console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
for (const l of table) console.log(fmt(cols.map((c) => l[c])));
console.log('peer columns: peer time (peer time / ours; above 1x means we are faster)');

if (args.json) {
  writeFileSync(args.json, JSON.stringify({ op: args.op, device, deviceName, copyBandwidthGBs: ceiling, rows }, null, 2));
  console.log(`wrote ${args.json}`);
}
