//! The mHC wrapper on wgpu: kernel-level functions (Sinkhorn–Knopp,
//! pre-aggregate, post/res merge and their backward) and [`GpuWrapper`], one
//! wrapped sublayer `x' = H_res·x + H_postᵀ·F(H_pre·x)` (paper Eq. 3) with its
//! coefficients (HC Eq. 5; mHC Eqs. 7–9) and parameter gradients on the device.
//!
//! Limits (typed errors outside them): `1 ≤ n ≤ 8`; for mHC
//! `2·t_max·n ≤ 512` (the SK backward keeps each step's sums on chip, e.g.
//! `t_max ≤ 32` at n = 8, ≤ 64 at n = 4); `T·n·C < 2³²` elements; every
//! buffer within the device's storage-binding limit.

use std::sync::Arc;

use mhc_core::{ConnectionConfig, ConnectionParams, MhcError, Scheme, SinkhornConfig};

use crate::context::{GpuBuffer, GpuContext, Kernel, Module, Params};
use crate::error::{GpuError, GpuResult};

/// Largest expansion rate the shaders support.
pub const MAX_STREAMS: usize = 8;
/// Upper bound of `2·t_max·n` (normalisation sums the SK backward keeps per matrix).
pub const MAX_SINKHORN_SUMS: usize = 512;

const fn k(entry: &'static str, access: &'static str) -> Kernel {
    Kernel {
        module: Module::Wrapper,
        entry,
        access,
    }
}

const SK_FWD: Kernel = k("sinkhorn_forward", "rw");
const SK_BWD: Kernel = k("sinkhorn_backward", "rrw");
const MHC_PROJECT: Kernel = k("mhc_project", "rrww");
const MHC_PROJECT_SERIAL: Kernel = k("mhc_project_serial", "rrww");
const HC_PROJECT: Kernel = k("hc_project", "rrww");
const HC_PROJECT_SERIAL: Kernel = k("hc_project_serial", "rrww");
const COEFFICIENTS: Kernel = k("coefficients", "rrrww");
const PRE: Kernel = k("pre_aggregate", "rrw");
const POST: Kernel = k("post_res_merge", "rrrw");
const POST_BWD: Kernel = k("post_res_backward", "rrrrwww");
const POST_BWD_SERIAL: Kernel = k("post_res_backward_serial", "rrrrwww");
const PRE_BWD: Kernel = k("pre_backward", "rrrww");
const PRE_BWD_SERIAL: Kernel = k("pre_backward_serial", "rrrww");
const COEF_BWD: Kernel = k("coefficients_backward", "rrrrrrw");
const COLUMN_SUM: Kernel = k("column_sum", "rw");
const COLUMN_SUM_SERIAL: Kernel = k("column_sum_serial", "rw");
const MHC_DX: Kernel = k("mhc_dx", "rrrw");
const MHC_PARAM_GRADS: Kernel = k("mhc_param_grads", "rrw");
const HC_DX: Kernel = k("hc_dx", "rrrrw");
const HC_DX_SERIAL: Kernel = k("hc_dx_serial", "rrrrw");
const HC_THETA: Kernel = k("hc_theta_grads", "rrrw");
const SCALE: Kernel = k("scale", "rw");

/// The kernel and workgroup count of a per-token reduction: one workgroup a
/// token (cooperative) or one invocation a token, 64 a workgroup (serial,
/// see [`GpuContext::serial_kernels`]).
fn per_token(
    ctx: &GpuContext,
    cooperative: &'static Kernel,
    serial: &'static Kernel,
    tokens: usize,
) -> GpuResult<(&'static Kernel, (u32, u32))> {
    if ctx.serial_kernels() {
        Ok((serial, ctx.groups(serial.entry, tokens.div_ceil(64))?))
    } else {
        Ok((cooperative, ctx.groups(cooperative.entry, tokens)?))
    }
}

