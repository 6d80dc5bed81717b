// Runs a Python peer benchmark (bench/peers/*.py) in a child process when python3 with torch and a
// CUDA device is present; returns its timings keyed "size/dtype/pass", or null when unavailable.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

export function runPythonPeer(script, config) {
  const r = spawnSync('python3', [join(here, script), JSON.stringify(config)], {
    encoding: 'utf8',
    timeout: 1_800_000,
  });
  if (r.error || r.status !== 0) {
    console.log(`peer ${script}: not run (${r.error?.message ?? r.stderr.trim().split('\n').pop()})`);
    return null;
  }
  const out = JSON.parse(r.stdout.trim().split('\n').pop());
  if (out.unavailable) {
    console.log(`peer ${script}: not run (${out.unavailable})`);
    return null;
  }
  for (const note of out.notes ?? []) console.log(`peer ${script}: ${note}`);
  return out.times;
}
