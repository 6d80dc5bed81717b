// Benchmark of the Newton-iteration parallel RNN (rk.newtonRnn) for the cells gru-diag,
// lstm-cifg-diag and gru (dense heads), forward and forward + backward, in mode 'newton' (full
// Jacobian, zero guess, tolerance abs 1e-5 + rel 1e-5) and in mode 'sequential'. Each newton row
// reports the mean number of Newton iterations per batch row. Peers: on CPU a plain JavaScript
// sequential loop of the same cell (forward only); on CUDA a plain PyTorch sequential loop
// (bench/peers/newton_rnn.py, when python3 with torch is present).
//
// Sizes are batch x T x hidden [x heads]: heads lay out the diagonal cells' channels (default 1);
// gru runs with heads of 64 channels on CPU and of 16 and of 32 on CUDA (full Jacobian). The CUDA
// sizes are the rows of ParaRNN's published comparison (fp32, 8 heads; ParaRNN's times include the
// input projection, a plain matmul the caller owns, which these exclude).
//
// --curve: the speed-up of Newton over this package's own sequential mode against T for several
// batch sizes (gru-diag, and gru with heads of 32), with the crossover (the smallest T where Newton
// wins) per batch; --chart FILE also writes it as an SVG line chart (one file per cell). Inputs: wx ~ U(-1, 1), b ~ U(-0.5, 0.5), diagonal R ~ U(-0.5, 0.5), dense R ~
// U(-1, 1) / sqrt(headDim): the ordinary, contracting regime of trained recurrent layers.
// Bytes counted per pass: wx read and y written (plus, for fwd+bwd, grad y read and grad wx
// written), the float32 trajectory written; the floor is those bytes at the measured copy
// bandwidth. FLOP counts are not shown: the Newton forward repeats the cell's work per iteration.
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';

import { writeFileSync } from 'node:fs';
import { lineChart } from '../chart.mjs';

