// Benchmark of the Newton-iteration parallel RNN (rk.newtonRnn) for the cells gru-diag,
// lstm-cifg-diag and gru (dense heads), forward and forward + backward, in mode 'newton' (full
// Jacobian, zero guess, tolerance abs 1e-5 + rel 1e-5) and in mode 'sequential'. Each newton row
// reports the mean number of Newton iterations per batch row. Peers: on CPU a plain JavaScript
// sequential loop of the same cell (forward only); on CUDA a plain PyTorch sequential loop
// (bench/peers/newton_rnn.py, when python3 with torch is present).
//
// Sizes are batch x T x hidden [x heads] (heads default 1 for the diagonal cells and hidden / 64
// for gru). Inputs: wx ~ U(-1, 1), b ~ U(-0.5, 0.5), diagonal R ~ U(-0.5, 0.5), dense R ~
// U(-1, 1) / sqrt(headDim): the ordinary, contracting regime of trained recurrent layers.
// Bytes counted per pass: wx read and y written (plus, for fwd+bwd, grad y read and grad wx
// written), the float32 trajectory written; the floor is those bytes at the measured copy
// bandwidth. FLOP counts are not shown: the Newton forward repeats the cell's work per iteration.
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';

const CELLS = ['gru-diag', 'lstm-cifg-diag', 'gru'];
const GATES = { 'gru-diag': 3, 'lstm-cifg-diag': 3, gru: 3 };
const STATES = { 'gru-diag': 1, 'lstm-cifg-diag': 2, gru: 1 };
const SIZES = {
  cuda: [[16, 4096, 1024], [4, 65536, 256], [64, 1024, 512]],
  cpu: [[16, 1024, 256], [1, 4096, 256], [4, 16384, 64]],
};
const QUICK = { cuda: [[4, 4096, 256]], cpu: [[4, 512, 128]] };

