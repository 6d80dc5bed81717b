// Benchmark of the fused recurrent cells (rk.fusedRnn), the recurrent part of an LSTM / GRU layer:
// forward (inference: nothing kept for backward) and forward + backward (grads of wx, R, b from a
// grad of h). Sizes are batch x T x heads x headDim; the hidden size is heads * headDim.
// Peers: the plain JavaScript loop on CPU (the same recurrence, float32), PyTorch on CUDA
// (bench/peers/fused_rnn.py: cuDNN LSTM/GRU at the same hidden size, and a plain PyTorch loop with
// block-diagonal weights, when python3 with torch is present).
//
// GFLOP/s counts the recurrent matmuls: 2 * G * D^2 flops per step per head per batch row for the
// forward; fwd+bwd counts three times that (dh_{t-1} = dP R^T and dR = h^T dP). Bytes counted: wx
// read, h written (forward); plus the saved states and pre-activations written and read back, grad h
// read and grad wx written (fwd+bwd). Also per row: the time per step (the per-step latency on
// CUDA) and per gate (the "as fast per gate as the LSTM"); on CUDA cuDNN's LSTM / GRU of the
// same hidden size as a peer (its time includes its input matmul). --chart FILE writes the time
// against the head size (the head-dim sweep) as an SVG line chart.
// On CPU, for sizes with one head (H = 1, D = the hidden size), ONNX Runtime's LSTM / GRU
// (bench/peers/ort.mjs; GRU with linear_before_reset = 1) with an input size of 1: essentially the
// recurrent part alone, as our wx is the input projection done outside. Timed with its own async
// run, in this process, with the CPU kernels' thread count. "% of matmul" is GFLOP/s over ORT's fp32
// MatMul rate on this machine (the CLI's header).
import { writeFileSync } from 'node:fs';
import { lineChart } from '../chart.mjs';
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';
import { ortGru, ortLstm, ortStatus } from '../peers/ort.mjs';

const SIZES = {
  cuda: [
    [16, 1024, 48, 16],
    [16, 1024, 24, 32],
    [16, 1024, 12, 64],
    [16, 1024, 6, 128],
    [16, 1024, 3, 256],
    [16, 1024, 1, 768],
  ],
  // The first three: one head of the full hidden size, against ONNX Runtime's LSTM / GRU.
  cpu: [
    [16, 1024, 1, 256],
    [16, 1024, 1, 768],
    [1, 4096, 1, 256],
    [16, 1024, 12, 64],
  ],
};
const QUICK = {
  cuda: [[16, 256, 12, 64]],
  cpu: [
    [16, 256, 1, 256],
    [1, 1024, 1, 256],
  ],
};
// Every cell on CUDA (the per-gate comparison); the JS and PyTorch peers exist for lstm and gru.
const CELLS = { cpu: ['lstm', 'gru'], cuda: ['lstm', 'gru', 'slstm', 'elman'] };
const PEER_CELLS = ['lstm', 'gru'];
const GATES = { lstm: 4, gru: 3, slstm: 4, elman: 1 };
const STATES = { lstm: 2, gru: 1, slstm: 4, elman: 1 };
// Above this many multiply-adds the JS peer runs on fewer steps, its time scaled up (linear in T).
const PEER_MAX_FMA = 2 ** 29;

