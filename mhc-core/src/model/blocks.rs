//! The two sublayers every block wraps: `F_attn(h) = W_o·Attn(RMSNorm(h))`
//! (causal multi-head) and `F_mlp(h) = W_2·GELU(W_1·RMSNorm(h))`.
//! Both implement [`Sublayer`], keep what their backward needs from the last
//! forward, and accumulate their parameter gradients in `vjp`.

use alloc::vec;
use alloc::vec::Vec;

use super::ops::{
    gelu, gelu_grad, matmul, matmul_grad_a, matmul_grad_b, rmsnorm, rmsnorm_backward,
};
use crate::apply::dot;
use crate::error::{MhcError, Result};
use crate::real::Real;
use crate::wrapper::Sublayer;

/// A tensor with its gradient, name and whether weight decay applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Param<T> {
    /// Values.
    pub value: Vec<T>,
    /// Accumulated gradient (same length).
    pub grad: Vec<T>,
}

impl<T: Real> Param<T> {
    pub(crate) fn new(value: Vec<T>) -> Self {
        let grad = vec![T::zero(); value.len()];
        Self { value, grad }
    }
}

fn grow<T: Real>(buffer: &mut Vec<T>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, T::zero());
    }
}

/// Batch shape a sublayer runs on: `batch` sequences of `seq` positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
}

impl SeqShape {
    fn tokens(self) -> usize {
        self.batch * self.seq
    }
}

/// Causal multi-head self-attention behind an RMSNorm.
#[derive(Clone, Debug)]
pub struct Attention<T> {
    width: usize,
    heads: usize,
    eps: T,
    /// RMSNorm weight `[C]`.
    pub norm: Param<T>,
    /// `W_qkv [C, 3C]` (columns: q, k, v; head `h` owns columns `h·d..(h+1)·d` of each).
    pub wqkv: Param<T>,
    /// `W_o [C, C]`.
    pub wo: Param<T>,
    /// Shape of the next forward.
    pub shape: SeqShape,
    normed: Vec<T>,
    inv_rms: Vec<T>,
    qkv: Vec<T>,
    probs: Vec<T>,
    attn: Vec<T>,
    g_attn: Vec<T>,
    g_qkv: Vec<T>,
    g_normed: Vec<T>,
    g_probs: Vec<T>,
}

impl<T: Real> Attention<T> {
    pub(crate) fn new(width: usize, heads: usize, eps: T, wqkv: Vec<T>, wo: Vec<T>) -> Self {
        Self {
            width,
            heads,
            eps,
            norm: Param::new(vec![T::one(); width]),
            wqkv: Param::new(wqkv),
            wo: Param::new(wo),
            shape: SeqShape::default(),
            normed: Vec::new(),
            inv_rms: Vec::new(),
            qkv: Vec::new(),
            probs: Vec::new(),
            attn: Vec::new(),
            g_attn: Vec::new(),
            g_qkv: Vec::new(),
            g_normed: Vec::new(),
            g_probs: Vec::new(),
        }
    }

    fn check(&self, input: &[T]) -> Result<usize> {
        let tokens = self.shape.tokens();
        if tokens == 0 || input.len() != tokens * self.width {
            return Err(MhcError::ShapeMismatch {
                what: "attention input [batch·seq, C]",
                expected: tokens * self.width,
                got: input.len(),
            });
        }
        Ok(tokens)
    }
}

