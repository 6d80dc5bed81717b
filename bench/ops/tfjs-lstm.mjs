// TensorFlow.js layers through recurrent-kernels/tfjs against TensorFlow.js alone (cpu backend), in
// one process: an LSTM layer (tf.layers.lstm vs an input projection + rkTf.fusedRnn), and a Mamba-style
// selective scan (rkTf.selectiveScan vs the same recurrence written with tf ops). Forward, and
// forward + backward (tf.variableGrads of the output's sum over the layer's weights; for the scans,
// tf.grads over u, delta, A, B and C).
import { timeIt } from '../timing.mjs';

export default {
  sizeLabel: 'BxTxIxH',
  sizeHelp: 'batch x length x input size x hidden size (BxTxIxH)',
  sizeDims: [4],
  async run(rk, { quick, sizes: userSizes, peers: withPeers = true, progress }) {
    const tf = await import('@tensorflow/tfjs');
    const rkTf = await import('recurrent-kernels/tfjs');
    tf.env().set('IS_TEST', true);
    await tf.setBackend('cpu');
    const sizes =
      userSizes ??
      (quick
        ? [[4, 32, 16, 32]]
        : [
            [16, 128, 32, 128],
            [4, 512, 32, 64],
          ]);
    const rows = [];
    let step = 0;
    for (const [B, T, I, H] of sizes) {
      progress?.(++step, sizes.length, `${B}x${T}x${I}x${H}`);
      const size = `${B}x${T}x${I}x${H}`;
      const x = tf.randomNormal([B, T, I], 0, 1, 'float32', 1);
      // The same weights for both: kernel [I, 4H] and recurrent kernel [H, 4H] with gates (i, f, c, o),
      // which are recurrent-kernels' (i, f, z, o).
      const layer = tf.layers.lstm({ units: H, returnSequences: true, recurrentActivation: 'sigmoid' });
      layer.apply(x);
      const [kernel, recurrent, bias] = layer.getWeights();
      const Wx = tf.variable(kernel);
      const R = tf.variable(tf.tidy(() => recurrent.reshape([H, 4, H]).transpose([1, 0, 2]).reshape([4, 1, H, H])));
      const b = tf.variable(tf.tidy(() => bias.reshape([4, 1, H])));
      const ours = () => {
        const wx = tf.matMul(x.reshape([B * T, I]), Wx).reshape([B, T, 4, 1, H]);
        return rkTf.fusedRnn({ wx, R, b }, { cell: 'lstm' }).h.reshape([B, T, H]);
      };
      const maxDiff = tf.tidy(() => tf.max(tf.abs(tf.sub(ours(), layer.apply(x)))).dataSync()[0]);
      const dispose = (r) => tf.dispose(r);
      const iters = quick ? 3 : 5;
      const fwd = timeIt(rk, 'cpu', () => tf.tidy(() => ours()), { iters, warmup: 1, after: dispose });
      const fwdTf = withPeers
        ? timeIt(rk, 'cpu', () => tf.tidy(() => layer.apply(x)), { iters, warmup: 1, after: dispose })
        : null;
      const both = timeIt(rk, 'cpu', () => tf.variableGrads(() => tf.sum(ours()), [Wx, R, b]), {
        iters,
        warmup: 1,
        after: (g) => {
          tf.dispose(g.value);
          tf.dispose(Object.values(g.grads));
        },
      });
      const bothTf = withPeers
        ? timeIt(
            rk,
            'cpu',
            () =>
              tf.variableGrads(
                () => tf.sum(layer.apply(x)),
                layer.trainableWeights.map((w) => w.read()),
              ),
            {
              iters,
              warmup: 1,
              after: (g) => {
                tf.dispose(g.value);
                tf.dispose(Object.values(g.grads));
              },
            },
          )
        : null;
      const extra = { 'max |ours - tf|': maxDiff.toExponential(1) };
      rows.push({
        size,
        tag: 'LSTM layer',
        dtype: 'float32',
        pass: 'fwd',
        ms: fwd,
        gbs: null,
        peers: { 'tf.layers.lstm': fwdTf },
        extra,
      });
      rows.push({
        size,
        tag: 'LSTM layer',
        dtype: 'float32',
        pass: 'fwd+bwd',
        ms: both,
        gbs: null,
        peers: { 'tf.layers.lstm': bothTf },
        extra,
      });
      tf.dispose([x, Wx, R, b]);
      layer.dispose();
    }
    // A Mamba-style scan: batch B, inner dim H, length T, dstate 16.
    for (const [B, T, , H] of sizes) {
      const N = 16,
        size = `${B}x${T}x-x${H}`;
      let seed = 5;
      const r = (shape, s = 1) => tf.randomNormal(shape, 0, s, 'float32', seed++);
      const u = r([B, H, T]),
        delta = tf.tidy(() => tf.abs(r([B, H, T], 0.1))),
        A = tf.tidy(() => tf.neg(tf.abs(r([H, N]))));
      const Bm = r([B, 1, N, T]),
        Cm = r([B, 1, N, T]);
      const scanTf = (u, delta, A, Bm, Cm) => {
        let s = tf.zeros([B, H, N]);
        const ys = [];
        for (let t = 0; t < T; t++) {
          const dt = delta.slice([0, 0, t], [B, H, 1]);
          s = tf.add(
            tf.mul(tf.exp(tf.mul(dt, A.expandDims(0))), s),
            tf.mul(tf.mul(dt, u.slice([0, 0, t], [B, H, 1])), Bm.slice([0, 0, 0, t], [B, 1, N, 1]).reshape([B, 1, N])),
          );
          ys.push(tf.sum(tf.mul(s, Cm.slice([0, 0, 0, t], [B, 1, N, 1]).reshape([B, 1, N])), 2));
        }
        return tf.stack(ys, 2);
      };
      const scanOurs = (u, delta, A, Bm, Cm) => rkTf.selectiveScan({ u, delta, A, B: Bm, C: Cm }).y;
      const args = [u, delta, A, Bm, Cm];
      const iters = quick ? 3 : 5;
      const dispose = (x) => tf.dispose(x);
      const fwd = timeIt(rk, 'cpu', () => tf.tidy(() => scanOurs(...args)), { iters, warmup: 1, after: dispose });
      const fwdTf = withPeers
        ? timeIt(rk, 'cpu', () => tf.tidy(() => scanTf(...args)), { iters, warmup: 1, after: dispose })
        : null;
      const both = timeIt(rk, 'cpu', () => tf.grads((...a) => tf.sum(scanOurs(...a)))(args), {
        iters,
        warmup: 1,
        after: dispose,
      });
      const bothTf = withPeers
        ? timeIt(rk, 'cpu', () => tf.grads((...a) => tf.sum(scanTf(...a)))(args), { iters, warmup: 1, after: dispose })
        : null;
      rows.push({
        size,
        tag: 'selective scan',
        dtype: 'float32',
        pass: 'fwd',
        ms: fwd,
        gbs: null,
        peers: { 'tf ops': fwdTf },
      });
      rows.push({
        size,
        tag: 'selective scan',
        dtype: 'float32',
        pass: 'fwd+bwd',
        ms: both,
        gbs: null,
        peers: { 'tf ops': bothTf },
      });
      tf.dispose(args);
    }
    return rows;
  },
};