function uniform(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

const sig = (x) => 1 / (1 + Math.exp(-x));

// The peer: the per-step recurrence a JS user would write, float32 storage, over batch rows and heads.
function jsForward(cell, wx, R, b, dims) {
  const { batch, T, H, D } = dims;
  const G = GATES[cell];
  const h = new Float32Array(batch * T * H * D),
    hp = new Float32Array(D),
    c = new Float32Array(D),
    rec = new Float32Array(G * D);
  for (let bb = 0; bb < batch; bb++) {
    for (let hh = 0; hh < H; hh++) {
      hp.fill(0);
      c.fill(0);
      for (let t = 0; t < T; t++) {
        rec.fill(0);
        for (let g = 0; g < G; g++) {
          const r0 = (g * H + hh) * D * D;
          for (let k = 0; k < D; k++) {
            const x = hp[k],
              row = r0 + k * D,
              o = g * D;
            for (let j = 0; j < D; j++) rec[o + j] += x * R[row + j];
          }
        }
        const w0 = (bb * T + t) * G * H * D,
          out = ((bb * T + t) * H + hh) * D;
        for (let j = 0; j < D; j++) {
          const pre = (g) => wx[w0 + (g * H + hh) * D + j] + b[(g * H + hh) * D + j];
          let hn;
          if (cell === 'lstm') {
            const cn = sig(pre(1) + rec[D + j]) * c[j] + sig(pre(0) + rec[j]) * Math.tanh(pre(2) + rec[2 * D + j]);
            c[j] = cn;
            hn = sig(pre(3) + rec[3 * D + j]) * Math.tanh(cn);
          } else {
            const r = sig(pre(0) + rec[j]),
              z = sig(pre(1) + rec[D + j]);
            const n = Math.tanh(wx[w0 + (2 * H + hh) * D + j] + r * (rec[2 * D + j] + b[(2 * H + hh) * D + j]));
            hn = (1 - z) * n + z * hp[j];
          }
          h[out + j] = hn;
        }
        for (let j = 0; j < D; j++) hp[j] = h[out + j];
      }
    }
  }
  return h;
}

function jsPeer(rk, cell, data, dims, size) {
  const { batch, T, H, D } = dims;
  const G = GATES[cell];
  const work = batch * T * H * G * D * D;
  const Trun = work > PEER_MAX_FMA ? Math.max(1, Math.floor((T * PEER_MAX_FMA) / work)) : T;
  let wx = data.wx;
  if (Trun < T) {
    wx = new Float32Array(batch * Trun * G * H * D);
    for (let b = 0; b < batch; b++)
      wx.set(data.wx.subarray(b * T * G * H * D, (b * T + Trun) * G * H * D), b * Trun * G * H * D);
    console.log(
      `JS loop peer at ${size} ${cell}: timed on ${Trun} of ${T} steps, time scaled by ${(T / Trun).toFixed(2)}`,
    );
  }
  const ms = timeIt(rk, 'cpu', () => jsForward(cell, wx, data.R, data.b, { ...dims, T: Trun }), {
    warmup: 2,
    iters: 3,
  });
  return ms * (T / Trun);
}

function disposeAll(obj) {
  for (const t of Object.values(obj ?? {})) if (t && typeof t.dispose === 'function') t.dispose();
}

const ORT_PEER = 'ORT (input size 1)';

/** ONNX Runtime's LSTM / GRU at one head of hidden D, input size 1: median ms, or why not. */
async function ortPeer(rk, cell, { batch, T, D }) {
  const status = ortStatus();
  if (!status.ok) return 'ORT not installed';
  const make = cell === 'lstm' ? ortLstm : ortGru;
  const s = await make({ batch, T, input: 1, hidden: D, threads: rk.cpu.info().threads });
  try {
    return await s.timeMs({ warmup: 1, iters: 5 });
  } finally {
    await s.close();
  }
}

export default {
  sizeLabel: 'BxTxHxD',
  sizeHelp: 'batch x T x heads x headDim (BxTxHxD; hidden = H * D)',
  sizeDims: [4],
  tagLabel: 'cell',
  /** Bytes are a small part of the cost here (the recurrent matmuls are): no GB/s on CPU. */
  dropColumns: (device) => (device === 'cpu' ? ['GB/s', '% of copy', 'ms per gate'] : []),
  async run(
    rk,
    { device, quick, sizes: userSizes, dtype: userDtype, chart, ceilings, peers: withPeers = true, progress },
  ) {
    if (!rk.fusedRnn || !rk.ops?.fusedRnn) throw new Error('bench: this build has no fusedRnn op');
    if (typeof rk.internals?.native?.().fusedRnnForward !== 'function')
      throw new Error('bench: the native addon has no fused cell kernels (rebuild it with npm run build:native)');
    const sizes = userSizes ?? (quick ? QUICK : SIZES)[device];
    for (const s of sizes)
      if (s.length !== 4) throw new Error(`bench: fused-rnn sizes are batch x T x heads x headDim, got ${s.join('x')}`);
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const peerTimes =
      device === 'cuda' && withPeers
        ? runPythonPeer('fused_rnn.py', { sizes, dtypes: [dtype], cells: PEER_CELLS })
        : null;
    const chartSeries = new Map(); // name -> [[headDim, ms]]
    const addPoint = (name, D, ms) => {
      if (ms != null) chartSeries.set(name, [...(chartSeries.get(name) ?? []), [D, ms]]);
    };
    const peerName = device === 'cpu' ? 'JS loop' : 'PyTorch loop';
    console.log('GFLOP/s: the recurrent matmuls, 2*G*D^2 flops per step, head and row (fwd+bwd: 3x)');
    const ortNote = ortStatus().ok ? null : `ORT not installed (${ortStatus().reason})`;
    if (device === 'cpu' && withPeers && ortNote) console.log(`${ORT_PEER}: ${ortNote}`);
    const matmul = device === 'cpu' ? (ceilings?.gflops ?? null) : null;
    const rows = [];
    let step = 0;
    for (const [batch, T, H, D] of sizes) {
      const size = `${batch}x${T}x${H}x${D}`;
      for (const cell of CELLS[device]) {
        progress?.(++step, sizes.length * CELLS[device].length, `${size} ${cell}`);
        const G = GATES[cell],
          S = STATES[cell];
        const data = {
          wx: uniform(batch * T * G * H * D, -1, 1),
          R: uniform(G * H * D * D, -1 / Math.sqrt(D), 1 / Math.sqrt(D)),
          b: uniform(G * H * D, -0.1, 0.1),
        };
        const opts = { dtype, device };
        const inputs = {
          wx: rk.Tensor.from(data.wx, [batch, T, G, H, D], opts),
          R: rk.Tensor.from(data.R, [G, H, D, D], opts),
          b: rk.Tensor.from(data.b, [G, H, D], { device }),
        };
        const gh = rk.Tensor.from(uniform(batch * T * H * D, -1, 1), [batch, T, H, D], opts);
        const options = { cell };
        const iters = device === 'cuda' ? 20 : 5;
        const fwd = timeIt(rk, device, () => rk.fusedRnn(inputs, options), { iters, after: disposeAll });
        const both = timeIt(
          rk,
          device,
          () => {
            const { outputs, ctx } = rk.ops.fusedRnn.forward(inputs, options);
            return { outputs, ctx, grads: rk.ops.fusedRnn.backward(ctx, { h: gh }) };
          },
          {
            iters: device === 'cuda' ? 10 : 3,
            after: ({ outputs, ctx, grads }) => {
              disposeAll(outputs);
              ctx.savedStates.dispose();
              ctx.savedPre.dispose();
              disposeAll(grads);
            },
          },
        );
        const e = rk.dtypeBytes(dtype);
        const flops = 2 * G * D * D * batch * T * H;
        const fwdBytes = (G + 1) * batch * T * H * D * e;
        const savedBytes = (S + G) * batch * T * H * D * 4;
        const bothBytes = fwdBytes + 2 * savedBytes + (1 + G) * batch * T * H * D * e + 2 * G * H * D * D * e;
        let peer = { fwd: null, 'fwd+bwd': null };
        let cudnn = { fwd: undefined, 'fwd+bwd': undefined };
        let ort = { fwd: undefined, 'fwd+bwd': undefined };
        if (device === 'cpu' && withPeers && PEER_CELLS.includes(cell)) {
          peer = { fwd: jsPeer(rk, cell, data, { batch, T, H, D }, size), 'fwd+bwd': null };
          // ORT has no block-diagonal heads: compared at one head only.
          ort = { fwd: H === 1 ? await ortPeer(rk, cell, { batch, T, D }) : null, 'fwd+bwd': null };
        } else if (peerTimes && PEER_CELLS.includes(cell)) {
          peer = {
            fwd: peerTimes[`${size}/${cell}/${dtype}/fwd`] ?? null,
            'fwd+bwd': peerTimes[`${size}/${cell}/${dtype}/fwd+bwd`] ?? null,
          };
          // cuDNN's time includes its input matmul (torch.nn.LSTM / GRU at hidden H * D).
          cudnn = {
            fwd: peerTimes[`${size}/${cell}/${dtype}/cudnn`] ?? null,
            'fwd+bwd': peerTimes[`${size}/${cell}/${dtype}/cudnn/fwd+bwd`] ?? null,
          };
        }
        const row = (pass, ms, bytes, fl, p, c, o) => ({
          size,
          tag: cell,
          dtype,
          pass,
          ms,
          gbs: bytes / (ms * 1e6),
          extra: {
            'GFLOP/s': (fl / (ms * 1e6)).toFixed(1),
            ...(matmul ? { '% of matmul': `${((100 * fl) / (ms * 1e6 * matmul)).toFixed(0)}%` } : {}),
            'us per step': ((1000 * ms) / T).toFixed(2),
            'ms per gate': (ms / G).toFixed(3),
          },
          bytes,
          flops: fl,
          peers: {
            ...(withPeers ? { [peerName]: p } : {}),
            ...(c !== undefined ? { 'cuDNN (incl. input matmul)': c } : {}),
            ...(o !== undefined ? { [ORT_PEER]: o } : {}),
          },
        });
        rows.push(
          row('fwd', fwd, fwdBytes, flops, peer.fwd, cudnn.fwd, ort.fwd),
          row('fwd+bwd', both, bothBytes, 3 * flops, peer['fwd+bwd'], cudnn['fwd+bwd'], ort['fwd+bwd']),
        );
        addPoint(`${cell} fwd`, D, fwd);
        addPoint(`${cell} fwd+bwd`, D, both);
        if (cudnn.fwd != null) addPoint(`cuDNN ${cell} fwd`, D, cudnn.fwd);
        disposeAll(inputs);
        gh.dispose();
      }
    }
    if (chart) {
      const Ts = [...new Set(sizes.map((s) => s[1]))];
      writeFileSync(
        chart,
        lineChart(
          [...chartSeries].map(([name, points]) => ({ name, points })),
          {
            title: `fused cells, ${dtype}, ${device}, batch ${[...new Set(sizes.map((s) => s[0]))].join('/')}, T ${Ts.join('/')}: time against head size`,
            xLabel: 'headDim (heads = hidden / headDim)',
            yLabel: 'ms',
            logX: true,
            logY: true,
          },
        ),
      );
      console.log(`wrote ${chart}`);
    }
    return rows;
  },
};
