// npm run pack:all: writes into pack/ the tarballs of the main package and of this platform's binary
// package (@recurrent-kernels/<os>-<cpu>-<libc>), from the current build: build/Release's addon
// (built first when missing; stripped in the package) and dist/ (likewise). pack/packages.json names
// both files.
//
// The main package's manifest in its tarball lists the published platform packages as
// optionalDependencies with this exact version, and carries no scripts and no devDependencies: a
// consumer's install runs nothing and compiles nothing. (The repository's own package.json does not
// list them: a clone installs without any registry holding them, and builds from source instead.)
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const { version } = manifest;
const out = join(root, 'pack');
const stage = join(out, 'stage');
const log = (msg) => console.log(`[pack] ${msg}`);

function run(args, what) {
  log(what);
  const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

// npm: the one running this script where there is one, else the one on PATH.
function npm(args, cwd, stdio) {
  const cli = process.env.npm_execpath;
  const [cmd, pre] = cli && cli.endsWith('.js') ? [process.execPath, [cli]] : ['npm', []];
  return execFileSync(cmd, [...pre, ...args], {
    cwd,
    encoding: 'utf8',
    stdio: stdio === 'inherit' ? 'inherit' : 'pipe',
  });
}

const binary = join(root, 'build', 'Release', 'recurrent_kernels.node');
if (!existsSync(binary)) run([join(root, 'scripts', 'build-native.mjs')], 'no build/Release addon yet: building it');
if (!existsSync(join(root, 'dist', 'cjs', 'index.js'))) {
  log('no dist/ yet: npm run build:ts');
  npm(['run', 'build:ts'], root, 'inherit');
}
const { platformPackage, PLATFORM_PACKAGES, PLATFORM_BINARY } = require(join(root, 'dist', 'cjs', 'native', 'load.js'));
const platform = platformPackage();
if (!platform || !PLATFORM_PACKAGES.includes(platform)) {
  console.error(
    `[pack] no platform package is published for ${process.platform}-${process.arch} (${platform}); ` +
      `published: ${PLATFORM_PACKAGES.join(', ')}`,
  );
  process.exit(1);
}

// What the binary holds, from the CMake cache of the build that made it.
let cuda = 'no CUDA path (built with RK_CUDA=OFF, or AUTO on a machine without a GPU)';
try {
  const cache = readFileSync(join(root, 'build', 'CMakeCache.txt'), 'utf8');
  const get = (key) => cache.match(new RegExp(`^${key}:[A-Z]+=(.*)$`, 'm'))?.[1];
  if (get('RK_CUDA') === 'ON') {
    const archs = get('RK_CUDA_ARCHITECTURES');
    cuda = `CUDA path for architectures ${archs === 'default' || !archs ? '80, 86, 89, 90, 100 and 120 (PTX of 120)' : archs} (runtime linked statically)`;
  }
} catch {
  /* built by node-gyp: CPU only */
}

function npmPack(dir) {
  const text = npm(['pack', '--json', '--ignore-scripts', '--pack-destination', out], dir, 'pipe');
  return join(out, JSON.parse(text)[0].filename);
}

rmSync(stage, { recursive: true, force: true });
mkdirSync(stage, { recursive: true });
const license = join(root, 'LICENSE');

// The platform package: the stripped binary and a manifest npm selects it by.
const [, os, cpu, libc] = platform.match(/^@recurrent-kernels\/([a-z0-9]+)-([a-z0-9]+)-([a-z]+)$/) ?? [];
const pdir = join(stage, 'platform');
mkdirSync(pdir);
copyFileSync(binary, join(pdir, PLATFORM_BINARY));
if (spawnSync('strip', ['--strip-unneeded', join(pdir, PLATFORM_BINARY)], { stdio: 'inherit' }).status !== 0) {
  log('strip not found: the binary keeps its symbols');
}
copyFileSync(license, join(pdir, 'LICENSE'));
writeFileSync(
  join(pdir, 'README.md'),
  `# ${platform}\n\nThe prebuilt native addon of [recurrent-kernels](https://www.npmjs.com/package/recurrent-kernels) ` +
    `${version} for ${os} on ${cpu} with ${libc === 'gnu' ? 'glibc' : libc}: the CPU kernels (every instruction-set ` +
    `variant, chosen at run time) and the ${cuda}.\nInstalled by recurrent-kernels as an optional dependency; ` +
    'not meant to be used on its own.\n',
);
writeFileSync(
  join(pdir, 'package.json'),
  `${JSON.stringify(
    {
      name: platform,
      version,
      description: `recurrent-kernels' native addon for ${os}-${cpu} (${libc === 'gnu' ? 'glibc' : libc})`,
      license: manifest.license,
      os: [os],
      cpu: [cpu],
      libc: [libc === 'gnu' ? 'glibc' : libc],
      main: PLATFORM_BINARY,
      files: [PLATFORM_BINARY],
      engines: manifest.engines,
    },
    null,
    2,
  )}\n`,
);
const platformTgz = npmPack(pdir);

// The main package: the files its manifest lists, and a manifest for consumers.
const mdir = join(stage, 'main');
mkdirSync(mdir);
for (const f of manifest.files) {
  const src = join(root, f);
  if (!existsSync(src)) {
    console.error(`[pack] ${f} (in package.json's files) is missing`);
    process.exit(1);
  }
  cpSync(src, join(mdir, f), { recursive: true });
}
for (const f of ['README.md', 'LICENSE']) copyFileSync(join(root, f), join(mdir, f));
const shipped = { ...manifest };
delete shipped.scripts;
delete shipped.devDependencies;
shipped.optionalDependencies = Object.fromEntries(PLATFORM_PACKAGES.map((p) => [p, version]));
writeFileSync(join(mdir, 'package.json'), `${JSON.stringify(shipped, null, 2)}\n`);
const mainTgz = npmPack(mdir);

rmSync(stage, { recursive: true, force: true });
writeFileSync(
  join(out, 'packages.json'),
  `${JSON.stringify({ main: mainTgz, platform: platformTgz, platformPackage: platform }, null, 2)}\n`,
);
log(`${mainTgz}`);
log(`${platformTgz} (${cuda})`);
