//! Helpers shared by the cross-crate tests in `tests/tests/`: random inputs
//! and a small sublayer with parameters.

use mhc_core::{Real, Result, Rng, Sublayer};

/// `count` standard-normal samples scaled by `std`, from `rng`.
pub fn normal_vec<T: Real>(rng: &mut Rng, count: usize, std: f64) -> Vec<T> {
    (0..count).map(|_| T::of(rng.normal() * std)).collect()
}

/// The test sublayer `F(h) = tanh(h·W)` per token (`W [C, C]` row-major),
/// the same one `tests/reference/golden.py` uses. Accumulates `∂W` in `vjp`.
#[derive(Clone, Debug)]
pub struct TanhLinear<T> {
    /// Width `C`.
    pub c: usize,
    /// `W [C, C]`.
    pub w: Vec<T>,
    /// Accumulated `∂L/∂W`.
    pub grad_w: Vec<T>,
}

impl<T: Real> TanhLinear<T> {
    /// A sublayer with the given weights and a zero gradient.
    pub fn new(c: usize, w: Vec<T>) -> Self {
        Self {
            c,
            w,
            grad_w: vec![T::zero(); c * c],
        }
    }

    fn pre_activation(&self, h: &[T], j: usize) -> T {
        (0..self.c).fold(T::zero(), |s, i| s + h[i] * self.w[i * self.c + j])
    }
}

impl<T: Real> Sublayer<T> for TanhLinear<T> {
    fn forward(&mut self, h: &[T], y: &mut [T]) -> Result<()> {
        for (ht, yt) in h.chunks_exact(self.c).zip(y.chunks_exact_mut(self.c)) {
            for (j, yv) in yt.iter_mut().enumerate() {
                *yv = self.pre_activation(ht, j).tanh();
            }
        }
        Ok(())
    }

    fn vjp(&mut self, h: &[T], gy: &[T], gh: &mut [T]) -> Result<()> {
        let c = self.c;
        let mut du = vec![T::zero(); c];
        for ((ht, gyt), ght) in h
            .chunks_exact(c)
            .zip(gy.chunks_exact(c))
            .zip(gh.chunks_exact_mut(c))
        {
            for j in 0..c {
                let y = self.pre_activation(ht, j).tanh();
                du[j] = gyt[j] * (T::one() - y * y);
            }
            for i in 0..c {
                ght[i] = (0..c).fold(T::zero(), |s, j| s + self.w[i * c + j] * du[j]);
                for j in 0..c {
                    self.grad_w[i * c + j] = self.grad_w[i * c + j] + ht[i] * du[j];
                }
            }
        }
        Ok(())
    }
}
