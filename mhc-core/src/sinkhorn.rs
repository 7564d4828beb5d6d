//! Sinkhorn–Knopp projection onto the doubly stochastic matrices (paper Eq. 9).
//!
//! `H_res = SK(H̃_res)`: `M⁽⁰⁾ = exp(H̃_res − colmax)`, then `t_max` times
//! normalise every column to sum 1 and then every row to sum 1. Rows are
//! exact on exit; the truncation error sits in the column sums and is
//! reported as the *SK residual* `max |column sum − 1|`.
//!
//! Two choices are made here and kept by every backend:
//! - **Column-max shift.** The first normalisation is over columns, so a
//!   per-column shift cancels exactly; it only keeps `exp` finite. (A per-row
//!   shift would not cancel in a truncated iteration.) The shift is therefore
//!   treated as a constant in the backward: its true gradient is zero.
//! - **`eps` clamps denominators**: `M / max(sum, eps)`. Column sums after the
//!   shift are at least 1, so the clamp only ever acts on a row whose entries
//!   all underflowed; for any ordinary input the iteration is the textbook one,
//!   rows sum to 1 up to rounding and a 1×1 matrix maps to exactly 1.
//!
//! The backward is exact reverse mode through the truncated iteration that
//! the forward ran (not the implicit gradient at convergence). Only the logits
//! are kept between forward and backward; the iterates are recomputed into a
//! caller-owned scratch buffer of [`sinkhorn_knopp_backward_scratch_len`].

use crate::error::{MhcError, Result, check_eps, check_finite, check_len};
use crate::real::Real;

/// Settings of the Sinkhorn–Knopp iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornConfig {
    /// `t_max`, the number of (column, row) normalisation pairs. Paper: 20.
    pub iterations: usize,
    /// Lower clamp of every normalisation denominator (see the module docs).
    pub eps: f64,
}

impl Default for SinkhornConfig {
    fn default() -> Self {
        Self {
            iterations: 20,
            eps: 1e-6,
        }
    }
}

impl SinkhornConfig {
    /// Checks `iterations ≥ 1` and `eps` finite and positive.
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            return Err(MhcError::ZeroIterations);
        }
        check_eps("the Sinkhorn–Knopp eps", self.eps)
    }
}

fn check_batch<T: Real>(what: &'static str, matrices: &[T], n: usize) -> Result<usize> {
    if n == 0 {
        return Err(MhcError::ZeroStreams);
    }
    let nn = n * n;
    if matrices.is_empty() {
        return Err(MhcError::EmptyBatch);
    }
    if !matrices.len().is_multiple_of(nn) {
        return Err(MhcError::ShapeMismatch {
            what,
            expected: (matrices.len() / nn + 1) * nn,
            got: matrices.len(),
        });
    }
    Ok(matrices.len() / nn)
}

/// Batched Sinkhorn–Knopp forward (paper Eq. 9).
///
/// `logits` and `output` hold `batch` row-major `n×n` matrices back to back
/// (`logits[b·n² + o·n + i]` is `H̃_res[o, i]` of matrix `b`). Returns the SK
/// residual `max_b max_i |Σ_o output[b, o, i] − 1|`.
pub fn sinkhorn_knopp<T: Real>(
    logits: &[T],
    n: usize,
    config: &SinkhornConfig,
    output: &mut [T],
) -> Result<T> {
    config.validate()?;
    check_batch("Sinkhorn–Knopp logits", logits, n)?;
    check_len("Sinkhorn–Knopp output", output, logits.len())?;
    check_finite("Sinkhorn–Knopp logits", logits)?;
    let nn = n * n;
    let eps = T::of(config.eps);
    let mut residual = T::zero();
    for (l, m) in logits.chunks_exact(nn).zip(output.chunks_exact_mut(nn)) {
        forward_one(l, n, config.iterations, eps, m);
        residual = residual.max(column_residual(m, n));
    }
    Ok(residual)
}

/// Batched Sinkhorn–Knopp backward: `grad_logits = (∂SK/∂logits)ᵀ · grad_output`.
///
/// Recomputes the forward's iterates from `logits` into `scratch`, which must
/// hold at least [`sinkhorn_knopp_backward_scratch_len`]`(n, iterations)`
/// elements (no allocation). `grad_logits` is overwritten.
pub fn sinkhorn_knopp_backward<T: Real>(
    logits: &[T],
    n: usize,
    config: &SinkhornConfig,
    grad_output: &[T],
    grad_logits: &mut [T],
    scratch: &mut [T],
) -> Result<()> {
    config.validate()?;
    check_batch("Sinkhorn–Knopp logits", logits, n)?;
    check_len("Sinkhorn–Knopp grad_output", grad_output, logits.len())?;
    check_len("Sinkhorn–Knopp grad_logits", grad_logits, logits.len())?;
    let need = sinkhorn_knopp_backward_scratch_len(n, config.iterations);
    if scratch.len() < need {
        return Err(MhcError::ShapeMismatch {
            what: "Sinkhorn–Knopp backward scratch",
            expected: need,
            got: scratch.len(),
        });
    }
    check_finite("Sinkhorn–Knopp logits", logits)?;
    check_finite("Sinkhorn–Knopp grad_output", grad_output)?;
    let nn = n * n;
    let eps = T::of(config.eps);
    for ((l, g), gl) in logits
        .chunks_exact(nn)
        .zip(grad_output.chunks_exact(nn))
        .zip(grad_logits.chunks_exact_mut(nn))
    {
        gl.copy_from_slice(g);
        backward_one(l, n, config.iterations, eps, gl, &mut scratch[..need]);
    }
    Ok(())
}

