//! # mhc-cuda (shell)
//!
//! The CUDA backend of mhc will live here: fused kernels for the mHC
//! coefficients, Sinkhorn–Knopp, pre-aggregate and post/res merge (forward
//! and backward, with recomputation), compiled at run time with NVRTC through
//! `cudarc`, and the `mhc-train` binary. Until then this crate only states
//! what it will hold; every kernel will be tested against [`mhc_core`].

/// What this crate provides today.
pub const STATUS: &str = "planned: fused CUDA kernels and the GPU trainer (not implemented yet)";

pub use mhc_core;
