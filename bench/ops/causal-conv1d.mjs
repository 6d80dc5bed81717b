// Benchmark of the causal depthwise convolution with carry state (rk.causalConv1d), forward and
// forward + backward, SiLU, with an initial and a final state (the prefill of a Mamba / Gated DeltaNet
// layer's conv), channels-first and channels-last (the tag column).
//
// Sizes are batch x C x T [x W] (BxCxTxW; default width 4).
// Passes: infer (the op with no tape recording; ONNX Runtime's com.microsoft.CausalConvWithState with
// the same activation, layout and states is timed against it, in the same process and thread count),
// fwd (the forward hook), fwd+bwd ("x fwd": its time over the forward's).
// GB/s counts the bytes each pass must move: x and y (and the states) for the forward; plus grad y,
// x again and grad x for the backward. The floor is those bytes at the copy bandwidth of this run.
import { disposeAll, timeForwardBackward, timeIt, uniformArray as uniform } from '../timing.mjs';
import { ortCausalConv, ortMedianMs as ortTime, ortStatus } from '../peers/ort.mjs';

const SIZES = [
  [2, 4096, 1024, 4],
  [1, 8192, 4096, 4],
];
const QUICK = [[1, 256, 128, 4]];
const ORT_CC = 'ORT CausalConvWithState';

export default {
  sizeLabel: 'BxCxTxW',
  sizeHelp: 'batch x C x T [x W] (BxCxT[xW]; width 4 by default)',
  sizeDims: [3, 4],
  tagLabel: 'layout',
  async run(rk, { device, quick, ceiling, sizes: userSizes, dtype: userDtype, peers = true, progress }) {
    if (!rk.causalConv1d || typeof rk.internals?.native?.().causalConv1dForward !== 'function')
      throw new Error('bench: this build has no causalConv1d op (rebuild it with npm run build:native)');
    const sizes = (userSizes ?? (quick ? QUICK : SIZES)).map((s) => {
      if (s.length !== 3 && s.length !== 4)
        throw new Error(`bench: causal-conv1d sizes are batch x C x T [x W], got ${s.join('x')}`);
      return s.length === 4 ? s : [...s, 4];
    });
    const dtype = userDtype ?? 'float32';
    const withOrt = device === 'cpu' && peers && ortStatus().ok;
    if (device === 'cpu' && peers && !withOrt) console.log(`${ORT_CC}: ORT not installed (${ortStatus().reason})`);
    const rows = [];
    let step = 0;
    for (const [batch, C, T, W] of sizes) {
      for (const last of [false, true]) {
        const tag = last ? 'channels-last' : 'channels-first';
        progress?.(++step, sizes.length * 2, `${batch}x${C}x${T}x${W} ${tag}`);
        const L = W - 1;
        const xShape = last ? [batch, T, C] : [batch, C, T];
        const sShape = last ? [batch, L, C] : [batch, C, L];
        const opts = { dtype, device };
        const inputs = {
          x: rk.Tensor.from(uniform(batch * C * T, -1, 1), xShape, opts),
          weight: rk.Tensor.from(uniform(C * W, -1, 1), [C, W], opts),
          bias: rk.Tensor.from(uniform(C, -1, 1), [C], opts),
        };
        const options = {
          activation: 'silu',
          channelsLast: last,
          initialState: rk.Tensor.from(uniform(batch * C * L, -1, 1), sShape, opts),
          returnFinalState: true,
        };
        const gy = rk.Tensor.from(uniform(batch * C * T, -1, 1), xShape, opts);
        const iters = 10;
        const infer = timeIt(rk, device, () => rk.causalConv1d(inputs, options), { iters, after: disposeAll });
        const { fwd, both } = timeForwardBackward(
          rk,
          device,
          rk.ops.causalConv1d,
          inputs,
          options,
          { y: gy },
          { iters },
        );
        const e = rk.dtypeBytes(dtype);
        const n = batch * C * T;
        const fwdBytes = 2 * n * e;
        const bothBytes = fwdBytes + 3 * n * e;
        const row = (pass, ms, bytes, peer = {}) => ({
          size: `${batch}x${C}x${T}x${W}`,
          tag,
          dtype,
          pass,
          ms,
          gbs: bytes / (ms * 1e6),
          extra: { 'floor (copy)': `${(bytes / (ceiling * 1e6)).toFixed(3)} ms` },
          bytes,
          peers: peer,
        });
        let ort = {};
        if (withOrt) {
          const session = await ortCausalConv({
            batch,
            C,
            T,
            K: W,
            activation: 'silu',
            channelsLast: last,
            bias: true,
            initialState: true,
            threads: rk.cpu.info().threads,
          });
          ort = { [ORT_CC]: await ortTime(session) };
        }
        const bothRow = row('fwd+bwd', both, bothBytes);
        bothRow.extra['x fwd'] = `${(both / fwd).toFixed(2)}x`;
        rows.push(row('infer', infer, fwdBytes, ort), row('fwd', fwd, fwdBytes), bothRow);
        disposeAll(inputs);
        options.initialState.dispose();
        gy.dispose();
      }
    }
    return rows;
  },
};
