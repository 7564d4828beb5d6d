//! # mhc-gpu
//!
//! The portable GPU backend of mhc on `wgpu` compute shaders — Vulkan, Metal,
//! DX12 natively and WebGPU in browsers — for **Manifold-Constrained
//! Hyper-Connections** (mHC, arXiv 2512.24880), HC and the plain residual.
//!
//! - [`GpuContext`]: adapter, device, queue, limits; checked buffers;
//!   asynchronous readback (blocking wrappers on native targets).
//! - [`wrapper`]: WGSL shaders for Sinkhorn–Knopp, the coefficients, the
//!   pre-aggregate and the post/res merge, forward and backward, and
//!   [`GpuWrapper`], one wrapped sublayer with its parameter gradients.
//! - [`ops`]: the reference model's kernels (tiled matmul, RMSNorm, causal
//!   attention, GELU, cross-entropy, embeddings, AdamW).
//! - [`WgpuTrainer`]: the reference model's training step on the GPU, the
//!   same arithmetic as [`mhc_core::model::Trainer`].
//!
//! Shaders are WGSL files beside the Rust (`src/shaders/*.wgsl`), included
//! with `include_str!` and compiled at run time by wgpu (naga). Everything is
//! f32. Every shader has a parity test against `mhc-core` (`tests/`), which
//! skips with a message when no adapter is found.
//!
//! ```no_run
//! # #[cfg(not(target_arch = "wasm32"))]
//! # fn main() -> Result<(), mhc_gpu::GpuError> {
//! use std::sync::Arc;
//! use mhc_gpu::{GpuContext, GpuWrapper, ScaleSublayer};
//! use mhc_core::{ConnectionConfig, ConnectionParams, InitConfig, Rng, Scheme};
//!
//! let ctx = Arc::new(GpuContext::new_blocking()?);
//! println!("adapter: {}", ctx.adapter_name());
//! let (n, c, tokens) = (4, 64, 8);
//! let config = ConnectionConfig::new(Scheme::MhcDynamic, n, c);
//! let params = ConnectionParams::<f32>::init(&config, &InitConfig::default(), &mut Rng::new(0));
//! let mut wrapper = GpuWrapper::new(ctx.clone(), &config, &params, tokens)?;
//! let x: Vec<f32> = (0..tokens * n * c).map(|i| (i as f32 * 0.37).sin()).collect();
//! let x = ctx.upload("x", &x)?;
//! let out = ctx.zeros("out", tokens * n * c)?;
//! let mut f = ScaleSublayer { factor: 1.5, width: c };
//! wrapper.forward(&mut f, &x, &out, tokens)?;
//! let out = ctx.read_f32_blocking(&out)?;
//! # let _ = out;
//! # Ok(())
//! # }
//! # #[cfg(target_arch = "wasm32")]
//! # fn main() {}
//! ```
#![deny(unsafe_code)]

mod context;
mod error;
pub mod ops;
mod trainer;
pub mod wrapper;

pub use context::{GpuBuffer, GpuContext, MODEL_WGSL, WRAPPER_WGSL};
pub use error::{GpuError, GpuResult};
pub use trainer::{DeviceParam, GpuAttention, GpuMlp, WgpuTrainer};
pub use wrapper::{GpuSublayer, GpuWrapper, PackedLayout, ScaleSublayer};

pub use mhc_core;
