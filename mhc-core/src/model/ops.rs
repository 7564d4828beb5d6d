//! Dense kernels of the reference model: matmul and its two gradients,
//! RMSNorm, GELU and softmax cross-entropy, forward and backward.
//! Row-major throughout; loops are ordered so the inner one is contiguous.

use crate::apply::dot;
use crate::real::Real;

/// `out[m, n] = a[m, k] · b[k, n]`.
pub fn matmul<T: Real>(a: &[T], b: &[T], out: &mut [T], m: usize, k: usize, n: usize) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && out.len() >= m * n);
    for i in 0..m {
        let orow = &mut out[i * n..(i + 1) * n];
        orow.iter_mut().for_each(|v| *v = T::zero());
        for r in 0..k {
            let av = a[i * k + r];
            for (o, &bv) in orow.iter_mut().zip(&b[r * n..(r + 1) * n]) {
                *o = *o + av * bv;
            }
        }
    }
}

/// `grad_a[m, k] = grad_out[m, n] · b[k, n]ᵀ` (overwrites).
pub fn matmul_grad_a<T: Real>(
    grad_out: &[T],
    b: &[T],
    grad_a: &mut [T],
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        let g = &grad_out[i * n..(i + 1) * n];
        for r in 0..k {
            grad_a[i * k + r] = dot(g, &b[r * n..(r + 1) * n]);
        }
    }
}

/// `grad_b[k, n] += a[m, k]ᵀ · grad_out[m, n]` (accumulates).
pub fn matmul_grad_b<T: Real>(
    a: &[T],
    grad_out: &[T],
    grad_b: &mut [T],
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        let g = &grad_out[i * n..(i + 1) * n];
        for r in 0..k {
            let av = a[i * k + r];
            for (gb, &gv) in grad_b[r * n..(r + 1) * n].iter_mut().zip(g) {
                *gb = *gb + av * gv;
            }
        }
    }
}

/// RMSNorm per row: `y = x / √(mean(x²) + eps) ⊙ w`; stores `1/rms` per row.
pub fn rmsnorm<T: Real>(x: &[T], w: &[T], eps: T, y: &mut [T], inv_rms: &mut [T]) {
    let c = w.len();
    for ((xr, yr), ir) in x
        .chunks_exact(c)
        .zip(y.chunks_exact_mut(c))
        .zip(inv_rms.iter_mut())
    {
        let inv = T::one() / (dot(xr, xr) / T::of(c as f64) + eps).sqrt();
        *ir = inv;
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = xv * inv * wv;
        }
    }
}

/// Backward of [`rmsnorm`]: overwrites `grad_x`, accumulates `grad_w`.
pub fn rmsnorm_backward<T: Real>(
    x: &[T],
    w: &[T],
    inv_rms: &[T],
    grad_y: &[T],
    grad_x: &mut [T],
    grad_w: &mut [T],
) {
    let c = w.len();
    let cf = T::of(c as f64);
    for (((xr, gy), gx), &inv) in x
        .chunks_exact(c)
        .zip(grad_y.chunks_exact(c))
        .zip(grad_x.chunks_exact_mut(c))
        .zip(inv_rms)
    {
        // x̂ = x·inv; ∂x̂ = ∂y ⊙ w; ∂x = (∂x̂ − x̂·mean(∂x̂ ⊙ x̂))·inv
        let mut m = T::zero();
        for j in 0..c {
            let xh = xr[j] * inv;
            grad_w[j] = grad_w[j] + gy[j] * xh;
            m = m + gy[j] * w[j] * xh;
        }
        m = m / cf;
        for j in 0..c {
            gx[j] = (gy[j] * w[j] - xr[j] * inv * m) * inv;
        }
    }
}

const GELU_K: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_A: f64 = 0.044_715;

/// GELU, tanh approximation: `0.5·u·(1 + tanh(√(2/π)(u + 0.044715u³)))`.
#[inline]
pub fn gelu<T: Real>(u: T) -> T {
    let k = T::of(GELU_K);
    let a = T::of(GELU_A);
    T::of(0.5) * u * (T::one() + (k * (u + a * u * u * u)).tanh())
}

/// Derivative of [`gelu`].
#[inline]
pub fn gelu_grad<T: Real>(u: T) -> T {
    let k = T::of(GELU_K);
    let a = T::of(GELU_A);
    let t = (k * (u + a * u * u * u)).tanh();
    let half = T::of(0.5);
    half * (T::one() + t) + half * u * (T::one() - t * t) * k * (T::one() + T::of(3.0) * a * u * u)
}

/// Mean softmax cross-entropy over rows of `logits [rows, vocab]`; overwrites
/// `logits` with `∂loss/∂logits = (softmax − onehot)/rows`. Returns the mean loss.
pub fn cross_entropy<T: Real>(logits: &mut [T], targets: &[u32], vocab: usize) -> T {
    let rows = targets.len();
    let scale = T::one() / T::of(rows as f64);
    let mut total = T::zero();
    for (row, &t) in logits.chunks_exact_mut(vocab).zip(targets) {
        let t = t as usize;
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let shifted_target = row[t] - max;
        let mut sum = T::zero();
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        // −log softmax[t] = log Σ exp(l − max) − (l_t − max), finite even if exp underflows.
        total = total + sum.ln() - shifted_target;
        let inv = T::one() / sum;
        for v in row.iter_mut() {
            *v = *v * inv * scale;
        }
        row[t] = row[t] - scale;
    }
    total * scale
}
