// A small Mamba-style block trained with TensorFlow.js, its selective scan from recurrent-kernels:
// input projection (x and the gate z), a depthwise causal convolution, SiLU, the selective scan
// (delta, B and C computed from the sequence, A = -exp(A_log)), the gate, and an output projection,
// trained with Adam to follow an exponential moving average of its input.
//
//   node examples/tfjs-mamba.mjs [steps]
import * as tf from '@tensorflow/tfjs';
import * as rkTf from 'recurrent-kernels/tfjs';

export async function train({ steps = 150, log = () => {} } = {}) {
  await tf.setBackend('cpu');
  const [batch, T, inner, N, K] = [8, 48, 12, 8, 4];
  let seed = 1;
  const param = (shape, scale) => tf.variable(tf.randomNormal(shape, 0, scale, 'float32', seed++));
  const Win = param([1, 2 * inner], 0.5); // x and the gate z
  const conv = param([1, K, inner, 1], 0.4); // depthwise causal convolution
  const Wdelta = param([inner, inner], 0.1);
  const deltaBias = tf.variable(tf.fill([inner], -1));
  const WB = param([inner, N], 0.3),
    WC = param([inner, N], 0.3);
  const Alog = tf.variable(tf.log(tf.tile(tf.range(1, N + 1).expandDims(0), [inner, 1])));
  const D = tf.variable(tf.ones([inner]));
  const Wout = param([inner, 1], 0.3);

  // The task: y_t = 0.8 y_{t-1} + 0.2 x_t, for random x.
  const x = tf.randomNormal([batch, T, 1], 0, 1, 'float32', 99);
  const xs = x.arraySync();
  const target = tf.tensor(
    xs.map((row) => {
      let s = 0;
      return row.map(([v]) => [(s = 0.8 * s + 0.2 * v)]);
    }),
  );

  const model = () => {
    const proj = tf.matMul(x.reshape([batch * T, 1]), Win).reshape([batch, T, 2 * inner]);
    const [u0, z] = tf.split(proj, 2, 2); // [batch, T, inner] each
    const padded = tf
      .pad(u0, [
        [0, 0],
        [K - 1, 0],
        [0, 0],
      ])
      .reshape([batch, 1, T + K - 1, inner]);
    const u = tf.tidy(() => {
      const c = tf.depthwiseConv2d(padded, conv, 1, 'valid').reshape([batch, T, inner]);
      return tf.mul(c, tf.sigmoid(c)); // SiLU
    });
    const flat = u.reshape([batch * T, inner]);
    const delta = tf.matMul(flat, Wdelta).reshape([batch, T, inner]);
    const Bm = tf.matMul(flat, WB).reshape([batch, T, N]).transpose([0, 2, 1]).reshape([batch, 1, N, T]);
    const Cm = tf.matMul(flat, WC).reshape([batch, T, N]).transpose([0, 2, 1]).reshape([batch, 1, N, T]);
    const { y } = rkTf.selectiveScan(
      {
        u: u.transpose([0, 2, 1]),
        delta: delta.transpose([0, 2, 1]),
        A: tf.neg(tf.exp(Alog)),
        B: Bm,
        C: Cm,
        D,
        z: z.transpose([0, 2, 1]),
        deltaBias,
      },
      { deltaSoftplus: true },
    ); // y: [batch, inner, T]
    return tf.matMul(y.transpose([0, 2, 1]).reshape([batch * T, inner]), Wout).reshape([batch, T, 1]);
  };
  const optimizer = tf.train.adam(0.02);
  const losses = [];
  for (let step = 0; step < steps; step++) {
    const loss = optimizer.minimize(() => tf.mean(tf.square(tf.sub(model(), target))), true);
    losses.push(loss.dataSync()[0]);
    loss.dispose();
    if (step % 25 === 0 || step === steps - 1) log(`step ${step}: loss ${losses.at(-1).toFixed(5)}`);
  }
  tf.dispose([Win, conv, Wdelta, deltaBias, WB, WC, Alog, D, Wout, x, target]);
  optimizer.dispose();
  return losses;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const losses = await train({ steps: Number(process.argv[2] ?? 150), log: console.log });
  console.log(`loss fell ${(losses[0] / losses.at(-1)).toFixed(1)}x`);
}