/// Elements of scratch [`sinkhorn_knopp_backward`] needs: the `2·t_max + 1`
/// iterates of one `n×n` matrix.
pub const fn sinkhorn_knopp_backward_scratch_len(n: usize, iterations: usize) -> usize {
    (2 * iterations + 1) * n * n
}

/// The SK residual of one row-major `n×n` matrix: `max_i |Σ_o m[o, i] − 1|`.
pub fn column_residual<T: Real>(m: &[T], n: usize) -> T {
    let mut worst = T::zero();
    for i in 0..n {
        let mut s = T::zero();
        for o in 0..n {
            s = s + m[o * n + i];
        }
        worst = worst.max((s - T::one()).abs());
    }
    worst
}

/// `m ← exp(l − colmax(l))`.
#[inline]
fn exp_shifted<T: Real>(l: &[T], n: usize, m: &mut [T]) {
    for i in 0..n {
        let mut max = l[i];
        for o in 1..n {
            max = max.max(l[o * n + i]);
        }
        for o in 0..n {
            m[o * n + i] = (l[o * n + i] - max).exp();
        }
    }
}

#[inline]
fn normalize_columns<T: Real>(m: &mut [T], n: usize, eps: T) {
    for i in 0..n {
        let mut s = T::zero();
        for o in 0..n {
            s = s + m[o * n + i];
        }
        let d = s.max(eps);
        for o in 0..n {
            m[o * n + i] = m[o * n + i] / d;
        }
    }
}

#[inline]
fn normalize_rows<T: Real>(m: &mut [T], n: usize, eps: T) {
    for row in m.chunks_exact_mut(n) {
        let s: T = row.iter().copied().fold(T::zero(), |a, b| a + b);
        let d = s.max(eps);
        for v in row.iter_mut() {
            *v = *v / d;
        }
    }
}

/// One matrix, no checks: `m ← SK(l)`.
#[inline]
pub(crate) fn forward_one<T: Real>(l: &[T], n: usize, iterations: usize, eps: T, m: &mut [T]) {
    exp_shifted(l, n, m);
    for _ in 0..iterations {
        normalize_columns(m, n, eps);
        normalize_rows(m, n, eps);
    }
}

/// One matrix, no checks: on entry `g` holds `∂L/∂SK(l)`, on exit `∂L/∂l`.
/// `scratch` holds `(2·iterations + 1)·n²` elements.
pub(crate) fn backward_one<T: Real>(
    l: &[T],
    n: usize,
    iterations: usize,
    eps: T,
    g: &mut [T],
    scratch: &mut [T],
) {
    let nn = n * n;
    // Recompute and keep every iterate: states[k] is the input of step k,
    // step 2t the column normalisation and step 2t+1 the row one of iteration t.
    exp_shifted(l, n, &mut scratch[..nn]);
    for k in 0..2 * iterations {
        let (done, rest) = scratch.split_at_mut((k + 1) * nn);
        let next = &mut rest[..nn];
        next.copy_from_slice(&done[k * nn..]);
        if k % 2 == 0 {
            normalize_columns(next, n, eps);
        } else {
            normalize_rows(next, n, eps);
        }
    }
    // Reverse sweep. For y = m / max(s, eps) with s = Σ m:
    // ∂L/∂m_k = (g_k − [s > eps]·Σ_j g_j y_j) / max(s, eps).
    for k in (0..2 * iterations).rev() {
        let input = &scratch[k * nn..(k + 1) * nn];
        let output = &scratch[(k + 1) * nn..(k + 2) * nn];
        if k % 2 == 0 {
            for i in 0..n {
                let mut s = T::zero();
                let mut gy = T::zero();
                for o in 0..n {
                    s = s + input[o * n + i];
                    gy = gy + g[o * n + i] * output[o * n + i];
                }
                let active = if s > eps { T::one() } else { T::zero() };
                let d = s.max(eps);
                for o in 0..n {
                    g[o * n + i] = (g[o * n + i] - active * gy) / d;
                }
            }
        } else {
            for o in 0..n {
                let row_in = &input[o * n..(o + 1) * n];
                let row_out = &output[o * n..(o + 1) * n];
                let grow = &mut g[o * n..(o + 1) * n];
                let s = row_in.iter().copied().fold(T::zero(), |a, b| a + b);
                let gy = grow
                    .iter()
                    .zip(row_out)
                    .fold(T::zero(), |a, (&gv, &yv)| a + gv * yv);
                let active = if s > eps { T::one() } else { T::zero() };
                let d = s.max(eps);
                for v in grow.iter_mut() {
                    *v = (*v - active * gy) / d;
                }
            }
        }
    }
    // Through exp: ∂/∂l = g ⊙ M⁽⁰⁾ (the column shift carries no gradient; see module docs).
    for (gv, &m0) in g.iter_mut().zip(&scratch[..nn]) {
        *gv = *gv * m0;
    }
}

