#!/usr/bin/env node
// The format and lint check: Biome (TypeScript / JavaScript: format and correctness lint, biome.jsonc)
// and clang-format (C++ / CUDA, .clang-format) over the tracked sources. Exits non-zero on any finding.
// Without clang-format on PATH the C++ half is skipped with a note, unless RK_REQUIRE_FORMAT=1 (CI).
//   npm run lint            check
//   npm run lint -- --fix   rewrite the files instead
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const fix = process.argv.includes('--fix');
const run = (cmd, args) => spawnSync(cmd, args, { cwd: root, stdio: 'inherit' }).status ?? 1;

let failed =
  run(process.execPath, [
    join(root, 'node_modules', '@biomejs', 'biome', 'bin', 'biome'),
    fix ? 'check' : 'ci',
    ...(fix ? ['--write'] : []),
    '.',
  ]) !== 0;

const listed = spawnSync('git', ['ls-files', 'cpp', 'cuda', 'tests/cuda-emulator', 'tests/cpu-cross'], {
  cwd: root,
  encoding: 'utf8',
});
const sources = listed.status === 0 ? listed.stdout.split('\n').filter((f) => /\.(cc|h|inc|cu|cuh|cpp)$/.test(f)) : [];
if (spawnSync('clang-format', ['--version']).error) {
  console.log('lint: clang-format not found; the C++ / CUDA format check was skipped');
  if (process.env.RK_REQUIRE_FORMAT === '1') failed = true;
} else if (sources.length === 0) {
  console.log('lint: no C++ sources found (not a git checkout?)');
  failed = true;
} else {
  const args = fix ? ['-i', '--style=file', ...sources] : ['--dry-run', '-Werror', '--style=file', ...sources];
  if (run('clang-format', args) !== 0) failed = true;
  else console.log(`lint: ${sources.length} C++ / CUDA files ${fix ? 'formatted' : 'formatted as .clang-format says'}`);
}
process.exit(failed ? 1 : 0);
