//! The wrapper `x' = H_res·x + H_postᵀ·F(H_pre·x)` (paper Eq. 3) around any
//! sublayer, its coefficients (Eqs. 5 and 7–9), forward and backward.

use alloc::vec;
use alloc::vec::Vec;

use crate::apply::{
    dot, post_res_merge_backward_unchecked, post_res_merge_unchecked,
    pre_aggregate_backward_unchecked, pre_aggregate_unchecked,
};
use crate::connection::{ConnectionConfig, ConnectionParams, InitConfig, Scheme};
use crate::error::{MhcError, Result, check_finite, check_len};
use crate::real::Real;
use crate::rng::Rng;
use crate::sinkhorn::{
    backward_one as sk_backward_one, forward_one as sk_forward_one,
    sinkhorn_knopp_backward_scratch_len,
};

/// A sublayer `F: R^C → R^C` applied to every token (attention, MLP, …),
/// with its vector–Jacobian product.
///
/// Both methods work on a batch: `input`, `output`, `grad_output` and
/// `grad_input` are `[tokens, C]` row-major. A sublayer with parameters
/// accumulates their gradients itself inside `vjp`.
pub trait Sublayer<T: Real> {
    /// `output = F(input)`.
    fn forward(&mut self, input: &[T], output: &mut [T]) -> Result<()>;
    /// `grad_input = (∂F/∂input)ᵀ · grad_output`, at the same `input` as the forward.
    fn vjp(&mut self, input: &[T], grad_output: &[T], grad_input: &mut [T]) -> Result<()>;
}

/// Caller-owned buffers for one wrapped sublayer: the forward's saved state
/// (coefficients, the projection, norms, `h`, `y`) and the backward's scratch.
///
/// Allocated once by [`Workspace::new`] for up to `capacity` tokens; forward and
/// backward then allocate nothing. [`Workspace::len_for`] gives its size.
#[derive(Clone, Debug)]
pub struct Workspace<T> {
    n: usize,
    width: usize,
    capacity: usize,
    /// Tokens of the last forward (0: none yet).
    tokens: usize,
    coefficients: Vec<T>,
    projection: Vec<T>,
    norms: Vec<T>,
    h: Vec<T>,
    y: Vec<T>,
    grad_h: Vec<T>,
    grad_y: Vec<T>,
    grad_coefficients: Vec<T>,
    scratch: Vec<T>,
}

impl<T: Real> Workspace<T> {
    fn lens(config: &ConnectionConfig, tokens: usize) -> [usize; 9] {
        let (n, c, k) = (config.n, config.width, config.coefficient_len());
        let sk = sinkhorn_knopp_backward_scratch_len(n, config.sinkhorn.iterations);
        // scratch: SK iterates | n² logits | K for dp / dz | nC for grad of x̃ or (v⊙γ)
        let scratch = sk + n * n + k + n * c;
        [
            tokens * k,
            tokens * k,
            tokens * n,
            tokens * c,
            tokens * c,
            tokens * c,
            tokens * c,
            tokens * k,
            scratch,
        ]
    }

    /// Elements (of `T`) a workspace for `tokens` tokens holds.
    pub fn len_for(config: &ConnectionConfig, tokens: usize) -> usize {
        Self::lens(config, tokens).iter().sum()
    }

    /// Allocates a workspace for batches of up to `capacity` tokens.
    pub fn new(config: &ConnectionConfig, capacity: usize) -> Self {
        let l = Self::lens(config, capacity);
        Self {
            n: config.n,
            width: config.width,
            capacity,
            tokens: 0,
            coefficients: vec![T::zero(); l[0]],
            projection: vec![T::zero(); l[1]],
            norms: vec![T::zero(); l[2]],
            h: vec![T::zero(); l[3]],
            y: vec![T::zero(); l[4]],
            grad_h: vec![T::zero(); l[5]],
            grad_y: vec![T::zero(); l[6]],
            grad_coefficients: vec![T::zero(); l[7]],
            scratch: vec![T::zero(); l[8]],
        }
    }

    /// Tokens the workspace can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Coefficients of the last forward, `[tokens, K]`, each row `[H_pre | H_post | H_res]`.
    pub fn coefficients(&self) -> &[T] {
        &self.coefficients[..self.tokens * (self.n * self.n + 2 * self.n)]
    }

