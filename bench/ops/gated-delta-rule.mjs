// Benchmark of the gated delta rule (Gated DeltaNet), forward, forward + backward and the decode step,
// in the configuration of a Gated DeltaNet layer: H = HV, K = V, q and k L2-normalised in the kernel,
// g log-sigmoid-like in [-5, 0), beta in (0, 1), no initial or final state. Peers: a plain JavaScript
// loop on CPU, plain PyTorch on CUDA (bench/peers/gated_delta_rule.py, when python3 with torch is
// present).
//
// Sizes are batch x T x H [x K] (K = V; default 128 on CUDA, 64 on CPU). A size with T = 1 is a decode
// row: one token through rk.gatedDeltaRuleStep, the float32 state (batch, H, K, V) updated in place.
//
// Bytes counted, per pass (every byte that must move at least once):
//   infer:    (CPU) the forward as a plain call with no tape recording: reads q, k, v, g, beta;
//             writes o (no checkpoints are kept). The ONNX Runtime peer is timed against this row.
//   fwd:      (the forward hook, rk.ops.gatedDeltaRule.forward) reads q, k, v, g, beta; writes o and what the op keeps for backward (the state checkpoints; on the CPU also each token's delta-rule correction)
//             (ctx.states).
//   fwd+bwd:  the forward's bytes plus the backward's: reads q, k, v, g, beta, grad o and the
//             checkpoints; writes grad q, k, v, g, beta.
//   decode:   reads and writes the float32 state once, reads the token's q, k, v, g, beta and writes
//             its o.
// The floor is those bytes at the copy bandwidth measured in the same run.
// TFLOP/s counts 4 * K * V flops per token per value head for the forward recurrence (the state
// update); fwd+bwd counts three times that (the backward as twice the forward), decode the forward's.
// On CPU "% of matmul" is that rate over ONNX Runtime's fp32 MatMul rate on this machine (the CLI's
// header), and "x fwd" the fwd+bwd time over the forward's.
//
// ONNX Runtime peer on CPU (bench/peers/ort.mjs): com.microsoft.LinearAttention with update_rule
// gated_delta, the same recurrence per token (S = exp(g) S + k (beta (v - exp(g) S^T k))^T,
// o = scale S^T q), for the inference forward and, with a past_state, the decode step. It has no L2 norm
// inside, so it gets q and k already normalised (ours normalises in the kernel), and it always writes
// its final state (ours here does not). com.microsoft.GatedDeltaNet is timed too where ORT has a CPU
// kernel for it (onnxruntime-node 1.31 has not: CUDA and WebGPU only).
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';
import { ortGatedDeltaNet, ortLinearAttention, ortMedianMs as ortTime, ortStatus } from '../peers/ort.mjs';

const SIZES = {
  cuda: [
    [4, 4096, 16, 128],
    [8, 2048, 32, 128],
    [1, 32768, 16, 128],
    [32, 1, 16, 128],
  ],
  cpu: [
    [2, 1024, 8, 64],
    [1, 4096, 16, 128],
    [8, 1, 8, 64],
  ],
};
const QUICK = {
  cuda: [
    [2, 1024, 8, 128],
    [32, 1, 16, 128],
  ],
  cpu: [
    [1, 128, 4, 64],
    [8, 1, 8, 64],
  ],
};
const DEFAULT_K = { cuda: 128, cpu: 64 };
// Above this many state-element updates (batch * T * HV * K * V) the JS peer runs on fewer tokens
// and its time is scaled up in proportion (it is linear in T).
const PEER_MAX_WORK = 1 << 25;
const L2NORM_EPS = 1e-6;