function uniform(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

const sig = (x) => 1 / (1 + Math.exp(-x));

// The plain sequential loop a JS user would write (float32 storage, one step after another).
function jsForward(cell, d, batch, T, N, H) {
  const D = N / H, G = GATES[cell];
  const y = new Float32Array(batch * T * N);
  const h = new Float32Array(N), c = new Float32Array(N), rec = new Float32Array(G * N);
  for (let b = 0; b < batch; b++) {
    h.fill(0);
    c.fill(0);
    for (let t = 0; t < T; t++) {
      const x = (g, n) => d.wx[((b * T + t) * G + g) * N + n];
      if (cell === 'gru') {
        rec.fill(0);
        for (let g = 0; g < G; g++) {
          for (let hh = 0; hh < H; hh++) {
            for (let k = 0; k < D; k++) {
              const hk = h[hh * D + k], row = ((g * H + hh) * D + k) * D;
              for (let j = 0; j < D; j++) rec[g * N + hh * D + j] += hk * d.R[row + j];
            }
          }
        }
      } else {
        for (let g = 0; g < G; g++) for (let n = 0; n < N; n++) rec[g * N + n] = d.R[g * N + n] * h[n];
      }
      for (let n = 0; n < N; n++) {
        if (cell === 'lstm-cifg-diag') {
          const f = sig(x(0, n) + d.b[n] + rec[n]), z = Math.tanh(x(1, n) + d.b[N + n] + rec[N + n]);
          const o = sig(x(2, n) + d.b[2 * N + n] + rec[2 * N + n]);
          c[n] = f * c[n] + (1 - f) * z;
          h[n] = o * Math.tanh(c[n]);
        } else {
          const r = sig(x(0, n) + d.b[n] + rec[n]), z = sig(x(1, n) + d.b[N + n] + rec[N + n]);
          const nn = Math.tanh(x(2, n) + r * (rec[2 * N + n] + d.b[2 * N + n]));
          h[n] = (1 - z) * nn + z * h[n];
        }
        y[(b * T + t) * N + n] = h[n];
      }
    }
  }
  return y;
}

export default {
  async run(rk, { device, quick, ceiling, sizes: userSizes, dtype: userDtype }) {
    if (!rk.newtonRnn || !rk.ops?.newtonRnn) throw new Error('bench: this build has no newtonRnn op');
    if (typeof rk.internals?.native?.().newtonRnnForward !== 'function')
      throw new Error('bench: the native addon has no Newton RNN kernels (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)[device]).map((s) => {
      if (s.length !== 3 && s.length !== 4) throw new Error(`bench: newton-rnn sizes are batch x T x hidden [x heads], got ${s.join('x')}`);
      return s;
    });
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const peerTimes = device === 'cuda' ? runPythonPeer('newton_rnn.py', { sizes, dtypes: [dtype], cells: CELLS }) : null;
    const peerName = device === 'cpu' ? 'JS loop' : 'PyTorch loop';
    const rows = [];
    for (const s of sizes) {
      const [batch, T, N] = s;
      for (const cell of CELLS) {
        const H = s[3] ?? (cell === 'gru' ? Math.max(1, N / 64) : 1);
        if (N % H) throw new Error(`bench: hidden ${N} is not a multiple of heads ${H}`);
        const D = N / H, G = GATES[cell], S = STATES[cell];
        const size = `${batch}x${T}x${N}x${H}`;
        const diag = cell !== 'gru';
        const data = {
          wx: uniform(batch * T * G * N, -1, 1), b: uniform(G * N, -0.5, 0.5),
          R: diag ? uniform(G * N, -0.5, 0.5) : uniform(G * N * D, -1 / Math.sqrt(D), 1 / Math.sqrt(D)),
        };
        const inputs = {
          wx: rk.Tensor.from(data.wx, [batch, T, G, N], { dtype, device }),
          R: rk.Tensor.from(data.R, diag ? [G, N] : [G, H, D, D], { device }),
          b: rk.Tensor.from(data.b, [G, N], { device }),
        };
        const gy = rk.Tensor.from(uniform(batch * T * N, -1, 1), [batch, T, N], { dtype, device });
        const e = rk.dtypeBytes(dtype);
        const fwdBytes = batch * T * (G * N * e + N * e + S * N * 4);
        const bwdBytes = fwdBytes + batch * T * (N * e + G * N * e + S * N * 4);
        const iters = device === 'cuda' ? 20 : 5;
        const free = (o) => { o.y.dispose(); o.finalStates.dispose(); o.trajectory.dispose(); };
        let jsMs = null;
        if (device === 'cpu') {
          // Scaled from fewer steps when long (the loop is linear in T).
          const Tp = Math.min(T, Math.max(16, Math.floor(2 ** 24 / (batch * N * (diag ? 8 : 3 * D)))));
          const sub = { wx: subRows(data.wx, batch, T, Tp, G * N), R: data.R, b: data.b };
          jsMs = timeIt(rk, 'cpu', () => jsForward(cell, sub, batch, Tp, N, H),
            { warmup: 1, iters: 3 }) * (T / Tp);
        }
        for (const mode of ['newton', 'sequential']) {
          const options = { cell, heads: H, mode, tol: { abs: 1e-5, rel: 1e-5 }, maxIters: 100 };
          let its = null;
          const fwd = timeIt(rk, device, () => rk.newtonRnn(inputs, options), {
            iters, after: (o) => { its = o.stats.iterations; free(o); },
          });
          const both = timeIt(rk, device, () => {
            const { outputs, ctx } = rk.ops.newtonRnn.forward(inputs, options);
            const g = rk.ops.newtonRnn.backward(ctx, { y: gy });
            return { outputs, g };
          }, { iters, after: ({ outputs, g }) => { free(outputs); g.wx.dispose(); g.R.dispose(); g.b.dispose(); } });
          const meanIts = Array.from(its).reduce((a, b) => a + b, 0) / its.length;
          const key = `${batch}x${T}x${N}x${H}/${dtype}/${cell}`;
          for (const [pass, ms, bytes] of [['fwd', fwd, fwdBytes], ['fwd+bwd', both, bwdBytes]]) {
            const peer = device === 'cpu' ? (pass === 'fwd' ? jsMs : null) : (peerTimes?.[`${key}/${pass}`] ?? null);
            rows.push({
              size: size, dtype, pass: `${cell} ${mode} ${pass}`, ms, gbs: bytes / (ms * 1e6),
              extra: {
                'floor (copy)': `${(bytes / (ceiling * 1e6)).toFixed(3)} ms`,
                'Newton iterations': mode === 'newton' ? meanIts.toFixed(1) : '–',
              },
              bytes, peers: { [peerName]: peer },
            });
          }
        }
        for (const t of Object.values(inputs)) t.dispose();
        gy.dispose();
      }
    }
    return rows;
  },
};

/** The first Tp steps of every batch row of a [batch, T, per] array. */
function subRows(x, batch, T, Tp, per) {
  if (Tp === T) return x;
  const out = new Float32Array(batch * Tp * per);
  for (let b = 0; b < batch; b++) out.set(x.subarray(b * T * per, (b * T + Tp) * per), b * Tp * per);
  return out;
}
