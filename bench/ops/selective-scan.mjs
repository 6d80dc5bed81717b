// Benchmark of the selective scan (Mamba-1), forward and backward, in the configuration of a Mamba
// layer: input-dependent B and C (one group), z and D present, softplus on delta. Peers: a plain
// JavaScript loop on CPU, plain PyTorch on CUDA (bench/peers/selective_scan.py, when python3 with
// torch is present).
//
// Bytes counted, per pass (every byte that must move at least once):
//   forward:  reads u, delta, z, B, C (and A, D); writes y and the state checkpoints the op keeps
//             for backward (ctx.states).
//   backward: reads u, delta, z, B, C, grad y and the checkpoints; writes grad u, delta, z, B, C
//             (and grad A, D).
// The floor is those bytes at the copy bandwidth measured in the same run. The exp() count is the
// transcendental work either pass must do at least: exp(dt * A) for every (batch, dim, seqlen, dstate)
// plus one exp for softplus and one for sigmoid(z) per (batch, dim, seqlen).
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';

const SIZES = {
  cuda: [
    [4, 2048, 2048, 16],
    [1, 2048, 16384, 16],
    [8, 5120, 2048, 16],
  ],
  cpu: [
    [1, 256, 2048, 16],
    [2, 512, 1024, 16],
  ],
};
const QUICK = {
  cuda: [[2, 512, 1024, 16]],
  cpu: [[1, 64, 512, 16]],
};
// Above this many state updates (batch * dim * seqlen * dstate) the JS peer runs on fewer channels
// and its time is scaled up in proportion (it is linear in dim).
const PEER_MAX_WORK = 1 << 25;