function uniform(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

/** The host data of one problem, as float32, in the op's layouts. */
function makeData(batch, T, H, K) {
  const HV = H,
    V = K;
  const nqk = batch * T * H * K,
    nv = batch * T * HV * V,
    nh = batch * T * HV;
  const g = new Float32Array(nh);
  for (let i = 0; i < nh; i++) g[i] = -Math.log1p(Math.exp(-(-4.9 + 10.9 * Math.random()))); // logsigmoid, in (-4.91, -0.0025)
  const beta = new Float32Array(nh);
  for (let i = 0; i < nh; i++) beta[i] = 1 / (1 + Math.exp(-(-4 + 8 * Math.random())));
  return {
    q: uniform(nqk, -1, 1),
    k: uniform(nqk, -1, 1),
    v: uniform(nv, -1, 1),
    g,
    beta,
    go: uniform(nv, -1, 1),
  };
}

function l2normRows(x, rows, K) {
  const out = new Float32Array(x.length),
    inv = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    for (let i = 0; i < K; i++) s += x[r * K + i] * x[r * K + i];
    const f = 1 / Math.sqrt(s + L2NORM_EPS);
    inv[r] = f;
    for (let i = 0; i < K; i++) out[r * K + i] = x[r * K + i] * f;
  }
  return { out, inv };
}

// The peer on CPU: the per-token recurrence a JS user would write, float32 storage and state.
// With `states` (a buffer of (T + 1) * K * V), the state before every token of the current head is
// kept there for the backward, which then runs head by head.
function jsForward(p, dims, states = null, backward = null) {
  const { batch, T, H, HV, K, V, scale } = dims;
  const qn = l2normRows(p.q, batch * T * H, K),
    kn = l2normRows(p.k, batch * T * H, K);
  const o = new Float32Array(batch * T * HV * V);
  const S0 = new Float32Array(K * V),
    u = new Float32Array(V);
  const group = HV / H;
  for (let b = 0; b < batch; b++) {
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / group);
      let S = S0;
      if (states) states.fill(0, 0, K * V);
      else S.fill(0);
      for (let t = 0; t < T; t++) {
        if (states) {
          S = states.subarray((t + 1) * K * V, (t + 2) * K * V);
          S.set(states.subarray(t * K * V, (t + 1) * K * V));
        }
        const qo = ((b * T + t) * H + h) * K,
          vo = ((b * T + t) * HV + hv) * V,
          gi = (b * T + t) * HV + hv;
        const a = Math.exp(p.g[gi]),
          bt = p.beta[gi];
        u.fill(0);
        for (let i = 0; i < K; i++) {
          const ki = kn.out[qo + i];
          for (let j = 0; j < V; j++) u[j] += ki * S[i * V + j];
        }
        for (let j = 0; j < V; j++) u[j] = bt * (p.v[vo + j] - a * u[j]);
        for (let i = 0; i < K; i++) {
          const ki = kn.out[qo + i],
            qi = scale * qn.out[qo + i];
          for (let j = 0; j < V; j++) {
            const s = a * S[i * V + j] + ki * u[j];
            S[i * V + j] = s;
            o[vo + j] += qi * s;
          }
        }
      }
      if (backward) backward(b, hv, h, qn.out, kn.out);
    }
  }
  return { o, qn, kn };
}