impl<T: Real> Sublayer<T> for Attention<T> {
    fn forward(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let tokens = self.check(input)?;
        let (c, h) = (self.width, self.heads);
        let d = c / h;
        let SeqShape { batch, seq } = self.shape;
        grow(&mut self.normed, tokens * c);
        grow(&mut self.inv_rms, tokens);
        grow(&mut self.qkv, tokens * 3 * c);
        grow(&mut self.probs, batch * h * seq * seq);
        grow(&mut self.attn, tokens * c);
        rmsnorm(
            input,
            &self.norm.value,
            self.eps,
            &mut self.normed[..tokens * c],
            &mut self.inv_rms[..tokens],
        );
        matmul(
            &self.normed,
            &self.wqkv.value,
            &mut self.qkv,
            tokens,
            c,
            3 * c,
        );
        let scale = T::one() / T::of(d as f64).sqrt();
        for b in 0..batch {
            for hh in 0..h {
                for t in 0..seq {
                    let row = (b * seq + t) * 3 * c;
                    let q = &self.qkv[row + hh * d..row + (hh + 1) * d];
                    let p = &mut self.probs
                        [((b * h + hh) * seq + t) * seq..((b * h + hh) * seq + t + 1) * seq];
                    let mut max = T::neg_infinity();
                    for u in 0..=t {
                        let kr = (b * seq + u) * 3 * c + c + hh * d;
                        p[u] = dot(q, &self.qkv[kr..kr + d]) * scale;
                        max = max.max(p[u]);
                    }
                    let mut sum = T::zero();
                    for pu in p[..=t].iter_mut() {
                        *pu = (*pu - max).exp();
                        sum = sum + *pu;
                    }
                    let inv = T::one() / sum;
                    p[..=t].iter_mut().for_each(|v| *v = *v * inv);
                    p[t + 1..].iter_mut().for_each(|v| *v = T::zero());
                    let o = &mut self.attn
                        [(b * seq + t) * c + hh * d..(b * seq + t) * c + (hh + 1) * d];
                    o.iter_mut().for_each(|v| *v = T::zero());
                    for u in 0..=t {
                        let vr = (b * seq + u) * 3 * c + 2 * c + hh * d;
                        let pu = p[u];
                        for (ov, &vv) in o.iter_mut().zip(&self.qkv[vr..vr + d]) {
                            *ov = *ov + pu * vv;
                        }
                    }
                }
            }
        }
        matmul(&self.attn, &self.wo.value, output, tokens, c, c);
        Ok(())
    }

    fn vjp(&mut self, input: &[T], grad_output: &[T], grad_input: &mut [T]) -> Result<()> {
        let tokens = self.check(input)?;
        let (c, h) = (self.width, self.heads);
        let d = c / h;
        let SeqShape { batch, seq } = self.shape;
        grow(&mut self.g_attn, tokens * c);
        grow(&mut self.g_qkv, tokens * 3 * c);
        grow(&mut self.g_normed, tokens * c);
        matmul_grad_b(&self.attn, grad_output, &mut self.wo.grad, tokens, c, c);
        matmul_grad_a(grad_output, &self.wo.value, &mut self.g_attn, tokens, c, c);
        let scale = T::one() / T::of(d as f64).sqrt();
        self.g_qkv[..tokens * 3 * c]
            .iter_mut()
            .for_each(|v| *v = T::zero());
        grow(&mut self.g_probs, seq);
        for b in 0..batch {
            for hh in 0..h {
                for t in 0..seq {
                    let p = &self.probs
                        [((b * h + hh) * seq + t) * seq..((b * h + hh) * seq + t + 1) * seq];
                    let go =
                        &self.g_attn[(b * seq + t) * c + hh * d..(b * seq + t) * c + (hh + 1) * d];
                    // ∂p_u = ∂o·v_u; ∂v_u += p_u ∂o; ∂s_u = p_u(∂p_u − Σ p ∂p)
                    let mut pdp = T::zero();
                    for u in 0..=t {
                        let vr = (b * seq + u) * 3 * c + 2 * c + hh * d;
                        self.g_probs[u] = dot(go, &self.qkv[vr..vr + d]);
                        pdp = pdp + p[u] * self.g_probs[u];
                        let pu = p[u];
                        for (gv, &g) in self.g_qkv[vr..vr + d].iter_mut().zip(go) {
                            *gv = *gv + pu * g;
                        }
                    }
                    let qr = (b * seq + t) * 3 * c + hh * d;
                    for u in 0..=t {
                        let ds = p[u] * (self.g_probs[u] - pdp) * scale;
                        let kr = (b * seq + u) * 3 * c + c + hh * d;
                        for j in 0..d {
                            let kv = self.qkv[kr + j];
                            let qv = self.qkv[qr + j];
                            self.g_qkv[qr + j] = self.g_qkv[qr + j] + ds * kv;
                            self.g_qkv[kr + j] = self.g_qkv[kr + j] + ds * qv;
                        }
                    }
                }
            }
        }
        matmul_grad_b(
            &self.normed,
            &self.g_qkv,
            &mut self.wqkv.grad,
            tokens,
            c,
            3 * c,
        );
        matmul_grad_a(
            &self.g_qkv,
            &self.wqkv.value,
            &mut self.g_normed,
            tokens,
            c,
            3 * c,
        );
        rmsnorm_backward(
            input,
            &self.norm.value,
            &self.inv_rms,
            &self.g_normed[..tokens * c],
            grad_input,
            &mut self.norm.grad,
        );
        Ok(())
    }
}

