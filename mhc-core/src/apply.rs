//! Applying the maps: pre-aggregate `h = H_pre·x` and post/res merge
//! `x' = H_res·x + H_postᵀ·y`, batched over tokens, with their backward.
//!
//! Layouts (row-major): stream state `x [T, n, C]`; coefficients
//! `[T, K]` with `K = n² + 2n` and each token's row `[H_pre (n) | H_post (n) | H_res (n×n)]`;
//! sublayer input/output `h, y [T, C]`.

use crate::error::{MhcError, Result, check_len};
use crate::real::Real;

fn dims(n: usize, width: usize, x_len: usize) -> Result<usize> {
    if n == 0 {
        return Err(MhcError::ZeroStreams);
    }
    if width == 0 {
        return Err(MhcError::ZeroWidth);
    }
    if x_len == 0 {
        return Err(MhcError::EmptyBatch);
    }
    if !x_len.is_multiple_of(n * width) {
        return Err(MhcError::ShapeMismatch {
            what: "stream state x [tokens, n, C]",
            expected: (x_len / (n * width) + 1) * n * width,
            got: x_len,
        });
    }
    Ok(x_len / (n * width))
}

/// Pre-aggregate (paper Eq. 3's `H_pre·x`): `h[t, c] = Σ_i H_pre[t, i] · x[t, i, c]`.
pub fn pre_aggregate<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    h: &mut [T],
) -> Result<()> {
    let tokens = dims(n, width, x.len())?;
    check_len(
        "coefficients [tokens, n²+2n]",
        coefficients,
        tokens * (n * n + 2 * n),
    )?;
    check_len("sublayer input h [tokens, C]", h, tokens * width)?;
    pre_aggregate_unchecked(n, width, x, coefficients, h);
    Ok(())
}

pub(crate) fn pre_aggregate_unchecked<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    h: &mut [T],
) {
    let k = n * n + 2 * n;
    for ((xt, ct), ht) in x
        .chunks_exact(n * width)
        .zip(coefficients.chunks_exact(k))
        .zip(h.chunks_exact_mut(width))
    {
        // Start from the first stream's term so that n = 1, H_pre = 1 gives h = x exactly.
        let w0 = ct[0];
        for (hv, &xv) in ht.iter_mut().zip(&xt[..width]) {
            *hv = w0 * xv;
        }
        for i in 1..n {
            let w = ct[i];
            for (hv, &xv) in ht.iter_mut().zip(&xt[i * width..(i + 1) * width]) {
                *hv = *hv + w * xv;
            }
        }
    }
}

/// Post/res merge (paper Eq. 3): `x'[t, o, c] = Σ_i H_res[t, o, i] · x[t, i, c] + H_post[t, o] · y[t, c]`.
pub fn post_res_merge<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    y: &[T],
    out: &mut [T],
) -> Result<()> {
    let tokens = dims(n, width, x.len())?;
    check_len(
        "coefficients [tokens, n²+2n]",
        coefficients,
        tokens * (n * n + 2 * n),
    )?;
    check_len("sublayer output y [tokens, C]", y, tokens * width)?;
    check_len("output x' [tokens, n, C]", out, x.len())?;
    post_res_merge_unchecked(n, width, x, coefficients, y, out);
    Ok(())
}

pub(crate) fn post_res_merge_unchecked<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    y: &[T],
    out: &mut [T],
) {
    let k = n * n + 2 * n;
    for (((xt, ct), yt), ot) in x
        .chunks_exact(n * width)
        .zip(coefficients.chunks_exact(k))
        .zip(y.chunks_exact(width))
        .zip(out.chunks_exact_mut(n * width))
    {
        let (post, res) = (&ct[n..2 * n], &ct[2 * n..]);
        for o in 0..n {
            let orow = &mut ot[o * width..(o + 1) * width];
            let w0 = res[o * n];
            for (ov, &xv) in orow.iter_mut().zip(&xt[..width]) {
                *ov = w0 * xv;
            }
            for i in 1..n {
                let w = res[o * n + i];
                for (ov, &xv) in orow.iter_mut().zip(&xt[i * width..(i + 1) * width]) {
                    *ov = *ov + w * xv;
                }
            }
            let p = post[o];
            for (ov, &yv) in orow.iter_mut().zip(yt) {
                *ov = *ov + p * yv;
            }
        }
    }
}