// Forward keeping every state, then the reverse pass through the same recurrence, head by head;
// grads of the normalised q, k are accumulated over the value heads that share them and taken back
// through the L2 norm at the end.
function jsForwardBackward(p, dims, states) {
  const { batch, T, H, HV, K, V, scale } = dims;
  const dqn = new Float32Array(batch * T * H * K),
    dkn = new Float32Array(batch * T * H * K);
  const grads = {
    v: new Float32Array(batch * T * HV * V),
    g: new Float32Array(batch * T * HV),
    beta: new Float32Array(batch * T * HV),
  };
  const D = new Float32Array(K * V),
    u = new Float32Array(V),
    dk = new Float32Array(V),
    w = new Float32Array(V);
  const backward = (b, hv, h, qn, kn) => {
    D.fill(0);
    for (let t = T - 1; t >= 0; t--) {
      const P = states.subarray(t * K * V, (t + 1) * K * V),
        Sn = states.subarray((t + 1) * K * V, (t + 2) * K * V);
      const qo = ((b * T + t) * H + h) * K,
        vo = ((b * T + t) * HV + hv) * V,
        gi = (b * T + t) * HV + hv;
      const a = Math.exp(p.g[gi]),
        bt = p.beta[gi];
      u.fill(0);
      dk.fill(0);
      let dP = 0;
      for (let i = 0; i < K; i++) {
        const qi = scale * qn[qo + i],
          ki = kn[qo + i];
        let dq = 0;
        for (let j = 0; j < V; j++) {
          const gj = p.go[vo + j];
          const d = D[i * V + j] + qi * gj;
          D[i * V + j] = d;
          dq += Sn[i * V + j] * gj;
          u[j] += ki * P[i * V + j];
          dk[j] += ki * d;
          dP += d * P[i * V + j];
        }
        dqn[qo + i] += scale * dq;
      }
      let dbeta = 0,
        duk = 0;
      for (let j = 0; j < V; j++) {
        const vj = p.v[vo + j];
        grads.v[vo + j] = bt * dk[j];
        dbeta += dk[j] * (vj - a * u[j]);
        duk += dk[j] * u[j];
        w[j] = bt * (vj - a * u[j]);
      }
      grads.beta[gi] = dbeta;
      grads.g[gi] = a * (dP - bt * duk);
      for (let i = 0; i < K; i++) {
        const ki = kn[qo + i];
        let acc = 0;
        for (let j = 0; j < V; j++) {
          acc += D[i * V + j] * w[j] - a * bt * P[i * V + j] * dk[j];
          D[i * V + j] = a * (D[i * V + j] - bt * ki * dk[j]);
        }
        dkn[qo + i] += acc;
      }
    }
  };
  const { o, qn, kn } = jsForward(p, dims, states, backward);
  const l2back = (n, dn) => {
    const dx = new Float32Array(dn.length);
    for (let r = 0; r < n.inv.length; r++) {
      let dot = 0;
      for (let i = 0; i < K; i++) dot += n.out[r * K + i] * dn[r * K + i];
      for (let i = 0; i < K; i++) dx[r * K + i] = (dn[r * K + i] - n.out[r * K + i] * dot) * n.inv[r];
    }
    return dx;
  };
  return { o, q: l2back(qn, dqn), k: l2back(kn, dkn), ...grads };
}

// The decode step on CPU: one token, the state (batch, HV, K, V) updated in place.
function jsDecode(p, state, dims) {
  const { batch, H, HV, K, V, scale } = dims;
  const qn = l2normRows(p.q, batch * H, K).out,
    kn = l2normRows(p.k, batch * H, K).out;
  const o = new Float32Array(batch * HV * V),
    u = new Float32Array(V);
  const group = HV / H;
  for (let b = 0; b < batch; b++) {
    for (let hv = 0; hv < HV; hv++) {
      const h = Math.floor(hv / group);
      const S = state.subarray((b * HV + hv) * K * V, (b * HV + hv + 1) * K * V);
      const qo = (b * H + h) * K,
        vo = (b * HV + hv) * V,
        gi = b * HV + hv;
      const a = Math.exp(p.g[gi]),
        bt = p.beta[gi];
      u.fill(0);
      for (let i = 0; i < K; i++) for (let j = 0; j < V; j++) u[j] += kn[qo + i] * S[i * V + j];
      for (let j = 0; j < V; j++) u[j] = bt * (p.v[vo + j] - a * u[j]);
      for (let i = 0; i < K; i++) {
        const ki = kn[qo + i],
          qi = scale * qn[qo + i];
        for (let j = 0; j < V; j++) {
          const s = a * S[i * V + j] + ki * u[j];
          S[i * V + j] = s;
          o[vo + j] += qi * s;
        }
      }
    }
  }
  return o;
}

