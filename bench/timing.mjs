// Timing helpers shared by the benchmark ops.

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/**
 * Median milliseconds of fn over `iters` runs after `warmup` runs. On CUDA each run is timed with
 * CUDA events; on CPU with the wall clock (the CPU ops are synchronous). `after` runs untimed
 * after each run (to free outputs).
 */
export function timeIt(rk, device, fn, { warmup = 3, iters = 20, after = () => {}, reduce = median } = {}) {
  for (let i = 0; i < warmup; i++) after(fn());
  if (device === 'cuda') rk.cuda.synchronize();
  const times = [];
  for (let i = 0; i < iters; i++) {
    let out;
    if (device === 'cuda') {
      times.push(
        rk.cuda.timeMs(() => {
          out = fn();
        }),
      );
    } else {
      const t0 = performance.now();
      out = fn();
      times.push(performance.now() - t0);
    }
    after(out);
  }
  return reduce(times);
}

/**
 * Measured copy bandwidth of the device in GB/s, counting bytes read plus bytes written: the best
 * of several copies of 256 MB (a ceiling, so the fastest run is the right estimate).
 */
export function bandwidthCeiling(rk, device) {
  const n = 64 * 1024 * 1024; // 256 MB of float32
  const src = rk.Tensor.from(new Float32Array(n).fill(1), [n], { device });
  const ms = timeIt(rk, device, () => src.clone(), {
    warmup: 3,
    iters: device === 'cuda' ? 20 : 10,
    after: (t) => t.dispose(),
    reduce: (xs) => Math.min(...xs),
  });
  src.dispose();
  return (2 * n * 4) / (ms * 1e6);
}

/** n uniform float32 values in [lo, hi) (Math.random: benchmark inputs, not test data). */
export function uniformArray(n, lo, hi) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = lo + (hi - lo) * Math.random();
  return x;
}

/** Disposes every tensor among the values of obj (an op's outputs or gradients). */
export function disposeAll(obj) {
  for (const t of Object.values(obj ?? {})) if (t && typeof t.dispose === 'function') t.dispose();
}

/**
 * Median ms of an op's forward hook (which keeps what the backward needs) and of its forward +
 * backward with the output gradients `grads`; each run's outputs, ctx and gradients are disposed.
 */
export function timeForwardBackward(rk, device, hooks, inputs, options, grads, { iters = 5 } = {}) {
  const fwd = timeIt(rk, device, () => hooks.forward(inputs, options), {
    iters,
    after: ({ outputs, ctx }) => {
      disposeAll(outputs);
      rk.disposeCtx?.(ctx);
    },
  });
  const both = timeIt(
    rk,
    device,
    () => {
      const { outputs, ctx } = hooks.forward(inputs, options);
      return { outputs, ctx, grads: hooks.backward(ctx, grads) };
    },
    {
      iters,
      after: (r) => {
        disposeAll(r.outputs);
        rk.disposeCtx?.(r.ctx);
        disposeAll(r.grads);
      },
    },
  );
  return { fwd, both };
}
