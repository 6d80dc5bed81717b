// Benchmark of linear attention (rk.linearAttention), forward and forward + backward, per update rule
// and decay shape (the tag column): gated_delta with one decay per head (Gated DeltaNet; the gated
// delta rule's blocked kernels), gated_delta with a per-key decay (KDA), gated with a per-key decay
// (GLA) and linear, each at H = Hq = Hk = Hv, K = V, q and k of unit norm, decays log-sigmoid-like,
// beta in (0, 1), no initial or final state.
//
// Sizes are batch x T x H [x K] (K = V; default 64).
// Passes: infer (the op called with no tape recording: no checkpoints kept; ONNX Runtime's
// com.microsoft.LinearAttention with the same rule and decay shape is timed against it, in the same
// process and thread count), fwd (the forward hook, keeping the checkpoints), fwd+bwd ("x fwd": its
// time over the forward's).
// TFLOP/s counts 4 * K * V flops per token and head (the forward's state update and output).
// The per-key and linear rows run this family's kernels on the CPU (blocked), the gated_delta row the
// gated delta rule's; on CUDA (fp16 / bf16) every row runs on the gated delta rule's chunked kernels.
// On CUDA the peers are flash-linear-attention's Triton kernels (bench/peers/linear_attention.py:
// chunk_gated_delta_rule, chunk_kda, chunk_gla, chunk_linear_attn) when importable.
import { disposeAll, timeForwardBackward, timeIt, uniformArray as uniform } from '../timing.mjs';
import { ortLinearAttention, ortMedianMs as ortTime, ortStatus } from '../peers/ort.mjs';
import { runPythonPeer } from '../peers/run.mjs';

const SIZES = {
  cpu: [
    [2, 1024, 8, 64],
    [1, 4096, 16, 128],
  ],
  cuda: [
    [4, 4096, 16, 128],
    [2, 1024, 8, 64],
  ],
};
const QUICK = { cpu: [[1, 128, 4, 64]], cuda: [[2, 1024, 8, 64]] };
const VARIANTS = [
  { tag: 'gated_delta', rule: 'gated_delta', perKey: false },
  { tag: 'gated_delta per-key', rule: 'gated_delta', perKey: true },
  { tag: 'gated per-key', rule: 'gated', perKey: true },
  { tag: 'linear', rule: 'linear', perKey: false },
];
const ORT_LA = 'ORT LinearAttention';

function unitRows(x, K) {
  for (let r = 0; r < x.length / K; r++) {
    let s = 0;
    for (let i = 0; i < K; i++) s += x[r * K + i] ** 2;
    for (let i = 0; i < K; i++) x[r * K + i] /= Math.sqrt(s);
  }
  return x;
}