/// Two-layer GELU MLP behind an RMSNorm, hidden width `4C`.
#[derive(Clone, Debug)]
pub struct Mlp<T> {
    width: usize,
    hidden: usize,
    eps: T,
    /// RMSNorm weight `[C]`.
    pub norm: Param<T>,
    /// `W_1 [C, 4C]`.
    pub w1: Param<T>,
    /// `W_2 [4C, C]`.
    pub w2: Param<T>,
    normed: Vec<T>,
    inv_rms: Vec<T>,
    pre: Vec<T>,
    act: Vec<T>,
    g_act: Vec<T>,
    g_normed: Vec<T>,
}

impl<T: Real> Mlp<T> {
    pub(crate) fn new(width: usize, hidden: usize, eps: T, w1: Vec<T>, w2: Vec<T>) -> Self {
        Self {
            width,
            hidden,
            eps,
            norm: Param::new(vec![T::one(); width]),
            w1: Param::new(w1),
            w2: Param::new(w2),
            normed: Vec::new(),
            inv_rms: Vec::new(),
            pre: Vec::new(),
            act: Vec::new(),
            g_act: Vec::new(),
            g_normed: Vec::new(),
        }
    }
}

impl<T: Real> Sublayer<T> for Mlp<T> {
    fn forward(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let (c, f) = (self.width, self.hidden);
        let tokens = input.len() / c;
        grow(&mut self.normed, tokens * c);
        grow(&mut self.inv_rms, tokens);
        grow(&mut self.pre, tokens * f);
        grow(&mut self.act, tokens * f);
        rmsnorm(
            input,
            &self.norm.value,
            self.eps,
            &mut self.normed[..tokens * c],
            &mut self.inv_rms[..tokens],
        );
        matmul(&self.normed, &self.w1.value, &mut self.pre, tokens, c, f);
        for (a, &u) in self.act[..tokens * f]
            .iter_mut()
            .zip(&self.pre[..tokens * f])
        {
            *a = gelu(u);
        }
        matmul(&self.act, &self.w2.value, output, tokens, f, c);
        Ok(())
    }

    fn vjp(&mut self, input: &[T], grad_output: &[T], grad_input: &mut [T]) -> Result<()> {
        let (c, f) = (self.width, self.hidden);
        let tokens = input.len() / c;
        grow(&mut self.g_act, tokens * f);
        grow(&mut self.g_normed, tokens * c);
        matmul_grad_b(&self.act, grad_output, &mut self.w2.grad, tokens, f, c);
        matmul_grad_a(grad_output, &self.w2.value, &mut self.g_act, tokens, f, c);
        for (g, &u) in self.g_act[..tokens * f]
            .iter_mut()
            .zip(&self.pre[..tokens * f])
        {
            *g = *g * gelu_grad(u);
        }
        matmul_grad_b(&self.normed, &self.g_act, &mut self.w1.grad, tokens, c, f);
        matmul_grad_a(
            &self.g_act,
            &self.w1.value,
            &mut self.g_normed,
            tokens,
            c,
            f,
        );
        rmsnorm_backward(
            input,
            &self.norm.value,
            &self.inv_rms,
            &self.g_normed[..tokens * c],
            grad_input,
            &mut self.norm.grad,
        );
        Ok(())
    }
}

