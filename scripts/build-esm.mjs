// Writes dist/index.mjs and dist/tfjs.mjs: the ES module entry points, re-exporting the CommonJS
// build by name so that both `import` and `require` get the same single instance of the package.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const names = Object.keys(createRequire(import.meta.url)(join(dist, 'cjs', 'index.js'))).filter(
  (n) => n !== 'default' && n !== '__esModule',
);
writeFileSync(
  join(dist, 'index.mjs'),
  `import rk from './cjs/index.js';\nexport const { ${names.join(', ')} } = rk;\nexport default rk;\n`,
);

// The TensorFlow.js bridge's names come from its CommonJS file (loading it would need tfjs-core).
const tfjsNames = [
  ...new Set(
    [...readFileSync(join(dist, 'cjs', 'tfjs', 'index.js'), 'utf8').matchAll(/^exports\.(\w+) = /gm)].map((m) => m[1]),
  ),
].filter((n) => n !== '__esModule');
writeFileSync(
  join(dist, 'tfjs.mjs'),
  `import m from './cjs/tfjs/index.js';\nexport const { ${tfjsNames.join(', ')} } = m;\nexport default m;\n`,
);
