// The page: settings, three workers (residual, HC, mHC), charts, heatmaps, sampler.
// Numbers the e2e test reads are mirrored into data-* attributes:
//   body[data-state]: loading | idle | starting | training | paused | done | error
//   #status-<scheme>[data-running, data-backend, data-step, data-loss-first, data-loss, data-val-loss,
//                    data-steps-per-s, data-composite-gain]
//   canvas[data-draws], #heat-grid[data-step], pre.sample[data-samples]
import { lineChart, matrixHeatmap, timelineHeatmap } from './charts.js';

const ALL_SCHEMES = [
  { key: 'residual', label: 'residual', color: '#7a7a7a' },
  { key: 'hc', label: 'HC', color: '#d9731a' },
  { key: 'mhc', label: 'mHC', color: '#2268c4' },
];
// ?only=mhc (or hc,mhc …) trains just those: e.g. to time one model alone.
const only = new URLSearchParams(location.search).get('only');
const SCHEMES = ALL_SCHEMES.filter((s) => !only || only.split(',').includes(s.key));
for (const s of ALL_SCHEMES) {
  if (!SCHEMES.includes(s)) {
    document.getElementById(`status-${s.key}`).hidden = true;
    document.getElementById(`sample-${s.key}`).parentElement.hidden = true;
  }
}
const SIZES = {
  tiny: { layers: 2, width: 32, heads: 4, context: 32, batch: 8 },
  default: { layers: 4, width: 32, heads: 4, context: 32, batch: 8 },
  deep: { layers: 8, width: 32, heads: 4, context: 32, batch: 8 },
  wide: { layers: 2, width: 64, heads: 4, context: 64, batch: 16 },
};
const EVAL_EVERY = 50;
const MAX_POINTS = 1500;
const MAX_SNAPSHOTS = 240;
const MAX_RAW = 5000;

const $ = (id) => document.getElementById(id);
const ui = {
  dataset: $('dataset'), size: $('size'), streams: $('streams'), steps: $('steps'), seed: $('seed'),
  backend: $('backend'), paste: $('paste'), start: $('start'), pause: $('pause'), reset: $('reset'),
  status: $('status'), backendLine: $('backend-line'), error: $('error'), picker: $('layer-picker'),
  heatGrid: $('heat-grid'), sample: $('sample'), prompt: $('prompt'), sampleLen: $('sample-len'),
  temperature: $('temperature'),
};

let runs = {}; // scheme key -> run state
let chosenLayers = [];
let state = 'loading';
let drawPending = false;
let sampleId = 0;
let maxSteps = 0; // the step budget of the current run

function setState(s, text) {
  state = s;
  document.body.dataset.state = s;
  if (text !== undefined) ui.status.textContent = text;
  const created = Object.keys(runs).length === SCHEMES.length && Object.values(runs).every((r) => r.created);
  ui.start.disabled = !(s === 'idle' || s === 'done' || s === 'error');
  ui.start.textContent = created && s !== 'idle' ? 'Restart' : 'Start';
  ui.pause.disabled = !(s === 'training' || s === 'paused');
  ui.pause.textContent = s === 'paused' ? 'Resume' : 'Pause';
  ui.reset.disabled = !(created || s === 'error');
  ui.sample.disabled = !created;
}

function showError(message) {
  ui.error.hidden = !message;
  ui.error.textContent = message ? `error: ${message}` : '';
  ui.error.dataset.error = message || '';
}

function newRun(scheme) {
  return {
    scheme,
    worker: null,
    created: false,
    running: false,
    info: null,
    ema: [], grad: [], val: [], gainTime: [],
    losses: [], // raw loss of every step (the first MAX_RAW), for exact comparisons
    emaValue: null, firstLoss: null, lastReport: null, coefficients: null,
    snapshots: new Map(), // layer -> [Float32Array n²]
    stepsPerSecond: 0,
  };
}

function thin(arr) {
  // Keeps every other point: long runs stay drawable, the whole span stays visible.
  if (arr.length > MAX_POINTS) {
    const kept = arr.filter((_, i) => i % 2 === 0 || i === arr.length - 1);
    arr.length = 0;
    arr.push(...kept);
  }
}

// ---------------------------------------------------------------- data sets

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Two- and three-digit additions, one a line: "317+45=362". */
function arithmeticText(seed, len) {
  const rnd = mulberry32(seed + 1);
  const lines = [];
  let size = 0;
  while (size < len) {
    const a = Math.floor(rnd() * (rnd() < 0.5 ? 100 : 1000));
    const b = Math.floor(rnd() * (rnd() < 0.5 ? 100 : 1000));
    const line = `${a}+${b}=${a + b}\n`;
    lines.push(line);
    size += line.length;
  }
  return lines.join('');
}

