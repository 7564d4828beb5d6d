//! # mhc-gpu (shell)
//!
//! The portable GPU backend of mhc will live here: WGSL compute shaders for
//! Sinkhorn–Knopp, the fused coefficients, pre-aggregate and post/res merge
//! (forward and backward) on `wgpu` — Vulkan, Metal, DX12 and WebGPU — each
//! with a parity test against [`mhc_core`].

/// What this crate provides today.
pub const STATUS: &str = "planned: wgpu compute shaders (not implemented yet)";

pub use mhc_core;
