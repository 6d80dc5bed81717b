// Writes dist/index.mjs: the ES module entry point, re-exporting the CommonJS build by name so
// that both `import` and `require` get the same single instance of the package.
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const names = Object.keys(createRequire(import.meta.url)(join(dist, 'cjs', 'index.js'))).filter((n) => n !== 'default' && n !== '__esModule');
writeFileSync(join(dist, 'index.mjs'),
  `import rk from './cjs/index.js';\nexport const { ${names.join(', ')} } = rk;\nexport default rk;\n`);