/// Checks `1 ≤ n ≤ 8` and, for mHC, the SK backward's on-chip bound.
fn check_streams(n: usize, sinkhorn: Option<&SinkhornConfig>) -> GpuResult<()> {
    if n == 0 {
        return Err(MhcError::ZeroStreams.into());
    }
    if n > MAX_STREAMS {
        return Err(GpuError::Unsupported(format!(
            "n = {n} streams; the wgpu shaders support 1 ≤ n ≤ {MAX_STREAMS}"
        )));
    }
    if let Some(sk) = sinkhorn {
        sk.validate()?;
        if 2 * sk.iterations * n > MAX_SINKHORN_SUMS {
            return Err(GpuError::Unsupported(format!(
                "{} Sinkhorn–Knopp iterations at n = {n}; the wgpu backward supports 2·iterations·n ≤ {MAX_SINKHORN_SUMS} (at most {} iterations here)",
                sk.iterations,
                MAX_SINKHORN_SUMS / (2 * n)
            )));
        }
    }
    Ok(())
}

fn check_len(what: &'static str, buf: &GpuBuffer, need: usize) -> GpuResult<()> {
    if buf.len() < need {
        return Err(GpuError::Shape {
            what,
            expected: need,
            got: buf.len(),
        });
    }
    Ok(())
}

fn check_elements(what: &str, count: usize) -> GpuResult<u32> {
    u32::try_from(count).map_err(|_| GpuError::LimitExceeded {
        what: format!("{what} (elements, indexed with 32 bits in the shaders)"),
        requested: count as u64,
        limit: u64::from(u32::MAX),
        hint: "use fewer tokens per call",
    })
}

/// Batched Sinkhorn–Knopp forward (paper Eq. 9) of `batch` row-major `n×n`
/// matrices, as [`mhc_core::sinkhorn_knopp`] (without the residual).
pub fn sinkhorn_knopp(
    ctx: &GpuContext,
    logits: &GpuBuffer,
    n: usize,
    batch: usize,
    config: &SinkhornConfig,
    output: &GpuBuffer,
) -> GpuResult<()> {
    check_streams(n, Some(config))?;
    if batch == 0 {
        return Err(MhcError::EmptyBatch.into());
    }
    check_len("Sinkhorn–Knopp logits", logits, batch * n * n)?;
    check_len("Sinkhorn–Knopp output", output, batch * n * n)?;
    let p = Params::new(
        &[batch as u32, n as u32, 0, 0, 0, config.iterations as u32],
        &[0.0, config.eps as f32],
    );
    let g = ctx.groups("sinkhorn_forward", batch.div_ceil(64))?;
    ctx.dispatch(&SK_FWD, &[logits, output], p, g)
}

/// Batched Sinkhorn–Knopp backward, exact through the truncated iteration,
/// as [`mhc_core::sinkhorn_knopp_backward`]: `grad_logits` is overwritten.
pub fn sinkhorn_knopp_backward(
    ctx: &GpuContext,
    logits: &GpuBuffer,
    n: usize,
    batch: usize,
    config: &SinkhornConfig,
    grad_output: &GpuBuffer,
    grad_logits: &GpuBuffer,
) -> GpuResult<()> {
    check_streams(n, Some(config))?;
    if batch == 0 {
        return Err(MhcError::EmptyBatch.into());
    }
    for (what, b) in [
        ("Sinkhorn–Knopp logits", logits),
        ("Sinkhorn–Knopp grad_output", grad_output),
        ("Sinkhorn–Knopp grad_logits", grad_logits),
    ] {
        check_len(what, b, batch * n * n)?;
    }
    let p = Params::new(
        &[batch as u32, n as u32, 0, 0, 0, config.iterations as u32],
        &[0.0, config.eps as f32],
    );
    let g = ctx.groups("sinkhorn_backward", batch.div_ceil(64))?;
    ctx.dispatch(&SK_BWD, &[logits, grad_output, grad_logits], p, g)
}

/// The parameters of the merge kernels, after checking the shape and that the
/// stream state `x [T, n, C]` and the `coefficients [T, n²+2n]` every one of
/// them reads have their lengths.
fn apply_params(
    n: usize,
    width: usize,
    tokens: usize,
    x: &GpuBuffer,
    coefficients: &GpuBuffer,
) -> GpuResult<Params> {
    check_streams(n, None)?;
    if width == 0 {
        return Err(MhcError::ZeroWidth.into());
    }
    if tokens == 0 {
        return Err(MhcError::EmptyBatch.into());
    }
    check_elements("stream state x [T, n, C]", tokens * n * width)?;
    check_len("stream state x [T, n, C]", x, tokens * n * width)?;
    check_len(
        "coefficients [T, n²+2n]",
        coefficients,
        tokens * (n * n + 2 * n),
    )?;
    Ok(Params::new(
        &[
            tokens as u32,
            n as u32,
            width as u32,
            (n * n + 2 * n) as u32,
        ],
        &[],
    ))
}

