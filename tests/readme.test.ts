// The README's TypeScript blocks run as written: each ```ts block is a complete module (it imports the
// package itself), type-checks under strict mode against lib/, and runs.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import * as rk from '../lib/index';

const root = join(__dirname, '..');
const readme = readFileSync(join(root, 'README.md'), 'utf8');
const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```/gm)].map((m) => m[1]);
const lineOf = (code: string) => readme.slice(0, readme.indexOf(code)).split('\n').length;
const dir = mkdtempSync(join(tmpdir(), 'rk-readme-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
// An example may change the process-wide CPU settings: the next one starts from the defaults.
const defaults = rk.cpu.info();
afterEach(() => {
  rk.cpu.setIsa(defaults.isa);
  rk.cpu.setThreads(defaults.threads);
});

describe('README', () => {
  it('has TypeScript examples, each importing the package', () => {
    expect(blocks.length).toBeGreaterThan(2);
    for (const b of blocks) expect(b, `block at README line ${lineOf(b)}`).toMatch(/from 'recurrent-kernels(\/tfjs)?'/);
  });

  it('its examples type-check under strict mode', () => {
    blocks.forEach((b, i) => writeFileSync(join(dir, `block${i}.ts`), `${b}\nexport {};\n`));
    writeFileSync(
      join(dir, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          noEmit: true,
          target: 'ES2022',
          module: 'ES2022',
          moduleResolution: 'bundler',
          lib: ['ES2022', 'esnext.disposable'],
          types: ['node'],
          typeRoots: [join(root, 'node_modules', '@types')],
          skipLibCheck: true,
          paths: {
            'recurrent-kernels': [join(root, 'lib', 'index.ts')],
            'recurrent-kernels/tfjs': [join(root, 'lib', 'tfjs', 'index.ts')],
            '@tensorflow/*': [join(root, 'node_modules', '@tensorflow', '*')],
          },
        },
        include: [join(dir, '*.ts')],
      }),
    );
    try {
      execFileSync(
        process.execPath,
        [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(dir, 'tsconfig.json')],
        { encoding: 'utf8' },
      );
    } catch (e) {
      const out = String((e as { stdout?: string }).stdout ?? e);
      throw new Error(
        `README examples do not type-check:\n${out.replace(
          /block(\d+)\.ts\((\d+)/g,
          (_, i, l) => `README line ${lineOf(blocks[Number(i)]) + Number(l) - 1} (block ${i}`,
        )}`,
      );
    }
  }, 120_000);

  it.each(blocks.map((b, i) => [i, lineOf(b), b] as const))('example %i (README line %i) runs', async (i, _line, b) => {
    const file = join(dir, `run${i}.ts`);
    writeFileSync(
      file,
      b
        .replace(/from 'recurrent-kernels'/g, `from ${JSON.stringify(join(root, 'lib', 'index.ts'))}`)
        .replace(/from 'recurrent-kernels\/tfjs'/g, `from ${JSON.stringify(join(root, 'lib', 'tfjs', 'index.ts'))}`),
    );
    await import(file);
  });
});
