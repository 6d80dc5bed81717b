// A one-layer LSTM trained with TensorFlow.js, its recurrence from recurrent-kernels' fused cell:
// an input projection into the four gates, rkTf.fusedRnn (LSTM), and an output projection, trained
// with Adam to follow an exponential moving average of its input.
//
//   node examples/tfjs-lstm.mjs [steps]
import * as tf from '@tensorflow/tfjs';
import * as rkTf from 'recurrent-kernels/tfjs';

export async function train({ steps = 150, log = () => {} } = {}) {
  await tf.setBackend('cpu');
  const [batch, T, D] = [8, 48, 16];
  let seed = 1;
  const param = (shape, scale) => tf.variable(tf.randomNormal(shape, 0, scale, 'float32', seed++));
  const Wx = param([1, 4 * D], 0.5); // gates (i, f, z, o)
  const R = param([4, 1, D, D], 0.2); // one head of D
  const b = tf.variable(tf.zeros([4, 1, D]));
  const Wout = param([D, 1], 0.3);

  // The task: y_t = 0.8 y_{t-1} + 0.2 x_t, for random x.
  const x = tf.randomNormal([batch, T, 1], 0, 1, 'float32', 99);
  const target = tf.tensor(
    x.arraySync().map((row) => {
      let s = 0;
      return row.map(([v]) => [(s = 0.8 * s + 0.2 * v)]);
    }),
  );

  const model = () => {
    const wx = tf.matMul(x.reshape([batch * T, 1]), Wx).reshape([batch, T, 4, 1, D]);
    const { h } = rkTf.fusedRnn({ wx, R, b }, { cell: 'lstm' }); // [batch, T, 1, D]
    return tf.matMul(h.reshape([batch * T, D]), Wout).reshape([batch, T, 1]);
  };
  const optimizer = tf.train.adam(0.02);
  const losses = [];
  for (let step = 0; step < steps; step++) {
    const loss = optimizer.minimize(() => tf.mean(tf.square(tf.sub(model(), target))), true);
    losses.push(loss.dataSync()[0]);
    loss.dispose();
    if (step % 25 === 0 || step === steps - 1) log(`step ${step}: loss ${losses.at(-1).toFixed(5)}`);
  }
  tf.dispose([Wx, R, b, Wout, x, target]);
  optimizer.dispose();
  return losses;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const losses = await train({ steps: Number(process.argv[2] ?? 150), log: console.log });
  console.log(`loss fell ${(losses[0] / losses.at(-1)).toFixed(1)}x`);
}
