//! Cross-crate tests of mhc live in `tests/tests/`; this library only holds
//! helpers they share.

use mhc_core::{Real, Rng};

/// `count` standard-normal samples scaled by `std`, from `rng`.
pub fn normal_vec<T: Real>(rng: &mut Rng, count: usize, std: f64) -> Vec<T> {
    (0..count).map(|_| T::of(rng.normal() * std)).collect()
}
