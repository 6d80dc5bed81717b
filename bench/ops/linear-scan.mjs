// Benchmark of the linear scan, forward and backward, against the plain TypeScript loop (CPU) or
// a plain PyTorch implementation (CUDA, when python3 with torch is present).
import { timeIt } from '../timing.mjs';
import { runPythonPeer } from '../peers/run.mjs';

function random(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

// The peer on CPU: the plain loop a JS user would write (allocating its outputs, like the op).
function tsForward(a, b, rows, L) {
  const h = new Float32Array(rows * L);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const o = r * L;
    for (let t = 0; t < L; t++) {
      s = a[o + t] * s + b[o + t];
      h[o + t] = s;
    }
  }
  return h;
}
function tsBackward(a, h, gh, rows, L) {
  const ga = new Float32Array(rows * L),
    gb = new Float32Array(rows * L);
  for (let r = 0; r < rows; r++) {
    let c = 0;
    const o = r * L;
    for (let t = L - 1; t >= 0; t--) {
      const g = gh[o + t] + c;
      gb[o + t] = g;
      ga[o + t] = t > 0 ? g * h[o + t - 1] : 0;
      c = a[o + t] * g;
    }
  }
  return [ga, gb];
}

export default {
  sizeLabel: 'BxCxL',
  sizeHelp: 'batch x channels x length (BxCxL)',
  sizeDims: [3],
  async run(rk, { device, quick, sizes: userSizes, peers: withPeers = true, progress }) {
    const sizes =
      userSizes ??
      (quick
        ? [
            [2, 256, 1024],
            [1, 64, 8192],
          ]
        : [
            [8, 1536, 4096],
            [1, 1536, 65536],
          ]);
    const dtypes = device === 'cuda' ? ['float32', 'bfloat16'] : ['float32'];
    const rows = [];
    const peerTimes = device === 'cuda' && withPeers ? runPythonPeer('linear_scan.py', { sizes, dtypes }) : null;
    let step = 0;
    for (const [B, C, L] of sizes) {
      progress?.(++step, sizes.length, `${B}x${C}x${L}`);
      const n = B * C * L;
      const shape = [B, C, L];
      const a32 = random(n, 0.5, 0.999),
        b32 = random(n, -1, 1),
        g32 = random(n, -1, 1);
      for (const dtype of dtypes) {
        const a = rk.Tensor.from(a32, shape, { dtype, device });
        const b = rk.Tensor.from(b32, shape, { dtype, device });
        const gh = rk.Tensor.from(g32, shape, { dtype, device });
        const bytes = rk.dtypeBytes(dtype);
        const iters = device === 'cuda' ? 50 : 7;
        const fwd = timeIt(rk, device, () => rk.linearScan({ a, b }).h, { iters, after: (h) => h.dispose() });
        const { outputs, ctx } = rk.ops.linearScan.forward({ a, b });
        const bwd = timeIt(rk, device, () => rk.ops.linearScan.backward(ctx, { h: gh }), {
          iters,
          after: (g) => {
            g.a.dispose();
            g.b.dispose();
          },
        });
        const size = `${B}x${C}x${L}`;
        const peer = (pass) => {
          if (!withPeers) return null;
          if (device === 'cpu') {
            if (pass === 'fwd') return timeIt(rk, 'cpu', () => tsForward(a32, b32, B * C, L), { warmup: 1, iters: 3 });
            const h32 = tsForward(a32, b32, B * C, L);
            return timeIt(rk, 'cpu', () => tsBackward(a32, h32, g32, B * C, L), { warmup: 1, iters: 3 });
          }
          return peerTimes?.[`${size}/${dtype}/${pass}`] ?? null;
        };
        const peerName = device === 'cpu' ? 'TS loop' : 'PyTorch';
        rows.push({
          size,
          dtype,
          pass: 'fwd',
          ms: fwd,
          gbs: (3 * n * bytes) / (fwd * 1e6),
          peers: { [peerName]: peer('fwd') },
        });
        rows.push({
          size,
          dtype,
          pass: 'bwd',
          ms: bwd,
          gbs: (5 * n * bytes) / (bwd * 1e6),
          peers: { [peerName]: peer('bwd') },
        });
        for (const t of [a, b, gh, outputs.h]) t.dispose();
      }
    }
    return rows;
  },
};