/// Pre-aggregate `h[t, c] = Σ_i H_pre[t, i]·x[t, i, c]` ([`mhc_core::apply::pre_aggregate`]).
pub fn pre_aggregate(
    ctx: &GpuContext,
    n: usize,
    width: usize,
    tokens: usize,
    x: &GpuBuffer,
    coefficients: &GpuBuffer,
    h: &GpuBuffer,
) -> GpuResult<()> {
    let p = apply_params(n, width, tokens, x, coefficients)?;
    check_len("sublayer input h [T, C]", h, tokens * width)?;
    let g = ctx.groups("pre_aggregate", (tokens * width).div_ceil(256))?;
    ctx.dispatch(&PRE, &[x, coefficients, h], p, g)
}

/// Post/res merge `x'[t, o] = Σ_i H_res[t, o, i]·x[t, i] + H_post[t, o]·y[t]`
/// ([`mhc_core::apply::post_res_merge`]).
pub fn post_res_merge(
    ctx: &GpuContext,
    n: usize,
    width: usize,
    tokens: usize,
    x: &GpuBuffer,
    coefficients: &GpuBuffer,
    y: &GpuBuffer,
    out: &GpuBuffer,
) -> GpuResult<()> {
    let p = apply_params(n, width, tokens, x, coefficients)?;
    check_len("sublayer output y [T, C]", y, tokens * width)?;
    check_len("output x' [T, n, C]", out, tokens * n * width)?;
    let g = ctx.groups("post_res_merge", (tokens * width).div_ceil(256))?;
    ctx.dispatch(&POST, &[x, coefficients, y, out], p, g)
}

/// Backward of [`post_res_merge`] ([`mhc_core::apply::post_res_merge_backward`]):
/// overwrites `grad_x`, `grad_y` and the `H_post`/`H_res` part of `grad_coefficients`.
pub fn post_res_merge_backward(
    ctx: &GpuContext,
    n: usize,
    width: usize,
    tokens: usize,
    x: &GpuBuffer,
    coefficients: &GpuBuffer,
    y: &GpuBuffer,
    grad_out: &GpuBuffer,
    grad_x: &GpuBuffer,
    grad_y: &GpuBuffer,
    grad_coefficients: &GpuBuffer,
) -> GpuResult<()> {
    let p = apply_params(n, width, tokens, x, coefficients)?;
    let (s, kk) = (tokens * n * width, tokens * (n * n + 2 * n));
    check_len("sublayer output y [T, C]", y, tokens * width)?;
    check_len("grad of x' [T, n, C]", grad_out, s)?;
    check_len("grad of x [T, n, C]", grad_x, s)?;
    check_len("grad of y [T, C]", grad_y, tokens * width)?;
    check_len("grad of coefficients [T, n²+2n]", grad_coefficients, kk)?;
    let (kernel, g) = per_token(ctx, &POST_BWD, &POST_BWD_SERIAL, tokens)?;
    ctx.dispatch(
        kernel,
        &[
            x,
            coefficients,
            y,
            grad_out,
            grad_x,
            grad_y,
            grad_coefficients,
        ],
        p,
        g,
    )
}

/// Backward of [`pre_aggregate`] ([`mhc_core::apply::pre_aggregate_backward`]):
/// **adds** `H_pre[i]·grad_h` to `grad_x` and overwrites the `H_pre` part of `grad_coefficients`.
pub fn pre_aggregate_backward(
    ctx: &GpuContext,
    n: usize,
    width: usize,
    tokens: usize,
    x: &GpuBuffer,
    coefficients: &GpuBuffer,
    grad_h: &GpuBuffer,
    grad_x: &GpuBuffer,
    grad_coefficients: &GpuBuffer,
) -> GpuResult<()> {
    let p = apply_params(n, width, tokens, x, coefficients)?;
    let (s, kk) = (tokens * n * width, tokens * (n * n + 2 * n));
    check_len("grad of h [T, C]", grad_h, tokens * width)?;
    check_len("grad of x [T, n, C]", grad_x, s)?;
    check_len("grad of coefficients [T, n²+2n]", grad_coefficients, kk)?;
    let (kernel, g) = per_token(ctx, &PRE_BWD, &PRE_BWD_SERIAL, tokens)?;
    ctx.dispatch(
        kernel,
        &[x, coefficients, grad_h, grad_x, grad_coefficients],
        p,
        g,
    )
}

