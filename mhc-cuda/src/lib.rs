//! # mhc-cuda
//!
//! The mhc trainer: `mhc-train` trains GPT-style language models whose
//! residual stream is plain, HC or mHC, on the CPU reference
//! ([`mhc_core::model`]) today and on CUDA in a later issue (fused kernels
//! compiled at run time with NVRTC through `cudarc`).

pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod metrics;
pub mod plot;
pub mod spec;
pub mod train;

pub use mhc_core;