/// One new position of an [`Attention`] sublayer against the keys and values
/// of the positions before it (incremental decoding): the same arithmetic, in
/// the same order, as the last row of [`Attention`]'s batched forward, so the
/// output is bit for bit that row's.
pub(crate) struct CachedAttention<'a, T> {
    /// The sublayer whose weights are used.
    pub attn: &'a Attention<T>,
    /// Rows `[pos, C]` of the keys so far; this position's row is appended.
    pub keys: &'a mut Vec<T>,
    /// Rows `[pos, C]` of the values so far; this position's row is appended.
    pub values: &'a mut Vec<T>,
    /// Scratch: normalised input, 1/rms, qkv, attention output, probabilities.
    pub scratch: &'a mut CachedScratch<T>,
}

/// Buffers of [`CachedAttention`], reused across positions.
#[derive(Clone, Debug, Default)]
pub(crate) struct CachedScratch<T> {
    normed: Vec<T>,
    inv_rms: Vec<T>,
    qkv: Vec<T>,
    attn: Vec<T>,
    probs: Vec<T>,
}

impl<T: Real> Sublayer<T> for CachedAttention<'_, T> {
    fn forward(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let a = self.attn;
        let (c, h) = (a.width, a.heads);
        if input.len() != c || output.len() != c {
            return Err(MhcError::ShapeMismatch {
                what: "incremental attention input [1, C]",
                expected: c,
                got: input.len(),
            });
        }
        let d = c / h;
        let s = &mut *self.scratch;
        grow(&mut s.normed, c);
        grow(&mut s.inv_rms, 1);
        grow(&mut s.qkv, 3 * c);
        grow(&mut s.attn, c);
        rmsnorm(
            input,
            &a.norm.value,
            a.eps,
            &mut s.normed[..c],
            &mut s.inv_rms[..1],
        );
        matmul(&s.normed, &a.wqkv.value, &mut s.qkv, 1, c, 3 * c);
        self.keys.extend_from_slice(&s.qkv[c..2 * c]);
        self.values.extend_from_slice(&s.qkv[2 * c..3 * c]);
        let t = self.keys.len() / c - 1;
        grow(&mut s.probs, t + 1);
        let scale = T::one() / T::of(d as f64).sqrt();
        for hh in 0..h {
            let q = &s.qkv[hh * d..(hh + 1) * d];
            let p = &mut s.probs[..=t];
            let mut max = T::neg_infinity();
            for u in 0..=t {
                let kr = u * c + hh * d;
                p[u] = dot(q, &self.keys[kr..kr + d]) * scale;
                max = max.max(p[u]);
            }
            let mut sum = T::zero();
            for pu in p.iter_mut() {
                *pu = (*pu - max).exp();
                sum = sum + *pu;
            }
            let inv = T::one() / sum;
            p.iter_mut().for_each(|v| *v = *v * inv);
            let o = &mut s.attn[hh * d..(hh + 1) * d];
            o.iter_mut().for_each(|v| *v = T::zero());
            for u in 0..=t {
                let vr = u * c + hh * d;
                let pu = p[u];
                for (ov, &vv) in o.iter_mut().zip(&self.values[vr..vr + d]) {
                    *ov = *ov + pu * vv;
                }
            }
        }
        matmul(&s.attn, &a.wo.value, output, 1, c, c);
        Ok(())
    }

    fn vjp(&mut self, _: &[T], _: &[T], _: &mut [T]) -> Result<()> {
        Err(MhcError::Sublayer(
            "incremental attention is for inference: it has no backward".into(),
        ))
    }
}
