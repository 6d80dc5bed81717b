// A short demo: linear scan forward + backward on the CPU, and on CUDA when present, with timings.
import * as rk from '../dist/index.mjs';

const [batch, channels, length] = [4, 256, 2048];
const n = batch * channels * length;
const a = new Float32Array(n).map(() => 0.9 + 0.1 * Math.random());
const b = new Float32Array(n).map(() => Math.random() - 0.5);

console.log(
  `recurrent-kernels ${rk.version}: linear scan h_t = a_t * h_(t-1) + b_t over [${batch}, ${channels}, ${length}]`,
);
console.log(`CUDA: ${rk.cuda.available() ? rk.cuda.deviceProperties().name : `not available (${rk.cuda.reason()})`}`);

const devices = rk.cuda.available() ? ['cpu', 'cuda'] : ['cpu'];
let reference;
for (const device of devices) {
  const A = rk.Tensor.from(a, [batch, channels, length], { device });
  const B = rk.Tensor.from(b, [batch, channels, length], { device });
  // A loss on top of the scan, differentiated through the tape.
  const lossOf = (a_, b_) => rk.mean(rk.square(rk.linearScan({ a: a_, b: b_ }).h));
  const t0 = performance.now();
  const { value, grads } = rk.valueAndGrad(lossOf)(A, B);
  const loss = value.toFloat32Array()[0];
  const t1 = performance.now();
  const { h } = rk.linearScan({ a: A, b: B });
  if (device === 'cuda') rk.cuda.synchronize();
  const t2 = performance.now();
  const hv = h.toFloat32Array();
  console.log(
    `${device}: h[0, 0, :4] = [${Array.from(hv.slice(0, 4), (x) => x.toFixed(4)).join(', ')}], ` +
      `loss = ${loss.toFixed(6)}, |grad a| = ${norm(grads[0].toFloat32Array()).toFixed(4)}, ` +
      `|grad b| = ${norm(grads[1].toFloat32Array()).toFixed(4)}`,
  );
  console.log(
    `${device}: forward ${(t2 - t1).toFixed(2)} ms; loss + forward + backward through the tape ${(t1 - t0).toFixed(1)} ms`,
  );
  if (reference) console.log(`${device} vs cpu: max |h difference| = ${maxDiff(hv, reference).toExponential(2)}`);
  else reference = hv;
  for (const t of [A, B, h, value, ...grads]) t.dispose();
}

function norm(x) {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s);
}
function maxDiff(x, y) {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]));
  return m;
}
