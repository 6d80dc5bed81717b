#!/usr/bin/env node
// The package's command line.
//   npx recurrent-kernels build   builds the native addon from source (see scripts/build-native.mjs)
//   npx recurrent-kernels info    which binary loads, the CPU variant and threads, and CUDA's state
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const [command] = process.argv.slice(2);

if (command === 'build') {
  const r = spawnSync(process.execPath, [join(root, 'scripts', 'build-native.mjs')], { cwd: root, stdio: 'inherit' });
  process.exit(r.status ?? 1);
} else if (command === 'info') {
  const rk = createRequire(import.meta.url)(join(root, 'dist', 'cjs', 'index.js'));
  try {
    const cpu = rk.cpu.info();
    console.log(`recurrent-kernels ${rk.version}`);
    console.log(`binary: ${rk.internals.nativePath()}`);
    console.log(`cpu: ${cpu.isa} (supported: ${cpu.isasSupported.join(', ')}), ${cpu.threads} threads`);
    console.log(`cuda: ${rk.cuda.available() ? 'available' : `not available (${rk.cuda.reason()})`}`);
  } catch (e) {
    console.error(`${e.code ?? 'error'}: ${e.message}`);
    process.exit(1);
  }
} else {
  console.error('usage: recurrent-kernels build | info');
  process.exit(command === undefined || command === 'help' || command === '--help' ? 0 : 1);
}
