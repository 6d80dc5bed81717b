// A minimal SVG line chart for benchmark curves (no dependencies): one line per series over a
// shared x axis, with optional log2 scales. Used by the ops that report curves (`--chart FILE`).

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#17becf', '#7f7f7f'];

function escapeXml(s) {
  return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * series: [{ name, points: [[x, y], ...] }]; options: { title, xLabel, yLabel, logX, logY,
 * reference (a y value drawn as a dashed line, e.g. 1 for a speed-up) }. Returns the SVG text.
 */
export function lineChart(
  series,
  { title = '', xLabel = '', yLabel = '', logX = false, logY = false, reference = null } = {},
) {
  const W = 720,
    H = 440,
    L = 70,
    R = 170,
    T = 40,
    B = 55;
  const fx = logX ? Math.log2 : (v) => v;
  const fy = logY ? Math.log2 : (v) => v;
  const pts = series
    .flatMap((s) => s.points)
    .filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!logX || x > 0) && (!logY || y > 0));
  if (pts.length === 0) throw new Error('chart: no finite points');
  const ys = pts.map(([, y]) => fy(y)).concat(reference != null ? [fy(reference)] : []);
  const xs = pts.map(([x]) => fx(x));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) {
    x0 -= 1;
    x1 += 1;
  }
  if (y0 === y1) {
    y0 -= 1;
    y1 += 1;
  }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad;
  y1 += pad;
  const px = (x) => L + ((fx(x) - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B);
  const fmt = (v) =>
    Number.isInteger(v)
      ? String(v)
      : Math.abs(v) >= 1e5 || (Math.abs(v) < 0.01 && v !== 0)
        ? v.toExponential(1)
        : String(+v.toPrecision(3));
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${escapeXml(title)}</text>`,
  ];
  // Axes with ticks at the data's x values and at 5 y levels.
  out.push(
    `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="black"/>`,
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="black"/>`,
  );
  for (const x of [...new Set(pts.map(([x]) => x))].sort((a, b) => a - b)) {
    out.push(
      `<line x1="${px(x)}" y1="${H - B}" x2="${px(x)}" y2="${H - B + 5}" stroke="black"/>`,
      `<text x="${px(x)}" y="${H - B + 18}" text-anchor="middle">${fmt(x)}</text>`,
    );
  }
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4,
      y = logY ? 2 ** v : v,
      yy = T + (1 - i / 4) * (H - T - B);
    out.push(
      `<line x1="${L - 5}" y1="${yy}" x2="${W - R}" y2="${yy}" stroke="#ddd"/>`,
      `<text x="${L - 8}" y="${yy + 4}" text-anchor="end">${fmt(y)}</text>`,
    );
  }
  out.push(
    `<text x="${(L + W - R) / 2}" y="${H - 12}" text-anchor="middle">${escapeXml(xLabel)}${logX ? ' (log scale)' : ''}</text>`,
    `<text x="16" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 ${(T + H - B) / 2})">${escapeXml(yLabel)}${logY ? ' (log scale)' : ''}</text>`,
  );
  if (reference != null) {
    out.push(
      `<line x1="${L}" y1="${py(reference)}" x2="${W - R}" y2="${py(reference)}" stroke="black" stroke-dasharray="5,4"/>`,
    );
  }
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)).sort((a, b) => a[0] - b[0]);
    if (p.length) {
      out.push(
        `<polyline fill="none" stroke="${c}" stroke-width="2" points="${p.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ')}"/>`,
      );
      for (const [x, y] of p) out.push(`<circle cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3" fill="${c}"/>`);
    }
    out.push(
      `<line x1="${W - R + 15}" y1="${T + 10 + 18 * i}" x2="${W - R + 35}" y2="${T + 10 + 18 * i}" stroke="${c}" stroke-width="2"/>`,
      `<text x="${W - R + 40}" y="${T + 14 + 18 * i}">${escapeXml(s.name)}</text>`,
    );
  });
  out.push('</svg>');
  return out.join('\n');
}