    /// `H_res` of token `t` of the last forward (row-major `n×n`), or `None`
    /// when `t` is not a token of it.
    pub fn h_res(&self, t: usize) -> Option<&[T]> {
        let k = self.n * self.n + 2 * self.n;
        (t < self.tokens).then(|| &self.coefficients[t * k + 2 * self.n..(t + 1) * k])
    }

    /// Sublayer input `h = H_pre·x` of the last forward, `[tokens, C]`.
    pub fn sublayer_input(&self) -> &[T] {
        &self.h[..self.tokens * self.width]
    }

    /// Sublayer output `y = F(h)` of the last forward, `[tokens, C]`.
    pub fn sublayer_output(&self) -> &[T] {
        &self.y[..self.tokens * self.width]
    }

    /// Tokens of the last forward (0 before any).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// One wrapped sublayer's connection: configuration and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct HyperConnection<T> {
    config: ConnectionConfig,
    /// The learnable parameters (shapes fixed by the configuration).
    pub params: ConnectionParams<T>,
}

#[inline]
fn sigmoid<T: Real>(z: T) -> T {
    T::one() / (T::one() + (-z).exp())
}

impl<T: Real> HyperConnection<T> {
    /// A connection with given parameters; checks the configuration and every parameter's shape and values.
    pub fn new(config: ConnectionConfig, params: ConnectionParams<T>) -> Result<Self> {
        config.validate()?;
        params.validate(&config)?;
        Ok(Self { config, params })
    }

    /// A connection with the default initialisation ([`ConnectionParams::init`]).
    pub fn init(config: ConnectionConfig, init: &InitConfig, rng: &mut Rng) -> Result<Self> {
        config.validate()?;
        let params = ConnectionParams::init(&config, init, rng);
        Ok(Self { config, params })
    }

    /// The configuration.
    pub fn config(&self) -> &ConnectionConfig {
        &self.config
    }

    fn check_batch(&self, what: &'static str, buffer: &[T], ws: &Workspace<T>) -> Result<usize> {
        let s = self.config.state_len();
        if buffer.is_empty() {
            return Err(MhcError::EmptyBatch);
        }
        if !buffer.len().is_multiple_of(s) {
            return Err(MhcError::ShapeMismatch {
                what,
                expected: (buffer.len() / s + 1) * s,
                got: buffer.len(),
            });
        }
        let tokens = buffer.len() / s;
        if ws.n != self.config.n || ws.width != self.config.width {
            return Err(MhcError::ShapeMismatch {
                what: "workspace (made for another n or C)",
                expected: Workspace::<T>::len_for(&self.config, ws.capacity),
                got: Workspace::<T>::len_for(
                    &ConnectionConfig {
                        n: ws.n,
                        width: ws.width,
                        ..self.config
                    },
                    ws.capacity,
                ),
            });
        }
        if tokens > ws.capacity {
            return Err(MhcError::WorkspaceTooSmall {
                tokens,
                capacity: ws.capacity,
            });
        }
        Ok(tokens)
    }

