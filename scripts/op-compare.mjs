// Shared by scripts/gpu-smoke.mjs and scripts/gpu-paths.mjs: one op's forward and backward on one
// device, every output and gradient as float32, and the error between two such runs.
import * as rk from '../dist/index.mjs';

/**
 * Forward, then backward from output gradients made by grad(outputTensor) (Newton's trajectory
 * takes none). Returns { flat: { name: Float32Array } (copies, outputs and 'grad <input>'), ms };
 * the tensors it made are disposed.
 */
export function forwardBackward(hooks, inputs, options, device, grad) {
  const t0 = performance.now();
  const { outputs, ctx } = hooks.forward(inputs, options);
  const grads = {};
  for (const [k, t] of Object.entries(outputs))
    if (t instanceof rk.Tensor && k !== 'trajectory')
      grads[k] = rk.Tensor.from(grad(t), t.shape, { device, dtype: t.dtype });
  const g = hooks.backward(ctx, grads);
  if (device === 'cuda') rk.cuda.synchronize();
  const ms = performance.now() - t0;
  const flat = {};
  for (const [k, t] of [...Object.entries(outputs), ...Object.entries(g).map(([k, t]) => [`grad ${k}`, t])])
    if (t instanceof rk.Tensor) flat[k] = t.toFloat32Array().slice(); // a CPU tensor's array is its storage
  for (const t of [...Object.values(outputs), ...Object.values(grads), ...Object.values(g)])
    if (t instanceof rk.Tensor && !t.disposed) t.dispose();
  return { flat, ms };
}

/** The largest relative error (in norm) of got's arrays against want's; Infinity for a missing or short one. */
export function maxRelError(got, want) {
  let worst = 0;
  for (const [k, w] of Object.entries(want)) {
    const x = got[k];
    if (!x || x.length !== w.length) return Infinity;
    let num = 0,
      den = 0;
    for (let i = 0; i < w.length; i++) {
      num += (x[i] - w[i]) ** 2;
      den += w[i] ** 2;
    }
    worst = Math.max(worst, Number.isFinite(num) ? Math.sqrt(num / Math.max(den, 1e-30)) : Infinity);
  }
  return worst;
}
