// Builds the native addon. Order: a prebuilt binary for this platform (skipped when
// RK_BUILD_FROM_SOURCE=1), then CMake through cmake-js (C++ always, CUDA when nvcc is found:
// RK_CUDA=AUTO|ON|OFF, RK_CUDA_ARCHITECTURES="80;90"), then node-gyp (CPU only) when CMake is
// missing.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(join(root, 'package.json'));
const env = process.env;

function run(cmd, args) {
  console.log(`[recurrent-kernels] ${cmd} ${args.join(' ')}`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  return r.status === 0;
}

const prebuildDir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
if (env.RK_BUILD_FROM_SOURCE !== '1' && existsSync(prebuildDir) &&
    readdirSync(prebuildDir).some((f) => f.endsWith('.node'))) {
  console.log(`[recurrent-kernels] using the prebuilt binary in ${prebuildDir}`);
  process.exit(0);
}

const mode = (env.RK_CUDA ?? 'AUTO').toUpperCase();
if (!['AUTO', 'ON', 'OFF'].includes(mode)) {
  console.error(`[recurrent-kernels] RK_CUDA must be AUTO, ON or OFF, got '${env.RK_CUDA}'`);
  process.exit(1);
}

const hasCmake = spawnSync('cmake', ['--version'], { stdio: 'ignore' }).status === 0;
if (hasCmake) {
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  // configure always runs (so changed options reach the CMake cache), then an incremental build.
  const defs = [`--CDRK_CUDA=${mode}`,
    `--CDRK_CUDA_ARCHITECTURES=${env.RK_CUDA_ARCHITECTURES ?? '80;90'}`];
  const jobs = env.RK_BUILD_JOBS ?? String(Math.max(1, (await import('node:os')).availableParallelism()));
  const ok = run(process.execPath, [cmakeJs, 'configure', ...defs]) &&
    run(process.execPath, [cmakeJs, 'build', ...defs, '--parallel', jobs]);
  process.exit(ok ? 0 : 1);
}

if (mode === 'ON') {
  console.error('[recurrent-kernels] RK_CUDA=ON needs CMake (the CUDA path is built through CMake); install cmake');
  process.exit(1);
}
console.log('[recurrent-kernels] cmake not found: building the CPU path with node-gyp');
const gyp = env.npm_config_node_gyp;
const ok = gyp ? run(process.execPath, [gyp, 'rebuild']) : run('node-gyp', ['rebuild']);
process.exit(ok ? 0 : 1);
