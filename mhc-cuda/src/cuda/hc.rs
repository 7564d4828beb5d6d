//! [`HcCuda`]: one dynamic-HC-wrapped sublayer on the GPU (f32) — the
//! unconstrained Hyper-Connections baseline the paper compares mHC with.
//!
//! Coefficients (Eq. 5 of the HC paper, as [`mhc_core::HyperConnection`]):
//! per stream `x̃_i = x_i / √(mean_c x_i² + eps)`,
//! `u[i, :] = x̃_i · Θ` with `Θ = [θ_pre | θ_post | θ_res[0] … θ_res[n−1]]`
//! (`C × (n+2)`, one cuBLAS GEMM over all `tokens·n` stream rows), then
//! `H_pre[i] = α_pre·tanh(u[i, 0]) + b_pre[i]`, `H_post[i] = α_post·tanh(u[i, 1]) + b_post[i]`
//! and `H_res[o, i] = α_res·tanh(u[i, 2+o]) + b_res[o, i]`. The pre-aggregate and
//! the post/res merge are the mHC kernels'. The backward runs the same steps in
//! reverse: `∂u` per (token, stream), `∂Θ = x̃ᵀ∂u` and `∂x̃ = ∂u·Θᵀ` (GEMMs),
//! the RMSNorm backward, and the merge's share of `∂x`.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use mhc_core::{ConnectionConfig, ConnectionParams, Scheme};

use super::wrapper::{download, launch_post_bwd, launch_pre_bwd, pack_alpha_b, unpack_alpha_b};
use super::{CudaDevice, CudaError, CudaResult, CudaSublayer, MatMul, ModelKernels};

struct Kernels {
    hc_coef_fwd: CudaFunction,
    hc_coef_bwd: CudaFunction,
    hc_dx_merge: CudaFunction,
    pre_fwd: CudaFunction,
    post_fwd: CudaFunction,
    post_bwd: CudaFunction,
    pre_bwd: CudaFunction,
    token_reduce: CudaFunction,
}

/// One dynamic-HC-wrapped sublayer on the GPU: parameters, gradients and the
/// buffers of a batch of up to `capacity` tokens, all on the device.
pub struct HcCuda {
    dev: Arc<CudaDevice>,
    ops: ModelKernels,
    mm: MatMul,
    kernels: Kernels,
    n: usize,
    c: usize,
    k: usize,
    rms_eps: f32,
    capacity: usize,
    ones: CudaSlice<f32>,
    theta_t: CudaSlice<f32>,
    params: CudaSlice<f32>,
    dtheta_t: CudaSlice<f32>,
    dparams: CudaSlice<f32>,
    xt: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    z: CudaSlice<f32>,
    coef: CudaSlice<f32>,
    h: CudaSlice<f32>,
    y: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    dh: CudaSlice<f32>,
    dcoef: CudaSlice<f32>,
    du: CudaSlice<f32>,
    dxt: CudaSlice<f32>,
    dtok: CudaSlice<f32>,
    forward_tokens: usize,
}

fn launch_cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch_error(kernel: &str, e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("launching {kernel}: {e:?}"))
}

