// Canvas drawing: line charts, n×n heatmaps and heatmap timelines.
// Every draw bumps the canvas's data-draws, which the e2e test reads.

const FONT = '12px system-ui, sans-serif';

/** Sizes the canvas's backing store to its CSS box × devicePixelRatio; returns [ctx, w, h] in CSS px. */
function prepare(canvas, cssHeight) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(120, canvas.clientWidth || canvas.parentElement.clientWidth || 300);
  const h = cssHeight ?? (canvas.clientHeight || 200);
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = FONT;
  canvas.dataset.draws = String(Number(canvas.dataset.draws || 0) + 1);
  return [ctx, w, h];
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) ?? 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) ticks.push(v);
  return ticks;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-2)) return v.toExponential(0);
  return String(Number(v.toPrecision(3)));
}

/**
 * Draws series [{name, color, points: [[x, y]], dots?, dash?}] with axes.
 * opts: {logY, xLabel, title, yMin, yMax}.
 */
export function lineChart(canvas, series, opts = {}) {
  const [ctx, w, h] = prepare(canvas);
  // The legend goes beside the title, or on its own line when they do not fit.
  const named = series.filter((s) => s.name);
  const legendWidth = named.reduce((sum, s) => sum + ctx.measureText(s.name).width + 22, 0);
  const twoLines = 46 + ctx.measureText(opts.title ?? '').width + 16 + legendWidth > w - 10;
  const legendY = twoLines ? 30 : 14;
  const pad = { l: 46, r: 10, t: twoLines ? 38 : 22, b: 30 };
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!opts.logY || y > 0));
  ctx.fillStyle = '#333';
  ctx.fillText(opts.title ?? '', pad.l, 14);
  if (all.length === 0) {
    ctx.fillStyle = '#888';
    ctx.fillText('waiting for data…', pad.l, h / 2);
    return;
  }
  const ty = (y) => (opts.logY ? Math.log10(y) : y);
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => ty(p[1]))), Math.max(...all.map((p) => ty(p[1])))];
  if (opts.yMin !== undefined) y0 = Math.min(y0, ty(opts.yMin));
  if (opts.yMax !== undefined) y1 = Math.max(y1, ty(opts.yMax));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 - y0 < 1e-9) {
    y0 -= opts.logY ? 0.05 : 0.5;
    y1 += opts.logY ? 0.05 : 0.5;
  }
  const margin = (y1 - y0) * 0.05;
  y0 -= margin;
  y1 += margin;
  const px = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const py = (y) => h - pad.b - ((ty(y) - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  // Grid and tick labels.
  ctx.strokeStyle = '#e4e4e4';
  ctx.lineWidth = 1;
  ctx.fillStyle = '#555';
  const yt = opts.logY
    ? niceTicks(y0, y1, 4).map((e) => 10 ** e)
    : niceTicks(y0, y1, 4);
  for (const v of yt) {
    const y = py(v);
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(w - pad.r, y);
    ctx.stroke();
    ctx.fillText(fmt(v), 2, y + 4);
  }
  for (const v of niceTicks(x0, x1, Math.max(2, Math.floor(w / 90)))) {
    const x = px(v);
    ctx.beginPath();
    ctx.moveTo(x, pad.t);
    ctx.lineTo(x, h - pad.b);
    ctx.stroke();
    const label = fmt(v);
    const lw = ctx.measureText(label).width;
    ctx.fillText(label, Math.min(x - lw / 2, w - lw - 1), h - pad.b + 14);
  }
  ctx.fillText(opts.xLabel ?? '', w - pad.r - ctx.measureText(opts.xLabel ?? '').width, h - 3);
  // Series.
  for (const s of series) {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!opts.logY || y > 0));
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.8;
    ctx.setLineDash(s.dash ?? []);
    if (s.dots) {
      for (const [x, y] of pts) {
        ctx.beginPath();
        ctx.arc(px(x), py(y), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    } else if (pts.length) {
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
      ctx.stroke();
    }
    ctx.setLineDash([]);
  }
  // Legend.
  let lx = w - pad.r;
  for (const s of [...named].reverse()) {
    const tw = ctx.measureText(s.name).width;
    lx -= tw + 22;
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, legendY - 8, 12, 8);
    ctx.fillStyle = '#333';
    ctx.fillText(s.name, lx + 15, legendY);
  }
}

/** Colour of a coefficient: white at 0, blue up to +1 (darker beyond), red below 0. */
export function coefficientColor(v) {
  if (!Number.isFinite(v)) return '#000';
  const a = Math.min(Math.abs(v), 2);
  const t = Math.min(a, 1);
  const deep = Math.max(0, a - 1); // 1..2: darken
  const [r, g, b] = v >= 0 ? [40, 110, 210] : [210, 60, 40];
  const mix = (c) => Math.round((255 + (c - 255) * t) * (1 - 0.55 * deep));
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

/** Draws an n×n matrix (row-major `values`) as a heatmap with values in the cells when they fit. */
export function matrixHeatmap(canvas, values, n, title) {
  // Cells of at most 40 px: a 1×1 map (residual) stays small.
  const size = Math.min(canvas.clientWidth || 160, 220, 40 * n + 2);
  const [ctx, w] = prepare(canvas, size + 18);
  const cell = (Math.min(w, size) - 2) / n;
  ctx.fillStyle = '#333';
  ctx.fillText(title, 1, 12);
  for (let o = 0; o < n; o++) {
    for (let i = 0; i < n; i++) {
      const v = values[o * n + i];
      ctx.fillStyle = coefficientColor(v);
      ctx.fillRect(1 + i * cell, 18 + o * cell, cell - 1, cell - 1);
      if (cell >= 30) {
        ctx.fillStyle = Math.abs(v) > 0.6 ? '#fff' : '#222';
        const text = v.toFixed(2);
        ctx.fillText(text, 1 + i * cell + (cell - ctx.measureText(text).width) / 2, 18 + o * cell + cell / 2 + 4);
      }
    }
  }
}

/**
 * Draws the history of one layer's H_res: time left to right (one column per
 * snapshot), the n² entries (row-major) top to bottom.
 */
export function timelineHeatmap(canvas, snapshots, n, title) {
  const [ctx, w, h] = prepare(canvas, 20 + Math.max(n * n * 6, 24));
  ctx.fillStyle = '#333';
  ctx.fillText(title, 1, 12);
  if (!snapshots.length) return;
  const top = 18;
  const colW = (w - 2) / snapshots.length;
  const rowH = (h - top) / (n * n);
  // Whole-pixel edges: no anti-aliased seams between neighbouring cells.
  const edge = (origin, size, i) => Math.round(origin + i * size);
  snapshots.forEach((m, t) => {
    const x0 = edge(1, colW, t);
    const x1 = Math.max(x0 + 1, edge(1, colW, t + 1));
    for (let j = 0; j < n * n; j++) {
      const y0 = edge(top, rowH, j);
      const y1 = Math.max(y0 + 1, edge(top, rowH, j + 1));
      ctx.fillStyle = coefficientColor(m[j]);
      ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
  });
}
