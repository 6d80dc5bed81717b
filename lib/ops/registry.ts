/**
 * Every op with autograd hooks and a Promise form, by its public name. The package's `ops` hooks
 * table and its type are derived from it, and the `<op>Async` exports read it (lib/index.ts): a new
 * op is one line here, plus its named exports there (ES module exports cannot be computed).
 */
import { causalConv1d } from './causalConv1d';
import { elementwiseOps } from './elementwise';
import { fusedRnn } from './fusedRnn';
import { gatedDeltaRule } from './gatedDeltaRule';
import { linearAttention } from './linearAttention';
import { linearScan } from './linearScan';
import { mamba2Scan } from './mamba2Scan';
import { newtonRnn } from './newtonRnn';
import { selectiveScan } from './selectiveScan';

export const registry = {
  linearScan,
  selectiveScan,
  gatedDeltaRule,
  fusedRnn,
  newtonRnn,
  linearAttention,
  causalConv1d,
  mamba2Scan,
  ...elementwiseOps,
};
