// Per-kernel GPU time of WebGPU training steps in headless Chromium, from
// timestamp queries: every compute pass mhc-gpu records (one per dispatch,
// labelled with its entry point) gets begin/end timestamps through a thin
// wrapper around the page's WebGPU objects; the model and the trainer are
// mhc-wasm's, unchanged. Needs web/pkg (scripts/build-web.sh).
//
//   node tests/e2e/webgpu-profile.mjs            # default model, mHC
//   SCHEME=hc STEPS=5 node tests/e2e/webgpu-profile.mjs
//
// Env: CHROMIUM (default /usr/bin/chromium), PORT (default 8791), SCHEME
// (default mhc), STEPS (profiled steps after 2 warm-up steps, default 3),
// EXTRA (more Chromium flags, space-separated).
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const port = Number(process.env.PORT || 8791);
const server = spawn('bash', [join(root, 'scripts/serve-web.sh')], {
  env: { ...process.env, PORT: String(port) },
  stdio: 'ignore',
});
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-first-run', '--disable-background-networking', '--enable-unsafe-webgpu',
    '--enable-webgpu-developer-features', ...(process.env.EXTRA || '').split(' ').filter(Boolean)],
});
try {
  const page = await browser.newPage();
  for (let i = 0; ; i++) {
    try {
      await page.goto(`http://127.0.0.1:${port}/`);
      break;
    } catch (e) {
      if (i > 50) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const out = await page.evaluate(async ({ scheme, steps }) => {
    const probe = await navigator.gpu?.requestAdapter();
    if (!probe) throw new Error('no WebGPU adapter');
    if (!probe.features.has('timestamp-query')) throw new Error('the adapter has no timestamp-query');
    const requestDevice = GPUAdapter.prototype.requestDevice;
    GPUAdapter.prototype.requestDevice = function (d = {}) {
      return requestDevice.call(this, { ...d, requiredFeatures: [...(d.requiredFeatures || []), 'timestamp-query'] });
    };
    const createEncoder = GPUDevice.prototype.createCommandEncoder;
    const encoders = new WeakMap(); // encoder -> {device, querySet, labels}
    GPUDevice.prototype.createCommandEncoder = function (d) {
      const e = createEncoder.call(this, d);
      encoders.set(e, { device: this, querySet: null, labels: [] });
      return e;
    };
    let recording = false;
    const beginPass = GPUCommandEncoder.prototype.beginComputePass;
    GPUCommandEncoder.prototype.beginComputePass = function (d = {}) {
      const st = encoders.get(this);
      if (!recording || !st || st.labels.length >= 2048) return beginPass.call(this, d);
      st.querySet ??= st.device.createQuerySet({ type: 'timestamp', count: 4096 });
      const i = st.labels.length;
      st.labels.push(d.label || '?');
      return beginPass.call(this, {
        ...d,
        timestampWrites: { querySet: st.querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 },
      });
    };
    const finish = GPUCommandEncoder.prototype.finish;
    const pending = [];
    GPUCommandEncoder.prototype.finish = function (d) {
      const st = encoders.get(this);
      if (st && st.labels.length) {
        const bytes = st.labels.length * 16;
        const resolved = st.device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
        const staging = st.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
        this.resolveQuerySet(st.querySet, 0, 2 * st.labels.length, resolved, 0);
        this.copyBufferToBuffer(resolved, 0, staging, 0, bytes);
        pending.push({ staging, labels: st.labels });
      }
      return finish.call(this, d);
    };
    const m = await import('./pkg/mhc_wasm.js');
    await m.default();
    const t = await m.create_trainer({ ...m.default_config(), scheme, backend: 'webgpu' }, m.synthetic_text(1n, 100000));
    await t.step(2); // compiles the pipelines
    recording = true;
    const t0 = performance.now();
    await t.step(steps);
    const wall = (performance.now() - t0) / steps;
    recording = false;
    const perKernel = {};
    let gpu = 0;
    for (const { staging, labels } of pending) {
      await staging.mapAsync(GPUMapMode.READ);
      const ts = new BigInt64Array(staging.getMappedRange());
      labels.forEach((label, i) => {
        const ms = Number(ts[2 * i + 1] - ts[2 * i]) / 1e6 / steps;
        perKernel[label] ??= { ms: 0, passes: 0 };
        perKernel[label].ms += ms;
        perKernel[label].passes += 1 / steps;
        gpu += ms;
      });
    }
    return { adapter: t.backend_note, wall, gpu, perKernel };
  }, { scheme: process.env.SCHEME || 'mhc', steps: Number(process.env.STEPS || 3) });
  console.log(`${out.adapter}; ${process.env.SCHEME || 'mhc'}: ${out.wall.toFixed(1)} ms a step, ${out.gpu.toFixed(1)} ms in compute passes`);
  for (const [k, v] of Object.entries(out.perKernel).sort((a, b) => b[1].ms - a[1].ms)) {
    console.log(`  ${k.padEnd(28)} ${v.ms.toFixed(2).padStart(8)} ms  ${Math.round(v.passes)} passes`);
  }
} finally {
  await browser.close();
  server.kill();
}