impl HcCuda {
    /// Uploads `params` (HC dynamic, `n ≤ 8`, `C % 4 == 0`) and allocates buffers for `capacity` tokens.
    pub fn new(
        dev: Arc<CudaDevice>,
        config: &ConnectionConfig,
        params: &ConnectionParams<f32>,
        capacity: usize,
    ) -> CudaResult<Self> {
        config.validate()?;
        if config.scheme != Scheme::HcDynamic {
            return Err(CudaError::Unsupported(format!(
                "scheme {}: HcCuda implements dynamic HC",
                config.scheme
            )));
        }
        let (n, c) = (config.n, config.width);
        super::wrapper::check_streams_and_capacity(config, capacity)?;
        params.validate(config)?;
        let k = config.coefficient_len();
        let rows = capacity * n;
        let u = n + 2;
        dev.ensure_free(4 * (3 * rows * c + 4 * capacity * c + 2 * rows * u + capacity * 3 * k))?;
        let name = |s: &str| -> CudaResult<CudaFunction> { dev.function(n, false, s) };
        let kernels = Kernels {
            hc_coef_fwd: name("hc_coef_fwd")?,
            hc_coef_bwd: name("hc_coef_bwd")?,
            hc_dx_merge: name("hc_dx_merge")?,
            pre_fwd: name("pre_fwd")?,
            post_fwd: name("post_fwd")?,
            post_bwd: name("post_bwd")?,
            pre_bwd: name("pre_bwd")?,
            token_reduce: name("token_reduce")?,
        };
        let st = dev.stream().clone();
        let mut me = Self {
            ops: ModelKernels::new(dev.clone())?,
            mm: MatMul::new(&dev)?,
            kernels,
            n,
            c,
            k,
            rms_eps: config.rms_eps as f32,
            capacity,
            ones: st.clone_htod(&vec![1.0f32; c])?,
            theta_t: st.alloc_zeros(c * u)?,
            params: st.alloc_zeros(3 + k)?,
            dtheta_t: st.alloc_zeros(c * u)?,
            dparams: st.alloc_zeros(k + 3)?,
            xt: st.alloc_zeros(rows * c)?,
            inv: st.alloc_zeros(rows)?,
            z: st.alloc_zeros(rows * u)?,
            coef: st.alloc_zeros(capacity * k)?,
            h: st.alloc_zeros(capacity * c)?,
            y: st.alloc_zeros(capacity * c)?,
            dy: st.alloc_zeros(capacity * c)?,
            dh: st.alloc_zeros(capacity * c)?,
            dcoef: st.alloc_zeros(capacity * k)?,
            du: st.alloc_zeros(rows * u)?,
            dxt: st.alloc_zeros(rows * c)?,
            dtok: st.alloc_zeros(capacity * (k + 3))?,
            forward_tokens: 0,
            dev,
        };
        me.set_params(params)?;
        Ok(me)
    }

    /// Replaces the parameters (shapes as [`ConnectionParams`] of this configuration).
    pub fn set_params(&mut self, params: &ConnectionParams<f32>) -> CudaResult<()> {
        let packed = self.pack(params)?;
        let st = self.dev.stream().clone();
        for (host, (value, _)) in packed.iter().zip(self.buffers_mut()) {
            st.memcpy_htod(host, value)?;
        }
        Ok(())
    }

    /// `params` in the layouts of the device buffers ([`Self::values`]):
    /// `[Θᵀ (C × (n+2): θ_pre | θ_post | θ_res[0..n] per channel), α | b_pre | b_post | b_res]`.
    /// Shapes checked.
    pub fn pack(&self, params: &ConnectionParams<f32>) -> CudaResult<Vec<Vec<f32>>> {
        let (n, c) = (self.n, self.c);
        for (got, expected, what) in [
            (params.theta_pre.len(), c, "theta_pre"),
            (params.theta_post.len(), c, "theta_post"),
            (params.theta_res.len(), n * c, "theta_res"),
            (params.alpha.len(), 3, "alpha"),
            (params.b_pre.len(), n, "b_pre"),
            (params.b_post.len(), n, "b_post"),
            (params.b_res.len(), n * n, "b_res"),
        ] {
            if got != expected {
                return Err(CudaError::Shape {
                    what,
                    expected,
                    got,
                });
            }
        }
        let u = n + 2;
        let mut theta_t = vec![0.0f32; c * u];
        for cc in 0..c {
            let row = &mut theta_t[cc * u..(cc + 1) * u];
            row[0] = params.theta_pre[cc];
            row[1] = params.theta_post[cc];
            for o in 0..n {
                row[2 + o] = params.theta_res[o * c + cc];
            }
        }
        Ok(vec![theta_t, pack_alpha_b(params)])
    }

    /// The inverse of [`Self::pack`] (for values, gradients or optimiser moments).
    pub fn unpack(
        &self,
        config: &ConnectionConfig,
        packed: &[Vec<f32>],
    ) -> CudaResult<ConnectionParams<f32>> {
        let (n, c, k) = (self.n, self.c, self.k);
        let u = n + 2;
        super::wrapper::check_packed(packed, &[c * u, 3 + k])?;
        let mut p = ConnectionParams::zeros(config);
        let (theta, v) = (&packed[0], &packed[1]);
        unpack_alpha_b(v, &mut p);
        for cc in 0..c {
            let row = &theta[cc * u..(cc + 1) * u];
            p.theta_pre[cc] = row[0];
            p.theta_post[cc] = row[1];
            for o in 0..n {
                p.theta_res[o * c + cc] = row[2 + o];
            }
        }
        Ok(p)
    }

