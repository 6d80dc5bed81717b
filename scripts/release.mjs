// npm run build:release: the binary of the platform package, from source: the CPU kernels (every
// instruction-set variant) and the CUDA path with the CUDA runtime linked statically, SASS for every
// architecture from sm_80 that the CUDA 13 toolkit supports plus PTX of the newest (so that later GPUs
// run it through the driver's JIT; the default list of CMakeLists.txt), then `npm run pack:all`.
// RK_CUDA_ARCHITECTURES overrides the list.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const env = {
  ...process.env,
  RK_CUDA: 'ON',
  RK_CUDA_ARCHITECTURES: process.env.RK_CUDA_ARCHITECTURES ?? 'default',
};
const t0 = Date.now();
for (const script of ['build-native.mjs', 'pack.mjs']) {
  const r = spawnSync(process.execPath, [join(root, 'scripts', script)], { cwd: root, stdio: 'inherit', env });
  if (r.status !== 0) process.exit(r.status ?? 1);
}
console.log(
  `[release] built and packed in ${((Date.now() - t0) / 60000).toFixed(1)} min ` +
    `(CUDA architectures ${env.RK_CUDA_ARCHITECTURES})`,
);