/// Backward of [`post_res_merge`]. Overwrites `grad_x` with `H_resᵀ·g`,
/// `grad_y` with `Σ_o H_post[o]·g_o`, and the `H_post` and `H_res` parts of
/// `grad_coefficients` with `g_o·y` and `g_o·x_i` (the `H_pre` part is left as is).
pub fn post_res_merge_backward<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    y: &[T],
    grad_out: &[T],
    grad_x: &mut [T],
    grad_y: &mut [T],
    grad_coefficients: &mut [T],
) -> Result<()> {
    let tokens = dims(n, width, x.len())?;
    let k = n * n + 2 * n;
    check_len("coefficients [tokens, n²+2n]", coefficients, tokens * k)?;
    check_len("sublayer output y [tokens, C]", y, tokens * width)?;
    check_len("grad of x' [tokens, n, C]", grad_out, x.len())?;
    check_len("grad of x [tokens, n, C]", grad_x, x.len())?;
    check_len("grad of y [tokens, C]", grad_y, tokens * width)?;
    check_len(
        "grad of coefficients [tokens, n²+2n]",
        grad_coefficients,
        tokens * k,
    )?;
    post_res_merge_backward_unchecked(
        n,
        width,
        x,
        coefficients,
        y,
        grad_out,
        grad_x,
        grad_y,
        grad_coefficients,
    );
    Ok(())
}

pub(crate) fn post_res_merge_backward_unchecked<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    y: &[T],
    grad_out: &[T],
    grad_x: &mut [T],
    grad_y: &mut [T],
    grad_coefficients: &mut [T],
) {
    let k = n * n + 2 * n;
    let s = n * width;
    for t in 0..x.len() / s {
        let xt = &x[t * s..(t + 1) * s];
        let gt = &grad_out[t * s..(t + 1) * s];
        let ct = &coefficients[t * k..(t + 1) * k];
        let yt = &y[t * width..(t + 1) * width];
        let gxt = &mut grad_x[t * s..(t + 1) * s];
        let gyt = &mut grad_y[t * width..(t + 1) * width];
        let gct = &mut grad_coefficients[t * k..(t + 1) * k];
        let (post, res) = (&ct[n..2 * n], &ct[2 * n..]);
        gyt.iter_mut().for_each(|v| *v = T::zero());
        gxt.iter_mut().for_each(|v| *v = T::zero());
        for o in 0..n {
            let go = &gt[o * width..(o + 1) * width];
            gct[n + o] = dot(go, yt);
            let p = post[o];
            for (a, &b) in gyt.iter_mut().zip(go) {
                *a = *a + p * b;
            }
            for i in 0..n {
                let xi = &xt[i * width..(i + 1) * width];
                gct[2 * n + o * n + i] = dot(go, xi);
                let w = res[o * n + i];
                for (a, &b) in gxt[i * width..(i + 1) * width].iter_mut().zip(go) {
                    *a = *a + w * b;
                }
            }
        }
    }
}

/// Backward of [`pre_aggregate`]. **Adds** `H_pre[i]·grad_h` to `grad_x`
/// and overwrites the `H_pre` part of `grad_coefficients` with `grad_h·x_i`.
pub fn pre_aggregate_backward<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    grad_h: &[T],
    grad_x: &mut [T],
    grad_coefficients: &mut [T],
) -> Result<()> {
    let tokens = dims(n, width, x.len())?;
    let k = n * n + 2 * n;
    check_len("coefficients [tokens, n²+2n]", coefficients, tokens * k)?;
    check_len("grad of h [tokens, C]", grad_h, tokens * width)?;
    check_len("grad of x [tokens, n, C]", grad_x, x.len())?;
    check_len(
        "grad of coefficients [tokens, n²+2n]",
        grad_coefficients,
        tokens * k,
    )?;
    pre_aggregate_backward_unchecked(n, width, x, coefficients, grad_h, grad_x, grad_coefficients);
    Ok(())
}

pub(crate) fn pre_aggregate_backward_unchecked<T: Real>(
    n: usize,
    width: usize,
    x: &[T],
    coefficients: &[T],
    grad_h: &[T],
    grad_x: &mut [T],
    grad_coefficients: &mut [T],
) {
    let k = n * n + 2 * n;
    let s = n * width;
    for t in 0..x.len() / s {
        let gh = &grad_h[t * width..(t + 1) * width];
        for i in 0..n {
            let xi = &x[t * s + i * width..t * s + (i + 1) * width];
            grad_coefficients[t * k + i] = dot(gh, xi);
            let w = coefficients[t * k + i];
            for (a, &b) in grad_x[t * s + i * width..t * s + (i + 1) * width]
                .iter_mut()
                .zip(gh)
            {
                *a = *a + w * b;
            }
        }
    }
}

/// `Σ a_k b_k` with eight partial sums (lets the compiler vectorise; the
/// summation order is fixed, so results are deterministic).
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = acc[k] + x[k] * y[k];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in ra.iter().zip(rb) {
        tail = tail + x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
