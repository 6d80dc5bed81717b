// Builds the release binary (CUDA path included, architectures 80 and 90 unless RK_CUDA_ARCHITECTURES
// says otherwise) from source and places it in prebuilds/<platform>-<arch>/, where the loader looks
// first and the install script skips building. Run before packing a release.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const env = { ...process.env, RK_BUILD_FROM_SOURCE: '1', RK_CUDA: process.env.RK_CUDA ?? 'ON' };
const r = spawnSync(process.execPath, [join(root, 'scripts', 'build-native.mjs')], { cwd: root, stdio: 'inherit', env });
if (r.status !== 0) process.exit(r.status ?? 1);
const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
mkdirSync(dir, { recursive: true });
const dest = join(dir, 'recurrent-kernels.node');
copyFileSync(join(root, 'build', 'Release', 'recurrent_kernels.node'), dest);
if (process.platform !== 'win32') spawnSync('strip', ['--strip-unneeded', dest], { stdio: 'inherit' });
console.log(`[recurrent-kernels] wrote ${dest}`);
