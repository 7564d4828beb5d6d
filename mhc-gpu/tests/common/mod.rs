//! Shared by the parity tests: one context per test binary (or a skip
//! message when there is no adapter), random inputs, tolerance checks.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use mhc_core::Rng;
use mhc_gpu::{GpuContext, GpuError};

/// The adapter, or `None` after printing `skipping: no wgpu adapter (...)`.
pub fn context() -> Option<Arc<GpuContext>> {
    static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
    let ctx = CTX
        .get_or_init(|| match GpuContext::new_blocking() {
            Ok(c) => {
                eprintln!("wgpu adapter: {}", c.adapter_name());
                Some(Arc::new(c))
            }
            Err(GpuError::NoAdapter(m)) => {
                eprintln!("skipping: no wgpu adapter ({m})");
                None
            }
            Err(e) => panic!("wgpu device creation failed: {e}"),
        })
        .clone();
    if ctx.is_none() {
        eprintln!("skipping: no wgpu adapter (see above)");
    }
    ctx
}

/// `len` normal samples of standard deviation `std` (never all zeros).
pub fn random(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` element-wise, naming the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(g.is_finite(), "{what}[{i}] = {g} is not finite");
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i}: got {} want {} (|err| {} > {atol} + {rtol}·|want|)",
            got[i],
            want[i],
            (got[i] - want[i]).abs()
        );
    }
}

/// The largest absolute value (for tolerances relative to a tensor's scale).
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}