export default {
  sizeLabel: 'BxTxHxK',
  sizeHelp: 'batch x T x H [x K] (BxTxH[xK]; Hq = Hk = Hv = H, V = K)',
  sizeDims: [3, 4],
  tagLabel: 'rule',
  async run(rk, { device, quick, ceilings, sizes: userSizes, dtype: userDtype, peers = true, progress }) {
    if (!rk.linearAttention || typeof rk.internals?.native?.().linearAttentionForward !== 'function')
      throw new Error('bench: this build has no linearAttention op (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)[device]).map((s) => {
      if (s.length !== 3 && s.length !== 4)
        throw new Error(`bench: linear-attention sizes are batch x T x H [x K], got ${s.join('x')}`);
      return s.length === 4 ? s : [...s, 64];
    });
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const variants = VARIANTS;
    const ortPeers = device === 'cpu' && peers;
    const pyTimes =
      device === 'cuda' && peers ? runPythonPeer('linear_attention.py', { sizes, dtypes: [dtype] }) : null;
    const flaPeer = (size, tag, pass) => {
      const ms = pyTimes?.[`${size}/${dtype}/${tag}/${pass}`];
      return ms != null ? { 'fla (Triton)': ms } : {};
    };
    if (ortPeers && !ortStatus().ok) console.log(`${ORT_LA}: ORT not installed (${ortStatus().reason})`);
    const matmulRate = device === 'cpu' && ceilings?.gflops != null ? ceilings.gflops / 1000 : null;
    console.log('TFLOP/s: 4*K*V flops per token and head (the forward recurrence); fwd+bwd counts 3x that');
    const rows = [];
    let step = 0;
    for (const [batch, T, H, K] of sizes) {
      const V = K,
        size = `${batch}x${T}x${H}x${K}`;
      for (const vr of variants) {
        progress?.(++step, sizes.length * variants.length, `${size} ${vr.tag}`);
        const decays = vr.rule === 'gated' || vr.rule === 'gated_delta';
        const corrects = vr.rule === 'delta' || vr.rule === 'gated_delta';
        const opts = { dtype, device };
        const nqk = batch * T * H * K,
          nh = batch * T * H * (vr.perKey ? K : 1);
        const data = {
          q: unitRows(uniform(nqk, -1, 1), K),
          k: unitRows(uniform(nqk, -1, 1), K),
          v: uniform(batch * T * H * V, -1, 1),
          decay: Float32Array.from(uniform(nh, -4.9, 6), (x) => -Math.log1p(Math.exp(-x))),
          beta: Float32Array.from(uniform(batch * T * H, -4, 4), (x) => 1 / (1 + Math.exp(-x))),
        };
        const inputs = {
          q: rk.Tensor.from(data.q, [batch, T, H, K], opts),
          k: rk.Tensor.from(data.k, [batch, T, H, K], opts),
          v: rk.Tensor.from(data.v, [batch, T, H, V], opts),
          decay: decays ? rk.Tensor.from(data.decay, vr.perKey ? [batch, T, H, K] : [batch, T, H], { device }) : null,
          beta: corrects ? rk.Tensor.from(data.beta, [batch, T, H], opts) : null,
        };
        const options = { updateRule: vr.rule };
        const go = rk.Tensor.from(uniform(batch * T * H * V, -1, 1), [batch, T, H, V], opts);
        const iters = 5;
        const infer =
          device === 'cpu'
            ? timeIt(rk, device, () => rk.linearAttention(inputs, options), { iters, after: disposeAll })
            : null;
        const { fwd, both } = timeForwardBackward(
          rk,
          device,
          rk.ops.linearAttention,
          inputs,
          options,
          { o: go },
          { iters },
        );
        const flops = 4 * K * V * batch * T * H;
        const row = (pass, ms, fl, peer = {}) => ({
          size,
          tag: vr.tag,
          dtype,
          pass,
          ms,
          extra: {
            'TFLOP/s': (fl / (ms * 1e9)).toPrecision(3),
            ...(matmulRate ? { '% of matmul': `${((100 * fl) / (ms * 1e9 * matmulRate)).toFixed(1)}%` } : {}),
          },
          flops: fl,
          peers: peer,
        });
        let ort = {};
        if (ortPeers && ortStatus().ok) {
          const threads = rk.cpu.info().threads;
          ort = {
            [ORT_LA]: await ortTime(
              await ortLinearAttention({ batch, T, H, HV: H, Hk: H, K, V, threads, rule: vr.rule, perKey: vr.perKey }),
            ),
          };
        }
        if (infer !== null) rows.push(row('infer', infer, flops, ort));
        const bothRow = row('fwd+bwd', both, 3 * flops, flaPeer(size, vr.tag, 'fwd+bwd'));
        bothRow.extra['x fwd'] = `${(both / fwd).toFixed(2)}x`;
        rows.push(row('fwd', fwd, flops, infer === null ? { ...ort, ...flaPeer(size, vr.tag, 'fwd') } : {}), bothRow);
        disposeAll(inputs);
        go.dispose();
      }
    }
    return rows;
  },
};
