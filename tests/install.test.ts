// The packed packages as a consumer gets them: `npm run pack:all`'s two tarballs installed into a
// fresh project, offline, with a PATH that holds node and nothing else (no compiler, make, CMake or
// nvcc), then an op run from ESM and from CJS with the platform package's binary. And without the
// platform package (--omit=optional): the load error lists what it tried and names the build
// command, which in turn says which build tools to install.
import { execFileSync, spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const npmCli = [
  process.env.npm_execpath,
  join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js'),
].find((p): p is string => !!p && p.endsWith('.js') && existsSync(p));

let work = '';
let bin = '';
let packages: { main: string; platform: string; platformPackage: string };

/** A consumer's environment: PATH with node only, the user's npm cache, nothing of this repository's build. */
function consumerEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {
    PATH: bin,
    HOME: process.env.HOME,
    npm_config_cache: join(process.env.HOME ?? '', '.npm'),
  };
  return env;
}

function npm(cwd: string, args: string[]): string {
  return execFileSync(process.execPath, [npmCli!, ...args], {
    cwd,
    env: consumerEnv(),
    encoding: 'utf8',
    stdio: 'pipe',
  });
}

function project(name: string): string {
  const dir = join(work, name);
  mkdirSync(dir);
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name, version: '1.0.0', private: true }));
  return dir;
}

// An op, the binary it ran on and CUDA's state, as JSON on stdout.
const probe = (importLine: string) => `${importLine}
const a = rk.Tensor.from([0.5, 0.5, 0.5, 1, 2, 3], [1, 2, 3]);
const b = rk.Tensor.from([1, 1, 1, 1, 1, 1], [1, 2, 3]);
const { h } = rk.linearScan({ a, b });
console.log(JSON.stringify({ h: Array.from(h.dataSync()), path: rk.internals.nativePath(), cuda: rk.cuda.available(), reason: rk.cuda.reason() }));`;

describe.skipIf(!npmCli)('the packed packages install and run offline without build tools', () => {
  beforeAll(() => {
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'pack.mjs')], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    packages = JSON.parse(readFileSync(join(root, 'pack', 'packages.json'), 'utf8'));
    work = mkdtempSync(join(tmpdir(), 'rk-install-'));
    bin = join(work, 'bin');
    mkdirSync(bin);
    symlinkSync(process.execPath, join(bin, 'node'));
  }, 300_000);
  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('the consumer PATH has node and no compiler, make, CMake or nvcc', () => {
    expect(readdirSync(bin)).toEqual(['node']);
    for (const tool of ['cc', 'gcc', 'g++', 'c++', 'clang', 'make', 'cmake', 'nvcc', 'python3']) {
      expect(spawnSync(tool, ['--version'], { env: consumerEnv() }).error, tool).toBeTruthy();
    }
  });

  it("installs in seconds and runs an op from ESM and CJS on the platform package's binary", () => {
    const t0 = performance.now();
    const dir = project('consumer');
    npm(dir, ['install', '--offline', '--no-audit', '--no-fund', '--loglevel=error', packages.main, packages.platform]);
    const installed = join(dir, 'node_modules', 'recurrent-kernels');
    expect(existsSync(join(installed, 'build'))).toBe(false); // nothing was compiled
    const shipped = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8'));
    expect(shipped.scripts).toBeUndefined();
    expect(shipped.dependencies).toBeUndefined();
    expect(shipped.optionalDependencies).toEqual({ [packages.platformPackage]: shipped.version });
    const binary = join(dir, 'node_modules', ...packages.platformPackage.split('/'), 'recurrent-kernels.node');
    expect(existsSync(binary)).toBe(true);
    const run = (args: string[]) =>
      JSON.parse(execFileSync(process.execPath, args, { cwd: dir, env: consumerEnv(), encoding: 'utf8' }));
    const esm = run(['--input-type=module', '-e', probe("import * as rk from 'recurrent-kernels';")]);
    const cjs = run(['-e', probe("const rk = require('recurrent-kernels');")]);
    for (const r of [esm, cjs]) {
      expect(r.h).toEqual([1, 1.5, 1.75, 1, 3, 10]);
      expect(r.path).toBe(binary);
      expect(typeof r.cuda).toBe('boolean');
      expect(r.reason.length).toBeGreaterThan(0);
    }
    const info = execFileSync(process.execPath, [join(dir, 'node_modules', '.bin', 'recurrent-kernels'), 'info'], {
      cwd: dir,
      env: consumerEnv(),
      encoding: 'utf8',
    });
    expect(info).toContain(`binary: ${binary}`);
    expect(performance.now() - t0).toBeLessThan(60_000);
  }, 120_000);

  it('without the platform package, the error lists each attempt and the build command names its tools', () => {
    const dir = project('no-optional');
    npm(dir, ['install', '--offline', '--no-audit', '--no-fund', '--loglevel=error', '--omit=optional', packages.main]);
    expect(existsSync(join(dir, 'node_modules', ...packages.platformPackage.split('/')))).toBe(false);
    const r = spawnSync(
      process.execPath,
      [
        '-e',
        `
      const rk = require('recurrent-kernels');
      try { rk.linearScan({ a: rk.Tensor.from([1], [1, 1, 1]), b: rk.Tensor.from([1], [1, 1, 1]) }); }
      catch (e) { console.log(e.code); console.log(e.message); }`,
      ],
      { cwd: dir, env: consumerEnv(), encoding: 'utf8' },
    );
    expect(r.stdout).toMatch(/^ERR_NATIVE_LOAD\n/);
    expect(r.stdout).toContain(`${packages.platformPackage}: not installed`);
    expect(r.stdout).toMatch(/build\/Release\/recurrent_kernels\.node: not found/);
    expect(r.stdout).toContain('npx recurrent-kernels build');
    const build = spawnSync(process.execPath, [join(dir, 'node_modules', '.bin', 'recurrent-kernels'), 'build'], {
      cwd: dir,
      env: consumerEnv(),
      encoding: 'utf8',
    });
    expect(build.status).toBe(1);
    expect(build.stderr).toMatch(/npm install --no-save node-addon-api@\S+ cmake-js@\S+/);
  }, 120_000);
});