/** Times the JS peer, on fewer tokens (scaled up) when the full size would take too long. */
function jsPeer(rk, data, dims, size) {
  const { batch, T, H, HV, K, V } = dims;
  const work = batch * T * HV * K * V;
  const Trun = work > PEER_MAX_WORK ? Math.max(1, Math.floor((T * PEER_MAX_WORK) / work)) : T;
  let p = data;
  if (Trun < T) {
    const cut = (x, inner) => {
      const out = new Float32Array(batch * Trun * inner);
      for (let b = 0; b < batch; b++) out.set(x.subarray(b * T * inner, (b * T + Trun) * inner), b * Trun * inner);
      return out;
    };
    p = {
      q: cut(data.q, H * K),
      k: cut(data.k, H * K),
      v: cut(data.v, HV * V),
      g: cut(data.g, HV),
      beta: cut(data.beta, HV),
      go: cut(data.go, HV * V),
    };
    console.log(`JS loop peer at ${size}: timed on ${Trun} of ${T} tokens, time scaled by ${(T / Trun).toFixed(2)}`);
  }
  const scale = T / Trun;
  const d = { ...dims, T: Trun };
  const states = new Float32Array((Trun + 1) * K * V);
  // Three warm-up runs: V8 needs about that many before these loops are fully optimised.
  const fwd = timeIt(rk, 'cpu', () => jsForward(p, d), { warmup: 3, iters: 5 });
  const both = timeIt(rk, 'cpu', () => jsForwardBackward(p, d, states), { warmup: 3, iters: 5 });
  return { fwd: fwd * scale, 'fwd+bwd': both * scale };
}

const count = (x) =>
  x >= 1e9 ? `${(x / 1e9).toFixed(2)} G` : x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : `${(x / 1e3).toFixed(1)} k`;

function disposeAll(obj) {
  for (const t of Object.values(obj ?? {})) if (t && typeof t.dispose === 'function') t.dispose();
}

const ORT_LA = 'ORT LinearAttention';
const ORT_GDN = 'ORT GatedDeltaNet';

