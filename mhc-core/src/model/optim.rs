//! AdamW (decoupled weight decay), a warm-up-then-cosine learning-rate
//! schedule and global-norm gradient clipping.

use alloc::vec::Vec;

use crate::real::Real;

/// Learning rate: linear warm-up from 0 to `max_lr` over `warmup` steps, then
/// cosine decay to `min_lr` at `total` steps (constant after).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
}

impl Schedule {
    /// Learning rate of (0-based) step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.max_lr * (step + 1) as f64 / self.warmup as f64;
        }
        if step >= self.total {
            return self.min_lr;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = (step - self.warmup) as f64 / span;
        self.min_lr
            + 0.5
                * (self.max_lr - self.min_lr)
                * (1.0 + libm::cos(core::f64::consts::PI * progress))
    }
}

/// AdamW hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied to matrices only; see the model docs).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW state: first and second moments per tensor, in the model's
/// parameter order, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW<T> {
    /// Hyperparameters.
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// First moments, one per tensor.
    pub m: Vec<Vec<T>>,
    /// Second moments, one per tensor.
    pub v: Vec<Vec<T>>,
}

impl<T: Real> AdamW<T> {
    /// Zero state for tensors of the given lengths.
    pub fn new(config: AdamWConfig, lens: impl IntoIterator<Item = usize>) -> Self {
        let (m, v): (Vec<_>, Vec<_>) = lens
            .into_iter()
            .map(|l| (alloc::vec![T::zero(); l], alloc::vec![T::zero(); l]))
            .unzip();
        Self {
            config,
            step: 0,
            m,
            v,
        }
    }

    /// One update of tensor `index` with learning rate `lr`; call
    /// [`AdamW::begin_step`] once before updating the tensors of a step.
    pub fn update(&mut self, index: usize, value: &mut [T], grad: &[T], lr: f64, decay: bool) {
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - libm::pow(c.beta1, t as f64);
        let bc2 = 1.0 - libm::pow(c.beta2, t as f64);
        let (b1, b2) = (T::of(c.beta1), T::of(c.beta2));
        let (one_b1, one_b2) = (T::of(1.0 - c.beta1), T::of(1.0 - c.beta2));
        let step_size = T::of(lr / bc1);
        let inv_bc2 = T::of(1.0 / bc2);
        let eps = T::of(c.eps);
        let shrink = T::of(if decay {
            1.0 - lr * c.weight_decay
        } else {
            1.0
        });
        for (((w, &g), m), v) in value
            .iter_mut()
            .zip(grad)
            .zip(self.m[index].iter_mut())
            .zip(self.v[index].iter_mut())
        {
            *m = b1 * *m + one_b1 * g;
            *v = b2 * *v + one_b2 * g * g;
            *w = *w * shrink - step_size * *m / ((*v * inv_bc2).sqrt() + eps);
        }
    }

    /// Advances the step counter (bias corrections use it).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }
}
