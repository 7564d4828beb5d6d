//! Diagnostics of the paper's §3 and Figs. 3/7: Amax gains of one mapping and
//! of the composite `H_res⁽ˡ⁾ ··· H_res⁽¹⁾` over depth, and the SK residual.

use crate::error::{MhcError, Result, check_len};
use crate::real::Real;

pub use crate::sinkhorn::column_residual as sinkhorn_residual;

/// Amax gains of an `n×n` mapping `A` (paper §3).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct AmaxGain<T> {
    /// Forward gain: the largest absolute row sum, `max_o Σ_i |A[o, i]|`.
    pub forward: T,
    /// Backward gain: the largest absolute column sum, `max_i Σ_o |A[o, i]|`.
    pub backward: T,
}

/// Amax forward and backward gains of a row-major `n×n` matrix.
pub fn amax_gain<T: Real>(a: &[T], n: usize) -> Result<AmaxGain<T>> {
    if n == 0 {
        return Err(MhcError::ZeroStreams);
    }
    check_len("mapping [n, n]", a, n * n)?;
    Ok(amax_gain_unchecked(a, n))
}

pub(crate) fn amax_gain_unchecked<T: Real>(a: &[T], n: usize) -> AmaxGain<T> {
    let mut forward = T::zero();
    let mut backward = T::zero();
    for o in 0..n {
        forward = forward.max(
            a[o * n..(o + 1) * n]
                .iter()
                .fold(T::zero(), |s, v| s + v.abs()),
        );
    }
    for i in 0..n {
        backward = backward.max((0..n).fold(T::zero(), |s, o| s + a[o * n + i].abs()));
    }
    AmaxGain { forward, backward }
}

/// Gains of the composite mapping at one depth, over the tokens of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct CompositeGain<T> {
    /// Mean over tokens of the forward gain.
    pub forward_mean: T,
    /// Max over tokens of the forward gain.
    pub forward_max: T,
    /// Mean over tokens of the backward gain.
    pub backward_mean: T,
    /// Max over tokens of the backward gain.
    pub backward_max: T,
}

/// Elements of scratch [`composite_gains`] needs: two `n×n` products.
pub const fn composite_gains_scratch_len(n: usize) -> usize {
    2 * n * n
}

/// Amax gains of the composite `P_l = H_res⁽ˡ⁾ ··· H_res⁽¹⁾` for every depth `l`
/// (paper Fig. 3/7), per token, reported as mean and max over tokens.
///
/// `layers[l]` holds layer `l`'s `H_res` for every token, `[tokens, n, n]`
/// (for example [`crate::Workspace::coefficients`] sliced per token, or copied
/// out). `out[l]` receives the gains of `P_l`. `scratch` holds at least
/// [`composite_gains_scratch_len`]`(n)` elements.
pub fn composite_gains<T: Real>(
    layers: &[&[T]],
    n: usize,
    out: &mut [CompositeGain<T>],
    scratch: &mut [T],
) -> Result<()> {
    if n == 0 {
        return Err(MhcError::ZeroStreams);
    }
    let Some(first) = layers.first() else {
        return Err(MhcError::EmptyBatch);
    };
    let nn = n * n;
    if first.is_empty() {
        return Err(MhcError::EmptyBatch);
    }
    let tokens = first.len() / nn;
    for l in layers {
        check_len("composite: per-layer H_res [tokens, n, n]", l, tokens * nn)?;
    }
    check_len("composite: output (one per layer)", out, layers.len())?;
    if scratch.len() < 2 * nn {
        return Err(MhcError::ShapeMismatch {
            what: "composite gains scratch",
            expected: 2 * nn,
            got: scratch.len(),
        });
    }
    for g in out.iter_mut() {
        *g = CompositeGain {
            forward_mean: T::zero(),
            forward_max: T::zero(),
            backward_mean: T::zero(),
            backward_max: T::zero(),
        };
    }
    let (prod, tmp) = scratch[..2 * nn].split_at_mut(nn);
    for t in 0..tokens {
        prod.copy_from_slice(&layers[0][t * nn..(t + 1) * nn]);
        for (l, g) in out.iter_mut().enumerate() {
            if l > 0 {
                // P_l = H_res⁽ˡ⁾ · P_{l−1}
                let h = &layers[l][t * nn..(t + 1) * nn];
                for o in 0..n {
                    for i in 0..n {
                        tmp[o * n + i] =
                            (0..n).fold(T::zero(), |s, j| s + h[o * n + j] * prod[j * n + i]);
                    }
                }
                prod.copy_from_slice(tmp);
            }
            let gain = amax_gain_unchecked(prod, n);
            g.forward_mean = g.forward_mean + gain.forward;
            g.backward_mean = g.backward_mean + gain.backward;
            g.forward_max = g.forward_max.max(gain.forward);
            g.backward_max = g.backward_max.max(gain.backward);
        }
    }
    let tf = T::of(tokens as f64);
    for g in out.iter_mut() {
        g.forward_mean = g.forward_mean / tf;
        g.backward_mean = g.backward_mean / tf;
    }
    Ok(())
}
