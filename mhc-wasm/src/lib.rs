//! # mhc-wasm (shell)
//!
//! The `wasm-bindgen` API of the web demo will live here: create a trainer,
//! run steps, read metrics and every layer's `H_res`, sample text — on the
//! CPU core or on WebGPU through `mhc-gpu`.

/// What this crate provides today.
pub const STATUS: &str = "planned: wasm-bindgen trainer API (not implemented yet)";

pub use mhc_core;