    /// Coefficients `H_pre, H_post, H_res` for a batch `x [tokens, n, C]`
    /// (Eq. 5 for HC, Eqs. 7–9 for mHC), kept in `ws` for the backward and
    /// returned as `[tokens, K]` rows `[H_pre | H_post | H_res]`.
    ///
    /// mHC: `v = vec(x_t)`, `r = √(‖v‖²/(nC) + eps)`, `p = (v ⊙ γ)·φ`,
    /// `H̃ = α·p/r + b` per block, `H_pre = σ(H̃_pre)`, `H_post = 2σ(H̃_post)`,
    /// `H_res = SK(H̃_res)` — one pass over `x` gives both `p` and `r`.
    /// HC: `x̃_i = x_i / √(mean_c x_i² + eps)` per stream (no weight; θ absorbs it),
    /// `H_pre[i] = α_pre·tanh(θ_pre·x̃_i) + b_pre[i]`, likewise `H_post`, and
    /// `H_res[o, i] = α_res·tanh(θ_res[o]·x̃_i) + b_res[o, i]`.
    pub fn coefficients<'w>(&self, x: &[T], ws: &'w mut Workspace<T>) -> Result<&'w [T]> {
        self.params.validate(&self.config)?;
        let tokens = self.check_batch("stream state x [tokens, n, C]", x, ws)?;
        check_finite("stream state x", x)?;
        self.coefficients_unchecked(x, tokens, ws);
        ws.tokens = tokens;
        Ok(ws.coefficients())
    }

    fn coefficients_unchecked(&self, x: &[T], tokens: usize, ws: &mut Workspace<T>) {
        let cfg = &self.config;
        let (n, c, k) = (cfg.n, cfg.width, cfg.coefficient_len());
        let nc = n * c;
        let p = &self.params;
        let eps = T::of(cfg.rms_eps);
        let sk_eps = T::of(cfg.sinkhorn.eps);
        let two = T::of(2.0);
        for t in 0..tokens {
            let xt = &x[t * nc..(t + 1) * nc];
            let coef = &mut ws.coefficients[t * k..(t + 1) * k];
            let proj = &mut ws.projection[t * k..(t + 1) * k];
            let norms = &mut ws.norms[t * n..(t + 1) * n];
            match cfg.scheme {
                Scheme::Residual => coef.iter_mut().for_each(|v| *v = T::one()),
                Scheme::HcStatic => {
                    coef[..n].copy_from_slice(&p.b_pre);
                    coef[n..2 * n].copy_from_slice(&p.b_post);
                    coef[2 * n..].copy_from_slice(&p.b_res);
                }
                Scheme::HcDynamic => {
                    for i in 0..n {
                        let xi = &xt[i * c..(i + 1) * c];
                        let rms = (dot(xi, xi) / T::of(c as f64) + eps).sqrt();
                        norms[i] = rms;
                        let inv = T::one() / rms;
                        proj[i] = (dot(&p.theta_pre, xi) * inv).tanh();
                        proj[n + i] = (dot(&p.theta_post, xi) * inv).tanh();
                        for o in 0..n {
                            proj[2 * n + o * n + i] =
                                (dot(&p.theta_res[o * c..(o + 1) * c], xi) * inv).tanh();
                        }
                    }
                    let b = [&p.b_pre[..], &p.b_post[..], &p.b_res[..]];
                    for (blk, range) in [(0, 0..n), (1, n..2 * n), (2, 2 * n..k)] {
                        let a = p.alpha[blk];
                        for (j, bj) in range.clone().zip(b[blk]) {
                            coef[j] = a * proj[j] + *bj;
                        }
                    }
                }
                Scheme::MhcStatic | Scheme::MhcDynamic => {
                    // Static mHC is the dynamic form with α = 0: H̃ = b.
                    let mut s = [T::zero(); 3];
                    proj.iter_mut().for_each(|v| *v = T::zero());
                    if cfg.scheme == Scheme::MhcDynamic {
                        // p = (v ⊙ γ)·φ (φ row-major [nC, K]) and the sum of squares for r.
                        project(xt, &p.gamma, &p.phi, k, proj);
                        let r = (dot(xt, xt) / T::of(nc as f64) + eps).sqrt();
                        norms[0] = r;
                        s = [p.alpha[0] / r, p.alpha[1] / r, p.alpha[2] / r];
                    }
                    for i in 0..n {
                        coef[i] = sigmoid(s[0] * proj[i] + p.b_pre[i]);
                        coef[n + i] = two * sigmoid(s[1] * proj[n + i] + p.b_post[i]);
                    }
                    let logits = &mut ws.scratch[..n * n];
                    for j in 0..n * n {
                        logits[j] = s[2] * proj[2 * n + j] + p.b_res[j];
                    }
                    sk_forward_one(
                        logits,
                        n,
                        cfg.sinkhorn.iterations,
                        sk_eps,
                        &mut coef[2 * n..],
                    );
                }
            }
        }
    }

    /// Backward of [`Self::coefficients`]: given `grad_coefficients [tokens, K]`,
    /// **adds** the gradient with respect to `x` into `grad_x` and with respect
    /// to every parameter (φ, γ, b, α or θ) into `grads`. Needs the state of the
    /// [`Self::coefficients`] (or [`Self::forward`]) call on `ws` with the same `x`.
    pub fn coefficients_backward(
        &self,
        x: &[T],
        grad_coefficients: &[T],
        grad_x: &mut [T],
        grads: &mut ConnectionParams<T>,
        ws: &mut Workspace<T>,
    ) -> Result<()> {
        let tokens = self.check_batch("stream state x [tokens, n, C]", x, ws)?;
        if ws.tokens != tokens {
            return Err(MhcError::BackwardBeforeForward);
        }
        check_len(
            "grad of coefficients [tokens, n²+2n]",
            grad_coefficients,
            tokens * self.config.coefficient_len(),
        )?;
        check_len("grad of x [tokens, n, C]", grad_x, x.len())?;
        grads.validate(&self.config)?;
        check_finite("grad of coefficients", grad_coefficients)?;
        self.coefficients_backward_unchecked(x, grad_coefficients, tokens, grad_x, grads, ws);
        Ok(())
    }

    fn coefficients_backward_unchecked(
        &self,
        x: &[T],
        grad_coefficients: &[T],
        tokens: usize,
        grad_x: &mut [T],
        grads: &mut ConnectionParams<T>,
        ws: &mut Workspace<T>,
    ) {
        let cfg = &self.config;
        let (n, c, k) = (cfg.n, cfg.width, cfg.coefficient_len());
        let nc = n * c;
        let p = &self.params;
        let two = T::of(2.0);
        let sk_eps = T::of(cfg.sinkhorn.eps);
        let iters = cfg.sinkhorn.iterations;
        let sk_len = sinkhorn_knopp_backward_scratch_len(n, iters);
        let (sk_scratch, rest) = ws.scratch.split_at_mut(sk_len);
        let (logits, rest) = rest.split_at_mut(n * n);
        let (dz, rest) = rest.split_at_mut(k);
        let dvec = &mut rest[..nc];
        for t in 0..tokens {
            let xt = &x[t * nc..(t + 1) * nc];
            let gxt = &mut grad_x[t * nc..(t + 1) * nc];
            let coef = &ws.coefficients[t * k..(t + 1) * k];
            let proj = &ws.projection[t * k..(t + 1) * k];
            let norms = &ws.norms[t * n..(t + 1) * n];
            let gc = &grad_coefficients[t * k..(t + 1) * k];
            match cfg.scheme {
                Scheme::Residual => {}
                Scheme::HcStatic => add_blocks(grads, n, gc),
                Scheme::HcDynamic => {
                    add_blocks(grads, n, gc);
                    // z = tanh(u); H = α·z + b  ⇒  ∂u = α·g·(1 − z²), ∂α += Σ g·z.
                    for (blk, lo, hi) in [(0, 0, n), (1, n, 2 * n), (2, 2 * n, k)] {
                        let a = p.alpha[blk];
                        let mut ga = T::zero();
                        for j in lo..hi {
                            ga = ga + gc[j] * proj[j];
                            dz[j] = a * gc[j] * (T::one() - proj[j] * proj[j]);
                        }
                        grads.alpha[blk] = grads.alpha[blk] + ga;
                    }
                    // u_pre[i] = θ_pre·x̃_i etc.; collect ∂x̃ per stream, then through the RMSNorm.
                    for i in 0..n {
                        let xi = &xt[i * c..(i + 1) * c];
                        let inv = T::one() / norms[i];
                        let dxt = &mut dvec[i * c..(i + 1) * c];
                        for (cc, d) in dxt.iter_mut().enumerate() {
                            let mut acc = dz[i] * p.theta_pre[cc] + dz[n + i] * p.theta_post[cc];
                            for o in 0..n {
                                acc = acc + dz[2 * n + o * n + i] * p.theta_res[o * c + cc];
                            }
                            *d = acc;
                            let xtc = xi[cc] * inv;
                            grads.theta_pre[cc] = grads.theta_pre[cc] + dz[i] * xtc;
                            grads.theta_post[cc] = grads.theta_post[cc] + dz[n + i] * xtc;
                            for o in 0..n {
                                grads.theta_res[o * c + cc] =
                                    grads.theta_res[o * c + cc] + dz[2 * n + o * n + i] * xtc;
                            }
                        }
                        // ∂x = (∂x̃ − x̃·mean(∂x̃ ⊙ x̃)) / rms
                        let m = dot(dxt, xi) * inv / T::of(c as f64);
                        for ((g, &d), &xv) in
                            gxt[i * c..(i + 1) * c].iter_mut().zip(dxt.iter()).zip(xi)
                        {
                            *g = *g + (d - xv * inv * m) * inv;
                        }
                    }
                }
                Scheme::MhcStatic | Scheme::MhcDynamic => {
                    let dynamic = cfg.scheme == Scheme::MhcDynamic;
                    let (r, s) = if dynamic {
                        let r = norms[0];
                        (r, [p.alpha[0] / r, p.alpha[1] / r, p.alpha[2] / r])
                    } else {
                        (T::one(), [T::zero(); 3])
                    };
                    // ∂H̃ for the three blocks (dz holds it).
                    for i in 0..n {
                        let sp = coef[i];
                        dz[i] = gc[i] * sp * (T::one() - sp);
                        let sq = coef[n + i] / two;
                        dz[n + i] = gc[n + i] * two * sq * (T::one() - sq);
                    }
                    for j in 0..n * n {
                        logits[j] = s[2] * proj[2 * n + j] + p.b_res[j];
                    }
                    let dres = &mut dz[2 * n..];
                    dres.copy_from_slice(&gc[2 * n..]);
                    sk_backward_one(logits, n, iters, sk_eps, dres, sk_scratch);
                    add_blocks(grads, n, dz);
                    if dynamic {
                        // H̃ = α·p/r + b: ∂α += Σ ∂H̃·p/r, ∂p = α·∂H̃/r, ∂r = −Σ α·∂H̃·p / r².
                        let mut gr = T::zero();
                        for (blk, lo, hi) in [(0, 0, n), (1, n, 2 * n), (2, 2 * n, k)] {
                            let mut ga = T::zero();
                            for j in lo..hi {
                                ga = ga + dz[j] * proj[j];
                            }
                            grads.alpha[blk] = grads.alpha[blk] + ga / r;
                            gr = gr - s[blk] * ga / r;
                            for j in lo..hi {
                                dz[j] = dz[j] * s[blk];
                            }
                        }
                        // r = √(‖v‖²/(nC) + eps): ∂v += ∂r · v / (nC·r).
                        let rscale = gr / (T::of(nc as f64) * r);
                        for (m, &v) in xt.iter().enumerate() {
                            let frow = &p.phi[m * k..(m + 1) * k];
                            let fd = dot(frow, dz);
                            let gm = p.gamma[m];
                            gxt[m] = gxt[m] + gm * fd + rscale * v;
                            grads.gamma[m] = grads.gamma[m] + v * fd;
                            let vg = v * gm;
                            for (gphi, &d) in
                                grads.phi[m * k..(m + 1) * k].iter_mut().zip(dz.iter())
                            {
                                *gphi = *gphi + vg * d;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Forward of the wrapped sublayer (paper Eq. 3):
    /// `h = H_pre·x`, `y = F(h)`, `x' = H_res·x + H_postᵀ·y`, for a batch
    /// `x [tokens, n, C]` into `out [tokens, n, C]`. Keeps in `ws` what the
    /// backward needs.
    pub fn forward<S: Sublayer<T> + ?Sized>(
        &self,
        sublayer: &mut S,
        x: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
    ) -> Result<()> {
        self.params.validate(&self.config)?;
        let tokens = self.check_batch("stream state x [tokens, n, C]", x, ws)?;
        check_len("output x' [tokens, n, C]", out, x.len())?;
        check_finite("stream state x", x)?;
        ws.tokens = 0;
        self.coefficients_unchecked(x, tokens, ws);
        let (n, c, k) = (
            self.config.n,
            self.config.width,
            self.config.coefficient_len(),
        );
        let coef = &ws.coefficients[..tokens * k];
        pre_aggregate_unchecked(n, c, x, coef, &mut ws.h[..tokens * c]);
        sublayer.forward(&ws.h[..tokens * c], &mut ws.y[..tokens * c])?;
        check_finite("sublayer output F(h)", &ws.y[..tokens * c])?;
        post_res_merge_unchecked(n, c, x, coef, &ws.y[..tokens * c], out);
        ws.tokens = tokens;
        Ok(())
    }

    /// Backward of [`Self::forward`]: from `grad_out = ∂L/∂x'` computes
    /// `grad_x = ∂L/∂x` (overwritten), **adds** the parameter gradients to
    /// `grads`, and lets the sublayer accumulate its own through [`Sublayer::vjp`].
    /// Needs the forward's state in `ws` (same `x`).
    pub fn backward<S: Sublayer<T> + ?Sized>(
        &self,
        sublayer: &mut S,
        x: &[T],
        grad_out: &[T],
        grad_x: &mut [T],
        grads: &mut ConnectionParams<T>,
        ws: &mut Workspace<T>,
    ) -> Result<()> {
        let tokens = self.check_batch("stream state x [tokens, n, C]", x, ws)?;
        if ws.tokens != tokens {
            return Err(MhcError::BackwardBeforeForward);
        }
        check_len("grad of x' [tokens, n, C]", grad_out, x.len())?;
        check_len("grad of x [tokens, n, C]", grad_x, x.len())?;
        grads.validate(&self.config)?;
        check_finite("grad of x'", grad_out)?;
        let (n, c, k) = (
            self.config.n,
            self.config.width,
            self.config.coefficient_len(),
        );
        let (tc, tk) = (tokens * c, tokens * k);
        post_res_merge_backward_unchecked(
            n,
            c,
            x,
            &ws.coefficients[..tk],
            &ws.y[..tc],
            grad_out,
            grad_x,
            &mut ws.grad_y[..tc],
            &mut ws.grad_coefficients[..tk],
        );
        sublayer.vjp(&ws.h[..tc], &ws.grad_y[..tc], &mut ws.grad_h[..tc])?;
        check_finite("sublayer input gradient", &ws.grad_h[..tc])?;
        pre_aggregate_backward_unchecked(
            n,
            c,
            x,
            &ws.coefficients[..tk],
            &ws.grad_h[..tc],
            grad_x,
            &mut ws.grad_coefficients[..tk],
        );
        let gc = core::mem::take(&mut ws.grad_coefficients);
        self.coefficients_backward_unchecked(x, &gc[..tk], tokens, grad_x, grads, ws);
        ws.grad_coefficients = gc;
        Ok(())
    }
}

/// `proj = (v ⊙ γ)·φ` for one token, `φ` row-major `[v.len(), k]`.
/// Eight output columns at a time stay in registers while `v` streams by.
fn project<T: Real>(v: &[T], gamma: &[T], phi: &[T], k: usize, proj: &mut [T]) {
    let mut j0 = 0;
    while j0 < k {
        let w = (k - j0).min(8);
        let mut acc = [T::zero(); 8];
        if w == 8 {
            for (m, (&x, &g)) in v.iter().zip(gamma).enumerate() {
                let vg = x * g;
                let row = &phi[m * k + j0..m * k + j0 + 8];
                for q in 0..8 {
                    acc[q] = acc[q] + vg * row[q];
                }
            }
        } else {
            for (m, (&x, &g)) in v.iter().zip(gamma).enumerate() {
                let vg = x * g;
                for (a, &f) in acc[..w].iter_mut().zip(&phi[m * k + j0..m * k + j0 + w]) {
                    *a = *a + vg * f;
                }
            }
        }
        proj[j0..j0 + w].copy_from_slice(&acc[..w]);
        j0 += w;
    }
}

/// `grads.b_* += g` block by block (`∂H/∂b = 1` in every scheme).
fn add_blocks<T: Real>(grads: &mut ConnectionParams<T>, n: usize, g: &[T]) {
    for (d, &s) in grads.b_pre.iter_mut().zip(&g[..n]) {
        *d = *d + s;
    }
    for (d, &s) in grads.b_post.iter_mut().zip(&g[n..2 * n]) {
        *d = *d + s;
    }
    for (d, &s) in grads.b_res.iter_mut().zip(&g[2 * n..]) {
        *d = *d + s;
    }
}