    /// The parameter buffers on the device, in the layouts of [`Self::pack`].
    pub fn values(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.theta_t, &self.params]
    }

    /// The gradients of the last backward, in the layouts of [`Self::values`].
    pub fn grads(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.dtheta_t, &self.dparams]
    }

    /// (value, gradient) pairs of [`Self::values`] and [`Self::grads`], for an
    /// optimiser that updates them in place.
    pub fn buffers_mut(&mut self) -> Vec<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
        vec![
            (&mut self.theta_t, &mut self.dtheta_t),
            (&mut self.params, &mut self.dparams),
        ]
    }

    /// Nothing derives from the parameters (the kernels read them directly).
    pub fn params_updated(&mut self) -> CudaResult<()> {
        Ok(())
    }

    fn tokens_of(&self, x: &CudaSlice<f32>) -> CudaResult<usize> {
        let per = self.n * self.c;
        if x.is_empty() || !x.len().is_multiple_of(per) {
            return Err(CudaError::Shape {
                what: "stream state x [tokens, n, C]",
                expected: (x.len() / per).max(1) * per,
                got: x.len(),
            });
        }
        let tokens = x.len() / per;
        if tokens > self.capacity {
            return Err(CudaError::Core(mhc_core::MhcError::WorkspaceTooSmall {
                tokens,
                capacity: self.capacity,
            }));
        }
        Ok(tokens)
    }

    fn stream_grid(&self, tokens: usize) -> CudaResult<u32> {
        Ok(((tokens * self.c / 4).div_ceil(256) as u32).clamp(1, self.dev.multiprocessors()? * 16))
    }

    /// Forward of the wrapped sublayer: `out = H_res·x + H_postᵀ·F(H_pre·x)` for `x [tokens, n, C]`.
    pub fn forward(
        &mut self,
        sublayer: &mut dyn CudaSublayer<f32>,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tokens = self.tokens_of(x)?;
        if out.len() != x.len() {
            return Err(CudaError::Shape {
                what: "output [tokens, n, C]",
                expected: x.len(),
                got: out.len(),
            });
        }
        let (n, c) = (self.n, self.c);
        let rows = tokens * n;
        self.ops.rmsnorm(
            x,
            &self.ones,
            rows,
            c,
            self.rms_eps,
            &mut self.xt,
            &mut self.inv,
        )?;
        self.mm
            .matmul(&self.xt, &self.theta_t, &mut self.z, rows, c, n + 2)?;
        let (t, c_i) = (tokens as i32, c as i32);
        let st = self.dev.stream().clone();
        {
            let mut b = st.launch_builder(&self.kernels.hc_coef_fwd);
            b.arg(&mut self.z)
                .arg(&self.params)
                .arg(&t)
                .arg(&mut self.coef);
            // SAFETY: one thread per (token, stream) < tokens·n (guarded); z holds rows·(n+2), coef tokens·K.
            unsafe { b.launch(launch_cfg(rows.div_ceil(128) as u32, 128)) }
                .map_err(|e| launch_error("hc_coef_fwd", e))?;
        }
        let grid = self.stream_grid(tokens)?;
        {
            let mut b = st.launch_builder(&self.kernels.pre_fwd);
            b.arg(x).arg(&self.coef).arg(&t).arg(&c_i).arg(&mut self.h);
            // SAFETY: reads tokens·n·C of x and tokens·K of coef, writes tokens·C of h (capacity ≥ tokens).
            unsafe { b.launch(launch_cfg(grid, 256)) }.map_err(|e| launch_error("pre_fwd", e))?;
        }
        let dev = self.dev.clone();
        sublayer.forward(&dev, &self.h, &mut self.y, tokens, c)?;
        let mut b = st.launch_builder(&self.kernels.post_fwd);
        b.arg(x)
            .arg(&self.coef)
            .arg(&self.y)
            .arg(&t)
            .arg(&c_i)
            .arg(out);
        // SAFETY: reads tokens·n·C of x, tokens·K of coef, tokens·C of y; writes tokens·n·C of out (checked equal to x).
        unsafe { b.launch(launch_cfg(grid, 256)) }.map_err(|e| launch_error("post_fwd", e))?;
        self.forward_tokens = tokens;
        Ok(())
    }

    /// Backward of [`Self::forward`] (same `x`): writes `grad_x` and this call's
    /// parameter gradients (read them with [`Self::gradients`]).
    pub fn backward(
        &mut self,
        sublayer: &mut dyn CudaSublayer<f32>,
        x: &CudaSlice<f32>,
        grad_out: &CudaSlice<f32>,
        grad_x: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tokens = self.tokens_of(x)?;
        if tokens != self.forward_tokens {
            return Err(CudaError::Core(mhc_core::MhcError::BackwardBeforeForward));
        }
        for (what, len) in [
            ("grad of x' [tokens, n, C]", grad_out.len()),
            ("grad of x [tokens, n, C]", grad_x.len()),
        ] {
            if len != x.len() {
                return Err(CudaError::Shape {
                    what,
                    expected: x.len(),
                    got: len,
                });
            }
        }
        let (n, c, k) = (self.n, self.c, self.k);
        let rows = tokens * n;
        let (t, c_i) = (tokens as i32, c as i32);
        let dev = self.dev.clone();
        let st = dev.stream().clone();
        launch_post_bwd(
            &self.dev,
            &self.kernels.post_bwd,
            x,
            &self.coef,
            &self.y,
            grad_out,
            tokens,
            c,
            &mut self.dy,
            &mut self.dcoef,
        )?;
        sublayer.vjp(&dev, &self.h, &self.dy, &mut self.dh, tokens, c)?;
        launch_pre_bwd(
            &self.dev,
            &self.kernels.pre_bwd,
            x,
            &self.dh,
            tokens,
            c,
            &mut self.dcoef,
        )?;
        {
            let mut b = st.launch_builder(&self.kernels.hc_coef_bwd);
            b.arg(&self.z)
                .arg(&self.params)
                .arg(&self.dcoef)
                .arg(&t)
                .arg(&mut self.du)
                .arg(&mut self.dtok);
            // SAFETY: one thread per token (guarded); z, du hold rows·(n+2), dcoef tokens·K, dtok tokens·(K+3).
            unsafe { b.launch(launch_cfg(tokens.div_ceil(128) as u32, 128)) }
                .map_err(|e| launch_error("hc_coef_bwd", e))?;
        }
        st.memset_zeros(&mut self.dtheta_t)?;
        self.mm
            .matmul_grad_b(&self.xt, &self.du, &mut self.dtheta_t, rows, c, n + 2)?;
        self.mm
            .matmul_grad_a(&self.du, &self.theta_t, &mut self.dxt, rows, c, n + 2)?;
        self.ops
            .rmsnorm_backward_dx(x, &self.ones, &self.inv, &self.dxt, rows, c, grad_x)?;
        let grid = self.stream_grid(tokens)?;
        {
            let mut b = st.launch_builder(&self.kernels.hc_dx_merge);
            b.arg(grad_out)
                .arg(&self.dh)
                .arg(&self.coef)
                .arg(&t)
                .arg(&c_i)
                .arg(&mut *grad_x);
            // SAFETY: grid-stride over tokens·C/4; reads n·C of g per token, C of dh, K of coef; updates grad_x (tokens·n·C, checked).
            unsafe { b.launch(launch_cfg(grid, 256)) }
                .map_err(|e| launch_error("hc_dx_merge", e))?;
        }
        super::wrapper::launch_token_reduce(
            &self.dev,
            &self.kernels.token_reduce,
            &self.dtok,
            tokens,
            k,
            &mut self.dparams,
        )
    }

    /// Coefficients of the last forward, `[tokens, K]` rows `[H_pre | H_post | H_res]`, copied to the host.
    pub fn coefficients_host(&self) -> CudaResult<Vec<f32>> {
        let all = self.dev.stream().clone_dtoh(&self.coef)?;
        Ok(all[..self.forward_tokens * self.k].to_vec())
    }

    /// The parameter gradients of the last backward, in the core's layout.
    pub fn gradients(&self, config: &ConnectionConfig) -> CudaResult<ConnectionParams<f32>> {
        self.unpack(config, &download(&self.dev, self.grads())?)
    }

    /// The parameters on the device, downloaded, in the core's layout.
    pub fn params(&self, config: &ConnectionConfig) -> CudaResult<ConnectionParams<f32>> {
        self.unpack(config, &download(&self.dev, self.values())?)
    }
}