/// A sublayer `F: R^C → R^C` on the GPU over `[tokens, C]` buffers, with its
/// vector–Jacobian product (which accumulates the sublayer's own parameter gradients).
pub trait GpuSublayer {
    /// `y = F(h)`.
    fn forward(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        y: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()>;
    /// `dh = (∂F/∂h)ᵀ·dy` at the forward's `h`.
    fn vjp(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        dy: &GpuBuffer,
        dh: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()>;
}

/// The benchmark's stand-in sublayer `F(h) = factor·h` (BENCH.md uses 1.5).
#[derive(Clone, Copy, Debug)]
pub struct ScaleSublayer {
    /// The factor.
    pub factor: f32,
    /// The width `C`.
    pub width: usize,
}

impl ScaleSublayer {
    fn run(&self, ctx: &GpuContext, a: &GpuBuffer, b: &GpuBuffer, tokens: usize) -> GpuResult<()> {
        let len = tokens * self.width;
        check_len("scale input", a, len)?;
        check_len("scale output", b, len)?;
        let p = Params::new(&[check_elements("scale", len)?], &[self.factor]);
        ctx.dispatch(&SCALE, &[a, b], p, ctx.groups("scale", len.div_ceil(256))?)
    }
}

impl GpuSublayer for ScaleSublayer {
    fn forward(
        &mut self,
        ctx: &GpuContext,
        h: &GpuBuffer,
        y: &GpuBuffer,
        t: usize,
    ) -> GpuResult<()> {
        self.run(ctx, h, y, t)
    }
    fn vjp(
        &mut self,
        ctx: &GpuContext,
        _h: &GpuBuffer,
        dy: &GpuBuffer,
        dh: &GpuBuffer,
        t: usize,
    ) -> GpuResult<()> {
        self.run(ctx, dy, dh, t)
    }
}

/// Offsets of the connection tensors in the packed parameter buffer, in
/// [`ConnectionParams::NAMES`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    /// Start of each tensor.
    pub offsets: [usize; 9],
    /// Length of each tensor.
    pub lens: [usize; 9],
    /// Total elements.
    pub total: usize,
}

impl PackedLayout {
    /// The layout for a configuration.
    pub fn new(config: &ConnectionConfig) -> Self {
        let lens = config.param_lens();
        let mut offsets = [0; 9];
        let mut at = 0;
        for (o, l) in offsets.iter_mut().zip(lens) {
            *o = at;
            at += l;
        }
        Self {
            offsets,
            lens,
            total: at,
        }
    }

    /// The parameters packed back to back.
    pub fn pack(&self, p: &ConnectionParams<f32>) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.total);
        for (_, t) in p.tensors() {
            v.extend_from_slice(t);
        }
        v
    }

    /// Unpacks into `p` (shapes from the configuration).
    pub fn unpack(&self, packed: &[f32], p: &mut ConnectionParams<f32>) {
        for (i, (_, t)) in p.tensors_mut().into_iter().enumerate() {
            t.clear();
            t.extend_from_slice(&packed[self.offsets[i]..self.offsets[i] + self.lens[i]]);
        }
    }
}

fn scheme_code(s: Scheme) -> u32 {
    match s {
        Scheme::Residual => 0,
        Scheme::HcStatic => 1,
        Scheme::HcDynamic => 2,
        Scheme::MhcStatic => 3,
        Scheme::MhcDynamic => 4,
    }
}

/// One wrapped sublayer on the GPU (any [`Scheme`]): its parameters and their
/// gradients (packed, see [`PackedLayout`]) and the buffers of a batch of up
/// to `capacity` tokens, all on the device. Mirrors
/// [`mhc_core::HyperConnection`] with a [`mhc_core::Workspace`].
pub struct GpuWrapper {
    ctx: Arc<GpuContext>,
    config: ConnectionConfig,
    layout: PackedLayout,
    capacity: usize,
    tokens: usize,
    params: GpuBuffer,
    grads: GpuBuffer,
    coef: GpuBuffer,
    logits: GpuBuffer,
    proj: GpuBuffer,
    norms: GpuBuffer,
    h: GpuBuffer,
    y: GpuBuffer,
    gy: GpuBuffer,
    gh: GpuBuffer,
    gc: GpuBuffer,
    tok: GpuBuffer,
    gmat: GpuBuffer,
}