async function trainingData() {
  const seed = Number(ui.seed.value) || 0;
  switch (ui.dataset.value) {
    case 'synthetic':
      return { synthetic: { seed, len: 256 * 1024 } };
    case 'classics': {
      const r = await fetch('data/classics.txt');
      if (!r.ok) throw new Error(`could not load data/classics.txt (${r.status})`);
      return { text: await r.text() };
    }
    case 'arithmetic':
      return { text: arithmeticText(seed, 64 * 1024) };
    default:
      return { text: ui.paste.value };
  }
}

// ---------------------------------------------------------------- workers

function call(run, msg, replyType) {
  return new Promise((resolve, reject) => {
    run.pending = { replyType, resolve, reject, id: msg.id };
    run.worker.postMessage(msg);
  });
}

function onWorkerMessage(run, msg) {
  const p = run.pending;
  if (msg.type === 'error') {
    if (p && (msg.during === 'create' || msg.id === p.id)) {
      run.pending = null;
      p.reject(new Error(msg.message));
      return;
    }
    run.running = false;
    $(`status-${run.scheme.key}`).dataset.running = 'false';
    showError(`${run.scheme.label}: ${msg.message}`);
    updateStatus(run);
    afterStop();
    return;
  }
  if (p && msg.type === p.replyType && (msg.id === undefined || msg.id === p.id)) {
    run.pending = null;
    p.resolve(msg);
  }
  switch (msg.type) {
    case 'progress':
      onProgress(run, msg);
      break;
    case 'eval':
      run.val.push([msg.step, msg.valLoss]);
      updateStatus(run);
      scheduleDraw();
      break;
    case 'stopped':
      run.running = false;
      $(`status-${run.scheme.key}`).dataset.running = 'false';
      afterStop(msg.reason);
      break;
    default:
  }
}

function ensureWorker(run) {
  if (run.worker) return;
  run.worker = new Worker('worker.js', { type: 'module' });
  run.worker.onmessage = (e) => onWorkerMessage(run, e.data);
  run.worker.onerror = (e) => showError(`${run.scheme.label} worker: ${e.message || 'failed to load'}`);
}

function onProgress(run, msg) {
  const r = msg.report;
  const losses = r.losses;
  const grads = r.grad_norms;
  const first = r.step - losses.length + 1;
  for (let i = 0; i < losses.length; i++) {
    const step = first + i;
    if (run.firstLoss === null) run.firstLoss = losses[i];
    run.emaValue = run.emaValue === null ? losses[i] : 0.9 * run.emaValue + 0.1 * losses[i];
    if (run.losses.length < MAX_RAW) run.losses.push(losses[i]);
    run.ema.push([step, run.emaValue]);
    run.grad.push([step, grads[i]]);
  }
  thin(run.ema);
  thin(run.grad);
  if (r.gains) {
    const g = r.gains.composite_bwd_max;
    run.gainTime.push([r.step, g[g.length - 1]]);
    thin(run.gainTime);
  }
  run.lastReport = r;
  run.coefficients = msg.coefficients;
  run.stepsPerSecond = msg.stepsPerSecond;
  const c = msg.coefficients;
  const nn = c.n * c.n;
  for (let l = 0; l < c.layers; l++) {
    if (!run.snapshots.has(l)) run.snapshots.set(l, []);
    const list = run.snapshots.get(l);
    list.push(c.h_res.slice(l * nn, (l + 1) * nn));
    if (list.length > MAX_SNAPSHOTS) {
      const kept = list.filter((_, i) => i % 2 === 0 || i === list.length - 1);
      list.length = 0;
      list.push(...kept);
    }
  }
  updateStatus(run);
  scheduleDraw();
}

function updateStatus(run) {
  const el = $(`status-${run.scheme.key}`);
  const r = run.lastReport;
  const d = el.dataset;
  if (run.info) d.backend = run.info.backend;
  if (!r) {
    el.querySelector('.figures').textContent = run.info
      ? `${run.info.backend} · ${(run.info.params / 1000).toFixed(1)}k params · n = ${run.info.config.n}`
      : '—';
    return;
  }
  const gains = r.gains;
  const full = gains ? gains.composite_bwd_max[gains.composite_bwd_max.length - 1] : NaN;
  const val = run.val.length ? run.val[run.val.length - 1][1] : null;
  d.step = String(r.step);
  d.lossFirst = String(run.firstLoss);
  d.loss = String(run.emaValue);
  d.stepsPerS = String(run.stepsPerSecond);
  d.compositeGain = String(full);
  if (val !== null) d.valLoss = String(val);
  el.querySelector('.figures').textContent =
    `step ${r.step} · loss ${run.emaValue.toFixed(3)}` +
    (val !== null ? ` · val ${val.toFixed(3)}` : '') +
    ` · gain ${full.toPrecision(3)} · ${run.stepsPerSecond.toFixed(1)} steps/s · ${run.info.backend}`;
}

