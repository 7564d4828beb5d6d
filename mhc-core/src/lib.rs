//! # mhc-core
//!
//! The numeric core of **Manifold-Constrained Hyper-Connections** (mHC,
//! Xie et al., DeepSeek-AI, arXiv 2512.24880), and the schemes it is measured
//! against: the plain residual connection and unconstrained Hyper-Connections
//! (HC, Zhu et al., arXiv 2409.19606). It is the oracle every backend of this
//! project (CUDA, wgpu, WASM) is tested against.
//!
//! Per token the residual state is `x ∈ R^{n×C}`: `n` streams of width `C`.
//! Every sublayer `F` is wrapped as (paper Eq. 3)
//!
//! ```text
//! x' = H_res · x + H_postᵀ · F(H_pre · x)
//! ```
//!
//! mHC computes the maps from the whole state with one projection `φ`
//! (Eqs. 7–8) and constrains them: `H_pre = σ(·)`, `H_post = 2σ(·)` and
//! `H_res = SinkhornKnopp(·)`, a doubly stochastic matrix (Eq. 9), so the
//! composite map over depth keeps unit gain instead of exploding as HC's can.
//!
//! - [`sinkhorn`]: batched Sinkhorn–Knopp forward and exact truncated backward.
//! - [`Scheme`], [`ConnectionConfig`], [`ConnectionParams`]: the five schemes, their parameters and initialisation.
//! - [`HyperConnection`]: coefficients, forward and backward around any [`Sublayer`].
//! - [`apply`]: the two memory-bound pieces (pre-aggregate, post/res merge) on their own.
//! - [`diagnostics`]: Amax gains of one map and of the composite over depth.
//! - `model` (feature `alloc`, on by default): the reference GPT model with
//!   residual / HC / mHC streams, its exact backward, AdamW and the embedded data.
//!
//! `#![no_std]` + `alloc`; generic over `f32` and `f64` ([`Real`]). Hot paths
//! allocate nothing: buffers live in a caller-owned [`Workspace`]. Every bad
//! input gives a typed [`MhcError`], never a panic.
//!
//! ## Example: wrap a toy sublayer, run forward and backward
//!
//! ```
//! use mhc_core::{ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Rng, Scheme, Sublayer, Workspace};
//!
//! /// F(h) = tanh(h), element-wise.
//! struct Tanh;
//! impl Sublayer<f32> for Tanh {
//!     fn forward(&mut self, h: &[f32], y: &mut [f32]) -> mhc_core::Result<()> {
//!         y.iter_mut().zip(h).for_each(|(y, h)| *y = h.tanh());
//!         Ok(())
//!     }
//!     fn vjp(&mut self, h: &[f32], gy: &[f32], gh: &mut [f32]) -> mhc_core::Result<()> {
//!         for ((gh, h), gy) in gh.iter_mut().zip(h).zip(gy) {
//!             *gh = gy * (1.0 - h.tanh().powi(2));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let (n, width, tokens) = (4, 8, 3);
//! let config = ConnectionConfig::new(Scheme::MhcDynamic, n, width);
//! let mut rng = Rng::new(0);
//! let conn = HyperConnection::<f32>::init(config, &InitConfig::default(), &mut rng)?;
//! let mut ws = Workspace::new(&config, tokens);
//!
//! let x: Vec<f32> = (0..tokens * n * width).map(|_| rng.normal() as f32).collect();
//! let mut out = vec![0.0; x.len()];
//! conn.forward(&mut Tanh, &x, &mut out, &mut ws)?;
//!
//! let grad_out = vec![1.0; x.len()];
//! let mut grad_x = vec![0.0; x.len()];
//! let mut grads = ConnectionParams::zeros(&config);
//! conn.backward(&mut Tanh, &x, &grad_out, &mut grad_x, &mut grads, &mut ws)?;
//!
//! // H_res of the first token is doubly stochastic (rows exact, columns within the SK residual).
//! let h_res = ws.h_res(0).expect("token 0 was in the batch");
//! assert!((h_res[..n].iter().sum::<f32>() - 1.0).abs() < 1e-5);
//! assert!(grads.phi.iter().any(|g| *g != 0.0));
//! # Ok::<(), mhc_core::MhcError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod apply;
mod connection;
pub mod diagnostics;
mod error;
#[cfg(feature = "alloc")]
pub mod model;
mod real;
mod rng;
pub mod sinkhorn;
mod wrapper;

pub use connection::{ConnectionConfig, ConnectionParams, InitConfig, Scheme};
pub use diagnostics::{AmaxGain, CompositeGain, amax_gain, composite_gains};
pub use error::{MhcError, Result};
pub use real::Real;
pub use rng::Rng;
pub use sinkhorn::{SinkhornConfig, sinkhorn_knopp, sinkhorn_knopp_backward};
pub use wrapper::{HyperConnection, Sublayer, Workspace};

#[cfg(test)]
mod tests;
