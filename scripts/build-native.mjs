// Builds the native addon from source into build/Release (the loader tries it after the platform
// package): CMake through cmake-js, or node-gyp (CPU only) when CMake is missing. The C++ CPU
// kernels are always built; the CUDA path per RK_CUDA:
//   AUTO (default): only when this machine has an NVIDIA GPU (nvidia-smi lists one) and nvcc, for
//                   that GPU's architecture (compiling for GPUs a machine cannot run costs minutes);
//   ON:             always, for RK_CUDA_ARCHITECTURES (default: every architecture from sm_80 that the
//                   toolkit supports, see CMakeLists.txt), failing without nvcc;
//   OFF:            never.
// Run by `npm install` in a clone (the prepare script) and by `npx recurrent-kernels build`.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
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

// The build tools are not runtime dependencies of the package: in a project that installed it, a
// source build needs them installed first.
const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const toolRange = (name) => manifest.peerDependencies?.[name] ?? manifest.devDependencies?.[name] ?? 'latest';
const missing = ['node-addon-api', 'cmake-js'].filter((name) => {
  try {
    require.resolve(`${name}/package.json`);
    return false;
  } catch {
    return true;
  }
});
if (missing.length) {
  console.error(
    `[recurrent-kernels] a source build needs ${missing.join(' and ')}, which are not installed. Run\n` +
      `  npm install --no-save ${missing.map((n) => `${n}@${toolRange(n)}`).join(' ')}\nthen build again.`,
  );
  process.exit(1);
}

const mode = (env.RK_CUDA ?? 'AUTO').toUpperCase();
if (!['AUTO', 'ON', 'OFF'].includes(mode)) {
  console.error(`[recurrent-kernels] RK_CUDA must be AUTO, ON or OFF, got '${env.RK_CUDA}'`);
  process.exit(1);
}

/** AUTO: the local GPUs' architectures ("90", "80;90") from nvidia-smi, or null when there is none. */
function localGpuArchitectures() {
  const r = spawnSync('nvidia-smi', ['--query-gpu=compute_cap', '--format=csv,noheader'], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  const archs = [
    ...new Set(
      r.stdout
        .split('\n')
        .map((l) => l.trim().replace('.', ''))
        .filter((l) => /^\d+$/.test(l)),
    ),
  ];
  return archs.length ? archs.join(';') : null;
}

let cudaMode = mode;
let architectures = env.RK_CUDA_ARCHITECTURES ?? 'default';
if (mode === 'AUTO') {
  const local = localGpuArchitectures();
  if (local) {
    architectures = env.RK_CUDA_ARCHITECTURES ?? local;
    console.log(
      `[recurrent-kernels] RK_CUDA=AUTO: NVIDIA GPU found; the CUDA path is built (if nvcc is found) for ${architectures}`,
    );
  } else {
    cudaMode = 'OFF';
    console.log(
      '[recurrent-kernels] RK_CUDA=AUTO: no NVIDIA GPU found, building the CPU kernels only ' +
        '(RK_CUDA=ON builds the CUDA path as well)',
    );
  }
}

const hasCmake = spawnSync('cmake', ['--version'], { stdio: 'ignore' }).status === 0;
if (hasCmake) {
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  // configure always runs (so changed options reach the CMake cache), then an incremental build.
  const defs = [`--CDRK_CUDA=${cudaMode}`, `--CDRK_CUDA_ARCHITECTURES=${architectures}`];
  const jobs = env.RK_BUILD_JOBS ?? String(Math.max(1, (await import('node:os')).availableParallelism()));
  const ok =
    run(process.execPath, [cmakeJs, 'configure', ...defs]) &&
    run(process.execPath, [cmakeJs, 'build', ...defs, '--parallel', jobs]);
  process.exit(ok ? 0 : 1);
}

if (cudaMode === 'ON') {
  console.error('[recurrent-kernels] RK_CUDA=ON needs CMake (the CUDA path is built through CMake); install cmake');
  process.exit(1);
}
console.log('[recurrent-kernels] cmake not found: building the CPU path with node-gyp');
const gyp = env.npm_config_node_gyp;
const ok = gyp ? run(process.execPath, [gyp, 'rebuild']) : run('node-gyp', ['rebuild']);
process.exit(ok ? 0 : 1);