function afterStop(reason) {
  const all = Object.values(runs);
  if (all.some((r) => r.running)) return;
  if (state === 'training') {
    const done = all.every((r) => r.lastReport && r.lastReport.step >= maxSteps);
    setState(done ? 'done' : reason === 'paused' ? 'paused' : 'error', done ? 'done' : 'stopped');
  }
}

// ---------------------------------------------------------------- controls

function settings(scheme) {
  const n = scheme.key === 'residual' ? 1 : Number(ui.streams.value);
  return {
    scheme: scheme.key,
    n,
    ...SIZES[ui.size.value],
    steps: Number(ui.steps.value),
    seed: Number(ui.seed.value) || 0,
    backend: ui.backend.value,
  };
}

async function start() {
  showError('');
  for (const run of Object.values(runs)) run.worker?.postMessage({ cmd: 'pause' });
  setState('starting', 'creating the three models…');
  let data;
  try {
    data = await trainingData();
  } catch (e) {
    showError(e.message);
    setState('error', 'could not load the data');
    return;
  }
  const old = runs;
  runs = {};
  for (const scheme of SCHEMES) {
    const run = newRun(scheme);
    run.worker = old[scheme.key]?.worker ?? null;
    ensureWorker(run);
    if (old[scheme.key]) old[scheme.key].worker = null;
    runs[scheme.key] = run;
  }
  try {
    const infos = await Promise.all(
      SCHEMES.map((scheme) => {
        const run = runs[scheme.key];
        return call(run, { cmd: 'create', config: settings(scheme), ...data }, 'created').then((info) => {
          run.info = info;
          run.created = true;
          updateStatus(run);
          return info;
        });
      }),
    );
    const notes = [...new Set(infos.map((i) => i.backendNote))];
    ui.backendLine.textContent = `Device: ${notes.join(' | ')}`;
    ui.backendLine.dataset.backend = [...new Set(infos.map((i) => i.backend))].join(',');
    const c = infos[infos.length - 1].config;
    buildLayerPicker(c.sublayers);
    ui.status.textContent = `training on ${c.train_bytes} bytes (${c.validation_bytes} held out)…`;
  } catch (e) {
    showError(e.message);
    setState('error', 'could not create the models');
    return;
  }
  resume();
}

function resume() {
  maxSteps = Number(ui.steps.value);
  setState('training');
  for (const run of Object.values(runs)) {
    run.running = true;
    $(`status-${run.scheme.key}`).dataset.running = 'true';
    run.worker.postMessage({ cmd: 'run', maxSteps, evalEvery: EVAL_EVERY });
  }
}

function pause() {
  for (const run of Object.values(runs)) run.worker.postMessage({ cmd: 'pause' });
  setState('paused', 'paused');
}

function reset() {
  for (const run of Object.values(runs)) run.worker?.terminate();
  runs = {};
  showError('');
  ui.backendLine.textContent = '';
  for (const s of SCHEMES) {
    const el = $(`status-${s.key}`);
    for (const k of Object.keys(el.dataset)) if (k !== 'scheme') delete el.dataset[k];
    el.querySelector('.figures').textContent = '—';
    $(`sample-${s.key}`).textContent = '';
  }
  ui.picker.textContent = '';
  ui.heatGrid.textContent = '';
  chosenLayers = [];
  setState('idle', 'reset: press Start');
  draw();
}

async function sample() {
  const id = ++sampleId;
  const prompt = ui.prompt.value;
  const count = Math.max(1, Math.min(1000, Number(ui.sampleLen.value) || 160));
  const temperature = Number(ui.temperature.value);
  await Promise.all(
    Object.values(runs).map(async (run) => {
      const out = $(`sample-${run.scheme.key}`);
      try {
        const reply = await call(run, { cmd: 'sample', id, prompt, count, temperature }, 'sample');
        out.textContent = prompt + reply.text;
        out.dataset.samples = String(Number(out.dataset.samples) + 1);
        out.dataset.step = String(run.lastReport ? run.lastReport.step : 0);
      } catch (e) {
        out.textContent = `error: ${e.message}`;
      }
    }),
  );
}

// ---------------------------------------------------------------- heatmaps

function buildLayerPicker(sublayers) {
  ui.picker.textContent = '';
  const defaults = [...new Set([0, Math.floor(sublayers / 2), sublayers - 1])];
  chosenLayers = defaults;
  for (let l = 0; l < sublayers; l++) {
    const label = document.createElement('label');
    label.className = 'check';
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.checked = defaults.includes(l);
    box.addEventListener('change', () => {
      chosenLayers = [...ui.picker.querySelectorAll('input')].flatMap((b, i) => (b.checked ? [i] : []));
      buildHeatGrid();
      draw();
    });
    label.append(box, ` ${l} ${l % 2 ? 'mlp' : 'attn'}`);
    ui.picker.append(label);
  }
  buildHeatGrid();
}

