// Benchmark of the Mamba-2 scan (rk.mamba2Scan), forward and forward + backward, with the inputs of a
// Mamba-2 layer: dt through softplus with a bias, A < 0, D per head, the z gate, no initial or final
// state (the tag column says whether z and D are used: 'full'; or the bare scan: 'scan').
//
// Sizes are batch x seqlen x nheads x headdim x dstate [x ngroups] (default ngroups 1); seqlen 1 is a
// decode row (rk.mamba2StateUpdate: one token, the state updated in place; ORT's LinearAttention from a
// past_state).
// Passes: infer (the op with no tape recording; ONNX Runtime's com.microsoft.LinearAttention with
// update_rule 'gated' on the equivalent problem -- q = C, k = B, v = dt x, decay dt A, scale 1 -- is
// timed against it, in the same process and thread count; ORT then does no softplus, D or gate, so
// the 'scan' rows are the like-for-like comparison), fwd (the forward hook, keeping what the backward
// needs), fwd+bwd ("x fwd": its time over the forward's).
// On CUDA the peers are mamba_ssm's mamba_chunk_scan_combined (Triton) when importable and the chunked
// SSD form in plain PyTorch (bench/peers/mamba2_scan.py), timed against fwd and fwd+bwd.
// TFLOP/s counts 4 * headdim * dstate flops per token and head (the state update and the output).
import { disposeAll, timeForwardBackward, timeIt, uniformArray as uniform } from '../timing.mjs';
import { ortLinearAttention, ortMedianMs as ortTime, ortStatus } from '../peers/ort.mjs';
import { runPythonPeer } from '../peers/run.mjs';

const SIZES = {
  cpu: [
    [2, 2048, 16, 64, 64, 1],
    [4, 512, 8, 64, 128, 1],
    [8, 1, 16, 64, 128, 1],
  ],
  cuda: [
    [2, 2048, 16, 64, 64, 1],
    [4, 4096, 32, 64, 128, 8],
    [32, 1, 32, 64, 128, 8],
  ],
};
const QUICK = { cpu: [[1, 128, 4, 16, 16, 1]], cuda: [[2, 1024, 8, 64, 64, 1]] };
const ORT_LA = "ORT LinearAttention 'gated'";

