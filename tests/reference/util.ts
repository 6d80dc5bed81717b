// Test utilities: a seeded random source, error norms, and central finite differences in float64.

/** mulberry32: small, fast, seedable. */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A fresh seed per run (printed by tests on failure so a run can be repeated with RK_SEED). */
export function freshSeed(): number {
  return process.env.RK_SEED ? Number(process.env.RK_SEED) : (Date.now() ^ (Math.random() * 2 ** 31)) >>> 0;
}

export function uniform(rand: () => number, n: number, lo: number, hi: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = lo + (hi - lo) * rand();
  return out;
}

export function normal(rand: () => number, n: number, scale = 1): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(rand(), 1e-12),
      v = rand();
    out[i] = scale * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
  return out;
}

/** ||out - ref|| / ||ref|| (NaN anywhere gives Infinity; ref of zero norm compares absolute). */
export function relErr(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (out.length !== ref.length) return Infinity;
  let num = 0,
    den = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = out[i] - ref[i];
    if (!Number.isFinite(out[i])) return Infinity;
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/**
 * A copy of v with every element scaled by 1 + rel or 1 - rel at random: an input perturbation of
 * the size a float32 kernel's own rounding amounts to (rel = 2^-24). How far it moves a float64
 * answer measures the answer's conditioning, e.g. a one-element gradient that is a difference of
 * nearly equal terms.
 */
export function perturbed(rand: () => number, v: Float64Array, rel = 2 ** -24): Float64Array {
  const out = new Float64Array(v.length);
  for (let i = 0; i < v.length; i++) out[i] = v[i] * (rand() < 0.5 ? 1 - rel : 1 + rel);
  return out;
}

/**
 * Central differences of a scalar function of several float64 arrays, at every element. eps may be
 * one step for all arrays or one per array (a large step is exact for an input f is linear in, and
 * keeps rounding noise down).
 */
export function finiteDifferences(
  f: (xs: Float64Array[]) => number,
  xs: Float64Array[],
  eps: number | readonly number[] = 1e-6,
): Float64Array[] {
  return xs.map((x, k) => {
    const h = typeof eps === 'number' ? eps : eps[k];
    const g = new Float64Array(x.length);
    for (let i = 0; i < x.length; i++) {
      const orig = x[i];
      x[i] = orig + h;
      const plus = f(xs);
      x[i] = orig - h;
      const minus = f(xs);
      x[i] = orig;
      g[i] = (plus - minus) / (2 * h);
    }
    return g;
  });
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}