function uniform(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

/** The host data of one problem, as float32, in the op's layouts (B, C: [batch, 1, dstate, seqlen]). */
function makeData(batch, dim, L, N) {
  const n = batch * dim * L;
  const A = new Float32Array(dim * N);
  for (let d = 0; d < dim; d++) for (let k = 0; k < N; k++) A[d * N + k] = -(k + 1); // Mamba's A init
  return {
    u: uniform(n, -1, 1),
    delta: uniform(n, -6, -2), // softplus gives dt in about [0.0025, 0.13], Mamba's dt range
    z: uniform(n, -2, 2),
    B: uniform(batch * N * L, -1, 1),
    C: uniform(batch * N * L, -1, 1),
    A,
    D: uniform(dim, 0.5, 1.5),
    gy: uniform(n, -1, 1),
  };
}

const softplus = (x) => (x <= 20 ? Math.log1p(Math.exp(x)) : x);
const sigmoid = (x) => 1 / (1 + Math.exp(-x));

// The peer on CPU: the sequential loop a JS user would write, float32 storage, one group of B/C.
function jsForward(p, batch, dim, L, N) {
  const { u, delta, z, A, B, C, D } = p;
  const y = new Float32Array(batch * dim * L);
  const x = new Float32Array(N);
  for (let b = 0; b < batch; b++) {
    for (let d = 0; d < dim; d++) {
      x.fill(0);
      for (let t = 0; t < L; t++) {
        const i = (b * dim + d) * L + t;
        const dt = softplus(delta[i]);
        let acc = D[d] * u[i];
        for (let n = 0; n < N; n++) {
          const bc = (b * N + n) * L + t;
          x[n] = Math.exp(dt * A[d * N + n]) * x[n] + dt * B[bc] * u[i];
          acc += x[n] * C[bc];
        }
        y[i] = acc * z[i] * sigmoid(z[i]);
      }
    }
  }
  return y;
}

function jsBackward(p, batch, dim, L, N) {
  const { u, delta, z, A, B, C, D, gy } = p;
  const g = {
    u: new Float32Array(u.length),
    delta: new Float32Array(u.length),
    z: new Float32Array(u.length),
    A: new Float32Array(dim * N),
    B: new Float32Array(B.length),
    C: new Float32Array(C.length),
    D: new Float32Array(dim),
  };
  const xs = new Float32Array((L + 1) * N); // state before position t at xs[t * N]
  const gx = new Float32Array(N);
  for (let b = 0; b < batch; b++) {
    for (let d = 0; d < dim; d++) {
      xs.fill(0, 0, N);
      for (let t = 0; t < L; t++) {
        const i = (b * dim + d) * L + t;
        const dt = softplus(delta[i]);
        for (let n = 0; n < N; n++) {
          xs[(t + 1) * N + n] = Math.exp(dt * A[d * N + n]) * xs[t * N + n] + dt * B[(b * N + n) * L + t] * u[i];
        }
      }
      gx.fill(0);
      for (let t = L - 1; t >= 0; t--) {
        const i = (b * dim + d) * L + t;
        const dt = softplus(delta[i]);
        let yc = D[d] * u[i];
        for (let n = 0; n < N; n++) yc += xs[(t + 1) * N + n] * C[(b * N + n) * L + t];
        const s = sigmoid(z[i]);
        g.z[i] = gy[i] * yc * s * (1 + z[i] * (1 - s));
        const gyc = gy[i] * z[i] * s;
        g.D[d] += gyc * u[i];
        let du = gyc * D[d],
          gdt = 0;
        for (let n = 0; n < N; n++) {
          const bc = (b * N + n) * L + t;
          const a = A[d * N + n],
            decay = Math.exp(dt * a),
            prev = xs[t * N + n];
          g.C[bc] += gyc * xs[(t + 1) * N + n];
          const gn = gx[n] + gyc * C[bc];
          gdt += gn * (prev * decay * a + B[bc] * u[i]);
          g.A[d * N + n] += gn * prev * decay * dt;
          g.B[bc] += gn * dt * u[i];
          du += gn * dt * B[bc];
          gx[n] = gn * decay;
        }
        g.u[i] = du;
        g.delta[i] = gdt * sigmoid(delta[i]);
      }
    }
  }
  return g;
}

/** Times the JS peer, on fewer channels (scaled up) when the full size would take too long. */
function jsPeer(rk, data, batch, dim, L, N, size) {
  const work = batch * dim * L * N;
  const dimRun = work > PEER_MAX_WORK ? Math.max(1, Math.floor((dim * PEER_MAX_WORK) / work)) : dim;
  let p = data;
  if (dimRun < dim) {
    const cut = (x) => {
      const out = new Float32Array(batch * dimRun * L);
      for (let b = 0; b < batch; b++) out.set(x.subarray(b * dim * L, (b * dim + dimRun) * L), b * dimRun * L);
      return out;
    };
    p = {
      ...data,
      u: cut(data.u),
      delta: cut(data.delta),
      z: cut(data.z),
      gy: cut(data.gy),
      A: data.A.subarray(0, dimRun * N),
      D: data.D.subarray(0, dimRun),
    };
    console.log(
      `JS loop peer at ${size}: timed on ${dimRun} of ${dim} channels, time scaled by ${(dim / dimRun).toFixed(2)}`,
    );
  }
  const scale = dim / dimRun;
  const fwd = timeIt(rk, 'cpu', () => jsForward(p, batch, dimRun, L, N), { warmup: 1, iters: 3 });
  const bwd = timeIt(rk, 'cpu', () => jsBackward(p, batch, dimRun, L, N), { warmup: 1, iters: 3 });
  return { fwd: fwd * scale, bwd: bwd * scale };
}

const count = (x) =>
  x >= 1e9 ? `${(x / 1e9).toFixed(2)} G` : x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : `${(x / 1e3).toFixed(1)} k`;

function disposeAll(obj) {
  for (const t of Object.values(obj)) if (t && typeof t.dispose === 'function') t.dispose();
}

export default {
  sizeLabel: 'BxDxLxN',
  sizeHelp: 'batch x dim x seqlen x dstate (BxDxLxN)',
  sizeDims: [4],
  async run(rk, { device, quick, ceiling, sizes: userSizes, dtype: userDtype, peers: withPeers = true, progress }) {
    if (!rk.selectiveScan || !rk.ops?.selectiveScan) throw new Error('bench: this build has no selectiveScan op');
    const sizes = userSizes ?? (quick ? QUICK : SIZES)[device];
    for (const s of sizes)
      if (s.length !== 4)
        throw new Error(`bench: selective-scan sizes are batch x dim x seqlen x dstate, got ${s.join('x')}`);
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const peerTimes =
      device === 'cuda' && withPeers ? runPythonPeer('selective_scan.py', { sizes, dtypes: [dtype] }) : null;
    const peerName = device === 'cpu' ? 'JS loop' : 'PyTorch';
    const rows = [];
    let step = 0;
    for (const [batch, dim, L, N] of sizes) {
      const size = `${batch}x${dim}x${L}x${N}`;
      progress?.(++step, sizes.length, size);
      const data = makeData(batch, dim, L, N);
      const opts = { dtype, device };
      const shape = [batch, dim, L];
      const inputs = {
        u: rk.Tensor.from(data.u, shape, opts),
        delta: rk.Tensor.from(data.delta, shape, opts),
        z: rk.Tensor.from(data.z, shape, opts),
        B: rk.Tensor.from(data.B, [batch, 1, N, L], opts),
        C: rk.Tensor.from(data.C, [batch, 1, N, L], opts),
        A: rk.Tensor.from(data.A, [dim, N], { device }),
        D: rk.Tensor.from(data.D, [dim], { device }),
      };
      const gy = rk.Tensor.from(data.gy, shape, opts);
      const options = { deltaSoftplus: true };
      const iters = device === 'cuda' ? 20 : 5;

      const fwd = timeIt(rk, device, () => rk.ops.selectiveScan.forward(inputs, options), {
        iters,
        after: ({ outputs, ctx }) => {
          disposeAll(outputs);
          ctx.states?.dispose?.();
        },
      });
      const { outputs, ctx } = rk.ops.selectiveScan.forward(inputs, options);
      const bwd = timeIt(rk, device, () => rk.ops.selectiveScan.backward(ctx, { y: gy }), { iters, after: disposeAll });

      const e = rk.dtypeBytes(dtype);
      const BDL = batch * dim * L,
        BC = batch * N * L;
      const params = (dim * N + dim) * 4;
      const stateBytes = ctx.states instanceof rk.Tensor ? ctx.states.size * 4 : 0;
      const fwdBytes = 4 * BDL * e + 2 * BC * e + params + stateBytes; // u, delta, z, y; B, C; A, D
      const bwdBytes = 7 * BDL * e + 4 * BC * e + 2 * params + stateBytes; // u, delta, z, gy, du, ddelta, dz; B, C, dB, dC
      const exps = BDL * N + 2 * BDL;

      let peer = { fwd: null, bwd: null };
      if (device === 'cpu' && withPeers) peer = jsPeer(rk, data, batch, dim, L, N, size);
      else if (peerTimes)
        peer = { fwd: peerTimes[`${size}/${dtype}/fwd`] ?? null, bwd: peerTimes[`${size}/${dtype}/bwd`] ?? null };

      const row = (pass, ms, bytes) => ({
        size,
        dtype,
        pass,
        ms,
        gbs: bytes / (ms * 1e6),
        extra: {
          'floor (copy)': `${(bytes / (ceiling * 1e6)).toFixed(3)} ms`,
          'exp()': `${count(exps)}, ${(exps / (ms * 1e6)).toFixed(1)} G/s`,
        },
        bytes,
        exps,
        stateBytes,
        peers: { [peerName]: peer[pass] },
      });
      rows.push(row('fwd', fwd, fwdBytes), row('bwd', bwd, bwdBytes));
      console.log(`${size}: state checkpoints ${count(stateBytes)}B (counted in the bytes of both passes)`);
      disposeAll(outputs);
      ctx.states?.dispose?.();
      disposeAll(inputs);
      gy.dispose();
    }
    return rows;
  },
};