export default {
  sizeLabel: 'BxTxHxPxN',
  sizeHelp: 'batch x seqlen x nheads x headdim x dstate [x ngroups] (BxTxHxPxN[xG]; ngroups 1 by default)',
  sizeDims: [5, 6],
  tagLabel: 'inputs',
  async run(rk, { device, quick, ceilings, sizes: userSizes, dtype: userDtype, peers = true, progress }) {
    if (!rk.mamba2Scan || typeof rk.internals?.native?.().mamba2Prepare !== 'function')
      throw new Error('bench: this build has no mamba2Scan op (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)[device]).map((s) => {
      if (s.length !== 5 && s.length !== 6)
        throw new Error(
          `bench: mamba2 sizes are batch x seqlen x nheads x headdim x dstate [x ngroups], got ${s.join('x')}`,
        );
      return s.length === 6 ? s : [...s, 1];
    });
    const dtype = userDtype ?? (device === 'cuda' ? 'bfloat16' : 'float32');
    const ortPeers = device === 'cpu' && peers;
    const pyTimes = device === 'cuda' && peers ? runPythonPeer('mamba2_scan.py', { sizes, dtypes: [dtype] }) : null;
    const pyPeers = (size, tag, pass) =>
      Object.fromEntries(
        [
          ['mamba_ssm', 'mamba_ssm'],
          ['torch', 'PyTorch'],
        ]
          .map(([impl, label]) => [label, pyTimes?.[`${size}/${dtype}/${tag}/${impl}/${pass}`]])
          .filter(([, ms]) => ms != null),
      );
    if (ortPeers && !ortStatus().ok) console.log(`${ORT_LA}: ORT not installed (${ortStatus().reason})`);
    const matmulRate = device === 'cpu' && ceilings?.gflops != null ? ceilings.gflops / 1000 : null;
    console.log('TFLOP/s: 4*headdim*dstate flops per token and head (the forward recurrence); fwd+bwd counts 3x that');
    const rows = [];
    let step = 0;
    const tags = ['scan', 'full'];
    for (const [batch, T, H, P, N, G] of sizes) {
      const size = `${batch}x${T}x${H}x${P}x${N}${G > 1 ? `x${G}` : ''}`;
      const opts = { dtype, device };
      const dtRaw = uniform(batch * T * H, -4, 0);
      const A = Float32Array.from(uniform(H, 1, 16), (a) => -a);
      const data = {
        x: uniform(batch * T * H * P, -1, 1),
        B: uniform(batch * T * G * N, -1, 1),
        C: uniform(batch * T * G * N, -1, 1),
        z: uniform(batch * T * H * P, -2, 2),
      };
      for (const tag of tags) {
        progress?.(++step, sizes.length * tags.length, `${size} ${tag}`);
        const full = tag === 'full';
        const inputs = {
          x: rk.Tensor.from(data.x, [batch, T, H, P], opts),
          // 'scan': dt is the effective time step itself (softplus of the raw values), as ORT gets it.
          dt: rk.Tensor.from(
            full ? dtRaw : Float32Array.from(dtRaw, (d) => Math.log1p(Math.exp(d))),
            [batch, T, H],
            opts,
          ),
          A: rk.Tensor.from(A, [H], { device }),
          B: rk.Tensor.from(data.B, [batch, T, G, N], opts),
          C: rk.Tensor.from(data.C, [batch, T, G, N], opts),
          D: full ? rk.Tensor.from(uniform(H, 0.5, 1.5), [H], { device }) : null,
          z: full ? rk.Tensor.from(data.z, [batch, T, H, P], opts) : null,
          dtBias: full ? rk.Tensor.from(uniform(H, -1, 1), [H], { device }) : null,
        };
        const options = { dtSoftplus: full };
        const flops = 4 * P * N * batch * T * H;
        const row = (pass, ms, fl, peer = {}) => ({
          size,
          tag,
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
        if (T === 1) {
          // The decode step: one token, the state (batch, H, P, N) updated in place; ORT's
          // LinearAttention from a past_state, writing a present_state.
          const state = rk.Tensor.from(uniform(batch * H * P * N, -0.1, 0.1), [batch, H, P, N], { device });
          const one = {
            ...inputs,
            x: inputs.x.reshape([batch, H, P]),
            dt: inputs.dt.reshape([batch, H]),
            B: inputs.B.reshape([batch, G, N]),
            C: inputs.C.reshape([batch, G, N]),
            z: inputs.z ? inputs.z.reshape([batch, H, P]) : null,
          };
          const ms = timeIt(rk, device, () => rk.mamba2StateUpdate({ state, ...one }, options), {
            warmup: 5,
            iters: device === 'cuda' ? 100 : 50,
            after: disposeAll,
          });
          let ort = {};
          if (ortPeers && ortStatus().ok) {
            const threads = rk.cpu.info().threads;
            const session = await ortLinearAttention({
              batch,
              T,
              H: G,
              HV: H,
              Hk: G,
              K: N,
              V: P,
              scale: 1,
              threads,
              rule: 'gated',
              initialState: true,
            });
            ort = { [ORT_LA]: await ortTime(session) };
          }
          rows.push(row('decode', ms, flops, ort));
          state.dispose();
          disposeAll(inputs);
          continue;
        }
        const gy = rk.Tensor.from(uniform(batch * T * H * P, -1, 1), [batch, T, H, P], opts);
        const iters = 5;
        const infer =
          device === 'cpu'
            ? timeIt(rk, device, () => rk.mamba2Scan(inputs, options), { iters, after: disposeAll })
            : null;
        const { fwd, both } = timeForwardBackward(rk, device, rk.ops.mamba2Scan, inputs, options, { y: gy }, { iters });
        let ort = {};
        if (ortPeers && ortStatus().ok) {
          const threads = rk.cpu.info().threads;
          ort = {
            [ORT_LA]: await ortTime(
              await ortLinearAttention({ batch, T, H: G, HV: H, Hk: G, K: N, V: P, scale: 1, threads, rule: 'gated' }),
            ),
          };
        }
        if (infer !== null) rows.push(row('infer', infer, flops, ort));
        const bothRow = row('fwd+bwd', both, 3 * flops, pyPeers(size, tag, 'fwd+bwd'));
        bothRow.extra['x fwd'] = `${(both / fwd).toFixed(2)}x`;
        rows.push(row('fwd', fwd, flops, infer === null ? { ...ort, ...pyPeers(size, tag, 'fwd') } : {}), bothRow);
        disposeAll(inputs);
        gy.dispose();
      }
    }
    return rows;
  },
};