export default {
  sizeLabel: 'BxTxHxK',
  sizeHelp: 'batch x T x H [x K] (BxTxH[xK]; HV = H, V = K; T = 1 is a decode row)',
  sizeDims: [3, 4],
  async run(
    rk,
    { device, quick, ceiling, ceilings, sizes: userSizes, dtype: userDtype, peers: withPeers = true, progress },
  ) {
    if (!rk.gatedDeltaRule || !rk.gatedDeltaRuleStep || !rk.ops?.gatedDeltaRule)
      throw new Error('bench: this build has no gatedDeltaRule op');
    if (typeof rk.internals?.native?.().gatedDeltaRuleForward !== 'function')
      throw new Error('bench: the native addon has no gated delta rule kernels (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)[device]).map((s) => {
      if (s.length !== 3 && s.length !== 4)
        throw new Error(`bench: gated-delta-rule sizes are batch x T x H [x K], got ${s.join('x')}`);
      return s.length === 4 ? s : [...s, DEFAULT_K[device]];
    });
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const peerTimes =
      device === 'cuda' && withPeers ? runPythonPeer('gated_delta_rule.py', { sizes, dtypes: [dtype] }) : null;
    const peerName = device === 'cpu' ? 'JS loop' : 'PyTorch';
    // The device's matmul TFLOP/s: bf16 measured by the PyTorch peer on CUDA, fp32 by ORT on CPU (the header).
    const matmulRate =
      device === 'cpu'
        ? ceilings?.gflops != null
          ? ceilings.gflops / 1000
          : null
        : (peerTimes?.['matmul/bfloat16'] ?? null);
    console.log(
      "TFLOP/s: 4*K*V flops per token per value head (the forward recurrence); fwd+bwd counts 3x that, decode the forward's",
    );
    if (matmulRate && device === 'cuda')
      console.log(
        `bf16 matmul rate of this device (torch.matmul 8192^3): ${matmulRate.toFixed(0)} TFLOP/s ("% of matmul" below)`,
      );
    const ortPeers = device === 'cpu' && withPeers;
    if (ortPeers && !ortStatus().ok) console.log(`${ORT_LA}: ORT not installed (${ortStatus().reason})`);
    let gdnReason = null; // why ORT's GatedDeltaNet is not timed, printed once
    const rows = [];
    let step = 0;
    for (const [batch, T, H, K] of sizes) {
      progress?.(++step, sizes.length, `${batch}x${T}x${H}x${K}${T === 1 ? ' decode' : ''}`);
      const HV = H,
        V = K;
      const size = `${batch}x${T}x${H}x${K}`;
      const dims = { batch, T, H, HV, K, V, scale: 1 / Math.sqrt(K) };
      const data = makeData(batch, T, H, K);
      const opts = { dtype, device };
      const inputs = {
        q: rk.Tensor.from(data.q, [batch, T, H, K], opts),
        k: rk.Tensor.from(data.k, [batch, T, H, K], opts),
        v: rk.Tensor.from(data.v, [batch, T, HV, V], opts),
        g: rk.Tensor.from(data.g, [batch, T, HV], { device }),
        beta: rk.Tensor.from(data.beta, [batch, T, HV], opts),
      };
      const e = rk.dtypeBytes(dtype);
      const nqk = batch * T * H * K,
        nv = batch * T * HV * V,
        nh = batch * T * HV;
      const inBytes = 2 * nqk * e + nv * e + nh * 4 + nh * e; // q, k, v, g, beta
      const flopsFwd = 4 * K * V * batch * T * HV;
      const row = (pass, ms, bytes, flops, peer, fla, ort = {}) => ({
        size,
        dtype,
        pass,
        ms,
        gbs: bytes / (ms * 1e6),
        extra: {
          'floor (copy)': `${(bytes / (ceiling * 1e6)).toFixed(3)} ms`,
          'TFLOP/s': (flops / (ms * 1e9)).toPrecision(3),
          ...(matmulRate ? { '% of matmul': `${((100 * flops) / (ms * 1e9 * matmulRate)).toFixed(1)}%` } : {}),
        },
        bytes,
        flops,
        peers: {
          ...(withPeers ? { [peerName]: peer } : {}),
          ...(fla !== undefined ? { 'fla (Triton)': fla } : {}),
          ...ort,
        },
      });
      /** ORT's LinearAttention (and GatedDeltaNet where it has a CPU kernel) at this size: { column: ms or a note }. */
      const ortRow = async (initialState) => {
        if (!ortPeers) return {};
        if (!ortStatus().ok) return { [ORT_LA]: 'ORT not installed' };
        const threads = rk.cpu.info().threads;
        const out = {
          [ORT_LA]: await ortTime(await ortLinearAttention({ batch, T, H, HV, K, V, threads, initialState })),
        };
        if (!initialState) {
          const gdn = await ortGatedDeltaNet({ batch, T, H, HV, K, V, threads });
          if (gdn.session) out[ORT_GDN] = await ortTime(gdn.session);
          else if (gdnReason === null) {
            gdnReason = gdn.reason;
            console.log(`${ORT_GDN}: not timed (${gdn.reason})`);
          }
        }
        return out;
      };

      if (T === 1) {
        const state0 = uniform(batch * HV * K * V, -0.1, 0.1);
        const state = rk.Tensor.from(Float32Array.from(state0), [batch, HV, K, V], { device });
        const options = { useQkL2normInKernel: true };
        const iters = device === 'cuda' ? 100 : 50;
        const ms = timeIt(rk, device, () => rk.gatedDeltaRuleStep({ state, ...inputs }, options), {
          warmup: 5,
          iters,
          after: disposeAll,
        });
        const stateBytes = 2 * batch * HV * K * V * 4;
        const bytes = stateBytes + inBytes + nv * e; // the state read and written; the token's inputs and o
        let peer = null;
        if (device === 'cpu' && withPeers) {
          const s = Float32Array.from(state0);
          peer = timeIt(rk, 'cpu', () => jsDecode(data, s, dims), { warmup: 5, iters: 20 });
        } else if (peerTimes) peer = peerTimes[`${size}/${dtype}/decode`] ?? null;
        // ORT: one token from a past_state, writing a present_state (ours updates the state in place).
        rows.push(row('decode', ms, bytes, flopsFwd, peer, undefined, await ortRow(true)));
        console.log(`${size}: decode, state ${count(stateBytes / 2)}B read and written in place`);
        state.dispose();
        disposeAll(inputs);
        continue;
      }

      const go = rk.Tensor.from(data.go, [batch, T, HV, V], opts);
      const options = { useQkL2normInKernel: true };
      const iters = device === 'cuda' ? 20 : 5;
      // Inference (no tape records): what ORT's inference kernels are compared with. The CPU kernels
      // then save no state checkpoints; on CUDA this is the forward pass below.
      const infer =
        device === 'cpu'
          ? timeIt(rk, device, () => rk.gatedDeltaRule(inputs, options), { iters, after: disposeAll })
          : null;
      const fwd = timeIt(rk, device, () => rk.ops.gatedDeltaRule.forward(inputs, options), {
        iters,
        after: ({ outputs, ctx }) => {
          disposeAll(outputs);
          ctx.states?.dispose?.();
        },
      });
      const both = timeIt(
        rk,
        device,
        () => {
          const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, options);
          const grads = rk.ops.gatedDeltaRule.backward(ctx, { o: go });
          return { outputs, ctx, grads };
        },
        {
          iters,
          after: ({ outputs, ctx, grads }) => {
            disposeAll(outputs);
            ctx.states?.dispose?.();
            disposeAll(grads);
          },
        },
      );
      const { outputs, ctx } = rk.ops.gatedDeltaRule.forward(inputs, options);
      const stateBytes = ctx.states instanceof rk.Tensor ? ctx.states.size * 4 : 0;
      const fwdBytes = inBytes + nv * e + stateBytes; // inputs; o; checkpoints
      const bwdBytes = 2 * inBytes + nv * e + stateBytes; // inputs, grad o, checkpoints; their grads
      disposeAll(outputs);
      ctx.states?.dispose?.();

      let peer = { fwd: null, 'fwd+bwd': null };
      if (device === 'cpu' && withPeers) peer = jsPeer(rk, data, dims, size);
      else if (peerTimes)
        peer = {
          fwd: peerTimes[`${size}/${dtype}/fwd`] ?? null,
          'fwd+bwd': peerTimes[`${size}/${dtype}/fwd+bwd`] ?? null,
        };

      const flaTime = (pass) =>
        peerTimes && `${size}/${dtype}/fla/fwd` in peerTimes ? peerTimes[`${size}/${dtype}/fla/${pass}`] : undefined;
      const bothRow = row('fwd+bwd', both, fwdBytes + bwdBytes, 3 * flopsFwd, peer['fwd+bwd'], flaTime('fwd+bwd'));
      bothRow.extra['x fwd'] = `${(both / fwd).toFixed(2)}x`;
      if (infer !== null)
        rows.push(row('infer', infer, inBytes + nv * e, flopsFwd, null, undefined, await ortRow(false)));
      rows.push(
        row('fwd', fwd, fwdBytes, flopsFwd, peer.fwd, flaTime('fwd'), infer === null ? await ortRow(false) : {}),
        bothRow,
      );
      console.log(
        `${size}: kept for backward ${count(stateBytes)}B (state checkpoints${device === 'cpu' ? ', per-token corrections' : ''}; counted in the bytes of both passes)`,
      );
      disposeAll(inputs);
      go.dispose();
    }
    return rows;
  },
};