impl GpuWrapper {
    /// Uploads `params` and allocates the buffers for batches of up to `capacity` tokens.
    pub fn new(
        ctx: Arc<GpuContext>,
        config: &ConnectionConfig,
        params: &ConnectionParams<f32>,
        capacity: usize,
    ) -> GpuResult<Self> {
        config.validate()?;
        let sk = config.scheme.is_manifold_constrained();
        check_streams(config.n, sk.then_some(&config.sinkhorn))?;
        params.validate(config)?;
        if capacity == 0 {
            return Err(MhcError::EmptyBatch.into());
        }
        let (n, c, k) = (config.n, config.width, config.coefficient_len());
        check_elements("stream state x [T, n, C]", capacity * n * c)?;
        let layout = PackedLayout::new(config);
        let dynamic_mhc = config.scheme == Scheme::MhcDynamic;
        let t = capacity;
        Ok(Self {
            params: ctx.upload("connection parameters", &layout.pack(params))?,
            grads: ctx.zeros("connection gradients", layout.total)?,
            coef: ctx.zeros("coefficients [T, K]", t * k)?,
            logits: ctx.zeros("SK logits [T, n²]", t * n * n)?,
            proj: ctx.zeros("projection [T, K]", t * k)?,
            norms: ctx.zeros("norms [T, n]", t * n)?,
            h: ctx.zeros("sublayer input h [T, C]", t * c)?,
            y: ctx.zeros("sublayer output y [T, C]", t * c)?,
            gy: ctx.zeros("grad of y [T, C]", t * c)?,
            gh: ctx.zeros("grad of h [T, C]", t * c)?,
            gc: ctx.zeros("grad of coefficients [T, K]", t * k)?,
            tok: ctx.zeros("per-token coefficient grads [T, 2K+4]", t * (2 * k + 4))?,
            gmat: ctx.zeros("Xᵀ·∂P [nC, K]", if dynamic_mhc { n * c * k } else { 0 })?,
            ctx,
            config: *config,
            layout,
            capacity,
            tokens: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConnectionConfig {
        &self.config
    }

    /// The packed layout of parameters and gradients.
    pub fn layout(&self) -> &PackedLayout {
        &self.layout
    }

    /// The packed parameters on the device.
    pub fn params_buffer(&self) -> &GpuBuffer {
        &self.params
    }

    /// The packed gradients on the device (accumulated by [`Self::backward`]).
    pub fn grads_buffer(&self) -> &GpuBuffer {
        &self.grads
    }

    /// Coefficients of the last forward, `[capacity, K]` (the first `tokens` rows are valid).
    pub fn coefficients_buffer(&self) -> &GpuBuffer {
        &self.coef
    }

    /// Sublayer output `y` of the last forward.
    pub fn sublayer_output(&self) -> &GpuBuffer {
        &self.y
    }

    /// Uploads new parameters (same shapes).
    pub fn set_params(&mut self, params: &ConnectionParams<f32>) -> GpuResult<()> {
        params.validate(&self.config)?;
        self.ctx.write(&self.params, 0, &self.layout.pack(params))
    }

    /// Sets the accumulated gradients to zero.
    pub fn zero_grads(&self) -> GpuResult<()> {
        self.ctx.clear(&self.grads)
    }

    /// The parameters, downloaded.
    pub async fn params(&self) -> GpuResult<ConnectionParams<f32>> {
        let packed = self.ctx.read_f32(&self.params).await?;
        let mut p = ConnectionParams::zeros(&self.config);
        self.layout.unpack(&packed, &mut p);
        Ok(p)
    }

    /// The accumulated gradients, downloaded.
    pub async fn gradients(&self) -> GpuResult<ConnectionParams<f32>> {
        let packed = self.ctx.read_f32(&self.grads).await?;
        let mut p = ConnectionParams::zeros(&self.config);
        self.layout.unpack(&packed, &mut p);
        Ok(p)
    }

    /// Coefficients of the last forward, downloaded, `[tokens, K]`.
    pub async fn coefficients_host(&self) -> GpuResult<Vec<f32>> {
        let k = self.config.coefficient_len();
        self.ctx.read(&self.coef, 0, self.tokens * k).await
    }

    fn tokens_of(&self, what: &'static str, x: &GpuBuffer, tokens: usize) -> GpuResult<()> {
        if tokens == 0 {
            return Err(MhcError::EmptyBatch.into());
        }
        if tokens > self.capacity {
            return Err(MhcError::WorkspaceTooSmall {
                tokens,
                capacity: self.capacity,
            }
            .into());
        }
        check_len(what, x, tokens * self.config.state_len())
    }

    fn block(&self, tokens: usize) -> Params {
        let c = &self.config;
        let o = &self.layout.offsets;
        Params::new(
            &[
                tokens as u32,
                c.n as u32,
                c.width as u32,
                c.coefficient_len() as u32,
                scheme_code(c.scheme),
                c.sinkhorn.iterations as u32,
                o[0] as u32,
                o[1] as u32,
                o[4] as u32,
                o[5] as u32,
                o[6] as u32,
                o[7] as u32,
                o[8] as u32,
            ],
            &[c.rms_eps as f32, c.sinkhorn.eps as f32],
        )
    }

    /// Records the coefficients of `x [tokens, n, C]` into the coefficient buffer
    /// (as [`mhc_core::HyperConnection::coefficients`]).
    pub fn coefficients(&mut self, x: &GpuBuffer, tokens: usize) -> GpuResult<()> {
        self.tokens_of("stream state x [T, n, C]", x, tokens)?;
        let ctx = &*self.ctx;
        let p = self.block(tokens);
        match self.config.scheme {
            Scheme::MhcDynamic => {
                let (kernel, g) = per_token(ctx, &MHC_PROJECT, &MHC_PROJECT_SERIAL, tokens)?;
                ctx.dispatch(kernel, &[x, &self.params, &self.proj, &self.norms], p, g)?
            }
            Scheme::HcDynamic => {
                let (kernel, g) = per_token(ctx, &HC_PROJECT, &HC_PROJECT_SERIAL, tokens)?;
                ctx.dispatch(kernel, &[x, &self.params, &self.proj, &self.norms], p, g)?
            }
            _ => {}
        }
        ctx.dispatch(
            &COEFFICIENTS,
            &[
                &self.proj,
                &self.norms,
                &self.params,
                &self.coef,
                &self.logits,
            ],
            p,
            ctx.groups("coefficients", tokens.div_ceil(64))?,
        )?;
        self.tokens = tokens;
        Ok(())
    }

    /// Records the forward `h = H_pre·x`, `y = F(h)`, `out = H_res·x + H_postᵀ·y`
    /// (as [`mhc_core::HyperConnection::forward`]).
    pub fn forward(
        &mut self,
        sublayer: &mut dyn GpuSublayer,
        x: &GpuBuffer,
        out: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()> {
        self.coefficients(x, tokens)?;
        check_len("output x' [T, n, C]", out, tokens * self.config.state_len())?;
        let (n, c) = (self.config.n, self.config.width);
        let ctx = self.ctx.clone();
        pre_aggregate(&ctx, n, c, tokens, x, &self.coef, &self.h)?;
        sublayer.forward(&ctx, &self.h, &self.y, tokens)?;
        post_res_merge(&ctx, n, c, tokens, x, &self.coef, &self.y, out)
    }

    /// Records the backward of [`Self::forward`] (same `x`): overwrites
    /// `grad_x`, **adds** the parameter gradients to the gradient buffer and
    /// lets the sublayer accumulate its own.
    pub fn backward(
        &mut self,
        sublayer: &mut dyn GpuSublayer,
        x: &GpuBuffer,
        grad_out: &GpuBuffer,
        grad_x: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()> {
        self.tokens_of("stream state x [T, n, C]", x, tokens)?;
        if self.tokens != tokens {
            return Err(MhcError::BackwardBeforeForward.into());
        }
        let (n, c) = (self.config.n, self.config.width);
        let ctx = self.ctx.clone();
        post_res_merge_backward(
            &ctx, n, c, tokens, x, &self.coef, &self.y, grad_out, grad_x, &self.gy, &self.gc,
        )?;
        sublayer.vjp(&ctx, &self.h, &self.gy, &self.gh, tokens)?;
        pre_aggregate_backward(
            &ctx, n, c, tokens, x, &self.coef, &self.gh, grad_x, &self.gc,
        )?;
        self.coefficients_backward_from(x, tokens, grad_x)
    }

    /// Records the backward of [`Self::coefficients`] for a given gradient of
    /// the coefficients `grad_coefficients [tokens, K]`: **adds** into `grad_x`
    /// and the parameter gradients (as [`mhc_core::HyperConnection::coefficients_backward`]).
    pub fn coefficients_backward(
        &mut self,
        x: &GpuBuffer,
        grad_coefficients: &GpuBuffer,
        grad_x: &GpuBuffer,
        tokens: usize,
    ) -> GpuResult<()> {
        self.tokens_of("stream state x [T, n, C]", x, tokens)?;
        if self.tokens != tokens {
            return Err(MhcError::BackwardBeforeForward.into());
        }
        let k = self.config.coefficient_len();
        check_len("grad of coefficients [T, K]", grad_coefficients, tokens * k)?;
        self.ctx
            .copy(grad_coefficients, 0, &self.gc, 0, tokens * k)?;
        self.coefficients_backward_from(x, tokens, grad_x)
    }

    fn coefficients_backward_from(
        &mut self,
        x: &GpuBuffer,
        tokens: usize,
        grad_x: &GpuBuffer,
    ) -> GpuResult<()> {
        check_len(
            "grad of x [T, n, C]",
            grad_x,
            tokens * self.config.state_len(),
        )?;
        let scheme = self.config.scheme;
        if scheme == Scheme::Residual {
            return Ok(());
        }
        let ctx = &*self.ctx;
        let (n, c, k) = (
            self.config.n,
            self.config.width,
            self.config.coefficient_len(),
        );
        let nc = n * c;
        let p = self.block(tokens);
        let o = self.layout.offsets;
        ctx.dispatch(
            &COEF_BWD,
            &[
                &self.gc,
                &self.coef,
                &self.logits,
                &self.proj,
                &self.norms,
                &self.params,
                &self.tok,
            ],
            p,
            ctx.groups("coefficients_backward", tokens.div_ceil(64))?,
        )?;
        let row = 2 * k + 4;
        // ∂b: Σ over tokens of the per-token ∂H̃ (b_pre, b_post, b_res are contiguous).
        let sum = |cols: usize, src_off: usize, dst_off: usize| -> GpuResult<()> {
            let q = Params::new(
                &[
                    tokens as u32,
                    cols as u32,
                    row as u32,
                    src_off as u32,
                    dst_off as u32,
                ],
                &[],
            );
            let (kernel, g) = per_token(ctx, &COLUMN_SUM, &COLUMN_SUM_SERIAL, cols)?;
            ctx.dispatch(kernel, &[&self.tok, &self.grads], q, g)
        };
        sum(k, 0, o[1])?;
        if scheme.is_dynamic() {
            sum(3, 2 * k, o[0])?;
        }
        match scheme {
            Scheme::MhcDynamic => {
                ctx.dispatch(
                    &MHC_DX,
                    &[x, &self.params, &self.tok, grad_x],
                    p,
                    ctx.groups("mhc_dx", (tokens * nc).div_ceil(256))?,
                )?;
                // G = Xᵀ·∂P: [nC, T] × [T, K] with ∂P at column K of each `tok` row.
                crate::ops::matmul_strided(
                    ctx,
                    x,
                    &self.tok,
                    &self.gmat,
                    crate::ops::Strides {
                        m: nc,
                        n: k,
                        k: tokens,
                        sai: 1,
                        sar: nc,
                        sbr: row,
                        sbj: 1,
                        ldo: k,
                        a0: 0,
                        b0: k,
                        o0: 0,
                        accumulate: false,
                    },
                )?;
                let q = Params {
                    u: {
                        let mut u = p.u;
                        u[0] = nc as u32;
                        u
                    },
                    f: p.f,
                };
                ctx.dispatch(
                    &MHC_PARAM_GRADS,
                    &[&self.gmat, &self.params, &self.grads],
                    q,
                    ctx.groups("mhc_param_grads", nc.div_ceil(64))?,
                )?;
            }
            Scheme::HcDynamic => {
                let (kernel, g) = per_token(ctx, &HC_DX, &HC_DX_SERIAL, tokens * n)?;
                ctx.dispatch(
                    kernel,
                    &[x, &self.params, &self.tok, &self.norms, grad_x],
                    p,
                    g,
                )?;
                ctx.dispatch(
                    &HC_THETA,
                    &[x, &self.tok, &self.norms, &self.grads],
                    p,
                    ctx.groups("hc_theta_grads", ((n + 2) * c).div_ceil(64))?,
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}