/// Closed-form diagonal of `SK(c·I)` for an `n×n` matrix: `e^c / (e^c + n − 1)`.
///
/// For a `c·I` bias the first column normalisation already gives a
/// symmetric doubly stochastic matrix, so every later step is a fixed point.
pub fn identity_bias_diagonal(c: f64, n: usize) -> f64 {
    let e = libm::exp(c);
    e / (e + n as f64 - 1.0)
}

/// The bias `c` for which `SK(c·I)` has diagonal `diagonal` (`n ≥ 2`, `1/n < diagonal < 1`):
/// `c = ln(diagonal·(n − 1) / (1 − diagonal))`. Returns 0 for `n = 1`.
pub fn identity_bias_for_diagonal(diagonal: f64, n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    libm::log(diagonal * (n as f64 - 1.0) / (1.0 - diagonal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use alloc::vec;
    use alloc::vec::Vec;

    fn random(n: usize, count: usize, std: f64, seed: u64) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..count * n * n).map(|_| r.normal() * std).collect()
    }

    #[test]
    fn rows_exact_columns_within_residual() {
        for n in [1usize, 2, 3, 4, 8] {
            let l = random(n, 5, 3.0, n as u64);
            let mut m = vec![0.0; l.len()];
            let res = sinkhorn_knopp(&l, n, &SinkhornConfig::default(), &mut m).unwrap();
            for mat in m.chunks_exact(n * n) {
                assert!(mat.iter().all(|&v| v >= 0.0));
                for row in mat.chunks_exact(n) {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
                }
                assert!(column_residual(mat, n) <= res);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for n in [1usize, 2, 4, 8] {
            for iters in [1usize, 3, 20] {
                let cfg = SinkhornConfig {
                    iterations: iters,
                    eps: 1e-6,
                };
                let l = random(n, 2, 2.0, 10 + n as u64);
                let g = random(n, 2, 1.0, 20 + n as u64);
                let mut gl = vec![0.0; l.len()];
                let mut scratch = vec![0.0; sinkhorn_knopp_backward_scratch_len(n, iters)];
                sinkhorn_knopp_backward(&l, n, &cfg, &g, &mut gl, &mut scratch).unwrap();
                let loss = |l: &[f64]| {
                    let mut m = vec![0.0; l.len()];
                    sinkhorn_knopp(l, n, &cfg, &mut m).unwrap();
                    m.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
                };
                let h = 1e-6;
                for k in 0..l.len() {
                    let mut lp = l.clone();
                    lp[k] += h;
                    let mut lm = l.clone();
                    lm[k] -= h;
                    let fd = (loss(&lp) - loss(&lm)) / (2.0 * h);
                    assert!(
                        (fd - gl[k]).abs() < 1e-7,
                        "n={n} iters={iters} k={k}: fd {fd} vs {}",
                        gl[k]
                    );
                }
            }
        }
    }

    #[test]
    fn errors_are_typed() {
        let mut out = [0.0f32; 4];
        let cfg = SinkhornConfig::default();
        assert_eq!(
            sinkhorn_knopp(&[0.0f32; 4], 0, &cfg, &mut out),
            Err(MhcError::ZeroStreams)
        );
        assert_eq!(
            sinkhorn_knopp(&[] as &[f32], 2, &cfg, &mut []),
            Err(MhcError::EmptyBatch)
        );
        assert!(matches!(
            sinkhorn_knopp(&[0.0f32; 5], 2, &cfg, &mut [0.0; 5]),
            Err(MhcError::ShapeMismatch { .. })
        ));
        let bad = SinkhornConfig {
            iterations: 0,
            ..cfg
        };
        assert_eq!(
            sinkhorn_knopp(&[1.0f32; 4], 2, &bad, &mut out),
            Err(MhcError::ZeroIterations)
        );
        let nan = [1.0, f32::NAN, 0.0, 0.0];
        assert_eq!(
            sinkhorn_knopp(&nan, 2, &cfg, &mut out),
            Err(MhcError::NonFinite {
                what: "Sinkhorn–Knopp logits",
                index: 1
            })
        );
        let bad_eps = SinkhornConfig { eps: -1.0, ..cfg };
        assert!(matches!(
            sinkhorn_knopp(&[1.0f32; 4], 2, &bad_eps, &mut out),
            Err(MhcError::InvalidEpsilon { .. })
        ));
    }
}
