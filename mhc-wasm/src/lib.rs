//! # mhc-wasm
//!
//! The browser API of mhc: train byte-level residual, HC and mHC models
//! (`mhc_core::model`) live in a page, read their metrics, every wrapped
//! sublayer's `H_pre`, `H_post`, `H_res` (paper Eq. 3) and the composite
//! Amax gains over depth (paper §3, Fig. 3/7), and sample text.
//!
//! From JavaScript (the `wasm-bindgen --target web` output, in a Web Worker):
//!
//! ```js
//! import init, { create_trainer, default_config } from './pkg/mhc_wasm.js';
//! await init();
//! const t = await create_trainer({ ...default_config(), scheme: 'hc', n: 4 }, text);
//! t.backend;                  // "cpu" or "webgpu"; t.backend_note says why
//! const r = await t.step(10); // {step, loss, losses, grad_norms, lr, gains}
//! const c = t.coefficients(false); // {h_res: Float32Array, h_res_shape: [layers, n, n], …}
//! const s = await t.sample('the ', 80, 0.8);
//! ```
//!
//! Errors (bad configuration, empty text, unavailable backend, a diverged
//! step) are thrown as JavaScript `Error`s whose message says what to fix.
//!
//! Layout: [`settings`] (what a run is, defaults and checks), [`session`]
//! (the run itself with its [`Backend`] enum — plain Rust,
//! tested natively) and the `wasm_bindgen` layer ([`WasmTrainer`],
//! [`create_trainer`]). On WebGPU the trainer is `mhc-gpu`'s `WgpuTrainer`
//! on wgpu's WebGPU backend (in a window or a dedicated worker); every
//! method that waits for the GPU is `async` (`map_async`, never a blocking
//! poll), so the worker's event loop keeps running.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod api;
pub mod session;
pub mod settings;

pub use api::{
    WasmTrainer, build_info, create_trainer, default_config, probe_webgpu, settings_from_js,
    synthetic_text, webgpu_adapter,
};
pub use mhc_core;
pub use session::{Backend, Session};
pub use settings::{BackendChoice, TrainerSettings, WebError};

/// Installs the panic hook that prints Rust panics to the browser console
/// (they are bugs; bad input is an `Error` instead). Runs when the module is
/// instantiated.
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}