const CELLS = ['gru-diag', 'lstm-cifg-diag', 'gru'];
const GRU_HEAD_DIMS = { cpu: [64], cuda: [16, 32] };
const CURVE = {
  cuda: { Ts: [256, 1024, 4096, 16384], batches: [1, 4, 16], hidden: 1024 },
  cpu: { Ts: [64, 256, 1024, 4096], batches: [1, 4, 16], hidden: 256 },
};
const GATES = { 'gru-diag': 3, 'lstm-cifg-diag': 3, gru: 3 };
const STATES = { 'gru-diag': 1, 'lstm-cifg-diag': 2, gru: 1 };
const SIZES = {
  cuda: [
    [8, 1024, 1024, 8],
    [8, 4096, 1024, 8],
    [1, 16384, 1024, 8],
  ],
  cpu: [
    [16, 1024, 256],
    [1, 4096, 256],
    [4, 16384, 64],
  ],
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
  const D = N / H,
    G = GATES[cell];
  const y = new Float32Array(batch * T * N);
  const h = new Float32Array(N),
    c = new Float32Array(N),
    rec = new Float32Array(G * N);
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
              const hk = h[hh * D + k],
                row = ((g * H + hh) * D + k) * D;
              for (let j = 0; j < D; j++) rec[g * N + hh * D + j] += hk * d.R[row + j];
            }
          }
        }
      } else {
        for (let g = 0; g < G; g++) for (let n = 0; n < N; n++) rec[g * N + n] = d.R[g * N + n] * h[n];
      }
      for (let n = 0; n < N; n++) {
        if (cell === 'lstm-cifg-diag') {
          const f = sig(x(0, n) + d.b[n] + rec[n]),
            z = Math.tanh(x(1, n) + d.b[N + n] + rec[N + n]);
          const o = sig(x(2, n) + d.b[2 * N + n] + rec[2 * N + n]);
          c[n] = f * c[n] + (1 - f) * z;
          h[n] = o * Math.tanh(c[n]);
        } else {
          const r = sig(x(0, n) + d.b[n] + rec[n]),
            z = sig(x(1, n) + d.b[N + n] + rec[N + n]);
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
  sizeLabel: 'BxTxNxH',
  sizeHelp: 'batch x T x hidden [x heads] (BxTxN[xH])',
  sizeDims: [3, 4],
  async run(
    rk,
    { device, quick, ceiling, sizes: userSizes, dtype: userDtype, curve, chart, peers: withPeers = true, progress },
  ) {
    if (!rk.newtonRnn || !rk.ops?.newtonRnn) throw new Error('bench: this build has no newtonRnn op');
    if (typeof rk.internals?.native?.().newtonRnnForward !== 'function')
      throw new Error('bench: the native addon has no Newton RNN kernels (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)[device]).map((s) => {
      if (s.length !== 3 && s.length !== 4)
        throw new Error(`bench: newton-rnn sizes are batch x T x hidden [x heads], got ${s.join('x')}`);
      return s;
    });
    const dtype = userDtype ?? 'float32';
    if (curve) return runCurve(rk, device, dtype, chart);
    // (cell, heads) per size: the diagonal cells with the size's heads, gru with heads of each width.
    const jobsOf = (s) =>
      CELLS.flatMap((cell) =>
        cell === 'gru'
          ? GRU_HEAD_DIMS[device].filter((d) => s[2] % d === 0).map((d) => [cell, s[2] / d])
          : [[cell, s[3] ?? 1]],
      );
    const peerTimes =
      device === 'cuda' && withPeers
        ? runPythonPeer('newton_rnn.py', {
            jobs: sizes.flatMap((s) => jobsOf(s).map(([cell, H]) => [cell, [s[0], s[1], s[2], H]])),
            dtypes: [dtype],
          })
        : null;
    const peerName = device === 'cpu' ? 'JS loop' : 'PyTorch loop';
    const rows = [];
    const total = sizes.reduce((n, s) => n + jobsOf(s).length, 0);
    let step = 0;
    for (const s of sizes) {
      const [batch, T, N] = s;
      for (const [cell, H] of jobsOf(s)) {
        progress?.(++step, total, `${batch}x${T}x${N}x${H} ${cell}`);
        if (N % H) throw new Error(`bench: hidden ${N} is not a multiple of heads ${H}`);
        const D = N / H,
          G = GATES[cell],
          S = STATES[cell];
        const size = `${batch}x${T}x${N}x${H}`;
        const diag = cell !== 'gru';
        const data = {
          wx: uniform(batch * T * G * N, -1, 1),
          b: uniform(G * N, -0.5, 0.5),
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
        const free = (o) => {
          o.y.dispose();
          o.finalStates.dispose();
          o.trajectory.dispose();
        };
        let jsMs = null;
        if (device === 'cpu' && withPeers) {
          // Scaled from fewer steps when long (the loop is linear in T).
          const Tp = Math.min(T, Math.max(16, Math.floor(2 ** 24 / (batch * N * (diag ? 8 : 3 * D)))));
          const sub = { wx: subRows(data.wx, batch, T, Tp, G * N), R: data.R, b: data.b };
          jsMs = timeIt(rk, 'cpu', () => jsForward(cell, sub, batch, Tp, N, H), { warmup: 1, iters: 3 }) * (T / Tp);
        }
        for (const mode of ['newton', 'sequential']) {
          const options = { cell, heads: H, mode, tol: { abs: 1e-5, rel: 1e-5 }, maxIters: 100 };
          let its = null;
          const fwd = timeIt(rk, device, () => rk.newtonRnn(inputs, options), {
            iters,
            after: (o) => {
              its = o.stats.iterations;
              free(o);
            },
          });
          const both = timeIt(
            rk,
            device,
            () => {
              const { outputs, ctx } = rk.ops.newtonRnn.forward(inputs, options);
              const g = rk.ops.newtonRnn.backward(ctx, { y: gy });
              return { outputs, g };
            },
            {
              iters,
              after: ({ outputs, g }) => {
                free(outputs);
                g.wx.dispose();
                g.R.dispose();
                g.b.dispose();
              },
            },
          );
          const meanIts = Array.from(its).reduce((a, b) => a + b, 0) / its.length;
          const key = `${batch}x${T}x${N}x${H}/${dtype}/${cell}`;
          for (const [pass, ms, bytes] of [
            ['fwd', fwd, fwdBytes],
            ['fwd+bwd', both, bwdBytes],
          ]) {
            const peer = device === 'cpu' ? (pass === 'fwd' ? jsMs : null) : (peerTimes?.[`${key}/${pass}`] ?? null);
            rows.push({
              size: size,
              dtype,
              pass: `${cell} ${mode} ${pass}`,
              ms,
              gbs: bytes / (ms * 1e6),
              extra: {
                'floor (copy)': `${(bytes / (ceiling * 1e6)).toFixed(3)} ms`,
                'Newton iterations': mode === 'newton' ? meanIts.toFixed(1) : '–',
              },
              bytes,
              peers: { [peerName]: peer },
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

/** Newton vs sequential forward over T and batch: rows, the crossover per batch, and a chart. */
function runCurve(rk, device, dtype, chart) {
  const { Ts, batches, hidden: N } = CURVE[device];
  const rows = [];
  for (const [cell, H] of [
    ['gru-diag', 1],
    ['gru', N / 32],
  ]) {
    const D = N / H,
      diag = cell !== 'gru';
    const series = [];
    for (const batch of batches) {
      const points = [];
      for (const T of Ts) {
        const inputs = {
          wx: rk.Tensor.from(uniform(batch * T * 3 * N, -1, 1), [batch, T, 3, N], { dtype, device }),
          R: rk.Tensor.from(
            diag ? uniform(3 * N, -0.5, 0.5) : uniform(3 * N * D, -1 / Math.sqrt(D), 1 / Math.sqrt(D)),
            diag ? [3, N] : [3, H, D, D],
            { device },
          ),
          b: rk.Tensor.from(uniform(3 * N, -0.5, 0.5), [3, N], { device }),
        };
        const ms = {};
        let its = null;
        for (const mode of ['newton', 'sequential']) {
          ms[mode] = timeIt(
            rk,
            device,
            () => rk.newtonRnn(inputs, { cell, heads: H, mode, tol: { abs: 1e-5, rel: 1e-5 }, maxIters: 100 }),
            {
              iters: device === 'cuda' ? 20 : 3,
              after: (o) => {
                if (mode === 'newton') its = o.stats.iterations;
                o.y.dispose();
                o.finalStates.dispose();
                o.trajectory.dispose();
              },
            },
          );
        }
        const meanIts = Array.from(its).reduce((a, b) => a + b, 0) / its.length;
        const speedup = ms.sequential / ms.newton;
        points.push([T, speedup]);
        rows.push({
          size: `${batch}x${T}x${N}x${H}`,
          dtype,
          pass: `${cell} fwd, Newton vs sequential`,
          ms: ms.newton,
          gbs: null,
          extra: {
            sequential: `${ms.sequential.toFixed(3)} ms`,
            'Newton iterations': meanIts.toFixed(1),
            'speed-up': `${speedup.toFixed(2)}x`,
          },
          peers: {},
        });
        for (const t of Object.values(inputs)) t.dispose();
      }
      const win = points.find(([, sp]) => sp > 1);
      console.log(
        `${cell}, batch ${batch}: ${win ? `Newton is faster from T = ${win[0]}` : `Newton is not faster at any T up to ${Ts.at(-1)}`}`,
      );
      series.push({ name: `batch ${batch}`, points });
    }
    if (chart) {
      const file = chart.replace(/(\.svg)?$/, `-${cell}.svg`);
      writeFileSync(
        file,
        lineChart(series, {
          title: `${cell}${diag ? '' : ` (heads of ${D}, full Jacobian)`}, hidden ${N}, ${dtype}, ${device}: Newton vs sequential`,
          xLabel: 'T',
          yLabel: 'speed-up (sequential time / Newton time)',
          logX: true,
          logY: true,
          reference: 1,
        }),
      );
      console.log(`wrote ${file}`);
    }
  }
  return rows;
}

/** The first Tp steps of every batch row of a [batch, T, per] array. */
function subRows(x, batch, T, Tp, per) {
  if (Tp === T) return x;
  const out = new Float32Array(batch * Tp * per);
  for (let b = 0; b < batch; b++) out.set(x.subarray(b * T * per, (b * T + Tp) * per), b * Tp * per);
  return out;
}
