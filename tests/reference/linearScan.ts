// Float64 oracle of the linear scan: the plain sequential recurrence, and its backward written out
// by hand (reverse-mode through the same loop). Layout [rows, length], row-major.

export interface LinearScanRef {
  h: Float64Array;
  finalState: Float64Array;
}

export function linearScanRef(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  rows: number,
  length: number,
  h0: ArrayLike<number> | null,
  reverse: boolean,
): LinearScanRef {
  const h = new Float64Array(rows * length);
  const finalState = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = h0 ? h0[r] : 0;
    for (let i = 0; i < length; i++) {
      const t = r * length + (reverse ? length - 1 - i : i);
      s = a[t] * s + b[t];
      h[t] = s;
    }
    finalState[r] = s;
  }
  return { h, finalState };
}

export interface LinearScanGradRef {
  ga: Float64Array;
  gb: Float64Array;
  gh0: Float64Array;
}

/** Gradients of L = sum(gh * h) + sum(gFinal * finalState). */
export function linearScanBackwardRef(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  rows: number,
  length: number,
  h0: ArrayLike<number> | null,
  reverse: boolean,
  gh: ArrayLike<number> | null,
  gFinal: ArrayLike<number> | null,
): LinearScanGradRef {
  const { h } = linearScanRef(a, b, rows, length, h0, reverse);
  const ga = new Float64Array(rows * length);
  const gb = new Float64Array(rows * length);
  const gh0 = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let gs = gFinal ? gFinal[r] : 0; // dL/d(state after step i), flowing backwards
    for (let i = length - 1; i >= 0; i--) {
      const t = r * length + (reverse ? length - 1 - i : i);
      gs += gh ? gh[t] : 0;
      const prev = i === 0 ? (h0 ? h0[r] : 0) : h[r * length + (reverse ? length - i : i - 1)];
      gb[t] = gs;
      ga[t] = gs * prev;
      gs *= a[t];
    }
    gh0[r] = gs;
  }
  return { ga, gb, gh0 };
}
