//! # mhc-cuda
//!
//! - [`cuda`]: the fused CUDA mHC wrapper — coefficients (tensor-core
//!   projection, σ, 2σ, Sinkhorn–Knopp), pre-aggregate and post/res merge,
//!   forward and backward with recompute, compiled at run time with NVRTC
//!   through `cudarc` (no CUDA needed to build; a typed error without a driver).
//! - The trainer `mhc-train` ([`spec`], [`data`], [`train`], [`checkpoint`],
//!   [`metrics`], [`plot`]): GPT-style byte-level language models whose residual
//!   stream is plain, HC or mHC, on the CPU reference ([`mhc_core::model`]);
//!   its CUDA path is the next step.
//! - [`parallel`]: data-parallel training on the CPU (replicas as threads,
//!   a deterministic all-reduce); the NCCL path for several GPUs is in [`cuda`].
//! - `mhc-bench`: times the CUDA wrapper against its memory floor.

pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod spec;
pub mod train;

pub use mhc_core;
