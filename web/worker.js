// One trainer per worker: the page runs three of these (residual, HC, mHC)
// so that training never blocks the page and the schemes train side by side.
//
// Commands (postMessage from the page):
//   {cmd: 'create', config, text | synthetic: {seed, len}}
//   {cmd: 'run', maxSteps, evalEvery}   train until paused or maxSteps
//   {cmd: 'pause'}
//   {cmd: 'sample', id, prompt, count, temperature}
//   {cmd: 'coefficients', id, perToken}
// Replies: {type: 'created' | 'progress' | 'eval' | 'stopped' | 'sample' |
//           'coefficients' | 'error', ...}
import init, { create_trainer, synthetic_text, build_info } from './pkg/mhc_wasm.js';

let trainer = null;
let running = false;
let generation = 0; // bumps on every create, so a stale run loop ends
let ready = null;
// Every call into the trainer goes through this chain: one at a time.
let chain = Promise.resolve();

function exclusive(fn) {
  const next = chain.then(fn);
  chain = next.catch(() => {});
  return next;
}

function fail(during, e, extra = {}) {
  running = false;
  postMessage({ type: 'error', during, message: String(e && e.message ? e.message : e), ...extra });
}

const yieldToEvents = () => new Promise((resolve) => setTimeout(resolve, 0));

async function create(msg) {
  running = false;
  generation += 1;
  await (ready ??= init());
  await exclusive(async () => {
    if (trainer) {
      trainer.free();
      trainer = null;
    }
    const text = msg.synthetic ? synthetic_text(BigInt(msg.synthetic.seed), msg.synthetic.len) : msg.text;
    const started = performance.now();
    trainer = await create_trainer(msg.config, text);
    postMessage({
      type: 'created',
      backend: trainer.backend,
      backendNote: trainer.backend_note,
      config: trainer.config,
      params: await trainer.num_params(),
      build: build_info(),
      createMs: performance.now() - started,
    });
  });
}

async function run(msg) {
  if (!trainer || running) return;
  running = true;
  const mine = generation;
  const maxSteps = msg.maxSteps ?? Infinity;
  const evalEvery = msg.evalEvery ?? 50;
  let k = 1;
  let computeMs = 0;
  let computeSteps = 0;
  let nextEval = (Math.floor(trainer.step_count / evalEvery) + 1) * evalEvery;
  while (running && mine === generation && trainer.step_count < maxSteps) {
    const want = Math.min(k, maxSteps - trainer.step_count, nextEval - trainer.step_count);
    let report, coefficients, valLoss = null;
    const t0 = performance.now();
    try {
      await exclusive(async () => {
        report = await trainer.step(want);
        coefficients = trainer.coefficients(false);
        if (report.step >= nextEval) {
          try {
            valLoss = await trainer.evaluate();
          } catch (e) {
            valLoss = NaN; // a text too short for a validation split: no val curve
          }
        }
      });
    } catch (e) {
      fail('step', e, { step: trainer ? trainer.step_count : 0 });
      return;
    }
    const ms = performance.now() - t0;
    if (mine !== generation) return;
    computeMs += ms;
    computeSteps += want;
    // Aim at ~120 ms of work per message: smooth charts, quick pause.
    k = Math.max(1, Math.min(64, Math.round((want * 120) / Math.max(ms, 1))));
    postMessage({
      type: 'progress',
      report,
      coefficients,
      stepsPerSecond: (computeSteps * 1000) / computeMs,
    });
    if (valLoss !== null) {
      nextEval += evalEvery;
      if (Number.isFinite(valLoss)) postMessage({ type: 'eval', step: report.step, valLoss });
    }
    await yieldToEvents();
  }
  const finished = trainer && trainer.step_count >= maxSteps;
  running = false;
  if (mine === generation) postMessage({ type: 'stopped', reason: finished ? 'done' : 'paused' });
}

onmessage = async ({ data: msg }) => {
  try {
    switch (msg.cmd) {
      case 'create':
        await create(msg);
        break;
      case 'run':
        await run(msg);
        break;
      case 'pause':
        running = false;
        break;
      case 'sample': {
        if (!trainer) throw new Error('no trainer yet: press Start first');
        const text = await exclusive(() => trainer.sample(msg.prompt, msg.count, msg.temperature));
        postMessage({ type: 'sample', id: msg.id, text });
        break;
      }
      case 'coefficients': {
        if (!trainer) throw new Error('no trainer yet: press Start first');
        const data = await exclusive(async () => trainer.coefficients(!!msg.perToken));
        postMessage({ type: 'coefficients', id: msg.id, data });
        break;
      }
      default:
        throw new Error(`unknown command ${msg.cmd}`);
    }
  } catch (e) {
    fail(msg.cmd, e, { id: msg.id });
  }
};