function buildHeatGrid() {
  ui.heatGrid.textContent = '';
  for (const scheme of SCHEMES) {
    const col = document.createElement('div');
    col.className = 'heat-col';
    col.innerHTML = `<h3 class="c-${scheme.key}">${scheme.label}</h3>`;
    for (const l of chosenLayers) {
      const box = document.createElement('div');
      box.className = 'heat-layer';
      box.innerHTML =
        `<canvas class="matrix" id="hm-${scheme.key}-${l}"></canvas>` +
        `<canvas class="timeline" id="tl-${scheme.key}-${l}"></canvas>` +
        `<div class="gates" id="gates-${scheme.key}-${l}"></div>`;
      col.append(box);
    }
    ui.heatGrid.append(col);
  }
}

// ---------------------------------------------------------------- drawing

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    draw();
  });
}

function draw() {
  const list = SCHEMES.map((s) => runs[s.key]).filter(Boolean);
  lineChart($('chart-loss'), [
    ...list.map((r) => ({ name: r.scheme.label, color: r.scheme.color, points: r.ema })),
    ...list.map((r) => ({ color: r.scheme.color, points: r.val, dots: true })),
  ], { title: 'loss', xLabel: 'step' });
  lineChart($('chart-grad'), list.map((r) => ({ name: r.scheme.label, color: r.scheme.color, points: r.grad })), {
    title: 'grad norm', xLabel: 'step', logY: true,
  });
  const depth = (r, key) => {
    const g = r.lastReport?.gains;
    return g ? Array.from(g[key], (v, i) => [i + 1, v]) : [];
  };
  lineChart($('chart-depth'), [
    ...list.map((r) => ({ name: r.scheme.label, color: r.scheme.color, points: depth(r, 'composite_bwd_max') })),
    ...list.map((r) => ({ color: r.scheme.color, points: depth(r, 'composite_fwd_max'), dash: [5, 4] })),
  ], { title: 'composite gain', xLabel: 'depth (sublayers)', logY: true, yMin: 0.9, yMax: 1.5 });
  lineChart($('chart-gain-time'), list.map((r) => ({ name: r.scheme.label, color: r.scheme.color, points: r.gainTime })), {
    title: 'composite gain at full depth', xLabel: 'step', logY: true, yMin: 0.9, yMax: 1.5,
  });
  let newest = 0;
  for (const r of list) {
    const c = r.coefficients;
    if (!c) continue;
    newest = Math.max(newest, c.step);
    for (const l of chosenLayers) {
      const hm = $(`hm-${r.scheme.key}-${l}`);
      if (!hm || l >= c.layers) continue;
      const nn = c.n * c.n;
      matrixHeatmap(hm, c.h_res.subarray(l * nn, (l + 1) * nn), c.n, `sublayer ${l}, step ${c.step}`);
      timelineHeatmap($(`tl-${r.scheme.key}-${l}`), r.snapshots.get(l) ?? [], c.n, `steps 1–${c.step} →`);
      const pre = Array.from(c.h_pre.subarray(l * c.n, (l + 1) * c.n), (v) => v.toFixed(2)).join(' ');
      const post = Array.from(c.h_post.subarray(l * c.n, (l + 1) * c.n), (v) => v.toFixed(2)).join(' ');
      $(`gates-${r.scheme.key}-${l}`).textContent = `H_pre ${pre} · H_post ${post}`;
    }
  }
  if (newest) ui.heatGrid.dataset.step = String(newest);
}

// ---------------------------------------------------------------- start-up

ui.dataset.addEventListener('change', () => {
  ui.paste.hidden = ui.dataset.value !== 'paste';
});
ui.start.addEventListener('click', start);
ui.pause.addEventListener('click', () => (state === 'paused' ? resume() : pause()));
ui.reset.addEventListener('click', reset);
ui.sample.addEventListener('click', sample);
window.addEventListener('resize', scheduleDraw);

// For tests and the console: raw per-step losses (index = step - 1) and backends.
window.mhcDemo = {
  losses: (scheme) => (runs[scheme] ? [...runs[scheme].losses] : []),
  // Mean H_res of every sublayer ([layers, n, n], flattened) of the last chunk.
  hRes: (scheme) => (runs[scheme]?.coefficients ? Array.from(runs[scheme].coefficients.h_res) : []),
  backends: () => Object.fromEntries(Object.values(runs).map((r) => [r.scheme.key, r.info?.backend ?? null])),
};

if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('sw.js').catch((e) => console.warn('no offline cache:', e));
}
draw();
setState('idle', 'ready: press Start');
