// The built package works through both entry points and they share one instance.
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');

describe('package entry points', () => {
  it('require and import give the same API and instance', () => {
    const { execFileSync } = require('node:child_process');
    const out = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `
            import { createRequire } from 'node:module';
      import * as esm from ${JSON.stringify(pathToFileURL(join(root, 'dist', 'index.mjs')).href)};
      const cjs = createRequire(import.meta.url)(${JSON.stringify(join(root, 'dist', 'cjs', 'index.js'))});
      const keys = Object.keys(esm).filter((k) => k !== 'default').sort();
      console.log(JSON.stringify({ same: esm.linearScan === cjs.linearScan && esm.Tensor === cjs.Tensor,
        fn: typeof esm.linearScan, keysMatch: JSON.stringify(keys) === JSON.stringify(Object.keys(cjs).sort()) }));
    `,
      ],
      { encoding: 'utf8' },
    );
    expect(JSON.parse(out)).toEqual({ same: true, fn: 'function', keysMatch: true });
  });
  it('recurrent-kernels/tfjs: require and import give the same functions', () => {
    const { execFileSync } = require('node:child_process');
    const out = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `
      import { createRequire } from 'node:module';
      import * as esm from ${JSON.stringify(pathToFileURL(join(root, 'dist', 'tfjs.mjs')).href)};
      const cjs = createRequire(import.meta.url)(${JSON.stringify(join(root, 'dist', 'cjs', 'tfjs', 'index.js'))});
      const keys = Object.keys(esm).filter((k) => k !== 'default').sort();
      console.log(JSON.stringify({ same: esm.selectiveScan === cjs.selectiveScan && esm.toTf === cjs.toTf, keys }));
    `,
      ],
      { encoding: 'utf8' },
    );
    expect(JSON.parse(out)).toEqual({
      same: true,
      keys: [
        'causalConv1d',
        'fromTf',
        'fusedRnn',
        'gatedDeltaRule',
        'linearAttention',
        'linearScan',
        'mamba2Scan',
        'newtonRnn',
        'selectiveScan',
        'toTf',
      ],
    });
  });
  it('a load failure lists every path tried', () => {
    const { execFileSync } = require('node:child_process');
    const out = execFileSync(
      process.execPath,
      [
        '-e',
        `
      process.env.RK_NATIVE_PATH = '/nonexistent/x.node';
      const fs = require('fs');
      const real = fs.existsSync;
      fs.existsSync = (p) => String(p).endsWith('.node') && !String(p).startsWith('/nonexistent') ? false : real(p);
      const rk = require(${JSON.stringify(join(root, 'dist', 'cjs', 'index.js'))});
      try { rk.cuda.available(); } catch (e) { console.log(e.code + '\\n' + e.message); }
    `,
      ],
      { encoding: 'utf8' },
    );
    expect(out).toMatch(/^ERR_NATIVE_LOAD/);
    expect(out).toMatch(/\/nonexistent\/x\.node: not found/);
    expect(out).toMatch(/build\/Release\/recurrent_kernels\.node: not found/);
    expect(out).toMatch(/npx recurrent-kernels build/);
  });
  it("the version is package.json's", async () => {
    const rk = await import('../lib/index');
    const { readFileSync } = await import('node:fs');
    expect(rk.version).toBe(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version);
  });
});
